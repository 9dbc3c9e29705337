"""The ODE simulator written straight to an ``.h5ad`` file, at atlas scale.

:func:`simulate_h5ad` runs the generative process of :func:`~pyro_velo.datasets.simulate`
chunk by chunk of cells and writes the model's inputs (``Mu``, ``Ms``) to disk, so memory
stays flat in the number of cells.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import anndata
import numpy as np
import scipy.sparse as sp

from .._checks import check_int
from .._threads import cpu_threads
from ._generative import (
    _MAX_CHUNK_ENTRIES,
    _annotations,
    _draw_counts,
    _evaluate,
    _simulation_plan,
    _validate,
)

__all__ = ["simulate_h5ad"]

#: bytes per cell x gene entry of the two float32 layers written by simulate_h5ad
_H5AD_BYTES_PER_ENTRY = 8


def simulate_h5ad(
    path: str | Path,
    n_cells: int,
    n_genes: int = 2000,
    topology: str = "bifurcation",
    n_branches: int = 2,
    noise: str = "nb",
    dispersion: float = 0.25,
    library_size_cv: float = 0.4,
    t_max: float = 20.0,
    branch_time: float | None = None,
    behaviours: Mapping[str, float] | None = None,
    n_capture_times: int | None = None,
    branch_specific_fraction: float = 0.3,
    seed: int = 0,
    chunk_cells: int | None = None,
    overwrite: bool = False,
    progress_bar: bool = False,
) -> Path:
    """Simulate an atlas-sized data set straight into an ``.h5ad`` file.

    The same generative process as :func:`simulate` (with the same arguments and seed,
    the cells, genes and counts are identical to :func:`simulate`'s), written chunk by
    chunk of cells, so memory stays flat in ``n_cells``: 10^6 cells x 2000 genes need
    well under 1 GB of memory (and 16 GB of disk). Instead of raw count layers the file
    holds the model's inputs directly: ``layers['Mu']`` and ``layers['Ms']``, the
    size-normalised noisy abundances of each cell (its unspliced / spliced counts
    divided by its library size factor ``obs['size_factor']``). There is **no kNN
    smoothing** (a neighbour graph of 10^6 cells is exactly what this function avoids),
    so the layers are far noisier than the moments :func:`pyro_velo.pp.preprocess`
    computes; they are meant for scale and speed benchmarks and for streaming
    (``pyro_velo.VeloVAE(path)``, see :mod:`pyro_velo.disk`), not as a stand-in for
    preprocessed data.

    Parameters
    ----------
    path
        File to write (conventionally ``*.h5ad``); its folder must exist. It is written
        as ``<path>.partial`` and renamed when complete, so an interrupted run never
        leaves a file that looks finished.
    n_cells, n_genes, topology, n_branches, noise, dispersion, library_size_cv, t_max
        As for :func:`simulate`.
    branch_time, behaviours, n_capture_times, branch_specific_fraction, seed
        As for :func:`simulate`.
    chunk_cells
        Cells generated and written at a time (positive); default about one million
        cell x gene entries (between 64 and 10000 cells). The file's content does not
        depend on it.
    overwrite
        Replace an existing file at ``path`` (otherwise :class:`FileExistsError`).
    progress_bar
        Show a tqdm progress bar over the chunks.

    Returns
    -------
    pathlib.Path
        ``path``. The file reads with :func:`anndata.read_h5ad` (which loads the layers
        into memory: use ``pyro_velo.VeloVAE(path)`` or ``backed='r'`` plus h5py for big
        files) and holds:

        - ``layers['Mu']``, ``layers['Ms']``: dense float32 ``n_cells x n_genes`` HDF5
          datasets (contiguous, uncompressed: rows read sequentially), non-negative;
        - ``X``: an empty (no stored entries) float32 CSR matrix of the right shape,
          present only so that every AnnData reader accepts the file;
        - ``obs``: ``true_t``, ``branch``, ``cell_type``, ``size_factor`` and optionally
          ``capture_time``, as in :func:`simulate`;
        - ``var``: ``true_alpha``, ``true_beta``, ``true_gamma``, ``true_t_on``,
          ``true_t_off``, ``true_basal``, ``true_dispersion``, ``behaviour``,
          ``branch_specific``, ``specific_branch``, as in :func:`simulate`;
        - ``uns``: ``transitions``, ``simulation`` (the arguments) and ``true_schedule``,
          so :func:`expected_state` works on the file read back.

        The true velocities are not written (another ``8 n_cells n_genes`` bytes):
        compute them for any subset of cells with :func:`expected_state`.

    Raises
    ------
    ValueError
        Invalid arguments (as for :func:`simulate`; ``chunk_cells`` not a positive
        integer).
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    FileNotFoundError
        The folder of ``path`` does not exist.
    OSError
        Not enough free disk space for the two layers (checked before anything is
        written).

    Examples
    --------
    >>> import pyro_velo as pv
    >>> path = pv.datasets.simulate_h5ad("atlas.h5ad", n_cells=100_000)
    >>> vae = pv.VeloVAE(path)  # streams Mu / Ms from the file
    """
    import h5py
    from tqdm.auto import tqdm

    if not isinstance(path, str | Path):
        raise ValueError(f"path must be a str or pathlib.Path, got {type(path).__name__}")
    path = Path(path)
    if chunk_cells is not None:
        check_int(chunk_cells, "chunk_cells", minimum=1)
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
    cfg = _validate(locals(), chunk_cells)
    if seed is None:
        raise ValueError("seed must be a non-negative integer (simulate_h5ad is always seeded)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise ValueError(f"path {path} is a folder; give a file name such as data.h5ad")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    n_cells, n_genes = cfg["n_cells"], cfg["n_genes"]
    needed = _H5AD_BYTES_PER_ENTRY * n_cells * n_genes
    free = shutil.disk_usage(path.parent).free + (path.stat().st_size if path.exists() else 0)
    if needed > free:
        raise OSError(f"{path.parent} has {free / 1e9:.1f} GB free; the Mu and Ms layers of "
                      f"{n_cells} x {n_genes} need {needed / 1e9:.1f} GB")
    chunk = cfg["chunk_size"] or int(np.clip(_MAX_CHUNK_ENTRIES // n_genes, 64, 10000))
    chunk = min(chunk, n_cells)
    cfg["chunk_size"] = chunk

    cells, genes, schedule, rngs = _simulation_plan(cfg)
    partial = path.with_name(path.name + ".partial")
    try:
        _write_skeleton(partial, cells, genes, cfg)
        with h5py.File(partial, "r+") as file:
            layers = {}
            for name in ("Mu", "Ms"):
                layers[name] = file["layers"].create_dataset(
                    name, shape=(n_cells, n_genes), dtype=np.float32)
                layers[name].attrs["encoding-type"] = "array"
                layers[name].attrs["encoding-version"] = "0.2.0"
            buffers = [np.empty((chunk, n_genes)) for _ in range(4)]  # reused u, s, du, ds
            for start in tqdm(range(0, n_cells, chunk), desc="Simulating", unit="chunk",
                              disable=not progress_bar):
                stop = min(start + chunk, n_cells)
                with cpu_threads(1):
                    u, s, _, _ = _evaluate(schedule, cells["t"][start:stop],
                                           cells["lineage"][start:stop],
                                           [b[: stop - start] for b in buffers])
                size_factor = cells["size_factor"][start:stop, None]
                # spliced first, then unspliced: the order (and streams) simulate() uses
                for mean, kind, name in ((s, "s", "Ms"), (u, "u", "Mu")):
                    counts = _draw_counts(mean, size_factor, genes["dispersion"],
                                          cfg["noise"] == "nb", rngs[f"gamma_{kind}"],
                                          rngs[f"poisson_{kind}"])
                    layers[name][start:stop] = counts / size_factor
                    del counts
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def _write_skeleton(path: Path, cells: dict, genes: dict, cfg: dict) -> None:
    """obs, var, uns and an empty CSR ``X`` through anndata; ``layers`` left empty."""
    obs, var, uns = _annotations(cells, genes, cfg)
    adata = anndata.AnnData(
        X=sp.csr_matrix((cfg["n_cells"], cfg["n_genes"]), dtype=np.float32), obs=obs, var=var)
    adata.uns.update(uns)
    adata.uns["simulation"]["layers"] = "Mu, Ms: counts / size_factor (no kNN smoothing)"
    adata.write_h5ad(path)
