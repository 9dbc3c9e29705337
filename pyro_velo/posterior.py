"""Posterior sampling, with online summaries that never hold samples x cells x genes.

Draws come from the guide (networks in evaluation mode: no dropout) for one minibatch of
cells at a time; random global rates, when the model has them, are drawn once per sample
and shared by every minibatch, so each sample is one joint draw over all cells.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pyro import poutine
from torch import Tensor
from tqdm.auto import tqdm

from ._threads import cpu_threads
from .data import VelocityData
from .train import local_params

#: sites derived from the latent variables through the ODE
DERIVED = ("velocity", "velocity_u", "u", "s")
RATE_SITES = ("alpha", "beta", "gamma")


def _rate_guide(guide):
    return getattr(guide, "rates", None)


@torch.no_grad()
def draws(
    model, guide, data: VelocityData, idx: Tensor, n_samples: int, batch_size: int,
    derived: bool = True, progress_bar: bool = False,
) -> Iterator[tuple[Tensor, int, dict[str, Tensor]]]:
    """Yield ``(batch_idx, sample_number, values)`` for every minibatch and sample.

    ``values`` holds the guide's latent sites (``t``, ``c``, random rates) and, when
    ``derived``, the model's ``velocity`` (ds/dt), ``velocity_u`` (du/dt), ``u`` and ``s``
    on the model's scale at the drawn latent values. ``progress_bar``: a tqdm bar over
    the minibatches.
    """
    was_training = guide.training
    guide.eval()
    rates = _rate_guide(guide)
    global_draws = []
    for _ in range(n_samples):
        global_draws.append({} if rates is None else
                            {name: q.sample() for name, q in rates.dists().items()})
    try:
        # guides are PyroModules: calling them inside local_params keeps their
        # parameters out of Pyro's global store; minibatch work is fastest on one CPU
        # thread (as in training)
        with local_params(), cpu_threads(1 if data.device.type == "cpu" else None):
            batches = tqdm(data.minibatches(idx, batch_size), desc="Posterior draws",
                           total=-(-len(idx) // batch_size), unit="batch",
                           disable=not progress_bar)
            for batch, args, kwargs in batches:
                for k in range(n_samples):
                    conditioned = poutine.condition(guide, data=global_draws[k])
                    trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
                    values = {name: site["value"] for name, site in trace.nodes.items()
                              if site["type"] == "sample"
                              and not site["infer"].get("is_auxiliary", False)}
                    if derived:
                        latent = {n: values[n] for n in ("t", "c") if n in values}
                        random = {n: values[n] for n in RATE_SITES if n in values}
                        out = model.kinetic(**latent, idx=args[2], rates=random)
                        values.update(velocity=out["ds"], velocity_u=out["du"], u=out["u"],
                                      s=out["s"])
                    yield batch, k, values
    finally:
        guide.train(was_training)


class Moments:
    """Running sums of values and their squares (float64), for means and variances."""

    def __init__(self) -> None:
        self.n = 0
        self.total: Tensor | None = None
        self.squares: Tensor | None = None

    def add(self, value: Tensor) -> None:
        value = value.double()
        if self.total is None:
            self.total, self.squares = torch.zeros_like(value), torch.zeros_like(value)
        self.total += value
        self.squares += value * value
        self.n += 1

    @property
    def mean(self) -> Tensor:
        return self.total / self.n

    @property
    def variance(self) -> Tensor:
        """Unbiased variance (0 with a single sample)."""
        if self.n < 2:
            return torch.zeros_like(self.total)
        return ((self.squares - self.total * self.mean) / (self.n - 1)).clamp(min=0.0)


def multivariate_cv(mean: Tensor, variance: Tensor) -> Tensor:
    """Van Valen's (1974) multivariate coefficient of variation along the last axis.

    ``CV = sqrt(sum_k var_k / sum_k mean_k^2)``: the total standard deviation relative to
    the length of the mean vector (for one dimension, the usual ``std / |mean|``).
    """
    return (variance.sum(-1) / (mean * mean).sum(-1).clamp(min=1e-300)).sqrt()
