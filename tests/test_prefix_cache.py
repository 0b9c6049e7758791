"""Fast-dLLM prefix KV cache of ThresholdSampler(kv_cache="prefix") through MDLM's ``with_prefix_cache`` hook:
exact (identical tokens) where the prefix cannot see the suffix, cheaper and well-formed on a bidirectional
model, and kv_cache=none unchanged."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from dlm.methods.mdlm import MDLM
from dlm.models import Transformer
from dlm.sampling import FunctionDenoiser, MaskPrior, ThresholdSampler
from dlm.sampling.confidence import OrderedUnmaskingSampler
from dlm.schedules import LinearSchedule

VOCAB = 12
TOKENIZER = SimpleNamespace(vocab_size=VOCAB, pad_token_id=9, eos_token_id=10, mask_token_id=11)
MASK, EOS = TOKENIZER.mask_token_id, TOKENIZER.eos_token_id
P, LENGTH, L = 4, 12, 4  # prompt length, completion length, sampler block length


def make_mdlm(attention="bidirectional", block_size=None, backbone=None, **kw) -> MDLM:
    torch.manual_seed(0)
    if backbone is None:
        backbone = Transformer(vocab_size=VOCAB, n_layers=2, d_model=64, n_heads=4, max_seq_len=32,
                               attention=attention, block_size=block_size,
                               time_conditioning=kw.pop("time_conditioning", False), init_std=0.3)
    return MDLM(backbone, TOKENIZER, LinearSchedule(), **kw).eval()


def prompts(B=3, seed=1):
    return torch.randint(0, 9, (B, P), generator=torch.Generator().manual_seed(seed))


def count_positions(model: MDLM) -> list[int]:
    """Positions (batch row 0) of every backbone forward, appended as they happen."""
    seen: list[int] = []
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    return seen


def run(model, sampler, x=None, fill=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if x is None:
        return model.generate(prompts(), LENGTH, sampler=sampler, generator=g)
    return model.infill(x, fill, sampler=sampler, generator=g)


@pytest.mark.parametrize("shift", [False, True], ids=["no_shift", "shift_logits"])
@pytest.mark.parametrize("temperature,tau", [(0.0, 0.9), (1.0, 0.3), (1.0, 0.0)])
def test_cached_equals_uncached_when_the_prefix_cannot_see_the_suffix(shift, temperature, tau):
    # block-causal backbone with blocks of the prompt length = the sampler's blocks: a block's keys/values
    # depend only on itself and earlier blocks, so the cache of the prompt and finished blocks is exact
    model = make_mdlm("block_causal", block_size=P, shift_logits=shift)
    kw = dict(threshold=tau, temperature=temperature, block_length=L)
    plain = run(model, ThresholdSampler(**kw))
    seen = count_positions(model)
    cached = run(model, ThresholdSampler(kv_cache="prefix", **kw))
    assert torch.equal(cached.tokens, plain.tokens)
    assert cached.num_network_calls == plain.num_network_calls == len(seen)
    assert sum(seen) < plain.num_network_calls * (P + LENGTH) or tau == 0.0


def ragged_infill() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose blocks start apart, one with holes between given tokens: (tokens, fill mask)."""
    x = torch.randint(0, 9, (3, P + LENGTH), generator=torch.Generator().manual_seed(2))
    fill = torch.zeros_like(x, dtype=torch.bool)
    fill[0, P:] = True
    fill[1, P + L :] = True  # this row's blocks start one block later: the shared prefix is the earliest row's
    fill[2, P + 1 :: 2] = True  # holes with given tokens between them
    return x, fill


def test_exact_with_ragged_rows_and_eos_fill():
    model = make_mdlm("block_causal", block_size=P)
    x, fill = ragged_infill()
    for eos in (None, EOS):
        kw = dict(threshold=0.5, temperature=1.0, block_length=L, eos_id=eos)
        plain = run(model, ThresholdSampler(**kw), x, fill, seed=3)
        cached = run(model, ThresholdSampler(kv_cache="prefix", **kw), x, fill, seed=3)
        assert torch.equal(cached.tokens, plain.tokens)
        assert torch.equal(cached.tokens[~fill], x[~fill])


def test_bidirectional_cached_run_is_well_formed_and_cheaper():
    model = make_mdlm("bidirectional")
    # tau = 1: nothing is ever above it, so both runs commit exactly the even split: the same steps
    kw = dict(threshold=1.0, temperature=0.0, block_length=L, steps=LENGTH)
    seen = count_positions(model)
    plain = run(model, ThresholdSampler(**kw))
    plain_positions, seen[:] = sum(seen), []
    cached = run(model, ThresholdSampler(kv_cache="prefix", **kw))
    T = P + LENGTH
    assert torch.equal(cached.tokens[:, :P], prompts())
    assert not (cached.tokens == MASK).any()
    assert cached.num_network_calls == plain.num_network_calls == LENGTH == len(seen)
    # per block of L steps: one full refresh forward, then L - 1 forwards over the columns from the block on
    expected = [T if i % L == 0 else T - (P + (i // L) * L) for i in range(LENGTH)]
    assert seen == expected
    assert sum(seen) < plain_positions == LENGTH * T
    # Fast-dLLM's setting (tau = 0.9, one block = the prompt-only cache): still well-formed
    for block in (L, LENGTH):
        gen = run(model, ThresholdSampler(threshold=0.9, temperature=0.0, block_length=block, kv_cache="prefix"))
        assert torch.equal(gen.tokens[:, :P], prompts()) and not (gen.tokens == MASK).any()
        assert 1 <= gen.num_network_calls <= LENGTH


def test_time_conditioned_backbone_runs():
    model = make_mdlm("bidirectional", time_conditioning=True)
    gen = run(model, ThresholdSampler(threshold=0.9, temperature=0.0, block_length=L, kv_cache="prefix"))
    assert not (gen.tokens == MASK).any() and torch.equal(gen.tokens[:, :P], prompts())


def test_prefix_cache_false_is_unchanged_and_never_calls_the_hook():
    model = make_mdlm("bidirectional")
    x = torch.cat([prompts(), torch.full((3, LENGTH), MASK)], dim=1)

    def denoiser(z):
        return model.denoise(z)

    def hook(*a):
        raise AssertionError("the hook must not be used with kv_cache=none")

    denoiser = FunctionDenoiser(denoiser, prefix_cache=hook)
    for block in (None, L):
        s = ThresholdSampler(threshold=0.5, temperature=1.0, block_length=block)
        a = s.sample(denoiser, x, prior=MaskPrior(MASK), generator=torch.Generator().manual_seed(0))
        b = OrderedUnmaskingSampler._sample(s, denoiser, x, MaskPrior(MASK), torch.Generator().manual_seed(0))
        assert torch.equal(a.tokens, b.tokens) and a.num_network_calls == b.num_network_calls


def test_sampler_level_exactness_with_a_toy_hook():
    # a bidirectional toy denoiser whose suffix logits depend on the prefix only through a sum: caching that sum
    # is exact, so the cached loop (which steps on the suffix columns only) must match the plain loop
    V, T = 8, 14
    g = torch.Generator().manual_seed(0)
    emb, pos = torch.randn(V, V, generator=g) * 2, torch.randn(T, V, generator=g)
    calls = []

    def head(x, start, total):
        logits = emb[x] + pos[start : start + x.shape[1]] + total[:, None] / T
        logits[..., V - 1] = float("-inf")
        return logits.log_softmax(-1)

    def denoiser(x):
        return head(x, 0, emb[x].sum(1))

    def with_prefix_cache(x, p):
        calls.append(p)
        prefix = emb[x[:, :p]].sum(1)
        return denoiser(x), lambda z: head(z, p, prefix + emb[z].sum(1))

    denoiser = FunctionDenoiser(denoiser, prefix_cache=with_prefix_cache)
    x = torch.randint(0, V - 1, (3, T), generator=g)
    x[0, 3:] = V - 1
    x[1, 6:] = V - 1
    x[2, 4::2] = V - 1
    for tau, temp in ((0.9, 0.0), (0.4, 1.0)):
        kw = dict(threshold=tau, temperature=temp, block_length=3, eos_id=V - 2, record_trajectory=True)
        a = ThresholdSampler(**kw).sample(denoiser, x, prior=MaskPrior(V - 1), generator=torch.Generator().manual_seed(1))
        b = ThresholdSampler(kv_cache="prefix", **kw).sample(
            denoiser, x, prior=MaskPrior(V - 1), generator=torch.Generator().manual_seed(1))
        assert torch.equal(a.tokens, b.tokens) and a.num_network_calls == b.num_network_calls
        assert all(torch.equal(u, w) for u, w in zip(a.trajectory, b.trajectory, strict=True))
    assert calls[:2] == [3, 6]  # refreshed at each block boundary, from the earliest row's first mask


def test_configuration_errors():
    with pytest.raises(NotImplementedError, match="block_length"):
        ThresholdSampler(kv_cache="prefix")
    x = torch.tensor([[1, 2, MASK, MASK]])
    with pytest.raises(ValueError, match="with_prefix_cache"):
        ThresholdSampler(kv_cache="prefix", block_length=2).sample(
            lambda z: torch.zeros(*z.shape, VOCAB).log_softmax(-1), x, prior=MaskPrior(MASK))
    assert "kv_cache='prefix'" in repr(ThresholdSampler(kv_cache="prefix", block_length=2))
    model = make_mdlm()
    with pytest.raises(ValueError, match="mask"):
        model.prefix_cached_denoise(x, 3)


def test_hf_causal_lm_backbone():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pytest.importorskip("transformers")
    from dlm.models.hf import HFCausalLM

    config = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64)
    for attention, exact in (("block_causal", True), ("bidirectional", False)):
        torch.manual_seed(0)
        backbone = HFCausalLM(config=config, attention=attention, block_size=P if exact else None)
        model = make_mdlm(backbone=backbone)
        assert model.supports_prefix_cache
        kw = dict(threshold=0.9 if exact else 1.0, temperature=0.0, block_length=L, steps=LENGTH)
        plain = run(model, ThresholdSampler(**kw))
        cached = run(model, ThresholdSampler(kv_cache="prefix", **kw))
        assert cached.num_network_calls == plain.num_network_calls
        assert not (cached.tokens == MASK).any() and torch.equal(cached.tokens[:, :P], prompts())
        if exact:
            assert torch.equal(cached.tokens, plain.tokens)


@pytest.mark.parametrize("shift", [False, True], ids=["no_shift", "shift_logits"])
@pytest.mark.parametrize("time_conditioning", [False, True], ids=["plain", "time"])
def test_suffix_right_after_the_refresh_equals_the_full_denoiser(shift, time_conditioning):
    # any backbone (bidirectional here): while the suffix has not changed since the refresh the cache is exact
    model = make_mdlm("bidirectional", shift_logits=shift, time_conditioning=time_conditioning)
    x = torch.cat([prompts(), torch.full((3, LENGTH), MASK)], dim=1)
    x[:, P : P + 3] = 3  # clean up to P + 3, masked after
    time = (x == MASK).sum(1) / LENGTH
    for p in (1, P, P + 3):
        logp, suffix = model.prefix_cached_denoise(x, p, time_fn=lambda t: (t == MASK).sum(1) / LENGTH)
        full = model.denoise(x, time=time)
        assert torch.equal(logp, full)
        torch.testing.assert_close(suffix(x[:, p:]), full[:, p:], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(suffix(x[:, p:]), full[:, p:], rtol=1e-4, atol=1e-4)  # the cache is reusable
