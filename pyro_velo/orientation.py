"""Evidence on the direction of time that does not come from the fitted model.

A fit's own velocity always agrees with its own time, even when both run backwards, so
the direction of a fit is checked against a velocity field built from the data alone:
the steady-state velocity ``v = u - gamma' s``, where ``gamma'`` is each gene's ratio
of unspliced to spliced abundance fitted over all cells.
Along every kNN edge ``i -> j`` the cosine between ``v_i`` and the displacement
``s_j - s_i`` says whether ``j`` lies downstream of ``i``; the root-free potential whose
differences best match these antisymmetrised edge flows (a Hodge decomposition of the
flow on the graph, as in Dynamo's ``ddhodge``) then orders the cells without choosing a
root. Its agreement with a fitted time, and how reproducible the potential is over
halves of the genes, decide whether the direction is identified
(:class:`pyro_velo.policies.OrientationPolicy`). The module also reads a user's root
cells (:func:`root_mask`) and words the warning for an unidentified direction.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import cg
from scipy.stats import spearmanr

from ._checks import InputError


def steady_state_velocity(u: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Velocity of the steady-state model, ``u - gamma' s`` per gene.

    ``gamma'`` is the least-squares slope through the origin of ``u`` on ``s`` over all
    cells. Where most cells sit near steady states (as in regulatory-network data) this
    is the steady-state ratio; fitting it on the extreme cells only, as scVelo does,
    was biased by the noisy cells near zero and reversed the field on simulated forks
    (benchmarks/robustness.py, ``grn`` family).

    Parameters
    ----------
    u, s
        ``(N, G)`` unspliced and spliced abundances (e.g. the kNN moments ``Mu``,
        ``Ms``), possibly scaled per gene but not centred.
    """
    u = np.asarray(u, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    den = (s * s).sum(0)
    gamma = np.where(den > 0, (u * s).sum(0) / np.where(den > 0, den, 1.0), 0.0)
    return u - gamma * s


#: float64 entries of the per-edge displacements gathered at a time: bounds the memory
#: of :func:`edge_flows` (8 MiB per array) at any number of cells and genes; one array of
#: all edges x all genes needed 2.5 GB and 18-25 s at 3,700 x 2,000 (159,180 edges)
EDGE_BLOCK_ENTRIES = 2**20


def edge_flows(graph: sp.spmatrix, velocity: np.ndarray, x: np.ndarray,
               gene_sets: Sequence[np.ndarray | slice]) -> list[sp.csr_matrix]:
    """:func:`edge_flow` of ``graph`` for each set of genes (columns), in one pass.

    The displacements ``x_j - x_i`` are gathered once per block of edges, and each gene
    set's sums over them (the dot product with ``v_i`` and the squared length) are one
    product with the sets' 0/1 membership matrix, so the flows of a few gene subsets
    cost little more than one. Each flow equals ``edge_flow(graph, velocity[:, genes],
    x[:, genes])`` up to the order of summation (a gene listed twice in a set counts
    once).

    Parameters
    ----------
    graph
        ``(N, N)`` kNN graph of the cells; symmetrised, its diagonal ignored.
    velocity, x
        ``(N, G)`` velocities and positions of the cells.
    gene_sets
        Column selections of ``velocity`` and ``x`` (index arrays, or ``slice(None)``
        for all genes), one flow each.
    """
    graph = sp.csr_matrix(graph)
    graph = (graph + graph.T).tocoo()
    rows, cols = graph.row, graph.col
    keep = rows != cols
    rows, cols = rows[keep], cols[keep]
    # the gathers below read rows, and a row of a column-major array is a strided read
    # (at 3,700 x 2,000, per-set sums took 12.2 s from column-major, 8.5 s from row-major)
    velocity = np.ascontiguousarray(velocity, dtype=np.float64)
    x = np.ascontiguousarray(x, dtype=np.float64)
    member = np.zeros((x.shape[1], len(gene_sets)))
    for k, genes in enumerate(gene_sets):
        member[genes, k] = 1.0
    block = max(1, EDGE_BLOCK_ENTRIES // max(x.shape[1], 1))
    speed = np.empty((len(x), len(gene_sets)))  # |v_i| over each set
    for first in range(0, len(x), block):
        cells = slice(first, first + block)
        speed[cells] = np.sqrt(np.square(velocity[cells]) @ member)
    cosines = np.empty((len(rows), len(gene_sets)))
    for first in range(0, len(rows), block):
        edges = slice(first, first + block)
        origin = rows[edges]
        step = x[cols[edges]] - x[origin]
        dot = (step * velocity[origin]) @ member
        norm = np.sqrt(np.square(step, out=step) @ member) * speed[origin]
        cosines[edges] = np.where(norm > 0, dot / np.where(norm > 0, norm, 1), 0.0)
    flows = []
    for cos in cosines.T:
        forward = sp.csr_matrix((cos, (rows, cols)), shape=graph.shape)
        flows.append(((forward - forward.T) / 2).tocsr())
    return flows


def edge_flow(graph: sp.spmatrix, velocity: np.ndarray, x: np.ndarray) -> sp.csr_matrix:
    """Antisymmetric flow on the edges of ``graph``: how much ``i``'s velocity points to ``j``.

    ``F_ij = (cos(v_i, x_j - x_i) - cos(v_j, x_i - x_j)) / 2`` for every edge of the
    symmetrised ``graph``; positive where the flow runs from ``i`` to ``j``.
    """
    return edge_flows(graph, velocity, x, [slice(None)])[0]


def hodge_potential(flow: sp.csr_matrix) -> np.ndarray:
    """The potential ``phi`` minimising ``sum over edges (phi_j - phi_i - F_ij)^2``.

    Its gradient is the curl-free part of the edge flow: it rises along the flow and has
    no root to choose. Solved as the graph-Laplacian system ``L phi = -div F`` (with a
    tiny ridge, so that disconnected parts are centred); returned with mean 0.
    """
    adjacency = (flow != 0).astype(np.float64)
    degree = np.asarray(adjacency.sum(1)).ravel()
    laplacian = sp.diags(degree) - adjacency
    divergence = np.asarray(flow.sum(1)).ravel()
    ridge = 1e-6 * max(degree.mean(), 1.0)
    phi, _ = cg(laplacian + ridge * sp.identity(flow.shape[0]), -divergence, rtol=1e-8,
                maxiter=5000)
    return phi - phi.mean()


def order_agreement(t: np.ndarray, order: np.ndarray) -> float:
    """Spearman correlation of cell times ``t`` with a per-cell ``order`` over the cells
    where both are finite; 0 where it is undefined (constant values, under 3 cells)."""
    t = np.asarray(t, dtype=np.float64)
    order = np.asarray(order, dtype=np.float64)
    known = np.isfinite(t) & np.isfinite(order)
    if known.sum() < 3:
        return 0.0
    rho = spearmanr(t[known], order[known])[0]
    return float(rho) if np.isfinite(rho) else 0.0


@dataclass
class FlowEvidence:
    """A data-only velocity field's verdict on orders of the cells.

    Attributes
    ----------
    potential
        ``(N,)`` the field's root-free potential (:func:`hodge_potential`), rising
        downstream.
    reproducibility
        Spearman correlation between the potentials built from two random halves of the
        genes (mean over a few splits): near 1 when many genes tell the same direction,
        near 0 when the flow is noise.
    """

    potential: np.ndarray
    reproducibility: float

    def agreement(self, t: np.ndarray) -> float:
        """Spearman correlation of cell times ``t`` with the potential."""
        return order_agreement(t, self.potential)

    def start_times(self, t_max: float) -> np.ndarray:
        """The potential's ranks on ``[0, t_max]``: a start for the cell times."""
        ranks = np.argsort(np.argsort(self.potential))
        return ranks / max(len(ranks) - 1, 1) * t_max


def flow_evidence(u: np.ndarray, s: np.ndarray, graph: sp.spmatrix, n_splits: int = 3,
                  seed: int = 0) -> FlowEvidence:
    """Steady-state velocity, edge flow and its potential for the cells (see the module).

    Genes are standardised (divided by the standard deviation of ``s``) so that each
    contributes to the cosines on the same scale; genes with no spread are left out.

    Parameters
    ----------
    u, s
        ``(N, G)`` abundances, scaled per gene but not centred.
    graph
        ``(N, N)`` kNN graph of the cells (e.g. ``obsp['connectivities']``).
    n_splits
        Random halvings of the genes for :attr:`FlowEvidence.reproducibility`.
    seed
        Seed of the halvings.
    """
    s = np.asarray(s, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    genes = np.flatnonzero(s.std(0) > 0)
    # take, not u[:, genes] (column-major): edge_flows gathers rows and would copy
    u, s = np.take(u, genes, axis=1), np.take(s, genes, axis=1)
    # per-gene quantities, so a subset of genes takes its columns of them
    scale = s.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    velocity, x = steady_state_velocity(u, s) / scale, s / scale
    rng = np.random.default_rng(seed)
    halves: list[np.ndarray] = []
    if len(genes) >= 4:
        for _ in range(n_splits):
            half = rng.permutation(len(genes))[: len(genes) // 2]
            halves += [half, np.setdiff1d(np.arange(len(genes)), half)]
    potential, *half_potentials = [
        hodge_potential(flow) for flow in edge_flows(graph, velocity, x, [slice(None), *halves])]
    agreements = []
    for first, second in zip(half_potentials[::2], half_potentials[1::2], strict=True):
        rho = spearmanr(first, second)[0]
        agreements.append(rho if np.isfinite(rho) else 0.0)
    return FlowEvidence(potential=potential,
                        reproducibility=float(np.mean(agreements)) if agreements else 0.0)


def direction_source(capture_times, root) -> str | None:
    """What sets the direction of time instead of the heuristics: ``'capture times'``,
    ``'root'`` (a user's root cells) or None."""
    if capture_times is not None:
        return "capture times"
    return "root" if root is not None else None


def root_mask(obs, root_key: str | None, root, direction_given: bool) -> np.ndarray | None:
    """``(n_cells,)`` mask of the cells whose ``obs[root_key]`` is ``root`` (a label or a
    list of labels); None without a root. Errors name what is wrong: a half-given
    root, a missing column, no matching cell, or a root beside capture times
    (``direction_given``), which set the direction already."""
    if root_key is None and root is None:
        return None
    if root_key is None or root is None:
        raise InputError("give both root_key (an obs column) and root (its label or labels "
                         "of the first cells), or neither")
    if direction_given:
        raise InputError("capture times already set the direction of time: give either "
                         "capture_time_key or a root, not both")
    if root_key not in obs:
        raise InputError(f"root_key {root_key!r} is not a column of obs; columns: "
                         f"{list(obs.columns)}")
    labels = [root] if isinstance(root, str) else list(np.atleast_1d(root))
    values = obs[root_key].astype(str).to_numpy()
    mask = np.isin(values, [str(label) for label in labels])
    if not mask.any():
        raise InputError(f"no cell has obs[{root_key!r}] in {labels}; values include "
                         f"{sorted(set(values))[:10]}")
    return mask


def warn_if_unidentified(report: dict, stacklevel: int = 2) -> None:
    """Warn, saying what to do, when a fit's direction report (see
    :meth:`pyro_velo.policies.OrientationPolicy.report`) is ``'reversed'`` or ``'not
    identified'``.

    ``stacklevel`` counts from the caller, as for :func:`warnings.warn`.
    """
    if report["status"] not in ("reversed", "not identified"):
        return
    if report["given_by"]:
        message = (
            f"The latent time runs against the given {report['given_by']} (Spearman "
            f"{report['given_agreement']:.2f} with the order they set), in every start "
            "trained. Check that they name the first cells; on few cells the data can "
            "outweigh them.")
    else:
        message = (
            f"The direction of latent time is {report['status']} by the data's own "
            f"velocity field (agreement {report['flow_agreement']:.2f}, reproducibility "
            f"{report['flow_reproducibility']:.2f}): the time may run backwards. Give the "
            "first cells, train(root_key='<obs column>', root='<progenitor label>'), or "
            "capture times, VeloVAE(adata, capture_time_key='<obs column>').")
    warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)
