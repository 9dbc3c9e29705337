"""Shared pytest fixtures."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

REPO_ROOT = Path(__file__).resolve().parents[1]

# pytest-xdist runs one worker per core: a worker (or a process it starts) that also
# spread its torch work over every core would oversubscribe them, which costs OpenMP up
# to ~50x (see ``VeloVAE.train``'s ``num_threads``). Training uses torch's setting.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


# Files whose fixtures fit models for minutes, longest first (seconds of one clean run,
# two workers on 2 cores): 418, 368, 261, 173, 118, 118. pytest-xdist hands out whole
# files (``--dist loadfile``) in collection order (``--no-loadscope-reorder``); its own
# order, files with the most tests first, left the one-test 368 s file to the end, where
# one worker ran it alone. Started first, they overlap, and the short files fill in.
LONGEST_FILES = ("test_full_model.py", "test_figure8.py", "test_probabilistic.py",
                 "test_robustness.py", "test_restarts.py", "test_tutorials.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files of ``LONGEST_FILES`` first, in that order; the rest keep theirs."""
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: tests keep their order within a file


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Re-pin one thread before every test: scanpy's numba kernels (called directly by
    some tests) reset the OpenMP thread count that torch shares."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Folder with the real 50-cell fixtures (``pancreas_50obs.h5ad`` etc.)."""
    path = REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"real-data fixtures not available: {path} does not exist")
    return path


def make_synthetic_counts(
    n_obs: int = 200, n_vars: int = 300, *, seed: int = 0, sparse: bool = True
) -> AnnData:
    """Poisson spliced/unspliced counts of cells along a transient induction.

    Cells have a latent time ``t`` in [0, 1] and one of two branches; each gene has
    its own baseline, induction time and branch response, and cells differ in
    library size. Unspliced means lead spliced means in time, as in RNA velocity.
    ``X`` is a copy of the spliced counts. Layers are CSR ``float32`` if ``sparse``,
    else dense ``float32`` arrays.
    """
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1, n_obs)
    branch = rng.integers(0, 2, n_obs)
    library = rng.lognormal(0.0, 0.3, n_obs)

    base = rng.lognormal(0.0, 1.0, n_vars)
    onset = rng.uniform(0, 0.8, n_vars)
    amplitude = rng.lognormal(1.0, 0.5, n_vars)
    branch_gain = rng.uniform(0.2, 2.0, (2, n_vars))
    splice_ratio = rng.uniform(0.1, 0.5, n_vars)

    def program(time: np.ndarray) -> np.ndarray:
        on = np.clip((time[:, None] - onset[None, :]) * 5.0, 0, None)
        return base + amplitude * branch_gain[branch] * (1 - np.exp(-on))

    mean_u = library[:, None] * splice_ratio * program(t + 0.15)
    mean_s = library[:, None] * program(t)
    spliced = rng.poisson(mean_s).astype(np.float32)
    unspliced = rng.poisson(mean_u).astype(np.float32)
    if sparse:
        spliced, unspliced = sp.csr_matrix(spliced), sp.csr_matrix(unspliced)
    adata = AnnData(
        X=spliced.copy(),
        layers={"spliced": spliced, "unspliced": unspliced},
    )
    adata.obs_names = [f"cell{i}" for i in range(n_obs)]
    adata.var_names = [f"gene{j}" for j in range(n_vars)]
    adata.obs["true_t"] = t
    adata.obs["branch"] = branch.astype(str)
    return adata


@pytest.fixture
def synthetic_adata() -> AnnData:
    """Fresh 200 cells x 300 genes sparse Poisson count AnnData (see make_synthetic_counts)."""
    return make_synthetic_counts()


@pytest.fixture
def make_synthetic():
    """Factory fixture: ``make_synthetic(n_obs=..., n_vars=..., seed=..., sparse=...)``."""
    return make_synthetic_counts


@pytest.fixture(scope="module")
def tiny_linear_adata() -> AnnData:
    """A preprocessed 300-cell x 30-gene linear simulation (one per test module), for
    tests of exactness and error handling rather than of the fit's quality."""
    import pyro_velo as pv

    data = pv.datasets.simulate(n_cells=300, n_genes=30, topology="linear", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pv.pp.preprocess(data, random_state=0, n_neighbors=15)
    return data


@pytest.fixture(scope="module")
def time_interval_coverage():
    """:func:`interval_coverage`, for tests of the exported time interval."""
    return interval_coverage


def interval_coverage(adata: AnnData) -> tuple[float, float]:
    """Shares of cells whose 90% interval of the exported time holds the true time, from
    the posterior standard deviation alone and combined with the time resolution; the
    error is the residual from an affine map of the true time (the model's own origin
    and unit)."""
    t = adata.obs["pyro_velo_time"].to_numpy()
    true_t = adata.obs["true_t"].to_numpy()
    error = np.abs(t - np.polyval(np.polyfit(true_t, t, 1), true_t))
    std = adata.obs["pyro_velo_time_std"].to_numpy()
    combined = np.hypot(std, adata.obs["pyro_velo_time_resolution"].to_numpy())
    return float(np.mean(error <= 1.645 * std)), float(np.mean(error <= 1.645 * combined))
