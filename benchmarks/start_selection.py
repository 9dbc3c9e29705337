"""Which of several starts to keep: every start's score, and what each rule would keep.

``train(n_starts=k)`` fits the whole schedule from ``k`` random starts and keeps one
(:mod:`pyro_velo.inference.restarts`). This benchmark trains the robustness benchmark's
sets (``robustness.dataset``, model seed = draw) with ``k`` starts and records, for every
start, its validation loss, its direction report (status, agreement of its time with the
data's flow, corroboration) and its Spearman correlation with the benchmark's target
(true time, type depth or marker stage). The summary then compares the rules a choice
could follow, on the same starts:

- ``first``: the first start (what one start gives);
- ``elbo``: the start the package kept (reversed last, then not identified, then not
  corroborated, then the validation ELBO: ``restarts._rank``);
- ``flow``: the start whose time agrees best with the data's flow, after the direction
  checks (what ``policies.RestartPolicy(rank_by='flow')`` keeps, by its own ranking);
- ``best``: the best start by the target, which no rule can know (the ceiling).

Every start's velocity cosine with the true velocity is recorded too, where the
simulator has one (NaN on the real fixtures).

Usage::

    python benchmarks/start_selection.py --families small real --jsonl F
    python benchmarks/start_selection.py --jsonl F --summary
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from compare import mean_cosine
from robustness import CONFIGS, dataset
from scipy.stats import spearmanr

import pyro_velo as pv
from pyro_velo.inference import restarts


def kept_by(starts: list[dict], rule: str) -> dict:
    """The start the package keeps with ``RestartPolicy(rank_by=rule)``, from the
    starts' records (the package's own ranking, so that the column cannot drift)."""
    ranks = tuple([start[key] for start in starts]
                  for key in ("loss", "status", "corroborated", "agreement"))
    return starts[min(range(len(starts)), key=lambda k: restarts._rank(k, *ranks, by=rule))]


def starts_of(adata, target: str, draw: int, n_starts: int) -> tuple[list[dict], int]:
    """Train ``n_starts`` starts on preprocessed ``adata``; every start's record and the
    kept start's number. Each start is read right after its training, where the
    restarts evaluate its validation loss."""
    y = adata.obs[target].to_numpy(dtype=float)
    known = np.isfinite(y)
    truth = adata.layers.get("true_velocity")
    vae = pv.VeloVAE(adata, seed=draw)
    records: list[dict] = []
    evaluate = restarts.evaluate_loss

    def evaluate_and_record(*args, **kwargs):
        loss = evaluate(*args, **kwargs)  # first: the restarts seeded its guide draws
        t = vae.predictor.encode()["t"].cpu().numpy()
        cosine = np.nan
        if truth is not None:  # the exported layer: ds/dt on the Ms scale
            (velocity,) = vae.predictor.expected_arrays(("ds",))
            cosine = mean_cosine(velocity, np.asarray(truth, dtype=float))
        records.append({"spearman": float(spearmanr(t[known], y[known])[0]),
                        "cosine": cosine})
        return loss

    restarts.evaluate_loss = evaluate_and_record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vae.train(progress_bar=False, seed=draw, n_starts=n_starts)
    finally:
        restarts.evaluate_loss = evaluate
    # what the package records of every start: loss, direction, corroboration and the
    # agreement with the flow (no order is given here)
    for k, record in enumerate(records):
        record.update(loss=vae.config["start_losses"][k],
                      status=vae.config["start_directions"][k],
                      corroborated=vae.config["start_corroborated"][k],
                      agreement=vae.config["start_evidence_agreements"][k])
    return records, int(vae.config["start"])


def summary(path: Path) -> str:
    """Median and worst Spearman per family for each rule, and the median velocity
    cosine where the data have a true velocity (markdown)."""
    rows = []
    for line in path.read_text().splitlines():
        fit = json.loads(line)
        starts = fit["starts"]
        chosen = {"first": starts[0],
                  "elbo": starts[fit["kept"]],  # the package's choice
                  "flow": kept_by(starts, "flow"),
                  "best": max(starts, key=lambda start: start["spearman"])}
        row = {"family": fit["family"]}
        for rule, start in chosen.items():
            row[rule] = start["spearman"]
            row[rule + " cosine"] = start.get("cosine", np.nan)
        rows.append(row)
    table = pd.DataFrame(rows)
    rules = ["first", "elbo", "flow", "best"]
    lines = ["| family | n | " + " | ".join(f"{r}: median / worst" for r in rules)
             + " | cosine: " + " / ".join(rules) + " |",
             "|---|---|" + "---|" * (len(rules) + 1)]
    for family, group in table.groupby("family", sort=False):
        cells = [f"{group[r].median():.3f} / {group[r].min():.3f}" for r in rules]
        cosines = " / ".join(f"{group[r + ' cosine'].median():.3f}" for r in rules)
        lines.append(f"| {family} | {len(group)} | " + " | ".join(cells)
                     + f" | {cosines} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=["small", "real"],
                        choices=list(CONFIGS))
    parser.add_argument("--configs", nargs="+", default=None)
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--n-starts", type=int, default=3)
    parser.add_argument("--jsonl", required=True,
                        help="one line per fit, appended; sets already in it are skipped")
    parser.add_argument("--summary", action="store_true", help="only print the summary")
    args = parser.parse_args(argv)
    path = Path(args.jsonl)
    if not args.summary:
        done = {(fit["family"], fit["config"], fit["draw"]) for fit in map(
            json.loads, path.read_text().splitlines())} if path.exists() else set()
        with path.open("a") as handle:
            for draw in range(args.draws):
                for family in args.families:
                    for config in args.configs or CONFIGS[family]:
                        if config not in CONFIGS[family] or (family, config, draw) in done:
                            continue
                        adata, target = dataset(family, config, 0 if family == "real"
                                                else draw, 800, 100)
                        pv.pp.preprocess(adata, random_state=0)
                        starts, kept = starts_of(adata, target, draw, args.n_starts)
                        handle.write(json.dumps({"family": family, "config": config,
                                                 "draw": draw, "kept": kept,
                                                 "starts": starts}) + "\n")
                        handle.flush()
                        print(f"{family}/{config} draw {draw}: " + ", ".join(
                            f"{s['spearman']:.3f}" for s in starts), flush=True)
    print(summary(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
