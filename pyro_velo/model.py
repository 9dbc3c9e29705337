"""Pyro generative models of unspliced and spliced expression.

Every distribution of a model comes from a small method (``time_dist``, ``u_dist``,
``s_dist``) so that a subclass can swap a prior or a likelihood by overriding one method,
in the style of :mod:`pyro.contrib.cevae`.

Shapes: a minibatch has ``B`` cells and ``G`` genes; the cell plate is ``dim=-1`` for
per-cell sites (``t``) and the gene dimension is an event dimension of ``u`` and ``s``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn

from . import kinetics
from .initialize import RateInit

CELL_PLATE = "cells"


class BasicModel(PyroModule):
    """The basic VeloVAE model (paper section 3.3): one latent time per cell, fixed rates.

    Generative process for cell ``i`` and gene ``g``::

        t_i ~ Normal(t0, sigma0)
        (u_hat, s_hat) = switching ODE solution at t_i with alpha_g, beta_g, gamma_g,
                         switch-on time t_on_g and switch-off time t_off_g
        u_ig ~ Normal(scale_u_g * u_hat, sigma_u_g)
        s_ig ~ Normal(s_hat, sigma_s_g)

    Time is an unconstrained real number. The prior (default ``Normal(t_max / 2,
    t_max / 4)``) keeps it around ``[0, t_max]``; a negative time simply means "before the
    gene switched on" for every gene with ``t_on > t``, which the kinetics map to the
    off state ``u = s = 0``, so no clipping is needed.

    All per-gene quantities are point-estimated parameters stored on an unconstrained
    scale (logarithms of positive rates, ``t_off = t_on + exp(log_duration)`` so that the
    gene always switches off after it switches on).

    Parameters
    ----------
    init
        Initial per-gene values (see :mod:`pyro_velo.initialize`).
    t_max
        Length of the time axis.
    time_prior_loc, time_prior_scale
        ``t0`` and ``sigma0`` of the time prior; default ``t_max / 2`` and ``t_max / 4``.
    """

    def __init__(
        self,
        init: RateInit,
        t_max: float = 20.0,
        time_prior_loc: float | None = None,
        time_prior_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.n_genes = int(init.alpha.shape[0])
        self.t_max = float(t_max)
        self.time_prior_loc = 0.5 * self.t_max if time_prior_loc is None else float(time_prior_loc)
        self.time_prior_scale = (
            0.25 * self.t_max if time_prior_scale is None else float(time_prior_scale)
        )
        if self.time_prior_scale <= 0:
            raise ValueError(f"time_prior_scale must be positive, got {self.time_prior_scale}")
        self.log_alpha = nn.Parameter(init.alpha.log().clone())
        self.log_beta = nn.Parameter(init.beta.log().clone())
        self.log_gamma = nn.Parameter(init.gamma.log().clone())
        self.t_on = nn.Parameter(init.t_on.clone())
        self.log_duration = nn.Parameter((init.t_off - init.t_on).clamp(min=1e-3).log())
        self.log_scale_u = nn.Parameter(init.scale_u.log().clone())
        self.log_sigma_u = nn.Parameter(init.sigma_u.log().clone())
        self.log_sigma_s = nn.Parameter(init.sigma_s.log().clone())

    # ---- parameters on their natural scale -------------------------------------------
    def rates(self) -> dict[str, Tensor]:
        """Per-gene parameters on their natural scale, each of shape ``(G,)``."""
        return {
            "alpha": self.log_alpha.exp(),
            "beta": self.log_beta.exp(),
            "gamma": self.log_gamma.exp(),
            "t_on": self.t_on,
            "t_off": self.t_on + self.log_duration.exp(),
            "scale_u": self.log_scale_u.exp(),
            "sigma_u": self.log_sigma_u.exp(),
            "sigma_s": self.log_sigma_s.exp(),
        }

    def load_rates(self, **values: Tensor) -> None:
        """Overwrite some per-gene parameters (natural scale), e.g. after re-initialisation."""
        with torch.no_grad():
            for name, value in values.items():
                if name == "t_off":
                    continue
                if name == "t_on":
                    t_off = values.get("t_off", self.rates()["t_off"])
                    self.t_on.copy_(value)
                    self.log_duration.copy_((t_off - value).clamp(min=1e-3).log())
                else:
                    getattr(self, f"log_{name}").copy_(value.log())
            if "t_off" in values and "t_on" not in values:
                self.log_duration.copy_((values["t_off"] - self.t_on).clamp(min=1e-3).log())

    # ---- the pieces a user may override ----------------------------------------------
    def time_dist(self, idx: Tensor) -> dist.Distribution:
        """Prior of t for the cells ``idx`` (batch shape ``(B,)``)."""
        loc = torch.full(idx.shape, self.time_prior_loc, device=idx.device)
        return dist.Normal(loc, self.time_prior_scale)

    def kinetic(self, t: Tensor) -> dict[str, Tensor]:
        """Expected state at times ``t`` of shape ``(..., B)``.

        Returns a dict with ``u`` (on the observed unspliced scale, i.e. times
        ``scale_u``), ``s``, and the ODE velocities ``du`` (observed unspliced scale) and
        ``ds``, each of shape ``(..., B, G)``.
        """
        r = self.rates()
        u, s, alpha_t = kinetics.switching_solve(
            t.unsqueeze(-1), r["alpha"], r["beta"], r["gamma"], r["t_on"], r["t_off"]
        )
        du, ds = kinetics.velocity(u, s, alpha_t, r["beta"], r["gamma"])
        return {"u": r["scale_u"] * u, "s": s, "du": r["scale_u"] * du, "ds": ds}

    def u_dist(self, u_hat: Tensor) -> dist.Distribution:
        """Likelihood of the unspliced abundances given their expected value."""
        return dist.Normal(u_hat, self.log_sigma_u.exp()).to_event(1)

    def s_dist(self, s_hat: Tensor) -> dist.Distribution:
        """Likelihood of the spliced abundances given their expected value."""
        return dist.Normal(s_hat, self.log_sigma_s.exp()).to_event(1)

    # ---- the model -------------------------------------------------------------------
    def forward(self, u: Tensor, s: Tensor, idx: Tensor, n_obs: int) -> Tensor:
        """Score a minibatch.

        Parameters
        ----------
        u, s
            ``(B, G)`` observed unspliced / spliced abundances of the cells ``idx``.
        idx
            ``(B,)`` indices of the minibatch cells in the data set (the plate subsample).
        n_obs
            Size of the data set the ELBO is scaled to.
        """
        with pyro.plate(CELL_PLATE, n_obs, subsample=idx):
            t = pyro.sample("t", self.time_dist(idx))
            expected = self.kinetic(t)
            pyro.sample("u", self.u_dist(expected["u"]), obs=u)
            pyro.sample("s", self.s_dist(expected["s"]), obs=s)
        return t

