"""callbacks.progress_bar: Lightning's rich bar redrawn a few times a second (not after every step), and no bar
callback at all with trainer.enable_progress_bar=false (Lightning refuses one then)."""

from __future__ import annotations

import lightning as L
import pytest
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from dlm.build import build_callbacks
from dlm.callbacks.progress_bar import progress_bar
from dlm.config import ConfigError
from tests.conftest import compose


@pytest.mark.parametrize("enabled", [True, False])
def test_the_bar_follows_the_trainer_flag_and_the_trainer_accepts_it(enabled, tmp_path):
    cfg = compose(["logger=none", f"paths.run_dir={tmp_path}", f"trainer.enable_progress_bar={str(enabled).lower()}"])
    callbacks = build_callbacks(cfg)
    bars = [c for c in callbacks if isinstance(c, ProgressBar)]
    assert len(bars) == int(enabled) and None not in callbacks
    trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks)  # no "bar with the flag off" refusal
    assert isinstance(trainer, L.Trainer)
    if enabled:
        assert trainer.progress_bar_callback is bars[0] and bars[0].refresh_rate == 4
    else:
        assert trainer.progress_bar_callback is None


def test_the_redraw_rate_is_checked():
    assert isinstance(progress_bar(refresh_per_second=10), RichProgressBar)
    with pytest.raises(ConfigError, match="callbacks.progress_bar.refresh_per_second"):
        progress_bar(refresh_per_second=0)
