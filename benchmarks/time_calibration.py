"""How often an interval around a cell's fitted time holds its true time.

Usage::

    python benchmarks/time_calibration.py [--families ode scvelo] [--draws 6]
        [--sizes 800 100] [--csv benchmarks/time_calibration.csv] [--table]
    python benchmarks/time_calibration.py --exact-posterior [--sizes 800]
    python benchmarks/time_calibration.py --velocity [--draws 2] [--sizes 800]

Data: the robustness benchmark's simulations with a true time per cell
(``robustness.dataset``: our simulator's ``linear``, ``bifurcation2`` and
``bifurcation3``, scVelo's simulator), 100 genes, at each of ``--sizes`` cells, draws
0 to ``--draws - 1``; ``pp.preprocess(random_state=0)`` and the default fit
``VeloVAE(adata, seed=draw).train(seed=draw)``, then ``export_to_anndata``.

The fitted time is identified up to a monotone map of the true time (its origin and
unit are the model's), so each cell's error is its residual from a map of the true
time fitted over all cells: an affine map (what a fit of the right ODE gives) and a
degree-5 polynomial (which also takes out a smooth warp of the time axis). The
columns ``cover_<sd>_<map>`` give the share of cells whose residual lies within
1.645 standard deviations (a 90% interval for a normal error) for two standard
deviations: ``std``, the posterior's (``obs['pyro_velo_time_std']``), and
``combined``, ``sqrt(time_std**2 + time_resolution**2)`` with the spread of the
fitted time over the cell's neighbourhood (``obs['pyro_velo_time_resolution']``,
:func:`pyro_velo.tl.time_resolution`).

Rows go to ``--csv`` (appended; a row already there is skipped). ``--table`` prints the
median and worst share per family and size from the CSV without fitting.

``--exact-posterior`` checks the amortized guide instead: on our simulator's linear set
(draw 0, the first of ``--sizes``) it compares the guide's standard deviation of t with
that of the exact posterior of t given each cell's moments and its posterior-mean cell
state, on a grid of 401 times within 2 time units of the guide's mean, for every 40th
cell.

``--velocity`` asks the same of the velocity's direction on our simulator's three sets
(draws 0 to ``--draws - 1``, the first of ``--sizes``): per cell, the 90% quantile of
the angle between 50 posterior draws of the velocity vector (fitted genes) and their
mean, against the angle between that mean and the true velocity; and the same with the
90% quantile of the angles to the neighbours' velocities added in quadrature.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from pyro import poutine
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from robustness import appended_rows, dataset  # noqa: E402

import pyro_velo as pv  # noqa: E402
from pyro_velo.train import local_params  # noqa: E402

CONFIGS = {"ode": ("linear", "bifurcation2", "bifurcation3"), "scvelo": ("linear",)}
#: half-width of a central 90% interval of a normal error, in standard deviations
Z90 = 1.645
FIELDS = ["family", "config", "cells", "draw", "spearman", "median_time_std",
          "median_resolution", "median_error_affine", "median_error_smooth",
          "cover_std_affine", "cover_std_smooth", "cover_combined_affine",
          "cover_combined_smooth", "seconds"]


def residuals(t: np.ndarray, true_t: np.ndarray) -> dict[str, np.ndarray]:
    """The fitted time's residual from an affine and from a degree-5 polynomial map of
    the true time (least squares over all cells)."""
    return {"affine": t - np.polyval(np.polyfit(true_t, t, 1), true_t),
            "smooth": t - np.polyval(np.polyfit(true_t, t, 5), true_t)}


def calibration_row(adata) -> dict[str, float]:
    """The coverage columns of one exported fit."""
    t = adata.obs["pyro_velo_time"].to_numpy(dtype=float)
    true_t = adata.obs["true_t"].to_numpy(dtype=float)
    std = adata.obs["pyro_velo_time_std"].to_numpy(dtype=float)
    resolution = adata.obs["pyro_velo_time_resolution"].to_numpy(dtype=float)
    combined = np.hypot(std, resolution)
    row = {"spearman": float(spearmanr(t, true_t)[0]), "median_time_std": np.median(std),
           "median_resolution": np.median(resolution)}
    for name, error in residuals(t, true_t).items():
        row[f"median_error_{name}"] = float(np.median(np.abs(error)))
        row[f"cover_std_{name}"] = float(np.mean(np.abs(error) <= Z90 * std))
        row[f"cover_combined_{name}"] = float(np.mean(np.abs(error) <= Z90 * combined))
    return row


def exact_time_posterior(vae, cell: int, t_mean: float, c: torch.Tensor | None,
                         half_width: float = 2.0, points: int = 401) -> tuple[float, float]:
    """Mean and standard deviation of the model's posterior of t for one cell, its cell
    state held at ``c`` (None: the basic model), from the unnormalised log density on a
    grid around ``t_mean``."""
    grid = torch.linspace(t_mean - half_width, t_mean + half_width, points)
    idx = torch.full((points,), cell)
    args, kwargs = vae.data.model_inputs(idx, points)
    latent = {"t": grid} if c is None else {"t": grid, "c": c.expand(points, -1)}
    with torch.no_grad(), local_params():
        trace = poutine.trace(poutine.condition(vae.model, data=latent)).get_trace(
            *args, **kwargs)
    log_density = torch.zeros(points, dtype=torch.float64)
    for name in ("u", "s", "t"):
        site = trace.nodes[name]
        log_prob = site["fn"].log_prob(site["value"]).double()
        log_density += log_prob.sum(-1) if log_prob.dim() > 1 else log_prob
    weight = torch.softmax(log_density, 0)
    mean = (weight * grid.double()).sum()
    return float(mean), float((weight * (grid.double() - mean) ** 2).sum().sqrt())


def check_guide(cells: int) -> None:
    """Print the guide's and the exact posterior's standard deviation of t (see
    ``--exact-posterior``)."""
    adata, _ = dataset("ode", "linear", 0, cells, 100)
    pv.pp.preprocess(adata, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = pv.VeloVAE(adata, seed=0)
        vae.train(seed=0, progress_bar=False)
    vae.model.eval()
    encoded = vae.predictor.encode()
    guide_std, exact_std = [], []
    for cell in range(0, adata.n_obs, 40):
        c = encoded["c"][cell] if "c" in encoded else None
        _, std = exact_time_posterior(vae, cell, float(encoded["t"][cell]), c)
        guide_std.append(float(encoded["t_std"][cell]))
        exact_std.append(std)
    print(f"{len(exact_std)} cells: median standard deviation of t, guide "
          f"{np.median(guide_std):.3f}, exact posterior {np.median(exact_std):.3f}")


def angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees between the vectors of the last axis of ``a`` and ``b``."""
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    cosine = (a * b).sum(-1) / np.where(norms > 0, norms, 1.0)
    return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))


def check_velocity(draws: int, cells: int) -> None:
    """Print, per fit, how often the posterior's 90% angle holds the true velocity's
    direction (see ``--velocity``)."""
    for draw in range(draws):
        for config in CONFIGS["ode"]:
            adata, _ = dataset("ode", config, draw, cells, 100)
            pv.pp.preprocess(adata, random_state=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                vae = pv.VeloVAE(adata, seed=draw)
                vae.train(seed=draw, progress_bar=False)
                vae.export_to_anndata(adata)
            genes = adata.var["velocity_genes"].to_numpy()
            velocity = np.asarray(adata.layers["velocity"])[:, genes]
            truth = np.asarray(adata.layers["true_velocity"])[:, genes]
            samples = vae.sample_posterior(50, return_sites=["velocity"],
                                           progress_bar=False)["velocity"]
            mean = samples.mean(0)
            spread = np.quantile(angle(samples, mean[None]), 0.9, axis=0)
            error = angle(truth, mean)
            graph = (sp.csr_matrix(adata.obsp["connectivities"]) != 0).tocsr()
            neighbours = np.array([
                np.quantile(angle(velocity[graph.indices[graph.indptr[i]:graph.indptr[i + 1]]],
                                  velocity[i][None]), 0.9)
                if graph.indptr[i + 1] > graph.indptr[i] else 0.0
                for i in range(adata.n_obs)])
            print(f"ode/{config} draw {draw}: median angle to the true velocity "
                  f"{np.median(error):.1f} deg, posterior 90% angle {np.median(spread):.1f} "
                  f"deg (holds {np.mean(error <= spread):.0%}), with the neighbours' "
                  f"{np.median(neighbours):.1f} deg (holds "
                  f"{np.mean(error <= np.hypot(spread, neighbours)):.0%})", flush=True)


def run(args: argparse.Namespace) -> None:
    path = Path(args.csv)
    done = set()
    if path.exists():
        table = pd.read_csv(path)
        done = {(r.family, r.config, int(r.cells), int(r.draw)) for r in table.itertuples()}
    with appended_rows(path, FIELDS) as (writer, handle):
        for draw in range(args.draws):
            for cells in args.sizes:
                for family in args.families:
                    for config in CONFIGS[family]:
                        if (family, config, cells, draw) in done:
                            continue
                        adata, _ = dataset(family, config, draw, cells, 100)
                        pv.pp.preprocess(adata, random_state=0)
                        start = time.perf_counter()
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            vae = pv.VeloVAE(adata, seed=draw)
                            vae.train(seed=draw, progress_bar=False)
                            vae.export_to_anndata(adata)
                        row = {"family": family, "config": config, "cells": cells,
                               "draw": draw, **calibration_row(adata),
                               "seconds": time.perf_counter() - start}
                        print(f"{family}/{config} {cells} cells draw {draw}: 90% interval "
                              f"holds the true time of {row['cover_std_affine']:.0%} / "
                              f"{row['cover_combined_affine']:.0%} of cells (posterior / "
                              "with resolution, affine map)", file=sys.stderr, flush=True)
                        writer.writerow(row)
                        handle.flush()


def summary(path: Path) -> str:
    """Markdown table: median (worst) share per family and size."""
    table = pd.read_csv(path)
    columns = ["cover_std_affine", "cover_combined_affine", "cover_std_smooth",
               "cover_combined_smooth"]
    lines = ["| family | cells | fits | median time_std | median resolution | median "
             "error (affine) | posterior, affine | with resolution, affine | posterior, "
             "smooth | with resolution, smooth |", "|" + "---|" * 10]
    for (family, cells), rows in table.groupby(["family", "cells"], sort=False):
        cover = " | ".join(f"{rows[c].median():.0%} ({rows[c].min():.0%})" for c in columns)
        lines.append(f"| {family} | {cells} | {len(rows)} | {rows.median_time_std.median():.3f}"
                     f" | {rows.median_resolution.median():.3f} | "
                     f"{rows.median_error_affine.median():.3f} | {cover} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--sizes", type=int, nargs="+", default=[800, 100])
    parser.add_argument("--csv", default=str(Path(__file__).with_name("time_calibration.csv")))
    parser.add_argument("--table", action="store_true", help="print the table, fit nothing")
    parser.add_argument("--exact-posterior", action="store_true",
                        help="compare the guide with the exact posterior of t instead")
    parser.add_argument("--velocity", action="store_true",
                        help="check the velocity's posterior angle instead")
    args = parser.parse_args(argv)
    if args.exact_posterior:
        check_guide(args.sizes[0])
        return
    if args.velocity:
        check_velocity(args.draws, args.sizes[0])
        return
    if not args.table:
        run(args)
    print(summary(Path(args.csv)))


if __name__ == "__main__":
    main()
