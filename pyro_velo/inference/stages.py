"""The training schedule as a list of stage objects, and the runner that checkpoints them.

A :class:`Stage` holds the (model, guide, data) it trains and its epochs; ``begin`` marks
its start in the history (and prepares its model), ``train`` runs it through the
:class:`Run` the stages share. :func:`run_stages` runs a list of them in order, wrapped
by a :class:`~pyro_velo.inference.checkpoint.Checkpointer`: finished stages of a resumed
run are skipped and the one in progress continues from its saved loop state.

:meth:`pyro_velo.VeloVAE.schedule` returns the default list
(:func:`~pyro_velo.inference.plan.default_schedule`): warm-up
(:class:`~pyro_velo.inference.warmup.WarmUp`), :class:`BasicStage`, :class:`FullStage`,
then :class:`~pyro_velo.inference.refine.Refine` or :class:`AncestorsStage`. A new stage
subclasses :class:`Stage` and is inserted into that list (by a subclass of VeloVAE that
overrides ``schedule``); it can read the encoded times of its cells through
:meth:`Stage.predictor`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .. import distributed as dist_
from .. import policies
from ..guides import CombinedGuide
from ..nn import WideLinear
from ..orientation import FlowEvidence
from ..policies import OrientationPolicy, SettlingPolicy
from ..predict import Predictor
from .callbacks import Callback, SVILoop
from .loop import TrainingHistory, fit

if TYPE_CHECKING:
    from ..data import VelocityData
    from ..disk import DiskVelocityData
    from .checkpoint import Checkpointer


@dataclass
class Run:
    """What the stages of one training share.

    ``history`` collects every stage's epochs, ``config`` the records stages write
    (``warm_start``, ``refined``...), ``fit_options`` the loop's settings
    (:func:`~pyro_velo.inference.loop.fit`'s ``batch_size``, ``lr``, ``lr_ode``,
    ``patience``, ``progress_bar``, ``distributed``), ``callbacks`` the caller's own.
    """

    history: TrainingHistory
    config: dict[str, Any]
    fit_options: dict[str, Any] = field(default_factory=dict)
    early_stopping: bool = True
    callbacks: Sequence[Callback] = ()

    def fit(self, model: torch.nn.Module, guide: torch.nn.Module,
            data: VelocityData | DiskVelocityData, epochs: int, description: str,
            **options: Any) -> TrainingHistory:
        """One SVI loop (``options`` override the run's); then the point rates follow
        the posteriors of random rates, for prediction."""
        history = fit(model, guide, data, epochs, description=description,
                      **{"history": self.history, **self.fit_options,
                         "callbacks": self.callbacks, **options})
        rates_from_guide(model, guide)
        return history


class Stage:
    """One stage of the schedule: trains ``model`` and ``guide`` on ``data``.

    Subclasses set :attr:`name` and :attr:`description` and override :meth:`begin`
    and/or :meth:`train`.
    """

    #: recorded in ``history.stages`` and in checkpoints
    name = "stage"
    #: label of the progress output
    description = "Training"
    #: checkpoints are written inside the stage; otherwise only at its end, and an
    #: interrupted stage starts again
    checkpoint_inside = True
    #: the final model can be used once this stage is done
    completes_model = False
    #: train with the kinetics uncompiled whatever the run's setting
    eager = False

    def __init__(self, model: torch.nn.Module, guide: torch.nn.Module,
                 data: VelocityData | DiskVelocityData, epochs: int) -> None:
        self.model, self.guide, self.data, self.epochs = model, guide, data, epochs

    @property
    def checkpoint_name(self) -> str:
        """The stage's name in checkpoints."""
        return self.name

    def predictor(self) -> Predictor:
        """The stage's pair on its cells, e.g. ``self.predictor().encode(idx)["t"]``."""
        return Predictor(self.model, self.guide, self.data)

    def begin(self, run: Run) -> None:
        """Prepare the stage and mark its start (skipped when resuming inside it)."""
        run.history.stages.append((self.name, len(run.history.train)))

    def stop_rules(self, run: Run, description: str) -> list[Callback]:
        """Callbacks that may end the stage's fit labelled ``description`` before its
        last epoch, besides early stopping (none here): ``fit``'s ``stop_rules``, which
        run before the epoch's checkpoint is written."""
        return []

    def train(self, run: Run, **checkpoint_options: Any) -> None:
        """Train the stage (``checkpoint_options``: see ``Checkpointer.fit_options``)."""
        run.fit(self.model, self.guide, self.data, self.epochs, self.description,
                early_stopping=run.early_stopping,
                stop_rules=self.stop_rules(run, self.description), **checkpoint_options)


class OrderKeepingStage(Stage):
    """A stage that keeps the order of cells it was handed, checked against the data's
    own flow (``evidence`` over the cells of ``evidence_data``; none: no check).

    Every ``orientation.watch_every`` epochs an :class:`OrderWatch` compares the time's
    agreement with the flow against its agreement when the stage started; when the
    stage loses it (:meth:`~pyro_velo.policies.OrientationPolicy.lost_order`), training
    stops there, the stage goes back to its start (:meth:`restart`) and trains again
    with the encoder's time held fixed. ``run.config['time_held']`` lists the stages
    that did, ``run.config['stage_flow_agreement']`` holds the agreement before and
    after each stage (keyed by the stage before it and by the stage).

    A run resumed from a checkpoint inside the stage must see the same start, so
    :meth:`restart` and :meth:`starting_agreement` read it from what checkpoints hold
    (:class:`FullStage`: the basic fit), never from a copy taken when the stage began.
    """

    #: the stage before this one, naming the agreement this stage started from
    handed_by = "start"

    def __init__(self, model, guide, data, epochs: int, evidence: FlowEvidence | None = None,
                 evidence_data=None, orientation: OrientationPolicy | None = None) -> None:
        super().__init__(model, guide, data, epochs)
        self.evidence, self.evidence_data = evidence, evidence_data
        self.orientation = orientation

    def flow_agreement(self, model: torch.nn.Module, guide: torch.nn.Module) -> float | None:
        """Agreement of the pair's encoded times with the flow (None without evidence)."""
        if self.evidence is None:
            return None
        t = Predictor(model, guide, self.evidence_data).encode()["t"].cpu().numpy()
        return self.evidence.agreement(t)

    def starting_agreement(self) -> float | None:
        """The agreement the stage must keep: that of the order it was handed."""
        return self.flow_agreement(self.model, self.guide)

    def restart(self) -> None:
        """Go back to the state the stage started from."""
        raise NotImplementedError

    def fit_once(self, run: Run, stop_rules: Sequence[Callback] = (),
                 **checkpoint_options: Any) -> None:
        """Train the stage once (with ``stop_rules`` and the stage's own)."""
        run.fit(self.model, self.guide, self.data, self.epochs, self.description,
                early_stopping=run.early_stopping,
                stop_rules=[*stop_rules, *self.stop_rules(run, self.description)],
                **checkpoint_options)

    def train(self, run: Run, **checkpoint_options: Any) -> None:
        before = self.starting_agreement()
        policy = self.orientation or policies.ORIENTATION
        if before is None:
            self.fit_once(run, **checkpoint_options)
            return
        watch = OrderWatch(self, before, policy)
        self.fit_once(run, [watch], **checkpoint_options)
        after = self.flow_agreement(self.model, self.guide)
        run.config.setdefault("stage_flow_agreement", {}).update(
            {self.handed_by: before, self.name: after})
        if watch.lost or policy.lost_order(before, after, self.evidence):
            self.restart()
            description = f"{self.description} (time held)"
            with time_encoder_frozen(self.guide.encoder):
                run.fit(self.model, self.guide, self.data, self.epochs, description,
                        early_stopping=run.early_stopping,
                        stop_rules=self.stop_rules(run, description))
            run.config["time_held"] = [*(run.config.get("time_held") or []), self.name]


class BasicStage(Stage):
    """The basic model until the validation ELBO stops improving."""

    name, description = "basic", "Basic model"


class FullStage(OrderKeepingStage):
    """The mixture of ODEs, initialised from the fitted basic model (same ODE, rho near 1).

    ``without_ancestors``: an :class:`~pyro_velo.model.AncestralModel` trains the
    paper's one rate per cell here (its ancestors' rates come in a later stage).

    With ``evidence``, the basic fit's order is kept (:class:`OrderKeepingStage`): with
    a rate per cell state, the cell states can explain steady-state cell types on their
    own and the time then loses it; the stage then starts again from the basic fit with
    the encoder's time held fixed.

    Where :data:`~pyro_velo.policies.SETTLING` has a threshold (off by default), early
    stopping is on and the learning rates are constant (no ``lr_schedule``), each fit
    of the stage also ends once its velocity field has settled (:class:`VelocitySettled`):
    ``run.config['settled_epochs']`` maps the label of each fit that ended so (``'Mixture
    of ODEs'``, ``'Mixture of ODEs (time held)'``) to the epoch it ended after.
    """

    name, description = "full", "Mixture of ODEs"
    handed_by = "basic"
    completes_model = True

    def __init__(self, model, guide, data, epochs: int, basic_model: torch.nn.Module,
                 basic_guide: torch.nn.Module, without_ancestors: bool = False,
                 evidence: FlowEvidence | None = None, evidence_data=None,
                 orientation: OrientationPolicy | None = None) -> None:
        super().__init__(model, guide, data, epochs, evidence, evidence_data, orientation)
        self.basic_model, self.basic_guide = basic_model, basic_guide
        self.without_ancestors = without_ancestors

    def begin(self, run: Run) -> None:
        self.start_from_basic()
        super().begin(run)

    def start_from_basic(self) -> None:
        """Load the basic fit's ODE and encoder; ``rho`` starts near 1."""
        model, guide = self.model, self.guide
        model.load_state_dict(self.basic_model.state_dict(), strict=False)
        guide.encoder.load_state_dict(self.basic_guide.encoder.state_dict(), strict=False)
        with torch.no_grad():
            rho0 = model.transcription_rate(
                torch.zeros(1, model.latent_dim, device=model.log_alpha.device)).mean()
            model.log_alpha.sub_(rho0.log())
        if isinstance(guide, CombinedGuide):
            guide.rates.load_state_dict(self.basic_guide.rates.state_dict())
            rates_to_guide(model, guide)

    def restart(self) -> None:
        self.start_from_basic()

    def stop_rules(self, run: Run, description: str) -> list[Callback]:
        policy = policies.SETTLING
        # a one-cycle schedule ends the stage at a small rate by design: not cut there
        scheduled = run.fit_options.get("lr_schedule") is not None
        if not run.early_stopping or scheduled or policy.min_cosine is None:
            return []
        return [VelocitySettled(policy, run.config.setdefault("settled_epochs", {}),
                                description)]

    def starting_agreement(self) -> float | None:
        """The basic fit's agreement (the stage's own pair starts from it)."""
        return self.flow_agreement(self.basic_model, self.basic_guide)

    def train(self, run: Run, **checkpoint_options: Any) -> None:
        with (self.model.without_ancestors() if self.without_ancestors
              else contextlib.nullcontext()):
            super().train(run, **checkpoint_options)


class OrderWatch(Callback):
    """Stop an :class:`OrderKeepingStage` as soon as its time loses the order it was
    handed.

    Every ``policy.watch_every`` epochs the stage's cells are encoded and their time's
    agreement with the flow compared with ``before`` by
    :meth:`~pyro_velo.policies.OrientationPolicy.lost_order`. The stage is refitted
    with the time held in that case anyway, so the epochs after the loss would be
    wasted: on regulatory-network forks they were most of a second full stage.
    """

    def __init__(self, stage: OrderKeepingStage, before: float,
                 policy: OrientationPolicy) -> None:
        self.stage, self.before, self.policy = stage, before, policy
        self.lost = False

    def state_dict(self) -> dict[str, Any]:
        # a run resumed after the stop must still refit the stage with the time held
        return {"order_lost": self.lost}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lost = bool(state.get("order_lost", False))

    def on_epoch_end(self, loop: SVILoop) -> None:
        done = loop.epoch + 1 - loop.first_epoch
        if done % self.policy.watch_every or loop.stop:
            return
        now = self.stage.flow_agreement(loop.model, loop.guide)
        loop.model.train()  # encoding switched the pair to evaluation mode
        loop.guide.train()
        if self.policy.lost_order(self.before, now, self.stage.evidence):
            self.lost = True
            loop.request_stop()


class VelocitySettled(Callback):
    """End a stage once its velocity field has settled
    (:class:`~pyro_velo.policies.SettlingPolicy`).

    Every ``policy.check_every`` epochs (counted from the stage's first epoch, so a run
    resumed inside the stage checks at the same epochs) the velocity ``ds/dt`` of up to
    ``policy.max_cells`` validation cells (the training cells where there are none) is
    computed at their posterior mean time; once its mean cosine, cell by cell, with the
    field ``policy.lag`` epochs earlier reaches ``policy.min_cosine``, training stops
    there as early stopping would (the best validation ELBO's parameters are kept).
    The fields of the last ``lag`` epochs are part of the loop's resumable state.
    The epoch it stopped after is written to ``record[key]``.
    """

    def __init__(self, policy: SettlingPolicy, record: dict[str, int], key: str) -> None:
        self.policy, self.record, self.key = policy, record, key
        self.fields: dict[int, torch.Tensor] = {}

    def velocity(self, loop: SVILoop) -> torch.Tensor:
        """``ds/dt`` of the compared cells, ``(cells, fitted genes)``, on the CPU."""
        data, idx = loop.validation_cells
        if len(idx) == 0:
            data, idx = loop.data, loop.data.indices("train")
        idx = idx[:self.policy.max_cells]
        ds = Predictor(loop.model, loop.guide, data).expected(idx=idx)["ds"]
        loop.model.train()  # prediction switched the pair to evaluation mode
        loop.guide.train()
        return ds.detach().float().cpu()

    def on_epoch_end(self, loop: SVILoop) -> None:
        done = loop.epoch + 1
        if self.policy.min_cosine is None or done % self.policy.check_every or loop.stop:
            return
        now = self.velocity(loop)
        self.fields[done] = now
        before = self.fields.pop(done - self.policy.lag, None)
        settled = before is not None and self.policy.settled(mean_row_cosine(now, before))
        if loop.group is not None:  # every rank stops where rank 0 does
            settled = bool(dist_.broadcast_int(int(settled), loop.device))
        if settled:
            self.record[self.key] = done
            loop.request_stop()

    def state_dict(self) -> dict[str, Any]:
        return {"settling_fields": dict(self.fields)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fields = dict(state.get("settling_fields", {}))


def mean_row_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the cosine of ``a``'s and ``b``'s rows (rows where either is
    zero left out; 0 when none is left, which never counts as settled)."""
    norms = a.norm(dim=1) * b.norm(dim=1)
    valid = norms > 0
    if not bool(valid.any()):
        return 0.0
    return float(((a * b).sum(dim=1)[valid] / norms[valid]).mean())


class AncestorsStage(Stage):
    """The full model's fit continued with the ancestors' rates (every parameter trained,
    the ancestor table built afresh from this stage's steps). Checkpointed inside, under
    the name ``refine`` (the place of the last stage)."""

    name, description = "ancestors", "Ancestors' rates"

    @property
    def checkpoint_name(self) -> str:
        return "refine"

    def begin(self, run: Run) -> None:
        self.model.ancestors.clear()
        super().begin(run)


@contextlib.contextmanager
def speed_settings(modules: Sequence[torch.nn.Module], compile: bool | None = None,
                   bf16: bool | None = None) -> Iterator[None]:
    """Within the block, ``modules`` (and their submodules) compile their kinetics
    (``compile_kinetics``) and multiply their gene-wide layers in bfloat16
    (:class:`~pyro_velo.nn.WideLinear`'s ``bf16``), as given (None: unchanged).

    Both are switches of the instances, set here and restored afterwards: other models
    in the process are not affected.
    """
    saved = []
    for module in modules:
        for sub in module.modules():
            for name, value in (("compile_kinetics", compile), ("bf16", bf16)):
                if value is not None and hasattr(sub, name) and (
                        name == "compile_kinetics" or isinstance(sub, WideLinear)):
                    saved.append((sub, name, sub.__dict__.get(name, _CLASS_DEFAULT)))
                    setattr(sub, name, bool(value))
    try:
        yield
    finally:
        for sub, name, value in reversed(saved):
            if value is _CLASS_DEFAULT:
                vars(sub).pop(name, None)
            else:
                setattr(sub, name, value)


@contextlib.contextmanager
def time_encoder_frozen(encoder: torch.nn.Module) -> Iterator[None]:
    """Within the block, the encoder's shared body and its time head are not trained,
    so the time posterior stays as it was and only the cell-state head learns."""
    frozen = [p for p in (*encoder.body.parameters(), *encoder.t_head.parameters())
              if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


#: marks a switch that was the class default before :func:`speed_settings`
_CLASS_DEFAULT = object()


def run_stages(stages: Sequence[Stage], run: Run, checkpointer: Checkpointer,
               on_model_ready: Callable[[], None]) -> None:
    """Run ``stages`` in order, checkpointed by ``checkpointer``.

    A stage the resumed checkpoint has finished is skipped; one it was interrupted in
    continues from the saved loop state (without ``begin``). A checkpoint is written at
    the end of every stage (the last one marks the run finished). :attr:`Stage.eager`
    stages run with their model's kinetics uncompiled; ``on_model_ready`` is called once a
    :attr:`Stage.completes_model` stage is done (or was done before the resume).
    """
    order = [stage.checkpoint_name for stage in stages]
    for number, stage in enumerate(stages):
        key = stage.checkpoint_name
        if checkpointer.todo(key, order):
            if not checkpointer.resuming(key):
                stage.begin(run)
            options = (checkpointer.fit_options(key, run.history, run.config)
                       if stage.checkpoint_inside else {})
            with speed_settings([stage.model], compile=False if stage.eager else None):
                stage.train(run, **options)
            checkpointer.stage_done(key, run.history, run.config,
                                    finished=number == len(stages) - 1)
        if stage.completes_model:
            on_model_ready()


def selection_split(data: VelocityData | DiskVelocityData) -> str:
    """The split that chooses between fits (warm-ups, refinement, restarts): the
    validation cells, or the training cells where there are none."""
    return "validation" if (data.split == 1).any() else "train"


def rates_to_guide(model: torch.nn.Module, guide: torch.nn.Module) -> None:
    """Move the rate posteriors' locations to the model's point values (after a re-fit)."""
    if isinstance(guide, CombinedGuide):
        with torch.no_grad():
            for name in guide.rates.names:
                getattr(guide.rates, f"log_{name}_loc").copy_(getattr(model, f"log_{name}"))


def rates_from_guide(model: torch.nn.Module, guide: torch.nn.Module) -> None:
    """Set the model's point rates to the posterior medians of random rates (prediction)."""
    if isinstance(guide, CombinedGuide):
        with torch.no_grad():
            for name in guide.rates.names:
                getattr(model, f"log_{name}").copy_(getattr(guide.rates, f"log_{name}_loc"))
