"""The autoregressive baseline: exact NLL, cached == uncached decoding, infill refusal, export round trip."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dlm.methods.ar import AR, InfillNotSupportedError
from dlm.models import HFCausalLM, Transformer
from dlm.sampling import ARSampler

TOKENIZER = SimpleNamespace(vocab_size=9, pad_token_id=6, eos_token_id=7, mask_token_id=8)
EOS, MASK = 7, 8
QWEN3 = dict(model_type="qwen3", num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, intermediate_size=64, vocab_size=9, max_position_embeddings=64)


def native(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(vocab_size=9, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=32, **kw)


def make_ar(backbone=None, **kw) -> AR:
    return AR(backbone or native(), TOKENIZER, sampler=ARSampler(temperature=1.0), **kw)


def batch(B=3, T=10, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 7, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -3:] = False
    return {"input_ids": ids, "loss_mask": mask}


@pytest.mark.parametrize("kind", ["native", "hf"])
def test_exact_nll_equals_a_manual_chain_rule(kind):
    backbone = native() if kind == "native" else HFCausalLM(config=QWEN3, attention="bidirectional")
    model = make_ar(backbone).eval()
    b = batch()
    nll = model.nll_bound(b)
    x = b["input_ids"]
    manual = torch.zeros_like(nll)
    for i in range(x.shape[1]):  # -log p(x_i | EOS, x_<i), one prefix at a time
        prefix = torch.cat([torch.full((x.shape[0], 1), EOS), x[:, :i]], dim=1)
        logits = backbone(prefix, attention="causal")[:, -1].float()
        logits[:, MASK] = float("-inf")
        manual[:, i] = -logits.log_softmax(-1).gather(1, x[:, i : i + 1]).squeeze(1)
    manual = manual * b["loss_mask"]
    torch.testing.assert_close(nll, manual, atol=1e-5, rtol=1e-5)
    assert torch.all(nll[0, -3:] == 0)
    loss = model.loss(b)["loss"]
    torch.testing.assert_close(loss, nll.sum() / b["loss_mask"].sum())


def test_packed_rows_score_each_document_from_the_start_token():
    model = make_ar().eval()
    a, c = torch.tensor([[1, 2, 3, EOS]]), torch.tensor([[4, 0, EOS]])
    packed = {"input_ids": torch.cat([a, c], 1), "loss_mask": torch.ones(1, 7, dtype=torch.bool),
              "doc_ids": torch.tensor([[0, 0, 0, 0, 1, 1, 1]])}
    alone = [model.nll_bound({"input_ids": d, "loss_mask": torch.ones_like(d, dtype=torch.bool)}) for d in (a, c)]
    torch.testing.assert_close(model.nll_bound(packed), torch.cat(alone, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["native", "hf"])
@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.8, top_k=4, top_p=0.9),
                                      dict(temperature=0.0)])
def test_cached_generation_equals_recomputing_the_prefix(kind, settings):
    backbone = native() if kind == "native" else HFCausalLM(config=QWEN3)
    model = make_ar(backbone)
    prompt = torch.tensor([[1, 2], [3, 4]])
    out = {}
    for cache in ("prefix", "none"):
        g = torch.Generator().manual_seed(3)
        out[cache == "prefix"] = model.generate(prompt, 12, sampler=ARSampler(**settings, kv_cache=cache), generator=g)
    assert torch.equal(out[True].tokens, out[False].tokens)
    assert out[True].tokens.shape == (2, 14) and torch.equal(out[True].tokens[:, :2], prompt)
    assert not (out[True].tokens == MASK).any()


def test_generation_stops_at_eos_and_fills_with_eos():
    model = make_ar()
    with torch.no_grad():  # make EOS overwhelmingly likely after the first generated token
        model.backbone.lm_head.weight[EOS] *= 0
    g = torch.Generator().manual_seed(0)
    gen = model.generate(None, 8, num_samples=4, generator=g)
    tokens = gen.tokens
    assert tokens.shape == (4, 8)
    for row in tokens.tolist():
        if EOS in row:
            assert all(t == EOS for t in row[row.index(EOS):])
    assert gen.num_network_calls <= 8


def test_infill_names_the_alternatives():
    model = make_ar()
    with pytest.raises(InfillNotSupportedError, match="method=mdlm.*method=bd3lm"):
        model.infill(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool))


def test_native_export_round_trip(tmp_path):
    model = make_ar().eval()
    path = model.export_hf(tmp_path / "export")
    loaded = Transformer.from_pretrained(path).eval()
    assert loaded.attention == "causal"
    x = torch.randint(0, 7, (2, 9))
    torch.testing.assert_close(loaded(x), model.backbone(x, attention="causal"))


def test_hf_export_round_trip_is_a_plain_causal_lm(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_ar(HFCausalLM(config=QWEN3)).eval()
    path = model.export_hf(tmp_path / "export")
    assert model.backbone.hf_model.config.is_causal is False  # the live wrapper keeps its conversion
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()  # a stock HF causal LM, no dlm code involved
    x = torch.randint(0, 7, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits.float(), model.backbone(x, attention="causal"), atol=1e-5,
                                   rtol=1e-5)
