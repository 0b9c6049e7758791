"""The training progress bar (``callbacks.progress_bar``): Lightning's rich bar, updated and redrawn at most
``refresh_per_second`` times a second.

Lightning's default bar asks for a redraw after every batch and its drawing thread redraws up to 100 times a second:
on a small model that is one redraw per step, CPU time taken from training (and the GIL from the training thread).
Even with a slower redraw, each batch still updated the bar's task and metrics (~0.2 ms of a ~40 ms tiny-model step
on a CPU: `benchmarks/overhead.py`), so the training bar is updated only when a redraw is due, and at the last step.
Four a second reads the same. ``enabled: false`` (the config follows ``trainer.enable_progress_bar``) builds no
callback (None: the callback list leaves it out), as Lightning refuses a bar callback with the flag off.
"""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import RichProgressBar


class ThrottledRichProgressBar(RichProgressBar):
    """Lightning's RichProgressBar whose training bar takes a batch's count and metrics only when
    ``1 / refresh_rate`` seconds have passed since the last update, or when training stops after this batch."""

    def __init__(self, refresh_rate: int = 4, **kwargs) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self._next_update = 0.0  # time.monotonic() from which the next batch updates the bar

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        last = trainer.should_stop or (0 < trainer.max_steps <= trainer.global_step)
        if now < self._next_update and not last:
            return
        self._next_update = now + 1.0 / self.refresh_rate
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def progress_bar(enabled: bool = True, refresh_per_second: int = 4) -> RichProgressBar | None:
    if not enabled:
        return None
    if isinstance(refresh_per_second, bool) or not isinstance(refresh_per_second, int) or refresh_per_second < 1:
        from dlm.config import ConfigError

        raise ConfigError([f"callbacks.progress_bar.refresh_per_second={refresh_per_second!r} must be an integer "
                           f">= 1 (redraws per second; no bar: trainer.enable_progress_bar=false)"])
    return ThrottledRichProgressBar(refresh_rate=refresh_per_second)
