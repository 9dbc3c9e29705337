"""CPU threads that follow the machine's load while training.

torch's intra-op threads (OpenMP) make each small operation wait for its slowest
thread. When another busy process holds one of the cores, a thread of ours keeps
losing its core in the middle of an operation and every operation waits for it: on
two cores, a fit with two threads beside one busy single-threaded process ran up to
20x slower than alone, while one thread ran at about its idle speed.

:class:`ThreadGovernor` measures, while training, how much CPU the *other* processes
take (the machine's busy time from ``/proc/stat`` less this process's own CPU time),
and sets torch's thread count to the cores they leave free, between one and the count
it started with. It runs with ``VeloVAE.train(num_threads='auto')``. Because torch's
results depend on the thread count, such a fit is not bitwise reproducible; the default
(:func:`training_threads`) fixes the count from the data's size instead. Where
``/proc/stat`` cannot be read (not Linux) the governor does nothing.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from .. import policies
from ..policies import ThreadPolicy
from .callbacks import Callback, SVILoop

PROC_STAT = Path("/proc/stat")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def training_threads(num_threads: int | str | None, device_type: str,
                     n_genes: int) -> tuple[int | None, bool]:
    """The thread count to train with (None: leave torch's) and whether a
    :class:`ThreadGovernor` adapts it, for ``train(num_threads=...)``.

    ``None`` (default) gives a count fixed by the data's size
    (:meth:`~pyro_velo.policies.ThreadPolicy.default_threads`), so that a seed
    reproduces the fit: torch's results depend on the thread count. ``'auto'`` lets the
    count follow the machine's load, which is faster on shared cores but not bitwise
    reproducible. A number fixes the count. Off the CPU nothing is set.
    """
    if device_type != "cpu":
        return None, False
    if num_threads == "auto":
        return None, True
    if num_threads is None:
        return policies.THREADS.default_threads(n_genes), False
    return num_threads, False


class CpuMeter:
    """CPU seconds the machine and this process have spent since the last reading."""

    def __init__(self) -> None:
        self.ticks_per_second = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = self._machine_busy()
        self.available = busy is not None
        self.last = (time.monotonic(), busy, time.process_time()) if self.available else None

    def _machine_busy(self) -> float | None:
        """Busy CPU seconds of the whole machine since boot (None if unreadable)."""
        try:
            with PROC_STAT.open() as stat:
                fields = [int(x) for x in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal: idle and iowait are not busy
        busy = sum(fields[:8]) - fields[3] - fields[4]
        return busy / self.ticks_per_second

    def _read(self) -> tuple[float, float, float]:
        return time.monotonic(), self._machine_busy() or 0.0, time.process_time()

    def others_load(self) -> tuple[float, float]:
        """``(elapsed seconds, cores kept busy by other processes)`` since the last call."""
        now = self._read()
        wall, machine, own = (b - a for a, b in zip(self.last, now, strict=True))
        self.last = now
        if wall <= 0:
            return 0.0, 0.0
        return wall, max(0.0, (machine - own) / wall)


class ThreadGovernor(Callback):
    """Set torch's CPU threads to the cores other processes leave free.

    Reads the load every ``policy.window`` seconds of training (checked after every
    minibatch step) and sets ``torch.set_num_threads`` to
    ``floor(usable cores - others + policy.margin)``, clipped to ``[1, max_threads]``
    (``max_threads``: torch's count when the governor was made). Its state carries
    across the stages of a run; the caller restores torch's count afterwards (see
    :func:`pyro_velo._threads.cpu_threads`).
    """

    def __init__(self, max_threads: int | None = None,
                 policy: ThreadPolicy | None = None) -> None:
        self.policy = policies.THREADS if policy is None else policy
        self.max_threads = max_threads or torch.get_num_threads()
        #: cores this process may run on (the load of other processes is counted on all)
        self.usable = usable_cores()
        self.cores = min(self.usable, self.max_threads)
        self.meter = CpuMeter()
        #: thread counts chosen so far, as ``(seconds since start, threads)``
        self.changes: list[tuple[float, int]] = []
        self._start = time.monotonic()

    def threads_for(self, others: float) -> int:
        """The thread count for ``others`` cores' worth of load from other processes."""
        free = math.floor(self.usable - others + self.policy.margin)
        return max(1, min(self.max_threads, free))

    def _update(self) -> None:
        if time.monotonic() - self.meter.last[0] < self.policy.min_window:
            return  # too short to tell a busy core from scheduling noise
        _wall, others = self.meter.others_load()
        threads = self.threads_for(others)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self.changes.append((time.monotonic() - self._start, threads))

    def on_fit_start(self, loop: SVILoop) -> None:
        if self.meter.available and self.cores > 1:
            self._update()  # the load since the last stage (or since construction)

    def on_step_end(self, loop: SVILoop, step: int) -> None:
        if (self.meter.available and self.cores > 1
                and time.monotonic() - self.meter.last[0] >= self.policy.window):
            self._update()
