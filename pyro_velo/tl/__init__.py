"""Velocity-evaluation metrics and per-cell summaries (``pv.tl``), in the style of scanpy /
scVelo tools.

Every function reads an :class:`~anndata.AnnData` (:func:`neighbourhood_spread`: a graph
and values) and *returns* its result; none of them writes into ``adata``.

Functions
---------
time_correlation
    Rank correlation between an inferred time and a reference time.
cross_boundary_correctness
    CBDir of the VeloVAE / UniTVelo papers: does velocity point to the next cell type?
in_cluster_coherence
    ICCoh: mean cosine between a cell's velocity and those of same-cluster neighbours.
velocity_consistency
    scVelo's velocity confidence: per-cell mean correlation with neighbour velocities.
transition_time_score
    Fraction of (A, B) cell pairs of a transition A -> B ordered correctly in time.
time_resolution
    Per cell, the spread of a time over the neighbourhood its moments average.
neighbourhood_spread
    The same for any per-cell values and a given graph.
"""

from .metrics import (
    cross_boundary_correctness,
    in_cluster_coherence,
    time_correlation,
    transition_time_score,
    velocity_consistency,
)
from .resolution import neighbourhood_spread, time_resolution

__all__ = [
    "cross_boundary_correctness",
    "in_cluster_coherence",
    "neighbourhood_spread",
    "time_correlation",
    "time_resolution",
    "transition_time_score",
    "velocity_consistency",
]
