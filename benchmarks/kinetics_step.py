"""Time one training step's kinetics: ``model.kinetic`` forward and backward.

Usage: python benchmarks/kinetics_step.py [--cells 128] [--genes 2000] [--threads 1]
           [--steps 20] [--rate-history constant ancestors] [--compile no yes]

A ``VeloVAE`` is built on ``simulate(600, genes)`` (bifurcation, seed 0; only the
model's shapes and initial rates matter), then for each rate history and compile setting
the model's ``kinetic`` at random times and cell states of a ``--cells`` minibatch is run
forward and backward (gradients of ``u + s + ds`` summed): the first step (compiling,
when on) and the mean of ``--steps`` more after three warm-up steps. For the ancestral
model the table of ancestors is first filled with 30 random minibatches, so every bin
has prototypes. The rest of a training step (encoder, decoder, likelihood, Pyro) is not
included. Results: ``benchmarks/RESULTS.md``, "Kinetics step".
"""

from __future__ import annotations

import argparse
import time

import torch

import pyro_velo as pv


def time_kinetic(vae: pv.VeloVAE, n_cells: int, compile_kinetics: bool,
                 steps: int) -> tuple[float, float]:
    """Seconds of the first step and milliseconds per later step."""
    model = vae.model
    model.train()
    model.compile_kinetics = compile_kinetics
    gen = torch.Generator().manual_seed(0)
    if hasattr(model, "ancestors"):
        for _ in range(30):
            t = torch.rand(n_cells, generator=gen) * model.t_max
            c = torch.randn(n_cells, model.latent_dim, generator=gen)
            model.ancestors.update(t, c, torch.rand(n_cells, model.n_genes, generator=gen))
    t = (torch.rand(n_cells, generator=gen) * model.t_max).requires_grad_()
    c = torch.randn(n_cells, model.latent_dim, generator=gen, requires_grad=True)

    def step() -> None:
        out = model.kinetic(t, c)
        (out["u"].sum() + out["s"].sum() + out["ds"].sum()).backward()

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return first, (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=128)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rate-history", nargs="+", default=["constant", "ancestors"],
                        choices=["constant", "ancestors"])
    parser.add_argument("--compile", nargs="+", default=["no", "yes"], choices=["no", "yes"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adata = pv.datasets.simulate(n_cells=600, n_genes=args.genes, seed=0)
    pv.pp.preprocess(adata, random_state=0, n_top_genes=args.genes)
    print(f"{args.cells} cells x {adata.n_vars} genes, {args.threads} thread(s)")
    print("| rate history | compiled | first step (s) | ms per step |")
    print("|---|---|---|---|")
    for history in args.rate_history:
        for compiled in args.compile:
            vae = pv.VeloVAE(adata, rate_history=history, seed=0)
            first, per_step = time_kinetic(vae, args.cells, compiled == "yes", args.steps)
            print(f"| {history} | {compiled} | {first:.1f} | {per_step:.1f} |", flush=True)


if __name__ == "__main__":
    main()
