"""DiffusionBERT's VLB terms, computed per sequence where they depend on (t, j) only, against the per-token float64
formula they replaced: the same per-token KL, CE, loss, nll_bound and parameter gradients (to float tolerance) for
spindle and linear schedules, t = 1 (a_j = 1 everywhere), t = T and mixed t, every time conditioning."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dlm.methods.diffusionbert import _BLOCKED, DiffusionBERT
from dlm.models import Transformer
from dlm.schedules import LinearSchedule
from dlm.spindle import SpindleSchedule

V, L, B, STEPS = 64, 12, 4, 8
TOKENIZER = SimpleNamespace(vocab_size=V, pad_token_id=0, eos_token_id=1, mask_token_id=V - 1)
RTOL, ATOL = 1e-5, 1e-6  # atol relative to the values' scale


# ---- the previous implementation: a float64 [N, V] posterior gathered per masked token -----------------------
def reference_posterior(model: DiffusionBERT, t: torch.Tensor) -> torch.Tensor:
    a_t, a_s = model.alpha_bar(t), model.alpha_bar(t - 1)
    return ((a_s - a_t) / (1 - a_t).clamp(min=1e-12)).clamp(0.0, 1.0)


def reference_kl(logp: torch.Tensor, x0: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    lp_i = logp.gather(-1, x0[:, None]).squeeze(-1).double()
    a_i = post.gather(-1, x0[:, None]).squeeze(-1)
    stay = 1 - a_i
    log_stay = torch.where(post < 1, torch.log1p(-post), torch.full_like(post, _BLOCKED)).to(logp.dtype)
    log_mask_p = torch.logsumexp(logp + log_stay, dim=-1).double()
    safe_stay = torch.where(stay > 0, stay, torch.ones_like(stay))
    mask_term = torch.where(stay > 0, stay * (torch.log(safe_stay) - log_mask_p), torch.zeros_like(stay))
    return -a_i * lp_i + mask_term


def reference_vlb_terms(model: DiffusionBERT, batch: dict, generator: torch.Generator):
    x0, counted = batch["input_ids"], batch["loss_mask"].bool()
    t = model.sample_steps(x0.shape[0], generator)
    keep = model.alpha_bar(t).gather(1, x0)
    u = torch.rand(x0.shape, device=x0.device, generator=generator, dtype=torch.float64)
    masked = (u >= keep) & counted
    xt = torch.where(masked, model.mask_id, x0)
    lp = model.log_probs(xt, t, at=masked, **model.backbone_kwargs(batch))
    rows = torch.arange(x0.shape[0])[:, None].expand_as(x0)[masked]
    post = reference_posterior(model, t)[rows]
    target = x0[masked]
    nll = torch.zeros(x0.shape, dtype=torch.float64)
    nll[masked] = model.num_steps * reference_kl(lp, target, post)
    ce = torch.zeros_like(nll)
    ce[masked] = -lp.gather(-1, target[:, None]).squeeze(-1).double()
    correct = torch.zeros_like(masked)
    correct[masked] = lp.argmax(-1) == target
    return nll.float(), ce.float(), masked, correct


# ---- helpers -------------------------------------------------------------------------------------------------
def make(schedule: str, mode: str) -> DiffusionBERT:
    torch.manual_seed(0)
    net = Transformer(vocab_size=V, n_layers=2, d_model=32, n_heads=4, max_seq_len=L + 1,
                      time_conditioning=mode == "layerwise")
    model = DiffusionBERT(net, TOKENIZER, SpindleSchedule(0.3) if schedule == "spindle" else LinearSchedule(),
                          num_steps=STEPS, time_conditioning=mode, aux_weight=0.5)
    # Zipf-like counts: the spindle schedule masks frequent tokens later, so a_j differs across j
    model.set_token_counts((1e5 / torch.arange(1, V + 1)).long())
    return model.eval()  # no dropout: both implementations see the same network


def make_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 1, (B, L), generator=g)
    loss_mask = torch.ones(B, L, dtype=torch.bool)
    loss_mask[2, -4:] = False
    return {"input_ids": ids, "loss_mask": loss_mask}


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = want.detach().abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL * max(scale, 1.0))


def run(model: DiffusionBERT, batch: dict, reference: bool):
    """Per-token terms, loss stats, nll_bound and every parameter's gradient, with fixed generators."""
    if reference:
        model._vlb_terms = lambda b, g: reference_vlb_terms(model, b, g)
    try:
        model.zero_grad(set_to_none=True)
        terms = model._vlb_terms(batch, torch.Generator().manual_seed(5))
        out = model.loss(batch, generator=torch.Generator().manual_seed(7))
        out["loss"].backward()
        with torch.no_grad():
            bound = model.nll_bound(batch, generator=torch.Generator().manual_seed(7))
    finally:
        model.__dict__.pop("_vlb_terms", None)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [x.detach() for x in terms], {k: v.detach() for k, v in out.items()}, bound, grads


# "mixed": a different t per sequence, t = 1 and t = T among them; None: the stratified draw of training
STEP_CASES = {"t1": [1] * B, "t2": [2] * B, "tmid": [STEPS // 2] * B, "tT": [STEPS] * B,
              "mixed": [1, STEPS, 3, 2], "sampled": None}


@pytest.mark.parametrize("steps", list(STEP_CASES), ids=list(STEP_CASES))
@pytest.mark.parametrize("mode", ["none", "token", "layerwise"])
@pytest.mark.parametrize("schedule", ["spindle", "linear"])
def test_vlb_terms_loss_bound_and_gradients_match_the_per_token_float64_formula(schedule, mode, steps):
    model = make(schedule, mode)
    if STEP_CASES[steps] is not None:
        fixed = torch.tensor(STEP_CASES[steps])
        model.sample_steps = lambda n, generator=None: fixed[:n]
    batch = make_batch()
    terms, out, bound, grads = run(model, batch, reference=False)
    ref_terms, ref_out, ref_bound, ref_grads = run(model, batch, reference=True)

    nll, ce, masked, correct = terms
    assert masked.any() and torch.equal(masked, ref_terms[2]) and torch.equal(correct, ref_terms[3])
    close(nll, ref_terms[0])
    close(ce, ref_terms[1])
    assert torch.all(nll[~masked] == 0) and torch.all(nll[masked] >= -1e-4)  # a KL: never negative
    for key in ref_out:
        close(out[key], ref_out[key])
    close(bound, ref_bound)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name  # also at t = 1, where log(1 − a_j) is _BLOCKED for every j
        close(g, ref_grads[name])


def test_t1_is_the_cross_entropy():
    """t = 1: a_j = 1 for every token, so the KL is −log p_θ(i) and nll = T · CE."""
    model = make("spindle", "none")
    model.sample_steps = lambda n, generator=None: torch.ones(n, dtype=torch.long)
    nll, ce, masked, _ = model._vlb_terms(make_batch(), torch.Generator().manual_seed(0))
    assert masked.any()
    close(nll[masked], STEPS * ce[masked])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_terms_with_per_sequence_posteriors_match_the_gathered_ones(dtype):
    """kl_terms(logp, x0, post [S, V], rows) against the per-row form, with rows grouped, ungrouped, a sequence
    without rows and a_j = 1 (t = 1) in one of the sequences."""
    model = make("spindle", "none")
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([1, 3, STEPS, 5, 2])
    post = model.posterior_reveal_prob(t)  # [S, V] float64
    for rows in (torch.tensor([0, 0, 1, 1, 1, 2, 4, 4]), torch.tensor([4, 1, 0, 2, 1, 4, 0, 1])):
        logits = torch.randn(len(rows), V, generator=g, dtype=dtype)
        logits[:, V - 1] = float("-inf")
        logp = logits.log_softmax(-1)
        x0 = torch.randint(0, V - 1, (len(rows),), generator=g)
        want = reference_kl(logp, x0, post[rows])
        close(model.kl_terms(logp, x0, post, rows), want)
        close(model.kl_terms(logp, x0, post[rows]), want)
    empty = torch.zeros(0, dtype=torch.long)
    assert model.kl_terms(torch.zeros(0, V, dtype=dtype), empty, post, empty).shape == (0,)
