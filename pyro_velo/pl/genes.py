"""Gene-level plots: fitted trajectories against time and phase portraits."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._utils import (
    CLOUD_GREY,
    _Colors,
    _colors_key,
    _finish,
    _fit_handles,
    _fit_inputs,
    _grid,
    _layer_column,
    _outlined,
    _scatter,
    _smooth,
    _too_few_cells,
)

__all__ = ["gene_fits", "phase_portraits"]


def gene_fits(
    adata: AnnData,
    genes: str | Sequence[str],
    color: str = "cell_type",
    time_key: str = "latent_time",
    show_cloud: bool = True,
    smooth: int | None = None,
    ncols: int = 2,
    size: float = 6,
    show: bool = True,
    save: str | Path | None = None,
) -> Figure:
    """Unspliced and spliced abundance against latent time with the model's fit.

    For each gene a pair of panels (unspliced ``Mu`` left, spliced ``Ms`` right) shows
    the observed moments of every cell against ``obs[time_key]``, coloured by
    ``obs[color]``, and the model's fitted abundances (``layers['pyro_velo_u']`` /
    ``['pyro_velo_s']``) as a line per category: the rolling mean of the fitted values
    of that category's cells along sorted time, in the category's colour with a dark
    outline. With ``show_cloud`` the fitted values of every cell are drawn as faint grey
    dots, which shows the spread of the fit (in the full model each cell has its own
    transcription rate). A numeric ``color`` gives a colorbar and one red fit line over all
    cells. Genes that were not fitted show the observed points only. Paper Figures 4d-e, 5.

    Parameters
    ----------
    adata
        AnnData with ``layers['Mu']``/``['Ms']`` and the exported fit.
    genes
        A gene name or a list of them (``adata.var_names``).
    color
        Obs column colouring the cells and splitting the fit lines (categorical), or a
        numeric one (colorbar, one fit line).
    time_key
        Obs column of the time axis.
    show_cloud
        Draw the fitted value of each cell as a faint grey dot.
    smooth
        Rolling-window size in cells for the fit lines (default: a tenth of a category's
        cells, at least 5); ``1`` joins the fitted values in time order.
    ncols
        Gene pairs per row.
    size
        Marker size of the observed cells.
    show, save
        Call ``plt.show()``; write the figure to this path.

    Returns
    -------
    Figure
    """
    genes, colors = _fit_inputs(adata, genes, color, time_key)
    t = adata.obs[time_key].to_numpy(dtype=float)
    fig, axes = _grid(2 * len(genes), 2 * ncols, (3.3, 2.8))
    mappable = None
    for i, gene in enumerate(genes):
        for j, (obs_layer, fit_layer, name) in enumerate(
                (("Mu", "pyro_velo_u", "unspliced"), ("Ms", "pyro_velo_s", "spliced"))):
            ax = axes.ravel()[2 * i + j]
            observed = _layer_column(adata, obs_layer, gene)
            fitted = _layer_column(adata, fit_layer, gene)
            mappable = _scatter(ax, t, observed, colors, size=size, alpha=0.6)
            is_fitted = np.isfinite(fitted).any()
            if is_fitted and show_cloud:
                ax.scatter(t, fitted, s=2.5, color=CLOUD_GREY, alpha=0.6, linewidths=0)
            if is_fitted:
                for _, mask, line_color in colors.groups():
                    if _too_few_cells(mask):
                        continue
                    ts, ys = _smooth(t[mask], fitted[mask], smooth)
                    ax.plot(ts, ys, **_outlined(line_color))
            ax.set_title(f"{gene}: {name}" + ("" if is_fitted else " (not fitted)"),
                         fontsize=10)
            ax.set_xlabel(time_key)
            ax.set_ylabel(f"{name} ({obs_layer})")
    fig.suptitle(f"Observed moments (points) and model fit (lines) against {time_key}",
                 fontsize=11)
    _colors_key(fig, colors, mappable, _fit_handles(colors, show_cloud, smooth))
    return _finish(fig, save, show)


def _phase_panel(ax: Axes, adata: AnnData, gene: str, colors: _Colors, time_key: str,
                 smooth: int | None, show_cloud: bool, size: float):
    """One phase portrait; returns the scatter's PathCollection."""
    t = adata.obs[time_key].to_numpy(dtype=float)
    s, u = _layer_column(adata, "Ms", gene), _layer_column(adata, "Mu", gene)
    fit_s = _layer_column(adata, "pyro_velo_s", gene)
    fit_u = _layer_column(adata, "pyro_velo_u", gene)
    mappable = _scatter(ax, s, u, colors, size=size, alpha=0.6)
    is_fitted = np.isfinite(fit_s).any()
    if is_fitted and show_cloud:
        ax.scatter(fit_s, fit_u, s=2.5, color=CLOUD_GREY, alpha=0.6, linewidths=0)
    if is_fitted:
        for _, mask, line_color in colors.groups():
            if _too_few_cells(mask):
                continue
            _, su = _smooth(t[mask], np.column_stack([fit_s[mask], fit_u[mask]]), smooth)
            ax.plot(su[:, 0], su[:, 1], **_outlined(line_color))
    ax.set_title(gene + ("" if is_fitted else " (not fitted)"), fontsize=10)
    ax.set_xlabel("spliced (Ms)")
    ax.set_ylabel("unspliced (Mu)")
    return mappable


def phase_portraits(
    adata: AnnData,
    genes: str | Sequence[str],
    color: str = "cell_type",
    time_key: str = "latent_time",
    show_cloud: bool = False,
    smooth: int | None = None,
    ncols: int = 4,
    size: float = 6,
    ax: Axes | None = None,
    show: bool = True,
    save: str | Path | None = None,
) -> Figure:
    """Phase portraits (unspliced against spliced) with the fitted trajectory.

    Each panel shows the observed moments (``Ms`` on x, ``Mu`` on y) of every cell,
    coloured by ``obs[color]``, and the model's fitted trajectory: the fitted abundances
    (``layers['pyro_velo_s']``, ``['pyro_velo_u']``) of each category's cells in the order
    of ``obs[time_key]``, smoothed by a rolling mean along time and drawn as a line in the
    category's colour (one red line for a numeric ``color``). With ``show_cloud`` the
    fitted values of every cell are added as faint grey dots.

    Parameters
    ----------
    adata
        AnnData with ``layers['Mu']``/``['Ms']`` and the exported fit.
    genes
        A gene name or a list of them.
    color
        Obs column colouring cells and splitting fit lines (categorical), or a numeric one.
    time_key
        Obs column ordering the fitted values along each line.
    show_cloud
        Draw the fitted values of every cell as faint grey dots.
    smooth
        Rolling-window size in cells (default: a tenth of a category's cells, at least 5;
        ``1``: the fitted points joined in time order).
    ncols
        Panels per row.
    size
        Marker size of the observed cells.
    ax
        Draw into this axes (one gene only); the legend or colorbar is attached to it.
    show, save
        Call ``plt.show()``; write the figure to this path.

    Returns
    -------
    Figure
    """
    genes, colors = _fit_inputs(adata, genes, color, time_key)
    if ax is not None:
        if len(genes) != 1:
            raise ValueError(f"ax= takes one gene, got {len(genes)}: leave ax=None for a grid")
        fig = ax.figure
        mappable = _phase_panel(ax, adata, genes[0], colors, time_key, smooth, show_cloud,
                                size)
        if colors.categorical:
            ax.legend(handles=colors.handles(4) + _fit_handles(colors, show_cloud, smooth),
                      fontsize=7, frameon=False, loc="best")
        else:
            fig.colorbar(mappable, ax=ax, label=colors.key)
            ax.legend(handles=_fit_handles(colors, show_cloud, smooth), fontsize=8, frameon=False)
        return _finish(fig, save, show)
    fig, axes = _grid(len(genes), ncols, (3.4, 3.1))
    mappable = None
    for gene, panel in zip(genes, axes.ravel(), strict=False):
        mappable = _phase_panel(panel, adata, gene, colors, time_key, smooth, show_cloud, size)
    fig.suptitle(f"Phase portraits: observed cells (points) and fitted trajectory along "
                 f"{time_key} (lines)", fontsize=11)
    _colors_key(fig, colors, mappable, _fit_handles(colors, show_cloud, smooth))
    return _finish(fig, save, show)
