"""The analytic kinetics against an independent numerical ODE solver."""

import itertools

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from pyro_velo import kinetics


def _numerical(tau, u0, s0, alpha, beta, gamma):
    def rhs(_, y):
        return [alpha - beta * y[0], beta * y[0] - gamma * y[1]]

    if tau == 0:
        return u0, s0
    sol = solve_ivp(rhs, (0.0, tau), [u0, s0], method="DOP853", rtol=1e-12, atol=1e-14)
    return sol.y[0, -1], sol.y[1, -1]


GAMMA = 0.7
GRID = list(
    itertools.product(
        [0.0, 1e-3, 0.5, 3.0, 50.0],  # tau, including 0 and 50
        [(0.0, 0.0), (1.3, 0.4), (4.0, 9.0)],  # (u0, s0)
        [0.0, 0.8, 5.0],  # alpha, including 0
        [GAMMA, GAMMA + 1e-7, GAMMA - 1e-7, 0.2, 2.5],  # beta, including beta == gamma
    )
)


@pytest.mark.parametrize("tau,state,alpha,beta", GRID)
def test_solve_matches_ode_solver(tau, state, alpha, beta):
    u0, s0 = state
    u, s = kinetics.solve(
        torch.tensor(tau, dtype=torch.float64), u0, s0, alpha, beta, GAMMA
    )
    u_ref, s_ref = _numerical(tau, u0, s0, alpha, beta, GAMMA)
    scale_u = max(abs(u_ref), 1e-12)
    scale_s = max(abs(s_ref), 1e-12)
    # absolute floor for values that decay to ~0 (e.g. alpha = 0 at tau = 50)
    assert abs(u.item() - u_ref) <= 1e-5 * scale_u + 1e-12
    assert abs(s.item() - s_ref) <= 1e-5 * scale_s + 1e-12


def test_solve_is_exact_limit_at_equal_rates():
    tau = torch.tensor(2.0, dtype=torch.float64)
    b = 0.9
    _, s = kinetics.solve(tau, 1.0, 0.5, 2.0, b, b)
    expected = 0.5 * np.exp(-b * 2) + 2 / b * (1 - np.exp(-b * 2)) + (2 - b) * (-2) * np.exp(-b * 2)
    assert s.item() == pytest.approx(expected, rel=1e-12)


def test_float32_values_and_gradients_are_finite():
    taus = torch.tensor([0.0, 1e-6, 0.3, 5.0, 50.0, 500.0])
    betas = torch.tensor([0.7, 0.7 + 1e-7, 0.7 - 1e-7, 1e-3, 30.0])
    tau, beta = torch.meshgrid(taus, betas, indexing="ij")
    beta = beta.clone().requires_grad_(True)
    gamma = torch.full_like(beta, 0.7, requires_grad=True)
    alpha = torch.tensor([0.0, 2.0]).view(2, 1, 1).expand(2, *tau.shape).clone()
    alpha.requires_grad_(True)
    tau_g = tau.clone().requires_grad_(True)
    u, s = kinetics.solve(tau_g, 0.5, 1.0, alpha, beta, gamma)
    assert u.dtype == torch.float32
    assert torch.isfinite(u).all() and torch.isfinite(s).all()
    (u.sum() + s.sum()).backward()
    for g in (tau_g.grad, alpha.grad, beta.grad, gamma.grad):
        assert torch.isfinite(g).all()


def test_float32_close_to_float64_near_equal_rates():
    tau = torch.linspace(0, 50, 101)
    for beta in (0.7, 0.7 + 1e-7, 0.7 - 1e-7, 0.7 + 1e-4):
        u32, s32 = kinetics.solve(tau, 0.2, 0.1, 3.0, torch.tensor(beta), torch.tensor(0.7))
        u64, s64 = kinetics.solve(tau.double(), 0.2, 0.1, 3.0, torch.tensor(beta).double(),
                                  torch.tensor(0.7).double())
        np.testing.assert_allclose(s32.numpy(), s64.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(u32.numpy(), u64.numpy(), rtol=1e-5, atol=1e-6)


def test_solve_vectorises_over_cells_and_genes():
    n_cells, n_genes = 7, 5
    tau = torch.rand(n_cells, 1, dtype=torch.float64) * 10
    alpha = torch.rand(n_genes, dtype=torch.float64) * 3
    beta = torch.rand(n_genes, dtype=torch.float64) + 0.1
    gamma = torch.rand(n_genes, dtype=torch.float64) + 0.1
    u, s = kinetics.solve(tau, 0.0, 0.0, alpha, beta, gamma)
    assert u.shape == (n_cells, n_genes)
    i, g = 3, 2
    u_ref, s_ref = _numerical(tau[i, 0].item(), 0, 0, alpha[g].item(), beta[g].item(),
                              gamma[g].item())
    assert u[i, g].item() == pytest.approx(u_ref, rel=1e-6)
    assert s[i, g].item() == pytest.approx(s_ref, rel=1e-6)


def test_velocity_matches_finite_difference():
    tau = torch.tensor([1.7], dtype=torch.float64)
    args = (0.3, 0.2, 2.0, 0.8, 0.5)
    u, s = kinetics.solve(tau, *args)
    h = 1e-6
    u2, s2 = kinetics.solve(tau + h, *args)
    du, ds = kinetics.velocity(u, s, 2.0, 0.8, 0.5)
    assert du.item() == pytest.approx(((u2 - u) / h).item(), rel=1e-4)
    assert ds.item() == pytest.approx(((s2 - s) / h).item(), rel=1e-4)


def test_switching_solve_against_ode_with_switch():
    alpha, beta, gamma, t_on, t_off = 2.0, 1.1, 0.4, 1.0, 4.0
    ts = torch.tensor([-3.0, 0.5, 1.0, 2.5, 4.0, 7.0, 30.0], dtype=torch.float64)

    def rhs(t, y):
        a = alpha if t_on <= t < t_off else 0.0
        return [a - beta * y[0], beta * y[0] - gamma * y[1]]

    u, s, a_t = kinetics.switching_solve(
        ts, *(torch.tensor(v, dtype=torch.float64) for v in (alpha, beta, gamma, t_on, t_off))
    )
    for k, t in enumerate(ts.tolist()):
        if t <= t_on:
            assert u[k].item() == 0.0 and s[k].item() == 0.0
            continue
        sol = solve_ivp(rhs, (t_on, t), [0.0, 0.0], method="Radau", rtol=1e-12, atol=1e-14,
                        max_step=0.05)
        assert u[k].item() == pytest.approx(sol.y[0, -1], rel=1e-5)
        assert s[k].item() == pytest.approx(sol.y[1, -1], rel=1e-5)
    assert a_t.tolist() == [0.0, 0.0, alpha, alpha, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_switching_solve_equals_two_segment_piecewise_solve(dtype):
    """The written-out switching solution = the general one, values and gradients."""
    gen = torch.Generator().manual_seed(0)
    n_genes = 50
    t = torch.linspace(-2.0, 25.0, 40, dtype=dtype).unsqueeze(-1)
    beta = torch.rand(n_genes, generator=gen, dtype=dtype) * 2 + 0.05
    gamma = torch.rand(n_genes, generator=gen, dtype=dtype) * 2 + 0.05
    gamma[:5] = beta[:5]  # beta == gamma exactly
    alpha = torch.rand(n_genes, generator=gen, dtype=dtype) * 3
    t_on = torch.rand(n_genes, generator=gen, dtype=dtype) * 10
    t_off = t_on + torch.rand(n_genes, generator=gen, dtype=dtype) * 10
    t_off[5:8] = t_on[5:8]  # never on

    def run(solver):
        leaves = [x.clone().requires_grad_(True) for x in (alpha, beta, gamma, t_on, t_off)]
        a, b, g, on, off = leaves
        if solver == "switching":
            u, s, a_t = kinetics.switching_solve(t, a, b, g, on, off)
        else:
            starts = torch.stack([on, off], dim=-1)
            alphas = torch.stack([a, torch.zeros_like(a)], dim=-1)
            u, s, a_t = kinetics.piecewise_solve(t, starts, alphas, b, g)
        (u.sum() + 2 * s.sum()).backward()
        return [u.detach(), s.detach(), a_t.detach()] + [x.grad for x in leaves]

    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5,
                                                                           atol=1e-5)
    for new, old in zip(run("switching"), run("piecewise"), strict=True):
        torch.testing.assert_close(new, old, **tol)


def test_piecewise_solve_three_segments_continuity():
    starts = torch.tensor([[0.0, 2.0, 5.0]], dtype=torch.float64)
    alphas = torch.tensor([[1.0, 4.0, 0.0]], dtype=torch.float64)
    eps = 1e-9
    t = torch.tensor([[2.0 - eps], [2.0 + eps], [5.0 - eps], [5.0 + eps]], dtype=torch.float64)
    u, s, a = kinetics.piecewise_solve(t, starts, alphas, 1.0, 0.5)
    assert u[0].item() == pytest.approx(u[1].item(), abs=1e-7)
    assert s[2].item() == pytest.approx(s[3].item(), abs=1e-7)
    assert a.squeeze().tolist() == [1.0, 4.0, 4.0, 0.0]


def _segments(dtype, n_cells=40, n_genes=30, n_segments=7):
    """Sorted starts per gene (some repeated: empty segments), rates per cell and gene
    (the last 0), beta == gamma for some genes, times before the first start to long after
    the last."""
    gen = torch.Generator().manual_seed(3)
    starts = torch.sort(torch.rand(n_genes, n_segments, generator=gen, dtype=dtype) * 15,
                        -1).values
    starts[:4, 2] = starts[:4, 1]  # a segment of length zero
    alphas = torch.rand(n_cells, n_genes, n_segments, generator=gen, dtype=dtype) * 3
    alphas[..., -1] = 0.0
    beta = torch.rand(n_genes, generator=gen, dtype=dtype) * 2 + 0.05
    gamma = torch.rand(n_genes, generator=gen, dtype=dtype) * 2 + 0.05
    gamma[:5] = beta[:5]
    t = torch.linspace(-2.0, 40.0, n_cells, dtype=dtype).unsqueeze(-1)
    return t, starts, alphas, beta, gamma


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shared_starts_solve_equals_piecewise_solve(dtype):
    """Carrying the state from shared start to shared start = the segment-by-segment
    solution, values and gradients (float32: within its rounding on the scale of the
    whole tensor)."""
    t, starts, alphas, beta, gamma = _segments(dtype)

    def run(solver):
        leaves = [x.clone().requires_grad_(True) for x in (t, starts, alphas, beta, gamma)]
        t_, st, al, b, g = leaves
        if solver == "shared":
            u, s, a_t = kinetics.shared_starts_solve(t_, st.T, al.transpose(-1, -2), b, g)
        else:
            u, s, a_t = kinetics.piecewise_solve(t_, st, al, b, g)
        (u.sum() + 2 * s.sum()).backward()
        # where two starts coincide the loss has a kink; only their sum has one gradient
        tied = st.grad.clone()
        tied[:4, 1] += tied[:4, 2]
        tied[:4, 2] = 0.0
        return [u, s, a_t, t_.grad, tied, al.grad, b.grad, g.grad]

    for new, old in zip(run("shared"), run("piecewise"), strict=True):
        new, old = new.detach().double(), old.detach().double()
        assert new.shape == old.shape and torch.isfinite(new).all()
        rtol = 1e-10 if dtype == torch.float64 else 1e-5
        assert (new - old).abs().max() <= rtol * old.abs().max() + rtol


def test_shared_starts_solve_before_the_first_start_is_zero():
    t, starts, alphas, beta, gamma = _segments(torch.float64)
    u, s, a_t = kinetics.shared_starts_solve(t, starts.T, alphas.transpose(-1, -2), beta,
                                             gamma)
    before = t < starts[:, 0]
    assert before.any() and (~before).any()
    assert (u[before] == 0).all() and (s[before] == 0).all() and (a_t[before] == 0).all()


def test_shared_starts_solve_with_leading_sample_dimensions():
    """Rates and starts with a leading sample dimension (rates drawn from a prior) give
    each sample's own solution."""
    t, starts, alphas, beta, gamma = _segments(torch.float64)
    scale = torch.tensor([1.0, 1.7]).view(2, 1, 1)
    u, s, a_t = kinetics.shared_starts_solve(
        t, (starts.T * scale).unsqueeze(1), alphas.transpose(-1, -2), beta * scale,
        gamma * scale)
    assert u.shape == (2, *alphas.shape[:2])
    for k in range(2):
        expected = kinetics.piecewise_solve(t, starts * scale[k], alphas, beta * scale[k],
                                            gamma * scale[k])
        for got, want in zip((u[k], s[k], a_t[k]), expected, strict=True):
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expm1_ratio_and_its_gradient_are_accurate(dtype):
    """expm1(x)/x and its derivative over x from -1e-8 to -3, through the switch between
    the Taylor series and the direct form (reference: mpmath, 30 digits)."""
    import mpmath

    mpmath.mp.dps = 30
    xs = -torch.logspace(-8, 0.5, 300, dtype=dtype).requires_grad_(True)
    # the reference at the same (rounded) arguments
    points = [mpmath.mpf(v) for v in xs.tolist()]
    value = [mpmath.expm1(v) / v for v in points]
    slope = [(v * mpmath.exp(v) - mpmath.expm1(v)) / v**2 for v in points]
    y = kinetics._expm1_ratio(xs)
    (grad,) = torch.autograd.grad(y.sum(), xs)
    eps = torch.finfo(dtype).eps
    value_error = max(abs(float(a / b) - 1) for a, b in zip(y.tolist(), value, strict=True))
    slope_error = max(abs(float(a / b) - 1) for a, b in zip(grad.tolist(), slope, strict=True))
    assert value_error < 8 * eps, value_error
    # the direct form's gradient near the cutoff: eps / cutoff (float32 24 eps, float64
    # 1900 eps = 4e-13, measured); before the cutoff was raised: 2500 eps in float32
    assert slope_error < (100 * eps if dtype == torch.float32 else 1e-12), slope_error
