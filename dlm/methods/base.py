"""DiffusionLM: the one interface every family implements.

The base class owns what is common to all families — the training and validation steps, parameter groups and
the optimizer, logging, the non-finite-loss guard — and a family implements four methods:

    loss(batch, generator=None) -> dict        "loss" (a scalar to minimise) plus named stats to log
    nll_bound(batch, generator=None) -> Tensor  [B, T] per-token NLL upper bound in nats (exact NLL for AR),
                                                zero where batch["loss_mask"] is False: comparable across families
    infill(tokens, fill_mask, sampler) -> Generation   fill any positions given both sides
    generate(prompt, length, sampler) -> Generation    (the base continues a prompt by infilling its tail;
                                                       left-to-right families override it)

A family that cannot do one of these raises an error naming the alternative; it never returns a made-up number.

Learning-rate roles: the effective ``lr_multipliers`` are the backbone's (``backbone.lr_multipliers``, set by a
model config such as ``model=moe30b`` for the SCP recipe) with the method's merged over them; a role with
multiplier 0 is frozen (requires_grad False). Auxiliary losses: a backbone with ``pop_aux_loss()`` (the MoE
router's load-balancing loss) has it added to the training loss after ``loss(batch)``; its stats are logged as
``train/moe/...``; ``train/loss`` stays the family's objective alone.

Batches are dicts with `input_ids` [B, T], `loss_mask` [B, T] (bool) and, for packed data, `doc_ids` [B, T]
(the backbone then masks attention across documents).

`loss_mask` has one meaning in every family: the positions that may be corrupted and are scored. Every other
position stays clean (never masked, replaced or unrolled) and is context only; losses and bounds are averaged over
the `loss_mask` positions, and validation logs val/<key> per such token. Pretraining rows count everything but
packing's trailing pad; SFT rows (dlm.data.sft) count the response tokens only (plus the EOS fill with
data.eos_loss), so the prompt is never noised (LLaDA's SFT: only response tokens are masked; AR: response-only
cross-entropy; BD3-LM: prompt blocks stay clean) and val/nll_bound is per response token, comparable across
families.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import lightning as L
import torch
from torch import Tensor, nn

from dlm.compile import is_compiled
from dlm.config_values import to_plain
from dlm.flops import TrainingLayout
from dlm.log_interval import logs_this_step
from dlm.models.capabilities import BackboneCapabilities, capabilities_of, conventions_of
from dlm.models.lora_checkpoint import adapter_only, fingerprint, restore_base, strip_base
from dlm.optim import freeze_roles, merge_lr_multipliers, param_groups, reapply_hparams
from dlm.parallel import must_return_a_loss
from dlm.sampling import Generation, Sampler
from dlm.stop_tokens import stop_ids


class NonFiniteLossError(RuntimeError):
    """Raised by the training CLI after a run stopped on a NaN/inf loss, gradient or parameter; the message names
    the step and the last finite checkpoint (dlm.callbacks.nonfinite)."""


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block, then back in the mode it was in: a family samples in eval mode
    (dropout off) also when called mid-training (end-of-fit samples, callbacks)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class DiffusionLM(L.LightningModule, ABC):
    # What the family can do, declared here and read as attributes (no probing):
    exact_nll: ClassVar[bool] = False  # nll_bound is the exact NLL: evaluation needs one pass, not Monte-Carlo draws
    supports_infill: ClassVar[bool] = True  # infill() fills any positions given both sides
    uses_schedule: ClassVar[bool] = False  # the constructor takes ``schedule`` (the schedule group's MaskSchedule)
    uses_reward: ClassVar[bool] = False  # the constructor takes ``reward`` and ``prompts`` (the reward= and prompts= groups)
    one_token_per_call: ClassVar[bool] = False  # generates left to right, one token per network call (AR)
    # the KV caches (sampler.kv_cache) the family runs around its sampler: BD3-LM's of finished blocks, AR's
    kv_caches: ClassVar[tuple[str, ...]] = ()
    eos_fills_tail: ClassVar[bool] = False  # generate() sets every token after a row's first EOS to EOS (not sampled)

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        optimizer: functools.partial | None = None,
        lr_scheduler: functools.partial | None = None,
        sampler: Sampler | None = None,
        lr_multipliers: dict[str, float] | None = None,
        val_seed: int = 1234,
    ):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.sampler = sampler if sampler is not None else self.default_sampler()
        self.kv_cache_of(self.sampler)  # a cache no one runs here is refused when the module is built
        self.lr_multipliers = merge_lr_multipliers(getattr(backbone, "lr_multipliers", None), lr_multipliers)
        self.frozen = freeze_roles(self.backbone, self.lr_multipliers)  # {role: parameters frozen}
        self.val_seed = val_seed
        self.mask_id = int(tokenizer.mask_token_id)
        self.eos_id = int(tokenizer.eos_token_id)
        # where a generated row is finished: EOS and the checkpoint's end-of-turn tokens (dlm/stop_tokens.py)
        self.stop_ids = stop_ids(tokenizer, conventions_of(backbone).stop_tokens)
        self.pad_id = int(tokenizer.pad_token_id)
        self.vocab_size = int(tokenizer.vocab_size)
        self.nonfinite_stop: dict | None = None  # set by dlm.callbacks.nonfinite when training stopped on a NaN/inf
        self.nonfinite_loss: float | None = None  # this step's non-finite loss, for that guard to act on
        # (gradients, their 2-norms) as that guard screened them this step: clip_gradients reuses the norms
        self.screened_grad_norms: tuple[list[Tensor], list[Tensor]] | None = None
        self.configured_hparams: list[dict] = []  # each optimizer group's settings as the config composed them
        self.last_val_step = -1  # the global step of the latest validation
        self._build_backbone = None  # set by defer_backbone: the real backbone is built in configure_model
        # The cached sampling paths' KV cache: True = a preallocated static one, False = a growing one, None = static
        # exactly when the backbone is compiled (static shapes are what compiled decoding needs; dlm.models.kv_cache).
        self.static_kv_cache: bool | None = None
        self._static_cache: tuple | None = None  # (key, cache): reused by calls of the same shape
        self._check_vocabulary()

    def __setattr__(self, name: str, value) -> None:
        # Lightning sets _current_fx_name twice around every hook call (~50 times a step); it is never a parameter,
        # buffer or submodule, so nn.Module's checks are skipped for it (where it ends up is the same: __dict__)
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def kv_cache_of(self, sampler) -> str:
        """The KV cache that ``sampler`` runs under this family: its ``kv_cache``, or for None the family's default
        (its own exact cache, ``kv_caches[0]``, else none); refused unless the sampler (``sampler.kv_caches``) or
        this family runs it."""
        if sampler is None:
            return "none"
        mode = sampler.kv_cache or (self.kv_caches[0] if self.kv_caches else "none")
        runs = dict.fromkeys(("none", *sampler.kv_caches, *self.kv_caches))
        if mode not in runs:
            raise ValueError(
                f"sampler.kv_cache={mode}: {type(sampler).__name__} under {type(self).__name__} runs "
                f"kv_cache={' | '.join(runs)}; the threshold sampler (sampler=threshold) runs prefix and dual"
            )
        return mode

    def default_sampler(self) -> Sampler | None:
        """The sampler a run uses when its config names none (a family without conf/sampler/<method>.yaml); None:
        the family's generate/infill need no sampler object."""
        return None

    @classmethod
    def training_layout(cls, method_cfg) -> TrainingLayout:
        """How a training step runs the backbone over a row (dlm.flops.TrainingLayout), for the plan's FLOPs. The
        one declaration is the method yaml's ``training_layout:`` (read without importing this class); the live
        count needs none (it is counted where the backbone runs)."""
        return TrainingLayout.of(method_cfg)

    def defer_backbone(self, build) -> None:
        """Have ``configure_model`` replace the current (placeholder) backbone with ``build()``: the training CLI
        does this under DeepSpeed ZeRO-3, whose strategy runs that hook where pretrained weights load straight into
        partitioned parameters (dlm.parallel.deepspeed). The placeholder must have the real backbone's geometry."""
        self._build_backbone = build

    @property
    def backbone_deferred(self) -> bool:
        """Whether the backbone is still a placeholder that ``configure_model`` will replace."""
        return self._build_backbone is not None

    def _check_vocabulary(self) -> None:
        vocab = getattr(self.backbone, "vocab_size", None)
        if vocab is None:
            return
        if self.vocab_size > vocab:
            raise ValueError(
                f"the tokenizer has {self.vocab_size} tokens but the model's embedding only {vocab} rows; "
                f"set model.vocab_size >= {self.vocab_size} (the native and HF backbones grow it when asked)"
            )
        for name, token_id in (("mask", self.mask_id), ("eos", self.eos_id), ("pad", self.pad_id)):
            if not 0 <= token_id < vocab:
                raise ValueError(
                    f"the {name} token id {token_id} is outside the model's vocabulary [0, {vocab}); "
                    f"use a tokenizer whose special tokens fit the embedding, or set model.vocab_size >= {token_id + 1}"
                )
        if self.mask_id in (self.eos_id, self.pad_id):
            raise ValueError(
                f"the mask token id {self.mask_id} equals the eos/pad id; the mask must be a token of its own"
            )

    # ---- the family interface -------------------------------------------------------------------------
    @abstractmethod
    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]: ...

    @abstractmethod
    def nll_bound(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor: ...

    def generate(
        self,
        prompt: Tensor | None,
        length: int,
        sampler: Sampler | None = None,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Generation:
        """Continue each prompt row by `length` tokens (or start `num_samples` empty rows). For a family that
        fills any positions this is infilling of the positions after the prompt; left-to-right families (AR,
        block diffusion) override it."""
        device = self.compute_device
        if prompt is None:
            prompt = torch.empty(num_samples, 0, dtype=torch.long, device=device)
        prompt = prompt.to(device)
        holes = torch.full((prompt.shape[0], length), self.mask_id, dtype=torch.long, device=device)
        tokens = torch.cat([prompt, holes], dim=1)
        fill = torch.zeros_like(tokens, dtype=torch.bool)
        fill[:, prompt.shape[1] :] = True
        return self.infill(tokens, fill, sampler=sampler, generator=generator)

    @abstractmethod
    def infill(
        self, tokens: Tensor, fill_mask: Tensor, sampler: Sampler | None = None, generator: torch.Generator | None = None
    ) -> Generation: ...

    def _infill_start(
        self, tokens: Tensor, fill_mask: Tensor, sampler: Sampler | None, *, sampler_hint: str = "<name>",
        extra_tokens: int = 0,
    ) -> tuple[Tensor, Tensor, Sampler]:
        """The start every family's infill shares: the sampler (given, else configured; a :class:`Sampler`), the
        length against the backbone's ``max_seq_len`` (``extra_tokens``: what the family adds, e.g. a time token)
        and the inputs on the compute device. Returns ``(x, fill, sampler)``: ``x`` is ``tokens`` with the holes
        set to the mask token, ``fill`` the boolean fill mask."""
        sampler = sampler or self.sampler
        if sampler is None:
            raise ValueError(f"no sampler given and none configured: pass sampler= or set sampler={sampler_hint}")
        if not isinstance(sampler, Sampler):
            raise ValueError(f"{sampler!r} is not a dlm.sampling.Sampler: this family samples through one "
                             f"(e.g. sampler={sampler_hint})")
        self.kv_cache_of(sampler)
        max_len = getattr(self.backbone, "max_seq_len", None)
        n = tokens.shape[1]
        if max_len is not None and n + extra_tokens > max_len:
            raise ValueError(
                f"{n} tokens (+{extra_tokens} time token) exceed the model's max_seq_len={max_len}" if extra_tokens
                else f"prompt + length = {n} tokens exceeds the model's max_seq_len={max_len}"
            )
        fill = fill_mask.to(self.compute_device, dtype=torch.bool)
        return tokens.to(self.compute_device).masked_fill(fill, self.mask_id), fill, sampler

    def validation_stats(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """Summed per-token statistics over a validation batch; keys are logged as val/<key> averaged per
        counted token. "loss" (the training objective; the best checkpoint is chosen by val/loss) is required,
        "nll_bound" expected from every family that has one; families may add their own."""
        nll = self.nll_bound(batch, generator=generator).sum()
        return {"loss": nll, "nll_bound": nll}

    # ---- Lightning hooks --------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._noise_seed = torch.initial_seed()  # seed_everything(cfg.seed) ran before fit
        if adapter_only(self):
            fingerprint(self)  # the frozen base as built, once: adapter-only checkpoints record it

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        strip_base(self, checkpoint)  # LoRA: the trainable parameters only (dlm/models/lora_checkpoint.py)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_base(self, checkpoint, "ckpt_path")  # the rebuilt base, checked against the saved fingerprint

    def configure_model(self) -> None:
        """Build a deferred backbone (:meth:`defer_backbone`), replacing the placeholder before the optimizer
        exists; Lightning runs this hook inside the strategy's sharded context (under ZeRO-3: ``deepspeed.zero.Init``
        with the HF DeepSpeed config live). Frozen roles are applied to the new parameters. Idempotent (Lightning may
        call it more than once); a no-op when nothing is deferred."""
        build, self._build_backbone = self._build_backbone, None
        if build is None:
            return
        self.backbone = build()
        self.frozen = freeze_roles(self.backbone, self.lr_multipliers)

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """The diffusion noise of a training step is a function of (seed, step, rank, micro-batch), not of the
        global RNG's history: a resumed run draws exactly the noise an uninterrupted run would have."""
        micro = batch_idx % max(1, self.trainer.accumulate_grad_batches)
        key = hash((getattr(self, "_noise_seed", 0), self.global_step, self.global_rank, micro)) % (2**63)
        return torch.Generator(device=self.device).manual_seed(key)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        out = self.loss(batch, generator=self.step_generator(batch_idx))
        loss = out["loss"]
        pop_aux = getattr(self.backbone, "pop_aux_loss", None)
        aux, aux_stats = pop_aux() if pop_aux is not None else (None, {})
        total = loss if aux is None else loss + aux.to(loss.dtype)
        if not torch.isfinite(total):
            # no backward: dlm.callbacks.nonfinite.NonFiniteGuard drops the step's update and stops or skips on.
            # DeepSpeed cannot skip a backward (Lightning refuses None there): the guard raises before its step.
            self.nonfinite_loss = float(total.detach())
            return total if must_return_a_loss(self.trainer.strategy) else None
        if logs_this_step(self._trainer):  # only the steps a logger writes: self.log costs time (dlm/log_interval.py)
            batch_size = batch["input_ids"].shape[0]
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
            for key, value in {**out, **aux_stats}.items():
                if key != "loss":
                    self.log(f"train/{key}", value, batch_size=batch_size)
        return total

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # A fixed generator per batch makes the bound's Monte-Carlo draw the same at every validation, so
        # successive values differ only because the model changed.
        generator = torch.Generator(device=self.device).manual_seed(self.val_seed + batch_idx)
        stats = self.validation_stats(batch, generator)
        tokens = int(batch["loss_mask"].sum())
        for key, value in stats.items():
            self.log(f"val/{key}", value / max(tokens, 1), batch_size=tokens, sync_dist=True, prog_bar=key == "nll_bound")

    def on_validation_epoch_end(self) -> None:
        self.last_val_step = self.global_step
        nll = self.trainer.callback_metrics.get("val/nll_bound")
        if nll is not None:
            self.log("val/ppl_bound", torch.exp(nll.float()), sync_dist=True)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured: choose one with optimizer=<name> (e.g. optimizer=adamw)")
        defaults = self.optimizer_factory.keywords
        # The whole module: a family's own parameters (DiffusionBERT's time-token embedding) train too.
        groups = param_groups(
            self, lr=defaults.get("lr", 1e-3), weight_decay=defaults.get("weight_decay", 0.0),
            lr_multipliers=self.lr_multipliers,
        )
        # plain Python arguments: an OmegaConf list (betas) would be pickled into the checkpoint's optimizer state
        factory = self.optimizer_factory
        optimizer = factory.func(groups, *factory.args, **to_plain(factory.keywords))
        self.configured_hparams = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer, total_steps=self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, then the gradients are set to None at once (``optimizer_zero_grad`` does nothing): Lightning
        frees them inside the next step's closure, after its forward, so each step's gradients stayed alive through the
        next forward (+ the parameters' size in memory at the forward's peak), and on a CPU the next backward wrote its
        gradients into newly mapped pages (~0.6 ms of a ~40 ms tiny-model step: benchmarks/overhead.py --profile,
        ``run_backward``). The gradients a step's backward starts from are None either way (a new accumulation window
        starts after an optimizer step). DeepSpeed's engine steps and clears its own gradients: Lightning's order
        there."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.screened_grad_norms = None  # never holds a step's gradients past it (clipping consumes it)
        if not self._engine_clears_gradients():
            optimizer.zero_grad(set_to_none=True)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        if self._engine_clears_gradients():  # else: cleared right after the optimizer step (optimizer_step above)
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def _engine_clears_gradients(self) -> bool:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return self._trainer is not None and isinstance(self._trainer.strategy, DeepSpeedStrategy)

    def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping (``trainer.gradient_clip_val``), reusing the non-finite guard's per-gradient 2-norms
        of this step where it screened them (dlm.callbacks.nonfinite): ``clip_grad_norm_`` would compute the same
        norms again, a second pass over every gradient; on a CPU, a step whose norm is within the limit (a scale
        of exactly 1.0) skips the multiplication too. The total norm and the clipped gradients are bit for bit
        ``clip_grad_norm_``'s (tested); anything else (clipping by value, a precision plugin that clips its own way,
        no screen this step) goes to Lightning."""
        screened, self.screened_grad_norms = self.screened_grad_norms, None
        if screened is not None and self._clips_by_torch_norm(gradient_clip_val, gradient_clip_algorithm):
            grads, norms = screened
            params = [p for group in optimizer.param_groups for p in group["params"]]
            current = [p.grad for p in params if p.grad is not None]
            if len(current) == len(grads) and all(a is b for a, b in zip(current, grads)):
                first = grads[0].device if grads else None
                total = torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), 2) if grads \
                    else torch.tensor(0.0)
                if total.device.type == "cpu":  # reading a CPU scalar costs no device sync
                    coef = torch.clamp(gradient_clip_val / (total + 1e-6), max=1.0)  # clip_grads_with_norm_'s
                    if coef.item() == 1.0:
                        return  # the gradients times exactly 1.0: the same bits without a pass over them
                torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, total)
                return
        super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _clips_by_torch_norm(self, value, algorithm) -> bool:
        """Whether Lightning would clip with ``torch.nn.utils.clip_grad_norm_(params, value)`` here: norm clipping
        at the trainer's positive value, through the base precision plugin's own norm clipping."""
        from lightning.pytorch.plugins.precision import Precision

        trainer = self._trainer
        if trainer is None or not isinstance(value, (int, float)) or value <= 0 or value != trainer.gradient_clip_val:
            return False
        if str(getattr(algorithm, "value", algorithm) or "norm").lower() != "norm":
            return False
        plugin = type(trainer.precision_plugin)
        return plugin.clip_gradients is Precision.clip_gradients and plugin.clip_grad_by_norm is Precision.clip_grad_by_norm

    def on_train_start(self) -> None:
        # A resume restores the checkpoint's optimizer and schedule state, hyper-parameters included: put the composed
        # config's back (an explicit optimizer.lr=... on resume takes effect), keeping the moments and the step.
        if self.trainer.ckpt_path and self.configured_hparams:
            configs = self.trainer.lr_scheduler_configs
            changes = reapply_hparams(self.trainer.optimizers[0], self.configured_hparams,
                                      configs[0].scheduler if configs else None)
            if changes and self.global_rank == 0:
                print("resume: the config's optimizer settings replace the checkpoint's (moments kept): "
                      + ", ".join(changes), flush=True)

    # ---- helpers for families -----------------------------------------------------------------------------
    def backbone_kwargs(self, batch: dict[str, Tensor]) -> dict:
        return {"doc_ids": batch["doc_ids"]} if "doc_ids" in batch else {}

    @property
    def compute_device(self) -> torch.device:
        """Where forward passes run. Under DeepSpeed ZeRO-3 the module's `.device` can stay on the CPU while the
        partitioned parameters live on the GPU, so ask the strategy when there is one."""
        trainer = self._trainer
        return trainer.strategy.root_device if trainer is not None else self.device

    def logits(self, tokens: Tensor, at: Tensor | None = None, **backbone_kwargs) -> Tensor:
        """Backbone logits restricted to the tokenizer's vocabulary: a pretrained model's embedding may have
        more rows than the tokenizer uses, and those ids must never be predicted.

        ``at`` (bool [B, T]): only those positions' logits, [N, V] in ``tokens[at]``'s order. A backbone whose
        forward takes ``logits_at`` runs its head on those positions only (at a large vocabulary the head and the
        [B, T, V] logits are a good share of a training step; compiled, the graph ends at the hidden states and
        the selection and head run eagerly after it, as the number of rows changes every step); any other computes
        every position's logits and selects: the same numbers."""
        if at is None:
            return self.backbone(tokens, **backbone_kwargs)[..., : self.vocab_size]
        if self.backbone_caps.logits_at:
            return self.backbone(tokens, logits_at=at, **backbone_kwargs)[..., : self.vocab_size]
        return self.backbone(tokens, **backbone_kwargs)[..., : self.vocab_size][at]

    def new_kv_cache(self, batch_size: int, tokens: int, static: bool | None = None):
        """The KV cache a cached sampling path starts from, for ``tokens`` positions of ``batch_size`` rows: an
        emptied static cache (see ``static_kv_cache``; its capacity is ``tokens`` rounded up to a multiple of
        min(64, the next power of two >= tokens): few distinct capacities, little padding, as every call attends
        over all slots; reused across calls of the same capacity so that a compiled decoding step is captured
        once), or None, for the backbone to start a growing one. ``static=True``: a static cache whatever
        ``static_kv_cache`` says (a path that needs one; the backbone must have one)."""
        if not (self._use_static_cache() if static is None else static):
            return None
        limit = getattr(self.backbone, "max_seq_len", tokens)
        granule = min(64, 1 << max(tokens - 1, 0).bit_length())
        capacity = min(-(-tokens // granule) * granule, max(limit, tokens))
        key = (batch_size, capacity, self.compute_device)
        if self._static_cache is None or self._static_cache[0] != key:
            self._static_cache = None  # free the old buffers before allocating the new ones
            self._static_cache = (key, self.backbone.static_cache(batch_size, capacity, device=self.compute_device))
        cache = self._static_cache[1]
        cache.reset()
        return cache

    @property
    def backbone_caps(self) -> BackboneCapabilities:
        """What the backbone declares it can do (time conditioning, logits_at, a KV cache, a static cache)."""
        return capabilities_of(self.backbone)

    def _use_static_cache(self) -> bool:
        supported = self.backbone_caps.static_cache
        if self.static_kv_cache is None:
            return supported and is_compiled(self.backbone)
        if self.static_kv_cache and not supported:
            raise ValueError(
                f"static_kv_cache=true needs a backbone with a static KV cache (the native Transformer, or HFCausalLM "
                f"with attn_implementation sdpa/eager); {type(self.backbone).__name__} has none: set it to null"
            )
        return bool(self.static_kv_cache)
