"""The training loop's public names at their earlier import path, ``pyro_velo.train``.

The loop, its callbacks and checkpoints live in :mod:`pyro_velo.inference`; this module
only re-exports what scripts written against ``pyro_velo.train`` import.
"""

from ._params import adopt_module, local_params, set_seed
from .inference.callbacks import DEFERRED_CHECK_EVERY, DivergenceError
from .inference.checkpoint import (
    Checkpointer,
    get_rng_state,
    read_checkpoint,
    set_rng_state,
    write_checkpoint,
)
from .inference.loop import (
    TrainingHistory,
    check_training_arguments,
    evaluate_loss,
    fit,
    loss_module,
    loss_total,
)

__all__ = [
    "DEFERRED_CHECK_EVERY", "Checkpointer", "DivergenceError", "TrainingHistory",
    "adopt_module", "check_training_arguments", "evaluate_loss", "fit", "get_rng_state",
    "local_params", "loss_module", "loss_total", "read_checkpoint", "set_rng_state",
    "set_seed", "write_checkpoint",
]
