"""Initial values of the per-gene ODE parameters.

Two initialisations are provided:

* :func:`steady_state_init` — the steady-state approximation of the paper (section 3.2):
  cells in the top quantile of ``u`` and ``s`` are taken to be at steady state, ``beta = 1``,
  ``alpha = u*`` and ``gamma = u* / s*`` (a least-squares slope through the origin over
  those extreme cells, as in scVelo).
* :func:`time_informed_init` — given a time per cell (from a first training stage, or from
  capture times, paper section 4.2), the switch times and transcription rate of every gene
  are chosen by a vectorised grid search; the kinetic function is linear in ``alpha`` so
  ``alpha`` has a closed form at each grid point.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import kinetics, policies

#: cells per block of the grid search in :func:`time_informed_init`
GRID_BLOCK_CELLS = 128
# Rates are kept inside these bounds at initialisation: outside them the steady-state
# estimate is degenerate (a gene with ~no unspliced or spliced signal).
RATE_BOUNDS = (1e-2, 1e2)


@dataclass
class RateInit:
    """Per-gene initial values (each a tensor of shape ``(G,)``, on the model's scale)."""

    alpha: Tensor
    beta: Tensor
    gamma: Tensor
    t_on: Tensor
    t_off: Tensor
    scale_u: Tensor
    sigma_u: Tensor
    sigma_s: Tensor


def steady_state_init(u: Tensor, s: Tensor, t_max: float, quantile: float = 0.95) -> RateInit:
    """Steady-state initialisation with a safe fallback for degenerate genes.

    Parameters
    ----------
    u, s
        ``(cells, genes)`` unspliced and spliced abundances (already on the model's scale).
    t_max
        Length of the time axis; genes start with ``t_on = 0`` and ``t_off = t_max / 2``.
    quantile
        Cells above this quantile in ``u`` or ``s`` count as being near steady state.

    Returns
    -------
    RateInit
        Initial values. Genes whose estimate is not finite or outside ``RATE_BOUNDS``
        (e.g. all-zero unspliced) get the median ``gamma`` of the well-behaved genes
        (or 1 when there is none) and ``alpha`` clamped to the bounds.
    """
    u = u.double()
    s = s.double()
    u_top = torch.quantile(u, quantile, dim=0)
    s_top = torch.quantile(s, quantile, dim=0)
    extreme = (u >= u_top) | (s >= s_top)
    w = extreme.double()
    gamma = (w * u * s).sum(0) / (w * s * s).sum(0)
    ok = torch.isfinite(gamma) & (gamma > RATE_BOUNDS[0]) & (gamma < RATE_BOUNDS[1])
    fallback = gamma[ok].median() if ok.any() else torch.tensor(1.0, dtype=u.dtype)
    gamma = torch.where(ok, gamma, fallback)
    alpha = torch.nan_to_num(torch.maximum(u_top, u.max(0).values * 0.5), nan=1.0)
    alpha = alpha.clamp(*RATE_BOUNDS)
    n_genes = u.shape[1]
    return RateInit(
        alpha=alpha.float(),
        beta=torch.ones(n_genes),
        gamma=gamma.float(),
        t_on=torch.zeros(n_genes),
        t_off=torch.full((n_genes,), 0.5 * t_max),
        scale_u=torch.ones(n_genes),
        sigma_u=_noise_init(u),
        sigma_s=_noise_init(s),
    )


def time_informed_init(
    u: Tensor,
    s: Tensor,
    t: Tensor,
    beta: Tensor,
    gamma: Tensor,
    scale_u: Tensor,
    n_grid: int = 16,
    max_cells: int = 3000,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Choose ``t_on``, ``t_off`` and ``alpha`` of every gene given cell times.

    For each gene and each pair ``t_on < t_off`` on a grid spanning the observed times
    (with ``t_on`` allowed well before the first cell, so genes already on at the start are
    representable, and ``t_off`` after the last, so genes never switched off are too), the
    least-squares ``alpha`` is computed in closed form and the pair with the smallest
    squared error on ``u`` and ``s`` (each standardised) is kept.

    Parameters
    ----------
    u, s
        ``(cells, genes)`` abundances on the model's scale.
    t
        ``(cells,)`` cell times.
    beta, gamma, scale_u
        ``(genes,)`` current rates and unspliced scaling, held fixed.
    n_grid
        Grid points per switch time.
    max_cells
        Cells used (a seeded random subset when there are more): cost is
        ``cells x genes x n_grid^2 / 2``.

    Returns
    -------
    t_on, t_off, alpha
        ``(genes,)`` tensors.
    error
        The fit's squared error per cell and gene (standardised): comparing it between
        ``t`` and reversed ``t`` tells which direction of time the kinetics support.
    """
    if u.shape[0] > max_cells:
        gen = torch.Generator().manual_seed(seed)
        keep = torch.randperm(u.shape[0], generator=gen)[:max_cells]
        u, s, t = u[keep], s[keep], t[keep]
    # the kinetics are evaluated in float32 (half the memory traffic of float64, which
    # the passes over cells x genes are bound by) and the sums over cells accumulate in
    # float64
    u, s, t = u.float(), s.float(), t.float()
    beta, gamma, scale_u = beta.float(), gamma.float(), scale_u.float()
    t_lo, t_hi = t.min().item(), t.max().item()
    span = max(t_hi - t_lo, 1e-3)
    # t_on may lie far before the first cell: a gene on since long before is at steady state
    grid_on = torch.linspace(t_lo - 2.0 * span, t_hi, n_grid, dtype=u.dtype)
    grid_off = torch.linspace(t_lo, t_hi + span, n_grid, dtype=u.dtype)
    on_idx, off_idx = torch.nonzero(grid_off[None, :] > grid_on[:, None], as_tuple=True)
    on, off = grid_on[on_idx], grid_off[off_idx]  # (P,) pairs t_on < t_off
    w_u = 1.0 / u.var(0).clamp(min=1e-8)
    w_s = 1.0 / s.var(0).clamp(min=1e-8)
    # Per pair and gene the fit needs only sums over cells: sum(f u), sum(f f) (and the
    # constant sum(u u)). They are accumulated over blocks of cells, and within a block
    # the unit-rate kinetics of a pair are assembled from pieces computed once per grid
    # value: the on-phase from zero at each t_on, and the decay after each t_off of a
    # unit u or s (the solution is linear in the state at t_off). This gives the
    # switching solution of every pair with no exponential per pair (the direct
    # evaluation of all pairs on all cells at once spent minutes in page faults).
    n_pairs, n_genes = on.shape[0], u.shape[1]
    cross = torch.zeros(2, n_pairs, n_genes, dtype=torch.float64)  # sum fu*u, sum fs*s
    square = torch.zeros(2, n_pairs, n_genes, dtype=torch.float64)  # sum fu^2, sum fs^2
    # state at t_off of each pair (unit rate from zero at t_on), (P, genes)
    u_off, s_off = kinetics.solve((off - on)[:, None], 0.0, 0.0, 1.0, beta, gamma)
    for block in torch.arange(u.shape[0]).split(GRID_BLOCK_CELLS):
        ub, sb, tb = u[block], s[block], t[block, None]
        rise_u, rise_s = zip(*(kinetics.solve((tb - a).clamp(min=0.0), 0.0, 0.0, 1.0,
                                              beta, gamma) for a in grid_on), strict=True)
        decay_uu, decay_us, decay_ss = [], [], []
        for b in grid_off:
            elapsed = (tb - b).clamp(min=0.0)
            from_u = kinetics.solve(elapsed, 1.0, 0.0, 0.0, beta, gamma)
            decay_uu.append(from_u[0])
            decay_us.append(from_u[1])
            decay_ss.append(kinetics.solve(elapsed, 0.0, 1.0, 0.0, beta, gamma)[1])
        for p in range(n_pairs):
            i, j = on_idx[p], off_idx[p]
            before_off = tb < grid_off[j]
            fu = torch.where(before_off, rise_u[i], u_off[p] * decay_uu[j]) * scale_u
            fs = torch.where(before_off, rise_s[i],
                             s_off[p] * decay_ss[j] + u_off[p] * decay_us[j])
            cross[0, p] += (fu * ub).sum(0)
            cross[1, p] += (fs * sb).sum(0)
            square[0, p] += (fu * fu).sum(0)
            square[1, p] += (fs * fs).sum(0)
    u, s, w_u, w_s = u.double(), s.double(), w_u.double(), w_s.double()
    num = w_u * cross[0] + w_s * cross[1]
    den = w_u * square[0] + w_s * square[1]
    alpha = (num / den.clamp(min=1e-12)).clamp(*RATE_BOUNDS)  # (pairs, genes)
    # sum (x - alpha f)^2 = sum x^2 - 2 alpha sum f x + alpha^2 sum f^2
    err = (w_u * ((u * u).sum(0) - 2 * alpha * cross[0] + alpha ** 2 * square[0])
           + w_s * ((s * s).sum(0) - 2 * alpha * cross[1] + alpha ** 2 * square[1]))
    pick = err.argmin(0)  # the first minimum, as a strict "better" scan would keep
    genes = torch.arange(n_genes)
    best_err = err[pick, genes]
    best = torch.stack([on[pick], off[pick], alpha[pick, genes]])
    error = (best_err.sum() / (2 * u.shape[0] * u.shape[1])).item()
    return best[0].float(), best[1].float(), best[2].float(), error


def _noise_init(x: Tensor) -> Tensor:
    """Initial noise scale: the gene's standard deviation (a fit can only reduce it)."""
    return x.std(0).clamp(min=1e-3).float()


@dataclass
class WindowTable:
    """Every cell's initial state as a window of a (cluster, time bin) summary table.

    Cell ``i`` starts at time ``t0[i]`` (NaN: no initial state) from the mean of the
    reference cells of group ``group[i]`` in the time bins ``start[i]:stop[i]``. The table
    holds cumulative sums along time (``sums``, ``counts``: leading zero bin), so a window
    mean is two lookups whatever its width. Memory is ``O(cells + groups x bins x genes)``
    instead of ``O(cells x genes)`` for per-cell states: a million cells need a few
    tens of MB.

    Attributes
    ----------
    t0
        ``(N,)`` start times, NaN where no window was found.
    group, start, stop
        ``(N,)`` integer row of the table and bin range of every cell.
    sums
        ``(groups, bins + 1, 2 G)`` float64 cumulative sums of ``[u | s]`` over time bins.
    counts
        ``(groups, bins + 1)`` float64 cumulative numbers of cells.
    """

    t0: Tensor
    group: Tensor
    start: Tensor
    stop: Tensor
    sums: Tensor
    counts: Tensor

    def state(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(t0, u0, s0)`` of the cells ``idx``; ``u0 = s0 = 0`` where ``t0`` is NaN."""
        group, start, stop = self.group[idx], self.start[idx], self.stop[idx]
        number = self.counts[group, stop] - self.counts[group, start]
        total = self.sums[group, stop] - self.sums[group, start]
        mean = (total / number.clamp(min=1.0)[:, None]).float()
        g = self.sums.shape[-1] // 2
        return self.t0[idx], mean[:, :g], mean[:, g:]

    @classmethod
    def per_cell(cls, t0: Tensor, u0: Tensor, s0: Tensor) -> WindowTable:
        """A table giving each cell exactly ``(u0, s0)`` at ``t0`` (one group per cell)."""
        n = t0.shape[0]
        x = torch.cat([u0, s0], dim=1).double()
        sums = torch.stack([torch.zeros_like(x), x], dim=1)
        counts = torch.zeros(n, 2, dtype=torch.float64, device=x.device)
        counts[:, 1] = 1.0
        index = torch.arange(n, device=x.device)
        return cls(t0.clone(), index, torch.zeros_like(index), torch.ones_like(index),
                   sums, counts)

    def tensors(self) -> dict[str, Tensor]:
        """The fields by name (to store as buffers)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def window_table(
    t: Tensor,
    c: Tensor,
    values: Iterable[tuple[Tensor, Tensor]],
    delta1: float,
    delta2: float,
    reference: Tensor | None = None,
    n_clusters: int = 10,
    n_bins: int = 200,
    seed: int = 0,
    kmeans_cells: int = 50_000,
) -> WindowTable:
    """Each cell's initial state: the mean state of similar cells just before it.

    For a cell at time ``t`` the initial state at ``t0 = t - (delta1 + delta2) / 2`` is
    the mean ``(u, s)`` of the reference cells in the window ``[t - delta1, t - delta2]``
    that share its cell-state cluster (paper, "Initial Conditions"). Fully vectorised:
    cells are grouped by k-means on ``c`` and binned in time; per (cluster, bin) sums and
    their cumulative sums along time give every window with two lookups, so the cost is
    ``O(cells x genes)`` with no per-cell neighbour search, and ``values`` can be streamed
    in minibatches (the table is all that is kept).

    Cells whose window holds no reference cell of their cluster (at the start of time,
    or where a cluster is sparse) keep the first-stage initial condition: ``u0 = s0 = 0``
    at the genes' switch-on times (``t0 = nan``). They do not borrow the window of all
    clusters: past a branch point that mixes the branches. On the 2-branch and linear
    simulations such borrowed starts cost velocity and log-likelihood at most seeds
    (``benchmarks/refinement.py``).

    Parameters
    ----------
    t, c
        ``(N,)`` times and ``(N, d)`` cell states (posterior means) of all cells.
    values
        Iterable of ``(rows, x)``: reference cells ``rows`` and their ``[u | s]``
        ``(len(rows), 2 G)`` (observed scale); every reference cell exactly once.
    delta1, delta2
        Window bounds before each cell, ``delta1 > delta2 >= 0``, in time units.
    reference
        ``(N,)`` boolean mask of the cells ``values`` covers (e.g. the training cells, so
        held-out cells never inform any initial state); default all cells.
    n_clusters, n_bins
        Cell-state clusters and time bins of the summary table.
    seed
        Seed of the k-means.
    kmeans_cells
        The k-means is fitted on at most this many reference cells (a seeded sample),
        then assigns every cell.
    """
    from sklearn.cluster import KMeans

    if not delta1 > delta2 >= 0:
        raise ValueError(f"need delta1 > delta2 >= 0, got delta1={delta1}, delta2={delta2}")
    n = t.shape[0]
    ref = torch.ones(n, dtype=torch.bool, device=t.device) if reference is None else reference
    ref_cells = torch.nonzero(ref).squeeze(1).cpu()
    k = max(1, min(n_clusters, len(ref_cells) // 20))
    if len(ref_cells) > kmeans_cells:
        pick = torch.randperm(len(ref_cells), generator=torch.Generator().manual_seed(seed))
        ref_cells = ref_cells[pick[:kmeans_cells]].sort().values
    c_np = c.detach().cpu().double().numpy()
    kmeans = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(c_np[ref_cells.numpy()])
    cluster = torch.as_tensor(kmeans.predict(c_np), dtype=torch.long, device=t.device)
    t_lo, t_hi = t.min(), t.max()
    width = (t_hi - t_lo).clamp(min=1e-6) / n_bins
    time_bin = ((t - t_lo) / width).long().clamp(0, n_bins - 1)
    flat = cluster * n_bins + time_bin
    sums = counts = None
    for rows, x in values:
        if sums is None:
            sums = torch.zeros(k * n_bins, x.shape[1], dtype=torch.float64, device=t.device)
            counts = torch.zeros(k * n_bins, dtype=torch.float64, device=t.device)
        rows = rows.to(t.device)
        sums.index_add_(0, flat[rows], x.to(t.device, torch.float64))
        counts.index_add_(0, flat[rows], torch.ones(len(rows), dtype=torch.float64,
                                                    device=t.device))
    if sums is None:
        raise ValueError("values is empty: no reference cell to summarise")
    # cumulative along time with a leading zero bin: window [a, b) sum = cum[b] - cum[a]
    sums = torch.nn.functional.pad(sums.view(k, n_bins, -1).cumsum(1), (0, 0, 1, 0))
    counts = torch.nn.functional.pad(counts.view(k, n_bins).cumsum(1), (1, 0))
    start = ((t - delta1 - t_lo) / width).floor().long().clamp(0, n_bins)
    stop = ((t - delta2 - t_lo) / width).floor().long().clamp(0, n_bins)
    stop = torch.maximum(stop, start)
    found = (counts[cluster, stop] - counts[cluster, start]) > 0.5
    t0 = torch.where(found, t - 0.5 * (delta1 + delta2), torch.full_like(t, float("nan")))
    return WindowTable(t0, cluster, start, stop, sums, counts)


def window_initial_conditions(
    t: Tensor,
    c: Tensor,
    u: Tensor,
    s: Tensor,
    delta1: float,
    delta2: float,
    reference: Tensor | None = None,
    n_clusters: int = 10,
    n_bins: int = 200,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-cell ``(t0, u0, s0)`` of :func:`window_table` from in-memory ``u``, ``s``.

    ``u``, ``s``: ``(N, G)`` observed abundances of all cells (only the ``reference``
    cells are summarised). Returns ``(N,)`` and ``(N, G)`` tensors; ``t0`` is NaN (and
    ``u0 = s0 = 0``) where no window was found.
    """
    n = t.shape[0]
    ref = torch.ones(n, dtype=torch.bool, device=t.device) if reference is None else reference
    rows = torch.nonzero(ref).squeeze(1)
    table = window_table(t, c, [(rows, torch.cat([u, s], dim=1)[rows])], delta1, delta2,
                         ref, n_clusters, n_bins, seed)
    t0, u0, s0 = table.state(torch.arange(n, device=t.device))
    return t0, u0.to(u.dtype), s0.to(s.dtype)


def direction_score(
    t: Tensor, u: Tensor, s: Tensor, beta: Tensor, gamma: Tensor, scale_u: Tensor,
    n_bins: int = 50,
) -> float:
    """Evidence that time runs forward along ``t``: positive forward, negative backward.

    The splicing ODE says ``ds/dt = beta * u - gamma * s``: where unspliced is above its
    steady-state line, spliced must be rising. Cells are averaged in ``n_bins`` quantile
    bins of ``t``; for each gene the change of mean ``s`` between consecutive bins is
    correlated with ``beta * u - gamma * s`` at the bins' midpoints. The score is the mean
    of these correlations over genes; reversing time flips its sign. It uses the kinetics
    directly, so it separates the directions even where switching-ODE fits to ``t`` and to
    its reverse reach almost the same error.

    Parameters
    ----------
    t
        ``(N,)`` cell times.
    u, s
        ``(N, G)`` abundances on the model's scale.
    beta, gamma, scale_u
        ``(G,)`` rates and unspliced scaling (e.g. from :func:`steady_state_init`).
    n_bins
        Number of time bins.
    """
    n_bins = max(3, min(n_bins, t.shape[0] // 5))
    order = torch.argsort(t)
    bins = torch.div(torch.arange(len(t)) * n_bins, len(t), rounding_mode="floor")
    counts = torch.bincount(bins, minlength=n_bins).clamp(min=1).unsqueeze(-1).double()

    def bin_means(x: Tensor) -> Tensor:
        out = torch.zeros(n_bins, x.shape[1], dtype=torch.float64)
        return out.index_add_(0, bins, x[order].double()) / counts

    mu, ms = bin_means(u), bin_means(s)
    ds = ms[1:] - ms[:-1]
    drive = (beta.double() * (mu / scale_u.double()) - gamma.double() * ms)
    drive = 0.5 * (drive[1:] + drive[:-1])
    ds = ds - ds.mean(0)
    drive = drive - drive.mean(0)
    denom = (ds.norm(dim=0) * drive.norm(dim=0)).clamp(min=1e-12)
    corr = (ds * drive).sum(0) / denom
    return float(corr.mean())


def knn_graph(x: np.ndarray, n_neighbors: int | None = None, n_pcs: int = 30,
              seed: int = 0):
    """Symmetric binary kNN graph of the rows of ``x`` in their leading principal components.

    The stand-in for ``adata.obsp['connectivities']`` when there is none (e.g. for cells
    streamed from a file): ``x`` holds the per-gene scaled ``[u | s]`` of the cells.
    ``n_neighbors``: None, as ``pp.preprocess`` (30, at most a fifth of a small data set;
    :class:`~pyro_velo.policies.NeighbourPolicy`). Returns an ``(N, N)`` scipy CSR matrix.
    """
    import scipy.sparse as sp
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    n = x.shape[0]
    if n_neighbors is None:
        n_neighbors = policies.NEIGHBOURS.n_neighbors(n)
    n_pcs = max(1, min(n_pcs, n - 1, x.shape[1]))
    pcs = PCA(n_components=n_pcs, random_state=seed).fit_transform(x)
    k = max(1, min(n_neighbors, n - 1))
    neighbours = NearestNeighbors(n_neighbors=k).fit(pcs).kneighbors(return_distance=False)
    rows = np.repeat(np.arange(n), k)
    graph = sp.csr_matrix((np.ones(n * k), (rows, neighbours.ravel())), shape=(n, n))
    return graph.maximum(graph.T)


def diffusion_coordinates(connectivities, n_comps: int = 10, seed: int = 0
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Diffusion-map coordinates of the cells of a kNN graph (Haghverdi et al. 2016).

    Returns ``(coords, psi)``: ``psi`` the ``(N, k)`` leading non-trivial eigenvectors
    of the diffusion operator, ``coords`` the same scaled by ``lambda / (1 - lambda)``,
    so that Euclidean distances between rows of ``coords`` are diffusion pseudotime
    distances.
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh

    graph = sp.csr_matrix(connectivities, dtype=np.float64)
    graph = graph.maximum(graph.T)
    n = graph.shape[0]
    degree = np.asarray(graph.sum(1)).ravel()
    degree[degree == 0] = 1.0
    inv_sqrt = sp.diags(1.0 / np.sqrt(degree))
    sym = inv_sqrt @ graph @ inv_sqrt
    k = min(n_comps + 1, n - 2)
    start = np.random.default_rng(seed).random(n)
    evals, evecs = eigsh(sym, k=k, which="LA", v0=start)
    order = np.argsort(-evals)
    evals, evecs = evals[order][1:], evecs[:, order][:, 1:]  # drop the stationary vector
    psi = inv_sqrt @ evecs
    weight = evals / np.clip(1.0 - evals, 1e-6, None)
    return psi * weight, psi


def root_pseudotime(connectivities, root: np.ndarray, seed: int = 0) -> np.ndarray:
    """Diffusion pseudotime from a set of root cells, on ``[0, 1]``.

    Each cell's diffusion distance (:func:`diffusion_coordinates`) to the centre of the
    root cells (``root``: ``(N,)`` boolean mask), rescaled to ``[0, 1]``.
    """
    coords, _ = diffusion_coordinates(connectivities, seed=seed)
    dpt = np.sqrt(((coords - coords[root].mean(0)) ** 2).sum(1))
    return (dpt - dpt.min()) / max(np.ptp(dpt), 1e-12)


def diffusion_pseudotimes(connectivities, n_comps: int = 10, n_roots: int = 3,
                          seed: int = 0) -> list[np.ndarray]:
    """Candidate orderings of the cells: diffusion pseudotimes from extreme cells.

    A diffusion map of the kNN graph (Haghverdi et al. 2016) gives each cell coordinates
    ``psi_k`` with eigenvalues ``lambda_k``; the diffusion pseudotime from a root cell is
    ``sqrt(sum_k (lambda_k / (1 - lambda_k))^2 (psi_k - psi_k[root])^2)``. Trajectories
    start and end at extremes of the leading components, so the roots tried are the cells
    with the smallest and largest value of each of the first ``n_roots`` components.

    Parameters
    ----------
    connectivities
        ``(N, N)`` symmetric sparse kNN connectivities (``adata.obsp['connectivities']``).
    n_comps
        Diffusion components used for the distance.
    n_roots
        Leading components whose extremes are tried as roots (``2 * n_roots`` candidates).
    seed
        Seed of the eigensolver's start vector.

    Returns
    -------
    list of numpy.ndarray
        Each ``(N,)`` pseudotime rescaled to ``[0, 1]``.
    """
    coords, psi = diffusion_coordinates(connectivities, n_comps, seed)
    out = []
    for comp in range(min(n_roots, coords.shape[1])):
        for root in (int(np.argmin(psi[:, comp])), int(np.argmax(psi[:, comp]))):
            dpt = np.sqrt(((coords - coords[root]) ** 2).sum(1))
            out.append((dpt - dpt.min()) / max(np.ptp(dpt), 1e-12))
    return out
