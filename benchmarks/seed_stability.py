"""Seed stability: do fits with different seeds agree on latent time?

Usage: python benchmarks/seed_stability.py [--seeds 0 1 2] [--n-cells 2000] [--n-genes 200]
                                           [--model basic] [--max-epochs N]

Simulates one bifurcation (2 branches, negative-binomial counts, simulation seed 2),
preprocesses it once (``random_state=0``), then fits ``VeloVAE(adata, model, seed=s)``
with ``train(seed=s)`` for every seed ``s`` (the seed sets the train/validation/test split,
the initialisation, minibatch order and sampling). Prints, per seed, the Spearman
correlation of the latent time with the true time, the epochs and the wall time, then the
pairwise Spearman correlation of the latent times between seeds (all cells) and their
minimum. Identical seeds give bitwise identical fits on CPU (see
``tests/test_reliability.py``); this measures how much the fit depends on the seed.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
from scipy.stats import spearmanr

import pyro_velo as pv


def run(seeds: list[int], n_cells: int, n_genes: int, model: str,
        max_epochs: int | None) -> dict[int, np.ndarray]:
    """Fit once per seed; return each seed's latent time (and print per-seed rows)."""
    adata = pv.datasets.simulate(n_cells=n_cells, n_genes=n_genes, topology="bifurcation",
                                 n_branches=2, noise="nb", seed=2)
    pv.pp.preprocess(adata, random_state=0)
    times = {}
    print(f"{adata.n_obs} cells x {adata.n_vars} genes after preprocessing, model={model!r}")
    print("| seed | Spearman with true time | epochs | wall |")
    print("| --- | --- | --- | --- |")
    for seed in seeds:
        start = time.perf_counter()
        vae = pv.VeloVAE(adata, model=model, seed=seed)
        vae.train(progress_bar=False, seed=seed, max_epochs=max_epochs)
        wall = time.perf_counter() - start
        times[seed] = vae.get_latent_time()
        truth = spearmanr(times[seed], adata.obs["true_t"])[0]
        print(f"| {seed} | {truth:.4f} | {len(vae.history.train)} | {wall:.0f} s |")
    return times


def pairwise_spearman(times: dict[int, np.ndarray]) -> dict[tuple[int, int], float]:
    """Spearman correlation of the latent times of every pair of seeds."""
    return {(a, b): float(spearmanr(times[a], times[b])[0])
            for a, b in itertools.combinations(sorted(times), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-cells", type=int, default=2000)
    parser.add_argument("--n-genes", type=int, default=200)
    parser.add_argument("--model", default="basic", choices=["basic", "full"])
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="cap on epochs per stage (default: the package default)")
    args = parser.parse_args()
    if len(set(args.seeds)) < 2:
        parser.error("give at least two different seeds")
    times = run(args.seeds, args.n_cells, args.n_genes, args.model, args.max_epochs)
    pairs = pairwise_spearman(times)
    print()
    print("| seeds | Spearman of latent times |")
    print("| --- | --- |")
    for (a, b), rho in pairs.items():
        print(f"| {a} vs {b} | {rho:.4f} |")
    print(f"\nminimum pairwise Spearman: {min(pairs.values()):.4f}")
    if min(pairs.values()) < 0:
        print("(negative: some seeds run time backwards relative to the others)")


if __name__ == "__main__":
    main()
