"""Model FLOPs for MFU (dlm/flops.py): the 6N + 12 L d T count equals torch's own FLOP counter on the
native and HF backbones (tied or not), forward-only calls count a third, eval calls nothing; a family's own layout
(BD3-LM's [x_t ; x_0]) is counted as it runs; a training run logs train/tflops and train/mfu."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dlm.flops import FlopCounter
from dlm.models import HFCausalLM, Transformer
from dlm.train import train

QWEN3 = dict(model_type="qwen3", num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
             head_dim=16, intermediate_size=128, vocab_size=500, max_position_embeddings=64)


def backbone(kind: str, tie: bool):
    torch.manual_seed(0)
    if kind == "native":
        return Transformer(vocab_size=500, n_layers=2, d_model=64, n_heads=4, max_seq_len=64, tie_embeddings=tie)
    return HFCausalLM(config={**QWEN3, "tie_word_embeddings": tie}, attention="bidirectional")


def measured(fn) -> int:
    """torch's FLOP count of fn, attention decomposed into matmuls (the fused CPU kernel is not counted)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind", ["native", "hf"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_the_count_equals_torchs_flop_counter(kind, tie):
    model = backbone(kind, tie).train()
    counter = FlopCounter(model)
    x = torch.randint(0, 500, (3, 40))
    train_flops = measured(lambda: model(x).float().sum().backward())
    assert counter.flops == pytest.approx(train_flops, rel=0.01)  # the norms' weights: the only difference
    counted = counter.flops
    with torch.no_grad():
        forward_flops = measured(lambda: model(x))
    assert counter.flops - counted == pytest.approx(forward_flops, rel=0.01)
    model.eval()
    with torch.no_grad():
        model(x)
    assert counter.flops - counted == pytest.approx(forward_flops, rel=0.01)  # eval forwards are not training
    counter.remove()


def test_a_family_layout_is_counted_as_it_runs():
    """BD3-LM runs the backbone over [x_t ; x_0]: 2T positions of length 2T per row."""
    from dlm.methods.bd3lm import BD3LM
    from dlm.schedules import LinearSchedule

    tok = SimpleNamespace(vocab_size=500, pad_token_id=0, eos_token_id=1, mask_token_id=499)
    module = BD3LM(backbone("native", True), tok, LinearSchedule(), block_size=4).train()
    counter = FlopCounter(module.backbone)
    batch = {"input_ids": torch.randint(2, 499, (3, 16)), "loss_mask": torch.ones(3, 16, dtype=torch.bool)}
    module.loss(batch, generator=torch.Generator().manual_seed(0))["loss"].backward()
    assert counter.flops == 3 * 32 * counter.per_position(32, backward=True)


def test_a_run_logs_model_tflops_and_mfu(run_cfg):
    run_dir = train(run_cfg("callbacks.throughput.peak_tflops=0.001", "trainer.log_every_n_steps=1"))
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/mfu")]
    assert rows
    for row in rows:
        assert float(row["train/tflops"]) > 0
        assert float(row["train/mfu"]) == pytest.approx(float(row["train/tflops"]) / 0.001, rel=1e-4)
    from hydra.errors import InstantiationException

    with pytest.raises((ValueError, InstantiationException), match="peak_tflops must be > 0"):
        train(run_cfg("callbacks.throughput.peak_tflops=-1"))


@pytest.mark.parametrize("method", ["mdlm", "bd3lm", "sundae", "ar"])
def test_the_plans_flops_per_token_is_what_a_training_step_runs(run_cfg, method):
    """dry_run's estimate (the family's training layout over the backbone's geometry) = the FLOPs counted where
    the backbone runs during one training step, per data token."""
    from dlm.build import build_datamodule, build_module
    from dlm.plan import build_plan

    cfg = run_cfg(f"method={method}")
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    plan = build_plan(cfg, vocab_size=datamodule.tokenizer.vocab_size)
    module = build_module(cfg, datamodule).train()
    counter = FlopCounter(module.backbone)
    batch = next(iter(datamodule.train_dataloader()))
    module.loss(batch, generator=torch.Generator().manual_seed(0))["loss"].backward()
    assert counter.flops / batch["input_ids"].numel() == pytest.approx(plan.flops_per_token, rel=1e-9)
    assert any(line.startswith("model FLOPs: ") for line in plan.lines())


@pytest.mark.slow  # ~15 s: DeepSpeed in a subprocess
def test_the_geometry_of_a_zero3_partitioned_backbone_is_the_whole_models(tmp_path):
    """Under ZeRO-3 a parameter's own numel is 0 (its shard lives elsewhere): the count reads ds_numel."""
    import os
    import subprocess
    import sys

    script = tmp_path / "z3.py"
    script.write_text(
        "import os, torch, deepspeed\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29541', RANK='0', WORLD_SIZE='1', LOCAL_RANK='0')\n"
        "deepspeed.init_distributed(dist_backend='gloo')\n"
        "from dlm.models import Transformer\n"
        "from dlm.flops import backbone_geometry\n"
        "kw = dict(vocab_size=500, n_layers=2, d_model=64, n_heads=4, max_seq_len=64)\n"
        "plain = Transformer(**kw)\n"
        "cfg = {'train_batch_size': 1, 'zero_optimization': {'stage': 3, 'stage3_param_persistence_threshold': 0}}\n"
        "with deepspeed.zero.Init(config_dict_or_path=cfg):\n"
        "    part = Transformer(**kw)\n"
        "assert sum(p.numel() for p in part.parameters()) == 0\n"
        "print(backbone_geometry(plain) == backbone_geometry(part))\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "True"
