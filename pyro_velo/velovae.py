"""The user-facing model class :class:`VeloVAE`: set up, train, query, export, save, load.

It holds the data, the configuration and the fitted (model, guide) pair; the pieces are
built by :mod:`pyro_velo.components`, trained by :mod:`pyro_velo.inference.plan`, read by
a :class:`~pyro_velo.predict.Predictor`, written by :mod:`pyro_velo.export` and saved by
:mod:`pyro_velo.persist`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from ._checks import check_real
from ._params import set_seed
from .capture import capture_time_prior
from .components import GUIDES, build_pair, configure
from .data import SPLIT_NAMES
from .disk import read_cells
from .export import write_anndata, write_h5ad
from .inference.callbacks import Callback
from .inference.loop import TrainingHistory, evaluate_loss
from .inference.plan import StartCells, TrainingPlan, default_schedule
from .inference.refine import refine
from .inference.stages import Run, Stage
from .initialize import steady_state_init
from .likelihoods import Likelihood, make_likelihood
from .model import BasicModel
from .persist import FORMAT_VERSION as FORMAT_VERSION  # re-exported: the saved layout
from .persist import load, save
from .predict import Predictor
from .priors import LogNormalRatePrior


class VeloVAE:
    """Variational mixture of ODEs for RNA velocity (Gu et al., VeloVAE), in Pyro.

    Parameters
    ----------
    adata
        Preprocessed AnnData (:func:`pyro_velo.pp.preprocess`; moments in
        ``layers['Mu']`` / ``['Ms']``), or the path of such an ``.h5ad`` file to stream
        from (:mod:`pyro_velo.disk`). Not modified.
    model
        ``'full'`` (default): the mixture of ODEs (paper section 3.4), a cell state c
        per cell and a decoder giving each cell and gene its relative transcription rate
        rho; ``'basic'``: one time per cell, per-gene rates and switch times (section
        3.3), faster; or a model class or instance (:func:`~pyro_velo.components.build_pair`).
    unspliced_layer, spliced_layer, t_max
        Layers of the unspliced / spliced abundances; length of the time axis (time is
        exported rescaled to ``[0, 1]``).
    time_prior_loc, time_prior_scale
        Mean and standard deviation of the Normal time prior (``t_max/2``, ``t_max/4``).
    hidden, dropout, latent_dim, c_prior_scale
        Encoder layers (paper: ``(500, 250)``), dropout, dimension of c and standard
        deviation of its Normal prior (paper: 5 and 1).
    rate_history
        ``'constant'`` (default, the paper's: a cell transcribes at ``rho(c) * alpha``
        since a gene's switch-on) or ``'ancestors'``: each earlier time bin at its
        ancestors' rate (:class:`~pyro_velo.model.AncestralModel`), for genes whose rate
        rises in steps, at up to twice the training time.
    likelihood, guide
        ``'normal'`` (default; on ``Mu``/``Ms``), ``'poisson'`` or ``'nb'`` (raw counts)
        or a :class:`~pyro_velo.likelihoods.Likelihood`; ``'amortized'`` (default;
        mean-field t and c), ``'amortized_mvn'`` (their full covariance per cell) or a
        guide object (:class:`~pyro_velo.guides.AmortizedGuide`).
    time_prior, state_prior, rate_prior
        Priors of t and c: callables from cell indices to a distribution
        (:mod:`pyro_velo.priors`). Rates: None (point rates), a number (log-scale
        standard deviation of LogNormal priors on alpha, beta, gamma) or a
        :class:`~pyro_velo.priors.LogNormalRatePrior`.
    capture_time_key, capture_time_mapping, capture_time_scale
        ``obs`` column of capture times (numbers or labels such as ``'E12.5'``), an
        explicit label-to-number map, and the prior's standard deviation (default: their
        spacing). Each cell's time prior is then centred on its capture time mapped onto
        ``[0.1, 0.9] t_max`` (:mod:`pyro_velo.capture`; paper section 4.2).
    split_fractions, seed
        Fractions of train, validation (early stopping) and held-out test cells; seed of
        the split and of the initialisation.
    progress_bar
        A tqdm bar over the check of a file's layers.

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
        self, adata: AnnData | str | Path, model: str | type[BasicModel] | BasicModel = "full",
        unspliced_layer: str = "Mu", spliced_layer: str = "Ms", t_max: float = 20.0,
        time_prior_loc: float | None = None, time_prior_scale: float | None = None,
        hidden: Sequence[int] = (500, 250), dropout: float = 0.2, latent_dim: int = 5,
        c_prior_scale: float = 1.0, rate_history: str = "constant",
        likelihood: str | Likelihood = "normal", guide=GUIDES[0], time_prior=None,
        state_prior=None, rate_prior: float | LogNormalRatePrior | None = None,
        capture_time_key: str | None = None, capture_time_mapping: dict | None = None,
        capture_time_scale: float | None = None,
        split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0,
        progress_bar: bool = True, _split: np.ndarray | None = None,
    ) -> None:
        self.config, self._components = configure(
            model, unspliced_layer=unspliced_layer, spliced_layer=spliced_layer, t_max=t_max,
            time_prior_loc=time_prior_loc, time_prior_scale=time_prior_scale, hidden=hidden,
            dropout=dropout, latent_dim=latent_dim, c_prior_scale=c_prior_scale,
            rate_history=rate_history, likelihood=likelihood, guide=guide,
            time_prior=time_prior, state_prior=state_prior, rate_prior=rate_prior,
            capture_time_key=capture_time_key, capture_time_mapping=capture_time_mapping,
            capture_time_scale=capture_time_scale, split_fractions=split_fractions,
            seed=seed)
        counts = make_likelihood(self._components["likelihood"]).observations == "counts"
        self.data, adata, self.var_names, graph = read_cells(
            adata, unspliced_layer, spliced_layer, tuple(split_fractions), _split, seed, counts,
            progress_bar)
        self.obs_names = np.asarray(adata.obs_names)
        self._start = StartCells(self.data, graph, adata.obs, seed)
        self.capture_times = None
        if capture_time_key is not None:
            self.capture_times, self.config["capture_time_scale"] = capture_time_prior(
                adata, capture_time_key, capture_time_mapping, capture_time_scale, t_max)
        set_seed(seed)
        start = self._start.data
        self._init = steady_state_init(*start.rows(start.indices("train")), t_max)
        self.model, self.guide = self.make_pair(self.config["model"])
        self.history = TrainingHistory()
        self.is_trained = False
        #: per-cell posterior uncertainty from :meth:`get_uncertainty` (None until then)
        self.uncertainty: pd.DataFrame | None = None
        self.device = torch.device("cpu")

    def make_pair(self, kind: str):
        """A fresh (model, guide) of ``kind`` from the steady-state initialisation (see
        :func:`~pyro_velo.components.build_pair`)."""
        return build_pair(kind, self.config, self._components, self._init, self.data,
                          self.capture_times)

    def __repr__(self) -> str:
        state = "trained" if self.is_trained else "not trained"
        return (f"VeloVAE(model={self.config['model']!r}, cells={self.data.n_cells}, "
                f"fitted genes={self.data.n_genes}, {state})")

    def _to(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.model.to(self.device)
        self.guide.to(self.device)
        before, self.data = self.data, self.data.to(self.device)
        self._start.follow(before, self.data, self.device)

    @property
    def predictor(self) -> Predictor:
        """The fitted pair's :class:`~pyro_velo.predict.Predictor` on the fitted cells."""
        return Predictor(self.model, self.guide, self.data, self.var_names, self.obs_names,
                         self.device)

    def _check_trained(self) -> None:
        if not self.is_trained:
            raise RuntimeError("the model is not trained yet: call .train() first")

    def _fitted(self, full_only: str = "") -> Predictor:
        """:attr:`predictor`, once the model is trained (RuntimeError before, and for a
        method ``full_only`` of the full model on another)."""
        self._check_trained()
        if full_only and self.config["model"] != "full":
            raise RuntimeError(f"{full_only} needs the full model (model='full'), this is "
                               f"{self.config['model']!r}")
        return self.predictor

    def _cells(self, predictor: Predictor, adata: AnnData | None):
        return predictor.cells(adata, self.config["unspliced_layer"],
                               self.config["spliced_layer"])

    def get_latent_time(self, adata: AnnData | None = None, scaled: bool = False) -> np.ndarray:
        """Posterior mean latent time of every cell, ``(n_cells,)`` float64.

        ``adata``: new cells to encode instead of the fitted ones, with the model's layers
        and every fitted gene by name (in any order; divided by the fitted data's per-gene
        scales; not modified; an InputError names what is missing). ``scaled``: rescaled
        to ``[0, 1]`` by the range of the *fitted* cells' times (as ``obs['latent_time']``).
        """
        predictor = self._fitted()
        return predictor.latent_time(None if adata is None else self._cells(predictor, adata),
                                     scaled)

    def get_cell_state(self, adata: AnnData | None = None) -> np.ndarray:
        """Posterior mean cell state c, ``(n_cells, latent_dim)`` (full model); ``adata``:
        new cells, as for :meth:`get_latent_time`."""
        predictor = self._fitted("get_cell_state")
        return predictor.encode(data=self._cells(predictor, adata))["c"].cpu().numpy()

    def get_transcription_rate(self, adata: AnnData | None = None) -> np.ndarray:
        """Relative transcription rate ``rho = g(c)``: a dense ``(n_cells, n_vars)`` float32
        array (NaN for genes not fitted); ``adata``: as for :meth:`get_latent_time`."""
        predictor = self._fitted("get_transcription_rate")
        return predictor.transcription_rate(
            predictor.encode(data=self._cells(predictor, adata))["c"])

    def get_velocity(self, adata: AnnData | None = None) -> tuple[np.ndarray, np.ndarray]:
        """RNA velocity ``(ds/dt, du/dt)`` at each cell's inferred state: ``(n_cells,
        n_vars)`` float32 arrays on the ``Ms`` / ``Mu`` scale, NaN for genes not fitted.
        After refinement each fitted cell's ODE starts from its own initial condition;
        new cells (``adata``, as for :meth:`get_latent_time`) use the first-stage ODE."""
        predictor = self._fitted()
        return predictor.expected_arrays(("ds", "du"), data=self._cells(predictor, adata))

    def get_expression_fit(self, adata: AnnData | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
        """Fitted (expected) ``(u, s)`` of every cell, as :meth:`get_velocity` (on the
        ``Mu`` / ``Ms`` scale)."""
        predictor = self._fitted()
        return predictor.expected_arrays(("u", "s"), data=self._cells(predictor, adata))

    def predict_future(self, delta_t: float, adata: AnnData | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Expected ``(u, s)`` of every cell at ``t + delta_t`` (model time; negative looks
        back) under its own ODE and cell state, as :meth:`get_expression_fit`."""
        predictor = self._fitted()
        delta_t = check_real(delta_t, "delta_t")
        return predictor.expected_arrays(("u", "s"), delta_t, self._cells(predictor, adata))

    def get_rates(self) -> pd.DataFrame:
        """Per-gene parameters on the data scale, NaN rows for genes not fitted: ``alpha``
        (``Ms`` per unit time; cells use ``rho * alpha``), ``beta``, ``gamma``, ``t_on``,
        ``t_off``, ``scaling``, ``fitted``, then the likelihood's (``sigma_*`` or ``phi_*``)."""
        return self.predictor.rates()

    def get_split(self) -> pd.Series:
        """Which split (train / validation / test) each cell belongs to."""
        return pd.Series(pd.Categorical.from_codes(self.data.split, SPLIT_NAMES),
                         index=self.obs_names, name="split")

    # ---- posterior, evaluation --------------------------------------------------------
    def sample_posterior(self, n_samples: int = 100, return_sites: Sequence[str] | None = None,
                         batch_size: int = 1024, seed: int = 0, progress_bar: bool = True
                         ) -> dict[str, np.ndarray]:
        """Joint draws from the fitted posterior (the guide) for every cell: site name to
        ``(n_samples, n_cells, ...)`` (per-cell sites) or ``(n_samples, fitted genes)``
        (rates). ``return_sites``: default ``'t'`` (and ``'c'``); also random rates and
        ``'velocity'``, ``'velocity_u'``, ``'u'``, ``'s'``
        (:meth:`~pyro_velo.predict.Predictor.sample_posterior`). ``batch_size`` cells at a
        time, seeded by ``seed``, a tqdm bar if ``progress_bar``."""
        return self._fitted().sample_posterior(n_samples, return_sites, batch_size, seed,
                                               progress_bar)

    def get_uncertainty(self, n_samples: int = 100, batch_size: int = 1024, seed: int = 0,
                        progress_bar: bool = True) -> pd.DataFrame:
        """Per-cell posterior uncertainty of time, cell state and velocity (paper, Fig. 8):
        ``time_mean``, ``time_std``, ``time_cv``, ``state_cv`` and ``rho_cv`` (full
        model), ``velocity_cv`` (:meth:`~pyro_velo.predict.Predictor.uncertainty`), over
        ``n_samples`` draws as :meth:`sample_posterior` (memory never samples x cells x
        genes). Also kept in ``self.uncertainty`` and exported. For an interval of a
        cell's time combine ``time_std`` with :func:`pyro_velo.tl.time_resolution`."""
        self.uncertainty = self._fitted().uncertainty(n_samples, batch_size, seed,
                                                      progress_bar)
        return self.uncertainty

    def get_rate_uncertainty(self) -> pd.DataFrame:
        """Posterior of the random rates (needs ``rate_prior``): per gene (NaN if not
        fitted) ``<rate>_median``, ``<rate>_q05``, ``<rate>_q95`` of each random rate
        (``alpha`` on the ``Ms`` scale per unit time, ``beta`` and ``gamma`` per unit time).
        """
        return self._fitted().rate_uncertainty()

    def get_time_state_correlation(self) -> np.ndarray:
        """Posterior correlation of t with each coordinate of c, ``(n_cells, latent_dim)``;
        needs ``guide='amortized_mvn'`` (the mean-field guide has none by construction)."""
        return self._fitted().time_state_correlation()

    def elbo(self, split: str = "test") -> float:
        """Mean ELBO per cell on one split (higher is better)."""
        self._check_trained()
        return -evaluate_loss(self.model, self.guide, self.data, self.data.indices(split))

    def evaluate(self) -> pd.DataFrame:
        """Reconstruction metrics of the paper's Appendix C, rows ``train`` and ``test``
        (never trained on): every cell encoded and reconstructed at its posterior means on
        the per-gene standardised abundances, ``mse`` and ``mae`` over cells, genes, u and
        s, and ``log_likelihood``, the mean per-cell log-likelihood of the noise model."""
        predictor = self._fitted()
        return pd.DataFrame({split: predictor.reconstruction(split)
                             for split in ("train", "test")}).T

    def mse(self, split: str = "test") -> float:
        """Mean squared error of the fit on one split (see :meth:`evaluate`)."""
        return self._fitted().reconstruction(split)["mse"]

    # ---- training --------------------------------------------------------------------
    def train(
        self, max_epochs: int | None = None, batch_size: int = 128, lr: float = 2e-4,
        lr_ode: float = 1e-2, seed: int = 0, device: str = "cpu", early_stopping: bool = True,
        patience: int = 30, warmup_epochs: int | None = None, basic_epochs: int | None = None,
        refine_epochs: int | None = None, progress_bar: bool = True,
        num_threads: int | None = None, checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 10, resume: bool = False, distributed: bool | None = None,
        compile: bool | None = None, bf16: bool | None = None, n_starts: int = 1,
        callbacks: Sequence[Callback] = (), root_key: str | None = None,
        root: str | Sequence[str] | None = None, lr_schedule: bool = False,
    ) -> TrainingHistory:
        """Fit by minibatch SVI with early stopping on the validation ELBO.

        The stages (``history.stages``, :meth:`schedule`): ``warm-up``, ``basic``, and for
        the full model ``full`` (the mixture of ODEs) and ``refine``
        (:meth:`refine_initial_conditions`; kept only where it raises the validation
        log-likelihood, ``config['refined']``), or ``ancestors`` with
        ``rate_history='ancestors'``. The direction of time is checked against the data's
        own flow (:meth:`direction`). Every argument in detail:
        :class:`~pyro_velo.inference.plan.TrainingPlan`.

        Parameters
        ----------
        max_epochs
            Bound on each stage after the warm-up (default
            :meth:`~pyro_velo.policies.EpochPolicy.max_epochs`: 400 at 1,000 cells, 160
            with ``lr_schedule``). 50 is about scVelo's speed at 1,000-2,000 cells, with
            a less accurate velocity (benchmarks/RESULTS.md, speed section).
        batch_size, lr, lr_ode
            Minibatch size; learning rates of the networks (paper: 2e-4) and of the
            per-gene ODE parameters.
        lr_schedule
            Faster training: within every stage the networks' rate rises to 3 ``lr`` and
            falls along a cosine to 0.3 ``lr``, the ODE parameters' from ``lr_ode`` to
            0.3 ``lr_ode`` (:class:`~pyro_velo.policies.LearningRatePolicy`), for 0.4 of
            the default epochs: about 2x faster, for quick exploration; less accurate
            and less robust (on simulations velocity cosine 0.02-0.04 lower, worse worst
            cases). False (default): constant rates, as in the paper.
        seed, device
            Seed of minibatch order and sampling (the same seed, the same fit on CPU);
            ``'cpu'`` or ``'cuda'``.
        early_stopping, patience
            Stop after ``patience`` epochs without validation improvement, keeping the
            best parameters. With :class:`~pyro_velo.policies.SettlingPolicy` turned on
            (off by default: about 20% faster, velocity slightly less accurate on some
            data) the mixture of ODEs also stops once its velocity field has settled
            (``config['settled_epochs']``). False: every stage runs its epochs.
        warmup_epochs, basic_epochs, refine_epochs
            Epochs of the warm-up (default ``max(20, max_epochs // 10)``; 0 skips it),
            bounds on ``basic`` (``max_epochs``) and on ``refine`` (``max_epochs // 4``)
            or ``ancestors`` (``max_epochs``); 0 skips the last.
        progress_bar
            Live bars in a terminal or notebook, one line per stage in a log.
        num_threads
            CPU threads. None: one below 1,000 genes, else torch's count (a seed
            reproduces the fit); ``'auto'``: fewer while other processes keep the cores
            busy (not bitwise reproducible); a number fixes it.
        checkpoint_dir, checkpoint_every, resume
            Checkpoint folder, written every ``checkpoint_every`` epochs and after each
            stage; ``resume`` continues the run checkpointed there (on CPU bitwise as
            if uninterrupted).
        distributed, compile, bf16
            Data-parallel training over the default process group (None: when one of two
            or more processes exists); ``torch.compile`` the ODE solution; bfloat16
            gene-wide layers on CPU (None: when the work is large enough).
        n_starts
            Trainings from different random starts; the highest validation ELBO is kept,
            a start whose time runs against the data's flow only if all do, and starts
            whose order the flow corroborates before the others.
        callbacks
            Further :class:`~pyro_velo.inference.callbacks.Callback` s of every stage.
        root_key, root
            The cells whose ``obs[root_key]`` is ``root`` (a label or labels) start the
            trajectory and set the direction of time; not with capture times.

        Returns
        -------
        TrainingHistory
            Per-epoch train and validation loss (negative ELBO per cell), ``self.history``.

        Raises
        ------
        InputError
            Invalid arguments or checkpoint (MissingFileError: ``resume`` finds none).
        DivergenceError
            The loss, a gradient or a parameter became NaN/inf.
        """
        return TrainingPlan(
            max_epochs=max_epochs, batch_size=batch_size, lr=lr, lr_ode=lr_ode, seed=seed,
            device=device, early_stopping=early_stopping, patience=patience,
            warmup_epochs=warmup_epochs, basic_epochs=basic_epochs,
            refine_epochs=refine_epochs, progress_bar=progress_bar, num_threads=num_threads,
            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume,
            distributed=distributed, compile=compile, bf16=bf16, n_starts=n_starts,
            callbacks=callbacks, root_key=root_key, root=root,
            lr_schedule=lr_schedule).run(self, self._start)

    def schedule(self, basic_model, basic_guide, max_epochs: int, warmup_epochs: int,
                 basic_epochs: int, refine_epochs: int) -> list[Stage]:
        """The stages :meth:`train` runs, in order (:mod:`pyro_velo.inference.stages`),
        from the basic pair of the first stages (for the basic model, the model itself).
        A subclass may insert its own :class:`~pyro_velo.inference.stages.Stage` s."""
        return default_schedule(self, self._start, basic_model, basic_guide, max_epochs,
                                warmup_epochs, basic_epochs, refine_epochs)

    def direction(self) -> dict:
        """Whether the data identify the direction of the fitted time, and how.

        ``status``: ``'given'`` (by a root or capture times: ``given_by``), ``'forward'``
        (the time agrees with a reproducible velocity field built from the data alone,
        :mod:`pyro_velo.orientation`), ``'reversed'`` (against that field, or against the
        given root or capture times) or ``'not identified'`` (then give a root,
        ``train(root_key=..., root=...)``, or capture times). ``flow_agreement``:
        Spearman of the time with the field's potential; ``flow_reproducibility``: that of
        the potentials of two halves of the genes (low: a weak velocity signal in the
        data, see benchmarks/RESULTS.md); ``order_corroborated``: the agreement
        lags the reproducibility by at most 0.3 (otherwise check the order against
        markers); ``given_agreement``: Spearman with the given order (NaN without one);
        ``start_agreement``: where several starts were trained (``n_starts``, or further
        starts after a doubtful first one), the lowest Spearman of another start's time
        with the kept one's (NaN after one start): a low value says that other starts
        reached other orders, and ``config['start_losses']`` whether the ELBO preferred
        the kept one clearly. Exported in ``uns['velocity_params']``.
        """
        self._check_trained()
        return dict(self.config.get("direction", {}))

    def refine_initial_conditions(
        self, epochs: int = 100, delta1: float | None = None, delta2: float | None = None,
        n_clusters: int = 10, source: str = "fitted", require_improvement: bool = True,
        **fit_options,
    ) -> TrainingHistory:
        """Initial-condition refinement of the full model (paper, "Initial Conditions").

        Each cell's ODE starts at ``t0 = t - (delta1 + delta2)/2`` from the mean state of
        the training cells of its cluster of c (``n_clusters`` k-means clusters) in the
        window ``[t - delta1, t - delta2]`` (default 3% and 0.5% of the time span); the
        ODE parameters and the decoder are then fine-tuned for ``epochs`` with t and c
        held. ``source``: average the first-stage fit of those cells (``'fitted'``) or
        their observed (u, s) as the paper does (``'observed'``, noisier).
        ``require_improvement``: keep it only if the validation log-likelihood rises
        (else restore with a warning; ``False`` keeps it, as the paper does: train with
        ``refine_epochs=0``, then call this). ``fit_options`` go to
        :func:`~pyro_velo.inference.loop.fit`. Details: :func:`~pyro_velo.inference.refine.refine`.
        """
        self._check_trained()
        return refine(Run(self.history, self.config), self.model, self.guide, self.data,
                      epochs, delta1, delta2, n_clusters, source, require_improvement,
                      **fit_options)

    # ---- AnnData export and persistence ----------------------------------------------
    def export_to_anndata(self, adata: AnnData, rho: bool | None = None) -> None:
        """Write the fit to ``adata``: the scVelo / CellRank keys ``obs['latent_time']``,
        ``layers['velocity']``, ``layers['velocity_u']``, ``var['velocity_genes']``,
        ``uns['velocity_params']`` and the ``pyro_velo_`` keys of
        :func:`pyro_velo.export.write_anndata`. ``rho``: write the full model's dense
        ``layers['pyro_velo_rho']`` (None, default: when under 2 GiB). Nothing is written
        if an error is raised. For data that do not fit in memory use
        :meth:`export_to_h5ad`.
        """
        self._check_trained()
        write_anndata(self, adata, rho)

    def export_to_h5ad(self, path: str | Path, rho: bool | None = None,
                       batch_size: int = 4096, progress_bar: bool = True) -> None:
        """Write the keys of :meth:`export_to_anndata` into the ``.h5ad`` file ``path``
        holding the model's cells and genes in order, ``batch_size`` cells at a time
        (memory does not grow with the cells); the new layers replace old ones only once
        all are written, so an error leaves the file as it was."""
        self._check_trained()
        write_h5ad(self, path, rho, batch_size, progress_bar)

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Save the model to the folder ``path`` so that :meth:`load` predicts identically:
        ``model.pt`` (parameters, split, names, per-gene scales, history) and
        ``config.json`` (arguments, records, versions), not the data
        (:func:`pyro_velo.persist.save`). FileExistsError if ``path`` is not empty and
        not ``overwrite``; InputError if it is not a folder.
        """
        save(self, path, overwrite)

    @classmethod
    def load(cls, path: str | Path, adata: AnnData | str | Path, **components) -> VeloVAE:
        """Load a model saved by :meth:`save` for ``adata`` (an AnnData or ``.h5ad`` path
        holding the fitted cells and genes in order); every ``get_*`` then returns what it
        did before saving. Components passed as objects to the constructor must be passed
        again (:func:`pyro_velo.persist.load`). MissingFileError (a FileNotFoundError)
        without ``config.json`` / ``model.pt``; InputError for a damaged file, another
        format version, or other cells or genes.
        """
        return load(cls, path, adata, components)
