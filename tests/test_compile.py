"""The fast path for large data: torch.compile of the kinetics (same values as eager,
eager fallback, one graph for both models) and bfloat16 products in the gene-wide layers,
with the train() switches of both.

Compiling a graph takes seconds; every test here that compiles uses the process-wide
compiled ``switching_solve`` (one file runs in one worker), with per-gene or per-cell
rates, so each graph is built once per test run; the per-cell part of the ancestral
model's solution, ``kinetics.carry_solve``, is compiled by one test.
"""

import warnings
from functools import partial

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import pyro_velo as pv
from pyro_velo import _compile, kinetics
from pyro_velo._checks import InputError
from pyro_velo.inference.stages import speed_settings
from pyro_velo.model import BasicModel, history_solve
from pyro_velo.nn import WideLinear


def _inputs(per_cell_rate: bool, n_cells: int = 37, n_genes: int = 23):
    """Times and rates that visit every branch of the solution, with gradients on."""
    gen = torch.Generator().manual_seed(0)
    t_on = torch.rand(n_genes, generator=gen) * 5
    t_off = t_on + torch.rand(n_genes, generator=gen) * 10
    t = torch.rand(n_cells, 1, generator=gen) * 25 - 3  # before t_on ... long after t_off
    t[0, 0] = float(t_on[0])  # tau = 0 exactly
    t[1, 0] = float(t_off[1])
    beta = torch.rand(n_genes, generator=gen) * 3 + 0.05
    gamma = torch.rand(n_genes, generator=gen) * 3 + 0.05
    gamma[:3] = beta[:3]  # the beta == gamma limit
    shape = (n_cells, n_genes) if per_cell_rate else (n_genes,)
    alpha = torch.rand(shape, generator=gen) * 4 + 0.01
    args = [t, alpha, beta, gamma, t_on, t_off]
    for x in args[1:]:
        x.requires_grad_(True)
    return args


@pytest.mark.parametrize("per_cell_rate", [False, True], ids=["per-gene", "per-cell"])
def test_compiled_solution_and_gradients_match_eager(per_cell_rate):
    args = _inputs(per_cell_rate)
    weights = torch.randn(2, *args[0].shape[:1], args[2].shape[0],
                          generator=torch.Generator().manual_seed(1))

    def values_and_grads(solve, inputs):
        u, s, alpha_t = solve(*inputs)
        loss = (weights[0] * u).sum() + (weights[1] * s).sum()
        grads = torch.autograd.grad(loss, inputs[1:])
        return [u.detach(), s.detach(), alpha_t.detach(), *grads]

    compiled = values_and_grads(_compile.compiled(kinetics.switching_solve), args)
    assert _compile.compiled(kinetics.switching_solve)._compiled is not None
    assert not _compile.compiled(kinetics.switching_solve).failed
    # reference: eager in float64; float32 results, compiled or not, differ from it by
    # rounding only (the fused kernels round differently from eager torch's, so compare
    # each against the float64 truth on the scale of the whole tensor)
    args64 = [x.detach().double().requires_grad_(x.requires_grad) for x in args]
    weights = weights.double()
    reference = values_and_grads(kinetics.switching_solve, args64)
    names = ["u", "s", "alpha_t", "d alpha", "d beta", "d gamma", "d t_on", "d t_off"]
    for name, value, truth in zip(names, compiled, reference, strict=True):
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name
        error = (value.double() - truth).abs().max().item()
        assert error <= 2e-5 * truth.abs().max().item() + 1e-6, (name, error)


def test_compiled_rate_history_solution_matches_eager():
    """The ancestral model's piecewise solution, compiled, against eager float64."""
    t, alpha, beta, gamma, t_on, t_off = _inputs(per_cell_rate=False)
    gen = torch.Generator().manual_seed(2)
    edges = torch.linspace(0.0, 15.0, 8)[1:-1]
    history = torch.rand(t.shape[0], edges.numel() + 1, alpha.shape[0], generator=gen)
    args = [t, history.requires_grad_(True), alpha, beta, gamma, t_on, t_off, edges]
    weights = torch.randn(2, t.shape[0], alpha.shape[0], generator=gen)

    def values_and_grads(solve, inputs, weights):
        u, s, alpha_t = solve(*inputs)
        loss = (weights[0] * u).sum() + (weights[1] * s).sum()
        return [u, s, alpha_t, *torch.autograd.grad(loss, inputs[1:7])]

    wrapped = _compile.compiled(kinetics.carry_solve)
    compiled = values_and_grads(partial(history_solve, carry=wrapped), args, weights)
    assert wrapped._compiled is not None and not wrapped.failed
    args64 = [x.detach().double().requires_grad_(x.requires_grad) for x in args]
    reference = values_and_grads(history_solve, args64, weights.double())
    names = ["u", "s", "alpha_t", "d history", "d alpha", "d beta", "d gamma", "d t_on",
             "d t_off"]
    for name, value, truth in zip(names, compiled, reference, strict=True):
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name
        error = (value.double() - truth.detach()).abs().max().item()
        assert error <= 2e-5 * truth.abs().max().item() + 1e-6, (name, error)


def test_calls_without_gradients_stay_eager(monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile must not be called without gradients")

    monkeypatch.setattr(torch, "compile", no_compile)
    wrapped = _compile.CompiledOrEager(kinetics.switching_solve)
    args = _inputs(per_cell_rate=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        u, s, _ = wrapped(*args)
    expected_u, expected_s, _ = kinetics.switching_solve(*args)
    torch.testing.assert_close(u, expected_u.detach(), rtol=0, atol=0)
    torch.testing.assert_close(s, expected_s.detach(), rtol=0, atol=0)
    assert wrapped._compiled is None and not wrapped.failed


def test_a_failed_compilation_warns_once_and_falls_back_to_eager(monkeypatch):
    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("no C++ compiler found\nlong traceback")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    wrapped = _compile.CompiledOrEager(kinetics.switching_solve)
    args = _inputs(per_cell_rate=False)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*compile=False"):
        u, s, _ = wrapped(*args)
    assert wrapped.failed
    expected_u, expected_s, _ = kinetics.switching_solve(*args)
    torch.testing.assert_close(u, expected_u, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is eager and silent
        wrapped(*args)


def test_compiled_calls_recompute_in_the_backward_and_skip_the_isa_probes(monkeypatch):
    # compiling happens inside the compiled function's call: the settings must hold there
    # (no saved boolean masks, no test compilations) and be restored after it
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    before = (functorch_config.activation_memory_budget, inductor_config.cpp.vec_isa_ok)
    seen = {}

    def recording(fn, **kwargs):
        def call(*args, **kw):
            seen["budget"] = functorch_config.activation_memory_budget
            seen["vec_isa_ok"] = inductor_config.cpp.vec_isa_ok
            return fn(*args, **kw)
        return call

    monkeypatch.setattr(torch, "compile", recording)
    _compile.CompiledOrEager(kinetics.switching_solve)(*_inputs(per_cell_rate=True))
    assert seen == {"budget": 0.0, "vec_isa_ok": True}
    assert (functorch_config.activation_memory_budget,
            inductor_config.cpp.vec_isa_ok) == before


def test_speed_settings_switch_the_given_instances_only_and_restore_them(small_adata):
    """compile and bf16 are switches of the model and layer instances, not classes."""
    trained, other = (pv.VeloVAE(small_adata, seed=0) for _ in range(2))
    modules = [trained.model, trained.guide]
    wide = [m for module in modules for m in module.modules() if isinstance(m, WideLinear)]
    assert len(wide) == 2  # the encoder's input layer and the decoder's output layer
    with pytest.raises(ValueError, match="inside"):
        with speed_settings(modules, compile=True, bf16=True):
            assert trained.model.compile_kinetics is True
            assert all(layer.bf16 for layer in wide)
            assert other.model.compile_kinetics is False
            assert not any(m.bf16 for m in other.guide.modules()
                           if isinstance(m, WideLinear))
            raise ValueError("inside")
    assert trained.model.compile_kinetics is False and not any(layer.bf16 for layer in wide)
    assert "compile_kinetics" not in vars(trained.model)  # the class default again
    assert BasicModel.compile_kinetics is False and WideLinear.bf16 is False


@pytest.fixture(scope="module")
def small_adata():
    adata = pv.datasets.simulate(n_cells=300, n_genes=30, topology="linear", seed=4)
    pv.pp.preprocess(adata, n_neighbors=15, n_pcs=10, random_state=0)
    return adata


class _Recording(pv.inference.Callback):
    """Records ``read(loop)`` (default: whether the trained model compiles its kinetics)
    at every training stage, in ``seen``."""

    def __init__(self, read=lambda loop: loop.model.compile_kinetics):
        self.read, self.seen = read, []

    def on_fit_start(self, loop):
        self.seen.append(self.read(loop))


def test_train_with_compile_fits_like_eager(small_adata):
    recording = _Recording()
    seen = recording.seen
    times = {}
    for compile_ in (False, True):
        vae = pv.VeloVAE(small_adata, model="basic", seed=0)
        vae.train(max_epochs=40, progress_bar=False, compile=compile_, num_threads=1,
                  callbacks=[recording])
        times[compile_] = vae.get_latent_time()
        assert set(seen) == {compile_}
        seen.clear()
    assert BasicModel.compile_kinetics is False  # restored after training
    assert not _compile.compiled(kinetics.switching_solve).failed
    truth = small_adata.obs["true_t"]
    eager, compiled = (spearmanr(times[c], truth)[0] for c in (False, True))
    assert compiled > 0.9
    assert abs(compiled - eager) < 0.02
    assert spearmanr(times[False], times[True])[0] > 0.98


def test_train_compiles_by_default_only_for_large_work(small_adata, monkeypatch):
    recording = _Recording()
    seen = recording.seen
    vae = pv.VeloVAE(small_adata, model="basic", seed=0)
    vae.train(max_epochs=2, warmup_epochs=1, progress_bar=False, num_threads=1,
              callbacks=[recording])
    assert set(seen) == {False}  # 300 cells x 30 genes: far below the threshold
    seen.clear()
    train_cells = len(vae.data.indices("train"))
    work = train_cells * vae.data.n_genes * 2
    monkeypatch.setattr(pv.policies, "COMPILE", pv.policies.CompilePolicy(min_work=work))
    vae.train(max_epochs=2, warmup_epochs=1, progress_bar=False, num_threads=1,
              callbacks=[recording])
    assert set(seen) == {True}
    assert BasicModel.compile_kinetics is False
    with pytest.raises(InputError, match="compile must be None, True or False"):
        vae.train(max_epochs=1, compile="yes")


def test_compiled_fit_is_reproducible(small_adata):
    fits = []
    for _ in range(2):
        vae = pv.VeloVAE(small_adata, model="basic", seed=3)
        vae.train(max_epochs=3, warmup_epochs=1, progress_bar=False, compile=True,
                  num_threads=1)
        fits.append(vae.get_latent_time())
    np.testing.assert_array_equal(fits[0], fits[1])


def test_basic_and_full_model_share_one_compiled_graph(small_adata, monkeypatch):
    """Compiled, the basic model's per-gene rate is broadcast to cells x genes, so both
    models call the compiled solution with the same shapes (one graph, one compilation)
    and the values are those of the per-gene solution."""
    shapes = []

    def recording(fn):
        def call(t, alpha, *rates):
            shapes.append(tuple(alpha.shape))
            return fn(t, alpha, *rates)
        return call

    monkeypatch.setattr(pv.model, "compiled", recording)
    args = _inputs(per_cell_rate=False)
    n_cells, n_genes = args[0].shape[0], args[1].shape[0]
    basic = pv.VeloVAE(small_adata, model="basic", seed=0).model
    full = pv.VeloVAE(small_adata, seed=0).model
    per_cell = args[1].detach().expand(n_cells, n_genes).clone()
    with speed_settings([basic, full], compile=True):
        got = basic.switching_solve(*args)
        full.switching_solve(args[0], per_cell, *args[2:])
    assert shapes == [(n_cells, n_genes), (n_cells, n_genes)]
    for value, truth in zip(got, kinetics.switching_solve(*args), strict=True):
        torch.testing.assert_close(value, truth)
    shapes.clear()
    basic.switching_solve(*args)  # not compiled: nothing is broadcast
    assert shapes == []


def test_wide_linear_runs_bf16_only_in_training_steps():
    torch.manual_seed(0)
    layer = WideLinear(300, 40)
    x = torch.randn(16, 300)
    exact = layer(x)
    exact.sum().backward()
    exact_grad = layer.weight.grad.clone()
    layer.weight.grad = None
    with speed_settings([layer], bf16=True):
        approx = layer(x)
        approx.sum().backward()
        with torch.no_grad():
            evaluated = layer(x)
    assert layer.bf16 is False and WideLinear.bf16 is False  # restored
    assert approx.dtype == torch.float32 and layer.weight.dtype == torch.float32
    error = float((approx - exact).detach().norm() / exact.detach().norm())
    assert 0 < error < 1e-2, error  # rounded to bfloat16, and only that
    grad_error = float((layer.weight.grad - exact_grad).norm() / exact_grad.norm())
    assert grad_error < 1e-2, grad_error
    torch.testing.assert_close(evaluated, exact.detach(), rtol=0, atol=0)  # no grad: fp32


def test_train_uses_bf16_by_default_only_for_large_work_on_capable_cpus(small_adata,
                                                                        monkeypatch):
    recording = _Recording(lambda loop: any(
        m.bf16 for m in loop.guide.modules() if isinstance(m, WideLinear)))
    seen = recording.seen
    vae = pv.VeloVAE(small_adata, model="basic", seed=0)
    short = dict(max_epochs=2, warmup_epochs=1, progress_bar=False, num_threads=1,
                 compile=False, callbacks=[recording])
    monkeypatch.setattr(pv.nn, "bf16_supported", lambda: True)
    vae.train(**short)
    assert set(seen) == {False}  # small work
    seen.clear()
    monkeypatch.setattr(pv.policies, "COMPILE", pv.policies.CompilePolicy(min_work=1))
    vae.train(**short)
    assert set(seen) == {True}
    seen.clear()
    monkeypatch.setattr(pv.nn, "bf16_supported", lambda: False)
    vae.train(**short)
    assert set(seen) == {False}  # no native bfloat16 on this CPU
    seen.clear()
    vae.train(**short, bf16=True)
    assert set(seen) == {True}
    assert WideLinear.bf16 is False
    with pytest.raises(InputError, match="bf16 must be None, True or False"):
        vae.train(max_epochs=1, bf16="yes")


def test_train_with_bf16_fits_like_float32(small_adata):
    times = {}
    for bf16 in (False, True):
        vae = pv.VeloVAE(small_adata, seed=0)
        vae.train(max_epochs=40, progress_bar=False, bf16=bf16, compile=False,
                  num_threads=1)
        times[bf16] = vae.get_latent_time()
    truth = small_adata.obs["true_t"]
    exact, reduced = (spearmanr(times[b], truth)[0] for b in (False, True))
    assert reduced > 0.9
    assert abs(reduced - exact) < 0.02
