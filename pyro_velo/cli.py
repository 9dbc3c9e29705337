"""Command line interface: ``pyro-velo demo`` and ``pyro-velo fit IN.h5ad -o OUT.h5ad``.

Exit codes: 0 success; 2 bad arguments or paths (an input path that does not exist or is
a folder, an existing output without ``--overwrite``, a missing output folder, invalid
option values); 3 an input file that cannot be read as h5ad or does not hold valid data
(missing layers, NaN, negative counts, too few cells...); 1 a failure during fitting
(e.g. divergence). Errors are one line on stderr, ``pyro-velo: error: ...``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FIT_FAILED, EXIT_USAGE, EXIT_BAD_INPUT = 0, 1, 2, 3


class CLIError(Exception):
    """An error reported to the user as one line, with an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _threads(text: str) -> int | str:
    """argparse type of ``--threads``: ``'auto'`` or an integer >= 1."""
    return "auto" if text == "auto" else _positive_int(text)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-velo`` argument parser (subcommands ``demo`` and ``fit``)."""
    parser = argparse.ArgumentParser(
        prog="pyro-velo",
        description="RNA velocity, latent time and cell state with VeloVAE in Pyro.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add_fit_options(p: argparse.ArgumentParser, batch_size: int = 128) -> None:
        p.add_argument("--model", default="full", choices=["basic", "full"],
                       help="'full': mixture of ODEs with a cell state per cell (default); "
                            "'basic': fixed rates per gene (faster)")
        p.add_argument("--rate-history", default="constant", choices=["constant", "ancestors"],
                       help="full model: 'constant' (the paper's one rate per cell, default) "
                            "or 'ancestors' (each cell's past rates from its ancestors)")
        p.add_argument("--max-epochs", type=_positive_int, default=None,
                       help="upper bound on training epochs (default: scales with cells)")
        p.add_argument("--batch-size", type=_positive_int, default=batch_size)
        p.add_argument("--seed", type=int, default=0, help="seed for a reproducible run")
        p.add_argument("--n-starts", type=_positive_int, default=1,
                       help="train from this many random starts and keep the one with "
                            "the best validation ELBO, one whose time runs against the "
                            "data's flow only if all do, and starts whose order the "
                            "flow corroborates before the others (costs that many "
                            "trainings)")
        p.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--threads", type=_threads, default=None,
                       help="CPU threads for training: a number, or 'auto' to follow the "
                            "machine's load (not bitwise reproducible); default: one "
                            "below 1,000 genes, else torch's setting (OMP_NUM_THREADS or "
                            "one per core)")
        p.add_argument("--compile", default="auto", choices=["auto", "yes", "no"],
                       help="torch.compile the ODE solution of training steps: 'auto' "
                            "(default) on CPU for large data, where the saved time exceeds "
                            "the ~10 s of compiling")
        p.add_argument("--bf16", default="auto", choices=["auto", "yes", "no"],
                       help="bfloat16 products in the networks' gene-wide layers while "
                            "training: 'auto' (default) with --compile's rule, on CPUs "
                            "that multiply bfloat16 natively")
        p.add_argument("--lr-schedule", action="store_true",
                       help="faster training: a one-cycle learning-rate schedule in every "
                            "stage and 0.4 of the default epochs (less accurate and "
                            "less robust: for quick exploration)")

    demo = sub.add_parser("demo", help="simulate data, fit, export and plot a summary")
    demo.add_argument("-o", "--out", default="pyro_velo_demo", help="output folder")
    demo.add_argument("--n-cells", type=_positive_int, default=1000)
    demo.add_argument("--n-genes", type=_positive_int, default=200)
    demo.add_argument("--topology", default="bifurcation", choices=["linear", "bifurcation"])
    # the demo trades the paper's batch of 128 for speed: it must finish in ~2 minutes
    add_fit_options(demo, batch_size=256)
    demo.set_defaults(max_epochs=200)

    fit = sub.add_parser("fit", help="preprocess and fit a user's h5ad file")
    fit.add_argument("input", help="input .h5ad with raw spliced/unspliced count layers")
    fit.add_argument("-o", "--output", required=True, help="output .h5ad path")
    fit.add_argument("--spliced-layer", default="spliced")
    fit.add_argument("--unspliced-layer", default="unspliced")
    fit.add_argument("--skip-preprocess", action="store_true",
                     help="input is already preprocessed (has layers Mu and Ms)")
    fit.add_argument("--n-top-genes", type=_positive_int, default=2000)
    fit.add_argument("--n-neighbors", type=_positive_int, default=None,
                     help="default: 30, or a fifth of the cells on fewer than 150")
    fit.add_argument("--n-pcs", type=_positive_int, default=30)
    fit.add_argument("--min-shared-counts", type=int, default=20)
    fit.add_argument("--save-model", default=None, help="folder to save the fitted model in")
    fit.add_argument("--figure", default=None, help="also write a summary figure (.png/.pdf)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_fit_options(fit)
    return parser


#: the values of the --compile and --bf16 options
_SWITCH = {"auto": None, "yes": True, "no": False}


def _fit(adata, args):
    from .velovae import VeloVAE

    vae = VeloVAE(adata, model=args.model, rate_history=args.rate_history, seed=args.seed)
    vae.train(max_epochs=args.max_epochs, batch_size=args.batch_size, seed=args.seed,
              device=args.device, progress_bar=not args.quiet, num_threads=args.threads,
              compile=_SWITCH[args.compile], bf16=_SWITCH[args.bf16],
              n_starts=args.n_starts, lr_schedule=args.lr_schedule)
    vae.export_to_anndata(adata)
    return vae


def run_demo(args) -> None:
    from scipy.stats import spearmanr

    from . import datasets, pl, pp

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    adata = datasets.simulate(n_cells=args.n_cells, n_genes=args.n_genes,
                              topology=args.topology, seed=args.seed)
    pp.preprocess(adata, n_top_genes=2000, random_state=args.seed)
    vae = _fit(adata, args)
    rho = spearmanr(adata.obs["latent_time"], adata.obs["true_t"])[0]
    h5ad = out / "demo.h5ad"
    adata.write_h5ad(h5ad)
    figure = out / "summary.png"
    pl.summary(adata, vae.history, true_time_key="true_t", save=figure, show=False)
    elapsed = time.perf_counter() - start
    print(f"cells x genes fitted      : {adata.n_obs} x {int(adata.var['velocity_genes'].sum())}")
    print(f"latent time vs true_t     : Spearman {rho:.3f}")
    metrics = vae.evaluate()
    print(f"MSE train / test          : {metrics.loc['train', 'mse']:.4f} / "
          f"{metrics.loc['test', 'mse']:.4f}")
    print(f"epochs, wall time         : {len(vae.history.train)}, {elapsed:.0f} s")
    print(f"wrote {h5ad} and {figure}")


def run_fit(args) -> None:
    import anndata as ad

    from . import pl, pp
    from ._checks import InputError

    src, dst = Path(args.input), Path(args.output)
    if src.is_dir():
        raise CLIError(f"input {src} is a folder, not an .h5ad file", EXIT_USAGE)
    if not src.is_file():
        raise CLIError(f"input file not found: {src}", EXIT_USAGE)
    if dst.is_dir():
        raise CLIError(f"output {dst} is a folder; give a file name, e.g. {dst / 'out.h5ad'}",
                       EXIT_USAGE)
    if dst.exists() and not args.overwrite:
        raise CLIError(f"output {dst} exists; pass --overwrite to replace it", EXIT_USAGE)
    if not dst.parent.exists():
        raise CLIError(f"output folder does not exist: {dst.parent}", EXIT_USAGE)
    if args.save_model:
        model_dir = Path(args.save_model)
        if model_dir.exists() and not model_dir.is_dir():
            raise CLIError(f"--save-model {model_dir} exists and is not a folder", EXIT_USAGE)
        if model_dir.is_dir() and any(model_dir.iterdir()) and not args.overwrite:
            raise CLIError(f"--save-model folder {model_dir} is not empty; pass --overwrite "
                           "to replace the model in it", EXIT_USAGE)
    try:
        adata = ad.read_h5ad(src)
    except Exception as err:  # h5py/anndata raise many types for a bad file
        raise CLIError(f"cannot read {src} as h5ad: {err}", EXIT_BAD_INPUT) from err
    try:
        if not args.skip_preprocess:
            pp.preprocess(adata, n_top_genes=args.n_top_genes, n_neighbors=args.n_neighbors,
                          n_pcs=args.n_pcs, min_shared_counts=args.min_shared_counts,
                          spliced_layer=args.spliced_layer,
                          unspliced_layer=args.unspliced_layer, random_state=args.seed)
        vae = _fit(adata, args)
    except InputError as err:
        raise CLIError(f"invalid input in {src}: {err}", EXIT_BAD_INPUT) from err
    adata.write_h5ad(dst)
    if args.save_model:
        vae.save(args.save_model, overwrite=args.overwrite)
    if args.figure:
        pl.summary(adata, vae.history, save=args.figure, show=False)
    print(f"fitted {int(adata.var['velocity_genes'].sum())} genes in {adata.n_obs} cells; "
          f"test MSE {vae.mse('test'):.4f}; wrote {dst}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pyro-velo`` console script; returns the exit code."""
    from ._checks import InputError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            run_demo(args)
        else:
            run_fit(args)
    except CLIError as err:
        print(f"pyro-velo: error: {err}", file=sys.stderr)
        return err.code
    except InputError as err:  # an invalid option value found past argparse
        print(f"pyro-velo: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as err:
        print(f"pyro-velo: error: {err}", file=sys.stderr)
        return EXIT_FIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
