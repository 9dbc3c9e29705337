"""Pyro generative models of unspliced and spliced expression.

Every distribution of a model comes from a small method (``time_dist``, ``c_dist``,
``u_dist``, ``s_dist``, ``rate_dist``) so that a subclass can swap a prior or a likelihood
by overriding one method, in the style of :mod:`pyro.contrib.cevae`; by default these
methods delegate to swappable objects (:mod:`pyro_velo.priors`,
:mod:`pyro_velo.likelihoods`) passed to the constructor, so no subclass is needed either.

Shapes: a minibatch has ``B`` cells and ``G`` genes; the cell plate is ``dim=-1`` for
per-cell sites (``t``) and the gene dimension is an event dimension of ``u`` and ``s``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn

from . import kinetics, policies
from ._compile import compiled
from .ancestry import AncestorTable
from .initialize import RateInit, WindowTable
from .likelihoods import Likelihood, Normal
from .nn import Decoder
from .priors import LogNormalRatePrior, NormalStatePrior, NormalTimePrior

CELL_PLATE = "cells"


#: buffers of a full model's per-cell initial conditions (see WindowTable)
WINDOW_BUFFERS = tuple(f"window_{name}" for name in WindowTable.__dataclass_fields__)


class BasicModel(PyroModule):
    """The basic VeloVAE model (paper section 3.3): one latent time per cell, fixed rates.

    Generative process for cell ``i`` and gene ``g``::

        t_i ~ Normal(t0, sigma0)
        (u_hat, s_hat) = switching ODE solution at t_i with alpha_g, beta_g, gamma_g,
                         switch-on time t_on_g and switch-off time t_off_g
        u_ig ~ Normal(scale_u_g * u_hat, sigma_u_g)     (the default likelihood)
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
        ``t0`` and ``sigma0`` of the time prior; default ``t_max / 2`` and ``t_max / 4``
        (:data:`pyro_velo.policies.TIME_PRIOR`).
    likelihood
        Observation model (:mod:`pyro_velo.likelihoods`; default :class:`Normal`). It is
        set up from ``init`` unless already set up.
    time_prior
        Prior of t (:mod:`pyro_velo.priors`): any module or callable mapping the cell
        indices ``idx`` to a distribution of batch shape ``idx.shape``; default
        ``NormalTimePrior(time_prior_loc, time_prior_scale)``.
    rate_prior
        When given (e.g. :class:`~pyro_velo.priors.LogNormalRatePrior`), the rates it
        names become random variables (sites ``alpha``, ``beta``, ``gamma`` outside the
        cell plate) centred on ``init``; a guide must then cover them (see
        :class:`~pyro_velo.guides.RateGuide`). The point parameters ``log_alpha``... then
        hold the value used for prediction (the posterior median after training).
    """

    def __init__(
        self,
        init: RateInit,
        t_max: float = 20.0,
        time_prior_loc: float | None = None,
        time_prior_scale: float | None = None,
        likelihood: Likelihood | None = None,
        time_prior=None,
        rate_prior: LogNormalRatePrior | None = None,
    ) -> None:
        super().__init__()
        self.n_genes = int(init.alpha.shape[0])
        self.t_max = float(t_max)
        self.time_prior_loc = policies.TIME_PRIOR.loc(self.t_max, time_prior_loc)
        self.time_prior_scale = policies.TIME_PRIOR.scale(self.t_max, time_prior_scale)
        if self.time_prior_scale <= 0:
            raise ValueError(f"time_prior_scale must be positive, got {self.time_prior_scale}")
        self.log_alpha = nn.Parameter(init.alpha.log().clone())
        self.log_beta = nn.Parameter(init.beta.log().clone())
        self.log_gamma = nn.Parameter(init.gamma.log().clone())
        self.t_on = nn.Parameter(init.t_on.clone())
        self.log_duration = nn.Parameter((init.t_off - init.t_on).clamp(min=1e-3).log())
        self.log_scale_u = nn.Parameter(init.scale_u.log().clone())
        self.likelihood = Normal() if likelihood is None else likelihood
        if not self.likelihood.ready:
            self.likelihood.setup(init)
        self.time_prior = (NormalTimePrior(self.time_prior_loc, self.time_prior_scale)
                           if time_prior is None else time_prior)
        self.rate_prior = rate_prior
        if rate_prior is not None:
            rate_prior.set_centre({"alpha": init.alpha, "beta": init.beta,
                                   "gamma": init.gamma})

    #: evaluate the switching solution through ``torch.compile`` while gradients are
    #: recorded (same values up to rounding). A per-instance switch: training sets it
    #: on the models it trains while it runs (see
    #: :func:`pyro_velo.inference.stages.speed_settings`); the class default stays off
    compile_kinetics: bool = False

    def switching_solve(self, t: Tensor, alpha: Tensor,
                        *rates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`~pyro_velo.kinetics.switching_solve`, compiled if ``compile_kinetics``.

        ``t`` has shape ``(..., B, 1)``; ``alpha`` is per gene ``(G,)`` (basic model) or
        per cell and gene ``(..., B, G)`` (full model); ``rates`` are beta, gamma, t_on,
        t_off.
        """
        if self.compile_kinetics:
            # one compiled graph serves both models: compiling takes seconds per graph
            # (about 13 s on two cores) and a per-gene alpha would need a graph of its own
            alpha = alpha.expand(*t.shape[:-1], alpha.shape[-1]).contiguous()
        return self._kinetics_function(kinetics.switching_solve)(t, alpha, *rates)

    def _kinetics_function(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, through the process-wide compiled version if ``compile_kinetics``."""
        return compiled(fn) if self.compile_kinetics else fn

    # ---- parameters on their natural scale -------------------------------------------
    def ode_parameters(self) -> list[nn.Parameter]:
        """The model's own per-gene ODE parameters (rates, switch times, scaling).

        The training loop gives them the ODE learning rate (``lr_ode``); so does every
        submodule's ``ode_parameters()`` (the likelihood's noise). A subclass adding
        per-gene parameters extends the list.
        """
        return [self.log_alpha, self.log_beta, self.log_gamma, self.t_on, self.log_duration,
                self.log_scale_u]

    def gene_parameters(self, gene_scale_u: np.ndarray, gene_scale_s: np.ndarray
                        ) -> dict[str, np.ndarray]:
        """Per-gene values on the data scale, float64 (what ``VeloVAE.get_rates`` exports).

        ``alpha`` (in units of the spliced data per unit time), ``beta``, ``gamma``,
        ``t_on``, ``t_off``, ``scaling`` (unspliced data units per model unit), then the
        likelihood's :meth:`~pyro_velo.likelihoods.Likelihood.gene_parameters`.
        ``gene_scale_u``, ``gene_scale_s``: the factors from the model's scale to the
        data's.
        """
        r = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in self.rates().items()}
        values = {
            "alpha": r["alpha"] * gene_scale_s,
            "beta": r["beta"],
            "gamma": r["gamma"],
            "t_on": r["t_on"],
            "t_off": r["t_off"],
            "scaling": r["scale_u"] * gene_scale_u / gene_scale_s,
        }
        values.update(self.likelihood.gene_parameters(gene_scale_u, gene_scale_s))
        return values

    def rates(self) -> dict[str, Tensor]:
        """Per-gene parameters on their natural scale, each of shape ``(G,)``."""
        return {
            "alpha": self.log_alpha.exp(),
            "beta": self.log_beta.exp(),
            "gamma": self.log_gamma.exp(),
            "t_on": self.t_on,
            "t_off": self.t_on + self.log_duration.exp(),
            "scale_u": self.log_scale_u.exp(),
        }

    def load_rates(self, **values: Tensor) -> None:
        """Overwrite some per-gene parameters (natural scale), e.g. after re-initialisation.

        Keys are those of :meth:`rates`; ``t_on`` and ``t_off`` may be given alone or
        together (the other keeps its current value).
        """
        current = self.rates()
        t_on = values.pop("t_on", current["t_on"])
        t_off = values.pop("t_off", current["t_off"])
        with torch.no_grad():
            self.t_on.copy_(t_on)
            self.log_duration.copy_((t_off - t_on).clamp(min=1e-3).log())
            for name, value in values.items():
                getattr(self, f"log_{name}").copy_(value.log())

    # ---- the pieces a user may override ----------------------------------------------
    def time_dist(self, idx: Tensor) -> dist.Distribution:
        """Prior of t for the cells ``idx`` (batch shape ``(B,)``)."""
        return self.time_prior(idx)

    def rate_dist(self, name: str) -> dist.Distribution:
        """Prior of the random rate ``name`` (event shape ``(G,)``; needs ``rate_prior``)."""
        return self.rate_prior(name)

    def sample_rates(self) -> dict[str, Tensor]:
        """Sample the random rates (none without a rate prior), outside the cell plate."""
        if self.rate_prior is None:
            return {}
        return {name: pyro.sample(name, self.rate_dist(name)) for name in self.rate_prior.names}

    def kinetic(self, t: Tensor, idx: Tensor | None = None,
                rates: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Expected state at times ``t`` of shape ``(..., B)`` (``idx`` is unused here).

        ``rates`` overrides some of :meth:`rates` (e.g. sampled random rates). Returns a
        dict with ``u`` (on the observed unspliced scale, i.e. times ``scale_u``), ``s``,
        and the ODE velocities ``du`` (observed unspliced scale) and ``ds``, each of
        shape ``(..., B, G)``.
        """
        r = {**self.rates(), **(rates or {})}
        u, s, alpha_t = self.switching_solve(
            t.unsqueeze(-1), r["alpha"], r["beta"], r["gamma"], r["t_on"], r["t_off"]
        )
        return self._observed(u, s, alpha_t, r)

    @staticmethod
    def _observed(u: Tensor, s: Tensor, alpha_t: Tensor,
                  r: dict[str, Tensor]) -> dict[str, Tensor]:
        """The ODE state ``(u, s)`` and its velocities, u on the observed unspliced scale."""
        du, ds = kinetics.velocity(u, s, alpha_t, r["beta"], r["gamma"])
        return {"u": r["scale_u"] * u, "s": s, "du": r["scale_u"] * du, "ds": ds}

    def u_dist(self, u_hat: Tensor, size_factor: Tensor | None = None) -> dist.Distribution:
        """Likelihood of the unspliced observations given their expected value."""
        return self.likelihood(u_hat, "u", size_factor)

    def s_dist(self, s_hat: Tensor, size_factor: Tensor | None = None) -> dist.Distribution:
        """Likelihood of the spliced observations given their expected value."""
        return self.likelihood(s_hat, "s", size_factor)

    def sample_latent(self, idx: Tensor) -> dict[str, Tensor]:
        """Sample the per-cell latent variables (inside the cell plate)."""
        return {"t": pyro.sample("t", self.time_dist(idx))}

    # ---- the model -------------------------------------------------------------------
    def forward(self, u: Tensor, s: Tensor, idx: Tensor, n_obs: int,
                counts: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
                ) -> dict[str, Tensor]:
        """Score a minibatch.

        Parameters
        ----------
        u, s
            ``(B, G)`` unspliced / spliced moments of the cells ``idx`` on the model's
            scale (the encoder's input, and the observations of moment likelihoods).
        idx
            ``(B,)`` indices of the minibatch cells in the data set (the plate subsample).
        n_obs
            Size of the data set the ELBO is scaled to.
        counts
            ``(counts_u, counts_s, size_factor_u, size_factor_s)`` for count likelihoods:
            the observations are then these raw counts.
        """
        random_rates = self.sample_rates()
        obs_u, obs_s, size_u, size_s = (u, s, None, None) if counts is None else counts
        with pyro.plate(CELL_PLATE, n_obs, subsample=idx):
            latent = self.sample_latent(idx)
            expected = self.kinetic(**latent, idx=idx, rates=random_rates)
            pyro.sample("u", self.u_dist(expected["u"], size_u), obs=obs_u)
            pyro.sample("s", self.s_dist(expected["s"], size_s), obs=obs_s)
        return latent


class FullModel(BasicModel):
    """The variational mixture of ODEs (paper section 3.4).

    Adds a cell state ``c_i ~ Normal(0, c_prior_scale^2 I)`` of dimension ``latent_dim`` and a
    decoder ``rho_i = g(c_i)`` giving each cell and gene a relative transcription rate in
    ``(0, 1)``; the cell's ODE uses the rate ``rho_ig * alpha_g``::

        t_i ~ Normal(t0, sigma0),  c_i ~ Normal(0, I)
        rho_i = g(c_i)
        (u_hat, s_hat) = ODE solution at t_i with rate rho_i * alpha, beta, gamma
        u, s ~ Normal(scale_u * u_hat, sigma_u), Normal(s_hat, sigma_s)

    The ODE keeps the basic model's per-gene switch-on and switch-off times, with the
    cell's rate ``rho_i * alpha`` while a gene is on: with ``rho = 1`` it is exactly the
    basic model, so a fit initialised from the basic model can only improve on it, and
    ``rho`` carries what a single ODE cannot (branch-specific rates, boosts).

    After :meth:`set_initial_conditions` each cell instead starts at its own observed
    initial state ``(u0, s0)`` at time ``t0`` and evolves under the rate active at its
    time (paper, "Initial Conditions").

    Parameters
    ----------
    init, t_max, time_prior_loc, time_prior_scale, likelihood, time_prior, rate_prior
        As for :class:`BasicModel`.
    latent_dim
        Dimension of c (paper: 5).
    c_prior_scale
        Standard deviation of the default cell-state prior (paper: 1).
    decoder_hidden
        Hidden widths of the decoder (paper: 250, 500).
    state_prior
        Prior of c: any module or callable mapping ``idx`` to a distribution of batch
        shape ``idx.shape`` and event shape ``(latent_dim,)``; default
        :class:`~pyro_velo.priors.NormalStatePrior` ``(latent_dim, c_prior_scale)``.
    """

    def __init__(
        self,
        init: RateInit,
        t_max: float = 20.0,
        time_prior_loc: float | None = None,
        time_prior_scale: float | None = None,
        likelihood: Likelihood | None = None,
        time_prior=None,
        rate_prior: LogNormalRatePrior | None = None,
        latent_dim: int = 5,
        c_prior_scale: float = 1.0,
        decoder_hidden: tuple[int, ...] = (250, 500),
        state_prior=None,
    ) -> None:
        super().__init__(init, t_max, time_prior_loc, time_prior_scale, likelihood,
                         time_prior, rate_prior)
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be at least 1, got {latent_dim}")
        self.state_prior = (NormalStatePrior(latent_dim, c_prior_scale)
                            if state_prior is None else state_prior)
        self.latent_dim = int(latent_dim)
        self.decoder = Decoder(self.latent_dim, self.n_genes, decoder_hidden)
        for name in WINDOW_BUFFERS:
            self.register_buffer(name, None)

    def c_dist(self, idx: Tensor) -> dist.Distribution:
        """Prior of the cell state (batch shape ``(B,)``, event shape ``(d,)``)."""
        return self.state_prior(idx)

    def sample_latent(self, idx: Tensor) -> dict[str, Tensor]:
        return {"t": pyro.sample("t", self.time_dist(idx)),
                "c": pyro.sample("c", self.c_dist(idx))}

    def transcription_rate(self, c: Tensor) -> Tensor:
        """Relative transcription rate ``rho = g(c)``, shape ``(..., G)``."""
        return self.decoder(c)

    @property
    def has_initial_conditions(self) -> bool:
        return self.window_t0 is not None

    def set_initial_conditions(self, table: WindowTable) -> None:
        """Give every cell its own initial state (observed scale), as a window table.

        See :class:`~pyro_velo.initialize.WindowTable`; stored as buffers ``window_*``
        (so they are saved and loaded with the state dict). For explicit per-cell states
        use ``WindowTable.per_cell(t0, u0, s0)``.
        """
        for field, value in table.tensors().items():
            setattr(self, f"window_{field}", value.detach().clone())

    def clear_initial_conditions(self) -> None:
        """Return to the first-stage model (every gene starts from zero at ``t_on``)."""
        for name in WINDOW_BUFFERS:
            setattr(self, name, None)

    def initial_conditions(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(t0, u0, s0)`` of the cells ``idx`` (t0 NaN: the cell has none)."""
        table = WindowTable(**{name[len("window_"):]: getattr(self, name)
                               for name in WINDOW_BUFFERS})
        return table.state(idx)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # the window buffers are None until refinement and their sizes depend on the
        # data: take them from the state being loaded (or clear them when it has none)
        device = next(self.parameters()).device
        for name in WINDOW_BUFFERS:
            value = state_dict.get(prefix + name)
            setattr(self, name, None if value is None else value.detach().to(device,
                                                                            copy=True))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def kinetic(self, t: Tensor, c: Tensor, idx: Tensor | None = None,
                rates: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Expected state and velocities at ``t`` for cell states ``c`` (see BasicModel).

        ``idx`` selects the cells' initial conditions once they are set; without it (or
        before they are set) every gene starts from zero at its switch-on time.
        """
        r = {**self.rates(), **(rates or {})}
        rate = self.transcription_rate(c) * r["alpha"]
        u, s, alpha_t = self.switching_solve(
            t.unsqueeze(-1), rate, r["beta"], r["gamma"], r["t_on"], r["t_off"]
        )
        if self.has_initial_conditions and idx is not None:
            # cells with an initial state evolve from it under the rate active at t;
            # the others (t0 = nan, at the start of time) keep the zero start
            t0, u0, s0 = self.initial_conditions(idx)
            has_start = ~torch.isnan(t0)
            tau = (t - t0.nan_to_num(0.0)).clamp(min=0.0).unsqueeze(-1)
            u_w, s_w = kinetics.solve(tau, u0 / r["scale_u"], s0, alpha_t, r["beta"],
                                      r["gamma"])
            u = torch.where(has_start.unsqueeze(-1), u_w, u)
            s = torch.where(has_start.unsqueeze(-1), s_w, s)
        return self._observed(u, s, alpha_t, r)


class AncestralModel(FullModel):
    """The mixture of ODEs with each cell's rate history taken from its ancestors.

    :class:`FullModel` gives cell ``i`` the rate ``rho_i * alpha`` from a gene's switch-on
    onwards. Its fitted state then lies on ``rho_i`` times one switch-on curve, so a cell
    shortly after a rise of the rate (a transcriptional boost, a branch switching a gene
    on) is fitted as a cell at the steady state of its own rate, with the wrong velocity
    (``benchmarks/rate_history.py``). Here time ``[0, t_max]`` is cut into
    ``n_bins`` bins; over each bin before its own, a cell transcribes at the mean
    ``rho`` of its *ancestors*, the cells of that bin nearest to it in cell state
    (:class:`~pyro_velo.ancestry.AncestorTable`, updated from every training step's
    posterior samples, without gradients), and over its own bin at its own
    ``rho_i``. Before a branch point every branch thus shares the root's rates. The
    switch-on and switch-off times stay: the rate history applies inside
    ``[t_on, t_off)``, and the ODE is solved exactly over the pieces
    (:func:`history_solve`, its per-cell part compiled while ``compile_kinetics``).

    This replaces the initial-condition refinement (the refinement's windows are a
    one-step version of the same idea), so :meth:`set_initial_conditions` is not
    available. With an empty table (before training), or within
    :meth:`without_ancestors`, the model equals :class:`FullModel`;
    :meth:`pyro_velo.VeloVAE.train` fits it that way first, then with the ancestors'
    rates.

    Parameters
    ----------
    init, t_max, ..., state_prior
        As for :class:`FullModel`.
    n_bins
        Time bins of the rate history (default 8).
    n_prototypes
        Cell-state prototypes per time bin (default 10; more than the branches that
        coexist at one time).
    memory
        Training cells after which a prototype that absorbed none of them is dropped
        (see :class:`~pyro_velo.ancestry.AncestorTable`; None: never).
    """

    def __init__(self, *args, n_bins: int = 8, n_prototypes: int = 10,
                 memory: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ancestors = AncestorTable(n_bins, n_prototypes, self.latent_dim, self.n_genes,
                                       self.t_max, memory=memory)

    #: False: the ancestors' rates are off (no table updates or lookups) and the model
    #: is :class:`FullModel`, with its kinetics (see :meth:`without_ancestors`)
    use_ancestors: bool = True

    @contextmanager
    def without_ancestors(self) -> Iterator[None]:
        """Within the block the model is :class:`FullModel`: the paper's one rate per cell.

        :meth:`pyro_velo.VeloVAE.train` fits that model first and continues with the
        ancestors' rates from its converged fit: trained with the ancestors' rates from
        the start, a fit whose time the basic stage had ordered badly across branches kept
        that order, which the paper's model repairs (``benchmarks/rate_history.py``).
        """
        previous, self.use_ancestors = self.use_ancestors, False
        try:
            yield
        finally:
            self.use_ancestors = previous

    def set_initial_conditions(self, table: WindowTable) -> None:
        raise RuntimeError("the ancestral model takes each cell's past from its ancestors; "
                           "initial conditions (the refinement) do not apply to it")

    def rate_history(self, t: Tensor, c: Tensor) -> Tensor:
        """Relative rates of the time bins, ``(..., B, n_bins, G)``.

        Bins before the cell's own: its ancestors' ``rho`` (its own where the table has no
        prototype in the bin); its own bin and later: its own ``rho``. During training
        steps (train mode with gradients on; not in validation or prediction) the cells
        are first absorbed into the table (in data-parallel training every rank absorbs
        the cells of all ranks, so the tables stay the same).
        """
        own = self.transcription_rate(c)
        flat_t, flat_c = t.reshape(-1).detach(), c.reshape(-1, c.shape[-1]).detach()
        if self.training and torch.is_grad_enabled():
            self.ancestors.absorb(flat_t, flat_c, own.reshape(-1, own.shape[-1]).detach())
        past, seeded = self.ancestors.lookup(flat_c)
        past = past.reshape(*own.shape[:-1], *past.shape[1:])
        bins = torch.arange(self.ancestors.n_bins, device=t.device)
        before = (bins < self.ancestors.bin(t).unsqueeze(-1)) & seeded
        return torch.where(before.unsqueeze(-1), past, own.unsqueeze(-2))

    def kinetic(self, t: Tensor, c: Tensor, idx: Tensor | None = None,
                rates: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Expected state and velocities at ``t`` under the ancestral rate history."""
        if not self.use_ancestors:
            return super().kinetic(t, c, idx, rates)
        r = {**self.rates(), **(rates or {})}
        # compiled: the per-cell part only. Compiled whole, with the per-gene segment
        # coefficients in the graph, a step took 82 ms against 51 (128 x 1900, one
        # thread), and its gradients were wrong (torch 2.13) when the backward saved the
        # forward's intermediates (benchmarks/kinetics_step.py)
        carry = self._kinetics_function(kinetics.carry_solve)
        u, s, alpha_t = history_solve(
            t.unsqueeze(-1), self.rate_history(t, c), r["alpha"], r["beta"], r["gamma"],
            r["t_on"], r["t_off"], self.ancestors.edges.to(r["t_on"].dtype), carry=carry)
        return self._observed(u, s, alpha_t, r)


def history_solve(t: Tensor, history: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor,
                  t_on: Tensor, t_off: Tensor, edges: Tensor,
                  carry: Callable[..., tuple[Tensor, Tensor, Tensor]] = kinetics.carry_solve,
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """State at ``t`` ``(..., B, 1)`` under relative rates ``history`` ``(..., B, bins, G)``.

    Bin ``k`` covers ``[edges[k - 1], edges[k])`` (``edges``: the ``bins - 1`` inner edges;
    the first and last bins are open), intersected with the gene's ``[t_on, t_off)``; the
    rate is ``history[..., k, :] * alpha`` there and 0 outside ``[t_on, t_off)``. Solved as
    :func:`~pyro_velo.kinetics.shared_starts_solve`, with its per-cell part ``carry``
    (:func:`~pyro_velo.kinetics.carry_solve` or a compiled version of it); returns ``u, s,
    alpha_t``.
    """
    # the first segment starts at t_on, the inner edges are clamped into [t_on, t_off],
    # a last segment of rate 0 starts at t_off
    inner = [torch.minimum(torch.maximum(edge, t_on), t_off) for edge in edges.unbind()]
    starts = torch.stack([t_on, *inner, t_off], -2)
    rates = history * alpha.unsqueeze(-2)
    alphas = torch.cat([rates, torch.zeros_like(rates[..., :1, :])], -2)
    return carry(t, starts, alphas, beta, gamma,
                 *kinetics.segment_coefficients(starts, beta, gamma))
