"""HFCausalLM: Hugging Face causal LMs converted to diffusion backbones. Tiny models only, never the network."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from dlm.models.hf import (  # noqa: E402
    GPT2_SMALL,
    QWEN3_0P6B,
    QWEN3_30B_A3B,
    HFCausalLM,
    count_active_parameters,
)
from dlm.models.transformer import count_parameters  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
VOCAB = 256
T = 16

TINY = {
    "qwen3": dict(
        model_type="qwen3",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    ),
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB),
}
ARCHS = list(TINY)
IMPLS = ["sdpa", "eager"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Each tiny architecture, randomly initialised and saved to a local folder (what `pretrained` points at)."""
    paths = {}
    for i, (arch, fields) in enumerate(TINY.items()):
        torch.manual_seed(i)
        fields = dict(fields)
        cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
        model = AutoModelForCausalLM.from_config(cfg)
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path)
        paths[arch] = str(path)
    return paths


def load(path: str, impl: str, **kwargs) -> HFCausalLM:
    return HFCausalLM(pretrained=path, attn_implementation=impl, **kwargs).eval()


def tokens(batch: int = 2, length: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def change_token(x: torch.Tensor, pos: int) -> torch.Tensor:
    y = x.clone()
    y[:, pos] = (y[:, pos] + 1) % VOCAB
    return y


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_bidirectional_sees_the_future(checkpoints, arch, impl):
    model = load(checkpoints[arch], impl)
    assert model.attention == "bidirectional" and model.time_conditioning is False
    assert model.vocab_size == VOCAB and model.max_seq_len == 128
    assert all(
        not m.is_causal for m in model.hf_model.modules() if isinstance(getattr(m, "is_causal", None), bool)
    )
    x = tokens()
    with torch.no_grad():
        a, b = model(x), model(change_token(x, T - 1))
        ca, cb = model(x, attention="causal"), model(change_token(x, T - 1), attention="causal")
    assert a.dtype == torch.float32 and a.shape == (2, T, VOCAB)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4  # the first token sees the last one
    torch.testing.assert_close(ca[:, :-1], cb[:, :-1], atol=1e-5, rtol=0)  # causal: it does not


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_causal_pattern_is_the_original_ar_model(checkpoints, arch, impl):
    model = load(checkpoints[arch], impl)
    original = AutoModelForCausalLM.from_pretrained(checkpoints[arch], attn_implementation=impl).eval()
    x = tokens(seed=1)
    with torch.no_grad():
        ours, theirs = model(x, attention="causal"), original(x).logits
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_document_masking(checkpoints, arch, impl):
    model = load(checkpoints[arch], impl)
    split = 6
    x = tokens(seed=2)
    doc_ids = torch.tensor([[0] * split + [1] * (T - split), [3] * (T - split) + [4] * split])
    with torch.no_grad():
        for pattern in ("bidirectional", "causal"):
            packed = model(x, doc_ids=doc_ids, attention=pattern)
            # Changing the second document of row 0 leaves the first document's logits unchanged.
            other = model(change_token(x, T - 1), doc_ids=doc_ids, attention=pattern)
            torch.testing.assert_close(packed[0, :split], other[0, :split], atol=1e-5, rtol=0)
            # Packed == each document on its own (positions restart at every document).
            first = model(x[:1, :split], attention=pattern)
            second = model(x[:1, split:], attention=pattern)
            torch.testing.assert_close(packed[:1, :split], first, atol=1e-5, rtol=0)
            torch.testing.assert_close(packed[:1, split:], second, atol=1e-5, rtol=0)
            if pattern == "bidirectional":  # and inside a document attention is still bidirectional
                assert (packed[0, 0] - other[0, 0]).abs().max() < 1e-5
                assert (packed[0, split] - other[0, split]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_mask_free_bidirectional_equals_explicit_mask(checkpoints, arch):
    model = load(checkpoints[arch], "sdpa")
    assert model.mask_free_bidirectional  # transformers' own mask builders: no mask tensor needed
    assert not load(checkpoints[arch], "eager").mask_free_bidirectional
    x = tokens(seed=7)
    with torch.no_grad():
        fast = model(x)
        model.mask_free_bidirectional = False
        explicit = model(x)
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_block_causal(checkpoints, impl):
    model = load(checkpoints["qwen3"], impl, attention="block_causal", block_size=4)
    x = tokens(seed=3)
    with torch.no_grad():
        a = model(x)
        later_block = model(change_token(x, 4))  # first token of block 1
        same_block = model(change_token(x, 3))  # last token of block 0
    torch.testing.assert_close(a[:, :4], later_block[:, :4], atol=1e-5, rtol=0)
    assert (a[:, 0] - same_block[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_vocab_resize_uses_mean_rows(checkpoints, arch):
    model = load(checkpoints[arch], "sdpa", vocab_size=VOCAB + 8)
    original = AutoModelForCausalLM.from_pretrained(checkpoints[arch])
    emb, old = model.hf_model.get_input_embeddings().weight, original.get_input_embeddings().weight
    assert model.vocab_size == VOCAB + 8 and emb.shape[0] == VOCAB + 8
    torch.testing.assert_close(emb[:VOCAB], old)
    torch.testing.assert_close(emb[VOCAB:], old.mean(0).expand(8, -1))
    out, old_out = model.hf_model.get_output_embeddings().weight, original.get_output_embeddings().weight
    assert out.shape[0] == VOCAB + 8
    torch.testing.assert_close(out[VOCAB:], old_out.mean(0).expand(8, -1))
    with torch.no_grad():
        logits = model(torch.tensor([[VOCAB + 7, 1, 2, 3]]))
    assert logits.shape == (1, 4, VOCAB + 8)
    # A smaller vocab_size (the tokenizer uses a subset) keeps the embedding as it is.
    assert load(checkpoints[arch], "sdpa", vocab_size=VOCAB // 2).vocab_size == VOCAB


def test_config_overrides_the_pretrained_geometry(checkpoints):
    model = load(checkpoints["qwen3"], "sdpa", config={"num_hidden_layers": 1})
    assert model.hf_model.config.num_hidden_layers == 1 and len(model.hf_model.model.layers) == 1
    with pytest.raises(ValueError, match="model_type"):
        load(checkpoints["qwen3"], "sdpa", config={"model_type": "llama"})


def test_architecture_without_weights(checkpoints):
    """load_weights=false: the checkpoint's geometry with config overrides over it, random weights (for a folder,
    and offline for a known hub id such as moe30b's)."""
    source = AutoModelForCausalLM.from_pretrained(checkpoints["qwen3"])
    model = load(checkpoints["qwen3"], "sdpa", config={"num_hidden_layers": 1}, load_weights=False)
    assert model.hf_model.config.num_hidden_layers == 1 and model.hf_model.config.hidden_size == 64
    emb, src = model.hf_model.get_input_embeddings().weight, source.get_input_embeddings().weight
    assert emb.shape == src.shape and not torch.equal(emb, src)
    small = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
             "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
             "intermediate_size": 64, "vocab_size": VOCAB}
    moe = HFCausalLM(pretrained="Qwen/Qwen3-30B-A3B-Base", load_weights=False, config=small)
    cfg = moe.hf_model.config
    assert cfg.model_type == "qwen3_moe" and cfg.num_experts == 4 and cfg.max_position_embeddings == 32768
    assert moe(tokens(seed=5)).shape == (2, T, VOCAB)


def test_gradient_checkpointing_trains(checkpoints):
    model = HFCausalLM(pretrained=checkpoints["qwen3_moe"], gradient_checkpointing=True).train()
    hf = model.hf_model
    assert getattr(hf, "is_activation_checkpointing", None) or hf.is_gradient_checkpointing
    model(tokens(seed=4)).logsumexp(-1).mean().backward()
    assert model.hf_model.get_input_embeddings().weight.grad is not None


def test_qwen3_30b_a3b_on_meta():
    with torch.device("meta"):
        model = HFCausalLM(config=QWEN3_30B_A3B, torch_dtype="bfloat16")
    assert next(model.parameters()).is_meta
    total, active = count_parameters(model), count_active_parameters(model)
    assert abs(total / 30.5e9 - 1) < 0.02, total
    assert abs(active / 3.3e9 - 1) < 0.05, active
    assert model.max_seq_len == 32768 and model.vocab_size == 151936
    with torch.no_grad():  # the forward traces on meta too (dry runs)
        logits = model(torch.zeros(1, 8, dtype=torch.long, device="meta"))
    assert logits.shape == (1, 8, 151936)


def test_active_parameters_of_a_dense_model_is_the_total():
    model = HFCausalLM(config=TINY["llama"])
    assert count_active_parameters(model) == count_parameters(model)
    moe = HFCausalLM(config=TINY["qwen3_moe"])
    experts = sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n)
    assert count_active_parameters(moe) == count_parameters(moe) - experts + experts * 2 // 8


@pytest.mark.parametrize("name", ["moe_tiny", "llama_tiny"])
def test_tiny_model_configs_instantiate_and_run(name):
    import hydra
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    model = hydra.utils.instantiate(cfg, vocab_size=64)  # as the training CLI does
    assert isinstance(model, HFCausalLM)
    assert model.vocab_size == 512  # a smaller tokenizer keeps the embedding
    with torch.no_grad():
        logits = model(torch.randint(0, 64, (2, 12)), doc_ids=torch.tensor([[0] * 5 + [1] * 7] * 2))
    assert logits.shape == (2, 12, 512)
    assert model.hf_model.config.is_causal is False


@pytest.mark.parametrize(
    ("name", "geometry", "expected"),
    [("moe30b", QWEN3_30B_A3B, 30.5e9), ("qwen3_0p6b", QWEN3_0P6B, 0.596e9), ("gpt2", GPT2_SMALL, 124.4e6)],
)
def test_hub_model_configs_build_on_meta(name, geometry, expected):
    import hydra
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    cfg.pop("defaults", None)  # Hydra's defaults list, not a model argument (moe30b chooses its data)
    assert cfg._target_ == "dlm.models.hf.HFCausalLM"
    assert isinstance(cfg.pretrained, str) and "/" in cfg.pretrained and cfg.config is None
    # No network: the checkpoint's geometry instead of the checkpoint. (`config` cannot be a keyword of
    # hydra.utils.instantiate, whose first parameter has that name, so it is set on the node.)
    cfg.pretrained, cfg.config = None, geometry
    with torch.device("meta"):
        model = hydra.utils.instantiate(cfg, vocab_size=1000)
    assert abs(count_parameters(model) / expected - 1) < 0.02, count_parameters(model)
    assert model.vocab_size == geometry["vocab_size"]


def test_clear_errors(checkpoints):
    with pytest.raises(ValueError, match=r"model\.pretrained.*model\.config"):
        HFCausalLM()
    model = load(checkpoints["llama"], "sdpa")
    with pytest.raises(ValueError, match="sequence length 129 exceeds the model's max_seq_len=128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(torch.full((1, 4), VOCAB))
    with pytest.raises(ValueError, match="unknown attention pattern"):
        model(torch.zeros(1, 4, dtype=torch.long), attention="sideways")
    with pytest.raises(ValueError, match="block_size"):
        HFCausalLM(config=TINY["llama"], attention="block_causal")
    with pytest.raises(ValueError, match="cannot take a custom attention mask"):
        HFCausalLM(config=TINY["llama"], attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="model_type"):
        HFCausalLM(config={"hidden_size": 64})
    assert load(checkpoints["llama"], "sdpa", max_seq_len=64).max_seq_len == 64


# ---- GPU (run with `pytest -m gpu`): the same conversion on CUDA kernels, and a bf16 training step. ----


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "gpt2"])
def test_cuda_patterns(checkpoints, arch, impl):
    model = load(checkpoints[arch], impl).cuda()
    original = AutoModelForCausalLM.from_pretrained(checkpoints[arch], attn_implementation=impl).cuda().eval()
    x = tokens(seed=5).cuda()
    split = 6
    doc_ids = torch.tensor([[0] * split + [1] * (T - split)] * 2, device="cuda")
    with torch.no_grad():
        a, b = model(x), model(change_token(x, T - 1))
        assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4
        torch.testing.assert_close(
            model(x, attention="causal"), original(x).logits.float(), atol=1e-4, rtol=0
        )
        packed = model(x, doc_ids=doc_ids)
        torch.testing.assert_close(packed[:, :split], model(x[:, :split]), atol=1e-4, rtol=0)
        torch.testing.assert_close(packed[:, split:], model(x[:, split:]), atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_bf16_training_step(checkpoints, impl):
    model = HFCausalLM(
        pretrained=checkpoints["qwen3_moe"],
        attn_implementation=impl,
        torch_dtype="bfloat16",
        gradient_checkpointing=True,
        vocab_size=VOCAB + 1,
    ).cuda()
    model.train()
    x = tokens(seed=6).cuda()
    doc_ids = torch.tensor([[0] * 5 + [1] * (T - 5)] * 2, device="cuda")
    logits = model(x, doc_ids=doc_ids)
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, T, VOCAB + 1)  # consumers upcast
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x.flatten()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_bf16_logits_stay_bf16_and_the_masked_diffusion_loss_is_unchanged(checkpoints):
    """No full-vocabulary float32 copy in the backbone: the loss upcasts the masked rows it scores, and since
    bf16 -> float32 is exact the loss and gradients equal those of an upcast-everything backbone."""
    from dlm.methods.masked_terms import masked_token_nll

    model = HFCausalLM(pretrained=checkpoints["qwen3"], torch_dtype="bfloat16").train()
    x0 = tokens(seed=6)
    xt = x0.clone()
    masked = torch.rand(x0.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    xt[masked] = VOCAB - 1
    logits = model(xt)
    assert logits.dtype == torch.bfloat16
    losses, grads = [], []
    for upcast in (False, True):
        model.zero_grad()
        out = model(xt)
        nll, _ = masked_token_nll(out.float() if upcast else out, x0, masked, VOCAB - 1)
        nll.sum().backward()
        losses.append(nll.detach())
        grads.append(model.hf_model.get_input_embeddings().weight.grad.clone())
    assert losses[0].dtype == torch.float32
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
