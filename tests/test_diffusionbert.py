"""DiffusionBERT: the D3PM posterior against brute force, the VLB is a bound that holds, time conditioning, sampling."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch

from dlm.methods.diffusionbert import DiffusionBERT
from dlm.models import Transformer
from dlm.safe_load import load_checkpoint
from dlm.sampling import D3PMSampler, LowConfidenceSampler
from dlm.schedules import CosineSchedule, LinearSchedule
from dlm.spindle import SpindleSchedule

TOKENIZER = SimpleNamespace(vocab_size=7, pad_token_id=4, eos_token_id=5, mask_token_id=6)
MASK = TOKENIZER.mask_token_id
SEQUENCES = torch.tensor([[0, 1, 2, 3, 0, 1], [1, 1, 0, 2, 3, 3], [2, 0, 3, 1, 2, 0], [3, 2, 1, 0, 1, 2]])
TRUE_ENTROPY = math.log(4) / 6
TOY_COUNTS = torch.tensor([900, 500, 120, 20, 0, 3, 0])  # skewed, so spindle differs per token


def make(schedule=None, time_conditioning="none", num_steps=8, counts=TOY_COUNTS, **kw) -> DiffusionBERT:
    torch.manual_seed(0)
    backbone = Transformer(vocab_size=7, n_layers=2, d_model=64, n_heads=4, max_seq_len=16,
                           time_conditioning=time_conditioning == "layerwise")
    model = DiffusionBERT(backbone, TOKENIZER, schedule or SpindleSchedule(0.3), num_steps=num_steps,
                          time_conditioning=time_conditioning, sampler=D3PMSampler(steps=num_steps), **kw)
    if counts is not None:
        model.set_token_counts(counts)
    return model


def toy_batch(n: int, generator: torch.Generator) -> dict:
    ids = SEQUENCES[torch.randint(0, 4, (n,), generator=generator)]
    return {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}


# ---- the posterior and the KL against brute force -----------------------------------------------------------
def brute_force_posterior(alpha: torch.Tensor, t: int, x0: int) -> torch.Tensor:
    """q(x_{t-1} | x_t = mask, x0) over all V states by Bayes' rule on the one-step transition matrices."""
    V = alpha.shape[1]

    def marginal(step: int) -> torch.Tensor:  # q(x_step | x0) over states
        q = torch.zeros(V, dtype=torch.float64)
        q[x0], q[MASK] = alpha[step, x0], 1 - alpha[step, x0]
        return q

    def one_step(step: int) -> torch.Tensor:  # Q[a, b] = q(x_step = b | x_{step-1} = a)
        Q = torch.zeros(V, V, dtype=torch.float64)
        for a in range(V):
            if a == MASK:
                Q[a, MASK] = 1.0
            else:
                keep = alpha[step, a] / alpha[step - 1, a] if alpha[step - 1, a] > 0 else torch.tensor(0.0)
                Q[a, a], Q[a, MASK] = keep, 1 - keep
        return Q

    joint = marginal(t - 1) * one_step(t)[:, MASK]  # q(x_{t-1}) q(x_t = mask | x_{t-1})
    return joint / joint.sum()


@pytest.mark.parametrize("schedule", [SpindleSchedule(0.3), LinearSchedule(), CosineSchedule()],
                         ids=["spindle", "linear", "cosine"])
def test_posterior_matches_brute_force_on_a_tiny_vocabulary(schedule):
    model = make(schedule, num_steps=6)
    alpha = model.alpha_bar(torch.arange(7))
    for t, x0 in itertools.product(range(1, 7), range(4)):
        expected = brute_force_posterior(alpha, t, x0)
        a = model.posterior_reveal_prob(torch.tensor(t))[x0]
        torch.testing.assert_close(expected[x0], a, atol=1e-9, rtol=0)
        torch.testing.assert_close(expected[MASK], 1 - a, atol=1e-9, rtol=0)


def test_kl_matches_brute_force_kl_to_the_x0_parameterised_reverse_step():
    model = make(SpindleSchedule(0.3), num_steps=6)
    alpha = model.alpha_bar(torch.arange(7))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, generator=g, dtype=torch.float64)
    logits[:, MASK] = float("-inf")
    logp = logits.log_softmax(-1)
    for t in range(1, 7):
        post = model.posterior_reveal_prob(torch.tensor(t))
        for x0 in range(4):
            p_x0 = logp[x0].exp()
            # p(x_{t-1}) = sum_j p(x0 = j) q(x_{t-1} | x_t = mask, x0 = j)
            reverse = sum(p_x0[j] * brute_force_posterior(alpha, t, j) for j in range(7) if j != MASK)
            q = brute_force_posterior(alpha, t, x0)
            support = q > 0
            expected = (q[support] * (q[support].log() - reverse[support].log())).sum()
            got = model.kl_terms(logp[x0:x0 + 1], torch.tensor([x0]), post[None])[0]
            torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-7)


def test_unmasked_positions_carry_no_loss_and_t1_is_cross_entropy():
    model = make(num_steps=4)
    post = model.posterior_reveal_prob(torch.tensor(1))
    assert torch.allclose(post[:4], torch.ones(4, dtype=torch.float64))
    logp = torch.randn(1, 7).log_softmax(-1)
    torch.testing.assert_close(model.kl_terms(logp.double(), torch.tensor([2]), post[None])[0], -logp[0, 2].double())
    nll, ce, masked, _ = model._vlb_terms(toy_batch(32, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    assert torch.all(nll[~masked] == 0) and torch.all(ce[~masked] == 0) and masked.any()


# ---- the VLB is a bound ------------------------------------------------------------------------------------
def bound_estimate(model: DiffusionBERT, n: int = 2048) -> tuple[float, float]:
    g = torch.Generator().manual_seed(123)
    batch = toy_batch(n, g)
    with torch.no_grad():
        per_seq = model.nll_bound(batch, generator=g).double().sum(1) / batch["input_ids"].shape[1]
    return per_seq.mean().item(), per_seq.std().item() / math.sqrt(n)


def test_vlb_of_a_trained_tiny_model_stays_above_the_true_entropy():
    counts = torch.bincount(SEQUENCES.flatten(), minlength=7)
    model = make(SpindleSchedule(0.3), num_steps=16, counts=counts)
    before, se_before = bound_estimate(model)
    assert before > TRUE_ENTROPY - 3 * se_before
    steps = 200  # a short run: the point is that the bound holds while it falls, not how far it falls
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = model.loss(toy_batch(32, g), generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    after, se_after = bound_estimate(model)
    assert after > TRUE_ENTROPY - 3 * se_after, f"VLB {after:.4f} below the entropy {TRUE_ENTROPY:.4f}"
    assert after < before - 0.5
    assert after < TRUE_ENTROPY + 0.35, f"VLB {after:.4f} did not approach the entropy {TRUE_ENTROPY:.4f}"


# ---- time conditioning and sampling -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["none", "token", "layerwise"])
def test_each_time_conditioning_trains_and_samples_without_masks(mode):
    model = make(time_conditioning=mode)
    out = model.loss(toy_batch(8, torch.Generator().manual_seed(0)), generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    if mode == "token":
        assert model.time_embedding.weight.grad is not None and model.time_embedding.weight.grad.abs().sum() > 0
        # the time token changes the prediction: it is really read
        x = torch.full((1, 6), MASK)
        assert not torch.allclose(model.log_probs(x, torch.tensor([1])), model.log_probs(x, torch.tensor([8])))
    prompt = torch.tensor([[0, 1], [3, 2]])
    gen = model.generate(prompt, length=6, generator=torch.Generator().manual_seed(0))
    assert gen.tokens.shape == (2, 8) and torch.equal(gen.tokens[:, :2], prompt)
    assert not (gen.tokens == MASK).any()
    assert 1 <= gen.num_network_calls <= 8


def test_time_token_embedding_is_optimised():
    import functools

    model = make(time_conditioning="token")
    model.optimizer_factory = functools.partial(torch.optim.AdamW, lr=1e-3)
    optimizer = model.configure_optimizers()
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(model.time_embedding.weight) in params
    assert all(id(p) in params for p in model.backbone.parameters())


def test_fewer_sampler_steps_top_k_and_infill_keep_the_given_tokens():
    model = make(num_steps=8)
    tokens = SEQUENCES.clone()
    holes = torch.zeros_like(tokens, dtype=torch.bool)
    holes[:, 1] = holes[:, 4] = True
    for sampler in (D3PMSampler(steps=3, top_k=2, temperature=0.7), D3PMSampler(steps=100),
                    LowConfidenceSampler(steps=4)):
        gen = model.infill(tokens, holes, sampler=sampler, generator=torch.Generator().manual_seed(0))
        assert torch.equal(gen.tokens[~holes], tokens[~holes])
        assert not (gen.tokens == MASK).any()
    assert model.infill(tokens, holes, sampler=D3PMSampler(steps=3)).num_network_calls <= 3


def test_spindle_without_counts_says_how_to_get_them():
    model = make(counts=None)
    with pytest.raises(RuntimeError, match="set_token_counts"):
        model.loss(toy_batch(4, torch.Generator().manual_seed(0)))


def test_mismatched_time_conditioning_is_refused():
    backbone = Transformer(vocab_size=7, n_layers=1, d_model=32, n_heads=2, max_seq_len=8)
    with pytest.raises(ValueError, match="model.time_conditioning=true"):
        DiffusionBERT(backbone, TOKENIZER, LinearSchedule(), time_conditioning="layerwise")


def test_training_run_counts_tokens_into_the_checkpoint(run_cfg):
    from dlm.train import train

    run_dir = train(run_cfg("method=diffusionbert", "schedule=spindle", "method.num_steps=32"))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["val/nll_bound"] > 0 and results["val/loss"] >= results["val/nll_bound"]
    assert 0.0 <= results["sample/valid_frac"] <= 1.0
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    assert state["token_counts"].sum() > 0
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert rows and all("_" not in r["text"] for r in rows if r["kind"] != "infill")
