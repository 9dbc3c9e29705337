"""The ancestral rate history: the prototype table, the model's kinetics, the VeloVAE option."""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import pyro_velo as pv
from pyro_velo._checks import InputError
from pyro_velo.ancestry import AncestorTable
from pyro_velo.initialize import steady_state_init
from pyro_velo.model import AncestralModel, FullModel


def _table(**kwargs):
    return AncestorTable(n_bins=2, n_prototypes=2, latent_dim=2, n_genes=3, t_max=10.0,
                         min_weight=0.0, **kwargs)


def _cells():
    t = torch.tensor([1.0, 1.0, 1.0, 6.0])
    c = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.2, 0.0], [1.0, 1.0]])
    rho = torch.tensor([[0.1, 0.2, 0.3], [0.9, 0.8, 0.7], [0.3, 0.2, 0.1], [0.5, 0.5, 0.5]])
    return t, c, rho


def test_table_seeds_prototypes_then_keeps_running_means():
    table = _table()
    t, c, rho = _cells()
    table.update(t, c, rho)
    # bin 0: the first two cells seed its two prototypes, the third joins the nearest
    torch.testing.assert_close(table.centre[0], torch.tensor([[0.1, 0.0], [5.0, 5.0]]))
    torch.testing.assert_close(table.rho[0], torch.tensor([[0.2, 0.2, 0.2], [0.9, 0.8, 0.7]]))
    torch.testing.assert_close(table.count, torch.tensor([[2.0, 1.0], [1.0, 0.0]]))
    # every cell finds, in every bin, the rate of its nearest live prototype
    past, seeded = table.lookup(torch.tensor([[0.0, 0.0], [4.0, 4.0]]))
    assert seeded.tolist() == [True, True]
    torch.testing.assert_close(past[:, 0], table.rho[0])
    torch.testing.assert_close(past[:, 1], rho[[3, 3]])


def test_table_drops_prototypes_no_cell_visited_within_its_memory():
    table = _table(memory=3)
    t, c, rho = _cells()
    table.update(t, c, rho)
    assert table.lookup(c)[1].tolist() == [True, True]
    table.update(torch.full((4,), 7.0), c, rho)  # 4 cells, none in bin 0
    assert table.lookup(c)[1].tolist() == [False, True]
    table.update(torch.tensor([2.0]), torch.tensor([[3.0, 3.0]]), rho[:1])
    torch.testing.assert_close(table.centre[0, 0], torch.tensor([3.0, 3.0]))  # re-seeded
    table.clear()
    assert not table.lookup(c)[1].any()


def _models(n_genes=5):
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(50, n_genes, generator=gen) + 0.1
    s = torch.rand(50, n_genes, generator=gen) + 0.1
    init = steady_state_init(u, s, 20.0)
    torch.manual_seed(0)
    full = FullModel(init, latent_dim=3)
    ancestral = AncestralModel(init, latent_dim=3, n_bins=4, n_prototypes=3)
    ancestral.load_state_dict(full.state_dict(), strict=False)
    with torch.no_grad():  # switch-on times spread over the bins, a few before t = 0
        for model in (full, ancestral):
            model.load_rates(t_on=torch.linspace(-2.0, 9.0, n_genes),
                             t_off=torch.linspace(12.0, 19.0, n_genes))
    return full, ancestral


def test_ancestral_model_with_an_empty_table_is_the_full_model():
    full, ancestral = _models()
    t = torch.tensor([-1.0, 3.0, 8.0, 14.0, 19.5])
    c = torch.randn(5, 3)
    with torch.no_grad():
        a, b = full.kinetic(t, c), ancestral.kinetic(t, c)
    for key in ("u", "s", "du", "ds"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_ancestral_kinetics_match_an_ode_solver_over_the_rate_history():
    _, model = _models()
    gen = torch.Generator().manual_seed(1)
    train_t = torch.rand(200, generator=gen) * 20.0
    train_c = torch.randn(200, 3, generator=gen)
    with torch.no_grad():
        model.ancestors.update(train_t, train_c, torch.rand(200, model.n_genes, generator=gen))
        t, c = torch.tensor([13.0]), torch.randn(1, 3, generator=gen)
        out = model.kinetic(t, c)
        history = model.rate_history(t, c)[0]  # (bins, G)
        # t = 13 is in bin 2 of 4: bins 0-1 from the ancestors, 2-3 the cell's own rate
        torch.testing.assert_close(history[:2], model.ancestors.lookup(c)[0][0, :2])
        torch.testing.assert_close(history[2:], model.transcription_rate(c).expand(2, -1))
        assert (history[:2] - history[2:]).abs().max() > 0.1
    r = {k: v.detach().double().numpy() for k, v in model.rates().items()}
    edges = [-np.inf, 5.0, 10.0, 15.0, np.inf]
    for g in range(model.n_genes):
        def rate(tau, g=g):
            if not r["t_on"][g] <= tau < r["t_off"][g]:
                return 0.0
            k = int(np.searchsorted(edges, tau, side="right")) - 1
            return float(history[k, g]) * r["alpha"][g]

        def rhs(tau, y, g=g):
            return [rate(tau) - r["beta"][g] * y[0], r["beta"][g] * y[0] - r["gamma"][g] * y[1]]

        breaks = sorted({r["t_on"][g], 5.0, 10.0, 13.0} | ({r["t_off"][g]} if r["t_off"][g]
                                                          < 13.0 else set()))
        y = [0.0, 0.0]
        for lo, hi in zip(breaks[:-1], breaks[1:], strict=True):
            if hi > lo and hi > r["t_on"][g]:
                y = solve_ivp(rhs, (max(lo, r["t_on"][g]), hi), y, method="DOP853",
                              rtol=1e-10, atol=1e-12).y[:, -1]
        np.testing.assert_allclose(out["u"][0, g].item(), r["scale_u"][g] * y[0], rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_allclose(out["s"][0, g].item(), y[1], rtol=1e-4, atol=1e-6)
        expected_ds = r["beta"][g] * y[0] - r["gamma"][g] * y[1]
        np.testing.assert_allclose(out["ds"][0, g].item(), expected_ds, rtol=1e-4, atol=1e-6)


def test_only_training_steps_update_the_table():
    _, model = _models()
    t, c = torch.tensor([3.0, 12.0]), torch.randn(2, 3)
    with torch.no_grad():  # validation
        model.kinetic(t, c)
    model.eval()  # prediction
    model.kinetic(t, c)
    assert model.ancestors.count.sum() == 0
    model.train()
    model.kinetic(t, c)
    assert model.ancestors.count.sum() == 2
    with pytest.raises(RuntimeError, match="ancestors"):
        model.set_initial_conditions(None)


@pytest.fixture(scope="module")
def ancestral_fit():
    """A short fit, recording for every stage whether the ancestors' rates were on."""
    adata = pv.datasets.simulate(n_cells=300, n_genes=30, topology="bifurcation", seed=4)
    pv.pp.preprocess(adata, random_state=0)
    vae = pv.VeloVAE(adata, rate_history="ancestors", seed=0)
    stages = []

    class Recording(pv.inference.Callback):
        def on_fit_start(self, loop):
            stages.append((loop.description, getattr(loop.model, "use_ancestors", None)))

    vae.train(max_epochs=40, progress_bar=False, num_threads=1, callbacks=[Recording()])
    return vae, adata, stages


def test_velovae_fits_the_papers_model_then_the_ancestors_rates(ancestral_fit):
    vae, adata, stages = ancestral_fit
    assert isinstance(vae.model, AncestralModel)
    assert [name for name, _ in vae.history.stages] == ["warm-up", "basic", "full",
                                                        "ancestors"]
    # the warm-up's and basic stage's model has no table; the full stage runs without it
    assert [stage for stage in stages if stage[1] is not None] == [
        ("Mixture of ODEs", False), ("Ancestors' rates", True)]
    assert vae.model.use_ancestors
    assert vae.model.ancestors.lookup(torch.zeros(1, 5))[1].any()
    state = {k: v.clone() for k, v in vae.model.ancestors.state_dict().items()}
    velocity, _ = vae.get_velocity()
    assert np.isfinite(velocity[:, vae.data.fitted]).all()
    np.testing.assert_array_equal(vae.get_velocity()[0], velocity)  # predicting changes nothing
    for key, value in vae.model.ancestors.state_dict().items():
        torch.testing.assert_close(value, state[key])
    with pytest.raises(RuntimeError, match="ancestors"):
        vae.refine_initial_conditions(epochs=2)


def test_ancestral_model_saves_and_loads(ancestral_fit, tmp_path):
    vae, adata, _ = ancestral_fit
    vae.save(tmp_path / "model")
    loaded = pv.VeloVAE.load(tmp_path / "model", adata)
    assert loaded.config["rate_history"] == "ancestors"
    np.testing.assert_array_equal(loaded.get_velocity()[0], vae.get_velocity()[0])


def test_rate_history_errors():
    adata = pv.datasets.simulate(n_cells=100, n_genes=12, seed=0)
    pv.pp.preprocess(adata, random_state=0)
    with pytest.raises(InputError, match="unknown rate_history"):
        pv.VeloVAE(adata, rate_history="parents")
    with pytest.raises(InputError, match="model='full'"):
        pv.VeloVAE(adata, model="basic", rate_history="ancestors")


def test_without_the_ancestors_stage_the_fit_is_the_papers_model():
    adata = pv.datasets.simulate(n_cells=150, n_genes=12, seed=0)
    pv.pp.preprocess(adata, random_state=0)
    vae = pv.VeloVAE(adata, rate_history="ancestors", seed=0)
    vae.train(max_epochs=6, refine_epochs=0, progress_bar=False, num_threads=1)
    assert [name for name, _ in vae.history.stages] == ["warm-up", "basic", "full"]
    assert vae.model.use_ancestors and not vae.model.ancestors.alive.any()


def test_without_ancestors_is_the_full_model_and_restores_the_switch():
    full, model = _models()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.ancestors.update(torch.rand(64, generator=gen) * 20.0,
                               torch.randn(64, 3, generator=gen),
                               torch.rand(64, model.n_genes, generator=gen))
    t, c = torch.tensor([3.0, 8.0, 13.0, 19.0]), torch.randn(4, 3, generator=gen)
    model.train()
    with model.without_ancestors():
        off = model.kinetic(t, c)
    assert model.ancestors.count.sum() == 64  # a training step added no cell
    on = model.kinetic(t, c)
    reference = full.kinetic(t, c)
    for key in ("u", "s", "du", "ds"):
        torch.testing.assert_close(off[key], reference[key])
    assert (on["s"] - off["s"]).abs().max() > 1e-3  # the ancestors' rates are back
    with pytest.raises(ValueError), model.without_ancestors():
        raise ValueError
    assert model.use_ancestors


def test_random_rates_with_the_ancestors_rates():
    """With a rate prior the sampled rates reach the piecewise solution: training runs
    through the ancestors' stage, the rates have a posterior spread, and posterior draws
    of the velocity are finite and differ between draws."""
    adata = pv.datasets.simulate(n_cells=300, n_genes=30, topology="bifurcation", seed=4)
    pv.pp.preprocess(adata, random_state=0)
    vae = pv.VeloVAE(adata, rate_history="ancestors", rate_prior=0.5, hidden=(32, 16),
                     seed=0)
    vae.train(max_epochs=6, warmup_epochs=3, refine_epochs=3, progress_bar=False,
              num_threads=1)
    assert [name for name, _ in vae.history.stages][-1] == "ancestors"
    assert vae.model.ancestors.alive.any()
    rates = vae.get_rate_uncertainty().loc[vae.data.fitted]
    assert ((rates["gamma_q05"] < rates["gamma_median"])
            & (rates["gamma_median"] < rates["gamma_q95"])).all()
    draws = vae.sample_posterior(3, return_sites=("velocity",))["velocity"]
    assert draws.shape[0] == 3 and np.isfinite(draws).all()
    assert not np.allclose(draws[0], draws[1])
