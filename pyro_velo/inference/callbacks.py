"""Callbacks of the SVI loop: divergence checks, early stopping, the learning-rate
schedule, checkpoints, progress, timing.

A :class:`Callback` overrides the hooks it needs; :class:`~pyro_velo.inference.loop.SVILoop`
calls every hook of every callback in order, with the loop as first argument (its
attributes are listed there). Pass your own to ``VeloVAE.train(callbacks=[...])`` or
:func:`~pyro_velo.inference.loop.fit`, e.g. a :class:`Timer`.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._checks import check_int
from .._settings import settings
from .history import TrainingHistory

if TYPE_CHECKING:
    from ..policies import LearningRatePolicy


class SVILoop(Protocol):
    """What callbacks read of the running loop
    (:class:`pyro_velo.inference.loop.SVILoop` implements it)."""

    model: torch.nn.Module
    guide: torch.nn.Module
    history: TrainingHistory
    optimizer: torch.optim.Optimizer
    device: torch.device
    group: Any
    is_main: bool
    named: list[tuple[str, Tensor]]
    lr: float
    lr_ode: float
    epoch: int
    first_epoch: int
    max_epochs: int
    steps_per_epoch: int
    monitored: float
    has_validation: bool
    validation_cells: tuple[Any, Tensor]
    description: str
    stop: bool

    def request_stop(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...


class DivergenceError(FloatingPointError):
    """Raised when the ELBO, a gradient or a parameter becomes NaN or infinite in training."""


class Callback:
    """Base class: every hook does nothing. Hooks, in the order the loop calls them:

    ``on_fit_start`` (after a resumed state is loaded); per epoch ``on_epoch_start``;
    per minibatch step ``on_batch_start(step)`` (the batch is read), ``on_after_backward(
    step, loss)`` (gradients computed, before the optimiser step), ``on_step_end(step)``,
    or ``on_invalid_step(step, error)`` when the loss raised a ValueError; then
    ``on_train_epoch_end``, ``on_validation_start``, ``on_epoch_end`` (losses appended to
    the history, ``loop.monitored`` set); finally ``on_fit_end``.

    ``state_dict`` / ``load_state_dict`` carry what a resumed run needs (merged into the
    loop's checkpointed state; keys must not clash).
    """

    def on_fit_start(self, loop: SVILoop) -> None: ...
    def on_epoch_start(self, loop: SVILoop) -> None: ...
    def on_batch_start(self, loop: SVILoop, step: int) -> None: ...
    def on_invalid_step(self, loop: SVILoop, step: int, error: ValueError) -> None: ...
    def on_after_backward(self, loop: SVILoop, step: int, loss: Tensor) -> None: ...
    def on_step_end(self, loop: SVILoop, step: int) -> None: ...
    def on_train_epoch_end(self, loop: SVILoop) -> None: ...
    def on_validation_start(self, loop: SVILoop) -> None: ...
    def on_epoch_end(self, loop: SVILoop) -> None: ...
    def on_fit_end(self, loop: SVILoop) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        pass


# ---- divergence ----------------------------------------------------------------------
#: Minibatch steps between divergence checks when training off the CPU.
DEFERRED_CHECK_EVERY = 50


class DivergenceCheck(Callback):
    """Raise :class:`DivergenceError` once the loss, a gradient or a parameter is NaN/inf.

    ``every``: minibatch steps between checks for a non-finite loss or gradient. Default:
    1 on CPU (where the check costs nothing), :data:`DEFERRED_CHECK_EVERY` on other
    devices, where reading the check's result makes the host wait for the device. With
    more than 1 (a *deferred* check) the finiteness of every step is recorded on the
    device and read every ``every`` steps and at the end of every epoch; from the first
    non-finite step on, no optimiser step updates the parameters (Adam's fused
    implementation skips them on the device), so the parameters are those before that
    step, as with the per-step check; the error comes up to ``every - 1`` steps later
    and names the first non-finite step. A non-finite monitored loss at the end of an
    epoch raises too.
    """

    def __init__(self, every: int | None = None) -> None:
        self.requested = every

    def on_fit_start(self, loop: SVILoop) -> None:
        self.every = self.requested or (1 if loop.device.type == "cpu"
                                        else DEFERRED_CHECK_EVERY)
        self.params = [p for _, p in loop.named]
        self.checker = None
        if self.every > 1:
            if loop.optimizer.defaults.get("fused"):
                # the fused Adam skips steps flagged in ``found_inf`` without a host sync
                self.checker = _DeferredCheck(loop.device, loop.group)
                loop.optimizer.found_inf = self.checker.bad
            else:  # no fused Adam here: check every step
                self.every = 1
        self.taken = 0

    def on_epoch_start(self, loop: SVILoop) -> None:
        self.taken = 0

    def _message(self, loop: SVILoop, step: int | None = None,
                 loss: Tensor | None = None) -> str:
        return _divergence_message(loop, loop.epoch, step, loss)

    def on_invalid_step(self, loop: SVILoop, step: int, error: ValueError) -> None:
        if not (_all_finite(loop.model) and _all_finite(loop.guide)):
            raise DivergenceError(self._message(loop, step)) from error

    def on_after_backward(self, loop: SVILoop, step: int, loss: Tensor) -> None:
        if self.checker is None:
            # the loss and every gradient are checked together: NaN/inf in any of them
            # makes the sum non-finite (before the step, so no parameter is ever
            # updated with a non-finite gradient); on CPU reading it costs nothing
            if not torch.isfinite(loss.detach() + _gradient_sum(self.params)):
                raise DivergenceError(self._message(loop, step, loss))
        else:
            self.checker.record(step, loss.detach(), self.params)

    def on_step_end(self, loop: SVILoop, step: int) -> None:
        self.taken += 1
        if self.checker is not None and self.taken % self.every == 0:
            self.checker.raise_if_diverged(lambda *a: self._message(loop, *a), step,
                                           self.every)

    def on_train_epoch_end(self, loop: SVILoop) -> None:
        if self.checker is not None:
            self.checker.raise_if_diverged(lambda *a: self._message(loop, *a), None,
                                           self.every)

    def on_epoch_end(self, loop: SVILoop) -> None:
        if not math.isfinite(loop.monitored):
            raise DivergenceError(self._message(loop))


class _DeferredCheck:
    """Finiteness of every step's loss and gradients, recorded on the device.

    ``bad`` (float32, 0 or 1) is also the optimiser's ``found_inf``: once a step is
    non-finite, the fused Adam skips that and every later step until the error is raised.
    """

    def __init__(self, device: torch.device, group) -> None:
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

    def raise_if_diverged(self, diverged: Callable[..., str], step: int | None,
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
            diverged(int(first), self.first_loss if local else None)
            + f" (found by the check at {at}: off the CPU the check is read every "
            f"{every} steps; no optimiser step was taken from step {int(first)} on)")


def _all_finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


def _gradient_sum(params: list[Tensor]) -> Tensor:
    """Sum of all gradient entries: non-finite iff some gradient entry is (or overflow)."""
    sums = [p.grad.sum() for p in params if p.grad is not None]
    return torch.stack(sums).sum() if sums else torch.zeros(())


def _divergence_message(loop: SVILoop, epoch: int, step: int | None = None,
                        loss: Tensor | None = None) -> str:
    bad = [f"{owner}.{n}" for owner, module in (("model", loop.model), ("guide", loop.guide))
           for n, p in module.named_parameters() if not torch.isfinite(p).all()]
    bad_grad = [n for n, p in loop.named if p.grad is not None
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
        f"Try a smaller learning rate (lr={loop.lr:g}, lr_ode={loop.lr_ode:g}), a larger "
        "batch_size, or check the input layers for extreme values."
    )


# ---- stopping ------------------------------------------------------------------------
class EarlyStopping(Callback):
    """Track the best monitored loss; stop after ``patience`` epochs without improving.

    An epoch improves when the monitored loss (validation, else train) falls below the
    best by more than ``min_delta`` relative to it. The best epoch is recorded in
    ``history.best_epoch`` in any case; with ``enabled`` training stops after
    ``patience`` epochs without improvement and the best epoch's parameters are
    restored at the end.
    """

    def __init__(self, patience: int = 30, min_delta: float = 1e-3,
                 enabled: bool = True) -> None:
        self.patience, self.min_delta, self.enabled = patience, min_delta, enabled
        self.best_loss, self.best_state, self.since_best = math.inf, None, 0

    def on_epoch_end(self, loop: SVILoop) -> None:
        monitored, best = loop.monitored, self.best_loss
        if monitored < best - self.min_delta * abs(best if math.isfinite(best) else 1):
            self.best_loss, self.since_best = monitored, 0
            loop.history.best_epoch = len(loop.history.train) - 1
            if self.enabled:
                self.best_state = (copy.deepcopy(loop.model.state_dict()),
                                   copy.deepcopy(loop.guide.state_dict()))
        else:
            self.since_best += 1
        if self.enabled and self.since_best >= self.patience:
            loop.request_stop()

    def on_fit_end(self, loop: SVILoop) -> None:
        if self.enabled and self.best_state is not None:
            loop.model.load_state_dict(self.best_state[0])
            loop.guide.load_state_dict(self.best_state[1])

    def state_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "best_state": self.best_state,
                "since_best": self.since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss = state["best_loss"]
        self.best_state = state["best_state"]
        self.since_best = state["since_best"]


class StopWhen(Callback):
    """End training when ``rule(history)`` returns True after an epoch (a caller's rule).

    In distributed training the rule must give the same answer on every process.
    """

    def __init__(self, rule: Callable[[TrainingHistory], bool]) -> None:
        self.rule = rule

    def on_epoch_end(self, loop: SVILoop) -> None:
        if not loop.stop and self.rule(loop.history):
            loop.request_stop()


# ---- learning rates ------------------------------------------------------------------
class LearningRateSchedule(Callback):
    """Sets both learning rates before every minibatch step from the progress through
    the loop's epochs, along ``policy`` (:class:`~pyro_velo.policies.LearningRatePolicy`).

    The rates are a function of the epoch and step alone (multiples of ``loop.lr`` and
    ``loop.lr_ode``), so a resumed run follows the same schedule as an uninterrupted one;
    a stage that stops early ends at the rate it reached. Expects the loop's two
    parameter groups in its order: networks, then per-gene ODE parameters.
    """

    def __init__(self, policy: LearningRatePolicy) -> None:
        self.policy = policy

    def on_batch_start(self, loop: SVILoop, step: int) -> None:
        progress = (loop.epoch + step / loop.steps_per_epoch) / loop.max_epochs
        networks, ode = loop.optimizer.param_groups
        networks["lr"] = loop.lr * self.policy.network(progress)
        ode["lr"] = loop.lr_ode * self.policy.ode(progress)


# ---- checkpoints ---------------------------------------------------------------------
class CheckpointHook(Callback):
    """Pass the loop's resumable state to ``write`` every ``every`` epochs.

    Called after every epoch at which ``len(history.train)`` is a multiple of ``every``
    (counted over all stages of a history); the state (see ``SVILoop.state_dict``: the
    epoch, Adam's moments and step counts, the minibatch-order generator, the torch /
    numpy / Python random states, the early-stopping state) does not hold the model and
    guide parameters: the writer saves them. In distributed training rank 0 only.
    """

    def __init__(self, write: Callable[[dict[str, Any]], None], every: int = 10) -> None:
        self.write = write
        self.every = check_int(every, "checkpoint_every", minimum=1)

    def on_epoch_end(self, loop: SVILoop) -> None:
        if loop.is_main and len(loop.history.train) % self.every == 0:
            self.write(loop.state_dict())


# ---- output --------------------------------------------------------------------------
def interactive(stream=None) -> bool:
    """Whether progress output goes to a terminal or a notebook (live bars make sense)."""
    stream = sys.stderr if stream is None else stream
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # closed or unusual streams
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def say(line: str, requested: bool = True) -> None:
    """Write one line of progress output to standard error, as the stage summaries are.

    Silent where output is off: ``requested`` False (a method's ``progress_bar=False``)
    or :attr:`pyro_velo.settings.verbosity` 0.
    """
    if requested and settings.verbosity > 0:
        tqdm.write(line, file=sys.stderr)


def progress_enabled(requested: bool) -> bool:
    """Whether live progress bars are shown: asked for, verbosity 2, interactive output."""
    return bool(requested) and settings.verbosity >= 2 and interactive()


class Progress(Callback):
    """Progress of one stage, fit for terminals, notebooks and logs.

    In a terminal or a notebook (at :attr:`pyro_velo.settings.verbosity` 2) a live tqdm
    bar over the epochs shows the current losses. Otherwise (a log file, CI, captured
    output; or verbosity 1) one line is written at the end of the stage: its name,
    epochs, final train and validation loss and seconds. Nothing at verbosity 0, with
    ``enabled=False``, or on other ranks than 0 in distributed training.
    """

    def __init__(self, description: str = "Training", enabled: bool = True) -> None:
        self.description, self.enabled = description, enabled
        self.bar = None

    def on_fit_start(self, loop: SVILoop) -> None:
        self.show = self.enabled and loop.is_main and settings.verbosity > 0
        self.live = self.show and progress_enabled(True)
        self.start = time.perf_counter()
        self.epochs = 0
        if self.live:
            total = loop.max_epochs - loop.first_epoch if not loop.stop else 0
            self.bar = tqdm(total=total, desc=self.description, leave=True)

    def on_epoch_end(self, loop: SVILoop) -> None:
        self.epochs += 1
        if self.bar is not None:
            self.bar.set_postfix(train=f"{loop.history.train[-1]:.3f}",
                                 val=f"{loop.history.validation[-1]:.3f}"
                                 if loop.has_validation else "-", refresh=False)
            self.bar.update(1)

    def on_fit_end(self, loop: SVILoop) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.show and self.epochs:  # a resumed, finished stage has nothing to say
            history = loop.history
            losses = f"train {history.train[-1]:.3f}" + (
                f", validation {history.validation[-1]:.3f}" if loop.has_validation else "")
            tqdm.write(f"{self.description}: {self.epochs} epochs, {losses}, "
                       f"{time.perf_counter() - self.start:.1f} s", file=sys.stderr)


class Timer(Callback):
    """Wall time of each stage and epoch, for benchmarks and profiling.

    ``stages`` lists ``(description, seconds, epochs)`` of every loop the timer saw;
    ``epochs`` lists per epoch a dict: ``seconds`` (the whole epoch), ``read`` (waiting
    for minibatches, e.g. reading a file), ``validation`` (the validation pass) and
    ``loss`` (the train loss).
    """

    def __init__(self) -> None:
        self.stages: list[tuple[str, float, int]] = []
        self.epochs: list[dict[str, float]] = []

    def on_fit_start(self, loop: SVILoop) -> None:
        self.fit_start = time.perf_counter()
        self.n_epochs = 0

    def on_epoch_start(self, loop: SVILoop) -> None:
        self.epoch_start = self.mark = time.perf_counter()
        self.read = 0.0

    def on_batch_start(self, loop: SVILoop, step: int) -> None:
        now = time.perf_counter()
        self.read += now - self.mark
        self.mark = now

    def on_step_end(self, loop: SVILoop, step: int) -> None:
        self.mark = time.perf_counter()

    def on_train_epoch_end(self, loop: SVILoop) -> None:
        self.read += time.perf_counter() - self.mark  # waiting for the end of the data

    def on_validation_start(self, loop: SVILoop) -> None:
        self.validation_start = time.perf_counter()

    def on_epoch_end(self, loop: SVILoop) -> None:
        now = time.perf_counter()
        self.n_epochs += 1
        self.epochs.append({"seconds": now - self.epoch_start, "read": self.read,
                            "validation": now - self.validation_start,
                            "loss": loop.history.train[-1]})

    def on_fit_end(self, loop: SVILoop) -> None:
        self.stages.append((loop.description, time.perf_counter() - self.fit_start,
                            self.n_epochs))
