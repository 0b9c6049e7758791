"""Tokens per second, tokens seen (kept across resumes) and, on GPUs, peak memory: logged as training goes."""

from __future__ import annotations

import time

import lightning as L
import torch


class ThroughputLogger(L.Callback):
    def __init__(self) -> None:
        self.tokens_seen = 0  # over all ranks and all resumed segments of the run
        self._window_tokens = 0
        self._window_start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._window_start is None:
            self._window_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = int(batch["input_ids"].numel()) * trainer.world_size
        self.tokens_seen += tokens
        self._window_tokens += tokens
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0 and self._window_start is not None:
            if torch.cuda.is_available() and pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - self._window_start
            pl_module.log("train/tokens_per_s", self._window_tokens / max(elapsed, 1e-9), rank_zero_only=True)
            if pl_module.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(pl_module.device) / 1024**3
                pl_module.log("train/peak_mem_gib", peak, rank_zero_only=True)
            self._window_tokens, self._window_start = 0, time.perf_counter()
        pl_module.log("train/tokens_seen", float(self.tokens_seen), rank_zero_only=True)

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))
