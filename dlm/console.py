"""Console output of the CLIs: each log line once, and none of Lightning's advertisements.

Lightning gives its ``lightning`` logger a console handler of its own at import, whatever logging is configured
already; under Hydra, whose job logging configures the root logger (conf/hydra/job_logging/dlm.yaml), every
Lightning line was then printed twice. :func:`quiet_lightning_logging` leaves the root logger's handlers as the
one place Lightning's records go, and drops Lightning's tips about its own cloud products.
"""

from __future__ import annotations

import logging
import warnings

_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
# Lightning's tips for its cloud products (litlogger, litmodels), and the note that it keeps the summary callback
# dlm configured (conf/callbacks/default.yaml) instead of its own: chatter about Lightning, not about the run.
_DROPPED = ("litlogger", "litmodels", "Trainer already configured with model summary callbacks")


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _DROPPED)


_FILTER = _DropChatter()


def quiet_lightning_logging() -> None:
    """Call after importing Lightning (idempotent). With root handlers present (Hydra's job logging), Lightning's
    records propagate to them only; without (a notebook, a test), Lightning keeps its own handler."""
    import lightning  # noqa: F401  (its import adds the handler taken off here)

    if logging.getLogger().handlers:
        for name in _LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:  # Lightning's console handlers, nothing else
                    logger.removeHandler(handler)
            logger.propagate = True
    # A filter on the logger a record is made on (rank_zero_info's): it holds wherever the record is handled.
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _FILTER not in rank_zero.filters:
        rank_zero.addFilter(_FILTER)
    # Lightning's own use of a torch API it has not caught up with: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
