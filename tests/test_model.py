"""The basic model and guide: trace shapes, log densities, ELBO, gradients."""

import math

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyro_velo import kinetics
from pyro_velo.guides import AmortizedGuide
from pyro_velo.initialize import (
    RateInit,
    WindowTable,
    steady_state_init,
    time_informed_init,
    window_initial_conditions,
)
from pyro_velo.model import BasicModel, FullModel
from pyro_velo.train import local_params, loss_module

N_CELLS, N_GENES, BATCH = 40, 6, 8


@pytest.fixture
def pair():
    torch.manual_seed(0)
    u = torch.rand(N_CELLS, N_GENES) * 2
    s = torch.rand(N_CELLS, N_GENES) * 3
    with local_params():
        model = BasicModel(steady_state_init(u, s, t_max=20.0), t_max=20.0)
        guide = AmortizedGuide(N_GENES, hidden=(16, 8), dropout=0.0, t_max=20.0)
    return model, guide, u, s


def _traces(model, guide, u, s, idx, n_obs):
    with local_params():
        guide_trace = poutine.trace(guide).get_trace(u[idx], s[idx], idx, n_obs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            u[idx], s[idx], idx, n_obs
        )
    return model_trace, guide_trace


def test_trace_shapes_and_plate_scale(pair):
    model, guide, u, s = pair
    idx = torch.arange(BATCH)
    model_trace, guide_trace = _traces(model, guide, u, s, idx, N_CELLS)
    model_trace.compute_log_prob()
    assert model_trace.nodes["t"]["value"].shape == (BATCH,)
    assert model_trace.nodes["u"]["fn"].batch_shape == (BATCH,)
    assert model_trace.nodes["u"]["fn"].event_shape == (N_GENES,)
    assert model_trace.nodes["s"]["log_prob"].shape == (BATCH,)
    assert model_trace.nodes["u"]["scale"] == pytest.approx(N_CELLS / BATCH)
    assert guide_trace.nodes["t"]["value"].shape == (BATCH,)
    assert model_trace.nodes["cells"]["value"].tolist() == idx.tolist()


def test_model_log_density_matches_hand_written(pair):
    model, guide, u, s = pair
    idx = torch.tensor([3, 7, 11, 19])
    model_trace, _ = _traces(model, guide, u, s, idx, len(idx))
    model_trace.compute_log_prob()
    t = model_trace.nodes["t"]["value"].detach().double()
    r = {k: v.detach().double() for k, v in model.rates().items()}
    sigma_u = model.likelihood.log_sigma_u.detach().double().exp()
    sigma_s = model.likelihood.log_sigma_s.detach().double().exp()
    expected = 0.0
    for i, cell in enumerate(idx.tolist()):
        ti = t[i].item()
        expected += _normal_logpdf(ti, 10.0, 5.0)
        for g in range(N_GENES):
            if ti <= r["t_on"][g]:
                uh = sh = 0.0
            else:
                tau_on = min(ti, r["t_off"][g].item()) - r["t_on"][g].item()
                uh, sh = kinetics.solve(torch.tensor(tau_on, dtype=torch.float64), 0.0, 0.0,
                                        r["alpha"][g], r["beta"][g], r["gamma"][g])
                if ti > r["t_off"][g]:
                    uh, sh = kinetics.solve(torch.tensor(ti - r["t_off"][g].item(),
                                                         dtype=torch.float64),
                                            uh, sh, 0.0, r["beta"][g], r["gamma"][g])
                uh, sh = float(uh), float(sh)
            expected += _normal_logpdf(u[cell, g].item(), r["scale_u"][g].item() * uh,
                                       sigma_u[g].item())
            expected += _normal_logpdf(s[cell, g].item(), sh, sigma_s[g].item())
    assert model_trace.log_prob_sum().item() == pytest.approx(expected, rel=1e-4)


def _normal_logpdf(x, mu, sigma):
    return -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)


def test_elbo_equals_mean_of_log_weights(pair):
    """Trace_ELBO's loss is -(log p(x, t) - log q(t | x)) for a single particle."""
    model, guide, u, s = pair
    idx = torch.arange(10)
    pyro.set_rng_seed(3)
    with local_params():
        loss = loss_module(model, guide)(u[idx], s[idx], idx, N_CELLS).item()
    pyro.set_rng_seed(3)
    model_trace, guide_trace = _traces(model, guide, u, s, idx, N_CELLS)
    log_w = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
    assert loss == pytest.approx(-log_w.item(), rel=1e-5)


def test_gradients_reach_every_parameter(pair):
    model, guide, u, s = pair
    idx = torch.arange(16)
    with local_params():
        elbo = loss_module(model, guide)
        elbo(u[idx], s[idx], idx, N_CELLS).backward()
        params = dict(elbo.named_parameters())
    assert {"model.log_alpha", "model.t_on", "model.likelihood.log_sigma_s"} <= set(params)
    assert any(name.startswith("guide.encoder") for name in params)
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_time_dist_override_changes_the_prior(pair):
    """The prior is one overridable method (extension point for modellers)."""
    _, _, u, s = pair

    class LateModel(BasicModel):
        def time_dist(self, idx):
            return pyro.distributions.Normal(torch.full(idx.shape, 15.0), 1.0)

    with local_params():
        model = LateModel(steady_state_init(u, s, 20.0))
        trace = poutine.trace(model).get_trace(u[:5], s[:5], torch.arange(5), N_CELLS)
    assert trace.nodes["t"]["fn"].loc.tolist() == [15.0] * 5


def test_steady_state_init_recovers_gamma_and_falls_back():
    torch.manual_seed(1)
    t = torch.rand(500) * 30
    gamma_true = torch.tensor([0.3, 1.5, 0.8])
    u, s = kinetics.solve(t[:, None], 0.0, 0.0, torch.tensor([2.0, 1.0, 3.0]), 1.0, gamma_true)
    u = torch.cat([u, torch.zeros(500, 1)], dim=1)  # a gene without unspliced signal
    s = torch.cat([s, torch.rand(500, 1)], dim=1)
    init = steady_state_init(u, s, t_max=20.0)
    np.testing.assert_allclose(init.gamma[:3].numpy(), gamma_true.numpy(), rtol=0.1)
    assert torch.isfinite(init.gamma).all() and (init.gamma > 0).all()
    assert init.gamma[3] == pytest.approx(float(init.gamma[:3].median()), rel=1e-5)
    assert torch.isfinite(init.alpha).all()


def test_time_informed_init_finds_switch_times_and_direction():
    torch.manual_seed(2)
    t = torch.rand(800) * 20
    beta, gamma = torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.3])
    alpha = torch.tensor([2.0, 1.0])
    t_on, t_off = torch.tensor([3.0, -30.0]), torch.tensor([12.0, 6.0])
    u, s, _ = kinetics.switching_solve(t[:, None], alpha, beta, gamma, t_on, t_off)
    on, off, a, err = time_informed_init(u, s, t, beta, gamma, torch.ones(2), n_grid=41)
    assert on[0].item() == pytest.approx(3.0, abs=1.0)
    assert off[0].item() == pytest.approx(12.0, abs=1.0)
    assert off[1].item() == pytest.approx(6.0, abs=1.0)  # early repression: on before t=0
    assert on[1].item() < 0
    assert a[0].item() == pytest.approx(2.0, rel=0.2)
    *_, err_reversed = time_informed_init(u, s, 20 - t, beta, gamma, torch.ones(2), n_grid=41)
    assert err < err_reversed


def test_time_informed_init_picks_the_best_grid_pair():
    # independent check of the blocked float32 search: every (t_on, t_off) pair of the
    # grid evaluated directly with the float64 switching solution and its least-squares
    # alpha; the pair chosen must fit as well as the best of them
    gen = torch.Generator().manual_seed(3)
    n_cells, n_genes, n_grid = 300, 6, 8
    t = torch.rand(n_cells, generator=gen) * 20
    beta = torch.rand(n_genes, generator=gen) * 2 + 0.2
    gamma = torch.rand(n_genes, generator=gen) * 2 + 0.1
    scale_u = torch.rand(n_genes, generator=gen) + 0.5
    t_on_true = torch.rand(n_genes, generator=gen) * 10 - 3
    u, s, _ = kinetics.switching_solve(t[:, None], torch.full((n_genes,), 2.0), beta, gamma,
                                       t_on_true, t_on_true + 8)
    u = u * scale_u + 0.1 * torch.rand(n_cells, n_genes, generator=gen)
    s = s + 0.1 * torch.rand(n_cells, n_genes, generator=gen)
    on, off, alpha, _ = time_informed_init(u, s, t, beta, gamma, scale_u, n_grid=n_grid)

    x_u, x_s = u.double(), s.double()
    w_u, w_s = 1 / x_u.var(0), 1 / x_s.var(0)
    b, g, su, tt = beta.double(), gamma.double(), scale_u.double(), t.double()[:, None]

    def error(t_on, t_off, a=None):
        fu, fs, _ = kinetics.switching_solve(tt, torch.ones_like(b), b, g, t_on, t_off)
        fu = fu * su
        if a is None:  # least squares, clamped as the search does
            a = ((w_u * (fu * x_u).sum(0) + w_s * (fs * x_s).sum(0))
                 / (w_u * (fu * fu).sum(0) + w_s * (fs * fs).sum(0)).clamp(min=1e-12)
                 ).clamp(1e-2, 1e2)
        return w_u * ((x_u - a * fu) ** 2).sum(0) + w_s * ((x_s - a * fs) ** 2).sum(0)

    lo, hi = float(t.min()), float(t.max())
    span = hi - lo
    grid_on = torch.linspace(lo - 2 * span, hi, n_grid, dtype=torch.float64)
    grid_off = torch.linspace(lo, hi + span, n_grid, dtype=torch.float64)
    best = torch.full((n_genes,), float("inf"), dtype=torch.float64)
    for a in grid_on:
        for b_off in grid_off[grid_off > a]:
            best = torch.minimum(best, error(a.expand(n_genes), b_off.expand(n_genes)))
    chosen = error(on.double(), off.double(), alpha.double())
    np.testing.assert_allclose(chosen.numpy(), best.numpy(), rtol=1e-4)


def test_load_rates_keeps_switch_order(pair):
    model, *_ = pair
    model.load_rates(t_on=torch.full((N_GENES,), 2.0), t_off=torch.full((N_GENES,), 9.0))
    r = model.rates()
    assert torch.allclose(r["t_on"], torch.tensor(2.0))
    assert torch.allclose(r["t_off"], torch.tensor(9.0))
    init = RateInit(*(torch.ones(3) for _ in range(8)))
    with pytest.raises(ValueError, match="time_prior_scale"):
        BasicModel(init, time_prior_scale=0.0)


def test_window_initial_conditions_average_the_preceding_cells_of_the_same_state():
    # two cell states (c = +-5), times on a grid; u = time, s = 10 * time (+100 in state B)
    t = torch.arange(0, 10, 0.01, dtype=torch.float64).repeat(2)
    state_b = torch.arange(2000) >= 1000
    c = torch.where(state_b, 5.0, -5.0).double()[:, None].repeat(1, 2)
    u = t[:, None].clone()
    s = (10 * t + 100 * state_b)[:, None].double()
    t0, u0, s0 = window_initial_conditions(t, c, u, s, delta1=1.0, delta2=0.2, n_clusters=2,
                                           n_bins=1000)
    late = t > 2.0
    # window [t-1, t-0.2] has mean time t-0.6: u0 ~ t - 0.6 and s0 from the same state only
    np.testing.assert_allclose(u0[late, 0].numpy(), (t[late] - 0.6).numpy(), atol=0.02)
    np.testing.assert_allclose(s0[late, 0].numpy(),
                               (10 * (t[late] - 0.6) + 100 * state_b[late]).numpy(), atol=0.2)
    np.testing.assert_allclose(t0[late].numpy(), (t[late] - 0.6).numpy())
    # at the very start of time there is no preceding cell: zero start, t0 = nan
    assert torch.isnan(t0[t < 0.1]).all() and (u0[t < 0.1] == 0).all()
    # held-out cells never enter the summaries
    reference = torch.rand(2000, generator=torch.Generator().manual_seed(0)) < 0.5
    u_poisoned = torch.where(reference[:, None], u, torch.full_like(u, 1e6))
    _, u0_ref, _ = window_initial_conditions(t, c, u_poisoned, s, 1.0, 0.2, reference=reference,
                                             n_clusters=2, n_bins=1000)
    assert u0_ref.max() < 100
    # a state that appears late (a branch) does not borrow the other state's window:
    # its first cells keep the zero start
    late_b = state_b & (t < 5.0)
    t0_l, _, s0_l = window_initial_conditions(t[~late_b], c[~late_b], u[~late_b], s[~late_b],
                                              1.0, 0.2, n_clusters=2, n_bins=1000)
    t_l, b_l = t[~late_b], state_b[~late_b]
    assert torch.isnan(t0_l[b_l & (t_l < 5.2)]).all()
    assert not torch.isnan(t0_l[b_l & (t_l > 5.3)]).any()
    np.testing.assert_allclose(s0_l[b_l & (t_l > 6.0), 0].numpy(),
                               (10 * (t_l[b_l & (t_l > 6.0)] - 0.6) + 100).numpy(), atol=0.2)
    with pytest.raises(ValueError, match="delta1"):
        window_initial_conditions(t, c, u, s, delta1=0.1, delta2=0.5)


def test_full_model_with_rho_one_equals_basic_model(pair):
    model, _, u, s = pair
    with local_params():
        full = FullModel(steady_state_init(u, s, 20.0), latent_dim=3)
    full.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        full.decoder.out.weight.zero_()
        full.decoder.out.bias.fill_(30.0)  # sigmoid -> 1
    t = torch.linspace(-2, 25, 9)
    basic_out = model.kinetic(t)
    full_out = full.kinetic(t, torch.randn(9, 3))
    for key in ("u", "s", "du", "ds"):
        torch.testing.assert_close(full_out[key], basic_out[key])


def test_full_model_trace_has_cell_state_and_refined_kinetics(pair):
    _, _, u, s = pair
    with local_params():
        full = FullModel(steady_state_init(u, s, 20.0), latent_dim=4)
        guide = AmortizedGuide(N_GENES, hidden=(16,), dropout=0.0, latent_dim=4)
        idx = torch.arange(BATCH)
        guide_trace = poutine.trace(guide).get_trace(u[idx], s[idx], idx, N_CELLS)
        trace = poutine.trace(poutine.replay(full, trace=guide_trace)).get_trace(
            u[idx], s[idx], idx, N_CELLS)
    assert trace.nodes["c"]["value"].shape == (BATCH, 4)
    assert trace.nodes["c"]["fn"].event_shape == (4,)
    # a refined cell starts from its own state: at t = t0 the fit equals (u0, s0)
    t0 = torch.full((N_CELLS,), 5.0)
    t0[0] = float("nan")
    full.set_initial_conditions(WindowTable.per_cell(t0, u, s))
    out = full.kinetic(torch.full((3,), 5.0), torch.zeros(3, 4), idx=torch.tensor([0, 1, 2]))
    torch.testing.assert_close(out["u"][1:], u[1:3])
    torch.testing.assert_close(out["s"][1:], s[1:3])
    assert not torch.allclose(out["s"][0], s[0])  # cell 0 has no initial state


def test_direction_score_reads_the_direction_of_time_from_splicing():
    """ds/dt = beta u - gamma s: forward order scores positive, its reverse negative."""
    from pyro_velo.initialize import direction_score

    t = torch.linspace(0, 20, 400)
    alpha = torch.tensor([2.0, 1.0, 3.0])
    beta = torch.tensor([1.0, 0.8, 1.5])
    gamma = torch.tensor([0.3, 0.5, 0.2])
    u, s, _ = kinetics.switching_solve(t[:, None], alpha, beta, gamma,
                                       torch.tensor([1.0, 4.0, 2.0]),
                                       torch.tensor([9.0, 15.0, 12.0]))
    gen = torch.Generator().manual_seed(0)
    u = u + 0.05 * torch.randn(u.shape, generator=gen)
    s = s + 0.05 * torch.randn(s.shape, generator=gen)
    forward = direction_score(t, u, s, beta, gamma, torch.ones(3))
    backward = direction_score(20 - t, u, s, beta, gamma, torch.ones(3))
    assert forward > 0.5 and backward < -0.5
    assert forward == pytest.approx(-backward, abs=0.05)


def test_diffusion_pseudotime_orders_a_chain_from_its_ends():
    import numpy as np
    import scipy.sparse as sp
    from scipy.stats import spearmanr

    from pyro_velo.initialize import diffusion_pseudotimes

    n = 200
    # a path graph with a few second neighbours, cells shuffled
    rows = np.concatenate([np.arange(n - 1), np.arange(n - 2)])
    cols = np.concatenate([np.arange(1, n), np.arange(2, n)])
    graph = sp.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    perm = np.random.default_rng(0).permutation(n)
    graph = sp.csr_matrix(graph + graph.T)[perm][:, perm]
    position = perm  # row j of the shuffled graph is cell perm[j] of the chain
    candidates = diffusion_pseudotimes(graph, n_roots=1)
    assert len(candidates) == 2
    for pt in candidates:
        assert pt.min() == 0 and pt.max() == 1
        assert abs(spearmanr(pt, position)[0]) > 0.99
    # the two roots are the two ends: opposite orders
    assert spearmanr(candidates[0], candidates[1])[0] < -0.99
