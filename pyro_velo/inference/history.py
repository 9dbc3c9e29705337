"""The record of a training run: per-epoch losses, stage boundaries, early stopping,
and the names of what training writes into a model's ``config``."""

from __future__ import annotations

from dataclasses import dataclass, field

#: what training records in a model's ``config`` (not constructor arguments): saved
#: with the model (:mod:`pyro_velo.persist`) and ignored when a checkpoint's
#: configuration is matched against the model resuming it
#: (:class:`~pyro_velo.inference.checkpoint.Checkpointer`)
TRAINING_RECORDS = ("refine_delta1", "refine_delta2", "refined", "warm_start", "n_starts",
                    "start", "start_losses", "start_directions", "start_corroborated",
                    "start_evidence_agreements", "start_agreements", "warm_start_scores",
                    "stage_flow_agreement",
                    "time_held", "settled_epochs", "direction")


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
