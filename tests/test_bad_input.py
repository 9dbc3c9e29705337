"""The bad-input matrix: every case gives a clear error or a documented behaviour.

Errors are :class:`pyro_velo._checks.InputError` (or a subclass) naming the problem, and a
failing call leaves the user's AnnData unchanged (deep comparison before/after). Cases of
a capture-time column (NaN, strings, one value) belong to a feature not built yet.
"""

import copy
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import pyro_velo as pv
from pyro_velo import cli
from pyro_velo._checks import InputError, MissingLayerError

TINY = dict(model="basic", hidden=(8,), seed=0)
QUICK = dict(max_epochs=2, warmup_epochs=1, progress_bar=False)


@pytest.fixture(scope="module")
def raw():
    """Raw counts: 120 cells x 30 genes (sparse int layers, as a user's file)."""
    return pv.datasets.simulate(n_cells=120, n_genes=30, topology="linear", seed=0)


@pytest.fixture(scope="module")
def prepared(raw):
    adata = raw.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pv.pp.preprocess(adata, n_neighbors=15, random_state=0)
    return adata


def _dense(x):
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def snapshot(adata):
    """A deep copy of everything a failing call must leave alone."""
    return {
        "shape": adata.shape,
        "obs": adata.obs.copy(deep=True),
        "var": adata.var.copy(deep=True),
        "X": None if adata.X is None else _dense(adata.X).copy(),
        "layers": {k: (type(v), _dense(v).copy()) for k, v in adata.layers.items()},
        "obsm": set(adata.obsm.keys()),
        "obsp": set(adata.obsp.keys()),
        "uns": copy.deepcopy(set(adata.uns.keys())),
    }


def assert_unchanged(adata, before):
    after = snapshot(adata)
    assert after["shape"] == before["shape"]
    pd.testing.assert_frame_equal(after["obs"], before["obs"])
    pd.testing.assert_frame_equal(after["var"], before["var"])
    if before["X"] is None:
        assert after["X"] is None
    else:
        np.testing.assert_array_equal(after["X"], before["X"])
    assert after["layers"].keys() == before["layers"].keys()
    for key, (kind, values) in before["layers"].items():
        assert after["layers"][key][0] is kind, key
        np.testing.assert_array_equal(after["layers"][key][1], values)
    for key in ("obsm", "obsp", "uns"):
        assert after[key] == before[key], key


def _set(layer, rows, cols, value):
    def mutate(adata):
        x = _dense(adata.layers[layer]).astype(np.float64)
        x[rows, cols] = value
        adata.layers[layer] = x
    return mutate


def _delete(layer):
    def mutate(adata):
        del adata.layers[layer]
    return mutate


def _to_strings(layer):
    def mutate(adata):
        adata.layers[layer] = _dense(adata.layers[layer]).astype(str)
    return mutate


def _duplicate_genes(adata):
    names = list(adata.var_names)
    names[1] = names[0]
    adata.var_names = names


def _duplicate_cells(adata):
    names = list(adata.obs_names)
    names[7] = names[3] = names[0]
    names[9] = names[8]
    adata.obs_names = names


DUPLICATED_CELLS = r"obs_names contains 2 duplicated name\(s\).*obs_names_make_unique\(\)"


def _zero_everything(adata):
    for key in ("Mu", "Ms"):
        adata.layers[key] = np.zeros(adata.shape, dtype=np.float32)


# ---- VeloVAE: invalid abundance layers ------------------------------------------------
VELOVAE_CASES = {
    "missing layer": (_delete("Ms"), {}, MissingLayerError, r"'Ms' not found.*Available"),
    "other layer name": (None, {"unspliced_layer": "MU"}, MissingLayerError, "'MU'"),
    "NaN": (_set("Mu", 3, 2, np.nan), {}, InputError, r"layers\['Mu'\] contains 1 NaN"),
    "inf": (_set("Ms", 0, 0, np.inf), {}, InputError, r"layers\['Ms'\].*1 infinite"),
    "negative": (_set("Mu", 5, 1, -2.0), {}, InputError, r"layers\['Mu'\].*negative"),
    "strings": (_to_strings("Ms"), {}, InputError, r"layers\['Ms'\] has dtype"),
    "duplicated genes": (_duplicate_genes, {}, InputError, "duplicated name.*make_unique"),
    "duplicated cells": (_duplicate_cells, {}, InputError, DUPLICATED_CELLS),
    "one cell": (lambda a: None, {"_cells": 1}, InputError, "at least 10 cells"),
    "nine cells": (lambda a: None, {"_cells": 9}, InputError, "at least 10 cells"),
    "all genes constant": (_zero_everything, {}, InputError, "no gene varies"),
    "one train cell": (lambda a: None, {"_cells": 10, "split_fractions": (0.05, 0.5, 0.45)},
                       InputError, "only 1 of 10 cells are in the train split"),
}


@pytest.mark.parametrize("case", list(VELOVAE_CASES))
def test_velovae_rejects_invalid_abundances(case, prepared):
    mutate, kwargs, error, match = VELOVAE_CASES[case]
    kwargs = dict(kwargs)
    adata = prepared[: kwargs.pop("_cells", prepared.n_obs)].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about duplicated names
        if mutate is not None:
            mutate(adata)
    before = snapshot(adata)
    with pytest.raises(error, match=match):
        pv.VeloVAE(adata, **TINY, **kwargs)
    assert_unchanged(adata, before)


# ---- preprocessing: invalid raw counts -----------------------------------------------
def _zero_counts(adata):
    for key in ("spliced", "unspliced"):
        adata.layers[key] = sp.csr_matrix(adata.shape, dtype=np.int32)
    adata.X = sp.csr_matrix(adata.shape, dtype=np.int32)


PREPROCESS_CASES = {
    "missing layer": (_delete("unspliced"), {}, MissingLayerError, "'unspliced' not found"),
    "duplicated cells": (_duplicate_cells, {}, InputError, DUPLICATED_CELLS),
    "NaN": (_set("spliced", 0, 0, np.nan), {}, InputError, "NaN"),
    "inf": (_set("unspliced", 2, 3, np.inf), {}, InputError, "infinite"),
    "negative": (_set("spliced", 1, 1, -1.0), {}, InputError, "negative"),
    "one cell": (lambda a: None, {"_cells": 1}, InputError, "1 cells.*n_neighbors"),
    "fewer cells than neighbours": (lambda a: None, {"_cells": 20, "n_neighbors": 30},
                                    InputError, "20 cells, but n_neighbors=30"),
    "all counts zero": (_zero_counts, {}, InputError, "No genes left after filtering"),
    "bad parameter": (lambda a: None, {"n_neighbors": 0}, InputError, "n_neighbors"),
}


@pytest.mark.parametrize("case", list(PREPROCESS_CASES))
def test_preprocess_rejects_invalid_counts(case, raw):
    mutate, kwargs, error, match = PREPROCESS_CASES[case]
    kwargs = dict(kwargs)
    adata = raw[: kwargs.pop("_cells", raw.n_obs)].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about duplicated names
        mutate(adata)
    before = snapshot(adata)
    with pytest.raises(error, match=match):
        pv.pp.preprocess(adata, **kwargs)
    assert_unchanged(adata, before)


# ---- documented behaviour instead of an error ----------------------------------------
def test_float_counts_are_preprocessed_with_a_warning(raw):
    adata = raw.copy()
    adata.layers["spliced"] = _dense(adata.layers["spliced"]).astype(np.float32) + 0.5
    with pytest.warns(UserWarning, match="non-integer values"):
        pv.pp.preprocess(adata, n_neighbors=15, n_pcs=10)
    assert "Ms" in adata.layers and np.isfinite(adata.layers["Ms"]).all()


def test_all_zero_genes_and_cells(raw, prepared):
    # preprocessing drops genes without counts; zero cells stay and get finite moments
    adata = raw.copy()
    for key in ("spliced", "unspliced"):
        x = _dense(adata.layers[key])
        x[:, :3] = 0
        x[:4] = 0
        adata.layers[key] = sp.csr_matrix(x)
    adata.X = adata.layers["spliced"].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pv.pp.preprocess(adata, n_neighbors=15)
    assert not set(raw.var_names[:3]) & set(adata.var_names)
    assert adata.n_obs == raw.n_obs and np.isfinite(adata.layers["Ms"]).all()
    # VeloVAE: constant genes are not fitted (NaN columns), zero cells are ordinary cells
    adata = prepared.copy()
    for key in ("Mu", "Ms"):
        adata.layers[key][:, :2] = 0
        adata.layers[key][:4] = 0
    vae = pv.VeloVAE(adata, **TINY)
    vae.train(**QUICK)
    fitted = vae.get_rates()["fitted"].to_numpy()
    assert not fitted[:2].any() and fitted[2:].all()
    velocity, _ = vae.get_velocity()
    assert np.isnan(velocity[:, :2]).all() and np.isfinite(velocity[:, 2:]).all()
    assert np.isfinite(vae.get_latent_time()[:4]).all()


def test_fewer_cells_than_the_batch_size_train(prepared):
    adata = prepared[:12].copy()
    vae = pv.VeloVAE(adata, **TINY)
    vae.train(batch_size=128, **QUICK)
    assert len(vae.history.train) == 3 and np.isfinite(vae.get_latent_time()).all()


def test_duplicated_gene_names_pass_preprocessing_then_velovae_asks_to_fix(raw):
    adata = raw.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _duplicate_genes(adata)
        pv.pp.preprocess(adata, n_neighbors=15)
    if adata.var_names.is_unique:  # the duplicate was filtered out: make one again
        _duplicate_genes(adata)
    with pytest.raises(InputError, match="var_names_make_unique"):
        pv.VeloVAE(adata, **TINY)
    adata.var_names_make_unique()
    pv.VeloVAE(adata, **TINY)


def test_duplicated_cell_names_are_named_and_the_fix_works(raw, prepared, tmp_path):
    adata = raw.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _duplicate_cells(adata)
    with pytest.raises(InputError) as error:
        pv.pp.preprocess(adata, n_neighbors=15)
    message = str(error.value)
    assert repr(raw.obs_names[0]) in message and repr(raw.obs_names[8]) in message
    assert repr(raw.obs_names[1]) not in message
    adata.obs_names_make_unique()
    pv.pp.preprocess(adata, n_neighbors=15, n_pcs=10)
    assert "Ms" in adata.layers and adata.obs_names.is_unique
    # a file on disk is checked too, before any layer is read
    on_disk = prepared.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _duplicate_cells(on_disk)
        on_disk.write_h5ad(tmp_path / "duplicated.h5ad")
    with pytest.raises(InputError, match=DUPLICATED_CELLS):
        pv.VeloVAE(tmp_path / "duplicated.h5ad", **TINY)


# ---- accepted layer formats ----------------------------------------------------------
FORMATS = {
    "dense float32": lambda x: x.astype(np.float32),
    "dense float64": lambda x: x.astype(np.float64),
    "dense int64": lambda x: x.astype(np.int64),
    "csr_matrix": lambda x: sp.csr_matrix(x),
    "csc_matrix float64": lambda x: sp.csc_matrix(x.astype(np.float64)),
    "csr_array int32": lambda x: sp.csr_array(x.astype(np.int32)),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_layer_formats_are_accepted(fmt, prepared):
    base = prepared.copy()
    for key in ("Mu", "Ms"):  # whole numbers, so that every dtype holds them exactly
        base.layers[key] = np.round(base.layers[key] * 4).astype(np.float32)
    reference = pv.VeloVAE(base, **TINY).data
    adata = base.copy()
    for key in ("Mu", "Ms"):
        adata.layers[key] = FORMATS[fmt](base.layers[key])
    data = pv.VeloVAE(adata, **TINY).data
    for name in ("u", "s", "gene_scale_u", "gene_scale_s"):
        assert np.array_equal(getattr(data, name).numpy(), getattr(reference, name).numpy())
    assert type(adata.layers["Mu"]) is type(FORMATS[fmt](base.layers["Mu"]))


# ---- unknown keyword arguments -------------------------------------------------------
@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    vae = pv.VeloVAE(prepared, **TINY)
    vae.train(**QUICK)
    path = tmp_path_factory.mktemp("saved") / "m"
    vae.save(path)
    return vae, path


ENTRY_POINTS = {
    "VeloVAE": lambda a, v, p: pv.VeloVAE(a, bogus=1),
    "train": lambda a, v, p: v.train(**{"bogus": 1}),
    "preprocess": lambda a, v, p: pv.pp.preprocess(a, bogus=1),
    "simulate": lambda a, v, p: pv.datasets.simulate(n_cells=50, bogus=1),
    "load": lambda a, v, p: pv.VeloVAE.load(p, a, bogus=1),
    "save": lambda a, v, p: v.save(p, bogus=1),
    "get_latent_time": lambda a, v, p: v.get_latent_time(bogus=1),
    "get_velocity": lambda a, v, p: v.get_velocity(a, bogus=1),
    "export_to_anndata": lambda a, v, p: v.export_to_anndata(a, bogus=1),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_unknown_keyword_arguments_are_rejected(entry, prepared, trained):
    vae, path = trained
    adata = prepared.copy()
    before = snapshot(adata)
    history = copy.deepcopy(vae.history)
    # load() takes named components as keywords: an unknown name is an InputError there
    error = (TypeError, InputError) if entry == "load" else TypeError
    with pytest.raises(error, match="bogus"):
        ENTRY_POINTS[entry](adata, vae, path)
    assert_unchanged(adata, before)
    assert vae.history == history


@pytest.mark.parametrize(("call", "match"), [
    (lambda v: v.sample_posterior(n_samples=0), "n_samples must be at least 1"),
    (lambda v: v.get_uncertainty(n_samples=2.5), "n_samples must be an integer"),
    (lambda v: v.get_uncertainty(n_samples=2, batch_size=0), "batch_size must be at least 1"),
])
def test_posterior_draw_arguments_are_named(call, match, trained):
    vae, _ = trained
    with pytest.raises(InputError, match=match):
        call(vae)
    assert vae.uncertainty is None


# ---- invalid training arguments ------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_epochs": 0}, "max_epochs must be at least 1"),
    ({"max_epochs": 2.5}, "max_epochs must be an integer"),
    ({"batch_size": 1}, "batch_size must be at least 2"),
    ({"lr": -1e-3}, "lr must be a positive number"),
    ({"lr_ode": float("nan")}, "lr_ode must be a positive number"),
    ({"patience": 0}, "patience must be at least 1"),
    ({"warmup_epochs": -1}, "warmup_epochs must be at least 0"),
    ({"refine_epochs": -2}, "refine_epochs must be at least 0"),
    ({"basic_epochs": 0}, "basic_epochs must be at least 1"),
])
def test_invalid_training_arguments_fail_before_training(kwargs, match, prepared):
    vae = pv.VeloVAE(prepared, **TINY)
    state = {k: v.clone() for k, v in vae.model.state_dict().items()}
    with pytest.raises(InputError, match=match):
        vae.train(**{**QUICK, **kwargs})
    assert vae.history.train == [] and not vae.is_trained
    assert all(torch_equal(v, vae.model.state_dict()[k]) for k, v in state.items())


def torch_equal(a, b):
    return bool((a == b).all())


# ---- command line --------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw_h5ad(raw, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "raw.h5ad"
    raw.write_h5ad(path)
    return path


def _bad_path(kind, tmp_path):
    if kind == "missing":
        return tmp_path / "nope.h5ad"
    if kind == "folder":
        (tmp_path / "a_folder").mkdir()
        return tmp_path / "a_folder"
    if kind == "text":
        path = tmp_path / "notes.h5ad"
        path.write_text("not an h5ad file")
        return path
    if kind == "csv":
        path = tmp_path / "counts.csv"
        path.write_text("gene,cell1\na,1\n")
        return path
    path = tmp_path / "empty.h5ad"  # valid HDF5, but no AnnData in it
    with h5py.File(path, "w"):
        pass
    return path


@pytest.mark.parametrize(("kind", "code", "message"), [
    ("missing", cli.EXIT_USAGE, "not found"),
    ("folder", cli.EXIT_USAGE, "is a folder"),
    ("text", cli.EXIT_BAD_INPUT, "cannot read"),
    ("csv", cli.EXIT_BAD_INPUT, "cannot read"),
    ("empty hdf5", cli.EXIT_BAD_INPUT, "cannot read"),
])
def test_cli_input_paths(kind, code, message, tmp_path, capsys):
    path = _bad_path(kind, tmp_path)
    assert cli.main(["fit", str(path), "-o", str(tmp_path / "out.h5ad"), "--quiet"]) == code
    err = capsys.readouterr().err
    assert err.startswith("pyro-velo: error:") and message in err
    assert not (tmp_path / "out.h5ad").exists()


def test_cli_usage_errors(raw_h5ad, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "something").write_text("x")
    code = cli.main(["fit", str(raw_h5ad), "-o", str(tmp_path / "o.h5ad"), "--quiet",
                     "--save-model", str(model_dir)])
    assert code == cli.EXIT_USAGE and "not empty" in capsys.readouterr().err
    code = cli.main(["fit", str(raw_h5ad), "-o", str(tmp_path), "--quiet"])
    assert code == cli.EXIT_USAGE and "is a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", str(raw_h5ad), "-o", str(tmp_path / "o.h5ad"), "--max-epochs", "0"])
    assert exit_info.value.code == cli.EXIT_USAGE
    assert "must be at least 1" in capsys.readouterr().err
    code = cli.main(["demo", "-o", str(tmp_path / "demo"), "--n-cells", "2", "--quiet"])
    assert code == cli.EXIT_USAGE and "n_neighbors" in capsys.readouterr().err
    assert not (tmp_path / "o.h5ad").exists()


def test_cli_invalid_data_exit_code(raw, tmp_path, capsys):
    adata = raw.copy()
    x = _dense(adata.layers["spliced"]).astype(np.float64)
    x[0, 0] = -3
    adata.layers["spliced"] = x
    path = tmp_path / "negative.h5ad"
    adata.write_h5ad(path)
    code = cli.main(["fit", str(path), "-o", str(tmp_path / "o.h5ad"), "--quiet"])
    assert code == cli.EXIT_BAD_INPUT
    assert "negative" in capsys.readouterr().err
