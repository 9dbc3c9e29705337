"""A fit beside a competing CPU-bound process, against the same fit on an idle machine.

Usage::

    python benchmarks/contention.py [--cells 1000] [--genes 200] [--epochs 60]
        [--threads default auto 2] [--repeats 1]

Data: ``pv.datasets.simulate(cells, genes, topology='bifurcation', seed=0)``,
preprocessed once. Fit: ``VeloVAE(adata, seed=0).train(seed=0, max_epochs=epochs)``
with ``num_threads`` as given (``default``: ``None``, a count fixed by the data's size:
one thread below 1,000 genes; ``auto``: the count follows the machine's load; a number
fixes the count, ``2`` is torch's own count on two cores; see
:mod:`pyro_velo.inference.threads`). Each setting is timed on the idle machine and then
beside one competing process (a single-threaded Python busy loop, started before the
fit and stopped after it). Prints a markdown table of both times and their ratio; the
target is at most 2x for the default.

The machine must otherwise be idle: the load average is printed before each fit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings

import pyro_velo as pv

BUSY_LOOP = "while True:\n    pass\n"


def fit_seconds(adata, epochs: int, threads: int | str | None) -> float:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = pv.VeloVAE(adata.copy(), seed=0)
        vae.train(seed=0, max_epochs=epochs, progress_bar=False, num_threads=threads)
    return time.perf_counter() - start


def beside_competitor(adata, epochs: int, threads: int | str | None) -> float:
    """Seconds of one fit while a busy single-threaded process runs."""
    competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(1.0)  # let it take its core
        return fit_seconds(adata, epochs, threads)
    finally:
        competitor.kill()
        competitor.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--threads", nargs="+", default=["default", "auto", "2"])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    adata = pv.datasets.simulate(args.cells, args.genes, topology="bifurcation", seed=0)
    pv.pp.preprocess(adata, random_state=0)
    fit_seconds(adata, 2, None)  # imports and first-call costs, untimed
    lines = ["| num_threads | idle s | beside one busy process s | ratio |",
             "|---|---|---|---|"]
    for setting in args.threads:
        threads = (None if setting == "default" else setting if setting == "auto"
                   else int(setting))
        idle, busy = [], []
        for _ in range(args.repeats):
            print(f"load {os.getloadavg()[0]:.2f}: {setting} idle", file=sys.stderr)
            idle.append(fit_seconds(adata, args.epochs, threads))
            print(f"load {os.getloadavg()[0]:.2f}: {setting} beside a busy process",
                  file=sys.stderr)
            busy.append(beside_competitor(adata, args.epochs, threads))
        idle_s, busy_s = min(idle), min(busy)
        lines.append(f"| {setting} | {idle_s:.1f} | {busy_s:.1f} | {busy_s / idle_s:.1f}x |")
        print(lines[-1], file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
