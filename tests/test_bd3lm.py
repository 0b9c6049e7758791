"""Block diffusion (BD3-LM): vectorised == per-block loop, the two reductions (L'=T is MDLM, L'=1 with shift is
AR), cached == uncached sampling, prompts kept, no masks left, HF Qwen3 backbone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dlm.methods.ar import AR
from dlm.methods.bd3lm import BD3LM
from dlm.methods.mdlm import MDLM
from dlm.models import HFCausalLM, Transformer
from dlm.sampling import AncestralSampler, LowConfidenceSampler
from dlm.schedules import CosineSchedule, LinearSchedule

TOKENIZER = SimpleNamespace(vocab_size=9, pad_token_id=6, eos_token_id=7, mask_token_id=8)
EOS, MASK = 7, 8
QWEN3 = dict(model_type="qwen3", num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, intermediate_size=64, vocab_size=9, max_position_embeddings=64)


def backbone(kind="native"):
    torch.manual_seed(0)
    if kind == "hf":
        return HFCausalLM(config=QWEN3)
    return Transformer(vocab_size=9, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=32)


def make(block_size=4, kind="native", sampler=None, **kw) -> BD3LM:
    return BD3LM(backbone(kind), TOKENIZER, LinearSchedule(), block_size=block_size,
                 sampler=sampler or AncestralSampler(steps=4), **kw)


def batch(B=3, T=10, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 7, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -2:] = False
    return {"input_ids": ids, "loss_mask": mask}


@pytest.mark.parametrize("kind", ["native", "hf"])
@pytest.mark.parametrize(("block_size", "shift"), [(4, False), (3, False), (4, True), (1, True), (10, False)])
def test_vectorised_loss_equals_the_per_block_loop(kind, block_size, shift):
    model = make(block_size, kind, shift_logits=shift).eval()
    b = batch()
    terms = [model._diffusion_terms(b, torch.Generator().manual_seed(5), loop=loop) for loop in (False, True)]
    assert terms[0][1].any()
    torch.testing.assert_close(terms[0][0], terms[1][0], atol=1e-5, rtol=1e-5)
    x0 = b["input_ids"]
    xt = x0.masked_fill(torch.rand(x0.shape, generator=torch.Generator().manual_seed(1)) < 0.5, MASK)
    with torch.no_grad():
        torch.testing.assert_close(model.vectorised_logits(xt, x0), model.loop_logits(xt, x0), atol=1e-5, rtol=1e-5)


def test_three_part_mask_layout():
    model = make(2)
    m = model.training_mask(4)[0, 0].int()
    expected = torch.tensor([
        # x_t: own block | clean earlier blocks          x_0: block-causal
        [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1],
    ])
    assert torch.equal(m, expected)


@pytest.mark.parametrize("schedule", [LinearSchedule(), CosineSchedule()], ids=["linear", "cosine"])
def test_block_size_equal_to_the_length_is_mdlm(schedule):
    """L' = T, no shift: one block, one t per row drawn exactly as MDLM draws it, the same masks, and the x_t
    half of the three-part mask is plain bidirectional attention: the same per-token bound."""
    b = batch(T=10)
    bd3 = BD3LM(backbone(), TOKENIZER, schedule, block_size=10).eval()
    mdlm = MDLM(backbone(), TOKENIZER, schedule).eval()
    got = bd3.nll_bound(b, generator=torch.Generator().manual_seed(7))
    want = mdlm.nll_bound(b, generator=torch.Generator().manual_seed(7))
    assert (want > 0).any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["native", "hf"])
def test_block_size_one_with_shift_is_ar(kind):
    """L' = 1 with shift_logits: token i is predicted from the clean stream at position i-1 (the start token
    for i = 0), which attends causally to [s, x_<i] at the AR family's positions: the AR conditional itself.
    At t = 1 (linear schedule: every token masked, w(1) = 1) the bound is that exact NLL; for random t its
    expectation is (E_t[w(t)(1 - α(t))] = 1)."""
    b = batch(T=10)
    bd3 = BD3LM(backbone(kind), TOKENIZER, LinearSchedule(), block_size=1, shift_logits=True).eval()
    ar = AR(backbone(kind), TOKENIZER).eval()
    want = ar.nll_bound(b)
    ones = torch.ones(3, 10)
    got, masked, _ = bd3._diffusion_terms(b, torch.Generator().manual_seed(0), t=ones)
    assert torch.equal(masked, b["loss_mask"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Monte Carlo over t: the bound averages to the exact NLL.
    big = {k: v.repeat(400, 1) for k, v in b.items()}
    mc = bd3.nll_bound(big, generator=torch.Generator().manual_seed(1)).view(400, 3, 10).mean(0)
    assert abs(mc.sum().item() - want.sum().item()) < 0.05 * want.sum().item()


@pytest.mark.parametrize("kind", ["native", "hf"])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("sampler", [AncestralSampler(steps=3), LowConfidenceSampler(steps=4, temperature=1.0)],
                         ids=["ancestral", "low_confidence"])
def test_cached_sampling_equals_uncached(kind, shift, sampler):
    model = make(4, kind, sampler=sampler, shift_logits=shift)
    prompt = torch.tensor([[1, 2, 3, 4, 5], [0, 1, 2, 3, 4]])  # ends mid-block: block 1 is partly given
    out = {}
    for cache in (True, False):
        sampler.kv_cache = "prefix" if cache else "none"  # the sampler's switch (None: BD3-LM's default, prefix)
        out[cache] = model.generate(prompt, 11, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out[True].tokens, out[False].tokens)
    tokens = out[True].tokens
    assert tokens.shape == (2, 16) and torch.equal(tokens[:, :5], prompt)
    assert not (tokens == MASK).any()


@pytest.mark.parametrize("kind", ["native", "hf"])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
def test_the_cache_refresh_rides_on_the_next_blocks_first_call(kind, shift, static):
    """A finished block enters the KV cache in the next block's first denoising call: the cached run makes the
    calls of its samplers and no more (the uncached reference's count: no refresh or start-token call of its own),
    with the same tokens; every call is one backbone forward."""
    sampler = AncestralSampler(steps=3)
    model = make(2, kind, sampler=sampler, shift_logits=shift)
    model.static_kv_cache = static
    prompt = torch.tensor([[1, 2, 3], [0, 1, 2]])  # ends mid-block
    out, forwards = {}, []
    handle = model.backbone.register_forward_hook(lambda *_: forwards.append(1))
    try:
        for cache in (True, False):
            sampler.kv_cache = "prefix" if cache else "none"
            forwards.clear()
            out[cache] = model.generate(prompt, 9, generator=torch.Generator().manual_seed(3))
            assert out[cache].num_network_calls == len(forwards)
    finally:
        handle.remove()
    assert torch.equal(out[True].tokens, out[False].tokens)
    assert out[True].num_network_calls == out[False].num_network_calls  # before: + a call per refresh (+ the start token)


def test_unconditional_generation_stops_after_every_row_has_eos():
    model = make(2)
    with torch.no_grad():
        model.backbone.lm_head.weight[EOS] *= 25  # EOS very likely everywhere
    gen = model.generate(None, 12, num_samples=3, generator=torch.Generator().manual_seed(0))
    assert gen.tokens.shape == (3, 12) and not (gen.tokens == MASK).any()
    for row in gen.tokens.tolist():
        assert EOS in row and all(t == EOS for t in row[row.index(EOS):])


@pytest.mark.parametrize("cache", [True, False])
def test_infill_keeps_given_tokens_and_fills_holes_in_any_block(cache):
    model = make(4, sampler=AncestralSampler(steps=4, kv_cache="prefix" if cache else "none"))
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 0, 1, 2, 3]])
    fill = torch.zeros_like(tokens, dtype=torch.bool)
    fill[0, [1, 6, 9]] = True
    gen = model.infill(tokens, fill, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gen.tokens[~fill], tokens[~fill]) and not (gen.tokens == MASK).any()


def test_errors_are_clear():
    with pytest.raises(ValueError, match="block_size"):
        make(0)
    tc = Transformer(vocab_size=9, n_layers=1, d_model=32, n_heads=4, time_conditioning=True)
    with pytest.raises(ValueError, match="time conditioning"):
        BD3LM(tc, TOKENIZER, LinearSchedule())
