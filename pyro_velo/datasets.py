"""Simulated single-cell RNA velocity data sets with known ground truth.

:func:`simulate` draws raw spliced / unspliced counts from the transcription, splicing and
degradation ODE (:mod:`pyro_velo.kinetics`) with one shared latent cell time, on a linear
or bifurcating trajectory. Genes follow the behaviours of the VeloVAE paper (induction
then repression, early repression, late induction, transcriptional boost) plus a few
constant housekeeping genes; in a bifurcation some genes are branch-specific. Every
ground-truth quantity (cell time, branch, rates, switch times, velocities and the full
transcription schedule) is stored in the returned :class:`anndata.AnnData`.
:func:`expected_state` re-evaluates the noise-free trajectory at any time and branch.

The data are meant to be *hard and varied*: non-uniform cell-time density, unequal branch
sizes, rates spanning one to two orders of magnitude, asynchronous switches that often
happen before a gene reaches steady state, small basal ("leaky") rates, genes with
``beta`` close to ``gamma``, per-cell library sizes and per-gene overdispersion.

Two real data sets are loaded through scVelo (downloaded once, then read from scVelo's
cache): :func:`pancreas` and :func:`dentate_gyrus`. Without a network connection they
raise :class:`DatasetUnavailableError` within seconds, saying how to download them by hand.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Mapping
from numbers import Integral, Real
from pathlib import Path
from urllib.parse import urlsplit

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from pyro_velo import kinetics
from pyro_velo._checks import check_int
from pyro_velo._threads import cpu_threads

__all__ = [
    "simulate",
    "simulate_h5ad",
    "simulate_scvelo",
    "expected_state",
    "pancreas",
    "dentate_gyrus",
    "DatasetUnavailableError",
    "BEHAVIOURS",
    "DEFAULT_BEHAVIOURS",
]

#: Gene behaviours understood by :func:`simulate`.
BEHAVIOURS = (
    "induction_repression",
    "early_repression",
    "late_induction",
    "transcriptional_boost",
    "constant",
)

#: Default fractions of each gene behaviour.
DEFAULT_BEHAVIOURS = {
    "induction_repression": 0.35,
    "early_repression": 0.15,
    "late_induction": 0.20,
    "transcriptional_boost": 0.20,
    "constant": 0.10,
}

# Behaviours that can be made branch-specific (they have dynamics after the split).
_BRANCHABLE = ("induction_repression", "late_induction", "transcriptional_boost")

# Rate ranges on the reference time scale t_max = 20 (rescaled by 20 / t_max otherwise).
_REFERENCE_T_MAX = 20.0
_ALPHA_LOG_MEDIAN = np.log(1.5)  # median on-rate (molecules per time unit)
_ALPHA_LOG_SD = 0.9
_BETA_RANGE = (0.4, 4.0)  # splicing, log-uniform
_GAMMA_RANGE = (0.08, 1.2)  # degradation, log-uniform
_CLOSE_RATES_FRACTION = 0.15  # genes with beta ~ gamma
_CLOSE_RATES_RANGE = (0.25, 1.2)  # their shared range
_DISPERSION_LOG_SD = 0.5  # per-gene spread of the NB dispersion around its median
_BRANCH_TIME_FRACTION = 0.35
_N_CELL_TYPES_LINEAR = 4
# default chunk: about this many cell x gene entries (8 MB per float64 buffer, small
# enough for the allocator to reuse memory instead of mapping fresh pages every chunk)
_MAX_CHUNK_ENTRIES = 1 << 20
_EVAL_BLOCK_ENTRIES = 1 << 18  # cell x gene entries per kinetics evaluation block


def simulate(
    n_cells: int = 2000,
    n_genes: int = 200,
    topology: str = "bifurcation",
    n_branches: int = 2,
    noise: str = "nb",
    dispersion: float = 0.25,
    library_size_cv: float = 0.4,
    t_max: float = 20.0,
    branch_time: float | None = None,
    behaviours: Mapping[str, float] | None = None,
    n_capture_times: int | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    branch_specific_fraction: float = 0.3,
) -> anndata.AnnData:
    """Simulate raw spliced / unspliced counts with a known latent time and velocity.

    Each gene follows the kinetic ODE ``du/dt = alpha(t) - beta u``,
    ``ds/dt = beta u - gamma s`` with a piecewise-constant transcription rate
    ``alpha(t)`` and per-gene ``beta``, ``gamma``; all cells share one time axis
    ``t`` in ``[0, t_max]``. Expected abundances are multiplied by a per-cell library
    size factor and observed through Poisson or negative binomial noise.

    Parameters
    ----------
    n_cells, n_genes
        Size of the data set (positive). Cells are generated in chunks, so millions of
        cells work; the dense ``true_velocity`` layers (float32) dominate the memory.
    topology
        ``"linear"`` (one lineage) or ``"bifurcation"``: a root segment that splits at
        ``branch_time`` into ``n_branches`` branches with branch-specific rates.
    n_branches
        Number of branches (``>= 2``) of a bifurcation; ignored for ``"linear"``.
    noise
        ``"poisson"`` or ``"nb"`` (negative binomial, drawn as a Gamma-Poisson mixture).
    dispersion
        Median NB dispersion ``phi`` (``> 0``) with ``Var = mu + phi mu^2``; each gene
        gets ``phi * exp(N(0, 0.5^2))`` (stored in ``var['true_dispersion']``). Unused
        for ``"poisson"``.
    library_size_cv
        Coefficient of variation (``>= 0``) of the log-normal per-cell library size
        factors (mean 1) that multiply the expected counts.
    t_max
        Length of the trajectory (``> 0``). Rates are drawn for ``t_max = 20`` and scaled
        by ``20 / t_max``, so the dynamics always unfold on the trajectory's time scale.
    branch_time
        Time of the split (``0 < branch_time < t_max``); default ``0.35 * t_max``. Only
        for ``"bifurcation"``.
    behaviours
        Fractions of gene behaviours (keys from :data:`BEHAVIOURS`, missing keys mean 0,
        values summing to 1). Default :data:`DEFAULT_BEHAVIOURS`: 35%
        induction_repression, 15% early_repression, 20% late_induction, 20%
        transcriptional_boost, 10% constant. Counts are rounded by largest remainder.
    n_capture_times
        If given (``>= 2``, typically 3-7), ``obs['capture_time']`` holds a coarse capture
        time: the nearest of ``n_capture_times`` evenly spaced values in ``[0, t_max]``
        to ``true_t + N(0, (0.6 * spacing)^2)``, so batches span wide, overlapping
        ranges of true time.
    seed
        Seed of :func:`numpy.random.default_rng`; the same seed gives identical output
        (independently of ``chunk_size``).
    chunk_size
        Cells per chunk (positive); default about one million cell x gene entries per
        chunk (between 64 and 10000 cells).
    branch_specific_fraction
        Fraction of all genes (in ``[0, 1]``) that are branch-specific in a bifurcation,
        chosen among the induction_repression, late_induction and transcriptional_boost
        genes (fewer if there are not enough). Ignored for ``"linear"``.

    Returns
    -------
    anndata.AnnData
        ``n_cells x n_genes`` with

        - ``X``: spliced counts (CSR, float32 copy, so in-place normalisation of ``X``
          cannot alter the raw layers); ``layers['spliced']``, ``layers['unspliced']``:
          raw counts (CSR, int32).
        - ``layers['true_velocity']`` / ``layers['true_velocity_u']``: ``ds/dt`` and
          ``du/dt`` of the noise-free expected abundance at each cell's true time
          (dense float32, molecules per time unit, before library-size scaling).
        - ``obs``: ``true_t``, ``branch`` (``'root'`` before the split and for every
          cell of a linear trajectory, ``'branch_1'`` ...), ``cell_type`` (consecutive
          time segments: the root and each branch are split in two halves in time,
          ``'root_early'``, ``'root_late'``, ``'branch_1_early'``, ...; linear:
          ``'stage_1'`` ... ``'stage_4'``), ``size_factor`` and optionally
          ``capture_time``.
        - ``var``: ``true_alpha`` (the gene's on-rate: the highest rate of its base
          schedule), ``true_beta``, ``true_gamma``, ``true_t_on`` / ``true_t_off``
          (switch-on / switch-off time of the base schedule, NaN where undefined; for a
          boost gene ``t_on`` is its first step), ``true_basal`` (off-rate as a fraction
          of ``true_alpha``), ``true_dispersion`` (0 for Poisson), ``behaviour``,
          ``branch_specific`` and ``specific_branch`` (the branch that keeps the base
          schedule, ``''`` otherwise).
        - ``uns['transitions']``: cell-type graph as ``[source, target]`` pairs;
          ``uns['simulation']``: the arguments; ``uns['true_schedule']``: every gene's
          transcription schedule per lineage (used by :func:`expected_state`).

    Notes
    -----
    Cell times follow a random smooth density (a uniform floor plus 2-5 Gaussian bumps).
    After the split, cells are assigned to branches with Dirichlet(3)-distributed
    probabilities, so branch sizes differ. Gene behaviours:

    - induction_repression: basal rate until ``t_on ~ U(0.05, 0.6) t_max``, on-rate until
      ``t_off`` (at least ``0.15 t_max`` later, at most ``0.95 t_max``), basal again.
    - early_repression: induced long before ``t = 0`` (within 5% of steady state),
      switched off at ``t_off ~ U(0.05, 0.35) t_max``.
    - late_induction: basal until ``t_on ~ U(0.4, 0.8) t_max``, then on for good.
    - transcriptional_boost: starts at steady state of a low level (3-30% of the
      on-rate) and rises in 2-4 increasing steps to the on-rate.
    - constant: at steady state of its rate throughout (zero velocity).

    Half of the induction_repression and late_induction genes have basal rate 0, the
    others 1-8% of their on-rate. A branch-specific gene keeps its schedule in one
    randomly chosen branch and, in each other branch, is either switched off at the split
    (probability 1/2) or runs the same program at 5-50% of the rate with its later
    switches shifted by up to ``0.1 t_max``; its switches are drawn so that it changes
    after the split.

    Rates (before the ``20 / t_max`` rescaling): ``alpha`` log-normal with median 1.5 and
    log-sd 0.9; ``beta`` log-uniform on [0.4, 4]; ``gamma`` log-uniform on [0.08, 1.2],
    except for 15% of genes where ``beta`` is log-uniform on [0.25, 1.2] and ``gamma``
    within 10% of it. Spliced half-lives therefore range from about 0.03 to 0.45
    ``t_max``, and unspliced counts are lower than spliced on average because ``beta``
    tends to exceed ``gamma``.

    The kinetics are evaluated through :mod:`pyro_velo.kinetics` in float64, on one torch
    thread (the previous ``torch.get_num_threads()`` is restored on return); random draws
    use numpy. About 1e6 cells x 2000 genes take some 50 GB of memory at peak (16 GB of it
    the two dense float32 velocity layers) and tens of minutes on a few cores.
    """
    cfg = _validate(
        n_cells=n_cells,
        n_genes=n_genes,
        topology=topology,
        n_branches=n_branches,
        noise=noise,
        dispersion=dispersion,
        library_size_cv=library_size_cv,
        t_max=t_max,
        branch_time=branch_time,
        behaviours=behaviours,
        n_capture_times=n_capture_times,
        seed=seed,
        chunk_size=chunk_size,
        branch_specific_fraction=branch_specific_fraction,
    )
    n_cells, n_genes, t_max = cfg["n_cells"], cfg["n_genes"], cfg["t_max"]
    bifurcation = cfg["topology"] == "bifurcation"
    n_lineages = cfg["n_branches"] if bifurcation else 1
    bt = cfg["branch_time"]

    # Independent streams per purpose, so that e.g. adding capture times or changing the
    # noise model leaves everything else unchanged.
    root_rng = np.random.default_rng(cfg["seed"])
    (rng_genes, rng_time, rng_branch, rng_library, rng_capture, rng_gamma_s, rng_pois_s,
     rng_gamma_u, rng_pois_u) = root_rng.spawn(9)

    genes = _draw_genes(rng_genes, cfg, n_lineages)
    t = _draw_times(rng_time, n_cells, t_max)

    lineage = np.zeros(n_cells, dtype=np.int64)
    if bifurcation:
        probs = rng_branch.dirichlet(np.full(n_lineages, 3.0))
        drawn = rng_branch.choice(n_lineages, size=n_cells, p=probs)
        lineage = np.where(t >= bt, drawn, 0)
        branch_codes = np.where(t >= bt, drawn + 1, 0)  # 0 = root
        branch_names = ["root"] + [f"branch_{k + 1}" for k in range(n_lineages)]
    else:
        branch_codes = np.zeros(n_cells, dtype=np.int64)
        branch_names = ["root"]

    cv = cfg["library_size_cv"]
    sigma = np.sqrt(np.log1p(cv * cv))
    size_factor = np.exp(rng_library.normal(-0.5 * sigma * sigma, sigma, size=n_cells))

    # --- expected abundances, velocities and counts, chunk by chunk -------------------
    schedule = _schedule_tensors(genes)
    phi = genes["dispersion"]
    nb = cfg["noise"] == "nb"
    chunk = cfg["chunk_size"] or int(np.clip(_MAX_CHUNK_ENTRIES // n_genes, 64, 10000))
    chunk = min(chunk, n_cells)
    buffers = [np.empty((chunk, n_genes)) for _ in range(4)]  # reused u, s, du, ds
    velocity_s = np.empty((n_cells, n_genes), dtype=np.float32)
    velocity_u = np.empty((n_cells, n_genes), dtype=np.float32)
    spliced_chunks: list[sp.csr_matrix] = []
    unspliced_chunks: list[sp.csr_matrix] = []
    for start in range(0, n_cells, chunk):
        stop = min(start + chunk, n_cells)
        with cpu_threads(1):
            u, s, du, ds = _evaluate(
                schedule, t[start:stop], lineage[start:stop],
                [b[: stop - start] for b in buffers],
            )
        velocity_s[start:stop] = ds
        velocity_u[start:stop] = du
        sf = size_factor[start:stop, None]
        for mean, rng_g, rng_p, out in (
            (s, rng_gamma_s, rng_pois_s, spliced_chunks),
            (u, rng_gamma_u, rng_pois_u, unspliced_chunks),
        ):
            mean *= sf
            np.maximum(mean, 0.0, out=mean)  # guard against round-off below zero
            if nb:
                mean *= phi
                mean = rng_g.gamma(1.0 / phi, mean)
            counts = rng_p.poisson(mean)
            out.append(sp.csr_matrix(counts.astype(np.int32)))
            del counts, mean
        del u, s, du, ds

    spliced = _stack(spliced_chunks)
    unspliced = _stack(unspliced_chunks)

    # --- annotations ------------------------------------------------------------------
    obs = pd.DataFrame(index=pd.Index(_names("cell", n_cells, 5), dtype=object))
    obs["true_t"] = t
    obs["branch"] = pd.Categorical.from_codes(branch_codes, categories=branch_names)
    type_codes, type_names, transitions = _cell_types(t, branch_codes, n_lineages, t_max, bt)
    obs["cell_type"] = pd.Categorical.from_codes(type_codes, categories=type_names)
    obs["size_factor"] = size_factor
    if cfg["n_capture_times"]:
        obs["capture_time"] = _capture_times(rng_capture, t, cfg["n_capture_times"], t_max)

    var = pd.DataFrame(index=pd.Index(_names("gene", n_genes, 4), dtype=object))
    var["true_alpha"] = genes["alpha"]
    var["true_beta"] = genes["beta"]
    var["true_gamma"] = genes["gamma"]
    var["true_t_on"] = genes["t_on"]
    var["true_t_off"] = genes["t_off"]
    var["true_basal"] = genes["basal"]
    var["true_dispersion"] = phi if nb else np.zeros(n_genes)
    var["behaviour"] = pd.Categorical(genes["behaviour"], categories=list(BEHAVIOURS))
    var["branch_specific"] = genes["branch_specific"]
    var["specific_branch"] = [
        f"branch_{w + 1}" if spec else ""
        for w, spec in zip(genes["winner"], genes["branch_specific"], strict=True)
    ]

    adata = anndata.AnnData(X=spliced.astype(np.float32), obs=obs, var=var)
    adata.layers["spliced"] = spliced
    adata.layers["unspliced"] = unspliced
    adata.layers["true_velocity"] = velocity_s
    adata.layers["true_velocity_u"] = velocity_u
    adata.uns["transitions"] = transitions
    adata.uns["simulation"] = _uns_arguments(cfg)
    adata.uns["true_schedule"] = {
        "lineages": [f"branch_{k + 1}" for k in range(n_lineages)] if bifurcation
        else ["root"],
        "starts": genes["starts"],
        "alphas": genes["alphas"],
        "u0": genes["u0"],
        "s0": genes["s0"],
    }
    return adata


def expected_state(
    adata: anndata.AnnData,
    t: np.ndarray | None = None,
    branch: np.ndarray | list[str] | str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free ``(u, s, du/dt, ds/dt)`` of a simulated data set.

    Parameters
    ----------
    adata
        Output of :func:`simulate` (needs ``uns['true_schedule']``).
    t
        Times, shape ``(n,)``; default ``obs['true_t']`` (all cells: ``n x n_genes``
        float64 arrays, so pass a subset for big data sets).
    branch
        Branch label per time (``'root'`` or ``'branch_k'``), one label for all, or
        ``None``: ``obs['branch']`` when ``t`` is also ``None``, else ``'root'``. Before
        the split all branches agree, so ``'root'`` means the first branch's schedule.

    Returns
    -------
    u, s, du, ds
        Float64 arrays of shape ``(n, n_genes)`` in molecules (before library-size
        scaling) and molecules per time unit.
    """
    if "true_schedule" not in adata.uns:
        raise ValueError("adata has no uns['true_schedule']; was it made by simulate()?")
    sched = adata.uns["true_schedule"]
    names = [str(x) for x in np.asarray(sched["lineages"]).ravel()]
    if t is None:
        t = adata.obs["true_t"].to_numpy()
        if branch is None:
            branch = adata.obs["branch"].astype(str).to_numpy()
    t = np.asarray(t, dtype=np.float64).ravel()
    if branch is None:
        branch = "root"
    labels = np.broadcast_to(np.asarray(branch, dtype=object), t.shape)
    lookup = {name: k for k, name in enumerate(names)}
    lookup["root"] = 0
    unknown = sorted({str(b) for b in np.unique(labels.astype(str))} - set(lookup))
    if unknown:
        raise ValueError(f"unknown branch label(s) {unknown}; expected 'root' or {names}")
    lineage = np.array([lookup[str(b)] for b in labels], dtype=np.int64)
    genes = {key: np.asarray(sched[key], dtype=np.float64)
             for key in ("starts", "alphas", "u0", "s0")}
    genes["beta"] = adata.var["true_beta"].to_numpy(dtype=np.float64)
    genes["gamma"] = adata.var["true_gamma"].to_numpy(dtype=np.float64)
    with cpu_threads(1):
        return _evaluate(_schedule_tensors(genes), t, lineage)


# --------------------------------------------------------------------------------------
# simulation straight to an .h5ad file (atlas scale)
# --------------------------------------------------------------------------------------

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
    cfg = _validate(
        n_cells=n_cells,
        n_genes=n_genes,
        topology=topology,
        n_branches=n_branches,
        noise=noise,
        dispersion=dispersion,
        library_size_cv=library_size_cv,
        t_max=t_max,
        branch_time=branch_time,
        behaviours=behaviours,
        n_capture_times=n_capture_times,
        seed=seed,
        chunk_size=chunk_cells,
        branch_specific_fraction=branch_specific_fraction,
    )
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


def _simulation_plan(cfg: dict) -> tuple[dict, dict, dict, dict]:
    """Everything but the counts, drawn exactly as :func:`simulate` draws it.

    Returns the per-cell draws (``t``, ``lineage``, ``branch_codes``, ``size_factor``,
    optionally ``capture_time``), the genes (:func:`_draw_genes`), their schedule tensors
    and the count noise streams (``gamma_s``, ``poisson_s``, ``gamma_u``, ``poisson_u``),
    from the same spawned streams in the same order as :func:`simulate`, so the same
    seed gives the same cells, genes and counts.
    """
    n_cells, t_max = cfg["n_cells"], cfg["t_max"]
    bifurcation = cfg["topology"] == "bifurcation"
    n_lineages = cfg["n_branches"] if bifurcation else 1
    (rng_genes, rng_time, rng_branch, rng_library, rng_capture, rng_gamma_s, rng_pois_s,
     rng_gamma_u, rng_pois_u) = np.random.default_rng(cfg["seed"]).spawn(9)
    genes = _draw_genes(rng_genes, cfg, n_lineages)
    t = _draw_times(rng_time, n_cells, t_max)
    lineage = np.zeros(n_cells, dtype=np.int64)
    branch_codes = np.zeros(n_cells, dtype=np.int64)
    if bifurcation:
        probs = rng_branch.dirichlet(np.full(n_lineages, 3.0))
        drawn = rng_branch.choice(n_lineages, size=n_cells, p=probs)
        lineage = np.where(t >= cfg["branch_time"], drawn, 0)
        branch_codes = np.where(t >= cfg["branch_time"], drawn + 1, 0)  # 0 = root
    sigma = np.sqrt(np.log1p(cfg["library_size_cv"] ** 2))
    cells = {
        "t": t,
        "lineage": lineage,
        "branch_codes": branch_codes,
        "size_factor": np.exp(rng_library.normal(-0.5 * sigma * sigma, sigma, size=n_cells)),
    }
    if cfg["n_capture_times"]:
        cells["capture_time"] = _capture_times(rng_capture, t, cfg["n_capture_times"], t_max)
    rngs = {"gamma_s": rng_gamma_s, "poisson_s": rng_pois_s,
            "gamma_u": rng_gamma_u, "poisson_u": rng_pois_u}
    return cells, genes, _schedule_tensors(genes), rngs


def _draw_counts(
    mean: np.ndarray,
    size_factor: np.ndarray,
    phi: np.ndarray,
    nb: bool,
    rng_gamma: np.random.Generator,
    rng_poisson: np.random.Generator,
) -> np.ndarray:
    """Counts around the noise-free abundance ``mean`` (modified in place), as simulate()."""
    mean *= size_factor
    np.maximum(mean, 0.0, out=mean)  # guard against round-off below zero
    if nb:  # Gamma-Poisson mixture: Var = mu + phi mu^2
        mean *= phi
        mean = rng_gamma.gamma(1.0 / phi, mean)
    return rng_poisson.poisson(mean)


def _write_skeleton(path: Path, cells: dict, genes: dict, cfg: dict) -> None:
    """obs, var, uns and an empty CSR ``X`` through anndata; ``layers`` left empty."""
    n_cells, n_genes, t_max = cfg["n_cells"], cfg["n_genes"], cfg["t_max"]
    bifurcation = cfg["topology"] == "bifurcation"
    n_lineages = cfg["n_branches"] if bifurcation else 1
    branch_names = (["root"] + [f"branch_{k + 1}" for k in range(n_lineages)]
                    if bifurcation else ["root"])
    obs = pd.DataFrame(index=pd.Index(_names("cell", n_cells, 5), dtype=object))
    obs["true_t"] = cells["t"]
    obs["branch"] = pd.Categorical.from_codes(cells["branch_codes"], categories=branch_names)
    type_codes, type_names, transitions = _cell_types(
        cells["t"], cells["branch_codes"], n_lineages, t_max, cfg["branch_time"])
    obs["cell_type"] = pd.Categorical.from_codes(type_codes, categories=type_names)
    obs["size_factor"] = cells["size_factor"]
    if "capture_time" in cells:
        obs["capture_time"] = cells["capture_time"]
    var = pd.DataFrame(index=pd.Index(_names("gene", n_genes, 4), dtype=object))
    for key in ("alpha", "beta", "gamma", "t_on", "t_off", "basal"):
        var[f"true_{key}"] = genes[key]
    var["true_dispersion"] = genes["dispersion"] if cfg["noise"] == "nb" else np.zeros(n_genes)
    var["behaviour"] = pd.Categorical(genes["behaviour"], categories=list(BEHAVIOURS))
    var["branch_specific"] = genes["branch_specific"]
    var["specific_branch"] = [
        f"branch_{w + 1}" if spec else ""
        for w, spec in zip(genes["winner"], genes["branch_specific"], strict=True)
    ]
    adata = anndata.AnnData(X=sp.csr_matrix((n_cells, n_genes), dtype=np.float32),
                            obs=obs, var=var)
    adata.uns["transitions"] = transitions
    adata.uns["simulation"] = {**_uns_arguments(cfg), "layers": "Mu, Ms: counts / size_factor "
                               "(no kNN smoothing)"}
    adata.uns["true_schedule"] = {
        "lineages": [f"branch_{k + 1}" for k in range(n_lineages)] if bifurcation
        else ["root"],
        **{key: genes[key] for key in ("starts", "alphas", "u0", "s0")},
    }
    adata.write_h5ad(path)


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


def _check_real(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _validate(**kw: object) -> dict:
    cfg = dict(kw)
    cfg["n_cells"] = check_int(kw["n_cells"], "n_cells", minimum=1)
    cfg["n_genes"] = check_int(kw["n_genes"], "n_genes", minimum=1)
    if kw["topology"] not in ("linear", "bifurcation"):
        raise ValueError(
            f"unknown topology {kw['topology']!r}; expected 'linear' or 'bifurcation'"
        )
    if kw["noise"] not in ("poisson", "nb"):
        raise ValueError(f"unknown noise {kw['noise']!r}; expected 'poisson' or 'nb'")
    cfg["dispersion"] = _check_real("dispersion", kw["dispersion"], positive=True)
    cfg["library_size_cv"] = _check_real("library_size_cv", kw["library_size_cv"])
    cfg["t_max"] = t_max = _check_real("t_max", kw["t_max"], positive=True)
    if kw["topology"] == "bifurcation":
        if isinstance(kw["n_branches"], bool) or not isinstance(kw["n_branches"], Integral):
            raise ValueError(f"n_branches must be an integer, got {kw['n_branches']!r}")
        if kw["n_branches"] < 2:
            raise ValueError(
                f"n_branches must be >= 2 for a bifurcation, got {kw['n_branches']}"
            )
        cfg["n_branches"] = int(kw["n_branches"])
        if kw["branch_time"] is None:
            cfg["branch_time"] = _BRANCH_TIME_FRACTION * t_max
        else:
            bt = _check_real("branch_time", kw["branch_time"], positive=True)
            if not bt < t_max:
                raise ValueError(f"branch_time must be in (0, t_max={t_max}), got {bt}")
            cfg["branch_time"] = bt
    else:
        if kw["branch_time"] is not None:
            raise ValueError("branch_time is only meaningful for topology='bifurcation'")
        cfg["n_branches"] = 1
        cfg["branch_time"] = None
    cfg["behaviours"] = _check_behaviours(kw["behaviours"])
    if kw["n_capture_times"] is not None:
        cfg["n_capture_times"] = check_int(kw["n_capture_times"], "n_capture_times", minimum=2)
    if kw["seed"] is not None:
        cfg["seed"] = check_int(kw["seed"], "seed", minimum=0)
    if kw["chunk_size"] is not None:
        cfg["chunk_size"] = check_int(kw["chunk_size"], "chunk_size", minimum=1)
    frac = _check_real("branch_specific_fraction", kw["branch_specific_fraction"])
    if frac > 1:
        raise ValueError(f"branch_specific_fraction must be in [0, 1], got {frac}")
    cfg["branch_specific_fraction"] = frac
    return cfg


def _check_behaviours(behaviours: Mapping[str, float] | None) -> dict[str, float]:
    if behaviours is None:
        return dict(DEFAULT_BEHAVIOURS)
    if not isinstance(behaviours, Mapping):
        raise ValueError(f"behaviours must be a dict of fractions, got {behaviours!r}")
    unknown = sorted(set(behaviours) - set(BEHAVIOURS))
    if unknown:
        raise ValueError(f"unknown behaviour(s) {unknown}; expected some of {BEHAVIOURS}")
    fractions = {}
    for name in BEHAVIOURS:
        fractions[name] = _check_real(f"behaviours[{name!r}]", behaviours.get(name, 0.0))
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"behaviours fractions must sum to 1, got {total:.6g}")
    return fractions


def _uns_arguments(cfg: dict) -> dict:
    """The arguments as h5ad-writable scalars (None -> NaN / 0 / -1, see below)."""
    return {
        "n_cells": cfg["n_cells"],
        "n_genes": cfg["n_genes"],
        "topology": cfg["topology"],
        "n_branches": cfg["n_branches"],  # 1 for linear
        "noise": cfg["noise"],
        "dispersion": cfg["dispersion"],
        "library_size_cv": cfg["library_size_cv"],
        "t_max": cfg["t_max"],
        "branch_time": np.nan if cfg["branch_time"] is None else cfg["branch_time"],
        "behaviours": dict(cfg["behaviours"]),
        "n_capture_times": cfg["n_capture_times"] or 0,  # 0: none
        "seed": -1 if cfg["seed"] is None else cfg["seed"],  # -1: unseeded
        "chunk_size": cfg["chunk_size"] or 0,  # 0: automatic
        "branch_specific_fraction": cfg["branch_specific_fraction"],
    }


# --------------------------------------------------------------------------------------
# random draws
# --------------------------------------------------------------------------------------


def _log_uniform(rng: np.random.Generator, low: float, high: float, size=None) -> np.ndarray:
    return np.exp(rng.uniform(np.log(low), np.log(high), size=size))


def _draw_times(rng: np.random.Generator, n_cells: int, t_max: float) -> np.ndarray:
    """Cell times from a random smooth density on [0, t_max] (inverse-CDF sampling)."""
    n_bumps = int(rng.integers(2, 6))
    centres = rng.uniform(0.0, t_max, n_bumps)
    widths = rng.uniform(0.04, 0.2, n_bumps) * t_max
    weights = rng.dirichlet(np.ones(n_bumps))
    grid = np.linspace(0.0, t_max, 4097)
    bumps = np.exp(-0.5 * ((grid[:, None] - centres) / widths) ** 2) / widths
    density = 0.25 / t_max + 0.75 * (bumps * weights).sum(axis=1) / np.sqrt(2 * np.pi)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]))])
    cdf /= cdf[-1]
    return np.interp(rng.uniform(size=n_cells), cdf, grid)


def _split_counts(fractions: dict[str, float], n: int) -> list[int]:
    """Integer counts per behaviour by the largest-remainder method."""
    raw = np.array([fractions[b] * n for b in BEHAVIOURS])
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts.tolist()


def _draw_genes(rng: np.random.Generator, cfg: dict, n_lineages: int) -> dict:
    """Per-gene rates, behaviours and piecewise-constant schedules for every lineage."""
    n_genes, t_max, bt = cfg["n_genes"], cfg["t_max"], cfg["branch_time"]
    scale = _REFERENCE_T_MAX / t_max

    behaviour = np.repeat(np.array(BEHAVIOURS), _split_counts(cfg["behaviours"], n_genes))
    behaviour = behaviour[rng.permutation(n_genes)]

    alpha = np.exp(rng.normal(_ALPHA_LOG_MEDIAN, _ALPHA_LOG_SD, n_genes))
    beta = _log_uniform(rng, *_BETA_RANGE, size=n_genes)
    gamma = _log_uniform(rng, *_GAMMA_RANGE, size=n_genes)
    close = rng.uniform(size=n_genes) < _CLOSE_RATES_FRACTION
    beta_close = _log_uniform(rng, *_CLOSE_RATES_RANGE, size=n_genes)
    gamma_close = beta_close * np.exp(rng.uniform(-0.1, 0.1, n_genes))
    beta = np.where(close, beta_close, beta) * scale
    gamma = np.where(close, gamma_close, gamma) * scale
    alpha = alpha * scale
    dispersion = cfg["dispersion"] * np.exp(rng.normal(0.0, _DISPERSION_LOG_SD, n_genes))

    # branch-specific genes
    branch_specific = np.zeros(n_genes, dtype=bool)
    if n_lineages > 1:
        eligible = np.flatnonzero(np.isin(behaviour, _BRANCHABLE))
        n_specific = min(round(cfg["branch_specific_fraction"] * n_genes), eligible.size)
        branch_specific[rng.choice(eligible, size=n_specific, replace=False)] = True
    winner = rng.integers(0, n_lineages, n_genes)

    t_on = np.full(n_genes, np.nan)
    t_off = np.full(n_genes, np.nan)
    basal = np.zeros(n_genes)
    warmup = np.full(n_genes, np.inf)  # time spent at the initial rate before t = 0
    base: list[list[tuple[float, float]]] = []  # (start, rate) segments, first at 0
    hi = 0.95 * t_max
    for g in range(n_genes):
        a, kind, spec = alpha[g], behaviour[g], branch_specific[g]
        # switches after the split for branch-specific genes (bt is not None then)
        after = bt + 0.25 * (t_max - bt) if spec else 0.0
        if kind in ("induction_repression", "late_induction"):
            basal[g] = 0.0 if rng.uniform() < 0.5 else _log_uniform(rng, 0.01, 0.08)
        if kind == "induction_repression":
            on = rng.uniform(0.05, 0.6) * t_max
            lo_off = min(max(on + 0.15 * t_max, after), hi)
            off = rng.uniform(lo_off, hi)
            t_on[g], t_off[g] = on, off
            segments = [(0.0, basal[g] * a), (on, a), (off, basal[g] * a)]
        elif kind == "early_repression":
            off = rng.uniform(0.05, 0.35) * t_max
            t_off[g] = off
            # induced long enough before t = 0 to be within 5% of steady state
            warmup[g] = rng.uniform(5.0, 10.0) / min(beta[g], gamma[g])
            segments = [(0.0, a), (off, 0.0)]
        elif kind == "late_induction":
            lo_on = 0.4 * t_max
            if spec:
                lo_on = min(max(lo_on, bt + 0.05 * (t_max - bt)), 0.8 * t_max)
            on = rng.uniform(lo_on, 0.8 * t_max)
            t_on[g] = on
            segments = [(0.0, basal[g] * a), (on, a)]
        elif kind == "transcriptional_boost":
            n_steps = int(rng.integers(2, 5))
            level0 = _log_uniform(rng, 0.03, 0.3)
            levels = np.concatenate(
                [np.sort(_log_uniform(rng, level0, 1.0, size=n_steps - 1)), [1.0]]
            )
            times = np.sort(rng.uniform(0.05, 0.9, n_steps) * t_max)
            if spec and times[-1] < after:
                times[-1] = rng.uniform(min(after, 0.9 * t_max), 0.9 * t_max)
            basal[g] = level0
            t_on[g] = times[0]
            segments = [(0.0, level0 * a)] + [
                (float(tt), float(lv * a)) for tt, lv in zip(times, levels, strict=True)
            ]
        else:  # constant
            segments = [(0.0, a)]
        base.append(segments)

    # lineage-specific schedules
    per_lineage: list[list[list[tuple[float, float]]]] = []
    for lin in range(n_lineages):
        rows = []
        for g in range(n_genes):
            segments = base[g]
            if branch_specific[g] and lin != winner[g]:
                off_branch = rng.uniform() < 0.5
                level = 0.0 if off_branch else _log_uniform(rng, 0.05, 0.5)
                shift = rng.uniform(-0.1, 0.1) * t_max
                before = [seg for seg in segments if seg[0] < bt]
                after_split = [
                    (max(st + shift, bt), level * r) for st, r in segments if st >= bt
                ]
                segments = before + [(bt, level * before[-1][1])] + after_split
            rows.append(segments)
        per_lineage.append(rows)

    n_seg = max(len(seg) for rows in per_lineage for seg in rows)
    pad = 3.0 * t_max  # never reached: padding segments repeat the last rate
    starts = np.full((n_lineages, n_genes, n_seg), pad)
    alphas = np.zeros((n_lineages, n_genes, n_seg))
    for lin, rows in enumerate(per_lineage):
        for g, segments in enumerate(rows):
            st, rt = zip(*segments, strict=True)
            starts[lin, g, : len(st)] = st
            alphas[lin, g, : len(rt)] = rt
            alphas[lin, g, len(rt):] = rt[-1]

    # initial state: steady state of the first rate, or short of it (early repression)
    u0, s0 = kinetics.solve(
        torch.as_tensor(np.where(np.isinf(warmup), 1e6, warmup), dtype=torch.float64),
        0.0,
        0.0,
        torch.as_tensor(alphas[0, :, 0], dtype=torch.float64),
        torch.as_tensor(beta, dtype=torch.float64),
        torch.as_tensor(gamma, dtype=torch.float64),
    )
    return {
        "behaviour": behaviour,
        "alpha": alpha,
        "beta": beta,
        "gamma": gamma,
        "dispersion": dispersion,
        "t_on": t_on,
        "t_off": t_off,
        "basal": basal,
        "branch_specific": branch_specific,
        "winner": winner,
        "starts": starts,
        "alphas": alphas,
        "u0": u0.numpy(),
        "s0": s0.numpy(),
    }


# --------------------------------------------------------------------------------------
# evaluation and assembly
# --------------------------------------------------------------------------------------


def _schedule_tensors(genes: dict) -> dict[str, torch.Tensor]:
    """Schedule as float64 tensors, plus the state at every segment start ("knots")."""
    sched = {key: torch.as_tensor(np.asarray(genes[key]), dtype=torch.float64)
             for key in ("starts", "alphas", "beta", "gamma", "u0", "s0")}
    knot_u, knot_s = [], []
    for lin in range(sched["starts"].shape[0]):
        starts = sched["starts"][lin]  # (genes, segments)
        u, s, _ = kinetics.piecewise_solve(
            starts.T, starts, sched["alphas"][lin], sched["beta"], sched["gamma"],
            sched["u0"], sched["s0"],
        )  # (segments, genes): state at the start of each segment
        knot_u.append(u.T.contiguous())
        knot_s.append(s.T.contiguous())
    sched["knot_u"] = torch.stack(knot_u)
    sched["knot_s"] = torch.stack(knot_s)
    return sched


def _evaluate(
    schedule: dict[str, torch.Tensor],
    t: np.ndarray,
    lineage: np.ndarray,
    out: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free ``(u, s, du, ds)`` (float64, cells x genes) at times ``t``.

    Equivalent to :func:`kinetics.piecewise_solve` at ``t`` but cheaper for many cells:
    each (cell, gene) is solved only over its active segment, starting from the state at
    that segment's start (computed once per gene by ``piecewise_solve``).
    """
    beta = schedule["beta"][:, None]
    gamma = schedule["gamma"][:, None]
    n_genes = beta.shape[0]
    if out is None:
        out = [np.empty((t.shape[0], n_genes)) for _ in range(4)]
    # small blocks keep the ~30 temporaries of kinetics.solve in cache (several x faster)
    block = max(1, _EVAL_BLOCK_ENTRIES // n_genes)
    for first in range(0, t.shape[0], block):
        last = min(first + block, t.shape[0])
        for lin in np.unique(lineage[first:last]):
            rows = np.flatnonzero(lineage[first:last] == lin) + first
            starts = schedule["starts"][lin]  # (genes, segments)
            tt = torch.as_tensor(t[rows], dtype=torch.float64)
            query = tt[None, :].expand(n_genes, -1).contiguous()  # (genes, cells)
            seg = (torch.searchsorted(starts, query, right=True) - 1).clamp(min=0)
            start = torch.gather(starts, 1, seg)
            alpha = torch.gather(schedule["alphas"][lin], 1, seg)
            u0 = torch.gather(schedule["knot_u"][lin], 1, seg)
            s0 = torch.gather(schedule["knot_s"][lin], 1, seg)
            tau = (query - start).clamp(min=0.0)
            u, s = kinetics.solve(tau, u0, s0, alpha, beta, gamma)
            du, ds = kinetics.velocity(u, s, alpha, beta, gamma)
            for target, value in zip(out, (u, s, du, ds), strict=True):
                target[rows] = value.T.numpy()
    return out[0], out[1], out[2], out[3]



def _stack(chunks: list[sp.csr_matrix]) -> sp.csr_matrix:
    matrix = sp.vstack(chunks, format="csr")
    chunks.clear()
    matrix.sort_indices()
    return matrix


def _names(prefix: str, n: int, width: int) -> list[str]:
    width = max(width, len(str(n - 1)))
    return [f"{prefix}_{i:0{width}d}" for i in range(n)]


def _cell_types(
    t: np.ndarray, branch_codes: np.ndarray, n_lineages: int, t_max: float, bt: float | None
) -> tuple[np.ndarray, list[str], list[list[str]]]:
    """Cell types as consecutive time segments, and the transitions between them."""
    if bt is None:
        names = [f"stage_{k + 1}" for k in range(_N_CELL_TYPES_LINEAR)]
        edges = np.linspace(0.0, t_max, _N_CELL_TYPES_LINEAR + 1)[1:-1]
        codes = np.searchsorted(edges, t, side="right")
        transitions = [[names[k], names[k + 1]] for k in range(len(names) - 1)]
        return codes, names, transitions
    names = ["root_early", "root_late"]
    transitions = [["root_early", "root_late"]]
    for k in range(n_lineages):
        early, late = f"branch_{k + 1}_early", f"branch_{k + 1}_late"
        names += [early, late]
        transitions += [["root_late", early], [early, late]]
    mid_branch = bt + 0.5 * (t_max - bt)
    root_codes = (t >= 0.5 * bt).astype(np.int64)
    branch_type = 2 * (branch_codes - 1) + 2 + (t >= mid_branch)
    codes = np.where(branch_codes == 0, root_codes, branch_type)
    return codes, names, transitions


def _capture_times(
    rng: np.random.Generator, t: np.ndarray, n_capture: int, t_max: float
) -> np.ndarray:
    values = np.linspace(0.0, t_max, n_capture)
    spacing = values[1] - values[0]
    noisy = t + rng.normal(0.0, 0.6 * spacing, size=t.shape)
    idx = np.clip(np.rint(noisy / spacing), 0, n_capture - 1).astype(np.int64)
    return values[idx]


# --------------------------------------------------------------------------------------
# scVelo's simulator (an independent check of the model)
# --------------------------------------------------------------------------------------


def simulate_scvelo(
    n_cells: int = 1000,
    n_genes: int = 100,
    noise_level: float = 1.0,
    t_max: float = 20.0,
    seed: int = 0,
) -> anndata.AnnData:
    """Data from scVelo's simulator, with random kinetics per gene and the true velocity.

    :func:`simulate` was written together with the model; a fit that only works on it
    may have learnt its conventions. This calls :func:`scvelo.datasets.simulation`
    (a linear trajectory: every gene switched on at ``t = 0`` and off at its own time,
    Gaussian noise of ``noise_level`` times 10% of the gene's 99th percentile, clipped
    at zero; no library-size variation) with per-gene rates drawn here, and adds the
    noise-free velocities computed with scVelo's own :class:`scvelo.core.SplicingDynamics`.

    Parameters
    ----------
    n_cells, n_genes
        Size of the data set (at least 2 cells, at least 1 gene).
    noise_level
        scVelo's ``noise_level`` (``>= 0``).
    t_max
        Length of the trajectory (``> 0``); scVelo's cell times are rescaled to it.
    seed
        Seed of the rates, switch times, cell times and noise. scVelo seeds NumPy's and
        Python's global generators; their states are restored afterwards.

    Returns
    -------
    anndata.AnnData
        ``n_cells x n_genes`` with dense float ``layers['spliced']`` and
        ``layers['unspliced']`` (noisy abundances, not integers), ``X`` a copy of the
        spliced layer, ``obs['true_t']`` (scVelo rounds it to 0.01),
        ``layers['true_velocity']`` (``ds/dt``) and ``layers['true_velocity_u']``
        (``du/dt``) of the noise-free state at ``obs['true_t']`` (so a cell within 0.005
        of a gene's switch may be placed on the other side of it), and in ``var`` the
        kinetics: ``true_alpha``, ``true_beta``,
        ``true_gamma``, ``true_t_off`` (switch-off time; scVelo's ``true_t_``).
        Per-gene rates: ``alpha ~ LogNormal(log 5, 0.5)``, ``beta ~ LogNormal(log 0.5,
        0.5)``, ``gamma ~ LogNormal(log 0.3, 0.5)`` (medians are scVelo's defaults);
        switch-off at ``U(0.1, 0.9) * t_max``.
    """
    import random

    import scvelo.datasets
    from scvelo.core import SplicingDynamics

    n_cells = check_int(n_cells, "n_cells", minimum=2)
    n_genes = check_int(n_genes, "n_genes", minimum=1)
    noise_level = _check_real("noise_level", noise_level)
    t_max = _check_real("t_max", t_max, positive=True)
    seed = check_int(seed, "seed", minimum=0)
    rng = np.random.default_rng(seed)
    alpha = rng.lognormal(np.log(5.0), 0.5, n_genes)
    beta = rng.lognormal(np.log(0.5), 0.5, n_genes)
    gamma = rng.lognormal(np.log(0.3), 0.5, n_genes)
    switches = rng.uniform(0.1, 0.9, n_genes)
    # scVelo reseeds the global generators: keep the caller's streams as they were
    numpy_state, python_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        adata = scvelo.datasets.simulation(
            n_obs=n_cells, n_vars=n_genes, alpha=alpha, beta=beta, gamma=gamma,
            switches=switches, noise_level=noise_level, t_max=t_max, random_seed=seed)
    finally:
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(python_state)
    t = adata.obs["true_t"].to_numpy(dtype=np.float64)[:, None]
    # scVelo's switch time is that of the last cell before the switch fraction
    t_off = adata.var["true_t_"].to_numpy(dtype=np.float64)
    on = SplicingDynamics(alpha=alpha, beta=beta, gamma=gamma, initial_state=[0.0, 0.0])
    u_on, s_on = on.get_solution(t, stacked=False)
    u_sw, s_sw = on.get_solution(t_off, stacked=False)
    off = SplicingDynamics(alpha=0.0, beta=beta, gamma=gamma, initial_state=[u_sw, s_sw])
    u_off, s_off = off.get_solution(np.maximum(t - t_off, 0.0), stacked=False)
    after = t >= t_off
    u = np.where(after, u_off, u_on)
    s = np.where(after, s_off, s_on)
    rate = np.where(after, 0.0, alpha)
    adata.layers["true_velocity"] = (beta * u - gamma * s).astype(np.float32)
    adata.layers["true_velocity_u"] = (rate - beta * u).astype(np.float32)
    adata.var["true_t_off"] = t_off
    adata.X = np.array(adata.layers["spliced"], dtype=np.float32)
    adata.uns["simulation"] = {"simulator": "scvelo.datasets.simulation", "seed": seed,
                               "noise_level": noise_level, "t_max": t_max}
    return adata


# --------------------------------------------------------------------------------------
# real data sets (through scVelo)
# --------------------------------------------------------------------------------------

#: Seconds the network check may take before a data set is declared unavailable.
NETWORK_TIMEOUT = 3.0
_SCVELO_DATA_URL = "https://github.com/theislab/scvelo_notebooks/raw/master/"
# name -> (scvelo.datasets function, scVelo's default file, path under the data URL)
_REAL_DATASETS = {
    "pancreas": ("pancreas", "data/Pancreas/endocrinogenesis_day15.h5ad",
                 "data/Pancreas/endocrinogenesis_day15.h5ad"),
    "dentate_gyrus": ("dentategyrus", "data/DentateGyrus/10X43_1.h5ad",
                      "data/DentateGyrus/10X43_1.h5ad"),
}


class DatasetUnavailableError(OSError):
    """A real data set is neither cached locally nor downloadable (e.g. offline).

    Subclass of :class:`OSError`; the message names the data set, the URL and the file
    to place a manual download at.
    """


def _reachable(host: str, port: int = 443, timeout: float = NETWORK_TIMEOUT) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds.

    Name resolution and connection run in a daemon thread, so a hanging DNS lookup
    cannot block longer than ``timeout`` either.
    """
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def _load_real(name: str, file_path: str | Path | None) -> anndata.AnnData:
    function, default_path, remote = _REAL_DATASETS[name]
    path = Path(default_path if file_path is None else file_path)
    url = _SCVELO_DATA_URL + remote
    manual = (f"To use it offline, download {url} on a machine with internet access and "
              f"save it as {path.resolve()} (or pass file_path=... to "
              f"pyro_velo.datasets.{name}()).")
    import scvelo.datasets

    loader = getattr(scvelo.datasets, function)
    if not path.is_file():
        host = urlsplit(url).hostname
        if not _reachable(host):
            raise DatasetUnavailableError(
                f"The {name} data set is not cached at {path.resolve()} and cannot be "
                f"downloaded: {host} is unreachable (this machine seems to be offline). "
                + manual)
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        adata = loader(str(path))
    except Exception as err:  # a failed or interrupted download, an unreadable file
        raise DatasetUnavailableError(
            f"The {name} data set could not be loaded ({type(err).__name__}: {err}). "
            + manual) from err
    return adata


def pancreas(file_path: str | Path | None = None) -> anndata.AnnData:
    """Pancreatic endocrinogenesis at E15.5 (Bastidas-Ponce et al. 2019), via scVelo.

    3696 cells x 27998 genes with raw ``spliced`` / ``unspliced`` counts, cell types in
    ``obs['clusters']`` and a UMAP in ``obsm['X_umap']``. Calls
    :func:`scvelo.datasets.pancreas`, which downloads the file (about 50 MB) once and
    then reads it from the cache.

    Parameters
    ----------
    file_path
        Where the file is cached; default scVelo's default location,
        ``data/Pancreas/endocrinogenesis_day15.h5ad`` relative to the working directory.

    Raises
    ------
    DatasetUnavailableError
        If the file is not cached and the download fails; without a network connection
        this happens after at most a few seconds (:data:`NETWORK_TIMEOUT`). The message
        says where to download the file by hand and where to put it.

    Examples
    --------
    >>> import pyro_velo as pv
    >>> adata = pv.datasets.pancreas()
    >>> pv.pp.preprocess(adata)
    """
    return _load_real("pancreas", file_path)


def dentate_gyrus(file_path: str | Path | None = None) -> anndata.AnnData:
    """Dentate gyrus neurogenesis (Hochgerner et al. 2018), via scVelo.

    2930 cells x 13913 genes (scVelo's adjusted version) with raw ``spliced`` /
    ``unspliced`` counts, cell types in ``obs['clusters']`` and a 2-D embedding in
    ``obsm['X_umap']``. Calls :func:`scvelo.datasets.dentategyrus`, which downloads the
    file once and then reads it from the cache.

    Parameters
    ----------
    file_path
        Where the file is cached; default scVelo's default location,
        ``data/DentateGyrus/10X43_1.h5ad`` relative to the working directory.

    Raises
    ------
    DatasetUnavailableError
        As for :func:`pancreas`.
    """
    return _load_real("dentate_gyrus", file_path)
