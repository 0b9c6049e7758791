import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dlm.schedules import (
    CosineSchedule,
    GeometricSchedule,
    LinearSchedule,
    MaskSchedule,
    PolynomialSchedule,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "schedule"

SCHEDULES = [
    LinearSchedule(),
    CosineSchedule(),
    PolynomialSchedule(2.0),
    PolynomialSchedule(0.5),
    PolynomialSchedule(3.0),
    GeometricSchedule(),
    GeometricSchedule(1e-3, 5.0),
]
IDS = [repr(s) for s in SCHEDULES]


def grid(n: int = 201, lo: float = 1e-3, hi: float = 1 - 1e-3) -> torch.Tensor:
    return torch.linspace(lo, hi, n, dtype=torch.float64)


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_alpha_prime_matches_finite_differences(sched: MaskSchedule):
    t = grid(lo=0.01, hi=0.99)
    h = 1e-6
    fd = (sched.alpha(t + h) - sched.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(sched.alpha_prime(t), fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_weight_is_minus_alpha_prime_over_mask_prob(sched: MaskSchedule):
    t = grid()
    naive = -sched.alpha_prime(t) / (1 - sched.alpha(t))
    torch.testing.assert_close(sched.elbo_weight(t), naive, rtol=1e-6, atol=0)
    torch.testing.assert_close(sched.mask_prob(t), 1 - sched.alpha(t), rtol=1e-9, atol=1e-12)
    assert (sched.elbo_weight(t) > 0).all()


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_alpha_monotone_and_in_unit_interval(sched: MaskSchedule):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    a = sched.alpha(t)
    assert ((a >= 0) & (a <= 1)).all()
    assert (a[1:] < a[:-1]).all()
    assert (sched.alpha_prime(t[1:-1]) < 0).all()


@pytest.mark.parametrize("sched", SCHEDULES[:5], ids=IDS[:5])
def test_endpoints(sched: MaskSchedule):
    assert float(sched.alpha(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(1.0)
    assert float(sched.alpha(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(0.0, abs=1e-12)


def test_geometric_endpoints_and_weight():
    s = GeometricSchedule(1e-4, 20.0)
    t0, t1 = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    assert float(s.alpha(t0)) == pytest.approx(math.exp(-1e-4), rel=1e-12)
    assert float(s.alpha(t1)) == pytest.approx(math.exp(-20.0), rel=1e-9)
    assert float(s.sigma(t0)) == pytest.approx(1e-4)
    assert float(s.sigma(t1)) == pytest.approx(20.0)
    t = grid()
    sigma = 1e-4 ** (1 - t) * 20.0**t
    sigma_prime = sigma * math.log(20.0 / 1e-4)
    torch.testing.assert_close(s.sigma(t), sigma, rtol=1e-10, atol=0)
    torch.testing.assert_close(s.sigma_prime(t), sigma_prime, rtol=1e-10, atol=0)
    torch.testing.assert_close(s.elbo_weight(t), sigma_prime / torch.expm1(sigma), rtol=1e-10, atol=0)
    # stays finite and accurate at t = 0, where 1 - alpha = 1 - exp(-1e-4) loses digits in float32
    w0 = s.elbo_weight(torch.tensor(0.0))
    assert w0.dtype == torch.float32
    assert float(w0) == pytest.approx(1e-4 * math.log(2e5) / math.expm1(1e-4), rel=1e-5)


def test_closed_form_weights():
    t = grid()
    torch.testing.assert_close(LinearSchedule().elbo_weight(t), 1 / t)
    x = math.pi * t / 2
    cos_w = (math.pi / 2) * torch.sin(x) / (1 - torch.cos(x))
    torch.testing.assert_close(CosineSchedule().elbo_weight(t), cos_w, rtol=1e-8, atol=0)
    for p in (0.5, 1.0, 2.0, 3.0):
        torch.testing.assert_close(PolynomialSchedule(p).elbo_weight(t), p / t)
    torch.testing.assert_close(PolynomialSchedule(1.0).alpha(t), LinearSchedule().alpha(t))


def test_cosine_small_t_is_stable_in_float32():
    t = torch.tensor([1e-4, 1e-3], dtype=torch.float32)
    w = CosineSchedule().elbo_weight(t)
    exact = (math.pi / 2) / torch.tan(math.pi * t.double() / 4)
    torch.testing.assert_close(w.double(), exact, rtol=1e-5, atol=0)
    assert (CosineSchedule().mask_prob(t) > 0).all()


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_unmask_prob(sched: MaskSchedule):
    t = torch.rand(500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = t * torch.rand(500, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = sched.unmask_prob(t, s)
    assert ((p >= 0) & (p <= 1)).all()
    expected = (sched.alpha(s) - sched.alpha(t)) / (1 - sched.alpha(t))
    # the naive formula loses digits when 1 - alpha(t) is tiny; compare where it is trustworthy
    ok = sched.mask_prob(t) > 1e-3
    torch.testing.assert_close(p[ok], expected[ok], rtol=1e-8, atol=1e-12)
    # s == t: nothing changes
    assert torch.allclose(sched.unmask_prob(t, t), torch.zeros_like(t))


@pytest.mark.parametrize("sched", SCHEDULES[:5], ids=IDS[:5])
def test_unmask_prob_reaches_one_at_zero(sched: MaskSchedule):
    t = torch.linspace(0.05, 1, 20, dtype=torch.float64)
    torch.testing.assert_close(sched.unmask_prob(t, torch.zeros_like(t)), torch.ones_like(t))
    # nothing is masked at t = 0: defined as 1, not NaN
    assert float(sched.unmask_prob(torch.tensor(0.0), torch.tensor(0.0))) == 1.0


def test_unmask_prob_composes():
    # P(still masked at r | masked at t) = P(still masked at s | t) * P(still masked at r | s)
    for sched in SCHEDULES:
        t, s, r = (torch.tensor(v, dtype=torch.float64) for v in (0.9, 0.6, 0.2))
        lhs = 1 - sched.unmask_prob(t, r)
        rhs = (1 - sched.unmask_prob(t, s)) * (1 - sched.unmask_prob(s, r))
        torch.testing.assert_close(lhs, rhs)


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_weighted_mask_prob_integrates_to_alpha_drop(sched: MaskSchedule):
    # integral_0^1 w(t) (1 - alpha(t)) dt = -integral alpha' = alpha(0) - alpha(1)
    # midpoint rule after substituting t = u^2 (removes the 1/sqrt(t) singularity of power < 1)
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    t = u**2
    integral = (sched.elbo_weight(t) * sched.mask_prob(t) * 2 * u).mean()
    expected = sched.alpha(torch.tensor(0.0, dtype=torch.float64)) - sched.alpha(
        torch.tensor(1.0, dtype=torch.float64)
    )
    assert float(integral) == pytest.approx(float(expected), rel=2e-3)


def test_accepts_python_floats_and_any_shape():
    for sched in SCHEDULES:
        assert sched.alpha(0.5).shape == ()
        assert sched.elbo_weight(torch.full((2, 3, 4), 0.3)).shape == (2, 3, 4)
        assert sched.unmask_prob(0.5, 0.25).shape == ()


def test_argument_validation():
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="power"):
            PolynomialSchedule(bad)
    for lo, hi in ((0.0, 1.0), (-1.0, 1.0), (2.0, 1.0), (1.0, 1.0)):
        with pytest.raises(ValueError, match="sigma_min"):
            GeometricSchedule(lo, hi)


def test_repr():
    assert repr(LinearSchedule()) == "LinearSchedule()"
    assert "power=3" in repr(PolynomialSchedule(3))
    r = repr(GeometricSchedule(1e-3, 10))
    assert "sigma_min=0.001" in r and "sigma_max=10" in r


@pytest.mark.parametrize(
    "name, cls",
    [
        ("linear", LinearSchedule),
        ("cosine", CosineSchedule),
        ("polynomial", PolynomialSchedule),
        ("geometric", GeometricSchedule),
    ],
)
def test_configs_instantiate(name, cls):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    sched = instantiate(cfg)
    assert type(sched) is cls
    if name == "polynomial":
        assert sched.power == 2
    if name == "geometric":
        assert (sched.sigma_min, sched.sigma_max) == (1e-4, 20.0)


def test_unmask_prob_is_accurate_when_few_tokens_are_masked():
    t, s = torch.tensor(1e-3, dtype=torch.float64), torch.tensor(5e-4, dtype=torch.float64)
    assert float(PolynomialSchedule(3).unmask_prob(t, s)) == pytest.approx(1 - 0.5**3, rel=1e-12)
    assert float(LinearSchedule().unmask_prob(t, s)) == pytest.approx(0.5, rel=1e-12)
    tc, sc = torch.tensor(1e-4), torch.tensor(5e-5)  # float32
    assert float(CosineSchedule().unmask_prob(tc, sc)) == pytest.approx(0.75, rel=1e-5)
