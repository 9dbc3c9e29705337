"""The user-facing model class: fit VeloVAE to an AnnData and export the results."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from . import __version__
from ._checks import InputError, MissingFileError, check_int, check_real
from .capture import capture_time_axis, capture_times_from_obs
from .data import SPLIT_NAMES, VelocityData
from .disk import DiskVelocityData, read_annotations
from .export import write_anndata, write_h5ad
from .guides import (
    AmortizedGuide,
    AmortizedMVNGuide,
    CombinedGuide,
    RateGuide,
)
from .initialize import (
    steady_state_init,
)
from .likelihoods import LIKELIHOODS, Likelihood, make_likelihood
from .model import AncestralModel, BasicModel, FullModel
from .predict import Predictor
from .priors import CaptureTimePrior, LogNormalRatePrior, NormalTimePrior, default_time_scale
from .schedule import TrainingMixin
from .train import (
    TrainingHistory,
    adopt_module,
    check_training_arguments,
    evaluate_loss,
    local_params,
    set_seed,
)

MODELS = ("basic", "full")
#: what :meth:`VeloVAE.train` records in ``config`` (not constructor arguments)
TRAINING_RECORDS = ("refine_delta1", "refine_delta2", "refined", "warm_start", "n_starts",
                    "start", "start_losses")
#: values of ``rate_history``: the paper's one rate per cell, or rates from the ancestors
RATE_HISTORIES = ("constant", "ancestors")
GUIDES = ("amortized", "amortized_mvn")
COMPONENTS = ("likelihood", "guide", "time_prior", "state_prior", "rate_prior")
# config value of a component passed as an object: it must be passed again to load()
CUSTOM = "custom:"
#: cells (whole blocks, from all splits) a model fitted from a file is warmed up and
#: initialised on; in memory all cells are used
START_SAMPLE_CELLS = 20_000
#: Version of the layout :meth:`VeloVAE.save` writes (``config.json['format_version']``);
#: :meth:`VeloVAE.load` reads this version only.
FORMAT_VERSION = 2
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"


class VeloVAE(TrainingMixin):
    """Variational mixture of ODEs for RNA velocity (Gu et al., VeloVAE), in Pyro.

    Parameters
    ----------
    adata
        Preprocessed AnnData (see :func:`pyro_velo.pp.preprocess`) with first-order
        moments in ``layers['Mu']`` and ``layers['Ms']``. Not modified.
    model
        ``'full'`` (default): the variational mixture of ODEs (paper section 3.4): a
        latent cell state c per cell and a decoder giving each cell and gene its relative
        transcription rate rho. ``'basic'``: one latent time per cell and fixed per-gene
        rates with switch-on and switch-off times (paper section 3.3); faster.
    unspliced_layer, spliced_layer
        Layers holding the unspliced / spliced abundances.
    t_max
        Length of the model's time axis (time is exported rescaled to ``[0, 1]``).
    time_prior_loc, time_prior_scale
        Mean and standard deviation of the Normal time prior (default ``t_max/2``,
        ``t_max/4``).
    hidden, dropout
        Encoder architecture (paper: ``(500, 250)`` with batch norm and dropout).
    latent_dim
        Dimension of the cell state c (full model; paper: 5).
    c_prior_scale
        Standard deviation of the Normal prior of c (paper: 1, i.e. ``N(0, I)``).
    rate_history
        Full model: ``'constant'`` (default, the paper's model: each cell transcribes at
        its own rate ``rho(c) * alpha`` since a gene's switch-on, followed by the
        initial-condition refinement) or ``'ancestors'``: over each earlier time bin a
        cell transcribes at the rate of its ancestors, the cells of that bin nearest to
        it in cell state (:class:`~pyro_velo.model.AncestralModel`; no refinement).
        See ``benchmarks/RESULTS.md``, sessions 14 and 15, for what it changes (better
        velocities of genes whose rate rises in steps; up to 2x the training time).
        :meth:`train` fits the paper's model first and then continues with the
        ancestors' rates (stage ``ancestors``).
    likelihood
        ``'normal'`` (default; on the moments ``Mu``/``Ms``), ``'poisson'`` or ``'nb'``
        (on the raw counts ``layers['raw_unspliced']``/``['raw_spliced']`` with the size
        factors ``obs['size_factor_unspliced']``/``['size_factor_spliced']`` that
        :func:`pyro_velo.pp.preprocess` writes), or a
        :class:`~pyro_velo.likelihoods.Likelihood` object (see that module).
    guide
        ``'amortized'`` (default; mean-field Normal for t and c), ``'amortized_mvn'``
        (full covariance between t and c per cell; full model), or a guide object for
        the final model (a PyroModule with the model's signature, an ``encoder`` and a
        ``summary(u, s)`` method, see :class:`~pyro_velo.guides.AmortizedGuide`).
    time_prior
        Prior of t: a :class:`~pyro_velo.priors.TimePrior` or any callable mapping cell
        indices to a distribution (default: Normal with ``time_prior_loc/scale``, or the
        capture-time prior).
    state_prior
        Prior of c (full model): a callable mapping cell indices to a distribution with
        event shape ``(latent_dim,)`` (default ``Normal(0, c_prior_scale^2 I)``).
    rate_prior
        None (default: rates are point estimates), a number (the log-scale standard
        deviation of LogNormal priors on alpha, beta and gamma, which then become random
        with a LogNormal posterior, see :meth:`get_rate_uncertainty`), or a
        :class:`~pyro_velo.priors.LogNormalRatePrior`.
    capture_time_key
        ``obs`` column of capture times (numbers or labels such as ``'E12.5'``, ``'day7'``,
        ``'P0'``; see :func:`pyro_velo.capture.parse_capture_times`). The time prior then
        centres each cell on its capture time mapped linearly onto ``[0.1, 0.9] t_max``,
        with standard deviation ``capture_time_scale``; cells without one keep the
        uninformative prior. The ODE parameters are initialised from the capture times
        (paper, section 4.2).
    capture_time_mapping
        Explicit label-to-number map for the capture times.
    capture_time_scale
        Standard deviation of the capture-time prior on the model's axis (default: the
        spacing between consecutive capture times, see
        :func:`~pyro_velo.priors.default_time_scale`).
    split_fractions
        Fractions of cells for train, validation (early stopping) and test (held out).
    seed
        Seed of the split and of the parameter initialisation.
    progress_bar
        When ``adata`` is a file: show a tqdm bar over the pass that checks its layers
        and computes the per-gene scales (minutes for 10^6 cells).

    Examples
    --------
    >>> import pyro_velo as pv
    >>> adata = pv.datasets.simulate(n_cells=1000, n_genes=100, topology="linear")
    >>> pv.pp.preprocess(adata)
    >>> vae = pv.VeloVAE(adata)
    >>> vae.train()
    >>> vae.export_to_anndata(adata)
    """

    def __init__(
        self,
        adata: AnnData | str | Path,
        model: str = "full",
        unspliced_layer: str = "Mu",
        spliced_layer: str = "Ms",
        t_max: float = 20.0,
        time_prior_loc: float | None = None,
        time_prior_scale: float | None = None,
        hidden: Sequence[int] = (500, 250),
        dropout: float = 0.2,
        latent_dim: int = 5,
        c_prior_scale: float = 1.0,
        rate_history: str = "constant",
        likelihood: str | Likelihood = "normal",
        guide=GUIDES[0],
        time_prior=None,
        state_prior=None,
        rate_prior: float | LogNormalRatePrior | None = None,
        capture_time_key: str | None = None,
        capture_time_mapping: dict | None = None,
        capture_time_scale: float | None = None,
        split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
        seed: int = 0,
        progress_bar: bool = True,
        _split: np.ndarray | None = None,
    ) -> None:
        if model not in MODELS:
            raise InputError(f"unknown model {model!r}; choose one of {MODELS}")
        if rate_history not in RATE_HISTORIES:
            raise InputError(f"unknown rate_history {rate_history!r}; choose one of "
                             f"{RATE_HISTORIES}")
        if rate_history != "constant" and model != "full":
            raise InputError(f"rate_history={rate_history!r} applies to model='full'")
        self._check_settings(t_max=t_max, time_prior_loc=time_prior_loc,
                             time_prior_scale=time_prior_scale, hidden=hidden,
                             dropout=dropout, latent_dim=latent_dim,
                             c_prior_scale=c_prior_scale,
                             capture_time_scale=capture_time_scale, seed=seed)
        components = self._check_components(model, likelihood, guide, time_prior, state_prior,
                                            rate_prior, capture_time_key)
        self.config = {
            "model": model,
            "unspliced_layer": unspliced_layer,
            "spliced_layer": spliced_layer,
            "t_max": float(t_max),
            "time_prior_loc": time_prior_loc,
            "time_prior_scale": time_prior_scale,
            "hidden": [int(width) for width in hidden],
            "dropout": float(dropout),
            "latent_dim": int(latent_dim),
            "c_prior_scale": float(c_prior_scale),
            "rate_history": rate_history,
            **{name: _describe(value) for name, value in components.items()},
            "capture_time_key": capture_time_key,
            "capture_time_mapping": capture_time_mapping,
            "capture_time_scale": capture_time_scale,
            "split_fractions": list(split_fractions),
            "seed": int(seed),
        }
        self._components = components
        if isinstance(adata, str | Path):
            # streaming: the layers stay in the file (see pyro_velo.disk)
            if self._likelihood_template().observations == "counts":
                raise InputError(
                    "count likelihoods read raw counts into memory and cannot stream from "
                    "a file: pass an AnnData, or use the default likelihood='normal'")
            self.data = DiskVelocityData.from_h5ad(
                adata, unspliced_layer, spliced_layer, tuple(split_fractions), _split, seed,
                progress_bar=progress_bar)
            obs, var = read_annotations(adata)
            adata = AnnData(obs=obs)  # the annotations (capture times) without matrices
            self._graph = None
            self.var_names = np.asarray(var.index)
        else:
            self.data = VelocityData.from_anndata(
                adata, unspliced_layer, spliced_layer, tuple(split_fractions), _split, seed
            )
            # kNN graph for the pseudotime that starts training (a reference, not a copy)
            self._graph = (adata.obsp["connectivities"] if "connectivities" in adata.obsp
                           else None)
            self.var_names = np.asarray(adata.var_names)
            if self._likelihood_template().observations == "counts":
                self.data = self.data.with_counts(adata)
        self.obs_names = np.asarray(adata.obs_names)
        # the data the warm-up and the initialisations use: all cells in memory, a
        # sample of whole blocks of cells from a file
        self._start_data = (self.data if isinstance(self.data, VelocityData) else
                            self.data.load(self.data.sample(START_SAMPLE_CELLS, seed)))
        self.capture_times = None
        if capture_time_key is not None:
            times = capture_times_from_obs(adata, capture_time_key, capture_time_mapping)
            self.capture_times = torch.as_tensor(capture_time_axis(times, t_max),
                                                 dtype=torch.float32)
            if capture_time_scale is None:
                capture_time_scale = default_time_scale(
                    len(np.unique(times[np.isfinite(times)])), t_max)
            self.config["capture_time_scale"] = float(capture_time_scale)
        set_seed(seed)
        self._init = steady_state_init(
            *self._start_data.rows(self._start_data.indices("train")), t_max)
        self.model, self.guide = self._make_pair(model)
        self.history = TrainingHistory()
        self.is_trained = False
        #: per-cell posterior uncertainty from :meth:`get_uncertainty` (None until then)
        self.uncertainty: pd.DataFrame | None = None
        self.device = torch.device("cpu")

    @staticmethod
    def _check_settings(*, t_max, time_prior_loc, time_prior_scale, hidden, dropout,
                        latent_dim, c_prior_scale, capture_time_scale, seed) -> None:
        """Numbers and sizes of the constructor, checked before anything is built."""
        check_real(t_max, "t_max", positive=True)
        check_real(time_prior_loc, "time_prior_loc", allow_none=True)
        for name, value in (("time_prior_scale", time_prior_scale),
                            ("capture_time_scale", capture_time_scale)):
            check_real(value, name, positive=True, allow_none=True)
        check_real(c_prior_scale, "c_prior_scale", positive=True)
        check_real(dropout, "dropout")
        if not 0 <= dropout < 1:
            raise InputError(f"dropout must be in [0, 1), got {dropout!r}.")
        try:
            widths = [] if isinstance(hidden, str | bytes) else list(hidden)
        except TypeError:
            widths = []
        if not widths:
            raise InputError(f"hidden must be a non-empty sequence of layer widths, got "
                             f"{hidden!r}.")
        for width in widths:
            check_int(width, "each width in hidden", minimum=1)
        check_int(latent_dim, "latent_dim", minimum=1)
        check_int(seed, "seed", minimum=0)

    @staticmethod
    def _check_components(model, likelihood, guide, time_prior, state_prior, rate_prior,
                          capture_time_key) -> dict:
        """Validate the swappable pieces; return them by name (objects or names)."""
        if isinstance(likelihood, str) and likelihood not in LIKELIHOODS:
            raise InputError(f"unknown likelihood {likelihood!r}; choose one of "
                             f"{sorted(LIKELIHOODS)} or pass a Likelihood object")
        if not isinstance(likelihood, str | Likelihood):
            raise InputError("likelihood must be a name or a pyro_velo.likelihoods.Likelihood")
        if isinstance(guide, str):
            if guide not in GUIDES:
                raise InputError(f"unknown guide {guide!r}; choose one of {GUIDES} or pass "
                                 "a guide object")
            if guide == "amortized_mvn" and model != "full":
                raise InputError("guide='amortized_mvn' correlates t with the cell state c: "
                                 "it needs model='full'")
        elif not (hasattr(guide, "summary") and hasattr(guide, "encoder")):
            raise InputError("a guide object needs an encoder and a summary(u, s) method "
                             "(posterior means and standard deviations, see AmortizedGuide)")
        if time_prior is not None and capture_time_key is not None:
            raise InputError("pass either time_prior or capture_time_key, not both")
        if state_prior is not None and model != "full":
            raise InputError("state_prior applies to the cell state of model='full'")
        if rate_prior is not None and not isinstance(rate_prior, LogNormalRatePrior):
            if isinstance(rate_prior, bool) or not isinstance(rate_prior, int | float) \
                    or not rate_prior > 0:
                raise InputError("rate_prior must be None, a positive log-scale standard "
                                 f"deviation or a LogNormalRatePrior, got {rate_prior!r}")
        return {"likelihood": likelihood, "guide": guide, "time_prior": time_prior,
                "state_prior": state_prior, "rate_prior": rate_prior}

    @property
    def _ancestral(self) -> bool:
        """Whether the full model takes each cell's past rates from its ancestors."""
        return self.config.get("rate_history") == "ancestors"  # absent in older saves

    def _likelihood_template(self) -> Likelihood:
        return make_likelihood(self._components["likelihood"])

    def _make_pair(self, kind: str):
        """A fresh (model, guide) of ``kind`` from the steady-state initialisation.

        Objects passed by the user are copied, so the first-stage basic model and the
        final model never share parameters.
        """
        with local_params():
            return self._build_pair(kind)

    def _build_pair(self, kind: str):
        cfg, parts = self.config, self._components
        likelihood = adopt_module(copy.deepcopy(self._likelihood_template()))
        if not likelihood.ready:
            likelihood.setup(self._init, self.data.gene_scale_u, self.data.gene_scale_s)
        time_prior = _adopted_copy(parts["time_prior"])
        if self.capture_times is not None:
            fallback = NormalTimePrior(
                0.5 * cfg["t_max"] if cfg["time_prior_loc"] is None else cfg["time_prior_loc"],
                0.25 * cfg["t_max"] if cfg["time_prior_scale"] is None
                else cfg["time_prior_scale"])
            time_prior = CaptureTimePrior(self.capture_times, cfg["capture_time_scale"],
                                          fallback)
        rate_prior = parts["rate_prior"]
        rate_prior = (LogNormalRatePrior(float(rate_prior))
                      if isinstance(rate_prior, int | float) else _adopted_copy(rate_prior))
        common = (self._init, cfg["t_max"], cfg["time_prior_loc"], cfg["time_prior_scale"],
                  likelihood, time_prior, rate_prior)
        latent_dim = 0 if kind == "basic" else cfg["latent_dim"]
        if kind == "basic":
            model = BasicModel(*common)
        else:
            options = dict(latent_dim=cfg["latent_dim"], c_prior_scale=cfg["c_prior_scale"],
                           state_prior=_adopted_copy(parts["state_prior"]))
            if self._ancestral:
                # prototypes no training cell has visited for two epochs are dropped
                model = AncestralModel(*common, memory=2 * len(self.data.indices("train")),
                                       **options)
            else:
                model = FullModel(*common, **options)
        chosen = parts["guide"]
        if kind != cfg["model"] or chosen == "amortized":
            guide = AmortizedGuide(self.data.n_genes, cfg["hidden"], cfg["dropout"],
                                   cfg["t_max"], latent_dim=latent_dim)
        elif chosen == "amortized_mvn":
            guide = AmortizedMVNGuide(self.data.n_genes, cfg["hidden"], cfg["dropout"],
                                      cfg["t_max"], latent_dim=latent_dim)
        else:
            guide = adopt_module(chosen)
        if rate_prior is not None:
            guide = CombinedGuide(guide, RateGuide(model))
        return model, guide

    def __repr__(self) -> str:
        state = "trained" if self.is_trained else "not trained"
        return (
            f"VeloVAE(model={self.config['model']!r}, cells={self.data.n_cells}, "
            f"fitted genes={self.data.n_genes}, {state})"
        )

    def _to(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.model.to(self.device)
        self.guide.to(self.device)
        same = self._start_data is self.data
        self.data = self.data.to(self.device)
        self._start_data = self.data if same else self._start_data.to(self.device)

    @property
    def predictor(self) -> Predictor:
        """The fitted pair's :class:`~pyro_velo.predict.Predictor` on the fitted cells."""
        return Predictor(self.model, self.guide, self.data, self.var_names, self.obs_names,
                         self.device)

    def _check_trained(self) -> None:
        if not self.is_trained:
            raise RuntimeError("the model is not trained yet: call .train() first")

    def _cells(self, adata: AnnData | None) -> VelocityData:
        """The fitted cells (``adata`` None) or new cells, scaled with the stored scales.

        See :meth:`~pyro_velo.data.VelocityData.for_new_cells`: ``adata`` needs the
        model's abundance layers and every fitted gene (by name, any order; other genes
        are ignored). Raises :class:`~pyro_velo._checks.InputError` otherwise.
        """
        if adata is None:
            return self.data
        return VelocityData.for_new_cells(
            adata, self.var_names, self.data.fitted, self.data.gene_scale_u,
            self.data.gene_scale_s, self.config["unspliced_layer"],
            self.config["spliced_layer"]).to(self.device)

    def get_latent_time(self, adata: AnnData | None = None, scaled: bool = False) -> np.ndarray:
        """Posterior mean latent time of every cell.

        Parameters
        ----------
        adata
            Cells to infer the time of (out-of-sample inference by the encoder); default
            ``None``: the cells the model was fitted on. It needs the model's layers
            (``unspliced_layer``, ``spliced_layer``, e.g. moments computed on the new
            cells) and every fitted gene, matched by name (extra genes and another gene
            order are fine). The abundances are divided by the fitted data's per-gene
            scales, so a cell gets the same time whether it is encoded with the fitted
            data or on its own. ``adata`` is not modified.
        scaled
            Rescale to ``[0, 1]`` by the minimum and maximum time of the *fitted* cells
            (as exported to ``obs['latent_time']``); new cells outside that range fall
            outside ``[0, 1]``.

        Returns
        -------
        numpy.ndarray
            ``(n_cells,)`` float64 times (of ``adata``'s cells when given).

        Raises
        ------
        InputError
            ``adata`` lacks a layer or a fitted gene (the message names them), or has
            invalid values.
        """
        self._check_trained()
        predictor = self.predictor
        t = predictor.encode(data=self._cells(adata))["t"].cpu().numpy().astype(np.float64)
        if scaled:
            ref = t if adata is None else predictor.encode()["t"].cpu().numpy().astype(
                np.float64)
            t = (t - ref.min()) / max(ref.max() - ref.min(), 1e-12)
        return t

    def get_cell_state(self, adata: AnnData | None = None) -> np.ndarray:
        """Posterior mean cell state c, ``(n_cells, latent_dim)`` (full model).

        ``adata``: new cells to encode instead of the fitted ones (see
        :meth:`get_latent_time`).
        """
        self._check_trained()
        self._require_full("get_cell_state")
        return self.predictor.encode(data=self._cells(adata))["c"].cpu().numpy()

    def get_transcription_rate(self, adata: AnnData | None = None) -> np.ndarray:
        """Relative transcription rate ``rho = g(c)`` of every cell and gene.

        Returns a dense ``(n_cells, n_vars)`` float32 array (NaN for genes not fitted).
        ``adata``: new cells to encode instead of the fitted ones (see
        :meth:`get_latent_time`).
        """
        self._check_trained()
        self._require_full("get_transcription_rate")
        predictor = self.predictor
        return predictor.transcription_rate(predictor.encode(data=self._cells(adata))["c"])

    def _require_full(self, what: str) -> None:
        if self.config["model"] != "full":
            raise RuntimeError(f"{what} needs the full model (model='full'), this is "
                               f"{self.config['model']!r}")

    def get_velocity(self, adata: AnnData | None = None) -> tuple[np.ndarray, np.ndarray]:
        """RNA velocity ``(ds/dt, du/dt)`` at each cell's inferred state.

        For the full model after refinement, each fitted cell's ODE starts from its own
        initial condition. Returns ``(n_cells, n_vars)`` float32 arrays on the scale of
        ``Ms`` and ``Mu``; columns of genes that are not fitted are NaN.

        Parameters
        ----------
        adata
            New cells (see :meth:`get_latent_time`); default the fitted cells. Columns
            follow the model's genes (``self.var_names``), not ``adata``'s. New cells
            have no per-cell initial condition: after refinement they use the
            first-stage ODE (every gene starts from zero at its switch-on time, with the
            cell's own rho).
        """
        self._check_trained()
        return self.predictor.expected_arrays(("ds", "du"), data=self._cells(adata))

    def get_expression_fit(self, adata: AnnData | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
        """Fitted (expected) unspliced and spliced abundances ``(u, s)`` of every cell.

        Returns ``(n_cells, n_vars)`` float32 arrays on the ``Mu`` / ``Ms`` scale (NaN for
        genes not fitted). ``adata``: new cells, as for :meth:`get_velocity`.
        """
        self._check_trained()
        return self.predictor.expected_arrays(("u", "s"), data=self._cells(adata))

    def predict_future(self, delta_t: float, adata: AnnData | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Expected ``(u, s)`` of every cell at ``t + delta_t`` under its own ODE.

        ``delta_t`` is in the model's time units (the time axis has length ``t_max``;
        negative values look back); each cell keeps its cell state (so its ``rho``)
        and, after refinement, its initial condition. ``adata``: new cells, as for
        :meth:`get_velocity` (no per-cell initial condition). Returns
        ``(n_cells, n_vars)`` arrays on the ``Mu`` / ``Ms`` scale.
        """
        self._check_trained()
        delta_t = check_real(delta_t, "delta_t")
        return self.predictor.expected_arrays(("u", "s"), delta_t, self._cells(adata))

    def get_rates(self) -> pd.DataFrame:
        """Per-gene ODE parameters on the data scale (NaN rows for genes not fitted).

        Columns: ``alpha`` (transcription rate, in ``Ms`` units per unit time; the full
        model's cells use ``rho * alpha``), ``beta``, ``gamma`` (splicing and
        degradation rates), ``t_on``, ``t_off`` (switch times on the model's time axis),
        ``scaling`` (``Mu`` per model unspliced unit), ``fitted``; and the likelihood's
        per-gene parameters: ``sigma_u``, ``sigma_s`` (noise standard deviations on the
        ``Mu`` / ``Ms`` scale, Normal likelihood), ``phi_u``, ``phi_s`` (inverse
        dispersions, negative binomial).
        """
        r = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in
             self.model.rates().items()}
        su = self.data.gene_scale_u.cpu().numpy()
        ss = self.data.gene_scale_s.cpu().numpy()
        values = {
            "alpha": r["alpha"] * ss,
            "beta": r["beta"],
            "gamma": r["gamma"],
            "t_on": r["t_on"],
            "t_off": r["t_off"],
            "scaling": r["scale_u"] * su / ss,
        }
        likelihood = self.model.likelihood
        for name, factor in (("sigma_u", su), ("sigma_s", ss), ("phi_u", 1.0), ("phi_s", 1.0)):
            param = getattr(likelihood, f"log_{name}", None)
            if isinstance(param, torch.Tensor) and param.shape == su.shape:
                values[name] = param.detach().cpu().double().exp().numpy() * factor
        frame = pd.DataFrame(np.nan, index=self.var_names, columns=list(values))
        for name, value in values.items():
            frame.loc[self.data.fitted, name] = value
        frame["fitted"] = self.data.fitted
        return frame

    def get_split(self) -> pd.Series:
        """Which split (train / validation / test) each cell belongs to."""
        return pd.Series(pd.Categorical.from_codes(self.data.split, SPLIT_NAMES),
                         index=self.obs_names, name="split")

    # ---- posterior sampling and uncertainty -------------------------------------------
    def sample_posterior(
        self,
        n_samples: int = 100,
        return_sites: Sequence[str] | None = None,
        batch_size: int = 1024,
        seed: int = 0,
        progress_bar: bool = True,
    ) -> dict[str, np.ndarray]:
        """Joint draws from the fitted posterior (the guide) for every cell.

        Parameters
        ----------
        n_samples
            Number of draws.
        return_sites
            Default: the per-cell latent sites (``'t'``, and ``'c'`` for the full model).
            Latent sites (``'t'``, ``'c'``; ``'alpha'``, ``'beta'``, ``'gamma'`` when the
            rates are random) and derived quantities at the drawn values
            (``'velocity'`` = ds/dt and ``'velocity_u'`` = du/dt on the ``Ms`` / ``Mu``
            scale, ``'u'``, ``'s'`` on the model's per-gene scale). Derived arrays have
            ``n_samples x n_cells x fitted genes`` entries: for summaries over many cells
            use :meth:`get_uncertainty`, which never holds them.
        batch_size
            Cells per minibatch.
        seed
            Seeds the draws (reproducible on CPU; reseeds torch and Pyro's global RNG).
        progress_bar
            Show a tqdm bar over the minibatches of cells.

        Returns
        -------
        dict
            Site name to an array of shape ``(n_samples, n_cells, ...)`` for per-cell
            sites and ``(n_samples, fitted genes)`` for rates.
        """
        self._check_trained()
        check_training_arguments(max_epochs=n_samples, batch_size=batch_size)
        return self.predictor.sample_posterior(n_samples, return_sites, batch_size, seed,
                                               progress_bar)

    def get_uncertainty(self, n_samples: int = 100, batch_size: int = 1024, seed: int = 0,
                        progress_bar: bool = True) -> pd.DataFrame:
        """Per-cell posterior uncertainty of time, cell state and velocity (paper, Fig. 8).

        Summaries are accumulated online over ``n_samples`` draws for one minibatch of
        cells at a time (memory ``batch_size x genes``, never samples x cells x genes).

        Columns (also stored in ``self.uncertainty`` and written to ``obs`` with the
        ``pyro_velo_`` prefix by :meth:`export_to_anndata`):

        - ``time_mean``, ``time_std``; ``time_cv`` = ``time_std / |time_mean|`` (time on
          the model's axis ``[0, t_max]``);
        - ``state_cv`` (full model): the multivariate coefficient of variation of c
          (Van Valen 1974), ``sqrt(trace Cov(c) / |E c|^2)``. c has no natural origin
          (its N(0, I) prior places the origin where cells are dense), so this ratio
          also depends on where a cell sits in c-space, not only on its spread;
        - ``rho_cv`` (full model): the same for the transcription rates ``rho = g(c)``
          over the fitted genes: the cell-state uncertainty in what the state means for
          expression, independent of how c is parametrised and relative to a real zero
          (no transcription);
        - ``velocity_cv``: the same for the velocity vector ds/dt over the fitted genes
          (on the ``Ms`` scale): total posterior spread relative to the mean velocity.

        Parameters
        ----------
        n_samples, batch_size, seed
            Draws per cell, cells per minibatch, seed of the draws.
        progress_bar
            Show a tqdm bar over the minibatches of cells.
        """
        self._check_trained()
        check_training_arguments(max_epochs=n_samples, batch_size=batch_size)
        self.uncertainty = self.predictor.uncertainty(n_samples, batch_size, seed,
                                                      progress_bar)
        return self.uncertainty

    def get_rate_uncertainty(self) -> pd.DataFrame:
        """Posterior of the random rates (needs ``rate_prior``): median and 90% interval.

        Columns ``<rate>_median``, ``<rate>_q05``, ``<rate>_q95`` for each random rate
        (``alpha`` on the ``Ms`` scale per unit time, ``beta`` and ``gamma`` per unit
        time); rows are genes (NaN for genes not fitted).
        """
        self._check_trained()
        return self.predictor.rate_uncertainty()

    def get_time_state_correlation(self) -> np.ndarray:
        """Posterior correlation of t with each coordinate of c, ``(n_cells, latent_dim)``.

        Needs ``guide='amortized_mvn'`` (the mean-field guide has none by construction).
        """
        self._check_trained()
        return self.predictor.time_state_correlation()

    # ---- evaluation ------------------------------------------------------------------
    def elbo(self, split: str = "test") -> float:
        """Mean ELBO per cell on one split (higher is better)."""
        self._check_trained()
        return -evaluate_loss(self.model, self.guide, self.data, self.data.indices(split))

    def evaluate(self) -> pd.DataFrame:
        """Reconstruction metrics of the paper's Appendix C on train and held-out test cells.

        Every cell is encoded (test cells were never trained on) and reconstructed at its
        posterior mean latent variables. On the per-gene standardised abundances the
        model fits (each gene divided by its standard deviation, so genes weigh equally):

        - ``mse``, ``mae``: mean squared / absolute error over cells, genes, u and s;
        - ``log_likelihood``: mean over cells of the log-likelihood of the cell's u and s
          (summed over genes) under the fitted noise model.

        Returns
        -------
        pandas.DataFrame
            Rows ``train`` and ``test``; columns ``mse``, ``mae``, ``log_likelihood``.
        """
        self._check_trained()
        predictor = self.predictor
        return pd.DataFrame({split: predictor.reconstruction(split)
                             for split in ("train", "test")}).T

    def mse(self, split: str = "test") -> float:
        """Mean squared error of the fit on one split (see :meth:`evaluate`)."""
        self._check_trained()
        return self.predictor.reconstruction(split)["mse"]

    # ---- AnnData export --------------------------------------------------------------
    def export_to_anndata(self, adata: AnnData, rho: bool | None = None) -> None:
        """Write the fit to ``adata`` (the scVelo / CellRank contract plus our own keys).

        Written keys: ``obs['latent_time']`` (posterior mean time rescaled to [0, 1]),
        ``layers['velocity']`` (ds/dt on the ``Ms`` scale, NaN columns for genes not
        fitted), ``layers['velocity_u']`` (du/dt on the ``Mu`` scale),
        ``var['velocity_genes']`` and ``uns['velocity_params']`` (``mode='pyro_velo'``);
        ours: ``obs['pyro_velo_time']`` (raw posterior mean), ``obs['pyro_velo_time_std']``,
        ``obs['pyro_velo_split']``, ``layers['pyro_velo_u']`` / ``layers['pyro_velo_s']``
        (fitted abundances) and ``var['pyro_velo_<rate>']`` for each column of
        :meth:`get_rates`; after :meth:`get_uncertainty` also ``obs['pyro_velo_time_cv']``,
        ``obs['pyro_velo_state_cv']``, ``obs['pyro_velo_rho_cv']``,
        ``obs['pyro_velo_velocity_cv']``. Full model also:
        ``obsm['pyro_velo_cell_state']`` (posterior mean c) and ``layers['pyro_velo_rho']``
        (rho; by default (``rho=None``) only when the dense float32 array is under 2 GiB;
        ``rho=False`` never). Nothing is written if an error is raised. For data that do
        not fit in memory use :meth:`export_to_h5ad`.
        """
        self._check_trained()
        write_anndata(self, adata, rho)

    def export_to_h5ad(self, path: str | Path, rho: bool | None = None,
                       batch_size: int = 4096, progress_bar: bool = True) -> None:
        """Write the keys of :meth:`export_to_anndata` into an ``.h5ad`` file, in chunks.

        For data streamed from a file (``VeloVAE('atlas.h5ad')``): the cells x genes
        layers are computed and written ``batch_size`` cells at a time, so memory does not
        grow with the number of cells (rho is written when ``rho=True``, or by default
        when it is under 2 GiB). ``path`` must hold the model's cells and genes in the
        same order (typically the file the model was fitted on; the model reads it
        again afterwards). The layers go to temporary datasets first and replace any
        existing ones only when all are written: an error leaves the file as it was.
        """
        self._check_trained()
        write_h5ad(self, path, rho, batch_size, progress_bar)

    # ---- persistence -----------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Save the model to the folder ``path``, so that :meth:`load` predicts identically.

        Two files are written:

        - ``model.pt`` (``torch.save``; readable with ``weights_only=True``): parameters
          and buffers of the model and the guide (encoder, for the full model also the
          decoder, per-gene rates, switch times, scaling, noise and, after refinement,
          every cell's initial condition), the train/validation/test split, cell and
          gene names, the fitted-gene mask, the per-gene scales the data were divided
          by, the training history and whether the model is trained;
        - ``config.json``: the constructor arguments (and refinement settings), the
          package version and ``format_version`` (:data:`FORMAT_VERSION`).

        The data themselves are not saved: :meth:`load` takes the AnnData. Parameters
        are saved on the CPU.

        Parameters
        ----------
        path
            Folder to write (created if missing).
        overwrite
            Replace the files of a folder that is not empty.

        Raises
        ------
        FileExistsError
            ``path`` exists, is not empty and ``overwrite`` is False.
        InputError
            ``path`` exists and is not a folder.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InputError(f"cannot save to {path}: it exists and is not a folder")
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True")
        path.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "guide": {k: v.detach().cpu() for k, v in self.guide.state_dict().items()},
                "split": torch.from_numpy(self.data.split.copy()),
                "fitted": torch.from_numpy(self.data.fitted.copy()),
                "gene_scale_u": self.data.gene_scale_u.detach().cpu(),
                "gene_scale_s": self.data.gene_scale_s.detach().cpu(),
                "obs_names": [str(n) for n in self.obs_names],
                "var_names": [str(n) for n in self.var_names],
                "history": {"train": list(self.history.train),
                            "validation": list(self.history.validation),
                            "stages": [tuple(x) for x in self.history.stages],
                            "best_epoch": self.history.best_epoch,
                            "stopped_early": self.history.stopped_early},
                "is_trained": self.is_trained,
            },
            path / MODEL_FILE,
        )
        config = {**self.config, "version": __version__, "format_version": FORMAT_VERSION}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    @classmethod
    def load(cls, path: str | Path, adata: AnnData | str | Path, **components) -> VeloVAE:
        """Load a model saved by :meth:`save`, for the cells and genes of ``adata``.

        Components passed as objects when the model was built (``likelihood``,
        ``guide``, ``time_prior``, ``state_prior``, ``rate_prior``; recorded in the
        configuration as ``'custom:<class>'``) must be passed again as keyword arguments,
        freshly constructed: their parameters are then restored from the file.

        No training happens: the saved parameters, initial conditions, split and per-gene
        scales are restored, so that every ``get_*`` method returns what it returned
        before saving (bitwise, on the same machine). ``adata`` must have the same cells
        and genes, in the same order, as the data the model was fitted on, with the same
        abundance layers. If its abundances differ from the fitted data's (their
        per-gene scales differ), a warning is given and the stored scales are used.
        ``adata`` is not modified. The model is loaded on the CPU. ``adata`` may be the
        path of an ``.h5ad`` file, as for a model that streams from it.

        Raises
        ------
        MissingFileError
            ``path`` is not a folder or lacks ``config.json`` / ``model.pt`` (also a
            :class:`FileNotFoundError`).
        InputError
            A file is damaged, the format version differs from :data:`FORMAT_VERSION`,
            or ``adata``'s cells, genes or fitted genes differ from the saved ones.
        """
        path = Path(path)
        if not path.is_dir():
            raise MissingFileError(f"no saved VeloVAE at {path}: the folder does not exist")
        for name in (CONFIG_FILE, MODEL_FILE):
            if not (path / name).is_file():
                raise MissingFileError(f"no saved VeloVAE in {path}: {name} is missing")
        try:
            config = json.loads((path / CONFIG_FILE).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{path / CONFIG_FILE} is damaged (not valid JSON): {err}"
                             ) from err
        if not isinstance(config, dict):
            raise InputError(f"{path / CONFIG_FILE} is damaged: expected a JSON object")
        version = config.pop("format_version", None)
        if version != FORMAT_VERSION:
            found = ("has no format version (saved by an older pyro_velo)" if version is None
                     else f"has format version {version!r}")
            raise InputError(f"the model in {path} {found}; this pyro_velo "
                             f"({__version__}) reads format version {FORMAT_VERSION}. "
                             "Refit the model, or load it with the version that saved it.")
        config.pop("version", None)
        try:
            state = torch.load(path / MODEL_FILE, map_location="cpu", weights_only=True)
        except Exception as err:  # zip/pickle errors of many types for a damaged file
            raise InputError(f"{path / MODEL_FILE} is damaged and cannot be read: {err}"
                             ) from err
        required = ("model", "guide", "split", "fitted", "gene_scale_u", "gene_scale_s",
                    "obs_names", "var_names", "history", "is_trained")
        missing = [k for k in required if not isinstance(state, dict) or k not in state]
        if missing:
            raise InputError(f"{path / MODEL_FILE} is damaged: it lacks {', '.join(missing)}")
        obs_names, var_names = ((adata.obs_names, adata.var_names)
                                if isinstance(adata, AnnData)
                                else (frame.index for frame in read_annotations(adata)))
        for what, names, saved in (("cells (obs_names)", obs_names, state["obs_names"]),
                                   ("genes (var_names)", var_names, state["var_names"])):
            if [str(n) for n in names] != saved:
                raise InputError(
                    f"adata's {what} differ from those the model in {path} was saved with "
                    f"({len(names)} in adata, {len(saved)} saved; same names in the same "
                    "order are needed). For other cells use get_latent_time(adata) etc.")
        unknown = sorted(set(components) - set(COMPONENTS))
        if unknown:
            raise InputError(f"unknown component(s) {unknown}; load accepts {COMPONENTS}")
        needed = [name for name in COMPONENTS if isinstance(config.get(name), str)
                  and config[name].startswith(CUSTOM) and name not in components]
        if needed:
            raise InputError(
                f"the model in {path} was built with custom {', '.join(needed)} "
                f"({', '.join(config[n] for n in needed)}): pass them again, e.g. "
                f"VeloVAE.load(path, adata, {needed[0]}=...)")
        config.update(components)
        hidden = config.pop("hidden")
        split_fractions = tuple(config.pop("split_fractions"))
        records = {k: config.pop(k) for k in TRAINING_RECORDS if k in config}
        split = state["split"].numpy()
        vae = cls(adata, hidden=tuple(hidden), split_fractions=split_fractions,
                  _split=split, **config)
        vae.config.update(records)
        fitted = state["fitted"].numpy()
        if not np.array_equal(vae.data.fitted, fitted):
            raise InputError(
                f"adata's abundances differ from the data the model in {path} was fitted on: "
                f"{int(fitted.sum())} genes were fitted, {int(vae.data.fitted.sum())} genes "
                "of adata vary (different layers or preprocessing?)")
        scales = (state["gene_scale_u"], state["gene_scale_s"])
        if not (torch.equal(vae.data.gene_scale_u, scales[0])
                and torch.equal(vae.data.gene_scale_s, scales[1])):
            warnings.warn(
                "adata's abundances differ from the data the model was fitted on (their "
                "per-gene scales differ); they are divided by the stored scales",
                stacklevel=2)
            if isinstance(vae.data, DiskVelocityData):
                data = DiskVelocityData(adata, *vae.data.layers, fitted, split, *scales)
            else:
                data = VelocityData.for_new_cells(adata, vae.var_names, fitted, *scales,
                                                  config["unspliced_layer"],
                                                  config["spliced_layer"])
                data.split = split.astype(np.int8)
                data.counts = vae.data.counts  # raw counts of a count likelihood: unscaled
            vae.data = data
        vae.model.load_state_dict(state["model"])
        vae.guide.load_state_dict(state["guide"])
        history = state["history"]
        vae.history = TrainingHistory(
            train=list(history["train"]), validation=list(history["validation"]),
            stages=[tuple(x) for x in history["stages"]], best_epoch=history["best_epoch"],
            stopped_early=history["stopped_early"])
        vae.is_trained = bool(state["is_trained"])
        vae.model.eval()
        vae.guide.eval()
        return vae


def _describe(value) -> object:
    """JSON-able record of a component: names and numbers as they are, objects by class."""
    if value is None or isinstance(value, str | int | float):
        return value
    return CUSTOM + type(value).__name__


def _adopted_copy(component):
    """A private copy of a user's component, ready to join our modules."""
    component = copy.deepcopy(component)
    return adopt_module(component) if isinstance(component, torch.nn.Module) else component
