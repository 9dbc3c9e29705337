"""Variational families (guides) for the VeloVAE models."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn

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

    @torch.no_grad()
    def summary(self, u: Tensor, s: Tensor) -> dict[str, Tensor]:
        """Posterior means and standard deviations: ``t``, ``t_std`` (and ``c``, ``c_std``)."""
        out = {}
        for name, q in self.latent_dists(u, s).items():
            out[name], out[f"{name}_std"] = q.mean, q.stddev
        return out

    def forward(self, u: Tensor, s: Tensor, idx: Tensor, n_obs: int, **_) -> None:
        """Sample the latent variables of the minibatch ``idx`` (same signature as the model)."""
        with pyro.plate(CELL_PLATE, n_obs, subsample=idx):
            for name, q in self.latent_dists(u, s).items():
                pyro.sample(name, q)


class AmortizedMVNGuide(AmortizedGuide):
    """Amortized guide with a full covariance between t and c in every cell.

    ``q(t, c | u, s) = MultivariateNormal(m(u, s), L(u, s) L(u, s)^T)``: the encoder's
    means, its standard deviations on the diagonal of ``L`` and an extra linear head for
    the strictly lower triangle (initialised at zero, so training starts from the
    mean-field guide). The joint draw is an auxiliary site ``tc``; ``t`` and ``c`` are
    point masses at its parts, so the model sees the same sites as with
    :class:`AmortizedGuide`.

    Parameters
    ----------
    n_genes, hidden, dropout, t_max, latent_dim
        As for :class:`AmortizedGuide` (``latent_dim >= 1``).
    """

    def __init__(
        self,
        n_genes: int,
        hidden: Sequence[int] = (500, 250),
        dropout: float = 0.2,
        t_max: float = 20.0,
        latent_dim: int = 5,
    ) -> None:
        if latent_dim < 1:
            raise ValueError("AmortizedMVNGuide needs a cell state (latent_dim >= 1)")
        super().__init__(n_genes, hidden, dropout, t_max, latent_dim)
        k = latent_dim + 1
        width = hidden[-1] if len(hidden) else 2 * n_genes
        self.tril_head = nn.Linear(width, k * (k - 1) // 2)
        nn.init.zeros_(self.tril_head.weight)
        nn.init.zeros_(self.tril_head.bias)
        self.register_buffer("_tril", torch.tril_indices(k, k, offset=-1), persistent=False)

    def joint(self, u: Tensor, s: Tensor) -> dist.MultivariateNormal:
        """``q(t, c)`` with event shape ``(1 + latent_dim,)``; ``t`` is the first coordinate."""
        h = self.encoder.hidden(u, s)
        t_loc, t_scale, c_loc, c_scale = self.encoder.heads(h)
        loc = torch.cat([t_loc.unsqueeze(-1), c_loc], dim=-1)
        diag = torch.cat([t_scale.unsqueeze(-1), c_scale], dim=-1)
        lower = torch.zeros(diag.shape + diag.shape[-1:], device=diag.device, dtype=diag.dtype)
        lower[..., self._tril[0], self._tril[1]] = self.tril_head(h)
        return dist.MultivariateNormal(loc, scale_tril=torch.diag_embed(diag) + lower)

    def latent_dists(self, u: Tensor, s: Tensor) -> dict[str, dist.Distribution]:
        """Marginal posteriors of ``t`` and ``c`` (Normal; ``c`` with its full covariance)."""
        q = self.joint(u, s)
        cov = q.covariance_matrix
        return {"t": dist.Normal(q.loc[..., 0], cov[..., 0, 0].sqrt()),
                "c": dist.MultivariateNormal(q.loc[..., 1:], cov[..., 1:, 1:])}

    @torch.no_grad()
    def correlation(self, u: Tensor, s: Tensor) -> Tensor:
        """Posterior correlation of t with each coordinate of c, ``(B, latent_dim)``."""
        cov = self.joint(u, s).covariance_matrix
        sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
        return cov[..., 0, 1:] / (sd[..., :1] * sd[..., 1:])

    def forward(self, u: Tensor, s: Tensor, idx: Tensor, n_obs: int, **_) -> None:
        with pyro.plate(CELL_PLATE, n_obs, subsample=idx):
            z = pyro.sample("tc", self.joint(u, s), infer={"is_auxiliary": True})
            pyro.sample("t", dist.Delta(z[..., 0]))
            pyro.sample("c", dist.Delta(z[..., 1:], event_dim=1))


class RateGuide(PyroModule):
    """Mean-field LogNormal posterior of the random per-gene rates (AutoNormal-style).

    ``q(rate_g) = LogNormal(loc_g, scale_g)`` for each rate of the model's
    ``rate_prior``, initialised at the model's current values with a small scale.

    Parameters
    ----------
    model
        A model with a ``rate_prior`` (its point parameters give the initial locations).
    init_scale
        Initial log-scale standard deviation.
    """

    def __init__(self, model: PyroModule, init_scale: float = 0.05) -> None:
        super().__init__()
        if getattr(model, "rate_prior", None) is None:
            raise ValueError("RateGuide needs a model with a rate_prior")
        self.names = tuple(model.rate_prior.names)
        for name in self.names:
            loc = getattr(model, f"log_{name}").detach().clone()
            setattr(self, f"log_{name}_loc", nn.Parameter(loc))
            setattr(self, f"log_{name}_scale",
                    nn.Parameter(torch.full_like(loc, float(torch.tensor(init_scale).log()))))

    def ode_parameters(self) -> list[nn.Parameter]:
        """Every parameter: per-gene locations and scales (the ODE parameters' rate)."""
        return list(self.parameters())

    def dists(self) -> dict[str, dist.Distribution]:
        """The posterior of each random rate (event shape ``(G,)``)."""
        return {name: dist.LogNormal(getattr(self, f"log_{name}_loc"),
                                     getattr(self, f"log_{name}_scale").exp()).to_event(1)
                for name in self.names}

    def forward(self, *args, **kwargs) -> None:
        for name, q in self.dists().items():
            pyro.sample(name, q)


class CombinedGuide(PyroModule):
    """A per-cell guide and a :class:`RateGuide` used together (like ``AutoGuideList``).

    Attribute access for ``encoder``, ``summary`` and ``latent_dists`` goes to the cell
    guide, so the combined guide is used wherever a cell guide is.
    """

    def __init__(self, cells: PyroModule, rates: RateGuide) -> None:
        super().__init__()
        self.cells = cells
        self.rates = rates

    @property
    def encoder(self):
        return self.cells.encoder

    def summary(self, u: Tensor, s: Tensor) -> dict[str, Tensor]:
        return self.cells.summary(u, s)

    def latent_dists(self, u: Tensor, s: Tensor) -> dict[str, dist.Distribution]:
        return self.cells.latent_dists(u, s)

    def forward(self, *args, **kwargs) -> None:
        self.rates(*args, **kwargs)
        self.cells(*args, **kwargs)


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

    def forward(self, u: Tensor, s: Tensor, idx: Tensor, n_obs: int, **_) -> None:
        with pyro.plate(CELL_PLATE, n_obs, subsample=idx):
            for name in self.names:
                value = getattr(self, f"value_{name}")[idx]
                pyro.sample(name, dist.Delta(value, event_dim=value.dim() - 1))

