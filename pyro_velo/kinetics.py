"""Analytic solutions of the transcription / splicing / degradation ODE.

The kinetic equations of one gene (La Manno et al. 2018; paper eq. 1 and 5) are::

    du/dt = alpha - beta * u
    ds/dt = beta * u - gamma * s

with a transcription rate ``alpha`` that is constant over the elapsed time ``tau``.
Everything here is pure torch, broadcasts over any leading shape (cells x genes) and is
safe in float32: exact at ``beta == gamma`` (the limit form), no cancellation near it, and
no NaN or inf in values or gradients for ``tau = 0``, ``alpha = 0`` or large ``tau``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["solve", "velocity", "piecewise_solve", "superposed_solve", "add_step_response",
           "switching_solve"]


def _expm1_ratio(x: Tensor) -> Tensor:
    """``expm1(x) / x`` with its limit 1 at ``x = 0`` (finite gradients everywhere).

    Below ``|x| = eps^(1/6)`` of the dtype (0.07 in float32, 0.0025 in float64) the
    Taylor series through ``x^4`` is used; its truncation error, ``x^5 / 720``, is below
    ``eps`` there. The cutoff is that high for two reasons. The gradient of the direct
    form cancels to a relative error of ``eps / |x|`` (3e-4 in float32 at ``|x| =
    3e-4``). And ``torch.compile``'s CPU kernels evaluate ``expm1`` as ``exp(x) - 1``
    (torch 2.13: relative error 1e-3 at ``x = -1e-5``).
    """
    cutoff = torch.finfo(x.dtype).eps ** (1 / 6)
    small = x.abs() < cutoff
    x_safe = torch.where(small, torch.full_like(x, -1.0), x)
    taylor = 1.0 + x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x / 120)))
    return torch.where(small, taylor, torch.expm1(x_safe) / x_safe)


def _exp_difference_quotient(beta: Tensor, gamma: Tensor, tau: Tensor) -> Tensor:
    """``(exp(-gamma tau) - exp(-beta tau)) / (gamma - beta)``, stable for all beta, gamma.

    The quotient is symmetric in beta and gamma, so it is written with
    ``m = min(beta, gamma)`` and ``D = |gamma - beta|`` as ``-tau exp(-m tau) phi(-D tau)``
    with ``phi(x) = expm1(x) / x``. The argument of ``phi`` is never positive, so nothing
    overflows, and at ``beta == gamma`` it gives the exact limit ``-tau exp(-beta tau)``.
    """
    m = torch.minimum(beta, gamma)
    d = (gamma - beta).abs()
    return -tau * torch.exp(-m * tau) * _expm1_ratio(-d * tau)


def solve(
    tau: Tensor,
    u0: Tensor | float,
    s0: Tensor | float,
    alpha: Tensor | float,
    beta: Tensor | float,
    gamma: Tensor | float,
) -> tuple[Tensor, Tensor]:
    """State ``(u, s)`` after time ``tau`` from ``(u0, s0)`` under constant rates.

    Parameters
    ----------
    tau
        Elapsed time, ``>= 0``. Any shape broadcastable with the others.
    u0, s0
        Unspliced and spliced state at ``tau = 0``.
    alpha
        Transcription rate (``>= 0``), constant over ``tau``.
    beta, gamma
        Splicing and degradation rates (``> 0``).

    Returns
    -------
    u, s
        Tensors of the broadcast shape.

    Notes
    -----
    ``u = u0 e^{-beta tau} + alpha/beta (1 - e^{-beta tau})`` and
    ``s = s0 e^{-gamma tau} + alpha/gamma (1 - e^{-gamma tau})
    + (alpha - beta u0) (e^{-gamma tau} - e^{-beta tau}) / (gamma - beta)``
    (paper eq. 2-3), the last quotient evaluated by a form that is exact at beta == gamma.
    """
    tau, u0, s0, alpha, beta, gamma = _as_tensors(tau, u0, s0, alpha, beta, gamma)
    exp_b = torch.exp(-beta * tau)
    exp_g = torch.exp(-gamma * tau)
    u = u0 * exp_b - alpha / beta * torch.expm1(-beta * tau)
    s = (
        s0 * exp_g
        - alpha / gamma * torch.expm1(-gamma * tau)
        + (alpha - beta * u0) * _exp_difference_quotient(beta, gamma, tau)
    )
    return u, s


def velocity(
    u: Tensor, s: Tensor, alpha: Tensor | float, beta: Tensor | float, gamma: Tensor | float
) -> tuple[Tensor, Tensor]:
    """Time derivatives ``(du/dt, ds/dt)`` of the kinetic equations at state ``(u, s)``."""
    return alpha - beta * u, beta * u - gamma * s


def piecewise_solve(
    t: Tensor,
    starts: Tensor,
    alphas: Tensor,
    beta: Tensor | float,
    gamma: Tensor | float,
    u0: Tensor | float = 0.0,
    s0: Tensor | float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """State at time ``t`` of a gene whose transcription rate is piecewise constant.

    Segment ``k`` runs from ``starts[..., k]`` to ``starts[..., k + 1]`` (the last one has
    no end) with rate ``alphas[..., k]``. Before ``starts[..., 0]`` the state is
    ``(u0, s0)``. Segments must be sorted by start time.

    Parameters
    ----------
    t
        Query times, shape broadcastable to the batch shape (e.g. ``(cells, 1)``).
    starts, alphas
        Segment start times and rates; last dimension indexes segments, the leading ones
        broadcast with ``t`` (e.g. ``(genes, K)`` or ``(cells, genes, K)``).
    beta, gamma
        Rates, broadcastable to the batch shape.
    u0, s0
        State before the first segment.

    Returns
    -------
    u, s, alpha_t
        State at ``t`` and the transcription rate active at ``t`` (0 before the first
        segment), so that :func:`velocity` can be evaluated directly.
    """
    t = torch.as_tensor(t, dtype=starts.dtype, device=starts.device)
    n_segments = starts.shape[-1]
    u = torch.zeros((), dtype=starts.dtype, device=starts.device) + u0
    s = torch.zeros((), dtype=starts.dtype, device=starts.device) + s0
    alpha_t = torch.zeros((), dtype=starts.dtype, device=starts.device)
    # unbind, not indexing: the backward of an index fills a zero tensor of the whole
    # (..., K) shape for each segment (40% of the ancestral model's kinetics, session 14)
    starts_k, alphas_k = starts.unbind(-1), alphas.unbind(-1)
    for k in range(n_segments):
        start = starts_k[k]
        elapsed = (t - start).clamp(min=0.0)
        if k + 1 < n_segments:
            elapsed = torch.minimum(elapsed, (starts_k[k + 1] - start).clamp(min=0.0))
        u, s = solve(elapsed, u, s, alphas_k[k], beta, gamma)
        alpha_t = torch.where(t >= start, alphas_k[k], alpha_t)
    return u, s, alpha_t


def add_step_response(
    t: Tensor, start: Tensor, jump: Tensor, beta: Tensor, gamma: Tensor,
    u: Tensor, s: Tensor, alpha_t: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(u, s, alpha_t)`` plus the response at ``t`` to a rate step of ``jump`` at ``start``.

    From ``(0, 0)``, a unit step gives ``U = (1 - e^{-beta tau}) / beta`` and ``S = (1 -
    e^{-gamma tau}) / gamma + (e^{-gamma tau} - e^{-beta tau}) / (gamma - beta)`` after
    ``tau = t - start`` (:func:`solve` with ``alpha = 1``), and nothing before ``start``.
    One piece of :func:`superposed_solve`.
    """
    tau = (t - start).clamp(min=0.0)
    u = u - jump / beta * torch.expm1(-beta * tau)
    s = s + jump * (_exp_difference_quotient(beta, gamma, tau)
                    - torch.expm1(-gamma * tau) / gamma)
    alpha_t = alpha_t + torch.where(t >= start, jump, 0.0)
    return u, s, alpha_t


def superposed_solve(
    t: Tensor,
    starts: Sequence[Tensor],
    alphas: Sequence[Tensor],
    beta: Tensor | float,
    gamma: Tensor | float,
    step: Callable[..., tuple[Tensor, Tensor, Tensor]] = add_step_response,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`piecewise_solve` from the zero state, as a sum of step responses.

    The ODE is linear in the transcription rate, so the state at ``t`` is the sum, over
    the segment starts, of the rate's jump there (``alphas[k] - alphas[k - 1]``) times
    the response to a unit step switched on at that start. This takes three
    transcendental functions per segment where :func:`piecewise_solve`, which carries the
    state from segment to segment, takes six. The price: a state long after a switch-off
    is a difference of responses, with an absolute error of float32's epsilon times
    ``alpha / beta`` instead of a relative one.

    Parameters
    ----------
    t
        Query times, broadcastable with the segments' tensors.
    starts, alphas
        One tensor per segment (sorted by start time): where it starts and its rate. The
        last segment has no end; before the first the state is zero.
    beta, gamma
        Rates, broadcastable to the batch shape.
    step
        Adds one segment's response: :func:`add_step_response` or a compiled version of
        it (:class:`pyro_velo.model.AncestralModel` on large data).

    Returns
    -------
    u, s, alpha_t
        As for :func:`piecewise_solve`.

    Notes
    -----
    Segments come as sequences of contiguous tensors, one step each, rather than one
    tensor with a segment dimension. Measured on the ancestral model's kinetics (forward
    and backward, 128 cells x 1992 genes, 9 segments, two threads): one graph compiled
    over all segments took 29 ms a step and 32 s to compile, one compiled step per
    segment 21 ms and 4 s; with one strided tensor the whole graph was slower still.
    """
    beta, gamma = _as_tensors(beta, gamma)
    # zeros of the full shape that record gradients like the later states: every segment
    # calls ``step`` alike, so a compiled step is compiled once, not twice
    shape = torch.broadcast_shapes(t.shape, starts[0].shape, alphas[0].shape, beta.shape,
                                   gamma.shape)
    u, s, alpha_t = (torch.zeros(shape, dtype=beta.dtype, device=beta.device,
                                 requires_grad=torch.is_grad_enabled()) for _ in range(3))
    previous: Tensor | float = 0.0
    for start, alpha in zip(starts, alphas, strict=True):
        u, s, alpha_t = step(t, start, alpha - previous, beta, gamma, u, s, alpha_t)
        previous = alpha
    return u, s, alpha_t


def switching_solve(
    t: Tensor,
    alpha: Tensor,
    beta: Tensor,
    gamma: Tensor,
    t_on: Tensor,
    t_off: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The basic model's kinetic function (paper section 3.3).

    Each gene is off (``u = s = 0``) before ``t_on``, transcribes at rate ``alpha`` on
    ``[t_on, t_off)`` and is repressed (rate 0) from ``t_off`` on; ``t_off >= t_on``.
    Times before ``t_on`` (including negative times) simply give the zero state.

    Returns
    -------
    u, s, alpha_t
        State and active transcription rate at ``t``.

    Notes
    -----
    The same values as :func:`piecewise_solve` with segments ``(t_on, alpha)`` and
    ``(t_off, 0)``, written out for this case: the on-phase starts from zero and the
    off-phase has no production, which drops the terms that vanish (6 transcendental
    functions per entry instead of 12). This is the model's inner loop (cells x genes
    every step).
    """
    t = torch.as_tensor(t, dtype=alpha.dtype, device=alpha.device)
    # on-phase, from (0, 0) at t_on for tau1 (at most until t_off)
    tau1 = torch.minimum((t - t_on).clamp(min=0.0), (t_off - t_on).clamp(min=0.0))
    u1 = -alpha / beta * torch.expm1(-beta * tau1)
    s1 = (-alpha / gamma * torch.expm1(-gamma * tau1)
          + alpha * _exp_difference_quotient(beta, gamma, tau1))
    # off-phase: decay of (u1, s1) for tau2 after t_off (zero before it)
    tau2 = (t - t_off).clamp(min=0.0)
    exp_b = torch.exp(-beta * tau2)
    exp_g = torch.exp(-gamma * tau2)
    u = u1 * exp_b
    s = s1 * exp_g - beta * u1 * _exp_difference_quotient(beta, gamma, tau2)
    alpha_t = torch.where((t >= t_on) & (t < t_off), alpha, torch.zeros_like(alpha))
    return u, s, alpha_t


def _as_tensors(*values: Tensor | float) -> list[Tensor]:
    """Turn scalars into tensors matching the dtype/device of the first tensor given."""
    ref = next((v for v in values if isinstance(v, Tensor)), None)
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    device = ref.device if ref is not None else None
    return [v if isinstance(v, Tensor) else torch.tensor(v, dtype=dtype, device=device)
            for v in values]
