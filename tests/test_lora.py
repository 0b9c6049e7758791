"""LoRA adapters through peft (dlm/models/lora.py, ``model.lora``): exact trainable counts, a frozen base that stays
bit-identical and holds no optimizer state, lr roles on the adapters, the merged export equal to the adapted model,
peft's adapter folder, exact resume, EMA over the adapters, the plan, QLoRA's refusal on a CPU and bad input; the
ZeRO-2/3 runs on 2 CPU ranks and compile are slow."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLI, train_recorded

from dlm.models.lora import LoraError, instantiate_backbone
from dlm.models.lora_export import merge_adapters, merged_state
from dlm.safe_load import load_checkpoint
from dlm.train import train

TESTS = Path(__file__).resolve().parent
PREFIX = "backbone.hf_model."


def _compose(*overrides: str):
    from conftest import compose

    return compose(["paths.run_dir=/tmp/unused", "paths.cache_dir=/tmp/unused", *overrides])


def _trainable(module: torch.nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in module.named_parameters() if p.requires_grad}


# ---- counts and freezing -------------------------------------------------------------------------------------
def test_the_trainable_count_is_r_times_in_plus_out_per_targeted_linear():
    # native tiny: d_model 128, 4 heads (kv heads = heads), d_ff = 64 * ceil(8 * 128 / 3 / 64) = 384, 2 layers
    per_layer = 4 * (128 + 128) + 2 * (128 + 384) + (384 + 128)  # wq wk wv wo, w1 w3, w2
    native = instantiate_backbone(_compose("model.lora.r=4").model, vocab_size=64)
    assert sum(_trainable(native).values()) == 4 * 2 * per_layer == 20480
    assert {n.split(".")[-4] for n in _trainable(native)} == {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
    # llama_tiny: hidden 64, 4 query heads of 16, 2 kv heads (k, v: 64 -> 32), intermediate 128, 2 layers
    per_layer = (64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64)  # q k v o, gate up, down
    llama = instantiate_backbone(_compose("model=llama_tiny", "model.lora.r=8").model, vocab_size=64)
    assert sum(_trainable(llama).values()) == 8 * 2 * per_layer == 16384
    # chosen modules only; the rest of the model frozen, embeddings and norms included
    only_q = instantiate_backbone(_compose("model=llama_tiny", "model.lora.r=2", "model.lora.target_modules=[q_proj]")
                                  .model, vocab_size=64)
    assert sum(_trainable(only_q).values()) == 2 * 2 * (64 + 64)
    assert all(".lora_A." in n or ".lora_B." in n for n in _trainable(only_q))


def test_moe_defaults_adapt_attention_and_leave_the_router_and_experts_alone():
    moe = instantiate_backbone(_compose("model=moe_tiny", "model.lora.r=2").model, vocab_size=64)
    adapted = {n.split(".")[-4] for n in _trainable(moe)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}


EXPERTS = ["model=moe_tiny", "model.lora.r=2", "model.lora.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]"]


def test_target_parameters_adapt_the_fused_moe_experts_with_an_exact_count():
    """transformers 5 fuses a layer's experts into 3-D parameters (gate_up_proj [E, 2 * moe_inter, hidden], down_proj
    [E, hidden, moe_inter]); peft's ParamWrapper gives each expert its own rank-r pair: r * E * (in + out)."""
    moe = instantiate_backbone(_compose(*EXPERTS).model, vocab_size=64)
    trainable = _trainable(moe)
    experts = sum(v for n, v in trainable.items() if ".experts." in n)
    # moe_tiny: hidden 64, moe_intermediate 32, 8 experts, 2 layers
    assert experts == 2 * 2 * 8 * ((64 + 64) + (32 + 64)) == 7168
    assert sum(trainable.values()) - experts == 2 * 2 * ((64 + 64) + 2 * (64 + 32) + (64 + 64))  # q k v o as before
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with pytest.raises(LoraError, match=r"'experts.nope' matches no parameter of HFCausalLM; its 3-D \(fused expert\) "
                                        r"parameters: mlp.experts.down_proj, mlp.experts.gate_up_proj"):
        instantiate_backbone(_compose("model=moe_tiny", "model.lora.r=2", "model.lora.target_parameters=[experts.nope]")
                             .model, vocab_size=64)
    with pytest.raises(LoraError, match="cannot apply dropout"):
        instantiate_backbone(_compose(*EXPERTS, "model.lora.dropout=0.1").model, vocab_size=64)


def test_merging_expert_adapters_keeps_the_logits():
    from dlm.models.lora_export import parameter_adapters

    torch.manual_seed(0)
    moe = instantiate_backbone(_compose(*EXPERTS, "model.lora.alpha=4").model, vocab_size=64).eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        base = moe(ids)
        for name, p in moe.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
        adapted = moe(ids)
        state = {k: v.clone() for k, v in moe.state_dict().items()}
        plain = merged_state(state, scaling=2.0, fan_in_fan_out=False, parameters=parameter_adapters(moe))
        merged = merge_adapters(moe)(ids)
    assert (adapted - base).abs().max() > 1e-2
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert plain.keys() == moe.state_dict().keys() and not any("lora" in k or "base_layer" in k for k in plain)
    for key, value in moe.state_dict().items():
        torch.testing.assert_close(plain[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_a_run_adapting_the_experts_exports_a_merged_model_with_its_logits(run_cfg, tmp_path):
    from dlm.models.hf import HFCausalLM
    from dlm.run import load_run

    run = train_recorded(run_cfg(*EXPERTS, "trainer.max_steps=2", "trainer.val_check_interval=2", "optimizer.lr=0.01"))
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert any(".experts.lora_B." in k for k in ckpt["state_dict"])  # adapter-only: the experts' adapters saved
    adapted = load_run(run, setup_data=False).module.backbone  # the base rebuilt from the run's seed, checked
    merged = HFCausalLM(pretrained=str(run / "hf")).eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted(ids), rtol=1e-4, atol=1e-4)


def test_merging_keeps_the_adapted_models_logits_native():
    torch.manual_seed(0)
    backbone = instantiate_backbone(_compose("model.lora.r=4", "model.lora.alpha=8").model, vocab_size=64).eval()
    base_logits = None
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        base_logits = backbone(ids)
        for name, p in backbone.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)  # a trained adapter
        adapted = backbone(ids)
        state = {k: v.clone() for k, v in backbone.state_dict().items()}
        merged = merge_adapters(backbone)(ids)
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapters change the model
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    # the state-dict merge (used by the HF export) gives the same weights as peft's merge
    plain = merged_state(state, scaling=2.0, fan_in_fan_out=False)
    assert plain.keys() == backbone.state_dict().keys()
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(plain[key], value, rtol=1e-6, atol=1e-6, msg=key)


# ---- training runs on a pretrained base --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    from conftest import write_tiny_qwen3

    return write_tiny_qwen3(tmp_path_factory.mktemp("lora") / "base")


def _hf_state(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


LORA_RUN = ["model=qwen3_tiny", "model.config=null", "model.lora.r=4", "model.lora.alpha=8",
            "+model.lr_multipliers={attention: 1.0, mlp: 0.25}", "optimizer.lr=0.01"]


def _trained_lora_run(tmp_path_factory, name: str, overrides: list[str], pretrained):
    """A LoRA run over the tiny pretrained checkpoint, trained in-process into its own temp folder."""
    from conftest import FAST, compose

    tmp = tmp_path_factory.mktemp(name)
    cfg = compose(FAST + [f"paths.run_dir={tmp / 'run'}", f"paths.cache_dir={tmp / 'cache'}", "name=test",
                          *overrides, f"model.pretrained={pretrained}"])
    return train_recorded(cfg)


@pytest.fixture(scope="module")
def lora_run(pretrained, tmp_path_factory):
    return _trained_lora_run(tmp_path_factory, "lora_run", LORA_RUN, pretrained)


def test_only_adapters_train_and_the_frozen_base_is_bit_identical(lora_run, pretrained):
    from dlm.run import load_run

    ckpt = load_checkpoint(lora_run / "checkpoints" / "last.ckpt")
    assert all(".lora_" in k for k in ckpt["state_dict"])  # adapter-only: the base is rebuilt from pretrained
    state = load_run(lora_run, setup_data=False).module.state_dict()
    base = _hf_state(pretrained)
    for name, value in base.items():  # every base weight, adapted layers' included, exactly as loaded
        key = PREFIX + name
        if key not in state:
            module, _, leaf = name.rpartition(".")
            key = f"{PREFIX}{module}.base_layer.{leaf}"
        assert torch.equal(state[key], value), name
    lora_b = {k: v for k, v in ckpt["state_dict"].items() if ".lora_B." in k}
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values())  # the adapters trained (B starts at 0)


def test_the_optimizer_holds_state_for_the_adapters_only_with_their_roles_lr(lora_run):
    ckpt = load_checkpoint(lora_run / "checkpoints" / "last.ckpt")
    adapters = {k: v for k, v in ckpt["state_dict"].items() if ".lora_A." in k or ".lora_B." in k}
    (opt,) = ckpt["optimizer_states"]
    sizes = sorted(s["exp_avg"].numel() for s in opt["state"].values())
    assert sizes == sorted(v.numel() for v in adapters.values())  # no moments for any frozen parameter
    groups = {g["name"]: g for g in opt["param_groups"]}
    assert set(groups) == {"attention", "mlp"}  # no embedding / norm group: they are frozen
    assert groups["attention"]["initial_lr"] == pytest.approx(0.01)
    assert groups["mlp"]["initial_lr"] == pytest.approx(0.0025)  # the role of the module an adapter adapts
    attention = sum(v.numel() for k, v in adapters.items() if "self_attn" in k)
    assert sum(opt["state"][i]["exp_avg"].numel() for i in groups["attention"]["params"]) == attention


def test_the_merged_export_gives_the_adapted_models_logits(lora_run, pretrained):
    from dlm.models.hf import HFCausalLM
    from dlm.run import load_run

    adapted = load_run(lora_run, setup_data=False).module.backbone
    assert (lora_run / "hf" / "model.safetensors").is_file() and not (lora_run / "hf" / "adapter_config.json").exists()
    merged = HFCausalLM(pretrained=str(lora_run / "hf")).eval()
    base = HFCausalLM(pretrained=str(pretrained)).eval()
    assert not any(".lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    ids = torch.randint(0, adapted.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = adapted(ids)
        torch.testing.assert_close(merged(ids), want, rtol=1e-4, atol=1e-4)
        assert (base(ids) - want).abs().max() > 1e-3


def test_the_adapter_folder_loads_with_peft_onto_the_base(lora_run, pretrained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dlm.parallel.checkpoint import load_state_dict
    from dlm.parallel.export import export_hf_folder
    from dlm.run import load_config, load_run

    cfg = load_config(lora_run)
    cfg.model.lora.export = "adapter"
    out = export_hf_folder(cfg, load_state_dict(lora_run / "checkpoints" / "last.ckpt"), tmp_path / "adapter")
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained), str(out)).eval()
    adapted = load_run(lora_run, setup_data=False).module.backbone
    ids = torch.randint(0, adapted.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the causal LM peft builds vs the run's backbone under the causal pattern
        torch.testing.assert_close(peft_model(input_ids=ids).logits, adapted(ids, attention="causal"),
                                   rtol=1e-4, atol=1e-4)


def test_the_run_exports_the_adapter_folder_on_request(pretrained, run_cfg, tmp_path):
    run = train_recorded(run_cfg(*LORA_RUN, f"model.pretrained={pretrained}", "model.lora.export=adapter",
                                  "trainer.max_steps=2", "trainer.val_check_interval=2"))
    assert {p.name for p in (run / "hf").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                        "dlm_export.json"}
    import json

    assert json.loads((run / "hf" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(pretrained)


def _rows(run: Path) -> dict[tuple[int, str], str]:
    with open(run / "metrics.csv") as f:
        return {(int(r["step"]), k): v for r in csv.DictReader(f) for k, v in r.items()
                if v and k.startswith("train/loss")}


def test_resume_continues_with_the_uninterrupted_runs_losses(run_cfg, tmp_path):
    common = ["model.lora.r=4", "callbacks.last_checkpoint.every_n_train_steps=1", "trainer.val_check_interval=3",
              "lr_scheduler=constant"]  # a schedule over max_steps would differ between 3 and 6 steps
    straight = train(run_cfg(*common, "trainer.max_steps=6", run_dir=tmp_path / "a"))
    split = tmp_path / "b"
    train(run_cfg(*common, "trainer.max_steps=3", run_dir=split))
    train(run_cfg(*common, "trainer.max_steps=6", "ckpt_path=last", run_dir=split))
    assert _rows(split) == _rows(straight) and len(_rows(straight)) == 6
    a = load_checkpoint(straight / "checkpoints" / "last.ckpt")["state_dict"]
    b = load_checkpoint(split / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_averages_the_adapters_only(run_cfg):
    run = train(run_cfg("model.lora.r=4", "callbacks=ema", "trainer.max_steps=2", "trainer.val_check_interval=2"))
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    shadow = ckpt["callbacks"]["EMA"]["shadow"]
    assert shadow and set(shadow) == {k for k in ckpt["state_dict"] if ".lora_A." in k or ".lora_B." in k}


# ---- the plan, QLoRA and bad input -------------------------------------------------------------------------------
def test_the_plan_shows_trainable_parameters_and_the_memory_saved():
    from dlm.plan import build_plan, zero_memory_per_gpu

    full = build_plan(_compose("model=llama_tiny"), vocab_size=64)
    plan = build_plan(_compose("model=llama_tiny", "model.lora.r=8"), vocab_size=64)
    assert plan.trainable_params == 16384 and plan.total_params == full.total_params + 16384
    line = next(line for line in plan.lines() if line.startswith("LoRA"))
    assert "16,384 trainable of" in line and "GiB saved" in line
    assert zero_memory_per_gpu(plan.total_params, 1, plan.trainable_params)["zero0 (ddp)"] == pytest.approx(
        (plan.total_params * 2 + 16384 * 14) / 1024**3)


def test_qlora_is_refused_on_a_cpu_with_what_it_needs(train_cli, workdir):
    with pytest.raises(LoraError, match=r"no CUDA GPU.*pip install dlm\[qlora\]"):
        instantiate_backbone(_compose("model=llama_tiny", "model.lora.r=4", "model.lora.quantize=4bit").model)
    code, out, err = train_cli(*TINY_CLI, "model=llama_tiny", "model.lora.r=4", "model.lora.quantize=4bit")
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "CUDA GPU" in line and "pip install dlm[qlora]" in line


@pytest.mark.parametrize("override, message", [
    ("model.lora.r=0", "model.lora.r=0 must be a positive integer"),
    ("model.lora.r=-2", "model.lora.r=-2 must be a positive integer"),
    ("model.lora.rank=4", "unknown key 'rank' in model.lora; valid keys: alpha, checkpoint, dropout, export, modules_to_save, quantize, r"),
    ("+model.lora.rank=4", "model.lora.rank: unknown key; valid keys: r, alpha"),
    ("model.lora.target_modules=[nope]", "'nope' matches no module of Transformer; its Linear modules: lm_head, w1"),
    ("model.lora.target_modules=[mlp]", "'mlp' names a SwiGLU, not a Linear layer"),
    ("model.lora.export=zip", "model.lora.export=zip: valid: merged"),
    ("model.lora.modules_to_save=[nope]", "'nope' matches no module of Transformer; its top-level modules: blocks, drop, lm_head, norm, tok_emb"),
    ("model.lora.modules_to_save=lm_head", "model.lora.modules_to_save=lm_head must be a non-empty list"),
    ("model.lora.checkpoint=some", "model.lora.checkpoint=some: valid: adapters"),
])
def test_bad_lora_input_is_one_clear_line(train_cli, workdir, override, message):
    r = [] if override.startswith("model.lora.r") else ["model.lora.r=4"]
    code, out, err = train_cli(*TINY_CLI, *r, override)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert message in err, err


# ---- slow: DeepSpeed ZeRO on 2 CPU ranks, compile -------------------------------------------------------------------
def _cli_train(cwd: Path, *args: str, timeout: int = 600) -> tuple[Path, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "DLM_OUTPUT_ROOT": str(cwd / "runs"), "DLM_CACHE_DIR": str(cwd / "cache")}
    small = ["trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
             "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "data.batch_size=8",
             "data.source.num_train=256", "data.source.num_val=32", "samples.num_unconditional=2",
             "samples.num_prompted=2", "samples.num_infill=2", "sampler.steps=4", "logger=none"]
    proc = subprocess.run([sys.executable, "-m", "dlm.train", *small, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(proc.stdout.strip().splitlines()[-1].removeprefix("run_dir: ")), proc


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_lora_under_deepspeed_zero_on_two_cpu_ranks(stage, pretrained, tmp_path):
    """ZeRO-3 loads the base into partitions and makes the adapters there (their init redone gathered); ZeRO-2
    replicates the parameters. Either way: the frozen base comes out bit-identical, the adapters trained, the
    optimizer partitions hold the adapters only, and the export is the merged HF folder."""
    from transformers import AutoModelForCausalLM

    from dlm.parallel.checkpoint import load_state_dict

    run, proc = _cli_train(
        tmp_path, "trainer=deepspeed", f"trainer.strategy.stage={stage}",
        "trainer.strategy._target_=zero_cpu_strategy.CPUDeepSpeedStrategy", "trainer.accelerator=cpu",
        "trainer.devices=2", "trainer.precision=32-true", *LORA_RUN, f"model.pretrained={pretrained}",
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    if stage == 3:
        assert "zero3: rank 1 loaded" in proc.stdout, proc.stdout[-2000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir()
    state = load_state_dict(ckpt)
    adapters = {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
    assert adapters and all(v.abs().max() > 0 for k, v in adapters.items() if ".lora_B." in k)
    for name, value in _hf_state(pretrained).items():
        key = PREFIX + name
        if key not in state:
            module, _, leaf = name.rpartition(".")
            key = f"{PREFIX}{module}.base_layer.{leaf}"
        assert torch.equal(state[key], value), name
    optim = torch.load(next((ckpt / "checkpoint").glob("*zero_pp_rank_0_*optim_states.pt")), weights_only=False,
                       map_location="cpu")["optimizer_state_dict"]
    held = sum(t.numel() for t in _tensors(optim.get("fp32_flat_groups") or optim.get("single_partition_of_fp32_groups")))
    total = sum(v.numel() for v in adapters.values())
    assert 0 < held <= total // 2 + 64  # this rank's partition of the adapters, not of the model
    merged = AutoModelForCausalLM.from_pretrained(run / "hf")
    assert not any("lora" in n for n in merged.state_dict())


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


@pytest.mark.slow
def test_lora_with_compile_trains_like_eager(run_cfg, tmp_path):
    eager = train(run_cfg("model.lora.r=4", "trainer.max_steps=3", run_dir=tmp_path / "eager"))
    compiled = train(run_cfg("model.lora.r=4", "trainer.max_steps=3", "compile=default", run_dir=tmp_path / "compiled"))
    a, b = _rows(eager), _rows(compiled)
    assert a.keys() == b.keys()
    for key in a:
        assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4), key


def test_a_run_recorded_before_model_lora_existed_still_fits_a_resume():
    """ckpt_path=last compares the composed model with the run's: a saved config without the lora key is a run
    without adapters, so it fits a command without them and not one with them."""
    from omegaconf import OmegaConf

    from dlm.resume import fit_problems

    now = OmegaConf.create({"model": {"n_layers": 2, "lora": {"r": None, "alpha": None}}, "data": {}})
    then = OmegaConf.create({"model": {"n_layers": 2}, "data": {}})
    assert fit_problems(now, then) == []
    now.model.lora.r = 8
    assert any(p.startswith("model.lora") for p in fit_problems(now, then))


# ---- modules_to_save: modules trained in full next to the adapters ------------------------------------------------
def test_modules_to_save_train_in_full_and_the_plan_counts_them_exactly():
    from dlm.plan import build_plan

    cfg = _compose("model.lora.r=4", "model.lora.modules_to_save=[lm_head,norm]")
    backbone = instantiate_backbone(cfg.model, vocab_size=64)
    trainable = _trainable(backbone)
    adapters = sum(v for n, v in trainable.items() if ".lora_" in n)
    d = backbone.tok_emb.embedding_dim
    # the head is tied: naming lm_head trains the one tensor the embedding is (named_parameters lists it once)
    assert backbone.lm_head.weight is backbone.tok_emb.weight and backbone.tok_emb.weight.requires_grad
    assert set(trainable) - {n for n in trainable if ".lora_" in n} == {"tok_emb.weight", "norm.weight"}
    assert sum(trainable.values()) == adapters + 64 * d + d
    assert not any(p.requires_grad for n, p in backbone.named_parameters() if n.startswith("blocks.") and ".lora_" not in n)
    plan = build_plan(cfg, vocab_size=64)
    assert plan.trainable_params == sum(trainable.values())
    assert plan.trainable_params == build_plan(_compose("model.lora.r=4"), vocab_size=64).trainable_params + 64 * d + d


def test_modules_to_save_refuses_a_module_that_holds_adapters():
    with pytest.raises(LoraError, match=r"'blocks' \(blocks\) holds LoRA-adapted layers"):
        instantiate_backbone(_compose("model.lora.r=4", "model.lora.modules_to_save=[blocks]").model, vocab_size=64)


SAVE_RUN = [*LORA_RUN, "model.lora.modules_to_save=[embed_tokens]", "trainer.max_steps=2", "trainer.val_check_interval=2"]


@pytest.fixture(scope="module")
def save_run(pretrained, tmp_path_factory):
    return _trained_lora_run(tmp_path_factory, "save_run", SAVE_RUN, pretrained)


def test_saved_modules_are_in_the_adapter_only_checkpoint_and_out_of_the_fingerprint(save_run, pretrained):
    from dlm.models.lora_checkpoint import KEY

    ckpt = load_checkpoint(save_run / "checkpoints" / "last.ckpt")
    full = {k for k in ckpt["state_dict"] if ".lora_" not in k}
    # qwen3_tiny ties its head to the embedding: both names of the one trained tensor are saved
    assert full == {PREFIX + "model.embed_tokens.weight", PREFIX + "lm_head.weight"}
    assert not full & set(ckpt[KEY]["tensors"])
    base = _hf_state(pretrained)["model.embed_tokens.weight"]
    assert (ckpt["state_dict"][PREFIX + "model.embed_tokens.weight"] - base).abs().max() > 0  # it trained
    sizes = sorted(s["exp_avg"].numel() for s in ckpt["optimizer_states"][0]["state"].values())
    assert sizes == sorted(v.numel() for k, v in ckpt["state_dict"].items()
                           if ".lora_" in k or k == PREFIX + "model.embed_tokens.weight")


def test_saved_modules_reach_the_merged_and_the_adapter_export_with_the_runs_logits(save_run, pretrained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dlm.models.hf import HFCausalLM
    from dlm.parallel.checkpoint import load_state_dict
    from dlm.parallel.export import export_hf_folder
    from dlm.run import load_config, load_run

    adapted = load_run(save_run, setup_data=False).module.backbone
    ids = torch.randint(0, adapted.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    merged = HFCausalLM(pretrained=str(save_run / "hf")).eval()
    cfg = load_config(save_run)
    cfg.model.lora.export = "adapter"
    out = export_hf_folder(cfg, load_state_dict(save_run / "checkpoints" / "last.ckpt"), tmp_path / "adapter")
    import json

    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["model.embed_tokens", "lm_head"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted(ids), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(peft_model(input_ids=ids).logits, adapted(ids, attention="causal"),
                                   rtol=1e-4, atol=1e-4)
    # the same folder without the saved modules: the adapters alone do not give the run's model
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare"
    bare.mkdir()
    config = json.loads((out / "adapter_config.json").read_text())
    (bare / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": None}))
    save_file({k: v for k, v in load_file(out / "adapter_model.safetensors").items() if ".lora_" in k},
              bare / "adapter_model.safetensors")
    adapters_only = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained), str(bare)).eval()
    with torch.no_grad():
        assert (adapters_only(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max() > 1e-3


def test_resume_with_modules_to_save_is_exact(run_cfg, tmp_path):
    common = ["model.lora.r=4", "model.lora.modules_to_save=[tok_emb]", "callbacks.last_checkpoint.every_n_train_steps=1",
              "trainer.val_check_interval=2", "lr_scheduler=constant"]
    straight = train(run_cfg(*common, "trainer.max_steps=4", run_dir=tmp_path / "a"))
    split = tmp_path / "b"
    train(run_cfg(*common, "trainer.max_steps=2", run_dir=split))
    train(run_cfg(*common, "trainer.max_steps=4", "ckpt_path=last", run_dir=split))
    assert _rows(split) == _rows(straight) and len(_rows(straight)) == 4
    a = load_checkpoint(straight / "checkpoints" / "last.ckpt")["state_dict"]
    b = load_checkpoint(split / "checkpoints" / "last.ckpt")["state_dict"]
    assert "backbone.tok_emb.weight" in a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_plan_counts_saved_modules_of_an_hf_model_as_built():
    from dlm.plan import build_plan

    cfg = _compose("model=llama_tiny", "model.lora.r=8", "model.lora.modules_to_save=[embed_tokens,lm_head]")
    backbone = instantiate_backbone(cfg.model, vocab_size=64)
    trainable = sum(p.numel() for p in {id(p): p for p in backbone.parameters() if p.requires_grad}.values())
    embeddings = sum(p.numel() for p in {id(p): p for p in (*backbone.hf_model.get_input_embeddings().parameters(),
                                                           *backbone.hf_model.get_output_embeddings().parameters())}.values())
    assert build_plan(cfg, vocab_size=64).trainable_params == trainable == 16384 + embeddings
