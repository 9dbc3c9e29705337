"""Variational families (guides) for the VeloVAE models."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
from pyro.nn import PyroModule
from torch import Tensor

from .model import CELL_PLATE
from .nn import Encoder


class AmortizedGuide(PyroModule):
    """Amortized mean-field guide ``q(t | u, s) = Normal(h(u, s))`` (paper section 3.3).

    Parameters
    ----------
    n_genes
        Number of genes.
    hidden, dropout
        Encoder architecture (default ``2G -> 500 -> 250`` with dropout 0.2).
    t_max
        Length of the time axis (bounds the posterior mean, see :class:`~pyro_velo.nn.Encoder`).
    """

    def __init__(
        self,
        n_genes: int,
        hidden: Sequence[int] = (500, 250),
        dropout: float = 0.2,
        t_max: float = 20.0,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(n_genes, hidden=hidden, dropout=dropout, t_max=t_max)

    def t_dist(self, u: Tensor, s: Tensor) -> dist.Distribution:
        """Posterior of t for a minibatch (batch shape ``(B,)``)."""
        t_loc, t_scale, _, _ = self.encoder(u, s)
        return dist.Normal(t_loc, t_scale)

    def forward(self, u: Tensor, s: Tensor, idx: Tensor, n_obs: int) -> None:
        """Sample the latent variables of the minibatch ``idx`` (same signature as the model)."""
        with pyro.plate(CELL_PLATE, n_obs, subsample=idx):
            pyro.sample("t", self.t_dist(u, s))
