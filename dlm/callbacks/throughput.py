"""Tokens per second, tokens seen (kept across resumes), model TFLOP/s and MFU per device, and, on GPUs, peak
memory: logged as training goes.

``train/tflops`` is the model FLOPs of the training forwards and backwards per second on this device, counted where
the backbone runs (dlm/flops.py, torchtitan's 6N + 12 L d T convention); ``train/mfu`` divides it by the
device's peak (``peak_tflops``, or the dense bf16 peak of a recognised GPU; not logged on a CPU unless given).
"""

from __future__ import annotations

import time

import lightning as L
import torch

from dlm.flops import FlopCounter, device_peak_tflops
from dlm.log_interval import logs_this_step


class ThroughputLogger(L.Callback):
    def __init__(self, peak_tflops: float | None = None) -> None:
        if peak_tflops is not None and not peak_tflops > 0:
            raise ValueError(
                f"callbacks.throughput.peak_tflops must be > 0 (TFLOP/s per device) or null, got {peak_tflops!r}"
            )
        self.peak_tflops = peak_tflops
        self.tokens_seen = 0  # over all ranks and all resumed segments of the run
        self._window_tokens = 0
        self._window_start: float | None = None
        self._window_flops = 0.0
        self._counter: FlopCounter | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        backbone = getattr(pl_module, "backbone", None)
        if backbone is not None:
            self._counter = FlopCounter(backbone)
        if self.peak_tflops is None:
            self.peak_tflops = device_peak_tflops(pl_module.device)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._counter is not None:
            self._counter.remove()
            self._counter = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._window_start is None:
            self._window_start = time.perf_counter()
            self._window_flops = self._counter.flops if self._counter is not None else 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = int(batch["input_ids"].numel()) * trainer.world_size
        self.tokens_seen += tokens
        self._window_tokens += tokens
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0 and self._window_start is not None:
            if torch.cuda.is_available() and pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = max(time.perf_counter() - self._window_start, 1e-9)
            pl_module.log("train/tokens_per_s", self._window_tokens / elapsed, rank_zero_only=True)
            if self._counter is not None:
                tflops = (self._counter.flops - self._window_flops) / elapsed / 1e12
                pl_module.log("train/tflops", tflops, rank_zero_only=True)
                if self.peak_tflops:
                    pl_module.log("train/mfu", tflops / self.peak_tflops, rank_zero_only=True)
                self._window_flops = self._counter.flops
            if pl_module.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(pl_module.device) / 1024**3
                pl_module.log("train/peak_mem_gib", peak, rank_zero_only=True)
            self._window_tokens, self._window_start = 0, time.perf_counter()
        if logs_this_step(trainer):  # the other steps' value reaches no logger (dlm/log_interval.py)
            pl_module.log("train/tokens_seen", float(self.tokens_seen), rank_zero_only=True)

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))
