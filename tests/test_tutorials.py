"""The tutorial notebooks run top to bottom, offline, on built-in simulated data.

Notebooks are stored executed, with their outputs and figures, so that they show them
where users open them (and in the documentation, which renders the stored outputs); a
cheap test checks that every code cell holds its outputs. Each notebook is also executed
from scratch, in memory (the stored file is not touched), in a fresh ``python3`` kernel
with ``tutorials/`` as working directory, as Jupyter would run it; any cell that raises
fails the test. To store them after a change::

    cd tutorials && OMP_NUM_THREADS=1 MPLBACKEND=Agg jupyter nbconvert --to notebook \
        --execute --inplace 0*.ipynb
"""

import time
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
#: seconds any one cell may take before the run is aborted
CELL_TIMEOUT = 300


def test_tutorials_exist():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_capture_time_and_uncertainty.ipynb",
        "03_for_modellers.ipynb",
        "04_real_data.ipynb",
        "05_downstream.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_executed(path):
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    rerun = "execute it before committing (see this module's docstring)"
    # one run, top to bottom, stored whole: execution counts 1, 2, 3, ... (a cell that
    # prints or shows nothing, such as the imports, has no output to store)
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), (
        f"{path.name}: not stored as one complete run; {rerun}")
    assert sum(bool(cell.outputs) for cell in code) >= len(code) // 2, (
        f"{path.name}: most code cells have no stored output; {rerun}")
    for index, cell in enumerate(code):
        errors = [output for output in cell.outputs if output.output_type == "error"]
        assert not errors, f"{path.name}: code cell {index + 1} stored an error"
    figures = [output for cell in code for output in cell.outputs
               if "image/png" in output.get("data", {})]
    assert figures, f"{path.name}: no figure stored"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
        resources={"metadata": {"path": str(TUTORIALS)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}", pytrace=False)
    seconds = time.perf_counter() - start
    print(f"{path.name}: {seconds:.1f} s")
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if output.output_type == "error"]
    assert not errors
