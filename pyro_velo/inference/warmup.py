"""The warm-up stage: a first order of the cells, checked, then the rates re-fitted to it.

The warm-up trains the basic model briefly from the steady-state initialisation (or
from rates fitted to capture times, paper section 4.2). Without capture times its cell
order is checked against a diffusion pseudotime of the kNN graph and against the
splicing kinetics (:class:`~pyro_velo.policies.StartPolicy`); if it looks like a failed
start, a second warm-up from the pseudotime competes on the validation ELBO. Every
gene's switch times and rate are then re-fitted by a grid search given the kept
warm-up's cell times, in the direction of time the splicing kinetics support.

The ELBO cannot tell a fit from its time-reversed twin, so every candidate's order is
also compared with the potential of a velocity field built from the data alone
(:func:`~pyro_velo.orientation.flow_evidence`); where the ELBO's choice contradicts it,
a warm-up from the potential competes and
:class:`~pyro_velo.policies.OrientationPolicy` picks the start. Capture times or root
cells, where given, set the direction instead.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from .. import policies
from ..initialize import (
    diffusion_pseudotimes,
    direction_score,
    knn_graph,
    time_informed_init,
)
from ..orientation import FlowEvidence, direction_source
from .loop import TrainingHistory, evaluate_loss
from .stages import Run, Stage, rates_to_guide, selection_split


class WarmUp(Stage):
    """Warm-up of the basic ``model``/``guide`` on ``data`` (see the module).

    Parameters
    ----------
    model, guide, data, epochs
        The basic pair, the cells it starts on (all cells in memory, a sample of a
        file) and the warm-up's epochs.
    t_max, seed
        Length of the time axis; seed of the kNN graph, the diffusion map and the grid
        search.
    capture_times
        Per-cell times on the model's axis (NaN where unknown) of ``data``'s cells, or
        None: the warm-up then starts from the steady state and may compete with a
        pseudotime start.
    graph
        kNN connectivities of ``data``'s cells (e.g. ``obsp['connectivities']``), or
        None to build one from the scaled abundances.
    policy
        When an order is doubtful (default :data:`pyro_velo.policies.START`).
    root_order
        ``(n_cells,)`` diffusion pseudotime on ``[0, 1]`` of ``data``'s cells from the
        cells the user named as the first ones
        (:meth:`~pyro_velo.inference.plan.StartCells.given_order`), or None. The warm-up
        then starts from it, and the direction is theirs.
    evidence
        The data's own flow over ``data``'s cells, or None (no orientation check).
    orientation
        How the flow picks the start (default :data:`pyro_velo.policies.ORIENTATION`).
    """

    name, description = "warm-up", "Warm-up"
    checkpoint_inside = False

    def __init__(self, model, guide, data, epochs: int, *, t_max: float, seed: int,
                 capture_times: torch.Tensor | None = None, graph=None,
                 policy: policies.StartPolicy | None = None,
                 root_order: np.ndarray | None = None,
                 evidence: FlowEvidence | None = None,
                 orientation: policies.OrientationPolicy | None = None) -> None:
        super().__init__(model, guide, data, epochs)
        self.t_max, self.seed = t_max, seed
        self.capture_times, self.graph = capture_times, graph
        self.policy = policy
        self.root_order, self.evidence, self.orientation = root_order, evidence, orientation

    @property
    def direction_given(self) -> str | None:
        """What sets the direction instead of the heuristics (see
        :func:`~pyro_velo.orientation.direction_source`)."""
        return direction_source(self.capture_times, self.root_order)

    def train(self, run: Run, **_: Any) -> None:
        """Run the competing warm-ups and keep the one the policies choose.

        The start used is recorded in ``run.config['warm_start']``, every candidate's
        validation loss and flow agreement in ``run.config['warm_start_scores']``.
        """
        model, guide, data = self.model, self.guide, self.data
        orientation = self.orientation or policies.ORIENTATION
        initial = (copy.deepcopy(model.state_dict()), copy.deepcopy(guide.state_dict()))
        check = data.indices(selection_split(data))
        given = self.direction_given
        first = (self.capture_times if given == "capture times" else
                 self.root_times() if given == "root" else None)
        starts = {given or "steady state": first}
        evidence = None if given else self.evidence
        candidates: list[policies.StartCandidate] = []
        while starts:
            name, start = starts.popitem()
            model.load_state_dict(initial[0])
            guide.load_state_dict(initial[1])
            if start is not None:
                self.reinitialize_rates(start)
            trial = TrainingHistory()
            run.fit(model, guide, data, self.epochs, f"Warm-up ({name})",
                    early_stopping=False, history=trial)
            if name == "steady state":
                pseudotime = self.pseudotime()
                if pseudotime is not None and self.doubtful_order(pseudotime):
                    starts["pseudotime"] = pseudotime
            self.reinitialize_rates(keep_direction=name == "flow potential")
            agreement = (evidence.agreement(self.predictor().encode()["t"].cpu())
                         if evidence is not None else float("nan"))
            candidates.append(policies.StartCandidate(
                name, evaluate_loss(model, guide, data, check), agreement,
                (copy.deepcopy(model.state_dict()), copy.deepcopy(guide.state_dict()), trial)))
            if (not starts and name != "flow potential"
                    and orientation.wants_flow_start(candidates, evidence)):
                starts["flow potential"] = torch.as_tensor(
                    evidence.start_times(self.t_max), dtype=torch.float32)
        chosen = orientation.choose(candidates, evidence)
        model_state, guide_state, trial = chosen.payload
        model.load_state_dict(model_state)
        guide.load_state_dict(guide_state)
        run.history.train.extend(trial.train)
        run.history.validation.extend(trial.validation)
        run.config["warm_start"] = chosen.name
        run.config["warm_start_scores"] = {
            c.name: {"loss": float(c.loss), "flow_agreement": float(c.agreement)}
            for c in candidates}

    def root_times(self) -> torch.Tensor:
        """The root cells' pseudotime on ``[0, t_max]``."""
        return torch.as_tensor(self.root_order * self.t_max, dtype=torch.float32)

    def cell_graph(self):
        """The kNN graph of the cells: :attr:`graph`, or one of the scaled abundances."""
        return cell_graph(self.data, self.graph, self.seed)

    def _rates(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.rates().items()}

    def doubtful_order(self, pseudotime: torch.Tensor) -> bool:
        """Whether the warm-up's order of the training cells looks like a failed start.

        Two symptoms (:class:`~pyro_velo.policies.StartPolicy`): the order disagrees
        with the diffusion pseudotime, or it hardly agrees with the splicing kinetics
        in either direction.
        """
        from scipy.stats import spearmanr

        train = self.data.indices("train").to(self.data.device)
        encoded = self.predictor().encode(train)["t"].cpu()
        agreement = spearmanr(encoded.numpy(), pseudotime[train.cpu()].numpy())[0]
        rates = self._rates()
        u, s = self.data.rows(train)
        score = direction_score(encoded, u.cpu(), s.cpu(),
                                rates["beta"], rates["gamma"], rates["scale_u"])
        return (self.policy or policies.START).doubtful(agreement, score)

    def pseudotime(self) -> torch.Tensor | None:
        """Diffusion pseudotime on the kNN graph, oriented by the splicing kinetics.

        Starting the warm-up from genes fitted to a data-driven order avoids a local
        optimum of the ELBO in which the first cells are glued to the end of time. The
        candidates are pseudotimes from extreme cells of the diffusion map
        (:func:`~pyro_velo.initialize.diffusion_pseudotimes`); the one whose order
        agrees best with ``ds/dt = beta u - gamma s``
        (:func:`~pyro_velo.initialize.direction_score`) is used, on ``[0, t_max]``.
        Without a graph of these cells a kNN graph of the scaled abundances
        (:func:`~pyro_velo.initialize.knn_graph`). None with fewer than 20 cells.
        """
        data = self.data
        if data.n_cells < 20:
            return None
        u, s = data.u.cpu(), data.s.cpu()
        rates = self._rates()
        best, best_score = None, -np.inf
        for candidate in diffusion_pseudotimes(self.cell_graph(), seed=self.seed):
            t = torch.as_tensor(candidate, dtype=torch.float32)
            score = direction_score(t, u, s, rates["beta"], rates["gamma"], rates["scale_u"])
            if score > best_score:
                best, best_score = t, score
        return best * self.t_max

    def reinitialize_rates(self, times: torch.Tensor | None = None,
                           keep_direction: bool = False) -> None:
        """Re-fit every gene's switch times and rate to cell times.

        Without ``times``, the warm-up's encoded times are used. The warm-up orders cells
        but may run time backwards (the encoder is free to): unspliced must lead
        spliced, and :func:`~pyro_velo.initialize.direction_score` tells from the data
        which way the order runs; the encoder's time output is mirrored when it runs
        backwards (with capture times or a root the direction is given, and
        ``keep_direction`` keeps it too). ``times`` (``(n_cells,)``,
        NaN for unknown) initialises from given times, e.g. capture times (paper,
        section 4.2) or a diffusion pseudotime, using the cells that have one.
        """
        model, guide, data = self.model, self.guide, self.data
        device = data.device
        train = data.indices("train").to(device)
        if times is None:
            t = self.predictor().encode(train)["t"].cpu()
        else:
            t = times.to(device)[train].cpu()
            train = train[~torch.isnan(t).to(device)]
            t = t[~torch.isnan(t)]
        rates = self._rates()
        u, s = (x.cpu() for x in data.rows(train))
        reverse = (times is None and not keep_direction and self.direction_given is None
                   and direction_score(t, u, s, rates["beta"], rates["gamma"],
                                       rates["scale_u"]) < 0)
        if reverse:
            guide.encoder.mirror_time()
        t_on, t_off, alpha, _ = time_informed_init(
            u, s, self.t_max - t if reverse else t, rates["beta"], rates["gamma"],
            rates["scale_u"], seed=self.seed)
        model.load_rates(t_on=t_on.to(device), t_off=t_off.to(device),
                         alpha=alpha.to(device))
        rates_to_guide(model, guide)


def cell_graph(data, graph, seed: int):
    """kNN graph of ``data``'s cells: ``graph`` where it is theirs (e.g.
    ``obsp['connectivities']``), else one of the scaled abundances
    (:func:`~pyro_velo.initialize.knn_graph`)."""
    n = data.n_cells
    if graph is None or graph.shape != (n, n):
        graph = knn_graph(torch.cat([data.u.cpu(), data.s.cpu()], dim=1).numpy(), seed=seed)
    return graph
