"""Fitting by stochastic variational inference: the loop, its callbacks and the schedule.

- :mod:`~pyro_velo.inference.loop`: the one SVI training loop (:func:`fit`), recording
  a :class:`~pyro_velo.inference.history.TrainingHistory`;
- :mod:`~pyro_velo.inference.callbacks`: divergence check, early stopping, checkpoint
  hook, progress output and timing, and the :class:`Callback` base for your own;
- :mod:`~pyro_velo.inference.checkpoint`: checkpoints that wrap the stages of a run;
- :mod:`~pyro_velo.inference.stages`: the schedule as a list of :class:`Stage` objects
  and its runner; :mod:`~pyro_velo.inference.warmup` and
  :mod:`~pyro_velo.inference.refine`: the warm-up and refinement stages;
- :mod:`~pyro_velo.inference.restarts`: the schedule from several random starts;
- :mod:`~pyro_velo.inference.plan`: :meth:`pyro_velo.VeloVAE.train`'s plan: its
  arguments checked, the epochs and switches chosen, the stages run under a checkpointer.

The thresholds these use are named in :mod:`pyro_velo.policies`.
"""

from .callbacks import (
    Callback,
    CheckpointHook,
    DivergenceCheck,
    DivergenceError,
    EarlyStopping,
    Progress,
    StopWhen,
    Timer,
)
from .checkpoint import Checkpointer
from .loop import SVILoop, TrainingHistory, evaluate_loss, fit
from .refine import Refine, RefinementCutoff
from .stages import AncestorsStage, BasicStage, FullStage, Run, Stage, run_stages
from .warmup import WarmUp

__all__ = [
    "AncestorsStage", "BasicStage", "Callback", "CheckpointHook", "Checkpointer",
    "DivergenceCheck", "DivergenceError", "EarlyStopping", "FullStage", "Progress",
    "Refine", "RefinementCutoff", "Run", "SVILoop", "Stage", "StopWhen", "Timer",
    "TrainingHistory", "WarmUp", "evaluate_loss", "fit", "run_stages",
]
