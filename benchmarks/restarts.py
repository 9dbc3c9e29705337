"""Restarts: does the best validation ELBO of several starts keep a good fit?

Usage: python benchmarks/restarts.py [--sets sparse2 sparse3 test2]
           [--size-factors neighbourhood total] [--base-seeds 0 1 2] [--n-starts 3]

For each set, normalisation and base seed ``s`` it fits ``VeloVAE(adata, seed=s)
.train(seed=s, n_starts=N, num_threads=1)`` and prints one markdown row: the kept start,
every start's validation loss (negative ELBO per cell), latent-time Spearman, velocity
cosine and future-state correlation (as in ``full_vs_basic.py``) and wall time.

Sets: ``sparse2`` / ``sparse3``: ``simulate(1000, 100, topology='bifurcation',
n_branches=2 / 3, noise='nb', seed=3)``, 9% root cells, where single starts put the
branches on different clocks; ``test2`` / ``test3``: the test suite's full-model sets
(``simulate(2000, 200, ..., n_branches=k, seed=k)``). Preprocessing:
``pp.preprocess(random_state=0, size_factors=...)``.
"""

from __future__ import annotations

import argparse
import itertools
import time
import warnings

from full_vs_basic import bifurcation, velocity_metrics

import pyro_velo as pv

#: name -> (cells, genes, branches, data seed)
SETS = {"sparse2": (1000, 100, 2, 3), "sparse3": (1000, 100, 3, 3),
        "test2": (2000, 200, 2, 2), "test3": (2000, 200, 3, 3)}
HEADER = ("| set | size factors | base seed | kept start | validation loss of the starts "
          "| Spearman | cosine | future | wall |\n|---|---|---|---|---|---|---|---|---|")


def run(name: str, size_factors: str, seed: int, n_starts: int) -> str:
    n_cells, n_genes, n_branches, data_seed = SETS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = bifurcation(n_cells, n_genes, n_branches, data_seed, size_factors)
    start = time.perf_counter()
    vae = pv.VeloVAE(adata, seed=seed)
    vae.train(progress_bar=False, seed=seed, num_threads=1, n_starts=n_starts)
    wall = time.perf_counter() - start
    scores = velocity_metrics(vae, adata)
    losses = " ".join(f"{x:.2f}" for x in vae.config.get("start_losses", []))
    return (f"| {name} | {size_factors} | {seed} | {vae.config.get('start', 0)} | {losses} "
            f"| {scores['spearman']:.3f} | {scores['cosine']:.3f} | {scores['future']:.3f} "
            f"| {wall:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["sparse2", "sparse3"], choices=SETS)
    parser.add_argument("--size-factors", nargs="+", default=["neighbourhood"],
                        choices=pv.pp.SIZE_FACTORS)
    parser.add_argument("--base-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--n-starts", type=int, default=3)
    args = parser.parse_args()
    print(HEADER)
    for grid_point in itertools.product(args.sets, args.size_factors, args.base_seeds):
        print(run(*grid_point, args.n_starts), flush=True)


if __name__ == "__main__":
    main()
