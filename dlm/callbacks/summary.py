"""The model summary at the start of fit, as Lightning's (Rich with the Rich progress bar, a text table otherwise)
but without a FLOPs column or total: Lightning counts FLOPs only by running an ``example_input_array``, which a
DiffusionLM has not, so it printed ``Total FLOPs: 0``. dlm counts model FLOPs where the backbone runs
(dlm/flops.py): the live rate is ``train/tflops`` (and ``train/mfu``), the per-token count is in the dry_run plan."""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBar
from lightning.pytorch.utilities.model_summary.model_summary import (
    get_formatted_model_size,
    get_human_readable_count,
)

DROPPED_COLUMNS = ("FLOPs",)
log = logging.getLogger("lightning.pytorch.callbacks.model_summary")  # where Lightning's text summary goes


class ModelSummary(LightningModelSummary):
    """``enabled: false`` (conf/callbacks/default.yaml follows ``trainer.enable_model_summary``) prints nothing."""

    def __init__(self, max_depth: int = 1, enabled: bool = True, **summarize_kwargs: Any) -> None:
        super().__init__(max_depth=max_depth if enabled else 0, **summarize_kwargs)

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self._max_depth:
            return
        summary = self._summary(trainer, pl_module)
        columns = [(name, values) for name, values in summary._get_summary_data() if name not in DROPPED_COLUMNS]
        modes = summary.total_training_modes
        totals = [
            ("Trainable params", get_human_readable_count(int(summary.trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(summary.total_parameters - summary.trainable_parameters))),
            ("Total params", get_human_readable_count(int(summary.total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(summary.model_size)),
            ("Modules in train mode", str(modes["train"])),
            ("Modules in eval mode", str(modes["eval"])),
        ]
        if not trainer.is_global_zero:
            return
        if isinstance(trainer.progress_bar_callback, RichProgressBar):
            print_rich(columns, totals, self._summarize_kwargs.get("header_style", "bold magenta"))
        else:
            log.info("\n" + text_table(columns, totals))


def text_table(columns: list[tuple[str, list[str]]], totals: list[tuple[str, str]]) -> str:
    widths = [max([len(name), *(len(str(v)) for v in values)]) for name, values in columns]
    rule = "-" * (sum(widths) + 3 * len(widths))
    lines = [" | ".join(name.ljust(w) for (name, _), w in zip(columns, widths)), rule]
    for row in zip(*(values for _, values in columns)):
        lines.append(" | ".join(str(v).ljust(w) for v, w in zip(row, widths)))
    lines.append(rule)
    lines += [f"{value:<10}{label}" for label, value in totals]
    return "\n".join(lines)


def print_rich(columns: list[tuple[str, list[str]]], totals: list[tuple[str, str]], header_style: str) -> None:
    from rich import get_console  # lazily: optional: Lightning's bar library
    from rich.table import Table  # lazily: optional: Lightning's bar library

    table = Table(header_style=header_style)
    right = {"Params", "Params per Device", "In sizes", "Out sizes"}
    for name, _ in columns:
        table.add_column(name, justify="right" if name in right else "left", style="dim" if name == " " else None)
    for row in zip(*(values for _, values in columns)):
        table.add_row(*(str(v) for v in row))
    grid = Table.grid(expand=True)
    grid.add_column()
    for label, value in totals:
        grid.add_row(f"[bold]{label}[/]: {value}")
    console = get_console()
    console.print(table)
    console.print(grid)
