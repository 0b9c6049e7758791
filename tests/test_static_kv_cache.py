"""Static (preallocated) KV caches (dlm/models/kv_cache.py): on the native and HF backbones they give the logits of
the growing cache and of the full forward; every cached sampling path (AR decoding, BD3-LM's block cache, the
threshold sampler's prefix cache) gives the same tokens and network calls with either cache; a compiled backbone
decodes through them with a fixed number of graphs; bad use fails with a message that names the fix."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

from dlm.compile import compile_backbone, uses_kv_cache
from dlm.methods.ar import AR
from dlm.methods.bd3lm import BD3LM
from dlm.methods.mdlm import MDLM
from dlm.models import HFCausalLM, Transformer
from dlm.models.attention import attention_mask
from dlm.models.kv_cache import KVCache, StaticKVCache, is_static_cache
from dlm.sampling import AncestralSampler, ThresholdSampler
from dlm.sampling.autoregressive import ARSampler
from dlm.schedules import LinearSchedule

VOCAB = 12
TOKENIZER = SimpleNamespace(vocab_size=VOCAB, pad_token_id=9, eos_token_id=10, mask_token_id=11)
QWEN3 = dict(model_type="qwen3", num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.3)
KINDS = ["native", "hf", "hf_eager"]


def build(kind: str, attention="causal", layers=2):
    torch.manual_seed(0)
    if kind == "native":
        return Transformer(vocab_size=VOCAB, n_layers=layers, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=64,
                           attention=attention, block_size=3, init_std=0.3).eval()
    return HFCausalLM(config={**QWEN3, "num_hidden_layers": layers}, attention=attention, block_size=3,
                      attn_implementation="eager" if kind == "hf_eager" else "sdpa").eval()


def length(cache) -> int:
    return int(cache.get_seq_length())


# ---- the backbones ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pattern", ["causal", "block_causal"])
def test_static_cache_in_chunks_equals_the_full_forward_and_the_growing_cache(kind, pattern):
    model = build(kind, attention=pattern)
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        full = model(x)
        cache = model.static_cache(2, 16)
        assert is_static_cache(cache) and length(cache) == 0
        chunks = []
        for a, b in ((0, 3), (3, 6), (6, 9)):  # chunks aligned to the blocks (a cache is exact there)
            logits, cache = model(x[:, a:b], past_key_values=cache, use_cache=True)
            chunks.append(logits)
        assert length(cache) == 9
        torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_read_only_call_leaves_the_static_cache_as_it_was(kind):
    """use_cache=False writes its own keys (its queries read them) but does not advance: the next call overwrites."""
    model = build(kind)
    x = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        full = model(x)
        _, cache = model(x[:, :4], past_key_values=model.static_cache(2, 16), use_cache=True)
        other = torch.randint(0, VOCAB, (2, 3))
        model(other, past_key_values=cache)  # read-only, different tokens at slots 4..6
        assert length(cache) == 4
        torch.testing.assert_close(model(x[:, 4:], past_key_values=cache), full[:, 4:], atol=1e-5, rtol=1e-5)
        cache.crop(-2)  # drop the last two (transformers: static layers crop by a negative count only)
        torch.testing.assert_close(model(x[:, 2:], past_key_values=cache), full[:, 2:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_an_explicit_mask_over_the_cached_tokens_is_widened_to_the_capacity(kind):
    """Callers with their own layout (BD3-LM) pass masks over cached + new keys, as with a growing cache."""
    model = build(kind, attention="bidirectional")
    x = torch.randint(0, VOCAB, (2, 8))
    rows = attention_mask("block_causal", 8, block_size=4)[..., 4:, :]  # the second block's queries [1, 1, 4, 8]
    with torch.no_grad():
        ref = model(x, attn_mask=attention_mask("block_causal", 8, block_size=4))[:, 4:]
        for cache in (None, model.static_cache(2, 32)):
            _, cache = model(x[:, :4], attn_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool), past_key_values=cache,
                             use_cache=True)
            out = model(x[:, 4:], attn_mask=rows, position_ids=torch.arange(4, 8)[None], past_key_values=cache)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["native", "hf"])
def test_bad_static_cache_use_names_the_fix(kind):
    model = build(kind)
    with pytest.raises(ValueError, match="0 < capacity <= max_seq_len=64"):
        model.static_cache(1, 65)
    cache = model.static_cache(2, 4)
    with pytest.raises(ValueError, match="holds 4 tokens; 0 are cached and this call adds 5"):
        model(torch.zeros(2, 5, dtype=torch.long), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="built for 2 rows, this call has 3"):
        model(torch.zeros(3, 2, dtype=torch.long), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="doc_ids cannot be combined with a KV cache"):
        model(torch.zeros(2, 2, dtype=torch.long), doc_ids=torch.zeros(2, 2, dtype=torch.long), past_key_values=cache)


def test_only_growing_caches_are_routed_around_the_compiled_graph():
    assert uses_kv_cache({"use_cache": True}) and uses_kv_cache({"past_key_values": KVCache()})
    static = StaticKVCache(1, 1, 1, 2, 4, torch.float32, "cpu")
    assert not uses_kv_cache({"past_key_values": static, "use_cache": True}) and not uses_kv_cache({})
    from transformers import DynamicCache

    assert uses_kv_cache({"past_key_values": DynamicCache()})
    assert not uses_kv_cache({"past_key_values": build("hf").static_cache(1, 8)})


# ---- the sampling paths: a static cache gives the same tokens and calls -------------------------------------------
def families(kind: str):
    """(name, module, sampler, prompt length, generation length) of every cached sampling path."""
    prefix = ThresholdSampler(threshold=0.9, temperature=0.0, block_length=4, kv_cache="prefix")
    yield "ar", AR(build(kind, layers=1), TOKENIZER), ARSampler(temperature=1.0), 4, 12
    for shift in (False, True):
        yield (f"bd3lm shift={shift}", BD3LM(build(kind, attention="bidirectional", layers=1), TOKENIZER, LinearSchedule(),
                                            block_size=4, shift_logits=shift), AncestralSampler(steps=4), 6, 14)
        yield (f"mdlm prefix cache shift={shift}", MDLM(build(kind, attention="bidirectional", layers=1), TOKENIZER,
                                                       LinearSchedule(), shift_logits=shift), prefix, 6, 12)
    dual = ThresholdSampler(threshold=0.9, temperature=0.0, block_length=4, kv_cache="dual")  # always a static cache
    yield "mdlm dual cache", MDLM(build(kind, attention="bidirectional", layers=1), TOKENIZER, LinearSchedule()), dual, 6, 12


@pytest.mark.parametrize("kind", ["native", "hf"])
def test_every_cached_sampling_path_gives_the_same_tokens_with_a_static_cache(kind):
    prompt = torch.randint(0, 9, (3, 6), generator=torch.Generator().manual_seed(1))
    for name, module, sampler, P, n in families(kind):
        module.eval()
        runs = {}
        for static in (False, True):
            module.static_kv_cache = static
            runs[static] = module.generate(prompt[:, :P], n, sampler=sampler, generator=torch.Generator().manual_seed(0))
        assert torch.equal(runs[True].tokens, runs[False].tokens), name
        assert runs[True].num_network_calls == runs[False].num_network_calls, name
        assert module._static_cache[0][:2] == (3, 32), name  # the static run built one: 3 rows, 17-21 -> 32 slots


def test_static_kv_cache_true_without_one_names_the_fix():
    class Plain(torch.nn.Module):
        vocab_size, max_seq_len = VOCAB, 64

        def forward(self, input_ids, **kwargs):
            return torch.zeros(*input_ids.shape, VOCAB)

    module = AR(Plain(), TOKENIZER)
    module.static_kv_cache = True
    with pytest.raises(ValueError, match="static_kv_cache=true needs a backbone with a static KV cache"):
        module.generate(torch.zeros(1, 2, dtype=torch.long), 3)
    module.static_kv_cache = None  # null: a growing cache, no error
    assert module.new_kv_cache(1, 8) is None


# ---- compiled decoding ----------------------------------------------------------------------------------------
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_ar_decoding_takes_the_static_cache_two_graphs_the_same_tokens(fresh_dynamo):
    """A compiled backbone decodes through a static cache by default: one graph for the prompt, one for every
    decoding step (the growing cache made 19 graphs for 5 tokens), reused by the next call of the same shape."""
    module = AR(build("native", layers=1), TOKENIZER).eval()
    prompt = torch.randint(0, 9, (3, 5), generator=torch.Generator().manual_seed(1))
    eager = module.generate(prompt, 16, generator=torch.Generator().manual_seed(0))
    compile_backbone(module.backbone, "default")
    compiled = module.generate(prompt, 16, generator=torch.Generator().manual_seed(0))
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    assert torch.equal(compiled.tokens, eager.tokens) and compiled.num_network_calls == eager.num_network_calls
    again = module.generate(prompt, 12, generator=torch.Generator().manual_seed(0))  # the same capacity (32): reused
    assert counters["stats"]["unique_graphs"] == 2
    assert torch.equal(again.tokens, eager.tokens[:, : 5 + 12])


@pytest.mark.slow  # ~1-2 min on 2 CPU cores: compiles each family's graphs on both backbones
@pytest.mark.parametrize("kind", ["native", "hf"])
def test_every_cached_sampling_path_compiles_to_a_few_graphs_with_the_same_tokens(kind, fresh_dynamo):
    prompt = torch.randint(0, 9, (3, 6), generator=torch.Generator().manual_seed(1))
    for name, module, sampler, P, n in families(kind):
        module.eval()
        eager = module.generate(prompt[:, :P], n, sampler=sampler, generator=torch.Generator().manual_seed(0))
        torch._dynamo.reset()
        counters.clear()
        compile_backbone(module.backbone, "default")
        compiled = module.generate(prompt[:, :P], n, sampler=sampler, generator=torch.Generator().manual_seed(0))
        assert torch.equal(compiled.tokens, eager.tokens), name
        assert compiled.num_network_calls == eager.num_network_calls, name
        assert 1 <= counters["stats"]["unique_graphs"] <= 4 and not counters["graph_break"], (name, dict(counters))


@pytest.mark.slow  # ~30 s: two compilations of a tiny model
def test_the_ar_decoding_benchmark_decodes_hf_generates_tokens_on_every_row(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ar.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "ar_decoding.py"), "--tiny", "--batches", "1,2",
                           "--prompt", "6", "--gen", "8", "--repeats", "1", "--out", str(out)], cwd=root,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 10 and all(r["same_tokens"] for r in rows.values()), rows
    assert rows["hf generate/B2"]["x_hf_generate"] == 1.0


@pytest.mark.gpu  # CUDA graphs: the static cache's in-place updates replayed by reduce-overhead
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reduce_overhead_decodes_the_eager_tokens_on_cuda(fresh_dynamo):
    prompt = torch.randint(0, 9, (3, 6), generator=torch.Generator().manual_seed(1)).cuda()
    picked = [f for f in families("native") if f[0] in ("ar", "bd3lm shift=True", "mdlm dual cache")]
    for name, module, sampler, P, n in picked:
        module.cuda().eval()
        eager = module.generate(prompt[:, :P], n, sampler=sampler, generator=torch.Generator("cuda").manual_seed(0))
        compile_backbone(module.backbone, "reduce-overhead")
        for _ in range(2):  # the second call replays the recorded graphs
            torch.compiler.cudagraph_mark_step_begin()
            out = module.generate(prompt[:, :P], n, sampler=sampler, generator=torch.Generator("cuda").manual_seed(0))
            assert torch.equal(out.tokens, eager.tokens), name
            assert out.num_network_calls == eager.num_network_calls, name
