"""Cell-level plots: embeddings, the 3-D cell state and scVelo's velocity streamlines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._utils import (
    EXPORT_HINT,
    STATE_KEY,
    _basis,
    _colors,
    _embedding_panel,
    _figure,
    _finish,
    _point_size,
    _require,
    _scatter,
    _time_hint,
)

__all__ = ["cell_state_3d", "embedding", "velocity_stream"]



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
    # scVelo smooths the grid over n_obs // 50 neighbours: none below 50 cells, which
    # scikit-learn refuses; one neighbour there
    kwargs.setdefault("n_neighbors", max(1, adata.n_obs // 50))
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
