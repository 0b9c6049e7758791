"""Progress bars for dlm's long loops outside Lightning's own bar: end-of-fit sampling, dlm.evaluate and
lm-eval scoring. Rich, as Lightning's bar, on the same console, so that one started inside fit shows under
Lightning's (Rich nests live displays). A bar shows only on a terminal: where output is a file or a CI log it
prints nothing (no line per refresh), and it is gone when its work is done. It counts its work either way."""

from __future__ import annotations

import time

REFRESH_S = 0.1  # a bar nested under Lightning's is redrawn only by Lightning's (1/s): redraw on progress too


class Bar:
    """``with Bar(total, "sampling") as bar: ... bar.advance(n)``. ``enabled=False`` (``trainer.enable_progress_bar
    =false``, lm_eval's ``disable_tqdm``, ``progress_bar=false``) shows nothing; ``completed`` counts regardless."""

    def __init__(self, total: int | None, description: str, enabled: bool = True) -> None:
        self.total = total
        self.description = description
        self.completed = 0
        self._progress = None
        self._task = None
        self._drawn = 0.0
        if enabled and total:
            try:
                from rich import get_console  # lazily: optional: Lightning's bar library
            except ImportError:  # Rich is Lightning's optional bar: without it, no bar
                return
            console = get_console()
            if console.is_terminal:
                from rich.progress import (  # lazily: optional: Lightning's bar library
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )

                self._progress = Progress(
                    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("•"), TimeRemainingColumn(), console=console, transient=True,
                )

    @property
    def shown(self) -> bool:
        return self._progress is not None

    def __enter__(self) -> Bar:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total)
        return self

    def advance(self, n: int = 1) -> None:
        self.completed += n
        if self._progress is not None:
            self._progress.advance(self._task, n)
            if time.monotonic() - self._drawn >= REFRESH_S:
                self._progress.refresh()
                self._drawn = time.monotonic()

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
