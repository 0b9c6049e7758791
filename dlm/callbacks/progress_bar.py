"""The training progress bar (``callbacks.progress_bar``): Lightning's rich bar, redrawn at most
``refresh_per_second`` times a second.

Lightning's default bar asks for a redraw after every batch and its drawing thread redraws up to 100 times a second:
on a small model that is one redraw per step, CPU time taken from training (and the GIL from the training thread).
Four a second reads the same. ``enabled: false`` (the config follows ``trainer.enable_progress_bar``) builds no
callback (None: the callback list leaves it out), as Lightning refuses a bar callback with the flag off.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


def progress_bar(enabled: bool = True, refresh_per_second: int = 4) -> RichProgressBar | None:
    if not enabled:
        return None
    if isinstance(refresh_per_second, bool) or not isinstance(refresh_per_second, int) or refresh_per_second < 1:
        from dlm.config import ConfigError

        raise ConfigError([f"callbacks.progress_bar.refresh_per_second={refresh_per_second!r} must be an integer "
                           f">= 1 (redraws per second; no bar: trainer.enable_progress_bar=false)"])
    return RichProgressBar(refresh_rate=refresh_per_second)
