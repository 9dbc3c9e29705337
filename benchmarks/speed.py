"""Wall time of the default workflow against scVelo's dynamical model, with accuracy.

Usage::

    python benchmarks/speed.py [--sets small medium pancreas grn] [--device cpu]
        [--methods pyro_velo scvelo-dynamical pyro_velo-lrschedule pyro_velo-50epochs
                   pyro_velo-settled]
        [--csv benchmarks/speed.csv] [--again] [--table]

Data sets (simulated, seed 0; the raw counts are made before the clock starts):

- ``small``: ``pv.datasets.simulate(1000, 200, topology='bifurcation')``;
- ``medium``: ``pv.datasets.simulate(2000, 300, topology='bifurcation')``;
- ``pancreas``: ``pv.datasets.simulate(3700, 2000)`` (the pancreas set's size);
- ``grn``: ``pv.datasets.simulate_grn(2000, 200, 'fork', capture_noise=True)`` (a
  regulatory network, not an ODE of the model's form; target: the type depth).

Methods, one after another in this process, each timed from the raw counts to the
exported time and velocity, preprocessing included (``pv.pp.preprocess(adata,
random_state=0)``, the same for both):

- ``pyro_velo``: ``VeloVAE(adata, seed=0).train(seed=0, device=...)`` and
  ``export_to_anndata``, all defaults (on the CPU one thread below 1,000 genes, else
  torch's count: :func:`pyro_velo.inference.threads.training_threads`);
- ``scvelo-dynamical``: ``recover_dynamics`` + ``velocity(mode='dynamical')`` +
  ``latent_time``, scVelo's defaults (``n_jobs=1``);
- ``pyro_velo-lrschedule`` (only when named in ``--methods``): as ``pyro_velo`` with
  ``train(lr_schedule=True)``;
- ``pyro_velo-50epochs`` (only when named): as ``pyro_velo`` with
  ``train(max_epochs=50)`` (constant rates, 50 epochs per stage whatever the size: the
  way to scVelo's speed on small sets, at a cost in accuracy);
- ``pyro_velo-settled`` (only when named): as ``pyro_velo`` with the settling stop of
  the mixture of ODEs turned on (``policies.SettlingPolicy(min_cosine=0.99)``).

The methods first run once on a 300-cell set, untimed, so that imports and
just-in-time compilation are not charged to the first data set (as in a notebook that
has run anything before). Accuracy: Spearman of the time with the true time (the type
depth for ``grn``) and the mean cosine of the velocity with the true velocity.

Rows go to ``--csv`` (appended; a set and method already there is skipped unless
``--again``), with the machine's load average before each fit. ``--table`` prints the
ratio table from the CSV without fitting.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import mean_cosine, patch_scvelo_numpy2  # noqa: E402
from variants import VARIANTS  # noqa: E402

import pyro_velo as pv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETS = {
    "small": (lambda: pv.datasets.simulate(1000, 200, topology="bifurcation", seed=0),
              "true_t"),
    "medium": (lambda: pv.datasets.simulate(2000, 300, topology="bifurcation", seed=0),
               "true_t"),
    "pancreas": (lambda: pv.datasets.simulate(3700, 2000, seed=0), "true_t"),
    "grn": (lambda: pv.datasets.simulate_grn(2000, 200, "fork", capture_noise=True, seed=0),
            "type_depth"),
}
METHODS = ("pyro_velo", "scvelo-dynamical")
#: further methods, run only when named in ``--methods``
EXTRA_METHODS = ("pyro_velo-lrschedule", "pyro_velo-50epochs", "pyro_velo-settled")
FIELDS = ["set", "method", "device", "cells", "genes", "seconds", "preprocess_seconds",
          "spearman", "velocity_cosine", "epochs", "load_before", "machine", "error"]


def log(message: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_method(method: str, adata, device: str) -> tuple[str, int | None]:
    """Fit ``method`` on preprocessed ``adata`` in place; its time key and epochs."""
    if method.startswith("pyro_velo"):
        vae = pv.VeloVAE(adata, seed=0)
        history = VARIANTS[method].train(vae, seed=0, device=device, progress_bar=False)
        vae.export_to_anndata(adata)
        return "latent_time", len(history.train)
    import scvelo as scv

    scv.settings.verbosity = 0
    scv.tl.recover_dynamics(adata, show_progress_bar=False)
    scv.tl.velocity(adata, mode="dynamical")
    scv.tl.latent_time(adata)
    return "latent_time", None


def timed(method: str, raw, target: str, device: str) -> dict:
    """One timed run of ``method`` on a copy of the raw data, with its accuracy."""
    adata = raw.copy()
    gc.collect()
    row = {"method": method, "device": device, "cells": adata.n_obs, "genes": adata.n_vars,
           "load_before": round(os.getloadavg()[0], 2)}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pv.pp.preprocess(adata, random_state=0)
            row["preprocess_seconds"] = time.perf_counter() - start
            time_key, row["epochs"] = run_method(method, adata, device)
        row["seconds"] = time.perf_counter() - start
        t = adata.obs[time_key].to_numpy(dtype=float)
        y = adata.obs[target].to_numpy(dtype=float)
        row["spearman"] = float(spearmanr(t, y)[0])
        if "true_velocity" in adata.layers:
            row["velocity_cosine"] = mean_cosine(
                np.asarray(adata.layers["velocity"], dtype=float),
                np.asarray(adata.layers["true_velocity"], dtype=float))
    except Exception as error:  # a failed method is a result too
        row["seconds"] = time.perf_counter() - start
        row["error"] = f"{type(error).__name__}: {error}"[:200]
    return row


def warm_up(device: str, methods: list[str]) -> None:
    """Run the methods once on a small set, untimed (imports and JIT compilation)."""
    raw = pv.datasets.simulate(300, 50, seed=1)
    for method in methods:
        timed(method, raw, "true_t", device)


def done_rows(path: Path) -> set[tuple[str, str, str]]:
    if not path.exists():
        return set()
    table = pd.read_csv(path)
    return {(r.set, r.method, r.device) for r in table.itertuples()}


def run(args) -> None:
    path = Path(args.csv)
    done = set() if args.again else done_rows(path)
    todo = [(name, method) for name in args.sets for method in args.methods
            if (name, method, args.device) not in done]
    if not todo:
        return
    patch_scvelo_numpy2()
    warm_up(args.device, args.methods)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if args.device != "cpu":
        import torch

        machine += f", {torch.cuda.get_device_name()}"
    new_file = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS, lineterminator="\n")
        if new_file:
            writer.writeheader()
        for name in args.sets:
            make, target = SETS[name]
            raw = make()
            for method in args.methods:
                if (name, method) not in todo:
                    continue
                row = {"set": name, "machine": machine, **timed(method, raw, target,
                                                                args.device)}
                log(f"{name} {method}: {row['seconds']:.1f}s "
                    f"rho={row.get('spearman', np.nan):.3f} "
                    f"cos={row.get('velocity_cosine', np.nan):.3f} {row.get('error', '')}")
                writer.writerow(row)
                handle.flush()


def number(value: float) -> str:
    return "-" if pd.isna(value) else f"{value:.3f}"


def summary(path: Path) -> str:
    """Markdown table: per set and pyro_velo method, seconds and accuracy against
    scVelo's dynamical model and the ratio (the latest row of each set, method and
    device)."""
    table = pd.read_csv(path).drop_duplicates(["set", "method", "device"], keep="last")
    lines = ["| set | cells x genes | device | training | pyro_velo s | scVelo dyn. s "
             "| ratio | Spearman pv / dyn | cosine pv / dyn |", "|" + "---|" * 9]
    ours = table[table.method.str.startswith("pyro_velo")]
    ours = ours.sort_values(["set", "method"], key=lambda column: column.map(
        {name: k for k, name in enumerate([*SETS, *METHODS, *EXTRA_METHODS])}))
    for row in ours.itertuples():
        training = VARIANTS[row.method].label
        scvelo = table[(table.set == row.set) & (table.method == "scvelo-dynamical")]
        other = scvelo.iloc[-1] if len(scvelo) else None
        ratio = f"{row.seconds / other.seconds:.2f}x" if other is not None else "-"
        pairs = [number(getattr(row, key)) + " / "
                 + number(other[key] if other is not None else np.nan)
                 for key in ("spearman", "velocity_cosine")]
        lines.append(f"| {row.set} | {row.cells} x {row.genes} | {row.device} | "
                     f"{training} | {row.seconds:.1f} | "
                     + (f"{other.seconds:.1f}" if other is not None else "-")
                     + f" | {ratio} | {pairs[0]} | {pairs[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        choices=[*METHODS, *EXTRA_METHODS])
    parser.add_argument("--csv", default=str(REPO / "benchmarks" / "speed.csv"))
    parser.add_argument("--again", action="store_true",
                        help="fit sets that the CSV already holds once more")
    parser.add_argument("--table", action="store_true", help="only print the table")
    args = parser.parse_args(argv)
    if not args.table:
        run(args)
    print(summary(Path(args.csv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
