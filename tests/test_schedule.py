"""The learning-rate schedule of every training stage and the default epochs with it."""

import inspect
import math
import warnings

import pytest

import pyro_velo as pv
from pyro_velo._checks import InputError
from pyro_velo.inference.callbacks import Callback
from pyro_velo.inference.plan import TrainingPlan
from pyro_velo.policies import EpochPolicy, LearningRatePolicy

SMALL = dict(hidden=(32, 16), latent_dim=3, seed=0)
# tiny fits of a few epochs: their direction is beside the point here
pytestmark = pytest.mark.filterwarnings("ignore:The direction of latent time")


@pytest.fixture(scope="module")
def adata(tiny_linear_adata):
    return tiny_linear_adata


class RateRecorder(Callback):
    """The learning rates of every step: (stage, epoch, step, steps per epoch, max epochs,
    network rate, ODE rate)."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def on_step_end(self, loop, step: int) -> None:
        networks, ode = loop.optimizer.param_groups
        self.rows.append((loop.description, loop.epoch, step, loop.steps_per_epoch,
                          loop.max_epochs, networks["lr"], ode["lr"]))


def test_policy_rises_to_the_peak_then_falls_to_the_end():
    policy = LearningRatePolicy(peak=3.0, end=0.3, rise=0.1)
    assert policy.network(0.0) == pytest.approx(1.0)
    assert policy.network(0.05) == pytest.approx(2.0)
    assert policy.network(0.1) == pytest.approx(3.0)
    assert policy.network(0.55) == pytest.approx((3.0 + 0.3) / 2)
    assert policy.network(1.0) == pytest.approx(0.3)
    falling = [policy.network(0.1 + 0.9 * k / 20) for k in range(21)]
    assert all(a > b for a, b in zip(falling[:-1], falling[1:], strict=True))
    # progress outside [0, 1] (a stage trained past its bound) is clipped
    assert policy.network(1.5) == pytest.approx(0.3)
    assert policy.network(-1.0) == pytest.approx(1.0)
    # the ODE rates never rise above lr_ode, and fall with the networks'
    assert policy.ode(0.1) == 1.0
    assert policy.ode(1.0) == pytest.approx(0.3)
    assert max(policy.ode(k / 50) for k in range(51)) == 1.0


def test_scheduled_epochs_are_a_share_of_the_constant_rate_ones():
    policy = EpochPolicy()
    assert policy.max_epochs(1000) == 400
    assert policy.max_epochs(1000, scheduled=True) == 160
    assert policy.max_epochs(50) == 1000 and policy.max_epochs(50, scheduled=True) == 400
    assert policy.max_epochs(10_000) == 100
    assert policy.max_epochs(10_000, scheduled=True) == 40
    # continuous at 100k cells, at least 4 passes beyond
    scheduled = [policy.max_epochs(n, scheduled=True) for n in (100_000, 100_001, 10**8)]
    assert scheduled == [40, 39, 4]
    assert policy.max_epochs(10**8) == 10


def test_every_stage_follows_the_schedule_from_its_own_epochs(adata):
    recorder = RateRecorder()
    vae = pv.VeloVAE(adata, model="full", **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae.train(max_epochs=6, warmup_epochs=3, refine_epochs=2, lr=1e-3, lr_ode=2e-2,
                  early_stopping=False, progress_bar=False, callbacks=[recorder],
                  lr_schedule=True)
    policy = pv.policies.LEARNING_RATES
    stages = {row[0] for row in recorder.rows}
    assert len(stages) >= 4, stages  # warm-up, basic, full and refinement
    for _, epoch, step, steps, max_epochs, lr, lr_ode in recorder.rows:
        progress = (epoch + step / steps) / max_epochs
        assert lr == pytest.approx(1e-3 * policy.network(progress))
        assert lr_ode == pytest.approx(2e-2 * policy.ode(progress))
    first = [row for row in recorder.rows if row[1] == row[2] == 0]
    assert first and all(row[5] == pytest.approx(1e-3) for row in first)
    assert max(row[5] for row in recorder.rows) > 2e-3  # near the peak of 3e-3
    assert max(row[6] for row in recorder.rows) == pytest.approx(2e-2)


def test_constant_rates_and_longer_epochs_by_default(adata):
    recorder = RateRecorder()
    vae = pv.VeloVAE(adata, model="basic", **SMALL)
    vae.train(max_epochs=3, warmup_epochs=0, lr=1e-3, lr_ode=2e-2, progress_bar=False,
              callbacks=[recorder])
    assert {(row[5], row[6]) for row in recorder.rows} == {(1e-3, 2e-2)}
    constant = TrainingPlan(**_plan_arguments()).epochs(1000, vae.config)
    scheduled = TrainingPlan(**_plan_arguments(lr_schedule=True)).epochs(1000, vae.config)
    assert (constant.max_epochs, scheduled.max_epochs) == (400, 160)
    assert (constant.warmup_epochs, scheduled.warmup_epochs) == (40, 20)
    with pytest.raises(InputError, match="lr_schedule must be True or False"):
        vae.train(max_epochs=2, progress_bar=False, lr_schedule="yes")


def test_a_resumed_run_continues_the_schedule(adata, tmp_path, monkeypatch):
    """Rates are a function of the epoch and step: a resumed run's are an
    uninterrupted one's (the loaded optimiser state holds the last rates used)."""
    # the uninterrupted reference trains one start, as a checkpointed run does
    monkeypatch.setattr(pv.policies, "RESTARTS", pv.policies.RestartPolicy(0))
    args = dict(max_epochs=6, warmup_epochs=0, progress_bar=False, early_stopping=False,
                lr_schedule=True)
    whole = RateRecorder()
    pv.VeloVAE(adata, model="basic", **SMALL).train(**args, callbacks=[whole])
    first, second = RateRecorder(), RateRecorder()
    vae = pv.VeloVAE(adata, model="basic", **SMALL)

    class Interrupt(Callback):
        def on_epoch_end(self, loop) -> None:
            if loop.epoch == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        vae.train(**args, checkpoint_dir=tmp_path, checkpoint_every=1,
                  callbacks=[first, Interrupt()])
    vae.train(**args, checkpoint_dir=tmp_path, checkpoint_every=1, resume=True,
              callbacks=[second])
    resumed = [row for row in first.rows if row[1] <= 2] + second.rows
    assert [row[1:] for row in resumed] == [row[1:] for row in whole.rows]
    assert not math.isclose(whole.rows[0][5], whole.rows[-1][5])


def _plan_arguments(**changes):
    """TrainingPlan's arguments as VeloVAE.train's defaults give them."""
    parameters = inspect.signature(pv.VeloVAE.train).parameters
    return {**{name: p.default for name, p in parameters.items() if name != "self"},
            **changes}
