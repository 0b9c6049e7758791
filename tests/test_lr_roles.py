"""Per-role learning rates (SCP): the optimizer's groups for a tiny Qwen3-MoE, multipliers carried by the model
config and merged under the method's, freezing, the MoE load-balancing loss, and attention annealing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import compose

from dlm.methods.mdlm import MDLM
from dlm.models.hf import HFCausalLM, annealed_mask
from dlm.optim import ROLES, merge_lr_multipliers, parameter_roles
from dlm.schedules import LinearSchedule

TOKENIZER = SimpleNamespace(vocab_size=60, pad_token_id=57, eos_token_id=58, mask_token_id=59)
MOE = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
       "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
       "moe_intermediate_size": 16, "intermediate_size": 64, "vocab_size": 64, "max_position_embeddings": 64,
       "mlp_only_layers": [0]}  # layer 0 dense (mlp role), layer 1 sparse (experts, router)
SCP = {"attention": 1.0, "mlp": 0.1, "experts": 0.1, "router": 0.05, "embedding": 0.5, "norm": 1.0}


def tiny_moe(**kw) -> HFCausalLM:
    torch.manual_seed(0)
    return HFCausalLM(config=MOE, **kw)


def groups_of(module: MDLM, lr: float = 1e-3, wd: float = 0.1) -> dict[str, dict]:
    import functools

    module.optimizer_factory = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=wd)
    module._trainer = None
    optimizer = module.configure_optimizers()
    return {g["name"]: g for g in optimizer.param_groups}


def test_optimizer_groups_of_a_tiny_qwen3_moe_follow_the_model_multipliers():
    module = MDLM(tiny_moe(lr_multipliers=SCP), TOKENIZER, LinearSchedule())
    groups = groups_of(module)
    assert set(groups) == set(ROLES)
    for role, mult in SCP.items():
        assert groups[role]["lr"] == pytest.approx(1e-3 * mult), role
        assert groups[role]["weight_decay"] == (0.0 if role in ("embedding", "norm") else 0.1), role
    names = {id(p): n for n, p in module.backbone.named_parameters()}
    by_group = {role: [names[id(p)] for p in g["params"]] for role, g in groups.items()}
    assert all(".mlp.gate." in n for n in by_group["router"])
    assert all(".experts." in n for n in by_group["experts"])
    assert all("self_attn" in n for n in by_group["attention"])
    assert any("embed_tokens" in n for n in by_group["embedding"]) and any("lm_head" in n for n in by_group["embedding"])
    assert all(p.ndim == 1 for p in groups["norm"]["params"])
    # every trainable parameter is in exactly one group
    assert sum(len(g["params"]) for g in groups.values()) == len(list(module.backbone.parameters()))


def test_method_multipliers_merge_over_the_model_ones_and_zero_freezes():
    module = MDLM(tiny_moe(lr_multipliers=SCP), TOKENIZER, LinearSchedule(), lr_multipliers={"experts": 0, "mlp": 0.2})
    assert module.lr_multipliers["attention"] == 1.0 and module.lr_multipliers["mlp"] == 0.2
    groups = groups_of(module)
    assert "experts" not in groups
    frozen = [n for n, p in module.backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(".experts." in n for n in frozen)
    assert module.frozen["experts"] == sum(p.numel() for n, p in module.backbone.named_parameters() if ".experts." in n)
    with pytest.raises(ValueError, match="valid roles"):
        merge_lr_multipliers({"atention": 1.0})


def test_reference_model_config_carries_the_scp_multipliers():
    cfg = compose(["paths.run_dir=/tmp/x", "model=moe30b", "schedule=linear", "trainer=deepspeed"])
    mults = cfg.model.lr_multipliers
    assert mults.attention > mults.experts and mults.attention > mults.mlp
    # the same multipliers reach the optimizer of a tiny model built from the same config node
    node = cfg.model.copy()
    node.pretrained, node.config, node.torch_dtype, node.gradient_checkpointing = None, MOE, None, False
    from dlm.models.lora import instantiate_backbone

    module = MDLM(instantiate_backbone(node), TOKENIZER, LinearSchedule())
    groups = groups_of(module, lr=1e-3)
    assert groups["attention"]["lr"] == pytest.approx(1e-3 * mults.attention)
    assert groups["experts"]["lr"] == pytest.approx(1e-3 * mults.experts)


def test_router_load_balancing_loss_is_added_and_logged():
    module = MDLM(tiny_moe(), TOKENIZER, LinearSchedule())
    assert module.backbone.router_aux_loss_coef == pytest.approx(0.001)  # Qwen3-MoE's default
    module.backbone.router_aux_loss_coef = 1.0
    batch = {"input_ids": torch.randint(0, 57, (2, 12)), "loss_mask": torch.ones(2, 12, dtype=torch.bool)}
    module.train()
    module.loss(batch, generator=torch.Generator().manual_seed(0))
    aux, stats = module.backbone.pop_aux_loss()
    assert aux.requires_grad and aux.item() >= 1.0 - 1e-4  # Switch loss is >= 1, equal when balanced
    assert set(stats) == {"moe/balance_loss", "moe/max_load/layer_1"}  # layer 1 is the sparse one
    assert 1.0 - 1e-5 <= stats["moe/max_load/layer_1"] <= 4 / 2 + 1e-5  # 1 = even, E/k = collapsed
    assert module.backbone.pop_aux_loss() == (None, {})  # cleared
    aux.backward()
    assert module.backbone.hf_model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    module.eval()  # evaluation forwards collect nothing
    with torch.no_grad():
        module.loss(batch, generator=torch.Generator().manual_seed(0))
    assert module.backbone.pop_aux_loss() == (None, {})


def test_dense_model_has_no_aux_loss():
    torch.manual_seed(0)
    dense = HFCausalLM(config={**MOE, "model_type": "qwen3"})
    dense.train()
    dense(torch.randint(0, 60, (1, 8)))
    assert dense.router_aux_loss_coef == 0.0 and dense.pop_aux_loss() == (None, {})


def test_attention_annealing_goes_from_causal_to_bidirectional():
    T = 6
    assert torch.equal(annealed_mask(T, 0.0)[0, 0], torch.ones(T, T).tril().bool())
    assert annealed_mask(T, 1.0).all()
    model = HFCausalLM(config={**MOE, "model_type": "qwen3"}).eval()
    x = torch.randint(0, 60, (1, T))
    with torch.no_grad():
        causal = model(x, attention="causal")
        model.bidirectional_fraction = 0.0
        assert torch.allclose(model(x), causal, atol=1e-5)
        model.bidirectional_fraction = 0.4  # reach ceil(0.4 * 5) = 2 tokens ahead
        explicit = model(x, attn_mask=annealed_mask(T, 0.4))
        assert torch.allclose(model(x), explicit, atol=1e-5)
        model.bidirectional_fraction = 1.0
        assert not torch.allclose(model(x), causal, atol=1e-3)


def test_attention_annealing_callback_sets_the_fraction_from_the_step():
    from dlm.callbacks.attention_annealing import AttentionAnnealing

    backbone = SimpleNamespace(bidirectional_fraction=1.0)
    module = SimpleNamespace(backbone=backbone)
    callback = AttentionAnnealing(steps=4)
    for step, expected in [(0, 0.0), (2, 0.5), (4, 1.0), (9, 1.0)]:
        callback.on_train_batch_start(SimpleNamespace(global_step=step), module, None, 0)
        assert backbone.bidirectional_fraction == expected
    callback.on_train_batch_start(SimpleNamespace(global_step=1), module, None, 0)
    callback.on_train_end(None, module)
    assert backbone.bidirectional_fraction == 1.0
    with pytest.raises(TypeError, match="bidirectional_fraction"):
        callback.on_fit_start(None, SimpleNamespace(backbone=object()))


def test_parameter_roles_cover_a_dense_qwen3():
    roles = set(parameter_roles(HFCausalLM(config={**MOE, "model_type": "qwen3", "mlp_only_layers": None})).values())
    assert roles == {"attention", "mlp", "embedding", "norm"}
