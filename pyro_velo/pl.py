"""Plots of a fitted model (matplotlib; every function returns its Figure)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData
from matplotlib.figure import Figure

from .train import TrainingHistory


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

    Panels: latent time with the velocity stream on an embedding (through scVelo; this
    computes ``uns['velocity_graph']`` if it is missing), latent time against
    ``obs[true_time_key]`` when given, the training curves, and the phase portrait of one
    gene (default: the fitted gene with the largest spliced variance) with the model's fit.

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
    import scvelo as scv

    if "latent_time" not in adata.obs or "velocity" not in adata.layers:
        raise KeyError("adata has no exported fit: call VeloVAE.export_to_anndata(adata) first")
    fig, axes = plt.subplots(2, 2, figsize=(11, 9))
    ax_stream, ax_time, ax_loss, ax_gene = axes.ravel()

    if "velocity_graph" not in adata.uns:
        scv.tl.velocity_graph(adata, show_progress_bar=False)
    scv.pl.velocity_embedding_stream(adata, basis=basis, color="latent_time", ax=ax_stream,
                                     show=False, title="latent time and velocity",
                                     color_map="viridis")

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

    if history is not None and history.train:
        ax_loss.plot(history.train, label="train")
        if history.validation:
            ax_loss.plot(history.validation, label="validation")
        ax_loss.set_yscale("symlog")
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("negative ELBO per cell")
        ax_loss.legend()
        ax_loss.set_title("training")
    else:
        ax_loss.set_axis_off()

    fitted = np.asarray(adata.var["velocity_genes"], dtype=bool)
    if gene is None:
        ms = adata.layers["Ms"]
        variance = np.where(fitted, np.asarray(ms).var(0), -np.inf)
        gene = adata.var_names[int(np.argmax(variance))]
    g = adata.var_names.get_loc(gene)
    order = np.argsort(adata.obs["latent_time"].to_numpy())
    ax_gene.scatter(adata.layers["Ms"][:, g], adata.layers["Mu"][:, g], s=4,
                    c=adata.obs["latent_time"], cmap="viridis", alpha=0.6)
    ax_gene.plot(adata.layers["pyro_velo_s"][order, g], adata.layers["pyro_velo_u"][order, g],
                 color="crimson", lw=2, label="fit")
    ax_gene.set_xlabel("spliced (Ms)")
    ax_gene.set_ylabel("unspliced (Mu)")
    ax_gene.set_title(f"phase portrait: {gene}")
    ax_gene.legend()

    fig.subplots_adjust(left=0.07, right=0.97, bottom=0.07, top=0.95, wspace=0.3, hspace=0.3)
    if save is not None:
        fig.savefig(save, dpi=120)
    if show:
        plt.show()
    return fig
