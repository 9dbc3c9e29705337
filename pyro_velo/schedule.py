"""The training schedule of :class:`~pyro_velo.VeloVAE`: its stages and restarts.

:meth:`TrainingMixin.train` runs the stages in order: a warm-up of the basic model
(from the steady state, a diffusion pseudotime or capture times), the basic model, the
paper's mixture of ODEs, then either the initial-condition refinement or, with
``rate_history='ancestors'``, the ancestors' rates. ``train(n_starts=k)`` repeats the
whole schedule from ``k`` random starts and keeps the best.

The mixin holds the *how* of fitting; :class:`~pyro_velo.VeloVAE` holds the data, the
model and guide, and the posterior summaries the schedule reads (``_encode``,
``_expected``, ``_reconstruction``), as scvi-tools' training mixins do.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ._checks import InputError, check_int
from ._threads import cpu_threads
from .data import VelocityData
from .disk import DiskVelocityData
from .distributed import current_group
from .guides import AmortizedGuide, CombinedGuide, FixedLatentGuide
from .initialize import (
    diffusion_pseudotimes,
    direction_score,
    knn_graph,
    time_informed_init,
    window_table,
)
from .model import BasicModel, compiled_kinetics
from .nn import bf16_matmuls, bf16_supported
from .train import (
    Checkpointer,
    TrainingHistory,
    check_training_arguments,
    evaluate_loss,
    fit,
    local_params,
    set_seed,
)

#: epochs between the refinement's checks of the validation log-likelihood, and the
#: epochs before the first (see ``TrainingMixin._hopeless_refinement``)
REFINE_CHECK_EVERY = 5
REFINE_MIN_EPOCHS = 10
#: ``train(compile=None)`` compiles the kinetics when one stage's work, training cells x
#: genes x max_epochs, reaches this. Break-even estimate from the pancreas-size run on two
#: cores (benchmarks/RESULTS.md, session 13): compiling costs 7-10 s on an empty cache,
#: and a run does about 2.3 stages' worth of passes, each cell-gene pass about 2.4e-8 s
#: cheaper compiled, so compiling pays from about 1.3e8; the round number above it keeps
#: small runs (and the test suite) free of compile time. The same rule switches on
#: ``train(bf16=None)`` (where the CPU multiplies bfloat16 natively)
COMPILE_MIN_WORK = 200_000_000


class TrainingMixin:
    """``train`` and its stages, mixed into :class:`~pyro_velo.VeloVAE` (see the module).

    The host class provides the fitted state (``data``, ``_start_data``, ``model``,
    ``guide``, ``config``, ``history``, ``device``, ``is_trained``, ``capture_times``,
    ``_graph``, ``_ancestral``) and the methods ``_make_pair``, ``_to``, ``_encode``,
    ``_expected``, ``_reconstruction`` and ``_check_trained``.
    """

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
    ) -> TrainingHistory:
        """Fit by minibatch SVI with early stopping on the validation ELBO.

        Stages (recorded in ``history.stages``):

        1. ``warm-up``: encoder and rates from the steady-state initialisation (with
           capture times: rates fitted to them); if the warm-up's order disagrees with a
           diffusion pseudotime, a second warm-up from the pseudotime competes on the
           validation ELBO (see :meth:`_warm_up`). Then every gene's switch times and
           rate are re-initialised by a grid search given the warm-up's cell times
           (:func:`~pyro_velo.initialize.time_informed_init`), in the direction of time
           the splicing kinetics support (:func:`~pyro_velo.initialize.direction_score`).
        2. ``basic``: the basic model until the validation ELBO stops improving.
        3. ``full`` (full model only): the mixture of ODEs, initialised from the basic fit
           (same rates and time encoder, ``rho`` near 1), trained jointly with c. With
           ``rate_history='ancestors'`` too: the paper's one rate per cell.
        4. ``refine`` (full model only, ``refine_epochs > 0``): initial-condition
           refinement, see :meth:`refine_initial_conditions`. With
           ``rate_history='ancestors'`` instead ``ancestors``: the fit continues, every
           parameter trained, with the ancestors' rates
           (:class:`~pyro_velo.model.AncestralModel`).

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
            Epochs before the re-initialisation (default ``max(20, max_epochs // 10)``;
            0 skips the warm-up and the re-initialisation).
        basic_epochs
            Upper bound on epochs of the ``basic`` stage (default ``max_epochs``). For
            the full model this stage is the start of the mixture of ODEs; shortening
            it saves time but costs accuracy: with ``max_epochs // 4`` on the 2-branch
            test simulation the correlation of predicted displacement with the true
            velocity fell below 0.7 (0.63), see ``benchmarks/RESULTS.md``.
        refine_epochs
            Epochs of the initial-condition refinement (full model; default
            ``max_epochs // 4``; 0 skips it); with ``rate_history='ancestors'``, upper
            bound on the epochs of the ``ancestors`` stage (default ``max_epochs``; 0
            skips it and leaves the paper's model).
        progress_bar
            Show tqdm progress bars with the current losses.
        num_threads
            CPU threads torch may use while training (restored afterwards). ``None``
            (default) keeps torch's own setting: ``torch.set_num_threads`` or
            ``OMP_NUM_THREADS``, else one thread per core. On an idle 2-core machine two
            threads train the pancreas-size set about 1.5x faster than one; on cores
            busy with other work, pass 1: two threads next to another busy process were
            2-40x slower than one (OpenMP oversubscription; see
            ``benchmarks/RESULTS.md``).
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
            :func:`pyro_velo.train.fit` and :mod:`pyro_velo.distributed`). None
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
            ``max_epochs``, is at least :data:`COMPILE_MIN_WORK` (above where the time
            saved exceeds the compile time); ``True`` / ``False``: always / never. If
            compiling fails (e.g. no C++ compiler) a warning says so and training goes
            on uncompiled.
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
            latent time, velocity and test MSE (``benchmarks/RESULTS.md``, session 12).
        n_starts
            Independent trainings from different random starts; the one with the
            highest validation ELBO is kept (see :meth:`_best_of_starts`). Start ``k``
            initialises the networks with seed ``self.config['seed'] + k`` and trains
            with ``seed + k``; start 0 is the fit ``n_starts=1`` gives. The ELBO of the
            mixture of ODEs has local optima (on bifurcations, e.g., branches fitted on
            different clocks); on simulations the fits in such an optimum had the lower
            validation ELBO, while among the other fits the ELBO did not rank the
            velocity (``benchmarks/RESULTS.md``, session 17). Costs ``n_starts``
            trainings. If a start fails or is interrupted, the best finished start is
            kept before the error propagates. Not combined with ``checkpoint_dir`` or
            distributed training, and only for a model not trained yet.

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
            :func:`pyro_velo.train.fit`).
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
        if n_starts > 1:
            if checkpoint_dir is not None or resume:
                raise InputError("n_starts > 1 cannot be combined with checkpoint_dir or "
                                 "resume; checkpoint single starts (n_starts=1)")
            if current_group(distributed) is not None:
                raise InputError("n_starts > 1 is not available with distributed training; "
                                 "run the starts as separate fits")
            if self.is_trained:
                raise InputError("n_starts > 1 needs a model that is not trained yet")
            return self._best_of_starts(n_starts, seed, dict(
                max_epochs=max_epochs, batch_size=batch_size, lr=lr, lr_ode=lr_ode,
                device=device, early_stopping=early_stopping, patience=patience,
                warmup_epochs=warmup_epochs, basic_epochs=basic_epochs,
                refine_epochs=refine_epochs, progress_bar=progress_bar,
                num_threads=num_threads, distributed=distributed, compile=compile,
                bf16=bf16))
        if max_epochs is None:
            max_epochs = default_max_epochs(self.data.n_cells)
        if warmup_epochs is None:
            warmup_epochs = max(20, max_epochs // 10)
        if refine_epochs is None:
            refine_epochs = max_epochs if self._ancestral else max_epochs // 4
        full = self.config["model"] == "full"
        if basic_epochs is None:
            basic_epochs = max_epochs
        # ---- checkpoints (begin): validate before anything changes ----
        ckpt = Checkpointer(
            checkpoint_dir, checkpoint_every,
            header={"config": copy.deepcopy(self.config),
                    "split": torch.from_numpy(self.data.split.copy()),
                    "fitted": torch.from_numpy(self.data.fitted.copy())},
            run=dict(max_epochs=max_epochs, batch_size=batch_size, lr=lr, lr_ode=lr_ode,
                     seed=seed, early_stopping=early_stopping, patience=patience,
                     warmup_epochs=warmup_epochs, basic_epochs=basic_epochs,
                     refine_epochs=refine_epochs),
            distributed=distributed)
        ckpt.start(resume)
        # ---- checkpoints (end) ----
        self._to(device)
        set_seed(seed)
        work = len(self.data.indices("train")) * self.data.n_genes * max_epochs
        large_on_cpu = self.device.type == "cpu" and work >= COMPILE_MIN_WORK
        if compile is None:
            compile = large_on_cpu
        if bf16 is None:
            bf16 = large_on_cpu and bf16_supported()
        opts = dict(batch_size=batch_size, lr=lr, lr_ode=lr_ode, progress_bar=progress_bar,
                    history=self.history, patience=patience, distributed=distributed)
        with (cpu_threads(num_threads if self.device.type == "cpu" else None),
              compiled_kinetics(bool(compile)), bf16_matmuls(bool(bf16))):
            if full:
                basic_model, basic_guide = self._make_pair("basic")
                basic_model.to(self.device)
                basic_guide.to(self.device)
            else:
                basic_model, basic_guide = self.model, self.guide
            # ---- checkpoints: restore a resumed run's modules, config, history, RNG ----
            modules = {"model": self.model, "guide": self.guide}
            if full:
                modules.update(basic_model=basic_model, basic_guide=basic_guide)
            ckpt.restore(modules, self.config, self.history)
            if ckpt.finished:
                self.is_trained = True
                return self.history
            if warmup_epochs > 0 and ckpt.todo("warm-up"):
                if ckpt.resuming("warm-up"):
                    _fit_stage(basic_model, basic_guide, self._start_data, warmup_epochs,
                               early_stopping=False, description="Warm-up", **opts,
                               **ckpt.fit_options("warm-up", self.history, self.config))
                    self._reinitialize_rates(basic_model, basic_guide)
                else:
                    self.history.stages.append(("warm-up", len(self.history.train)))
                    self._warm_up(basic_model, basic_guide, warmup_epochs, opts)
                ckpt.stage_done("warm-up", self.history, self.config)
            if ckpt.todo("basic"):
                if not ckpt.resuming("basic"):
                    self.history.stages.append(("basic", len(self.history.train)))
                _fit_stage(basic_model, basic_guide, self.data, basic_epochs,
                           early_stopping=early_stopping, description="Basic model", **opts,
                           **ckpt.fit_options("basic", self.history, self.config))
                ckpt.stage_done("basic", self.history, self.config, finished=not full)
            if full:
                if ckpt.todo("full"):
                    if not ckpt.resuming("full"):
                        self._start_from_basic(basic_model, basic_guide)
                        self.history.stages.append(("full", len(self.history.train)))
                    with (self.model.without_ancestors() if self._ancestral
                          else contextlib.nullcontext()):
                        _fit_stage(self.model, self.guide, self.data, max_epochs,
                                   early_stopping=early_stopping,
                                   description="Mixture of ODEs", **opts,
                                   **ckpt.fit_options("full", self.history, self.config))
                    ckpt.stage_done("full", self.history, self.config,
                                    finished=refine_epochs <= 0)
                self.is_trained = True
                if refine_epochs > 0:
                    if self._ancestral:
                        self._fit_ancestors(refine_epochs, resuming=ckpt.resuming("refine"),
                                            early_stopping=early_stopping, **opts,
                                            **ckpt.fit_options("refine", self.history,
                                                               self.config))
                    else:
                        # eager: with t and c held fixed the compiled graph of the first
                        # stages does not apply, and a new one costs more (about 10 s)
                        # than it saves over the refinement's few epochs
                        with compiled_kinetics(False):
                            self.refine_initial_conditions(
                                epochs=refine_epochs, early_stopping=early_stopping, **opts)
                    ckpt.stage_done("refine", self.history, self.config, finished=True)
        self.is_trained = True
        return self.history

    def _best_of_starts(self, n_starts: int, seed: int, options: dict) -> TrainingHistory:
        """Train ``n_starts`` times from different random starts; keep the best.

        The split, the data and the steady-state initialisation are shared; start ``k``
        builds fresh networks after seeding with ``self.config['seed'] + k`` (start 0
        keeps the pair built by the constructor) and trains with ``seed + k``. Each
        fit's validation loss (negative ELBO per cell; training cells without a
        validation split) is evaluated with the same seed, so that the starts are
        compared on the same guide draws. The kept start's number and every start's
        loss are recorded in ``config['start']`` and ``config['start_losses']``.
        """
        check = self.data.indices(_selection_split(self.data))
        config = copy.deepcopy(self.config)
        losses: list[float] = []
        best = None
        for k in range(n_starts):
            if options["progress_bar"]:
                tqdm.write(f"Start {k + 1} of {n_starts}")
            if k:
                set_seed(config["seed"] + k)
                self.model, self.guide = self._make_pair(config["model"])
            self.config, self.history = copy.deepcopy(config), TrainingHistory()
            try:
                self.train(seed=seed + k, **options)
            except BaseException:  # e.g. a diverged start or Ctrl-C: keep the best so far
                if best is not None:
                    self._keep_start(best, n_starts, losses)
                raise
            set_seed(seed)
            losses.append(evaluate_loss(self.model, self.guide, self.data,
                                        check.to(self.device)))
            if best is None or losses[-1] < losses[best[0]]:
                best = (k, self.model, self.guide, self.config, self.history)
        self._keep_start(best, n_starts, losses)
        return self.history

    def _keep_start(self, best: tuple, n_starts: int, losses: list[float]) -> None:
        """Install a finished start of :meth:`_best_of_starts` and record the choice."""
        k, self.model, self.guide, self.config, self.history = best
        self.is_trained = True
        self.config.update(n_starts=n_starts, start=k, start_losses=list(losses))

    def _fit_ancestors(self, epochs: int, resuming: bool = False,
                       **fit_options) -> TrainingHistory:
        """The ``ancestors`` stage: the full model's fit continued with the ancestors' rates
        (every parameter trained, the table built afresh from this stage's steps).
        ``resuming``: continue an interrupted stage (its table and history restored from
        the checkpoint; checkpointed under the last stage's name, ``refine``)."""
        if not resuming:
            self.model.ancestors.clear()
            self.history.stages.append(("ancestors", len(self.history.train)))
        return _fit_stage(self.model, self.guide, self.data, epochs,
                          description="Ancestors' rates", **fit_options)

    def _start_from_basic(self, basic_model: BasicModel, basic_guide: AmortizedGuide) -> None:
        """Initialise the full model from a fitted basic model (same ODE, rho near 1)."""
        self.model.load_state_dict(basic_model.state_dict(), strict=False)
        self.guide.encoder.load_state_dict(basic_guide.encoder.state_dict(), strict=False)
        with torch.no_grad():
            rho0 = self.model.transcription_rate(
                torch.zeros(1, self.config["latent_dim"], device=self.device)).mean()
            self.model.log_alpha.sub_(rho0.log())
        if isinstance(self.guide, CombinedGuide):
            self.guide.rates.load_state_dict(basic_guide.rates.state_dict())
            _rates_to_guide(self.model, self.guide)

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
        ``_hopeless_refinement``): rejected refinements cost a fraction of ``epochs``.

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
            -0.10). See ``benchmarks/RESULTS.md``, session 9.
        fit_options
            Passed to :func:`pyro_velo.train.fit` (``lr``, ``lr_ode``, ``batch_size``...).
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
        predictor = self.predictor
        latent = predictor.encode()
        t, c = latent["t"], latent["c"]
        span = float(t.max() - t.min())
        delta1 = 0.03 * span if delta1 is None else float(delta1)
        delta2 = 0.005 * span if delta2 is None else float(delta2)
        check_split = _selection_split(self.data)
        if require_improvement:  # the first stage to compare with and to restore
            before = predictor.reconstruction(check_split)["log_likelihood"]
            saved = copy.deepcopy(self.model.state_dict())
            saved_guide = copy.deepcopy(self.guide.state_dict())

        def window_values():  # [u | s] of the training cells, a minibatch at a time
            train = self.data.indices("train").to(self.device)
            for batch, (u, s, *_), _kwargs in self.data.minibatches(train, 4096):
                if source == "fitted":
                    fit = predictor.expected(idx=batch, scale=False,
                                         encoded={"t": t[batch], "c": c[batch]})
                    u, s = fit["u"], fit["s"]
                yield batch, torch.cat([u, s], dim=1)

        train_mask = torch.as_tensor(self.data.split == 0, device=self.device)
        table = window_table(t, c, window_values(), delta1, delta2, reference=train_mask,
                             n_clusters=n_clusters, seed=self.config["seed"])
        self.model.set_initial_conditions(table)
        self.config.update(refine_delta1=delta1, refine_delta2=delta2)
        with local_params():
            guide = FixedLatentGuide(t=t, c=c)
            if isinstance(self.guide, CombinedGuide):  # random rates keep their posterior
                guide = CombinedGuide(guide, self.guide.rates)
        self.history.stages.append(("refine", len(self.history.train)))
        fit_options.setdefault("history", self.history)
        fit_options.setdefault("description", "Refining initial conditions")
        stop_when = fit_options.pop("stop_when", None)
        if require_improvement:
            hopeless = RefinementCutoff(
                lambda: predictor.reconstruction(check_split)["log_likelihood"],
                self.model, len(fit_options["history"].train), epochs, before)
            user_stop = stop_when
            stop_when = hopeless if user_stop is None else (
                lambda h: bool(user_stop(h)) or hopeless(h))
        history = _fit_stage(self.model, guide, self.data, epochs, **fit_options,
                             stop_when=stop_when)
        if not require_improvement:
            self.config["refined"] = True
            return history
        after = predictor.reconstruction(check_split)["log_likelihood"]
        self.config["refined"] = bool(after > before)
        if not self.config["refined"]:
            # also restores (or clears) the initial conditions of a previous refinement
            self.model.load_state_dict(saved)
            self.guide.load_state_dict(saved_guide)
            ended = (f" (stopped after {hopeless.epochs_done} of {epochs} epochs: it "
                     "could not catch up)" if hopeless.gave_up else "")
            warnings.warn(
                f"initial-condition refinement lowered the {check_split} log-likelihood "
                f"({before:.3f} -> {after:.3f}){ended}; kept the model without it",
                stacklevel=2)
        return history

    def _warm_up(self, model: BasicModel, guide, epochs: int, opts: dict) -> None:
        """Warm-up, then re-initialise the rates from the encoded times.

        Starts from the steady-state initialisation or, with capture times, from rates
        fitted to them (paper, section 4.2). Without capture times the warm-up's order is
        checked (:meth:`_doubtful_order`) against a diffusion pseudotime of the kNN graph
        (:meth:`_pseudotime`) and against the splicing kinetics; if it looks like a failed
        start (e.g. the ELBO's local optimum folded the order back on itself), a second
        warm-up starts from rates fitted to the pseudotime, and the one with the lower
        validation loss (negative ELBO) is kept with its history. The start used is
        recorded in ``config['warm_start']``.
        """
        initial = (copy.deepcopy(model.state_dict()), copy.deepcopy(guide.state_dict()))
        data = self._start_data
        check = data.indices(_selection_split(data))
        starts = {"capture times" if self.capture_times is not None else "steady state":
                  self._on_start_data(self.capture_times)}
        best = None
        while starts:
            name, start = starts.popitem()
            model.load_state_dict(initial[0])
            guide.load_state_dict(initial[1])
            if start is not None:
                self._reinitialize_rates(model, guide, start)
            trial = TrainingHistory()
            _fit_stage(model, guide, data, epochs, early_stopping=False,
                       description=f"Warm-up ({name})", **{**opts, "history": trial})
            if name == "steady state":
                pseudotime = self._pseudotime(model)
                if pseudotime is not None and self._doubtful_order(model, guide, pseudotime):
                    starts["pseudotime"] = pseudotime
            self._reinitialize_rates(model, guide)
            loss = evaluate_loss(model, guide, data, check)
            if best is None or loss < best[0]:
                best = (loss, copy.deepcopy(model.state_dict()),
                        copy.deepcopy(guide.state_dict()), trial, name)
        _, model_state, guide_state, trial, name = best
        model.load_state_dict(model_state)
        guide.load_state_dict(guide_state)
        self.history.train.extend(trial.train)
        self.history.validation.extend(trial.validation)
        self.config["warm_start"] = name

    def _on_start_data(self, values: torch.Tensor | None) -> torch.Tensor | None:
        """Per-cell ``values`` of ``self.data`` restricted to the cells of ``_start_data``."""
        ids = getattr(self._start_data, "cell_ids", None)
        return values if values is None or ids is None else values[ids.to(values.device)]

    def _doubtful_order(self, model: BasicModel, guide, pseudotime: torch.Tensor) -> bool:
        """Whether the warm-up's order of the training cells looks like a failed start.

        Two symptoms, each seen on simulations where the warm-up folded or reversed part
        of the trajectory: the order disagrees with the diffusion pseudotime
        (``|Spearman| < 0.5``), or it hardly agrees with the splicing kinetics in either
        direction (``|direction_score| < 0.1``; consistent orders scored 0.2-0.5). The
        thresholds are heuristics; the competing starts are then judged by the ELBO.
        """
        from scipy.stats import spearmanr

        data = self._start_data
        train = data.indices("train").to(self.device)
        encoded = self.predictor.encode(train, guide, data=data)["t"].cpu()
        agreement = spearmanr(encoded.numpy(), pseudotime[train.cpu()].numpy())[0]
        rates = {k: v.detach().cpu() for k, v in model.rates().items()}
        u, s = data.rows(train)
        score = direction_score(encoded, u.cpu(), s.cpu(),
                                rates["beta"], rates["gamma"], rates["scale_u"])
        return not abs(agreement) >= 0.5 or abs(score) < 0.1  # NaN counts as doubtful

    def _pseudotime(self, model: BasicModel) -> torch.Tensor | None:
        """Diffusion pseudotime on the kNN graph, oriented by the splicing kinetics.

        Starting the warm-up from genes fitted to a data-driven order avoids a local
        optimum of the ELBO in which the first cells are glued to the end of time. The
        candidates are pseudotimes from extreme cells of the diffusion map
        (:func:`~pyro_velo.initialize.diffusion_pseudotimes`); the one whose order
        agrees best with ``ds/dt = beta u - gamma s``
        (:func:`~pyro_velo.initialize.direction_score`) is used, on ``[0, t_max]``.
        The graph is ``obsp['connectivities']`` of the AnnData; without one (or for a
        sample of cells streamed from a file) a kNN graph of the scaled abundances
        (:func:`~pyro_velo.initialize.knn_graph`). Of the cells of ``_start_data``;
        None with fewer than 20 cells.
        """
        data = self._start_data
        n = data.n_cells
        if n < 20:
            return None
        u, s = data.u.cpu(), data.s.cpu()
        graph = self._graph
        if graph is None or data is not self.data or graph.shape != (n, n):
            graph = knn_graph(torch.cat([u, s], dim=1).numpy(), seed=self.config["seed"])
        rates = {k: v.detach().cpu() for k, v in model.rates().items()}
        best, best_score = None, -np.inf
        for candidate in diffusion_pseudotimes(graph, seed=self.config["seed"]):
            t = torch.as_tensor(candidate, dtype=torch.float32)
            score = direction_score(t, u, s, rates["beta"], rates["gamma"], rates["scale_u"])
            if score > best_score:
                best, best_score = t, score
        return best * self.config["t_max"]

    def _reinitialize_rates(self, model: BasicModel, guide, times: torch.Tensor | None = None
                            ) -> None:
        """Re-fit every gene's switch times and rate to cell times.

        Without ``times``, the warm-up's encoded times are used. The warm-up orders cells
        but may run time backwards (the encoder is free to): unspliced must lead
        spliced, and :func:`~pyro_velo.initialize.direction_score` tells from the data
        which way the order runs; the encoder's time output is mirrored when it runs
        backwards (with capture times the direction is given). ``times`` (``(n_cells,)``,
        NaN for unknown; of the cells of ``self._start_data``) initialises from given
        times, e.g. capture times (paper, section 4.2) or a diffusion pseudotime, using
        the cells that have one.
        """
        data = self._start_data
        train = data.indices("train").to(self.device)
        if times is None:
            t = self.predictor.encode(train, guide, data=data)["t"].cpu()
        else:
            t = times.to(self.device)[train].cpu()
            train = train[~torch.isnan(t).to(self.device)]
            t = t[~torch.isnan(t)]
        rates = {k: v.detach().cpu() for k, v in model.rates().items()}
        u, s = (x.cpu() for x in data.rows(train))
        t_max = self.config["t_max"]
        reverse = (times is None and self.capture_times is None and direction_score(
            t, u, s, rates["beta"], rates["gamma"], rates["scale_u"]) < 0)
        if reverse:
            guide.encoder.mirror_time()
        t_on, t_off, alpha, _ = time_informed_init(
            u, s, t_max - t if reverse else t, rates["beta"], rates["gamma"],
            rates["scale_u"], seed=self.config["seed"])
        model.load_rates(t_on=t_on.to(self.device), t_off=t_off.to(self.device),
                         alpha=alpha.to(self.device))
        _rates_to_guide(model, guide)


class RefinementCutoff:
    """A ``stop_when`` for the refinement: end it once it cannot beat ``before``.

    Every :data:`REFINE_CHECK_EVERY` epochs from :data:`REFINE_MIN_EPOCHS` on, ``score()``
    (the selection split's reconstruction log-likelihood, with ``model`` in evaluation
    mode) is compared with ``before`` (the first-stage model's). While it is lower, the
    refinement stops if the gain, extrapolated linearly at its rate over the last checks
    (about 10 epochs) to the last epoch, stays below zero: the gain grows ever more
    slowly, so a straight line overestimates it and a refinement that would have been
    accepted is not cut short. On simulations the rejected refinements started 8-60 nats
    per cell below the first stage and were still below after 100 epochs, while the
    accepted one crossed zero by epoch 9.

    ``first`` is the history's length when the refinement starts and ``epochs`` its
    length in epochs; ``epochs_done`` counts the refinement's epochs so far and
    ``gave_up`` tells whether it was this rule that ended them.
    """

    def __init__(self, score: Callable[[], float], model: torch.nn.Module, first: int,
                 epochs: int, before: float) -> None:
        self.score, self.model, self.first, self.epochs = score, model, first, epochs
        self.before = before
        self.gains: list[tuple[int, float]] = []
        self.epochs_done, self.gave_up = 0, False

    def __call__(self, history: TrainingHistory) -> bool:
        done = self.epochs_done = len(history.train) - self.first
        if done < REFINE_MIN_EPOCHS or done % REFINE_CHECK_EVERY:
            return False
        was_training = self.model.training
        self.model.eval()
        gain = self.score() - self.before
        self.model.train(was_training)
        self.gains.append((done, gain))
        if gain > 0 or len(self.gains) < 2:
            return False
        (e0, g0), (e1, g1) = self.gains[-3:][0], self.gains[-1]
        rate = max((g1 - g0) / (e1 - e0), 0.0)
        self.gave_up = gain + rate * (self.epochs - done) < 0
        return self.gave_up


def default_max_epochs(n_cells: int) -> int:
    """Default epochs per stage: ``clip(4e5 / n, 100, 1000)`` to 100k cells, then ``1e7 / n``.

    Small data sets need many epochs for enough gradient steps; from 100k cells on, an
    epoch holds so many steps that fewer passes suffice (at least 10).
    """
    if n_cells <= 100_000:
        return int(np.clip(400_000 / n_cells, 100, 1000))
    return max(10, int(10_000_000 / n_cells))


def _rates_to_guide(model: BasicModel, guide) -> None:
    """Move the rate posteriors' locations to the model's point values (after a re-fit)."""
    if isinstance(guide, CombinedGuide):
        with torch.no_grad():
            for name in guide.rates.names:
                getattr(guide.rates, f"log_{name}_loc").copy_(getattr(model, f"log_{name}"))


def _selection_split(data: VelocityData | DiskVelocityData) -> str:
    """The split that chooses between fits (warm-ups, refinement, restarts): the
    validation cells, or the training cells where there are none."""
    return "validation" if (data.split == 1).any() else "train"


def _fit_stage(model: BasicModel, guide, *args, **kwargs) -> TrainingHistory:
    """:func:`~pyro_velo.train.fit`, then the point rates follow random rates' posteriors."""
    history = fit(model, guide, *args, **kwargs)
    _rates_from_guide(model, guide)
    return history


def _rates_from_guide(model: BasicModel, guide) -> None:
    """Set the model's point rates to the posterior medians of random rates (for prediction)."""
    if isinstance(guide, CombinedGuide):
        with torch.no_grad():
            for name in guide.rates.names:
                getattr(model, f"log_{name}").copy_(getattr(guide.rates, f"log_{name}_loc"))
