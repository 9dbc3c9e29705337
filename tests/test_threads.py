"""Training threads (a count fixed by the data's size by default, or one that follows the
machine's load), and the mixture of ODEs' early order check."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import pyro_velo as pv
from pyro_velo import policies
from pyro_velo._checks import InputError
from pyro_velo.inference import threads as threads_module
from pyro_velo.inference.stages import OrderWatch
from pyro_velo.inference.threads import CpuMeter, ThreadGovernor
from pyro_velo.policies import OrientationPolicy, ThreadPolicy

needs_proc_stat = pytest.mark.skipif(not CpuMeter().available,
                                     reason="the CPU load is read from /proc/stat (Linux)")


@pytest.fixture
def two_cores(monkeypatch):
    """A machine of two usable cores, torch on two threads (restored afterwards)."""
    monkeypatch.setattr(threads_module, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("others", "expected"),
                         [(0.0, 2), (0.1, 2), (0.5, 1), (1.0, 1), (1.9, 1), (3.0, 1)])
def test_threads_are_the_cores_other_processes_leave_free(two_cores, others, expected):
    assert ThreadGovernor(max_threads=2).threads_for(others) == expected


def test_threads_never_exceed_the_starting_count(monkeypatch):
    monkeypatch.setattr(threads_module, "usable_cores", lambda: 16)
    assert ThreadGovernor(max_threads=3).threads_for(0.0) == 3
    assert ThreadGovernor(max_threads=3).threads_for(14.0) == 2


@needs_proc_stat
def test_the_meter_sees_another_busy_process_but_not_this_one():
    meter = CpuMeter()
    end = time.monotonic() + 0.4
    while time.monotonic() < end:  # this process busy: not counted as others' load
        pass
    _, own_only = meter.others_load()
    busy = subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"])
    try:
        time.sleep(0.3)
        meter.others_load()
        time.sleep(0.6)
        _, with_busy = meter.others_load()
    finally:
        busy.kill()
        busy.wait()
    assert with_busy > 0.6
    assert with_busy > own_only + 0.4


class RecordThreads(pv.inference.Callback):
    def __init__(self):
        self.seen: set[int] = set()

    def on_step_end(self, loop, step):
        self.seen.add(torch.get_num_threads())


class BusyMeter:
    """A meter that reports one other process busy on a whole core."""

    available = True

    def __init__(self):
        self.last = (0.0, 0.0, 0.0)

    def others_load(self):
        self.last = (time.monotonic(), 0.0, 0.0)
        return 1.0, 1.0


@pytest.fixture(scope="module")
def small_adata():
    adata = pv.datasets.simulate(n_cells=150, n_genes=15, topology="linear", seed=0)
    pv.pp.preprocess(adata, random_state=0, n_pcs=10)
    return adata


def _threads_seen(adata, **options) -> set[int]:
    record = RecordThreads()
    vae = pv.VeloVAE(adata, model="basic", hidden=(8,), seed=0)
    vae.train(max_epochs=4, warmup_epochs=2, callbacks=[record], progress_bar=False,
              **options)
    return record.seen


def test_auto_threads_drop_a_thread_for_a_busy_core_and_are_restored(
        two_cores, small_adata, monkeypatch):
    monkeypatch.setattr(threads_module, "CpuMeter", BusyMeter)
    assert _threads_seen(small_adata, num_threads="auto") == {1}
    assert torch.get_num_threads() == 2  # the caller's count afterwards


def test_a_given_thread_count_is_kept_whatever_the_load(two_cores, small_adata,
                                                         monkeypatch):
    monkeypatch.setattr(threads_module, "CpuMeter", BusyMeter)
    assert _threads_seen(small_adata, num_threads=2) == {2}


def test_the_default_count_is_fixed_by_the_number_of_genes(two_cores, small_adata,
                                                           monkeypatch):
    """Not by the load, so that a seed reproduces the fit."""
    monkeypatch.setattr(threads_module, "CpuMeter", BusyMeter)
    assert _threads_seen(small_adata) == {1}  # 15 genes: one thread
    monkeypatch.setattr(policies, "THREADS", policies.ThreadPolicy(min_genes_for_threads=10))
    assert _threads_seen(small_adata) == {2}  # torch's count, busy or not
    assert torch.get_num_threads() == 2


def test_a_thread_count_that_is_neither_a_number_nor_auto_is_refused(small_adata):
    vae = pv.VeloVAE(small_adata, model="basic", hidden=(8,), seed=0)
    with pytest.raises(InputError, match="num_threads"):
        vae.train(max_epochs=2, num_threads="many")


def test_a_short_reading_is_ignored(two_cores, monkeypatch):
    governor = ThreadGovernor(max_threads=2, policy=ThreadPolicy(min_window=60.0))
    monkeypatch.setattr(governor, "meter", BusyMeter())
    governor.meter.last = (time.monotonic(), 0.0, 0.0)
    governor.on_fit_start(None)
    assert torch.get_num_threads() == 2 and governor.changes == []


# ---- the full stage's order check ----------------------------------------------------
class FakeStage:
    """Agreements a full stage's time would have at successive checks."""

    def __init__(self, agreements):
        self.agreements = iter(agreements)
        self.evidence = SimpleNamespace(reproducibility=0.9)
        self.checks = 0

    def flow_agreement(self, model, guide):
        self.checks += 1
        return next(self.agreements)


def _loop():
    module = torch.nn.Linear(1, 1)
    loop = SimpleNamespace(model=module, guide=module, first_epoch=0, epoch=0, stop=False)
    loop.request_stop = lambda: setattr(loop, "stop", True)
    return loop


def _run(watch, loop, epochs):
    for epoch in range(epochs):
        loop.epoch = epoch
        watch.on_epoch_end(loop)
        if loop.stop:
            return epoch + 1
    return epochs


def test_the_watch_stops_the_full_stage_at_the_first_check_that_loses_the_order():
    stage = FakeStage([0.8, 0.75, 0.5, 0.9])
    watch = OrderWatch(stage, before=0.8, policy=OrientationPolicy(watch_every=5))
    loop = _loop()
    assert _run(watch, loop, 100) == 15  # checks at 5, 10, 15: 0.5 < 0.8 - 0.1
    assert watch.lost and stage.checks == 3


def test_the_watch_lets_a_stage_that_keeps_the_order_run_to_its_end():
    stage = FakeStage([0.8] * 10)
    watch = OrderWatch(stage, before=0.8, policy=OrientationPolicy(watch_every=10))
    assert _run(watch, _loop(), 100) == 100
    assert not watch.lost and stage.checks == 10


def test_the_watch_ignores_an_untrusted_flow():
    stage = FakeStage([-0.9] * 10)
    stage.evidence = SimpleNamespace(reproducibility=0.1)
    watch = OrderWatch(stage, before=0.8, policy=OrientationPolicy(watch_every=10))
    assert _run(watch, _loop(), 50) == 50 and not watch.lost



def test_a_resumed_watch_remembers_a_lost_order():
    """The loss is part of the checkpoint, so a run resumed after the stop still refits
    the stage with the time held."""
    watch = OrderWatch(FakeStage([0.5]), before=0.8, policy=OrientationPolicy(watch_every=5))
    assert _run(watch, _loop(), 100) == 5 and watch.lost
    resumed = OrderWatch(FakeStage([]), before=0.8, policy=OrientationPolicy(watch_every=5))
    resumed.load_state_dict(watch.state_dict())
    assert resumed.lost
