"""The velocity-evaluation metrics of ``pv.tl``, and the helpers the package's tools
share: reading ``adata.obs`` columns and the kNN graph with clear errors.

Every metric reads an :class:`~anndata.AnnData` and *returns* its result; none writes
into ``adata``. Neighbours come from the kNN graph stored by scanpy / scVelo in
``adata.obsp`` (only its non-zero pattern is used), and all per-cell work is done on
the edge lists of that sparse graph, so no Python loop runs over cells.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterable
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from .._checks import InputError, check_finite, check_layers
from ..capture import parse_capture_times

__all__ = [
    "cross_boundary_correctness",
    "in_cluster_coherence",
    "time_correlation",
    "transition_time_score",
    "velocity_consistency",
]

#: Values (edges x features) handled at once when computing per-edge cosines; bounds the
#: temporary memory to a few tens of MB whatever the graph and gene count.
_CHUNK_VALUES = 1 << 21

Transition = tuple[Hashable, Hashable]


# --------------------------------------------------------------------------- helpers


def _obs_column(adata: Any, key: str) -> pd.Series:
    if key not in adata.obs.columns:
        shown = ", ".join(repr(c) for c in adata.obs.columns) or "none"
        raise InputError(f"Column {key!r} not found in adata.obs. Available columns: {shown}.")
    return adata.obs[key]


def _numeric_obs(adata: Any, key: str) -> np.ndarray:
    """``adata.obs[key]`` as float64 (NaN kept), or an InputError if not numeric."""
    column = _obs_column(adata, key)
    # A categorical of numbers (e.g. capture times 1, 2, 3 stored as categories) is
    # still a number per cell; only its storage differs.
    if isinstance(column.dtype, pd.CategoricalDtype) and pd.api.types.is_numeric_dtype(
        column.cat.categories
    ):
        column = column.astype(float)
    if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        examples = ", ".join(repr(v) for v in pd.unique(column.dropna())[:3])
        raise InputError(
            f"adata.obs[{key!r}] has dtype {column.dtype} (values such as {examples}); "
            "a numeric time is required. Convert labels like 'E12.5' or 'day7' to numbers "
            f"first, e.g. adata.obs[{key!r}] = adata.obs[{key!r}].map({{'day7': 7.0, ...}})."
        )
    return column.to_numpy(dtype=float, na_value=np.nan)


def _obsm(adata: Any, key: str) -> np.ndarray:
    if key not in adata.obsm:
        shown = ", ".join(repr(k) for k in adata.obsm.keys()) or "none"
        raise InputError(f"Key {key!r} not found in adata.obsm. Available keys: {shown}.")
    return np.asarray(adata.obsm[key])


def _labels(adata: Any, cluster_key: str) -> tuple[np.ndarray, list[Hashable]]:
    """Cluster label per cell (object array) and the clusters present, in category order."""
    column = _obs_column(adata, cluster_key)
    if isinstance(column.dtype, pd.CategoricalDtype):
        present = set(column.dropna().unique())
        clusters = [c for c in column.cat.categories if c in present]
    else:
        clusters = sorted(column.dropna().unique(), key=str)
    return column.to_numpy(dtype=object), clusters


def _check_transitions(
    transitions: Iterable[Transition], clusters: list[Hashable], cluster_key: str
) -> list[Transition]:
    checked = []
    for transition in transitions:
        if len(transition) != 2:
            raise InputError(f"A transition must be a pair (A, B), got {transition!r}.")
        for label in transition:
            if label not in clusters:
                shown = ", ".join(repr(c) for c in clusters)
                raise InputError(
                    f"Cell type {label!r} of transition {tuple(transition)!r} not found in "
                    f"adata.obs[{cluster_key!r}]. Available: {shown}."
                )
        checked.append((transition[0], transition[1]))
    if not checked:
        raise InputError("transitions is empty; pass at least one pair (A, B).")
    return checked


def default_graph_key(obsp: Any) -> str | None:
    """The kNN graph the tools read from an AnnData's (or an open file's) ``obsp``:
    ``'connectivities'`` (which scVelo's moments average over), else ``'distances'``;
    None where there is neither."""
    return next((key for key in ("connectivities", "distances")
                 if obsp is not None and key in obsp), None)


def _neighbor_graph(adata: Any, neighbors: str | sp.spmatrix | None) -> sp.csr_matrix:
    """Boolean CSR kNN graph without self-loops: row i holds the neighbours of cell i.

    ``neighbors`` is an ``adata.obsp`` key, an (n_obs, n_obs) sparse matrix, or None for
    ``obsp['connectivities']`` (falling back to ``obsp['distances']``).
    """
    if neighbors is None:
        neighbors = default_graph_key(adata.obsp)
        if neighbors is None:
            raise InputError(
                "No neighbour graph: adata.obsp has neither 'connectivities' nor 'distances'. "
                "Run pv.pp.preprocess, sc.pp.neighbors or scv.pp.neighbors first."
            )
    if isinstance(neighbors, str):
        if neighbors not in adata.obsp:
            shown = ", ".join(repr(k) for k in adata.obsp.keys()) or "none"
            raise InputError(f"Key {neighbors!r} not found in adata.obsp. Available keys: {shown}.")
        graph = adata.obsp[neighbors]
    else:
        graph = neighbors
    if tuple(graph.shape) != (adata.n_obs, adata.n_obs):
        raise InputError(
            f"The neighbour graph has shape {tuple(graph.shape)}, expected "
            f"{(adata.n_obs, adata.n_obs)}."
        )
    graph = sp.csr_matrix(graph, copy=True)
    graph.setdiag(0)  # a cell is not its own neighbour (scanpy's kNN indices include it)
    graph.eliminate_zeros()  # explicit zeros are not edges
    return graph.astype(bool)


def _features(
    adata: Any, velocity_key: str, basis: str | None, need_position: bool
) -> tuple[Any, Any, np.ndarray | None]:
    """Velocity matrix, position matrix (or None) and kept columns (None: all).

    In gene space the velocity is ``layers[velocity_key]`` and positions ``layers['Ms']``;
    columns with a non-finite velocity (or position) in any cell are dropped, because
    pyro_velo and scVelo write NaN columns for genes without a fit.
    """
    if basis is not None:
        name = basis[2:] if basis.startswith("X_") else basis
        velocity = _obsm(adata, f"{velocity_key}_{name}")
        check_finite(velocity, f"adata.obsm[{velocity_key + '_' + name!r}]")
        position = None
        if need_position:
            position = _obsm(adata, f"X_{name}")
            check_finite(position, f"adata.obsm['X_{name}']")
        return velocity, position, None
    needed = [velocity_key, "Ms"] if need_position else [velocity_key]
    check_layers(adata, needed)
    velocity = adata.layers[velocity_key]
    keep = _finite_columns(velocity)
    position = None
    if need_position:
        position = adata.layers["Ms"]
        keep &= _finite_columns(position)
    if not keep.any():
        raise InputError(
            f"No gene has a finite layers[{velocity_key!r}]"
            + (" and layers['Ms']" if need_position else "")
            + " in every cell; nothing to evaluate."
        )
    return velocity, position, keep


def _finite_columns(matrix: Any) -> np.ndarray:
    if sp.issparse(matrix):
        coo = matrix.tocoo()
        keep = np.ones(matrix.shape[1], dtype=bool)
        keep[coo.col[~np.isfinite(coo.data)]] = False
        return keep
    return np.isfinite(np.asarray(matrix)).all(axis=0)


def _rows(matrix: Any, index: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """Dense float64 rows ``matrix[index]`` restricted to the ``keep`` columns.

    Only a chunk of rows is materialised, so sparse or large layers are never copied whole.
    """
    block = matrix[index]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    block = block.astype(np.float64, copy=False)
    return block if keep is None else block[:, keep]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine; 0 where either vector is zero (as sklearn's cosine_similarity)."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    safe = np.where(norms > 0, norms, 1.0)
    return np.where(norms > 0, dots / safe, 0.0)


def _edge_cosines(
    velocity: Any,
    rows: np.ndarray,
    cols: np.ndarray,
    keep: np.ndarray | None,
    position: Any = None,
    centre: bool = False,
) -> np.ndarray:
    """Per-edge cosine, in chunks of edges.

    With ``position``: cos(v_i, x_j - x_i) (CBDir). Without: cos(v_i, v_j), each vector
    first centred by its own mean over features if ``centre`` (Pearson correlation).
    """
    n_features = int(keep.sum()) if keep is not None else velocity.shape[1]
    step = max(1, _CHUNK_VALUES // max(1, n_features))
    out = np.empty(rows.size, dtype=np.float64)
    for start in range(0, rows.size, step):
        r, c = rows[start : start + step], cols[start : start + step]
        a = _rows(velocity, r, keep)
        if position is not None:
            b = _rows(position, c, keep) - _rows(position, r, keep)
        else:
            b = _rows(velocity, c, keep)
        if centre:
            a = a - a.mean(axis=1, keepdims=True)
            b = b - b.mean(axis=1, keepdims=True)
        out[start : start + step] = _cosine(a, b)
    return out


def _mean_per_row(rows: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Mean of ``values`` grouped by ``rows`` (length n; NaN for rows without edges)."""
    counts = np.bincount(rows, minlength=n)
    sums = np.bincount(rows, weights=values, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _block_edges(
    graph: sp.csr_matrix, source: np.ndarray, target: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Global (row, col) indices of the edges from cells ``source`` to cells ``target``."""
    block = graph[source][:, target].tocoo()
    return source[block.row], target[block.col]


def _mean_of_scores(scores: dict, what: str) -> float:
    values = np.array(list(scores.values()), dtype=float)
    empty = [key for key, value in scores.items() if np.isnan(value)]
    if empty:
        warnings.warn(
            f"No cell qualified for {what} {', '.join(map(repr, empty))}: score NaN, "
            "left out of the mean.",
            UserWarning,
            stacklevel=3,
        )
    return float(np.mean(values[~np.isnan(values)])) if len(empty) < values.size else np.nan


# --------------------------------------------------------------------------- metrics


def time_correlation(
    adata: Any, key: str = "true_t", time_key: str = "latent_time", method: str = "spearman",
    mapping: dict | None = None,
) -> float:
    """Rank correlation between an inferred time and a reference time.

    With ``t = adata.obs[time_key]`` and ``r = adata.obs[key]`` over the cells where both
    are finite, returns Spearman's rho (Pearson correlation of the average ranks) or, with
    ``method='kendall'``, Kendall's tau-b (tie-corrected), as computed by
    :func:`scipy.stats.spearmanr` / :func:`scipy.stats.kendalltau`.

    Parameters
    ----------
    adata
        Annotated data; not modified.
    key
        Reference time column of ``adata.obs``, e.g. the simulated ``'true_t'`` or a
        capture time: numbers, or labels such as ``'E12.5'``, ``'day7'``, ``'P0'`` read by
        :func:`pyro_velo.capture.parse_capture_times` (the paper's kt, Table 1).
    time_key
        Inferred time column of ``adata.obs``.
    method
        ``'spearman'`` or ``'kendall'``.
    mapping
        Explicit label-to-number map for ``key`` (see ``parse_capture_times``).

    Returns
    -------
    float
        The correlation in [-1, 1]; NaN if either time is constant over the kept cells.

    Raises
    ------
    InputError
        If a column is missing, ``time_key`` is non-numeric, a label of ``key`` cannot be
        read, ``method`` is unknown, or fewer than 2 cells have both.
    """
    if method not in ("spearman", "kendall"):
        raise InputError(f"method must be 'spearman' or 'kendall', got {method!r}.")
    inferred = _numeric_obs(adata, time_key)
    if key not in adata.obs:
        reference = _numeric_obs(adata, key)  # raises the missing-column error
    reference = parse_capture_times(adata.obs[key].to_numpy(), mapping)
    both = np.isfinite(inferred) & np.isfinite(reference)
    if both.sum() < 2:
        raise InputError(
            f"Only {int(both.sum())} cell(s) have a finite adata.obs[{time_key!r}] and "
            f"adata.obs[{key!r}]; at least 2 are needed."
        )
    x, y = inferred[both], reference[both]
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")  # correlation undefined; avoid scipy's ConstantInputWarning
    if method == "spearman":
        return float(stats.spearmanr(x, y)[0])
    return float(stats.kendalltau(x, y)[0])


def cross_boundary_correctness(
    adata: Any,
    cluster_key: str,
    transitions: Iterable[Transition],
    velocity_key: str = "velocity",
    basis: str | None = None,
    neighbors: str | sp.spmatrix | None = None,
) -> tuple[dict[Transition, float], float]:
    """Cross-boundary direction correctness (CBDir; VeloVAE and UniTVelo papers).

    For a transition A -> B, let ``N_B(i)`` be the neighbours of cell ``i`` that belong to
    B, and ``C = {i in A : N_B(i) non-empty}`` the boundary cells. Then::

        score(A, B) = 1/|C| * sum_{i in C} 1/|N_B(i)| * sum_{j in N_B(i)} cos(v_i, x_j - x_i)

    with ``cos(a, b) = a.b / (|a| |b|)``, taken as 0 when ``a`` or ``b`` is zero. 1 means
    every boundary cell's velocity points straight at its B neighbours, -1 straight away.

    Parameters
    ----------
    adata
        Annotated data; not modified.
    cluster_key
        Column of ``adata.obs`` with the cell type of each cell.
    transitions
        Pairs ``(A, B)`` of cell types, A the progenitor of B.
    velocity_key
        Velocity key: ``layers[velocity_key]`` in gene space, ``obsm[velocity_key + '_' +
        basis]`` in an embedding.
    basis
        ``None`` for gene space: ``x = layers['Ms']``, ``v = layers[velocity_key]``, on the
        genes where both are finite in every cell (NaN velocity columns are dropped). An
        embedding name such as ``'umap'`` uses ``x = obsm['X_umap']`` and
        ``v = obsm['velocity_umap']`` (from ``scv.tl.velocity_embedding``).
    neighbors
        Neighbour graph: an ``adata.obsp`` key, an (n_obs, n_obs) sparse matrix, or None for
        ``obsp['connectivities']`` (else ``obsp['distances']``). The non-zero pattern of row
        ``i``, self excluded, is the neighbour set of ``i``.

    Returns
    -------
    scores
        ``{(A, B): score}``; NaN (with a warning) if no cell of A has a neighbour in B.
    mean
        Mean of the non-NaN scores (NaN if there is none).

    Raises
    ------
    InputError
        If a column, layer, obsm or obsp key is missing, or a transition names a cell type
        absent from ``adata.obs[cluster_key]``.
    """
    labels, clusters = _labels(adata, cluster_key)
    checked = _check_transitions(transitions, clusters, cluster_key)
    velocity, position, keep = _features(adata, velocity_key, basis, need_position=True)
    graph = _neighbor_graph(adata, neighbors)
    scores: dict[Transition, float] = {}
    for a, b in checked:
        rows, cols = _block_edges(graph, np.flatnonzero(labels == a), np.flatnonzero(labels == b))
        cosines = _edge_cosines(velocity, rows, cols, keep, position=position)
        per_cell = _mean_per_row(rows, cosines, adata.n_obs)
        scores[(a, b)] = float(np.nanmean(per_cell)) if rows.size else np.nan
    return scores, _mean_of_scores(scores, "transition(s)")


def in_cluster_coherence(
    adata: Any,
    cluster_key: str,
    velocity_key: str = "velocity",
    basis: str | None = None,
    neighbors: str | sp.spmatrix | None = None,
) -> tuple[dict[Hashable, float], float]:
    """In-cluster coherence (ICCoh; VeloVAE and UniTVelo papers).

    For a cluster K, let ``N_K(i)`` be the neighbours of cell ``i`` that belong to K, and
    ``C = {i in K : N_K(i) non-empty}``. Then::

        score(K) = 1/|C| * sum_{i in C} 1/|N_K(i)| * sum_{j in N_K(i)} cos(v_i, v_j)

    with the cosine taken as 0 when either velocity is zero.

    Parameters
    ----------
    adata
        Annotated data; not modified.
    cluster_key
        Column of ``adata.obs`` with the cluster of each cell.
    velocity_key, basis, neighbors
        As in :func:`cross_boundary_correctness`; only velocities are used (in gene space,
        the genes whose velocity is finite in every cell).

    Returns
    -------
    scores
        ``{cluster: score}`` for every cluster present; NaN (with a warning) for a cluster
        in which no cell has a same-cluster neighbour.
    mean
        Mean of the non-NaN cluster scores (NaN if there is none).

    Raises
    ------
    InputError
        If the column, layer, obsm or obsp key is missing.
    """
    labels, clusters = _labels(adata, cluster_key)
    velocity, _, keep = _features(adata, velocity_key, basis, need_position=False)
    graph = _neighbor_graph(adata, neighbors)
    scores: dict[Hashable, float] = {}
    for cluster in clusters:
        members = np.flatnonzero(labels == cluster)
        rows, cols = _block_edges(graph, members, members)
        cosines = _edge_cosines(velocity, rows, cols, keep)
        per_cell = _mean_per_row(rows, cosines, adata.n_obs)
        scores[cluster] = float(np.nanmean(per_cell)) if rows.size else np.nan
    return scores, _mean_of_scores(scores, "cluster(s)")


def velocity_consistency(
    adata: Any,
    velocity_key: str = "velocity",
    basis: str | None = None,
    neighbors: str | sp.spmatrix | None = None,
) -> np.ndarray:
    """Per-cell velocity consistency (scVelo's ``velocity_confidence``).

    For cell ``i`` with neighbour set ``N(i)``::

        c_i = 1/|N(i)| * sum_{j in N(i)} corr(v_i, v_j)

    where ``corr(a, b) = cos(a - mean(a), b - mean(b))`` is the Pearson correlation across
    features (each vector centred by its own mean over genes or embedding dimensions), taken
    as 0 when a centred vector is zero. scVelo uses ``neighbors='distances'`` (the directed
    kNN graph) and ``var['velocity_genes']``; here the genes are those whose velocity is
    finite in every cell.

    Parameters
    ----------
    adata
        Annotated data; not modified.
    velocity_key, basis, neighbors
        As in :func:`cross_boundary_correctness`.

    Returns
    -------
    numpy.ndarray
        Shape ``(n_obs,)``, values in [-1, 1]; NaN for cells without neighbours. Use
        ``np.nanmean`` for a single summary.

    Raises
    ------
    InputError
        If the layer, obsm or obsp key is missing.
    """
    velocity, _, keep = _features(adata, velocity_key, basis, need_position=False)
    graph = _neighbor_graph(adata, neighbors).tocoo()
    rows, cols = graph.row.astype(np.intp), graph.col.astype(np.intp)
    correlations = _edge_cosines(velocity, rows, cols, keep, centre=True)
    return _mean_per_row(rows, correlations, adata.n_obs)


def transition_time_score(
    adata: Any,
    cluster_key: str,
    transitions: Iterable[Transition],
    time_key: str = "latent_time",
) -> tuple[dict[Transition, float], float]:
    """Fraction of cell pairs of each transition that are ordered correctly in time.

    For a transition A -> B, over the cells of A and B with a finite time::

        score(A, B) = 1/(n_A n_B) * sum_{a in A} sum_{b in B} ([t_a < t_b] + [t_a == t_b] / 2)
                    = U_B / (n_A n_B),   U_B = R_B - n_B (n_B + 1) / 2,

    the Mann-Whitney U statistic of B, with ``R_B`` the sum of B's average ranks in the
    pooled A and B times. Computed from the ranks, never from an n_A x n_B matrix. 1 when
    all of A precedes B, 0 when reversed, 0.5 for identical times.

    Parameters
    ----------
    adata
        Annotated data; not modified.
    cluster_key
        Column of ``adata.obs`` with the cell type of each cell.
    transitions
        Pairs ``(A, B)`` of cell types, A the progenitor of B.
    time_key
        Numeric time column of ``adata.obs``; cells with NaN time are dropped.

    Returns
    -------
    scores
        ``{(A, B): score}``; NaN (with a warning) if A or B has no cell with a finite time.
    mean
        Mean of the non-NaN scores (NaN if there is none).

    Raises
    ------
    InputError
        If a column is missing or non-numeric, or a transition names a cell type absent
        from ``adata.obs[cluster_key]``.
    """
    labels, clusters = _labels(adata, cluster_key)
    checked = _check_transitions(transitions, clusters, cluster_key)
    time = _numeric_obs(adata, time_key)
    finite = np.isfinite(time)
    scores: dict[Transition, float] = {}
    for a, b in checked:
        t_a = time[(labels == a) & finite]
        t_b = time[(labels == b) & finite]
        if t_a.size == 0 or t_b.size == 0:
            scores[(a, b)] = np.nan
            continue
        ranks = stats.rankdata(np.concatenate([t_a, t_b]))  # average ranks for ties
        u_b = ranks[t_a.size :].sum() - t_b.size * (t_b.size + 1) / 2
        scores[(a, b)] = float(u_b / (t_a.size * t_b.size))
    return scores, _mean_of_scores(scores, "transition(s)")

