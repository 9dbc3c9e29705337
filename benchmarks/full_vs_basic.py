"""Basic vs full model on bifurcating simulations: the numbers behind the full-model tests.

Usage: python benchmarks/full_vs_basic.py [--branches 2 3] [--n-cells 2000] [--n-genes 200]
                                          [--models basic full] [--data-seeds K ...]
                                          [--size-factors total] [--rate-history constant]
                                          [--threads N]

Prints one markdown table row per (simulation, model): reconstruction (train/test MSE,
log-likelihood), latent-time Spearman with the truth, mean per-cell velocity cosine with
the true velocity (over all cells, and over the moving cells: those whose true velocity
is at least 5% of the median cell's, since a cell at steady state has no direction to
recover), 15-NN branch accuracy on the cell state (5-fold CV over cells past the split),
correlation of predict_future(0.5) displacement with the true velocity, wall time.

The simulations are ``simulate(n_cells, n_genes, topology='bifurcation', n_branches=k,
noise='nb', seed=d)``: by default the tests' draw ``d = k``; ``--data-seeds`` runs other
draws of the simulator.
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
    velocity over the fitted genes (``cosine``; ``cosine_moving`` over the cells whose true
    velocity norm is at least 5% of the median cell's, ``still`` the share of the others),
    and the correlation of the ``predict_future(0.5)`` displacement with the true
    velocity."""
    genes = vae.data.fitted
    true_v = np.asarray(adata.layers["true_velocity"][:, genes])
    velocity, _ = vae.get_velocity()
    velocity = velocity[:, genes]
    _, s_now = vae.get_expression_fit()
    _, s_next = vae.predict_future(0.5)
    norm = np.linalg.norm(true_v, axis=1)
    moving = norm >= 0.05 * np.median(norm)
    return {
        "spearman": float(spearmanr(vae.get_latent_time(), adata.obs["true_t"])[0]),
        "cosine": _cosine(velocity, true_v),
        "cosine_moving": _cosine(velocity[moving], true_v[moving]),
        "still": float(1 - moving.mean()),
        "future": float(np.corrcoef((s_next - s_now)[:, genes].ravel(), true_v.ravel())[0, 1]),
    }


def bifurcation(n_cells: int, n_genes: int, n_branches: int, data_seed: int,
                size_factors: str = "total"):
    """``simulate(..., topology='bifurcation', noise='nb')`` preprocessed as in the tests
    (``pp.preprocess(random_state=0, size_factors=...)``)."""
    adata = pv.datasets.simulate(n_cells=n_cells, n_genes=n_genes, topology="bifurcation",
                                 n_branches=n_branches, noise="nb", seed=data_seed)
    pv.pp.preprocess(adata, random_state=0, size_factors=size_factors)
    return adata


def run(n_branches: int, n_cells: int, n_genes: int, models: list[str],
        data_seed: int | None = None, size_factors: str = "total",
        rate_history: str = "constant", threads: int | None = None) -> list[str]:
    data_seed = n_branches if data_seed is None else data_seed
    adata = bifurcation(n_cells, n_genes, n_branches, data_seed, size_factors)
    rows = []
    for kind in models:
        start = time.perf_counter()
        full_only = {"rate_history": rate_history} if kind == "full" else {}
        vae = pv.VeloVAE(adata, model=kind, seed=0, **full_only)
        vae.train(progress_bar=False, seed=0, num_threads=threads)
        wall = time.perf_counter() - start
        metrics = vae.evaluate()
        scores = velocity_metrics(vae, adata)
        accuracy = "-"
        if kind == "full":
            branch = adata.obs["branch"].astype(str).to_numpy()
            past = branch != "root"
            accuracy = f"{cross_val_score(KNeighborsClassifier(15), vae.get_cell_state()[past], branch[past], cv=5).mean():.3f}"  # noqa: E501
        rows.append(
            f"| {n_branches} branches, draw {data_seed} | {kind} | "
            f"{metrics.loc['train', 'mse']:.3f} / "
            f"{metrics.loc['test', 'mse']:.3f} | {metrics.loc['train', 'log_likelihood']:.1f}"
            f" / {metrics.loc['test', 'log_likelihood']:.1f} | {scores['spearman']:.4f} | "
            f"{scores['cosine']:.3f} | {scores['cosine_moving']:.3f} "
            f"({scores['still']:.0%} still) | {accuracy} | {scores['future']:.3f} | "
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
    parser.add_argument("--data-seeds", type=int, nargs="+", default=None,
                        help="draws of the simulator (default: the tests' draw, seed = "
                             "number of branches)")
    parser.add_argument("--size-factors", default="total", choices=pv.pp.SIZE_FACTORS)
    parser.add_argument("--rate-history", default="constant",
                        choices=pv.components.RATE_HISTORIES)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per fit (default: torch's setting)")
    args = parser.parse_args()
    print(f"size factors: {args.size_factors}; full model's rate_history: "
          f"{args.rate_history}")
    print("| simulation | model | MSE train / test | LL train / test | Spearman t | "
          "velocity cosine | cosine, moving cells | branch acc. (c) | future corr. | wall |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n_branches in args.branches:
        for data_seed in args.data_seeds or [None]:
            run(n_branches, args.n_cells, args.n_genes, args.models, data_seed,
                args.size_factors, args.rate_history, args.threads)


if __name__ == "__main__":
    main()
