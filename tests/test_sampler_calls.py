"""Network calls of the samplers: no call on a step that commits nothing, steps capped at the positions to fill.

A counting denoiser records the state of every call; a call is wasted when the step it was made for leaves the
state unchanged. Every family's default sampler (conf/sampler/<method>.yaml) is checked on a module built from
the training config: calls <= positions to fill, prompts kept, no mask left.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from dlm.sampling import AncestralSampler, D3PMPrior, D3PMSampler, MaskPrior, SundaeSampler, UniformPrior
from dlm.schedules import CosineSchedule, LinearSchedule
from tests.conftest import compose

V, MASK = 8, 8  # vocabulary 0..7 plus the mask id 8 (outside the vocabulary the denoiser scores)


class Recording:
    """A random denoiser that records the input of every call (time-agnostic or time-conditioned)."""

    def __init__(self, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x, t=None):
        self.inputs.append(x.clone())
        return torch.randn(*x.shape, V + 1, generator=self.g).log_softmax(-1)


class Shifting(Recording):
    """Proposes token (x + 1) mod V at every position: never the current token."""

    def __call__(self, x, t=None):
        self.inputs.append(x.clone())
        return torch.nn.functional.one_hot((x + 1) % V, V + 1).double().clamp(min=1e-30).log()


def masked_rows(B: int = 6, T: int = 10, given: int = 3) -> torch.Tensor:
    x = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    x[:, given:] = MASK
    return x


def called_only_where_committed(trajectory: list[torch.Tensor], inputs: list[torch.Tensor]) -> bool:
    """The calls were made exactly on the states of the steps that changed the state, in order."""
    committing = [a for a, b in zip(trajectory[:-1], trajectory[1:]) if not torch.equal(a, b)]
    return len(committing) == len(inputs) and all(torch.equal(a, c) for a, c in zip(committing, inputs))


@pytest.mark.parametrize("schedule", [LinearSchedule(), CosineSchedule()], ids=["linear", "cosine"])
def test_ancestral_makes_no_call_on_a_step_that_reveals_nothing(schedule):
    x = masked_rows(B=3, T=10)
    den = Recording()
    sampler = AncestralSampler(steps=60, record_trajectory=True, cap_steps=False)  # far more steps than masks
    gen = sampler.sample(den, x, prior=MaskPrior(MASK, schedule), generator=torch.Generator().manual_seed(0))
    assert gen.num_network_calls == len(den.inputs)
    assert len(gen.trajectory) - 1 > len(den.inputs)  # there were steps that revealed nothing
    assert called_only_where_committed(gen.trajectory, den.inputs)


def test_ancestral_single_row_never_calls_more_than_its_masks_even_uncapped():
    x = masked_rows(B=1, T=12, given=2)
    gen = AncestralSampler(steps=100, cap_steps=False).sample(Recording(), x, prior=MaskPrior(MASK, LinearSchedule()),
                                                              generator=torch.Generator().manual_seed(0))
    assert gen.num_network_calls <= 10


def test_ancestral_caps_steps_at_the_positions_to_fill():
    x = masked_rows(B=16, T=10, given=4)  # 6 masks per row; a batch has a reveal at nearly every step
    capped = AncestralSampler(steps=32).sample(Recording(), x, prior=MaskPrior(MASK, LinearSchedule()),
                                               generator=torch.Generator().manual_seed(0))
    paper = AncestralSampler(steps=32, cap_steps=False).sample(Recording(), x, prior=MaskPrior(MASK, LinearSchedule()),
                                                               generator=torch.Generator().manual_seed(0))
    assert capped.num_network_calls <= 6 < paper.num_network_calls <= 32
    assert not (capped.tokens == MASK).any() and torch.equal(capped.tokens[:, :4], x[:, :4])


def uniform_alpha_bar(T: int):
    return lambda t: torch.full((V + 1,), 1.0 - t / T, dtype=torch.float64)


def spindle_like_alpha_bar(T: int):
    """Token-dependent keep probabilities: token j is masked faster the larger j."""
    powers = torch.linspace(0.5, 2.0, V + 1, dtype=torch.float64)
    return lambda t: (1.0 - t / T) ** powers


@pytest.mark.parametrize("alpha_bar", [uniform_alpha_bar, spindle_like_alpha_bar], ids=["per-time", "per-token"])
def test_d3pm_makes_no_call_on_a_step_that_reveals_nothing(alpha_bar):
    x = masked_rows(B=2, T=8)
    den = Recording()
    sampler = D3PMSampler(steps=128, record_trajectory=True, cap_steps=False)
    gen = sampler.sample(den, x, prior=D3PMPrior(MASK, alpha_bar(512), 512),
                         generator=torch.Generator().manual_seed(0))
    assert gen.num_network_calls == len(den.inputs) < 128
    assert not (gen.tokens == MASK).any() and torch.equal(gen.tokens[:, :3], x[:, :3])
    if alpha_bar is uniform_alpha_bar:  # the bound is the reveal probability itself: every call reveals
        assert called_only_where_committed(gen.trajectory, den.inputs)


def test_d3pm_calls_a_time_conditioned_denoiser_at_the_time_of_the_step():
    times = []
    den = Recording()

    def timed(x, t):
        times.append(t)
        return den(x, t)

    x = masked_rows(B=1, T=8)
    sampler = D3PMSampler(steps=64, cap_steps=False)
    sampler.sample(timed, x, prior=D3PMPrior(MASK, uniform_alpha_bar(64), 64),
                   generator=torch.Generator().manual_seed(0))
    assert len(times) <= 5 and times == sorted(times, reverse=True) and len(set(times)) == len(times)


def test_d3pm_caps_steps_at_the_positions_to_fill():
    x = masked_rows(B=16, T=10, given=4)
    gen = D3PMSampler(steps=128).sample(Recording(), x, prior=D3PMPrior(MASK, uniform_alpha_bar(512), 512),
                                        generator=torch.Generator().manual_seed(0))
    assert gen.num_network_calls <= 6
    assert not (gen.tokens == MASK).any() and torch.equal(gen.tokens[:, :4], x[:, :4])


def test_sundae_makes_no_call_on_a_step_that_updates_nothing_and_caps_its_steps():
    x = masked_rows(B=1, T=10, given=6)
    free = x == MASK
    den = Shifting()  # every update changes the state, so a call on a step that changes nothing would show
    gen = SundaeSampler(steps=50, update_proportion=0.1, stop_when_unchanged=False, record_trajectory=True).sample(
        den, x, prior=UniformPrior(free, torch.arange(V)), generator=torch.Generator().manual_seed(0))
    assert gen.num_network_calls == len(den.inputs) <= 4  # 4 free positions
    assert len(gen.trajectory) - 1 == 4  # 4 steps taken, some without a call
    assert called_only_where_committed(gen.trajectory, den.inputs)
    uncapped = SundaeSampler(steps=50, stop_when_unchanged=False, cap_steps=False).sample(
        Recording(), x, prior=UniformPrior(free, torch.arange(V)), generator=torch.Generator().manual_seed(0))
    assert 4 < uncapped.num_network_calls <= 50


# ---------------------------------------------------------------------------- every family's default sampler
FAMILIES = ["mdlm", "diffusionbert", "bd3lm", "sundae", "ar"]


@pytest.fixture(scope="module")
def family_modules():
    from dlm.train import build_datamodule, build_module

    out = {}
    for method in FAMILIES:
        cfg = compose([f"method={method}", "logger=none", "data.source.num_train=64", "data.source.num_val=16"])
        dm = build_datamodule(cfg)
        out[method] = (build_module(cfg, dm), dm, instantiate(cfg.sampler))
    return out


@pytest.mark.parametrize("method", FAMILIES)
def test_default_sampler_calls_at_most_the_positions_to_fill(family_modules, method):
    torch.manual_seed(0)
    module, dm, default = family_modules[method]
    assert type(module.sampler) is type(default)  # the module samples with conf/sampler/<method>.yaml
    forwards = []
    handle = module.backbone.register_forward_hook(lambda *_: forwards.append(1))
    try:
        B, P = 12, 3
        length = dm.seq_len - P
        prompt = torch.randint(0, module.vocab_size, (B, P), generator=torch.Generator().manual_seed(2))
        prompt[prompt == module.mask_id] = 0
        gen = module.generate(prompt, length, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert gen.num_network_calls == len(forwards)  # the count reported is the backbone forwards made
    # bd3lm too: its KV-cache refresh of a finished block rides on the next block's first call (no call of its own)
    assert 0 < gen.num_network_calls <= length
    assert torch.equal(gen.tokens[:, :P].cpu(), prompt)
    assert gen.tokens.shape == (B, P + length) and not (gen.tokens == module.mask_id).any()


# ---------------------------------------------------------------------------- the defaults' own loops
def default_sampler(method: str, **fields):
    """conf/sampler/<method>.yaml as the training config composes it, with ``fields`` set."""
    cfg = compose([f"method={method}", "logger=none"])
    return instantiate(cfg.sampler, **fields)


@pytest.mark.parametrize("method", ["mdlm", "bd3lm", "diffusionbert", "sundae"])
def test_every_default_sampler_calls_only_on_steps_that_commit(method):
    """The state after every call differs from the state it was made on, and every step that changes nothing is
    made without a call (D3PM with a per-time schedule, whose reveal bound is exact; SUNDAE with a denoiser whose
    every proposal changes a token)."""
    sampler = default_sampler(method, record_trajectory=True)
    assert sampler.temperature > 0  # a default stays stochastic (GRPO's rollouts, end-of-fit samples)
    x, gen = masked_rows(B=4, T=12), torch.Generator().manual_seed(0)
    if method == "diffusionbert":
        den = Recording()
        out = sampler.sample(den, x, prior=D3PMPrior(MASK, uniform_alpha_bar(512), 512), generator=gen)
    elif method == "sundae":
        den = Shifting()
        out = sampler.sample(den, x, prior=UniformPrior(x == MASK, torch.arange(V)), generator=gen)
    else:
        den = Recording()
        out = sampler.sample(den, x, prior=MaskPrior(MASK, LinearSchedule()), generator=gen)
    assert out.num_network_calls == len(den.inputs) <= 9  # 9 positions to fill per row
    assert called_only_where_committed(out.trajectory, den.inputs)


class Confident(Recording):
    """Puts probability ~1 on token (position mod V) at every position: a model sure of every token."""

    def __call__(self, x, t=None):
        self.inputs.append(x.clone())
        pos = torch.arange(x.shape[1]).expand_as(x) % V
        return (torch.nn.functional.one_hot(pos, V + 1).double() * 40).log_softmax(-1)


def test_bd3lm_default_commits_every_confident_position_of_a_call():
    """The threshold default (temperature 1) fills a block the model is sure of in one call, and an unsure one in at
    most one call per position; the paper's ancestral sampler (sampler=bd3lm_ancestral) takes a call per step."""
    x = masked_rows(B=3, T=7, given=3)  # one block of 4 positions
    sure = default_sampler("bd3lm").sample(Confident(), x, prior=MaskPrior(MASK, LinearSchedule()),
                                           generator=torch.Generator().manual_seed(0))
    assert sure.num_network_calls == 1 and torch.equal(sure.tokens[:, 3:], torch.arange(3, 7).expand(3, 4) % V)
    unsure = default_sampler("bd3lm").sample(Recording(), x, prior=MaskPrior(MASK, LinearSchedule()),
                                             generator=torch.Generator().manual_seed(0))
    assert 1 <= unsure.num_network_calls <= 4 and not (unsure.tokens == MASK).any()
    cfg = compose(["method=bd3lm", "sampler=bd3lm_ancestral", "logger=none"])
    paper = instantiate(cfg.sampler)
    assert isinstance(paper, AncestralSampler) and paper.top_p == 0.9 and cfg.sampler.kv_cache == "prefix"
    ancestral = paper.sample(Confident(), x, prior=MaskPrior(MASK, LinearSchedule()),
                             generator=torch.Generator().manual_seed(0))
    assert 1 < ancestral.num_network_calls <= 4


def test_bd3lm_default_takes_no_more_calls_in_a_block_than_its_positions_left(family_modules):
    module, dm, _ = family_modules["bd3lm"]
    blocks = []
    sample = module.sampler.sample

    def recorded(denoiser, x, **kw):
        out = sample(denoiser, x, **kw)
        blocks.append((int((x == module.mask_id).sum(1).max()), out.num_network_calls))
        return out

    module.sampler.sample = recorded
    try:
        prompt = torch.randint(0, module.vocab_size, (8, 3), generator=torch.Generator().manual_seed(2))
        prompt[prompt == module.mask_id] = 0
        gen = module.generate(prompt, dm.seq_len - 3, generator=torch.Generator().manual_seed(0))
    finally:
        del module.sampler.sample
    assert blocks and all(1 <= calls <= left for left, calls in blocks)
    assert gen.num_network_calls == sum(calls for _, calls in blocks)


def test_ancestral_eos_fill_makes_the_tail_eos_and_fewer_calls():
    """eos_id: a revealed EOS fills its row's masks to the right with EOS (dlm.generate eos_fill=true sets it), so
    the tail is never drawn; without it the sampler is unchanged (the same tokens for the same generator)."""
    EOS = 0

    class EosFirst(Recording):  # EOS is by far the likeliest token everywhere
        def __call__(self, x, t=None):
            self.inputs.append(x.clone())
            logits = torch.zeros(*x.shape, V + 1)
            logits[..., EOS] = 6.0
            return logits.log_softmax(-1)

    x = masked_rows(B=4, T=14, given=2)
    run = lambda **kw: AncestralSampler(steps=12, record_trajectory=True, **kw).sample(  # noqa: E731
        EosFirst(), x, prior=MaskPrior(MASK, LinearSchedule()), generator=torch.Generator().manual_seed(0))
    filled, plain, again = run(eos_id=EOS), run(), run(eos_id=None)
    assert torch.equal(plain.tokens, again.tokens) and plain.num_network_calls == again.num_network_calls
    for state in filled.trajectory:  # after every step: no mask right of a generated EOS
        generated = state[:, 2:]
        after_eos = (generated == EOS).long().cumsum(1) > 0
        assert not (after_eos & (generated == MASK)).any()
    assert any(((s[:, 2:] == MASK) & ((s[:, 2:] == EOS).long().cumsum(1) > 0)).any() for s in plain.trajectory)
    assert filled.num_network_calls < plain.num_network_calls
    assert not (filled.tokens == MASK).any() and torch.equal(filled.tokens[:, :2], x[:, :2])


def test_d3pm_computes_each_alpha_bar_once_and_samples_as_before():
    """Each ᾱ_t of the time grid is computed once (a step's ᾱ_t is the previous step's ᾱ_s), with the tokens and
    calls of the sampler before that change for the same generator (fixed seed)."""
    times = []
    alpha = spindle_like_alpha_bar(64)

    def counted(t):
        times.append(t)
        return alpha(t)

    x = masked_rows(B=3, T=10)
    gen = D3PMSampler(steps=128, cap_steps=False).sample(Recording(3), x, prior=D3PMPrior(MASK, counted, 64),
                                                         generator=torch.Generator().manual_seed(4))
    assert len(times) == len(set(times))
    assert gen.num_network_calls == 22
    assert gen.tokens.tolist() == [[5, 3, 4, 6, 6, 4, 0, 3, 7, 0], [0, 1, 4, 1, 1, 5, 0, 3, 5, 1],
                                   [6, 5, 2, 4, 5, 0, 1, 5, 2, 1]]


def test_the_exact_path_estimator_refuses_an_eos_filling_ancestral_sampler():
    from dlm.rl.estimators import PathLogProb

    PathLogProb().check_sampler(AncestralSampler())
    with pytest.raises(ValueError, match="eos_id=0\\) fills a row's tail after EOS; set sampler.eos_id=null"):
        PathLogProb().check_sampler(AncestralSampler(eos_id=0))
