"""Does selecting ``var['velocity_genes']`` by evidence of dynamics help downstream?

Usage::

    python benchmarks/velocity_genes.py [--draws 6] [--n-cells 800] [--n-genes 100]
        [--max-epochs 200] [--families linear bifurcation scvelo] [--out table.md]

For every simulator family (one entry of :data:`FAMILIES`) and draw (seed ``0 ..
draws-1``): simulate, ``pv.pp.preprocess(random_state=0)``, fit the full model
(``VeloVAE(adata, seed=0).train(seed=0, max_epochs=..., num_threads=1)``) and export. Then,
for every gene set (all fitted genes, and ``velocity_score > m`` for each threshold ``m``
of :data:`THRESHOLDS`, the rule of :mod:`pyro_velo.velocity_genes`):

- ``cosine``: mean over cells of the cosine between ``layers['velocity']`` and
  ``layers['true_velocity']`` (the simulator's ``ds/dt``), both restricted to the gene set;
- ``cosine 0``: the same against the true velocity of **all** fitted genes, the velocity
  of the genes left out taken as 0 (what leaving a gene out asserts); unlike ``cosine``
  it compares every gene set on the same reference, so dropping genes whose true
  velocity is not zero costs here;
- ``CBDir``: with ``var['velocity_genes']`` = the gene set, ``scv.tl.velocity_graph`` (which
  uses exactly those genes), ``scv.tl.velocity_embedding(basis='umap')``, then
  ``pv.tl.cross_boundary_correctness`` on the UMAP velocities, over the simulation's
  cell-type transitions (``simulate_scvelo``: four stages of true time).

The table gives, per family and gene set, the mean over draws (and the standard
deviation), the mean paired difference to all fitted genes, and in how many draws the
set did better than all fitted genes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
from compare import mean_cosine, our_simulation, staged_scvelo_simulation  # same folder

#: family name -> function(n_cells, n_genes, seed) -> raw AnnData with 'true_velocity',
#: obs['cell_type'] and uns['transitions'] (a new simulator is one more entry)
FAMILIES: dict[str, Callable] = {
    "linear": lambda n, g, seed: our_simulation(n, g, topology="linear", seed=seed),
    "bifurcation": lambda n, g, seed: our_simulation(n, g, topology="bifurcation", seed=seed),
    "scvelo": staged_scvelo_simulation,
}
#: velocity_score thresholds compared with "all fitted genes" (None)
THRESHOLDS = (None, 0.05, 0.1, 0.2)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fit_and_export(adata, max_epochs: int):
    """Preprocess, fit the full model and export with every fitted gene kept."""
    import scanpy as sc

    import pyro_velo as pv

    pv.pp.preprocess(adata, random_state=0)
    sc.tl.umap(adata, random_state=0)
    vae = pv.VeloVAE(adata, seed=0)
    vae.train(seed=0, max_epochs=max_epochs, progress_bar=False, num_threads=1)
    vae.export_to_anndata(adata)
    return adata


def gene_set_metrics(adata, genes: np.ndarray) -> dict[str, float]:
    """Velocity cosine to the truth and CBDir through scVelo's graph on ``genes``."""
    import scvelo as scv

    import pyro_velo as pv

    velocity = np.asarray(adata.layers["velocity"], dtype=np.float64)
    truth = np.asarray(adata.layers["true_velocity"], dtype=np.float64)
    cosine = mean_cosine(velocity[:, genes], truth[:, genes])
    fitted = np.isfinite(velocity).all(axis=0)
    left_out_as_zero = np.where(genes, velocity, 0.0)
    cosine_zero = mean_cosine(left_out_as_zero[:, fitted], truth[:, fitted])
    adata.var["velocity_genes"] = genes
    scv.tl.velocity_graph(adata, vkey="velocity", n_jobs=1, show_progress_bar=False)
    scv.tl.velocity_embedding(adata, basis="umap", vkey="velocity")
    transitions = [tuple(map(str, t)) for t in adata.uns["transitions"]]
    _, cbdir = pv.tl.cross_boundary_correctness(adata, "cell_type", transitions,
                                                velocity_key="velocity", basis="umap")
    return {"n_genes": int(genes.sum()), "cosine": cosine, "cosine_zero": cosine_zero,
            "cbdir": cbdir}


def run_draw(family: str, seed: int, args) -> list[dict]:
    from pyro_velo.velocity_genes import selection

    start = time.perf_counter()
    adata = FAMILIES[family](args.n_cells, args.n_genes, seed)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).astype("category")
    fit_and_export(adata, args.max_epochs)
    fitted = np.isfinite(adata.layers["velocity"]).all(axis=0)
    scores = adata.var["velocity_score"].to_numpy()
    rows = []
    for threshold in THRESHOLDS:
        genes = selection(scores, fitted, threshold)
        rows.append({"family": family, "seed": seed, "genes": _label(threshold),
                     **gene_set_metrics(adata, genes)})
    log(f"{family} seed {seed}: {time.perf_counter() - start:.0f} s, "
        + ", ".join(f"{r['genes']}: {r['n_genes']} genes cos {r['cosine']:.3f} "
                    f"cos0 {r['cosine_zero']:.3f} CBDir {r['cbdir']:.3f}" for r in rows))
    return rows


def _label(threshold: float | None) -> str:
    return "all fitted" if threshold is None else f"score > {threshold:g}"


def summary_table(results: pd.DataFrame) -> str:
    """Markdown: per family and gene set, mean (sd) over draws and the paired change to
    all fitted genes, with the number of draws where the set did better."""
    metrics = {"cosine": "cosine", "cosine_zero": "cosine 0", "cbdir": "CBDir"}
    header = ["family", "genes", "n genes"] + [f"{name} (sd)" for name in metrics.values()]
    header += [f"d {name} (better)" for name in metrics.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for family, block in results.groupby("family", sort=False):
        base = block[block["genes"] == _label(None)].set_index("seed")
        for label, rows in block.groupby("genes", sort=False):
            rows = rows.set_index("seed")
            cells = [family, label, f"{rows['n_genes'].mean():.1f}"]
            cells += [f"{rows[key].mean():.3f} ({rows[key].std():.3f})" for key in metrics]
            for key in metrics:
                change = rows[key] - base[key]
                cells.append("-" if label == _label(None) else
                             f"{change.mean():+.3f} ({int((change > 0).sum())}/{len(rows)})")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--n-cells", type=int, default=800)
    parser.add_argument("--n-genes", type=int, default=100)
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--csv", help="also write every draw's rows to this CSV file")
    parser.add_argument("--out", help="write the markdown table to this file too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.simplefilter("ignore")
    import scvelo as scv

    scv.settings.verbosity = 0
    rows = []
    for family in args.families:
        for seed in range(args.draws):
            rows.extend(run_draw(family, seed, args))
    results = pd.DataFrame(rows)
    if args.csv:
        results.to_csv(args.csv, index=False)
    table = summary_table(results)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
