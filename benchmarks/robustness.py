"""Direction and order of time across data families: pyro_velo against scVelo, over draws.

Usage::

    python benchmarks/robustness.py [--families ode scvelo grn small real]
        [--draws 6] [--n-cells 800] [--n-genes 100] [--n-neighbors K]
        [--methods pyro_velo scvelo-stochastic ...]
        [--csv benchmarks/robustness.csv] [--table]

Families and configurations (each drawn ``--draws`` times, draw ``d`` = data seed ``d``):

- ``ode``: ``pv.datasets.simulate`` (the model's own ODE family): ``linear``,
  ``bifurcation2``, ``bifurcation3``. Target: ``obs['true_t']``.
- ``scvelo``: ``pv.datasets.simulate_scvelo`` (scVelo's simulator). Target: true time.
- ``grn``: ``pv.datasets.simulate_grn`` (a stochastic regulatory network, not an ODE of
  the model's form): ``chain``, ``fork``, ``tree``, each with (``+capture``) and without
  binomial capture noise. Target: the depth of each cell's type in the type graph
  (cells of one type sit near one steady state, so their order within a type is noise);
  the Spearman with ``true_t`` is reported too.
- ``small``: 100-cell sets (:data:`SMALL_CELLS`, ``--n-genes`` genes) of the three
  simulators, where a kNN neighbourhood holds a large share of the cells:
  ``ode-bifurcation2``, ``scvelo-linear``, ``grn-chain``, ``grn-fork+capture``; targets as in
  their families.
- ``real``: the 50-cell fixtures of ``../shared/data`` (pancreas, dentate gyrus), one
  data set each, ``--draws`` model seeds. Target: the stage of each cell read from
  known markers (:data:`MARKER_STAGES`; cells with fewer than
  :data:`MIN_MARKER_COUNTS` molecules of their stage's markers are left out).

Methods, each on its own copy of the once-preprocessed data
(``pv.pp.preprocess(adata, random_state=0)``, with ``n_neighbors`` where
``--n-neighbors`` is given), in this process, one after another:

- ``pyro_velo``: the default workflow, ``VeloVAE(adata, seed=d).train(seed=d)``,
  ``export_to_anndata``; time ``obs['latent_time']``.
- ``scvelo-stochastic``: ``scv.tl.velocity(mode='stochastic')``, ``velocity_graph``,
  ``velocity_pseudotime``; time ``obs['velocity_pseudotime']``.
- ``scvelo-dynamical``: ``recover_dynamics``, ``velocity(mode='dynamical')``,
  ``latent_time``.
- ``pyro_velo-3starts`` (only when named): as ``pyro_velo`` with ``train(n_starts=3)``.
- ``pyro_velo-lrschedule`` (only when named): as ``pyro_velo`` with
  ``train(lr_schedule=True)`` (the faster one-cycle schedule).
- ``pyro_velo-50epochs`` (only when named): as ``pyro_velo`` with
  ``train(max_epochs=50)`` (50 epochs per stage whatever the size).
- ``pyro_velo-settled`` (only when named): as ``pyro_velo`` with the settling stop of
  the mixture of ODEs turned on (``policies.SettlingPolicy(min_cosine=0.99)``).

Each finished row is appended to ``--csv`` at once and skipped when the command is run
again, so an interrupted run resumes. ``--table`` prints the per-family summary
(median and worst Spearman, share of reversed fits, median velocity cosine, median
seconds; for pyro_velo the share of fits its diagnostic flags, ``direction()`` not
``forward`` or the order not corroborated by the data's flow, and the worst Spearman
among the fits it does not flag) from the CSV without fitting anything.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import anndata
import numpy as np
import pandas as pd
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import mean_cosine, patch_scvelo_numpy2  # noqa: E402
from variants import VARIANTS  # noqa: E402

import pyro_velo as pv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CONFIGS = {
    "ode": ["linear", "bifurcation2", "bifurcation3"],
    "scvelo": ["linear"],
    "grn": ["chain", "fork", "tree", "chain+capture", "fork+capture", "tree+capture"],
    "small": ["ode-bifurcation2", "scvelo-linear", "grn-chain", "grn-fork+capture"],
    "real": ["pancreas", "dentategyrus"],
}
#: cells of the ``small`` family's sets
SMALL_CELLS = 100
METHODS = ("pyro_velo", "scvelo-stochastic", "scvelo-dynamical")
#: further methods, run only when named in ``--methods``: the other training variants
EXTRA_METHODS = tuple(name for name in VARIANTS if name not in METHODS)
#: Marker genes of the stages of each real fixture, earliest first: pancreas, ductal ->
#: Ngn3+ progenitors -> Fev+ pre-endocrine -> hormone-producing; dentate gyrus, the
#: granule lineage, neuroblast -> mature granule cell. A cell takes the stage whose
#: markers it expresses most (standardised log expression); cells with fewer than
#: :data:`MIN_MARKER_COUNTS` molecules of that stage's markers are left out, and in the
#: dentate gyrus so are cells whose glial markers dominate.
MARKER_STAGES = {
    "pancreas": [["Sox9", "Hes1", "Krt19", "Spp1"], ["Neurog3"], ["Fev", "Pax4"],
                 ["Ins1", "Ins2", "Gcg", "Sst", "Ghrl"]],
    "dentategyrus": [["Igfbpl1", "Sox4", "Sox11", "Dcx", "Neurod1", "Eomes"],
                     ["Calb1", "C1ql2", "Plk5"]],
}
GLIAL_MARKERS = ["Aldoc", "Apoe", "Gfap", "Mbp", "Plp1", "Olig2", "Pdgfra"]
#: Fewest spliced molecules of its stage's markers that stage a cell. One molecule is no
#: evidence of a stage: with one, 9 of the 36 staged dentate gyrus cells were staged by
#: a single count (3 neuroblasts by one Sox4 or Dcx molecule, 6 mature cells by one
#: Calb1, C1ql2 or Plk5 molecule). Those 9 calls decided the scores there: every method
#: separates the other 27 cells' two stages all but perfectly (Spearman 0.78-0.79; 0.79
#: is a perfect separation). No pancreas cell is staged by a single molecule.
MIN_MARKER_COUNTS = 2
FIELDS = ["family", "config", "draw", "method", "spearman", "spearman_true_t",
          "velocity_cosine", "seconds", "direction", "flow_agreement", "warm_start",
          "time_held", "basic_agreement", "full_agreement", "error",
          "flow_reproducibility", "order_corroborated"]


def log(message: str) -> None:
    print(f"[robustness {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def marker_stage(adata, name: str) -> np.ndarray:
    """Each cell's stage from :data:`MARKER_STAGES` (NaN where no stage can be read)."""
    counts = adata.layers["spliced"]
    total = np.asarray(counts.sum(1)).ravel()

    def molecules(genes: list[str]) -> np.ndarray:
        present = [g for g in genes if g in adata.var_names]
        return np.asarray(counts[:, [adata.var_names.get_loc(g) for g in present]].todense(),
                          dtype=float)

    def score(x: np.ndarray) -> np.ndarray:
        x = np.log1p(x / total[:, None] * 1e4)
        scale = x.std(0)
        return np.where(x.sum(1) > 0, (x / np.where(scale > 0, scale, 1)).mean(1), -np.inf)

    markers = [molecules(genes) for genes in MARKER_STAGES[name]]
    scores = np.stack([score(x) for x in markers], axis=1)
    stage = np.argmax(scores, axis=1)
    evidence = np.stack([x.sum(1) for x in markers], axis=1)
    enough = evidence[np.arange(len(stage)), stage] >= MIN_MARKER_COUNTS
    stage = np.where(enough & np.isfinite(scores.max(1)), stage, np.nan)
    if name == "dentategyrus":
        stage[score(molecules(GLIAL_MARKERS)) > scores.max(1)] = np.nan
    return stage


def dataset(family: str, config: str, draw: int, n_cells: int, n_genes: int):
    """The raw data set and its target (per-cell depth or time) for one row."""
    if family == "small":  # a simulator's set at SMALL_CELLS cells
        family, _, config = config.partition("-")
        n_cells = SMALL_CELLS
    if family == "ode":
        kwargs = ({"topology": "linear"} if config == "linear" else
                  {"topology": "bifurcation", "n_branches": int(config[-1])})
        adata = pv.datasets.simulate(n_cells, n_genes, seed=draw, **kwargs)
        return adata, "true_t"
    if family == "scvelo":
        return pv.datasets.simulate_scvelo(n_cells, n_genes, seed=draw), "true_t"
    if family == "grn":
        topology, _, capture = config.partition("+")
        adata = pv.datasets.simulate_grn(n_cells, n_genes, topology,
                                         capture_noise=bool(capture), seed=draw)
        return adata, "type_depth"
    adata = anndata.read_h5ad(SHARED_DATA / f"{config}_50obs.h5ad")
    adata.obs["marker_stage"] = marker_stage(adata, config)
    return adata, "marker_stage"


def run_method(method: str, adata, draw: int) -> tuple[str, dict]:
    """Fit ``method`` on ``adata`` in place; its time key and extra fields."""
    import scvelo as scv

    extra = {}
    if method.startswith("pyro_velo"):
        vae = pv.VeloVAE(adata, seed=draw)
        VARIANTS[method].train(vae, seed=draw, progress_bar=False)
        vae.export_to_anndata(adata)
        report = vae.direction()
        extra.update(direction=report["status"], flow_agreement=report["flow_agreement"],
                     flow_reproducibility=report["flow_reproducibility"],
                     order_corroborated=report["order_corroborated"],
                     warm_start=vae.config.get("warm_start", ""),
                     time_held=bool(vae.config.get("time_held", False)),
                     settled=vae.config.get("settled_epochs", {}))
        stages = vae.config.get("stage_flow_agreement", {})
        extra.update(basic_agreement=stages.get("basic"), full_agreement=stages.get("full"))
        return "latent_time", extra
    if method == "scvelo-stochastic":
        scv.tl.velocity(adata, mode="stochastic")
        scv.tl.velocity_graph(adata, n_jobs=1)
        scv.tl.velocity_pseudotime(adata)
        return "velocity_pseudotime", extra
    scv.tl.recover_dynamics(adata, n_jobs=1)
    scv.tl.velocity(adata, mode="dynamical")
    scv.tl.latent_time(adata)
    return "latent_time", extra


def score_row(adata, time_key: str, target: str) -> dict:
    t = adata.obs[time_key].to_numpy(dtype=float)
    y = adata.obs[target].to_numpy(dtype=float)
    ok = np.isfinite(t) & np.isfinite(y)
    row = {"spearman": float(spearmanr(t[ok], y[ok])[0]) if ok.sum() > 2 else np.nan}
    if "true_t" in adata.obs:
        row["spearman_true_t"] = float(spearmanr(t, adata.obs["true_t"])[0])
    if "true_velocity" in adata.layers and "velocity" in adata.layers:
        truth = np.asarray(adata.layers["true_velocity"], dtype=float)
        row["velocity_cosine"] = mean_cosine(np.asarray(adata.layers["velocity"]), truth)
    return row


def done_rows(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    table = pd.read_csv(path)
    return {(r.family, r.config, int(r.draw), r.method) for r in table.itertuples()}


@contextlib.contextmanager
def appended_rows(path: Path, fields: list[str]) -> Iterator[tuple[csv.DictWriter, IO]]:
    """A CSV writer appending to ``path`` (with the header where the file is new) and its
    file, which the caller flushes after each row so that an interrupted run keeps them."""
    new_file = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fields, lineterminator="\n")
        if new_file:
            writer.writeheader()
        yield writer, handle


def run(args) -> None:
    path = Path(args.csv)
    done = done_rows(path)
    with appended_rows(path, FIELDS) as (writer, handle):
        # draw-major, so that an interrupted run has covered every configuration
        for draw in range(args.draws):
            for family in args.families:
                for config in args.configs or CONFIGS[family]:
                    if config not in CONFIGS[family]:
                        continue
                    todo = [m for m in args.methods if (family, config, draw, m) not in done]
                    if not todo:
                        continue
                    data_seed = 0 if family == "real" else draw
                    raw, target = dataset(family, config, data_seed, args.n_cells,
                                          args.n_genes)
                    pv.pp.preprocess(raw, random_state=0, n_neighbors=args.n_neighbors)
                    for method in todo:
                        adata = raw.copy()
                        row = {"family": family, "config": config, "draw": draw,
                               "method": method}
                        start = time.perf_counter()
                        try:
                            with warnings.catch_warnings():
                                warnings.simplefilter("ignore")
                                time_key, extra = run_method(method, adata, draw)
                            row["seconds"] = time.perf_counter() - start
                            row.update(extra)
                            row.update(score_row(adata, time_key, target))
                        except Exception as error:  # a failed method is a result too
                            row["seconds"] = time.perf_counter() - start
                            row["error"] = f"{type(error).__name__}: {error}"[:200]
                        log(f"{family}/{config} draw {draw} {method}: "
                            f"rho={row.get('spearman', np.nan):.3f} "
                            f"cos={row.get('velocity_cosine', np.nan):.3f} "
                            f"{row['seconds']:.1f}s {row.get('direction', '')} "
                            f"{row.pop('settled', '')}")  # the epochs go to the log only
                        writer.writerow(row)
                        handle.flush()


def flagged_fits(rows: pd.DataFrame) -> pd.Series:
    """Whether each pyro_velo fit's diagnostic flags it (NaN for other methods): its
    direction is not identified or reversed, or the data's flow does not corroborate
    its order (``direction()['order_corroborated']``)."""
    if "order_corroborated" not in rows or rows.direction.isna().all():
        return pd.Series(np.nan, index=rows.index)
    corroborated = rows.order_corroborated.map({True: True, False: False, "True": True,
                                                "False": False})
    flagged = ~rows.direction.isin(["forward", "given"]) | (corroborated == False)  # noqa: E712
    return flagged.where(rows.direction.notna())


def summary(path: Path, families: list[str] | None = None, by: str = "family") -> str:
    """Markdown table per family (or per configuration) and method."""
    table = pd.read_csv(path)
    if families:
        table = table[table.family.isin(families)]
    keys = ["family"] if by == "family" else ["family", "config"]
    # rows in the order of CONFIGS and METHODS, whatever order the CSV holds them in
    names = [*CONFIGS, *(c for configs in CONFIGS.values() for c in configs), *METHODS,
             *EXTRA_METHODS]
    order = {name: names.index(name) for name in names}  # first place of each name
    table = table.sort_values(keys + ["method"], key=lambda column: column.map(order),
                              kind="stable")
    lines = ["| " + " | ".join(keys) + " | method | n | median Spearman | worst | reversed "
             "| flagged | worst unflagged | median cosine | median s |",
             "|" + "---|" * (len(keys) + 9)]
    for group, rows in table.groupby(keys + ["method"], sort=False):
        rho = rows.spearman.astype(float)
        cos = rows.velocity_cosine.astype(float)
        flagged = flagged_fits(rows)
        share, worst_unflagged = "-", "-"
        if flagged.notna().any():
            share = f"{flagged.astype(float).mean():.0%}"
            unflagged = rho[~flagged.fillna(True).astype(bool)]
            worst_unflagged = "-" if unflagged.empty else f"{unflagged.min():.3f}"
        lines.append("| " + " | ".join(map(str, group)) + f" | {rho.notna().sum()} | "
                     f"{rho.median():.3f} | {rho.min():.3f} | {(rho < 0).mean():.0%} | "
                     f"{share} | {worst_unflagged} | "
                     + ("-" if cos.isna().all() else f"{cos.median():.3f}")
                     + f" | {rows.seconds.median():.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--configs", nargs="+", default=None,
                        help="only these configurations of the families")
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--n-cells", type=int, default=800)
    parser.add_argument("--n-genes", type=int, default=100)
    parser.add_argument("--n-neighbors", type=int, default=None,
                        help="pp.preprocess's n_neighbors (default: its own default)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        choices=[*METHODS, *EXTRA_METHODS])
    parser.add_argument("--csv", default=str(REPO / "benchmarks" / "robustness.csv"))
    parser.add_argument("--table", action="store_true", help="only print the summary")
    parser.add_argument("--by", choices=["family", "config"], default="family")
    args = parser.parse_args(argv)
    if not args.table:
        patch_scvelo_numpy2()
        run(args)
    print(summary(Path(args.csv), args.families, args.by))
    return 0


if __name__ == "__main__":
    sys.exit(main())
