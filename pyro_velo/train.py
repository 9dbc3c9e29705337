"""Stochastic variational inference: the training loop, evaluation and early stopping.

The loop uses Pyro's :class:`~pyro.infer.Trace_ELBO` as a differentiable loss on the
(model, guide) pair of :class:`~pyro.nn.PyroModule` s, and a torch Adam optimiser with two
parameter groups: the networks at ``lr`` (the paper's 2e-4) and the per-gene ODE
parameters at ``lr_ode``. Parameters are local to the modules (Pyro's
``module_local_params``), so several fitted models can live in one Python session.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import pyro.util
import torch
from pyro.infer import Trace_ELBO
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed as dist_
from ._checks import InputError, MissingFileError, check_int, check_real
from ._params import adopt_module as adopt_module  # re-exported
from ._params import local_params
from ._params import set_seed as set_seed  # re-exported
from .data import VelocityData

if TYPE_CHECKING:
    from .disk import DiskVelocityData


@dataclass
class TrainingHistory:
    """Per-epoch mean negative ELBO per cell on the train and validation cells.

    ``stages`` lists ``(name, first epoch)`` of each training stage.
    """

    train: list[float] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)
    stages: list[tuple[str, int]] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False


class DivergenceError(FloatingPointError):
    """Raised when the ELBO, a gradient or a parameter becomes NaN or infinite in training."""


def loss_module(model: torch.nn.Module, guide: torch.nn.Module) -> torch.nn.Module:
    """The negative-ELBO module of a (model, guide) pair; its parameters are both modules'."""
    return Trace_ELBO()(model, guide)


def evaluate_loss(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    data: VelocityData | DiskVelocityData,
    idx: Tensor,
    batch_size: int = 1024,
) -> float:
    """Mean negative ELBO per cell over the cells ``idx`` (networks in eval mode)."""
    if len(idx) == 0:
        return math.nan
    return loss_total(model, guide, data, idx, batch_size).item() / len(idx)


def loss_total(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    data: VelocityData | DiskVelocityData,
    idx: Tensor,
    batch_size: int = 1024,
) -> Tensor:
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


#: Minibatch steps between divergence checks when training off the CPU (see :func:`fit`).
DEFERRED_CHECK_EVERY = 50


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
) -> TrainingHistory:
    """Train ``model``/``guide`` on the train cells of ``data`` by minibatch SVI.

    Parameters
    ----------
    model, guide
        Pyro modules with signature ``(u, s, idx, n_obs, **kwargs)`` (kwargs: see
        :meth:`VelocityData.model_inputs`). Per-gene parameters, of model or guide, named
        ``log_*`` or ``t_*`` (rates, switch times, noise, rate posteriors) use ``lr_ode``;
        everything else (networks) uses ``lr``.
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
    early_stopping
        Stop when the validation loss has not improved by ``min_delta`` (relative) for
        ``patience`` epochs and restore the parameters of the best epoch. Without
        validation cells the train loss is monitored instead.
    progress_bar
        Show a tqdm bar with the current losses (in distributed training on rank 0 only).
    history
        Append to this history (for multi-stage training) instead of a new one.
    description
        Label of the progress bar.
    checkpoint
        Called with this loop's resumable state (see :func:`fit_state`) after every
        epoch at which ``len(history.train)`` is a multiple of ``checkpoint_every``; it
        is meant to write a checkpoint (the model and guide parameters are not in the
        state: the caller saves them). In distributed training it is called on rank 0
        only.
    checkpoint_every
        Epochs between calls of ``checkpoint``.
    resume_state
        A state passed to ``checkpoint`` by an earlier, interrupted call with the same
        arguments: the loop continues after its epoch with the optimiser (Adam moments
        and step counts), the minibatch-order generator, the torch / numpy / Python
        random states and the early-stopping state (best loss, best parameters, epochs
        since the best) restored. ``model`` and ``guide`` must already hold the
        parameters of that epoch.
    distributed
        Data-parallel training with :class:`~torch.nn.parallel.DistributedDataParallel`
        over the default process group (see :mod:`pyro_velo.distributed`). None (default):
        when a process group of two or more processes is initialised; True: always
        (a process group must be initialised); False: never. Every process must call
        ``fit`` with the same arguments, modules and data.
    divergence_check_every
        Minibatch steps between checks for a non-finite loss or gradient. Default: 1 on
        CPU (where the check costs nothing), :data:`DEFERRED_CHECK_EVERY` on other
        devices, where reading the check's result makes the host wait for the device.
        With more than 1 (a *deferred* check) the finiteness of every step is recorded
        on the device and read every ``divergence_check_every`` steps and at the end of
        every epoch; from the first non-finite step on, no optimiser step updates the
        parameters (Adam's fused implementation skips them on the device), so the
        parameters are those before that step, as with the per-step check; the error
        comes up to ``divergence_check_every - 1`` steps later and names the first
        non-finite step.
    stop_when
        Called with the history after every epoch (after the early-stopping
        bookkeeping); returning True ends training there, as early stopping does (the
        best epoch's parameters are restored when ``early_stopping``). In distributed
        training it must give the same answer on every process.

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
        At the minibatch step where the loss or a gradient becomes NaN/inf (checked
        before the optimiser step, so no parameter is updated with it; with a deferred
        check, at the next check), or at the end of an epoch whose validation loss is
        NaN/inf. The message names the non-finite gradients or parameters.
    InputError
        Invalid ``max_epochs``, ``batch_size``, learning rates, ``patience`` or
        ``divergence_check_every``.
    """
    check_training_arguments(max_epochs=max_epochs, batch_size=batch_size, lr=lr,
                             lr_ode=lr_ode, patience=patience,
                             checkpoint_every=checkpoint_every,
                             divergence_check_every=divergence_check_every)
    history = history if history is not None else TrainingHistory()
    group = dist_.current_group(distributed)
    device = torch.device(data.device)
    train_idx = data.indices("train")
    held = getattr(data, "validation_cells", None)  # other data objects: validate in place
    val_data, val_idx = held() if held is not None else (data, data.indices("validation"))
    n_train = len(train_idx)
    elbo = loss_module(model, guide)
    ode_params = [p for n, p in elbo.named_parameters() if _is_ode_param(n)]
    ode_ids = {id(p) for p in ode_params}
    net_params = [p for p in elbo.parameters() if id(p) not in ode_ids]
    groups = [{"params": net_params, "lr": lr}, {"params": ode_params, "lr": lr_ode}]
    check_every = divergence_check_every or (
        1 if device.type == "cpu" else DEFERRED_CHECK_EVERY)
    checker = None
    optimizer = _adam(groups)
    if check_every > 1:
        if optimizer.defaults.get("fused"):
            # the fused Adam skips steps flagged in ``found_inf`` without a host sync
            checker = _DeferredCheck(device, group)
            optimizer.found_inf = checker.bad
        else:  # no fused Adam here: check every step
            check_every = 1

    named = [(f"model.{n}", p) for n, p in model.named_parameters()] + [
        (f"guide.{n}", p) for n, p in guide.named_parameters()]
    all_params = [p for _, p in named]

    def diverged(epoch: int, step: int | None = None, loss: Tensor | None = None) -> str:
        return _divergence_message(model, guide, epoch, lr, lr_ode, step, loss, named)

    best_loss, best_state, since_best, stopped = math.inf, None, 0, False
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    if group is not None:  # the same minibatch order on every rank
        seed = dist_.broadcast_int(seed, device)
    gen = torch.Generator().manual_seed(seed)
    start_epoch = 0
    if resume_state is not None:
        _load_optimizer_state(optimizer, resume_state["optimizer"])
        gen.set_state(resume_state["generator"])
        best_loss = resume_state["best_loss"]
        best_state = resume_state["best_state"]
        since_best = resume_state["since_best"]
        stopped = resume_state["stopped"]
        start_epoch = resume_state["epoch"]
        set_rng_state(resume_state["rng"])
    main = group is None or group.is_main
    world = 1 if group is None else group.world_size
    step_loss = elbo if group is None else dist_.wrap(elbo, device)
    epochs = range(start_epoch, max_epochs) if not stopped else range(0)
    bar = tqdm(epochs, desc=description, disable=not (progress_bar and main), leave=True)
    model.train()
    guide.train()
    for epoch in bar:
        epoch_loss = torch.zeros((), device=device)
        # Pyro's and torch's argument checks run in the first epoch of each call, which
        # sees every training and validation cell; later epochs skip them (about 8% of
        # an epoch at 3,700 x 2,000): non-finite values still raise DivergenceError
        checks = nullcontext() if epoch == epochs.start else pyro.validation_enabled(False)
        with local_params(), checks, dist_.training_group(group), (
                nullcontext() if group is None else dist_.rank_random_stream(group, device)):
            batches = data.minibatches(train_idx, batch_size, n_train, generator=gen)
            taken = 0
            for step, (batch, args, kwargs) in enumerate(batches):
                n = len(batch)
                if n // world < 2 and n_train >= 2:
                    continue  # batch norm needs two cells (on every rank)
                if group is not None:  # this rank's part of the minibatch
                    start, stop = dist_.shard(n, group)
                    args, kwargs = dist_.take((args, kwargs), n, start, stop)
                    n = stop - start
                try:
                    loss = step_loss(*args, **kwargs)
                except ValueError as err:  # distribution validation of NaN parameters
                    if _all_finite(model) and _all_finite(guide):
                        raise
                    raise DivergenceError(diverged(epoch, step)) from err
                optimizer.zero_grad()
                loss.backward()
                if checker is None:
                    # the loss and every gradient are checked together: NaN/inf in any
                    # of them makes the sum non-finite (before the step, so no
                    # parameter is ever updated with a non-finite gradient); on CPU
                    # reading the result costs nothing
                    if not torch.isfinite(loss.detach() + _gradient_sum(all_params)):
                        raise DivergenceError(diverged(epoch, step, loss))
                else:
                    checker.record(step, loss.detach(), all_params)
                optimizer.step()
                epoch_loss += loss.detach() * (n / n_train)
                taken += 1
                if checker is not None and taken % check_every == 0:
                    checker.raise_if_diverged(diverged, epoch, step, check_every)
            if checker is not None:
                checker.raise_if_diverged(diverged, epoch, None, check_every)
            if group is not None:
                dist_.average_norm_statistics(elbo, group)
            if len(val_idx):
                start, stop = (0, len(val_idx)) if group is None else dist_.shard(
                    len(val_idx), group)
                val_total = loss_total(model, guide, val_data, val_idx[start:stop])
        if group is None:
            history.train.append(epoch_loss.item() / n_train)
            if len(val_idx):
                history.validation.append(val_total.item() / len(val_idx))
        else:  # sums over the ranks: the same numbers (and decisions) on every rank
            totals = torch.stack([epoch_loss.double(), val_total if len(val_idx)
                                  else torch.zeros((), dtype=torch.float64, device=device)])
            totals = dist_.all_reduce_sum(totals).tolist()
            history.train.append(totals[0] / n_train)
            if len(val_idx):
                history.validation.append(totals[1] / len(val_idx))
        monitored = history.validation[-1] if len(val_idx) else history.train[-1]
        if not math.isfinite(monitored):
            raise DivergenceError(diverged(epoch))
        bar.set_postfix(train=f"{history.train[-1]:.3f}",
                        val=f"{history.validation[-1]:.3f}" if len(val_idx) else "-")
        if monitored < best_loss - min_delta * abs(best_loss if math.isfinite(best_loss) else 1):
            best_loss, since_best = monitored, 0
            history.best_epoch = len(history.train) - 1
            if early_stopping:
                best_state = (copy.deepcopy(model.state_dict()), copy.deepcopy(guide.state_dict()))
        else:
            since_best += 1
        stopped = early_stopping and since_best >= patience
        if not stopped and stop_when is not None and stop_when(history):
            stopped = True
        if stopped:
            history.stopped_early = True
        if checkpoint is not None and main and len(history.train) % checkpoint_every == 0:
            checkpoint(fit_state(epoch + 1, optimizer, gen, best_loss, best_state, since_best,
                                 stopped))
        if stopped:
            break
    bar.close()
    del step_loss  # a DDP wrapper's hooks go with it
    if early_stopping and best_state is not None:
        model.load_state_dict(best_state[0])
        guide.load_state_dict(best_state[1])
    model.eval()
    guide.eval()
    return history


def _adam(groups: list[dict[str, Any]]) -> torch.optim.Adam:
    """Adam over ``groups``: the fused implementation where torch has it for the device.

    Same update rule; on CPU it is about 3x cheaper than the default per-tensor loop
    (3 vs 10 ms per step for the full model at 2000 genes, one thread).
    """
    try:
        return torch.optim.Adam(groups, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(groups)


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
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


class _DeferredCheck:
    """Finiteness of every step's loss and gradients, recorded on the device.

    ``bad`` (float32, 0 or 1) is also the optimiser's ``found_inf``: once a step is
    non-finite, the fused Adam skips that and every later step until the error is raised.
    """

    def __init__(self, device: torch.device, group: dist_.Group | None) -> None:
        self.group = group
        self.bad = torch.zeros((), dtype=torch.float32, device=device)
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_loss = torch.zeros((), dtype=torch.float32, device=device)

    def record(self, step: int, loss: Tensor, params: list[Tensor]) -> None:
        failed = ~torch.isfinite(loss + _gradient_sum(params))
        first = failed & (self.bad == 0)
        self.first_step.copy_(torch.where(first, step, self.first_step))
        self.first_loss.copy_(torch.where(first, loss.float(), self.first_loss))
        self.bad.copy_(torch.maximum(self.bad, failed.float()))

    def raise_if_diverged(self, diverged: Callable[..., str], epoch: int, step: int | None,
                          every: int) -> None:
        """Read the record (the host waits here) and raise at a non-finite step."""
        flags = torch.stack([self.bad, self.first_step.float()])
        if self.group is not None:  # every rank raises if any rank saw one
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad, first = flags.tolist()
        if not bad:
            return
        local = int(self.first_step.item()) >= 0
        at = "the end of the epoch" if step is None else f"step {step}"
        raise DivergenceError(
            diverged(epoch, int(first), self.first_loss if local else None)
            + f" (found by the check at {at}: off the CPU the check is read every "
            f"{every} steps; no optimiser step was taken from step {int(first)} on)")


def _is_ode_param(name: str) -> bool:
    """Per-gene parameters (rates, switch times, noise, rate posteriors): ``log_*``, ``t_*``.

    Network weights and biases (``weight``, ``bias``) never match.
    """
    return name.rsplit(".", 1)[-1].startswith(("log_", "t_"))


def _all_finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


def _gradient_sum(params: list[Tensor]) -> Tensor:
    """Sum of all gradient entries: non-finite iff some gradient entry is (or overflow)."""
    sums = [p.grad.sum() for p in params if p.grad is not None]
    return torch.stack(sums).sum() if sums else torch.zeros(())


def _divergence_message(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    epoch: int,
    lr: float,
    lr_ode: float,
    step: int | None = None,
    loss: Tensor | None = None,
    named: list[tuple[str, Tensor]] | None = None,
) -> str:
    bad = [f"{owner}.{n}" for owner, module in (("model", model), ("guide", guide))
           for n, p in module.named_parameters() if not torch.isfinite(p).all()]
    bad_grad = [n for n, p in (named or []) if p.grad is not None
                and not torch.isfinite(p.grad).all()]
    at = f"epoch {epoch}" + (f", minibatch step {step}" if step is not None else "")
    if loss is not None and torch.isfinite(loss) and bad_grad:
        what = (f"the gradient of {', '.join(bad_grad)} became NaN/inf while the loss "
                f"({float(loss.detach()):.4g}) was finite; the optimiser step was not taken")
    else:
        where = f"non-finite parameters: {', '.join(bad)}" if bad else "the loss itself"
        what = f"the ELBO became NaN/inf ({where})"
    return (
        f"training diverged at {at}: {what}. "
        f"Try a smaller learning rate (lr={lr:g}, lr_ode={lr_ode:g}), a larger batch_size, "
        "or check the input layers for extreme values."
    )


# ---- checkpoints ---------------------------------------------------------------------
def get_rng_state() -> dict[str, Any]:
    """torch, numpy and Python random states, storable with ``torch.load(weights_only=True)``."""
    state = pyro.util.get_rng_state()
    kind, keys, pos, has_gauss, cached = state["numpy"]
    return {"torch": state["torch"], "random": state["random"],
            "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                      int(has_gauss), float(cached))}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states returned by :func:`get_rng_state`."""
    kind, keys, pos, has_gauss, cached = state["numpy"]
    pyro.util.set_rng_state({
        "torch": state["torch"], "random": state["random"],
        "numpy": (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)})


def fit_state(
    epoch: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    best_loss: float,
    best_state: tuple[dict, dict] | None,
    since_best: int,
    stopped: bool,
) -> dict[str, Any]:
    """The state :func:`fit` needs to continue after ``epoch`` epochs (``resume_state``)."""
    return {"epoch": epoch, "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(), "rng": get_rng_state(),
            "best_loss": best_loss, "best_state": best_state, "since_best": since_best,
            "stopped": stopped}


def write_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (a partly written file is never left)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`write_checkpoint`.

    Raises
    ------
    MissingFileError
        No file at ``path``.
    InputError
        The file cannot be read as a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"no checkpoint to resume from: {path} does not exist. Train once with "
            f"checkpoint_dir={str(path.parent)!r} first, or pass resume=False.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of many types for a damaged file
        raise InputError(f"cannot read the checkpoint {path} (damaged or not a "
                         f"checkpoint): {err}") from err
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise InputError(f"{path} is not a pyro_velo training checkpoint")
    return payload


#: Version of the checkpoint layout written by :class:`Checkpointer`.
CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"
#: Training stages in the order :meth:`pyro_velo.VeloVAE.train` runs them.
STAGES = ("warm-up", "basic", "full", "refine")


class Checkpointer:
    """Checkpoints of a multi-stage training run (used by :meth:`pyro_velo.VeloVAE.train`).

    A checkpoint (``folder/checkpoint.pt``, rewritten atomically) holds the parameters and
    buffers of every registered module, the training history, the model configuration,
    the random states, the run's arguments and the position: the stage in progress and,
    inside a stage, the state of :func:`fit` (see its ``resume_state``). Checkpoints are
    written every ``every`` epochs inside a stage and at the end of each stage; in
    distributed training by rank 0 only.

    With ``folder=None`` it does nothing: every stage is to do, nothing is written.

    Parameters
    ----------
    folder
        Where the checkpoint lives (created if missing), or ``None``.
    every
        Epochs between checkpoints inside a stage.
    header
        What must match for a resume: ``config`` (model configuration), ``split``
        (int8 tensor), ``fitted`` (bool tensor).
    run
        The run's arguments that determine its course (epochs, batch size, learning
        rates, seed...): a resume must pass the same.
    distributed
        As for :func:`fit`: whether the run is data-parallel over the process group
        (then only rank 0 writes); ``False`` makes every process write its own.
    """

    #: config keys written by training itself (warm-up start, refinement): not matched
    _RUN_CONFIG_KEYS = ("refine_delta1", "refine_delta2", "refined", "warm_start")

    def __init__(
        self,
        folder: str | Path | None,
        every: int,
        header: dict[str, Any],
        run: dict[str, Any],
        distributed: bool | None = None,
    ) -> None:
        self.folder = None if folder is None else Path(folder)
        self.every = check_int(every, "checkpoint_every", minimum=1)
        self.header = header
        self.run = run
        self.distributed = distributed
        self.modules: dict[str, torch.nn.Module] = {}
        self.saved: dict[str, Any] | None = None

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / CHECKPOINT_FILE

    def start(self, resume: bool) -> None:
        """Check the folder; with ``resume`` read and validate its checkpoint.

        Raises
        ------
        InputError
            ``resume`` without a folder; a checkpoint exists but ``resume`` is False; the
            checkpoint belongs to another model, data split or set of run arguments.
        MissingFileError
            ``resume`` but no checkpoint in the folder.
        """
        if self.folder is None:
            if resume:
                raise InputError("resume=True needs checkpoint_dir: the folder that holds "
                                 "the checkpoint of the interrupted run")
            return
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"checkpoint_dir {self.folder} exists and is not a folder")
        if not resume:
            if self.path.exists():
                raise InputError(
                    f"{self.path} already exists: pass resume=True to continue that run, "
                    "or remove it (or choose another checkpoint_dir) to start afresh")
            self.folder.mkdir(parents=True, exist_ok=True)
            return
        saved = read_checkpoint(self.path)
        if saved["format_version"] != CHECKPOINT_FORMAT_VERSION:
            raise InputError(
                f"{self.path} has checkpoint format {saved['format_version']}, this "
                f"pyro_velo reads format {CHECKPOINT_FORMAT_VERSION}: it cannot be resumed")

        def strip(config: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in config.items() if k not in self._RUN_CONFIG_KEYS}

        if strip(saved["header"]["config"]) != strip(self.header["config"]):
            diff = sorted(k for k in set(strip(saved["header"]["config"]))
                          | set(strip(self.header["config"]))
                          if saved["header"]["config"].get(k) != self.header["config"].get(k))
            raise InputError(f"the checkpoint in {self.folder} belongs to a model with another "
                             f"configuration (differs in: {', '.join(diff)})")
        for key in ("split", "fitted"):
            if not torch.equal(saved["header"][key], self.header[key]):
                raise InputError(
                    f"the checkpoint in {self.folder} was written for other data: its cells' "
                    f"{'train/validation/test split' if key == 'split' else 'fitted genes'} "
                    "differ from this model's")
        if saved["run"] != self.run:
            diff = sorted(k for k in set(saved["run"]) | set(self.run)
                          if saved["run"].get(k) != self.run.get(k))
            listing = ", ".join(f"{k}={saved['run'].get(k)!r}" for k in diff)
            raise InputError(f"resume=True must repeat the interrupted call's arguments; the "
                             f"checkpoint in {self.folder} was written with {listing}")
        self.saved = saved

    def restore(self, modules: dict[str, torch.nn.Module], config: dict[str, Any],
                history: TrainingHistory) -> None:
        """Register ``modules``; when resuming, load their state, ``config`` and ``history``.

        At a stage boundary the random states are restored too (inside a stage
        :func:`fit` restores them with the rest of its state).
        """
        self.modules = modules
        if self.saved is None:
            return
        for name, module in modules.items():
            module.load_state_dict(self.saved["modules"][name])
        config.clear()
        config.update(self.saved["header"]["config"])
        saved_history = self.saved["history"]
        history.train[:] = saved_history["train"]
        history.validation[:] = saved_history["validation"]
        history.stages[:] = [tuple(s) for s in saved_history["stages"]]
        history.best_epoch = saved_history["best_epoch"]
        history.stopped_early = saved_history["stopped_early"]
        if self.saved["fit"] is None:
            set_rng_state(self.saved["rng"])

    def todo(self, stage: str) -> bool:
        """Whether ``stage`` still has to run (all do unless resuming)."""
        if self.saved is None:
            return True
        position = STAGES.index(self.saved["stage"])
        return STAGES.index(stage) > position or (
            STAGES.index(stage) == position and not self.saved["done"])

    def resuming(self, stage: str) -> bool:
        """Whether the run resumes inside ``stage`` (its stage marker is in the history)."""
        return (self.saved is not None and self.saved["stage"] == stage
                and not self.saved["done"])

    @property
    def finished(self) -> bool:
        """Whether the resumed checkpoint was written at the end of training."""
        return self.saved is not None and self.saved.get("finished", False)

    def fit_options(self, stage: str, history: TrainingHistory,
                    config: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for :func:`fit` in ``stage`` (checkpoint hook and resume)."""
        if self.folder is None:
            return {}
        resume_state = self.saved["fit"] if self.resuming(stage) else None

        def hook(state: dict[str, Any]) -> None:
            self._write(stage, False, state, history, config)

        return {"checkpoint": hook, "checkpoint_every": self.every,
                "resume_state": resume_state}

    def stage_done(self, stage: str, history: TrainingHistory, config: dict[str, Any],
                   finished: bool = False) -> None:
        """Write a checkpoint at the end of ``stage`` (``finished``: training is over)."""
        if self.folder is not None:
            self._write(stage, True, None, history, config, finished)

    def _write(self, stage: str, done: bool, state: dict[str, Any] | None,
               history: TrainingHistory, config: dict[str, Any],
               finished: bool = False) -> None:
        if not dist_.is_main_process(self.distributed):  # distributed: rank 0 writes
            return
        from . import __version__

        payload = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "package_version": __version__,
            "header": {**self.header, "config": copy.deepcopy(config)},
            "run": self.run,
            "stage": stage,
            "done": done,
            "finished": finished,
            "fit": state,
            "rng": get_rng_state(),
            "modules": {name: {k: v.detach().cpu() for k, v in m.state_dict().items()}
                        for name, m in self.modules.items()},
            "history": {"train": list(history.train), "validation": list(history.validation),
                        "stages": [tuple(s) for s in history.stages],
                        "best_epoch": history.best_epoch,
                        "stopped_early": history.stopped_early},
        }
        write_checkpoint(self.path, payload)
