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

import torch
from torch import Tensor

__all__ = ["solve", "velocity", "piecewise_solve", "shared_starts_solve",
           "segment_coefficients", "carry_solve", "switching_solve"]


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
    # (..., K) shape for each segment (40% of the ancestral model's kinetics step,
    # measured by benchmarks/kinetics_step.py)
    starts_k, alphas_k = starts.unbind(-1), alphas.unbind(-1)
    for k in range(n_segments):
        start = starts_k[k]
        elapsed = (t - start).clamp(min=0.0)
        if k + 1 < n_segments:
            elapsed = torch.minimum(elapsed, (starts_k[k + 1] - start).clamp(min=0.0))
        u, s = solve(elapsed, u, s, alphas_k[k], beta, gamma)
        alpha_t = torch.where(t >= start, alphas_k[k], alpha_t)
    return u, s, alpha_t


def shared_starts_solve(
    t: Tensor,
    starts: Tensor,
    alphas: Tensor,
    beta: Tensor | float,
    gamma: Tensor | float,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`piecewise_solve` from the zero state, for segment starts shared by all cells.

    With per-gene starts the decay over a whole segment, and so every transcendental
    function of the solution, is a per-gene coefficient. The state at each start is
    then carried from start to start by multiply-adds on the cells' rates, and the
    cell's own segment is solved once (:func:`solve`) from the state at its start. The
    transcendentals thus cost one segment's per cell and gene instead of one per
    segment, and the state is carried forward (relative rounding error) rather than
    summed from step responses (absolute error).

    Parameters
    ----------
    t
        Query times ``(..., B, 1)`` (or any shape broadcastable with ``alphas[..., 0, :]``).
    starts
        Segment starts ``(..., K, G)``, sorted along ``K`` (ties give empty segments),
        without a cell dimension of their own: they broadcast with ``alphas``. Segment
        ``k`` runs from ``starts[..., k, :]`` to the next start; the last has no end.
    alphas
        Each segment's rate per cell and gene ``(..., B, K, G)``.
    beta, gamma
        Rates, broadcastable to ``(..., G)``.

    Returns
    -------
    u, s, alpha_t
        As for :func:`piecewise_solve` (zero before the first start).
    """
    beta, gamma = _as_tensors(beta, gamma)
    return carry_solve(t, starts, alphas, beta, gamma, *segment_coefficients(starts, beta, gamma))


def segment_coefficients(starts: Tensor, beta: Tensor, gamma: Tensor) -> tuple[Tensor, ...]:
    """Per-gene coefficients of whole segments for :func:`shared_starts_solve`.

    Over a segment of length ``L`` at rate ``a`` the state goes from ``(u, s)`` to
    ``u' = u e^{-beta L} + a U(L)`` and ``s' = s e^{-gamma L} + a S(L) + u V(L)``
    (:func:`solve`). Returns ``e^{-beta L}, U, e^{-gamma L}, S, V``, each ``(..., K - 1,
    G)`` for the ``K - 1`` segments between the ``K`` starts ``(..., K, G)``.
    """
    length = starts[..., 1:, :] - starts[..., :-1, :]
    b, g = beta.unsqueeze(-2), gamma.unsqueeze(-2)
    quotient = _exp_difference_quotient(b, g, length)
    return (torch.exp(-b * length), -torch.expm1(-b * length) / b,
            torch.exp(-g * length), -torch.expm1(-g * length) / g + quotient, -b * quotient)


def carry_solve(t: Tensor, starts: Tensor, alphas: Tensor, beta: Tensor, gamma: Tensor,
                *coefficients: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`shared_starts_solve` given its :func:`segment_coefficients` (the part that
    is per cell and gene: :class:`pyro_velo.model.AncestralModel` compiles it)."""
    # carry the state from start to start and keep, per cell and gene, the state and
    # rate at the last start at or before t. Selecting by ``where`` rather than by
    # gathering from the stacked states keeps every pass elementwise, so that compiled
    # they fuse (faster compiled, slower eager: benchmarks/RESULTS.md, "Kinetics step").
    # unbind, not indexing: the backward of an index fills a zero tensor of the whole
    # shape per segment
    per_segment, per_start = alphas.unbind(-2), starts.unbind(-2)
    per_gene = [x.unbind(-2) for x in coefficients]
    u = s = torch.zeros_like(per_segment[0])
    u0, s0, alpha_t, start = u, s, u, per_start[0]
    for k, alpha in enumerate(per_segment):
        started = t >= per_start[k]
        u0, s0 = torch.where(started, u, u0), torch.where(started, s, s0)
        alpha_t = torch.where(started, alpha, alpha_t)
        start = torch.where(started, per_start[k], start)
        if k + 1 < len(per_segment):
            du, ru, ds, rs, cu = (x[k] for x in per_gene)
            u, s = u * du + alpha * ru, s * ds + alpha * rs + u * cu
    u, s = solve((t - start).clamp(min=0.0), u0, s0, alpha_t, beta, gamma)
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
