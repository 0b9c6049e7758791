"""SUNDAE: uniform corruption without masks, the unrolled loss's gradient path, samplers that keep the given tokens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dlm.methods.sundae import SUNDAE
from dlm.models import Transformer
from dlm.sampling import AncestralSampler, ArgmaxUnrolledSampler, SundaeSampler, UniformPrior

TOKENIZER = SimpleNamespace(vocab_size=7, pad_token_id=4, eos_token_id=5, mask_token_id=6)
MASK = TOKENIZER.mask_token_id
SEQUENCES = torch.tensor([[0, 1, 2, 3, 0, 1], [1, 1, 0, 2, 3, 3], [2, 0, 3, 1, 2, 0], [3, 2, 1, 0, 1, 2]])


def make(unroll_steps: int = 2, sampler=None) -> SUNDAE:
    torch.manual_seed(0)
    backbone = Transformer(vocab_size=7, n_layers=2, d_model=64, n_heads=4, max_seq_len=16)
    return SUNDAE(backbone, TOKENIZER, unroll_steps=unroll_steps, sampler=sampler or SundaeSampler(steps=8))


def toy_batch(n: int, generator: torch.Generator) -> dict:
    ids = SEQUENCES[torch.randint(0, 4, (n,), generator=generator)]
    return {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}


def test_corruption_is_uniform_replacement_at_a_per_sequence_rate_and_never_a_mask():
    model = make()
    x0 = torch.zeros(4000, 32, dtype=torch.long)
    counted = torch.ones_like(x0, dtype=torch.bool)
    counted[:, -4:] = False
    xt = model.corrupt(x0, counted, torch.Generator().manual_seed(0))
    assert not (xt == MASK).any() and torch.equal(xt[:, -4:], x0[:, -4:])
    # replaced with prob r ~ U[0,1], and a replacement equals the original with prob 1/6: E[changed] = 0.5 * 5/6
    changed = (xt[:, :-4] != 0).double().mean(1)
    assert abs(changed.mean().item() - 0.5 * 5 / 6) < 0.02
    assert changed.min() < 0.1 and changed.max() > 0.75  # rates vary per sequence
    noise = xt[xt != 0]
    freq = torch.bincount(noise, minlength=7)[1:6].double() / noise.numel()
    assert torch.allclose(freq, torch.full((5,), 0.2, dtype=torch.float64), atol=0.01)


def test_unrolled_loss_is_the_mean_ce_and_backpropagates_only_through_each_steps_own_prediction():
    model = make(unroll_steps=3)
    batch = toy_batch(16, torch.Generator().manual_seed(0))
    out = model.unrolled_terms(batch, torch.Generator().manual_seed(1))
    assert len(out["inputs"]) == 3
    assert all(not x.requires_grad and x.dtype == torch.long for x in out["inputs"])
    assert not torch.equal(out["inputs"][0], out["inputs"][1])  # x_2 is a fresh draw from the model
    loss = out["per_token"].sum()
    model.zero_grad()
    loss.backward()
    unrolled = [p.grad.clone() for p in model.parameters()]

    # Reference: each step's CE on its (fixed) input, back-propagated separately, then averaged.
    model.zero_grad()
    for x in out["inputs"]:
        logits = model.logits(x).float()
        logits[..., MASK] = float("-inf")
        ce = F.cross_entropy(logits.transpose(1, 2), batch["input_ids"], reduction="none")
        (ce.sum() / 3).backward()
    for got, want in zip(unrolled, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_one_unroll_step_is_plain_denoising():
    model = make(unroll_steps=1)
    out = model.unrolled_terms(toy_batch(8, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(0))
    assert len(out["inputs"]) == 1
    torch.testing.assert_close(out["per_token"], out["ces"][0])


def test_training_lowers_the_loss():
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = model.loss(toy_batch(32, g), generator=g)["loss"].item()
    for _ in range(60):
        loss = model.loss(toy_batch(32, g), generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.3


def test_nll_bound_is_refused_with_a_pointer_to_generative_metrics():
    model = make()
    with pytest.raises(NotImplementedError, match="sample/valid_frac"):
        model.nll_bound(toy_batch(2, torch.Generator().manual_seed(0)))
    stats = model.validation_stats(toy_batch(4, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(0))
    assert "loss" in stats and "nll_bound" not in stats


@pytest.mark.parametrize("sampler", [SundaeSampler(steps=6, temperature=0.8, update_proportion=0.3),
                                     SundaeSampler(steps=6, temperature=1.0, top_k=3),
                                     ArgmaxUnrolledSampler(steps=4)], ids=["stochastic", "top_k", "argmax"])
def test_generate_keeps_the_prompt_and_never_emits_a_mask(sampler):
    model = make()
    prompt = torch.tensor([[0, 1], [3, 2]])
    gen = model.generate(prompt, length=6, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert gen.tokens.shape == (2, 8) and torch.equal(gen.tokens[:, :2], prompt)
    assert not (gen.tokens == MASK).any()
    assert 1 <= gen.num_network_calls <= sampler.steps
    uncond = model.generate(None, 6, sampler=sampler, num_samples=3, generator=torch.Generator().manual_seed(0))
    assert uncond.tokens.shape == (3, 6) and not (uncond.tokens == MASK).any()


def test_infill_changes_only_the_holes():
    model = make()
    tokens = SEQUENCES.clone()
    holes = torch.zeros_like(tokens, dtype=torch.bool)
    holes[:, 2] = holes[:, 4] = True
    gen = model.infill(tokens, holes, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gen.tokens[~holes], tokens[~holes]) and not (gen.tokens == MASK).any()


def test_sampler_stops_when_nothing_changes():
    """A denoiser that always predicts the current tokens: the first step changes nothing, so sampling stops."""
    def identity(x):
        return torch.log(F.one_hot(x, 7).double().clamp(min=1e-30))

    sampler = SundaeSampler(steps=50, temperature=0.8)
    x = SEQUENCES.clone()
    free = torch.zeros_like(x, dtype=torch.bool)
    gen = sampler.sample(identity, x, prior=UniformPrior(free, torch.arange(6)))
    assert gen.num_network_calls == 0
    free[:, 0] = True
    gen = sampler.sample(identity, x, prior=UniformPrior(free, torch.arange(6)), generator=torch.Generator().manual_seed(0))
    assert gen.num_network_calls == 1


def test_argmax_unrolled_is_deterministic_given_the_noise():
    model = make()
    a = model.generate(None, 6, sampler=ArgmaxUnrolledSampler(steps=5), num_samples=2,
                       generator=torch.Generator().manual_seed(3))
    b = model.generate(None, 6, sampler=ArgmaxUnrolledSampler(steps=5), num_samples=2,
                       generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.tokens, b.tokens)


def test_mask_samplers_and_time_conditioned_backbones_are_refused():
    with pytest.raises(ValueError, match="SUNDAE sampler"):
        make(sampler=AncestralSampler(steps=4))
    backbone = Transformer(vocab_size=7, n_layers=1, d_model=32, n_heads=2, max_seq_len=8, time_conditioning=True)
    with pytest.raises(ValueError, match="time_conditioning=false"):
        SUNDAE(backbone, TOKENIZER)
