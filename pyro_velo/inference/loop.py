"""The one SVI training loop: minibatch steps and validation, with callbacks for the rest.

:func:`fit` uses Pyro's :class:`~pyro.infer.Trace_ELBO` as a differentiable loss on the
(model, guide) pair of :class:`~pyro.nn.PyroModule` s, and a torch Adam optimiser with two
parameter groups: the networks at ``lr`` (the paper's 2e-4) and the per-gene ODE
parameters at ``lr_ode``. Everything else a training needs (divergence checks, early
stopping, checkpoints, progress output, timing, a caller's stop rule) is a
:class:`~pyro_velo.inference.callbacks.Callback`. Parameters are local to the modules
(Pyro's ``module_local_params``), so several fitted models can live in one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import pyro
import torch
from pyro.infer import Trace_ELBO
from torch import Tensor

from .. import distributed as dist_
from .._checks import check_int, check_real
from .._params import local_params
from .callbacks import (
    Callback,
    CheckpointHook,
    DivergenceCheck,
    EarlyStopping,
    LearningRateSchedule,
    Progress,
    StopWhen,
)
from .checkpoint import get_rng_state, set_rng_state
from .history import TrainingHistory

if TYPE_CHECKING:
    from ..data import VelocityData
    from ..disk import DiskVelocityData
    from ..policies import LearningRatePolicy


def loss_module(model: torch.nn.Module, guide: torch.nn.Module) -> torch.nn.Module:
    """The negative-ELBO module of a (model, guide) pair; its parameters are both modules'."""
    return Trace_ELBO()(model, guide)


def evaluate_loss(model: torch.nn.Module, guide: torch.nn.Module,
                  data: VelocityData | DiskVelocityData, idx: Tensor,
                  batch_size: int = 1024) -> float:
    """Mean negative ELBO per cell over the cells ``idx`` (networks in eval mode)."""
    if len(idx) == 0:
        return math.nan
    return loss_total(model, guide, data, idx, batch_size).item() / len(idx)


def loss_total(model: torch.nn.Module, guide: torch.nn.Module,
               data: VelocityData | DiskVelocityData, idx: Tensor,
               batch_size: int = 1024) -> Tensor:
    """Negative ELBO summed over the cells ``idx`` (networks in eval mode).

    A float64 scalar on the data's device (0 for no cells); accumulated there, so that
    the host waits once, when the caller reads it, not once per minibatch.
    """
    elbo = loss_module(model, guide)
    was_training = guide.training
    guide.eval()
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    with torch.no_grad(), local_params():
        for _batch, args, kwargs in data.minibatches(idx, batch_size):
            total += elbo(*args, **kwargs).detach().double()
    guide.train(was_training)
    return total


def check_training_arguments(**values: Any) -> None:
    """Validate training arguments by name (those given; ``None`` means "default").

    ``max_epochs``, ``basic_epochs``, ``patience``, ``checkpoint_every``,
    ``divergence_check_every``, ``num_threads``: integers >= 1; ``batch_size``:
    integer >= 2; ``warmup_epochs``, ``refine_epochs``: integers >= 0; ``lr``,
    ``lr_ode``: positive finite numbers.

    Raises
    ------
    InputError
        Naming the first invalid argument.
    """
    minimum = {"max_epochs": 1, "patience": 1, "checkpoint_every": 1, "batch_size": 2,
               "warmup_epochs": 0, "basic_epochs": 1, "refine_epochs": 0,
               "divergence_check_every": 1, "num_threads": 1}
    for name, value in values.items():
        if value is None:
            continue
        if name in minimum:
            check_int(value, name, minimum=minimum[name])
        elif name in ("lr", "lr_ode"):
            check_real(value, name, positive=True)
        else:
            raise TypeError(f"unknown training argument {name!r}")


def ode_parameter_ids(*modules: torch.nn.Module) -> set[int]:
    """Ids of the per-gene ODE parameters of ``modules`` (trained at ``lr_ode``).

    A module declares them with an ``ode_parameters()`` method (the models, the
    likelihoods and the rate guide do); network weights never are.
    """
    ids: set[int] = set()
    for module in modules:
        for sub in module.modules():
            declare = getattr(sub, "ode_parameters", None)
            if callable(declare):
                ids.update(id(p) for p in declare())
    return ids


def fit(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    data: VelocityData | DiskVelocityData,
    max_epochs: int,
    batch_size: int = 128,
    lr: float = 2e-4,
    lr_ode: float = 1e-2,
    early_stopping: bool = True,
    patience: int = 30,
    min_delta: float = 1e-3,
    progress_bar: bool = True,
    history: TrainingHistory | None = None,
    description: str = "Training",
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every: int = 10,
    resume_state: dict[str, Any] | None = None,
    distributed: bool | None = None,
    divergence_check_every: int | None = None,
    stop_when: Callable[[TrainingHistory], bool] | None = None,
    stop_rules: Sequence[Callback] = (),
    callbacks: Sequence[Callback] = (),
    lr_schedule: LearningRatePolicy | None = None,
) -> TrainingHistory:
    """Train ``model``/``guide`` on the train cells of ``data`` by minibatch SVI.

    Parameters
    ----------
    model, guide
        Pyro modules with signature ``(u, s, idx, n_obs, **kwargs)`` (kwargs: see
        :meth:`VelocityData.model_inputs`). The parameters their modules declare with
        ``ode_parameters()`` (rates, switch times, noise, rate posteriors) use
        ``lr_ode``; everything else (networks) uses ``lr``.
    data
        Training data with its split; the test split is never looked at. Minibatches
        come on the data's ``device``, where the modules must be. The validation loss is
        taken on ``data.validation_cells()`` where the data has it: every validation
        cell in memory; from a file, those cells read once into memory (a fixed, evenly
        spaced subset of them when they exceed 256 MiB, see
        :meth:`~pyro_velo.disk.DiskVelocityData.validation_cells`); other data objects
        are validated on all their validation cells in place.
    max_epochs
        Upper bound on the number of passes over the train cells.
    batch_size, lr, lr_ode
        Minibatch size and Adam learning rates. In distributed training ``batch_size``
        is the global minibatch, split across the processes.
    early_stopping, patience, min_delta
        Stop when the validation loss has not improved by ``min_delta`` (relative) for
        ``patience`` epochs and restore the parameters of the best epoch (see
        :class:`~pyro_velo.inference.callbacks.EarlyStopping`). Without validation
        cells the train loss is monitored instead.
    progress_bar
        Show progress (see :class:`~pyro_velo.inference.callbacks.Progress`; in
        distributed training on rank 0 only).
    history
        Append to this history (for multi-stage training) instead of a new one.
    description
        Name of the stage in the progress output.
    checkpoint, checkpoint_every, resume_state
        Called with this loop's resumable state after every epoch at which
        ``len(history.train)`` is a multiple of ``checkpoint_every`` (see
        :class:`~pyro_velo.inference.callbacks.CheckpointHook`); ``resume_state``, such
        a state from an earlier, interrupted call with the same arguments, continues
        after its epoch with the optimiser, the minibatch order, the random states and
        the early-stopping state restored. ``model`` and ``guide`` must already hold the
        parameters of that epoch.
    distributed
        Data-parallel training with :class:`~torch.nn.parallel.DistributedDataParallel`
        over the default process group (see :mod:`pyro_velo.distributed`). None (default):
        when a process group of two or more processes is initialised; True: always
        (a process group must be initialised); False: never. Every process must call
        ``fit`` with the same arguments, modules and data.
    divergence_check_every
        Minibatch steps between checks for a non-finite loss or gradient (see
        :class:`~pyro_velo.inference.callbacks.DivergenceCheck`).
    stop_when
        Called with the history after every epoch (after the early-stopping
        bookkeeping); returning True ends training there, as early stopping does.
    stop_rules
        Callbacks that may end training (e.g. the stages'
        :class:`~pyro_velo.inference.stages.VelocitySettled`), called before the
        checkpoint is written at the end of an epoch, so that it holds their decision
        and their state.
    callbacks
        Further :class:`~pyro_velo.inference.callbacks.Callback` s, called after the
        built-in ones at every hook.
    lr_schedule
        Learning rates over the ``max_epochs`` epochs as multiples of ``lr`` and
        ``lr_ode`` (:class:`~pyro_velo.policies.LearningRatePolicy`, through
        :class:`~pyro_velo.inference.callbacks.LearningRateSchedule`); None: constant.

    Returns
    -------
    TrainingHistory

    Notes
    -----
    Distribution argument validation (Pyro's and torch's, when enabled) runs in the
    first epoch of the call only: it checks the model and the data once, and every
    later epoch saves its cost.

    Raises
    ------
    DivergenceError
        At the minibatch step where the loss or a gradient becomes NaN/inf, or at the
        end of an epoch whose validation loss is NaN/inf.
    InputError
        Invalid ``max_epochs``, ``batch_size``, learning rates, ``patience`` or
        ``divergence_check_every``.
    """
    check_training_arguments(max_epochs=max_epochs, batch_size=batch_size, lr=lr,
                             lr_ode=lr_ode, patience=patience,
                             checkpoint_every=checkpoint_every,
                             divergence_check_every=divergence_check_every)
    early = EarlyStopping(patience, min_delta, enabled=early_stopping)
    builtin: list[Callback] = [DivergenceCheck(divergence_check_every), early]
    if stop_when is not None:
        builtin.append(StopWhen(stop_when))
    builtin.extend(stop_rules)
    if checkpoint is not None:
        builtin.append(CheckpointHook(checkpoint, checkpoint_every))
    if lr_schedule is not None:
        builtin.append(LearningRateSchedule(lr_schedule))
    builtin.append(Progress(description, enabled=progress_bar))
    loop = SVILoop(model, guide, data, batch_size, lr, lr_ode, distributed,
                   [*builtin, *callbacks], description)
    return loop.run(max_epochs, history if history is not None else TrainingHistory(),
                    resume_state)


class SVILoop:
    """One training run of ``model``/``guide`` on ``data``: the state callbacks read.

    Attributes a callback may read: ``model``, ``guide``, ``data``, ``history``,
    ``optimizer``, ``generator`` (minibatch order), ``group`` (the distributed process
    group or None), ``is_main`` (rank 0 or alone), ``epoch`` (0-based, of this call),
    ``max_epochs``, ``steps_per_epoch`` (minibatches of a full epoch), ``monitored``
    (the loss early stopping watches, after each epoch), ``has_validation``,
    ``validation_cells`` (``(data, idx)`` of the validation loss), ``description``; a
    callback ends training with :meth:`request_stop`.
    """

    def __init__(self, model: torch.nn.Module, guide: torch.nn.Module,
                 data: VelocityData | DiskVelocityData, batch_size: int, lr: float,
                 lr_ode: float, distributed: bool | None, callbacks: Sequence[Callback],
                 description: str = "Training") -> None:
        self.model, self.guide, self.data = model, guide, data
        self.batch_size, self.lr, self.lr_ode = batch_size, lr, lr_ode
        self.callbacks = list(callbacks)
        self.description = description
        self.group = dist_.current_group(distributed)
        self.is_main = self.group is None or self.group.is_main
        self.device = torch.device(data.device)
        self.elbo = loss_module(model, guide)
        ode_ids = ode_parameter_ids(model, guide)
        ode = [p for p in self.elbo.parameters() if id(p) in ode_ids]
        net = [p for p in self.elbo.parameters() if id(p) not in ode_ids]
        self.optimizer = adam([{"params": net, "lr": lr}, {"params": ode, "lr": lr_ode}])
        self.named = [(f"model.{n}", p) for n, p in model.named_parameters()] + [
            (f"guide.{n}", p) for n, p in guide.named_parameters()]
        self.stop = False
        self.epoch = self.first_epoch = 0
        self.steps_per_epoch = 1
        self.monitored = math.nan

    def request_stop(self) -> None:
        """End training after this epoch (as early stopping does); callbacks call it."""
        self.stop = True
        self.history.stopped_early = True

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def state_dict(self) -> dict[str, Any]:
        """The loop's resumable state after the current epoch, with every callback's."""
        state = {"epoch": self.epoch + 1, "optimizer": self.optimizer.state_dict(),
                 "generator": self.generator.get_state(), "rng": get_rng_state(),
                 "stopped": self.stop}
        for callback in self.callbacks:
            state.update(callback.state_dict())
        return state

    def _load_state_dict(self, state: dict[str, Any]) -> int:
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.generator.set_state(state["generator"])
        for callback in self.callbacks:
            callback.load_state_dict(state)
        self.stop = state["stopped"]
        set_rng_state(state["rng"])
        return state["epoch"]

    def run(self, max_epochs: int, history: TrainingHistory,
            resume_state: dict[str, Any] | None = None) -> TrainingHistory:
        """Train up to ``max_epochs`` epochs, appending to ``history``; return it."""
        self.history, self.max_epochs = history, max_epochs
        train_idx = self.data.indices("train")
        held = getattr(self.data, "validation_cells", None)  # else validate in place
        val_data, val_idx = held() if held is not None else (
            self.data, self.data.indices("validation"))
        self.validation_cells = (val_data, val_idx)
        self.has_validation = len(val_idx) > 0
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        if self.group is not None:  # the same minibatch order on every rank
            seed = dist_.broadcast_int(seed, self.device)
        self.generator = torch.Generator().manual_seed(seed)
        start = 0 if resume_state is None else self._load_state_dict(resume_state)
        self.first_epoch = start
        world = 1 if self.group is None else self.group.world_size
        step_loss = self.elbo if self.group is None else dist_.wrap(self.elbo, self.device)
        n_train = len(train_idx)
        self.steps_per_epoch = max(1, math.ceil(n_train / self.batch_size))
        self._call("on_fit_start")
        self.model.train()
        self.guide.train()
        for epoch in range(start, max_epochs) if not self.stop else range(0):
            self.epoch = epoch
            self._call("on_epoch_start")
            epoch_loss = torch.zeros((), device=self.device)
            # Pyro's and torch's argument checks run in the first epoch of each call,
            # which sees every training and validation cell; later epochs skip them
            # (about 8% of an epoch at 3,700 x 2,000): non-finite values still raise
            checks = nullcontext() if epoch == start else pyro.validation_enabled(False)
            with local_params(), checks, dist_.training_group(self.group), (
                    nullcontext() if self.group is None
                    else dist_.rank_random_stream(self.group, self.device)):
                batches = self.data.minibatches(train_idx, self.batch_size, n_train,
                                                generator=self.generator)
                for step, (batch, args, kwargs) in enumerate(batches):
                    n = len(batch)
                    if n // world < 2 and n_train >= 2:
                        continue  # batch norm needs two cells (on every rank)
                    self._call("on_batch_start", step)
                    if self.group is not None:  # this rank's part of the minibatch
                        first, last = dist_.shard(n, self.group)
                        args, kwargs = dist_.take((args, kwargs), n, first, last)
                        n = last - first
                    try:
                        loss = step_loss(*args, **kwargs)
                    except ValueError as err:  # distribution validation of NaN values
                        self._call("on_invalid_step", step, err)
                        raise
                    self.optimizer.zero_grad()
                    loss.backward()
                    self._call("on_after_backward", step, loss)
                    self.optimizer.step()
                    epoch_loss += loss.detach() * (n / n_train)
                    self._call("on_step_end", step)
                self._call("on_train_epoch_end")
                if self.group is not None:
                    dist_.average_norm_statistics(self.elbo, self.group)
                self._call("on_validation_start")
                if self.has_validation:
                    first, last = (0, len(val_idx)) if self.group is None else dist_.shard(
                        len(val_idx), self.group)
                    val_total = loss_total(self.model, self.guide, val_data,
                                           val_idx[first:last])
            self._record(epoch_loss, val_total if self.has_validation else None,
                         n_train, len(val_idx))
            self._call("on_epoch_end")
            if self.stop:
                break
        del step_loss  # a DDP wrapper's hooks go with it
        self._call("on_fit_end")
        self.model.eval()
        self.guide.eval()
        return history

    def _record(self, epoch_loss: Tensor, val_total: Tensor | None, n_train: int,
                n_val: int) -> None:
        """Append the epoch's mean losses to the history (summed over the ranks)."""
        history = self.history
        if self.group is None:
            history.train.append(epoch_loss.item() / n_train)
            if val_total is not None:
                history.validation.append(val_total.item() / n_val)
        else:  # sums over the ranks: the same numbers (and decisions) on every rank
            totals = torch.stack([epoch_loss.double(), val_total if val_total is not None
                                  else torch.zeros((), dtype=torch.float64,
                                                   device=self.device)])
            totals = dist_.all_reduce_sum(totals).tolist()
            history.train.append(totals[0] / n_train)
            if val_total is not None:
                history.validation.append(totals[1] / n_val)
        self.monitored = history.validation[-1] if val_total is not None else history.train[-1]


def adam(groups: list[dict[str, Any]]) -> torch.optim.Adam:
    """Adam over ``groups``: the fused implementation where torch has it for the device.

    Same update rule; on CPU it is about 3x cheaper than the default per-tensor loop
    (3 vs 10 ms per step for the full model at 2000 genes, one thread).
    """
    try:
        return torch.optim.Adam(groups, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(groups)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``, keeping the implementation it was built with.

    A state saved by the other implementation (the per-tensor Adam where no fused one
    was available, or by an earlier version) would otherwise bring its ``fused`` flag
    along; the step counts of a fused Adam live on the parameters' device.
    """
    built = [{k: group[k] for k in ("fused", "foreach", "capturable") if k in group}
             for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, options in zip(optimizer.param_groups, built, strict=True):
        group.update(options)
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if step is not None:
                optimizer.state[p]["step"] = (
                    step.to(device=p.device, dtype=torch.float32) if options.get("fused")
                    else step.cpu())


__all__ = ["SVILoop", "TrainingHistory", "adam", "check_training_arguments",
           "evaluate_loss", "fit", "loss_module", "loss_total", "ode_parameter_ids"]
