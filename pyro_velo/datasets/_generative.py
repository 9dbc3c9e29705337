"""The generative process shared by the ODE simulators (:func:`~pyro_velo.datasets.simulate`
and :func:`~pyro_velo.datasets.simulate_h5ad`).

Argument checks, the random draws of genes (rates, behaviours, transcription schedules)
and cells (times, branches, library sizes, capture times), the noise-free kinetics at any
time, the count noise, and the ``obs`` / ``var`` / ``uns`` annotations. Both simulators
draw from the same streams in the same order, so the same seed gives the same data.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral, Real

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from pyro_velo import kinetics
from pyro_velo._checks import check_int

#: Gene behaviours understood by :func:`simulate`.
BEHAVIOURS = (
    "induction_repression",
    "early_repression",
    "late_induction",
    "transcriptional_boost",
    "constant",
)

#: Default fractions of each gene behaviour.
DEFAULT_BEHAVIOURS = {
    "induction_repression": 0.35,
    "early_repression": 0.15,
    "late_induction": 0.20,
    "transcriptional_boost": 0.20,
    "constant": 0.10,
}

# Behaviours that can be made branch-specific (they have dynamics after the split).
_BRANCHABLE = ("induction_repression", "late_induction", "transcriptional_boost")

# Rate ranges on the reference time scale t_max = 20 (rescaled by 20 / t_max otherwise).
_REFERENCE_T_MAX = 20.0
_ALPHA_LOG_MEDIAN = np.log(1.5)  # median on-rate (molecules per time unit)
_ALPHA_LOG_SD = 0.9
_BETA_RANGE = (0.4, 4.0)  # splicing, log-uniform
_GAMMA_RANGE = (0.08, 1.2)  # degradation, log-uniform
_CLOSE_RATES_FRACTION = 0.15  # genes with beta ~ gamma
_CLOSE_RATES_RANGE = (0.25, 1.2)  # their shared range
_DISPERSION_LOG_SD = 0.5  # per-gene spread of the NB dispersion around its median
_BRANCH_TIME_FRACTION = 0.35
_N_CELL_TYPES_LINEAR = 4
# default chunk: about this many cell x gene entries (8 MB per float64 buffer, small
# enough for the allocator to reuse memory instead of mapping fresh pages every chunk)
_MAX_CHUNK_ENTRIES = 1 << 20
_EVAL_BLOCK_ENTRIES = 1 << 18  # cell x gene entries per kinetics evaluation block


def _simulation_plan(cfg: dict) -> tuple[dict, dict, dict, dict]:
    """Everything but the counts: the cells, the genes and the count noise streams.

    Returns the per-cell draws (``t``, ``lineage``, ``branch_codes``, ``size_factor``,
    optionally ``capture_time``), the genes (:func:`_draw_genes`), their schedule tensors
    and the count noise streams (``gamma_s``, ``poisson_s``, ``gamma_u``, ``poisson_u``).
    Both simulators start here, so the same seed gives the same cells, genes and counts.
    """
    n_cells, t_max = cfg["n_cells"], cfg["t_max"]
    bifurcation = cfg["topology"] == "bifurcation"
    n_lineages = cfg["n_branches"] if bifurcation else 1
    # Independent streams per purpose, so that e.g. adding capture times or changing the
    # noise model leaves everything else unchanged.
    (rng_genes, rng_time, rng_branch, rng_library, rng_capture, rng_gamma_s, rng_pois_s,
     rng_gamma_u, rng_pois_u) = np.random.default_rng(cfg["seed"]).spawn(9)
    genes = _draw_genes(rng_genes, cfg, n_lineages)
    t = _draw_times(rng_time, n_cells, t_max)
    lineage = np.zeros(n_cells, dtype=np.int64)
    branch_codes = np.zeros(n_cells, dtype=np.int64)
    if bifurcation:
        probs = rng_branch.dirichlet(np.full(n_lineages, 3.0))
        drawn = rng_branch.choice(n_lineages, size=n_cells, p=probs)
        lineage = np.where(t >= cfg["branch_time"], drawn, 0)
        branch_codes = np.where(t >= cfg["branch_time"], drawn + 1, 0)  # 0 = root
    sigma = np.sqrt(np.log1p(cfg["library_size_cv"] ** 2))
    cells = {
        "t": t,
        "lineage": lineage,
        "branch_codes": branch_codes,
        "size_factor": np.exp(rng_library.normal(-0.5 * sigma * sigma, sigma, size=n_cells)),
    }
    if cfg["n_capture_times"]:
        cells["capture_time"] = _capture_times(rng_capture, t, cfg["n_capture_times"], t_max)
    rngs = {"gamma_s": rng_gamma_s, "poisson_s": rng_pois_s,
            "gamma_u": rng_gamma_u, "poisson_u": rng_pois_u}
    return cells, genes, _schedule_tensors(genes), rngs


def _draw_counts(
    mean: np.ndarray,
    size_factor: np.ndarray,
    phi: np.ndarray,
    nb: bool,
    rng_gamma: np.random.Generator,
    rng_poisson: np.random.Generator,
) -> np.ndarray:
    """Poisson or NB counts around the noise-free abundance ``mean`` (modified in place)."""
    mean *= size_factor
    np.maximum(mean, 0.0, out=mean)  # guard against round-off below zero
    if nb:  # Gamma-Poisson mixture: Var = mu + phi mu^2
        mean *= phi
        mean = rng_gamma.gamma(1.0 / phi, mean)
    return rng_poisson.poisson(mean)


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


def _check_real(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


#: the parameters of :func:`~pyro_velo.datasets.simulate` and
#: :func:`~pyro_velo.datasets.simulate_h5ad` that define a simulation, in order
_ARGUMENTS = ("n_cells", "n_genes", "topology", "n_branches", "noise", "dispersion",
              "library_size_cv", "t_max", "branch_time", "behaviours", "n_capture_times",
              "seed", "chunk_size", "branch_specific_fraction")


def _validate(arguments: Mapping[str, object], chunk_size: int | None) -> dict:
    """The checked configuration of a simulation.

    ``arguments``: the calling simulator's ``locals()`` (both simulators take the
    parameters of :data:`_ARGUMENTS` under these names), ``chunk_size``: its cells per
    chunk. Raises ValueError for an invalid argument.
    """
    kw = {name: chunk_size if name == "chunk_size" else arguments[name]
          for name in _ARGUMENTS}
    cfg = dict(kw)
    cfg["n_cells"] = check_int(kw["n_cells"], "n_cells", minimum=1)
    cfg["n_genes"] = check_int(kw["n_genes"], "n_genes", minimum=1)
    if kw["topology"] not in ("linear", "bifurcation"):
        raise ValueError(
            f"unknown topology {kw['topology']!r}; expected 'linear' or 'bifurcation'"
        )
    if kw["noise"] not in ("poisson", "nb"):
        raise ValueError(f"unknown noise {kw['noise']!r}; expected 'poisson' or 'nb'")
    cfg["dispersion"] = _check_real("dispersion", kw["dispersion"], positive=True)
    cfg["library_size_cv"] = _check_real("library_size_cv", kw["library_size_cv"])
    cfg["t_max"] = t_max = _check_real("t_max", kw["t_max"], positive=True)
    if kw["topology"] == "bifurcation":
        if isinstance(kw["n_branches"], bool) or not isinstance(kw["n_branches"], Integral):
            raise ValueError(f"n_branches must be an integer, got {kw['n_branches']!r}")
        if kw["n_branches"] < 2:
            raise ValueError(
                f"n_branches must be >= 2 for a bifurcation, got {kw['n_branches']}"
            )
        cfg["n_branches"] = int(kw["n_branches"])
        if kw["branch_time"] is None:
            cfg["branch_time"] = _BRANCH_TIME_FRACTION * t_max
        else:
            bt = _check_real("branch_time", kw["branch_time"], positive=True)
            if not bt < t_max:
                raise ValueError(f"branch_time must be in (0, t_max={t_max}), got {bt}")
            cfg["branch_time"] = bt
    else:
        if kw["branch_time"] is not None:
            raise ValueError("branch_time is only meaningful for topology='bifurcation'")
        cfg["n_branches"] = 1
        cfg["branch_time"] = None
    cfg["behaviours"] = _check_behaviours(kw["behaviours"])
    if kw["n_capture_times"] is not None:
        cfg["n_capture_times"] = check_int(kw["n_capture_times"], "n_capture_times", minimum=2)
    if kw["seed"] is not None:
        cfg["seed"] = check_int(kw["seed"], "seed", minimum=0)
    if kw["chunk_size"] is not None:
        cfg["chunk_size"] = check_int(kw["chunk_size"], "chunk_size", minimum=1)
    frac = _check_real("branch_specific_fraction", kw["branch_specific_fraction"])
    if frac > 1:
        raise ValueError(f"branch_specific_fraction must be in [0, 1], got {frac}")
    cfg["branch_specific_fraction"] = frac
    return cfg


def _check_behaviours(behaviours: Mapping[str, float] | None) -> dict[str, float]:
    if behaviours is None:
        return dict(DEFAULT_BEHAVIOURS)
    if not isinstance(behaviours, Mapping):
        raise ValueError(f"behaviours must be a dict of fractions, got {behaviours!r}")
    unknown = sorted(set(behaviours) - set(BEHAVIOURS))
    if unknown:
        raise ValueError(f"unknown behaviour(s) {unknown}; expected some of {BEHAVIOURS}")
    fractions = {}
    for name in BEHAVIOURS:
        fractions[name] = _check_real(f"behaviours[{name!r}]", behaviours.get(name, 0.0))
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"behaviours fractions must sum to 1, got {total:.6g}")
    return fractions


def _uns_arguments(cfg: dict) -> dict:
    """The arguments as h5ad-writable scalars (None -> NaN / 0 / -1, see below)."""
    return {
        "n_cells": cfg["n_cells"],
        "n_genes": cfg["n_genes"],
        "topology": cfg["topology"],
        "n_branches": cfg["n_branches"],  # 1 for linear
        "noise": cfg["noise"],
        "dispersion": cfg["dispersion"],
        "library_size_cv": cfg["library_size_cv"],
        "t_max": cfg["t_max"],
        "branch_time": np.nan if cfg["branch_time"] is None else cfg["branch_time"],
        "behaviours": dict(cfg["behaviours"]),
        "n_capture_times": cfg["n_capture_times"] or 0,  # 0: none
        "seed": -1 if cfg["seed"] is None else cfg["seed"],  # -1: unseeded
        "chunk_size": cfg["chunk_size"] or 0,  # 0: automatic
        "branch_specific_fraction": cfg["branch_specific_fraction"],
    }


# --------------------------------------------------------------------------------------
# random draws
# --------------------------------------------------------------------------------------


def _log_uniform(rng: np.random.Generator, low: float, high: float, size=None) -> np.ndarray:
    return np.exp(rng.uniform(np.log(low), np.log(high), size=size))


def _draw_times(rng: np.random.Generator, n_cells: int, t_max: float) -> np.ndarray:
    """Cell times from a random smooth density on [0, t_max] (inverse-CDF sampling)."""
    n_bumps = int(rng.integers(2, 6))
    centres = rng.uniform(0.0, t_max, n_bumps)
    widths = rng.uniform(0.04, 0.2, n_bumps) * t_max
    weights = rng.dirichlet(np.ones(n_bumps))
    grid = np.linspace(0.0, t_max, 4097)
    bumps = np.exp(-0.5 * ((grid[:, None] - centres) / widths) ** 2) / widths
    density = 0.25 / t_max + 0.75 * (bumps * weights).sum(axis=1) / np.sqrt(2 * np.pi)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]))])
    cdf /= cdf[-1]
    return np.interp(rng.uniform(size=n_cells), cdf, grid)


def _split_counts(fractions: dict[str, float], n: int) -> list[int]:
    """Integer counts per behaviour by the largest-remainder method."""
    raw = np.array([fractions[b] * n for b in BEHAVIOURS])
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts.tolist()


def _draw_genes(rng: np.random.Generator, cfg: dict, n_lineages: int) -> dict:
    """Per-gene rates, behaviours and piecewise-constant schedules for every lineage."""
    n_genes, t_max, bt = cfg["n_genes"], cfg["t_max"], cfg["branch_time"]
    scale = _REFERENCE_T_MAX / t_max

    behaviour = np.repeat(np.array(BEHAVIOURS), _split_counts(cfg["behaviours"], n_genes))
    behaviour = behaviour[rng.permutation(n_genes)]

    alpha = np.exp(rng.normal(_ALPHA_LOG_MEDIAN, _ALPHA_LOG_SD, n_genes))
    beta = _log_uniform(rng, *_BETA_RANGE, size=n_genes)
    gamma = _log_uniform(rng, *_GAMMA_RANGE, size=n_genes)
    close = rng.uniform(size=n_genes) < _CLOSE_RATES_FRACTION
    beta_close = _log_uniform(rng, *_CLOSE_RATES_RANGE, size=n_genes)
    gamma_close = beta_close * np.exp(rng.uniform(-0.1, 0.1, n_genes))
    beta = np.where(close, beta_close, beta) * scale
    gamma = np.where(close, gamma_close, gamma) * scale
    alpha = alpha * scale
    dispersion = cfg["dispersion"] * np.exp(rng.normal(0.0, _DISPERSION_LOG_SD, n_genes))

    # branch-specific genes
    branch_specific = np.zeros(n_genes, dtype=bool)
    if n_lineages > 1:
        eligible = np.flatnonzero(np.isin(behaviour, _BRANCHABLE))
        n_specific = min(round(cfg["branch_specific_fraction"] * n_genes), eligible.size)
        branch_specific[rng.choice(eligible, size=n_specific, replace=False)] = True
    winner = rng.integers(0, n_lineages, n_genes)

    t_on = np.full(n_genes, np.nan)
    t_off = np.full(n_genes, np.nan)
    basal = np.zeros(n_genes)
    warmup = np.full(n_genes, np.inf)  # time spent at the initial rate before t = 0
    base: list[list[tuple[float, float]]] = []  # (start, rate) segments, first at 0
    hi = 0.95 * t_max
    for g in range(n_genes):
        a, kind, spec = alpha[g], behaviour[g], branch_specific[g]
        # switches after the split for branch-specific genes (bt is not None then)
        after = bt + 0.25 * (t_max - bt) if spec else 0.0
        if kind in ("induction_repression", "late_induction"):
            basal[g] = 0.0 if rng.uniform() < 0.5 else _log_uniform(rng, 0.01, 0.08)
        if kind == "induction_repression":
            on = rng.uniform(0.05, 0.6) * t_max
            lo_off = min(max(on + 0.15 * t_max, after), hi)
            off = rng.uniform(lo_off, hi)
            t_on[g], t_off[g] = on, off
            segments = [(0.0, basal[g] * a), (on, a), (off, basal[g] * a)]
        elif kind == "early_repression":
            off = rng.uniform(0.05, 0.35) * t_max
            t_off[g] = off
            # induced long enough before t = 0 to be within 5% of steady state
            warmup[g] = rng.uniform(5.0, 10.0) / min(beta[g], gamma[g])
            segments = [(0.0, a), (off, 0.0)]
        elif kind == "late_induction":
            lo_on = 0.4 * t_max
            if spec:
                lo_on = min(max(lo_on, bt + 0.05 * (t_max - bt)), 0.8 * t_max)
            on = rng.uniform(lo_on, 0.8 * t_max)
            t_on[g] = on
            segments = [(0.0, basal[g] * a), (on, a)]
        elif kind == "transcriptional_boost":
            n_steps = int(rng.integers(2, 5))
            level0 = _log_uniform(rng, 0.03, 0.3)
            levels = np.concatenate(
                [np.sort(_log_uniform(rng, level0, 1.0, size=n_steps - 1)), [1.0]]
            )
            times = np.sort(rng.uniform(0.05, 0.9, n_steps) * t_max)
            if spec and times[-1] < after:
                times[-1] = rng.uniform(min(after, 0.9 * t_max), 0.9 * t_max)
            basal[g] = level0
            t_on[g] = times[0]
            segments = [(0.0, level0 * a)] + [
                (float(tt), float(lv * a)) for tt, lv in zip(times, levels, strict=True)
            ]
        else:  # constant
            segments = [(0.0, a)]
        base.append(segments)

    # lineage-specific schedules
    per_lineage: list[list[list[tuple[float, float]]]] = []
    for lin in range(n_lineages):
        rows = []
        for g in range(n_genes):
            segments = base[g]
            if branch_specific[g] and lin != winner[g]:
                off_branch = rng.uniform() < 0.5
                level = 0.0 if off_branch else _log_uniform(rng, 0.05, 0.5)
                shift = rng.uniform(-0.1, 0.1) * t_max
                before = [seg for seg in segments if seg[0] < bt]
                after_split = [
                    (max(st + shift, bt), level * r) for st, r in segments if st >= bt
                ]
                segments = before + [(bt, level * before[-1][1])] + after_split
            rows.append(segments)
        per_lineage.append(rows)

    n_seg = max(len(seg) for rows in per_lineage for seg in rows)
    pad = 3.0 * t_max  # never reached: padding segments repeat the last rate
    starts = np.full((n_lineages, n_genes, n_seg), pad)
    alphas = np.zeros((n_lineages, n_genes, n_seg))
    for lin, rows in enumerate(per_lineage):
        for g, segments in enumerate(rows):
            st, rt = zip(*segments, strict=True)
            starts[lin, g, : len(st)] = st
            alphas[lin, g, : len(rt)] = rt
            alphas[lin, g, len(rt):] = rt[-1]

    # initial state: steady state of the first rate, or short of it (early repression)
    u0, s0 = kinetics.solve(
        torch.as_tensor(np.where(np.isinf(warmup), 1e6, warmup), dtype=torch.float64),
        0.0,
        0.0,
        torch.as_tensor(alphas[0, :, 0], dtype=torch.float64),
        torch.as_tensor(beta, dtype=torch.float64),
        torch.as_tensor(gamma, dtype=torch.float64),
    )
    return {
        "behaviour": behaviour,
        "alpha": alpha,
        "beta": beta,
        "gamma": gamma,
        "dispersion": dispersion,
        "t_on": t_on,
        "t_off": t_off,
        "basal": basal,
        "branch_specific": branch_specific,
        "winner": winner,
        "starts": starts,
        "alphas": alphas,
        "u0": u0.numpy(),
        "s0": s0.numpy(),
    }


# --------------------------------------------------------------------------------------
# evaluation and assembly
# --------------------------------------------------------------------------------------


def _schedule_tensors(genes: dict) -> dict[str, torch.Tensor]:
    """Schedule as float64 tensors, plus the state at every segment start ("knots")."""
    sched = {key: torch.as_tensor(np.asarray(genes[key]), dtype=torch.float64)
             for key in ("starts", "alphas", "beta", "gamma", "u0", "s0")}
    knot_u, knot_s = [], []
    for lin in range(sched["starts"].shape[0]):
        starts = sched["starts"][lin]  # (genes, segments)
        u, s, _ = kinetics.piecewise_solve(
            starts.T, starts, sched["alphas"][lin], sched["beta"], sched["gamma"],
            sched["u0"], sched["s0"],
        )  # (segments, genes): state at the start of each segment
        knot_u.append(u.T.contiguous())
        knot_s.append(s.T.contiguous())
    sched["knot_u"] = torch.stack(knot_u)
    sched["knot_s"] = torch.stack(knot_s)
    return sched


def _evaluate(
    schedule: dict[str, torch.Tensor],
    t: np.ndarray,
    lineage: np.ndarray,
    out: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free ``(u, s, du, ds)`` (float64, cells x genes) at times ``t``.

    Equivalent to :func:`kinetics.piecewise_solve` at ``t`` but cheaper for many cells:
    each (cell, gene) is solved only over its active segment, starting from the state at
    that segment's start (computed once per gene by ``piecewise_solve``).
    """
    beta = schedule["beta"][:, None]
    gamma = schedule["gamma"][:, None]
    n_genes = beta.shape[0]
    if out is None:
        out = [np.empty((t.shape[0], n_genes)) for _ in range(4)]
    # small blocks keep the ~30 temporaries of kinetics.solve in cache (several x faster)
    block = max(1, _EVAL_BLOCK_ENTRIES // n_genes)
    for first in range(0, t.shape[0], block):
        last = min(first + block, t.shape[0])
        for lin in np.unique(lineage[first:last]):
            rows = np.flatnonzero(lineage[first:last] == lin) + first
            starts = schedule["starts"][lin]  # (genes, segments)
            tt = torch.as_tensor(t[rows], dtype=torch.float64)
            query = tt[None, :].expand(n_genes, -1).contiguous()  # (genes, cells)
            seg = (torch.searchsorted(starts, query, right=True) - 1).clamp(min=0)
            start = torch.gather(starts, 1, seg)
            alpha = torch.gather(schedule["alphas"][lin], 1, seg)
            u0 = torch.gather(schedule["knot_u"][lin], 1, seg)
            s0 = torch.gather(schedule["knot_s"][lin], 1, seg)
            tau = (query - start).clamp(min=0.0)
            u, s = kinetics.solve(tau, u0, s0, alpha, beta, gamma)
            du, ds = kinetics.velocity(u, s, alpha, beta, gamma)
            for target, value in zip(out, (u, s, du, ds), strict=True):
                target[rows] = value.T.numpy()
    return out[0], out[1], out[2], out[3]



def _stack(chunks: list[sp.csr_matrix]) -> sp.csr_matrix:
    matrix = sp.vstack(chunks, format="csr")
    chunks.clear()
    matrix.sort_indices()
    return matrix


def _names(prefix: str, n: int, width: int) -> list[str]:
    width = max(width, len(str(n - 1)))
    return [f"{prefix}_{i:0{width}d}" for i in range(n)]


def _cell_types(
    t: np.ndarray, branch_codes: np.ndarray, n_lineages: int, t_max: float, bt: float | None
) -> tuple[np.ndarray, list[str], list[list[str]]]:
    """Cell types as consecutive time segments, and the transitions between them."""
    if bt is None:
        names = [f"stage_{k + 1}" for k in range(_N_CELL_TYPES_LINEAR)]
        edges = np.linspace(0.0, t_max, _N_CELL_TYPES_LINEAR + 1)[1:-1]
        codes = np.searchsorted(edges, t, side="right")
        transitions = [[names[k], names[k + 1]] for k in range(len(names) - 1)]
        return codes, names, transitions
    names = ["root_early", "root_late"]
    transitions = [["root_early", "root_late"]]
    for k in range(n_lineages):
        early, late = f"branch_{k + 1}_early", f"branch_{k + 1}_late"
        names += [early, late]
        transitions += [["root_late", early], [early, late]]
    mid_branch = bt + 0.5 * (t_max - bt)
    root_codes = (t >= 0.5 * bt).astype(np.int64)
    branch_type = 2 * (branch_codes - 1) + 2 + (t >= mid_branch)
    codes = np.where(branch_codes == 0, root_codes, branch_type)
    return codes, names, transitions


def _capture_times(
    rng: np.random.Generator, t: np.ndarray, n_capture: int, t_max: float
) -> np.ndarray:
    values = np.linspace(0.0, t_max, n_capture)
    spacing = values[1] - values[0]
    noisy = t + rng.normal(0.0, 0.6 * spacing, size=t.shape)
    idx = np.clip(np.rint(noisy / spacing), 0, n_capture - 1).astype(np.int64)
    return values[idx]


def _annotations(
    cells: dict, genes: dict, cfg: dict
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``obs``, ``var`` and ``uns`` of a simulated data set (see :func:`simulate`)."""
    n_cells, n_genes, t_max = cfg["n_cells"], cfg["n_genes"], cfg["t_max"]
    bifurcation = cfg["topology"] == "bifurcation"
    n_lineages = cfg["n_branches"] if bifurcation else 1
    branch_names = (["root"] + [f"branch_{k + 1}" for k in range(n_lineages)]
                    if bifurcation else ["root"])
    obs = pd.DataFrame(index=pd.Index(_names("cell", n_cells, 5), dtype=object))
    obs["true_t"] = cells["t"]
    obs["branch"] = pd.Categorical.from_codes(cells["branch_codes"], categories=branch_names)
    type_codes, type_names, transitions = _cell_types(
        cells["t"], cells["branch_codes"], n_lineages, t_max, cfg["branch_time"])
    obs["cell_type"] = pd.Categorical.from_codes(type_codes, categories=type_names)
    obs["size_factor"] = cells["size_factor"]
    if "capture_time" in cells:
        obs["capture_time"] = cells["capture_time"]
    var = pd.DataFrame(index=pd.Index(_names("gene", n_genes, 4), dtype=object))
    for key in ("alpha", "beta", "gamma", "t_on", "t_off", "basal"):
        var[f"true_{key}"] = genes[key]
    var["true_dispersion"] = genes["dispersion"] if cfg["noise"] == "nb" else np.zeros(n_genes)
    var["behaviour"] = pd.Categorical(genes["behaviour"], categories=list(BEHAVIOURS))
    var["branch_specific"] = genes["branch_specific"]
    var["specific_branch"] = [
        f"branch_{w + 1}" if spec else ""
        for w, spec in zip(genes["winner"], genes["branch_specific"], strict=True)
    ]
    uns = {
        "transitions": transitions,
        "simulation": _uns_arguments(cfg),
        "true_schedule": {
            "lineages": [f"branch_{k + 1}" for k in range(n_lineages)] if bifurcation
            else ["root"],
            **{key: genes[key] for key in ("starts", "alphas", "u0", "s0")},
        },
    }
    return obs, var, uns
