"""Basic vs full model on bifurcating simulations: the numbers behind the full-model tests.

Usage: python benchmarks/full_vs_basic.py [--branches 2 3] [--n-cells 2000] [--n-genes 200]
                                          [--models basic full]

Prints one markdown table row per (simulation, model): reconstruction (train/test MSE,
log-likelihood), latent-time Spearman with the truth, mean per-cell velocity cosine with
the true velocity, 15-NN branch accuracy on the cell state (5-fold CV over cells past the
split), correlation of predict_future(0.5) displacement with the true velocity, wall time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import spearmanr
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

import pyro_velo as pv


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = (a * b).sum(1)
    return float(np.mean(num / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))


def velocity_metrics(vae: pv.VeloVAE, adata) -> dict[str, float]:
    """Latent-time Spearman with ``true_t``, mean per-cell velocity cosine with the true
    velocity over the fitted genes, and the correlation of the ``predict_future(0.5)``
    displacement with the true velocity."""
    genes = vae.data.fitted
    true_v = adata.layers["true_velocity"][:, genes]
    velocity, _ = vae.get_velocity()
    _, s_now = vae.get_expression_fit()
    _, s_next = vae.predict_future(0.5)
    return {
        "spearman": float(spearmanr(vae.get_latent_time(), adata.obs["true_t"])[0]),
        "cosine": _cosine(velocity[:, genes], true_v),
        "future": float(np.corrcoef((s_next - s_now)[:, genes].ravel(), true_v.ravel())[0, 1]),
    }


def run(n_branches: int, n_cells: int, n_genes: int, models: list[str]) -> list[str]:
    adata = pv.datasets.simulate(n_cells=n_cells, n_genes=n_genes, topology="bifurcation",
                                 n_branches=n_branches, noise="nb", seed=n_branches)
    pv.pp.preprocess(adata, random_state=0)
    rows = []
    for kind in models:
        start = time.perf_counter()
        vae = pv.VeloVAE(adata, model=kind, seed=0)
        vae.train(progress_bar=False, seed=0)
        wall = time.perf_counter() - start
        metrics = vae.evaluate()
        scores = velocity_metrics(vae, adata)
        accuracy = "-"
        if kind == "full":
            branch = adata.obs["branch"].astype(str).to_numpy()
            past = branch != "root"
            accuracy = f"{cross_val_score(KNeighborsClassifier(15), vae.get_cell_state()[past], branch[past], cv=5).mean():.3f}"  # noqa: E501
        rows.append(
            f"| {n_branches} branches | {kind} | {metrics.loc['train', 'mse']:.3f} / "
            f"{metrics.loc['test', 'mse']:.3f} | {metrics.loc['train', 'log_likelihood']:.1f}"
            f" / {metrics.loc['test', 'log_likelihood']:.1f} | {scores['spearman']:.4f} | "
            f"{scores['cosine']:.3f} | {accuracy} | {scores['future']:.3f} | "
            f"{wall:.0f} s |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--branches", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--n-cells", type=int, default=2000)
    parser.add_argument("--n-genes", type=int, default=200)
    parser.add_argument("--models", nargs="+", default=["basic", "full"])
    args = parser.parse_args()
    print("| simulation | model | MSE train / test | LL train / test | Spearman t | "
          "velocity cosine | branch acc. (c) | future corr. | wall |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n_branches in args.branches:
        run(n_branches, args.n_cells, args.n_genes, args.models)


if __name__ == "__main__":
    main()
