"""notebooks/compare_runs: the jupytext pair is in sync, and the notebook runs against a real tiny sweep."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_analysis import make_tiny_sweep

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _cells(notebook) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in notebook.cells]


def test_the_ipynb_is_the_py_converted():
    jupytext = pytest.importorskip("jupytext")
    from_py = jupytext.read(NOTEBOOKS / "compare_runs.py")
    ipynb = jupytext.read(NOTEBOOKS / "compare_runs.ipynb")
    assert _cells(from_py) == _cells(ipynb), (
        "notebooks/compare_runs.ipynb is out of date: jupytext --to ipynb notebooks/compare_runs.py")


def test_the_notebook_runs_against_a_sweep(tmp_path_factory, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    sweep = make_tiny_sweep(tmp_path_factory.getbasetemp())
    monkeypatch.setenv("DLM_SWEEP", str(sweep))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOKS / "compare_runs.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    text = "\n".join(
        str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
    )
    assert "2 runs; varied: schedule" in text
    assert "cosine" in text and "linear" in text


def test_the_notebook_plots_a_grpo_runs_reward_curve(tmp_path_factory, tmp_path, monkeypatch, workdir, train_cli):
    """A folder with the tiny sweep and a GRPO run: the reward-curve cell takes its branch for GRPO runs."""
    import shutil

    from conftest import TINY_CLI, run_dir_of

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    folder = tmp_path / "compare"
    shutil.copytree(make_tiny_sweep(tmp_path_factory.getbasetemp()), folder / "sweep")
    code, out, err = train_cli(*TINY_CLI, "method=grpo", "trainer.max_steps=3", "method.num_generations=2",
                               "method.prompts_per_step=2", "method.completion_length=6", "sampler=ancestral",
                               "samples.num_prompted=0", "samples.num_infill=0", "name=grpo")
    assert code == 0, err
    shutil.copytree(run_dir_of(out), folder / "grpo")
    monkeypatch.setenv("DLM_SWEEP", str(folder))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOKS / "compare_runs.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    reward_cell = next(c for c in notebook.cells if c.cell_type == "code" and "rl/reward_mean" in c.source)
    text = "\n".join(str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", ""))
                     for out in reward_cell.outputs)
    assert "no method=grpo runs here" not in text
    assert "rl/reward_mean" in text and "grpo" in text  # the pivot of the GRPO run's curve
