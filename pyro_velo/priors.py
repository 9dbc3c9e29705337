"""Priors of the latent time, the cell state and (optionally) the per-gene rates.

A prior is a small :class:`~pyro.nn.PyroModule` (or any callable) that the model calls
with the minibatch's cell indices and that returns a distribution. To use another prior,
write one in a few lines and pass it to :class:`~pyro_velo.VeloVAE`::

    class LaplaceTimePrior(pv.priors.TimePrior):
        def forward(self, idx):
            return dist.Laplace(torch.full(idx.shape, 10.0, device=idx.device), 3.0)

    pv.VeloVAE(adata, time_prior=LaplaceTimePrior())

Shapes: ``idx`` is ``(B,)``; a time prior returns batch shape ``(B,)``, a cell-state
prior batch shape ``(B,)`` and event shape ``(d,)``, a rate prior event shape ``(G,)``.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor


class TimePrior(PyroModule):
    """Base class of time priors: ``forward(idx)`` returns ``p(t)`` of the cells ``idx``."""

    def forward(self, idx: Tensor) -> dist.Distribution:
        raise NotImplementedError


class NormalTimePrior(TimePrior):
    """``t ~ Normal(loc, scale)`` for every cell (the paper's uninformative prior).

    Parameters
    ----------
    loc, scale
        Mean and standard deviation on the model's time axis.
    """

    def __init__(self, loc: float, scale: float) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"time prior scale must be positive, got {scale}")
        self.loc, self.scale = float(loc), float(scale)

    def forward(self, idx: Tensor) -> dist.Distribution:
        return dist.Normal(torch.full(idx.shape, self.loc, device=idx.device), self.scale)


class CaptureTimePrior(TimePrior):
    """Informative prior: ``t_i ~ Normal(m_i, scale)`` around each cell's capture time.

    Parameters
    ----------
    loc
        ``(N,)`` capture times on the model's time axis, one per cell of the data set
        (see :func:`pyro_velo.capture.capture_time_axis`); NaN where a cell has none.
    scale
        Standard deviation around the capture time.
    fallback
        Prior of the cells without a capture time (usually the uninformative
        :class:`NormalTimePrior`).
    """

    def __init__(self, loc: Tensor, scale: float, fallback: NormalTimePrior) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"capture-time prior scale must be positive, got {scale}")
        self.register_buffer("capture_loc", torch.as_tensor(loc, dtype=torch.float32))
        self.scale = float(scale)
        self.fallback = fallback

    def forward(self, idx: Tensor) -> dist.Distribution:
        loc = self.capture_loc[idx]
        known = ~torch.isnan(loc)
        loc = torch.where(known, loc, torch.full_like(loc, self.fallback.loc))
        scale = torch.where(known, torch.full_like(loc, self.scale),
                            torch.full_like(loc, self.fallback.scale))
        return dist.Normal(loc, scale)


class NormalStatePrior(PyroModule):
    """``c ~ Normal(0, scale^2 I)`` (paper: ``scale = 1``)."""

    def __init__(self, latent_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be at least 1, got {latent_dim}")
        if not scale > 0:
            raise ValueError(f"c_prior_scale must be positive, got {scale}")
        self.latent_dim, self.scale = int(latent_dim), float(scale)

    def forward(self, idx: Tensor) -> dist.Distribution:
        loc = torch.zeros(idx.shape + (self.latent_dim,), device=idx.device)
        return dist.Normal(loc, self.scale).to_event(1)


class LogNormalRatePrior(PyroModule):
    """LogNormal priors that make per-gene rates random variables.

    ``rate_g ~ LogNormal(log centre_g, scale)`` for each rate in ``names``. The centres
    are the model's initial values (the steady-state initialisation of
    :mod:`pyro_velo.initialize`), set by the model through :meth:`set_centre`; ``scale``
    is on the log scale (1.0: a factor e either way is one standard deviation).

    Parameters
    ----------
    scale
        Log-scale standard deviation.
    names
        Which rates are random (any of ``'alpha'``, ``'beta'``, ``'gamma'``).
    """

    RATES = ("alpha", "beta", "gamma")

    def __init__(self, scale: float = 1.0, names: tuple[str, ...] = RATES) -> None:
        super().__init__()
        unknown = sorted(set(names) - set(self.RATES))
        if unknown:
            raise ValueError(f"unknown rate(s) {unknown}; choose among {self.RATES}")
        if not scale > 0:
            raise ValueError(f"rate prior scale must be positive, got {scale}")
        self.scale, self.names = float(scale), tuple(names)

    def set_centre(self, values: dict[str, Tensor]) -> None:
        """Centre the priors on ``values`` (natural scale, one ``(G,)`` tensor per rate)."""
        for name in self.names:
            self.register_buffer(f"log_centre_{name}", values[name].detach().log().clone())

    def forward(self, name: str) -> dist.Distribution:
        centre = getattr(self, f"log_centre_{name}", None)
        if centre is None:
            raise RuntimeError("the rate prior has no centre yet: call set_centre first")
        return dist.LogNormal(centre, self.scale).to_event(1)


def default_time_scale(n_capture_times: int, t_max: float, margin: float = 0.1) -> float:
    """Default spread of the capture-time prior: the gap between consecutive time points.

    With the capture times spread evenly over ``[margin, 1 - margin] * t_max``, one
    standard deviation equals the spacing of neighbouring time points, so the prior
    orders batches of cells without pinning cells to their batch's time.
    """
    if n_capture_times < 2:
        return t_max / 4
    return t_max * (1 - 2 * margin) / (n_capture_times - 1)


__all__ = [
    "CaptureTimePrior", "LogNormalRatePrior", "NormalStatePrior", "NormalTimePrior",
    "TimePrior", "default_time_scale",
]
