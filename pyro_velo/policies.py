"""The heuristics of preprocessing and training, named and documented, with their
defaults in one place.

Each policy is a small frozen dataclass; the module-level instances
(:data:`NEIGHBOURS`, :data:`START`, :data:`REFINE`, :data:`EPOCHS`,
:data:`LEARNING_RATES`, :data:`COMPILE`, :data:`TIME_PRIOR`, :data:`ORIENTATION`,
:data:`SETTLING`, :data:`THREADS`, :data:`RESTARTS`) are the defaults the package reads
at the moment it needs them, so replacing one (e.g.
``pv.policies.COMPILE = pv.policies.CompilePolicy(min_work=10**9)``) changes what
follows. Every threshold states what it guards against and what it was measured on
(or that it is a heuristic without a measurement).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .orientation import FlowEvidence, order_agreement


@dataclass(frozen=True)
class StartPolicy:
    """When the warm-up's cell order looks like a failed start (then a second warm-up,
    from a diffusion pseudotime, competes on the validation ELBO).

    The thresholds are heuristics; the competing starts are judged by the ELBO.
    """

    #: below this ``|Spearman|`` with the diffusion pseudotime the order is doubtful:
    #: guards against a warm-up that folded or reversed part of the trajectory (the
    #: symptom seen on simulations where that happened)
    min_pseudotime_agreement: float = 0.5
    #: below this ``|direction_score|`` the order hardly follows the splicing kinetics in
    #: either direction: guards against an order unrelated to time (consistent orders
    #: scored 0.2-0.5 on the simulations)
    min_direction_score: float = 0.1

    def doubtful(self, agreement: float, score: float) -> bool:
        """Whether an order with this pseudotime ``agreement`` and direction ``score``
        looks like a failed start (a NaN agreement counts as doubtful)."""
        return not abs(agreement) >= self.min_pseudotime_agreement or (
            abs(score) < self.min_direction_score)


@dataclass(frozen=True)
class RefinePolicy:
    """The initial-condition refinement's window and its early end.

    The refinement is checked every :attr:`check_every` epochs from :attr:`min_epochs`
    on and ended once the validation log-likelihood cannot catch up with the first
    stage's (:class:`~pyro_velo.inference.refine.RefinementCutoff`).
    """

    #: epochs between checks of the validation log-likelihood: guards against paying a
    #: reconstruction pass over the validation cells after every epoch
    check_every: int = 5
    #: epochs before the first check: guards against judging the fine-tuning before it
    #: moved (the accepted refinement on the simulations crossed zero by epoch 9)
    min_epochs: int = 10
    #: start of each cell's window, as a fraction of the span of inferred times: guards
    #: against a window mean that drifts from the cell (on simulations a window of
    #: 10% / 2% gave a worse start than the first-stage fit)
    window_start: float = 0.03
    #: end of the window, as a fraction of that span (see :attr:`window_start`)
    window_end: float = 0.005


@dataclass(frozen=True)
class NeighbourPolicy:
    """How many nearest neighbours ``pp.preprocess(n_neighbors=None)`` uses.

    scVelo's 30, except on small data sets, where 30 neighbours would make every cell's
    moments an average over a large share of all cells: then a fifth of the cells.
    Measured (2026-12-07, benchmarks/RESULTS.md): on the 50-cell real fixtures 30
    neighbours ordered the marker stages at 0.62-0.70 (dentate gyrus) and 0.79-0.81
    (pancreas) over six model seeds, flagging every fit, a fifth of the cells at
    0.78-0.79 (all but perfect) and 0.915-0.926 (5 to 20 neighbours were alike); on the
    benchmark's 100-cell sets (four configurations, six draws) 30 neighbours ran three
    of 24 fits backwards, a fifth of the cells none; at 200 cells 30 neighbours ran none
    backwards and 14 had the worse worst case.
    """

    #: scVelo's default, used from ``n_cells / max_share`` cells on
    default: int = 30
    #: the largest share of the cells one neighbourhood may hold: guards against
    #: moments averaged over most of a small data set (a fifth: measured good at 50
    #: and 100 cells, where 60% and 30% failed; 40% was already good at 50 cells)
    max_share: float = 0.2
    #: fewest neighbours, so that moments still average out counting noise (a
    #: heuristic: 5 was as good as 10 on the 50-cell fixtures)
    minimum: int = 5

    def n_neighbors(self, n_cells: int) -> int:
        """``min(30, max(5, n_cells // 5))`` with the defaults, and at most ``n_cells - 1``
        (but 2 at least, which fewer than 3 cells cannot give: preprocess says so)."""
        count = min(self.default, max(self.minimum, int(n_cells * self.max_share)))
        return min(count, max(2, n_cells - 1))


@dataclass(frozen=True)
class EpochPolicy:
    """Default epochs of the training stages, from the data size."""

    #: fewest warm-up epochs: guards against a warm-up too short to order the cells
    #: when ``max_epochs`` is small (a heuristic floor, not a measured optimum)
    min_warmup_epochs: int = 20
    #: otherwise the warm-up lasts ``max_epochs // warmup_divisor`` epochs
    warmup_divisor: int = 10
    #: the refinement lasts ``max_epochs // refine_divisor`` epochs: a fine-tuning, much
    #: shorter than the stages it refines
    refine_divisor: int = 4

    def warmup_epochs(self, max_epochs: int) -> int:
        """``max(20, max_epochs // 10)`` with the defaults."""
        return max(self.min_warmup_epochs, max_epochs // self.warmup_divisor)

    def refine_epochs(self, max_epochs: int) -> int:
        """``max_epochs // 4`` with the defaults."""
        return max_epochs // self.refine_divisor

    #: the share of the constant-rate epochs a run with the learning-rate schedule
    #: (:class:`LearningRatePolicy`, ``train(lr_schedule=True)``) trains: the speed of
    #: that option (0.4 without the schedule lost 0.016 velocity cosine in the median
    #: of 8 robustness-benchmark sets, 0.4 with it +0.001; benchmarks/RESULTS.md)
    scheduled_share: float = 0.4

    def max_epochs(self, n_cells: int, scheduled: bool = False) -> int:
        """Default epochs per stage. With a constant learning rate (``scheduled``
        False): ``clip(4e5 / n, 100, 1000)`` to 100k cells, then ``max(10, 1e7 / n)``;
        with the schedule, :attr:`scheduled_share` of that (0.4: ``clip(1.6e5 / n, 40,
        400)``, 160 at 1,000 cells).

        Small data sets need many epochs for enough gradient steps (about 2,200 per
        stage at a constant rate); from 100k cells on, an epoch holds so many steps
        that fewer passes suffice.
        """
        share = self.scheduled_share if scheduled else 1.0
        if n_cells <= 100_000:
            return int(np.clip(400_000 * share / n_cells, 100 * share, 1000 * share))
        return max(int(10 * share), int(10_000_000 * share / n_cells))


@dataclass(frozen=True)
class LearningRatePolicy:
    """The learning rates over one training stage (a one-cycle schedule), as multiples
    of ``train(lr=..., lr_ode=...)``.

    The networks' rate rises linearly from ``lr`` to ``peak * lr`` over the first
    :attr:`rise` of the stage's epochs, then falls along a half cosine to ``end * lr``
    at its last epoch; the per-gene ODE parameters follow the same curve capped at
    ``lr_ode`` (their rate is already high: only the fall applies).

    Used by ``train(lr_schedule=True)`` with 0.4 of the constant-rate epochs
    (:attr:`EpochPolicy.scheduled_share`). On the robustness benchmark (72 fits against
    the default on one machine, benchmarks/RESULTS.md) that took 60% of the default's
    time and was less accurate: velocity cosine 0.020 lower in the paired median on our
    simulator and 0.014 on the regulatory network, and worse worst draws (2 branches
    draw 3: Spearman .769 against .957). Hence an option for quick exploration, not the
    default.
    """

    #: the networks' highest rate, a multiple of ``lr``: the paper's 2e-4 is safe but
    #: slow; 5x lost more velocity on 8 robustness-benchmark sets (median -0.017
    #: cosine against -0.003 at 3x, both without the ODE rates' fall)
    peak: float = 3.0
    #: the rate at the end of a stage, a multiple of ``lr`` (and ``lr_ode``): a smaller
    #: final step settles the fit the stage hands on
    end: float = 0.3
    #: share of the stage's epochs over which the networks' rate rises to :attr:`peak`
    #: (guards against large first steps from a fresh start; a heuristic)
    rise: float = 0.05

    def network(self, progress: float) -> float:
        """Multiple of ``lr`` at ``progress`` (0 to 1) through the stage's epochs."""
        progress = min(max(progress, 0.0), 1.0)
        if progress < self.rise:
            return 1.0 + (self.peak - 1.0) * progress / self.rise
        fall = (progress - self.rise) / (1.0 - self.rise)
        return float(self.end + (self.peak - self.end) * 0.5 * (1.0 + np.cos(np.pi * fall)))

    def ode(self, progress: float) -> float:
        """Multiple of ``lr_ode`` at ``progress``: the network's, at most 1."""
        return min(1.0, self.network(progress))


@dataclass(frozen=True)
class SettlingPolicy:
    """An optional earlier end of the mixture of ODEs: once its velocity field settles.

    With a :attr:`min_cosine`, every :attr:`check_every` epochs of the stage the
    velocity of (up to :attr:`max_cells`) validation cells is computed at their
    posterior mean time and compared, cell by cell, with its value :attr:`lag` epochs
    earlier (:class:`~pyro_velo.inference.stages.VelocitySettled`); the stage ends once
    the mean cosine reaches :attr:`min_cosine`, as if early stopping had ended it. Off
    by default; turn it on with ``pv.policies.SETTLING =
    pv.policies.SettlingPolicy(min_cosine=0.99)`` (or for one block,
    :func:`replaced`).

    The validation ELBO keeps improving slowly, so early stopping lets the stage run on
    for hundreds of epochs after the velocity stopped changing: recorded every 10
    epochs along default fits (``benchmarks/training_curves.py``, 18
    robustness-benchmark sets at 800 x 100 and 1,000 x 200, 21 fits of the stage with
    the refits whose time was held), the field reached a mean cosine of 0.99 with its
    value 50 epochs earlier after 90-260 of the stage's 190-490 epochs in 16 fits (the
    regulatory forks never settled), and the velocity cosine with the truth changed
    by -0.031 to +0.074 (median +0.012) from there to the stage's end. In the basic
    stage the velocity still improves after it settles by this measure, so the rule is
    not applied there.

    Why it is not the default: over the robustness benchmark's 96 fits, against the
    default in the same run, ``min_cosine=0.99`` took 20% less time and kept every
    family's median time Spearman within 0.004, but the velocity cosine of scVelo's
    simulator fell in five of its six fits (paired median -0.015), and on the speed
    benchmark's 2,000 x 300 set by 0.055 (.767 against .822); the other families'
    paired medians rose by 0.002-0.007 (benchmarks/RESULTS.md, "The settling stop").
    """

    #: epochs between two checks: a check encodes the cells and evaluates the ODE once
    check_every: int = 10
    #: epochs between the two velocity fields compared (a multiple of
    #: :attr:`check_every`): a shorter lag mistakes a slow drift for a settled field
    lag: int = 50
    #: mean cosine from which the field counts as settled (None, the default: never
    #: stop on it; 0.99 is the measured setting, see the class docstring)
    min_cosine: float | None = None
    #: at most this many validation cells are compared (the first ones): enough for a
    #: stable mean, and bounded memory for the :attr:`lag` / :attr:`check_every` fields
    #: held on large data
    max_cells: int = 1000

    def __post_init__(self) -> None:
        if self.check_every < 1 or self.lag < self.check_every or self.lag % self.check_every:
            raise ValueError("SettlingPolicy: lag must be a positive multiple of check_every")

    def settled(self, cosine: float) -> bool:
        """Whether a mean cosine with the field :attr:`lag` epochs earlier counts as
        settled."""
        return self.min_cosine is not None and cosine >= self.min_cosine


@dataclass(frozen=True)
class CompilePolicy:
    """When ``train(compile=None, bf16=None)`` compiles the kinetics (and uses bfloat16).

    Break-even estimate from the pancreas-size run (3,700 x 2,000) on two cores:
    compiling costs 7-10 s on an empty cache, and a run does about 2.3 stages' worth of
    passes, each cell-gene pass about 2.4e-8 s cheaper compiled, so compiling pays from
    about 1.3e8; the round number above it keeps small runs (and the test suite) free
    of compile time.
    """

    #: training cells x genes x max_epochs of one stage from which compiling pays:
    #: guards against a compile (7-10 s) that costs more than it saves
    min_work: int = 200_000_000

    def worth_it(self, train_cells: int, genes: int, max_epochs: int, device_type: str
                 ) -> bool:
        """Whether a run of this size on this device type compiles by default."""
        return device_type == "cpu" and train_cells * genes * max_epochs >= self.min_work

    @staticmethod
    def bf16(worth_it: bool) -> bool:
        """Whether bfloat16 products are used by default: where compiling is worth it
        and the CPU multiplies bfloat16 natively (:func:`pyro_velo.nn.bf16_supported`)."""
        from . import nn

        return worth_it and nn.bf16_supported()


@dataclass(frozen=True)
class RestartPolicy:
    """More random starts for a single fit whose order the data contradict.

    The ELBO cannot tell a fit from its time-reversed twin, and one random start can end
    in an optimum whose time runs backwards or whose order the data's own flow does not
    support. A single fit (``n_starts=1``) whose direction report (see
    :meth:`OrientationPolicy.report`) is ``'reversed'``, or ``'forward'`` with an order
    the flow does not corroborate (``order_corroborated`` False), is therefore trained
    from :attr:`extra_starts` more starts; a start that does not run backwards is kept,
    one that runs forward before one whose direction the flow leaves not identified,
    and one whose order the flow corroborates first, then the best by
    :attr:`rank_by` (:func:`~pyro_velo.inference.restarts.best_of_starts`; the same
    choice among the starts of ``train(n_starts=k)``). A direction the flow leaves
    ``'not identified'`` is reported instead (on the regulatory fork draw 2 of the
    robustness benchmark, the one first start left so, three starts kept the same fit).
    """

    #: further starts after a doubtful single fit (0: none): guards against the optimum
    #: of one start. Measured (robustness benchmark, 800 x 100, three starts against
    #: one): our simulator's linear draw 3 Spearman 0.59 -> 0.97, 2-branch draw 3
    #: 0.54 -> 0.95, the regulatory fork draw 5 (reversed) 0.30 -> 0.78, the dentate
    #: gyrus fixture's worst seed 0.17 -> 0.36
    extra_starts: int = 2
    #: which of the starts that pass the direction checks is kept: ``'elbo'``, the
    #: highest validation ELBO; ``'flow'``, the time that agrees best with the evidence
    #: that sets the direction (the data's flow, or the root or capture times given),
    #: the ELBO breaking ties. Measured on the same three starts per set
    #: (``benchmarks/start_selection.py``): on our simulator's 2-branch sets both keep
    #: starts of the same time; on 24 sets of 100 cells the worst Spearman is 0.537 by the flow
    #: and 0.428 by the ELBO, on 18 regulatory-network sets 0.646 and 0.122, but there
    #: the median velocity cosine is .315 and .350, so the ELBO stays the default
    rank_by: str = "elbo"

    def __post_init__(self) -> None:
        if self.rank_by not in ("elbo", "flow"):
            raise ValueError(f"rank_by must be 'elbo' or 'flow', got {self.rank_by!r}")

    def wants_more_starts(self, report: dict) -> bool:
        """Whether a single fit with this direction report should compete with more
        starts: its time runs backwards (against the flow, or against a given root or
        capture times), or it runs forward but the flow does not corroborate its
        order."""
        if self.extra_starts <= 0:
            return False
        return report["status"] == "reversed" or (
            report["status"] == "forward" and not report["order_corroborated"])


@dataclass(frozen=True)
class ThreadPolicy:
    """How many CPU threads training uses (:func:`~pyro_velo.inference.threads.training_threads`)
    and how :class:`~pyro_velo.inference.threads.ThreadGovernor` follows the load.

    Measured on two cores, 1,000 cells x 200 genes, 60 epochs: 11.4 s on two threads
    and 12.3 s on one when idle; beside one busy process, 275 s on two threads and
    12.2 s on one (OpenMP threads waiting for a core taken by the other process).
    """

    #: seconds of training between two readings of the load: a reading costs a few
    #: microseconds, and a shorter window lets a burst of other work change the count
    window: float = 0.5
    #: shortest reading taken into account: guards against scheduling noise
    min_window: float = 0.05
    #: a core counts as free while other processes use less than ``1 - margin`` of it:
    #: guards against giving up a thread for light background work
    margin: float = 0.25
    #: genes from which the default trains on torch's thread count rather than one
    #: thread: guards against a second thread that gains little (7% at 200 genes) and
    #: beside a busy process costs up to 20x; at 2,000 genes two threads were 1.5x
    #: faster (the boundary in between is a round number, not measured)
    min_genes_for_threads: int = 1000

    def default_threads(self, n_genes: int) -> int | None:
        """The default's thread count: one below :attr:`min_genes_for_threads` genes,
        else None (torch's count)."""
        return 1 if n_genes < self.min_genes_for_threads else None


@dataclass(frozen=True)
class TimePriorDefaults:
    """The default Normal time prior, relative to the length ``t_max`` of the time axis.

    Centred in the middle of the axis with a quarter of it as standard deviation: the
    prior keeps times around ``[0, t_max]`` without pinning them.
    """

    loc_fraction: float = 0.5
    scale_fraction: float = 0.25

    def loc(self, t_max: float, given: float | None = None) -> float:
        """The prior mean: ``given``, else ``loc_fraction * t_max``."""
        return self.loc_fraction * t_max if given is None else float(given)

    def scale(self, t_max: float, given: float | None = None) -> float:
        """The prior standard deviation: ``given``, else ``scale_fraction * t_max``."""
        return self.scale_fraction * t_max if given is None else float(given)


@dataclass
class StartCandidate:
    """One warm-up start competing for the fit: its validation loss (negative ELBO), the
    agreement of its cell order with the flow potential, and what restoring it needs."""

    name: str
    loss: float
    agreement: float
    payload: object = None


@dataclass(frozen=True)
class OrientationPolicy:
    """How the data's own flow decides the direction of time (thresholds in one place).

    The ELBO cannot tell a fit from its time-reversed twin on data outside the model's
    ODE family (on regulatory-network simulations both fit about equally well), so the
    order of cells that the warm-up hands on is checked against the potential of
    :func:`flow_evidence`, which does not come from the model.

    Attributes
    ----------
    keep_agreement
        A warm-up whose order agrees with the potential at least this well (Spearman)
        stands as the ELBO chose it; below it, a warm-up started from the potential
        competes and the order that agrees best is kept. On the model's own ODE family
        the ELBO's choice agrees at 0.9 or more, so it is left as it was there.
    min_reproducibility
        Below this agreement between the potentials of two halves of the genes, the
        flow is too noisy to vote (measured: 0.7-0.99 on simulated trajectories).
    identified_agreement
        The fitted time's ``|agreement|`` with a reproducible potential from which on
        the direction counts as identified by the data.
    drift_tolerance
        How far the mixture of ODEs may lower the basic fit's agreement before it is
        refitted with the basic fit's time held fixed
        (:class:`~pyro_velo.inference.stages.OrderKeepingStage`). With a rate per cell
        state, the cell states can explain steady-state clusters on their own and the
        time then loses its order (measured on regulatory-network simulations: a fork
        0.59 -> -0.07, a tree 0.85 -> 0.66 while its Spearman with the type depth fell
        from 0.85 to 0.47).
    max_lag
        How far the fitted time's agreement with the potential may fall below the
        potential's own reproducibility with the order still counted as corroborated by
        the flow. Fits that follow the flow stay within 0.1 of it on our simulator's
        sets; the two of 18 there that ended in a worse optimum (Spearman with the true
        time 0.59 and 0.54) lagged by 0.35 and 0.48 (robustness benchmark, 800 x 100).
    watch_every
        Epochs between two checks of that loss while the mixture of ODEs trains
        (:class:`~pyro_velo.inference.stages.OrderWatch`); a check is one pass of the
        encoder over the cells, and the stage stops at the first check that finds the
        order lost instead of training on to its end.
    """

    keep_agreement: float = 0.3
    min_reproducibility: float = 0.3
    identified_agreement: float = 0.2
    drift_tolerance: float = 0.1
    max_lag: float = 0.3
    watch_every: int = 10

    def lost_order(self, before: float | None, after: float | None,
                   evidence: FlowEvidence | None) -> bool:
        """Whether a stage lost the order of cells it was handed: the agreement with a
        trusted flow fell from at least ``keep_agreement`` by more than
        ``drift_tolerance``."""
        if before is None or after is None or not self.trusts(evidence):
            return False
        return before >= self.keep_agreement and after < before - self.drift_tolerance

    def trusts(self, evidence: FlowEvidence | None) -> bool:
        """Whether the flow is reproducible enough to vote on the direction."""
        return evidence is not None and evidence.reproducibility >= self.min_reproducibility

    def wants_flow_start(self, candidates: list[StartCandidate],
                         evidence: FlowEvidence | None) -> bool:
        """Whether a warm-up from the flow potential should compete with ``candidates``."""
        if not self.trusts(evidence) or not candidates:
            return False
        return min(candidates, key=lambda c: c.loss).agreement < self.keep_agreement

    def choose(self, candidates: list[StartCandidate],
               evidence: FlowEvidence | None) -> StartCandidate:
        """The ELBO's best start, unless its order contradicts a trusted flow."""
        by_loss = min(candidates, key=lambda c: c.loss)
        if not self.trusts(evidence) or by_loss.agreement >= self.keep_agreement:
            return by_loss
        return max(candidates, key=lambda c: c.agreement)

    def report(self, evidence: FlowEvidence | None, t: np.ndarray,
               given: str | None = None, given_order: np.ndarray | None = None) -> dict:
        """The diagnostic stored with a fit: how its time agrees with the flow and with
        the order a user gave.

        ``status`` is ``'given'`` (``given`` names the root or capture times that set
        the direction, and the time follows ``given_order``: their per-cell order, NaN
        where unknown), ``'forward'``, ``'reversed'`` (the time runs against the given
        order or, without one, against a reproducible flow) or ``'not identified'``.
        ``order_corroborated``: the time agrees with a reproducible flow within
        :attr:`max_lag` of the flow's own reproducibility. ``given_agreement``: Spearman
        of the time with ``given_order`` (NaN without one).
        """
        agreement = evidence.agreement(t) if evidence is not None else float("nan")
        reproducibility = evidence.reproducibility if evidence is not None else float("nan")
        along = order_agreement(t, given_order) if given_order is not None else float("nan")
        if given is not None:
            status = "reversed" if along < 0 else "given"
        elif not self.trusts(evidence) or abs(agreement) < self.identified_agreement:
            status = "not identified"
        else:
            status = "forward" if agreement > 0 else "reversed"
        corroborated = self.trusts(evidence) and agreement >= reproducibility - self.max_lag
        return {"status": status, "given_by": given or "",
                "flow_agreement": float(agreement),
                "flow_reproducibility": float(reproducibility),
                "order_corroborated": bool(corroborated),
                "given_agreement": float(along)}


NEIGHBOURS = NeighbourPolicy()
START = StartPolicy()
REFINE = RefinePolicy()
EPOCHS = EpochPolicy()
LEARNING_RATES = LearningRatePolicy()
COMPILE = CompilePolicy()
TIME_PRIOR = TimePriorDefaults()
ORIENTATION = OrientationPolicy()
SETTLING = SettlingPolicy()
THREADS = ThreadPolicy()
RESTARTS = RestartPolicy()


@contextlib.contextmanager
def replaced(name: str, policy: object) -> Iterator[None]:
    """Within the block, the module-level policy ``name`` is ``policy``; afterwards the
    one it replaced, e.g. the mixture of ODEs trained with the settling stop on::

        with pv.policies.replaced("SETTLING", pv.policies.SettlingPolicy(min_cosine=0.99)):
            vae.train()

    Raises
    ------
    ValueError
        ``name`` is not one of this module's policy instances.
    """
    current = globals().get(name)
    if not name.isupper() or current is None or not hasattr(type(current),
                                                            "__dataclass_fields__"):
        raise ValueError(f"{name!r} is not a policy of pyro_velo.policies")
    globals()[name] = policy
    try:
        yield
    finally:
        globals()[name] = current
