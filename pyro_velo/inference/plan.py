"""The training plan of a VeloVAE: from :meth:`~pyro_velo.VeloVAE.train`'s arguments to a
checkpointed run of stages.

:class:`TrainingPlan` checks the arguments, chooses the epochs
(:class:`~pyro_velo.policies.EpochPolicy`), the compile and bfloat16 switches
(:class:`~pyro_velo.policies.CompilePolicy`) and the threads, and runs the stages of
:meth:`~pyro_velo.VeloVAE.schedule` (by default :func:`default_schedule`) through
:func:`~pyro_velo.inference.stages.run_stages` under a
:class:`~pyro_velo.inference.checkpoint.Checkpointer`, or hands several random starts
to :func:`~pyro_velo.inference.restarts.best_of_starts`. The stages, recorded in
``history.stages``:

1. ``warm-up``: encoder and rates from the steady-state initialisation (with capture
   times: rates fitted to them); if the warm-up's order disagrees with a diffusion
   pseudotime, a second warm-up from the pseudotime competes on the validation ELBO (see
   :class:`~pyro_velo.inference.warmup.WarmUp`). Then every gene's switch times and rate
   are re-initialised by a grid search given the warm-up's cell times
   (:func:`~pyro_velo.initialize.time_informed_init`), in the direction of time the
   splicing kinetics support (:func:`~pyro_velo.initialize.direction_score`).
2. ``basic``: the basic model until the validation ELBO stops improving.
3. ``full`` (full model only): the mixture of ODEs, initialised from the basic fit (same
   rates and time encoder, ``rho`` near 1), trained jointly with c until the validation
   ELBO stops improving (or, where :class:`~pyro_velo.policies.SettlingPolicy` is
   turned on, the velocity field has settled). With ``rate_history='ancestors'`` too:
   the paper's one rate per cell.
4. ``refine`` (full model only, ``refine_epochs > 0``): initial-condition refinement
   (:mod:`~pyro_velo.inference.refine`). With ``rate_history='ancestors'`` instead
   ``ancestors``: the fit continues, every parameter trained, with the ancestors' rates
   (:class:`~pyro_velo.model.AncestralModel`).

The direction of time is checked against a velocity field built from the data alone
(:mod:`pyro_velo.orientation`, over the :class:`StartCells`): it can pick the warm-up's
start, and the mixture of ODEs is refitted with the basic fit's time held where it loses
the basic fit's order; :func:`record_direction` writes the verdict that
:meth:`~pyro_velo.VeloVAE.direction` reports. A root or capture times set the direction
instead.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import torch

from .. import policies
from .._checks import InputError, check_int
from .._params import set_seed
from .._threads import cpu_threads
from ..components import ancestral
from ..data import VelocityData
from ..distributed import current_group
from ..initialize import root_pseudotime
from ..orientation import (
    FlowEvidence,
    direction_source,
    flow_evidence,
    root_mask,
    warn_if_unidentified,
)
from .callbacks import Callback, say
from .checkpoint import Checkpointer
from .loop import TrainingHistory, check_training_arguments
from .refine import Refine
from .restarts import Restartable, best_of_starts
from .stages import AncestorsStage, BasicStage, FullStage, Run, Stage, run_stages, speed_settings
from .threads import ThreadGovernor, training_threads
from .warmup import WarmUp, cell_graph

if TYPE_CHECKING:
    import pandas as pd
    import scipy.sparse as sp

    from ..disk import DiskVelocityData
    from ..predict import Predictor

#: cells (whole blocks, from all splits) a model fitted from a file is warmed up and
#: initialised on; in memory all cells are used
START_SAMPLE_CELLS = 20_000


class StartCells:
    """The cells training starts from, and what the data alone say about their order.

    In memory these are all cells of the model's data; from a file, a sample of whole
    blocks of :data:`START_SAMPLE_CELLS` cells loaded into memory. The warm-up and the
    steady-state initialisation run on them, and the data's own flow
    (:func:`~pyro_velo.orientation.flow_evidence`) is computed over them once, when
    first needed: it depends on the data only.

    Parameters
    ----------
    data
        The model's data (all cells).
    graph
        The AnnData's kNN graph (``obsp['connectivities']``), or None.
    obs
        The cells' annotations (a reference): :meth:`TrainingPlan.run` reads the root
        cells from it.
    seed
        Seed of the sample of blocks and of a kNN graph built where none is given.
    """

    def __init__(self, data: VelocityData | DiskVelocityData, graph: sp.spmatrix | None,
                 obs: pd.DataFrame, seed: int) -> None:
        self.data = (data if isinstance(data, VelocityData)
                     else data.load(data.sample(START_SAMPLE_CELLS, seed)))
        self.graph, self.obs, self.seed = graph, obs, seed
        #: the user's root cells over all cells (set by :meth:`TrainingPlan.run`)
        self.root: np.ndarray | None = None
        #: the data's own flow over these cells, once computed (:meth:`flow_evidence`)
        self.evidence: FlowEvidence | None = None
        #: the root cells' pseudotime over these cells, with the root it was made from
        self._root_order: tuple[bytes, np.ndarray] | None = None

    def graph_for(self, data: VelocityData | DiskVelocityData) -> sp.spmatrix | None:
        """The given kNN graph while these cells are ``data`` itself, else None: the graph
        indexes the cells of the AnnData the model was built from, not a sample."""
        return self.graph if self.data is data else None

    def follow(self, before: VelocityData | DiskVelocityData,
               after: VelocityData | DiskVelocityData, device: torch.device) -> None:
        """Move to ``device`` with the model's data (``before``, now ``after``)."""
        self.data = after if self.data is before else self.data.to(device)

    def restrict(self, values):
        """Per-cell ``values`` (a tensor or an array) of all cells, on these cells."""
        ids = getattr(self.data, "cell_ids", None)
        if values is None or ids is None:
            return values
        return values[ids.to(values.device) if torch.is_tensor(values) else ids.cpu().numpy()]

    def direction_given(self, capture_times: torch.Tensor | None) -> str | None:
        """What sets the direction of time instead of the data's flow (see
        :func:`~pyro_velo.orientation.direction_source`)."""
        return direction_source(capture_times, self.root)

    def given_order(self, data: VelocityData | DiskVelocityData,
                    capture_times: torch.Tensor | None) -> np.ndarray | None:
        """The order a user set for these cells of ``data``: their capture times (NaN
        where unknown), or the diffusion pseudotime on ``[0, 1]`` from the root cells
        (computed once per root; the warm-up starts from it); None without either."""
        if capture_times is not None:
            return self.restrict(capture_times).cpu().numpy().astype(np.float64)
        if self.root is None:
            return None
        key = self.root.tobytes()
        if self._root_order is None or self._root_order[0] != key:
            graph = cell_graph(self.data, self.graph_for(data), self.seed)
            self._root_order = key, root_pseudotime(graph, self.restrict(self.root),
                                                    seed=self.seed)
        return self._root_order[1]

    def flow_evidence(self, data: VelocityData | DiskVelocityData) -> FlowEvidence | None:
        """The data's own flow over these cells of ``data`` (None under 20 cells)."""
        if self.evidence is None and self.data.n_cells >= 20:
            graph = cell_graph(self.data, self.graph_for(data), self.seed)
            self.evidence = flow_evidence(self.data.u.cpu().numpy(),
                                          self.data.s.cpu().numpy(), graph, seed=self.seed)
        return self.evidence


class Epochs(NamedTuple):
    """Upper bounds on the epochs of the stages, in the order of
    :meth:`~pyro_velo.VeloVAE.schedule`'s arguments."""

    max_epochs: int
    warmup_epochs: int
    basic_epochs: int
    refine_epochs: int


class Trainable(Restartable, Protocol):
    """What training reads and writes of the model being fitted (:class:`~pyro_velo.VeloVAE`)."""

    capture_times: torch.Tensor | None

    @property
    def predictor(self) -> Predictor: ...

    def schedule(self, basic_model: torch.nn.Module, basic_guide: torch.nn.Module,
                 max_epochs: int, warmup_epochs: int, basic_epochs: int,
                 refine_epochs: int) -> list[Stage]: ...

    def _to(self, device: str | torch.device) -> None:
        """Move the model, the guide and the data (the start cells too) to ``device``."""


@dataclass(frozen=True)
class TrainingPlan:
    """The arguments of :meth:`pyro_velo.VeloVAE.train`, checked and run.

    Every field is the argument of the same name (see that method for the defaults);
    the details:

    - ``max_epochs`` (None: :meth:`~pyro_velo.policies.EpochPolicy.max_epochs`),
      ``warmup_epochs``, ``basic_epochs`` and ``refine_epochs`` bound the stages
      (:class:`~pyro_velo.policies.EpochPolicy` gives the defaults). Shortening the
      ``basic`` stage of the full model costs accuracy: with ``max_epochs // 4`` on the
      2-branch test simulation the correlation of predicted displacement with the true
      velocity fell below 0.7 (0.63). With ``rate_history='ancestors'``,
      ``refine_epochs`` bounds the ``ancestors`` stage (default ``max_epochs``; 0 skips
      it and leaves the paper's model).
    - ``lr_schedule``: True: each stage's learning rates follow
      :data:`~pyro_velo.policies.LEARNING_RATES` (a one-cycle schedule around ``lr``
      and ``lr_ode``, :class:`~pyro_velo.inference.callbacks.LearningRateSchedule`) and
      the default epochs are :attr:`~pyro_velo.policies.EpochPolicy.scheduled_share` of
      the constant-rate ones: about 1.7x faster, with a less accurate and less robust
      fit (see :class:`~pyro_velo.policies.LearningRatePolicy`). False (default): constant
      rates, as in the paper. A checkpoint records it when on.
    - ``num_threads``: CPU threads while training (torch's count is restored
      afterwards; :func:`~pyro_velo.inference.threads.training_threads`). ``None``: one
      thread below 1,000 genes, else torch's own count (``torch.set_num_threads``,
      ``OMP_NUM_THREADS``, else one per core); a fixed count, because torch's results
      depend on it and a seed must reproduce the fit. ``'auto'``: fewer threads while
      other processes keep cores busy
      (:class:`~pyro_velo.inference.threads.ThreadGovernor`): OpenMP threads that share
      a core with another busy process wait for each other (two cores, 1,000 x 200, 60
      epochs: 275 s on two threads beside one busy process, 12 s on one thread, 12 s
      idle); faster on shared cores, not bitwise reproducible. A number fixes the
      count; on an idle 2-core machine two threads train the pancreas-size set about
      1.5x faster than one.
    - ``checkpoint_dir``: ``checkpoint.pt`` (rewritten atomically) is written every
      ``checkpoint_every`` epochs (counted over all stages) and at the end of every
      stage. It holds everything needed to continue: the parameters and buffers of every
      model and guide in use (for the full model also the first-stage basic pair), the
      Adam optimiser state (moments and step counts), the minibatch-order generator, the
      torch / numpy / Python random states, the early-stopping state (best loss, best
      parameters, epochs since the best), the history, the stage and epoch reached and
      the configuration. Without ``resume`` the folder must not hold a checkpoint
      already.
    - ``resume``: continue the run whose checkpoint is in ``checkpoint_dir`` (e.g. after
      a crash, in a new process with a new ``VeloVAE`` built with the same arguments, or
      on the same object after an interruption), with the same training arguments
      (``progress_bar``, ``device``, ``num_threads``, ``compile``, ``bf16`` and
      ``checkpoint_every`` may differ); on CPU with the same ``compile`` and ``bf16`` the
      result is then bitwise the same as an uninterrupted run. The history is restored
      and continues from the checkpoint's epoch. The warm-up and the refinement are not
      checkpointed inside: a run interrupted during the warm-up restarts it, one
      interrupted during the refinement restarts the refinement from the end of the
      ``full`` stage. The ``ancestors`` stage is checkpointed inside, table included.
      Resuming a finished run restores its final state without training.
    - ``distributed``: data-parallel training over the default process group (every
      stage; see :func:`~pyro_velo.inference.loop.fit` and :mod:`pyro_velo.distributed`).
      None: used whenever a group of two or more processes is initialised, so every
      process must call ``train`` with the same arguments; ``False``: this process
      trains alone even inside a group (e.g. one fit per rank) and writes its own
      checkpoints; ``True``: requires a group.
    - ``compile``: the ODE solution of training steps goes through ``torch.compile``
      (fused kernels; the same values up to float rounding). Compiling takes 7-10 s on
      two CPU cores (about 2 s when torch's on-disk cache holds the graphs) and then
      saves about 20% of every epoch at the pancreas size. None: compile on CPU when a
      stage's work, training cells x genes x ``max_epochs``, reaches
      :attr:`~pyro_velo.policies.CompilePolicy.min_work` (where the time saved exceeds
      the compile time). If compiling fails (e.g. no C++ compiler) a warning says so and
      training goes on uncompiled.
    - ``bf16``: the products of the two layers that touch every gene (the encoder's
      input layer and the decoder's output layer, most of the networks' arithmetic) run
      in bfloat16 during training steps on the CPU (:class:`~pyro_velo.nn.WideLinear`;
      float32 parameters, optimiser and accumulation; validation and every result in
      float32). None: on when ``compile``'s work rule holds and the CPU multiplies
      bfloat16 natively (AVX512-BF16 or AMX; :func:`~pyro_velo.nn.bf16_supported`);
      ``True`` is slow on a CPU without native bfloat16. At the pancreas size on an AMD
      EPYC with AVX512-BF16 it saved 10-20% of an epoch, with the same latent time,
      velocity and test MSE.
    - ``n_starts``: independent trainings from different random starts, the highest
      validation ELBO kept (:func:`~pyro_velo.inference.restarts.best_of_starts`). Start
      ``k`` initialises the networks with seed ``config['seed'] + k`` and trains with
      ``seed + k``; start 0 is the fit ``n_starts=1`` gives. The ELBO of the mixture of
      ODEs has local optima (on bifurcations, e.g., branches fitted on different
      clocks); on simulations the fits in such an optimum had the lower validation
      ELBO, while among the other fits the ELBO did not rank the velocity. The ELBO
      cannot tell a fit from its time-reversed twin, so a start whose time runs
      backwards (direction ``'reversed'``) is kept only when every start does, one
      whose direction the flow leaves ``'not identified'`` goes after every start
      that runs forward, and among the others one whose order the flow corroborates
      (``order_corroborated``) goes before one whose order lags it. If a
      start fails or is interrupted, the best finished start is kept before the error
      propagates. Not combined with ``checkpoint_dir`` or distributed training, and
      only for a model not trained yet.
      With ``n_starts=1`` a fit whose direction report is ``'reversed'``, or
      ``'forward'`` with an order the flow does not corroborate, is trained from
      more starts in the same way (:class:`~pyro_velo.policies.RestartPolicy`; not
      with ``checkpoint_dir``, distributed training or a model trained before); a
      further start that fails is reported with a warning and the best finished start
      kept. On the 50-cell dentate gyrus fixture, where every first start lags the
      flow, this gives Spearman 0.36-0.47 with the marker stage over model seeds 0-5
      (one start alone: 0.17-0.51).
    - ``root_key``, ``root``: the cells whose ``obs[root_key]`` is ``root`` (a label or
      a list of labels) start the trajectory: training starts from a diffusion
      pseudotime rooted at them, and the direction of time is theirs, never the
      heuristics' (:func:`~pyro_velo.orientation.root_mask`): a fit whose time runs
      against that pseudotime is reported ``'reversed'`` and trained from more starts.
      Not with capture times.
    """

    max_epochs: int | None
    batch_size: int
    lr: float
    lr_ode: float
    seed: int
    device: str
    early_stopping: bool
    patience: int
    warmup_epochs: int | None
    basic_epochs: int | None
    refine_epochs: int | None
    progress_bar: bool
    num_threads: int | str | None
    checkpoint_dir: str | Path | None
    checkpoint_every: int
    resume: bool
    distributed: bool | None
    compile: bool | None
    bf16: bool | None
    n_starts: int
    callbacks: Sequence[Callback]
    root_key: str | None
    root: str | Sequence[str] | None
    lr_schedule: bool = False

    def check(self) -> None:
        """Raise :class:`~pyro_velo._checks.InputError` (or RuntimeError for a missing
        process group) for invalid arguments, before anything changes."""
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("device='cuda' was requested but CUDA is not available")
        _check_switch(self.distributed, "distributed")
        if self.distributed:
            current_group(True)  # RuntimeError now, before anything changes
        _check_switch(self.compile, "compile")
        _check_switch(self.bf16, "bf16")
        if self.lr_schedule not in (True, False):
            raise InputError(f"lr_schedule must be True or False, got {self.lr_schedule!r}")
        check_training_arguments(
            max_epochs=self.max_epochs, batch_size=self.batch_size, lr=self.lr,
            lr_ode=self.lr_ode, patience=self.patience, warmup_epochs=self.warmup_epochs,
            basic_epochs=self.basic_epochs, refine_epochs=self.refine_epochs,
            checkpoint_every=self.checkpoint_every,
            num_threads=None if self.num_threads == "auto" else self.num_threads)
        check_int(self.n_starts, "n_starts", minimum=1)

    def epochs(self, n_cells: int, config: dict[str, Any]) -> Epochs:
        """The stages' epochs, the defaults chosen by :data:`~pyro_velo.policies.EPOCHS`
        for ``n_cells`` cells and the model of ``config``."""
        policy = policies.EPOCHS
        max_epochs = (policy.max_epochs(n_cells, scheduled=self.lr_schedule)
                      if self.max_epochs is None else self.max_epochs)
        warmup = (policy.warmup_epochs(max_epochs) if self.warmup_epochs is None
                  else self.warmup_epochs)
        refine = self.refine_epochs
        if refine is None:
            refine = max_epochs if ancestral(config) else policy.refine_epochs(max_epochs)
        basic = max_epochs if self.basic_epochs is None else self.basic_epochs
        return Epochs(max_epochs, warmup, basic, refine)

    def run(self, vae: Trainable, start: StartCells) -> TrainingHistory:
        """Train ``vae`` from the cells ``start``; return (and keep) its history.

        A single fit whose time runs backwards, or whose order the data's own flow does
        not corroborate, is trained from more starts where the run allows them
        (:class:`~pyro_velo.policies.RestartPolicy`); the final direction report warns
        where the direction is not identified.
        """
        self.check()
        start.root = root_mask(start.obs, self.root_key, self.root,
                               vae.capture_times is not None)
        if self.n_starts > 1:
            self._best_of_starts(vae, start)
        else:
            before = None if vae.is_trained else copy.deepcopy(vae.config)
            self._run_once(vae, start)
            restarts = policies.RESTARTS
            if (restarts.wants_more_starts(vae.config["direction"])
                    and before is not None and self._restartable()):
                say(f"The fitted order is not supported by the data: training from "
                    f"{restarts.extra_starts} more starts", self.progress_bar)
                try:
                    best_of_starts(vae, 1 + restarts.extra_starts, self.seed,
                                   self._start_trainer(vae, start), self.progress_bar,
                                   first_done=before)
                except Exception as error:  # the first fit stands: keep the best finished
                    warnings.warn(f"a further start failed ({type(error).__name__}: "
                                  f"{error}); the best finished start is kept",
                                  RuntimeWarning, stacklevel=2)
        # attributed to the frame of VeloVAE.train, the caller of this method
        warn_if_unidentified(vae.config["direction"], stacklevel=2)
        return vae.history

    def _restartable(self) -> bool:
        """Whether this run may train further starts (not checkpointed, not distributed)."""
        return (self.checkpoint_dir is None and not self.resume
                and current_group(self.distributed) is None)

    def _start_trainer(self, vae: Trainable, start: StartCells):
        """Trains one start of ``vae`` with a given seed (for :func:`best_of_starts`)."""
        return lambda seed: replace(self, seed=seed, n_starts=1)._run_once(vae, start)

    def _run_once(self, vae: Trainable, start: StartCells) -> None:
        """One run of the schedule; records the direction report (without warning)."""
        epochs = self.epochs(vae.data.n_cells, vae.config)
        # validate the checkpoint folder before anything changes
        checkpointer = Checkpointer(
            self.checkpoint_dir, self.checkpoint_every,
            header={"config": copy.deepcopy(vae.config),
                    "split": torch.from_numpy(vae.data.split.copy()),
                    "fitted": torch.from_numpy(vae.data.fitted.copy())},
            run=dict(max_epochs=epochs.max_epochs, batch_size=self.batch_size,
                     lr=self.lr, lr_ode=self.lr_ode, seed=self.seed,
                     early_stopping=self.early_stopping, patience=self.patience,
                     warmup_epochs=epochs.warmup_epochs, basic_epochs=epochs.basic_epochs,
                     refine_epochs=epochs.refine_epochs,
                     # only when on: checkpoints of constant-rate runs stay resumable
                     **({"lr_schedule": True} if self.lr_schedule else {})),
            distributed=self.distributed)
        checkpointer.start(self.resume)
        vae._to(self.device)
        set_seed(self.seed)
        large = policies.COMPILE.worth_it(len(vae.data.indices("train")), vae.data.n_genes,
                                          epochs.max_epochs, vae.device.type)
        compile = large if self.compile is None else self.compile
        bf16 = policies.COMPILE.bf16(large) if self.bf16 is None else self.bf16
        threads, governed = training_threads(self.num_threads, vae.device.type,
                                             vae.data.n_genes)
        run = Run(vae.history, vae.config, dict(
            batch_size=self.batch_size, lr=self.lr, lr_ode=self.lr_ode,
            lr_schedule=policies.LEARNING_RATES if self.lr_schedule else None,
            progress_bar=self.progress_bar, patience=self.patience,
            distributed=self.distributed), self.early_stopping,
            [*self.callbacks, *([ThreadGovernor()] if governed else [])])
        with cpu_threads(threads):
            if vae.config["model"] == "full":
                basic_model, basic_guide = vae.make_pair("basic")
                basic_model.to(vae.device)
                basic_guide.to(vae.device)
                modules = {"model": vae.model, "guide": vae.guide,
                           "basic_model": basic_model, "basic_guide": basic_guide}
            else:
                basic_model, basic_guide = vae.model, vae.guide
                modules = {"model": vae.model, "guide": vae.guide}
            # a resumed run's modules, config, history and random states
            checkpointer.restore(modules, vae.config, vae.history)
            if not checkpointer.finished:
                stages = vae.schedule(basic_model, basic_guide, *epochs)
                with speed_settings(list(modules.values()), bool(compile), bool(bf16)):
                    run_stages(stages, run, checkpointer,
                               on_model_ready=lambda: setattr(vae, "is_trained", True))
        vae.is_trained = True
        record_direction(vae, start)

    def _best_of_starts(self, vae: Trainable, start: StartCells) -> None:
        """Several random starts (``n_starts > 1``), after the checks they allow."""
        if self.checkpoint_dir is not None or self.resume:
            raise InputError("n_starts > 1 cannot be combined with checkpoint_dir or "
                             "resume; checkpoint single starts (n_starts=1)")
        if current_group(self.distributed) is not None:
            raise InputError("n_starts > 1 is not available with distributed training; "
                             "run the starts as separate fits")
        if vae.is_trained:
            raise InputError("n_starts > 1 needs a model that is not trained yet")
        best_of_starts(vae, self.n_starts, self.seed, self._start_trainer(vae, start),
                       self.progress_bar)


def _check_switch(value: bool | None, name: str) -> None:
    """Raise InputError unless ``value`` is None, True or False."""
    if value not in (None, True, False):
        raise InputError(f"{name} must be None, True or False, got {value!r}")


def default_schedule(vae: Trainable, start: StartCells, basic_model: torch.nn.Module,
                     basic_guide: torch.nn.Module, max_epochs: int, warmup_epochs: int,
                     basic_epochs: int, refine_epochs: int) -> list[Stage]:
    """The stages of the module docstring, in order, for ``vae`` trained from ``start``
    (what :meth:`pyro_velo.VeloVAE.schedule` returns)."""
    stages: list[Stage] = []
    config, capture_times = vae.config, vae.capture_times
    # the mixture of ODEs keeps the basic fit's order, unless capture times set it
    # (their prior holds the order)
    evidence = None if capture_times is not None else start.flow_evidence(vae.data)
    if warmup_epochs > 0:
        stages.append(WarmUp(
            basic_model, basic_guide, start.data, warmup_epochs, t_max=config["t_max"],
            seed=config["seed"], capture_times=start.restrict(capture_times),
            graph=start.graph_for(vae.data),
            root_order=None if capture_times is not None else start.given_order(vae.data, None),
            evidence=(None if start.direction_given(capture_times)
                      else start.flow_evidence(vae.data))))
    stages.append(BasicStage(basic_model, basic_guide, vae.data, basic_epochs))
    if config["model"] != "full":
        return stages
    stages.append(FullStage(
        vae.model, vae.guide, vae.data, max_epochs, basic_model, basic_guide,
        without_ancestors=ancestral(config), evidence_data=start.data, evidence=evidence))
    if refine_epochs > 0:
        last = AncestorsStage if ancestral(config) else Refine
        stages.append(last(vae.model, vae.guide, vae.data, refine_epochs))
    return stages


def record_direction(vae: Trainable, start: StartCells) -> None:
    """``vae.config['direction']``: how the fitted time of the cells ``start`` agrees with
    the data's own flow and with a given root or capture times
    (:meth:`~pyro_velo.policies.OrientationPolicy.report`)."""
    evidence = start.flow_evidence(vae.data)
    given = start.direction_given(vae.capture_times)
    order = start.given_order(vae.data, vae.capture_times)
    t = (vae.predictor.encode(data=start.data)["t"].cpu().numpy()
         if evidence is not None or order is not None else None)
    vae.config["direction"] = policies.ORIENTATION.report(evidence, t, given, order)
    # one start has nothing to agree with; best_of_starts fills it in for several
    vae.config["direction"]["start_agreement"] = float("nan")
