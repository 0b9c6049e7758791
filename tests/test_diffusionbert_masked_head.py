"""DiffusionBERT training with the LM head at the masked positions only (``log_probs(..., at=masked)``): the same
rows, loss, bound and gradients as full log-probabilities then selection, for every time conditioning (the time
token shifts the backbone's positions by one), packed rows, nothing masked, and a backbone that cannot select."""

from __future__ import annotations

import dataclasses
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dlm.methods.diffusionbert import DiffusionBERT  # noqa: E402
from dlm.models import Transformer  # noqa: E402
from dlm.models.capabilities import capabilities_of  # noqa: E402
from dlm.models.hf import HFCausalLM  # noqa: E402
from dlm.spindle import SpindleSchedule  # noqa: E402

V, L, B, STEPS = 64, 10, 3, 8
TOKENIZER = SimpleNamespace(vocab_size=V, pad_token_id=0, eos_token_id=1, mask_token_id=V - 1)
MASK = V - 1
QWEN3 = dict(model_type="qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, vocab_size=V, max_position_embeddings=64)
# Every time conditioning the backbone supports: HFCausalLM has no layerwise time path.
CASES = [("native", "none"), ("native", "token"), ("native", "layerwise"), ("qwen3", "none"), ("qwen3", "token")]
CASE_IDS = [f"{arch}-{mode}" for arch, mode in CASES]


def diffusionbert(arch: str, mode: str) -> DiffusionBERT:
    torch.manual_seed(0)
    if arch == "native":
        net: nn.Module = Transformer(vocab_size=V, n_layers=2, d_model=32, n_heads=4, max_seq_len=64,
                                     time_conditioning=mode == "layerwise")
    else:
        net = HFCausalLM(config=QWEN3, attn_implementation="sdpa", attention="bidirectional")
    model = DiffusionBERT(net, TOKENIZER, SpindleSchedule(0.3), num_steps=STEPS, time_conditioning=mode)
    model.set_token_counts(torch.randint(1, 1000, (V,), generator=torch.Generator().manual_seed(0)))
    return model.eval()  # no dropout: both passes see the same network


def batch(packed: bool = False, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V - 1, (B, L), generator=g)  # never the mask token: x_t's masks are the masked positions
    loss_mask = torch.ones(B, L, dtype=torch.bool)
    loss_mask[1, -3:] = False  # a padded tail: never masked
    b = {"input_ids": ids, "loss_mask": loss_mask}
    if packed:
        b["doc_ids"] = torch.tensor([0] * 4 + [1] * 3 + [2] * (L - 7)).expand(B, L)
    return b


def record_backbone_calls(model: DiffusionBERT) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    calls: list = []
    model.backbone.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((args[0], kwargs.get("logits_at"))), with_kwargs=True
    )
    return calls


def run(model: DiffusionBERT, b: dict, full_logits: bool) -> tuple[dict, torch.Tensor, dict[str, torch.Tensor]]:
    """Loss stats, nll_bound and every parameter's gradient with a fixed generator; ``full_logits``: the reference,
    every position's log-probabilities [B, L, V] and the masked rows taken from them."""
    model.zero_grad(set_to_none=True)
    if full_logits:
        model.log_probs = lambda xt, t, at=None, **kw: DiffusionBERT.log_probs(model, xt, t, **kw)[at]
    try:
        out = model.loss(b, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            bound = model.nll_bound(b, generator=torch.Generator().manual_seed(7))
    finally:
        model.__dict__.pop("log_probs", None)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, bound, grads


def assert_same_as_full_logits(model: DiffusionBERT, b: dict) -> None:
    out, bound, grads = run(model, b, full_logits=False)
    ref_out, ref_bound, ref_grads = run(model, b, full_logits=True)
    assert out.keys() == ref_out.keys()
    for key in out:
        torch.testing.assert_close(out[key], ref_out[key], atol=1e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(bound, ref_bound, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize(("arch", "mode"), CASES, ids=CASE_IDS)
def test_loss_bound_and_gradients_match_the_full_logits_path(arch, mode, packed):
    model = diffusionbert(arch, mode)
    b = batch(packed)
    calls = record_backbone_calls(model)
    out, _, _ = run(model, b, full_logits=False)
    assert out["masked_frac"] > 0
    # loss and nll_bound: each one backbone call, asked for exactly the masked positions of x_t
    assert len(calls) == 2
    for tokens, logits_at in calls:
        assert logits_at is not None and logits_at.shape == tokens.shape
        masked = tokens == MASK
        assert int(logits_at.sum()) == int(masked.sum()) > 0 and torch.equal(logits_at, masked)
        if mode == "token":  # the time token leads, and is never scored
            assert tokens.shape == (B, L + 1) and not logits_at[:, 0].any()
    assert_same_as_full_logits(model, b)


@pytest.mark.parametrize(("arch", "mode"), CASES, ids=CASE_IDS)
def test_log_probs_at_are_the_rows_of_the_full_log_probs(arch, mode):
    model = diffusionbert(arch, mode)
    g = torch.Generator().manual_seed(1)
    xt = torch.randint(2, V - 1, (B, L), generator=g)
    at = torch.rand(B, L, generator=g) < 0.5
    at[0, 0] = at[0, -1] = True  # the first and last positions: where a misplaced time-token column shows
    at[2] = False  # a row with nothing selected
    xt = xt.masked_fill(at, MASK)
    t = torch.tensor([1, 4, STEPS])
    with torch.no_grad():
        full = model.log_probs(xt, t)  # the sampling path: unchanged
        rows = model.log_probs(xt, t, at=at)
    assert full.shape == (B, L, V) and rows.shape == (int(at.sum()), V) and rows.dtype == torch.float32
    torch.testing.assert_close(rows, full[at], atol=1e-5, rtol=1e-5)
    assert bool((rows[:, MASK] == float("-inf")).all())


@pytest.mark.parametrize(("arch", "mode"), CASES, ids=CASE_IDS)
def test_nothing_masked(arch, mode):
    model = diffusionbert(arch, mode)
    b = batch()
    b["loss_mask"] = torch.zeros_like(b["loss_mask"])  # no counted token: nothing is masked
    calls = record_backbone_calls(model)
    out, bound, _ = run(model, b, full_logits=False)
    assert [int(logits_at.sum()) for _, logits_at in calls] == [0, 0]
    assert out["loss"] == 0 and out["masked_frac"] == 0 and bool((bound == 0).all())
    with torch.no_grad():
        rows = model.log_probs(b["input_ids"], torch.tensor([1, 2, 3]), at=torch.zeros(B, L, dtype=torch.bool))
    assert rows.shape == (0, V)
    assert_same_as_full_logits(model, b)


@pytest.mark.parametrize("mode", ["none", "token", "layerwise"])
def test_a_backbone_that_cannot_select_computes_full_logits_and_selects(mode, monkeypatch):
    model = diffusionbert("native", mode)
    b = batch(packed=True)
    out, bound, grads = run(model, b, full_logits=False)
    # as for a backbone that does not declare logits_at
    undeclared = property(lambda self: dataclasses.replace(capabilities_of(self.backbone), logits_at=False))
    monkeypatch.setattr(DiffusionBERT, "backbone_caps", undeclared)
    calls = record_backbone_calls(model)
    ref_out, ref_bound, ref_grads = run(model, b, full_logits=False)
    assert calls and all(logits_at is None for _, logits_at in calls)
    torch.testing.assert_close(out["loss"], ref_out["loss"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bound, ref_bound, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
