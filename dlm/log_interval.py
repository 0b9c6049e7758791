"""Whether a training step's metrics are written: Lightning writes step metrics only every
``trainer.log_every_n_steps`` steps, and each ``self.log`` call costs Python time (result collection, device
moves: about 0.1-1 ms) whether or not the step is written. So the training step and the callbacks log only at the
steps that are written, and at the last step (results.json reads its values from ``trainer.callback_metrics``).
What reaches the loggers is unchanged."""

from __future__ import annotations


def logs_this_step(trainer) -> bool:
    """True in a training step (or its batch hooks) whose metrics Lightning writes, or the run's last step."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None:  # no trainer (a step called directly): log as Lightning would
        return True
    if connector.should_update_logs:
        return True
    loop = getattr(trainer, "fit_loop", None)
    if loop is None or not trainer.max_steps or trainer.max_steps < 0:
        return False
    # the step now running, counted as Lightning's logger does (optimizer steps, restored on resume)
    return loop.epoch_loop._batches_that_stepped + 1 >= trainer.max_steps
