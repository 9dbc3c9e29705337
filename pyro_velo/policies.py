"""The heuristics of training, named and documented, with their defaults in one place.

Each policy is a small frozen dataclass; the module-level instances (:data:`START`,
:data:`REFINE`, :data:`EPOCHS`, :data:`COMPILE`, :data:`TIME_PRIOR`) are the defaults the
package reads at the moment it needs them, so replacing one (e.g.
``pv.policies.COMPILE = pv.policies.CompilePolicy(min_work=10**9)``) changes what
follows. Every threshold states what it guards against and what it was measured on
(or that it is a heuristic without a measurement).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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

    @staticmethod
    def max_epochs(n_cells: int) -> int:
        """Default epochs per stage: ``clip(4e5 / n, 100, 1000)`` to 100k cells, then
        ``max(10, 1e7 / n)``.

        Small data sets need many epochs for enough gradient steps; from 100k cells on,
        an epoch holds so many steps that fewer passes suffice (at least 10).
        """
        if n_cells <= 100_000:
            return int(np.clip(400_000 / n_cells, 100, 1000))
        return max(10, int(10_000_000 / n_cells))


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


START = StartPolicy()
REFINE = RefinePolicy()
EPOCHS = EpochPolicy()
COMPILE = CompilePolicy()
TIME_PRIOR = TimePriorDefaults()
