"""A simulator outside the model's ODE family: cell types as states of a regulatory network.

:func:`simulate_grn` draws spliced and unspliced counts from a gene regulatory network.
Master regulators are switched on and off by a cell-type programme; every other gene is
transcribed at a rate set by Hill-type activation or repression by its regulators'
spliced abundance. Unspliced and spliced molecules follow the chemical Langevin equation
of transcription, splicing and degradation, so a gene's transcription rate is neither
piecewise constant nor shared by the cells of a time point: it follows the cell's own
noisy regulators. Cells spend most of their time near the steady state of their type's
programme and move between types when the programme switches, as in a differentiation
tree. Counts are then captured by binomial sampling with a per-cell efficiency.
"""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._checks import InputError, check_int

#: Type graphs by name: each type's parent (``-1`` for the root), before relabelling.
TOPOLOGIES: dict[str, list[int]] = {
    "chain": [-1, 0, 1],
    "fork": [-1, 0, 0],
    "tree": [-1, 0, 0, 1, 1, 2, 2],
}


def simulate_grn(
    n_cells: int = 1000,
    n_genes: int = 100,
    topology: str = "fork",
    capture_noise: bool = True,
    capture_efficiency: float = 0.3,
    library_size_cv: float = 0.4,
    noise_strength: float = 1.0,
    seed: int = 0,
) -> anndata.AnnData:
    """Simulate counts from a stochastic gene regulatory network with known ground truth.

    Each cell type ``k`` has a master regulator ``M_k`` (one of the genes). A type's
    programme switches its master regulator on (transcription rate ``a``) and, with
    probability 1/2 per edge of the type graph, keeps its parent's on; every other master
    regulator is at its basal rate. A cell follows a path from the root type to a leaf
    type, spending a type-specific dwell time in each, and is captured at a uniformly
    drawn time of its path. Target genes have one or two regulators (master regulators
    or intermediate target genes) acting through Hill functions
    ``x^n / (K^n + x^n)`` (activation) or ``K^n / (K^n + x^n)`` (repression) of the
    regulator's spliced abundance relative to its fully induced level; some genes are
    constitutive. The unspliced ``u`` and spliced ``s`` molecules of every gene follow
    the chemical Langevin equation (Euler-Maruyama) of the three reactions
    transcription (rate ``alpha(x)``), splicing (``beta u``) and degradation
    (``gamma s``).

    Parameters
    ----------
    n_cells, n_genes
        Size of the data set; ``n_genes`` must exceed the number of cell types.
    topology
        ``"chain"`` (three types in a line), ``"fork"`` (a root type and two daughters)
        or ``"tree"`` (seven types on three levels).
    capture_noise
        Observe each molecule with probability ``capture_efficiency`` times the cell's
        library-size factor (binomial sampling); otherwise the molecule numbers are
        rounded and reported as they are.
    capture_efficiency
        Mean capture probability, in ``(0, 1]``.
    library_size_cv
        Coefficient of variation of the log-normal per-cell library-size factors.
    noise_strength
        Scale of the intrinsic (Langevin) noise; ``0`` gives the deterministic
        trajectories of the regulatory network.
    seed
        Seed of :func:`numpy.random.default_rng`.

    Returns
    -------
    anndata.AnnData
        ``n_cells x n_genes`` with raw integer ``layers['spliced']`` and
        ``layers['unspliced']`` (CSR), ``X`` a float copy of the spliced counts;
        ``layers['true_velocity']`` / ``layers['true_velocity_u']``: ``ds/dt`` and
        ``du/dt`` of the noise-free trajectory of the cell's path at its time
        (molecules per time unit), and ``layers['true_spliced']`` /
        ``layers['true_unspliced']`` that noise-free state; ``obs['true_t']`` (time
        along the path), ``obs['cell_type']`` (the type whose programme is active),
        ``obs['type_depth']`` (its depth in the type graph, root 0), ``obs['leaf']``
        (the path's end type), ``obs['size_factor']``; ``var['true_beta']``,
        ``var['true_gamma']``, ``var['true_alpha']`` (fully induced rate),
        ``var['role']`` (``'master'``, ``'intermediate'``, ``'target'``,
        ``'constitutive'``); ``uns['transitions']`` (type graph as ``[parent, child]``
        pairs) and ``uns['grn']`` (every parameter of the network, enough to integrate
        it again).
    """
    n_cells = check_int(n_cells, "n_cells", minimum=2)
    n_genes = check_int(n_genes, "n_genes", minimum=1)
    seed = check_int(seed, "seed", minimum=0)
    if topology not in TOPOLOGIES:
        raise InputError(f"topology must be one of {sorted(TOPOLOGIES)}, got {topology!r}")
    parents = np.asarray(TOPOLOGIES[topology])
    n_types = len(parents)
    if n_genes <= n_types:
        raise InputError(f"n_genes must exceed the {n_types} cell types of {topology!r}, "
                         f"got {n_genes}")
    if not 0 < capture_efficiency <= 1:
        raise InputError(f"capture_efficiency must be in (0, 1], got {capture_efficiency}")
    if library_size_cv < 0 or noise_strength < 0:
        raise InputError("library_size_cv and noise_strength must be >= 0")
    rng = np.random.default_rng(seed)
    net = _draw_network(rng, n_genes, parents)
    paths, switch_times, true_t = _draw_paths(rng, n_cells, parents, net["dwell"])
    state, drift = _integrate(rng, net, paths, switch_times, true_t, noise_strength)
    types = np.array([paths[i][np.searchsorted(switch_times[i], true_t[i], side="right") - 1]
                      for i in range(n_cells)])
    depth = _depths(parents)
    size_factor = rng.lognormal(0.0, np.sqrt(np.log1p(library_size_cv ** 2)), n_cells)
    size_factor /= size_factor.mean()
    counts = {}
    for key in ("unspliced", "spliced"):
        molecules = np.rint(np.clip(state["noisy_" + key], 0, None)).astype(np.int64)
        if capture_noise:
            p = np.clip(capture_efficiency * size_factor, 0, 1)[:, None]
            molecules = rng.binomial(molecules, np.broadcast_to(p, molecules.shape))
        counts[key] = sp.csr_matrix(molecules.astype(np.int32))
    names = [f"type_{k}" for k in range(n_types)]
    obs = pd.DataFrame({
        "true_t": true_t,
        "cell_type": pd.Categorical([names[k] for k in types], categories=names),
        "type_depth": depth[types],
        "leaf": pd.Categorical([names[p[-1]] for p in paths], categories=names),
        "size_factor": size_factor,
    }, index=[f"cell_{i}" for i in range(n_cells)])
    var = pd.DataFrame({
        "true_alpha": net["a"], "true_beta": net["beta"], "true_gamma": net["gamma"],
        "role": net["role"],
    }, index=[f"gene_{g}" for g in range(n_genes)])
    adata = anndata.AnnData(X=counts["spliced"].astype(np.float32), obs=obs, var=var)
    adata.layers["spliced"] = counts["spliced"]
    adata.layers["unspliced"] = counts["unspliced"]
    adata.layers["true_spliced"] = state["spliced"].astype(np.float32)
    adata.layers["true_unspliced"] = state["unspliced"].astype(np.float32)
    adata.layers["true_velocity"] = drift["spliced"].astype(np.float32)
    adata.layers["true_velocity_u"] = drift["unspliced"].astype(np.float32)
    adata.uns["transitions"] = [[names[p], names[k]] for k, p in enumerate(parents) if p >= 0]
    adata.uns["grn"] = {key: np.asarray(value) for key, value in net.items()
                        if key not in ("role",)}
    adata.uns["simulation"] = {
        "simulator": "pyro_velo.datasets.simulate_grn", "topology": topology,
        "capture_noise": capture_noise, "capture_efficiency": capture_efficiency,
        "library_size_cv": library_size_cv, "noise_strength": noise_strength, "seed": seed,
    }
    return adata


def _depths(parents: np.ndarray) -> np.ndarray:
    depth = np.zeros(len(parents), dtype=np.int64)
    for k, p in enumerate(parents):
        depth[k] = 0 if p < 0 else depth[p] + 1  # parents come before their children
    return depth


def _draw_network(rng: np.random.Generator, n_genes: int, parents: np.ndarray) -> dict:
    """Rates, roles, regulators and programmes of the network (see :func:`simulate_grn`)."""
    n_types = len(parents)
    role = np.full(n_genes, "target", dtype=object)
    role[:n_types] = "master"
    rest = np.arange(n_types, n_genes)
    shuffled = rng.permutation(rest)
    n_inter = max(1, len(rest) // 10) if len(rest) > 2 else 0
    n_const = len(rest) // 10
    role[shuffled[:n_inter]] = "intermediate"
    role[shuffled[n_inter:n_inter + n_const]] = "constitutive"
    masters = np.arange(n_types)
    inter = np.sort(shuffled[:n_inter])
    regulators = np.full((n_genes, 2), -1, dtype=np.int64)
    activates = np.ones((n_genes, 2), dtype=bool)
    for g in range(n_types, n_genes):
        if role[g] == "constitutive":
            continue
        # intermediates listen to master regulators only; targets to either, which
        # gives two-step cascades with their own delays
        pool = masters if role[g] == "intermediate" or not len(inter) else np.concatenate(
            [masters, inter])
        k = 1 if rng.random() < 0.6 else 2
        regulators[g, :k] = rng.choice(pool, size=min(k, len(pool)), replace=False)
        activates[g, :k] = rng.random(k) < 0.7
    programme = np.zeros((n_types, n_types))  # type x master regulator: input on or off
    for k, p in enumerate(parents):
        programme[k, k] = 1.0
        if p >= 0 and rng.random() < 0.5:
            programme[k, p] = 1.0
    return {
        "role": role,
        "a": rng.lognormal(np.log(15.0), 0.7, n_genes),
        "basal": rng.uniform(0.0, 0.1, n_genes),
        "beta": rng.lognormal(np.log(1.0), 0.4, n_genes),
        "gamma": rng.lognormal(np.log(0.4), 0.5, n_genes),
        "regulators": regulators,
        "activates": activates,
        "hill_k": rng.uniform(0.2, 0.6, (n_genes, 2)),
        "hill_n": rng.uniform(2.0, 4.0, (n_genes, 2)),
        "programme": programme,
        "parents": parents,
        "dwell": rng.uniform(4.0, 7.0, n_types),
    }


def _draw_paths(rng: np.random.Generator, n_cells: int, parents: np.ndarray,
                dwell: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Each cell's path of types (root to a leaf), the times it enters them, its time."""
    n_types = len(parents)
    leaves = [k for k in range(n_types) if k not in set(parents.tolist())]
    weights = rng.dirichlet(np.full(len(leaves), 3.0))
    paths, switches, times = [], [], np.empty(n_cells)
    chosen = rng.choice(len(leaves), size=n_cells, p=weights)
    for i, leaf_index in enumerate(chosen):
        path = [leaves[leaf_index]]
        while parents[path[-1]] >= 0:
            path.append(int(parents[path[-1]]))
        path = np.asarray(path[::-1])
        enter = np.concatenate([[0.0], np.cumsum(dwell[path])[:-1]])
        paths.append(path)
        switches.append(enter)
        times[i] = rng.uniform(0.0, enter[-1] + dwell[path[-1]])
    return paths, switches, times


def transcription_rate(net: dict, s: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """``alpha(x)`` of every gene given spliced abundances and master-regulator inputs.

    Parameters
    ----------
    net
        The network (``adata.uns['grn']`` of :func:`simulate_grn`).
    s
        ``(N, G)`` spliced abundances.
    inputs
        ``(N, n_types)`` programme inputs (0 or 1) of the master regulators.
    """
    a, basal = np.asarray(net["a"]), np.asarray(net["basal"])
    regulators = np.asarray(net["regulators"])
    full = a / np.asarray(net["gamma"])  # a regulator's spliced level when fully induced
    idx = np.clip(regulators, 0, None)
    x = np.clip(s[:, idx] / full[idx], 0, None)  # (N, G, 2)
    kn = np.asarray(net["hill_k"]) ** np.asarray(net["hill_n"])
    xn = x ** np.asarray(net["hill_n"])
    act = xn / (kn + xn)
    hill = np.where(np.asarray(net["activates"]), act, 1.0 - act)
    hill = np.where(regulators >= 0, hill, 1.0).prod(-1)
    hill[:, :inputs.shape[1]] = inputs  # master regulators follow the programme
    return a * (basal + (1.0 - basal) * hill)


def _integrate(rng: np.random.Generator, net: dict, paths: list[np.ndarray],
               switches: list[np.ndarray], true_t: np.ndarray, noise_strength: float
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Noisy and noise-free states of every cell at its time, and the noise-free drift.

    All cells start at the steady state of the root programme and are integrated
    together on one time grid; each cell's state is recorded at the step nearest its
    time.
    """
    programme = np.asarray(net["programme"])
    beta, gamma = np.asarray(net["beta"]), np.asarray(net["gamma"])
    n_cells, n_genes = len(paths), len(beta)
    dt = min(0.05, 0.2 / float(max(beta.max(), gamma.max())))
    steps = np.rint(true_t / dt).astype(np.int64)
    u, s = _steady_state(net, programme[0])
    clean = {"u": np.tile(u, (n_cells, 1)), "s": np.tile(s, (n_cells, 1))}
    noisy = {key: value.copy() for key, value in clean.items()}
    out = {key: np.empty((n_cells, n_genes)) for key in
           ("unspliced", "spliced", "noisy_unspliced", "noisy_spliced")}
    drift = {key: np.empty((n_cells, n_genes)) for key in ("unspliced", "spliced")}
    max_len = max(len(p) for p in paths)
    path_types = np.array([np.pad(p, (0, max_len - len(p)), constant_values=p[-1])
                           for p in paths])
    path_enter = np.array([np.pad(e, (0, max_len - len(e)), constant_values=np.inf)
                           for e in switches])
    rows = np.arange(n_cells)
    for step in range(int(steps.max()) + 1):
        t = step * dt
        active = path_types[rows, (path_enter <= t).sum(1) - 1]
        inputs = programme[active]
        alpha_clean = transcription_rate(net, clean["s"], inputs)
        du = alpha_clean - beta * clean["u"]
        ds = beta * clean["u"] - gamma * clean["s"]
        now = steps == step
        if now.any():
            for key, value in (("unspliced", clean["u"]), ("spliced", clean["s"]),
                               ("noisy_unspliced", noisy["u"]), ("noisy_spliced", noisy["s"])):
                out[key][now] = value[now]
            drift["unspliced"][now], drift["spliced"][now] = du[now], ds[now]
        clean["u"] = clean["u"] + dt * du
        clean["s"] = clean["s"] + dt * ds
        noisy["u"], noisy["s"] = _langevin_step(rng, net, noisy["u"], noisy["s"], inputs, dt,
                                                noise_strength)
    return out, drift


def _langevin_step(rng: np.random.Generator, net: dict, u: np.ndarray, s: np.ndarray,
                   inputs: np.ndarray, dt: float, noise_strength: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One Euler-Maruyama step of the chemical Langevin equation, reflected at zero."""
    beta, gamma = np.asarray(net["beta"]), np.asarray(net["gamma"])
    transcription = transcription_rate(net, s, inputs)
    splicing, degradation = beta * u, gamma * s
    scale = noise_strength * np.sqrt(dt)
    w_tx, w_sp, w_dg = (rng.standard_normal(u.shape) * scale for _ in range(3))
    noise_sp = np.sqrt(splicing) * w_sp
    u_new = u + dt * (transcription - splicing) + np.sqrt(transcription) * w_tx - noise_sp
    s_new = s + dt * (splicing - degradation) + noise_sp - np.sqrt(degradation) * w_dg
    return np.abs(u_new), np.abs(s_new)


def _steady_state(net: dict, inputs: np.ndarray, tol: float = 1e-8
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free steady state of the network under one programme (fixed-point iteration
    of ``s = alpha(s) / gamma``, ``u = alpha(s) / beta``; the regulatory graph has no
    cycles, so it converges in as many steps as the graph is deep)."""
    beta, gamma = np.asarray(net["beta"]), np.asarray(net["gamma"])
    s = np.zeros((1, len(beta)))
    for _ in range(50):
        alpha = transcription_rate(net, s, inputs[None, :])
        new = alpha / gamma
        if np.abs(new - s).max() < tol:
            break
        s = new
    return (alpha / beta)[0], new[0]
