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
from dataclasses import dataclass, field

import pyro
import torch
from pyro.infer import Trace_ELBO
from torch import Tensor
from tqdm.auto import tqdm

from .data import VelocityData


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
    """Raised when the ELBO or a parameter becomes NaN or infinite during training."""


def local_params():
    """Context in which Pyro modules keep their parameters to themselves.

    Our modules are built and run inside it, so that several fitted models (and the
    user's own Pyro code) never share names in Pyro's global parameter store.
    """
    return pyro.settings.context(module_local_params=True)


def set_seed(seed: int) -> None:
    """Seed torch and Pyro (makes CPU runs reproducible)."""
    pyro.set_rng_seed(seed)


def loss_module(model: torch.nn.Module, guide: torch.nn.Module) -> torch.nn.Module:
    """The negative-ELBO module of a (model, guide) pair; its parameters are both modules'."""
    return Trace_ELBO()(model, guide)


def evaluate_loss(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    data: VelocityData,
    idx: Tensor,
    batch_size: int = 1024,
) -> float:
    """Mean negative ELBO per cell over the cells ``idx`` (networks in eval mode)."""
    if len(idx) == 0:
        return math.nan
    elbo = loss_module(model, guide)
    was_training = guide.training
    guide.eval()
    total = 0.0
    with torch.no_grad(), local_params():
        for batch in idx.split(batch_size):
            batch = batch.to(data.u.device)
            total += elbo(data.u[batch], data.s[batch], batch, len(batch)).item()
    guide.train(was_training)
    return total / len(idx)


def fit(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    data: VelocityData,
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
) -> TrainingHistory:
    """Train ``model``/``guide`` on the train cells of ``data`` by minibatch SVI.

    Parameters
    ----------
    model, guide
        Pyro modules with signature ``(u, s, idx, n_obs)``. Model parameters whose names
        start with ``log_`` or equal ``t_on`` are ODE parameters (learning rate ``lr_ode``);
        everything else (networks) uses ``lr``.
    data
        Training data with its split; the test split is never looked at.
    max_epochs
        Upper bound on the number of passes over the train cells.
    batch_size, lr, lr_ode
        Minibatch size and Adam learning rates.
    early_stopping
        Stop when the validation loss has not improved by ``min_delta`` (relative) for
        ``patience`` epochs and restore the parameters of the best epoch. Without
        validation cells the train loss is monitored instead.
    progress_bar
        Show a tqdm bar with the current losses.
    history
        Append to this history (for multi-stage training) instead of a new one.

    Returns
    -------
    TrainingHistory

    Raises
    ------
    DivergenceError
        When the loss or a parameter becomes NaN/inf.
    """
    history = history if history is not None else TrainingHistory()
    train_idx = data.indices("train")
    val_idx = data.indices("validation")
    n_train = len(train_idx)
    elbo = loss_module(model, guide)
    ode_params = [p for n, p in model.named_parameters() if _is_ode_param(n)]
    ode_ids = {id(p) for p in ode_params}
    net_params = [p for p in elbo.parameters() if id(p) not in ode_ids]
    optimizer = torch.optim.Adam(
        [{"params": net_params, "lr": lr}, {"params": ode_params, "lr": lr_ode}]
    )

    def diverged(epoch: int) -> str:
        return _divergence_message(model, guide, epoch, lr, lr_ode)

    best_loss, best_state, since_best = math.inf, None, 0
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
    bar = tqdm(range(max_epochs), desc=description, disable=not progress_bar, leave=True)
    model.train()
    guide.train()
    for epoch in bar:
        perm = train_idx[torch.randperm(n_train, generator=gen)]
        epoch_loss = 0.0
        with local_params():
            for batch in perm.split(batch_size):
                if len(batch) < 2 and n_train >= 2:
                    continue  # batch norm needs two cells
                batch_dev = batch.to(data.u.device)
                try:
                    loss = elbo(data.u[batch_dev], data.s[batch_dev], batch_dev, n_train)
                except ValueError as err:  # distribution validation of NaN parameters
                    if _all_finite(model) and _all_finite(guide):
                        raise
                    raise DivergenceError(diverged(epoch)) from err
                if not torch.isfinite(loss):
                    raise DivergenceError(diverged(epoch))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                epoch_loss += loss.item() * len(batch) / n_train
        history.train.append(epoch_loss / n_train)
        monitored = history.train[-1]
        if len(val_idx):
            history.validation.append(evaluate_loss(model, guide, data, val_idx))
            monitored = history.validation[-1]
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
        if early_stopping and since_best >= patience:
            history.stopped_early = True
            break
    bar.close()
    if early_stopping and best_state is not None:
        model.load_state_dict(best_state[0])
        guide.load_state_dict(best_state[1])
    model.eval()
    guide.eval()
    return history


def _is_ode_param(name: str) -> bool:
    """Per-gene ODE parameters: the model's direct log-scale parameters and switch times."""
    return "." not in name and (name.startswith("log_") or name.startswith("t_"))


def _all_finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


def _divergence_message(
    model: torch.nn.Module, guide: torch.nn.Module, epoch: int, lr: float, lr_ode: float
) -> str:
    bad = [f"{owner}.{n}" for owner, module in (("model", model), ("guide", guide))
           for n, p in module.named_parameters() if not torch.isfinite(p).all()]
    where = f"non-finite parameters: {', '.join(bad)}" if bad else "the loss itself"
    return (
        f"training diverged at epoch {epoch}: the ELBO became NaN/inf ({where}). "
        f"Try a smaller learning rate (lr={lr:g}, lr_ode={lr_ode:g}), a larger batch_size, "
        "or check the input layers for extreme values."
    )
