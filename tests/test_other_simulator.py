"""The model on data from a simulator we did not write: scVelo's.

``pv.datasets.simulate`` was written together with the model, so a fit that only works
there may have learnt its conventions. ``pv.datasets.simulate_scvelo`` wraps
:func:`scvelo.datasets.simulation` (one lineage, every gene switched on at ``t = 0`` and
off at its own time, Gaussian noise, no library-size variation).
"""

import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.stats import spearmanr

import pyro_velo as pv


def test_true_velocity_agrees_with_an_ode_solver():
    adata = pv.datasets.simulate_scvelo(n_cells=300, n_genes=6, seed=4)
    t_cells = adata.obs["true_t"].to_numpy()
    for g in range(adata.n_vars):
        alpha, beta, gamma, t_off = (adata.var[k].iloc[g] for k in
                                     ("true_alpha", "true_beta", "true_gamma", "true_t_off"))

        def rhs(t, y, alpha=alpha, beta=beta, gamma=gamma, t_off=t_off):
            rate = alpha if t < t_off else 0.0
            return [rate - beta * y[0], beta * y[0] - gamma * y[1]]

        # integrate in two pieces so that the solver never steps over the switch
        opts = dict(rtol=1e-10, atol=1e-12, dense_output=True)
        first = solve_ivp(rhs, (0.0, t_off), [0.0, 0.0], **opts)
        second = solve_ivp(rhs, (t_off, t_cells.max() + 1.0), first.y[:, -1], **opts)
        before = t_cells < t_off
        u, s = np.where(before, first.sol(np.minimum(t_cells, t_off)),
                        second.sol(np.maximum(t_cells, t_off)))
        rate = np.where(before, alpha, 0.0)
        expected_ds = beta * u - gamma * s
        expected_du = rate - beta * u
        got_ds = adata.layers["true_velocity"][:, g]
        got_du = adata.layers["true_velocity_u"][:, g]
        scale = np.abs(expected_du).max()
        np.testing.assert_allclose(got_du, expected_du, atol=1e-4 * scale)
        np.testing.assert_allclose(got_ds, expected_ds, atol=1e-4 * np.abs(expected_ds).max())


def test_simulate_scvelo_is_seeded_and_leaves_global_generators_alone():
    import random

    np.random.seed(123)  # noqa: NPY002 - the global stream is what is checked
    random.seed(123)
    expected = (np.random.get_state()[1].copy(), random.getstate())  # noqa: NPY002
    a = pv.datasets.simulate_scvelo(n_cells=100, n_genes=5, seed=2)
    assert np.array_equal(np.random.get_state()[1], expected[0])  # noqa: NPY002
    assert random.getstate() == expected[1]
    b = pv.datasets.simulate_scvelo(n_cells=100, n_genes=5, seed=2)
    c = pv.datasets.simulate_scvelo(n_cells=100, n_genes=5, seed=3)
    assert np.array_equal(a.layers["spliced"], b.layers["spliced"])
    assert not np.array_equal(a.layers["spliced"], c.layers["spliced"])
    assert a.shape == (100, 5)
    assert np.all(a.layers["spliced"] >= 0) and np.all(a.layers["unspliced"] >= 0)
    assert np.isclose(a.obs["true_t"].max(), 20.0, atol=0.01)


@pytest.mark.parametrize("kwargs", [{"n_cells": 1}, {"n_genes": 0}, {"noise_level": -1.0},
                                    {"t_max": 0.0}, {"seed": -1}, {"n_cells": 2.5}])
def test_simulate_scvelo_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        pv.datasets.simulate_scvelo(**{"n_cells": 50, "n_genes": 5, **kwargs})


@pytest.mark.slow
def test_default_model_recovers_time_and_velocity_on_scvelo_data():
    adata = pv.datasets.simulate_scvelo(n_cells=800, n_genes=60, seed=1)
    # no library-size variation here: total-count normalisation would turn the
    # abundances into proportions, so keep the totals (see pp.preprocess)
    with pytest.warns(UserWarning, match="non-integer"):  # abundances, not counts
        pv.pp.preprocess(adata, min_shared_counts=None, size_factors="neighbourhood")
    vae = pv.VeloVAE(adata, seed=0, progress_bar=False)
    vae.train(seed=0, progress_bar=False)
    t = adata.obs["true_t"].to_numpy()
    # measured (model seeds 0 / 1): Spearman .969 / .970, cosine .968 / .950
    assert spearmanr(vae.get_latent_time(), t)[0] >= 0.94
    velocity, _ = vae.get_velocity()
    genes = vae.data.fitted
    v, true_v = velocity[:, genes], adata.layers["true_velocity"][:, genes]
    moving = np.linalg.norm(true_v, axis=1) > 0  # the first cell sits at the origin
    v, true_v = v[moving], true_v[moving]
    cosine = (v * true_v).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(true_v, axis=1))
    assert cosine.mean() >= 0.9
