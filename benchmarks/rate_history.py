"""Experiment: does a per-cell rate *history* close the 2-branch velocity gap?

Usage: python benchmarks/rate_history.py [--sets 2 3 scvelo small2 small3 linear]
           [--size-factors total neighbourhood] [--seeds 0 1 2 3]
           [--models full history ancestors]
           [--knots 8] [--oracle-rates]

The full model gives each cell one transcription rate ``rho(c) * alpha`` for its whole
past (from the gene's switch-on time). ``RateHistoryModel`` (defined here, not part of
the package) lets the rate follow the cell's history instead: the decoder also takes a
time, ``rho(c, tau)``, and the cell's ODE integrates a piecewise-constant rate over
``knots`` equal segments of ``[0, t_max]`` (the segment holding the cell's own time uses
``rho(c, t)``), inside the gene's ``[t_on, t_off)`` window, with the exact solution of
:func:`pyro_velo.kinetics.piecewise_solve`. It has no initial-condition refinement
(``train(refine_epochs=0)``): the history replaces it. It is swapped into ``VeloVAE``
for the duration of a fit. ``ancestors`` is the package's ``VeloVAE(rate_history=
'ancestors')`` (:class:`pyro_velo.model.AncestralModel`): the segments' rates come from
the cell's ancestors instead, the cells of each earlier segment nearest to it in cell
state.

``--oracle-rates`` sets every gene's beta and gamma to the simulation's true values when
the full stage starts (alpha and the unspliced scaling are adjusted so that the
steady-state levels do not change): if the velocity gap came from badly identified rates,
this would close it.

Simulations as in ``tests/test_full_model.py`` (``simulate(2000, 200,
topology='bifurcation', n_branches=k, noise='nb', seed=k)``, ``pp.preprocess(
random_state=0, size_factors=...)``); ``scvelo``: scVelo's simulator,
``simulate_scvelo(2000, 200, seed=1)`` (one lineage, no boosts), preprocessed with
``min_shared_counts=None``; ``small2``, ``small3``, ``linear``: small, hard sets
(``simulate(1000, 100, ...)``, 2 branches with data seed 3, 3 branches with seed 5, one
lineage with seed 6), where starts fail most. Default
training, one torch thread. Prints one markdown row per fit: latent-time Spearman,
velocity cosine, future-state correlation (as in ``full_vs_basic.py``), the median
per-gene correlation of model and true velocity over the transcriptional-boost genes,
test log-likelihood per cell and wall time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from full_vs_basic import bifurcation, velocity_metrics
from torch import Tensor

import pyro_velo as pv
from pyro_velo.model import AncestralModel
from pyro_velo.nn import Decoder


class RateHistoryModel(AncestralModel):
    """Full model whose cells integrate their own rate history ``rho(c, tau) * alpha``.

    The pieces and their exact solution are :class:`~pyro_velo.model.AncestralModel`'s;
    only the rates of the time bins differ (the decoder's at the bin's midpoint, at the
    cell's own time in its own bin, instead of the ancestors').
    """

    knots: int = 8

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, n_bins=self.knots, **kwargs)
        self.decoder = Decoder(self.latent_dim + 1, self.n_genes)

    def _rho(self, c: Tensor, tau: Tensor) -> Tensor:
        return self.decoder(torch.cat([c, (tau / self.t_max - 0.5).unsqueeze(-1)], -1))

    def transcription_rate(self, c: Tensor, t: Tensor | None = None) -> Tensor:
        if t is None:  # callers that know no time (e.g. the start from the basic model)
            t = torch.full(c.shape[:-1], 0.5 * self.t_max, device=c.device)
        return self._rho(c, t)

    def rate_history(self, t: Tensor, c: Tensor) -> Tensor:
        bins = torch.arange(self.knots, device=t.device)
        mids = (bins + 0.5) * (self.t_max / self.knots)
        own = bins == self.ancestors.bin(t).unsqueeze(-1)
        tau = torch.where(own, t.unsqueeze(-1), mids)
        return self._rho(c.unsqueeze(-2).expand(*tau.shape, c.shape[-1]), tau)


MODELS = ("full", "history", "ancestors")
#: small, hard sets (1000 cells x 100 genes), where starts fail most
SMALL_SETS = {"small2": dict(topology="bifurcation", n_branches=2, seed=3),
              "small3": dict(topology="bifurcation", n_branches=3, seed=5),
              "linear": dict(topology="linear", seed=6)}


class OracleFullStage(pv.inference.FullStage):
    """The full stage, started from the basic fit with the true beta and gamma."""

    adata = None  # the simulation with the true rates

    def begin(self, run) -> None:
        super().begin(run)
        r = self.model.rates()
        genes = self.data.fitted
        beta, gamma = (torch.as_tensor(self.adata.var[f"true_{name}"].to_numpy()[genes],
                                       dtype=r["beta"].dtype, device=r["beta"].device)
                       for name in ("beta", "gamma"))
        # same steady states: s* = alpha / gamma, observed u* = scale_u alpha / beta
        self.model.load_rates(beta=beta, gamma=gamma, alpha=r["alpha"] * gamma / r["gamma"],
                              scale_u=r["scale_u"] * beta / r["beta"] * r["gamma"] / gamma)


class OracleVeloVAE(pv.VeloVAE):
    """VeloVAE whose schedule's full stage is an :class:`OracleFullStage`."""

    def schedule(self, *args, **kwargs):
        return [OracleFullStage(stage.model, stage.guide, stage.data, stage.epochs,
                                stage.basic_model, stage.basic_guide,
                                stage.without_ancestors)
                if isinstance(stage, pv.inference.FullStage) else stage
                for stage in super().schedule(*args, **kwargs)]


def _boost_correlation(vae: pv.VeloVAE, adata) -> float:
    genes = vae.data.fitted
    velocity = vae.get_velocity()[0][:, genes]
    truth = adata.layers["true_velocity"][:, genes]
    if "behaviour" not in adata.var:
        return float("nan")
    boost = np.flatnonzero(adata.var["behaviour"].to_numpy()[genes] == "transcriptional_boost")
    return float(np.median([np.corrcoef(velocity[:, j], truth[:, j])[0, 1] for j in boost]))


def run(simulation: str, size_factors: str, seed: int, model: str, knots: int,
        oracle: bool) -> str:
    if simulation == "scvelo":
        adata = pv.datasets.simulate_scvelo(2000, 200, seed=1)
        pv.pp.preprocess(adata, random_state=0, size_factors=size_factors,
                         min_shared_counts=None)
    elif simulation in SMALL_SETS:
        adata = pv.datasets.simulate(n_cells=1000, n_genes=100, noise="nb",
                                     **SMALL_SETS[simulation])
        pv.pp.preprocess(adata, random_state=0, size_factors=size_factors)
    else:
        adata = bifurcation(2000, 200, int(simulation), int(simulation), size_factors)
    RateHistoryModel.knots = knots
    OracleFullStage.adata = adata
    fitter = OracleVeloVAE if oracle else pv.VeloVAE
    start = time.perf_counter()
    vae = fitter(adata, model=RateHistoryModel if model == "history" else "full", seed=seed,
                 rate_history="ancestors" if model == "ancestors" else "constant")
    vae.train(progress_bar=False, seed=seed, num_threads=1,
              **({"refine_epochs": 0} if model == "history" else {}))
    wall = time.perf_counter() - start
    scores = velocity_metrics(vae, adata)
    boost = _boost_correlation(vae, adata)
    ll = float(vae.evaluate().loc["test", "log_likelihood"])
    return (f"| {simulation} | {size_factors} | {seed} | {model} | {'yes' if oracle else 'no'} "
            f"| {scores['spearman']:.3f} | {scores['cosine']:.3f} | {scores['future']:.3f} "
            f"| {boost:.2f} | {ll:.1f} | {wall:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["2"],
                        choices=["2", "3", "scvelo", *SMALL_SETS])
    parser.add_argument("--size-factors", nargs="+", default=["neighbourhood"],
                        choices=pv.pp.SIZE_FACTORS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--models", nargs="+", default=["full", "history"],
                        choices=MODELS)
    parser.add_argument("--knots", type=int, default=8)
    parser.add_argument("--oracle-rates", action="store_true")
    args = parser.parse_args()
    print("| simulation | size factors | seed | model | true rates | Spearman t | cosine "
          "| future | boost r | test LL | wall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for simulation in args.sets:
        for size_factors in args.size_factors:
            for seed in args.seeds:
                for model in args.models:
                    print(run(simulation, size_factors, seed, model, args.knots,
                              args.oracle_rates), flush=True)


if __name__ == "__main__":
    main()
