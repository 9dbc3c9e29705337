"""How finely the data resolve each cell's time (``pv.tl``): the spread of the fitted
time over the neighbourhood that each cell's moments average."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from .._checks import InputError
from .metrics import _neighbor_graph, _numeric_obs

__all__ = ["neighbourhood_spread", "time_resolution"]


def time_resolution(
    adata: Any, time_key: str = "pyro_velo_time", neighbors: str | sp.spmatrix | None = None,
) -> np.ndarray:
    """Per cell, the standard deviation of a time over the cell and its neighbours.

    The moments ``Mu`` / ``Ms`` a model is fitted to are each cell's average over the same
    neighbourhood (scVelo's moments: the kNN graph's non-zero pattern plus the cell,
    equal weights), so a cell's fitted time stands for that neighbourhood, whose cells
    lie at different true times. The posterior standard deviation
    (``obs['pyro_velo_time_std']``) treats the averaged abundances as the cell's own and
    leaves that spread out; this function measures it from the fitted times of the
    neighbourhood. ``sqrt(time_std**2 + time_resolution**2)`` is the standard deviation
    to put on a cell's time (measured coverage: ``benchmarks/time_calibration.py``).

    Parameters
    ----------
    adata
        Annotated data with a neighbour graph; not modified.
    time_key
        Numeric time column of ``adata.obs`` (default: pyro_velo's time on the model's
        scale, the scale of ``pyro_velo_time_std``). Cells with NaN time are left out of
        their neighbours' spread and get NaN.
    neighbors
        An ``adata.obsp`` key or an (n_obs, n_obs) sparse matrix (only its non-zero
        pattern is used); None: ``obsp['connectivities']``, else ``obsp['distances']``.

    Returns
    -------
    numpy.ndarray
        ``(n_obs,)`` float64, in the units of ``time_key``; 0 for a cell without
        neighbours.

    Raises
    ------
    InputError
        If ``time_key`` is missing or non-numeric, or the graph is missing or has the
        wrong shape.
    """
    return neighbourhood_spread(_neighbor_graph(adata, neighbors),
                                _numeric_obs(adata, time_key))


def neighbourhood_spread(graph: sp.spmatrix | np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per cell, the standard deviation of ``values`` over the cell and its neighbours.

    ``graph``: (n, n), only its off-diagonal non-zero pattern is used (each cell is
    counted once, with equal weight, as in scVelo's moments). Cells with a NaN value
    are left out of their neighbours' spread and get NaN. The computation behind
    :func:`time_resolution`, for callers that hold the graph and the values.
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    pattern = sp.csr_matrix(graph, dtype=bool, copy=True)
    if pattern.shape != (n, n):
        raise InputError(f"The neighbour graph has shape {pattern.shape}, expected {(n, n)}.")
    pattern.setdiag(True)  # the neighbourhood holds the cell itself
    finite = np.isfinite(values)
    members = pattern.astype(np.float64) @ sp.diags(finite.astype(np.float64))
    # moments about the overall mean: the sums of squares stay of the spread's size
    centre = np.where(finite, values - (values[finite].mean() if finite.any() else 0.0), 0.0)
    count = np.asarray(members.sum(axis=1)).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = members @ centre / count
        variance = np.maximum(members @ (centre * centre) / count - mean * mean, 0.0)
    return np.where(finite, np.sqrt(variance), np.nan)
