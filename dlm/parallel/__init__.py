"""The strategy seam: where a run executes (DeepSpeed ZeRO, FSDP, DDP, one device) and what that does to its
parameters and checkpoints. Models, families, optimisers and FLOP counting know nothing of sharding; the one
module of this package they may import is :mod:`dlm.parallel.params` (a parameter's true size and shape, gathered
views), as torchtitan keeps ``parallelize.py`` apart from ``model.py``. Nothing outside this package imports
``deepspeed`` or reads a parameter's ``ds_*`` attributes."""


def must_return_a_loss(strategy) -> bool:
    """Whether a training step under ``strategy`` must return a loss even when it is not finite: DeepSpeed's
    engine runs the backward itself and Lightning refuses ``None`` there (dlm's NonFiniteGuard then raises before the
    engine steps); every other strategy skips the backward and step of a ``None``."""
    from lightning.pytorch.strategies import (
        DeepSpeedStrategy,  # lazily: dlm.parallel.params (imported by models) must not import Lightning
    )

    return isinstance(strategy, DeepSpeedStrategy)
