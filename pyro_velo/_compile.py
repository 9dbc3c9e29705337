"""Optional ``torch.compile`` of the model's elementwise inner loop, with an eager fallback.

The switching ODE solution (:func:`pyro_velo.kinetics.switching_solve`) is some 70
elementwise passes over a cells x genes minibatch in the forward alone, plus as many in
the backward; eager torch runs each as its own kernel. Compiled, they fuse into a few,
which halves the kinetics' share of a training step (see ``benchmarks/RESULTS.md``).
Compilation costs seconds per graph (once per process, less with torch's on-disk cache),
so it pays on large data only; :meth:`pyro_velo.VeloVAE.train` decides.

Only calls that record gradients use the compiled function: evaluation passes under
``torch.no_grad`` would each need one more compiled graph for little work. If compiling
fails (no C++ compiler, an unsupported platform), a warning says so once and the eager
function is used from then on, so a training run never fails for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch


class CompiledOrEager:
    """``fn`` through ``torch.compile`` (dynamic shapes) while gradients are recorded.

    Parameters
    ----------
    fn
        A pure tensor function (no Python side effects, no data-dependent control flow).
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.failed = False
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed or not torch.is_grad_enabled():
            return self.fn(*args, **kwargs)
        try:
            if self._compiled is None:
                # dynamic: one graph for every minibatch size (the last, partial one too)
                self._compiled = torch.compile(self.fn, dynamic=True)
            return self._compiled(*args, **kwargs)
        except Exception as err:  # compiler errors come in many types
            self.failed = True
            warnings.warn(
                f"torch.compile of {getattr(self.fn, '__name__', self.fn)} failed "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "continuing without compilation (same results, slower steps). Pass "
                "compile=False to train() to skip the attempt.",
                RuntimeWarning, stacklevel=2)
            return self.fn(*args, **kwargs)


_CACHE: dict[Callable[..., Any], CompiledOrEager] = {}


def compiled(fn: Callable[..., Any]) -> CompiledOrEager:
    """The process-wide :class:`CompiledOrEager` of ``fn`` (compiled graphs are reused)."""
    if fn not in _CACHE:
        _CACHE[fn] = CompiledOrEager(fn)
    return _CACHE[fn]
