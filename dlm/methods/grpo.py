"""method=grpo: group relative policy optimisation of any family (diffusion or the AR baseline) on a reward.

GRPO (Shao et al. 2024) as TRL's ``GRPOTrainer`` runs it (huggingface/trl, trl/trainer/grpo_trainer.py) and d1's
diffu-GRPO carries it to masked diffusion (Zhao et al. 2025, dllm-reasoning/d1): every ``num_iterations`` (μ)
optimizer steps the policy samples ``num_generations`` (G) completions of each of ``prompts_per_step`` prompts with
the family's own sampler (no gradient), a :class:`~dlm.rewards.base.RewardSet` scores them, the rewards become
group-normalised advantages, and each of the next μ steps minimises the clipped-ratio loss of dlm/rl/objective.py on
that batch of generations (TRL's buffered inputs: one optimizer step per Lightning step, so ``trainer.max_steps``,
checkpoints and the learning-rate schedule count optimizer steps as in every other method). The per-token
log-probabilities of the ratio come from a named estimator (dlm/rl/estimators.py: d1's mean-field, an ELBO with K
coupled draws, AR's exact ones, MDLM's exact path log-probability given the reveal order each rollout recorded);
the old policy's are computed once per generation batch (μ > 1) and the frozen reference's (β > 0, or ``track_kl``)
under the same masks.

The policy is a family module: ``init_from=<run folder>`` loads a trained run (its tokenizer, mask token, logit
shift, weights and sampler come with it; the composed ``model=`` is then unused), else ``policy`` is a family's
config node (``_partial_: true``) built around the composed model. ``sampler=<option>`` replaces the policy's
sampler for the rollouts and the end-of-fit samples. Validation reports the policy's own ``val/nll_bound`` on the
run's data, so drift from the pretrained distribution is visible beside the rewards.

The actions a rollout is scored on are the tokens its sampler drew: every completion position for a family that
samples the whole canvas (MDLM), up to and including the first stop token where the family sets the rest to EOS
(``eos_fills_tail``: AR, BD3-LM; TRL's completion mask). A stop token is EOS or an instruct policy's end-of-turn
token (``stop_ids``, dlm/stop_tokens.py): the completion the reward reads ends before it.

Exact resume: the rollout generator's state, the prompt rows consumed, and the batch of generations still in use
(tokens, advantages, old and reference log-probabilities, the reveal orders PathLogProb reads) are saved in every
checkpoint; the estimator's masks are a function of (seed, rank, generation, inner step). Rollouts go to
``samples.jsonl`` (kind ``rollout``, with each reward) and a resume drops the rows generated after its checkpoint.

Scale (recipes/grpo.md, d1 on LLaDA-8B-Instruct): ``model.lora.r=...`` trains adapters only, and the frozen reference
is then the base itself, read with the adapters off (dlm.models.lora.adapters_disabled: no copy of the model; an
``init_from`` run gets fresh adapters over its own, merged). ``model.gradient_checkpointing=true`` checkpoints the
policy's training forwards (HF backbones; the rollouts run in eval mode without gradient). ``sampler.kv_cache=...``
is the rollouts' (the threshold sampler's prefix/dual cache, BD3-LM's exact one). Each rank draws its own prompts
and rollouts (DDP / ZeRO-2 / ZeRO-3 average the gradients). Under ZeRO-3 every forward gathers parameters
collectively, so the ranks' forwards are kept in line: generation and the old/reference log-probabilities run in
lockstep (dlm.parallel.lockstep: a rank that is done runs throw-away forwards while others still sample), and the
training forwards match because every rank makes one bucket per prompt length drawn by any rank (a weight-0 dummy
row where it drew none) and each estimator makes a fixed number of forwards. The reference sync
(``ref_sync_every``) gathers each parameter pair on every rank and re-partitions the mixed reference.

Limits: ``trainer.accumulate_grad_batches`` must be 1 (raise ``prompts_per_step``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from dlm.data.chat import prompt_ids
from dlm.errors import UserError
from dlm.log_interval import logs_this_step
from dlm.methods.base import DiffusionLM, evaluating
from dlm.models.capabilities import conventions_of
from dlm.models.lora import adapter_spec, adapters_disabled, add_adapters
from dlm.models.lora_export import merge_adapters
from dlm.parallel import must_return_a_loss
from dlm.parallel.lockstep import gathers_parameters, lockstep
from dlm.parallel.params import gathered
from dlm.rewards.base import Reward, RewardSet, as_reward_set
from dlm.rewards.diversity import GROUP_COLUMN
from dlm.rl.estimators import ExactLogProb, LogProbEstimator, MeanFieldLogProb
from dlm.rl.objective import (
    clipped_policy_loss,
    entropy_shaped_rewards,
    group_advantages,
    k3_kl,
    kl_shaped_rewards,
    sequence_log_prob,
)
from dlm.rl.policy import policy_from_config, policy_from_run
from dlm.rl.rollouts import ROLLOUT, all_lengths, completion_mask, drop_rollouts_from, to_device
from dlm.rl.settings import check_settings, check_sync
from dlm.sampling import Generation, Sampler
from dlm.sampling.base import cut_at_eos


class GRPO(DiffusionLM):
    uses_schedule = True  # passed on to a policy built from config that takes one
    uses_reward = True  # reward= and prompts= (the top-level groups)

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        schedule=None,
        *,
        reward: RewardSet,
        prompts,
        estimator: LogProbEstimator | None = None,
        policy=None,
        init_from: str | None = None,
        init_ckpt: str = "last",
        num_generations: int = 8,
        prompts_per_step: int = 8,
        completion_length: int = 16,
        num_iterations: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        beta: float = 0.0,
        kl_reward_coef: float = 0.0,
        entropy_reward_coef: float = 0.0,
        scale_rewards: bool = True,
        normalisation: str = "sequence",
        track_kl: bool = True,
        rollout_seed: int = 0,
        samples_path: str | None = None,
        log_rollouts_every: int = 1,
        sampler: Sampler | None = None,
        chat_prompts: bool | None = None,
        ref_sync_every: int | None = None,
        ref_mixup_alpha: float = 0.6,
        **base_kwargs,
    ):
        check_settings(num_generations, prompts_per_step, completion_length, num_iterations, epsilon_low,
                        epsilon_high, beta, normalisation, log_rollouts_every, kl_reward_coef, entropy_reward_coef)
        if not isinstance(reward, Reward | RewardSet):
            raise ValueError(f"reward= must build a dlm.rewards Reward or RewardSet, got {type(reward).__name__}")
        reward = as_reward_set(reward)
        if not callable(getattr(prompts, "rows", None)):
            raise ValueError(f"prompts= must build a prompt source with rows(split), got {prompts!r}")
        family = policy_from_run(init_from, init_ckpt, tokenizer) if init_from else \
            policy_from_config(policy, backbone, tokenizer, schedule, sampler)
        # model.lora: adapters made for this run (B = 0: the policy starts as its base), so the frozen reference is
        # that base, read with the adapters switched off (no copy of the model); a run started from init_from gets
        # them here (the composed backbone carries the spec), over the run's own adapters merged in
        fresh_adapters = adapter_spec(backbone) is not None
        if init_from and fresh_adapters:
            if adapter_spec(family.backbone) is not None:
                merge_adapters(family.backbone)
            add_adapters(family.backbone, adapter_spec(backbone))
        if estimator is None:  # the family's own: exact where it has an exact likelihood, else d1's
            estimator = ExactLogProb() if type(family).exact_nll else MeanFieldLogProb()
        if not isinstance(estimator, LogProbEstimator):
            raise ValueError(f"method.estimator must build a dlm.rl.estimators.LogProbEstimator, got {estimator!r}")
        estimator.check(family)
        rollout_sampler = sampler if sampler is not None else family.sampler
        if callable(getattr(estimator, "check_sampler", None)):  # PathLogProb: the order must not depend on the model
            estimator.check_sampler(rollout_sampler)
        # the rollouts run under the policy's family: its KV caches (AR's, BD3-LM's) are the ones the base class's
        # sampler check must accept, so they are in place before it runs
        self.kv_caches = type(family).kv_caches
        super().__init__(family.backbone, family.tokenizer, sampler=rollout_sampler, **base_kwargs)
        self.policy = family
        # what the family can do is the policy's (instance attributes over the class defaults)
        self.one_token_per_call = type(family).one_token_per_call
        self.exact_nll = type(family).exact_nll
        self.supports_infill = type(family).supports_infill
        self.eos_fills_tail = type(family).eos_fills_tail
        self.tracks_reference = bool(beta > 0 or track_kl or kl_reward_coef > 0)
        self.reference = None  # a frozen copy of the start; None with fresh adapters (the base is the reference)
        # modules_to_save train in full: the base with the adapters off is no longer the start, so a copy is kept
        base_is_reference = fresh_adapters and not adapter_spec(backbone).modules_to_save
        if ref_sync_every is not None:
            check_sync(ref_sync_every, ref_mixup_alpha, base_is_reference, self.tracks_reference)
        self.ref_sync_every, self.ref_mixup_alpha = ref_sync_every, float(ref_mixup_alpha)
        if self.tracks_reference and not base_is_reference:
            self.reference = copy.deepcopy(family).requires_grad_(False).eval()
            # Lightning warns of modules in eval mode at the start of fit: the frozen reference is one on purpose
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        self.reward, self.prompts, self.estimator = reward, prompts, estimator
        self.num_generations, self.prompts_per_step = int(num_generations), int(prompts_per_step)
        self.completion_length, self.num_iterations = int(completion_length), int(num_iterations)
        self.epsilon_low, self.epsilon_high, self.beta = float(epsilon_low), float(epsilon_high), float(beta)
        self.kl_reward_coef, self.entropy_reward_coef = float(kl_reward_coef), float(entropy_reward_coef)
        self.scale_rewards, self.normalisation = bool(scale_rewards), normalisation
        self.rollout_seed, self.log_rollouts_every = int(rollout_seed), int(log_rollouts_every)
        self.samples_path = Path(samples_path) if samples_path else None
        self.init_from = init_from
        # an instruct checkpoint's prompts go through its chat template (one user message, as d1 and dlm.generate do)
        self.chat_prompts = conventions_of(family.backbone).chat_template if chat_prompts is None else bool(chat_prompts)
        self._restored: dict | None = None  # the RL state of a checkpoint, applied in on_train_start
        self._gen: torch.Generator | None = None
        self._lockstep = False  # set at the start of fit: ZeRO-3 on several ranks
        self._rows_taken = 0  # prompt rows this rank consumed
        self._generations = 0  # batches of generations made
        self._buffer: dict | None = None  # the batch of generations in use
        self._prompt_iter: Iterator[dict] | None = None
        self._train_started: float | None = None

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "reference", None) is not None:
            self.reference.eval()  # frozen: no dropout, whatever Lightning asks
        return self

    def configure_model(self) -> None:
        """A deferred backbone (ZeRO-3 loading pretrained weights into partitions, dlm.parallel.deepspeed) is the
        policy's; a frozen reference copy gets a second build of the same checkpoint (a deepcopy of partitioned
        parameters would copy empty placeholders)."""
        build = self._build_backbone
        super().configure_model()
        if build is None:
            return
        self.policy.backbone, self.policy.frozen = self.backbone, self.frozen
        if self.reference is not None:
            self.reference.backbone = build().requires_grad_(False).eval()

    # ---- the family interface: the policy's --------------------------------------------------------------
    def loss(self, batch, generator=None):
        raise NotImplementedError("method=grpo trains on its rollouts (training_step); the policy's own objective is "
                                  "module.policy.loss")

    def nll_bound(self, batch, generator=None) -> Tensor:
        return self.policy.nll_bound(batch, generator=generator)

    def validation_stats(self, batch, generator) -> dict[str, Tensor]:
        return self.policy.validation_stats(batch, generator)

    def generate(self, prompt, length, sampler=None, num_samples=1, generator=None) -> Generation:
        return self.policy.generate(prompt, length, sampler=sampler or self.sampler, num_samples=num_samples,
                                    generator=generator)

    def infill(self, tokens, fill_mask, sampler=None, generator=None) -> Generation:
        return self.policy.infill(tokens, fill_mask, sampler=sampler or self.sampler, generator=generator)

    @property
    def export_hf(self):
        """The policy's export (method=ar's causal LM), absent where the policy has none (train.py asks hasattr)."""
        return self.policy.export_hf

    # ---- Lightning hooks ------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        super().on_train_start()
        if self.trainer.accumulate_grad_batches != 1:
            raise UserError(f"method=grpo makes one optimizer step per batch of generations: "
                            f"trainer.accumulate_grad_batches must be 1 (got {self.trainer.accumulate_grad_batches}); "
                            f"raise method.prompts_per_step instead")
        state, self._restored = self._restored or {}, None
        # ZeRO-3 on several ranks: every forward gathers parameters collectively (dlm.parallel.lockstep)
        self._lockstep = gathers_parameters(self.trainer.strategy)
        self._gen = torch.Generator(device=self.compute_device)
        if "rollout_rng" in state:
            self._gen.set_state(state["rollout_rng"].cpu())
        else:
            self._gen.manual_seed(hash((self.rollout_seed, self.global_rank, 1)) % (2**63))
        self._rows_taken = int(state.get("rows_taken", 0))
        self._generations = int(state.get("generations", 0))
        self._prompt_iter = self._prompt_rows(skip=self._rows_taken)
        buffer = state.get("buffer")
        self._buffer = None if buffer is None else to_device(buffer, self.compute_device)
        if self.trainer.ckpt_path and self.global_rank == 0:
            drop_rollouts_from(self.samples_path, self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["grpo"] = {
            "rollout_rng": self._gen.get_state() if self._gen is not None else None,
            "rows_taken": self._rows_taken,
            "generations": self._generations,
            "buffer": None if self._buffer is None else to_device(self._buffer, "cpu"),
        }
        if checkpoint["grpo"]["rollout_rng"] is None:
            del checkpoint["grpo"]["rollout_rng"]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._restored = checkpoint.get("grpo")

    def training_step(self, batch, batch_idx: int) -> Tensor:
        # the data loader's batch is not used: the rollouts are the batch
        if self._buffer is None or self._buffer["iteration"] >= self.num_iterations:
            self._buffer = self._rollouts()
        buf = self._buffer
        j = buf["iteration"]
        started = time.perf_counter()
        n_seq = sum(b["tokens"].shape[0] for b in buf["buckets"] if not b.get("dummy"))
        n_tok = sum(int(b["scored"].sum()) for b in buf["buckets"])
        loss = torch.zeros((), device=self.compute_device)
        stats = {"clipped": 0.0, "kl": 0.0, "entropy": 0.0}
        for index, bucket in enumerate(buf["buckets"]):
            scored = bucket["scored"]
            est = self._estimate(self.policy, bucket, self._estimator_generator(buf["generation"], j, index))
            old = bucket["old"][j] if bucket["old"] is not None else est.logp.detach()
            ref = bucket["ref"][j] if bucket["ref"] is not None else None
            out = clipped_policy_loss(est.logp, old, bucket["advantages"], scored, self.epsilon_low,
                                      self.epsilon_high, self.beta, ref if self.beta > 0 else None,
                                      self.normalisation, max_len=self.completion_length, kl_logp=est.kl_logp)
            share = 0.0 if bucket.get("dummy") else int(scored.sum()) / max(n_tok, 1) \
                if self.normalisation == "tokens" else bucket["tokens"].shape[0] / n_seq
            loss = loss + share * out.loss
            stats["clipped"] += float(out.clipped.sum())
            stats["entropy"] += float(est.entropy.sum())
            if ref is not None:
                stats["kl"] += float((k3_kl(est.kl_logp.detach(), ref) * scored).sum())
        buf["iteration"] = j + 1
        if not torch.isfinite(loss):  # no backward: dlm.callbacks.nonfinite drops the step (as DiffusionLM does)
            self.nonfinite_loss = float(loss.detach())
            return loss if must_return_a_loss(self.trainer.strategy) else None
        self._train_started = started
        self._train_tokens = sum(b["tokens"].numel() for b in buf["buckets"] if not b.get("dummy"))
        if logs_this_step(self._trainer):
            log = self._log
            log("rl/loss", loss.detach())
            log("rl/reward_mean", buf["stats"]["reward_mean"])
            log("rl/reward_std", buf["stats"]["reward_std"])
            for key, value in buf["stats"].items():
                if key.startswith("reward/"):
                    log(f"rl/{key}", value)
            log("rl/completion_len", buf["stats"]["completion_len"])
            if "seq_log_ratio" in buf["stats"]:  # the KL in the reward: mean log(π/π_ref) of the rollouts
                log("rl/seq_log_ratio", buf["stats"]["seq_log_ratio"])
            # the rollouts' mean -log π(o) as the estimator reads it: a one-sample estimate of the sequence entropy
            # (PathLogProb's is given each rollout's reveal order: the tokens' entropy along their path)
            if "seq_entropy" in buf["stats"]:
                log("rl/seq_entropy", buf["stats"]["seq_entropy"])
            log("rl/clip_frac", stats["clipped"] / max(n_tok, 1))
            log("rl/entropy", stats["entropy"] / max(n_tok, 1))
            if self.tracks_reference:
                log("rl/kl", stats["kl"] / max(n_tok, 1))
            if j == 0 and "gen_tokens_per_s" in buf["stats"]:
                log("rl/gen_tokens_per_s", buf["stats"]["gen_tokens_per_s"])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # after the backward and the optimizer step: the training side of the tokens/s comparison
        if self._train_started is not None and logs_this_step(self._trainer):
            elapsed = time.perf_counter() - self._train_started
            self._log("rl/train_tokens_per_s", self._train_tokens / max(elapsed, 1e-9))
        self._train_started = None

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """The step, then the reference sync when it is due: here, not at the batch's end, because the checkpoint
        callbacks write at the batch's end before the module's own hook runs, and a checkpoint of a sync step must
        hold the synced reference (else a run resumed from it differs from one that went straight on)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # global_step counts this step only once the hook has returned
        if self.ref_sync_every is not None and (self.global_step + 1) % self.ref_sync_every == 0:
            self.sync_reference()

    @torch.no_grad()
    def sync_reference(self) -> None:
        """TRL's reference sync (``sync_ref_model``, TR-DPO, Gorbatovski et al. 2024): reference <- alpha * policy +
        (1 - alpha) * reference, parameter by parameter (the reference is a copy of the policy: the same structure).

        Under DeepSpeed ZeRO-3 the parameters are partitioned: each pair is gathered whole on every rank
        (``deepspeed.zero.GatheredParameters``, one pair at a time so the peak is two parameters, not two models as
        TRL's gather of both models at once), mixed there identically, and rank 0's result re-partitioned into the
        reference's shards (the policy's are only read); elsewhere the contexts do nothing (dlm.parallel.params)."""
        alpha = self.ref_mixup_alpha
        for ref, pol in zip(self.reference.parameters(), self.policy.parameters(), strict=True):
            with gathered([pol]), gathered([ref], modifier_rank=0):
                ref.mul_(1.0 - alpha).add_(pol.detach().to(ref.dtype), alpha=alpha)

    def _log(self, name: str, value) -> None:
        self.log(name, float(value), on_step=True, on_epoch=False, batch_size=1,
                 sync_dist=self.trainer.world_size > 1, prog_bar=name == "rl/reward_mean")

    # ---- rollouts -------------------------------------------------------------------------------------------
    def _prompt_rows(self, skip: int) -> Iterator[dict]:
        """This rank's prompt rows (every world_size-th), cycled, the first ``skip`` dropped (a resume)."""
        rank, world = self.global_rank, max(1, self.trainer.world_size)
        taken = 0
        while True:
            empty = True
            for k, row in enumerate(self.prompts.rows("train")):
                if k % world != rank:
                    continue
                empty = False
                if taken < skip:
                    taken += 1
                    continue
                yield row
            if empty:
                raise UserError(f"method.prompts: {self.prompts!r} yielded no rows for rank {rank}")

    def _estimate(self, model, bucket: dict, generator: torch.Generator):
        """The estimator on one bucket; PathLogProb also reads the order its rollouts were revealed in."""
        order = {"reveal_step": bucket["reveal_step"]} if getattr(self.estimator, "needs_reveal_order", False) else {}
        return self.estimator(model, bucket["tokens"], bucket["scored"], bucket["prompt_len"], generator=generator,
                              **order)

    def _estimator_generator(self, generation: int, iteration: int, bucket: int) -> torch.Generator:
        key = hash((self.rollout_seed, self.global_rank, generation, iteration, bucket, 2)) % (2**63)
        return torch.Generator(device=self.compute_device).manual_seed(key)

    @torch.no_grad()
    def _rollouts(self) -> dict:
        G, C, dev = self.num_generations, self.completion_length, self.compute_device
        rows = [next(self._prompt_iter) for _ in range(self.prompts_per_step)]
        self._rows_taken += len(rows)
        generation = self._generations
        self._generations += 1
        prompt_ids = [self._encode_prompt(str(r.get("prompt", ""))) for r in rows]
        by_len: dict[int, list[int]] = {}
        for i, ids in enumerate(prompt_ids):
            by_len.setdefault(len(ids), []).append(i)
        lengths = list(by_len)
        if self._lockstep:  # every rank trains on one bucket per prompt length of any rank (dummies where it has none)
            lengths = all_lengths(lengths)
        started = time.perf_counter()
        buckets, completions = [], [""] * (len(rows) * G)
        with lockstep(self.policy.backbone, self._dummy_forward(self.policy), dev, self._lockstep):
            for P in lengths:  # prompts of one length share a generate call and a forward
                members = by_len.get(P)
                if members is None:
                    buckets.append(self._dummy_bucket(P))
                    continue
                prompt = torch.tensor([prompt_ids[i] for i in members for _ in range(G)], dtype=torch.long, device=dev)
                prompt = prompt.view(len(members) * G, P)
                with self._recording_order() as canvases:
                    gen = self.generate(prompt if P else None, C, num_samples=len(members) * G, generator=self._gen)
                tokens = gen.tokens.to(dev)
                samples = [i * G + g for i in members for g in range(G)]
                # a completion ends at its first stop token: EOS, or an instruct policy's end-of-turn token
                upto_stop = completion_mask(tokens, P, self.stop_ids)
                # the actions: every generated token, except those a family sets to EOS after the first stop (AR, BD3-LM)
                scored = upto_stop if self.eos_fills_tail else completion_mask(tokens, P, None)
                buckets.append({"tokens": tokens, "prompt_len": P, "samples": samples, "scored": scored,
                                "length": upto_stop.sum(1)})
                if canvases is not None:  # the step that revealed each position: the canvases it was masked in
                    step = sum((c.to(dev) == self.mask_id).long() for c in canvases) if canvases else \
                        torch.zeros_like(tokens)
                    step[:, :P] = -1
                    buckets[-1]["reveal_step"] = step
                for row, s in zip(tokens[:, P:].tolist(), samples):
                    completions[s] = self.tokenizer.decode(cut_at_eos(row, self.stop_ids))
        gen_time = time.perf_counter() - started
        prompts = [str(rows[s // G].get("prompt", "")) for s in range(len(completions))]
        columns = {k: [rows[s // G].get(k) for s in range(len(completions))]
                   for k in sorted({k for r in rows for k in r} - {"prompt"})}
        columns[GROUP_COLUMN] = [s // G for s in range(len(completions))]  # group-aware rewards (GroupDistinct)
        components = self.reward.components(completions, prompts, **columns)
        total = torch.tensor(self.reward.total(components), dtype=torch.float32)
        first, seq_logp = self._first_step_estimates(buckets, generation, len(total))
        shaped, log_ratio = total, None
        if self.kl_reward_coef > 0:  # r - β_r log(π/π_ref) per sequence
            log_ratio = seq_logp["old"] - seq_logp["ref"]
            shaped = kl_shaped_rewards(shaped, log_ratio, self.kl_reward_coef)
        if self.entropy_reward_coef > 0:  # r - α log π(o): the entropy bonus
            shaped = entropy_shaped_rewards(shaped, seq_logp["old"], self.entropy_reward_coef)
        advantages = group_advantages(shaped, G, scale=self.scale_rewards)
        for bucket in buckets:
            bucket["advantages"] = torch.zeros(1, device=dev) if bucket.get("dummy") else \
                advantages[bucket["samples"]].to(dev)
            bucket["old"] = bucket["ref"] = None
        for key, models in (("old", contextlib.nullcontext(self.policy) if self.num_iterations > 1 else None),
                            ("ref", self._reference() if self.tracks_reference else None)):
            if models is None:  # old (μ > 1) and reference log-probs, under each step's masks
                continue
            with models as model, lockstep(model.backbone, self._dummy_forward(model), dev, self._lockstep):
                for index, bucket in enumerate(buckets):
                    ests = [first[key, index] if j == 0 and (key, index) in first else
                            self._estimate(model, bucket, self._estimator_generator(generation, j, index))
                            for j in range(self.num_iterations)]
                    # the reference is read only by the KL: its kl_logp (the ELBO estimator's unweighted values)
                    bucket[key] = torch.stack([e.kl_logp if key == "ref" else e.logp for e in ests])
        scored_len = torch.cat([b.pop("length") for b in buckets]).float()
        stats = {"reward_mean": float(total.mean()), "reward_std": float(total.std()) if total.numel() > 1 else 0.0,
                 "completion_len": float(scored_len.mean()),
                 **({} if log_ratio is None else {"seq_log_ratio": float(log_ratio.mean())}),
                 **({"seq_entropy": float(-seq_logp["old"].mean())} if "old" in seq_logp else {}),
                 "gen_tokens_per_s": sum(b["tokens"][:, b["prompt_len"]:].numel() for b in buckets if b["samples"])
                 / max(gen_time, 1e-9)}
        for name, values in components.items():
            v = torch.tensor(values, dtype=torch.float32)
            stats[f"reward/{name}_mean"] = float(v.mean())
            stats[f"reward/{name}_std"] = float(v.std()) if v.numel() > 1 else 0.0
        if self.global_rank == 0 and self.samples_path is not None and generation % self.log_rollouts_every == 0:
            self._write_rollouts(generation, prompts, completions, components, total, advantages)
        for b in buckets:
            del b["samples"]
        return {"generation": generation, "iteration": 0, "buckets": buckets, "stats": stats}

    def _first_step_estimates(self, buckets: list[dict], generation: int, n: int):
        """The first inner step's estimates of the policy (old) and the reference, under its masks, made before the
        advantages when the reward needs them (the KL or the entropy in the reward), or when μ > 1 needs the old ones
        anyway (the rollouts' -log π(o) is then logged at no cost); the passes after reuse them. Returns
        ({(old | ref, bucket): estimate}, {old | ref: log π(o) [n] per sample})."""
        dev = self.compute_device
        first: dict = {}
        needs = [("old", contextlib.nullcontext(self.policy))] \
            if self.kl_reward_coef > 0 or self.entropy_reward_coef > 0 or self.num_iterations > 1 else []
        needs += [("ref", self._reference())] if self.kl_reward_coef > 0 else []
        seq_logp: dict[str, Tensor] = {}
        for key, models in needs:
            with models as model, lockstep(model.backbone, self._dummy_forward(model), dev, self._lockstep):
                for index, bucket in enumerate(buckets):
                    first[key, index] = self._estimate(model, bucket, self._estimator_generator(generation, 0, index))
            seq_logp[key] = torch.zeros(n)
            for index, bucket in enumerate(buckets):
                if not bucket.get("dummy"):
                    seq_logp[key][bucket["samples"]] = sequence_log_prob(first[key, index].logp, bucket["scored"]).cpu()
        return first, seq_logp

    def _encode_prompt(self, text: str) -> list[int]:
        return prompt_ids(self.tokenizer, text, self.chat_prompts)

    @contextlib.contextmanager
    def _recording_order(self) -> Iterator[list[Tensor] | None]:
        """The canvases after every sampler step (Sampler.on_step), where the estimator reads the reveal order
        (PathLogProb); None otherwise."""
        if not getattr(self.estimator, "needs_reveal_order", False):
            yield None
            return
        canvases: list[Tensor] = []
        before = self.sampler.on_step
        self.sampler.on_step = canvases.append
        try:
            yield canvases
        finally:
            self.sampler.on_step = before

    def _dummy_bucket(self, prompt_len: int) -> dict:
        """Under ZeRO-3, a prompt length only other ranks drew this step: one throw-away row that nothing scores, so
        that this rank's training step runs a forward (and backward) for it as theirs do (weight 0 in the loss)."""
        tokens = torch.full((1, prompt_len + self.completion_length), self.pad_id, dtype=torch.long,
                            device=self.compute_device)
        return {"tokens": tokens, "prompt_len": prompt_len, "samples": [], "dummy": True,
                "scored": torch.zeros_like(tokens, dtype=torch.bool), "reveal_step": torch.zeros_like(tokens),
                "length": torch.zeros(0, dtype=torch.long, device=tokens.device)}

    def _dummy_forward(self, family: DiffusionLM):
        """One forward of ``family``'s backbone on a throw-away row: what a rank runs while others still generate
        (dlm.parallel.lockstep)."""
        dev = self.compute_device

        def forward():
            x = torch.full((1, self.completion_length), self.pad_id, dtype=torch.long, device=dev)
            time_kw = {"time": torch.ones(1, device=dev)} if family.backbone_caps.time_conditioning else {}
            family.backbone(x, **time_kw)

        return forward

    @contextlib.contextmanager
    def _reference(self) -> Iterator[DiffusionLM]:
        """The frozen reference policy for the block: the copy of the start, or with fresh LoRA adapters the policy's
        base (adapters off, eval mode), which is the start bit for bit since the base never trains."""
        if self.reference is not None:
            yield self.reference
            return
        with evaluating(self.policy), adapters_disabled(self.policy.backbone):
            yield self.policy

    def _write_rollouts(self, generation, prompts, completions, components, total, advantages) -> None:
        self.samples_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.samples_path, "a") as f:
            for s, (prompt, text) in enumerate(zip(prompts, completions)):
                row = {"kind": ROLLOUT, "prompt": prompt, "text": prompt + text, "step": self.global_step,
                       "generation": generation, "group": s // self.num_generations, "reward": float(total[s]),
                       "rewards": {name: values[s] for name, values in components.items()},
                       "advantage": float(advantages[s])}
                f.write(json.dumps(row) + "\n")
