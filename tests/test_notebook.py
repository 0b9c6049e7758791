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
