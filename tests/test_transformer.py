import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dlm.models import Transformer, count_parameters

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
V = 64


def make(**kw):
    torch.manual_seed(0)
    kw = {"n_layers": 2, "d_model": 64, "n_heads": 4, "max_seq_len": 64, **kw}
    return Transformer(V, **kw).eval()


def ids(B=2, T=16, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def changed_positions(model, x, pos, **kw):
    """Which positions' logits change when token `pos` is altered."""
    y = x.clone()
    y[:, pos] = (y[:, pos] + 1) % V
    with torch.no_grad():
        a, b = model(x, **kw), model(y, **kw)
    return (a - b).abs().amax(dim=(0, 2)) > 1e-6


def test_output_shape_and_dtype():
    out = make()(ids())
    assert out.shape == (2, 16, V) and out.dtype == torch.float32


def test_gqa_and_untied():
    m = make(n_kv_heads=2, tie_embeddings=False)
    assert m.lm_head.weight is not m.tok_emb.weight
    tied = make()
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert m(ids()).shape == (2, 16, V)


def test_causal_does_not_look_ahead():
    ch = changed_positions(make(attention="causal"), ids(), 10)
    assert not ch[:10].any() and ch[10:].all()


def test_bidirectional_looks_ahead():
    assert changed_positions(make(), ids(), 10).all()


def test_block_causal():
    m = make(attention="block_causal", block_size=4)
    ch = changed_positions(m, ids(), 9)  # block 2 = positions 8..11
    assert not ch[:8].any() and ch[8:].all()


def test_doc_masking_isolates_documents():
    doc_ids = torch.tensor([[0] * 6 + [1] * 10] * 2)
    ch = changed_positions(make(), ids(), 12, doc_ids=doc_ids)
    assert not ch[:6].any() and ch[6:].all()


@pytest.mark.parametrize(
    "pattern,lengths",
    [
        ("bidirectional", (5, 11)),
        ("causal", (7, 9)),
        ("block_causal", (8, 4, 4)),  # block docs aligned to 4
    ],
)
def test_packed_equals_separate(pattern, lengths):
    # Positions restart at every document start, so packing changes nothing.
    m = make(attention=pattern, block_size=4)
    x = ids(B=1, T=sum(lengths))
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        packed = m(x, doc_ids=doc_ids)
        separate = torch.cat([m(part) for part in x.split(list(lengths), dim=1)], dim=1)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)


def test_attention_override_matches_causal_model():
    bi = make()
    causal = make(attention="causal")
    causal.load_state_dict(bi.state_dict())
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(bi(x, attention="causal"), causal(x))
        assert not torch.allclose(bi(x), causal(x))


def test_time_conditioning():
    m = make(time_conditioning=True)
    x = ids()
    with torch.no_grad():
        a = m(x, time=torch.tensor([0.1, 0.1]))
        b = m(x, time=torch.tensor([0.9, 0.9]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="time"):
        m(x)
    plain = make()
    torch.testing.assert_close(plain(x, time=torch.rand(2)), plain(x))  # ignored without conditioning


def test_error_messages():
    m = make()
    with pytest.raises(ValueError, match="raise model.max_seq_len or lower data.seq_len"):
        m(ids(T=65))
    with pytest.raises(ValueError, match=r"\[0, 64\).*vocab_size"):
        m(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        m(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="valid patterns are causal, bidirectional, block_causal"):
        m(ids(), attention="sliding")
    with pytest.raises(ValueError, match="valid patterns"):
        make(attention="sliding")
    with pytest.raises(ValueError, match="block_size"):
        make(attention="block_causal")
    with pytest.raises(ValueError, match="must divide d_model"):
        make(d_model=66, n_heads=4)
    with pytest.raises(ValueError, match="must divide n_heads"):
        make(n_kv_heads=3)


def test_init_scales_residual_projections():
    m = make(n_layers=8, d_model=256, init_std=0.02)
    assert abs(m.blocks[0].attn.wq.weight.std().item() - 0.02) < 2e-3
    assert abs(m.blocks[0].mlp.w2.weight.std().item() - 0.02 / 4) < 1e-3


def test_count_parameters():
    m = make(d_ff=128)
    per_layer = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert count_parameters(m, exclude_embeddings=True) == 2 * per_layer + 64
    assert count_parameters(m) == 2 * per_layer + 64 + V * 64  # tied head counted once
    untied = make(d_ff=128, tie_embeddings=False)
    assert count_parameters(untied) == count_parameters(m) + V * 64
    assert count_parameters(untied, exclude_embeddings=True) == 2 * per_layer + 64


def test_overfits_one_batch():
    torch.manual_seed(0)
    m = Transformer(V, n_layers=2, d_model=64, n_heads=4, attention="causal", max_seq_len=32)
    x = ids(B=4, T=32)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = F.cross_entropy(m(x[:, :-1]).reshape(-1, V), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_hydra_configs_instantiate(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    if name == "tiny":
        m = instantiate(cfg, vocab_size=V)
        assert isinstance(m, Transformer) and m.max_seq_len == 256
        assert m(ids(T=32)).shape == (2, 32, V)
    else:
        with torch.device("meta"):
            m = instantiate(cfg, vocab_size=V)
        assert isinstance(m, Transformer) and m.max_seq_len == cfg.max_seq_len
    # The first-line comment states the non-embedding size; keep it honest.
    millions = float(CONF.joinpath(f"{name}.yaml").read_text().split("~")[1].split("M")[0])
    assert abs(count_parameters(m, exclude_embeddings=True) / 1e6 - millions) < 0.06
