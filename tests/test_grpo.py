"""method=grpo (dlm/methods/grpo.py) and its parts: the objective's maths against a hand-computed example
(dlm/rl/objective.py), each log-probability estimator against exact enumeration on a tiny vocabulary and length
(dlm/rl/estimators.py), the reward rising on a fixed seed, exact resume mid-batch of generations (rollout RNG
included), the frozen reference bit for bit, and a 2-rank ZeRO-2 CPU run (slow)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlm.rewards.base import Reward
from dlm.rl.estimators import ELBOLogProb, ExactLogProb, MeanFieldLogProb, PathLogProb
from dlm.rl.objective import (
    clipped_policy_loss,
    entropy_shaped_rewards,
    group_advantages,
    k3_kl,
    kl_shaped_rewards,
    sequence_log_prob,
)

TESTS = Path(__file__).resolve().parent


class OpenFraction(Reward):
    """Test reward: the fraction of '(' among the completion's characters (dense: a random model has variance)."""

    name = "open"

    def score(self, completions, prompts, **columns):
        return [c.count("(") / max(len(c), 1) for c in completions]


def open_fraction(prompts, completions, **columns):
    """The same as a TRL-style reward function (reward=function reward.path=test_grpo:open_fraction)."""
    return OpenFraction().score(completions, prompts)


# ---- the objective's maths ------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / torch.tensor([std + 1e-4] * 4 + [1e-4] * 4)
    torch.testing.assert_close(group_advantages(rewards, 4), expected)
    # Dr. GRPO: no std scaling
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_a_completion_ends_at_its_first_stop_token_eos_or_end_of_turn():
    from dlm.rl.rollouts import completion_mask

    EOS, EOT = 9, 7
    tokens = torch.tensor([[1, 2, 3, EOT, 4, EOS], [1, 2, EOS, 3, EOT, 4], [1, 2, 3, 4, 5, 6]])  # prompt: 2 tokens
    expected = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(completion_mask(tokens, 2, (EOS, EOT)), expected)
    # EOS alone (a base model): the end-of-turn token is an ordinary one
    assert completion_mask(tokens, 2, (EOS,))[0].tolist() == [False, False, True, True, True, True]
    assert completion_mask(tokens, 2, None)[:, 2:].all()


def test_clipped_ratio_and_kl_by_hand():
    old = torch.log(torch.tensor([[0.4, 0.5], [0.4, 0.5]]))
    # ratios: [1.5, 0.7] for both sequences
    logp = (old + torch.log(torch.tensor([[1.5, 0.7], [1.5, 0.7]])))
    logp.requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    scored = torch.ones(2, 2, dtype=torch.bool)
    out = clipped_policy_loss(logp, old, adv, scored, epsilon_low=0.2, epsilon_high=0.2)
    # A = +1: min(1.5, 1.2) = 1.2 (clipped), min(0.7, 0.8) = 0.7; A = -1: min(-1.5, -1.2) = -1.5, min(-0.7, -0.8) = -0.8 (clipped)
    assert out.loss.item() == pytest.approx(-((1.2 + 0.7) / 2 + (-1.5 - 0.8) / 2) / 2)
    assert out.clipped.tolist() == [[True, False], [False, True]]
    out.loss.backward()
    # d(-ρA)/dlogp = -ρA, / 2 tokens / 2 sequences; the clipped tokens get no gradient
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.7 / 4], [1.5 / 4, 0.0]]))
    # clip-higher (DAPO): epsilon_high 0.6 leaves 1.5 unclipped
    wide = clipped_policy_loss(logp.detach(), old, adv, scored, epsilon_low=0.2, epsilon_high=0.6)
    assert wide.clipped.tolist() == [[False, False], [False, True]]
    # k3: exp(ref - logp) - (ref - logp) - 1 at logp = log 0.5, ref = log 0.25: 0.5 - log 0.5 - 1
    kl = k3_kl(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25])))
    assert kl.item() == pytest.approx(0.5 + math.log(2) - 1)
    assert k3_kl(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0.0
    # with beta the loss adds beta * the mean per-token KL; token normalisation and Dr. GRPO's constant
    ref = old.clone()
    with_kl = clipped_policy_loss(logp.detach(), old, adv, scored, beta=0.1, ref_logp=ref)
    kl_tokens = k3_kl(logp.detach(), ref)
    assert with_kl.loss.item() == pytest.approx(out.loss.item() + 0.1 * kl_tokens.mean().item(), rel=1e-6)
    partial = torch.tensor([[True, True], [True, False]])
    tok = clipped_policy_loss(logp.detach(), old, adv, partial, normalisation="tokens")
    assert tok.loss.item() == pytest.approx(-(1.2 + 0.7 - 1.5) / 3)
    const = clipped_policy_loss(logp.detach(), old, adv, partial, normalisation="constant", max_len=4)
    assert const.loss.item() == pytest.approx(-(1.2 + 0.7 - 1.5) / (2 * 4))


def test_kl_in_the_reward_by_hand():
    # two sequences of 3 tokens, the last of the second not scored: log-ratios (-1+2) + (-1+1.5) + 0 = 1.5 and
    # (-2+1) + (-0.5+0.5) = -1 (the unscored token's -4 vs -1 does not count)
    logp = torch.tensor([[-1.0, -1.0, -2.0], [-2.0, -0.5, -4.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, -1.5, -2.0], [-1.0, -0.5, -1.0]])
    scored = torch.tensor([[True, True, True], [True, True, False]])
    ratio = sequence_log_prob(logp, scored) - sequence_log_prob(ref, scored)
    torch.testing.assert_close(ratio, torch.tensor([1.5, -1.0]))
    assert not ratio.requires_grad  # it enters the advantage, not the graph
    shaped = kl_shaped_rewards(torch.tensor([1.0, 0.0]), ratio, 0.2)
    torch.testing.assert_close(shaped, torch.tensor([1.0 - 0.3, 0.0 + 0.2]))
    # a valid sequence the reference finds much less likely than the policy does can score below an invalid one
    torch.testing.assert_close(kl_shaped_rewards(torch.tensor([1.0, 0.0]), torch.tensor([6.0, 0.0]), 0.2),
                               torch.tensor([-0.2, 0.0]))


def test_entropy_in_the_reward_by_hand_and_its_gradient_is_the_entropy_bonus():
    # the unscored token does not count: log π = -1 - 2 = -3 and -2.5; the less likely string gains more
    logp = torch.tensor([[-1.0, -2.0, -7.0], [-2.0, -0.5, 0.0]], requires_grad=True)
    seq = sequence_log_prob(logp, torch.tensor([[True, True, False], [True, True, True]]))
    torch.testing.assert_close(seq, torch.tensor([-3.0, -2.5]))
    assert not seq.requires_grad
    torch.testing.assert_close(entropy_shaped_rewards(torch.tensor([1.0, 1.0]), seq, 0.1), torch.tensor([1.3, 1.25]))
    # a categorical policy over 4 strings: E_π[(r - α log π) ∇ log π] is the exact gradient of E_π[r] + α H(π)
    theta = torch.tensor([0.3, -1.0, 2.0, 0.1], requires_grad=True)
    rewards, alpha = torch.tensor([1.0, 0.0, 1.0, 0.5]), 0.2
    log_pi = torch.log_softmax(theta, 0)
    (exact,) = torch.autograd.grad((log_pi.exp() * rewards).sum() - alpha * (log_pi.exp() * log_pi).sum(), theta,
                                   retain_graph=True)
    shaped = entropy_shaped_rewards(rewards, log_pi.detach(), alpha)
    score = torch.stack([torch.autograd.grad(log_pi[o], theta, retain_graph=True)[0] for o in range(4)])
    torch.testing.assert_close((log_pi.exp().detach()[:, None] * shaped[:, None] * score).sum(0), exact)


class _ConstantConditionals:
    """A stub masked family whose every conditional log p(x_i | x_t) is one value ``log q`` (a parameter)."""

    mask_id = 9

    def __init__(self, q: float):
        self.value = torch.tensor(math.log(q), requires_grad=True)

    def mask_groups(self, T, device=None):
        return torch.zeros(T, dtype=torch.long, device=device)

    def masked_log_probs(self, xt, x0):
        masked = xt == self.mask_id
        return torch.where(masked, self.value, torch.zeros(())), torch.zeros(xt.shape)


def test_elbo_kl_reads_the_unweighted_conditionals_by_hand():
    # every conditional is log 0.5 under the policy and log 0.25 under the reference: whatever the masks, the KL's
    # per-token k3 is k3(log 0.5, log 0.25) = 0.5 - log 0.5 - 1, where the importance-weighted logp (weights up to n)
    # would differ by multiples of log 2
    policy, reference = _ConstantConditionals(0.5), _ConstantConditionals(0.25)
    tokens = torch.tensor([[1, 2, 1, 2, 2], [2, 2, 1, 1, 1]])
    scored = torch.zeros(2, 5, dtype=torch.bool)
    scored[:, 1:] = True
    est = ELBOLogProb(num_samples=2)
    cur = est(policy, tokens, scored, 1, generator=torch.Generator().manual_seed(0))
    ref = est(reference, tokens, scored, 1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cur.kl_logp, torch.where(scored, math.log(0.5), 0.0))
    assert not torch.allclose(cur.logp[scored], cur.kl_logp[scored])  # the weights are not all 1
    adv = torch.tensor([1.0, -1.0])
    out = clipped_policy_loss(cur.logp, cur.logp.detach(), adv, scored, beta=0.1, ref_logp=ref.kl_logp,
                              kl_logp=cur.kl_logp)
    k3 = 0.5 - math.log(0.5) - 1
    torch.testing.assert_close(out.kl[scored], torch.full((8,), k3))
    # ratio 1: the policy term is -mean_seq(A) = 0, so the loss is beta * k3; and its gradient is 0 too, since a
    # coupled pair's weights sum to n over a group (l * n/(2l) + (n-l) * n/(2(n-l)), or n * n/n when l = n)
    assert out.loss.item() == pytest.approx(0.1 * k3, rel=1e-6)
    out.loss.backward()
    # d/dv of beta * k3(v, ref) = beta * (1 - exp(ref - v)) = 0.1 * (1 - 0.5), the mean over tokens of one value
    assert policy.value.grad.item() == pytest.approx(0.1 * 0.5, rel=1e-5)
    # the mean-field estimator's KL reads its logp
    mf = MeanFieldLogProb()(policy, tokens, scored, 1)
    assert mf.kl_values is None and mf.kl_logp is mf.logp


# ---- the estimators against exact enumeration ------------------------------------------------------------------
def _tiny(family: str, block_size: int = 2):
    """A tiny random network with peaked predictions over 2 letters + pad + eos (+ mask), as an MDLM/BD3LM/AR."""
    from dlm.data.tokenizers import CharTokenizer
    from dlm.methods.ar import AR
    from dlm.methods.bd3lm import BD3LM
    from dlm.methods.mdlm import MDLM
    from dlm.models.transformer import Transformer
    from dlm.schedules import LinearSchedule

    torch.manual_seed(0)
    tok = CharTokenizer("ab")
    net = Transformer(vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=2, max_seq_len=16, init_std=0.5,
                      attention="bidirectional")
    if family == "mdlm":
        return MDLM(net, tok, schedule=LinearSchedule()).eval()
    if family == "bd3lm":
        return BD3LM(net, tok, schedule=LinearSchedule(), block_size=block_size).eval()
    return AR(net, tok).eval()


@torch.no_grad()
def _exact_elbo_terms(model, x: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """e_i (dlm/rl/estimators.py) by enumeration: each completion token over every subset of its group revealed
    (all the states in one batch)."""
    N = x.shape[0]
    groups = model.mask_groups(N)
    states, terms = [], []  # terms: (token, weight) per state
    for i in range(prompt_len, N):
        others = [j for j in range(prompt_len, N) if groups[j] == groups[i] and j != i]
        n = len(others) + 1
        for k in range(n):
            subsets = list(itertools.combinations(others, k))
            for S in subsets:
                xt = x.clone()
                for j in [i, *others]:
                    if j not in S:
                        xt[j] = model.mask_id
                states.append(xt)
                terms.append((i, 1.0 / len(subsets) / n))
    logp, _ = model.masked_log_probs(torch.stack(states), x[None].expand(len(states), N))
    out = torch.zeros(N, dtype=torch.float64)
    for row, (i, weight) in enumerate(terms):
        out[i] += weight * float(logp[row, i])
    return out


def _estimate(estimator, model, x, prompt_len, draws: int, seed: int = 0):
    tokens = x[None].repeat(draws, 1)
    scored = torch.zeros_like(tokens, dtype=torch.bool)
    scored[:, prompt_len:] = True
    with torch.no_grad():
        est = estimator(model, tokens, scored, prompt_len, generator=torch.Generator().manual_seed(seed))
    return est.logp.double()


@pytest.mark.parametrize("coupled", [True, False])
@pytest.mark.parametrize("family", ["mdlm", "bd3lm"])
def test_elbo_estimator_is_unbiased_for_the_enumerated_per_token_elbo(family, coupled):
    model = _tiny(family)
    x = torch.tensor([0, 1, 0, 0, 1])  # prompt "a", completion "baab"
    P = 1
    exact = _exact_elbo_terms(model, x, P)
    K = 2 if coupled else 1
    draws = _estimate(ELBOLogProb(num_samples=K, coupled=coupled), model, x, P, draws=4000)
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert exact[:P].abs().sum() == 0 and draws[:, :P].abs().sum() == 0  # the prompt is never scored
    gap = (mean - exact).abs()[P:]
    assert bool((gap <= 5 * stderr[P:] + 1e-6).all()), (mean, exact, stderr)
    assert exact[P:].sum() < 0


def test_coupled_pairs_have_lower_variance_than_independent_draws_at_the_same_cost():
    model = _tiny("mdlm")
    x = torch.tensor([0, 1, 0, 0, 1])
    coupled = _estimate(ELBOLogProb(num_samples=2, coupled=True), model, x, 1, draws=3000).sum(1)
    independent = _estimate(ELBOLogProb(num_samples=2, coupled=False), model, x, 1, draws=3000).sum(1)
    assert coupled.var() < independent.var(), (coupled.var(), independent.var())


@torch.no_grad()
def test_the_elbo_lower_bounds_the_enumerated_any_order_log_likelihood():
    """Σ_i e_i <= log π(o | q) = log E_σ Π_k p(o_σk | q, o_σ<k), by enumeration over every order; the any-order
    likelihoods of all completions sum to 1."""
    model = _tiny("mdlm")
    P, C = 1, 3
    letters = [t for t in range(model.vocab_size) if t != model.mask_id]
    orders = list(itertools.permutations(range(P, P + C)))
    completions = list(itertools.product(letters, repeat=C))
    x = torch.tensor([[0, *c] for c in completions])  # [M, N]
    xs = x.repeat_interleave(len(orders), 0)  # every (completion, order) pair
    xt = xs.clone()
    xt[:, P:] = model.mask_id
    log_order = torch.zeros(xs.shape[0], dtype=torch.float64)
    pos = torch.tensor([o for _ in completions for o in orders])  # [M * orders, C]
    rows = torch.arange(xs.shape[0])
    for k in range(C):  # reveal in each order, one position per forward of the whole batch
        logp, _ = model.masked_log_probs(xt, xs)
        log_order += logp[rows, pos[:, k]].double()
        xt[rows, pos[:, k]] = xs[rows, pos[:, k]]
    log_lik = torch.logsumexp(log_order.view(len(completions), len(orders)), 1) - math.log(len(orders))
    total = float(log_lik.exp().sum())
    for m in range(0, len(completions), 7):  # the bound, on a spread of completions
        assert float(_exact_elbo_terms(model, x[m], P).sum()) <= float(log_lik[m]) + 1e-6
    assert total == pytest.approx(1.0, abs=1e-5)


def test_mean_field_estimator_matches_the_enumerated_prompt_mask_average():
    model = _tiny("mdlm")
    x = torch.tensor([0, 1, 1, 0, 1])  # prompt "ab", completion "bab"
    P, p = 2, 0.5
    exact = torch.zeros(x.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for hidden in itertools.product([False, True], repeat=P):  # every prompt mask, weighted by its probability
            xt = x.clone()
            xt[P:] = model.mask_id
            for j, h in enumerate(hidden):
                if h:
                    xt[j] = model.mask_id
            weight = p ** sum(hidden) * (1 - p) ** (P - sum(hidden))
            exact[P:] += weight * model.masked_log_probs(xt[None], x[None])[0][0, P:].double()
    draws = _estimate(MeanFieldLogProb(p_mask_prompt=p), model, x, P, draws=4000)
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert bool(((mean - exact).abs()[P:] <= 5 * stderr[P:] + 1e-6).all()), (mean, exact)
    # without a prompt mask it is deterministic: the marginals of the fully masked completion
    draws = _estimate(MeanFieldLogProb(p_mask_prompt=0.0), model, x, P, draws=3)
    xt = x.clone()
    xt[P:] = model.mask_id
    with torch.no_grad():
        one = model.masked_log_probs(xt[None], x[None])[0][0].double()
    torch.testing.assert_close(draws[0, P:], one[P:], rtol=1e-5, atol=1e-5)
    assert draws.std(0).max() == 0


@torch.no_grad()
def test_exact_estimator_is_the_ar_likelihood_and_sums_to_one():
    model = _tiny("ar")
    letters = [t for t in range(model.vocab_size) if t != model.mask_id]
    total = 0.0
    for seq in itertools.product(letters, repeat=3):
        x = torch.tensor(seq)
        logp = _estimate(ExactLogProb(), model, x, 0, draws=1)[0]
        torch.testing.assert_close(logp, -model.nll_bound({"input_ids": x[None], "loss_mask": torch.ones(1, 3,
                                                           dtype=torch.bool)})[0].double(), rtol=1e-5, atol=1e-5)
        total += math.exp(float(logp.sum()))
    assert total == pytest.approx(1.0, abs=1e-5)


def test_estimators_refuse_a_family_they_cannot_estimate():
    with pytest.raises(ValueError, match="ExactLogProb"):
        MeanFieldLogProb().check(_tiny("ar"))
    with pytest.raises(ValueError, match="MeanFieldLogProb"):
        ExactLogProb().check(_tiny("mdlm"))
    with pytest.raises(ValueError, match="even"):
        ELBOLogProb(num_samples=3, coupled=True)


def _path(model, tokens, order, prompt_len):
    scored = torch.zeros_like(tokens, dtype=torch.bool)
    scored[:, prompt_len:] = True
    with torch.no_grad():
        return PathLogProb()(model, tokens, scored, prompt_len, reveal_step=order).logp.double()


@torch.no_grad()
def test_path_estimator_is_a_distribution_over_completions_for_a_fixed_order():
    """For one reveal order (position 2 first, then 1 and 3 together, after a clean prompt token) the path
    probabilities of all 3-token completions sum to 1: each token is scored at its own step's canvas, never seeing
    itself or a later token (a leak would give each token probability 1 and a sum of V^3)."""
    model = _tiny("mdlm")
    letters = [t for t in range(model.vocab_size) if t != model.mask_id]
    seqs = torch.tensor([[letters[0], *seq] for seq in itertools.product(letters, repeat=3)])
    order = torch.tensor([-1, 1, 0, 1]).expand_as(seqs)
    logp = _path(model, seqs, order, 1)
    assert float(logp.sum(1).exp().sum()) == pytest.approx(1.0, abs=1e-5)
    # the first-revealed token saw only the prompt: the mean-field value (d1's, without the prompt mask)
    mf = _estimate(MeanFieldLogProb(p_mask_prompt=0.0), model, seqs[0], 1, draws=1)[0]
    assert float(logp[0, 2]) == pytest.approx(float(mf[2]), abs=1e-6)
    assert float(logp[0, 1]) != pytest.approx(float(mf[1]), abs=1e-4)  # later tokens see the revealed one


@torch.no_grad()
@pytest.mark.parametrize("name", ["AncestralSampler", "RandomOrderSampler"])
def test_path_estimator_is_the_ancestral_samplers_own_log_probability(name):
    """The sampler's probability of what it drew, step by step (its own denoiser on its own trajectory), equals the
    estimator's per-token values computed from the recorded reveal steps alone; for the random-order sampler (one
    position per row per step, in an order drawn independently of the model) as for the ancestral one."""
    import dlm.sampling

    model = _tiny("mdlm")
    sampler = getattr(dlm.sampling, name)(steps=4, record_trajectory=True)
    PathLogProb().check_sampler(sampler)
    prompt = torch.full((6, 1), 0, dtype=torch.long)
    gen = model.generate(prompt, 5, sampler=sampler, generator=torch.Generator().manual_seed(3))
    traj = gen.trajectory
    own = torch.zeros(gen.tokens.shape, dtype=torch.float64)
    for before, after in zip(traj[:-1], traj[1:]):
        new = (before == model.mask_id) & (after != model.mask_id)
        lp = _sampler_logp(model.denoise(before), model.mask_id)
        own[new] = lp.gather(-1, after[..., None])[..., 0][new].double()
    order = sum((c == model.mask_id).long() for c in traj[1:])
    order[:, :1] = -1
    assert len({tuple(r) for r in order[:, 1:].tolist()}) > 1  # the rows took different paths
    torch.testing.assert_close(_path(model, gen.tokens, order, 1), own, rtol=1e-5, atol=1e-5)


def _sampler_logp(logp, mask_id):
    from dlm.sampling.base import Sampler

    return Sampler._exclude_mask(logp, mask_id)


def test_path_estimator_refuses_block_families_and_model_ordered_samplers():
    from dlm.sampling import AncestralSampler, LowConfidenceSampler

    with pytest.raises(ValueError, match="ELBOLogProb"):
        PathLogProb().check(_tiny("bd3lm"))
    with pytest.raises(ValueError, match="ExactLogProb"):
        PathLogProb().check(_tiny("ar"))
    with pytest.raises(ValueError, match="sampler=ancestral.*LowConfidenceSampler chooses"):
        PathLogProb().check_sampler(LowConfidenceSampler(steps=4))
    PathLogProb().check(_tiny("mdlm"))
    PathLogProb().check_sampler(AncestralSampler(steps=4))


# ---- runs ------------------------------------------------------------------------------------------------------
RL = [
    "method=grpo",
    "reward=function",  # a user's own reward function by import path (dlm.rewards.FunctionReward)
    "reward.path=test_grpo:open_fraction",
    "reward.name=open",
    "method.num_generations=4",
    "method.prompts_per_step=4",
    "method.completion_length=8",
    "sampler=ancestral",  # the rollouts' sampler (run_cfg sets sampler.steps=4)
    "lr_scheduler=constant",
    "lr_scheduler.warmup_steps=0",
    "optimizer.lr=3e-3",
    "samples.num_unconditional=4",
    "samples.num_prompted=0",
    "samples.num_infill=0",
    "trainer.val_check_interval=100",
]


def _metrics(run_dir: Path, key: str) -> dict[int, float]:
    import csv

    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def test_reward_rises_on_a_fixed_seed(run_cfg, tmp_path):
    from dlm.train import train

    run = train(run_cfg(*RL, "trainer.max_steps=12", "method.prompts_per_step=8"))
    reward = _metrics(run, "rl/reward_mean")
    assert len(reward) == 12
    first, last = sum(list(reward.values())[:3]) / 3, sum(list(reward.values())[-3:]) / 3
    assert last > first + 0.15, reward
    rows = [json.loads(line) for line in open(run / "samples.jsonl")]
    rollouts = [r for r in rows if r["kind"] == "rollout"]
    assert len(rollouts) == 12 * 8 * 4 and {"reward", "rewards", "advantage", "step"} <= set(rollouts[0])
    assert rollouts[0]["rewards"]["open"] == rollouts[0]["reward"]
    assert any(r["kind"] == "unconditional" for r in rows)  # the end-of-fit samples kept the rollouts
    for key in ("rl/reward_std", "rl/reward/open_mean", "rl/reward/open_std", "rl/kl", "rl/clip_frac",
                "rl/completion_len", "rl/entropy", "rl/gen_tokens_per_s", "rl/train_tokens_per_s"):
        assert len(_metrics(run, key)) == 12, key


def test_the_run_seed_sets_the_rollouts(run_cfg, tmp_path):
    """seed= alone gives another draw of rollouts: method.rollout_seed follows it (it did not, so two seeds of a
    GRPO run from one init_from drew the same rollouts)."""
    from dlm.train import train

    def rollouts(*overrides):  # (the seed also draws this tiny model's initial weights)
        run = train(run_cfg(*RL, "trainer.max_steps=1", *overrides, run_dir=tmp_path / "_".join(overrides).replace("=", "-")))
        return [json.loads(line)["text"] for line in open(run / "samples.jsonl") if '"rollout"' in line]

    seed0, seed1 = rollouts("seed=0"), rollouts("seed=1")
    assert len(seed0) == 16 and seed0 != seed1


@pytest.mark.parametrize("estimator", ["{_target_:dlm.rl.estimators.ELBOLogProb,num_samples:2}",
                                       "{_target_:dlm.rl.estimators.PathLogProb}"])
def test_resume_mid_batch_of_generations_continues_exactly(run_cfg, tmp_path, estimator):
    """μ = 3: the checkpoint at step 4 falls inside the second batch of generations (steps 3-5); PathLogProb's
    reveal orders travel in the checkpoint's buffer."""
    from dlm.safe_load import load_checkpoint
    from dlm.train import train

    common = [*RL, "method.num_iterations=3", "method.beta=0.05", "method.kl_reward_coef=0.1",
              "callbacks.last_checkpoint.every_n_train_steps=1",
              f"method.estimator={estimator}"]
    straight = train(run_cfg(*common, "trainer.max_steps=7", run_dir=tmp_path / "a"))
    split = tmp_path / "b"
    train(run_cfg(*common, "trainer.max_steps=4", run_dir=split))
    train(run_cfg(*common, "trainer.max_steps=7", "ckpt_path=last", run_dir=split))
    a = load_checkpoint(straight / "checkpoints" / "last.ckpt")
    b = load_checkpoint(split / "checkpoints" / "last.ckpt")
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
    assert torch.equal(a["grpo"]["rollout_rng"], b["grpo"]["rollout_rng"])
    if "PathLogProb" in estimator:
        assert all(torch.equal(x["reveal_step"], y["reveal_step"])
                   for x, y in zip(a["grpo"]["buffer"]["buckets"], b["grpo"]["buffer"]["buckets"]))
    rollouts = [[line for line in open(run / "samples.jsonl") if '"rollout"' in line] for run in (straight, split)]
    assert rollouts[0] == rollouts[1] and len(rollouts[0]) == 3 * 16  # generations at steps 0, 3, 6; none twice
    assert _metrics(straight, "rl/loss") == _metrics(split, "rl/loss")
    assert len(_metrics(straight, "rl/seq_log_ratio")) == 7  # the KL in the reward is logged
    assert len(_metrics(straight, "rl/seq_entropy")) == 7  # μ > 1 makes the old estimates: -log π(o) at no cost


def test_the_reference_stays_frozen_bit_for_bit_and_init_from_loads_the_run(run_cfg, tmp_path, workdir, train_cli):
    from conftest import TINY_CLI, run_dir_of

    from dlm.safe_load import load_checkpoint
    from dlm.train import train

    code, out, err = train_cli(*TINY_CLI)  # a run folder (.hydra/ included) to start from
    assert code == 0, err
    base = run_dir_of(out)
    start = load_checkpoint(base / "checkpoints" / "last.ckpt")["state_dict"]
    run = train(run_cfg(*RL, "trainer.max_steps=3", f"method.init_from={base}", "method.beta=0.1",
                        run_dir=tmp_path / "rl"))
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    ref = {k.removeprefix("reference."): v for k, v in state.items() if k.startswith("reference.")}
    assert ref and set(ref) == set(start)
    for name, value in start.items():
        assert torch.equal(ref[name], value), name  # the reference is the run it started from, bit for bit
    moved = [n for n, v in start.items() if not torch.equal(state[f"policy.{n}"], v)]
    assert moved, "the policy did not train"
    assert all(torch.equal(state[f"policy.{n}"], state[n]) for n in start)  # backbone is the policy's, one tensor


def test_reference_sync_mixes_the_policy_in_every_n_steps(run_cfg, tmp_path):
    """TRL's sync_ref_model: after steps 2 and 4 (every 2) reference <- 0.5 policy + 0.5 reference; a direct call of
    sync_reference checks the arithmetic on the final state."""
    from dlm.build import build_datamodule, build_module
    from dlm.safe_load import load_checkpoint
    from dlm.train import train

    common = [*RL, "method.beta=0.05", "callbacks.last_checkpoint.every_n_train_steps=1"]
    synced = train(run_cfg(*common, "trainer.max_steps=3", "method.ref_sync_every=2", "method.ref_mixup_alpha=0.5",
                           run_dir=tmp_path / "a"))
    plain = train(run_cfg(*common, "trainer.max_steps=3", run_dir=tmp_path / "b"))
    a, b = (load_checkpoint(r / "checkpoints" / "last.ckpt")["state_dict"] for r in (synced, plain))
    refs = [k for k in a if k.startswith("reference.")]
    assert refs
    # the same run up to step 2 (the sync happens after it), so after it the synced reference left the start
    assert any(not torch.equal(a[k], b[k]) for k in refs)
    cfg = run_cfg(*common, "method.ref_sync_every=2", "method.ref_mixup_alpha=0.25")
    module = build_module(cfg, build_datamodule(cfg))
    for p in module.policy.parameters():
        p.data.add_(1.0)
    before = {n: p.detach().clone() for n, p in module.reference.named_parameters()}
    module.sync_reference()
    for (name, ref), pol in zip(module.reference.named_parameters(), module.policy.parameters()):
        torch.testing.assert_close(ref, 0.75 * before[name] + 0.25 * pol)


def test_a_checkpoint_of_a_sync_step_holds_the_synced_reference(run_cfg, tmp_path):
    """The checkpoint callbacks write at a batch's end, before the module's own hook: the sync runs right after the
    optimizer step, so the checkpoint written at step 2 (a sync step, alpha = 1) holds reference == policy, and a
    run resumed from it goes on as the straight run does."""
    from dlm.safe_load import load_checkpoint
    from dlm.train import train

    every_step = ["+callbacks.each_step._target_=dlm.callbacks.checkpoint.ModelCheckpoint",
                  f"+callbacks.each_step.dirpath={tmp_path / 'each'}", "+callbacks.each_step.filename='step{step}'", "+callbacks.each_step.auto_insert_metric_name=false",
                  "+callbacks.each_step.save_top_k=-1", "+callbacks.each_step.every_n_train_steps=1"]
    train(run_cfg(*RL, "method.beta=0.05", "method.ref_sync_every=2", "method.ref_mixup_alpha=1.0",
                  "trainer.max_steps=4", *every_step))
    for step, synced in ((2, True), (3, False), (4, True)):  # (step 1: the warm-up's lr 0 leaves the policy as is)
        state = load_checkpoint(tmp_path / "each" / f"step{step}.ckpt")["state_dict"]
        pairs = [(state[k], state["policy." + k.removeprefix("reference.")]) for k in state
                 if k.startswith("reference.")]
        assert pairs and all(torch.equal(r, p) for r, p in pairs) is synced, step


def test_kl_in_the_reward_reuses_its_first_step_estimates_exactly(run_cfg):
    """With kl_reward_coef the first inner step's policy and reference estimates are made once (for the reward) and
    reused as the old and reference values: the same numbers as a fresh estimate, two estimates fewer."""
    from dlm.build import build_datamodule, build_module

    cfg = run_cfg(*RL, "method.num_iterations=3", "method.beta=0.05", "method.kl_reward_coef=0.1",
                  "method.samples_path=null")
    module = build_module(cfg, build_datamodule(cfg))
    module._gen = torch.Generator().manual_seed(0)
    module._prompt_iter = iter(module.prompts.rows("train"))
    calls = []
    estimate = module._estimate
    module._estimate = lambda model, bucket, generator: calls.append(model) or estimate(model, bucket, generator)
    buf = module._rollouts()
    (bucket,) = buf["buckets"]  # unconditional prompts: one prompt length, one bucket
    assert len(calls) == 2 + 2 * (3 - 1)  # reward: policy + reference; then inner steps 1 and 2 of each
    with module._reference() as reference:
        fresh = {key: estimate(model, bucket, module._estimator_generator(buf["generation"], 0, 0))
                 for key, model in (("old", module.policy), ("ref", reference))}
    assert torch.equal(bucket["old"][0], fresh["old"].logp) and torch.equal(bucket["ref"][0], fresh["ref"].kl_logp)


def test_the_entropy_in_the_reward_shapes_the_advantages(run_cfg):
    """method.entropy_reward_coef: the advantages are those of r - α log π_old(o), log π_old the first inner
    step's old estimate (the one μ = 2 reuses), and they differ from the plain rewards'."""
    from dlm.build import build_datamodule, build_module

    cfg = run_cfg(*RL, "method.num_iterations=2", "method.entropy_reward_coef=0.5", "method.samples_path=null")
    module = build_module(cfg, build_datamodule(cfg))
    module._gen = torch.Generator().manual_seed(0)
    module._prompt_iter = iter(module.prompts.rows("train"))
    totals, total = [], module.reward.total
    module.reward.total = lambda components: totals.append(total(components)) or totals[-1]
    buf = module._rollouts()
    (bucket,) = buf["buckets"]  # unconditional prompts: one bucket, the samples in order
    rewards = torch.tensor(totals[0])
    seq = sequence_log_prob(bucket["old"][0], bucket["scored"])
    expected = group_advantages(entropy_shaped_rewards(rewards, seq, 0.5), 4)
    torch.testing.assert_close(bucket["advantages"], expected)
    assert not torch.allclose(bucket["advantages"], group_advantages(rewards, 4))
    assert buf["stats"]["seq_entropy"] == pytest.approx(float(-seq.mean()))


def test_refusals_name_the_field(run_cfg):
    from hydra.utils import instantiate

    from dlm.build import build_module
    from dlm.config import ConfigError

    cfg = run_cfg(*RL, "method.policy._target_=dlm.methods.ar.AR", "~method.policy.sampler",
                  "method.estimator={_target_:dlm.rl.estimators.MeanFieldLogProb}")
    with pytest.raises(ConfigError, match="method: MeanFieldLogProb .*ExactLogProb"):
        build_module(cfg, instantiate(cfg.data))
    cfg = run_cfg(*RL, "method.num_generations=1")
    with pytest.raises(ConfigError, match="num_generations must be an integer >= 2"):
        build_module(cfg, instantiate(cfg.data))
    cfg = run_cfg(*RL, "method.kl_reward_coef=-1")
    with pytest.raises(ConfigError, match="kl_reward_coef must be >= 0"):
        build_module(cfg, instantiate(cfg.data))
    cfg = run_cfg(*RL, "method.entropy_reward_coef=-0.1")
    with pytest.raises(ConfigError, match="entropy_reward_coef must be >= 0"):
        build_module(cfg, instantiate(cfg.data))
    cfg = run_cfg(*RL, "method.init_from=/nonexistent/run")
    with pytest.raises(ConfigError, match="init_from=/nonexistent/run"):
        build_module(cfg, instantiate(cfg.data))
    cfg = run_cfg(*RL, "method.ref_sync_every=0")
    with pytest.raises(ConfigError, match="ref_sync_every=0 must be a positive number"):
        build_module(cfg, instantiate(cfg.data))
    cfg = run_cfg(*RL, "method.ref_sync_every=4", "method.ref_mixup_alpha=1.5")
    with pytest.raises(ConfigError, match=r"ref_mixup_alpha=1.5 must be in \(0, 1\]"):
        build_module(cfg, instantiate(cfg.data))
    cfg = run_cfg(*RL, "method.ref_sync_every=4", "model.lora.r=2")
    with pytest.raises(ConfigError, match="ref_sync_every with model.lora"):
        build_module(cfg, instantiate(cfg.data))


def test_ar_policy_trains_with_exact_log_probs(run_cfg):
    from dlm.train import train

    run = train(run_cfg(*RL, "method.policy._target_=dlm.methods.ar.AR", "~method.policy.sampler",
                        "trainer.max_steps=2", "sampler=ar", "sampler.steps=null"))
    assert len(_metrics(run, "rl/reward_mean")) == 2


def two_rank_rl_run(tmp_path, trainer: str, *overrides: str, timeout: int = 600):
    """A few GRPO steps on 2 CPU ranks through the CLI (tests/zero_cpu_strategy.py's strategy): (the run folder, the
    finished process)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    args = [*RL, f"trainer={trainer}", "trainer.strategy._target_=zero_cpu_strategy.CPUDeepSpeedStrategy",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=3",
            "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
            "data.batch_size=8", "data.source.num_train=256", "data.source.num_val=32", "logger=none",
            f"paths.output_root={tmp_path / 'runs'}", f"paths.cache_dir={tmp_path / 'cache'}", *overrides]
    proc = subprocess.run([sys.executable, "-m", "dlm.train", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(proc.stdout.strip().splitlines()[-1].removeprefix("run_dir: ")), proc


@pytest.mark.slow
def test_two_rank_zero2_cpu_run_of_a_few_rl_steps(tmp_path):
    run, _ = two_rank_rl_run(tmp_path, "deepspeed_zero2", "method.beta=0.05")
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["global_step"] == 3
    assert len(_metrics(run, "rl/reward_mean")) == 3
    assert (run / "checkpoints" / "last.ckpt").is_dir()  # a ZeRO folder
