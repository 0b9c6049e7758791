"""Bad input gets one clear message, never a traceback, and is never silently "fixed" (issue 11, item 7).

A table of cases across every CLI: ``dlm.train`` (config values, groups, data, tokenizers, folders, the Hub
offline, host memory), ``dlm.generate``, ``dlm.evaluate``, ``dlm.consolidate`` and ``dlm.lm_eval``. Each case runs
the CLI's ``main()`` in-process with its argv and asserts exit status 2, the substrings that name the field and
the valid form, and no traceback. Cases that need a trained run share one tiny run made once for the module; two
cases run as real subprocesses to prove the command line itself."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning  # noqa: F401  (imported outside any test's capture: its log handlers keep a stream that stays open)
import pytest
from conftest import write_mc_task

REPO = Path(__file__).resolve().parent.parent
MAIN = {
    "train": "dlm.train",
    "generate": "dlm.generate",
    "evaluate": "dlm.evaluate",
    "consolidate": "dlm.consolidate",
    "lm_eval": "dlm.lm_eval",
}
# The shared tiny run: 2 steps, no samples.
TRAIN_RUN = [
    "logger=none", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "data.batch_size=8",
    "data.source.num_train=64", "data.source.num_val=16", "samples.num_unconditional=0", "samples.num_prompted=0",
    "samples.num_infill=0", "sampler.steps=2",
]
# Every training case fails before trainer.fit; these keep the data it builds first small (and few overrides keep
# preflight's one-by-one composition of a failing command line short). A case's own value for a key wins.
TRAIN_BASE = ["logger=none", "trainer.max_steps=2", "data.batch_size=8", "data.source.num_train=64",
              "data.source.num_val=16"]
EVAL_BASE = ["samples.num_unconditional=0", "samples.num_prompted=0", "samples.num_infill=0", "wandb=off"]


@dataclass
class Case:
    id: str
    cli: str
    args: list[str]
    expect: list[str]  # substrings of the message: the field and the valid form
    bare: bool = False  # refused while composing: no fast-run settings needed (each costs preflight a compose)


def T(id, *args, expect, **kw):  # noqa: N802 - table rows read better short
    return Case(id, "train", list(args), expect, **kw)


def C(id, *args, expect):  # noqa: N802 - a training case that Hydra's composition refuses
    return Case(id, "train", list(args), expect, bare=True)


def G(id, *args, expect):  # noqa: N802
    return Case(id, "generate", ["run={run}", *args], expect)


def E(id, *args, expect):  # noqa: N802
    return Case(id, "evaluate", ["run={run}", *EVAL_BASE, *args], expect)


TEXT = ["data=text_files"]  # text_files: byte tokenizer; paths given per case
CASES = [
    # ---- the values of the training config -------------------------------------------------------------------
    T("max_steps-abc", "trainer.max_steps=abc", expect=["trainer.max_steps=abc", "positive number"]),
    T("max_steps-negative", "trainer.max_steps=-5", expect=["trainer.max_steps=-5", "positive number"]),
    T("val_check_interval-0", "trainer.val_check_interval=0", expect=["trainer.val_check_interval=0", "positive integer"]),
    T("accumulate-0", "trainer.accumulate_grad_batches=0", expect=["trainer.accumulate_grad_batches=0", "positive integer"]),
    T("grad_clip-negative", "trainer.gradient_clip_val=-1", expect=["trainer.gradient_clip_val=-1", "number >= 0"]),
    T("precision-bogus", "trainer.precision=bogus", expect=["trainer:", "precision", "bogus"]),
    T("devices-abc", "trainer.devices=abc", expect=["trainer:", "devices", "int > 0"]),
    T("accelerator-bogus", "trainer.accelerator=bogus", expect=["trainer:", "bogus", "accelerator"]),
    T("lr-abc", "optimizer.lr=abc", expect=["optimizer.lr='abc'", "number >= 0"]),
    T("lr-negative", "optimizer.lr=-1", expect=["optimizer.lr=-1", "number >= 0"]),
    T("weight_decay-negative", "optimizer.weight_decay=-0.1", expect=["optimizer.weight_decay=-0.1", "number >= 0"]),
    T("eps-zero", "optimizer.eps=0", expect=["optimizer.eps=0", "number > 0"]),
    T("betas-out-of-range", "optimizer.betas=[0.9,1.5]", expect=["optimizer.betas=[0.9, 1.5]", "two numbers in [0, 1)"]),
    T("warmup-negative", "lr_scheduler.warmup_steps=-10", expect=["lr_scheduler.warmup_steps=-10", "integer >= 0"]),
    T("warmup-abc", "lr_scheduler.warmup_steps=abc", expect=["lr_scheduler.warmup_steps='abc'", "integer >= 0"]),
    T("min_lr_ratio-2", "lr_scheduler.min_lr_ratio=2", expect=["lr_scheduler.min_lr_ratio=2", "number in [0, 1]"]),
    C("seed-abc", "seed=abc", expect=["seed=abc", "Integer"]),
    T("seed-negative", "seed=-1", expect=["seed=-1", "integer in [0, 4294967295]"]),
    C("dry_run-maybe", "dry_run=maybe", expect=["dry_run=maybe", "not a valid bool"]),
    T("compile-bogus", "compile=bogus", expect=["compile=bogus", "default, reduce-overhead"]),
    C("static_kv_cache-maybe", "static_kv_cache=maybe", expect=["static_kv_cache=maybe", "not a valid bool"]),
    T("samples-negative", "samples.num_prompted=-1", expect=["samples.num_prompted=-1", ">= 0"]),
    C("samples-abc", "samples.num_infill=abc", expect=["samples.num_infill=abc", "Integer"]),
    T("samples-length-0", "samples.length=0", expect=["samples.length=0", "positive integer"]),
    # ---- groups and keys -------------------------------------------------------------------------------------
    C("method-nosuch", "method=nosuch", expect=["method=nosuch", "valid options for method", "mdlm"]),
    C("model-nosuch", "model=nosuch", expect=["model=nosuch", "valid options for model", "tiny"]),
    C("data-nosuch", "data=nosuch", expect=["data=nosuch", "valid options for data", "text_files"]),
    C("key-typo", "optimizer.lrr=1", expect=["unknown key 'lrr'", "did you mean optimizer.lr"]),
    T("target-nosuch", "schedule._target_=dlm.schedules.Nosuch", expect=["schedule:", "dlm.schedules.Nosuch",
                                                                          "schedule._target_"]),
    # ---- model, schedule, sampler and method parameters --------------------------------------------------------
    T("n_heads-not-dividing", "model.n_heads=3", expect=["model:", "n_heads=3 must divide d_model=128"]),
    T("d_model-abc", "model.d_model=abc", expect=["model:", "d_model='abc'", "positive integer"]),
    T("n_layers-0", "model.n_layers=0", expect=["model:", "n_layers=0", "positive integer"]),
    T("attention-bogus", "model.attention=bogus", expect=["model:", "bogus", "bidirectional"]),
    T("model-unknown-arg", "+model.bogus=1", expect=["model:", "unexpected keyword argument 'bogus'"]),
    T("seq_len-over-model", "data.seq_len=512", expect=["data.seq_len=512", "model.max_seq_len"]),
    T("power-negative", "schedule=polynomial", "schedule.power=-1", expect=["schedule:", "power", "> 0"]),
    T("sampler-steps-0", "sampler.steps=0", expect=["sampler:", "steps must be an integer >= 1"]),
    T("sampler-temperature", "sampler.temperature=-1", expect=["sampler:", "temperature must be >= 0"]),
    T("sampler-threshold", "sampler=threshold", "sampler.threshold=2", expect=["sampler:", "threshold must be in [0, 1]"]),
    T("sampler-block_length", "sampler=low_confidence", "sampler.block_length=0",
      expect=["sampler:", "block_length must be an integer >= 1"]),
    T("t_eps-2", "method.t_eps=2", expect=["method", "t_eps must be in [0, 1)"]),
    T("time_sampling-bogus", "method.time_sampling=bogus", expect=["method.time_sampling='bogus'", "antithetic"]),
    T("sundae-unroll-0", "method=sundae", "method.unroll_steps=0", expect=["method.unroll_steps", "integer >= 1"]),
    # ---- data ------------------------------------------------------------------------------------------------
    T("batch_size-abc", "data.batch_size=abc", expect=["data.batch_size=abc", "positive integer"]),
    T("batch_size-0", "data.batch_size=0", expect=["data.batch_size=0", "positive integer"]),
    T("batch_size-over-rows", "data.batch_size=4096", expect=["batch_size=4096", "lower batch_size"]),
    T("seq_len-1", "data.seq_len=1", expect=["data.seq_len=1", "integer >= 2"]),
    T("seq_len-abc", "data.seq_len=abc", expect=["data.seq_len=abc", "integer >= 2"]),
    T("packing-maybe", "data.packing=maybe", expect=["data.packing='maybe'", "true or false"]),
    T("num_workers-negative", "data.num_workers=-1", expect=["data:", "num_workers must be >= 0"]),
    T("text_files-no-paths", *TEXT, expect=["data.source.paths is required", "data.source.paths=corpus.txt"]),
    T("paths-glob-no-match", *TEXT, "data.source.paths={tmp}/nosuch*.txt", expect=["matched no files",
                                                                                  "check the pattern"]),
    T("paths-missing-file", *TEXT, "data.source.paths={tmp}/missing.txt", expect=["missing.txt' does not exist",
                                                                                "existing file, directory or glob"]),
    T("paths-empty-list", *TEXT, "data.source.paths=[]", expect=["`paths` is empty", "at least one file"]),
    T("paths-empty-folder", *TEXT, "data.source.paths={empty}", expect=["contains no files"]),
    T("paths-file-that-is-a-folder", *TEXT, "data.source.paths={tmp}/folder.txt", expect=["folder.txt",
                                                                                        "contains no files"]),
    T("paths-device", *TEXT, "data.source.paths=/dev/null", expect=["/dev/null", "neither a regular file nor a folder"]),
    T("paths-binary", *TEXT, "data.source.paths={binary}", expect=["binary.dat looks binary", "NUL bytes",
                                                                  "leave it out of data.source.paths"]),
    T("paths-latin1", *TEXT, "data.source.paths={latin1}", expect=["latin1.txt is not valid utf-8 text",
                                                                  "+data.source.encoding=<its codec>"]),
    T("encoding-bogus", *TEXT, "data.source.paths={good}", "+data.source.encoding=bogus",
      expect=["encoding='bogus' is not a Python codec", "utf-8"]),
    T("val_fraction-2", *TEXT, "data.source.paths={good}", "data.source.val_fraction=2",
      expect=["val_fraction must be in [0, 1)"]),
    T("split_on-bogus", *TEXT, "data.source.paths={good}", "data.source.split_on=word",
      expect=["split_on='word'", "blank_line"]),
    T("empty-corpus", *TEXT, "data.source.paths={blank}", expect=["corpus is empty", "point `paths` at files"]),
    # ---- tokenizers ------------------------------------------------------------------------------------------
    T("hf-tokenizer-empty-folder", "data.tokenizer._target_=dlm.data.tokenizers.HFTokenizer",
      "~data.tokenizer.alphabet", "+data.tokenizer.name_or_path={empty}",
      expect=["data.tokenizer.name_or_path=", "has no tokenizer files", "save_pretrained"]),
    T("hf-tokenizer-missing-folder", "data.tokenizer._target_=dlm.data.tokenizers.HFTokenizer",
      "~data.tokenizer.alphabet", "+data.tokenizer.name_or_path={tmp}/no_tokenizer",
      expect=["data.tokenizer.name_or_path=", "no such folder", "local folder with a saved tokenizer"]),
    T("hf-tokenizer-offline", "data.tokenizer._target_=dlm.data.tokenizers.HFTokenizer",
      "~data.tokenizer.alphabet", "+data.tokenizer.name_or_path=someone/not-cached",
      expect=["data.tokenizer.name_or_path=someone/not-cached", "offline", "local folder"]),
    T("char-tokenizer-empty", "data.tokenizer.alphabet=''", expect=["data:", "non-empty alphabet"]),
    # ---- the Hub offline; folders; host memory -------------------------------------------------------------------
    T("tinystories-offline", "data=tinystories", expect=["data.source.path=roneneldan/TinyStories",
                                                         "Hugging Face Hub", "offline", "data.source.path=<"]),
    T("hf-model-offline", "model=qwen3_0p6b", expect=["model.pretrained=Qwen/", "offline", "local folder"]),
    T("hf-model-missing-folder", "model=qwen3_0p6b", "model.pretrained={tmp}/no_model",
      expect=["model.pretrained=", "no such folder", "local HF model folder"]),
    T("hf-dataset-missing-path", "data=tinystories", "data.source.path={tmp}/no_dataset",
      expect=["data.source.path=", "no such file or folder", "local dataset folder"]),
    T("output_root-under-a-file", "paths.output_root={file}/runs", expect=["paths.output_root=",
                                                                          "is a file, not a folder"]),
    T("output_root-is-a-file", "paths.output_root={file}", expect=["paths.output_root=", "is a file, not a folder"]),
    T("cache_dir-under-a-file", "paths.cache_dir={file}/cache", expect=["paths.cache_dir=", "is a file, not a folder"]),
    T("moe30b-on-cpu", "model=moe30b", "data=brackets", "trainer=cpu",
      expect=["trainer.accelerator=cpu", "GiB of host memory", "this machine has", "dry_run=true"]),
    # ---- dlm.generate ----------------------------------------------------------------------------------------
    Case("gen-run-missing", "generate", ["prompt=()"], ["run= is required", "a run folder"]),
    Case("gen-run-nosuch", "generate", ["run={tmp}/nosuch"], expect=["no such file or folder", "pass a run folder"]),
    Case("gen-run-not-a-run", "generate", ["run={empty}"], expect=["is not a run folder", ".hydra/config.yaml"]),
    G("gen-num_samples-0", "num_samples=0", expect=["num_samples=0", "positive integer"]),
    G("gen-num_samples-abc", "num_samples=abc", expect=["num_samples='abc'", "positive integer"]),
    G("gen-length-0", "length=0", expect=["length=0", "positive integer"]),
    G("gen-length-abc", "length=abc", expect=["length='abc'", "positive integer"]),
    G("gen-steps-0", "steps=0", expect=["steps=0", "positive integer"]),
    G("gen-seed-negative", "seed=-1", expect=["seed=-1", "integer in [0,"]),
    G("gen-ckpt-nosuch", "ckpt=nosuch", expect=["no checkpoint nosuch", "checkpoints present"]),
    G("gen-device-bogus", "device=bogus", expect=["device='bogus'", "cpu, cuda"]),
    G("gen-mask-malformed", "infill=([MASK:x])", expect=["malformed hole '[MASK:x]'", "[MASK:n]"]),
    G("gen-mask-unclosed", "infill=([MASK:2)", expect=["malformed hole", "[MASK:n]"]),
    G("gen-mask-lowercase", "infill=([mask])", expect=["malformed hole '[mask]'", "[MASK]"]),
    G("gen-mask-zero", "infill=([MASK:0])", expect=["[MASK:0]", "n >= 1"]),
    G("gen-infill-no-hole", "infill=(())", expect=["has no hole", "[MASK:n]"]),
    G("gen-prompt-and-infill", "prompt=(", "infill=([MASK])", expect=["prompt= or infill=", "not both"]),
    G("gen-prompt-not-in-alphabet", "prompt=abc", expect=["character 'a' is not in the alphabet", "()[]"]),
    G("gen-prompt-too-long", "prompt=" + "(" * 300, expect=["prompt + length", "max_seq_len=256"]),
    G("gen-sampler-nosuch", "sampler=nosuch", expect=["sampler=nosuch", "valid options for sampler", "mdlm"]),
    G("gen-sampler-temperature", "+sampler_args.temperature=-1", expect=["sampler:", "temperature must be >= 0"]),
    G("gen-sampler-unknown-arg", "+sampler_args.bogus=1", expect=["sampler:", "unexpected keyword argument 'bogus'"]),
    # ---- dlm.evaluate ----------------------------------------------------------------------------------------
    E("eval-max_batches-0", "max_batches=0", expect=["max_batches=0", "positive integer", "whole validation split"]),
    E("eval-num_mc-0", "num_mc=0", expect=["num_mc=0", "positive integer"]),
    E("eval-num_mc-abc", "num_mc=abc", expect=["num_mc='abc'", "positive integer"]),
    E("eval-batch_size-0", "batch_size=0", expect=["batch_size=0", "positive integer"]),
    E("eval-samples-negative", "samples.num_prompted=-1", expect=["samples.num_prompted=-1", "integer >= 0"]),
    E("eval-likelihood-maybe", "likelihood=maybe", expect=["likelihood='maybe'", "true or false"]),
    E("eval-wandb-maybe", "wandb=maybe", expect=["wandb='maybe'", "auto, off"]),
    E("eval-steps-0", "steps=0", expect=["steps=0", "positive integer"]),
    E("eval-scorer-nosuch", "scorer={tmp}/no_scorer", expect=["scorer=", "no such folder", "dlm run folder"]),
    E("eval-scorer-offline", "scorer=someone/not-cached", expect=["scorer=someone/not-cached", "offline",
                                                                  "local HF causal LM folder"]),
    E("eval-sampler-nosuch", "sampler=nosuch", expect=["sampler=nosuch", "valid options for sampler"]),
    E("eval-ckpt-best-missing", "ckpt=nosuch.ckpt", expect=["no checkpoint nosuch.ckpt", "checkpoints present"]),
    Case("eval-run-missing", "evaluate", EVAL_BASE, ["run= is required", "a run folder"]),
    Case("eval-run-not-a-run", "evaluate", ["run={empty}", *EVAL_BASE], ["is not a run folder"]),
    # ---- dlm.consolidate -------------------------------------------------------------------------------------
    Case("consolidate-native", "consolidate", ["{run}"], ["model._target_=dlm.models.hf.HFCausalLM",
                                                         "dlm.models.transformer.Transformer", "dlm.generate run="]),
    Case("consolidate-nosuch", "consolidate", ["{tmp}/nosuch"], ["no such file or folder", "pass a run folder"]),
    Case("consolidate-not-a-run", "consolidate", ["{empty}"], ["is not a run folder"]),
    Case("consolidate-bad-flag", "consolidate", ["{run}", "--bogus"], ["unrecognized arguments: --bogus", "usage:"]),
    Case("consolidate-out-under-a-file", "consolidate", ["{run}", "--out", "{file}/hf"], ["--out=",
                                                                                       "is a file, not a folder"]),
    # ---- dlm.lm_eval -----------------------------------------------------------------------------------------
    Case("lm_eval-unknown-arg", "lm_eval", ["--model_args", "run={run},mcnum=3"], ["unknown model_args ['mcnum']",
                                                                                  "mc_num"]),
    Case("lm_eval-mc_num-0", "lm_eval", ["--model_args", "run={run},mc_num=0"], ["mc_num=0", "positive integer"]),
    Case("lm_eval-mc_num-abc", "lm_eval", ["--model_args", "run={run},mc_num=abc"], ["mc_num='abc'", "positive integer"]),
    Case("lm_eval-max_gen_toks-0", "lm_eval", ["--model_args", "run={run},max_gen_toks=0"], ["max_gen_toks=0",
                                                                                         "positive integer"]),
    Case("lm_eval-run-nosuch", "lm_eval", ["--model_args", "run={tmp}/nosuch"], ["no such file or folder"]),
    Case("lm_eval-estimator-bogus", "lm_eval", ["--model_args", "run={run},estimator=bogus"],
         ["estimator='bogus'", "auto, mc, exact, bound"]),
]


# ---- the shared fixtures: one tiny run, the files the data cases read -------------------------------------------
def call_main(cli: str, argv: list[str], capsys, monkeypatch=None) -> tuple[int, str]:
    """Run a CLI's main() in-process with argv; (exit status, stdout + stderr)."""
    import importlib

    from hydra.core.global_hydra import GlobalHydra

    module = importlib.import_module(MAIN[cli])
    if cli == "lm_eval" and monkeypatch is not None:
        import functools

        import lm_eval.__main__
        import lm_eval.tasks

        # Speed and hygiene only: index the tasks of --include_path, not lm_eval's thousands of built-in ones, and
        # keep lm_eval's log handlers off pytest's per-test streams (closed after the test).
        monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                            functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))
        monkeypatch.setattr(lm_eval.__main__, "setup_logging", lambda *a, **k: None)
    GlobalHydra.instance().clear()
    old = sys.argv
    sys.argv = [MAIN[cli], *argv]
    code = 0
    try:
        module.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
        GlobalHydra.instance().clear()
        # Hydra's job logging bound these to this test's captured streams, which close after it
        for handler in [h for h in logging.root.handlers if type(h) is logging.StreamHandler]:
            logging.root.removeHandler(handler)
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture(scope="module")
def where(tmp_path_factory) -> dict[str, str]:
    """Placeholders of the table: {tmp}, {run} (a tiny trained run), files and folders for the data cases."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "empty").mkdir()
    (tmp / "folder.txt").mkdir()
    (tmp / "a_file").write_text("not a folder\n")
    (tmp / "binary.dat").write_bytes(bytes(range(256)) * 4)
    (tmp / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n\nna\u00efve\n".encode("latin-1"))
    (tmp / "good.txt").write_text("\n\n".join(f"document {i}" for i in range(50)))
    (tmp / "blank.txt").write_text("\n\n\n")
    places = {"tmp": str(tmp), "empty": str(tmp / "empty"), "file": str(tmp / "a_file"),
              "binary": str(tmp / "binary.dat"), "latin1": str(tmp / "latin1.txt"), "good": str(tmp / "good.txt"),
              "blank": str(tmp / "blank.txt")}
    tasks = write_mc_task(tmp / "tasks", "dlm_bad_inputs_mc", {"question": "(", "choices": [")", "]"], "label": 0},
                          target_delimiter="")
    places["tasks"] = str(tasks)
    return places


@pytest.fixture(scope="module")
def trained_run(where) -> str:
    """One tiny mdlm run (2 steps) for the generate / evaluate / consolidate / lm_eval cases (in-process)."""
    import contextlib
    import io

    from hydra.core.global_hydra import GlobalHydra

    from dlm.train import main

    out = io.StringIO()
    old = sys.argv
    sys.argv = ["dlm.train", *TRAIN_RUN, f"paths.output_root={where['tmp']}/runs",
                f"paths.cache_dir={where['tmp']}/cache", "name=tiny"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            main()
    finally:
        sys.argv = old
        GlobalHydra.instance().clear()
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("run_dir: ")]
    assert lines, out.getvalue()[-3000:]
    return lines[-1].removeprefix("run_dir: ")


def _env(where) -> dict[str, str]:
    """Offline, with empty Hugging Face caches: the Hub cases must not depend on what this machine has cached."""
    hf = Path(where["tmp"]) / "hf_home"
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
            "HF_HOME": str(hf), "HF_HUB_CACHE": str(hf / "hub"), "HF_DATASETS_CACHE": str(hf / "datasets")}


def argv_for(case: Case, where: dict[str, str], run: str | None) -> list[str]:
    places = {**where, "run": run or ""}
    args = [a.format(**places) for a in case.args]
    if case.cli == "train":
        given = {a.split("=", 1)[0].lstrip("+~") for a in args}
        base = [] if case.bare else [o for o in TRAIN_BASE if o.split("=", 1)[0].lstrip("+~") not in given]
        if any(a.startswith("data=") for a in args):  # other data: no data.source.num_* keys
            base = [o for o in base if not o.startswith("data.source.")]
        paths = [f"paths.{k}={where['tmp']}/{v}" for k, v in (("output_root", "runs"), ("cache_dir", "cache"))
                 if f"paths.{k}" not in given]
        return [*base, *paths, *args]
    if case.cli == "lm_eval":
        return ["--model", "dlm", *args, "--tasks", "dlm_bad_inputs_mc", "--include_path", where["tasks"],
                "--device", "cpu"]
    return args


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_message(case: Case, where, request, capsys, monkeypatch):
    needs_run = any("{run}" in a for a in case.args)
    run = request.getfixturevalue("trained_run") if needs_run else None
    for key, value in _env(where).items():
        if key.startswith(("HF_", "WANDB_")):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(where["tmp"])
    code, out = call_main(case.cli, argv_for(case, where, run), capsys, monkeypatch)
    assert "Traceback" not in out, out[-3000:]
    assert code == 2, out[-3000:]
    for text in case.expect:
        assert text in out, f"{text!r} not in:\n{out[-3000:]}"


def test_enough_cases():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


def test_moe30b_dry_run_still_plans(where, capsys, monkeypatch):
    """The host-memory check refuses to train moe30b on this CPU, but its plan is still printed."""
    monkeypatch.chdir(where["tmp"])
    code, out = call_main("train", [f"paths.output_root={where['tmp']}/runs", f"paths.cache_dir={where['tmp']}/cache",
                                    "model=moe30b", "trainer=cpu", "dry_run=true", "logger=none"], capsys)
    assert code == 0, out[-3000:]
    assert "plan for" in out and "active per token" in out


@pytest.mark.parametrize("cli, args, expect", [
    ("dlm.train", ["trainer.max_steps=abc", "lr_scheduler.warmup_steps=-10"],
     ["trainer.max_steps=abc", "lr_scheduler.warmup_steps=-10"]),
    ("dlm.consolidate", ["{run}"], ["model._target_=dlm.models.hf.HFCausalLM"]),
], ids=["train", "consolidate"])
def test_the_command_line_itself(cli, args, expect, where, trained_run):
    """The same answers from real processes: exit status 2, the message, no traceback."""
    args = [a.format(run=trained_run) for a in args]
    if cli == "dlm.train":
        args += [f"paths.output_root={where['tmp']}/runs", f"paths.cache_dir={where['tmp']}/cache"]
    proc = subprocess.run([sys.executable, "-m", cli, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=_env(where))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert "error:" in proc.stderr
    for text in expect:
        assert text in proc.stderr, proc.stderr[-3000:]


def _train_args(where, *args: str) -> list[str]:
    return argv_for(T("simulated", *args, expect=[]), where, None)


def test_an_unreadable_data_file_is_named(where, capsys, monkeypatch):
    """Root reads any file whatever its mode, so the fault is injected: open() refuses the corpus."""
    import builtins

    import dlm.data.sources as sources

    def refusing_open(path, *args, **kwargs):
        if str(path) == where["good"]:
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(sources, "open", refusing_open, raising=False)
    monkeypatch.chdir(where["tmp"])
    code, out = call_main("train", _train_args(where, "data=text_files", f"data.source.paths={where['good']}",
                                               f"paths.cache_dir={where['tmp']}/cache_unreadable"), capsys)
    assert code == 2 and "Traceback" not in out, out[-3000:]
    assert f"cannot read {where['good']} (Permission denied)" in out and "make it readable" in out


def test_a_read_only_output_root_is_refused_before_hydra_writes(where, capsys, monkeypatch):
    """Root writes anywhere, so the fault is injected: the permission check says the folder is read-only."""
    import dlm.config

    read_only = Path(where["tmp"]) / "read_only"
    read_only.mkdir(exist_ok=True)
    real_access = os.access
    monkeypatch.setattr(dlm.config.os, "access",
                        lambda p, mode: False if Path(p) == read_only else real_access(p, mode))
    monkeypatch.chdir(where["tmp"])
    code, out = call_main("train", _train_args(where, f"paths.output_root={read_only}/runs"), capsys)
    assert code == 2 and "Traceback" not in out, out[-3000:]
    assert f"paths.output_root={read_only}/runs: {read_only} is not writable" in out
    assert not any(read_only.iterdir())  # refused before Hydra made the run folder
