"""The probabilistic-modelling surface: capture times, swappable priors, likelihoods, guides.

Fast unit tests of the pieces (parsing, distributions, trace shapes, extension without
touching package code); the fits that check behaviour on simulations are marked slow.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from anndata import AnnData
from pyro import poutine
from scipy.stats import spearmanr

import pyro_velo as pv
from pyro_velo._checks import InputError
from pyro_velo.capture import capture_time_axis, capture_times_from_obs, parse_capture_times
from pyro_velo.guides import AmortizedMVNGuide, RateGuide
from pyro_velo.initialize import steady_state_init
from pyro_velo.likelihoods import NegativeBinomial, Normal, Poisson
from pyro_velo.model import FullModel
from pyro_velo.priors import CaptureTimePrior, LogNormalRatePrior, NormalTimePrior
from pyro_velo.train import local_params

# ---- capture-time labels ---------------------------------------------------------------


@pytest.mark.parametrize("labels, expected", [
    ([3, 1.5, 2], [3, 1.5, 2]),
    (["day7", "day 14", "Day3"], [7, 14, 3]),
    (["E12.5", "E13.5", "E18.5"], [12.5, 13.5, 18.5]),
    (["E12.5", "P0", "P3"], [12.5, 19.5, 22.5]),  # postnatal days follow birth at E19.5
    (["P0", "P7"], [0, 7]),  # postnatal alone: plain numbers
    (["12h", "2d", "1d"], [0.5, 2, 1]),  # hours mixed with days are converted
    (["D0", "t_3", "day-5"], [0, 3, 5]),
])
def test_capture_labels_are_parsed(labels, expected):
    np.testing.assert_allclose(parse_capture_times(labels), expected)


def test_missing_capture_times_are_nan_and_mapping_is_used():
    out = parse_capture_times(["E12.5", None, "", np.nan, "E14.5"])
    np.testing.assert_array_equal(np.isnan(out), [False, True, True, True, False])
    mapped = parse_capture_times(["early", "late", None], mapping={"early": 0, "late": 5})
    np.testing.assert_array_equal(mapped[:2], [0, 5])
    assert np.isnan(mapped[2])
    with pytest.raises(InputError, match="missing from the mapping.*'mid'"):
        parse_capture_times(["early", "mid"], mapping={"early": 0})


def test_unreadable_capture_label_names_it():
    with pytest.raises(InputError, match="'progenitor'.*capture_time_mapping"):
        parse_capture_times(["day1", "progenitor"])


def test_capture_times_from_obs_errors():
    adata = AnnData(np.zeros((4, 1)))
    adata.obs["one"] = ["day1"] * 4
    adata.obs["none"] = [np.nan] * 4
    with pytest.raises(InputError, match="'stage' is not a column"):
        capture_times_from_obs(adata, "stage")
    with pytest.raises(InputError, match="1 distinct capture time"):
        capture_times_from_obs(adata, "one")
    with pytest.raises(InputError, match="0 distinct capture time"):
        capture_times_from_obs(adata, "none")


def test_capture_time_axis_maps_onto_the_inner_interval():
    out = capture_time_axis(np.array([2.0, 4.0, np.nan, 3.0]), t_max=20.0)
    np.testing.assert_allclose(out[[0, 1, 3]], [2.0, 18.0, 10.0])
    assert np.isnan(out[2])


# ---- priors and likelihoods as distributions -------------------------------------------


def test_capture_time_prior_falls_back_where_unknown():
    prior = CaptureTimePrior(torch.tensor([2.0, float("nan"), 18.0]), 1.5,
                             NormalTimePrior(10.0, 5.0))
    d = prior(torch.tensor([0, 1, 2]))
    torch.testing.assert_close(d.loc, torch.tensor([2.0, 10.0, 18.0]))
    torch.testing.assert_close(d.scale, torch.tensor([1.5, 5.0, 1.5]))


def _init(n_cells=40, n_genes=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n_cells, n_genes, generator=gen) + 0.1
    s = torch.rand(n_cells, n_genes, generator=gen) + 0.1
    return steady_state_init(u, s, 20.0), u, s


def test_count_likelihoods_match_hand_written_log_densities():
    init, _, _ = _init()
    scale = torch.linspace(0.5, 2.0, 6)
    expected = torch.rand(3, 6) + 0.2
    counts = torch.randint(0, 8, (3, 6)).float()
    size = torch.tensor([0.5, 1.0, 2.0])
    mean = expected * scale * size[:, None]
    poisson = Poisson()
    poisson.setup(init, scale, scale)
    hand = (counts * mean.log() - mean - torch.lgamma(counts + 1)).sum(-1)
    torch.testing.assert_close(poisson(expected, "s", size).log_prob(counts), hand)
    nb = NegativeBinomial()
    nb.setup(init, scale, scale)
    phi = 10.0
    hand = (torch.lgamma(counts + phi) - torch.lgamma(torch.tensor(phi)) - torch.lgamma(counts + 1)
            + phi * math.log(phi) + counts * mean.log() - (counts + phi) * (mean + phi).log()
            ).sum(-1)
    torch.testing.assert_close(nb(expected, "u", size).log_prob(counts), hand)


def test_count_likelihood_needs_gene_scales():
    init, _, _ = _init()
    with pytest.raises(ValueError, match="scales"):
        Poisson().setup(init)


def test_random_rates_are_global_sites_with_a_guide():
    init, u, s = _init()
    with local_params():
        model = FullModel(init, latent_dim=2, rate_prior=LogNormalRatePrior(0.5))
        guide = pv.guides.CombinedGuide(pv.guides.AmortizedGuide(6, (8,), 0.0, latent_dim=2),
                                        RateGuide(model))
        idx = torch.arange(10)
        guide_trace = poutine.trace(guide).get_trace(u[idx], s[idx], idx, 40)
        trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            u[idx], s[idx], idx, 40)
    for name in ("alpha", "beta", "gamma"):
        site = trace.nodes[name]
        assert site["fn"].event_shape == (6,) and site["fn"].batch_shape == ()
        assert not site["cond_indep_stack"]  # outside the cell plate: not rescaled
        torch.testing.assert_close(site["fn"].base_dist.base_dist.loc,
                                   getattr(init, name).log())
    assert trace.nodes["t"]["cond_indep_stack"][0].name == "cells"


def test_mvn_guide_samples_a_joint_site_and_starts_mean_field():
    init, u, s = _init()
    with local_params():
        guide = AmortizedMVNGuide(6, (8,), 0.0, latent_dim=3)
        guide.eval()
        idx = torch.arange(5)
        trace = poutine.trace(guide).get_trace(u[idx], s[idx], idx, 40)
        q = guide.joint(u[idx], s[idx])
    assert trace.nodes["tc"]["infer"]["is_auxiliary"]
    assert trace.nodes["tc"]["value"].shape == (5, 4)
    torch.testing.assert_close(trace.nodes["t"]["value"], trace.nodes["tc"]["value"][:, 0])
    torch.testing.assert_close(trace.nodes["c"]["value"], trace.nodes["tc"]["value"][:, 1:])
    # zero-initialised off-diagonal head: the covariance starts diagonal
    cov = q.covariance_matrix
    torch.testing.assert_close(cov, torch.diag_embed(cov.diagonal(dim1=-2, dim2=-1)))
    with pytest.raises(ValueError, match="cell state"):
        AmortizedMVNGuide(6, latent_dim=0)


# ---- the user-facing class: validation and extension without package edits ---------------


@pytest.fixture(scope="module")
def small():
    adata = pv.datasets.simulate(n_cells=300, n_genes=30, topology="bifurcation",
                                 n_capture_times=4, seed=1)
    pv.pp.preprocess(adata, n_pcs=26, random_state=0)
    return adata


TINY = dict(hidden=(32, 16), seed=0)
QUICK = dict(max_epochs=6, warmup_epochs=3, refine_epochs=2, progress_bar=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(likelihood="gaussian"), "unknown likelihood 'gaussian'"),
    (dict(guide="laplace"), "unknown guide 'laplace'"),
    (dict(guide="amortized_mvn", model="basic"), "needs model='full'"),
    (dict(guide=object()), "summary"),
    (dict(rate_prior=-1.0), "rate_prior"),
    (dict(state_prior=NormalTimePrior(0, 1), model="basic"), "state_prior"),
    (dict(capture_time_key="capture_time", time_prior=NormalTimePrior(0, 1)), "not both"),
    (dict(capture_time_key="day"), "'day' is not a column"),
    (dict(capture_time_key="capture_time", capture_time_scale=0.0), "capture_time_scale"),
])
def test_bad_components_are_rejected(small, kwargs, message):
    with pytest.raises(InputError, match=message):
        pv.VeloVAE(small, **TINY, **kwargs)


def test_count_likelihood_needs_raw_counts(small):
    adata = small.copy()
    del adata.layers["raw_spliced"]
    with pytest.raises(InputError, match="raw_spliced"):
        pv.VeloVAE(adata, likelihood="poisson", **TINY)
    adata = small.copy()
    adata.layers["raw_spliced"] = adata.layers["raw_spliced"] * 0.5
    with pytest.raises(InputError, match="integer counts"):
        pv.VeloVAE(adata, likelihood="nb", **TINY)


class StudentT(Normal):
    """A heavy-tailed likelihood written outside the package."""

    def forward(self, expected, kind, size_factor=None):
        scale = getattr(self, f"log_sigma_{kind}").exp()
        return dist.StudentT(4.0, expected, scale).to_event(1)


class LaplaceTimePrior(pv.priors.TimePrior):
    """A time prior written outside the package."""

    def forward(self, idx):
        return dist.Laplace(torch.full(idx.shape, 10.0, device=idx.device), 4.0)


def test_user_defined_likelihood_and_time_prior_train(small, tmp_path):
    vae = pv.VeloVAE(small, likelihood=StudentT(), time_prior=LaplaceTimePrior(), **TINY)
    vae.train(**QUICK)
    assert vae.config["likelihood"] == "custom:StudentT"
    data = vae.data
    idx = torch.arange(8)
    with local_params():
        trace = poutine.trace(poutine.replay(
            vae.model, trace=poutine.trace(vae.guide).get_trace(
                data.u[idx], data.s[idx], idx, data.n_cells))).get_trace(
            data.u[idx], data.s[idx], idx, data.n_cells)
    assert isinstance(trace.nodes["u"]["fn"].base_dist, dist.StudentT)
    assert isinstance(trace.nodes["t"]["fn"], dist.Laplace)
    assert np.isfinite(vae.evaluate().to_numpy()).all()
    vae.save(tmp_path / "m")
    with pytest.raises(InputError, match="custom likelihood, time_prior"):
        pv.VeloVAE.load(tmp_path / "m", small)
    again = pv.VeloVAE.load(tmp_path / "m", small, likelihood=StudentT(),
                            time_prior=LaplaceTimePrior())
    np.testing.assert_array_equal(again.get_latent_time(), vae.get_latent_time())


@pytest.mark.parametrize("kwargs", [
    dict(guide="amortized"), dict(guide="amortized_mvn"), dict(rate_prior=0.5),
    dict(likelihood="poisson"), dict(likelihood="nb", model="basic"),
    dict(capture_time_key="capture_time"),
])
def test_every_option_trains_and_gives_per_cell_posteriors(small, kwargs):
    vae = pv.VeloVAE(small, **TINY, **kwargs)
    vae.train(**QUICK)
    posterior = vae.sample_posterior(4, return_sites=("t", "velocity"), batch_size=128)
    assert posterior["t"].shape == (4, small.n_obs)
    assert posterior["velocity"].shape == (4, small.n_obs, vae.data.n_genes)
    assert (posterior["t"].std(0) > 0).all()  # a posterior, not a point
    unc = vae.get_uncertainty(n_samples=5, batch_size=100)
    assert list(unc.index) == list(small.obs_names)
    assert (unc["time_cv"] > 0).all() and np.isfinite(unc.to_numpy()).all()
    assert ("state_cv" in unc) == ("rho_cv" in unc) == (vae.config["model"] == "full")
    adata = small.copy()
    vae.export_to_anndata(adata)
    for name in unc.columns.intersection(["time_cv", "state_cv", "rho_cv", "velocity_cv"]):
        np.testing.assert_array_equal(adata.obs[f"pyro_velo_{name}"], unc[name])


def test_posterior_draws_show_progress_unless_asked_not_to(small, capsys):
    vae = pv.VeloVAE(small, **TINY, model="basic")
    vae.train(**QUICK)
    batches = -(-small.n_obs // 50)
    for call in (vae.get_uncertainty, vae.sample_posterior):
        call(2, batch_size=50)
        err = capsys.readouterr().err
        assert "Posterior draws: 100%" in err and f"{batches}/{batches}" in err, err
    assert set(vae.sample_posterior(2, progress_bar=False)) == {"t"}  # no c in the basic model
    vae.get_uncertainty(n_samples=2, batch_size=50, progress_bar=False)
    vae.sample_posterior(2, batch_size=50, progress_bar=False)
    assert "Posterior draws" not in capsys.readouterr().err


def test_uncertainty_is_accumulated_exactly(small):
    """Online summaries equal the summaries of the stored draws (same seed)."""
    vae = pv.VeloVAE(small, **TINY)
    vae.train(**QUICK)
    draws = vae.sample_posterior(6, return_sites=("t", "c", "velocity"), batch_size=64, seed=3)
    unc = vae.get_uncertainty(n_samples=6, batch_size=64, seed=3)
    t = draws["t"].astype(np.float64)
    np.testing.assert_allclose(unc["time_cv"], t.std(0, ddof=1) / np.abs(t.mean(0)), rtol=1e-4)
    c = draws["c"].astype(np.float64)
    state_cv = np.sqrt(c.var(0, ddof=1).sum(-1) / (c.mean(0) ** 2).sum(-1))
    np.testing.assert_allclose(unc["state_cv"], state_cv, rtol=1e-4)
    with torch.no_grad():
        rho = vae.model.transcription_rate(torch.as_tensor(draws["c"])).double().numpy()
    rho_cv = np.sqrt(rho.var(0, ddof=1).sum(-1) / (rho.mean(0) ** 2).sum(-1))
    np.testing.assert_allclose(unc["rho_cv"], rho_cv, rtol=1e-4)
    v = draws["velocity"].astype(np.float64)
    velocity_cv = np.sqrt(v.var(0, ddof=1).sum(-1) / (v.mean(0) ** 2).sum(-1))
    np.testing.assert_allclose(unc["velocity_cv"], velocity_cv, rtol=1e-4)
    with pytest.raises(InputError, match="unknown site"):
        vae.sample_posterior(2, return_sites=("rho_hat",))


def test_rate_posterior_is_reported(small):
    vae = pv.VeloVAE(small, rate_prior=0.5, **TINY)
    vae.train(**QUICK)
    rates = vae.get_rate_uncertainty()
    fitted = vae.data.fitted
    for name in ("alpha", "beta", "gamma"):
        lo, mid, hi = (rates.loc[fitted, f"{name}_{q}"] for q in ("q05", "median", "q95"))
        assert ((lo < mid) & (mid < hi)).all()
    point = vae.get_rates()
    np.testing.assert_allclose(point.loc[fitted, "beta"], rates.loc[fitted, "beta_median"],
                               rtol=1e-5)
    point_rates = _trained(pv.VeloVAE(small, model="basic", **TINY))
    with pytest.raises(RuntimeError, match="rate_prior"):
        point_rates.get_rate_uncertainty()


def _trained(vae):
    vae.train(**QUICK)
    return vae


def test_pyro_param_store_stays_empty(small):
    pyro.clear_param_store()
    _trained(pv.VeloVAE(small, guide="amortized_mvn", rate_prior=0.3, **TINY))
    assert len(pyro.get_param_store()) == 0


# ---- behaviour on simulations (slow) --------------------------------------------------------


def _spearman(vae, adata):
    return spearmanr(vae.get_latent_time(), adata.obs["true_t"])[0]


@pytest.mark.slow
def test_capture_time_prior_improves_latent_time():
    """Six draws (data seeds 0-5, all of them) of a linear simulation with 5 coarse
    capture times, each spanning a wide, overlapping range of true time (Spearman of
    capture time with true time 0.70-0.85), and only 12 genes, so that the data alone
    leave the order ambiguous on some draws.

    Measured (Spearman with true_t, uninformative / capture-time prior): 0.935 / 0.934,
    0.880 / 0.883, 0.956 / 0.957, 0.335 / 0.864 (order folded without the prior),
    -0.948 / 0.947 (time reversed without it), 0.922 / 0.922. Where the data order the
    cells well the prior changes little (with 40 genes, ten draws differed by at most
    0.004 either way).
    """
    plain, informed = [], []
    for seed in range(6):
        adata = pv.datasets.simulate(n_cells=600, n_genes=12, topology="linear",
                                     n_capture_times=5, noise="nb", seed=seed)
        pv.pp.preprocess(adata, random_state=0)
        for key, scores in ((None, plain), ("capture_time", informed)):
            vae = pv.VeloVAE(adata, model="basic", seed=0, capture_time_key=key)
            vae.train(progress_bar=False, seed=0)
            scores.append(_spearman(vae, adata))
    assert np.mean(informed) > np.mean(plain), (informed, plain)
    # the prior prevents the failures of an ambiguous order (folds, reversed time)
    assert min(informed) >= 0.8, informed


@pytest.mark.slow
@pytest.mark.parametrize("noise", ["nb", "poisson"])
def test_count_likelihood_fits_matching_counts(noise):
    adata = pv.datasets.simulate(n_cells=1000, n_genes=100, topology="bifurcation",
                                 noise=noise, seed=7)
    pv.pp.preprocess(adata, random_state=0)
    vae = pv.VeloVAE(adata, likelihood=noise, model="basic", seed=0)
    vae.train(progress_bar=False, seed=0)
    assert _spearman(vae, adata) >= 0.85, _spearman(vae, adata)


@pytest.fixture(scope="module")
def bifurcation_mvn():
    adata = pv.datasets.simulate(n_cells=1000, n_genes=100, topology="bifurcation",
                                 noise="nb", seed=3)
    pv.pp.preprocess(adata, random_state=0)
    vae = pv.VeloVAE(adata, guide="amortized_mvn", seed=0)
    vae.train(progress_bar=False, seed=0)
    return adata, vae


@pytest.mark.slow
def test_full_covariance_guide_correlates_time_and_state(bifurcation_mvn):
    adata, vae = bifurcation_mvn
    # a sanity bound: on this hard 1000 x 100 set a failed start orders cells at about
    # 0.80; a good fit gives about 0.90 (0.899 on an Intel Xeon, above 0.9 on
    # an AMD EPYC: the fits' rounding differs between the two)
    assert _spearman(vae, adata) >= 0.85
    corr = vae.get_time_state_correlation()
    assert corr.shape == (adata.n_obs, 5)
    # cell state and time both move along the trajectory: their posteriors correlate
    assert np.abs(corr).max(axis=1).mean() > 0.1, np.abs(corr).max(axis=1).mean()
