"""Direction of time from the data's own velocity field (pyro_velo.orientation)."""

import numpy as np
import pytest
import scipy.sparse as sp

import pyro_velo as pv
from pyro_velo.orientation import (
    FlowEvidence,
    edge_flow,
    edge_flows,
    flow_evidence,
    hodge_potential,
    steady_state_velocity,
)
from pyro_velo.policies import OrientationPolicy, StartCandidate


def _chain_graph(n: int) -> sp.csr_matrix:
    rows = np.arange(n - 1)
    graph = sp.csr_matrix((np.ones(n - 1), (rows, rows + 1)), shape=(n, n))
    return graph + graph.T


def test_steady_state_velocity_vanishes_on_the_steady_state_line():
    rng = np.random.default_rng(0)
    s = rng.uniform(0.5, 3.0, (100, 4))
    ratio = np.array([0.2, 0.5, 1.0, 2.0])
    u = ratio * s
    np.testing.assert_allclose(steady_state_velocity(u, s), 0.0, atol=1e-10)
    # cells with unspliced above the line of the others (induction) move forward
    induced = u.copy()
    induced[:10] *= 1.5
    velocity = steady_state_velocity(induced, s)
    assert (velocity[:10] > 0).all() and (velocity[10:] < 0).all()


def test_potential_rises_along_the_flow_and_has_no_root_to_choose():
    n = 30
    x = np.linspace(0, 1, n)[:, None] * np.ones((1, 3))
    forward = np.ones((n, 3))
    phi = hodge_potential(edge_flow(_chain_graph(n), forward, x))
    assert np.all(np.diff(phi) > 0)
    phi_back = hodge_potential(edge_flow(_chain_graph(n), -forward, x))
    np.testing.assert_allclose(phi_back, -phi, atol=1e-6)


def _edge_flow_reference(graph, velocity, x):
    """The edge flow written out edge by edge (the definition in edge_flow's docstring)."""
    graph = sp.coo_matrix(graph + graph.T)
    flow = np.zeros(graph.shape)

    def cos(a, b):
        norm = np.linalg.norm(a) * np.linalg.norm(b)
        return a @ b / norm if norm > 0 else 0.0

    for i, j in zip(graph.row, graph.col, strict=True):
        if i != j:
            flow[i, j] = (cos(velocity[i], x[j] - x[i]) - cos(velocity[j], x[i] - x[j])) / 2
    return flow


def test_edge_flows_of_gene_subsets_match_each_subsets_own_flow(monkeypatch):
    rng = np.random.default_rng(0)
    n, n_genes = 40, 9
    graph = sp.random(n, n, density=0.15, random_state=1, format="csr")
    velocity, x = rng.normal(size=(n, n_genes)), rng.normal(size=(n, n_genes))
    velocity[3] = 0.0  # a cell without velocity has no flow out of it
    subsets = [slice(None), np.array([4, 0, 7]), np.array([8, 1, 2, 5])]
    # blocks of a few edges: the blocks' seams must not change anything
    monkeypatch.setattr(pv.orientation, "EDGE_BLOCK_ENTRIES", 2 * n_genes + 1)
    flows = edge_flows(graph, velocity, x, subsets)
    for genes, flow in zip(subsets, flows, strict=True):
        reference = _edge_flow_reference(graph, velocity[:, genes], x[:, genes])
        np.testing.assert_allclose(flow.toarray(), reference, atol=1e-12)
        assert set(zip(*flow.nonzero(), strict=True)) == set(
            zip(*reference.nonzero(), strict=True))
    assert flows[0][3].nnz == np.count_nonzero(_edge_flow_reference(graph, velocity, x)[3])


def test_flow_potential_orders_cells_of_an_ode_simulation():
    adata = pv.datasets.simulate(400, 40, "linear", seed=1)
    pv.pp.preprocess(adata, random_state=0)
    evidence = flow_evidence(np.asarray(adata.layers["Mu"]), np.asarray(adata.layers["Ms"]),
                             adata.obsp["connectivities"])
    true_t = adata.obs["true_t"].to_numpy()
    assert evidence.agreement(true_t) > 0.8
    assert evidence.agreement(-true_t) < -0.8
    assert evidence.reproducibility > 0.5


def test_flow_of_noise_is_not_reproducible():
    rng = np.random.default_rng(0)
    u, s = rng.gamma(2.0, 1.0, (300, 40)), rng.gamma(2.0, 1.0, (300, 40))
    from pyro_velo.initialize import knn_graph

    evidence = flow_evidence(u, s, knn_graph(np.hstack([u, s]), n_neighbors=15))
    assert abs(evidence.reproducibility) < 0.3
    assert OrientationPolicy().report(evidence, rng.random(300))["status"] == "not identified"


def _evidence(reproducibility: float) -> FlowEvidence:
    return FlowEvidence(potential=np.arange(10.0), reproducibility=reproducibility)


def test_policy_keeps_the_elbo_choice_unless_it_contradicts_a_trusted_flow():
    policy = OrientationPolicy()
    agreeing = [StartCandidate("steady state", 1.0, 0.9), StartCandidate("pseudotime", 2.0, 0.1)]
    assert policy.choose(agreeing, _evidence(0.8)).name == "steady state"
    assert not policy.wants_flow_start(agreeing, _evidence(0.8))
    reversed_best = [StartCandidate("steady state", 1.0, -0.6)]
    assert policy.wants_flow_start(reversed_best, _evidence(0.8))
    reversed_best.append(StartCandidate("flow potential", 1.5, 0.7))
    assert policy.choose(reversed_best, _evidence(0.8)).name == "flow potential"
    # an untrusted (irreproducible) flow does not vote: the ELBO decides
    assert policy.choose(reversed_best, _evidence(0.1)).name == "steady state"
    assert not policy.wants_flow_start(reversed_best[:1], _evidence(0.1))


def test_policy_flags_lost_order_and_reports_status():
    policy = OrientationPolicy()
    assert policy.lost_order(0.6, -0.1, _evidence(0.8))
    assert not policy.lost_order(0.6, 0.5, _evidence(0.8))
    assert not policy.lost_order(0.1, -0.5, _evidence(0.8))  # nothing to lose
    assert not policy.lost_order(0.6, -0.1, _evidence(0.1))
    assert not policy.lost_order(None, -0.1, _evidence(0.8))
    t = np.arange(10.0)
    assert policy.report(_evidence(0.8), t)["status"] == "forward"
    assert policy.report(_evidence(0.8), -t)["status"] == "reversed"
    assert policy.report(_evidence(0.8), -t, given="root")["status"] == "given"
    assert policy.report(None, t)["status"] == "not identified"


def test_report_checks_the_time_against_a_given_order():
    """A root or capture times set the direction; a time that runs against their order
    is reported as reversed, with its agreement, whatever the flow says."""
    policy, t = OrientationPolicy(), np.arange(10.0)
    order = np.where(np.arange(10) < 5, np.nan, np.arange(10.0))  # known for half
    following = policy.report(_evidence(0.8), t, given="capture times", given_order=order)
    assert following["status"] == "given" and following["given_agreement"] == pytest.approx(1.0)
    against = policy.report(_evidence(0.8), t, given="root", given_order=-order)
    assert against["status"] == "reversed" and against["given_agreement"] == pytest.approx(-1.0)
    assert against["given_by"] == "root"
    assert np.isnan(policy.report(_evidence(0.8), t)["given_agreement"])
    with pytest.warns(UserWarning, match="runs against the given root .*-1.00"):
        pv.orientation.warn_if_unidentified(against)


def test_an_order_lagging_a_reproducible_flow_is_not_corroborated():
    """``order_corroborated``: the time agrees with the potential within ``max_lag`` of
    the flow's own reproducibility; never with a flow too noisy to vote."""
    policy = OrientationPolicy()
    potential = np.arange(100.0)
    rng = np.random.default_rng(0)
    close = potential + rng.normal(0, 10, 100)  # Spearman about 0.95
    far = potential + rng.normal(0, 80, 100)  # about 0.4
    evidence = FlowEvidence(potential=potential, reproducibility=0.9)
    assert policy.report(evidence, close)["order_corroborated"]
    lagging = policy.report(evidence, far)
    assert lagging["status"] == "forward" and not lagging["order_corroborated"]
    assert lagging["flow_reproducibility"] - lagging["flow_agreement"] > policy.max_lag
    weak_flow = FlowEvidence(potential=potential, reproducibility=0.2)
    assert not policy.report(weak_flow, close)["order_corroborated"]


def test_restart_policy_wants_more_starts_for_doubtful_single_fits():
    policy = pv.policies.RestartPolicy()
    base = {"given_by": "", "order_corroborated": True}
    assert policy.wants_more_starts(base | {"status": "reversed"})
    assert policy.wants_more_starts(base | {"status": "forward", "order_corroborated": False})
    assert not policy.wants_more_starts(base | {"status": "forward"})
    # a given order is not second-guessed by the flow, only checked for running against it
    assert not policy.wants_more_starts(base | {"status": "given", "order_corroborated": False})
    assert policy.wants_more_starts(base | {"status": "reversed", "given_by": "root"})
    # an unidentified direction is reported, not retrained (three starts kept the same fit
    # on the benchmark's fork draw 2)
    assert not policy.wants_more_starts(base | {"status": "not identified",
                                                "order_corroborated": False})
    assert not pv.policies.RestartPolicy(0).wants_more_starts(base | {"status": "reversed"})


# ------------------------------------------------------------------ through VeloVAE


@pytest.fixture(scope="module")
def grn_fork():
    adata = pv.datasets.simulate_grn(300, 40, "fork", seed=0)
    pv.pp.preprocess(adata, random_state=0)
    return adata


def test_root_argument_errors_name_the_problem(grn_fork):
    vae = pv.VeloVAE(grn_fork.copy(), seed=0, progress_bar=False)
    with pytest.raises(pv._checks.InputError, match="root_key"):
        vae.train(max_epochs=2, root="type_0", progress_bar=False)
    with pytest.raises(pv._checks.InputError, match="not a column"):
        vae.train(max_epochs=2, root_key="stage", root="type_0", progress_bar=False)
    with pytest.raises(pv._checks.InputError, match="no cell has"):
        vae.train(max_epochs=2, root_key="cell_type", root="type_9", progress_bar=False)
    with pytest.raises(RuntimeError, match="not trained"):
        vae.direction()


def test_every_fit_records_its_direction_and_exports_it(grn_fork):
    adata = grn_fork.copy()
    vae = pv.VeloVAE(adata, model="basic", seed=0, progress_bar=False)
    vae.train(max_epochs=30, seed=0, progress_bar=False)
    report = vae.direction()
    assert report["status"] in ("forward", "reversed", "not identified")
    assert -1 <= report["flow_agreement"] <= 1
    vae.export_to_anndata(adata)
    assert adata.uns["velocity_params"]["direction"] == report


def test_given_root_sets_the_direction(grn_fork):
    adata = grn_fork.copy()
    vae = pv.VeloVAE(adata, model="basic", seed=0, progress_bar=False)
    vae.train(max_epochs=30, seed=0, progress_bar=False, root_key="cell_type",
              root="type_0")
    assert vae.direction()["status"] == "given"
    assert vae.direction()["given_by"] == "root"
    assert vae.config["warm_start"] == "root"
    t = vae.get_latent_time()
    root = (adata.obs["cell_type"] == "type_0").to_numpy()
    assert np.median(t[root]) < np.median(t[~root])


def test_direction_survives_save_and_load(grn_fork, tmp_path):
    adata = grn_fork.copy()
    vae = pv.VeloVAE(adata, model="basic", seed=0, progress_bar=False)
    vae.train(max_epochs=5, seed=0, progress_bar=False)
    vae.save(tmp_path / "model")
    loaded = pv.VeloVAE.load(tmp_path / "model", adata)
    np.testing.assert_equal(loaded.direction(), vae.direction())  # NaN where none given
