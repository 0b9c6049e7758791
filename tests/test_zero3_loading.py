"""Pretrained HF weights loaded straight into ZeRO-3 partitions (dlm.parallel.deepspeed): which runs take that path,
the meta-device placeholder the module is built around until configure_model, and the hook itself. Fast checks
only; the partitioned load itself runs under the real CLI in tests/test_zero3_cpu.py (slow, 1 and 2 ranks)."""

from __future__ import annotations

import types

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dlm.models.lora import instantiate_backbone
from dlm.optim import parameter_role, parameter_roles
from dlm.parallel.deepspeed import (
    DeepSpeedStrategy,
    loads_pretrained_weights,
    placeholder_backbone,
    zero3_strategy,
)

MOE = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
       "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
       "moe_intermediate_size": 16, "intermediate_size": 64, "vocab_size": 5, "max_position_embeddings": 64}


class SubclassedStrategy(DeepSpeedStrategy):
    """A custom DeepSpeed strategy built on dlm's: the ZeRO-3 path is for subclasses too."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    geometry = dict(MOE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(geometry.pop("model_type"), **geometry))
    path = tmp_path_factory.mktemp("zero3_loading") / "pretrained"
    model.save_pretrained(path)
    return path


def _model_cfg(pretrained, **fields):
    return OmegaConf.create({"_target_": "dlm.models.hf.HFCausalLM", "pretrained": str(pretrained), "config": None,
                             **fields})


@pytest.mark.parametrize(
    ("strategy", "taken"),
    [
        ({"_target_": "dlm.parallel.deepspeed.DeepSpeedStrategy", "stage": 3}, True),
        ({"_target_": "dlm.parallel.deepspeed.DeepSpeedStrategy", "stage": 3, "offload_parameters": True}, True),
        ({"_target_": f"{__name__}.SubclassedStrategy", "stage": 3}, True),
        ({"_target_": "dlm.parallel.deepspeed.DeepSpeedStrategy", "stage": 2}, False),
        # Lightning's own class holds no HF DeepSpeed config in its sharded context: it builds before fit
        ({"_target_": "lightning.pytorch.strategies.DeepSpeedStrategy", "stage": 3}, False),
        ({"_target_": "lightning.pytorch.strategies.DDPStrategy"}, False),
        ("deepspeed_stage_3", False),
        ("deepspeed_stage_2", False),
        ("ddp", False),
        ("auto", False),
        (None, False),
    ],
)
def test_only_zero3_deepspeed_strategies_take_the_partitioned_path(strategy, taken):
    found = zero3_strategy(OmegaConf.create({"strategy": strategy}))
    assert (found is not None) == taken
    assert found is None or isinstance(found, DeepSpeedStrategy)


def test_only_pretrained_hf_weights_take_the_partitioned_path(checkpoint):
    assert loads_pretrained_weights(_model_cfg(checkpoint))
    assert not loads_pretrained_weights(_model_cfg(checkpoint, load_weights=False))  # random init: as before
    assert not loads_pretrained_weights(OmegaConf.create({"_target_": "dlm.models.hf.HFCausalLM", "pretrained": None,
                                                          "config": MOE}))
    assert not loads_pretrained_weights(OmegaConf.create({"_target_": "dlm.models.Transformer", "vocab_size": 8}))


@pytest.mark.parametrize("fields", [{}, {"config": {"num_hidden_layers": 1}}, {"lr_multipliers": {"embedding": 0}}])
def test_placeholder_has_the_loaded_backbones_geometry(checkpoint, fields):
    """What the module's constructor checks and configure_optimizers groups must not depend on which of the two
    it saw: names, shapes, dtypes, vocabulary (grown 5 -> 7 rows here), limits, MoE bookkeeping, lr roles."""
    model_cfg = _model_cfg(checkpoint, **fields)
    placeholder = placeholder_backbone(model_cfg, vocab_size=7)
    real = instantiate(model_cfg, vocab_size=7)
    assert all(p.is_meta for p in placeholder.parameters()) and not any(p.is_meta for p in real.parameters())
    assert getattr(placeholder, "zero3_placeholder", False) and not hasattr(real, "zero3_placeholder")
    shapes = {n: (p.shape, p.dtype) for n, p in real.named_parameters()}
    assert {n: (p.shape, p.dtype) for n, p in placeholder.named_parameters()} == shapes
    for attr in ("vocab_size", "max_seq_len", "num_experts", "experts_per_token", "moe_layers", "router_aux_loss_coef",
                 "lr_multipliers", "converted", "mask_free_bidirectional"):
        assert getattr(placeholder, attr) == getattr(real, attr), attr
    assert placeholder.vocab_size == 7
    assert parameter_roles(placeholder) == parameter_roles(real)


def test_lr_roles_read_a_partitioned_parameters_full_shape():
    """A ZeRO-3 partitioned parameter's own shape is [0] (its full one is ds_shape): configure_optimizers runs
    on partitioned parameters when the backbone was loaded into partitions, and must not call a weight a norm."""
    weight = torch.nn.Parameter(torch.empty(0))
    weight.ds_shape = torch.Size([16, 8])
    assert parameter_role("model.layers.0.mlp.up_proj.weight", weight) == "mlp"
    assert parameter_role("model.layers.0.self_attn.q_proj.weight", weight) == "attention"
    gain = torch.nn.Parameter(torch.empty(0))
    gain.ds_shape = torch.Size([16])
    assert parameter_role("model.layers.0.self_attn.q_proj.bias", gain) == "norm"


def test_build_module_defers_and_configure_model_replaces_the_placeholder(run_cfg, checkpoint):
    """The training CLI under ZeRO-3 gets a module around the placeholder; configure_model builds the real backbone
    once (idempotent), with frozen roles applied to it. Here with a strategy that is not ZeRO-3 at hook time, so it
    is the plain load (no process group needed); the partitioned load is tests/test_zero3_cpu.py's."""
    from dlm.build import build_module

    overrides = ["model=moe_tiny", f"model.pretrained={checkpoint}", "model.config=null",
                 "+model.lr_multipliers={embedding: 0}"]
    cfg = run_cfg("trainer=deepspeed", *overrides)
    datamodule = instantiate(cfg.data)
    assert all(not p.is_meta for p in build_module(cfg, datamodule).backbone.parameters())  # load_run & co
    module = build_module(cfg, datamodule, defer_to_zero3=True)
    assert all(p.is_meta for p in module.backbone.parameters()) and module._build_backbone is not None
    placeholder = module.backbone
    assert module.frozen["embedding"] > 0

    module._trainer = types.SimpleNamespace(strategy=None)
    try:
        module.configure_model()
        real = module.backbone
        module.configure_model()
    finally:
        module._trainer = None
    assert module.backbone is real and real is not placeholder and module._build_backbone is None
    expected = instantiate_backbone(cfg.model, vocab_size=datamodule.tokenizer.vocab_size).state_dict()
    state = real.state_dict()
    assert set(state) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert frozen and all("embed" in n or "lm_head" in n for n in frozen)
    assert {n: p.shape for n, p in module.named_parameters()} == {
        n: p.shape for n, p in build_module(cfg, datamodule).named_parameters()}

    for other in (["trainer=deepspeed_zero2"], ["trainer=default"]):  # every other path builds at once, as before
        module = build_module(run_cfg(*other, *overrides), datamodule, defer_to_zero3=True)
        assert module._build_backbone is None and not any(p.is_meta for p in module.backbone.parameters())
