"""Backbone features for AR and block diffusion: explicit attention masks, position ids and KV caches
(native and HF), each equal to the plain full-sequence computation."""

from __future__ import annotations

import pytest
import torch

from dlm.models import HFCausalLM, Transformer
from dlm.models.attention import attention_mask

QWEN3 = dict(model_type="qwen3", num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, intermediate_size=64, vocab_size=11, max_position_embeddings=64)


def build(kind: str, attention="causal"):
    torch.manual_seed(0)
    if kind == "native":
        return Transformer(vocab_size=11, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=32,
                           attention=attention, block_size=3).eval()
    return HFCausalLM(config=QWEN3, attention=attention, block_size=3,
                      attn_implementation="eager" if kind == "hf_eager" else "sdpa").eval()


KINDS = ["native", "hf", "hf_eager"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pattern", ["causal", "block_causal", "bidirectional"])
def test_explicit_mask_equals_the_named_pattern(kind, pattern):
    model = build(kind)
    x = torch.randint(0, 11, (2, 9))
    mask = attention_mask(pattern, 9, block_size=3)
    mask = torch.ones(1, 1, 9, 9, dtype=torch.bool) if mask is None else mask
    with torch.no_grad():
        torch.testing.assert_close(model(x, attn_mask=mask), model(x, attention=pattern), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_position_ids_default_and_shift(kind):
    model = build(kind)
    x = torch.randint(0, 11, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(x, position_ids=torch.arange(7)[None]), model(x))
        # RoPE is relative: shifting every position leaves causal logits unchanged
        torch.testing.assert_close(model(x, position_ids=torch.arange(7)[None] + 5), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pattern", ["causal", "block_causal"])
def test_kv_cache_in_chunks_equals_the_full_forward(kind, pattern):
    """Chunks aligned to the blocks: each chunk sees the cache and obeys the pattern among its own tokens.
    (A cache is exact only where earlier tokens never see later ones: causal and block-causal.)"""
    model = build(kind, attention=pattern)
    x = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        full = model(x)
        a, cache = model(x[:, :3], use_cache=True)
        b, cache = model(x[:, 3:6], past_key_values=cache, use_cache=True)
        c, cache = model(x[:, 6:], past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 9
        torch.testing.assert_close(torch.cat([a, b, c], 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_reading_the_cache_without_use_cache_leaves_it_unchanged(kind):
    model = build(kind)
    x = torch.randint(0, 11, (1, 8))
    with torch.no_grad():
        full = model(x)
        _, cache = model(x[:, :5], use_cache=True)
        peek = model(x[:, 5:], past_key_values=cache)  # read only
        assert cache.get_seq_length() == 5
        torch.testing.assert_close(peek, full[:, 5:], atol=1e-5, rtol=1e-5)
        again, cache = model(x[:, 5:], past_key_values=cache, use_cache=True)
        torch.testing.assert_close(again, peek, atol=1e-5, rtol=1e-5)


def test_plain_call_still_returns_logits_only():
    model = build("native")
    out = model(torch.randint(0, 11, (1, 4)))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 4, 11)


def test_doc_ids_with_an_explicit_mask_is_refused():
    model = build("native")
    x = torch.randint(0, 11, (1, 4))
    with pytest.raises(ValueError, match="doc_ids"):
        model(x, doc_ids=torch.zeros(1, 4, dtype=torch.long), attn_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))
