"""The confidence-ordered samplers (margin, entropy, random order), the entropy-bounded (EB) sampler, Fast-dLLM
threshold decoding and ReMDM remasking: invariants, ordering rules on toy denoisers, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dlm.sampling import (
    ConfidenceSampler,
    EntropyBoundedSampler,
    EntropySampler,
    LowConfidenceSampler,
    MarginSampler,
    MaskPrior,
    RandomOrderSampler,
    ReMDMSampler,
    ThresholdSampler,
)
from dlm.sampling.confidence import entropy
from dlm.schedules import CosineSchedule, LinearSchedule

CONF = Path(__file__).resolve().parents[1] / "conf" / "sampler"
V = 8
MASK = V - 1
EOS = V - 2
NEG_INF = float("-inf")


def oracle(target):
    def denoiser(x):
        return torch.full((*x.shape, V), NEG_INF).scatter_(-1, target[..., None], 0.0)

    return denoiser


def random_denoiser(seed=0, T=32, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(V, V, generator=g) * scale
    pos = torch.randn(T, V, generator=g) * scale / 2

    def denoiser(x):
        logits = emb[x] + pos[: x.shape[1]] + emb[x].mean(dim=1, keepdim=True)
        logits[..., MASK] = NEG_INF
        return logits.log_softmax(-1)

    return denoiser


class Recording:
    """Calls a fixed per-position distribution and records x at every call."""

    def __init__(self, logp):
        self.logp, self.inputs = logp, []

    def __call__(self, x):
        self.inputs.append(x.clone())
        return self.logp.expand(x.shape[0], -1, -1).clone()


def masked_batch(T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, MASK, (4, T), generator=g)
    x[0, 3:] = MASK
    x[1, torch.tensor([1, 4, 5, 8])] = MASK
    x[3, :] = MASK
    return x


SAMPLERS = {
    "margin": lambda **kw: MarginSampler(steps=5, **kw),
    "entropy": lambda **kw: EntropySampler(steps=5, **kw),
    "random_order": lambda **kw: RandomOrderSampler(steps=5, **kw),
    "confidence": lambda **kw: ConfidenceSampler(steps=5, **kw),
    "entropy_bounded": lambda **kw: EntropyBoundedSampler(gamma=0.5, **kw),
    "threshold": lambda **kw: ThresholdSampler(threshold=0.5, **kw),
    "remdm": lambda **kw: ReMDMSampler(steps=10, eta_cap=0.3, **{k: v for k, v in kw.items() if k != "block_length"}),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("block_length", [None, 3])
def test_no_mask_left_and_given_tokens_kept(name, temperature, block_length):
    x = masked_batch()
    gen = SAMPLERS[name](temperature=temperature, block_length=block_length).sample(
        random_denoiser(), x, prior=MaskPrior(MASK, LinearSchedule()), generator=torch.Generator().manual_seed(0))
    assert not (gen.tokens == MASK).any()
    given = x != MASK
    assert torch.equal(gen.tokens[given], x[given])
    assert gen.num_network_calls >= 1


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_oracle_denoiser_reproduces_the_target(name):
    target = torch.randint(0, MASK, (3, 10), generator=torch.Generator().manual_seed(1))
    x = target.clone()
    x[:, 2:] = MASK
    x[1, 0] = MASK
    gen = SAMPLERS[name](temperature=1.0).sample(oracle(target), x, prior=MaskPrior(MASK, CosineSchedule()),
                                                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(gen.tokens, target)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_same_seed_same_tokens_and_float64_gumbel(name, monkeypatch):
    x = masked_batch()
    dtypes = []
    real_rand = torch.rand

    def spy(*args, **kwargs):
        dtypes.append(kwargs.get("dtype"))
        return real_rand(*args, **kwargs)

    def run(seed):
        return SAMPLERS[name](temperature=1.0).sample(random_denoiser(scale=0.3), x, prior=MaskPrior(MASK, LinearSchedule()),
                                                      generator=torch.Generator().manual_seed(seed)).tokens

    monkeypatch.setattr(torch, "rand", spy)
    a = run(0)
    assert dtypes and all(d == torch.float64 for d in dtypes)  # Gumbel noise (and any coin) in float64
    monkeypatch.setattr(torch, "rand", real_rand)
    assert torch.equal(a, run(0))
    assert any(not torch.equal(a, run(s)) for s in (1, 2, 3))


def test_confidence_sampler_equals_low_confidence():
    x = masked_batch(T=14)
    for block_length in (None, 4):
        for temperature in (0.0, 1.0):
            kw = dict(steps=6, temperature=temperature, block_length=block_length)
            a = ConfidenceSampler(**kw).sample(random_denoiser(3), x, prior=MaskPrior(MASK),
                                               generator=torch.Generator().manual_seed(5))
            b = LowConfidenceSampler(**kw).sample(random_denoiser(3), x, prior=MaskPrior(MASK),
                                                  generator=torch.Generator().manual_seed(5))
            assert torch.equal(a.tokens, b.tokens) and a.num_network_calls == b.num_network_calls


def _toy_logp(T=6):
    """Per-position distributions with known order: position i has top-1 prob, margin and entropy set apart."""
    rows = [
        [0.40, 0.39, 0.21],  # top-1 0.40, margin 0.01, mid entropy
        [0.50, 0.10, 0.40],  # top-1 0.50, margin 0.10
        [0.34, 0.33, 0.33],  # highest entropy, margin 0.01
        [0.90, 0.05, 0.05],  # most confident, lowest entropy
        [0.60, 0.20, 0.20],
        [0.45, 0.45, 0.10],  # margin 0
    ][:T]
    p = torch.zeros(T, V)
    p[:, :3] = torch.tensor(rows)
    return p.clamp(min=1e-30).log()[None]


@pytest.mark.parametrize(("cls", "key"), [
    (MarginSampler, lambda p: -(p.topk(2).values[:, 0] - p.topk(2).values[:, 1])),
    (EntropySampler, lambda p: entropy(p.log())),
    (ConfidenceSampler, lambda p: -p.max(-1).values),
])
def test_ordering_rule_on_a_toy_denoiser(cls, key):
    logp = _toy_logp()
    den = Recording(logp)
    x = torch.full((1, 6), MASK)
    gen = cls(steps=6, temperature=0.0).sample(den, x, prior=MaskPrior(MASK))
    assert gen.num_network_calls == 6
    # the order in which positions got committed (one per step) is the order of the rule
    committed = [int(((a == MASK) & (b != MASK))[0].nonzero()) for a, b in zip(den.inputs, den.inputs[1:] + [gen.tokens])]
    p = logp[0].exp()
    expected = torch.argsort(key(p), stable=True).tolist()
    assert committed == expected


def test_random_order_is_a_permutation_that_depends_on_the_seed():
    den = Recording(_toy_logp())
    orders = set()
    for seed in range(6):
        den.inputs = []
        gen = RandomOrderSampler(steps=6, temperature=0.0).sample(den, torch.full((1, 6), MASK), prior=MaskPrior(MASK),
                                                                   generator=torch.Generator().manual_seed(seed))
        seq = den.inputs[1:] + [gen.tokens]
        orders.add(tuple(int(((a == MASK) & (b != MASK))[0].nonzero()) for a, b in zip(den.inputs, seq)))
    assert len(orders) > 1 and all(sorted(o) == list(range(6)) for o in orders)


def test_threshold_commits_every_position_above_tau_and_at_least_one():
    logp = _toy_logp()
    p = logp[0].exp().max(-1).values  # [0.40, 0.50, 0.34, 0.90, 0.60, 0.45]
    den = Recording(logp)
    x = torch.full((1, 6), MASK)
    ThresholdSampler(threshold=0.55, temperature=0.0).sample(den, x, prior=MaskPrior(MASK))
    first = den.inputs[1][0] != MASK  # after step 1
    assert first.tolist() == (p > 0.55).tolist()  # positions 3 and 4, nothing else
    # every step commits >= 1 and, since the toy denoiser is fixed, exactly one when nothing is above tau
    counts = [int((a == MASK).sum() - (b == MASK).sum()) for a, b in zip(den.inputs, den.inputs[1:])]
    assert counts[0] == 2 and all(c >= 1 for c in counts)
    assert len(den.inputs) == 1 + 4  # 2 at once, then the 4 below tau one per step
    den.inputs = []
    gen = ThresholdSampler(threshold=0.0, temperature=0.0).sample(den, x, prior=MaskPrior(MASK))
    assert gen.num_network_calls == 1  # tau = 0: everything at once
    with pytest.raises(NotImplementedError, match="kv_cache='prefix'"):
        ThresholdSampler(kv_cache="prefix")


def test_entropy_bounded_commits_the_largest_prefix_within_gamma():
    logp = _toy_logp()
    h = entropy(logp[0])
    hs = h.sort().values.double()
    spent = hs.cumsum(0) - hs.cummax(0).values
    for gamma in (0.0, 0.9, 2.0, 1e9):
        den = Recording(logp)
        EntropyBoundedSampler(gamma=gamma, temperature=0.0).sample(den, torch.full((1, 6), MASK), prior=MaskPrior(MASK))
        after = den.inputs[1][0] if len(den.inputs) > 1 else None
        expected = max(1, int((spent <= gamma + 1e-12).sum()))
        got = 6 if after is None else int((after != MASK).sum())
        assert got == expected, (gamma, got, expected)
        if after is not None:  # the committed set is the lowest-entropy positions
            assert set((after != MASK).nonzero()[:, 0].tolist()) == set(h.argsort()[:expected].tolist())
    with pytest.raises(ValueError, match="gamma"):
        EntropyBoundedSampler(gamma=-1)


def test_step_cap_is_respected_by_adaptive_samplers():
    x = torch.full((2, 12), MASK)
    for s in (ThresholdSampler(threshold=1.0, steps=3), EntropyBoundedSampler(gamma=0.0, steps=3)):
        gen = s.sample(random_denoiser(), x, prior=MaskPrior(MASK))
        assert gen.num_network_calls <= 3 and not (gen.tokens == MASK).any()


def test_eos_fills_the_rest_of_the_row():
    target = torch.tensor([[1, 2, EOS, 3, 4, 5]])
    den = Recording(oracle(target)(target))
    gen = ConfidenceSampler(steps=6, temperature=0.0, eos_id=EOS).sample(den, torch.full((1, 6), MASK), prior=MaskPrior(MASK))
    assert gen.tokens.tolist() == [[1, 2, EOS, EOS, EOS, EOS]]
    assert gen.num_network_calls < 6  # the tail came with the EOS
    # an end-of-turn token (a family's stop_ids) ends the row the same way; it stays itself, the tail is EOS
    EOT = 5
    turn = torch.tensor([[1, 2, EOT, 3, 4, 1]])
    sampler = ConfidenceSampler(steps=6, temperature=0.0, eos_id=EOS)
    sampler.stop_ids = (EOS, EOT)
    gen = sampler.sample(Recording(oracle(turn)(turn)), torch.full((1, 6), MASK), prior=MaskPrior(MASK))
    assert gen.tokens.tolist() == [[1, 2, EOT, EOS, EOS, EOS]]


def test_remdm_remasks_generated_tokens_only_and_ends_without_masks():
    x = masked_batch()
    given = x != MASK
    s = ReMDMSampler(steps=16, eta_cap=0.5, temperature=1.0, record_trajectory=True)
    gen = s.sample(random_denoiser(), x, prior=MaskPrior(MASK, LinearSchedule()),
                   generator=torch.Generator().manual_seed(0))
    assert not (gen.tokens == MASK).any() and torch.equal(gen.tokens[given], x[given])
    traj = gen.trajectory
    assert all(torch.equal(t[given], x[given]) for t in traj)
    remasked = sum(int(((a != MASK) & (b == MASK)).sum()) for a, b in zip(traj, traj[1:]))
    assert remasked > 0  # remasking happened
    # sigma: the cap and the rescale, never above sigma_max
    assert ReMDMSampler(eta_cap=0.02).sigma(0.5, 0.6) == pytest.approx(0.02)
    assert ReMDMSampler(eta_cap=1.0, eta_rescale=0.5).sigma(0.5, 0.6) == pytest.approx(0.4)
    assert ReMDMSampler(eta_cap=1.0).sigma(0.9, 0.95) == pytest.approx(0.05 / 0.9)
    # eta = 0 is MDLM ancestral sampling: no position ever goes back to the mask
    gen = ReMDMSampler(steps=8, eta_cap=0.0, record_trajectory=True).sample(
        random_denoiser(), x, prior=MaskPrior(MASK, LinearSchedule()), generator=torch.Generator().manual_seed(0))
    assert all(not ((a != MASK) & (b == MASK)).any() for a, b in zip(gen.trajectory, gen.trajectory[1:]))


@pytest.mark.parametrize("name", ["margin", "entropy", "random_order", "entropy_bounded", "threshold", "remdm"])
def test_configs_instantiate(name):
    sampler = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    x = masked_batch()
    gen = sampler.sample(random_denoiser(), x, prior=MaskPrior(MASK, LinearSchedule()),
                         generator=torch.Generator().manual_seed(0))
    assert not (gen.tokens == MASK).any()
