"""Plots of a fitted model (matplotlib / seaborn; every function returns its Figure).

Every function takes ``show`` (call :func:`matplotlib.pyplot.show`, default ``True``) and
``save`` (a path to write the figure to) and works with a non-interactive backend such as
``Agg``; functions that draw a single panel also take ``ax`` (draw into this axes; the
function then returns ``ax.figure``). Functions that need the fit raise a :class:`KeyError`
naming the missing key if :meth:`VeloVAE.export_to_anndata` has not been called.

Categorical colours come from ``adata.uns['<key>_colors']`` (the scanpy convention) when
present, otherwise from a matplotlib palette; nothing is written to ``adata`` except by
:func:`velocity_stream` / :func:`summary` (scVelo's velocity graph, see there).

The functions live in modules by job: :mod:`~pyro_velo.pl.genes` (fits per gene, phase
portraits), :mod:`~pyro_velo.pl.cells` (embeddings, 3-D cell state, velocity streams) and
:mod:`~pyro_velo.pl.diagnostics` (uncertainty, training curves, benchmarks, summary).
"""

from .cells import cell_state_3d, embedding, velocity_stream
from .diagnostics import benchmark, summary, training_curves, uncertainty
from .genes import gene_fits, phase_portraits

__all__ = [
    "benchmark",
    "cell_state_3d",
    "embedding",
    "gene_fits",
    "phase_portraits",
    "summary",
    "training_curves",
    "uncertainty",
    "velocity_stream",
]
