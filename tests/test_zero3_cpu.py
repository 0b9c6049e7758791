"""DeepSpeed ZeRO end to end on the CPU, through the real CLIs (`python -m dlm.train`, `dlm.consolidate`,
`dlm.generate` in subprocesses): a tiny Qwen3-MoE (`model=moe_tiny`) starts from a local pretrained checkpoint
loaded straight into the ZeRO-3 partitions (configure_model inside deepspeed.zero.Init; each rank prints what it
holds), trains under ZeRO-3 (MoE blocks as leaf modules), checkpoints as a ZeRO folder, consolidates into an HF folder
that transformers loads, generates, and resumes; ZeRO-2 and ZeRO-3 with CPU offload train and consolidate.

Lightning's DeepSpeedStrategy refuses CPU accelerators; tests/zero_cpu_strategy.py (test-only) lifts that and
partitions every parameter (DeepSpeed would keep a tiny model's parameters whole), so ZeRO-3 really shards here.
The CLI runs are marked slow: each costs 10-30 s (imports, DeepSpeed setup)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
ON_CPU = [  # the test strategy on the CPU; the trainer option (stage, offload) is chosen per test
    "trainer.strategy._target_=zero_cpu_strategy.CPUDeepSpeedStrategy",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
]
SMALL = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "+trainer.enable_model_summary=false",
    "data.batch_size=8",
    "data.source.num_train=256",
    "data.source.num_val=32",
    "samples.num_unconditional=2",
    "samples.num_prompted=2",
    "samples.num_infill=2",
    "sampler.steps=4",
    "logger=none",
]
PREFIX = "backbone.hf_model."


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny pretrained Qwen3-MoE checkpoint (moe_tiny's geometry, random weights) saved as an HF folder."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    geometry = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "moe_tiny.yaml").config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(geometry.pop("model_type"), **geometry))
    path = tmp_path_factory.mktemp("zero3") / "pretrained"
    model.save_pretrained(path)
    return path


def _source_state(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as transformers loads them (experts fused per layer, as in the module)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _cli(module: str, *args: str, cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "DLM_OUTPUT_ROOT": str(cwd / "runs"),
        "DLM_CACHE_DIR": str(cwd / "cache"),
    }
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _train(cwd: Path, *args: str) -> tuple[Path, subprocess.CompletedProcess]:
    proc = _cli("dlm.train", *SMALL, *ON_CPU, *args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run_dir: "), proc.stdout[-2000:]
    run_dir = Path(last.removeprefix("run_dir: "))
    return (run_dir if run_dir.is_absolute() else cwd / run_dir), proc


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _zero_folder(run_dir: Path, ranks: int = 1) -> Path:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / "latest").is_file(), f"{ckpt} is not a DeepSpeed checkpoint folder"
    shards = sorted(p.name for p in (ckpt / "checkpoint").glob("*zero_pp_rank_*_optim_states.pt"))  # one per rank
    assert len(shards) == ranks, shards
    return ckpt


def _partitioned_loads(stdout: str, source: Path) -> dict[int, tuple[int, int]]:
    """{rank: (parameter elements held, total)} from the lines dlm.parallel.deepspeed.build_in_partitions
    prints when a rank built its backbone inside deepspeed.zero.Init (the ZeRO-3 loading path was taken)."""
    pattern = re.compile(rf"zero3: rank (\d+) loaded {re.escape(str(source))} into ZeRO-3 partitions: "
                         r"([\d,]+) of ([\d,]+) parameter elements held")
    return {int(m[1]): (int(m[2].replace(",", "")), int(m[3].replace(",", ""))) for m in pattern.finditer(stdout)}


def _offline_val_loss(run) -> float:
    """val/loss of a loaded run's module under a plain single-process CPU Trainer (no DeepSpeed)."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, limit_val_batches=1, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    (metrics,) = trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
    return metrics["val/loss"]


@pytest.mark.slow
def test_zero3_on_two_ranks_starts_from_the_pretrained_weights(source, tmp_path):
    """Learning rate 0: what ZeRO-3 partitioned across the two ranks, trained on and saved must be the
    checkpoint's weights, bit for bit in bf16 (not size-0 placeholders, not a random init). bf16-mixed as in
    conf/trainer/deepspeed.yaml; end-of-fit sampling runs on both ranks (its forwards gather parameters)."""
    from dlm.parallel.checkpoint import load_state_dict
    from dlm.run import load_config

    run_dir, proc = _train(
        tmp_path, "trainer=deepspeed", "model=moe_tiny", f"model.pretrained={source}", "model.config=null",
        "trainer.devices=2", "trainer.precision=bf16-mixed", "optimizer.lr=0", "trainer.max_steps=2",
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]  # rank 1 finished cleanly too
    # each rank loaded the checkpoint straight into its partition (configure_model inside deepspeed.zero.Init),
    # holding about half of the model, never the whole of it
    loaded = _partitioned_loads(proc.stdout, source)
    assert sorted(loaded) == [0, 1], proc.stdout[-2000:]
    total = loaded[0][1]
    assert all(held < total == whole for held, whole in loaded.values()), loaded
    assert sum(held for held, _ in loaded.values()) >= total  # the partitions cover the model (plus padding)
    results = _results(run_dir)
    assert results["status"] == "completed" and results["global_step"] == 2
    seq_len = load_config(run_dir).data.seq_len
    assert results["train/tokens_seen"] == 2 * 2 * 8 * seq_len  # steps x ranks x batch x seq_len
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 6
    ckpt = _zero_folder(run_dir, ranks=2)

    state = load_state_dict(ckpt)
    assert not list((run_dir / "checkpoints").glob("*-fp32.ckpt"))  # consolidated in memory, nothing left behind
    expected = _source_state(source)
    assert {k.removeprefix(PREFIX) for k in state if k.startswith(PREFIX)} == set(expected)
    for name, value in expected.items():
        got = state[PREFIX + name]
        assert got.shape == value.shape and got.dtype == torch.float32, name
        # bf16: DeepSpeed casts the module to bf16 before it builds the fp32 master partitions, so they hold the
        # checkpoint's weights rounded to bf16 (lossless for a bf16 checkpoint such as Qwen3-30B-A3B's)
        torch.testing.assert_close(got, value.bfloat16().float(), rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_zero3_on_two_ranks_grows_the_vocabulary_in_the_partitions(tmp_path):
    """A checkpoint with fewer embedding rows (4) than the tokenizer (7): loaded into the partitions, the
    embedding and the untied output layer grow there (gathered, rank 0's rows kept), new rows the mean of the
    old ones, exactly as without DeepSpeed. Learning rate 0, fp32: the saved weights are the grown ones."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    from dlm.parallel.checkpoint import load_state_dict

    geometry = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "moe_tiny.yaml").config)
    geometry["vocab_size"] = 4
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(geometry.pop("model_type"), **geometry))
    source = tmp_path / "pretrained_small_vocab"
    model.save_pretrained(source)
    run_dir, proc = _train(
        tmp_path, "trainer=deepspeed", "model=moe_tiny", f"model.pretrained={source}", "model.config=null",
        "trainer.devices=2", "trainer.precision=32-true", "optimizer.lr=0", "trainer.max_steps=1",
        "trainer.val_check_interval=1",
    )
    assert sorted(_partitioned_loads(proc.stdout, source)) == [0, 1], proc.stdout[-2000:]
    state = load_state_dict(_zero_folder(run_dir, ranks=2))
    expected = _source_state(source)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old, got = expected[name], state[PREFIX + name]
        assert got.shape == (7, old.shape[1]), name
        torch.testing.assert_close(got[:4], old, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(got[4:], old.mean(0).expand(3, -1), rtol=0, atol=0, msg=name)
    for name, value in expected.items():
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            torch.testing.assert_close(state[PREFIX + name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_zero3_trains_consolidates_generates_and_resumes(source, tmp_path):
    from transformers import AutoModelForCausalLM

    from dlm.parallel.checkpoint import load_state_dict
    from dlm.run import load_run

    run_dir, proc = _train(tmp_path, "trainer=deepspeed", "model=moe_tiny", f"model.pretrained={source}",
                           "model.config=null", "trainer.precision=32-true")
    assert list(_partitioned_loads(proc.stdout, source)) == [0], proc.stdout[-2000:]  # loaded inside zero.Init
    results = _results(run_dir)
    assert results["status"] == "completed" and results["global_step"] == 4
    assert "train/moe/balance_loss" in results  # the router loss ran under ZeRO-3 (MoE blocks as leaves)
    ckpt = _zero_folder(run_dir)
    state = load_state_dict(ckpt)
    source_state = _source_state(source)
    changed = [n for n, v in source_state.items() if not torch.equal(state[PREFIX + n], v)]
    assert len(changed) > len(source_state) // 2  # it trained

    # load_run reads the ZeRO folder; its module (consolidated weights, no DeepSpeed) scores the validation batch
    # exactly as the ZeRO-3 module did at the last step
    run = load_run(run_dir)
    assert run.ckpt_path == ckpt
    torch.testing.assert_close(_offline_val_loss(run), results["val/loss"], rtol=1e-5, atol=1e-5)

    # python -m dlm.consolidate: an HF folder that transformers loads, with the trained weights and logits
    out = tmp_path / "hf_cli"
    proc = _cli("dlm.consolidate", str(run_dir), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == f"hf: {out}"
    export = json.loads((out / "dlm_export.json").read_text())
    assert export["method"] == "mdlm" and Path(export["checkpoint"]) == ckpt
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[PREFIX + name], rtol=0, atol=0, msg=name)
    x = torch.randint(0, run.module.vocab_size, (2, 16))
    with torch.no_grad():  # the export's config keeps is_causal: false, so transformers runs it bidirectionally
        torch.testing.assert_close(loaded(x).logits.float(), run.module.backbone.eval()(x), rtol=1e-5, atol=1e-5)
    assert (run_dir / "hf" / "config.json").is_file()  # the training CLI's own export at the end of the run

    # python -m dlm.generate from the run folder (a diffusion family: its run, not its HF export)
    proc = _cli("dlm.generate", f"run={run_dir}", "prompt=[[", "length=8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "network calls:" in proc.stdout and proc.stdout.strip().splitlines()[-2].startswith("[[")

    # resume from the ZeRO folder: the same run folder, the step count and the token count go on
    proc = _cli("dlm.train", *SMALL, *ON_CPU, "trainer=deepspeed", "model=moe_tiny", f"model.pretrained={source}",
                "model.config=null", "trainer.precision=32-true", "ckpt_path=last", "trainer.max_steps=6",
                cwd=tmp_path)
    assert proc.returncode == 0, (
        "resume with ckpt_path=last from a ZeRO folder failed (dlm.config.resolve_ckpt_path must accept a "
        "checkpoint folder): " + proc.stderr[-3000:]
    )
    assert proc.stdout.strip().splitlines()[-1] == f"run_dir: {run_dir}"
    resumed = _results(run_dir)
    assert resumed["status"] == "completed" and resumed["global_step"] == 6
    assert resumed["train/tokens_seen"] == results["train/tokens_seen"] * 6 // 4
    assert not torch.equal(load_state_dict(ckpt)[PREFIX + "model.embed_tokens.weight"],
                           state[PREFIX + "model.embed_tokens.weight"])


@pytest.mark.slow
def test_zero3_ar_run_exports_a_causal_lm_that_generate_loads(source, tmp_path):
    """AR.export_hf saves the live module, whose parameters ZeRO-3 partitions: the CLI exports a CPU copy
    loaded from the consolidated checkpoint instead."""
    from transformers import AutoModelForCausalLM

    from dlm.parallel.checkpoint import load_state_dict

    run_dir, _ = _train(tmp_path, "trainer=deepspeed", "method=ar", "model=moe_tiny", f"model.pretrained={source}",
                        "model.config=null", "trainer.precision=32-true", "trainer.max_steps=2")
    assert _results(run_dir)["status"] == "completed"
    state = load_state_dict(_zero_folder(run_dir))
    hf = run_dir / "hf"
    assert json.loads((hf / "dlm_export.json").read_text())["method"] == "ar"
    loaded = AutoModelForCausalLM.from_pretrained(hf)
    assert loaded.config.is_causal is not False
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[PREFIX + name], rtol=0, atol=0, msg=name)
    proc = _cli("dlm.generate", f"run={hf}", "prompt=[[", "length=8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "network calls:" in proc.stdout and proc.stdout.strip().splitlines()[-2].startswith("[[")


def _cpu_adam_builds() -> str | None:
    """None when DeepSpeedCPUAdam's op loads (JIT-built with the host compiler the first time), else why not."""
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load(verbose=False)
    except Exception as err:  # no compiler, missing headers, ...
        return f"DeepSpeedCPUAdam does not build here: {type(err).__name__}: {err}"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("option", ["deepspeed_zero2", "deepspeed_zero3_offload"])
def test_zero2_and_zero3_offload_train_and_consolidate(source, tmp_path, option):
    from transformers import AutoModelForCausalLM

    from dlm.parallel.checkpoint import load_state_dict

    if option.endswith("offload") and (reason := _cpu_adam_builds()):
        pytest.skip(reason)
    run_dir, proc = _train(tmp_path, f"trainer={option}", "model=moe_tiny", f"model.pretrained={source}",
                           "model.config=null", "trainer.precision=32-true", "trainer.max_steps=2",
                           "trainer.val_check_interval=2")
    # ZeRO-3 (offloaded parameters too) loads into the partitions; ZeRO-2 builds the whole model before fit
    assert list(_partitioned_loads(proc.stdout, source)) == ([0] if "zero3" in option else []), proc.stdout[-2000:]
    results = _results(run_dir)
    assert results["status"] == "completed" and results["global_step"] == 2
    state = load_state_dict(_zero_folder(run_dir))
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[PREFIX + name], rtol=0, atol=0, msg=name)


@pytest.mark.slow  # ~3.5 min: three 2-rank runs, two of them compiling
def test_compiled_training_under_zero2_and_zero3_matches_eager(tmp_path):
    """compile=default with DeepSpeed: the same losses as eager on 2 ranks; ZeRO-3 warns that its per-module hooks
    split the compiled graph."""
    args = ["model=qwen3_tiny", "trainer.devices=2", "trainer.precision=32-true", "samples.num_prompted=0",
            "samples.num_infill=0"]
    losses, logs = {}, {}
    for name, extra in (("eager", ["trainer=deepspeed_zero2"]), ("zero2", ["trainer=deepspeed_zero2", "compile=default"]),
                        ("zero3", ["trainer=deepspeed", "compile=default"])):
        run_dir, proc = _train(tmp_path, *args, *extra, f"name={name}")
        results = _results(run_dir)
        assert results["status"] == "completed" and results["global_step"] == 4
        losses[name], logs[name] = (results["train/loss"], results["val/nll_bound"]), proc.stderr
    for name in ("zero2", "zero3"):
        assert losses[name] == pytest.approx(losses["eager"], rel=1e-3), losses
    assert "compile with DeepSpeed ZeRO-3" in logs["zero3"] and "compile with DeepSpeed" not in logs["zero2"]


@pytest.mark.slow  # ~40 s: a 2-rank ZeRO-2 run
def test_ema_under_zero2_is_saved_loaded_and_exported(tmp_path):
    """callbacks=ema on 2 ZeRO-2 ranks: the shadow rides in the DeepSpeed folder's client state, load_run applies
    it, and the end-of-fit HF export holds the EMA weights (tied output embedding included)."""
    from transformers import AutoModelForCausalLM

    from dlm.parallel.checkpoint import ema_weights
    from dlm.run import load_run

    run_dir, _ = _train(tmp_path, "model=qwen3_tiny", "trainer=deepspeed_zero2", "trainer.devices=2",
                        "trainer.precision=32-true", "callbacks=ema", "callbacks.ema.decay=0.9",
                        "samples.num_prompted=0", "samples.num_infill=0")
    shadow = ema_weights(_zero_folder(run_dir, ranks=2))
    ema, raw = load_run(run_dir, setup_data=False), load_run(run_dir, setup_data=False, use_ema=False)
    name = PREFIX + "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(dict(ema.module.named_parameters())[name], shadow[name])
    assert not torch.equal(dict(raw.module.named_parameters())[name], shadow[name])
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "hf").state_dict()
    for key in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight", "model.embed_tokens.weight"):
        assert torch.equal(exported[key], shadow[PREFIX + key]), key


@pytest.mark.parametrize("kwargs", [{}, {"attention": "causal"}, {"attention": "block_causal"}, {"doc_ids": "two"}])
def test_moe_router_statistics_under_every_attention_mask(kwargs):
    """The router's balance loss is computed from hooked router logits, the same numbers transformers records;
    asking transformers for output_router_logits made it compute its own loss from the 4D mask and crash (AR,
    block diffusion, packed documents on an MoE backbone)."""
    from omegaconf import OmegaConf

    from dlm.models.hf import HFCausalLM

    torch.manual_seed(0)
    geometry = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "moe_tiny.yaml").config)
    backbone = HFCausalLM(config=geometry, block_size=4).train()
    x = torch.randint(0, 500, (2, 8))
    if kwargs.get("doc_ids"):
        kwargs = {"doc_ids": torch.tensor([[0] * 3 + [1] * 5] * 2)}
    backbone(x, **kwargs).sum().backward()
    aux, stats = backbone.pop_aux_loss()
    assert aux is not None and aux.requires_grad and set(stats) >= {"moe/max_load/layer_0", "moe/max_load/layer_1"}
    if not kwargs:  # mask-free: transformers can record the router logits itself; the numbers agree
        out = backbone.hf_model(input_ids=x, output_router_logits=True)
        backbone._collect_router_stats(out.router_logits)
        ref, ref_stats = backbone.pop_aux_loss()
        torch.testing.assert_close(aux, ref)
        torch.testing.assert_close(stats, ref_stats)
    with torch.no_grad():  # nothing is recorded outside training forwards
        backbone(x, **kwargs)
    assert backbone.pop_aux_loss() == (None, {})
