"""Pyro parameter handling shared by every layer: module-local parameters and seeding."""

from __future__ import annotations

import pyro
import torch


def local_params():
    """Context in which Pyro modules keep their parameters to themselves.

    Our modules are built and run inside it, so that several fitted models (and the
    user's own Pyro code) never share names in Pyro's global parameter store.
    """
    return pyro.settings.context(module_local_params=True)


def adopt_module(module: torch.nn.Module) -> torch.nn.Module:
    """Prepare a PyroModule built outside :func:`local_params` (e.g. a user's likelihood).

    Pyro gives each module its parameter state when it is constructed in module-local
    mode; one constructed outside lacks it and cannot join our modules. This gives every
    such submodule an empty state (it has no Pyro parameters yet: ``nn.Parameter``
    attributes are kept as they are) and returns the module.
    """
    for sub in module.modules():
        context = getattr(sub, "_pyro_context", None)
        if context is not None and not hasattr(context, "param_state"):
            context.param_state = {"params": {}, "constraints": {}}
    return module


def set_seed(seed: int) -> None:
    """Seed torch and Pyro (makes CPU runs reproducible)."""
    pyro.set_rng_seed(seed)
