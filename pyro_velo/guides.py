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
    """Amortized mean-field guide (paper sections 3.3-3.4).

    ``q(t | u, s) = Normal(h_t(u, s))`` and, when ``latent_dim > 0`` (the full model),
    ``q(c | u, s) = Normal(h_c(u, s))`` with a diagonal covariance, both from one encoder.

    Parameters
    ----------
    n_genes
        Number of genes.
    hidden, dropout
        Encoder architecture (default ``2G -> 500 -> 250`` with dropout 0.2).
    t_max
        Length of the time axis (bounds the posterior mean, see :class:`~pyro_velo.nn.Encoder`).
    latent_dim
        Dimension of the cell state c (0: no cell state, the basic model).
    """

    def __init__(
        self,
        n_genes: int,
        hidden: Sequence[int] = (500, 250),
        dropout: float = 0.2,
        t_max: float = 20.0,
        latent_dim: int = 0,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(n_genes, hidden=hidden, dropout=dropout, t_max=t_max,
                               latent_dim=latent_dim)

    def latent_dists(self, u: Tensor, s: Tensor) -> dict[str, dist.Distribution]:
        """Posteriors of the latent sites for a minibatch (``t``, and ``c`` if present)."""
        t_loc, t_scale, c_loc, c_scale = self.encoder(u, s)
        out = {"t": dist.Normal(t_loc, t_scale)}
        if c_loc is not None:
            out["c"] = dist.Normal(c_loc, c_scale).to_event(1)
        return out

    def forward(self, u: Tensor, s: Tensor, idx: Tensor, n_obs: int) -> None:
        """Sample the latent variables of the minibatch ``idx`` (same signature as the model)."""
        with pyro.plate(CELL_PLATE, n_obs, subsample=idx):
            for name, q in self.latent_dists(u, s).items():
                pyro.sample(name, q)


class FixedLatentGuide(PyroModule):
    """Point masses at given per-cell latent values (e.g. posterior means).

    Used to fine-tune the ODE parameters and the decoder with each cell's t and c held
    fixed (the paper's initial-condition refinement).

    Parameters
    ----------
    values
        Site name to a tensor with one row per cell of the data set (``t``: ``(N,)``,
        ``c``: ``(N, d)``).
    """

    def __init__(self, **values: Tensor) -> None:
        super().__init__()
        self.names = tuple(values)
        for name, value in values.items():
            self.register_buffer(f"value_{name}", value.detach().clone())

    def forward(self, u: Tensor, s: Tensor, idx: Tensor, n_obs: int) -> None:
        with pyro.plate(CELL_PLATE, n_obs, subsample=idx):
            for name in self.names:
                value = getattr(self, f"value_{name}")[idx]
                pyro.sample(name, dist.Delta(value, event_dim=value.dim() - 1))

