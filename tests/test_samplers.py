from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dlm.sampling import (
    AncestralSampler,
    Generation,
    LowConfidenceSampler,
    MaskPrior,
    Sampler,
    filter_logits,
    sample_categorical,
)
from dlm.schedules import CosineSchedule, GeometricSchedule, LinearSchedule

CONF = Path(__file__).resolve().parents[1] / "conf" / "sampler"
V = 8
MASK = V - 1  # last vocabulary entry is the mask token
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------- toy denoisers
def oracle(target: torch.Tensor):
    """log one-hot on the target token at every position, whatever x is."""

    def denoiser(x):
        logp = torch.full((*x.shape, V), NEG_INF)
        return logp.scatter_(-1, target[..., None], 0.0)

    return denoiser


def constant(probs: torch.Tensor):
    """The same categorical distribution at every position."""
    logp = probs.log()

    def denoiser(x):
        return logp.expand(*x.shape, -1).clone()

    return denoiser


def random_denoiser(seed: int = 0, T: int = 32):
    """A deterministic, x-dependent distribution (mask token excluded)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(V, V, generator=g) * 2
    pos = torch.randn(T, V, generator=g)

    def denoiser(x):
        ctx = emb[x].mean(dim=1, keepdim=True)  # depends on the whole sequence
        logits = emb[x] + pos[: x.shape[1]] + ctx
        logits[..., MASK] = NEG_INF
        return logits.log_softmax(-1)

    return denoiser


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x):
        self.calls += 1
        return self.fn(x)


def masked_batch(T: int = 12, seed: int = 0) -> torch.Tensor:
    """Rows with different numbers of masks (incl. a fully given row and a fully masked row)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, MASK, (4, T), generator=g)
    x[0, 3:] = MASK  # prompt + completion
    x[1, torch.tensor([1, 4, 5, 8])] = MASK  # scattered (infilling)
    x[3, :] = MASK
    return x  # row 2 has no mask


SAMPLERS = {
    "ancestral": lambda **kw: AncestralSampler(steps=8, **kw),
    "ancestral_filtered": lambda **kw: AncestralSampler(steps=5, temperature=0.7, top_k=3, top_p=0.9, **kw),
    "ancestral_greedy": lambda **kw: AncestralSampler(steps=4, temperature=0.0, **kw),
    "low_conf": lambda **kw: LowConfidenceSampler(steps=8, **kw),
    "low_conf_sampled": lambda **kw: LowConfidenceSampler(steps=5, temperature=1.0, top_p=0.8, **kw),
    "low_conf_block": lambda **kw: LowConfidenceSampler(steps=6, block_length=4, **kw),
    "low_conf_block_sampled": lambda **kw: LowConfidenceSampler(
        steps=3, temperature=1.0, block_length=3, **kw
    ),
}
SCHEDULES = [LinearSchedule(), CosineSchedule(), GeometricSchedule()]


def run(sampler: Sampler, denoiser, x, seed: int = 0, schedule=None) -> Generation:
    return sampler.sample(
        denoiser,
        x,
        prior=MaskPrior(MASK, schedule if schedule is not None else LinearSchedule()),
        generator=torch.Generator().manual_seed(seed),
    )


def committed_per_step(traj: list[torch.Tensor]) -> list[torch.Tensor]:
    """Boolean [B, T] maps of the positions filled at each step."""
    return [(a == MASK) & (b != MASK) for a, b in zip(traj[:-1], traj[1:])]


# ---------------------------------------------------------------------------------------------- all samplers
@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
def test_fills_all_masks_and_keeps_given_tokens(name, schedule):
    x = masked_batch()
    den = Counting(random_denoiser())
    gen = run(SAMPLERS[name](record_trajectory=True), den, x, schedule=schedule)
    assert gen.tokens.shape == x.shape and gen.tokens.dtype == x.dtype
    assert not (gen.tokens == MASK).any()
    given = x != MASK
    assert torch.equal(gen.tokens[given], x[given])
    assert torch.equal(x, masked_batch())  # input untouched
    assert gen.num_network_calls == den.calls >= 1
    traj = gen.trajectory
    assert torch.equal(traj[0], x) and torch.equal(traj[-1], gen.tokens)
    for a, b in zip(traj[:-1], traj[1:]):  # committed tokens never change, masks only disappear
        assert torch.equal(b[a != MASK], a[a != MASK])


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_oracle_reproduces_target(name):
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, MASK, (3, 10), generator=g)
    x = target.clone()
    x[0, 4:] = MASK
    x[1, ::2] = MASK
    x[2] = MASK
    gen = run(SAMPLERS[name](), oracle(target), x)
    assert torch.equal(gen.tokens, target)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_no_mask_returns_immediately(name):
    x = torch.randint(0, MASK, (2, 5))
    den = Counting(random_denoiser())
    gen = run(SAMPLERS[name](record_trajectory=True), den, x)
    assert torch.equal(gen.tokens, x)
    assert gen.num_network_calls == 0 and den.calls == 0
    assert len(gen.trajectory) == 1


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_seeded_runs_are_deterministic(name):
    x = masked_batch()
    a = run(SAMPLERS[name](), random_denoiser(), x, seed=3)
    b = run(SAMPLERS[name](), random_denoiser(), x, seed=3)
    assert torch.equal(a.tokens, b.tokens) and a.num_network_calls == b.num_network_calls


@pytest.mark.parametrize("cls", [AncestralSampler, LowConfidenceSampler])
def test_top_k_one_equals_argmax(cls):
    x = masked_batch()
    greedy = run(cls(steps=6, temperature=0.0), random_denoiser(), x, seed=0)
    topk1 = run(cls(steps=6, temperature=1.3, top_k=1), random_denoiser(), x, seed=0)
    tiny_p = run(cls(steps=6, temperature=1.0, top_p=1e-6), random_denoiser(), x, seed=0)
    if cls is LowConfidenceSampler:  # no other randomness: the whole run must match
        assert torch.equal(greedy.tokens, topk1.tokens)
        assert torch.equal(greedy.tokens, tiny_p.tokens)
    # the ancestral reveal pattern also uses the generator, so compare single-step fills (everything at once)
    one_greedy = run(cls(steps=1, temperature=0.0), random_denoiser(), x)
    one_topk1 = run(cls(steps=1, temperature=1.0, top_k=1), random_denoiser(), x, seed=5)
    assert torch.equal(one_greedy.tokens, one_topk1.tokens)
    expected = random_denoiser()(x).argmax(-1)
    assert torch.equal(one_greedy.tokens[x == MASK], expected[x == MASK])


def test_mask_token_is_excluded_even_if_denoiser_gives_it_mass():
    probs = torch.full((V,), 1.0 / V)  # includes the mask token
    x = torch.full((2, 16), MASK)
    for sampler in (AncestralSampler(steps=4), LowConfidenceSampler(steps=4, temperature=1.0)):
        gen = run(sampler, constant(probs), x)
        assert not (gen.tokens == MASK).any()


def test_bad_denoiser_shape_raises():
    x = torch.full((2, 4), MASK)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        run(AncestralSampler(steps=2), lambda x: torch.zeros(2, V), x)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        run(LowConfidenceSampler(steps=2), lambda x: torch.zeros(2, 5, V), x)


@pytest.mark.parametrize("cls", [AncestralSampler, LowConfidenceSampler])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps"),
        ({"steps": -3}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
    ],
)
def test_argument_validation(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_block_length_validation():
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="block_length"):
            LowConfidenceSampler(block_length=bad)


# ---------------------------------------------------------------------------------------------- ancestral
def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens.flatten(), minlength=len(probs)).double()
    expected = probs.double() * tokens.numel()
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a zero-probability token"
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


@pytest.mark.parametrize(
    "kwargs, keep",
    [
        ({}, None),
        ({"temperature": 0.5}, None),
        ({"top_k": 2}, [0, 1]),
        ({"top_p": 0.6}, [0, 1]),
        ({"top_p": 0.7}, [0, 1, 2]),
    ],
)
def test_ancestral_constant_distribution_frequencies(kwargs, keep):
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04, 0.0, 0.0])
    x = torch.full((500, 24), MASK)
    x[:, :4] = 0  # a prompt that must stay
    gen = run(AncestralSampler(steps=6, **kwargs), constant(probs), x, seed=11)
    assert (gen.tokens[:, :4] == 0).all()
    target = probs.clone()
    if "temperature" in kwargs:
        target = probs ** (1 / kwargs["temperature"])
    if keep is not None:
        mask = torch.zeros_like(target, dtype=torch.bool)
        mask[keep] = True
        target = torch.where(mask, target, torch.zeros_like(target))
    target = target / target.sum()
    stat = chi_square(gen.tokens[:, 4:], target)
    dof = int((target > 0).sum()) - 1
    assert stat < dof + 6 * (2 * dof) ** 0.5 + 10, f"chi2={stat:.1f} with {dof} dof"


def test_ancestral_reveal_counts_follow_schedule():
    # E[#revealed by step i] / #masked = 1 - alpha(t_i)/... : for the linear schedule on a uniform grid,
    # the fraction still masked after step i is t_{i+1}.
    x = torch.full((400, 50), MASK)
    steps = 5
    gen = run(AncestralSampler(steps=steps, record_trajectory=True), constant(torch.full((V,), 1.0)), x)
    fracs = torch.tensor([(s == MASK).double().mean() for s in gen.trajectory])
    expected = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    torch.testing.assert_close(fracs, expected, atol=0.01, rtol=0)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_ancestral_cache_does_not_change_result(schedule, temperature):
    x = masked_batch(T=10)
    steps = 40  # far more steps than masks: many steps reveal nothing
    cached_den, plain_den = Counting(random_denoiser()), Counting(random_denoiser())
    cached = run(
        AncestralSampler(steps, temperature, record_trajectory=True, cap_steps=False), cached_den, x, seed=7,
        schedule=schedule,
    )
    plain = run(
        AncestralSampler(steps, temperature, cache_unchanged=False, record_trajectory=True, cap_steps=False),
        plain_den,
        x,
        seed=7,
        schedule=schedule,
    )
    assert torch.equal(cached.tokens, plain.tokens)
    assert len(cached.trajectory) == len(plain.trajectory)
    assert all(torch.equal(a, b) for a, b in zip(cached.trajectory, plain.trajectory))
    assert cached.num_network_calls == cached_den.calls
    assert plain.num_network_calls == plain_den.calls == len(plain.trajectory) - 1
    assert cached.num_network_calls < plain.num_network_calls
    # exactly one call per step that revealed something
    traj = cached.trajectory
    revealing = sum(not torch.equal(a, b) for a, b in zip(traj[:-1], traj[1:]))
    assert cached.num_network_calls == revealing


def test_ancestral_single_step_reveals_everything():
    x = torch.full((3, 7), MASK)
    gen = run(AncestralSampler(steps=1), random_denoiser(), x)
    assert gen.num_network_calls == 1 and not (gen.tokens == MASK).any()


# ---------------------------------------------------------------------------------------------- low confidence
def confidence_denoiser(target: torch.Tensor, confidence: torch.Tensor):
    """Position t predicts target[t] with probability confidence[t] (> rest, which is spread uniformly)."""

    def denoiser(x):
        B, T = x.shape
        conf = confidence.expand(B, T)
        rest = (1 - conf) / (MASK - 1)
        p = rest[..., None].expand(B, T, V).clone()
        p.scatter_(-1, target.expand(B, T)[..., None], conf[..., None])
        p[..., MASK] = 0
        return p.log()

    return denoiser


def test_low_confidence_commits_most_confident_first():
    T = 8
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, MASK, (T,), generator=g)
    confidence = torch.tensor([0.3, 0.9, 0.5, 0.95, 0.4, 0.7, 0.6, 0.8])
    x = torch.full((1, T), MASK)
    gen = run(
        LowConfidenceSampler(steps=T, record_trajectory=True), confidence_denoiser(target, confidence), x
    )
    assert torch.equal(gen.tokens[0], target)
    order = [int(c[0].nonzero()) for c in committed_per_step(gen.trajectory)]
    assert order == torch.argsort(confidence, descending=True).tolist()
    assert gen.num_network_calls == T


def test_low_confidence_two_per_step_in_confidence_order():
    T = 8
    target = torch.zeros(T, dtype=torch.long)
    confidence = torch.tensor([0.3, 0.9, 0.5, 0.95, 0.4, 0.7, 0.6, 0.8])
    x = torch.full((1, T), MASK)
    gen = run(
        LowConfidenceSampler(steps=4, record_trajectory=True), confidence_denoiser(target, confidence), x
    )
    ranked = torch.argsort(confidence, descending=True).tolist()
    for i, c in enumerate(committed_per_step(gen.trajectory)):
        assert sorted(c[0].nonzero().flatten().tolist()) == sorted(ranked[2 * i : 2 * i + 2])


def test_low_confidence_even_split_per_row():
    x = torch.full((3, 12), MASK)
    x[1, :5] = 0  # 7 masks
    x[2, :10] = 1  # 2 masks
    gen = run(LowConfidenceSampler(steps=4, record_trajectory=True), random_denoiser(), x)
    counts = torch.stack([c.sum(1) for c in committed_per_step(gen.trajectory)], dim=1)  # [B, steps]
    assert counts[0].tolist() == [3, 3, 3, 3]
    assert counts[1].tolist() == [2, 2, 2, 1]
    assert counts[2].tolist() == [1, 1, 0, 0]
    assert gen.num_network_calls == 4


def test_low_confidence_steps_equal_masks_commits_one_per_step():
    x = masked_batch(T=9)
    n = (x == MASK).sum(1)
    n_max = int(n.max())
    x2 = x[n > 0]
    x2 = x2[(x2 == MASK).sum(1) == n_max]  # rows with the maximal number of masks
    gen = run(
        LowConfidenceSampler(steps=n_max, temperature=1.0, record_trajectory=True), random_denoiser(), x2
    )
    steps = committed_per_step(gen.trajectory)
    assert len(steps) == n_max
    assert all((c.sum(1) == 1).all() for c in steps)
    # rows with fewer masks: one per step until they are done
    gen = run(LowConfidenceSampler(steps=n_max, record_trajectory=True), random_denoiser(), x)
    counts = torch.stack([c.sum(1) for c in committed_per_step(gen.trajectory)], dim=1)
    for row, m in enumerate(n.tolist()):
        assert counts[row].tolist() == [1] * m + [0] * (n_max - m)


def test_low_confidence_stops_when_done():
    x = torch.full((2, 3), MASK)
    gen = run(LowConfidenceSampler(steps=10), random_denoiser(), x)
    assert gen.num_network_calls == 3 and not (gen.tokens == MASK).any()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_block_order(temperature):
    T, L = 15, 4
    x = torch.full((3, T), MASK)
    x[0, :3] = 0  # prompt of length 3: blocks [3,7), [7,11), [11,15)
    x[1, :1] = 2
    x[2, :3] = 1
    x[2, 12] = 4  # a given token inside the completion
    # make later positions *more* confident, so an unconstrained sampler would fill them first
    confidence = torch.linspace(0.2, 0.9, T)
    target = torch.arange(T) % MASK
    sampler = LowConfidenceSampler(steps=6, temperature=temperature, block_length=L, record_trajectory=True)
    gen = run(sampler, confidence_denoiser(target, confidence), x)
    assert not (gen.tokens == MASK).any()
    assert torch.equal(gen.tokens[x != MASK], x[x != MASK])
    first = (x == MASK).long().argmax(1)
    block = (torch.arange(T)[None] - first[:, None]).div(L, rounding_mode="floor")
    for state in gen.trajectory:
        for b in range(x.shape[0]):
            open_blocks = block[b][state[b] == MASK]
            filled = (x[b] == MASK) & (state[b] != MASK)
            if open_blocks.numel() and filled.any():
                # every committed position lies in a block no later than the earliest incomplete block
                assert int(block[b][filled].max()) <= int(open_blocks.min())
    # 6 steps over the (at most) 4 blocks of row 1: blocks get 2, 2, 1, 1 steps
    assert gen.num_network_calls == 6
    # within the first block of row 0 the most confident (rightmost) positions go first
    c = committed_per_step(gen.trajectory)
    assert c[0][0].nonzero().flatten().tolist() == [5, 6]
    assert c[1][0].nonzero().flatten().tolist() == [3, 4]


def test_block_length_without_blocks_matches_single_block():
    x = masked_batch(T=10)
    a = run(LowConfidenceSampler(steps=5), random_denoiser(), x)
    b = run(LowConfidenceSampler(steps=5, block_length=10), random_denoiser(), x)
    assert torch.equal(a.tokens, b.tokens)


def test_more_blocks_than_steps_still_completes():
    x = torch.full((2, 10), MASK)
    gen = run(LowConfidenceSampler(steps=2, block_length=2), random_denoiser(), x)
    assert not (gen.tokens == MASK).any()
    assert gen.num_network_calls == 5  # one step per block


# ---------------------------------------------------------------------------------------------- helpers
def test_sample_categorical_is_deterministic_and_unbiased():
    logp = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]).log()
    rows = logp.expand(40000, -1)
    a = sample_categorical(rows, torch.Generator().manual_seed(0))
    b = sample_categorical(rows, torch.Generator().manual_seed(0))
    c = sample_categorical(rows, torch.Generator().manual_seed(1))
    assert a.dtype == torch.long and a.shape == (40000,)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert chi_square(a, logp.exp()) < 25
    # low-precision input is upcast before adding the noise
    half = sample_categorical(logp.to(torch.bfloat16).expand(40000, -1), torch.Generator().manual_seed(0))
    assert chi_square(half, logp.exp()) < 25


def test_filter_logits():
    logp = torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]]).log()
    out = filter_logits(logp)
    torch.testing.assert_close(out, logp)
    torch.testing.assert_close(filter_logits(logp, temperature=2.0).exp().sum(-1), torch.ones(1))
    k2 = filter_logits(logp, top_k=2).exp()
    torch.testing.assert_close(k2, torch.tensor([[0.4, 0.25, 0, 0, 0, 0]]) / 0.65)
    assert torch.equal(filter_logits(logp, top_k=100), filter_logits(logp))
    p = filter_logits(logp, top_p=0.7).exp()
    torch.testing.assert_close(p, torch.tensor([[0.4, 0.25, 0.15, 0, 0, 0]]) / 0.8)
    p = filter_logits(logp, top_p=0.8).exp()  # 0.4 + 0.25 + 0.15 = 0.8 reaches the threshold
    assert int((p > 0).sum()) in (3, 4)  # boundary: float rounding may keep one more
    greedy = filter_logits(logp, temperature=0.0)
    assert greedy[0, 0] == 0 and torch.isinf(greedy[0, 1:]).all()
    assert torch.equal(filter_logits(logp, top_k=1), greedy)
    # shuffled vocabulary: filtering follows the probabilities, not the positions
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(
        filter_logits(logp[:, perm], top_p=0.7), filter_logits(logp, top_p=0.7)[:, perm]
    )
    with pytest.raises(ValueError):
        filter_logits(logp, temperature=-1)
    with pytest.raises(ValueError):
        filter_logits(logp, top_p=0)
    with pytest.raises(ValueError):
        filter_logits(logp, top_k=0)


def test_repr():
    assert "steps=32" in repr(AncestralSampler())
    assert "block_length=4" in repr(LowConfidenceSampler(block_length=4))


def test_configs_instantiate():
    anc = instantiate(OmegaConf.load(CONF / "ancestral.yaml"))
    assert isinstance(anc, AncestralSampler)
    assert (anc.steps, anc.temperature, anc.top_k, anc.top_p) == (32, 1.0, None, None)
    low = instantiate(OmegaConf.load(CONF / "low_confidence.yaml"))
    assert isinstance(low, LowConfidenceSampler)
    assert (low.steps, low.temperature, low.block_length) == (32, 0.0, None)
    low4 = instantiate(OmegaConf.load(CONF / "low_confidence.yaml"), block_length=4, steps=8)
    assert (low4.block_length, low4.steps) == (4, 8)
