"""Reliability: save/load, out-of-sample inference, resumable training, divergence,
restarts, seeds.

Every fit here is tiny (300 cells x 30 genes, a few epochs): these tests check exactness
and error handling, not the quality of the fit.
"""

import copy
import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from anndata import AnnData

import pyro_velo as pv
import pyro_velo.inference.checkpoint as checkpoint_module
import pyro_velo.train as train_module
from pyro_velo._checks import InputError, MissingFileError
from pyro_velo.inference.restarts import _keep, _rank, evidence_agreement
from pyro_velo.train import DivergenceError
from pyro_velo.velovae import FORMAT_VERSION

SMALL = dict(hidden=(32, 16), latent_dim=3, seed=0)
QUICK = dict(max_epochs=5, warmup_epochs=2, refine_epochs=2, progress_bar=False, seed=3)


@pytest.fixture(scope="module")
def adata(tiny_linear_adata):
    return tiny_linear_adata


@pytest.fixture(scope="module")
def full(adata):
    """A refined full model (per-cell initial conditions set)."""
    vae = pv.VeloVAE(adata, model="full", **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae.train(**QUICK)
    assert vae.model.has_initial_conditions, "the tiny fit should keep its refinement"
    return vae


@pytest.fixture(scope="module")
def basic(adata):
    vae = pv.VeloVAE(adata, model="basic", **SMALL)
    vae.train(**QUICK)
    return vae


def _equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


# ---- save / load ---------------------------------------------------------------------
def test_save_load_round_trips_a_refined_full_model_exactly(full, adata, tmp_path):
    full.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION
    assert config["version"] == pv.__version__
    loaded = pv.VeloVAE.load(tmp_path / "m", adata)
    assert loaded.is_trained and loaded.model.has_initial_conditions
    assert _equal(loaded.get_latent_time(), full.get_latent_time())
    for a, b in zip(loaded.get_velocity(), full.get_velocity(), strict=True):
        assert _equal(a, b)
    for a, b in zip(loaded.get_expression_fit(), full.get_expression_fit(), strict=True):
        assert _equal(a, b)
    assert _equal(loaded.get_transcription_rate(), full.get_transcription_rate())
    assert _equal(loaded.get_cell_state(), full.get_cell_state())
    assert loaded.get_rates().equals(full.get_rates())
    np.testing.assert_equal(loaded.config, full.config)  # NaN: no root or capture times
    assert loaded.history == full.history
    assert _equal(loaded.get_split().values, full.get_split().values)
    for name in ("gene_scale_u", "gene_scale_s"):
        assert torch.equal(getattr(loaded.data, name), getattr(full.data, name))
    # weights-only loadable: no pickled code in the file
    torch.load(tmp_path / "m" / "model.pt", weights_only=True)


def test_save_load_untrained_model(adata, tmp_path):
    vae = pv.VeloVAE(adata, model="basic", **SMALL)
    vae.save(tmp_path / "m")
    loaded = pv.VeloVAE.load(tmp_path / "m", adata)
    assert not loaded.is_trained
    with pytest.raises(RuntimeError, match="not trained"):
        loaded.get_latent_time()


def test_load_with_other_abundances_uses_the_stored_scales(basic, adata, tmp_path):
    basic.save(tmp_path / "m")
    other = adata.copy()
    other.layers["Ms"] = other.layers["Ms"] * 2
    with pytest.warns(UserWarning, match="stored scales"):
        loaded = pv.VeloVAE.load(tmp_path / "m", other)
    assert _equal(loaded.get_latent_time(), basic.get_latent_time(other))


def test_save_and_load_errors(basic, adata, tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        pv.VeloVAE.load(tmp_path / "nothing", adata)
    with pytest.raises(FileNotFoundError):  # MissingFileError is also one
        pv.VeloVAE.load(tmp_path / "nothing", adata)
    basic.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite"):
        basic.save(tmp_path / "m")
    basic.save(tmp_path / "m", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        basic.save(tmp_path / "file")
    config_file = tmp_path / "m" / "config.json"
    good = config_file.read_text()

    config_file.write_text(good.replace(f'"format_version": {FORMAT_VERSION}',
                                        '"format_version": 99'))
    with pytest.raises(InputError,
                       match=f"format version 99.*reads format version {FORMAT_VERSION}"):
        pv.VeloVAE.load(tmp_path / "m", adata)
    config = json.loads(good)
    del config["format_version"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(InputError, match="no format version"):
        pv.VeloVAE.load(tmp_path / "m", adata)
    config_file.write_text("{not json")
    with pytest.raises(InputError, match="damaged"):
        pv.VeloVAE.load(tmp_path / "m", adata)
    config_file.write_text(good)

    model_file = tmp_path / "m" / "model.pt"
    blob = model_file.read_bytes()
    model_file.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match="model.pt is damaged"):
        pv.VeloVAE.load(tmp_path / "m", adata)
    model_file.unlink()
    with pytest.raises(MissingFileError, match="model.pt is missing"):
        pv.VeloVAE.load(tmp_path / "m", adata)
    model_file.write_bytes(blob)

    with pytest.raises(InputError, match="cells"):
        pv.VeloVAE.load(tmp_path / "m", adata[:50].copy())
    assert _equal(pv.VeloVAE.load(tmp_path / "m", adata).get_latent_time(),
                  basic.get_latent_time())


# ---- out-of-sample inference ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["basic", "full"])
def test_encoding_adata_gives_the_default_paths_times(kind, basic, full, adata):
    vae = {"basic": basic, "full": full}[kind]
    t = vae.get_latent_time()
    assert _equal(vae.get_latent_time(adata), t)
    assert _equal(vae.get_latent_time(adata, scaled=True), vae.get_latent_time(scaled=True))
    subset = adata[::3].copy()
    assert _equal(vae.get_latent_time(subset), t[::3])
    # genes in another order, plus an extra gene, are matched by name
    order = np.random.default_rng(0).permutation(adata.n_vars)
    shuffled = adata[:, order].copy()
    assert _equal(vae.get_latent_time(shuffled), t)
    # a single row takes another BLAS path than a batch: equal up to float32 rounding
    one = adata[5:6].copy()
    np.testing.assert_allclose(vae.get_latent_time(one), t[5:6], rtol=1e-5)
    if kind == "full":
        assert _equal(vae.get_cell_state(subset), vae.get_cell_state()[::3])


def test_new_cells_velocity_and_fit(basic, full, adata):
    subset = adata[10:40].copy()
    # the basic model has no per-cell state: new cells get the fitted cells' values
    for a, b in zip(basic.get_velocity(subset), basic.get_velocity(), strict=True):
        assert _equal(a, b[10:40])
    for a, b in zip(basic.get_expression_fit(subset), basic.get_expression_fit(),
                    strict=True):
        assert _equal(a, b[10:40])
    # the refined full model: new cells use the first-stage (zero-start) ODE
    first_stage = copy.deepcopy(full)
    first_stage.model.clear_initial_conditions()
    for a, b in zip(full.get_velocity(subset), first_stage.get_velocity(), strict=True):
        assert a.shape == (30, adata.n_vars)
        assert _equal(a, b[10:40])
    u, s = full.get_expression_fit(subset)
    assert u.shape == s.shape == (30, adata.n_vars)
    # rho depends on the cell state only, so new cells get the fitted cells' rates
    assert _equal(full.get_transcription_rate(subset), full.get_transcription_rate()[10:40])
    # the future of new cells: the first-stage ODE too; delta_t = 0 is the fit itself
    for a, b in zip(full.predict_future(0.5, subset), first_stage.predict_future(0.5),
                    strict=True):
        assert _equal(a, b[10:40])
    for a, b in zip(full.predict_future(0.0, subset), (u, s), strict=True):
        assert _equal(a, b)
    with pytest.raises(InputError, match="delta_t must be a finite number"):
        full.predict_future(float("inf"))


def test_dense_outputs_do_not_depend_on_the_chunk_size(full):
    """get_velocity & co. fill their outputs in chunks of cells (memory): same values as
    one pass over all cells (exactly with chunks of 4096, the size of that pass's own
    kinetic calls; up to float32 rounding of other BLAS paths with 7 cells)."""
    whole = full.predictor.expected(delta_t=0.3)
    genes = full.data.fitted
    keys = ("u", "s", "ds", "du")
    for chunk, rtol in ((4096, 0), (7, 1e-5)):
        arrays = full.predictor.expected_arrays(keys, 0.3, chunk=chunk)
        for key, array in zip(keys, arrays, strict=True):
            assert array.shape == (full.data.n_cells, len(full.var_names))
            assert np.isnan(array[:, ~genes]).all()
            reference = whole[key].cpu().numpy()
            # velocities are differences (beta u - gamma s): rounding relative to the scale
            np.testing.assert_allclose(array[:, genes], reference, rtol=rtol,
                                       atol=rtol * np.abs(reference).max())
    assert _equal(full.predict_future(0.3)[1], full.predictor.expected_arrays(("s",), 0.3)[0])


def test_new_cells_errors_leave_adata_unchanged(basic, adata):
    fitted_genes = adata.var_names[basic.get_rates()["fitted"].to_numpy()]
    missing = adata[:, [g for g in adata.var_names if g not in fitted_genes[:2]]].copy()
    before = missing.copy()
    with pytest.raises(InputError, match=f"2 of the .*{fitted_genes[0]}.*{fitted_genes[1]}"):
        basic.get_latent_time(missing)
    no_ms = AnnData(adata.X[:5], layers={"Mu": adata.layers["Mu"][:5]}, var=adata.var)
    with pytest.raises(InputError, match="'Ms' not found"):
        basic.get_velocity(no_ms)
    bad = adata[:20].copy()
    bad.layers["Mu"][3, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        basic.get_expression_fit(bad)
    with pytest.raises(InputError, match="AnnData"):
        basic.get_latent_time(True)
    assert missing.obs.equals(before.obs) and missing.var.equals(before.var)
    assert set(missing.layers) == set(before.layers)


# ---- resumable training --------------------------------------------------------------
def _interrupt_after(monkeypatch, n_writes):
    """Make training stop (KeyboardInterrupt) right after its n-th checkpoint write."""
    real = checkpoint_module.write_checkpoint
    count = {"n": 0}

    def write_then_maybe_stop(path, payload):
        real(path, payload)
        count["n"] += 1
        if count["n"] == n_writes:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "write_checkpoint", write_then_maybe_stop)


def _model(adata, kind):
    if kind == "ancestors":
        return pv.VeloVAE(adata, rate_history="ancestors", **SMALL)
    return pv.VeloVAE(adata, model=kind, **SMALL)


@pytest.mark.parametrize(("kind", "n_writes", "epochs_done"),
                         # the warm-up writes one checkpoint, at its end; "ancestors":
                         # interrupted inside its last stage (after the full stage's 8)
                         [("basic", 3, 4), ("full", 8, 8), ("ancestors", 10, 9)])
def test_resumed_training_equals_uninterrupted(kind, n_writes, epochs_done, adata, tmp_path,
                                               monkeypatch):
    args = dict(QUICK, max_epochs=6, early_stopping=True, patience=2)
    # a checkpointed run trains no further starts after a doubtful fit; nor does this one
    monkeypatch.setattr(pv.policies, "RESTARTS", pv.policies.RestartPolicy(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _model(adata, kind)
        reference.train(**args)
        interrupted = _model(adata, kind)
        _interrupt_after(monkeypatch, n_writes)
        with pytest.raises(KeyboardInterrupt):
            interrupted.train(**args, checkpoint_dir=tmp_path, checkpoint_every=1)
        monkeypatch.undo()
        saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        assert len(saved["history"]["train"]) == epochs_done
        if kind == "ancestors":
            assert saved["stage"] == "refine" and not saved["done"]
            assert saved["history"]["stages"][-1][0] == "ancestors"
        # a new process: a new object built with the same arguments
        resumed = _model(adata, kind)
        resumed.train(**args, checkpoint_dir=tmp_path, resume=True)
    assert len(resumed.history.train) == len(reference.history.train)
    assert resumed.history == reference.history
    np.testing.assert_equal(resumed.config, reference.config)
    assert _equal(resumed.get_latent_time(), reference.get_latent_time())
    assert _equal(resumed.get_velocity()[0], reference.get_velocity()[0])
    # resuming a finished run restores it without training, also on the old object
    interrupted.train(**args, checkpoint_dir=tmp_path, resume=True)
    assert interrupted.history == reference.history
    assert _equal(interrupted.get_latent_time(), reference.get_latent_time())


def test_resume_continues_the_history_in_place(adata, tmp_path, monkeypatch):
    vae = pv.VeloVAE(adata, model="basic", **SMALL)
    args = dict(max_epochs=6, warmup_epochs=0, progress_bar=False, early_stopping=False)
    _interrupt_after(monkeypatch, 2)  # stops after epoch 4 (checkpoints every 2 epochs)
    with pytest.raises(KeyboardInterrupt):
        vae.train(**args, checkpoint_dir=tmp_path, checkpoint_every=2)
    monkeypatch.undo()
    assert len(vae.history.train) == 4
    vae.train(**args, checkpoint_dir=tmp_path, checkpoint_every=2, resume=True)
    assert len(vae.history.train) == 6
    assert vae.history.stages == [("basic", 0)]


def test_resume_errors(adata, tmp_path):
    vae = pv.VeloVAE(adata, model="basic", **SMALL)
    args = dict(max_epochs=2, warmup_epochs=0, progress_bar=False)
    with pytest.raises(MissingFileError, match="no checkpoint to resume from"):
        vae.train(**args, checkpoint_dir=tmp_path / "empty", resume=True)
    with pytest.raises(InputError, match="needs checkpoint_dir"):
        vae.train(**args, resume=True)
    with pytest.raises(InputError, match="checkpoint_every"):
        vae.train(**args, checkpoint_dir=tmp_path, checkpoint_every=0)
    vae.train(**args, checkpoint_dir=tmp_path)
    assert (tmp_path / "checkpoint.pt").is_file()
    with pytest.raises(InputError, match="resume=True to continue"):
        vae.train(**args, checkpoint_dir=tmp_path)
    with pytest.raises(InputError, match="max_epochs=2"):
        vae.train(**dict(args, max_epochs=3), checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(InputError, match="lr_schedule"):
        vae.train(**args, lr_schedule=True, checkpoint_dir=tmp_path, resume=True)
    other = pv.VeloVAE(adata, model="basic", **dict(SMALL, hidden=(16,)))
    with pytest.raises(InputError, match="hidden"):
        other.train(**args, checkpoint_dir=tmp_path, resume=True)
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot read the checkpoint"):
        vae.train(**args, checkpoint_dir=tmp_path, resume=True)


# ---- divergence ----------------------------------------------------------------------
@pytest.mark.parametrize("owner", ["model", "guide"])
def test_nan_gradient_is_caught_at_its_step(owner, adata):
    vae = pv.VeloVAE(adata, model="basic", **SMALL)
    name, param = ("log_beta", vae.model.log_beta) if owner == "model" else (
        "encoder.t_head.weight", vae.guide.encoder.t_head.weight)
    before = param.detach().clone()
    param.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(DivergenceError, match=rf"epoch 0, minibatch step 0: the gradient of "
                                              rf"{owner}\.{name} became NaN/inf"):
        vae.train(max_epochs=3, warmup_epochs=0, progress_bar=False)
    assert torch.equal(param.detach(), before)  # the step with the NaN gradient was not taken
    assert vae.history.train == []


def test_nan_loss_names_the_parameter(adata):
    vae = pv.VeloVAE(adata, model="basic", **SMALL)
    with torch.no_grad():
        vae.model.log_gamma[1] = float("inf")
    with pytest.raises(DivergenceError, match="epoch 0, minibatch step 0.*model.log_gamma"):
        vae.train(max_epochs=2, warmup_epochs=0, progress_bar=False)


def test_argument_checks_run_in_each_calls_first_epoch_only(adata):
    """Distribution argument validation sees every cell in the first epoch of a call and
    is off after it (it costs ~8% of a step); it is restored when training ends."""
    vae = pv.VeloVAE(adata, model="basic", **SMALL)
    seen = []
    vae.model.register_forward_pre_hook(lambda *_: seen.append(
        (len(vae.history.train), torch.distributions.Distribution._validate_args)))
    vae.train(max_epochs=3, warmup_epochs=0, early_stopping=False, progress_bar=False)
    by_epoch = {epoch: {v for e, v in seen if e == epoch} for epoch, _ in seen}
    assert by_epoch == {0: {True}, 1: {False}, 2: {False}}, by_epoch
    assert torch.distributions.Distribution._validate_args is True


def test_non_finite_parameter_after_the_first_epoch_is_caught(adata):
    """Without argument validation a parameter turned infinite is still caught, at its
    step, and named."""
    vae = pv.VeloVAE(adata, model="basic", **SMALL)

    def break_in_epoch_1(*_):
        if len(vae.history.train) == 1 and vae.model.training:
            with torch.no_grad():
                vae.model.log_gamma[1] = float("inf")

    vae.model.register_forward_pre_hook(break_in_epoch_1)
    with pytest.raises(DivergenceError, match="epoch 1, minibatch step 0.*model.log_gamma"):
        vae.train(max_epochs=3, warmup_epochs=0, progress_bar=False)
    assert torch.distributions.Distribution._validate_args is True


# ---- restarts ------------------------------------------------------------------------
def _fit_starts(adata, n_starts, history="constant"):
    vae = pv.VeloVAE(adata, model="full", rate_history=history, **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae.train(**QUICK, n_starts=n_starts)
    return vae


def _kept_start(config) -> int:
    """The start ``best_of_starts`` keeps: not reversed, then a direction the flow
    identifies, then corroborated by the flow, then the lowest validation loss."""
    losses, statuses = config["start_losses"], config["start_directions"]
    corroborated = config["start_corroborated"]
    return min(range(len(losses)),
               key=lambda k: (statuses[k] == "reversed", statuses[k] == "not identified",
                              not corroborated[k], losses[k]))


def _validation_loss(vae):
    """The validation loss as ``best_of_starts`` scores a start (same guide draws)."""
    train_module.set_seed(QUICK["seed"])
    return train_module.evaluate_loss(vae.model, vae.guide, vae.data,
                                      vae.data.indices("validation"))


@pytest.mark.parametrize("history", ["constant", "ancestors"])
def test_restarts_keep_the_start_with_the_best_validation_elbo(adata, tmp_path, history):
    single, starts = _fit_starts(adata, 1, history), _fit_starts(adata, 3, history)
    losses = starts.config["start_losses"]
    assert starts.config["n_starts"] == 3 and len(losses) == 3
    assert len(set(losses)) == 3  # different starts, different fits
    assert len(starts.config["start_corroborated"]) == 3
    assert len(starts.config["start_evidence_agreements"]) == 3
    assert starts.config["start"] == _kept_start(starts.config)
    assert _validation_loss(starts) == losses[starts.config["start"]]
    # how far the starts' times agree with the kept one's: itself exactly, the others
    # as correlations, the lowest of them reported with the direction
    agreements, kept = starts.config["start_agreements"], starts.config["start"]
    assert len(agreements) == 3 and agreements[kept] == pytest.approx(1.0)
    others = [a for k, a in enumerate(agreements) if k != kept]
    assert all(-1.0 <= a <= 1.0 for a in others)
    assert starts.direction()["start_agreement"] == min(others)
    # start 0 is the fit one start gives, bit for bit
    assert "start" not in single.config
    assert np.isnan(single.direction()["start_agreement"])
    assert _validation_loss(single) == losses[0]
    # the kept start's history and records survive saving
    assert starts.history.stages[0] == ("warm-up", 0)
    starts.save(tmp_path / "starts")
    loaded = pv.VeloVAE.load(tmp_path / "starts", adata)
    assert loaded.config["start_losses"] == losses
    assert loaded.config["start"] == starts.config["start"]
    assert loaded.config["start_agreements"] == agreements
    assert loaded.config["start_corroborated"] == starts.config["start_corroborated"]
    np.testing.assert_array_equal(loaded.config["start_evidence_agreements"],
                                  starts.config["start_evidence_agreements"])
    assert _equal(loaded.get_latent_time(), starts.get_latent_time())


def test_start_agreement_compares_every_start_with_the_kept_one():
    """A start that orders the cells the other way, or at random, shows as a low
    agreement, whichever start is kept."""
    t = np.linspace(0.0, 1.0, 50)
    scrambled = np.random.default_rng(0).permutation(t)
    times = [t, t[::-1], scrambled, t ** 2]
    for kept in (0, 3):
        vae = SimpleNamespace(config={"direction": {"status": "forward"}})
        best = (kept, None, None, vae.config, None)
        _keep(vae, best, 4, ([1.0, 2.0, 3.0, 0.5], ["forward"] * 4, [True] * 4,
                             [0.9] * 4), times)
        agreements = vae.config["start_agreements"]
        assert agreements[0] == agreements[3] == pytest.approx(1.0)  # the same order
        assert agreements[1] == pytest.approx(-1.0)
        assert abs(agreements[2]) < 0.3
        assert vae.config["direction"]["start_agreement"] == pytest.approx(-1.0)


def _mark_report(monkeypatch, starts, **fields):
    """Set ``fields`` in the direction report of the given starts (0, 1, ... in training
    order), the others as computed."""
    original, calls = pv.inference.plan.record_direction, iter(range(100))

    def record(vae, start):
        original(vae, start)
        if next(calls) in starts:
            vae.config["direction"] = {**vae.config["direction"], **fields}
    monkeypatch.setattr(pv.inference.plan, "record_direction", record)


def _mark_reversed(monkeypatch, starts):
    """Make the direction report of the given starts 'reversed'."""
    _mark_report(monkeypatch, starts, status="reversed")


def test_a_reversed_start_is_kept_only_when_every_start_is_reversed(adata, monkeypatch):
    """The ELBO cannot tell a fit from its time-reversed twin: a start whose time runs
    against the data's flow loses to every start that does not, whatever its ELBO."""
    plain = _fit_starts(adata, 3)
    losses, statuses = plain.config["start_losses"], plain.config["start_directions"]
    assert len(statuses) == 3 and len(set(losses)) == 3
    best = int(np.argmin(losses))
    for marked in ({best}, {0, 1, 2}):
        _mark_reversed(monkeypatch, marked)
        vae = _fit_starts(adata, 3)
        assert vae.config["start_losses"] == losses  # the same fits, bit for bit
        reversed_ = [k in marked or statuses[k] == "reversed" for k in range(3)]
        assert [s == "reversed" for s in vae.config["start_directions"]] == reversed_
        kept = _kept_start(vae.config)
        assert vae.config["start"] == kept
        assert (vae.config["direction"]["status"] == "reversed") == all(reversed_)
        if marked == {best} and not all(reversed_):
            assert kept != best  # the ELBO's choice lost to a start that runs forward


def test_a_reversed_single_fit_is_trained_from_more_starts(adata, monkeypatch, tmp_path):
    single = _fit_starts(adata, 1)
    assert "start_directions" not in single.config  # a forward fit: no more starts
    _mark_reversed(monkeypatch, {0})
    vae = pv.VeloVAE(adata, model="full", **SMALL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vae.train(**QUICK)
    extra = pv.policies.RESTARTS.extra_starts
    assert vae.config["n_starts"] == 1 + extra
    assert vae.config["start_directions"][0] == "reversed"
    assert vae.config["start_losses"][0] == _validation_loss(single)  # start 0: the fit
    statuses = vae.config["start_directions"]
    kept = _kept_start(vae.config)
    assert vae.config["start"] == kept != 0
    assert vae.config["direction"]["status"] == statuses[kept] != "reversed"
    # only the kept fit's report can warn, and it does not run against the flow
    assert not any("reversed" in str(w.message) for w in caught)
    # a checkpointed run, or the policy turned off, keeps the reversed fit and warns
    for options in ({"checkpoint_dir": tmp_path / "ckpt"}, {}):
        if not options:
            monkeypatch.setattr(pv.policies, "RESTARTS", pv.policies.RestartPolicy(0))
        _mark_reversed(monkeypatch, {0})
        vae = pv.VeloVAE(adata, model="full", **SMALL)
        with pytest.warns(UserWarning, match="direction of latent time is reversed"):
            vae.train(**QUICK, **options)
        assert "start_directions" not in vae.config
        assert vae.config["direction"]["status"] == "reversed"


def test_a_forward_fit_the_flow_does_not_corroborate_is_trained_from_more_starts(
        adata, monkeypatch):
    """A fit whose order lags a reproducible flow may sit in a worse optimum of the
    ELBO: more starts compete, and the ELBO picks among those that run forward, a start
    the flow corroborates first."""
    single = _fit_starts(adata, 1)
    _mark_report(monkeypatch, {0}, status="forward", order_corroborated=False)
    vae = _fit_starts(adata, 1)
    extra = pv.policies.RESTARTS.extra_starts
    assert vae.config["n_starts"] == 1 + extra
    losses = vae.config["start_losses"]
    assert losses[0] == _validation_loss(single)  # start 0: the single fit
    assert vae.config["start_corroborated"][0] is False
    assert vae.config["start"] == _kept_start(vae.config)
    assert _validation_loss(vae) == losses[vae.config["start"]]


def _refit_with_reports(adata, monkeypatch, best_report, others_report, losses=None):
    """Three starts trained again with the direction report of the ELBO's best start
    overridden by ``best_report`` and the others' by ``others_report``: the fit, the
    starts' losses (from a plain fit unless given), the best start and the others."""
    if losses is None:
        losses = _fit_starts(adata, 3).config["start_losses"]
    best = int(np.argmin(losses))
    others = set(range(3)) - {best}
    _mark_report(monkeypatch, {best}, **best_report)
    _mark_report(monkeypatch, others, **others_report)
    vae = _fit_starts(adata, 3)
    assert vae.config["start_losses"] == losses  # the same fits, bit for bit
    return vae, losses, best, others


def test_a_start_the_flow_corroborates_goes_before_a_better_elbo(adata, monkeypatch):
    """The ELBO kept starts whose order lags the data's flow (the dentate gyrus
    fixture, three starts: Spearman with its marker stages 0.25); among starts that run
    forward, one the flow corroborates is kept whatever the others' ELBO."""
    vae, losses, best, others = _refit_with_reports(
        adata, monkeypatch, {"status": "forward", "order_corroborated": False},
        {"status": "forward", "order_corroborated": True})
    assert vae.config["start_corroborated"] == [k != best for k in range(3)]
    kept = vae.config["start"]
    assert kept != best and kept == min(others, key=lambda k: losses[k])
    assert vae.direction()["order_corroborated"]


def test_a_start_that_runs_forward_goes_before_one_with_no_direction(adata, monkeypatch):
    """Further starts answer a first fit that lagged the flow: one that ends with a
    direction the flow does not identify loses to one that runs forward, whatever its
    ELBO (regulatory fork, 300 x 40, draw 1: the ELBO's choice ran backwards)."""
    unidentified = {"status": "not identified", "order_corroborated": False}
    vae, losses, best, others = _refit_with_reports(
        adata, monkeypatch, unidentified, {"status": "forward", "order_corroborated": False})
    kept = vae.config["start"]
    assert kept != best and kept == min(others, key=lambda k: losses[k])
    assert vae.config["direction"]["status"] == "forward"
    # with no start running forward, the ELBO decides among those not reversed
    monkeypatch.undo()
    vae, *_ = _refit_with_reports(adata, monkeypatch, unidentified,
                                  {"status": "reversed", "order_corroborated": False},
                                  losses=losses)
    assert vae.config["start"] == best


def test_the_flow_rule_keeps_the_start_that_agrees_best_with_the_flow(adata, monkeypatch):
    """``RestartPolicy(rank_by='flow')``: among the starts that pass the direction
    checks, the one whose time agrees best with the data's flow is kept, whatever its
    ELBO; the default keeps the best ELBO on the same starts."""
    forward = {"status": "forward", "order_corroborated": True}
    vae, losses, best, others = _refit_with_reports(
        adata, monkeypatch, {**forward, "flow_agreement": 0.5},
        {**forward, "flow_agreement": 0.7})
    assert vae.config["start"] == best  # the ELBO's choice
    assert vae.config["start_evidence_agreements"] == [
        0.5 if k == best else 0.7 for k in range(3)]
    monkeypatch.undo()
    monkeypatch.setattr(pv.policies, "RESTARTS", pv.policies.RestartPolicy(rank_by="flow"))
    vae, *_ = _refit_with_reports(adata, monkeypatch, {**forward, "flow_agreement": 0.5},
                                  {**forward, "flow_agreement": 0.7}, losses=losses)
    # the two others tie on the flow: the ELBO breaks the tie
    assert vae.config["start"] == min(others, key=lambda k: losses[k])
    assert vae.direction()["flow_agreement"] == 0.7
    # the direction checks still come first: a start that runs backwards loses
    monkeypatch.undo()
    monkeypatch.setattr(pv.policies, "RESTARTS", pv.policies.RestartPolicy(rank_by="flow"))
    vae, *_ = _refit_with_reports(adata, monkeypatch, {**forward, "flow_agreement": 0.9},
                                  {"status": "reversed", "order_corroborated": False,
                                   "flow_agreement": 0.95}, losses=losses)
    assert vae.config["start"] == best


def test_a_given_order_is_the_flow_rules_evidence():
    """With a root or capture times given, the flow rule ranks by the agreement with
    that order; a start without a number ranks after every start with one."""
    reports = [{"given_by": "root", "given_agreement": 0.4, "flow_agreement": 0.9},
               {"given_by": "root", "given_agreement": 0.8, "flow_agreement": 0.1},
               {"flow_agreement": float("nan")}]
    evidence = [evidence_agreement(report) for report in reports]
    assert evidence[:2] == [0.4, 0.8] and np.isnan(evidence[2])
    ranks = ([3.0, 2.0, 1.0], ["given", "given", "forward"], [True] * 3, evidence)
    assert min(range(3), key=lambda k: _rank(k, *ranks, by="flow")) == 1
    assert min(range(3), key=lambda k: _rank(k, *ranks, by="elbo")) == 2
    with pytest.raises(ValueError, match="rank_by must be 'elbo' or 'flow'"):
        pv.policies.RestartPolicy(rank_by="loss")


def _fail_second_start(monkeypatch):
    """Make the second start's mixture-of-ODEs stage diverge as it begins."""
    original, calls = pv.inference.FullStage.begin, {"n": 0}

    def second_start_fails(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise DivergenceError("a diverged start")
        return original(self, *args)

    monkeypatch.setattr(pv.inference.FullStage, "begin", second_start_fails)


def test_a_failed_further_start_keeps_the_first_fit(adata, monkeypatch):
    """The starts added after a reversed fit are optional: one that fails is reported
    and the best finished start is kept, without an error."""
    _mark_reversed(monkeypatch, {0})
    _fail_second_start(monkeypatch)
    vae = pv.VeloVAE(adata, model="full", **SMALL)
    with pytest.warns(RuntimeWarning, match="a further start failed .*diverged start"):
        vae.train(**QUICK)
    assert vae.is_trained and vae.config["start"] == 0
    assert vae.config["start_directions"] == ["reversed"]
    assert _validation_loss(vae) == vae.config["start_losses"][0]


def test_a_failed_start_keeps_the_best_finished_one(adata, monkeypatch):
    vae = pv.VeloVAE(adata, model="full", **SMALL)
    _fail_second_start(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DivergenceError, match="diverged start"):
            vae.train(**QUICK, n_starts=3)
    assert vae.is_trained and vae.config["start"] == 0
    assert len(vae.config["start_losses"]) == 1
    assert _validation_loss(vae) == vae.config["start_losses"][0]


def test_restart_errors(adata, full, tmp_path):
    vae = pv.VeloVAE(adata, model="basic", **SMALL)
    for bad in (0, 1.5, "2", True):
        with pytest.raises(InputError, match="n_starts"):
            vae.train(**QUICK, n_starts=bad)
    with pytest.raises(InputError, match="checkpoint_dir"):
        vae.train(**QUICK, n_starts=2, checkpoint_dir=tmp_path)
    assert not vae.is_trained and not any(tmp_path.iterdir())
    before = full.get_latent_time()
    with pytest.raises(InputError, match="not trained yet"):
        full.train(**QUICK, n_starts=2)
    assert _equal(full.get_latent_time(), before)


# ---- determinism ---------------------------------------------------------------------
def test_same_seed_same_full_fit_bitwise(adata):
    runs = []
    for _ in range(2):
        vae = pv.VeloVAE(adata, model="full", **SMALL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vae.train(**QUICK)
        runs.append(vae)
    a, b = runs
    assert a.history == b.history
    assert _equal(a.get_latent_time(), b.get_latent_time())
    assert _equal(a.get_velocity()[0], b.get_velocity()[0])
    other = pv.VeloVAE(adata, model="full", **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other.train(**dict(QUICK, seed=4))
    assert not _equal(other.get_latent_time(), a.get_latent_time())
