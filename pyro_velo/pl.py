"""Plots of a fitted model (matplotlib / seaborn; every function returns its Figure).

Every function takes ``show`` (call :func:`matplotlib.pyplot.show`, default ``True``) and
``save`` (a path to write the figure to) and works with a non-interactive backend such as
``Agg``; functions that draw a single panel also take ``ax`` (draw into this axes; the
function then returns ``ax.figure``). Functions that need the fit raise a :class:`KeyError`
naming the missing key if :meth:`VeloVAE.export_to_anndata` has not been called.

Categorical colours come from ``adata.uns['<key>_colors']`` (the scanpy convention) when
present, otherwise from a matplotlib palette; nothing is written to ``adata`` except by
:func:`velocity_stream` / :func:`summary` (scVelo's velocity graph, see there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .train import TrainingHistory

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

EXPORT_HINT = "call VeloVAE.export_to_anndata(adata) first"
PREPROCESS_HINT = "run pv.pp.preprocess(adata) first"
UNCERTAINTY_HINT = "compute the posterior uncertainty (VeloVAE.get_uncertainty) first"
STATE_KEY = "pyro_velo_cell_state"
FIT_LAYERS = ("pyro_velo_u", "pyro_velo_s")
MISSING_GREY = "#d0d0d0"
CLOUD_GREY = "0.55"
FIT_RED = "crimson"
LEGEND_WIDTH_IN = 1.9  # space at the right of multi-panel figures for their legend

# metric -> True when higher is better (benchmark titles)
HIGHER_IS_BETTER = {
    "spearman_t": True,
    "velocity_cosine": True,
    "cbdir": True,
    "branch_accuracy": True,
    "future_corr": True,
    "ll_train": True,
    "ll_test": True,
    "mse_train": False,
    "mse_test": False,
    "mae_train": False,
    "mae_test": False,
    "wall_s": False,
}


# ---- shared helpers --------------------------------------------------------------------
def _figure(ax: Axes | None, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Axes]:
    """The figure and axes to draw into: ``ax`` and its figure, or a new single-panel one."""
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, subplot_kw=kwargs or None)
    return fig, ax


def _finish(fig: Figure, save: str | Path | None, show: bool) -> Figure:
    """Write the figure to ``save`` (creating its folder), show it if asked, return it."""
    if save is not None:
        save = Path(save)
        save.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if show:
        plt.show()
    return fig


def _grid(n: int, ncols: int, panel_size: tuple[float, float],
          extra_width: float = LEGEND_WIDTH_IN) -> tuple[Figure, np.ndarray]:
    """A figure with ``n`` panels in rows of ``ncols`` (unused panels hidden)."""
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                             figsize=(panel_size[0] * ncols + extra_width,
                                      panel_size[1] * nrows))
    for ax in axes.ravel()[n:]:
        ax.set_axis_off()
    return fig, axes


def _require(adata: AnnData, where: str, keys: Sequence[str], hint: str) -> None:
    """Raise a KeyError naming every key of ``keys`` missing from ``adata.<where>``."""
    container = getattr(adata, where)
    missing = [k for k in keys if k not in container]
    if missing:
        names = ", ".join(f"{where}[{k!r}]" for k in missing)
        raise KeyError(f"adata has no {names}: {hint}")


def _time_hint(time_key: str) -> str:
    if time_key in ("latent_time", "pyro_velo_time"):
        return EXPORT_HINT
    return "pass an existing obs column as time_key"


def _genes(adata: AnnData, genes: str | Sequence[str]) -> list[str]:
    """``genes`` as a list, checked against ``adata.var_names``."""
    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise ValueError("genes is empty: pass at least one gene name")
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"genes not in adata.var_names: {missing}")
    return genes


def _basis(adata: AnnData, basis: str) -> tuple[np.ndarray, str]:
    """The first two coordinates of ``obsm['X_<basis>']`` and the basis' display name."""
    name = basis[2:] if basis.startswith("X_") else basis
    key = f"X_{name}"
    if key not in adata.obsm:
        available = [k[2:] for k in adata.obsm if k.startswith("X_")]
        hint = "use basis='pca'" if "X_pca" in adata.obsm else f"{PREPROCESS_HINT} for 'pca'"
        raise KeyError(
            f"adata has no obsm[{key!r}] for basis={basis!r} (available bases: {available}): "
            f"compute it (e.g. sc.tl.{name}(adata)) or {hint}"
        )
    coords = np.asarray(adata.obsm[key])
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ValueError(f"obsm[{key!r}] needs at least two columns, has shape {coords.shape}")
    return coords[:, :2], name.upper() if name in ("pca", "umap", "tsne") else name


@dataclass
class _Colors:
    """How cells are coloured: by the categories or the numbers of one obs column."""

    key: str
    values: np.ndarray  # numbers (continuous) or category codes (-1: missing)
    categories: list[str] | None = None
    palette: list[tuple[float, float, float, float]] | None = None
    cmap: str = "viridis"

    @property
    def categorical(self) -> bool:
        return self.categories is not None

    def rgba(self) -> np.ndarray:
        """Per-cell RGBA colours of a categorical colouring (grey for missing values)."""
        table = np.array([*self.palette, to_rgba(MISSING_GREY)])
        return table[self.values]  # code -1 indexes the grey row

    def groups(self) -> list[tuple[str, np.ndarray, Any]]:
        """``(label, cell mask, colour)`` per category, or one group of all cells."""
        if not self.categorical:
            return [("all cells", np.ones(len(self.values), dtype=bool), FIT_RED)]
        return [(cat, self.values == i, self.palette[i])
                for i, cat in enumerate(self.categories)]

    def handles(self, marker_size: float = 6) -> list[Line2D]:
        """Legend entries of the categories that have cells."""
        present = set(np.unique(self.values))
        return [Line2D([], [], ls="", marker="o", ms=marker_size, color=self.palette[i],
                       label=cat) for i, cat in enumerate(self.categories) if i in present]


def _palette(n: int) -> list[tuple[float, float, float, float]]:
    if n <= 10:
        colors = plt.get_cmap("tab10").colors
    elif n <= 20:
        colors = plt.get_cmap("tab20").colors
    else:
        import seaborn as sns

        colors = sns.color_palette("husl", n)
    return [to_rgba(c) for c in colors[:n]]


def _colors(adata: AnnData, key: str, cmap: str = "viridis") -> _Colors:
    """Colouring by ``obs[key]``: categorical for categories, strings and booleans."""
    if key not in adata.obs:
        hint = _time_hint(key) if key == "latent_time" else "pass an existing obs column"
        raise KeyError(f"adata has no obs[{key!r}] to colour by: {hint}")
    column = adata.obs[key]
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        return _Colors(key, column.to_numpy(dtype=float), cmap=cmap)
    cat = column.astype("category")
    categories = [str(c) for c in cat.cat.categories]
    stored = adata.uns.get(f"{key}_colors")
    if stored is not None and len(stored) >= len(categories):
        palette = [to_rgba(c) for c in list(stored)[: len(categories)]]
    else:
        palette = _palette(len(categories))
    return _Colors(key, cat.cat.codes.to_numpy(), categories, palette, cmap)


def _scatter(ax: Axes, x: np.ndarray, y: np.ndarray, colors: _Colors, size: float = 8,
             alpha: float = 0.7, z: np.ndarray | None = None, **kwargs: Any):
    """Scatter cells coloured by ``colors`` (categories in random order, so none hides
    the others; numbers with the largest on top), in 3D when ``z`` is given. Returns the
    PathCollection."""
    if colors.categorical:
        order = np.random.default_rng(0).permutation(len(x))
        c, extra = colors.rgba()[order], {}
    else:
        values = colors.values
        order = np.argsort(np.where(np.isnan(values), -np.inf, values), kind="stable")
        c, extra = values[order], {"cmap": colors.cmap, "plotnonfinite": True}
    coords = (x[order], y[order]) if z is None else (x[order], y[order], z[order])
    return ax.scatter(*coords, c=c, s=size, alpha=alpha, linewidths=0, **extra, **kwargs)


def _side_key(fig: Figure, handles: Sequence[Line2D] = (), mappable=None,
              cbar_label: str | None = None, title: str | None = None) -> None:
    """Lay out a multi-panel figure (with its suptitle) leaving a margin at the right,
    and put a legend of ``handles`` there (top) and a colorbar for ``mappable`` (below)."""
    width_in, height_in = fig.get_figwidth(), fig.get_figheight()
    right = 1 - LEGEND_WIDTH_IN / width_in
    fig.tight_layout(rect=(0, 0, right, 1))  # tight_layout makes room for the suptitle
    boxes = [ax.get_position() for ax in fig.axes if ax.axison]
    top, bottom = max(b.y1 for b in boxes), min(b.y0 for b in boxes)
    if handles:
        fig.legend(handles=list(handles), loc="upper left" if mappable is not None
                   else "center left", bbox_to_anchor=(right, top if mappable is not None
                                                       else (top + bottom) / 2),
                   frameon=False, fontsize=9, title=title, title_fontsize=9)
    if mappable is not None:
        # below the legend (about 0.22 in per entry), at most 2.5 in tall
        cbar_top = top - (0.25 + 0.22 * len(handles)) / height_in if handles else top
        height = min(cbar_top - bottom, 2.5 / height_in)
        cax = fig.add_axes((right + 0.2 / width_in, cbar_top - height, 0.15 / width_in,
                            height))
        fig.colorbar(mappable, cax=cax, label=cbar_label)


def _colors_key(fig: Figure, colors: _Colors, mappable, extra: Sequence[Line2D] = ()) -> None:
    """:func:`_side_key` for cells coloured by ``colors``: its legend or colorbar."""
    if colors.categorical:
        _side_key(fig, colors.handles() + list(extra), title=colors.key)
    else:
        _side_key(fig, extra, mappable, cbar_label=colors.key)


def _smooth(t: np.ndarray, y: np.ndarray, window: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Rolling mean of ``y`` along sorted ``t`` (centred; ``window`` cells, default a tenth
    of the cells and at least 5; NaNs ignored)."""
    order = np.argsort(t, kind="stable")
    n = len(order)
    window = max(5, n // 10) if window is None else int(window)
    window = max(1, min(window, n))
    smooth = pd.DataFrame(y[order]).rolling(window, center=True, min_periods=1).mean()
    smooth = smooth.to_numpy()
    return t[order], smooth[:, 0] if y.ndim == 1 else smooth


def _outlined(color: Any, lw: float = 1.8) -> dict[str, Any]:
    """Line style of a fit: coloured with a thin dark outline, visible on any points."""
    return {"color": color, "lw": lw, "solid_capstyle": "round",
            "path_effects": [patheffects.withStroke(linewidth=lw + 1.4, foreground="0.15")]}


def _point_size(n_obs: int) -> float:
    """Marker size (points^2) of an embedding of ``n_obs`` cells."""
    return float(np.clip(12_000 / max(n_obs, 1), 2, 30))


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=float)


def _layer_column(adata: AnnData, layer: str, gene: str) -> np.ndarray:
    g = adata.var_names.get_loc(gene)
    return _dense(adata.layers[layer][:, g]).ravel()


def _fit_handles(colors: _Colors, show_cloud: bool, smooth: int | None) -> list[Line2D]:
    """Legend entries for the fit lines (and fitted cloud)."""
    how = "in time order" if smooth == 1 else "smoothed"
    label = f"model fit ({how}" + (" per type)" if colors.categorical else ")")
    handles = [Line2D([], [], **_outlined("0.6" if colors.categorical else FIT_RED),
                      label=label)]
    if show_cloud:
        handles.append(Line2D([], [], ls="", marker="o", ms=3, color=CLOUD_GREY, alpha=0.6,
                              label="fitted cells"))
    return handles


def _fit_inputs(adata: AnnData, genes: str | Sequence[str], color: str, time_key: str
                ) -> tuple[list[str], _Colors]:
    """Check what the gene-level fit plots read; return the genes and the colouring."""
    genes = _genes(adata, genes)
    _require(adata, "layers", ["Mu", "Ms"], PREPROCESS_HINT)
    _require(adata, "layers", FIT_LAYERS, EXPORT_HINT)
    _require(adata, "obs", [time_key], _time_hint(time_key))
    return genes, _colors(adata, color)


def _too_few_cells(mask: np.ndarray) -> bool:
    return mask.sum() < 2


# ---- gene-level plots ------------------------------------------------------------------
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


# ---- cell-level plots ------------------------------------------------------------------
def _embedding_panel(ax: Axes, adata: AnnData, colors: _Colors, basis: str, size: float,
                     legend: bool = True) -> None:
    coords, name = _basis(adata, basis)
    mappable = _scatter(ax, coords[:, 0], coords[:, 1], colors, size=size, alpha=0.8)
    ax.set_xlabel(f"{name}1")
    ax.set_ylabel(f"{name}2")
    ax.set_xticks([])
    ax.set_yticks([])
    if colors.categorical:
        if legend:
            ax.legend(handles=colors.handles(), title=colors.key, fontsize=8, title_fontsize=9,
                      frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        ax.figure.colorbar(mappable, ax=ax, label=colors.key, fraction=0.05, pad=0.02)


def embedding(
    adata: AnnData,
    color: str = "latent_time",
    basis: str = "umap",
    size: float | None = None,
    cmap: str = "viridis",
    title: str | None = None,
    ax: Axes | None = None,
    show: bool = True,
    save: str | Path | None = None,
) -> Figure:
    """Cells on an embedding coloured by latent time or any obs column (Fig. 4a-c).

    Numeric columns use a continuous colormap with a colorbar (largest values drawn on
    top); categorical, string and boolean columns use one colour per category with a
    legend at the right of the panel.

    Parameters
    ----------
    adata
        AnnData with ``obsm['X_<basis>']``.
    color
        Obs column, e.g. ``'latent_time'`` (written by :meth:`VeloVAE.export_to_anndata`)
        or ``'cell_type'``.
    basis
        Embedding ``obsm['X_<basis>']``; ``pv.pp.preprocess`` writes ``'pca'``, a UMAP
        needs ``sc.tl.umap(adata)``.
    size
        Marker size (default scales with the number of cells).
    cmap
        Colormap of numeric columns.
    title
        Panel title (default: the column and the basis).
    ax
        Draw into this axes.
    show, save
        Call ``plt.show()``; write the figure to this path.

    Returns
    -------
    Figure
    """
    _, name = _basis(adata, basis)  # fail before creating a figure
    colors = _colors(adata, color, cmap)
    fig, ax = _figure(ax, (5.6, 4.4))
    size = size if size is not None else _point_size(adata.n_obs)
    _embedding_panel(ax, adata, colors, basis, size)
    ax.set_title(title if title is not None else f"{color} on {name}")
    return _finish(fig, save, show)


def _pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First two principal components of ``x`` and their explained variance ratios."""
    x = x - x.mean(0)
    u, sing, _ = np.linalg.svd(x, full_matrices=False)
    coords = u[:, :2] * sing[:2]
    ratio = sing[:2] ** 2 / max((sing ** 2).sum(), 1e-300)
    if coords.shape[1] == 1:  # one-dimensional state: flat second axis
        coords = np.column_stack([coords, np.zeros(len(coords))])
        ratio = np.append(ratio, 0.0)
    return coords, ratio


def cell_state_3d(
    adata: AnnData,
    color: str = "cell_type",
    time_key: str = "latent_time",
    method: str = "pca",
    state_key: str = STATE_KEY,
    size: float = 8,
    elev: float = 20,
    azim: float = -60,
    ax: Axes | None = None,
    show: bool = True,
    save: str | Path | None = None,
) -> Figure:
    """Cell state against time in 3D (Fig. 7).

    The full model's posterior mean cell state ``obsm['pyro_velo_cell_state']`` is
    reduced to two dimensions (horizontal axes) and plotted against ``obs[time_key]``
    (vertical axis), coloured by ``obs[color]``: lineages that share a time but differ in
    state separate horizontally.

    Parameters
    ----------
    adata
        AnnData with the full model's exported fit.
    color
        Obs column colouring the cells.
    time_key
        Obs column on the vertical axis.
    method
        ``'pca'`` (numpy SVD of the centred states; axis labels give the explained
        variance) or ``'tsne'`` (:class:`sklearn.manifold.TSNE`, seed 0).
    state_key
        Obsm key of the cell state.
    size
        Marker size.
    elev, azim
        Viewing angles of the 3D axes.
    ax
        A 3D axes to draw into (``fig.add_subplot(projection='3d')``).
    show, save
        Call ``plt.show()``; write the figure to this path.

    Returns
    -------
    Figure
    """
    if state_key not in adata.obsm:
        raise KeyError(f"adata has no obsm[{state_key!r}]: fit VeloVAE(adata, model='full') "
                       f"and {EXPORT_HINT}")
    _require(adata, "obs", [time_key], _time_hint(time_key))
    if method not in ("pca", "tsne"):
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")
    if ax is not None and getattr(ax, "name", None) != "3d":
        raise ValueError("ax must be a 3D axes: fig.add_subplot(projection='3d')")
    colors = _colors(adata, color)
    state = np.asarray(adata.obsm[state_key], dtype=float)
    if method == "pca":
        coords, ratio = _pca_2d(state)
        labels = [f"cell state PC{i + 1} ({100 * r:.0f}%)" for i, r in enumerate(ratio)]
    else:
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(state) - 1) / 3)))
        coords = TSNE(2, perplexity=perplexity, random_state=0, init="pca").fit_transform(state)
        labels = ["cell state tSNE1", "cell state tSNE2"]
    t = adata.obs[time_key].to_numpy(dtype=float)
    fig, ax = _figure(ax, (7.2, 6), projection="3d")
    mappable = _scatter(ax, coords[:, 0], coords[:, 1], colors, size=size, alpha=0.8, z=t,
                        depthshade=False)
    ax.set_xlabel(labels[0], fontsize=9)
    ax.set_ylabel(labels[1], fontsize=9)
    ax.set_zlabel(time_key, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.view_init(elev=elev, azim=azim)
    ax.set_title(f"Cell state c ({method.upper()}) against {time_key}", y=0.94)
    if colors.categorical:
        ax.legend(handles=colors.handles(), title=colors.key, fontsize=8, title_fontsize=9,
                  frameon=False, loc="upper left", bbox_to_anchor=(1.12, 0.9))
    else:
        fig.colorbar(mappable, ax=ax, label=colors.key, shrink=0.6, pad=0.12)
    return _finish(fig, save, show)


def _group_panel(ax: Axes, adata: AnnData, key: str, groupby: str | None, kind: str,
                 points: bool) -> None:
    """Box or violin plot of ``obs[key]`` per category of ``obs[groupby]``."""
    values = adata.obs[key].to_numpy(dtype=float)
    if groupby is None:
        labels, masks, palette = ["all cells"], [np.ones(len(values), bool)], ["0.6"]
    else:
        colors = _colors(adata, groupby)
        if not colors.categorical:
            raise ValueError(f"groupby must name a categorical obs column, obs[{groupby!r}] "
                             "is numeric")
        groups = [(lab, m, c) for lab, m, c in colors.groups() if m.any()]
        labels, masks, palette = (list(x) for x in zip(*groups, strict=True))
    data = [values[m][np.isfinite(values[m])] for m in masks]
    positions = np.arange(1, len(data) + 1)
    if kind == "box":
        parts = ax.boxplot(data, positions=positions, patch_artist=True, widths=0.6,
                           showfliers=not points, medianprops={"color": "0.1"})
        for patch, c in zip(parts["boxes"], palette, strict=True):
            patch.set_facecolor(c)
            patch.set_alpha(0.75)
    else:
        parts = ax.violinplot(data, positions=positions, widths=0.8, showmedians=True)
        for body, c in zip(parts["bodies"], palette, strict=True):
            body.set_facecolor(c)
            body.set_edgecolor("0.3")
            body.set_alpha(0.75)
        for name in ("cmedians", "cmins", "cmaxes", "cbars"):
            parts[name].set_color("0.2")
            parts[name].set_linewidth(1)
    if points:
        rng = np.random.default_rng(0)
        for pos, d in zip(positions, data, strict=True):
            ax.scatter(pos + rng.uniform(-0.15, 0.15, len(d)), d, s=2, color="0.2", alpha=0.35,
                       linewidths=0, zorder=3)
    ax.set_xticks(positions)
    ax.set_xticklabels(labels, rotation=35 if len(labels) > 3 else 0, ha="right"
                       if len(labels) > 3 else "center", fontsize=8)
    ax.set_xlabel(groupby or "")
    ax.set_ylabel(key)


def uncertainty(
    adata: AnnData,
    keys: str | Sequence[str] = ("pyro_velo_time_cv", "pyro_velo_state_cv"),
    basis: str = "umap",
    groupby: str | None = "cell_type",
    kind: str = "box",
    points: bool = True,
    cmap: str = "magma",
    size: float | None = None,
    show: bool = True,
    save: str | Path | None = None,
) -> Figure:
    """Posterior uncertainty of each cell on an embedding and per group (Fig. 8).

    One row per key: left, the cells on ``obsm['X_<basis>']`` coloured by ``obs[key]``
    (e.g. the coefficient of variation of a cell's time or state over posterior samples);
    right, its distribution per category of ``obs[groupby]`` as a box or violin plot in
    the categories' colours, with the cells as jittered dots.

    Parameters
    ----------
    adata
        AnnData with the uncertainty columns in ``obs``.
    keys
        Numeric obs column(s); the defaults are written by the model's uncertainty
        estimate.
    basis
        Embedding of the left column.
    groupby
        Categorical obs column of the right column (``None``: all cells as one group).
    kind
        ``'box'`` or ``'violin'``.
    points
        Overlay the cells as jittered dots (box plots then hide their outliers).
    cmap
        Colormap of the embedding panels.
    size
        Marker size on the embedding (default scales with the number of cells).
    show, save
        Call ``plt.show()``; write the figure to this path.

    Returns
    -------
    Figure
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not keys:
        raise ValueError("keys is empty: pass at least one obs column")
    _require(adata, "obs", keys, UNCERTAINTY_HINT)
    if kind not in ("box", "violin"):
        raise ValueError(f"kind must be 'box' or 'violin', got {kind!r}")
    if groupby is not None:
        _require(adata, "obs", [groupby], "pass an existing obs column as groupby (or None)")
    _basis(adata, basis)
    for key in keys:
        if not pd.api.types.is_numeric_dtype(adata.obs[key]):
            raise ValueError(f"obs[{key!r}] must be numeric to show uncertainty")
    size = size if size is not None else _point_size(adata.n_obs) * 0.7
    fig, axes = plt.subplots(len(keys), 2, squeeze=False, figsize=(10.5, 3.9 * len(keys)),
                             gridspec_kw={"width_ratios": [1.15, 1]})
    for key, (ax_emb, ax_group) in zip(keys, axes, strict=True):
        _embedding_panel(ax_emb, adata, _colors(adata, key, cmap), basis, size)
        ax_emb.set_title(f"{key} on {_basis(adata, basis)[1]}", fontsize=10)
        _group_panel(ax_group, adata, key, groupby, kind, points)
        ax_group.set_title(f"{key} per {groupby}" if groupby else key, fontsize=10)
    fig.suptitle("Posterior uncertainty per cell", fontsize=11)
    fig.tight_layout()
    return _finish(fig, save, show)


# ---- training and benchmarks -----------------------------------------------------------
def _history_lists(history: TrainingHistory | Mapping[str, Any]):
    if isinstance(history, Mapping):
        get = history.get
    else:
        def get(name, default=None):
            return getattr(history, name, default)
    train = np.asarray(get("train", []) or [], dtype=float)
    validation = np.asarray(get("validation", []) or [], dtype=float)
    stages = list(get("stages", []) or [])
    return train, validation, stages, get("best_epoch", None)


def training_curves(
    history: TrainingHistory | Mapping[str, Any],
    yscale: str = "clip",
    clip_quantile: float = 0.95,
    ax: Axes | None = None,
    show: bool = True,
    save: str | Path | None = None,
) -> Figure:
    """Train and validation loss per epoch with the training stages.

    Lines: mean negative ELBO per cell on the train and the validation cells. Vertical
    dashed lines mark where each stage of ``history.stages`` (warm-up, basic, full,
    refine) begins, labelled with its name; a star marks the best validation epoch
    (``history.best_epoch``) when recorded. The first epochs' losses are often orders of
    magnitude above the rest, so by default the y-range is clipped to keep late
    progress visible.

    Parameters
    ----------
    history
        ``VeloVAE.history`` (a :class:`~pyro_velo.train.TrainingHistory`) or a mapping
        with ``train``, ``validation`` and optionally ``stages`` and ``best_epoch``.
    yscale
        ``'clip'`` (linear, the top of the y-range at the ``clip_quantile`` quantile of
        all losses; larger values run off the top), ``'symlog'`` or ``'linear'``.
    clip_quantile
        Quantile of the losses at the top of a clipped y-range.
    ax
        Draw into this axes.
    show, save
        Call ``plt.show()``; write the figure to this path.

    Returns
    -------
    Figure
    """
    train, validation, stages, best = _history_lists(history)
    if train.size == 0:
        raise ValueError("history has no epochs (history.train is empty): train the model first")
    if yscale not in ("clip", "symlog", "linear"):
        raise ValueError(f"yscale must be 'clip', 'symlog' or 'linear', got {yscale!r}")
    fig, ax = _figure(ax, (6.4, 4))
    ax.plot(np.arange(len(train)), train, color="tab:blue", lw=1.5, label="train")
    if validation.size:
        ax.plot(np.arange(len(validation)), validation, color="tab:orange", lw=1.5,
                label="validation")
        if best is not None and 0 <= best < len(validation):
            ax.plot([best], [validation[best]], marker="*", ms=12, color="tab:red", ls="",
                    label=f"best (epoch {best})", zorder=4)
    trans = ax.get_xaxis_transform()
    for name, start in stages:
        ax.axvline(start, color="0.4", ls="--", lw=1)
        ax.text(start, 0.97, f" {name}", transform=trans, rotation=90, va="top", ha="left",
                fontsize=8, color="0.25")
    values = np.concatenate([train, validation])
    values = values[np.isfinite(values)]
    ylabel = "negative ELBO per cell"
    if yscale == "symlog":
        ax.set_yscale("symlog")
    elif yscale == "clip" and values.size:
        lo, hi = values.min(), np.quantile(values, clip_quantile)
        pad = 0.05 * max(hi - lo, 1e-12)
        ax.set_ylim(lo - pad, hi + pad)
        if values.max() > hi + pad:
            ylabel += " (clipped)"
    pad = max(0.5, 0.015 * len(train))
    ax.set_xlim(-pad, len(train) - 1 + pad)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title("Training loss (negative ELBO per cell)")
    ax.legend(fontsize=8, loc="best")
    return _finish(fig, save, show)


def benchmark(
    results: pd.DataFrame,
    metrics: str | Sequence[str] | None = None,
    x: str = "dataset",
    hue: str = "method",
    ncols: int = 3,
    annotate: bool = True,
    show: bool = True,
    save: str | Path | None = None,
) -> Figure:
    """Bar charts comparing methods per dataset, one panel per metric.

    Each panel shows ``results[metric]`` with the datasets on the x-axis and one bar per
    method in the method's colour (same colours in every panel, one legend). Several rows
    per (dataset, method), e.g. seeds, give the mean with a standard-deviation error bar.
    Titles say whether higher or lower is better for known metrics (``spearman_t``,
    ``velocity_cosine``, ``cbdir``, ``mse_*``, ``wall_s``, ...).

    Parameters
    ----------
    results
        One row per (dataset, method[, repeat]) with metric columns.
    metrics
        Metric column(s) (default: every numeric column).
    x, hue
        Columns of the groups on the x-axis and of the bars within a group.
    ncols
        Panels per row.
    annotate
        Write each bar's value (the mean with repeats) above it, or inside it when there
        are error bars.
    show, save
        Call ``plt.show()``; write the figure to this path.

    Returns
    -------
    Figure
    """
    import seaborn as sns

    if not isinstance(results, pd.DataFrame):
        raise TypeError(f"results must be a pandas DataFrame, got {type(results).__name__}")
    missing = [c for c in (x, hue) if c not in results.columns]
    if missing:
        raise KeyError(f"results has no column(s) {missing} (columns: {list(results.columns)})")
    if metrics is None:
        metrics = [c for c in results.columns
                   if c not in (x, hue) and pd.api.types.is_numeric_dtype(results[c])]
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics:
        raise ValueError("no metric columns: pass metrics= or add numeric columns")
    missing = [m for m in metrics if m not in results.columns]
    if missing:
        raise KeyError(f"results has no metric column(s) {missing} "
                       f"(columns: {list(results.columns)})")
    methods = list(pd.unique(results[hue]))
    datasets = list(pd.unique(results[x]))
    palette = dict(zip(methods, _palette(len(methods)), strict=True))
    repeated = results.duplicated([x, hue]).any()
    width = max(3.2, 0.9 + 0.35 * len(datasets) * len(methods))
    fig, axes = _grid(len(metrics), ncols, (width, 3.3))
    for metric, ax in zip(metrics, axes.ravel(), strict=False):
        sns.barplot(data=results, x=x, y=metric, hue=hue, order=datasets, hue_order=methods,
                    palette=palette, errorbar="sd" if repeated else None, ax=ax,
                    err_kws={"linewidth": 1} if repeated else None)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
        if annotate:
            for container in ax.containers:
                if repeated:  # inside the bar, clear of the error bar
                    ax.bar_label(container, fmt="%.3g", fontsize=7, label_type="center",
                                 rotation=90)
                else:
                    ax.bar_label(container, fmt="%.3g", fontsize=7, padding=2)
            ax.margins(y=0.12)
        better = HIGHER_IS_BETTER.get(metric)
        note = "" if better is None else (" (higher is better)" if better
                                          else " (lower is better)")
        ax.set_title(metric + note, fontsize=10)
        ax.set_xlabel("")
        ax.set_ylabel(metric)
        if len(datasets) > 3:
            ax.tick_params(axis="x", labelrotation=30)
    handles = [Line2D([], [], ls="", marker="s", ms=9, color=palette[m], label=str(m))
               for m in methods]
    fig.suptitle(f"Benchmark: {hue} per {x}", fontsize=11)
    _side_key(fig, handles, title=hue)
    return _finish(fig, save, show)


# ---- scVelo wrapper and summary --------------------------------------------------------
def velocity_stream(
    adata: AnnData,
    basis: str = "umap",
    color: str | None = "latent_time",
    vkey: str = "velocity",
    ax: Axes | None = None,
    show: bool = True,
    save: str | Path | None = None,
    **kwargs: Any,
) -> Figure:
    """Velocity streamlines on an embedding (wrapper of scVelo's stream plot).

    Calls :func:`scvelo.pl.velocity_embedding_stream` with our defaults (viridis for
    numeric colours, a title naming what is shown, smaller half-transparent cells than
    scVelo's so the streamlines stay readable). If ``uns['<vkey>_graph']`` is
    missing it first runs :func:`scvelo.tl.velocity_graph`, which **writes**
    ``uns['<vkey>_graph']`` and ``uns['<vkey>_graph_neg']`` (and scVelo writes the
    projected velocities ``obsm['<vkey>_<basis>']`` when it draws).

    Parameters
    ----------
    adata
        AnnData with ``layers[vkey]`` (written by :meth:`VeloVAE.export_to_anndata`) and
        ``obsm['X_<basis>']``.
    basis
        Embedding (``'umap'`` needs ``sc.tl.umap(adata)``; ``'pca'`` is always there
        after ``pv.pp.preprocess``).
    color
        Obs column or gene colouring the cells (``None``: scVelo's default).
    vkey
        Velocity layer.
    ax
        Draw into this axes.
    show, save
        Call ``plt.show()``; write the figure to this path.
    **kwargs
        Passed to :func:`scvelo.pl.velocity_embedding_stream` (e.g. ``density``,
        ``legend_loc``, ``size``, ``alpha``).

    Returns
    -------
    Figure
    """
    import scvelo as scv

    _basis(adata, basis)
    _require(adata, "layers", [vkey], EXPORT_HINT)
    if color is not None and color not in adata.obs and color not in adata.var_names:
        raise KeyError(f"color={color!r} is neither an obs column nor a gene"
                       + (f": {EXPORT_HINT}" if color == "latent_time" else ""))
    if f"{vkey}_graph" not in adata.uns:
        scv.tl.velocity_graph(adata, vkey=vkey, show_progress_bar=False)
    name = basis[2:] if basis.startswith("X_") else basis
    kwargs.setdefault("title", f"velocity stream on {_basis(adata, basis)[1]}: {color}")
    if color is not None and color in adata.obs and pd.api.types.is_numeric_dtype(
            adata.obs[color]):
        kwargs.setdefault("color_map", "viridis")
    kwargs.setdefault("size", _point_size(adata.n_obs) * 4)
    kwargs.setdefault("alpha", 0.6)
    if not {"X", "V", "X_grid", "V_grid", "components", "groups"} & kwargs.keys():
        # scVelo lays its grid out with np.linspace over the embedding's range; from a
        # float32 embedding numpy >= 2 returns a float32 grid, whose rounded spacing can
        # fail matplotlib's "equally spaced" check. The same cells in float64 avoid it.
        try:  # scVelo's own test of whether the projection must be (re)computed
            from scvelo.plotting.utils import velocity_embedding_changed
        except ImportError:
            def velocity_embedding_changed(adata, basis, vkey):
                return f"{vkey}_{basis}" not in adata.obsm

        if velocity_embedding_changed(adata, basis=name, vkey=vkey):
            scv.tl.velocity_embedding(adata, basis=name, vkey=vkey)
        kwargs["X"] = np.asarray(adata.obsm[f"X_{name}"][:, :2], dtype=np.float64)
        kwargs["V"] = np.asarray(adata.obsm[f"{vkey}_{name}"][:, :2], dtype=np.float64)
    fig, ax = _figure(ax, (6, 5))
    scv.pl.velocity_embedding_stream(adata, basis=name, vkey=vkey, color=color, ax=ax,
                                     show=False, **kwargs)
    return _finish(fig, save, show)


def summary(
    adata: AnnData,
    history: TrainingHistory | None = None,
    true_time_key: str | None = None,
    gene: str | None = None,
    basis: str = "pca",
    save: str | Path | None = None,
    show: bool = True,
) -> Figure:
    """One-page summary of a fit exported by :meth:`VeloVAE.export_to_anndata`.

    Panels: latent time with the velocity stream on an embedding (:func:`velocity_stream`;
    this computes ``uns['velocity_graph']`` if it is missing), latent time against
    ``obs[true_time_key]`` when given (else its histogram), the training curves
    (:func:`training_curves`), and the phase portrait of one gene (default: the fitted
    gene with the largest spliced variance) with the model's fit
    (:func:`phase_portraits`, coloured by latent time).

    Parameters
    ----------
    adata
        AnnData with the exported fit.
    history
        Training history (``VeloVAE.history``) for the loss panel.
    true_time_key
        Obs column of a reference time (e.g. ``'true_t'`` of simulated data).
    gene
        Gene of the phase portrait.
    basis
        Embedding in ``obsm['X_<basis>']``.
    save
        Path to write the figure to.
    show
        Call ``plt.show()``; otherwise the figure is only returned.
    """
    _require(adata, "obs", ["latent_time"], EXPORT_HINT)
    _require(adata, "layers", ["velocity"], EXPORT_HINT)
    fig, axes = plt.subplots(2, 2, figsize=(11, 9))
    ax_stream, ax_time, ax_loss, ax_gene = axes.ravel()

    velocity_stream(adata, basis=basis, color="latent_time", ax=ax_stream, show=False,
                    title="latent time and velocity")

    if true_time_key is not None and true_time_key in adata.obs:
        from scipy.stats import spearmanr

        rho = spearmanr(adata.obs[true_time_key], adata.obs["latent_time"])[0]
        ax_time.scatter(adata.obs[true_time_key], adata.obs["latent_time"], s=4, alpha=0.5)
        ax_time.set_xlabel(true_time_key)
        ax_time.set_ylabel("latent time")
        ax_time.set_title(f"latent time vs {true_time_key} (Spearman {rho:.3f})")
    else:
        ax_time.hist(adata.obs["latent_time"], bins=40)
        ax_time.set_xlabel("latent time")
        ax_time.set_ylabel("cells")
        ax_time.set_title("latent time distribution")

    if history is not None and len(history.train):
        training_curves(history, ax=ax_loss, show=False)
    else:
        ax_loss.set_axis_off()

    if gene is None:
        fitted = np.asarray(adata.var["velocity_genes"], dtype=bool)
        variance = np.where(fitted, _dense(adata.layers["Ms"]).var(0), -np.inf)
        gene = adata.var_names[int(np.argmax(variance))]
    phase_portraits(adata, gene, color="latent_time", ax=ax_gene, show=False)
    ax_gene.set_title(f"phase portrait: {gene}")

    fig.subplots_adjust(left=0.07, right=0.97, bottom=0.07, top=0.95, wspace=0.3, hspace=0.3)
    return _finish(fig, save, show)
