"""Diagnostics of a fit: uncertainty per group, training curves, benchmark panels and a
one-page summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..train import TrainingHistory
from ._utils import (
    EXPORT_HINT,
    UNCERTAINTY_HINT,
    _basis,
    _colors,
    _dense,
    _embedding_panel,
    _figure,
    _finish,
    _grid,
    _palette,
    _point_size,
    _require,
    _side_key,
)
from .cells import velocity_stream
from .genes import phase_portraits

__all__ = ["benchmark", "summary", "training_curves", "uncertainty"]

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
