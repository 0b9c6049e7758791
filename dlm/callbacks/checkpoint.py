"""Lightning's ModelCheckpoint with a cheap per-batch path (``callbacks.best_checkpoint``, ``last_checkpoint``).

Lightning calls every callback's hooks six times a step and formats ``callback.state_key`` for each call; a
ModelCheckpoint builds its key from its settings each time, and its ``on_train_batch_end`` reads the trainer state
before it looks at the step. Here the key is built once (the settings it names are fixed when the callback is
built) and a batch that is no save step by count (``every_n_train_steps``) returns at once when no time interval
is set: the same decision Lightning's hook reaches (it returns there too), ~0.1 ms a step sooner on a tiny model
(benchmarks/overhead.py). The class keeps Lightning's name, so its state key, and the checkpoints' callback state,
are unchanged.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


class ModelCheckpoint(LightningModelCheckpoint):
    _state_key: str | None = None

    @property
    def state_key(self) -> str:
        if self._state_key is None:
            self._state_key = super().state_key
        return self._state_key

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self._every_n_train_steps
        if self._train_time_interval is None and pl_module.automatic_optimization and (
                every < 1 or trainer.global_step % every != 0):
            return  # Lightning's hook skips this batch too (not a save step by count, no time interval)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
