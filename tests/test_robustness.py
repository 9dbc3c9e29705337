"""Time that runs forward on data outside the model's ODE family, over draws.

A small version of the ``grn`` family of ``benchmarks/robustness.py``: three draws each
of a regulatory-network fork and tree (``pv.datasets.simulate_grn``, 300 cells x 40
genes) through the default workflow with a shorter schedule. The claims are medians
and worst cases over draws, never one draw; the full grid is the benchmark's.
"""

import warnings

import numpy as np
import pytest
from scipy.stats import spearmanr

import pyro_velo as pv

pytestmark = pytest.mark.slow

DRAWS = (0, 1, 2)
TOPOLOGIES = ("fork", "tree")
EPOCHS = 150


def _depth_spearman(vae, adata) -> float:
    return float(spearmanr(vae.get_latent_time(), adata.obs["type_depth"])[0])


@pytest.fixture(scope="module")
def grn_fits():
    fits = []
    for topology in TOPOLOGIES:
        for draw in DRAWS:
            adata = pv.datasets.simulate_grn(300, 40, topology, seed=draw)
            pv.pp.preprocess(adata, random_state=0)
            vae = pv.VeloVAE(adata, seed=draw, progress_bar=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the direction warning is tested below
                vae.train(max_epochs=EPOCHS, seed=draw, progress_bar=False)
            report = vae.direction()
            fits.append({"topology": topology, "draw": draw, "adata": adata, "vae": vae,
                         "rho": _depth_spearman(vae, adata), "status": report["status"],
                         "flagged": report["status"] != "forward"
                         or not report["order_corroborated"]})
    return fits


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_time_follows_the_type_graph_over_draws(grn_fits, topology):
    rhos = [fit["rho"] for fit in grn_fits if fit["topology"] == topology]
    assert min(rhos) > 0, rhos  # never backwards
    assert np.median(rhos) >= 0.5, rhos


def test_direction_diagnostic_matches_what_happened(grn_fits):
    for fit in grn_fits:
        if fit["status"] == "forward":
            assert fit["rho"] > 0, fit["rho"]
        # whatever the status, the flow agreement it reports is the fitted time's
        report = fit["vae"].direction()
        evidence = fit["vae"]._start.flow_evidence(fit["vae"].data)
        assert report["flow_agreement"] == pytest.approx(
            evidence.agreement(fit["vae"].get_latent_time()), abs=1e-6)


def test_a_given_root_fixes_the_weakest_fits(grn_fits):
    """The fits the diagnostic flags (direction not forward, or an order the flow does
    not corroborate), or else the weakest fit of the grid, trained again with the first
    cell type given as root: the root wins and the order holds."""
    flagged = [fit for fit in grn_fits if fit["flagged"]]
    for fit in flagged or [min(grn_fits, key=lambda fit: fit["rho"])]:
        adata, draw = fit["adata"], fit["draw"]
        vae = pv.VeloVAE(adata, seed=draw, progress_bar=False)
        vae.train(max_epochs=EPOCHS, seed=draw, progress_bar=False, root_key="cell_type",
                  root="type_0")
        assert vae.direction()["status"] == "given"
        rho = _depth_spearman(vae, adata)
        assert rho >= max(0.5, fit["rho"] - 0.05), (fit["rho"], rho)


def test_capture_times_set_the_direction():
    """With capture times, the capture-time prior decides the direction, not the flow."""
    adata = pv.datasets.simulate_grn(300, 40, "chain", seed=0)
    adata.obs["stage"] = np.digitize(adata.obs["true_t"], np.quantile(adata.obs["true_t"],
                                                                      [0.33, 0.66]))
    pv.pp.preprocess(adata, random_state=0)
    vae = pv.VeloVAE(adata, model="basic", capture_time_key="stage", seed=0,
                     progress_bar=False)
    vae.train(max_epochs=EPOCHS, seed=0, progress_bar=False)
    report = vae.direction()
    assert (report["status"], report["given_by"]) == ("given", "capture times")
    assert report["given_agreement"] > 0.5  # the time follows the capture times
    assert _depth_spearman(vae, adata) > 0.5


def test_a_root_repairs_the_benchmarks_flagged_fork():
    """The one regulatory-network draw of benchmarks/robustness.py whose first start the
    diagnostic flags as reversed (fork, draw 5: Spearman with the type depth 0.30, flow
    agreement -0.32; the default then trains two more starts) is repaired by naming the
    root type."""
    adata = pv.datasets.simulate_grn(800, 100, "fork", capture_noise=False, seed=5)
    pv.pp.preprocess(adata, random_state=0)
    vae = pv.VeloVAE(adata, seed=5, progress_bar=False)
    vae.train(seed=5, progress_bar=False, root_key="cell_type", root="type_0")
    assert vae.direction()["status"] == "given"
    assert _depth_spearman(vae, adata) >= 0.5


def test_small_data_sets_run_forward_over_draws():
    """100-cell sets of scVelo's simulator (the ``small`` family of
    benchmarks/robustness.py): with scVelo's 30 neighbours a third of the cells were in
    every neighbourhood and draws 0 and 4 ran backwards (-0.86, -0.80); the default
    neighbourhood of preprocess, a fifth of the cells, keeps every draw forward
    (benchmark: 0.79-0.87 over six draws)."""
    rhos = []
    for draw in (0, 1, 4):
        adata = pv.datasets.simulate_scvelo(100, 100, seed=draw)
        pv.pp.preprocess(adata, random_state=0)
        assert adata.uns["pyro_velo"]["preprocess"]["n_neighbors"] == 20
        vae = pv.VeloVAE(adata, seed=draw, progress_bar=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vae.train(seed=draw, progress_bar=False)
        rhos.append(spearmanr(vae.get_latent_time(), adata.obs["true_t"])[0])
    assert min(rhos) > 0, rhos
    assert np.median(rhos) > 0.7, rhos
