"""End to end: simulate, preprocess, fit the basic model, export, scVelo on the export."""

import anndata as ad
import numpy as np
import pytest
import scvelo as scv
from scipy.stats import spearmanr

import pyro_velo as pv
from pyro_velo._checks import InputError
from pyro_velo.train import DivergenceError


@pytest.fixture(scope="module")
def linear_adata():
    adata = pv.datasets.simulate(n_cells=1000, n_genes=120, topology="linear", noise="nb",
                                 seed=11)
    pv.pp.preprocess(adata, random_state=0)
    return adata


@pytest.fixture(scope="module")
def fitted(linear_adata):
    vae = pv.VeloVAE(linear_adata, model="basic", seed=0)
    vae.train(progress_bar=False, seed=0)
    return vae


@pytest.mark.slow
def test_latent_time_recovers_true_time(fitted, linear_adata):
    rho = spearmanr(fitted.get_latent_time(), linear_adata.obs["true_t"])[0]
    assert rho >= 0.9, rho


@pytest.mark.slow
def test_elbo_decreases_and_test_fit_generalises(fitted):
    history = fitted.history
    assert history.train[-1] < history.train[0]
    assert min(history.validation) < history.validation[0]
    assert np.isfinite(fitted.elbo("test"))
    assert fitted.mse("test") < 1.5 * fitted.mse("train")
    # the fit explains most of the (unit-variance-scaled) signal
    assert fitted.mse("train") < 0.5


@pytest.mark.slow
def test_velocity_points_along_true_velocity(fitted, linear_adata):
    vs, vu = fitted.get_velocity()
    fit = linear_adata.var["velocity_genes"].to_numpy() if "velocity_genes" in \
        linear_adata.var else fitted.get_rates()["fitted"].to_numpy()
    a, b = vs[:, fit], linear_adata.layers["true_velocity"][:, fit]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    assert np.nanmean(cos) > 0.5
    assert vs.shape == vu.shape == linear_adata.shape


@pytest.mark.slow
def test_export_contract_and_scvelo_consumers(fitted, linear_adata, tmp_path):
    adata = linear_adata.copy()
    before = set(adata.var.columns)
    fitted.export_to_anndata(adata)
    t = adata.obs["latent_time"].to_numpy()
    assert t.min() == 0.0 and t.max() == 1.0
    fitted_genes = adata.var["velocity_genes"].to_numpy()
    assert adata.layers["velocity"].shape == adata.shape
    assert np.isfinite(adata.layers["velocity"][:, fitted_genes]).all()
    assert np.isnan(adata.layers["velocity"][:, ~fitted_genes]).all()
    assert "velocity_u" in adata.layers and "pyro_velo_s" in adata.layers
    assert adata.uns["velocity_params"]["mode"] == "pyro_velo"
    assert not any(c.startswith("fit_") for c in set(adata.var.columns) - before)
    assert set(adata.obs["pyro_velo_split"].unique()) == {"train", "validation", "test"}
    scv.tl.velocity_graph(adata, show_progress_bar=False)
    scv.tl.velocity_embedding(adata, basis="pca")
    assert np.isfinite(adata.obsm["velocity_pca"]).all()
    scv.pl.velocity_embedding_stream(adata, basis="pca", show=False)
    path = tmp_path / "fit.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.obs["latent_time"], adata.obs["latent_time"])
    np.testing.assert_array_equal(back.layers["velocity"], adata.layers["velocity"])
    assert back.uns["velocity_params"]["mode"] == "pyro_velo"


@pytest.mark.slow
def test_time_interval_with_the_resolution_holds_the_true_time(fitted, linear_adata,
                                                               time_interval_coverage):
    # the posterior standard deviation takes each cell's moments as its own abundances;
    # with the spread of the time over the neighbourhood they average, a 90% interval
    # should hold about 90% of the true times (the fitted time is the true time up to
    # an affine map for data from the model's own ODE)
    adata = linear_adata.copy()
    fitted.export_to_anndata(adata)
    np.testing.assert_array_equal(adata.obs["pyro_velo_time_resolution"],
                                  pv.tl.time_resolution(adata))
    alone, combined = time_interval_coverage(adata)
    assert combined >= 0.75 and combined > alone, (alone, combined)


@pytest.mark.slow
def test_rates_table(fitted, linear_adata):
    rates = fitted.get_rates()
    assert list(rates.index) == list(linear_adata.var_names)
    ok = rates["fitted"]
    assert (rates.loc[ok, ["alpha", "beta", "gamma", "sigma_u", "sigma_s"]] > 0).all().all()
    assert (rates.loc[ok, "t_off"] > rates.loc[ok, "t_on"]).all()


@pytest.mark.slow
def test_save_and_load_round_trip(fitted, linear_adata, tmp_path):
    fitted.save(tmp_path / "m")
    with pytest.raises(FileExistsError):
        fitted.save(tmp_path / "m")
    loaded = pv.VeloVAE.load(tmp_path / "m", linear_adata)
    np.testing.assert_allclose(loaded.get_latent_time(), fitted.get_latent_time(), rtol=1e-6)
    assert loaded.history.train == fitted.history.train
    np.testing.assert_array_equal(loaded.get_split().values, fitted.get_split().values)


def test_same_seed_same_fit_and_models_do_not_share_parameters(linear_adata):
    a = pv.VeloVAE(linear_adata, hidden=(32, 16), seed=1)
    b = pv.VeloVAE(linear_adata, hidden=(32, 16), seed=1)
    c = pv.VeloVAE(linear_adata, hidden=(32, 16), seed=1)
    for vae in (a, b):
        vae.train(max_epochs=3, warmup_epochs=2, progress_bar=False, seed=5)
    np.testing.assert_array_equal(a.get_latent_time(), b.get_latent_time())
    c.train(max_epochs=3, warmup_epochs=2, progress_bar=False, seed=6)
    assert not np.array_equal(a.get_latent_time(), c.get_latent_time())


def test_training_uses_torchs_thread_setting_unless_told(linear_adata, monkeypatch):
    """With as many genes as the policy asks for threads (the small default of fewer
    genes is in ``test_threads.py``)."""
    torch = __import__("torch")
    monkeypatch.setattr(pv.policies, "THREADS", pv.policies.ThreadPolicy(
        min_genes_for_threads=1))
    seen = []

    class Recording(pv.inference.Callback):
        def on_fit_start(self, loop):
            seen.append(torch.get_num_threads())

    vae = pv.VeloVAE(linear_adata, model="basic", hidden=(8,))
    recording = [Recording()]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the user's choice
        vae.train(max_epochs=1, warmup_epochs=1, progress_bar=False, callbacks=recording)
        assert set(seen) == {2}
        seen.clear()
        vae.train(max_epochs=1, warmup_epochs=1, progress_bar=False, num_threads=1,
                  callbacks=recording)
        assert set(seen) == {1}
        assert torch.get_num_threads() == 2  # restored
        with pytest.raises(InputError, match="num_threads must be at least 1"):
            vae.train(max_epochs=1, num_threads=0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("setting, message", [
    ({"latent_dim": 0}, "latent_dim must be at least 1"),
    ({"latent_dim": 2.5}, "latent_dim must be an integer"),
    ({"hidden": 0}, "hidden must be a non-empty sequence"),
    ({"hidden": ()}, "hidden must be a non-empty sequence"),
    ({"hidden": (16, 0)}, "each width in hidden must be at least 1"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
    ({"t_max": 0}, "t_max must be a positive number"),
    ({"t_max": float("nan")}, "t_max must be a positive number"),
    ({"time_prior_scale": -1.0}, "time_prior_scale must be a positive number"),
    ({"time_prior_loc": "early"}, "time_prior_loc must be a finite number"),
    ({"c_prior_scale": 0}, "c_prior_scale must be a positive number"),
    ({"capture_time_scale": 0.0}, "capture_time_scale must be a positive number"),
    ({"seed": -1}, "seed must be at least 0"),
])
def test_bad_settings_are_named(linear_adata, setting, message):
    with pytest.raises(InputError, match=message):
        pv.VeloVAE(linear_adata, **setting)


def test_layer_widths_may_come_as_an_array(linear_adata, tmp_path):
    vae = pv.VeloVAE(linear_adata, hidden=np.array([16, 8]), latent_dim=np.int64(3))
    assert vae.config["hidden"] == [16, 8] and vae.config["latent_dim"] == 3
    vae.train(max_epochs=2, warmup_epochs=1, refine_epochs=0, progress_bar=False)
    vae.save(tmp_path / "m")  # the config is written as JSON
    assert pv.VeloVAE.load(tmp_path / "m", linear_adata).config["hidden"] == [16, 8]


def test_bad_inputs_give_clear_errors(linear_adata):
    with pytest.raises(InputError, match="Mx"):
        pv.VeloVAE(linear_adata, spliced_layer="Mx")
    with pytest.raises(InputError, match="unknown model"):
        pv.VeloVAE(linear_adata, model="nope")
    bad = linear_adata.copy()
    bad.layers["Ms"][0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        pv.VeloVAE(bad)
    bad.layers["Ms"][0, 0] = -1.0
    with pytest.raises(InputError, match="negative"):
        pv.VeloVAE(bad)
    with pytest.raises(InputError, match="split_fractions"):
        pv.VeloVAE(linear_adata, split_fractions=(0.5, 0.1, 0.1))
    vae = pv.VeloVAE(linear_adata, hidden=(8,))
    with pytest.raises(RuntimeError, match="not trained"):
        vae.get_latent_time()
    with pytest.raises(InputError, match="cuda"):
        if not __import__("torch").cuda.is_available():
            vae.train(device="cuda")
        else:  # pragma: no cover - CI has no GPU
            raise InputError("cuda")


def test_export_refuses_other_cells_and_writes_nothing(linear_adata):
    vae = pv.VeloVAE(linear_adata, hidden=(8,))
    vae.train(max_epochs=1, warmup_epochs=0, progress_bar=False)
    other = linear_adata[:10].copy()
    keys = set(other.obs.columns), set(other.layers.keys())
    with pytest.raises(InputError, match="obs_names"):
        vae.export_to_anndata(other)
    assert (set(other.obs.columns), set(other.layers.keys())) == keys


def test_time_resolution_is_exported_where_the_data_have_a_neighbour_graph(linear_adata):
    vae = pv.VeloVAE(linear_adata, hidden=(8,))
    vae.train(max_epochs=1, warmup_epochs=0, progress_bar=False)
    with_graph = linear_adata.copy()
    vae.export_to_anndata(with_graph)
    np.testing.assert_array_equal(with_graph.obs["pyro_velo_time_resolution"],
                                  pv.tl.time_resolution(with_graph))
    assert np.isfinite(with_graph.obs["pyro_velo_time_resolution"]).all()
    without = linear_adata.copy()
    for key in list(without.obsp.keys()):
        del without.obsp[key]
    vae.export_to_anndata(without)
    assert "pyro_velo_time_resolution" not in without.obs
    np.testing.assert_array_equal(without.obs["pyro_velo_time"],
                                  with_graph.obs["pyro_velo_time"])


def test_divergence_is_reported(linear_adata):
    vae = pv.VeloVAE(linear_adata, model="basic", hidden=(8,))
    with __import__("torch").no_grad():
        vae.model.log_alpha[0] = float("nan")
    with pytest.raises(DivergenceError, match="log_alpha"):
        vae.train(max_epochs=1, warmup_epochs=0, progress_bar=False)


def test_full_model_quick_fit_refines_and_exports(linear_adata):
    vae = pv.VeloVAE(linear_adata, model="full", hidden=(32, 16), latent_dim=3, seed=0)
    vae.train(max_epochs=4, warmup_epochs=2, refine_epochs=2, progress_bar=False)
    assert [name for name, _ in vae.history.stages] == ["warm-up", "basic", "full", "refine"]
    assert vae.get_cell_state().shape == (linear_adata.n_obs, 3)
    metrics = vae.evaluate()
    assert list(metrics.index) == ["train", "test"]
    assert np.isfinite(metrics.to_numpy()).all()
    u_next, s_next = vae.predict_future(1.0)
    assert u_next.shape == s_next.shape == linear_adata.shape
    with pytest.raises(InputError, match="source"):
        vae.refine_initial_conditions(epochs=1, source="both")
    with pytest.raises(InputError, match="require_improvement"):
        vae.refine_initial_conditions(epochs=1, require_improvement="yes")
    basic = pv.VeloVAE(linear_adata, model="basic", hidden=(8,))
    basic.train(max_epochs=1, warmup_epochs=0, progress_bar=False)
    with pytest.raises(RuntimeError, match="full model"):
        basic.refine_initial_conditions()
    with pytest.raises(RuntimeError, match="full model"):
        basic.get_cell_state()


def test_refinement_that_lowers_the_likelihood_is_rejected_unless_told_to_keep_it(
        linear_adata):
    """A fine-tuning that wrecks the rates (a huge ODE learning rate) lowers the
    validation log-likelihood: the default rule restores the first-stage model with a
    warning, ``require_improvement=False`` keeps the refinement and runs every epoch."""
    vae = pv.VeloVAE(linear_adata, model="full", hidden=(32, 16), latent_dim=3, seed=0)
    vae.train(max_epochs=4, warmup_epochs=2, refine_epochs=0, progress_bar=False)
    first = vae.evaluate().loc["test", "log_likelihood"]
    wreck = dict(epochs=3, lr=0.01, lr_ode=2.0, early_stopping=False, progress_bar=False)
    with pytest.warns(UserWarning, match="kept the model without it"):
        vae.refine_initial_conditions(**wreck)
    assert vae.config["refined"] is False and not vae.model.has_initial_conditions
    assert vae.evaluate().loc["test", "log_likelihood"] == pytest.approx(first)
    n_before = len(vae.history.train)
    vae.refine_initial_conditions(require_improvement=False, **wreck)
    assert vae.config["refined"] is True and vae.model.has_initial_conditions
    assert len(vae.history.train) - n_before == 3
    assert vae.evaluate().loc["test", "log_likelihood"] < first


def test_a_refinement_not_kept_by_training_is_a_progress_line_not_a_warning(
        linear_adata, capsys, recwarn):
    """As the schedule's last stage (where most fits do not keep it) a rejected
    refinement is said beside the stage summaries; a direct call warns (test above)."""
    from pyro_velo.inference.refine import Refine
    from pyro_velo.inference.stages import Run

    vae = pv.VeloVAE(linear_adata, model="full", hidden=(32, 16), latent_dim=3, seed=0)
    vae.train(max_epochs=4, warmup_epochs=2, refine_epochs=0, progress_bar=False)
    stage = Refine(vae.model, vae.guide, vae.data, epochs=3)
    wreck = dict(lr=0.01, lr_ode=2.0)
    for progress_bar in (True, False):
        capsys.readouterr()
        stage.train(Run(vae.history, vae.config, {**wreck, "progress_bar": progress_bar},
                        early_stopping=False))
        assert vae.config["refined"] is False and not vae.model.has_initial_conditions
        said = [line for line in capsys.readouterr().err.splitlines() if "not kept" in line]
        assert len(said) == (1 if progress_bar else 0)
        if progress_bar:
            assert said[0].startswith(f"{Refine.description}: not kept, it lowered the "
                                      "validation log-likelihood (")
            assert said[0].endswith("; kept the model without it")
    assert not [w for w in recwarn if "refinement" in str(w.message)]
