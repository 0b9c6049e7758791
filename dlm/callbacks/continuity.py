"""What a resumed run carries over beyond Lightning's own state (``callbacks.continuity``, first in the list).

- The wall time: earlier segments' seconds are kept in the checkpoint, so a resumed run's results.json reports
  the whole run's ``wall_time_s`` beside this segment's ``segment_wall_time_s`` (dlm.train.final_results).
- The logger's step: on a restart Lightning adds one to the restored batch count (in the epoch loop's reset, after
  ``on_train_start``) for a checkpoint saved before its end-of-batch increment, which a checkpoint saved after
  fit (the CLI's ``last.ckpt``) is not. With one optimizer the count is the global step, so at the first batch
  it is set to that: metrics.csv continues at the steps an uninterrupted run logs. First in the callback list so
  that the callbacks logging at batch start (the LR monitor) see the corrected step.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class RunContinuity(L.Callback):
    def __init__(self) -> None:
        self.before = 0.0  # seconds spent in earlier segments of this run (from the checkpoint resumed)
        self.started = time.perf_counter()
        self._step_synced = False

    @property
    def state_key(self) -> str:
        return "RunContinuity"

    def state_dict(self) -> dict[str, Any]:
        return {"wall_time_s": self.before + time.perf_counter() - self.started}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = float(state_dict.get("wall_time_s", 0.0))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step_synced = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._step_synced:
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
            self._step_synced = True
