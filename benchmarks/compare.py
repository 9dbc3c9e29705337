"""Side-by-side benchmark of pyro_velo against scVelo on the same preprocessed data.

Usage::

    python benchmarks/compare.py [--quick] [--out results.csv] [--markdown benchmarks/RESULTS.md]
        [--datasets linear bifurcation2 bifurcation3 capture scvelo] [--methods ...]
        [--size-factors total|neighbourhood]
        [--n-cells N --n-genes G --max-epochs E]
        [--h5ad PATH --cluster-key KEY [--transitions A:B,B:C] [--time-key COLUMN]]
        [--scvelo-genes scvelo|pyro_velo] [--timeout SECONDS] [--verbose]

Data sets: built-in simulations (``pv.datasets.simulate``, negative binomial noise): a linear
trajectory, bifurcations with 2 and 3 branches, and a 2-branch bifurcation with 4 capture
times (``obs['capture_time']``; no method uses it yet); ``scvelo``: scVelo's own simulator
(``pv.datasets.simulate_scvelo``: one lineage, Gaussian noise, no library-size variation;
``obs['cell_type']`` = four stages of true time); plus an optional user h5ad with raw
``spliced`` / ``unspliced`` count layers. Each data set is preprocessed once with
``pv.pp.preprocess(adata, random_state=0, size_factors=--size-factors)``; every method then
runs on its own copy, in its own fresh process, so that methods never see each other's
outputs and their costs are measured separately.

Methods:

- ``pyro_velo-basic`` / ``pyro_velo-full``: ``VeloVAE(adata, model=kind, seed=0)``,
  ``train(progress_bar=False, seed=0[, max_epochs])``, ``export_to_anndata``.
- ``scvelo-dynamical``: ``scv.tl.recover_dynamics(adata, n_jobs=1)``,
  ``scv.tl.velocity(adata, mode='dynamical')``, ``scv.tl.latent_time(adata)`` (which also
  computes the velocity graph and terminal states it needs); time = ``obs['latent_time']``.
- ``scvelo-stochastic``: ``scv.tl.velocity(adata, mode='stochastic')``,
  ``scv.tl.velocity_graph(adata, n_jobs=1)``, ``scv.tl.velocity_pseudotime(adata)``;
  time = ``obs['velocity_pseudotime']``.

Columns (markdown table on stdout; ``--out`` writes the same rows as CSV):

- ``spearman_t``: Spearman correlation of the method's time with ``obs['true_t']``
  (simulations) or ``obs[--time-key]`` (user data), ``pv.tl.time_correlation``.
- ``velocity_cosine``: mean over cells of the cosine between the method's
  ``layers['velocity']`` and ``layers['true_velocity']``, per cell over the genes where both
  are finite, always restricted to the genes pyro_velo fits (``var['velocity_genes']`` of its
  export), so every method is scored on the same gene set. scVelo dynamical fits by default
  only its own velocity genes (NaN velocity elsewhere, so those genes drop out; see
  ``n_genes``); ``--scvelo-genes pyro_velo`` makes ``recover_dynamics`` fit exactly
  pyro_velo's genes.
- ``cbdir``: ``pv.tl.cross_boundary_correctness`` in gene space (kNN graph of the
  preprocessing, ``obs['cell_type']`` and ``uns['transitions']`` of the simulation), on the
  same pyro_velo genes (columns not finite in every cell are dropped by ``pv.tl``).
- ``time_score``: ``pv.tl.transition_time_score`` of the method's time.
- ``mse_train`` / ``mse_test``: reconstruction error on the per-gene standardised abundances
  (each gene of ``Mu`` / ``Ms`` divided by its standard deviation over all cells, as
  pyro_velo fits them), mean over cells, genes, u and s, on the train / test cells of
  ``vae.get_split()`` (seed 0; the same cells for every method). pyro_velo:
  ``vae.evaluate()``. scVelo dynamical: its fitted ``u, s`` at each cell's gene-specific time
  ``layers['fit_t']`` (scVelo's ``compute_dynamics``, the curve ``scv.pl.scatter`` draws)
  against ``Mu`` / ``Ms`` on the genes both fit; scVelo fits every cell, so its "test" cells
  are not held out. Stochastic: no generative fit, '-'.
- ``ll_train`` / ``ll_test``: pyro_velo's mean per-cell log-likelihood (``vae.evaluate()``);
  '-' for scVelo (its likelihoods are per gene on another scale, not comparable).
- ``wall_s``: wall-clock seconds of the method's calls listed above (``time.perf_counter``),
  excluding process start, imports, data loading and the metrics.
- ``peak_mem_mb``: peak resident memory increase during the method, in MiB: in the method's
  own process, after imports and loading the data, the kernel's peak-RSS counter is reset
  (``echo 5 > /proc/self/clear_refs``) and the method runs; the value is ``VmHWM`` (peak RSS)
  afterwards minus ``VmRSS`` before. Where the reset is unavailable, ``ru_maxrss`` of the
  process is used instead (then the peak of imports and loading may be included).
- ``n_genes`` (extra): genes the velocity metrics used; ``status`` (extra): ``ok`` or
  ``failed: <short reason>`` (a failing method never stops the run).

scVelo 0.3.x's stochastic mode fails under NumPy >= 2.4 (scVelo issue #1341); the method
processes then install a fixed copy of the one affected function (``fixed_leastsq_generalized``)
and a note under the table says so.

``--out results.csv`` writes the main table as CSV and the second table to
``results_gene_time.csv``; ``--markdown PATH`` appends both tables with the command line, the
machine (CPU cores, memory) and the date to PATH.

A second table reproduces the analysis of the VeloVAE paper's Table 2 for scVelo dynamical:
the Spearman correlation, over cells, of each gene's own time ``layers['fit_t']`` with
scVelo's global ``obs['latent_time']``, summarised over the genes scVelo fitted.

``--quick``: 1000 cells x 100 genes and at most 100 epochs per pyro_velo training stage.
Default: 2000 cells x 200 genes, pyro_velo's default epochs. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import importlib
import math
import multiprocessing as mp
import os
import pickle
import platform
import resource
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("pyro_velo-basic", "pyro_velo-full", "scvelo-dynamical", "scvelo-stochastic")
METHOD_LABELS = {
    "pyro_velo-basic": "pyro_velo basic",
    "pyro_velo-full": "pyro_velo full",
    "scvelo-dynamical": "scVelo dynamical",
    "scvelo-stochastic": "scVelo stochastic",
}
#: name -> (label, name of its maker below, keyword arguments); a maker takes
#: (n_cells, n_genes, **kwargs) and returns raw counts with cell types and transitions
SIMULATIONS = {
    "linear": ("linear", "ours", dict(topology="linear", noise="nb", seed=0)),
    "bifurcation2": ("bifurcation, 2 branches", "ours",
                     dict(topology="bifurcation", n_branches=2, noise="nb", seed=2)),
    "bifurcation3": ("bifurcation, 3 branches", "ours",
                     dict(topology="bifurcation", n_branches=3, noise="nb", seed=3)),
    "capture": ("bifurcation, 4 capture times", "ours",
                dict(topology="bifurcation", n_branches=2, noise="nb", n_capture_times=4,
                     seed=4)),
    # a simulator we did not write (pv.datasets.simulate_scvelo): one lineage, Gaussian
    # noise, no library-size variation
    "scvelo": ("scVelo's simulator", "scvelo", dict(seed=0)),
}
#: consecutive stages of true time given to scVelo's simulation (it has no cell types)
SCVELO_STAGES = 4
CSV_COLUMNS = ("dataset", "method", "spearman_t", "velocity_cosine", "cbdir", "time_score",
               "mse_train", "mse_test", "ll_train", "ll_test", "wall_s", "peak_mem_mb",
               "n_genes", "status")
#: markdown header and number format of each metric column
FORMATS = {
    "spearman_t": ("Spearman t", "{:.3f}"),
    "velocity_cosine": ("velocity cosine", "{:.3f}"),
    "cbdir": ("CBDir", "{:.3f}"),
    "time_score": ("time score", "{:.3f}"),
    "mse_train": ("MSE train", "{:.4f}"),
    "mse_test": ("MSE test", "{:.4f}"),
    "ll_train": ("LL train", "{:.1f}"),
    "ll_test": ("LL test", "{:.1f}"),
    "wall_s": ("wall (s)", "{:.1f}"),
    "peak_mem_mb": ("peak mem (MiB)", "{:.0f}"),
    "n_genes": ("genes", "{:.0f}"),
}
NOTE_PATCH = ("The scVelo processes used this script's fix for scVelo issue #1341 (the least "
              "squares of stochastic mode fail under NumPy >= 2.4; see "
              "fixed_leastsq_generalized).")
NOTE_MEMORY = ("peak memory could not be reset per method (no /proc/self/clear_refs): "
               "values include the peak of imports and data loading.")
GENE_TIME_COLUMNS = ("dataset", "n_genes", "mean", "median", "q10", "frac_below_0.5")
QUICK = dict(n_cells=1000, n_genes=100, max_epochs=100)
FULL = dict(n_cells=2000, n_genes=200, max_epochs=None)


def log(message: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- utilities


def parse_transitions(text: str | None) -> list[tuple[str, str]]:
    """``'A:B,B:C'`` -> ``[('A', 'B'), ('B', 'C')]`` (empty or None -> [])."""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"bad transition {item!r}: expected SOURCE:TARGET")
        pairs.append((parts[0].strip(), parts[1].strip()))
    return pairs


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of cos(a_i, b_i), per row over the columns where both are finite.

    Rows with no such column or a zero vector are left out of the mean (NaN if none is left).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    a = np.where(both, a, 0.0)
    b = np.where(both, b, 0.0)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    valid = norms > 0
    if not valid.any():
        return float("nan")
    return float(np.mean(np.einsum("ij,ij->i", a[valid], b[valid]) / norms[valid]))


def standardised_mse(fit_u: np.ndarray, fit_s: np.ndarray, u: np.ndarray, s: np.ndarray,
                     scale_u: np.ndarray, scale_s: np.ndarray) -> float:
    """Mean squared residual over cells, genes, u and s, each gene divided by its scale.

    Genes with a non-finite fit are left out (NaN if no gene or cell is left).
    """
    res_u = (np.asarray(fit_u, np.float64) - u) / scale_u
    res_s = (np.asarray(fit_s, np.float64) - s) / scale_s
    values = np.concatenate([res_u, res_s], axis=1) ** 2
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def gene_time_correlations(fit_t: np.ndarray, latent_time: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``fit_t`` with ``latent_time`` over cells.

    Cells where either is non-finite are dropped per gene; NaN for genes with fewer than 3
    cells or a constant time.
    """
    from scipy.stats import spearmanr

    out = np.full(fit_t.shape[1], np.nan)
    latent_time = np.asarray(latent_time, dtype=np.float64)
    for g in range(fit_t.shape[1]):
        x = np.asarray(fit_t[:, g], dtype=np.float64)
        keep = np.isfinite(x) & np.isfinite(latent_time)
        if keep.sum() < 3 or np.ptp(x[keep]) == 0 or np.ptp(latent_time[keep]) == 0:
            continue
        out[g] = spearmanr(x[keep], latent_time[keep])[0]
    return out


def summarise_gene_times(rho: np.ndarray) -> dict[str, float]:
    rho = rho[np.isfinite(rho)]
    if rho.size == 0:
        return {"n_genes": 0, "mean": np.nan, "median": np.nan, "q10": np.nan,
                "frac_below_0.5": np.nan}
    return {"n_genes": int(rho.size), "mean": float(rho.mean()), "median": float(np.median(rho)),
            "q10": float(np.quantile(rho, 0.1)), "frac_below_0.5": float(np.mean(rho < 0.5))}


def short_reason(error: BaseException, limit: int = 90) -> str:
    text = f"{type(error).__name__}: {error}".replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_value(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, str):
        return value
    return FORMATS[key][1].format(value)


def markdown_table(rows: list[dict]) -> str:
    keys = list(FORMATS)
    header = ["data set", "method"] + [FORMATS[k][0] for k in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        if row["status"] != "ok":
            cells = [row["status"]] + [""] * (len(keys) - 1)
        else:
            cells = [format_value(k, row.get(k)) for k in keys]
        lines.append("| " + " | ".join([row["dataset"], row["method"]] + cells) + " |")
    return "\n".join(lines)


def gene_time_table(rows: list[dict]) -> str:
    lines = ["| data set | scVelo genes | mean Spearman(fit_t, latent_time) | median | "
             "10% quantile | fraction < 0.5 |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['dataset']} | {row['failed']} | | | | |")
            continue
        values = [f"{row['n_genes']}"] + [
            "-" if not math.isfinite(row[k]) else f"{row[k]:.3f}"
            for k in ("mean", "median", "q10", "frac_below_0.5")]
        lines.append("| " + " | ".join([row["dataset"]] + values) + " |")
    return "\n".join(lines)


def machine_description() -> str:
    memory = "unknown memory"
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    memory = f"{int(line.split()[1]) / 1024 ** 2:.1f} GiB memory"
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores, {memory}, {platform.system()} {platform.machine()}"


# --------------------------------------------------------------------------- memory


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak RSS increase (MiB) of this process between :meth:`start` and :meth:`stop`."""

    def start(self) -> None:
        self.reset = False
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM (peak RSS) to the current RSS
            self.reset = True
        except OSError:
            pass
        self.before = _proc_status_kib("VmRSS")
        if self.before is None:
            self.before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def stop(self) -> float:
        peak = _proc_status_kib("VmHWM") if self.reset else None
        if peak is None:  # ru_maxrss is KiB on Linux
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak - self.before) / 1024


# --------------------------------------------------------------------------- methods
# Everything below runs in the method's own (spawned) process.


def _run_pyro_velo(adata, spec: dict, kind: str) -> tuple[dict, str]:
    import pyro_velo as pv

    vae = pv.VeloVAE(adata, model=kind, seed=spec["seed"])
    train_kwargs = dict(progress_bar=False, seed=spec["seed"])
    if spec["max_epochs"] is not None:
        train_kwargs["max_epochs"] = spec["max_epochs"]
    vae.train(**train_kwargs)
    vae.export_to_anndata(adata)
    return {"vae": vae}, "latent_time"


def _pyro_velo_fit_metrics(state: dict, spec: dict) -> dict:
    vae = state["vae"]
    if not np.array_equal(np.asarray(vae.get_split().cat.codes), spec["split"]):
        raise RuntimeError("pyro_velo's split differs from the reference split")
    metrics = vae.evaluate()
    return {"mse_train": float(metrics.loc["train", "mse"]),
            "mse_test": float(metrics.loc["test", "mse"]),
            "ll_train": float(metrics.loc["train", "log_likelihood"]),
            "ll_test": float(metrics.loc["test", "log_likelihood"])}


def _run_scvelo_dynamical(adata, spec: dict) -> tuple[dict, str]:
    import scvelo as scv

    kwargs = {}
    if spec["scvelo_genes"] == "pyro_velo":
        kwargs["var_names"] = list(adata.var_names[spec["genes"]])
    scv.tl.recover_dynamics(adata, n_jobs=1, **kwargs)
    scv.tl.velocity(adata, mode="dynamical")
    scv.tl.latent_time(adata)
    return {}, "latent_time"


def _scvelo_dynamical_fit_metrics(adata, spec: dict) -> tuple[dict, dict]:
    from scvelo.plotting.simulation import compute_dynamics

    fitted = np.isfinite(adata.var["fit_alpha"].to_numpy(dtype=float))
    fit_t = np.asarray(adata.layers["fit_t"], dtype=np.float64)[:, fitted]
    rho = gene_time_correlations(fit_t, adata.obs["latent_time"].to_numpy(dtype=float))
    gene_times = summarise_gene_times(rho)

    genes = np.flatnonzero(spec["genes"] & fitted)
    if genes.size == 0:
        return {}, gene_times
    fit_u = np.empty((adata.n_obs, genes.size))
    fit_s = np.empty((adata.n_obs, genes.size))
    for j, g in enumerate(genes):
        _, ut, st = compute_dynamics(adata, int(g), key="fit", extrapolate=False, sort=False)
        fit_u[:, j], fit_s[:, j] = np.ravel(ut), np.ravel(st)
    u = _dense(adata.layers["Mu"])[:, genes]
    s = _dense(adata.layers["Ms"])[:, genes]
    position = np.searchsorted(np.flatnonzero(spec["genes"]), genes)
    scale_u, scale_s = spec["scale_u"][position], spec["scale_s"][position]
    out = {}
    for split, code in (("train", 0), ("test", 2)):
        cells = spec["split"] == code
        out[f"mse_{split}"] = standardised_mse(fit_u[cells], fit_s[cells], u[cells], s[cells],
                                               scale_u, scale_s)
    return out, gene_times


def fixed_leastsq_generalized(original):
    """scVelo's ``leastsq_generalized`` with its no-offset branch made NumPy-2 safe.

    Under NumPy >= 2.4, scVelo 0.3.x's ``leastsq_generalized`` (the solver behind
    ``scv.tl.velocity(mode='stochastic')``) assigns a size-one array to an array element and
    raises ``ValueError`` (scVelo issue #1341). Only its branch without offsets (the
    default) is affected; the returned function computes that branch the same way,
    gamma_i = pinv(a'a) a'y_i per gene on the stacked first- and second-order moments,
    taking the single element explicitly, and calls ``original`` for the other branches.
    """
    from scipy.sparse import csr_matrix
    from scvelo.tools.utils import make_dense

    optimization = importlib.import_module("scvelo.tools.optimization")

    def leastsq_generalized(x, y, x2, y2, res_std=None, res2_std=None, fit_offset=False,
                            fit_offset2=False, perc=None):
        if fit_offset or fit_offset2:
            return original(x, y, x2, y2, res_std, res2_std, fit_offset, fit_offset2, perc)
        if perc is not None:
            perc = perc[1] if isinstance(perc, list | tuple) else perc
            weights = csr_matrix(optimization.get_weight(x, y, perc=perc)
                                 | optimization.get_weight(x, perc=perc)).astype(bool)
            x, y = weights.multiply(x).tocsr(), weights.multiply(y).tocsr()
        n_var = x.shape[1]
        if res_std is None or res2_std is None:
            res_std, res2_std = np.ones(n_var), np.ones(n_var)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = np.vstack((make_dense(x) / res_std, x2 / res2_std))
            y = np.vstack((make_dense(y) / res_std, y2 / res2_std))
        gamma = np.ones(n_var, dtype="float32")
        for i in range(n_var):
            a = x[:, i : i + 1]
            gamma[i] = (np.linalg.pinv(a.T @ a) @ (a.T @ y[:, i]))[0]
        gamma[np.isnan(gamma)] = 0
        return np.zeros(n_var, dtype="float32"), np.zeros(n_var, dtype="float32"), gamma

    return leastsq_generalized


def patch_scvelo_numpy2() -> bool:
    """Install :func:`fixed_leastsq_generalized` in scVelo if its own version fails.

    Probes scVelo's function on a tiny input; only if that raises (NumPy >= 2.4) is the
    fixed version installed, in this process only. Returns whether it was installed.
    """
    # import_module: ``scvelo.tools.velocity`` as an attribute is the function, not the module
    modules = [importlib.import_module(f"scvelo.tools.{name}")
               for name in ("optimization", "velocity", "_steady_state_model")]
    original = modules[0].leastsq_generalized
    probe = np.array([[1.0, 2.0], [2.0, 3.0], [3.0, 5.0]])
    try:
        original(probe, probe, probe, probe)
        return False
    except (ValueError, TypeError):
        pass
    fixed = fixed_leastsq_generalized(original)
    for module in modules:
        module.leastsq_generalized = fixed
    return True


def _run_scvelo_stochastic(adata, spec: dict) -> tuple[dict, str]:
    import scvelo as scv

    scv.tl.velocity(adata, mode="stochastic")
    scv.tl.velocity_graph(adata, n_jobs=1)
    scv.tl.velocity_pseudotime(adata)
    return {}, "velocity_pseudotime"


def _dense(x) -> np.ndarray:
    return np.array(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def _safe(name: str, compute) -> float:
    """``compute()``, or NaN (reported on stderr) if it raises: one metric never sinks a row."""
    try:
        return float(compute())
    except Exception as error:  # noqa: BLE001
        log(f"metric {name} not computed: {short_reason(error)}")
        return float("nan")


def _common_metrics(adata, spec: dict, time_key: str) -> dict:
    import pyro_velo as pv

    genes = spec["genes"]
    out: dict[str, Any] = {}
    if spec["truth_key"] is not None:
        out["spearman_t"] = _safe("spearman_t", lambda: pv.tl.time_correlation(
            adata, key=spec["truth_key"], time_key=time_key))
    velocity = _dense(adata.layers["velocity"])
    velocity[:, ~genes] = np.nan  # the genes pyro_velo fits, for every method
    out["n_genes"] = int(np.isfinite(velocity).all(axis=0).sum())
    if "true_velocity" in adata.layers:
        truth = _dense(adata.layers["true_velocity"])
        out["velocity_cosine"] = _safe("velocity_cosine", lambda: mean_cosine(
            velocity[:, genes], truth[:, genes]))
    if spec["transitions"]:
        adata.layers["velocity_compare"] = velocity
        out["cbdir"] = _safe("cbdir", lambda: pv.tl.cross_boundary_correctness(
            adata, spec["cluster_key"], spec["transitions"],
            velocity_key="velocity_compare")[1])
        out["time_score"] = _safe("time_score", lambda: pv.tl.transition_time_score(
            adata, spec["cluster_key"], spec["transitions"], time_key=time_key)[1])
    return out


def run_method(spec: dict) -> dict:
    """Run one method on one data set (in this process); return its metrics."""
    if not spec.get("verbose"):
        warnings.simplefilter("ignore")
    import scanpy  # noqa: F401
    import scvelo as scv
    import torch  # noqa: F401

    import pyro_velo  # noqa: F401  (imported before the baseline, as are the others)

    scv.settings.verbosity = 3 if spec.get("verbose") else 0
    patched = spec["method"].startswith("scvelo") and patch_scvelo_numpy2()
    with open(spec["data_path"], "rb") as handle:
        adata = pickle.load(handle)
    method = spec["method"]
    memory = PeakMemory()
    memory.start()
    start = time.perf_counter()
    if method.startswith("pyro_velo"):
        state, time_key = _run_pyro_velo(adata, spec, method.split("-")[1])
    elif method == "scvelo-dynamical":
        state, time_key = _run_scvelo_dynamical(adata, spec)
    elif method == "scvelo-stochastic":
        state, time_key = _run_scvelo_stochastic(adata, spec)
    else:
        raise ValueError(f"unknown method {method!r}")
    wall = time.perf_counter() - start
    peak = memory.stop()
    result = {"wall_s": wall, "peak_mem_mb": peak, "memory_reset": memory.reset,
              "scvelo_patched": patched}
    result.update(_common_metrics(adata, spec, time_key))
    if method.startswith("pyro_velo"):
        exported = adata.var["velocity_genes"].to_numpy(dtype=bool)
        if not np.array_equal(exported, spec["genes"]):
            raise RuntimeError("pyro_velo's fitted genes differ from the reference genes")
        result.update(_pyro_velo_fit_metrics(state, spec))
    elif method == "scvelo-dynamical":
        fit, gene_times = _scvelo_dynamical_fit_metrics(adata, spec)
        result.update(fit)
        result["gene_times"] = gene_times
    return result


def _child(spec: dict, connection) -> None:
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the tables only
            result = run_method(spec)
        connection.send(("ok", result))
    except BaseException as error:  # report everything, the parent decides
        connection.send(("error", short_reason(error), traceback.format_exc()))
    finally:
        connection.close()


def run_in_subprocess(spec: dict, timeout: float | None) -> dict:
    """Run :func:`run_method` in a fresh spawned process; errors become ``{'failed': ...}``."""
    context = mp.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(spec, sender))
    process.start()
    sender.close()
    try:
        if receiver.poll(timeout):
            message = receiver.recv()
        else:
            message = ("error", f"timeout after {timeout:.0f} s", "")
    except EOFError:  # the child died without a word (killed, out of memory, crash)
        message = None
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    receiver.close()
    if message is None:
        return {"failed": f"process exited with code {process.exitcode}"}
    if message[0] == "ok":
        return message[1]
    if spec.get("verbose") and message[2]:
        print(message[2], file=sys.stderr)
    return {"failed": message[1]}


# --------------------------------------------------------------------------- data sets


def our_simulation(n_cells: int, n_genes: int, **kwargs):
    """``pv.datasets.simulate`` with its transitions as tuples of strings."""
    import pyro_velo as pv

    adata = pv.datasets.simulate(n_cells=n_cells, n_genes=n_genes, **kwargs)
    adata.uns["transitions"] = [tuple(map(str, t)) for t in adata.uns["transitions"]]
    return adata


def staged_scvelo_simulation(n_cells: int, n_genes: int, seed: int):
    """``pv.datasets.simulate_scvelo`` with ``obs['cell_type']`` = quantile stages of true
    time (``stage_1`` ... ``stage_4``) and their transitions, for CBDir and the time score."""
    import pandas as pd

    import pyro_velo as pv

    adata = pv.datasets.simulate_scvelo(n_cells=n_cells, n_genes=n_genes, seed=seed)
    labels = [f"stage_{k + 1}" for k in range(SCVELO_STAGES)]
    adata.obs["cell_type"] = pd.qcut(adata.obs["true_t"].rank(method="first"),
                                     SCVELO_STAGES, labels=labels)
    adata.uns["transitions"] = list(zip(labels[:-1], labels[1:], strict=True))
    return adata


def load_datasets(args) -> list[dict]:
    """Unprocessed data sets: ``{'name', 'make' (callable), 'cluster_key', ...}``."""
    import anndata


    makers = {"ours": our_simulation, "scvelo": staged_scvelo_simulation}
    sets = []
    for key in args.datasets:
        label, maker, kwargs = SIMULATIONS[key]

        def make(maker=makers[maker], kwargs=kwargs):
            return maker(args.n_cells, args.n_genes, **kwargs)

        sets.append({"name": label, "make": make, "cluster_key": "cell_type",
                     "transitions": None, "truth_key": "true_t"})
    if args.h5ad:
        def make_user(path=args.h5ad):
            adata = anndata.read_h5ad(path)
            for layer in (args.spliced_layer, args.unspliced_layer):
                if layer not in adata.layers:
                    raise KeyError(f"layer {layer!r} not in {path}")
            return adata

        sets.append({"name": Path(args.h5ad).stem, "make": make_user,
                     "cluster_key": args.cluster_key,
                     "transitions": parse_transitions(args.transitions),
                     "truth_key": args.time_key})
    return sets


def prepare(dataset: dict, args, folder: Path) -> dict:
    """Simulate / read and preprocess a data set; write it for the method processes.

    Returns the spec shared by its methods (reference genes, split and scales from an
    untrained ``VeloVAE(adata, seed)``: the same ones every pyro_velo fit uses).
    """
    import pyro_velo as pv

    adata = dataset["make"]()
    transitions = dataset["transitions"]
    if transitions is None:
        transitions = [tuple(map(str, t)) for t in adata.uns.get("transitions", [])]
    pv.pp.preprocess(adata, random_state=0, spliced_layer=args.spliced_layer,
                     unspliced_layer=args.unspliced_layer, size_factors=args.size_factors)
    for key in ("true_schedule", "simulation"):
        adata.uns.pop(key, None)
    cluster_key = dataset["cluster_key"]
    if cluster_key not in adata.obs:
        raise KeyError(f"obs column {cluster_key!r} not found")
    adata.obs[cluster_key] = adata.obs[cluster_key].astype(str).astype("category")
    if dataset["truth_key"] is not None and dataset["truth_key"] not in adata.obs:
        raise KeyError(f"obs column {dataset['truth_key']!r} not found")
    reference = pv.VeloVAE(adata, model="basic", seed=args.seed)
    path = folder / f"data_{len(list(folder.iterdir()))}.pkl"
    with open(path, "wb") as handle:
        pickle.dump(adata, handle, protocol=pickle.HIGHEST_PROTOCOL)
    return {
        "data_path": str(path),
        "cluster_key": cluster_key,
        "transitions": transitions,
        "truth_key": dataset["truth_key"],
        "genes": np.asarray(reference.data.fitted, dtype=bool),
        "split": np.asarray(reference.get_split().cat.codes, dtype=np.int8),
        "scale_u": reference.data.gene_scale_u.numpy().astype(np.float64),
        "scale_s": reference.data.gene_scale_s.numpy().astype(np.float64),
        "shape": adata.shape,
        "seed": args.seed,
        "max_epochs": args.max_epochs,
        "scvelo_genes": args.scvelo_genes,
        "verbose": args.verbose,
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1000 cells x 100 genes, at most 100 epochs per training stage")
    parser.add_argument("--n-cells", type=int, help="cells per simulation (overrides)")
    parser.add_argument("--n-genes", type=int, help="genes per simulation (overrides)")
    parser.add_argument("--max-epochs", type=int,
                        help="cap on pyro_velo epochs per training stage (overrides)")
    parser.add_argument("--datasets", nargs="*", choices=list(SIMULATIONS),
                        default=list(SIMULATIONS),
                        help="simulations to run (default all; give none to skip them)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--h5ad", help="user data: h5ad with raw spliced/unspliced layers")
    parser.add_argument("--cluster-key", help="obs column with cell types (with --h5ad)")
    parser.add_argument("--transitions", help="cell-type transitions 'A:B,B:C' (with --h5ad)")
    parser.add_argument("--time-key", help="obs column with a reference time (with --h5ad)")
    parser.add_argument("--size-factors", choices=("total", "neighbourhood"),
                        default="total",
                        help="pv.pp.preprocess's size_factors for every data set")
    parser.add_argument("--spliced-layer", default="spliced")
    parser.add_argument("--unspliced-layer", default="unspliced")
    parser.add_argument("--scvelo-genes", choices=("scvelo", "pyro_velo"), default="scvelo",
                        help="genes scVelo's recover_dynamics fits: its own default selection "
                             "(default) or exactly the genes pyro_velo fits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, help="seconds allowed per method")
    parser.add_argument("--out", help="also write the table as CSV to this path")
    parser.add_argument("--markdown", help="append the tables, command and machine here")
    parser.add_argument("--verbose", action="store_true",
                        help="show the methods' logs, warnings and tracebacks")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.h5ad and not args.cluster_key:
        parser.error("--h5ad needs --cluster-key")
    if args.transitions:
        try:
            parse_transitions(args.transitions)
        except ValueError as error:
            parser.error(str(error))
    if not args.datasets and not args.h5ad:
        parser.error("nothing to run: no --datasets and no --h5ad")
    return args


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]])
    started = time.perf_counter()
    rows: list[dict] = []
    gene_rows: list[dict] = []
    notes: set[str] = set()
    shapes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pyro_velo_compare_") as folder:
        for dataset in load_datasets(args):
            name = dataset["name"]
            log(f"{name}: preparing")
            try:
                with contextlib.redirect_stdout(sys.stderr):  # stdout is for the tables only
                    spec = prepare(dataset, args, Path(folder))
            except Exception as error:  # noqa: BLE001 - a broken data set must not stop the run
                reason = "failed: preprocessing: " + short_reason(error)
                log(f"{name}: {reason}")
                for method in args.methods:
                    rows.append({"dataset": name, "method": METHOD_LABELS[method],
                                 "status": reason})
                continue
            shapes.append(f"{name}: {spec['shape'][0]} cells x {spec['shape'][1]} genes")
            for method in args.methods:
                log(f"{name}: {method}")
                result = run_in_subprocess(dict(spec, method=method), args.timeout)
                row = {"dataset": name, "method": METHOD_LABELS[method]}
                if "failed" in result:
                    row["status"] = "failed: " + result["failed"]
                    if method == "scvelo-dynamical":
                        gene_rows.append({"dataset": name, "failed": row["status"]})
                else:
                    row.update({k: v for k, v in result.items() if k in CSV_COLUMNS})
                    row["status"] = "ok"
                    if result.get("scvelo_patched"):
                        notes.add(NOTE_PATCH)
                    if not result.get("memory_reset", True):
                        notes.add(NOTE_MEMORY)
                    if "gene_times" in result:
                        gene_rows.append({"dataset": name, **result["gene_times"]})
                log(f"{name}: {method}: {row['status']} "
                    f"({row.get('wall_s', float('nan')):.1f} s)")
                rows.append(row)
    total = time.perf_counter() - started
    table = markdown_table(rows)
    notes_text = [f"- After preprocessing: {'; '.join(shapes)}."] if shapes else []
    notes_text += [f"- {note}" for note in sorted(notes)]
    if notes_text:
        table += "\n\n" + "\n".join(notes_text)
    print(table)
    if gene_rows:
        print()
        print(gene_time_table(gene_rows))
    log(f"total wall time {total:.0f} s")
    if args.out:
        write_csv(rows, args.out)
        if gene_rows:
            gene_path = Path(args.out).with_name(Path(args.out).stem + "_gene_time.csv")
            with open(gene_path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=GENE_TIME_COLUMNS + ("failed",),
                                        extrasaction="ignore")
                writer.writeheader()
                writer.writerows(gene_rows)
    if args.markdown:
        date = datetime.datetime.now().astimezone().isoformat(timespec="minutes")
        text = [f"\n### {date}\n", f"Command: `{command}`  ",
                f"Machine: {machine_description()}  ",
                f"Total wall time: {total:.0f} s\n", table]
        if gene_rows:
            text += ["", "scVelo dynamical: gene-specific time vs its global latent time "
                         "(VeloVAE paper, Table 2):", "", gene_time_table(gene_rows)]
        with open(args.markdown, "a") as handle:
            handle.write("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
