"""Observation models: the distribution of observed u and s given the ODE's expectation.

A likelihood is a small :class:`~pyro.nn.PyroModule` holding its own per-gene parameters
(noise scales, dispersions). The model calls it once for ``u`` and once for ``s`` with the
expected abundances of a minibatch; it returns a distribution with batch shape ``(B,)``
and event shape ``(G,)``.

Two kinds of observations exist (the class attribute ``observations``):

- ``'moments'``: the model's own inputs, ``Mu`` / ``Ms`` divided by each gene's standard
  deviation (the scale the ODE works on): :class:`Normal` (default, the paper's).
- ``'counts'``: raw counts (``layers['raw_unspliced']`` / ``layers['raw_spliced']`` written
  by :func:`pyro_velo.pp.preprocess`) with per-cell size factors, for :class:`Poisson`
  and :class:`NegativeBinomial`. Their mean is ``size_factor_i * gene_scale_g *
  expected_ig``.

Writing another likelihood takes a few lines, e.g. a Student-t on the moments::

    class StudentT(pv.likelihoods.Normal):
        def forward(self, expected, kind, size_factor=None):
            scale = getattr(self, f"log_sigma_{kind}").exp()
            return dist.StudentT(4.0, expected, scale).to_event(1)

    pv.VeloVAE(adata, likelihood=StudentT())
"""

from __future__ import annotations

import numpy as np
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn

from .initialize import RateInit

KINDS = ("u", "s")


class Likelihood(PyroModule):
    """Base class.

    Subclasses set ``observations`` and implement :meth:`forward`; :meth:`setup` is
    called once before fitting, to create and initialise per-gene parameters. Those
    :meth:`ode_parameters` declares (by default all of the likelihood's own) are trained
    with the ODE parameters' learning rate; :meth:`gene_parameters` says what is
    exported per gene.
    """

    observations = "moments"
    #: True once :meth:`setup` has run
    ready = False

    def setup(self, init: RateInit, gene_scale_u: Tensor | None = None,
              gene_scale_s: Tensor | None = None) -> None:
        """Create and initialise the per-gene parameters (subclasses call ``super()``).

        Parameters
        ----------
        init
            The model's initial per-gene values (``init.sigma_u`` / ``init.sigma_s`` are
            the observed standard deviations on the model's scale).
        gene_scale_u, gene_scale_s
            ``(G,)`` factors from the model's scale to the observations' (counts only).
        """
        self.ready = True

    def ode_parameters(self) -> list[nn.Parameter]:
        """The per-gene parameters, trained at the ODE parameters' learning rate."""
        return list(self.parameters(recurse=False))

    def gene_parameters(self, gene_scale_u: np.ndarray, gene_scale_s: np.ndarray
                        ) -> dict[str, np.ndarray]:
        """Per-gene values exported by :meth:`pyro_velo.VeloVAE.get_rates` (float64).

        By default the noise standard deviations ``sigma_u``, ``sigma_s`` (from
        ``log_sigma_u``, ``log_sigma_s``, on the data scale) and the inverse dispersions
        ``phi_u``, ``phi_s`` (from ``log_phi_u``, ``log_phi_s``) the likelihood has.
        """
        values = {}
        for name, factor in (("sigma_u", gene_scale_u), ("sigma_s", gene_scale_s),
                             ("phi_u", 1.0), ("phi_s", 1.0)):
            param = getattr(self, f"log_{name}", None)
            if isinstance(param, Tensor) and param.shape == gene_scale_u.shape:
                values[name] = param.detach().cpu().double().exp().numpy() * factor
        return values

    def forward(self, expected: Tensor, kind: str, size_factor: Tensor | None = None
                ) -> dist.Distribution:
        """``p(observed | expected)`` for ``kind`` ``'u'`` or ``'s'``.

        Parameters
        ----------
        expected
            ``(B, G)`` expected abundances on the model's scale.
        kind
            ``'u'`` or ``'s'``.
        size_factor
            ``(B,)`` per-cell size factors (count likelihoods).
        """
        raise NotImplementedError


class Normal(Likelihood):
    """Gaussian noise with one standard deviation per gene and layer (paper, section 3.3).

    Observations: the moments, so ``u ~ Normal(u_hat, sigma_u)``, ``s ~ Normal(s_hat,
    sigma_s)``. The noise scales start at each gene's standard deviation (a fit can only
    reduce them).
    """

    def setup(self, init: RateInit, gene_scale_u: Tensor | None = None,
              gene_scale_s: Tensor | None = None) -> None:
        self.log_sigma_u = nn.Parameter(init.sigma_u.detach().log().float().clone())
        self.log_sigma_s = nn.Parameter(init.sigma_s.detach().log().float().clone())
        super().setup(init)

    def forward(self, expected: Tensor, kind: str, size_factor: Tensor | None = None
                ) -> dist.Distribution:
        return dist.Normal(expected, getattr(self, f"log_sigma_{kind}").exp()).to_event(1)


class Poisson(Likelihood):
    """Poisson counts: ``count ~ Poisson(size_factor * gene_scale * expected)``.

    A small floor on the mean keeps counts observed where the ODE predicts zero (e.g.
    before a gene switches on) finite in the log-likelihood.
    """

    observations = "counts"
    #: floor on the mean, relative to the gene's scale
    min_mean = 1e-3

    def setup(self, init: RateInit, gene_scale_u: Tensor | None = None,
              gene_scale_s: Tensor | None = None) -> None:
        if gene_scale_u is None or gene_scale_s is None:
            raise ValueError(f"{type(self).__name__} needs the genes' scales to set up")
        self.register_buffer("gene_scale_u", gene_scale_u.detach().clone().float())
        self.register_buffer("gene_scale_s", gene_scale_s.detach().clone().float())
        super().setup(init)

    def mean(self, expected: Tensor, kind: str, size_factor: Tensor | None) -> Tensor:
        """Expected count of each cell and gene."""
        scale = getattr(self, f"gene_scale_{kind}")
        mean = expected.clamp(min=self.min_mean) * scale
        return mean if size_factor is None else mean * size_factor.unsqueeze(-1)

    def forward(self, expected: Tensor, kind: str, size_factor: Tensor | None = None
                ) -> dist.Distribution:
        return dist.Poisson(self.mean(expected, kind, size_factor)).to_event(1)


class NegativeBinomial(Poisson):
    """Negative-binomial (gamma-Poisson) counts with a per-gene inverse dispersion.

    ``count ~ NB(mean, phi)`` with variance ``mean + mean^2 / phi``; ``phi`` per gene and
    layer is learned (initialised at 10: mild overdispersion).
    """

    def setup(self, init: RateInit, gene_scale_u: Tensor | None = None,
              gene_scale_s: Tensor | None = None) -> None:
        n_genes = init.alpha.shape[0]
        self.log_phi_u = nn.Parameter(torch.full((n_genes,), 10.0).log())
        self.log_phi_s = nn.Parameter(torch.full((n_genes,), 10.0).log())
        super().setup(init, gene_scale_u, gene_scale_s)

    def forward(self, expected: Tensor, kind: str, size_factor: Tensor | None = None
                ) -> dist.Distribution:
        mean = self.mean(expected, kind, size_factor)
        phi = getattr(self, f"log_phi_{kind}").exp()
        return dist.GammaPoisson(phi, phi / mean).to_event(1)


LIKELIHOODS = {"normal": Normal, "poisson": Poisson, "nb": NegativeBinomial}


def make_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """A likelihood object from a name (``'normal'``, ``'poisson'``, ``'nb'``) or itself."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str) and likelihood in LIKELIHOODS:
        return LIKELIHOODS[likelihood]()
    raise ValueError(f"unknown likelihood {likelihood!r}; use one of {sorted(LIKELIHOODS)} "
                     "or a pyro_velo.likelihoods.Likelihood instance")
