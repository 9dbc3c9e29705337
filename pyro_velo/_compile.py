"""Optional ``torch.compile`` of the model's elementwise inner loop, with an eager fallback.

The switching ODE solution (:func:`pyro_velo.kinetics.switching_solve`) is some 70
elementwise passes over a cells x genes minibatch in the forward alone, plus as many in
the backward; eager torch runs each as its own kernel. Compiled, they fuse into a few,
which halves the kinetics' share of a training step (see ``benchmarks/RESULTS.md``).
Compilation costs seconds per graph (once per process, less with torch's on-disk cache),
so it pays on large data only; the training plan decides
(:class:`pyro_velo.inference.plan.TrainingPlan`, by :class:`pyro_velo.policies.CompilePolicy`).

Only calls that record gradients use the compiled function: evaluation passes under
``torch.no_grad`` would each need one more compiled graph for little work. If compiling
fails (no C++ compiler, an unsupported platform), a warning says so once and the eager
function is used from then on, so a training run never fails for it.

The compiled backward recomputes the forward's intermediates instead of saving them
(:func:`_compile_settings`): with intermediates saved, inductor's CPU kernels store the
boolean masks of the kinetics' ``where`` branches, and those stores made the forward
kernel 3-4x slower (128 x 1992 minibatch, 2 threads: 2.2-3.0 ms against 0.6-0.85 ms
recomputing; the backward took 1.3-3.4 ms either way).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import ExitStack
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
            # compiling happens inside a call (the first, or a recompilation)
            with _compile_settings():
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


def _compile_settings() -> ExitStack:
    """Settings for graphs compiled within (see the module notes); torch's default where
    this torch lacks one of them.

    * ``torch._functorch.config.activation_memory_budget = 0``: the backward recomputes
      the forward's intermediates and saves only its inputs.
    * ``torch._inductor.config.cpp.vec_isa_ok = True``: the vector instruction set is
      taken from the CPU's flags instead of from test compilations (six compiler runs,
      about 5 s on an empty cache). Should the compiler lack that instruction set after
      all, compiling fails and :class:`CompiledOrEager` falls back to eager.
    """
    stack = ExitStack()
    try:
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config
    except ImportError:
        return stack
    if hasattr(functorch_config, "activation_memory_budget"):
        stack.enter_context(functorch_config.patch(activation_memory_budget=0.0))
    if hasattr(getattr(inductor_config, "cpp", None), "vec_isa_ok"):
        stack.enter_context(inductor_config.patch({"cpp.vec_isa_ok": True}))
    return stack


_CACHE: dict[Callable[..., Any], CompiledOrEager] = {}


def compiled(fn: Callable[..., Any]) -> CompiledOrEager:
    """The process-wide :class:`CompiledOrEager` of ``fn`` (compiled graphs are reused)."""
    if fn not in _CACHE:
        _CACHE[fn] = CompiledOrEager(fn)
    return _CACHE[fn]
