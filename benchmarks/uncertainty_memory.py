"""Memory of ``get_uncertainty`` against a single posterior-mean pass.

The target: ``get_uncertainty(100)`` on 50k cells x 500 genes stays within 2x of the
memory of one posterior-mean pass. Both are measured on the
same fitted model (saved once, loaded in a fresh process for each call, so that memory
freed by one call cannot hide the other's), as the peak resident memory *above* the
resident memory just before the call (``compare.PeakMemory``: the kernel's peak, reset
before the call where Linux allows it): the data and the model, which both calls share,
are not counted:

- posterior-mean pass: ``get_velocity()`` (encode every cell at its posterior mean,
  evaluate the ODE, return ds/dt and du/dt as dense cells x genes arrays);
- ``get_uncertainty(n_samples)``: draws per minibatch of cells, summarised online.

The fit itself is short (``--epochs``, default 2): memory does not depend on how well the
model fits. Usage::

    python benchmarks/uncertainty_memory.py [--cells 50000 --genes 500 --samples 100]

Prints one line per measurement and a Markdown table row for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata
from compare import PeakMemory  # this folder is on sys.path when run as a script

import pyro_velo as pv


def measure(folder: Path, which: str, samples: int) -> float:
    """In a fresh process: load the fitted model, run one call, print its peak."""
    adata = anndata.read_h5ad(folder / "data.h5ad")
    vae = pv.VeloVAE.load(folder / "model", adata)
    del adata
    call = (vae.get_velocity if which == "mean"
            else lambda: vae.get_uncertainty(n_samples=samples, progress_bar=False))
    start = time.perf_counter()
    peak = PeakMemory()
    peak.start()
    call()
    above = peak.stop()
    print(f"{which}: +{above:.1f} MiB above {peak.before / 1024:.0f} MiB, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return above


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=50_000)
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--model", default="full", choices=["full", "basic"])
    parser.add_argument("--child", choices=["mean", "uncertainty"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        measure(args.folder, args.child, args.samples)
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        adata = pv.datasets.simulate(n_cells=args.cells, n_genes=args.genes, seed=0)
        pv.pp.preprocess(adata, random_state=0)
        vae = pv.VeloVAE(adata, model=args.model, seed=0)
        vae.train(max_epochs=args.epochs, warmup_epochs=1, refine_epochs=0,
                  progress_bar=False)
        vae.save(folder / "model")
        adata.write_h5ad(folder / "data.h5ad")
        del adata, vae
        print(f"data + fit: {time.perf_counter() - start:.0f} s", flush=True)
        results = {}
        for which in ("mean", "uncertainty"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", which, "--folder", str(folder),
                 "--samples", str(args.samples)],
                check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            print(out, flush=True)
            results[which] = float(out.split("+")[1].split(" MiB")[0])
    ratio = results["uncertainty"] / results["mean"]
    print(f"| {args.cells} x {args.genes}, {args.model} | {results['mean']:.0f} MiB | "
          f"{results['uncertainty']:.0f} MiB | {ratio:.2f} |")


if __name__ == "__main__":
    main()
