"""Whether a training step's metrics are written: Lightning writes step metrics only every
``trainer.log_every_n_steps`` steps, and each ``self.log`` call costs Python time (result collection, device
moves: about 0.1-1 ms) whether or not the step is written. So the training step and the callbacks log only at the
steps that are written, and at the last step (results.json reads its values from ``trainer.callback_metrics``).
What reaches the loggers is unchanged. The answer is computed once per batch (Lightning's ``should_update_logs``
costs ~25 us, and the step and two callbacks ask it): it depends on the batch count and ``trainer.should_stop``."""

from __future__ import annotations


def logs_this_step(trainer) -> bool:
    """True in a training step (or its batch hooks) whose metrics Lightning writes, or the run's last step."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None:  # no trainer (a step called directly): log as Lightning would
        return True
    loop = getattr(trainer, "fit_loop", None)
    batches = loop.epoch_loop._batches_that_stepped if loop is not None else None
    key = (batches, getattr(trainer, "should_stop", False))
    cached = getattr(connector, "_dlm_logs_this_step", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    answer = _logs_this_step(trainer, connector, loop)
    connector._dlm_logs_this_step = (key, answer)
    return answer


def _logs_this_step(trainer, connector, loop) -> bool:
    if connector.should_update_logs:
        return True
    if loop is None or not trainer.max_steps or trainer.max_steps < 0:
        return False
    # the step now running, counted as Lightning's logger does (optimizer steps, restored on resume)
    return loop.epoch_loop._batches_that_stepped + 1 >= trainer.max_steps
