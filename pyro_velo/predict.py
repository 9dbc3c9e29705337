"""What a fitted (model, guide) pair says about cells: the predictor behind every output.

:class:`Predictor` encodes cells (posterior means and standard deviations of t and c),
evaluates the model's expected abundances and velocities at those latent values (now or
``delta_t`` later), scores reconstructions, and draws from the posterior with online
summaries that never hold samples x cells x genes. :class:`~pyro_velo.VeloVAE`'s getters,
the export (:mod:`pyro_velo.export`) and the training stages read the fit through it.

Posterior draws come from the guide (networks in evaluation mode: no dropout) for one
minibatch of cells at a time; random global rates, when the model has them, are drawn
once per sample and shared by every minibatch, so each sample is one joint draw over all
cells.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from pyro import poutine
from torch import Tensor
from tqdm.auto import tqdm

from ._checks import InputError, check_int
from ._params import local_params, set_seed
from ._settings import settings
from ._threads import cpu_threads
from .data import VelocityData
from .guides import AmortizedMVNGuide

if TYPE_CHECKING:
    from anndata import AnnData

    from .disk import DiskVelocityData

#: sites derived from the latent variables through the ODE
DERIVED = ("velocity", "velocity_u", "u", "s")
RATE_SITES = ("alpha", "beta", "gamma")
#: cells per pass of the encoder and of the kinetics in prediction
CHUNK = 4096


class Predictor:
    """Posterior summaries of a fitted ``model`` and ``guide`` on the cells of ``data``.

    Parameters
    ----------
    model, guide
        The fitted pair (a model of :mod:`pyro_velo.model` and a guide with a
        ``summary(u, s)`` method).
    data
        The fitted cells: their split, per-gene scales and fitted-gene mask.
    var_names, obs_names
        Names of all genes (fitted or not) and of the fitted cells, for the index of
        per-gene and per-cell tables (default: positions).
    device
        Where the model, the guide and the data live (default the data's device).
    """

    def __init__(self, model, guide, data: VelocityData | DiskVelocityData,
                 var_names: np.ndarray | None = None, obs_names: np.ndarray | None = None,
                 device: torch.device | None = None) -> None:
        self.model, self.guide, self.data = model, guide, data
        self.var_names, self.obs_names = var_names, obs_names
        self.device = torch.device(data.device) if device is None else device

    # ---- encoding and expectations -----------------------------------------------------
    def cells(self, adata: AnnData | None, unspliced_layer: str = "Mu",
              spliced_layer: str = "Ms") -> VelocityData | DiskVelocityData:
        """The fitted cells (``adata`` None), or new cells with every fitted gene by name
        in these layers, divided by the fitted data's per-gene scales
        (:meth:`~pyro_velo.data.VelocityData.for_new_cells`; ``adata`` is not modified)."""
        if adata is None:
            return self.data
        return VelocityData.for_new_cells(
            adata, self.var_names, self.data.fitted, self.data.gene_scale_u,
            self.data.gene_scale_s, unspliced_layer, spliced_layer).to(self.device)

    def latent_time(self, data: VelocityData | None = None, scaled: bool = False
                    ) -> np.ndarray:
        """Posterior mean time of the cells of ``data`` (default the fitted ones), float64;
        ``scaled``: rescaled to ``[0, 1]`` by the range of the fitted cells' times."""
        t = self.encode(data=data)["t"].cpu().numpy().astype(np.float64)
        if scaled:
            ref = t if data is None else self.encode()["t"].cpu().numpy().astype(np.float64)
            t = (t - ref.min()) / max(ref.max() - ref.min(), 1e-12)
        return t

    @torch.no_grad()
    def encode(self, idx: Tensor | None = None, guide=None, batch_size: int = CHUNK,
               data: VelocityData | DiskVelocityData | None = None) -> dict[str, Tensor]:
        """Posterior means (``t``, ``c``) and standard deviations (``t_std``, ``c_std``).

        Of the cells ``idx`` (default all) of ``data`` (default the fitted cells), by
        ``guide`` (default the fitted guide).
        """
        data = self.data if data is None else data
        idx = torch.arange(data.n_cells, device=self.device) if idx is None else idx
        guide = self.guide if guide is None else guide
        guide.eval()
        parts: dict[str, list[Tensor]] = {}
        for _batch, (u, s, *_), _kwargs in data.minibatches(idx, batch_size):
            for name, value in guide.summary(u, s).items():
                parts.setdefault(name, []).append(value)
        return {name: torch.cat(values) for name, values in parts.items()}

    @torch.no_grad()
    def expected(self, delta_t: float = 0.0, idx: Tensor | None = None, scale: bool = True,
                 encoded: dict[str, Tensor] | None = None,
                 data: VelocityData | None = None) -> dict[str, Tensor]:
        """Model's u, s, du/dt, ds/dt at each cell's posterior mean time + ``delta_t``.

        ``(cells, fitted genes)`` tensors, on the data scales when ``scale``. ``encoded``
        reuses the output of :meth:`encode` for the same cells. ``data``: new cells,
        which have no per-cell initial conditions.
        """
        own = data is None or data is self.data
        data = self.data if data is None else data
        idx = torch.arange(data.n_cells, device=self.device) if idx is None else idx
        latent = self.encode(idx, data=data) if encoded is None else encoded
        latent = {k: latent[k] for k in ("t", "c") if k in latent}
        latent["t"] = latent["t"] + delta_t
        out: dict[str, list[Tensor]] = {k: [] for k in ("u", "s", "du", "ds")}
        for pos in torch.arange(len(idx), device=self.device).split(CHUNK):
            batch = {k: v[pos] for k, v in latent.items()}
            for k, v in self.model.kinetic(**batch, idx=idx[pos] if own else None).items():
                out[k].append(v)
        result = {k: torch.cat(v) for k, v in out.items()}
        if scale:
            for k in result:
                result[k] = result[k] * (
                    self.data.gene_scale_u if k in ("u", "du") else self.data.gene_scale_s)
        return result

    def full_width(self, x: np.ndarray) -> np.ndarray:
        """Embed a ``(cells, fitted genes)`` array into ``(cells, n_vars)`` with NaN."""
        full = np.full((x.shape[0], len(self.data.fitted)), np.nan, dtype=np.float32)
        full[:, self.data.fitted] = x
        return full

    def expected_blocks(self, delta_t: float = 0.0, data: VelocityData | None = None,
                        chunk: int = 1024, encoded: dict[str, Tensor] | None = None,
                        ) -> Iterator[tuple[slice, dict[str, Tensor], dict[str, Tensor]]]:
        """:meth:`expected` of the cells of ``data``, ``chunk`` cells at a time.

        Yields ``(rows, expected, latent)``: the block's rows, its expectations
        (``(rows, fitted genes)``) and its part of the encoding. ``encoded``: the output
        of :meth:`encode` for all cells of ``data``, if at hand. The one loop behind the
        in-memory arrays (:meth:`expected_arrays`) and the chunked file writer
        (:func:`pyro_velo.export.write_h5ad`).
        """
        data = self.data if data is None else data
        latent = self.encode(data=data) if encoded is None else encoded
        for pos in torch.arange(data.n_cells, device=self.device).split(chunk):
            part = {k: v[pos] for k, v in latent.items()}
            rows = slice(int(pos[0]), int(pos[-1]) + 1)
            yield rows, self.expected(delta_t, idx=pos, data=data, encoded=part), part

    def expected_arrays(self, keys: tuple[str, ...], delta_t: float = 0.0,
                        data: VelocityData | None = None, chunk: int = 1024,
                        encoded: dict[str, Tensor] | None = None) -> tuple[np.ndarray, ...]:
        """Full-width ``(cells, n_vars)`` float32 arrays of :meth:`expected`'s ``keys``.

        Filled ``chunk`` cells at a time, so that only the returned arrays are of size
        cells x genes (not the four expectations, their scaled copies and a float64 copy).
        ``encoded``: the output of :meth:`encode` for all cells of ``data``, if at hand.
        """
        data = self.data if data is None else data
        columns = np.flatnonzero(self.data.fitted)
        out = tuple(np.full((data.n_cells, len(self.data.fitted)), np.nan, dtype=np.float32)
                    for _ in keys)
        for rows, part, _ in self.expected_blocks(delta_t, data, chunk, encoded):
            for array, key in zip(out, keys, strict=True):
                array[rows, columns] = part[key].cpu().numpy()
        return out

    def transcription_rate(self, c: Tensor) -> np.ndarray:
        """Full-width rho of the cell states ``c`` (full model), float32."""
        with torch.no_grad():
            rho = torch.cat([self.model.transcription_rate(b) for b in c.split(CHUNK)])
        return self.full_width(rho.cpu().numpy())

    def rates(self) -> pd.DataFrame:
        """Per-gene parameters on the data scale: the model's and its likelihood's
        ``gene_parameters()``, NaN rows for genes not fitted, and a ``fitted`` column
        (see :meth:`pyro_velo.VeloVAE.get_rates`)."""
        values = self.model.gene_parameters(self.data.gene_scale_u.cpu().numpy(),
                                            self.data.gene_scale_s.cpu().numpy())
        frame = pd.DataFrame(np.nan, index=self.var_names, columns=list(values))
        for name, value in values.items():
            frame.loc[self.data.fitted, name] = value
        frame["fitted"] = self.data.fitted
        return frame

    @torch.no_grad()
    def reconstruction(self, split: str) -> dict[str, float]:
        """``mse``, ``mae`` and mean per-cell ``log_likelihood`` of one split's cells.

        On the per-gene standardised abundances, at each cell's posterior means (see
        :meth:`pyro_velo.VeloVAE.evaluate`).
        """
        idx = self.data.indices(split).to(self.device)
        if len(idx) == 0:
            return {"mse": np.nan, "mae": np.nan, "log_likelihood": np.nan}
        squared = absolute = log_lik = 0.0  # float64 sums over minibatches of cells
        n_log_lik = 0
        for batch, (u, s, *_), kwargs in self.data.minibatches(idx, CHUNK):
            expected = self.expected(idx=batch, scale=False)
            residual = torch.cat([expected["u"] - u, expected["s"] - s], dim=1)
            # the likelihood scores its own observations: moments, or raw counts
            obs_u, obs_s, size_u, size_s = kwargs.get("counts", (u, s, None, None))
            with local_params():  # the likelihood is a PyroModule: keep its params local
                cell_log_lik = (self.model.u_dist(expected["u"], size_u).log_prob(obs_u)
                                + self.model.s_dist(expected["s"], size_s).log_prob(obs_s))
            squared += float((residual.double() ** 2).sum())
            absolute += float(residual.double().abs().sum())
            log_lik += float(cell_log_lik.double().sum())
            n_log_lik += cell_log_lik.numel()
        entries = len(idx) * 2 * self.data.n_genes
        return {"mse": squared / entries, "mae": absolute / entries,
                "log_likelihood": log_lik / n_log_lik}

    # ---- posterior sampling and uncertainty -------------------------------------------
    def posterior_sites(self) -> list[str]:
        """Sites :meth:`sample_posterior` can return for this model."""
        sites = ["t"] + (["c"] if hasattr(self.model, "transcription_rate") else [])
        rate_prior = getattr(self.model, "rate_prior", None)
        return sites + (list(rate_prior.names) if rate_prior is not None else []) + list(DERIVED)

    def data_scale(self, name: str, value: Tensor) -> Tensor:
        """A drawn site on the data's scale (velocities; other sites as they are)."""
        if name == "velocity":
            return value * self.data.gene_scale_s
        if name == "velocity_u":
            return value * self.data.gene_scale_u
        return value

    def sample_posterior(self, n_samples: int, return_sites: Sequence[str] | None,
                         batch_size: int, seed: int, progress_bar: bool
                         ) -> dict[str, np.ndarray]:
        """Joint draws for every cell (:meth:`pyro_velo.VeloVAE.sample_posterior`).

        ``return_sites``: default the per-cell latent sites (``'t'``, and ``'c'`` for the
        full model). Latent sites (``'t'``, ``'c'``; ``'alpha'``, ``'beta'``, ``'gamma'``
        when the rates are random) and derived quantities at the drawn values
        (``'velocity'`` = ds/dt and ``'velocity_u'`` = du/dt on the ``Ms`` / ``Mu``
        scale, ``'u'``, ``'s'`` on the model's per-gene scale). Derived arrays have
        ``n_samples x n_cells x fitted genes`` entries: for summaries over many cells use
        :meth:`uncertainty`, which never holds them. ``seed`` reseeds torch and Pyro's
        global RNG (reproducible on CPU).
        """
        _check_draws(n_samples, batch_size)
        available = self.posterior_sites()
        if return_sites is None:
            return_sites = [name for name in ("t", "c") if name in available]
        unknown = [name for name in return_sites if name not in available]
        if unknown:
            raise InputError(f"unknown site(s) {unknown}; available: {available}")
        set_seed(seed)
        parts: dict[str, list[list[Tensor]]] = {
            name: [[] for _ in range(n_samples)] for name in return_sites}
        idx = torch.arange(self.data.n_cells, device=self.device)
        derived = any(name in DERIVED for name in return_sites)
        for batch, k, values in draws(self.model, self.guide, self.data, idx, n_samples,
                                      batch_size, derived, progress_bar):
            for name in return_sites:
                if name in RATE_SITES:
                    if batch[0] == 0:
                        parts[name][k].append(values[name])
                else:
                    parts[name][k].append(self.data_scale(name, values[name]))
        return {name: torch.stack([torch.cat(chunks) if name not in RATE_SITES else chunks[0]
                                   for chunks in per_sample]).cpu().numpy()
                for name, per_sample in parts.items()}

    def uncertainty(self, n_samples: int, batch_size: int, seed: int,
                    progress_bar: bool) -> pd.DataFrame:
        """Per-cell posterior uncertainty (:meth:`pyro_velo.VeloVAE.get_uncertainty`).

        Summaries are accumulated online over ``n_samples`` draws for one minibatch of
        cells at a time (memory ``batch_size x genes``, never samples x cells x genes).
        Columns:

        - ``time_mean``, ``time_std``; ``time_cv`` = ``time_std / |time_mean|`` (time on
          the model's axis ``[0, t_max]``). The posterior reads each cell's moments as its
          own abundances and leaves out the spread of time over the neighbourhood they
          average (:func:`pyro_velo.tl.time_resolution`, exported as
          ``obs['pyro_velo_time_resolution']``), in the median 6 to 29 times larger on
          the simulations of ``benchmarks/time_calibration.py``;
        - ``state_cv`` (full model): the multivariate coefficient of variation of c (Van
          Valen 1974), ``sqrt(trace Cov(c) / |E c|^2)``. c has no natural origin (its
          N(0, I) prior places the origin where cells are dense), so this ratio also
          depends on where a cell sits in c-space, not only on its spread;
        - ``rho_cv`` (full model): the same for the transcription rates ``rho = g(c)``
          over the fitted genes: the cell-state uncertainty in what the state means for
          expression, independent of how c is parametrised and relative to a real zero
          (no transcription);
        - ``velocity_cv``: the same for the velocity vector ds/dt over the fitted genes
          (on the ``Ms`` scale): total posterior spread relative to the mean velocity. A
          spread, not an error bar: on simulations the error of the velocity's direction
          was about ten times the posterior's (``benchmarks/time_calibration.py --velocity``).
        """
        _check_draws(n_samples, batch_size)
        set_seed(seed)
        idx = torch.arange(self.data.n_cells, device=self.device)
        columns: dict[str, list[Tensor]] = {}
        moments: dict[str, Moments] = {}
        for _batch, k, values in draws(self.model, self.guide, self.data, idx, n_samples,
                                       batch_size, progress_bar=progress_bar):
            if "c" in values:
                with torch.no_grad():  # draws() is no_grad only while it runs
                    values["rho"] = self.model.transcription_rate(values["c"])
            if k == 0:
                moments = {name: Moments() for name in ("t", "c", "rho", "velocity")
                           if name in values}
            for name, acc in moments.items():
                acc.add(self.data_scale(name, values[name]))
            if k == n_samples - 1:
                for name, value in _summaries(moments).items():
                    columns.setdefault(name, []).append(value)
        return pd.DataFrame(
            {name: torch.cat(values).cpu().numpy() for name, values in columns.items()},
            index=self.obs_names)

    def rate_uncertainty(self) -> pd.DataFrame:
        """Median and 90% interval of random rates (see
        :meth:`pyro_velo.VeloVAE.get_rate_uncertainty`)."""
        rates = getattr(self.guide, "rates", None)
        if rates is None:
            raise RuntimeError("rates are point estimates: pass rate_prior=... to VeloVAE "
                               "to make them random with a posterior")
        frame = pd.DataFrame(index=self.var_names if self.var_names is not None
                             else pd.RangeIndex(len(self.data.fitted)))
        z = 1.6448536269514722  # standard normal 95% quantile
        for name in rates.names:
            loc = getattr(rates, f"log_{name}_loc").detach().double().cpu()
            scale = getattr(rates, f"log_{name}_scale").detach().double().exp().cpu()
            factor = self.data.gene_scale_s.double().cpu() if name == "alpha" else 1.0
            for suffix, value in (("median", loc), ("q05", loc - z * scale),
                                  ("q95", loc + z * scale)):
                column = np.full(len(self.data.fitted), np.nan)
                column[self.data.fitted] = (value.exp() * factor).numpy()
                frame[f"{name}_{suffix}"] = column
        return frame

    def time_state_correlation(self) -> np.ndarray:
        """Posterior correlation of t with each coordinate of c (``amortized_mvn`` guide)."""
        cells = getattr(self.guide, "cells", self.guide)
        if not isinstance(cells, AmortizedMVNGuide):
            raise RuntimeError("the t-c correlation needs guide='amortized_mvn'")
        cells.eval()
        idx = torch.arange(self.data.n_cells, device=self.device)
        out = [cells.correlation(u, s)
               for _batch, (u, s, *_), _kwargs in self.data.minibatches(idx, CHUNK)]
        return torch.cat(out).cpu().numpy()


def _check_draws(n_samples: int, batch_size: int) -> None:
    """InputError naming ``n_samples`` or ``batch_size`` unless both are integers >= 1."""
    check_int(n_samples, "n_samples", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)


def _summaries(moments: dict[str, Moments]) -> dict[str, Tensor]:
    """The columns of :meth:`Predictor.uncertainty` from one minibatch's moments."""
    t = moments["t"]
    summary = {"time_mean": t.mean, "time_std": t.variance.sqrt(),
               "time_cv": t.variance.sqrt() / t.mean.abs().clamp(min=1e-300)}
    if "c" in moments:
        summary["state_cv"] = multivariate_cv(moments["c"].mean, moments["c"].variance)
        summary["rho_cv"] = multivariate_cv(moments["rho"].mean, moments["rho"].variance)
    summary["velocity_cv"] = multivariate_cv(moments["velocity"].mean,
                                             moments["velocity"].variance)
    return summary


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
    rates = getattr(guide, "rates", None)
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
                           disable=not progress_bar or settings.verbosity == 0)
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
