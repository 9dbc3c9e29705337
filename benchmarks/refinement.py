"""The initial-condition refinement: the likelihood rule against keeping it by force.

Usage: python benchmarks/refinement.py [--sets 2 3 linear] [--size-factors total
           neighbourhood] [--seeds 0 1 2 3 4 5] [--n-cells 2000] [--n-genes 200]
           [--epochs 50] [--lr-ode 0.01]

For every simulation, normalisation and model seed, the full model's first stage is
trained once (``train(refine_epochs=0)``; one torch thread throughout) and saved; the
refinement then runs twice from that same state: with the default rule
(``require_improvement=True``: kept only if the validation log-likelihood rises) and
kept by force (``require_improvement=False``). Comparing the two from one first stage
separates the refinement's effect from the run-to-run spread of whole fits.

Simulations (``pp.preprocess(random_state=0, size_factors=...)`` after each):
``2``: ``simulate(n, g, topology='bifurcation', n_branches=2, noise='nb', seed=2)``;
``3``: the same with 3 branches and ``seed=3`` (the two sets of
``tests/test_full_model.py``); ``linear``: ``simulate(n, g, seed=0)``.

Prints one markdown row per fit: velocity cosine / future-state correlation / test
log-likelihood per cell of the first stage, after the rule (and whether it kept the
refinement), and after the forced refinement; then the latent-time Spearman and the
wall time of the first stage.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
from full_vs_basic import velocity_metrics

import pyro_velo as pv

SIMULATIONS = {
    "2": dict(topology="bifurcation", n_branches=2, noise="nb", seed=2),
    "3": dict(topology="bifurcation", n_branches=3, noise="nb", seed=3),
    "linear": dict(seed=0),
}


def _scores(vae: pv.VeloVAE, adata) -> tuple[dict[str, float], str]:
    scores = velocity_metrics(vae, adata)
    scores["ll"] = float(vae.evaluate().loc["test", "log_likelihood"])
    return scores, f"{scores['cosine']:.3f} / {scores['future']:.3f} / {scores['ll']:.1f}"


def run(simulation: str, size_factors: str, seed: int, n_cells: int, n_genes: int,
        epochs: int, lr_ode: float, folder: Path) -> str:
    adata = pv.datasets.simulate(n_cells=n_cells, n_genes=n_genes, **SIMULATIONS[simulation])
    pv.pp.preprocess(adata, random_state=0, size_factors=size_factors)
    start = time.perf_counter()
    vae = pv.VeloVAE(adata, model="full", seed=seed)
    vae.train(refine_epochs=0, progress_bar=False, seed=seed, num_threads=1)
    wall = time.perf_counter() - start
    first, first_text = _scores(vae, adata)
    path = folder / f"{simulation}_{size_factors}_{seed}"
    vae.save(path)
    cells = []
    for require in (True, False):
        refined = pv.VeloVAE.load(path, adata)
        with warnings.catch_warnings():  # the rule's rejection warning
            warnings.simplefilter("ignore", UserWarning)
            refined.refine_initial_conditions(epochs=epochs, lr_ode=lr_ode,
                                              require_improvement=require,
                                              progress_bar=False)
        text = _scores(refined, adata)[1]
        if require:
            text += " (kept)" if refined.config["refined"] else " (rejected)"
        cells.append(text)
    return (f"| {simulation} | {size_factors} | {seed} | {first_text} | {cells[0]} | "
            f"{cells[1]} | {first['spearman']:.4f} | {wall:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["2", "3", "linear"],
                        choices=sorted(SIMULATIONS))
    parser.add_argument("--size-factors", nargs="+", default=["total", "neighbourhood"],
                        choices=list(pv.pp.SIZE_FACTORS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--n-cells", type=int, default=2000)
    parser.add_argument("--n-genes", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr-ode", type=float, default=1e-2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the refinements too: the rows then do not depend on the cores
    print("| simulation | size factors | seed | first stage: cosine / future / test LL | "
          "likelihood rule | kept by force | Spearman t | first-stage wall |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for simulation in args.sets:
            for size_factors in args.size_factors:
                for seed in args.seeds:
                    print(run(simulation, size_factors, seed, args.n_cells, args.n_genes,
                              args.epochs, args.lr_ode, Path(folder)), flush=True)


if __name__ == "__main__":
    main()
