"""DeepSpeed through Lightning, checked on CPU: the strategy objects and their DeepSpeed configs for every
trainer option, MoE blocks as ZeRO-3 leaf modules, and the GPU-memory refusal with its numbers. Real runs are
marked gpu (benchmarks/gpu_check.sh runs them through the CLI)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose
from hydra.utils import instantiate

from dlm.models.hf import HFCausalLM
from dlm.parallel.deepspeed import moe_block_classes, register_moe_leaf_modules, zero_stage
from dlm.plan import gpu_memory_check

BASE = ["paths.run_dir=/tmp/dlm-test-run", "paths.cache_dir=/tmp/dlm-test-cache"]
MOE = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
       "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
       "moe_intermediate_size": 16, "intermediate_size": 64, "vocab_size": 64, "max_position_embeddings": 64}


@pytest.mark.parametrize(
    ("option", "stage", "offload"),
    [("deepspeed", 3, False), ("deepspeed_zero2", 2, False), ("deepspeed_zero3_offload", 3, True)],
)
def test_strategy_objects_and_their_deepspeed_configs(option, stage, offload):
    cfg = compose(BASE + [f"trainer={option}"])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val > 0
    strategy = instantiate(cfg.trainer.strategy)
    assert zero_stage(strategy) == stage
    zero = strategy.config["zero_optimization"]
    assert ("offload_optimizer" in zero) == offload and ("offload_param" in zero) == offload
    if offload:
        assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
        assert cfg.optimizer._target_ == "deepspeed.ops.adam.DeepSpeedCPUAdam"


def test_stage_is_a_field():
    strategy = instantiate(compose(BASE + ["trainer=deepspeed", "trainer.strategy.stage=1"]).trainer.strategy)
    assert zero_stage(strategy) == 1


def test_moe_blocks_become_zero3_leaf_modules():
    from deepspeed.utils import z3_leaf_module

    model = HFCausalLM(config=MOE)
    assert [c.__name__ for c in moe_block_classes(model)] == ["Qwen3MoeSparseMoeBlock"]
    leaves = register_moe_leaf_modules(model)
    assert len(leaves) == 2 and all(z3_leaf_module(m) for m in leaves)
    assert not any(z3_leaf_module(m) for m in model.modules() if m not in leaves)
    dense = HFCausalLM(config={**MOE, "model_type": "qwen3"})
    assert register_moe_leaf_modules(dense) == []


def test_configure_model_builds_only_a_deferred_backbone():
    """Lightning enters deepspeed.zero.Init around configure_model. The families define it once, in the base
    class, and it builds a backbone only when the training CLI deferred one (ZeRO-3 + pretrained HF weights:
    tests/test_zero3_loading.py); otherwise the backbone built in __init__ stays and the hook does nothing."""
    import lightning as L

    from dlm.data.tokenizers import CharTokenizer
    from dlm.methods.ar import AR
    from dlm.methods.base import DiffusionLM
    from dlm.methods.bd3lm import BD3LM
    from dlm.methods.diffusionbert import DiffusionBERT
    from dlm.methods.mdlm import MDLM
    from dlm.methods.sundae import SUNDAE

    assert DiffusionLM.configure_model is not L.LightningModule.configure_model
    assert all(cls.configure_model is DiffusionLM.configure_model for cls in (AR, BD3LM, DiffusionBERT, MDLM, SUNDAE))

    module = AR(backbone=HFCausalLM(config=MOE), tokenizer=CharTokenizer("()[]"))
    backbone = module.backbone
    module.configure_model()
    module.configure_model()
    assert module.backbone is backbone


def test_reference_command_refuses_with_the_numbers():
    cfg = compose(BASE + ["model=moe30b", "schedule=linear", "trainer=deepspeed"])
    message = gpu_memory_check(cfg, vocab_size=None)
    if torch.cuda.is_available() and message is None:
        pytest.skip("this machine fits the run")
    assert "30.53B parameters" in message and "GiB per GPU" in message
    if not torch.cuda.is_available():
        assert "455.0 GiB per GPU" in message and "8 GPUs: 56.9 GiB each" in message


def test_small_runs_fit_when_there_is_a_gpu():
    cfg = compose(BASE + ["model=moe_tiny", "trainer=deepspeed"])
    message = gpu_memory_check(cfg, vocab_size=64)
    assert (message is None) == torch.cuda.is_available()


@pytest.mark.gpu
def test_zero3_moe_tiny_trains_and_consolidates(run_cfg, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import json

    from transformers import AutoModelForCausalLM

    from dlm.parallel.checkpoint import load_state_dict
    from dlm.parallel.export import export_hf_folder
    from dlm.train import train

    cfg = run_cfg("model=moe_tiny", "trainer=deepspeed", "trainer.devices=1")
    run_dir = train(cfg)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir()  # a DeepSpeed checkpoint folder
    out = export_hf_folder(cfg, load_state_dict(ckpt, tmp_path / "fp32.ckpt"), tmp_path / "hf")
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_submitit_slurm_launcher_sizes_the_trainer_from_the_allocation():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from dlm.config import CONF_DIR, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides=BASE + ["launcher=submitit_slurm", "model=moe30b", "trainer=deepspeed",
                                                       "hydra.launcher.nodes=4"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.tasks_per_node == 8
    HydraConfig.instance().set_config(cfg)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (4, 8)


@pytest.mark.parametrize("path", sorted(__import__("dlm.plan").plan.KNOWN_STRATEGY_KINDS))
def test_known_strategy_table_matches_the_classes(path):
    from hydra.utils import get_class

    from dlm.plan import KNOWN_STRATEGY_KINDS, strategy_kind

    assert KNOWN_STRATEGY_KINDS[path] == strategy_kind(get_class(path))


def test_an_unlisted_strategy_class_is_classified_by_its_class(monkeypatch):
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from omegaconf import OmegaConf

    from dlm import plan

    class UserStrategy(DeepSpeedStrategy):
        pass

    assert plan.strategy_kind(UserStrategy) == "deepspeed"
    monkeypatch.setattr(plan, "KNOWN_STRATEGY_KINDS", {})  # every target imported and classified by its class
    cfg = OmegaConf.create({"strategy": {"_target_": "dlm.parallel.deepspeed.DeepSpeedStrategy", "stage": 2}})
    assert plan._strategy_stage(cfg) == ("zero2", False)
    cfg = OmegaConf.create({"strategy": {"_target_": "lightning.pytorch.strategies.FSDPStrategy"}})
    assert plan._strategy_stage(cfg) == ("zero3", False)
    assert plan._strategy_stage(OmegaConf.create({"strategy": "deepspeed_stage_3_offload"})) == ("zero3", True)
    assert plan._strategy_stage(OmegaConf.create({"strategy": "ddp"})) == ("zero0 (ddp)", False)
