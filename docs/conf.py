"""Sphinx configuration of the pyro_velo documentation (builds offline).

Build: ``sphinx-build -W -b html docs docs/_build/html`` (or ``make -C docs html``).
The API pages are generated from the docstrings, recursively over the package, so a new
module appears without editing these files. The tutorials are rendered from the outputs
stored in ``tutorials/*.ipynb``; nothing is executed at build time.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document this checkout, not an installed copy

import pyro_velo  # noqa: E402

project = "pyro_velo"
author = "the pyro_velo developers"
copyright = "2026, the pyro_velo developers"
release = version = pyro_velo.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

# API reference: numpy-style docstrings through napoleon, one page per module
autosummary_generate = True
autosummary_imported_members = False
# every object is documented once, in the module that defines it ("ignore-module-all":
# names a package re-exports through __all__ are not documented again there); methods
# a class inherits from the package's own mixins are listed with it (VeloVAE.train),
# those of torch, Pyro and the Python builtins are not
autodoc_default_options = {
    "members": True, "show-inheritance": True, "ignore-module-all": True,
    "inherited-members": "object, Module, PyroModule, BaseException, Exception, ValueError, "
                         "KeyError, FileNotFoundError, FloatingPointError, dict",
}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

# notebooks: render the stored outputs, never execute (offline, and fast)
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
# pages included from benchmarks/ start below the top heading level and link to files
# of the repository that are not documentation pages
suppress_warnings = ["myst.header", "myst.xref_missing"]

html_theme = "alabaster"
html_title = f"pyro_velo {release}"
html_static_path: list[str] = []

# no intersphinx: the build must not reach the network


def _copy_tutorials(app) -> None:
    """Copy the notebooks of ``tutorials/`` (with their stored outputs) into the docs."""
    target = DOCS / "tutorials"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
        shutil.copy2(notebook, target / notebook.name)


def setup(app) -> None:
    app.connect("builder-inited", _copy_tutorials)
