"""Each notebook's .py (the source) and .ipynb agree, and the .ipynb carries no outputs."""
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def test_there_are_notebooks():
    assert len(SOURCES) >= 4


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_py_and_ipynb_agree(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing: run jupytext --sync {py}"
    src = jupytext.read(py)
    nb = nbformat.read(ipynb, as_version=4)
    a = [(c.cell_type, c.source.strip()) for c in src.cells]
    b = [(c.cell_type, c.source.strip()) for c in nb.cells]
    assert a == b, f"{py.name} and {ipynb.name} disagree: run jupytext --sync {py}"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{ipynb.name} has outputs: strip them"
