"""Accuracy and stability of the velocity along a default training, every 10 epochs.

Usage::

    python benchmarks/training_curves.py ode:bifurcation3:2 scvelo:linear:1 ...
        [--n-cells 1000] [--n-genes 200] [--json F] [--summary]

Each set is ``family:config:draw`` as in ``benchmarks/robustness.py`` (the same data
and preprocessing). A default fit, ``VeloVAE(adata, seed=draw).train(seed=draw)``, is
watched by a callback that, every 10 epochs of every stage trained with the amortised
guide, encodes all cells and records the velocity cosine with the true velocity, the
time's Spearman with the target, and how much the velocity of the validation cells
moved: the mean cosine of its rows with those 10 and 50 epochs earlier in the same
stage (``stab10``, ``stab50``). The callback leaves the networks in training mode, so
the fit is the default's (the same final accuracy as the ``pyro_velo`` rows of the
robustness benchmark at the same size).

``--summary`` prints, for velocity-stability thresholds, the epoch at which each
stage's ``stab50`` first reaches the threshold and the cosine there against the
stage's last recorded one: what a stopping rule on the velocity field would have done.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import robustness  # noqa: E402
from compare import mean_cosine  # noqa: E402

import pyro_velo as pv  # noqa: E402
from pyro_velo.inference.callbacks import Callback  # noqa: E402
from pyro_velo.predict import Predictor  # noqa: E402

#: epochs between two records
EVERY = 10
#: the lags (in epochs) of the velocity-stability columns
LAGS = (10, 50)


class VelocityCurve(Callback):
    """Records accuracy and velocity stability every :data:`EVERY` epochs."""

    def __init__(self, vae: pv.VeloVAE, truth: np.ndarray, target: np.ndarray) -> None:
        self.vae, self.truth, self.target = vae, truth, target
        self.rows: list[dict] = []
        self.earlier: dict[tuple[str, int], np.ndarray] = {}

    def on_epoch_end(self, loop) -> None:
        # the refinement's guide holds t and c fixed: nothing to encode there
        if loop.epoch % EVERY or not hasattr(loop.guide, "summary"):
            return
        vae = self.vae
        predictor = Predictor(loop.model, loop.guide, vae.data, vae.var_names,
                              vae.obs_names)
        encoded = predictor.encode()
        ds = predictor.expected(encoded=encoded)["ds"].cpu().numpy().astype(float)
        # encoding switched the pair to evaluation mode; training goes on in training mode
        loop.model.train()
        loop.guide.train()
        velocity = np.full((ds.shape[0], self.truth.shape[1]), np.nan)
        velocity[:, vae.data.fitted] = ds
        validation = vae.data.indices("validation").cpu().numpy()
        row = {"stage": loop.description, "epoch": loop.epoch,
               "cos": mean_cosine(velocity, self.truth),
               "sp": float(spearmanr(encoded["t"].cpu().numpy(), self.target)[0])}
        for lag in LAGS:
            before = self.earlier.get((loop.description, loop.epoch - lag))
            row[f"stab{lag}"] = (mean_cosine(ds[validation], before)
                                 if before is not None else np.nan)
        self.earlier[(loop.description, loop.epoch)] = ds[validation]
        self.rows.append(row)


def curve(spec: str, n_cells: int, n_genes: int) -> tuple[list[dict], dict]:
    """The records of one default fit of ``family:config:draw`` and its final scores."""
    family, config, draw = spec.split(":")
    adata, target = robustness.dataset(family, config, int(draw), n_cells, n_genes)
    pv.pp.preprocess(adata, random_state=0)
    vae = pv.VeloVAE(adata, seed=int(draw))
    watch = VelocityCurve(vae, np.asarray(adata.layers["true_velocity"], dtype=float),
                          adata.obs[target].to_numpy(dtype=float))
    vae.train(seed=int(draw), progress_bar=False, callbacks=[watch])
    vae.export_to_anndata(adata)
    for row in watch.rows:
        row["set"] = spec
    return watch.rows, robustness.score_row(adata, "latent_time", target)


def summary(rows: pd.DataFrame, thresholds=(0.99, 0.995, 0.998)) -> str:
    """Where a stop at ``stab50 >= threshold`` would have ended each stage."""
    lines = []
    for threshold in thresholds:
        lines.append(f"stab50 >= {threshold}:")
        for (spec, stage), group in rows.groupby(["set", "stage"], sort=False):
            if stage.startswith("Warm-up"):
                continue
            end = group.iloc[-1]
            hit = group[group.stab50 >= threshold]
            if len(hit):
                first = hit.iloc[0]
                lines.append(f"  {spec} {stage}: stop {first.epoch:.0f} of {end.epoch:.0f}, "
                             f"cosine {first.cos:.3f} against {end.cos:.3f} "
                             f"({first.cos - end.cos:+.3f})")
            else:
                lines.append(f"  {spec} {stage}: no stop, cosine {end.cos:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sets", nargs="*", help="family:config:draw")
    parser.add_argument("--n-cells", type=int, default=1000)
    parser.add_argument("--n-genes", type=int, default=200)
    parser.add_argument("--json", default="training_curves.json")
    parser.add_argument("--summary", action="store_true",
                        help="only summarise the records in --json")
    args = parser.parse_args(argv)
    path = Path(args.json)
    if not args.summary:
        records = json.loads(path.read_text()) if path.exists() else []
        for spec in args.sets:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows, final = curve(spec, args.n_cells, args.n_genes)
            print(spec, {k: round(v, 3) for k, v in final.items()}, flush=True)
            records += rows
            path.write_text(json.dumps(records))
    print(summary(pd.DataFrame(json.loads(path.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
