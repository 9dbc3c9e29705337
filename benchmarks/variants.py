"""The pyro_velo training variants the benchmarks compare, in one table.

``robustness.py`` and ``speed.py`` name their pyro_velo methods from :data:`VARIANTS`, so
that a method of one benchmark trains exactly as the method of the same name in the
other. Each variant is the default ``train()`` with a few arguments changed, a policy
replaced (:func:`pyro_velo.policies.replaced`), or both.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import pyro_velo as pv


@dataclass(frozen=True)
class Variant:
    """One way of training: ``train()`` arguments, a replaced policy, a table label."""

    label: str
    train_kwargs: dict[str, Any] = field(default_factory=dict)
    #: ``(policy name, policy)`` swapped in while training, or None
    policy: tuple[str, Any] | None = None

    def train(self, vae: pv.VeloVAE, **kwargs: Any):
        """``vae.train(**kwargs)`` with this variant's arguments and policy; its history."""
        swap = pv.policies.replaced(*self.policy) if self.policy else contextlib.nullcontext()
        with swap:
            return vae.train(**kwargs, **self.train_kwargs)


#: benchmark method name -> variant; ``pyro_velo`` is the default training
VARIANTS = {
    "pyro_velo": Variant("default"),
    "pyro_velo-3starts": Variant("n_starts=3", {"n_starts": 3}),
    "pyro_velo-lrschedule": Variant("lr_schedule", {"lr_schedule": True}),
    "pyro_velo-50epochs": Variant("max_epochs=50", {"max_epochs": 50}),
    "pyro_velo-settled": Variant(
        "settling stop", policy=("SETTLING", pv.policies.SettlingPolicy(min_cosine=0.99))),
    "pyro_velo-flowrank": Variant(
        "starts by flow", policy=("RESTARTS", pv.policies.RestartPolicy(rank_by="flow"))),
}
