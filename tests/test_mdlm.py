"""Masked diffusion (MDLM): the NELBO is a bound that holds and tightens, SUBS, sampling and infilling."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dlm.methods.mdlm import MDLM
from dlm.models import Transformer
from dlm.optim import param_groups
from dlm.sampling import AncestralSampler, LowConfidenceSampler
from dlm.schedules import CosineSchedule, LinearSchedule

TOKENIZER = SimpleNamespace(vocab_size=7, pad_token_id=4, eos_token_id=5, mask_token_id=6)
MASK = TOKENIZER.mask_token_id


def make_mdlm(schedule=None, time_conditioning=False, **kw) -> MDLM:
    torch.manual_seed(0)
    backbone = Transformer(vocab_size=7, n_layers=2, d_model=64, n_heads=4, max_seq_len=16,
                           time_conditioning=time_conditioning)
    return MDLM(backbone, TOKENIZER, schedule or LinearSchedule(), sampler=LowConfidenceSampler(steps=8), **kw)


# Four equally likely sequences of six tokens: the data's entropy is log(4)/6 nats per token.
SEQUENCES = torch.tensor([[0, 1, 2, 3, 0, 1], [1, 1, 0, 2, 3, 3], [2, 0, 3, 1, 2, 0], [3, 2, 1, 0, 1, 2]])
TRUE_ENTROPY = math.log(4) / 6


def toy_batch(n: int, generator: torch.Generator) -> dict:
    ids = SEQUENCES[torch.randint(0, 4, (n,), generator=generator)]
    return {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}


def bound_estimate(model: MDLM, n: int = 4096) -> tuple[float, float]:
    """Mean per-token NELBO over n sequences and its standard error."""
    g = torch.Generator().manual_seed(123)
    batch = toy_batch(n, g)
    with torch.no_grad():
        per_seq = model.nll_bound(batch, generator=g).sum(1) / batch["input_ids"].shape[1]
    return per_seq.mean().item(), per_seq.std().item() / math.sqrt(n)


@pytest.mark.parametrize(
    "schedule",
    [LinearSchedule(), pytest.param(CosineSchedule(), marks=pytest.mark.slow)],
    ids=["linear", "cosine"],
)
def test_nelbo_never_below_the_data_entropy_and_falls_toward_it(schedule):
    model = make_mdlm(schedule)
    before, se_before = bound_estimate(model)
    assert before > TRUE_ENTROPY - 3 * se_before
    steps = 800
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = model.loss(toy_batch(64, g), generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    after, se_after = bound_estimate(model)
    assert after > TRUE_ENTROPY - 3 * se_after, f"bound {after:.4f} below the entropy {TRUE_ENTROPY:.4f}"
    assert after < before - 0.5
    assert after < TRUE_ENTROPY + 0.1, f"bound {after:.4f} did not approach the entropy {TRUE_ENTROPY:.4f}"


def test_subs_never_predicts_mask_and_copies_clean_tokens():
    model = make_mdlm()
    x = torch.tensor([[0, MASK, 2, MASK, 5, MASK]])
    logp = model.denoise(x)
    assert torch.all(logp[..., MASK] == float("-inf"))
    clean = x != MASK
    assert torch.all(logp[clean].argmax(-1) == x[clean]) and torch.allclose(logp[clean].exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(logp[~clean].exp().sum(-1), torch.ones(3))


def test_positions_outside_the_loss_mask_are_never_masked_or_scored():
    model = make_mdlm()
    ids = SEQUENCES.repeat(8, 1)
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[:, 4:] = False
    bound, masked, _ = model._diffusion_terms({"input_ids": ids, "loss_mask": loss_mask}, torch.Generator().manual_seed(0))
    assert not masked[:, 4:].any() and torch.all(bound[:, 4:] == 0)
    assert masked[:, :4].any()


def test_antithetic_times_cover_the_interval_evenly():
    model = make_mdlm(t_eps=1e-3)
    t = model.sample_time(8, torch.Generator().manual_seed(0)).sort().values
    gaps = t.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, (1 - 1e-3) / 8))
    assert t.min() >= 1e-3 and t.max() <= 1.0


@pytest.mark.parametrize("sampler", [AncestralSampler(steps=6), LowConfidenceSampler(steps=6, temperature=1.0)],
                         ids=["ancestral", "low_confidence"])
def test_generate_keeps_the_prompt_and_leaves_no_mask(sampler):
    model = make_mdlm()
    prompt = torch.tensor([[0, 1], [3, 2]])
    gen = model.generate(prompt, length=6, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert gen.tokens.shape == (2, 8)
    assert torch.equal(gen.tokens[:, :2], prompt)
    assert not (gen.tokens == MASK).any()
    assert 1 <= gen.num_network_calls <= 6


def test_infill_changes_only_the_holes():
    model = make_mdlm()
    tokens = SEQUENCES.clone()
    holes = torch.zeros_like(tokens, dtype=torch.bool)
    holes[:, 2] = holes[:, 4] = True
    gen = model.infill(tokens, holes, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gen.tokens[~holes], tokens[~holes])
    assert not (gen.tokens == MASK).any()


def test_time_conditioned_backbone_trains_and_samples():
    model = make_mdlm(time_conditioning=True)
    out = model.loss(toy_batch(8, torch.Generator().manual_seed(0)))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    gen = model.generate(None, length=6, num_samples=2, sampler=AncestralSampler(steps=4))
    assert not (gen.tokens == MASK).any()


def test_mask_token_outside_the_vocabulary_is_refused():
    backbone = Transformer(vocab_size=6, n_layers=1, d_model=32, n_heads=2, max_seq_len=8)
    with pytest.raises(ValueError, match="embedding only 6 rows"):
        MDLM(backbone, TOKENIZER, LinearSchedule())


def test_param_groups_split_by_role_without_decay_on_norms_and_embeddings():
    model = make_mdlm()
    groups = {g["name"]: g for g in param_groups(model.backbone, lr=1e-3, weight_decay=0.1,
                                                 lr_multipliers={"attention": 2.0})}
    assert {"attention", "mlp", "embedding", "norm"} <= set(groups)
    assert groups["attention"]["lr"] == pytest.approx(2e-3) and groups["mlp"]["lr"] == pytest.approx(1e-3)
    assert groups["norm"]["weight_decay"] == 0.0 and groups["embedding"]["weight_decay"] == 0.0
    assert groups["mlp"]["weight_decay"] == 0.1
    n_grouped = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_grouped == sum(p.numel() for p in model.backbone.parameters())
    with pytest.raises(ValueError, match="valid roles"):
        param_groups(model.backbone, lr=1e-3, weight_decay=0.0, lr_multipliers={"attn": 2.0})


def test_a_larger_embedding_than_the_tokenizer_never_yields_unknown_ids():
    """Pretrained embeddings often have spare rows past the tokenizer: they must never be sampled."""
    torch.manual_seed(0)
    backbone = Transformer(vocab_size=32, n_layers=1, d_model=32, n_heads=2, max_seq_len=16)
    with torch.no_grad():
        backbone.tok_emb.weight[7:] *= 50  # make the spare rows tempting
    model = MDLM(backbone, TOKENIZER, LinearSchedule(), sampler=AncestralSampler(steps=4))
    gen = model.generate(None, length=12, num_samples=8, generator=torch.Generator().manual_seed(0))
    assert int(gen.tokens.max()) < TOKENIZER.vocab_size
    logp = model.denoise(torch.full((1, 4), MASK))
    assert logp.shape[-1] == TOKENIZER.vocab_size


def test_subs_log_probs_is_the_subs_formula_and_leaves_the_logits_alone():
    from dlm.methods.masked_terms import subs_log_probs

    def plain_subs(logits, xt, mask_id):  # the formula, out of place
        logp = logits.float().clone()
        logp[..., mask_id] = float("-inf")
        logp = logp.log_softmax(-1)
        copied = torch.full_like(logp, float("-inf")).scatter_(-1, xt[..., None], 0.0)
        return torch.where((xt != mask_id)[..., None], copied, logp)

    g = torch.Generator().manual_seed(0)
    V, mask_id = 12, 11
    logits = torch.randn(2, 7, V + 3, generator=g)  # spare embedding rows past the tokenizer's vocabulary
    xt = torch.randint(0, mask_id, (2, 7), generator=g)
    xt[:, 3:] = mask_id
    before = logits.clone()
    out = subs_log_probs(logits, xt, mask_id, V)
    assert torch.equal(logits, before)
    ref = plain_subs(logits[..., :V], xt, mask_id)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.allclose(out[torch.isfinite(ref)], ref[torch.isfinite(ref)], atol=1e-6)
    assert torch.equal(out[:, :3].argmax(-1), xt[:, :3]) and (out[:, 3:, mask_id] == float("-inf")).all()
    assert torch.allclose(out[:, 3:].exp().sum(-1), torch.ones(2, 4))
