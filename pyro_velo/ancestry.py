"""Where a cell came from: cell-state prototypes per time bin and their transcription rates.

The full model gives a cell one transcription rate for its whole past. Under the
``rate_history='ancestors'`` option (:class:`~pyro_velo.model.AncestralModel`) a cell's
past rates are instead those of its *ancestors*: for every time bin before its own, the
cells of that bin that are closest to it in cell state. Cells are summarised by a few
prototypes per time bin (online k-means on the posterior samples seen in training), each
holding the mean relative rate ``rho`` of its cells, so the table has a fixed size
(``bins x prototypes x genes``) whatever the number of cells. Pure torch, no Pyro.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import distributed

__all__ = ["AncestorTable"]


class AncestorTable(nn.Module):
    """Prototypes of the cell state in each time bin, with their mean ``rho``.

    Time ``[0, t_max]`` is cut into ``n_bins`` equal bins (the first and last extend to
    minus and plus infinity). Each bin holds ``n_prototypes`` prototypes: a cell state
    (``centre``), the mean relative transcription rate of the cells assigned to it
    (``rho``), how many cells it has absorbed (``count``; 0: not yet seeded) and when it
    last absorbed one (``last``, in cells absorbed by the whole table, ``seen``). A
    prototype that has absorbed no cell during the last ``memory`` cells is dropped (it
    described cells of an earlier stage of training that have moved elsewhere) and can be
    seeded again.

    Parameters
    ----------
    n_bins, n_prototypes
        Time bins and prototypes per bin (positive).
    latent_dim, n_genes
        Sizes of a cell state and of a rate vector.
    t_max
        Length of the time axis.
    min_weight
        Smallest weight of a minibatch in a prototype's running mean: once a prototype
        has absorbed many cells its mean still follows the latent space as training moves
        it (a memory of about ``1 / min_weight`` updates).
    memory
        Cells after which a prototype that absorbed none of them is dropped; None: never
        (:class:`~pyro_velo.VeloVAE` uses two epochs of training cells).
    """

    def __init__(self, n_bins: int, n_prototypes: int, latent_dim: int, n_genes: int,
                 t_max: float, min_weight: float = 0.05, memory: int | None = None) -> None:
        super().__init__()
        if n_bins < 1 or n_prototypes < 1:
            raise ValueError(f"n_bins and n_prototypes must be positive, got {n_bins} and "
                             f"{n_prototypes}")
        self.n_bins, self.n_prototypes = int(n_bins), int(n_prototypes)
        self.t_max, self.min_weight = float(t_max), float(min_weight)
        self.memory = float("inf") if memory is None else float(memory)
        self.register_buffer("centre", torch.zeros(n_bins, n_prototypes, latent_dim))
        self.register_buffer("rho", torch.zeros(n_bins, n_prototypes, n_genes))
        self.register_buffer("count", torch.zeros(n_bins, n_prototypes))
        # float64: exact cell counts far beyond float32's 2^24
        self.register_buffer("last", torch.zeros(n_bins, n_prototypes, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))

    @property
    def alive(self) -> Tensor:
        """``(n_bins, n_prototypes)`` bool: seeded and not dropped."""
        return (self.count > 0) & (self.seen - self.last <= self.memory)

    @property
    def edges(self) -> Tensor:
        """Inner bin edges, ``(n_bins - 1,)``."""
        return torch.linspace(0.0, self.t_max, self.n_bins + 1,
                              device=self.count.device)[1:-1]

    def bin(self, t: Tensor) -> Tensor:
        """Time bin (long) of each time."""
        return (t * (self.n_bins / self.t_max)).floor().clamp(0, self.n_bins - 1).long()

    def clear(self) -> None:
        """Forget every prototype."""
        for buffer in (self.centre, self.rho, self.count, self.last, self.seen):
            buffer.zero_()

    @torch.no_grad()
    def absorb(self, t: Tensor, c: Tensor, rho: Tensor) -> None:
        """:meth:`update` with a training step's cells; in data-parallel training with
        the cells of every rank, in rank order, so that every rank's table stays the
        same."""
        group = distributed.active_training_group()
        if group is not None:
            t, c, rho = distributed.all_gather_rows(group, t, c, rho)
        self.update(t, c, rho)

    @torch.no_grad()
    def update(self, t: Tensor, c: Tensor, rho: Tensor) -> None:
        """Absorb cells with times ``t`` ``(N,)``, states ``c`` ``(N, d)``, rates ``(N, G)``.

        Unseeded prototypes of a bin take the bin's first cells as they are; the other
        cells move their nearest prototype's running means of state and rate.
        """
        bins = self.bin(t)
        self.seen += t.shape[0]
        alive = self.alive
        for k in bins.unique().tolist():
            members = (bins == k).nonzero().squeeze(-1)
            x, r = c[members], rho[members]
            empty = (~alive[k]).nonzero().squeeze(-1)
            n_seed = min(empty.numel(), x.shape[0])
            if n_seed:
                slots = empty[:n_seed]
                self.centre[k, slots] = x[:n_seed]
                self.rho[k, slots] = r[:n_seed]
                self.count[k, slots] = 1.0
                self.last[k, slots] = self.seen
                alive[k, slots] = True
                x, r = x[n_seed:], r[n_seed:]
            if x.shape[0] == 0:
                continue
            nearest = self._nearest(x, alive[k], k)
            ones = torch.ones_like(nearest, dtype=x.dtype)
            n = torch.zeros_like(self.count[k]).index_add_(0, nearest, ones)
            hit = n > 0
            self.count[k] += n
            self.last[k] = torch.where(hit, self.seen, self.last[k])
            # a running mean (weight n / count), kept from freezing by min_weight
            weight = (n / self.count[k].clamp(min=1.0)).clamp(min=self.min_weight, max=1.0)
            weight = torch.where(hit, weight, 0.0)
            mean_x = (torch.zeros_like(self.centre[k]).index_add_(0, nearest, x)
                      / n.clamp(min=1.0).unsqueeze(-1))
            mean_r = (torch.zeros_like(self.rho[k]).index_add_(0, nearest, r)
                      / n.clamp(min=1.0).unsqueeze(-1))
            self.centre[k] += weight.unsqueeze(-1) * (mean_x - self.centre[k])
            self.rho[k] += weight.unsqueeze(-1) * (mean_r - self.rho[k])

    def _nearest(self, x: Tensor, alive: Tensor, k: int) -> Tensor:
        distance = torch.cdist(x, self.centre[k])
        return distance.masked_fill(~alive, float("inf")).argmin(-1)

    def lookup(self, c: Tensor) -> tuple[Tensor, Tensor]:
        """Rates of the nearest prototype in every bin for the states ``c`` ``(N, d)``.

        Returns
        -------
        rho
            ``(N, n_bins, G)``; rows of bins without any prototype are arbitrary.
        seeded
            ``(n_bins,)`` bool, False for bins without any (live) prototype.
        """
        alive = self.alive
        distance = ((c[:, None, None, :] - self.centre) ** 2).sum(-1)  # (N, bins, P)
        nearest = distance.masked_fill(~alive, float("inf")).argmin(-1)
        bins = torch.arange(self.n_bins, device=c.device)
        return self.rho[bins, nearest], alive.any(-1)
