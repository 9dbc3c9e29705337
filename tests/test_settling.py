"""The optional end of the mixture of ODEs once its velocity field settles
(policies.SETTLING)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pyro_velo as pv
from pyro_velo.inference.callbacks import Callback
from pyro_velo.inference.stages import VelocitySettled, mean_row_cosine
from pyro_velo.policies import SettlingPolicy

SMALL = dict(hidden=(32, 16), latent_dim=3, seed=0)
# short fits: their direction is beside the point here
pytestmark = pytest.mark.filterwarnings("ignore:The direction of latent time")


# ---- the rule on recorded fields ------------------------------------------------------
class ScriptedSettling(VelocitySettled):
    """Returns scripted velocity fields instead of predicting them."""

    def __init__(self, policy, fields):
        super().__init__(policy, {}, "stage")
        self.script = iter(fields)
        self.checks = []

    def velocity(self, loop):
        self.checks.append(loop.epoch + 1)
        return next(self.script)


def _loop():
    loop = SimpleNamespace(epoch=0, stop=False, group=None)
    loop.request_stop = lambda: setattr(loop, "stop", True)
    return loop


def _run(callback, loop, epochs, start=0):
    for epoch in range(start, epochs):
        loop.epoch = epoch
        callback.on_epoch_end(loop)
        if loop.stop:
            return epoch + 1
    return epochs


def _turning(angles):
    """Fields of two cells whose velocity turns by the given angles (radians)."""
    return [torch.tensor([[float(torch.cos(torch.tensor(a))), float(torch.sin(torch.tensor(a)))],
                          [1.0, 0.0]]) for a in angles]


def test_the_stage_stops_at_the_first_check_whose_field_matches_the_lagged_one():
    policy = SettlingPolicy(check_every=5, lag=10, min_cosine=0.99)
    # the first cell's velocity turns by 0.8, 0.45, 0.19 rad over two checks at the 4th,
    # 5th and 6th: the mean cosine over both cells first reaches 0.99 at the 6th
    angles = [0.0, 1.0, 1.5, 1.8, 1.95, 1.99, 2.0]
    watch = ScriptedSettling(policy, _turning(angles))
    assert _run(watch, _loop(), 100) == 30
    assert watch.checks == [5, 10, 15, 20, 25, 30]
    assert watch.record == {"stage": 30}


def test_a_field_that_keeps_moving_runs_the_stage_to_its_end():
    policy = SettlingPolicy(check_every=10, lag=20, min_cosine=0.99)
    watch = ScriptedSettling(policy, _turning([0.5 * i for i in range(10)]))
    assert _run(watch, _loop(), 100) == 100 and watch.record == {}
    assert len(watch.fields) == 2  # only the fields the lag still needs are kept


def test_no_check_without_a_threshold():
    watch = ScriptedSettling(SettlingPolicy(min_cosine=None), [])
    assert _run(watch, _loop(), 200) == 200 and watch.checks == []


def test_a_resumed_stage_checks_and_stops_as_an_uninterrupted_one():
    policy = SettlingPolicy(check_every=5, lag=10, min_cosine=0.99)
    angles = [0.0, 1.0, 1.5, 1.8, 1.95, 1.99, 2.0]
    first = ScriptedSettling(policy, _turning(angles))
    assert _run(first, _loop(), 12) == 12  # interrupted after epoch 12
    resumed = ScriptedSettling(policy, _turning(angles[2:]))
    resumed.load_state_dict(first.state_dict())
    assert _run(resumed, _loop(), 100, start=12) == 30
    assert resumed.record == {"stage": 30}


def test_mean_row_cosine_leaves_out_zero_rows():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    assert mean_row_cosine(a, b) == pytest.approx((2 ** -0.5 + 1.0) / 2)
    assert mean_row_cosine(torch.zeros(2, 2), b[:2]) == 0.0


def test_the_policy_rejects_a_lag_that_is_no_multiple_of_the_checks():
    with pytest.raises(ValueError, match="lag must be a positive multiple"):
        SettlingPolicy(check_every=10, lag=25)
    with pytest.raises(ValueError, match="lag must be a positive multiple"):
        SettlingPolicy(check_every=10, lag=0)


# ---- inside training --------------------------------------------------------------------
class StageEpochs(Callback):
    """Epochs trained per stage label."""

    def __init__(self) -> None:
        self.epochs: dict[str, int] = {}

    def on_epoch_end(self, loop) -> None:
        self.epochs[loop.description] = self.epochs.get(loop.description, 0) + 1


@pytest.fixture
def quick_settling(monkeypatch):
    """A rule that fires at the first check that has a field to compare with."""
    monkeypatch.setattr(pv.policies, "SETTLING",
                        SettlingPolicy(check_every=5, lag=5, min_cosine=-1.0))
    monkeypatch.setattr(pv.policies, "RESTARTS", pv.policies.RestartPolicy(0))


def test_the_mixture_of_odes_ends_once_settled_and_the_fit_records_it(
        tiny_linear_adata, quick_settling):
    epochs = StageEpochs()
    vae = pv.VeloVAE(tiny_linear_adata, **SMALL)
    vae.train(max_epochs=40, warmup_epochs=5, refine_epochs=0, progress_bar=False,
              callbacks=[epochs])
    assert vae.config["settled_epochs"] == {"Mixture of ODEs": 10}
    assert epochs.epochs["Mixture of ODEs"] == 10
    assert epochs.epochs["Basic model"] > 10  # the basic stage is not cut by the rule
    assert np.isfinite(vae.get_latent_time()).all()  # the stopped fit is a usable model


def test_the_record_survives_save_and_load(tiny_linear_adata, quick_settling, tmp_path):
    vae = pv.VeloVAE(tiny_linear_adata, **SMALL)
    vae.train(max_epochs=20, warmup_epochs=5, refine_epochs=0, progress_bar=False)
    vae.save(tmp_path / "m")
    loaded = pv.VeloVAE.load(tmp_path / "m", tiny_linear_adata)
    assert loaded.config["settled_epochs"] == vae.config["settled_epochs"] == {
        "Mixture of ODEs": 10}


def test_the_default_trains_the_stage_until_early_stopping(tiny_linear_adata, monkeypatch):
    """Off by default: the stage runs as long as early stopping lets it."""
    monkeypatch.setattr(pv.policies, "RESTARTS", pv.policies.RestartPolicy(0))
    assert pv.policies.SETTLING.min_cosine is None
    epochs = StageEpochs()
    vae = pv.VeloVAE(tiny_linear_adata, **SMALL)
    vae.train(max_epochs=20, warmup_epochs=5, refine_epochs=0, progress_bar=False,
              patience=100, callbacks=[epochs])
    assert epochs.epochs["Mixture of ODEs"] == 20
    assert "settled_epochs" not in vae.config


def test_without_early_stopping_every_stage_runs_its_epochs(tiny_linear_adata,
                                                            quick_settling):
    epochs = StageEpochs()
    vae = pv.VeloVAE(tiny_linear_adata, **SMALL)
    vae.train(max_epochs=20, warmup_epochs=5, refine_epochs=0, progress_bar=False,
              early_stopping=False, callbacks=[epochs])
    assert epochs.epochs["Mixture of ODEs"] == 20
    assert "settled_epochs" not in vae.config


def test_the_basic_model_alone_has_no_settling_stage(tiny_linear_adata, quick_settling):
    epochs = StageEpochs()
    vae = pv.VeloVAE(tiny_linear_adata, model="basic", **SMALL)
    vae.train(max_epochs=20, warmup_epochs=5, progress_bar=False, early_stopping=True,
              callbacks=[epochs])
    assert "settled_epochs" not in vae.config


def test_a_run_resumed_inside_the_stage_settles_where_an_uninterrupted_one_does(
        tiny_linear_adata, quick_settling, tmp_path):
    """The checkpoint holds the compared fields: resumed after epoch 7 of the stage, the
    fit still compares epoch 10 with epoch 5 and stops there."""
    args = dict(max_epochs=20, warmup_epochs=5, refine_epochs=0, progress_bar=False)
    reference = pv.VeloVAE(tiny_linear_adata, **SMALL)
    reference.train(**args)

    class Interrupt(Callback):
        def on_epoch_end(self, loop) -> None:
            if loop.description == "Mixture of ODEs" and loop.epoch == 7:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pv.VeloVAE(tiny_linear_adata, **SMALL).train(
            **args, checkpoint_dir=tmp_path, checkpoint_every=1, callbacks=[Interrupt()])
    resumed = pv.VeloVAE(tiny_linear_adata, **SMALL)
    resumed.train(**args, checkpoint_dir=tmp_path, checkpoint_every=1, resume=True)
    assert resumed.config["settled_epochs"] == reference.config["settled_epochs"] == {
        "Mixture of ODEs": 10}
    assert resumed.history == reference.history
    np.testing.assert_array_equal(resumed.get_latent_time(), reference.get_latent_time())


def test_a_scheduled_run_keeps_its_stage_length(tiny_linear_adata, quick_settling):
    """The one-cycle schedule ends each stage at a small rate by design: no cut."""
    epochs = StageEpochs()
    vae = pv.VeloVAE(tiny_linear_adata, **SMALL)
    vae.train(max_epochs=20, warmup_epochs=5, refine_epochs=0, progress_bar=False,
              lr_schedule=True, patience=100, callbacks=[epochs])
    assert epochs.epochs["Mixture of ODEs"] == 20
    assert "settled_epochs" not in vae.config


def test_a_policy_is_replaced_within_the_block_only():
    before = pv.policies.SETTLING
    with pytest.raises(RuntimeError):
        with pv.policies.replaced("SETTLING", SettlingPolicy(min_cosine=0.5)):
            assert pv.policies.SETTLING.min_cosine == 0.5
            raise RuntimeError
    assert pv.policies.SETTLING is before
    for name in ("settling", "REPLACED", "NO_SUCH_POLICY"):
        with pytest.raises(ValueError, match="is not a policy of pyro_velo.policies"):
            with pv.policies.replaced(name, before):
                pass
