"""Which genes' fits carry dynamics: the rule behind ``var['velocity_genes']``.

scVelo's :func:`~scvelo.tl.velocity_graph` and CellRank's ``VelocityKernel`` use the genes
marked in ``var['velocity_genes']`` by default. A gene at steady state (static, or with
unspliced and spliced abundances in their steady-state ratio throughout) has a true
velocity of zero; the velocity a fit gives it is noise, and that noise enters every
cosine those tools take. The rule keeps a gene when its fitted dynamics predict the
**held-out** cells' unspliced abundances better than the steady-state fit of the same
gene does (:func:`velocity_gene_scores`); :func:`select_velocity_genes` applies it.

The export writes every fitted gene's score to ``var['velocity_score']``; it marks every
fitted gene in ``var['velocity_genes']`` unless :data:`EXPORT_MIN_SCORE` says otherwise,
because the selection did not improve scVelo's downstream direction scores on our
simulations (``benchmarks/VELOCITY_GENES.md``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._checks import InputError, check_layers, check_real

__all__ = ["DEFAULT_MIN_SCORE", "EXPORT_MIN_SCORE", "gene_columns", "select_velocity_genes",
           "selection", "velocity_gene_scores"]

#: threshold of :func:`select_velocity_genes`: a gene is a velocity gene when its score
#: exceeds it (on the simulations the genes held at steady state score below 0.05)
DEFAULT_MIN_SCORE = 0.1
#: threshold of the export (``None``: every fitted gene). Measured over 18 simulations
#: (``benchmarks/VELOCITY_GENES.md``), selecting by score raised the velocity cosine on
#: the selected genes but left scVelo's cross-boundary direction correctness unchanged on
#: average and lowered it on some draws, so the export keeps every fitted gene and writes
#: the scores for a selection by choice.
EXPORT_MIN_SCORE: float | None = None
#: cells scored at a time (bounds the temporary float64 copies)
BLOCK_CELLS = 4096
#: cell splits whose cells the score is computed on, and the split the baseline comes from
HELD_OUT = ("validation", "test")
TRAIN = "train"


def _dense64(matrix: Any) -> np.ndarray:
    matrix = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    return matrix.astype(np.float64, copy=False)


def velocity_gene_scores(observed_u: Any, fitted_u: Any, fitted_s: Any, split: Any
                         ) -> np.ndarray:
    r"""Held-out gain of each gene's dynamic fit over its steady-state fit.

    RNA velocity is ``ds/dt = beta u - gamma s``: it is zero exactly where unspliced and
    spliced abundances are in their steady-state ratio ``u = (gamma / beta) s``. The
    steady-state fit of gene ``g`` keeps the model's fitted spliced abundances ``s_hat``
    and predicts the unspliced ones on that line, ``u = k s_hat``, with ``k`` the least
    squares slope (through the origin) over the training cells ``T``. The dynamic fit
    predicts ``u_hat``, the model's fitted unspliced abundance. On the held-out cells
    ``H`` (validation and test; cells the fit never trained on)::

        RSS_dynamic = sum_{i in H} (u_i - u_hat_i)^2
        RSS_steady  = sum_{i in H} (u_i - k s_hat_i)^2
        score       = 1 - RSS_dynamic / RSS_steady

    Where the score is near 1, the departures of the unspliced abundance from the
    steady-state ratio, which is what a velocity is made of, are predicted by the fit on
    cells it has not seen. Near 0 (or negative), the fit's velocity explains nothing
    beyond a gene at steady state: the gene is static or at steady state, or its fit
    failed. For Gaussian noise of one variance, ``-(|H| / 2) log(1 - score)`` is the
    held-out log-likelihood gain of the dynamic fit over the steady-state one.

    Parameters
    ----------
    observed_u
        Cells x genes observed unspliced abundances (``layers['Mu']``), dense or sparse.
    fitted_u, fitted_s
        Cells x genes fitted (expected) unspliced and spliced abundances on the ``Mu`` /
        ``Ms`` scale (the ``pyro_velo_u`` / ``pyro_velo_s`` layers of an export,
        :meth:`~pyro_velo.VeloVAE.get_expression_fit`); NaN columns (genes not fitted)
        give a NaN score.
    split
        Per cell ``'train'``, ``'validation'`` or ``'test'`` (``obs['pyro_velo_split']``,
        :meth:`~pyro_velo.VeloVAE.get_split`).

    Returns
    -------
    numpy.ndarray
        ``(n_genes,)`` float64 scores; NaN where the gene was not fitted or the scores
        are undefined (no spliced signal on the training cells, no unspliced variation
        on the held-out cells).

    Raises
    ------
    InputError
        If the shapes differ, or there are no training or no held-out cells.
    """
    shapes = {np.shape(x) for x in (observed_u, fitted_u, fitted_s)}
    split = np.asarray(split).astype(str)
    if len(shapes) != 1 or split.shape != (np.shape(observed_u)[0],):
        raise InputError(f"shapes differ: abundances {sorted(shapes)}, split {split.shape}")
    sums = _ScoreSums(np.shape(observed_u)[1])
    for start in range(0, split.size, BLOCK_CELLS):
        rows = slice(start, start + BLOCK_CELLS)
        sums.add(observed_u[rows], fitted_u[rows], fitted_s[rows], split[rows])
    return sums.scores()


class _ScoreSums:
    """Per-gene sums behind :func:`velocity_gene_scores`, accumulated over blocks of cells.

    The steady-state residuals depend on the slope ``k`` of the training cells, which is
    known only at the end, so they are kept expanded:
    ``sum (u - k s)^2 = sum u^2 - 2 k sum u s + k^2 sum s^2``.
    """

    def __init__(self, n_genes: int) -> None:
        names = ("train_us", "train_ss", "held_uu", "held_us", "held_ss", "held_rss")
        self.sums = {name: np.zeros(n_genes) for name in names}
        self.n_train = self.n_held = 0

    def add(self, observed_u: Any, fitted_u: Any, fitted_s: Any, split: np.ndarray) -> None:
        u, u_hat, s_hat = (_dense64(x) for x in (observed_u, fitted_u, fitted_s))
        train = split == TRAIN
        held = np.isin(split, HELD_OUT)
        self.n_train += int(train.sum())
        self.n_held += int(held.sum())
        self.sums["train_us"] += (u[train] * s_hat[train]).sum(axis=0)
        self.sums["train_ss"] += (s_hat[train] ** 2).sum(axis=0)
        self.sums["held_uu"] += (u[held] ** 2).sum(axis=0)
        self.sums["held_us"] += (u[held] * s_hat[held]).sum(axis=0)
        self.sums["held_ss"] += (s_hat[held] ** 2).sum(axis=0)
        self.sums["held_rss"] += ((u[held] - u_hat[held]) ** 2).sum(axis=0)

    def scores(self) -> np.ndarray:
        if not self.n_train or not self.n_held:
            raise InputError("velocity gene scores need training and held-out (validation or "
                             f"test) cells; got {self.n_train} and {self.n_held}")
        sums = self.sums
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = sums["train_us"] / sums["train_ss"]
            rss_steady = (sums["held_uu"] - 2 * slope * sums["held_us"]
                          + slope**2 * sums["held_ss"])
            score = 1.0 - sums["held_rss"] / rss_steady
        score[~np.isfinite(score)] = np.nan
        return score


def selection(scores: np.ndarray, fitted: Any, min_score: float | None) -> np.ndarray:
    """``var['velocity_genes']`` from the scores: fitted genes above ``min_score``.

    ``min_score=None`` keeps every fitted gene.
    """
    fitted = np.asarray(fitted, dtype=bool)
    if min_score is None:
        return fitted.copy()
    min_score = check_real(min_score, "min_score")
    with np.errstate(invalid="ignore"):
        return fitted & (np.nan_to_num(scores, nan=-np.inf) > min_score)


def select_velocity_genes(
    adata: Any,
    min_score: float | None = DEFAULT_MIN_SCORE,
    unspliced_layer: str = "Mu",
    split_key: str = "pyro_velo_split",
) -> pd.DataFrame:
    """Score every fitted gene of an exported AnnData and select the velocity genes.

    :meth:`~pyro_velo.VeloVAE.export_to_anndata` writes the same scores but, by default
    (:data:`EXPORT_MIN_SCORE`), marks every fitted gene; this selects by score. The scores
    are those of :func:`velocity_gene_scores` (held-out gain of the dynamic fit over the
    steady-state fit).

    Parameters
    ----------
    adata
        An AnnData with the export of a fitted model: ``layers['pyro_velo_u']``,
        ``layers['pyro_velo_s']``, ``obs[split_key]``, and the observed abundances.
    min_score
        Genes whose score exceeds it are velocity genes. ``None``: every fitted gene.
    unspliced_layer
        Observed unspliced abundances the model was fitted to.
    split_key
        ``obs`` column with each cell's train / validation / test split.

    Returns
    -------
    pandas.DataFrame
        Indexed by gene: ``velocity_score`` and ``velocity_genes``, also written to
        ``adata.var`` (the only keys changed).

    Raises
    ------
    InputError
        If a layer or the split column is missing, or the scores cannot be computed.
    """
    check_layers(adata, [unspliced_layer, "pyro_velo_u", "pyro_velo_s"])
    if split_key not in adata.obs:
        raise InputError(f"adata.obs has no column {split_key!r}: export a fitted model "
                         "first (VeloVAE.export_to_anndata)")
    columns = gene_columns(adata.layers[unspliced_layer], adata.layers["pyro_velo_u"],
                           adata.layers["pyro_velo_s"], adata.obs[split_key],
                           min_score=min_score)
    table = pd.DataFrame(columns, index=adata.var_names)
    for name, values in columns.items():
        adata.var[name] = values
    return table


def gene_columns(observed_u: Any, fitted_u: Any, fitted_s: Any, split: Any,
                 min_score: float | None = EXPORT_MIN_SCORE) -> dict[str, np.ndarray]:
    """``var`` columns ``velocity_score`` and ``velocity_genes`` of an export.

    Arguments as for :func:`velocity_gene_scores`; a gene is fitted where its fitted
    abundances are finite. Without training or held-out cells (a split that holds no
    cells out) there is no evidence to select by: scores are NaN and every fitted gene is
    kept.
    """
    fitted = np.isfinite(np.asarray(fitted_s[:1], dtype=np.float64)).all(axis=0)
    split = np.asarray(split).astype(str)
    if not (split == TRAIN).any() or not np.isin(split, HELD_OUT).any():
        return {"velocity_score": np.full(fitted.shape, np.nan), "velocity_genes": fitted}
    scores = velocity_gene_scores(observed_u, fitted_u, fitted_s, split)
    return {"velocity_score": scores, "velocity_genes": selection(scores, fitted, min_score)}


class _H5adRows:
    """Rows of a layer of an open ``.h5ad`` file, sliced like an array (dense or CSR)."""

    def __init__(self, file: Any, name: str) -> None:
        from .disk import H5adLayer

        self.layer = H5adLayer(file, f"layers/{name}", f"layers['{name}']")
        self.shape = self.layer.shape

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        return self.layer.read(start, stop)


def h5ad_gene_columns(file: Any, unspliced_layer: str, fitted_u_layer: str,
                      fitted_s_layer: str, split: Any,
                      min_score: float | None = EXPORT_MIN_SCORE) -> dict[str, np.ndarray]:
    """:func:`gene_columns` of an export being written into an open ``.h5ad`` file.

    Reads ``layers[unspliced_layer]`` and the fitted abundances (the layers
    ``fitted_u_layer``, ``fitted_s_layer``) :data:`BLOCK_CELLS` cells at a time, so memory
    does not grow with the number of cells. A file without the observed layer (a model
    fitted in memory, exported into another file) gets NaN scores and every fitted gene.
    """
    fitted_u, fitted_s = (_H5adRows(file, name) for name in (fitted_u_layer, fitted_s_layer))
    if f"layers/{unspliced_layer}" not in file:
        split = np.full(fitted_s.shape[0], TRAIN)  # no evidence: keep the fitted genes
        return gene_columns(fitted_u, fitted_u, fitted_s, split, min_score=min_score)
    observed_u = _H5adRows(file, unspliced_layer)
    return gene_columns(observed_u, fitted_u, fitted_s, split, min_score=min_score)
