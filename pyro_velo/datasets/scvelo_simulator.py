"""Data from scVelo's simulator, an independent check of the model.

:func:`~pyro_velo.datasets.simulate` was written together with the model; a fit that only
works on it may have learnt its conventions. :func:`simulate_scvelo` wraps
:func:`scvelo.datasets.simulation` and adds the true velocities.
"""

from __future__ import annotations

import anndata
import numpy as np

from .._checks import check_int
from ._generative import _check_real

__all__ = ["simulate_scvelo"]


def simulate_scvelo(
    n_cells: int = 1000,
    n_genes: int = 100,
    noise_level: float = 1.0,
    t_max: float = 20.0,
    seed: int = 0,
) -> anndata.AnnData:
    """Data from scVelo's simulator, with random kinetics per gene and the true velocity.

    :func:`simulate` was written together with the model; a fit that only works on it
    may have learnt its conventions. This calls :func:`scvelo.datasets.simulation`
    (a linear trajectory: every gene switched on at ``t = 0`` and off at its own time,
    Gaussian noise of ``noise_level`` times 10% of the gene's 99th percentile, clipped
    at zero; no library-size variation) with per-gene rates drawn here, and adds the
    noise-free velocities computed with scVelo's own :class:`scvelo.core.SplicingDynamics`.

    Parameters
    ----------
    n_cells, n_genes
        Size of the data set (at least 2 cells, at least 1 gene).
    noise_level
        scVelo's ``noise_level`` (``>= 0``).
    t_max
        Length of the trajectory (``> 0``); scVelo's cell times are rescaled to it.
    seed
        Seed of the rates, switch times, cell times and noise. scVelo seeds NumPy's and
        Python's global generators; their states are restored afterwards.

    Returns
    -------
    anndata.AnnData
        ``n_cells x n_genes`` with dense float ``layers['spliced']`` and
        ``layers['unspliced']`` (noisy abundances, not integers), ``X`` a copy of the
        spliced layer, ``obs['true_t']`` (scVelo rounds it to 0.01),
        ``layers['true_velocity']`` (``ds/dt``) and ``layers['true_velocity_u']``
        (``du/dt``) of the noise-free state at ``obs['true_t']`` (so a cell within 0.005
        of a gene's switch may be placed on the other side of it), and in ``var`` the
        kinetics: ``true_alpha``, ``true_beta``,
        ``true_gamma``, ``true_t_off`` (switch-off time; scVelo's ``true_t_``).
        Per-gene rates: ``alpha ~ LogNormal(log 5, 0.5)``, ``beta ~ LogNormal(log 0.5,
        0.5)``, ``gamma ~ LogNormal(log 0.3, 0.5)`` (medians are scVelo's defaults);
        switch-off at ``U(0.1, 0.9) * t_max``.
    """
    import random

    import scvelo.datasets
    from scvelo.core import SplicingDynamics

    n_cells = check_int(n_cells, "n_cells", minimum=2)
    n_genes = check_int(n_genes, "n_genes", minimum=1)
    noise_level = _check_real("noise_level", noise_level)
    t_max = _check_real("t_max", t_max, positive=True)
    seed = check_int(seed, "seed", minimum=0)
    rng = np.random.default_rng(seed)
    alpha = rng.lognormal(np.log(5.0), 0.5, n_genes)
    beta = rng.lognormal(np.log(0.5), 0.5, n_genes)
    gamma = rng.lognormal(np.log(0.3), 0.5, n_genes)
    switches = rng.uniform(0.1, 0.9, n_genes)
    # scVelo reseeds the global generators: keep the caller's streams as they were
    numpy_state, python_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        adata = scvelo.datasets.simulation(
            n_obs=n_cells, n_vars=n_genes, alpha=alpha, beta=beta, gamma=gamma,
            switches=switches, noise_level=noise_level, t_max=t_max, random_seed=seed)
    finally:
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(python_state)
    t = adata.obs["true_t"].to_numpy(dtype=np.float64)[:, None]
    # scVelo's switch time is that of the last cell before the switch fraction
    t_off = adata.var["true_t_"].to_numpy(dtype=np.float64)
    on = SplicingDynamics(alpha=alpha, beta=beta, gamma=gamma, initial_state=[0.0, 0.0])
    u_on, s_on = on.get_solution(t, stacked=False)
    u_sw, s_sw = on.get_solution(t_off, stacked=False)
    off = SplicingDynamics(alpha=0.0, beta=beta, gamma=gamma, initial_state=[u_sw, s_sw])
    u_off, s_off = off.get_solution(np.maximum(t - t_off, 0.0), stacked=False)
    after = t >= t_off
    u = np.where(after, u_off, u_on)
    s = np.where(after, s_off, s_on)
    rate = np.where(after, 0.0, alpha)
    adata.layers["true_velocity"] = (beta * u - gamma * s).astype(np.float32)
    adata.layers["true_velocity_u"] = (rate - beta * u).astype(np.float32)
    adata.var["true_t_off"] = t_off
    adata.X = np.array(adata.layers["spliced"], dtype=np.float32)
    adata.uns["simulation"] = {"simulator": "scvelo.datasets.simulation", "seed": seed,
                               "noise_level": noise_level, "t_max": t_max}
    return adata
