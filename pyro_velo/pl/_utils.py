"""Shared pieces of the plotting functions: colours, panels, figure layout and checks.

Nothing here is public; :mod:`pyro_velo.pl` re-exports the plotting functions only.
"""

from __future__ import annotations

from collections.abc import Sequence
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

EXPORT_HINT = "call VeloVAE.export_to_anndata(adata) first"
PREPROCESS_HINT = "run pv.pp.preprocess(adata) first"
UNCERTAINTY_HINT = "compute the posterior uncertainty (VeloVAE.get_uncertainty) first"
STATE_KEY = "pyro_velo_cell_state"
FIT_LAYERS = ("pyro_velo_u", "pyro_velo_s")
MISSING_GREY = "#d0d0d0"
CLOUD_GREY = "0.55"
FIT_RED = "crimson"
LEGEND_WIDTH_IN = 1.9  # space at the right of multi-panel figures for their legend



# ---- shared pieces ---------------------------------------------------------------------
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
