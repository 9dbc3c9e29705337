"""The regulatory-network simulator: its dynamics against an independent integration."""

import numpy as np
import pytest
from scipy.integrate import solve_ivp

import pyro_velo as pv
from pyro_velo._checks import InputError


def _rhs_from_parameters(grn: dict, inputs: np.ndarray):
    """The network's ODE written from its stored parameters alone (not the simulator's
    own rate function): Hill activation x^n / (K^n + x^n), repression 1 - that."""
    a, basal = grn["a"], grn["basal"]
    beta, gamma = grn["beta"], grn["gamma"]
    regulators, activates = grn["regulators"], grn["activates"]
    n_types = len(grn["parents"])
    n_genes = len(a)

    def rhs(_t, y):
        u, s = y[:n_genes], y[n_genes:]
        level = np.ones(n_genes)
        for g in range(n_genes):
            if g < n_types:
                level[g] = inputs[g]
                continue
            for r in range(2):
                j = regulators[g, r]
                if j < 0:
                    continue
                x = max(s[j] / (a[j] / gamma[j]), 0.0)
                k, n = grn["hill_k"][g, r], grn["hill_n"][g, r]
                act = x ** n / (k ** n + x ** n)
                level[g] *= act if activates[g, r] else 1.0 - act
        alpha = a * (basal + (1 - basal) * level)
        return np.concatenate([alpha - beta * u, beta * u - gamma * s])

    return rhs


@pytest.mark.parametrize("topology", ["chain", "fork", "tree"])
def test_noise_free_trajectories_match_an_independent_integration(topology):
    adata = pv.datasets.simulate_grn(60, 30, topology, capture_noise=False,
                                     noise_strength=0.0, seed=3)
    grn = adata.uns["grn"]
    programme, dwell, parents = grn["programme"], grn["dwell"], grn["parents"]
    n_genes = adata.n_vars
    root_rhs = _rhs_from_parameters(grn, programme[0])
    start = solve_ivp(root_rhs, (0, 200), np.zeros(2 * n_genes), rtol=1e-8, atol=1e-8).y[:, -1]
    names = list(adata.obs["cell_type"].cat.categories)
    for i in np.argsort(adata.obs["true_t"].to_numpy())[-10:]:  # the cells furthest along
        path = [names.index(adata.obs["leaf"].iloc[i])]
        while parents[path[-1]] >= 0:
            path.append(int(parents[path[-1]]))
        path = path[::-1]
        enter = np.concatenate([[0.0], np.cumsum(dwell[path])[:-1]])
        t_cell, y = adata.obs["true_t"].iloc[i], start
        for k, t0 in zip(path, enter, strict=True):
            if t0 >= t_cell:
                break
            t1 = min(t_cell, enter[path.index(k) + 1] if path.index(k) + 1 < len(path)
                     else np.inf)
            y = solve_ivp(_rhs_from_parameters(grn, programme[k]), (t0, t1), y,
                          rtol=1e-8, atol=1e-8).y[:, -1]
        simulated = np.concatenate([adata.layers["true_unspliced"][i],
                                    adata.layers["true_spliced"][i]])
        # Euler steps of at most 0.05 time units, recorded at the nearest step
        np.testing.assert_allclose(simulated, y, rtol=0.05, atol=0.05 * np.abs(y).max())


def test_true_velocity_is_the_drift_of_the_noise_free_state():
    adata = pv.datasets.simulate_grn(50, 20, "fork", seed=1)
    beta, gamma = adata.var["true_beta"].to_numpy(), adata.var["true_gamma"].to_numpy()
    u, s = adata.layers["true_unspliced"], adata.layers["true_spliced"]
    np.testing.assert_allclose(adata.layers["true_velocity"], beta * u - gamma * s,
                               rtol=1e-4, atol=1e-3)


def test_langevin_noise_of_an_unregulated_gene_is_poisson_like():
    """At a constant input, a master regulator's unspliced molecules are a birth-death
    process: stationary variance equal to the mean."""
    adata = pv.datasets.simulate_grn(3000, 10, "chain", capture_noise=False, seed=0)
    first_type = (adata.obs["cell_type"] == "type_0").to_numpy()
    late = first_type & (adata.obs["true_t"].to_numpy() > 2.0)
    u = adata.layers["unspliced"][late, 0].toarray().ravel().astype(float)
    fano = u.var() / u.mean()
    assert 0.7 < fano < 1.4


def test_capture_noise_thins_counts_and_cells_sit_at_type_states():
    kwargs = dict(n_cells=400, n_genes=40, topology="tree", seed=2)
    raw = pv.datasets.simulate_grn(capture_noise=False, **kwargs)
    captured = pv.datasets.simulate_grn(capture_noise=True, capture_efficiency=0.2, **kwargs)
    ratio = captured.layers["spliced"].sum() / raw.layers["spliced"].sum()
    assert 0.1 < ratio < 0.3
    assert set(raw.obs["cell_type"].cat.categories) == {f"type_{k}" for k in range(7)}
    assert raw.obs["type_depth"].max() == 2
    assert len(raw.uns["transitions"]) == 6
    # every type has its own expression programme: mean profiles differ between types
    means = [raw.layers["true_spliced"][(raw.obs["cell_type"] == k).to_numpy()].mean(0)
             for k in ("type_0", "type_1")]
    assert np.abs(means[0] - means[1]).max() > 1.0


def test_same_seed_same_data_and_bad_input():
    a = pv.datasets.simulate_grn(50, 20, "chain", seed=5)
    b = pv.datasets.simulate_grn(50, 20, "chain", seed=5)
    assert (a.layers["spliced"] != b.layers["spliced"]).nnz == 0
    with pytest.raises(InputError, match="topology"):
        pv.datasets.simulate_grn(50, 20, "cycle")
    with pytest.raises(InputError, match="n_genes"):
        pv.datasets.simulate_grn(50, 5, "tree")
    with pytest.raises(InputError, match="capture_efficiency"):
        pv.datasets.simulate_grn(50, 20, capture_efficiency=0.0)
