"""The initial-condition refinement of the full model (paper, "Initial Conditions").

Each cell gets an initial state from the training cells just before it in time within
its cell-state cluster, and the ODE parameters and the decoder are fine-tuned with every
cell's t and c held at their posterior means. The refinement is kept only if it raises
the validation log-likelihood, and ended early once it cannot
(:class:`RefinementCutoff`).
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .. import policies
from .._checks import InputError
from .._params import local_params
from ..components import ancestral
from ..guides import CombinedGuide, FixedLatentGuide
from ..initialize import window_table
from ..predict import Predictor
from .callbacks import say
from .loop import TrainingHistory, fit
from .stages import Run, Stage, selection_split


class Refine(Stage):
    """The refinement as the last stage of the schedule (see :func:`refine`).

    Not checkpointed inside: an interrupted refinement starts again from the end of the
    ``full`` stage. Trained eagerly: with t and c held fixed the compiled graph of the
    first stages does not apply, and a new one costs more (about 10 s) than it saves
    over the refinement's few epochs. It marks its own start in the history, once the
    table of initial conditions is built.
    """

    name, description = "refine", "Refining initial conditions"
    checkpoint_inside = False
    eager = True

    def begin(self, run: Run) -> None:
        pass

    def train(self, run: Run, **_: Any) -> None:
        # not kept is a normal outcome of the schedule's last stage: said in the progress
        # output beside the stage's summary, not warned about
        refine(run, self.model, self.guide, self.data, self.epochs,
               early_stopping=run.early_stopping,
               on_rejected=lambda reason: say(
                   f"{self.description}: not kept, {reason}",
                   run.fit_options.get("progress_bar", True)))


def refine(run: Run, model, guide, data, epochs: int, delta1: float | None = None,
           delta2: float | None = None, n_clusters: int = 10, source: str = "fitted",
           require_improvement: bool = True,
           on_rejected: Callable[[str], None] | None = None,
           **fit_options: Any) -> TrainingHistory:
    """Refine the initial conditions of the full ``model`` fitted with ``guide`` on ``data``
    (:meth:`pyro_velo.VeloVAE.refine_initial_conditions`).

    Each cell gets an initial state ``(u0, s0)`` at ``t0 = t - (delta1 + delta2)/2``: the
    mean state of the training cells in the preceding window ``[t - delta1, t - delta2]``
    within the cell's cell-state cluster (:func:`~pyro_velo.initialize.window_table`;
    vectorised, no per-cell neighbour search; the training cells are streamed in
    minibatches and only a (cluster, time bin) table is kept, so memory does not grow
    with cells x genes). Cells whose window holds no training cell of their cluster (at
    the start of time, or where the cluster is sparse, e.g. just past a branch point)
    keep the zero initial state at their genes' switch-on times. The ODE parameters and
    the decoder are then fine-tuned with every cell's t and c held at their posterior
    means.

    With ``require_improvement`` the refinement is kept only if it raises the
    reconstruction log-likelihood of the validation cells
    (:meth:`~pyro_velo.predict.Predictor.reconstruction`); otherwise the model and the
    guide are restored to their state before the call, and ``on_rejected`` is told why
    (noisy or sparse data can make the window means a worse start than the first-stage
    model). While the fine-tuning runs, that log-likelihood is checked every few epochs
    and the fine-tuning ends once the refinement cannot catch up with the first stage by
    its last epoch (:class:`RefinementCutoff`): rejected refinements cost a fraction of
    ``epochs``.

    Parameters
    ----------
    run
        Gives the history, the records (``refine_delta1``, ``refine_delta2``,
        ``refined`` are written to ``run.config``; ``run.config['seed']`` seeds the
        clustering) and the loop's settings.
    epochs
        Fine-tuning epochs (early stopping on the validation loss applies).
    delta1, delta2
        Window before each cell, in the model's time units; default
        :class:`~pyro_velo.policies.RefinePolicy`'s 3% and 0.5% of the span of the
        inferred times (on simulations, a window of 10% / 2% gave a worse start than the
        first-stage fit: the window mean drifts from the cell).
    n_clusters
        k-means clusters of c defining "close in cell state".
    source
        What is averaged over the window: ``'fitted'`` the first-stage model's expected
        (u, s) of those cells, or ``'observed'`` their observed (u, s) as in the paper.
        Observation noise in the window mean turns into spurious velocity (e.g. on genes
        at steady state); on the 2-branch simulation of ``benchmarks/full_vs_basic.py``
        the mean velocity cosine after refinement was 0.666 with ``'observed'`` and 0.787
        with ``'fitted'``.
    require_improvement
        ``False`` always keeps the refinement, as the paper does, and never ends the
        fine-tuning for lack of a gain (early stopping on the validation loss still
        applies). The rule is a safeguard, not a velocity criterion. On the 2-branch
        simulation with ``pp.preprocess(size_factors='neighbourhood')``, refinements
        kept by force lowered the held-out log-likelihood by 4-13 nats per cell at all 6
        seeds, yet raised the velocity cosine at 5 of them (mean +0.035); on 3 branches
        they lowered both the log-likelihood and the cosine (-0.01 to -0.10).
    on_rejected
        Called with the reason when the refinement is not kept; default: a
        ``UserWarning``. As the last stage of :meth:`~pyro_velo.VeloVAE.train`, where
        most fits do not keep it, the reason is a line of progress output instead.
    fit_options
        Override the run's settings of :func:`~pyro_velo.inference.loop.fit`.

    Raises
    ------
    RuntimeError
        ``run.config`` is not a full model, or takes its rates from the ancestors.
    InputError
        An unknown option, ``source`` or ``require_improvement``; nothing has changed.
    """
    if run.config["model"] != "full":
        raise RuntimeError("initial-condition refinement applies to the full model only")
    if ancestral(run.config):
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
    policy = policies.REFINE
    predictor = Predictor(model, guide, data)
    latent = predictor.encode()
    t, c = latent["t"], latent["c"]
    span = float(t.max() - t.min())
    delta1 = policy.window_start * span if delta1 is None else float(delta1)
    delta2 = policy.window_end * span if delta2 is None else float(delta2)
    check_split = selection_split(data)
    if require_improvement:  # the first stage to compare with and to restore
        before = predictor.reconstruction(check_split)["log_likelihood"]
        saved = copy.deepcopy(model.state_dict())
        saved_guide = copy.deepcopy(guide.state_dict())

    def window_values():  # [u | s] of the training cells, a minibatch at a time
        train = data.indices("train").to(data.device)
        for batch, (u, s, *_), _kwargs in data.minibatches(train, 4096):
            if source == "fitted":
                fitted = predictor.expected(idx=batch, scale=False,
                                            encoded={"t": t[batch], "c": c[batch]})
                u, s = fitted["u"], fitted["s"]
            yield batch, torch.cat([u, s], dim=1)

    train_mask = torch.as_tensor(data.split == 0, device=data.device)
    table = window_table(t, c, window_values(), delta1, delta2, reference=train_mask,
                         n_clusters=n_clusters, seed=run.config["seed"])
    model.set_initial_conditions(table)
    run.config.update(refine_delta1=delta1, refine_delta2=delta2)
    with local_params():
        fixed = FixedLatentGuide(t=t, c=c)
        if isinstance(guide, CombinedGuide):  # random rates keep their posterior
            fixed = CombinedGuide(fixed, guide.rates)
    run.history.stages.append(("refine", len(run.history.train)))
    history = fit_options.pop("history", run.history)
    description = fit_options.pop("description", Refine.description)
    stop_when = fit_options.pop("stop_when", None)
    if require_improvement:
        hopeless = RefinementCutoff(
            lambda: predictor.reconstruction(check_split)["log_likelihood"],
            model, len(history.train), epochs, before)
        user_stop = stop_when
        stop_when = hopeless if user_stop is None else (
            lambda h: bool(user_stop(h)) or hopeless(h))
    history = run.fit(model, fixed, data, epochs, description, history=history,
                      stop_when=stop_when, **fit_options)
    if not require_improvement:
        run.config["refined"] = True
        return history
    after = predictor.reconstruction(check_split)["log_likelihood"]
    run.config["refined"] = bool(after > before)
    if not run.config["refined"]:
        # also restores (or clears) the initial conditions of a previous refinement
        model.load_state_dict(saved)
        guide.load_state_dict(saved_guide)
        ended = (f" (stopped after {hopeless.epochs_done} of {epochs} epochs: it "
                 "could not catch up)" if hopeless.gave_up else "")
        reason = (f"it lowered the {check_split} log-likelihood ({before:.3f} -> "
                  f"{after:.3f}){ended}; kept the model without it")
        if on_rejected is None:
            warnings.warn(f"initial-condition refinement not kept: {reason}", stacklevel=3)
        else:
            on_rejected(reason)
    return history


class RefinementCutoff:
    """A ``stop_when`` for the refinement: end it once it cannot beat ``before``.

    Every ``check_every`` epochs from ``min_epochs`` on
    (:class:`~pyro_velo.policies.RefinePolicy`), ``score()`` (the selection split's
    reconstruction log-likelihood, computed with ``model`` in evaluation mode) is
    compared with ``before`` (the first-stage model's). While it is lower, the
    refinement stops if the gain, extrapolated linearly at its rate over the last checks
    (about 10 epochs) to the last epoch, stays below zero: the gain grows ever more
    slowly, so a straight line overestimates it and a refinement that would have been
    accepted is not cut short. On simulations the rejected refinements started 8-60
    nats per cell below the first stage and were still below after 100 epochs, while
    the accepted one crossed zero by epoch 9.

    ``first`` is the history's length when the refinement starts and ``epochs`` its
    length in epochs; ``epochs_done`` counts the refinement's epochs so far and
    ``gave_up`` tells whether it was this rule that ended them.
    """

    def __init__(self, score: Callable[[], float], model: torch.nn.Module, first: int,
                 epochs: int, before: float,
                 policy: policies.RefinePolicy | None = None) -> None:
        self.score, self.model, self.first, self.epochs = score, model, first, epochs
        self.before = before
        self.policy = policies.REFINE if policy is None else policy
        self.gains: list[tuple[int, float]] = []
        self.epochs_done, self.gave_up = 0, False

    def __call__(self, history: TrainingHistory) -> bool:
        done = self.epochs_done = len(history.train) - self.first
        if done < self.policy.min_epochs or done % self.policy.check_every:
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
