"""The LM head at selected positions only (``logits_at`` / ``MDLM.logits(at=...)``): the same numbers as full
logits then selection, for the native backbone and the HF architectures, and the same MDLM loss and gradients."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dlm.methods.masked_terms import masked_token_nll  # noqa: E402
from dlm.methods.mdlm import MDLM  # noqa: E402
from dlm.models import Transformer  # noqa: E402
from dlm.models.hf import HFCausalLM  # noqa: E402
from dlm.schedules import LinearSchedule  # noqa: E402

V, T, B = 64, 12, 3
TOKENIZER = SimpleNamespace(vocab_size=V, pad_token_id=0, eos_token_id=1, mask_token_id=V - 1)
MASK = V - 1

ATTENTION = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
HF_CONFIGS = {
    "qwen3": dict(model_type="qwen3", hidden_size=32, intermediate_size=64, **ATTENTION),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=32, intermediate_size=64, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=16, tie_word_embeddings=False, **ATTENTION),
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, **ATTENTION),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64),
}
ARCHS = ["native", *HF_CONFIGS]


def backbone(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "native":
        return Transformer(vocab_size=V, n_layers=2, d_model=32, n_heads=4, max_seq_len=64)
    extra = {} if arch == "gpt2" else {"max_position_embeddings": 64}
    return HFCausalLM(config={**HF_CONFIGS[arch], "vocab_size": V, **extra}, attn_implementation="sdpa")


def tokens_and_selection(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V - 1, (B, T), generator=g)
    at = torch.rand(B, T, generator=g) < 0.5
    at[0, :2] = True  # tokens 0 and 1 both selected: with shift_logits both read position 0
    at[1] = False  # a sequence with nothing selected
    return x, at


def heads_called_with_logits_at(module: nn.Module) -> list[bool]:
    calls: list[bool] = []
    module.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs.get("logits_at") is not None), with_kwargs=True
    )
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_at_equals_selecting_the_full_logits(arch):
    model = backbone(arch).eval()
    x, at = tokens_and_selection()
    doc_ids = torch.tensor([0] * 5 + [1] * (T - 5)).expand(B, T)
    with torch.no_grad():
        for kwargs in ({}, {"doc_ids": doc_ids}, {"attention": "causal"}):
            full = model(x, **kwargs)
            rows = model(x, logits_at=at, **kwargs)
            assert rows.shape == (int(at.sum()), V) and rows.dtype == full.dtype
            torch.testing.assert_close(rows, full[at], atol=1e-5, rtol=1e-5)
        assert model(x, logits_at=torch.zeros_like(at)).shape == (0, V)


@pytest.mark.parametrize("arch", ["native", "qwen3"])
def test_logits_at_refuses_a_kv_cache_and_a_wrong_mask(arch):
    model = backbone(arch).eval()
    x, at = tokens_and_selection()
    with pytest.raises(ValueError, match="KV cache"):
        model(x, logits_at=at, use_cache=True)
    with pytest.raises(ValueError, match="bool tensor shaped like input_ids"):
        model(x, logits_at=at.long())


def test_an_unlisted_hf_model_type_computes_full_logits_and_selects(monkeypatch):
    import dlm.models.hf as hf

    model = backbone("qwen3").eval()
    x, at = tokens_and_selection()
    decoder_calls = heads_called_with_logits_at(model.hf_model.base_model)
    monkeypatch.setattr(hf, "PLAIN_HEAD_MODEL_TYPES", ())
    with torch.no_grad():
        torch.testing.assert_close(model(x, logits_at=at), model(x)[at], atol=0, rtol=0)
    assert decoder_calls == [False, False]  # reached through the whole model both times (no base_model call)


def test_moe_balance_loss_is_still_recorded_with_logits_at():
    model = backbone("qwen3_moe").train()
    assert model.router_aux_loss_coef > 0
    x, at = tokens_and_selection()
    model(x)
    full_aux, full_stats = model.pop_aux_loss()
    model(x, logits_at=at)
    aux, stats = model.pop_aux_loss()
    assert aux is not None and set(stats) == set(full_stats)
    torch.testing.assert_close(aux, full_aux)


def mdlm(arch: str, shift_logits: bool) -> MDLM:
    return MDLM(backbone(arch), TOKENIZER, LinearSchedule(), shift_logits=shift_logits)


def loss_and_grads(model: MDLM, batch: dict, full_logits: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    if full_logits:  # today's path: every position's logits [B, T, V], the masked rows scored
        model.logits = lambda xt, at=None, **kw: MDLM.logits(model, xt, **kw)
    try:
        loss = model.loss(batch, generator=torch.Generator().manual_seed(7))["loss"]
    finally:
        model.__dict__.pop("logits", None)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shift_logits", [False, True], ids=["no_shift", "shift"])
@pytest.mark.parametrize("arch", ARCHS)
def test_mdlm_loss_and_gradients_match_the_full_logits_path(arch, shift_logits):
    model = mdlm(arch, shift_logits).eval()  # eval: no dropout (GPT-2), so both passes see the same network
    x, _ = tokens_and_selection()
    batch = {"input_ids": x, "loss_mask": torch.ones_like(x, dtype=torch.bool)}
    if arch in ("native", "qwen3"):  # packed documents
        batch["doc_ids"] = torch.tensor([0] * 4 + [1] * 5 + [2] * (T - 9)).expand(B, T)
    calls = heads_called_with_logits_at(model.backbone)
    loss, grads = loss_and_grads(model, batch, full_logits=False)
    assert calls == [True]  # the selected-head path was taken
    ref_loss, ref_grads = loss_and_grads(model, batch, full_logits=True)
    assert calls == [True, False]
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("shift_logits", [False, True], ids=["no_shift", "shift"])
def test_mdlm_logits_at_maps_shifted_sources_with_repeats(shift_logits):
    model = mdlm("native", shift_logits).eval()
    x, at = tokens_and_selection()
    at[2, 0], at[2, 1] = True, False
    asked = []
    model.backbone.register_forward_pre_hook(
        lambda mod, args, kwargs: asked.append(kwargs.get("logits_at")), with_kwargs=True
    )
    with torch.no_grad():
        full = model.logits(x)
        rows = model.logits(x, at=at)
    torch.testing.assert_close(rows, full[at], atol=1e-5, rtol=1e-5)
    expected = at.clone()
    if shift_logits:  # each selected token's source position, once
        expected = torch.zeros_like(at)
        expected[:, :-1] = at[:, 1:]
        expected[:, 0] |= at[:, 0]
    assert torch.equal(asked[-1], expected)


class NoLogitsAt(nn.Module):
    """A backbone whose forward does not take logits_at."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.time_conditioning = inner, False

    def forward(self, input_ids, *, doc_ids=None, time=None):
        return self.inner(input_ids, doc_ids=doc_ids)


@pytest.mark.parametrize("shift_logits", [False, True], ids=["no_shift", "shift"])
def test_a_backbone_without_logits_at_falls_back_to_selecting(shift_logits):
    plain = mdlm("native", shift_logits).eval()
    wrapped = MDLM(NoLogitsAt(backbone("native")), TOKENIZER, LinearSchedule(), shift_logits=shift_logits).eval()
    assert plain.backbone_caps.logits_at and not wrapped.backbone_caps.logits_at
    x, at = tokens_and_selection()
    with torch.no_grad():
        torch.testing.assert_close(wrapped.logits(x, at=at), plain.logits(x, at=at), atol=1e-5, rtol=1e-5)


def test_masked_token_nll_takes_full_logits_or_the_masked_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g)
    x0 = torch.randint(0, V - 1, (B, T), generator=g)
    _, masked = tokens_and_selection()
    nll, correct = masked_token_nll(logits, x0, masked, MASK)
    nll_rows, correct_rows = masked_token_nll(logits[masked], x0, masked, MASK)
    torch.testing.assert_close(nll_rows, nll)
    assert torch.equal(correct_rows, correct) and bool((nll[~masked] == 0).all())
