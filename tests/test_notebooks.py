"""The notebooks run top to bottom (at test scale) and are committed without outputs.

nbclient executes them: it is the execution engine that nbconvert, papermill and nbmake are built
on, with no extra parameter machinery; the one parameter (the scale) is the environment variable
GRADTOOLS_NOTEBOOK_SCALE, read in each notebook's first code cell.
"""

import glob
import os

import nbformat
import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "*.ipynb")))


def test_there_are_three_notebooks():
    assert [os.path.basename(p) for p in NOTEBOOKS] == [
        "01_vanishing_gradients.ipynb", "02_exploding_gradients.ipynb", "03_your_model.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{os.path.basename(path)} has outputs: clear them before committing")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_runs_top_to_bottom(path, monkeypatch, tmp_path):
    from nbclient import NotebookClient

    monkeypatch.setenv("GRADTOOLS_NOTEBOOK_SCALE", "test")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on any failing cell
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "scale=test" in text
