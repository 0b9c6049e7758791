"""HFMaskedLM: a tiny BertForMaskedLM saved to a temporary folder and loaded from there; never the network."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, BertForMaskedLM  # noqa: E402

from dlm.methods.diffusionbert import DiffusionBERT  # noqa: E402
from dlm.models import HFMaskedLM  # noqa: E402
from dlm.sampling import D3PMSampler  # noqa: E402
from dlm.spindle import SpindleSchedule  # noqa: E402

TINY = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert_tiny")
    BertForMaskedLM(BertConfig(**TINY)).save_pretrained(path)
    return str(path)


def test_loads_a_local_checkpoint_and_matches_the_hf_model(checkpoint):
    model = HFMaskedLM(pretrained=checkpoint).eval()
    reference = BertForMaskedLM.from_pretrained(checkpoint).eval()
    x = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(input_ids=x).logits.float())
    assert (model.vocab_size, model.max_seq_len, model.time_conditioning, model.attention) == (40, 32, False, "bidirectional")


def test_vocab_grows_with_mean_rows_and_keeps_the_old_ones(checkpoint):
    small = HFMaskedLM(pretrained=checkpoint)
    grown = HFMaskedLM(pretrained=checkpoint, vocab_size=45)
    assert grown.vocab_size == 45
    old = small.get_input_embeddings().weight
    new = grown.get_input_embeddings().weight
    torch.testing.assert_close(new[:40], old)
    torch.testing.assert_close(new[40:], old.mean(0).expand(5, -1))
    assert grown(torch.tensor([[44, 1, 2]])).shape == (1, 3, 45)
    assert HFMaskedLM(pretrained=checkpoint, vocab_size=10).vocab_size == 40  # smaller: kept


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_document_mask_equals_running_each_document_alone(checkpoint, impl):
    model = HFMaskedLM(pretrained=checkpoint, attn_implementation=impl).eval()
    x = torch.randint(0, 40, (1, 10))
    doc = torch.tensor([[0] * 4 + [1] * 6])
    with torch.no_grad():
        packed = model(x, doc_ids=doc)
        torch.testing.assert_close(packed[0, :4], model(x[:, :4])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[0, 4:], model(x[:, 4:])[0], atol=1e-5, rtol=1e-5)


def test_from_config_and_clear_errors():
    model = HFMaskedLM(config={"model_type": "bert", **TINY})
    assert model(torch.zeros(1, 5, dtype=torch.long)).dtype == torch.float32
    with pytest.raises(ValueError, match="model_type"):
        HFMaskedLM(config=dict(TINY))
    with pytest.raises(ValueError, match="needs a model"):
        HFMaskedLM()
    with pytest.raises(ValueError, match="bidirectional encoder"):
        model(torch.zeros(1, 5, dtype=torch.long), attention="causal")
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    model.supports_doc_mask = False
    with pytest.raises(ValueError, match="packing=false"):
        model(torch.zeros(1, 5, dtype=torch.long), doc_ids=torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("mode", ["none", "token"])
def test_diffusionbert_initialised_from_the_masked_lm_trains_and_samples(checkpoint, mode):
    tok = SimpleNamespace(vocab_size=40, pad_token_id=0, eos_token_id=1, mask_token_id=39)
    model = DiffusionBERT(HFMaskedLM(pretrained=checkpoint), tok, SpindleSchedule(), num_steps=16,
                          time_conditioning=mode, sampler=D3PMSampler(steps=4, top_k=5))
    model.set_token_counts(torch.arange(40))
    ids = torch.randint(2, 39, (4, 8))
    out = model.loss({"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)})
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    gen = model.generate(ids[:2, :3], length=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gen.tokens[:, :3], ids[:2, :3]) and not (gen.tokens == 39).any()


def test_config_files_build_the_wrapper():
    from conftest import compose

    from dlm.models.lora import instantiate_backbone  # the model config without train.yaml's model.lora

    cfg = compose(["model=bert_tiny", "paths.run_dir=/tmp/x", "paths.cache_dir=/tmp/x"])
    model = instantiate_backbone(cfg.model, vocab_size=15)
    assert isinstance(model, HFMaskedLM) and model.vocab_size == 512
    base = compose(["model=bert_base", "paths.run_dir=/tmp/x", "paths.cache_dir=/tmp/x"])
    assert base.model.pretrained == "bert-base-uncased" and base.model._target_.endswith("HFMaskedLM")
