"""The ODE simulator: counts with a known latent time, branch and velocity.

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
"""

from __future__ import annotations

from collections.abc import Mapping

import anndata
import numpy as np
import scipy.sparse as sp

from .._threads import cpu_threads
from ._generative import (
    _MAX_CHUNK_ENTRIES,
    BEHAVIOURS,
    DEFAULT_BEHAVIOURS,
    _annotations,
    _draw_counts,
    _evaluate,
    _schedule_tensors,
    _simulation_plan,
    _stack,
    _validate,
)

__all__ = ["BEHAVIOURS", "DEFAULT_BEHAVIOURS", "expected_state", "simulate"]


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
    cfg = _validate(locals(), chunk_size)
    n_cells, n_genes = cfg["n_cells"], cfg["n_genes"]
    cells, genes, schedule, rngs = _simulation_plan(cfg)

    # expected abundances, velocities and counts, chunk by chunk
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
                schedule, cells["t"][start:stop], cells["lineage"][start:stop],
                [b[: stop - start] for b in buffers],
            )
        velocity_s[start:stop] = ds
        velocity_u[start:stop] = du
        size_factor = cells["size_factor"][start:stop, None]
        for mean, kind, chunks in ((s, "s", spliced_chunks), (u, "u", unspliced_chunks)):
            counts = _draw_counts(mean, size_factor, genes["dispersion"], nb,
                                  rngs[f"gamma_{kind}"], rngs[f"poisson_{kind}"])
            chunks.append(sp.csr_matrix(counts.astype(np.int32)))
            del counts
        del u, s, du, ds

    spliced = _stack(spliced_chunks)
    unspliced = _stack(unspliced_chunks)
    obs, var, uns = _annotations(cells, genes, cfg)
    adata = anndata.AnnData(X=spliced.astype(np.float32), obs=obs, var=var)
    adata.layers["spliced"] = spliced
    adata.layers["unspliced"] = unspliced
    adata.layers["true_velocity"] = velocity_s
    adata.layers["true_velocity_u"] = velocity_u
    adata.uns.update(uns)
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
