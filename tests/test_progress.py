"""Progress output (live bars where someone watches, one line per stage in a log) and the
timing callback."""

from __future__ import annotations

import re

import pytest

import pyro_velo as pv
from pyro_velo._checks import InputError

#: the line a stage writes to a log: "<stage>: <n> epochs, train <x>, ..., <s> s"
STAGE_LINE = re.compile(r"^(.+): (\d+) epochs, train -?\d+\.\d+, validation -?\d+\.\d+, "
                        r"\d+\.\d s$")


class CountLoops(pv.inference.Callback):
    """Counts the training loops and their epochs."""

    def __init__(self):
        self.loops: list[tuple[str, int]] = []

    def on_fit_start(self, loop):
        self.epochs = 0

    def on_epoch_end(self, loop):
        self.epochs += 1

    def on_fit_end(self, loop):
        self.loops.append((loop.description, self.epochs))


@pytest.fixture(scope="module")
def linear_adata():
    adata = pv.datasets.simulate(n_cells=200, n_genes=20, topology="linear", seed=0)
    pv.pp.preprocess(adata, random_state=0, n_pcs=10)
    return adata


@pytest.fixture
def verbosity():
    """Restore the package's verbosity after the test."""
    before = pv.settings.verbosity
    yield pv.settings
    pv.settings.verbosity = before


def _fit(adata, **options) -> CountLoops:
    counter = CountLoops()
    vae = pv.VeloVAE(adata, model="basic", hidden=(8,), seed=0)
    vae.train(max_epochs=6, warmup_epochs=3, num_threads=1, callbacks=[counter], **options)
    return counter


def test_a_log_gets_one_line_per_stage(linear_adata, capsys, verbosity):
    """Captured stderr is not a terminal: no per-epoch lines, one summary per stage."""
    counter = _fit(linear_adata)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    stage_lines = [STAGE_LINE.match(line) for line in lines]
    assert all(stage_lines), lines  # nothing else: no bar, no line per epoch
    assert [(m.group(1), int(m.group(2))) for m in stage_lines] == counter.loops
    assert sum(epochs for _, epochs in counter.loops) > len(lines)


def test_verbosity_zero_and_progress_bar_false_are_silent(linear_adata, capsys, verbosity):
    verbosity.verbosity = 0
    _fit(linear_adata)
    assert capsys.readouterr().err == ""
    verbosity.verbosity = 2
    _fit(linear_adata, progress_bar=False)
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_live_bars_and_verbosity_one_summaries(linear_adata, capsys,
                                                               verbosity, monkeypatch):
    monkeypatch.setattr(pv.inference.callbacks, "interactive", lambda stream=None: True)
    counter = _fit(linear_adata)
    err = capsys.readouterr().err
    for description, epochs in counter.loops:
        assert f"{description}: 100%" in err and f"{epochs}/{epochs}" in err
    assert not any(STAGE_LINE.match(line) for line in err.splitlines())
    verbosity.verbosity = 1  # summaries even in a terminal
    counter = _fit(linear_adata)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(counter.loops) and all(map(STAGE_LINE.match, lines))


@pytest.mark.parametrize("value", [3, -1, True, 1.0, "2"])
def test_verbosity_is_validated(value, verbosity):
    with pytest.raises(InputError, match="verbosity must be 0, 1 or 2"):
        verbosity.verbosity = value


def test_the_timer_sees_every_stage_and_epoch(linear_adata, verbosity):
    verbosity.verbosity = 0
    timer, counter = pv.inference.Timer(), CountLoops()
    vae = pv.VeloVAE(linear_adata, model="basic", hidden=(8,), seed=0)
    vae.train(max_epochs=4, warmup_epochs=2, num_threads=1, callbacks=[timer, counter])
    assert [(name, epochs) for name, _, epochs in timer.stages] == counter.loops
    assert len(timer.epochs) == sum(epochs for _, epochs in counter.loops)
    last = counter.loops[-1][1]  # the basic stage's epochs end the history
    assert [epoch["loss"] for epoch in timer.epochs[-last:]] == vae.history.train[-last:]
    for epoch in timer.epochs:
        assert 0 <= epoch["read"] < epoch["seconds"]
        assert 0 <= epoch["validation"] < epoch["seconds"]
    assert sum(seconds for _, seconds, _ in timer.stages) >= sum(
        epoch["seconds"] for epoch in timer.epochs)
