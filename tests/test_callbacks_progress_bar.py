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


def test_the_training_bar_is_updated_only_when_a_redraw_is_due_and_at_the_last_step(monkeypatch):
    """A batch updates the bar (Lightning's on_train_batch_end) 1/refresh_per_second after the last update, or when
    training stops after it; the other batches skip it."""
    from types import SimpleNamespace

    import dlm.callbacks.progress_bar as module

    updates = []
    monkeypatch.setattr(RichProgressBar, "on_train_batch_end", lambda self, *a: updates.append(a[-1]))
    clock = {"now": 100.0}
    monkeypatch.setattr(module.time, "monotonic", lambda: clock["now"])
    bar = progress_bar(refresh_per_second=4)
    trainer = SimpleNamespace(should_stop=False, max_steps=10, global_step=0)
    for step in range(10):
        trainer.global_step = step + 1
        bar.on_train_batch_end(trainer, None, None, None, step)
        clock["now"] += 0.1  # 10 batches a second, 4 updates a second
    assert updates == [0, 3, 6, 9]  # at 100.0, 100.3, 100.6 s and the last step
    trainer.global_step, trainer.max_steps, trainer.should_stop = 11, 100, True  # stopped early (e.g. a NaN)
    bar.on_train_batch_end(trainer, None, None, None, 10)
    assert updates[-1] == 10
