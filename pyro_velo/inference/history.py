"""The record of a training run: per-epoch losses, stage boundaries, early stopping."""

from __future__ import annotations

from dataclasses import dataclass, field


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
