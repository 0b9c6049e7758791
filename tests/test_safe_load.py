"""No code runs from a checkpoint (dlm/safe_load.py): a hostile ``last.ckpt`` (a pickled ``os.system``,
``builtins.exec`` or ``subprocess.Popen`` call) on every entry point — dlm.generate, dlm.evaluate (and
``scorer=<run>``), dlm.consolidate, dlm.lm_eval, dlm.train ckpt_path= — exits 2 with one line that names the
global and how to allow it, runs nothing (the marker file the payload would create never appears) and writes
nothing into the run folder. Truncated, random, empty files and folders that are not ZeRO checkpoints are
reported as such. dlm's own checkpoints load with no trusted globals; DLM_TRUSTED_GLOBALS lets one through."""

from __future__ import annotations

import builtins
import fractions
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, write_mc_task

import dlm.evaluate
import dlm.generate
import dlm.train
from dlm import safe_load
from dlm.consolidate import main as consolidate_main
from dlm.parallel.checkpoint import ema_weights, load_state_dict
from dlm.safe_load import TRUSTED_ENV, CorruptCheckpointError, UnsafeCheckpointError, load_checkpoint
from dlm.train import train

TINY = [o for o in FAST if not o.startswith("trainer.max_steps")] + ["trainer.max_steps=2"]


class Call:
    """Pickles as a call of ``func(*args)``: what a hostile checkpoint holds."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict[str, tuple[Call, str]]:
    """name -> (the object that creates ``marker`` when unpickled, the global the message must name)."""
    return {
        "os.system": (Call(os.system, f"touch {marker}"), "os.system"),
        "builtins.exec": (Call(builtins.exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
        "subprocess.Popen": (Call(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
    }


def write_hostile(genuine: Path, out: Path, payload: Call) -> Path:
    """dlm's own checkpoint with one extra entry whose unpickling runs the payload."""
    ckpt = load_checkpoint(genuine)
    ckpt["extra"] = payload
    torch.save(ckpt, out)
    return out


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def run_cli(main, argv: list[str], capsys, prog: str = "dlm") -> tuple[int, str]:
    """Call a CLI's main in-process with ``argv``; (exit status, stderr)."""
    saved = sys.argv
    sys.argv = [prog, *argv]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, names: list[str], marker: Path) -> None:
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    for name in names:
        assert name in lines[0] and f"{TRUSTED_ENV}=" in lines[0], lines[0]
    assert not marker.exists(), "the hostile checkpoint ran its payload"


# ---- one real run per module, hostile copies per test ---------------------------------------------------------
@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    """A tiny real run of the training CLI (in-process: .hydra/, checkpoints/last.ckpt and best-*.ckpt)."""
    root = tmp_path_factory.mktemp("safe_load")
    code = 0
    saved = sys.argv
    # an HF backbone (built from its config), so that dlm.consolidate reads the checkpoint too
    sys.argv = ["dlm.train", *TINY, "model=qwen3_tiny", f"paths.output_root={root / 'runs'}",
                f"paths.cache_dir={root / 'cache'}", "name=safe"]
    try:
        dlm.train.main()
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = saved
    assert code in (0, None)
    (run,) = (root / "runs" / "safe").iterdir()
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    return run


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


@pytest.fixture
def hostile_run(genuine, tmp_path, marker) -> Path:
    """A copy of the run (under runs/safe/<time>, as the CLI writes it) whose last.ckpt calls os.system."""
    run = Path(shutil.copytree(genuine, tmp_path / "runs" / "safe" / genuine.name))
    write_hostile(genuine / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt",
                  payloads(marker)["os.system"][0])
    return run


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """One local lm-eval multiple-choice task (no download)."""
    return write_mc_task(tmp_path_factory.mktemp("tasks"), "dlm_safe_mc",
                         {"question": "1+1=", "choices": ["2", "3"], "label": 0})


# ---- every entry point refuses, runs nothing, writes nothing ---------------------------------------------------
def _lm_eval_main():
    from dlm.lm_eval import main

    main()


ENTRY_POINTS = {
    "generate": (dlm.generate.main, lambda run, **_: [f"run={run}", "num_samples=1"]),
    "evaluate": (dlm.evaluate.main, lambda run, **_: [f"run={run}", "max_batches=1", "num_mc=1"]),
    "consolidate": (lambda: consolidate_main(sys.argv[1:]), lambda run, **_: [str(run)]),
    "train_ckpt_file": (dlm.train.main, lambda run, **_: [*TINY, f"ckpt_path={run}/checkpoints/last.ckpt",
                                                           f"paths.cache_dir={run.parent.parent.parent / 'cache'}"]),
    "train_ckpt_last": (dlm.train.main, lambda run, **_: [*TINY, "ckpt_path=last", "name=safe",
                                                           f"paths.output_root={run.parent.parent}",
                                                           f"paths.cache_dir={run.parent.parent.parent / 'cache'}"]),
    "lm_eval": (_lm_eval_main, lambda run, task_dir: ["--model", "dlm", "--model_args", f"run={run}",
                                                      "--tasks", "dlm_safe_mc", "--include_path", str(task_dir),
                                                      "--device", "cpu"]),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_a_hostile_checkpoint_is_refused_on_every_entry_point(entry, hostile_run, marker, task_dir, capsys):
    if entry == "lm_eval":
        pytest.importorskip("lm_eval")
    main, argv = ENTRY_POINTS[entry]
    before = snapshot(hostile_run.parent.parent)  # the run folder and any sibling a new run would create
    code, err = run_cli(main, argv(hostile_run, task_dir=task_dir), capsys)
    assert_refused(code, err, ["os.system"], marker)
    assert str(hostile_run / "checkpoints" / "last.ckpt") in err
    assert snapshot(hostile_run.parent.parent) == before, "something was written"


def test_a_hostile_scorer_run_is_refused_before_the_evaluation_writes(genuine, hostile_run, tmp_path, marker, capsys):
    evaluated = Path(shutil.copytree(genuine, tmp_path / "evaluated"))
    before, before_scorer = snapshot(evaluated), snapshot(hostile_run)
    code, err = run_cli(dlm.evaluate.main, [f"run={evaluated}", f"scorer={hostile_run}", "max_batches=1",
                                            "num_mc=1", "samples.num_unconditional=2"], capsys)
    assert_refused(code, err, ["os.system"], marker)
    assert snapshot(evaluated) == before and snapshot(hostile_run) == before_scorer


@pytest.mark.parametrize("name", ["os.system", "builtins.exec", "subprocess.Popen"])
def test_every_payload_kind_is_named_and_never_runs(name, genuine, hostile_run, marker, capsys):
    payload, shown = payloads(marker)[name]
    write_hostile(genuine / "checkpoints" / "last.ckpt", hostile_run / "checkpoints" / "last.ckpt", payload)
    with pytest.raises(UnsafeCheckpointError, match=shown.replace(".", r"\.")):
        load_checkpoint(hostile_run / "checkpoints" / "last.ckpt")
    with pytest.raises(UnsafeCheckpointError):
        ema_weights(hostile_run / "checkpoints" / "last.ckpt")
    before = snapshot(hostile_run)
    code, err = run_cli(dlm.generate.main, [f"run={hostile_run}", "num_samples=1"], capsys)
    assert_refused(code, err, [shown], marker)
    assert snapshot(hostile_run) == before


@pytest.mark.parametrize("argv", [
    lambda run: ["-m", "dlm.generate", f"run={run}"],
    lambda run: ["-m", "dlm.train", *TINY, f"ckpt_path={run}/checkpoints/last.ckpt",
                 f"paths.cache_dir={run.parent.parent.parent / 'cache'}"],
], ids=["generate", "train"])
def test_the_real_cli_refuses_in_a_subprocess(argv, hostile_run, marker):
    before = snapshot(hostile_run)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop(TRUSTED_ENV, None)
    proc = subprocess.run([sys.executable, *argv(hostile_run)], capture_output=True, text=True, env=env, timeout=240)
    assert_refused(proc.returncode, proc.stderr, ["os.system"], marker)
    assert snapshot(hostile_run) == before


# ---- DeepSpeed ZeRO folders: vetted before DeepSpeed unpickles them --------------------------------------------
def fake_zero_folder(folder: Path, optim_states: dict) -> Path:
    """The layout DeepSpeed writes (latest -> tag folder of *_states.pt files, its recovery script)."""
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    (folder / "zero_to_fp32.py").write_text("# DeepSpeed's recovery script: never loaded\n")
    torch.save({"module": {"w": torch.ones(2)}, "buffer_names": []}, folder / "checkpoint" / "mp_rank_00_model_states.pt")
    torch.save(optim_states, folder / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return folder


def test_a_hostile_zero_folder_is_refused_before_deepspeed_opens_it(genuine, tmp_path, marker, monkeypatch, capsys):
    import deepspeed.utils.zero_to_fp32 as zero_to_fp32

    def never(*args, **kwargs):
        raise AssertionError("DeepSpeed opened a folder that was not vetted")

    monkeypatch.setattr(zero_to_fp32, "get_fp32_state_dict_from_zero_checkpoint", never)
    run = Path(shutil.copytree(genuine, tmp_path / "run"))
    (run / "checkpoints" / "last.ckpt").unlink()
    folder = fake_zero_folder(run / "checkpoints" / "last.ckpt", {"optimizer_state_dict": Call(os.system, f"touch {marker}")})
    with pytest.raises(UnsafeCheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt.*os.system"):
        load_state_dict(folder)
    before = snapshot(run)
    code, err = run_cli(lambda: consolidate_main(sys.argv[1:]), [str(run)], capsys)
    assert_refused(code, err, ["os.system"], marker)
    code, err = run_cli(dlm.generate.main, [f"run={run}"], capsys)
    assert_refused(code, err, ["os.system"], marker)
    assert snapshot(run) == before


def test_deepspeeds_own_plain_classes_pass_and_a_folder_that_is_no_zero_checkpoint_does_not(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # what a ZeRO-2 optimizer-state file holds (measured: tests/test_zero3_cpu.py's runs)
    folder = fake_zero_folder(tmp_path / "ok.ckpt", {"optimizer_state_dict": {
        "zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
        "param_slice_mappings": [{"w": fragment_address(numel=2, start=0)}]}})
    checked = safe_load.check(folder)
    assert checked.weights_only
    assert {g.__qualname__ for g in checked.globals} == {"LossScaler", "ZeroStageEnum", "fragment_address"}
    empty = tmp_path / "empty.ckpt"
    empty.mkdir()
    with pytest.raises(CorruptCheckpointError, match="not a DeepSpeed ZeRO checkpoint"):
        safe_load.check(empty)
    (empty / "latest").write_text("global_step9")
    with pytest.raises(CorruptCheckpointError, match="without its shards"):
        safe_load.check(empty)


# ---- unreadable files: said so, never torch's weights_only advice ---------------------------------------------
def corrupt_variants(genuine: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    data = (genuine / "checkpoints" / "last.ckpt").read_bytes()
    files = {
        "truncated": (data[: len(data) // 2], "truncated"),
        "random": (os.urandom(4096), "not a torch checkpoint"),
        "empty": (b"", "empty"),
        "zip_truncated_tail": (data[:-100], "truncated"),
    }
    out = {}
    for name, (blob, what) in files.items():
        (folder / f"{name}.ckpt").write_bytes(blob)
        out[name] = (folder / f"{name}.ckpt", what)
    (folder / "dir.ckpt").mkdir()
    out["directory"] = (folder / "dir.ckpt", "not a DeepSpeed ZeRO checkpoint")
    return out


def test_corrupt_files_are_reported_as_corrupt(genuine, tmp_path, capsys):
    for name, (path, what) in corrupt_variants(genuine, tmp_path).items():
        with pytest.raises(CorruptCheckpointError) as info:
            safe_load.check(path)
        message = str(info.value)
        assert what in message and str(path) in message and "ckpt=best" in message, (name, message)
        assert "weights_only" not in message, (name, message)


@pytest.mark.parametrize("variant", ["truncated", "random", "empty", "directory"])
def test_a_corrupt_last_ckpt_on_the_clis_is_one_line(variant, genuine, tmp_path, capsys):
    run = Path(shutil.copytree(genuine, tmp_path / "runs" / "safe" / genuine.name))
    path, what = corrupt_variants(genuine, tmp_path)[variant]
    (run / "checkpoints" / "last.ckpt").unlink()
    shutil.move(path, run / "checkpoints" / "last.ckpt")
    before = snapshot(run)
    for main, argv in (ENTRY_POINTS["generate"], ENTRY_POINTS["evaluate"], ENTRY_POINTS["train_ckpt_file"]):
        code, err = run_cli(main, argv(run), capsys)
        assert code == 2 and "Traceback" not in err and what in err and "weights_only" not in err, err[-2000:]
    assert snapshot(run) == before


# ---- dlm's own checkpoints load with no trusted globals; the allow mechanism -------------------------------------
def test_dlms_own_checkpoints_load_safely(genuine, run_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv(TRUSTED_ENV, raising=False)
    ema_run = train(run_cfg("callbacks=ema", "trainer.max_steps=3", run_dir=tmp_path / "ema"))
    ar_run = train(run_cfg("method=ar", "trainer.max_steps=3", run_dir=tmp_path / "ar"))
    files = [p for run in (genuine, ema_run, ar_run) for p in (run / "checkpoints").glob("*.ckpt")]
    assert len(files) >= 5  # last.ckpt of each, best-*.ckpt of the 3-step runs
    for path in files:
        assert safe_load.check(path) == safe_load.Checked(), path  # nothing beyond torch's own weights_only set
        ckpt = load_checkpoint(path)
        assert ckpt["state_dict"] and ckpt["optimizer_states"], path
    shadow = ema_weights(ema_run / "checkpoints" / "last.ckpt")
    assert shadow and all(torch.is_tensor(t) for t in shadow.values())
    assert ema_weights(ar_run / "checkpoints" / "last.ckpt") is None


def test_a_knowingly_trusted_global_is_let_through(genuine, tmp_path, marker, monkeypatch):
    plain = tmp_path / "fraction.ckpt"
    torch.save({"state_dict": {}, "ratio": fractions.Fraction(1, 3)}, plain)
    monkeypatch.delenv(TRUSTED_ENV, raising=False)
    with pytest.raises(UnsafeCheckpointError, match=rf"fractions\.Fraction.*{TRUSTED_ENV}=fractions\.Fraction"):
        load_checkpoint(plain)
    monkeypatch.setenv(TRUSTED_ENV, "collections.Counter, fractions.Fraction")
    assert load_checkpoint(plain)["ratio"] == fractions.Fraction(1, 3)
    # trusting a function means running it: os.system, named as the message says, really runs
    hostile = write_hostile(genuine / "checkpoints" / "last.ckpt", tmp_path / "h.ckpt", payloads(marker)["os.system"][0])
    monkeypatch.setenv(TRUSTED_ENV, "os.system")
    assert load_checkpoint(hostile)["state_dict"] and marker.exists()
    monkeypatch.setenv(TRUSTED_ENV, "nosuch_module.Thing")
    with pytest.raises(safe_load.UserError, match=f"{TRUSTED_ENV}.*nosuch_module.Thing"):
        load_checkpoint(plain)


def test_lightning_resume_loads_under_the_allowlist(genuine, tmp_path, capsys, monkeypatch):
    """ckpt_path=last through the CLI: vetted before Hydra runs, then Lightning's weights_only load resumes it."""
    monkeypatch.delenv(TRUSTED_ENV, raising=False)
    run = Path(shutil.copytree(genuine, tmp_path / "runs" / "safe" / genuine.name))
    argv = [o for o in ENTRY_POINTS["train_ckpt_last"][1](run) if not o.startswith("trainer.max_steps")]
    code, err = run_cli(dlm.train.main, [*argv, "trainer.max_steps=3"], capsys)
    assert code == 0, err[-3000:]
    assert json.loads((run / "results.json").read_text())["global_step"] == 3



def test_the_data_cache_never_unpickles(tmp_path, marker):
    """A cached .npz holding a pickled object array is not unpickled: safe_load refuses it, the cache rebuilds it."""
    import numpy as np

    from dlm.data.cache import load_or_build

    payload = np.empty(1, dtype=object)
    payload[0] = Call(os.system, f"touch {marker}")
    np.savez(tmp_path / "k.npz", ids=payload)
    with pytest.raises(ValueError, match="allow_pickle"):
        safe_load.load_arrays(tmp_path / "k.npz")
    out = load_or_build(tmp_path, "k", lambda: {"ids": np.arange(3)})
    assert out["ids"].tolist() == [0, 1, 2] and not marker.exists()
    assert safe_load.load_arrays(tmp_path / "k.npz")["ids"].tolist() == [0, 1, 2]


def test_an_fsdp_sharded_folder_is_vetted_entry_by_entry(tmp_path, marker):
    """trainer=fsdp saves torch.distributed.checkpoint folders: torch unpickles `.metadata` and non-tensor entries
    without restriction, so each is vetted first."""
    import pickle

    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.ones(3)}, "step": 3, "name": "x"}
    dcp.save(state, checkpoint_id=tmp_path / "good")
    torch.save({"epoch": 1, "loops": {}}, tmp_path / "good" / "meta.pt")  # Lightning's file beside the shards
    assert safe_load.check(tmp_path / "good").weights_only
    dcp.save({**state, "extra": Call(os.system, f"touch {marker}")}, checkpoint_id=tmp_path / "entry")
    with pytest.raises(UnsafeCheckpointError, match=r"__0_0\.distcp.*os\.system"):
        safe_load.check(tmp_path / "entry")
    shutil.copytree(tmp_path / "good", tmp_path / "meta")
    (tmp_path / "meta" / ".metadata").write_bytes(pickle.dumps(Call(os.system, f"touch {marker}")))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata.*os\.system"):
        safe_load.check(tmp_path / "meta")
    (tmp_path / "meta" / ".metadata").write_bytes(os.urandom(64))
    with pytest.raises(CorruptCheckpointError, match="metadata"):
        safe_load.check(tmp_path / "meta")
    assert not marker.exists()


class KeepsItsArguments(torch.optim.SGD):
    """An optimizer that keeps its constructor arguments as given (DeepSpeed's CPU Adam keeps betas so)."""

    def __init__(self, params, lr, betas=None, eps=None, weight_decay=0.0):
        super().__init__(params, lr=lr, weight_decay=weight_decay)
        self.given_betas = betas


def test_the_optimizer_gets_plain_python_arguments(run_cfg):
    """An OmegaConf list reaching an optimizer ends up pickled in its state: a checkpoint the allowlist refuses."""
    from omegaconf import ListConfig

    from dlm.build import build_datamodule, build_module

    cfg = run_cfg(f"optimizer._target_={__name__}.KeepsItsArguments", "~lr_scheduler")
    datamodule = build_datamodule(cfg)
    optimizer = build_module(cfg, datamodule).configure_optimizers()
    assert optimizer.given_betas == [0.9, 0.98] and not isinstance(optimizer.given_betas, ListConfig)
