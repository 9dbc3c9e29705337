"""The user-facing model class :class:`VeloVAE`: set up, train, query, export, save, load.

It holds the data, the configuration and the fitted (model, guide) pair, and delegates:
the pieces are checked and built by :mod:`pyro_velo.components`, trained by the stages
of :mod:`pyro_velo.inference`, read by a :class:`~pyro_velo.predict.Predictor`, written
by :mod:`pyro_velo.export` and saved by :mod:`pyro_velo.persist`.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from . import policies
from ._checks import InputError, check_int, check_real
from ._params import set_seed
from ._threads import cpu_threads
from .capture import capture_time_axis, capture_times_from_obs
from .components import (
    GUIDES,
    RATE_HISTORIES,
    build_pair,
    check_components,
    check_settings,
    describe,
    model_kind,
)
from .data import SPLIT_NAMES, VelocityData
from .disk import DiskVelocityData, read_annotations
from .distributed import current_group
from .export import write_anndata, write_h5ad
from .inference.callbacks import Callback
from .inference.checkpoint import Checkpointer
from .inference.loop import TrainingHistory, check_training_arguments, evaluate_loss, fit
from .inference.refine import Refine, refine
from .inference.restarts import best_of_starts
from .inference.stages import (
    AncestorsStage,
    BasicStage,
    FullStage,
    Run,
    Stage,
    run_stages,
    speed_settings,
)
from .inference.threads import ThreadGovernor
from .inference.warmup import WarmUp, cell_graph
from .initialize import steady_state_init
from .likelihoods import Likelihood, make_likelihood
from .model import BasicModel
from .orientation import (
    FlowEvidence,
    direction_source,
    flow_evidence,
    root_mask,
    warn_if_unidentified,
)
from .persist import FORMAT_VERSION as FORMAT_VERSION  # re-exported: the saved layout
from .persist import load, save
from .predict import Predictor
from .priors import LogNormalRatePrior, default_time_scale

#: cells (whole blocks, from all splits) a model fitted from a file is warmed up and
#: initialised on; in memory all cells are used
START_SAMPLE_CELLS = 20_000


class VeloVAE:
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
        rates with switch-on and switch-off times (paper section 3.3); faster. Or your
        own model: a subclass of :class:`~pyro_velo.model.FullModel` (a full model) or
        :class:`~pyro_velo.model.BasicModel` (a basic one), built with the arguments of
        ours (steady-state initialisation, ``t_max``, time-prior settings and the
        components below), or an instance of one, used as built (a copy). Per-gene
        parameters it adds are trained at ``lr_ode`` when its ``ode_parameters()`` lists
        them, and exported by :meth:`get_rates` when its ``gene_parameters()`` does.
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
        It gives better velocities of genes whose rate rises in steps, for up to 2x the
        training time (``benchmarks/rate_history.py``).
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
        model: str | type[BasicModel] | BasicModel = "full",
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
        model, custom_model = model_kind(model)
        if rate_history not in RATE_HISTORIES:
            raise InputError(f"unknown rate_history {rate_history!r}; choose one of "
                             f"{RATE_HISTORIES}")
        if rate_history != "constant" and model != "full":
            raise InputError(f"rate_history={rate_history!r} applies to model='full'")
        check_settings(t_max=t_max, time_prior_loc=time_prior_loc,
                             time_prior_scale=time_prior_scale, hidden=hidden,
                             dropout=dropout, latent_dim=latent_dim,
                             c_prior_scale=c_prior_scale,
                             capture_time_scale=capture_time_scale, seed=seed)
        components = check_components(model, likelihood, guide, time_prior, state_prior,
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
            **{name: describe(value) for name, value in components.items()},
            "capture_time_key": capture_time_key,
            "capture_time_mapping": capture_time_mapping,
            "capture_time_scale": capture_time_scale,
            "split_fractions": list(split_fractions),
            "seed": int(seed),
        }
        if custom_model is not None:
            self.config["model_class"] = describe(custom_model)
            components["model"] = custom_model
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
        self._obs = adata.obs  # a reference: train(root_key=...) reads the root cells
        self._root: np.ndarray | None = None
        self._evidence: FlowEvidence | None = None  # the data's own flow, once needed
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
        self.model, self.guide = self.make_pair(model)
        self.history = TrainingHistory()
        self.is_trained = False
        #: per-cell posterior uncertainty from :meth:`get_uncertainty` (None until then)
        self.uncertainty: pd.DataFrame | None = None
        self.device = torch.device("cpu")

    @property
    def _ancestral(self) -> bool:
        """Whether the full model takes each cell's past rates from its ancestors."""
        return self.config.get("rate_history") == "ancestors"  # absent in older saves

    def _likelihood_template(self) -> Likelihood:
        return make_likelihood(self._components["likelihood"])

    def make_pair(self, kind: str):
        """A fresh (model, guide) of ``kind`` from the steady-state initialisation (see
        :func:`~pyro_velo.components.build_pair`)."""
        return build_pair(kind, self.config, self._components, self._init, self.data,
                          self.capture_times)

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
        dispersions, negative binomial): see the model's and the likelihood's
        ``gene_parameters()``.
        """
        values = self.model.gene_parameters(self.data.gene_scale_u.cpu().numpy(),
                                            self.data.gene_scale_s.cpu().numpy())
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

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 2e-4,
        lr_ode: float = 1e-2,
        seed: int = 0,
        device: str = "cpu",
        early_stopping: bool = True,
        patience: int = 30,
        warmup_epochs: int | None = None,
        basic_epochs: int | None = None,
        refine_epochs: int | None = None,
        progress_bar: bool = True,
        num_threads: int | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 10,
        resume: bool = False,
        distributed: bool | None = None,
        compile: bool | None = None,
        bf16: bool | None = None,
        n_starts: int = 1,
        callbacks: Sequence[Callback] = (),
        root_key: str | None = None,
        root: str | Sequence[str] | None = None,
    ) -> TrainingHistory:
        """Fit by minibatch SVI with early stopping on the validation ELBO.

        Stages (recorded in ``history.stages``):

        1. ``warm-up``: encoder and rates from the steady-state initialisation (with
           capture times: rates fitted to them); if the warm-up's order disagrees with a
           diffusion pseudotime, a second warm-up from the pseudotime competes on the
           validation ELBO (see :class:`~pyro_velo.inference.warmup.WarmUp`). Then
           every gene's switch times and rate are re-initialised by a grid search given
           the warm-up's cell times (:func:`~pyro_velo.initialize.time_informed_init`),
           in the direction of time the splicing kinetics support
           (:func:`~pyro_velo.initialize.direction_score`).
        2. ``basic``: the basic model until the validation ELBO stops improving.
        3. ``full`` (full model only): the mixture of ODEs, initialised from the basic fit
           (same rates and time encoder, ``rho`` near 1), trained jointly with c. With
           ``rate_history='ancestors'`` too: the paper's one rate per cell.
        4. ``refine`` (full model only, ``refine_epochs > 0``): initial-condition
           refinement, see :meth:`refine_initial_conditions`. With
           ``rate_history='ancestors'`` instead ``ancestors``: the fit continues, every
           parameter trained, with the ancestors' rates
           (:class:`~pyro_velo.model.AncestralModel`).

        The direction of time is checked against a velocity field built from the data
        alone (:mod:`pyro_velo.orientation`): it can pick the warm-up's start, and the
        mixture of ODEs is refitted with the basic fit's time held where it loses the
        basic fit's order; :meth:`direction` reports the verdict. A root or capture
        times set the direction instead.

        The stages are the list :meth:`schedule` returns (objects of
        :mod:`pyro_velo.inference.stages`), run and checkpointed by
        :func:`~pyro_velo.inference.stages.run_stages`.

        Parameters
        ----------
        max_epochs
            Upper bound on epochs of each stage after warm-up; default scales with data
            size: ``clip(400_000 / n_cells, 100, 1000)`` up to 100k cells, then
            ``max(10, 10^7 / n_cells)`` (so 100 epochs at 100k cells, 10 at 1M).
        batch_size, lr, lr_ode
            Minibatch size, learning rate of the networks (paper: 2e-4) and of the
            per-gene ODE parameters.
        seed
            Seeds minibatch order and sampling: the same seed gives the same fit on CPU.
        device
            ``'cpu'`` or ``'cuda'``.
        early_stopping, patience
            Stop after ``patience`` epochs without validation improvement and keep the
            best parameters.
        warmup_epochs
            Epochs before the re-initialisation (default ``max(20, max_epochs // 10)``,
            see :class:`~pyro_velo.policies.EpochPolicy`; 0 skips the warm-up and the
            re-initialisation).
        basic_epochs
            Upper bound on epochs of the ``basic`` stage (default ``max_epochs``). For
            the full model this stage is the start of the mixture of ODEs; shortening
            it saves time but costs accuracy: with ``max_epochs // 4`` on the 2-branch
            test simulation the correlation of predicted displacement with the true
            velocity fell below 0.7 (0.63).
        refine_epochs
            Epochs of the initial-condition refinement (full model; default
            ``max_epochs // 4``; 0 skips it); with ``rate_history='ancestors'``, upper
            bound on the epochs of the ``ancestors`` stage (default ``max_epochs``; 0
            skips it and leaves the paper's model).
        progress_bar
            Show progress: live bars in a terminal or notebook, one line per stage in a
            log (see :class:`~pyro_velo.inference.callbacks.Progress` and
            ``pyro_velo.settings.verbosity``).
        num_threads
            CPU threads torch may use while training (torch's count is restored
            afterwards). ``None`` (default): up to torch's own count
            (``torch.set_num_threads``, ``OMP_NUM_THREADS``, else one per core), and
            fewer while other processes keep cores busy: the count follows the
            machine's load (:mod:`pyro_velo.inference.threads`), because OpenMP
            threads that share a core with another busy process wait for each other
            (measured on two cores beside one busy process: 275 s on two fixed
            threads, 12 s on one, 12 s idle). A number fixes the count.
        checkpoint_dir
            Folder for a training checkpoint (``checkpoint.pt``, rewritten atomically),
            written every ``checkpoint_every`` epochs (counted over all stages) and at the
            end of every stage. It holds everything needed to continue: the parameters
            and buffers of every model and guide in use (for the full model also the
            first-stage basic pair), the Adam optimiser state (moments and step counts),
            the minibatch-order generator, the torch / numpy / Python random states, the
            early-stopping state (best loss, best parameters, epochs since the best),
            the history, the stage and epoch reached and the configuration. Without
            ``resume`` the folder must not hold a checkpoint already.
        checkpoint_every
            Epochs between checkpoints inside a stage.
        resume
            Continue the run whose checkpoint is in ``checkpoint_dir`` (e.g. after a crash,
            in a new process with a new ``VeloVAE`` built with the same arguments, or on
            this object after an interruption). Pass the same training arguments as the
            interrupted call (``progress_bar``, ``device``, ``num_threads``, ``compile``,
            ``bf16`` and ``checkpoint_every`` may differ); on CPU with the same
            ``compile`` and ``bf16`` the result is then bitwise the same as an
            uninterrupted run. The history is restored and continues from the
            checkpoint's epoch. The warm-up and the
            refinement are not checkpointed inside: a run interrupted during the warm-up
            restarts it, one interrupted during the refinement restarts the refinement
            from the end of the ``full`` stage. The ``ancestors`` stage
            (``rate_history='ancestors'``) is checkpointed inside, table included.
            Resuming a finished run restores its final state without training.
        distributed
            Data-parallel training over the default process group (every stage; see
            :func:`pyro_velo.inference.loop.fit` and :mod:`pyro_velo.distributed`). None
            (default): used whenever a group of two or more processes is initialised,
            so every process must call ``train`` with the same arguments; ``False``:
            this process trains alone even inside a group (e.g. one fit per rank), and
            writes its own checkpoints; ``True``: requires a group.
        compile
            Evaluate the ODE solution of training steps through ``torch.compile``
            (fused kernels; the same values up to float rounding). Compiling takes 7-10 s
            on two CPU cores (about 2 s when torch's on-disk cache holds the graphs) and
            then saves about 20% of every epoch at the pancreas size. ``None``
            (default): compile on CPU when a stage's work, training cells x genes x
            ``max_epochs``, reaches :attr:`pyro_velo.policies.CompilePolicy.min_work`
            (where the time saved exceeds the compile time); ``True`` / ``False``:
            always / never. If compiling fails (e.g. no C++ compiler) a warning says
            so and training goes on uncompiled.
        bf16
            Run the products of the two layers that touch every gene (the encoder's input
            layer and the decoder's output layer, most of the networks' arithmetic) in
            bfloat16 during training steps on the CPU (:class:`~pyro_velo.nn.WideLinear`;
            float32 parameters, optimiser and accumulation; validation and every result
            in float32). ``None`` (default): on when ``compile``'s work rule holds and
            the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX; see
            :func:`~pyro_velo.nn.bf16_supported`); ``True`` / ``False``: always / never
            (``True`` is slow on a CPU without native bfloat16). At the pancreas size on
            an AMD EPYC with AVX512-BF16 it saved 10-20% of an epoch, with the same
            latent time, velocity and test MSE.
        n_starts
            Independent trainings from different random starts; the one with the
            highest validation ELBO is kept (see
            :func:`~pyro_velo.inference.restarts.best_of_starts`). Start ``k``
            initialises the networks with seed ``self.config['seed'] + k`` and trains
            with ``seed + k``; start 0 is the fit ``n_starts=1`` gives. The ELBO of the
            mixture of ODEs has local optima (on bifurcations, e.g., branches fitted on
            different clocks); on simulations the fits in such an optimum had the lower
            validation ELBO, while among the other fits the ELBO did not rank the
            velocity. Costs ``n_starts``
            trainings. If a start fails or is interrupted, the best finished start is
            kept before the error propagates. Not combined with ``checkpoint_dir`` or
            distributed training, and only for a model not trained yet.
        root_key, root
            The cells the trajectory starts from: those whose ``obs[root_key]`` is
            ``root`` (a label or a list of labels). Training then starts from a
            diffusion pseudotime rooted at them, and the direction of time is theirs,
            never the heuristics' (see :meth:`direction`). Not with capture times,
            which set the direction already.
        callbacks
            Further :class:`~pyro_velo.inference.callbacks.Callback` s, called by the
            training loop of every stage (e.g. a
            :class:`~pyro_velo.inference.callbacks.Timer`).

        Returns
        -------
        TrainingHistory
            Per-epoch train and validation loss (negative ELBO per cell), also in
            ``self.history`` (of the start kept, with ``n_starts > 1``).

        Raises
        ------
        InputError
            Invalid arguments; ``resume`` with a checkpoint of another model, split or
            set of arguments; a checkpoint already in ``checkpoint_dir`` without
            ``resume``.
        MissingFileError
            ``resume`` but ``checkpoint_dir`` holds no checkpoint.
        DivergenceError
            The loss, a gradient or a parameter became NaN/inf (see
            :func:`pyro_velo.inference.loop.fit`).
        """
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("device='cuda' was requested but CUDA is not available")
        if distributed not in (None, True, False):
            raise InputError(f"distributed must be None, True or False, got {distributed!r}")
        if distributed:
            current_group(True)  # RuntimeError now, before anything changes
        if compile not in (None, True, False):
            raise InputError(f"compile must be None, True or False, got {compile!r}")
        if bf16 not in (None, True, False):
            raise InputError(f"bf16 must be None, True or False, got {bf16!r}")
        check_training_arguments(
            max_epochs=max_epochs, batch_size=batch_size, lr=lr, lr_ode=lr_ode,
            patience=patience, warmup_epochs=warmup_epochs, basic_epochs=basic_epochs,
            refine_epochs=refine_epochs, checkpoint_every=checkpoint_every,
            num_threads=num_threads)
        check_int(n_starts, "n_starts", minimum=1)
        self._root = root_mask(self._obs, root_key, root, self.capture_times is not None)
        if n_starts > 1:
            if checkpoint_dir is not None or resume:
                raise InputError("n_starts > 1 cannot be combined with checkpoint_dir or "
                                 "resume; checkpoint single starts (n_starts=1)")
            if current_group(distributed) is not None:
                raise InputError("n_starts > 1 is not available with distributed training; "
                                 "run the starts as separate fits")
            if self.is_trained:
                raise InputError("n_starts > 1 needs a model that is not trained yet")
            return best_of_starts(self, n_starts, seed, dict(
                max_epochs=max_epochs, batch_size=batch_size, lr=lr, lr_ode=lr_ode,
                device=device, early_stopping=early_stopping, patience=patience,
                warmup_epochs=warmup_epochs, basic_epochs=basic_epochs,
                refine_epochs=refine_epochs, progress_bar=progress_bar,
                num_threads=num_threads, distributed=distributed, compile=compile,
                bf16=bf16, callbacks=callbacks, root_key=root_key, root=root))
        epochs = policies.EPOCHS
        if max_epochs is None:
            max_epochs = epochs.max_epochs(self.data.n_cells)
        if warmup_epochs is None:
            warmup_epochs = epochs.warmup_epochs(max_epochs)
        if refine_epochs is None:
            refine_epochs = max_epochs if self._ancestral else epochs.refine_epochs(max_epochs)
        if basic_epochs is None:
            basic_epochs = max_epochs
        # validate the checkpoint folder before anything changes
        checkpointer = Checkpointer(
            checkpoint_dir, checkpoint_every,
            header={"config": copy.deepcopy(self.config),
                    "split": torch.from_numpy(self.data.split.copy()),
                    "fitted": torch.from_numpy(self.data.fitted.copy())},
            run=dict(max_epochs=max_epochs, batch_size=batch_size, lr=lr, lr_ode=lr_ode,
                     seed=seed, early_stopping=early_stopping, patience=patience,
                     warmup_epochs=warmup_epochs, basic_epochs=basic_epochs,
                     refine_epochs=refine_epochs),
            distributed=distributed)
        checkpointer.start(resume)
        self._to(device)
        set_seed(seed)
        large = policies.COMPILE.worth_it(len(self.data.indices("train")), self.data.n_genes,
                                          max_epochs, self.device.type)
        compile = large if compile is None else compile
        bf16 = policies.COMPILE.bf16(large) if bf16 is None else bf16
        # on the CPU without a thread count, the threads follow the machine's load
        governed = num_threads is None and self.device.type == "cpu"
        run = Run(self.history, self.config, dict(
            batch_size=batch_size, lr=lr, lr_ode=lr_ode, progress_bar=progress_bar,
            patience=patience, distributed=distributed), early_stopping,
            [*callbacks, *([ThreadGovernor()] if governed else [])])
        with cpu_threads(num_threads if self.device.type == "cpu" else None):
            if self.config["model"] == "full":
                basic_model, basic_guide = self.make_pair("basic")
                basic_model.to(self.device)
                basic_guide.to(self.device)
                modules = {"model": self.model, "guide": self.guide,
                           "basic_model": basic_model, "basic_guide": basic_guide}
            else:
                basic_model, basic_guide = self.model, self.guide
                modules = {"model": self.model, "guide": self.guide}
            # a resumed run's modules, config, history and random states
            checkpointer.restore(modules, self.config, self.history)
            if not checkpointer.finished:
                stages = self.schedule(basic_model, basic_guide, max_epochs, warmup_epochs,
                                       basic_epochs, refine_epochs)
                with speed_settings(list(modules.values()), bool(compile), bool(bf16)):
                    run_stages(stages, run, checkpointer,
                               on_model_ready=lambda: setattr(self, "is_trained", True))
        self.is_trained = True
        self._record_direction()
        return self.history

    def _direction_given(self) -> str | None:
        return direction_source(self.capture_times, self._root)

    def _flow_evidence(self) -> FlowEvidence | None:
        """The data's own flow over the cells training starts from (None under 20 cells);
        computed once: it depends on the data only."""
        start = self._start_data
        if self._evidence is None and start.n_cells >= 20:
            graph = cell_graph(start, self._graph if start is self.data else None,
                               self.config["seed"])
            self._evidence = flow_evidence(start.u.cpu().numpy(), start.s.cpu().numpy(),
                                           graph, seed=self.config["seed"])
        return self._evidence

    def _record_direction(self) -> None:
        """``config['direction']``: how the fitted time agrees with the data's own flow
        (see :meth:`direction`); warns where the data do not identify the direction."""
        evidence = self._flow_evidence()
        t = (self.predictor.encode(data=self._start_data)["t"].cpu().numpy()
             if evidence is not None else None)
        self.config["direction"] = policies.ORIENTATION.report(evidence, t,
                                                               self._direction_given())
        warn_if_unidentified(self.config["direction"])

    def direction(self) -> dict:
        """Whether the data identify the direction of the fitted time, and how.

        Returns
        -------
        dict
            ``status``: ``'given'`` (a root or capture times set it; ``given_by`` says
            which), ``'forward'`` (the time agrees with a reproducible velocity field
            built from the data alone), ``'reversed'`` (it runs against that field) or
            ``'not identified'`` (the field is too weak or too noisy to tell; then give
            a root, ``train(root_key=..., root=...)``, or capture times);
            ``flow_agreement``: Spearman correlation of the latent time with the
            field's potential; ``flow_reproducibility``: agreement of the potentials of
            two halves of the genes (:mod:`pyro_velo.orientation`). Exported as
            ``uns['velocity_params']['direction']``.
        """
        self._check_trained()
        return dict(self.config.get("direction", {}))

    def schedule(self, basic_model, basic_guide, max_epochs: int, warmup_epochs: int,
                 basic_epochs: int, refine_epochs: int) -> list[Stage]:
        """The stages :meth:`train` runs, in order (see :mod:`pyro_velo.inference.stages`).

        ``basic_model``, ``basic_guide``: the basic pair of the first stages (for the
        basic model, the model itself). A subclass may insert its own
        :class:`~pyro_velo.inference.stages.Stage` objects, e.g. after the warm-up.
        """
        stages: list[Stage] = []
        if warmup_epochs > 0:
            start = self._start_data
            stages.append(WarmUp(
                basic_model, basic_guide, start, warmup_epochs, t_max=self.config["t_max"],
                seed=self.config["seed"], capture_times=self._on_start_data(self.capture_times),
                graph=self._graph if start is self.data else None,
                root=self._on_start_data(self._root),
                evidence=None if self._direction_given() else self._flow_evidence()))
        stages.append(BasicStage(basic_model, basic_guide, self.data, basic_epochs))
        if self.config["model"] != "full":
            return stages
        stages.append(FullStage(
            self.model, self.guide, self.data, max_epochs, basic_model, basic_guide,
            without_ancestors=self._ancestral, evidence_data=self._start_data,
            evidence=None if self.capture_times is not None else self._flow_evidence()))
        if refine_epochs > 0:
            last = AncestorsStage if self._ancestral else Refine
            stages.append(last(self.model, self.guide, self.data, refine_epochs))
        return stages

    def _on_start_data(self, values):
        """Per-cell ``values`` (a tensor or an array) of ``self.data`` restricted to the
        cells of ``_start_data``."""
        ids = getattr(self._start_data, "cell_ids", None)
        if values is None or ids is None:
            return values
        return values[ids.to(values.device) if torch.is_tensor(values) else ids.cpu().numpy()]

    def refine_initial_conditions(
        self,
        epochs: int = 100,
        delta1: float | None = None,
        delta2: float | None = None,
        n_clusters: int = 10,
        source: str = "fitted",
        require_improvement: bool = True,
        **fit_options,
    ) -> TrainingHistory:
        """Initial-condition refinement of the full model (paper, "Initial Conditions").

        Each cell gets an initial state ``(u0, s0)`` at ``t0 = t - (delta1 + delta2)/2``:
        the mean state of the training cells in the preceding window
        ``[t - delta1, t - delta2]`` within the cell's cell-state cluster
        (:func:`~pyro_velo.initialize.window_table`; vectorised, no per-cell neighbour
        search; the training cells are streamed in minibatches and only a (cluster,
        time bin) table is kept, so memory does not grow with cells x genes). Cells
        whose window holds no training cell of their cluster (at the start of time, or
        where the cluster is sparse, e.g. just past a branch point) keep the zero
        initial state at their genes' switch-on times. The ODE parameters and the
        decoder are then fine-tuned with every cell's t and c held at their posterior
        means.

        By default (``require_improvement=True``) the refinement is kept only if it
        raises the reconstruction log-likelihood of the validation cells (see
        :meth:`~pyro_velo.VeloVAE.evaluate`); otherwise the model is restored to its
        state before the call, with a warning (noisy or sparse data can make the window
        means a worse start than the first-stage model). While the fine-tuning runs,
        that log-likelihood is checked every few epochs and the fine-tuning ends once the
        refinement cannot catch up with the first stage by its last epoch (see
        :class:`~pyro_velo.inference.refine.RefinementCutoff`): rejected refinements
        cost a fraction of ``epochs``.

        Parameters
        ----------
        epochs
            Fine-tuning epochs (early stopping on the validation loss applies).
        delta1, delta2
            Window before each cell, in the model's time units; default 3% and 0.5% of
            the span of the inferred times (on simulations, a window of 10% / 2% gave a
            worse start than the first-stage fit: the window mean drifts from the cell).
        n_clusters
            k-means clusters of c defining "close in cell state".
        source
            What is averaged over the window: ``'fitted'`` (default) the first-stage
            model's expected (u, s) of those cells, or ``'observed'`` their observed
            (u, s) as in the paper. Observation noise in the window mean turns into
            spurious velocity (e.g. on genes at steady state); on the 2-branch simulation
            of ``benchmarks/full_vs_basic.py`` the mean velocity cosine after refinement
            was 0.666 with ``'observed'`` and 0.787 with ``'fitted'``.
        require_improvement
            Keep the refinement only if it raises the validation log-likelihood (see
            above). ``False`` always keeps it, as the paper does, and never ends the
            fine-tuning for lack of a gain (early stopping on the validation loss still
            applies); with :meth:`train`, pass ``refine_epochs=0`` and call this method
            after it. The rule is a safeguard, not a velocity criterion. On the 2-branch
            simulation with ``pp.preprocess(size_factors='neighbourhood')``, refinements
            kept by force lowered the held-out log-likelihood by 4-13 nats per cell at
            all 6 seeds, yet raised the velocity cosine at 5 of them (mean +0.035); on
            3 branches they lowered both the log-likelihood and the cosine (-0.01 to
            -0.10).
        fit_options
            Passed to :func:`pyro_velo.inference.loop.fit` (``lr``, ``lr_ode``,
            ``batch_size``...).
        """
        self._check_trained()
        if self.config["model"] != "full":
            raise RuntimeError("initial-condition refinement applies to the full model only")
        if self._ancestral:
            raise RuntimeError("initial-condition refinement does not apply to "
                               "rate_history='ancestors': each cell's past comes from its "
                               "ancestors")
        # reject unknown options before anything changes
        allowed = set(inspect.signature(fit).parameters) - {"model", "guide", "data",
                                                              "max_epochs"}
        unknown = sorted(set(fit_options) - allowed)
        if unknown:
            raise InputError(f"unknown option(s) {unknown} for refine_initial_conditions; "
                             f"accepted: {sorted(allowed)}")
        if source not in ("fitted", "observed"):
            raise InputError(f"source must be 'fitted' or 'observed', got {source!r}")
        if not isinstance(require_improvement, bool):
            raise InputError("require_improvement must be True or False, got "
                             f"{require_improvement!r}")
        return refine(Run(self.history, self.config), self.model, self.guide, self.data,
                      epochs, delta1, delta2, n_clusters, source, require_improvement,
                      **fit_options)

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
          package version and ``format_version`` (:data:`~pyro_velo.persist.FORMAT_VERSION`).

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
        save(self, path, overwrite)

    @classmethod
    def load(cls, path: str | Path, adata: AnnData | str | Path, **components) -> VeloVAE:
        """Load a model saved by :meth:`save`, for the cells and genes of ``adata``.

        Components passed as objects when the model was built (``model`` as a class or
        instance, ``likelihood``, ``guide``, ``time_prior``, ``state_prior``,
        ``rate_prior``; recorded in the configuration as ``'custom:<class>'``) must be
        passed again as keyword arguments, freshly constructed: their parameters are
        then restored from the file.

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
            A file is damaged, the format version differs from
            :data:`~pyro_velo.persist.FORMAT_VERSION`, or ``adata``'s cells, genes or
            fitted genes differ from the saved ones.
        """
        return load(cls, path, adata, components)
