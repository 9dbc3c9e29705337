"""The documentation site builds offline with warnings as errors.

Runs ``sphinx-build -W -b html docs <tmp>`` (the command of ``docs/conf.py``) in a fresh
process; skipped where Sphinx or myst-nb is not installed (both are in the ``test`` and
``docs`` extras). The API pages and the copied tutorials are generated inside ``docs/``
(ignored by git); the HTML goes to a temporary folder.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    output = tmp_path / "html"
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(ROOT / "docs"), str(output)],
        capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout}\n{result.stderr}"
    # the API reference covers the model class and its methods, generated from docstrings
    api = (output / "generated" / "pyro_velo.velovae.html").read_text()
    for name in ("VeloVAE", "VeloVAE.train", "VeloVAE.export_to_anndata"):
        assert f'id="pyro_velo.velovae.{name}"' in api, name
    # every tutorial is rendered, with the figures stored in the notebook
    for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
        page = (output / "tutorials" / f"{notebook.stem}.html").read_text()
        assert "<img" in page, f"{notebook.name}: no figure on its page"
    for page in ("installation", "user_guide", "downstream", "extending", "large_data",
                 "benchmarks", "api"):
        assert (output / f"{page}.html").is_file(), page
