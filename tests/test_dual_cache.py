"""Fast-dLLM's DualCache (ThresholdSampler(kv_cache="dual") through MDLM's ``with_dual_cache`` hook): exact where the
block sees neither a changed prefix nor the suffix (block-causal backbone, aligned blocks; native and HF, shift
or not, EOS fill, ragged rows), each step but a block's first a forward over the block alone, well-formed on a
bidirectional model, and bad settings rejected with a message."""

from __future__ import annotations

import pytest
import torch
from test_prefix_cache import EOS, LENGTH, MASK, TOKENIZER, VOCAB, L, P, prompts, ragged_infill, run
from test_prefix_cache import count_positions as forward_lengths
from test_prefix_cache import make_mdlm as make_native_mdlm

from dlm.methods.mdlm import MDLM
from dlm.models import HFCausalLM
from dlm.sampling import FunctionDenoiser, MaskPrior, ThresholdSampler

QWEN3 = dict(model_type="qwen3", num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.3)


def make_mdlm(kind="native", attention="bidirectional", **kw) -> MDLM:
    """The prefix-cache tests' native MDLM (blocks of the prompt length), or the same on a tiny HF Qwen3."""
    if kind == "native":
        return make_native_mdlm(attention, block_size=P, **kw)
    from dlm.schedules import LinearSchedule

    torch.manual_seed(0)
    return MDLM(HFCausalLM(config=QWEN3, attention=attention, block_size=P), TOKENIZER, LinearSchedule(), **kw).eval()


@pytest.mark.parametrize("kind", ["native", "hf"])
@pytest.mark.parametrize("shift", [False, True], ids=["no_shift", "shift_logits"])
@pytest.mark.parametrize("temperature,tau,eos", [(0.0, 0.9, None), (1.0, 0.3, EOS), (1.0, 0.0, None)])
def test_dual_cache_equals_uncached_when_the_block_sees_neither_side(kind, shift, temperature, tau, eos):
    model = make_mdlm(kind, "block_causal", shift_logits=shift)
    kw = dict(threshold=tau, temperature=temperature, block_length=L, eos_id=eos)
    plain = run(model, ThresholdSampler(**kw))
    seen = forward_lengths(model)
    dual = run(model, ThresholdSampler(kv_cache="dual", **kw))
    assert torch.equal(dual.tokens, plain.tokens)
    assert dual.num_network_calls == plain.num_network_calls == len(seen)
    # a block's first step is a full forward (the refresh); the others run over the block (+1 token when shifting)
    T = P + LENGTH
    assert all(n in (T, L + shift) for n in seen) and (tau == 0.0 or sum(seen) < len(seen) * T)


def test_exact_with_ragged_rows_and_eos_fill_past_the_block():
    model = make_mdlm("native", "block_causal")
    x, fill = ragged_infill()  # rows start their blocks apart: the recomputed window spans both rows' blocks
    for eos in (None, EOS):
        kw = dict(threshold=0.5, temperature=1.0, block_length=L, eos_id=eos)
        plain = run(model, ThresholdSampler(**kw), x, fill, seed=3)
        dual = run(model, ThresholdSampler(kv_cache="dual", **kw), x, fill, seed=3)
        assert torch.equal(dual.tokens, plain.tokens)
        assert torch.equal(dual.tokens[~fill], x[~fill])


def test_an_eos_committed_in_the_block_fills_the_suffix_too():
    """A toy hook: the refresh predicts token 3 with low confidence (one commit), the block denoiser then predicts
    EOS with high confidence; the fill must reach past the block, into the cached suffix."""
    V, T, mask = 6, 12, 5
    x = torch.cat([torch.tensor([[1, 2]]), torch.full((1, T - 2), mask)], dim=1)

    def logp_of(tokens, favourite, strength):
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], V)
        logits[..., favourite] = strength
        logits[..., mask] = float("-inf")
        return logits.log_softmax(-1)

    def denoiser(z):
        return logp_of(z, 3, 1.0)

    denoiser = FunctionDenoiser(denoiser, dual_cache=lambda z, start, end: (logp_of(z, 3, 1.0), lambda b: logp_of(b, 4, 9.0)))
    s = ThresholdSampler(threshold=0.99, temperature=0.0, block_length=4, eos_id=4, steps=T, kv_cache="dual")
    out = s.sample(denoiser, x, prior=MaskPrior(mask))
    assert out.tokens[0].tolist() == [1, 2, 3] + [4] * (T - 3) and out.num_network_calls == 2


def test_bidirectional_dual_run_is_well_formed_and_cheapest():
    model = make_mdlm("native", "bidirectional", time_conditioning=True)
    kw = dict(threshold=1.0, temperature=0.0, block_length=L, steps=LENGTH)  # tau = 1: the even split, same steps
    seen = forward_lengths(model)
    runs = {}
    for name, extra in (("plain", {}), ("prefix", {"kv_cache": "prefix"}), ("dual", {"kv_cache": "dual"})):
        seen[:] = []
        runs[name] = (run(model, ThresholdSampler(**kw, **extra)), sum(seen), list(seen))
    T = P + LENGTH
    gen, positions, lengths = runs["dual"]
    assert torch.equal(gen.tokens[:, :P], prompts()) and not (gen.tokens == MASK).any()
    assert gen.num_network_calls == runs["plain"][0].num_network_calls == LENGTH
    assert lengths == [T if i % L == 0 else L for i in range(LENGTH)]
    assert positions < runs["prefix"][1] < runs["plain"][1] == LENGTH * T


def test_bad_settings_name_the_fix():
    with pytest.raises(ValueError, match="kv_cache must be one of none, prefix, dual or null"):
        ThresholdSampler(kv_cache="both", block_length=4)
    with pytest.raises(NotImplementedError, match="kv_cache='dual'\\) needs block_length"):
        ThresholdSampler(kv_cache="dual")
    x = torch.cat([prompts(1), torch.full((1, 4), MASK)], dim=1)
    with pytest.raises(ValueError, match="with_dual_cache\\(x, start, end\\) hook"):
        ThresholdSampler(kv_cache="dual", block_length=4).sample(lambda z: z, x, prior=MaskPrior(MASK))
    model = make_mdlm()
    with pytest.raises(ValueError, match="must not contain mask tokens"):
        model.dual_cached_denoise(x, 5, 8)
    with pytest.raises(ValueError, match="0 <= start < end <= 8"):
        model.dual_cached_denoise(x, 4, 9)


@pytest.mark.parametrize("kind", ["native", "hf"])
@pytest.mark.parametrize("shift", [False, True], ids=["no_shift", "shift_logits"])
def test_at_the_refresh_state_the_block_denoiser_equals_the_full_forward(kind, shift):
    """Bidirectional attention: the cache is approximate only because the state moves on; on the state it was filled
    from, the forward over the block alone reads exactly the keys/values of the full forward."""
    model = make_mdlm(kind, "bidirectional", shift_logits=shift)
    x = torch.cat([prompts(2, seed=4), torch.full((2, LENGTH), MASK)], dim=1)
    x[:, P + 1] = 3  # a committed token inside the first block
    full = model.denoise(x)
    for start, end in ((P, P + L), (0, L)):
        logp, block = model.dual_cached_denoise(x, start, end)
        torch.testing.assert_close(logp, full)
        torch.testing.assert_close(block(x[:, start:end]), full[:, start:end], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_refresh_every_step_is_the_uncached_sampler_and_every_k_steps_in_between(cache):
    """Bidirectional attention (the caches are approximate): refreshing on every step is exact; every 2nd step
    makes a full forward on every other step of a block."""
    model = make_mdlm("native", "bidirectional")
    kw = dict(threshold=1.0, temperature=0.0, block_length=L, steps=LENGTH)  # tau = 1: the even split, same steps
    plain = run(model, ThresholdSampler(**kw))
    seen = forward_lengths(model)
    every = run(model, ThresholdSampler(**kw, kv_cache=cache, refresh_every=1))
    assert torch.equal(every.tokens, plain.tokens) and every.num_network_calls == plain.num_network_calls
    T = P + LENGTH
    assert seen == [T] * LENGTH
    seen[:] = []
    run(model, ThresholdSampler(**kw, kv_cache=cache, refresh_every=2))
    assert [n == T for n in seen] == [i % 2 == 0 for i in range(LENGTH)]
    with pytest.raises(ValueError, match="refresh_every must be an integer >= 1"):
        ThresholdSampler(block_length=4, kv_cache="dual", refresh_every=0)
