"""Tests for pyro_velo.pp.preprocess and the input checks in pyro_velo._checks."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import scvelo as scv
from anndata import AnnData, read_h5ad

from pyro_velo import policies, pp
from pyro_velo._checks import (
    InputError,
    MissingLayerError,
    check_finite,
    check_int,
    check_layers,
    check_nonnegative,
    check_numeric,
    check_same_shape,
    is_integer_valued,
)

REAL_FIXTURES = ["pancreas_50obs.h5ad", "dentategyrus_50obs.h5ad"]


def _read_fixture(path) -> AnnData:
    with warnings.catch_warnings():  # the fixtures use an older on-disk encoding
        warnings.filterwarnings("ignore", message=".*without encoding metadata")
        return read_h5ad(path)


def _dense(matrix):
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def _snapshot(adata: AnnData) -> dict:
    """Deep copy of everything preprocess could touch, plus the identities of the matrices."""
    layers = dict(adata._layers)  # private store: still readable if a layer has a bad shape
    return {
        "shape": adata.shape,
        "X_id": id(adata.X),
        "X": None if adata.X is None else _dense(adata.X).copy(),
        "layer_ids": {key: id(value) for key, value in layers.items()},
        "layers": {key: _dense(value).copy() for key, value in layers.items()},
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "keys": {
            attr: list(getattr(adata, attr).keys()) for attr in ("uns", "obsm", "varm", "obsp")
        },
    }


def _assert_unchanged(adata: AnnData, snap: dict) -> None:
    assert adata.shape == snap["shape"]
    assert id(adata.X) == snap["X_id"]
    if snap["X"] is None:
        assert adata.X is None
    else:
        np.testing.assert_array_equal(_dense(adata.X), snap["X"])
    layers = dict(adata._layers)
    assert {key: id(value) for key, value in layers.items()} == snap["layer_ids"]
    for key, value in snap["layers"].items():
        np.testing.assert_array_equal(_dense(layers[key]), value)
    pd.testing.assert_frame_equal(adata.obs, snap["obs"])
    pd.testing.assert_frame_equal(adata.var, snap["var"])
    for attr, keys in snap["keys"].items():
        assert list(getattr(adata, attr).keys()) == keys


# --------------------------------------------------------------------------------------
# Real 50-cell fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=REAL_FIXTURES)
def real_pair(request, shared_data_dir) -> tuple[AnnData, AnnData]:
    """(raw input, preprocessed copy with default parameters) of one real fixture."""
    raw = _read_fixture(shared_data_dir / request.param)
    result = pp.preprocess(raw, copy=True)
    return raw, result


def test_real_fixture_defaults(real_pair):
    raw, res = real_pair
    n_obs = raw.n_obs
    # Defaults (min_shared_counts=20, n_top_genes=2000) keep a few hundred genes of 50 cells,
    # fewer than n_top_genes, so all filtered genes are kept.
    record = res.uns["pyro_velo"]["preprocess"]
    assert 2 <= res.n_vars == record["n_genes_filtered"] < 2000
    assert res.var["highly_variable"].all()
    assert res.n_obs == n_obs

    for key in ("Ms", "Mu"):
        moments = res.layers[key]
        assert isinstance(moments, np.ndarray) and moments.dtype == np.float32
        assert moments.shape == res.shape
        assert np.isfinite(moments).all() and (moments >= 0).all()
    assert res.layers["Ms"].sum() > 0 and res.layers["Mu"].sum() > 0

    # X is log1p of the normalised counts (X == spliced in these fixtures).
    assert "log1p" in res.uns
    np.testing.assert_allclose(
        np.expm1(_dense(res.X)), _dense(res.layers["spliced"]), rtol=1e-5, atol=1e-5
    )
    assert res.obsm["X_pca"].shape == (n_obs, 30)
    assert res.obsp["connectivities"].shape == (n_obs, n_obs)
    # 50 cells: a neighbourhood of a fifth of them, not scVelo's 30
    assert res.uns["neighbors"]["params"]["n_neighbors"] == 10 == record["n_neighbors"]

    # Raw counts kept: sparse, integer, equal to the input restricted to the kept genes.
    for raw_key, layer in (("raw_spliced", "spliced"), ("raw_unspliced", "unspliced")):
        kept = res.layers[raw_key]
        assert sp.issparse(kept)
        assert is_integer_valued(kept)
        expected = raw[:, res.var_names].layers[layer]
        assert (kept != expected).nnz == 0
    # Other layers are subset, not dropped.
    assert set(raw.layers) <= set(res.layers)


def test_real_fixture_matches_plain_scvelo_pipeline(real_pair):
    """Same numbers as the textbook scVelo/scanpy calls, incl. scv.pp.moments, with the
    neighbourhood preprocess chose."""
    raw, res = real_pair
    n_neighbors = res.uns["pyro_velo"]["preprocess"]["n_neighbors"]
    ref = raw.copy()
    scv.pp.filter_and_normalize(ref, min_shared_counts=20)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, n_top_genes=2000, flavor="seurat", subset=True)
    sc.pp.pca(ref, n_comps=30, random_state=0)
    sc.pp.neighbors(ref, n_neighbors=n_neighbors, n_pcs=30, random_state=0)
    scv.pp.moments(ref, n_pcs=None, n_neighbors=None)
    assert list(ref.var_names) == list(res.var_names)
    np.testing.assert_allclose(res.layers["Ms"], ref.layers["Ms"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(res.layers["Mu"], ref.layers["Mu"], rtol=1e-6, atol=1e-6)


def test_real_fixture_in_place(shared_data_dir):
    adata = _read_fixture(shared_data_dir / "dentategyrus_50obs.h5ad")
    adata.X = None  # the spliced layer is then used for X
    assert pp.preprocess(adata) is None
    for key in ("Ms", "Mu", "raw_spliced", "raw_unspliced"):
        assert key in adata.layers
    assert "X_pca" in adata.obsm and "connectivities" in adata.obsp
    assert adata.X is not None and adata.X.shape == adata.shape
    # The modified object stays a consistent AnnData.
    adata.layers["extra"] = np.zeros(adata.shape)
    assert adata[:5].copy().layers["Ms"].shape == (5, adata.n_vars)


# --------------------------------------------------------------------------------------
# Synthetic data: formats, options, keys
# --------------------------------------------------------------------------------------


def test_sparse_and_dense_input_agree(make_synthetic):
    res_sparse = pp.preprocess(make_synthetic(sparse=True), copy=True)
    res_dense = pp.preprocess(make_synthetic(sparse=False), copy=True)
    assert list(res_sparse.var_names) == list(res_dense.var_names)
    assert sp.issparse(res_sparse.layers["raw_spliced"])
    assert isinstance(res_dense.layers["raw_spliced"], np.ndarray)
    for key in ("raw_spliced", "raw_unspliced"):
        np.testing.assert_array_equal(_dense(res_sparse.layers[key]), _dense(res_dense.layers[key]))
    for key in ("Ms", "Mu"):
        np.testing.assert_allclose(
            res_sparse.layers[key], res_dense.layers[key], rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("fmt", [sp.csc_matrix, sp.csr_array])
def test_other_sparse_formats(make_synthetic, fmt):
    reference = pp.preprocess(make_synthetic(), copy=True)
    adata = make_synthetic()
    adata.X = fmt(adata.X)
    for key in ("spliced", "unspliced"):
        adata.layers[key] = fmt(adata.layers[key])
    res = pp.preprocess(adata, copy=True)
    assert type(res.layers["raw_spliced"]) is fmt
    np.testing.assert_allclose(res.layers["Ms"], reference.layers["Ms"], rtol=1e-6, atol=1e-6)


def test_size_factors_and_keys(synthetic_adata):
    res = pp.preprocess(synthetic_adata, copy=True)
    for role in ("spliced", "unspliced"):
        factors = res.obs[f"size_factor_{role}"].to_numpy()
        assert np.all(factors > 0)
        np.testing.assert_allclose(
            _dense(res.layers[f"raw_{role}"]),
            factors[:, None] * _dense(res.layers[role]),
            rtol=1e-5,
            atol=1e-4,
        )
        np.testing.assert_allclose(
            res.obs[f"initial_size_{role}"], _dense(synthetic_adata.layers[role]).sum(1)
        )
    for key in ("initial_size", "n_counts", "true_t", "branch"):
        assert key in res.obs
    for key in ("highly_variable", "means", "dispersions", "dispersions_norm"):
        assert key in res.var
    assert "PCs" in res.varm and "distances" in res.obsp
    record = res.uns["pyro_velo"]["preprocess"]
    assert record["n_pcs"] == 30 and record["n_neighbors"] == 30
    assert record["min_shared_counts"] == 20


def test_copy_true_leaves_input_untouched(synthetic_adata):
    snap = _snapshot(synthetic_adata)
    res = pp.preprocess(synthetic_adata, copy=True)
    assert isinstance(res, AnnData) and res is not synthetic_adata
    assert "Ms" in res.layers
    _assert_unchanged(synthetic_adata, snap)


def test_torch_thread_setting_survives_preprocessing(synthetic_adata):
    # scanpy's numba kernels reset the OpenMP thread count that torch shares (1 -> the
    # number of cores), which then silently changed how many threads training used
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        pp.preprocess(synthetic_adata, copy=True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_in_place_on_a_view_leaves_parent_untouched(synthetic_adata):
    snap = _snapshot(synthetic_adata)
    view = synthetic_adata[:150]
    assert pp.preprocess(view) is None
    assert not view.is_view and "Ms" in view.layers and view.n_obs == 150
    _assert_unchanged(synthetic_adata, snap)


def test_x_none_uses_spliced(make_synthetic):
    with_x = pp.preprocess(make_synthetic(), copy=True)
    adata = make_synthetic()
    adata.X = None
    without_x = pp.preprocess(adata, copy=True)
    np.testing.assert_allclose(_dense(without_x.X), _dense(with_x.X))
    np.testing.assert_allclose(without_x.layers["Ms"], with_x.layers["Ms"])


def test_neighbourhood_size_factors_remove_library_noise_but_keep_trends():
    """Within a neighbourhood libraries are equalised; between neighbourhoods not."""
    from pyro_velo.pp import _neighbourhood_size_factors

    work = AnnData(np.zeros((5, 1)))
    work.obs["initial_size_spliced"] = [80.0, 160.0, 240.0, 900.0, 900.0]
    work.obs["initial_size_unspliced"] = [20.0, 40.0, 60.0, 100.0, 100.0]
    graph = np.zeros((5, 5))
    graph[:3, :3] = 0.3  # two cliques: cells 0-2 (totals 100-300) and 3-4 (1000)
    graph[3:, 3:] = 0.7
    np.fill_diagonal(graph, 0.0)
    work.obsp["connectivities"] = sp.csr_matrix(graph)
    factors = _neighbourhood_size_factors(work)
    np.testing.assert_allclose(factors, [0.5, 1.0, 1.5, 1.0, 1.0])
    # so normalised abundances of clique 2 stay 5x those of clique 1 (the trend)


def test_neighbourhood_normalisation_is_consistent(synthetic_adata):
    res = pp.preprocess(synthetic_adata, size_factors="neighbourhood", copy=True)
    total = pp.preprocess(synthetic_adata, copy=True)
    assert res.uns["pyro_velo"]["preprocess"]["size_factors"] == "neighbourhood"
    assert total.uns["pyro_velo"]["preprocess"]["size_factors"] == "total"
    for role in ("spliced", "unspliced"):  # raw = size factor x normalised
        np.testing.assert_allclose(
            _dense(res.layers[f"raw_{role}"]),
            res.obs[f"size_factor_{role}"].to_numpy()[:, None] * _dense(res.layers[role]),
            rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(res.obs["size_factor_spliced"],
                                  res.obs["size_factor_unspliced"])
    assert not np.allclose(res.layers["Ms"], total.layers["Ms"])
    np.testing.assert_allclose(_dense(res.X), _dense(total.X))  # X: total counts always


def test_x_aliasing_spliced_is_not_normalised_twice(make_synthetic):
    """X and the spliced layer sharing one buffer must not be divided twice."""
    reference = pp.preprocess(make_synthetic(sparse=False), copy=True)
    adata = make_synthetic(sparse=False)
    adata.X = adata.layers["spliced"]  # same buffer
    res = pp.preprocess(adata, copy=True)
    np.testing.assert_allclose(res.layers["spliced"], reference.layers["spliced"])
    np.testing.assert_allclose(res.X, reference.X)


def test_custom_layer_names_keep_unrelated_layers(synthetic_adata):
    adata = synthetic_adata
    adata.layers["S"] = adata.layers.pop("spliced")
    adata.layers["U"] = adata.layers.pop("unspliced")
    adata.layers["spliced"] = sp.csr_matrix(adata.shape, dtype=np.float32)  # unrelated
    res = pp.preprocess(adata, spliced_layer="S", unspliced_layer="U", copy=True)
    assert res.layers["spliced"].nnz == 0 and "unspliced" not in res.layers
    assert is_integer_valued(res.layers["raw_spliced"])
    assert not is_integer_valued(res.layers["S"])  # normalised in place of the input layer
    assert res.layers["Ms"].sum() > 0 and res.layers["Mu"].sum() > 0
    assert res.uns["pyro_velo"]["preprocess"]["spliced_layer"] == "S"


def test_n_top_genes_selects_at_most_that_many(synthetic_adata):
    res = pp.preprocess(synthetic_adata, n_top_genes=50, copy=True)
    assert 0 < res.n_vars <= 50
    assert res.var["highly_variable"].all()
    assert res.layers["Ms"].shape == (synthetic_adata.n_obs, res.n_vars)


def test_n_top_genes_larger_than_available_keeps_all(synthetic_adata):
    res = pp.preprocess(synthetic_adata, n_top_genes=100_000, copy=True)
    assert res.n_vars == res.uns["pyro_velo"]["preprocess"]["n_genes_filtered"]


def test_n_pcs_too_large_is_clamped_with_warning(synthetic_adata):
    with pytest.warns(UserWarning, match="n_pcs=50"):
        res = pp.preprocess(synthetic_adata, n_top_genes=20, n_pcs=50, copy=True)
    assert res.n_vars == 20
    assert res.obsm["X_pca"].shape[1] == 19
    assert res.uns["pyro_velo"]["preprocess"]["n_pcs"] == 19


def test_clean_input_emits_no_warnings(synthetic_adata):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pp.preprocess(synthetic_adata, copy=True)
    noisy = [
        w
        for w in caught
        if issubclass(w.category, (UserWarning, DeprecationWarning, FutureWarning))
    ]
    assert not noisy, [str(w.message) for w in noisy]


def test_non_integer_counts_warn(synthetic_adata):
    synthetic_adata.layers["spliced"] = synthetic_adata.layers["spliced"] * 0.37
    with pytest.warns(UserWarning, match="non-integer"):
        res = pp.preprocess(synthetic_adata, copy=True)
    assert "Ms" in res.layers


def test_result_round_trips_through_h5ad(synthetic_adata, tmp_path):
    res = pp.preprocess(synthetic_adata, copy=True)
    path = tmp_path / "pre.h5ad"
    res.write_h5ad(path)
    back = read_h5ad(path)
    np.testing.assert_array_equal(back.layers["Ms"], res.layers["Ms"])
    assert back.uns["pyro_velo"]["preprocess"]["n_pcs"] == 30


# --------------------------------------------------------------------------------------
# Bad input: clear error, input unchanged
# --------------------------------------------------------------------------------------


def _drop_unspliced(adata):
    del adata.layers["unspliced"]


def _nan_spliced(adata):
    adata.layers["spliced"].data[3] = np.nan


def _inf_unspliced(adata):
    adata.layers["unspliced"].data[5] = np.inf


def _nan_x(adata):
    adata.X.data[0] = np.nan


def _negative_spliced(adata):
    adata.layers["spliced"].data[7] = -2.0


def _bad_shape_unspliced(adata):
    # AnnData refuses mismatched layers on assignment; write to the store directly to
    # simulate a corrupted object.
    adata._layers["unspliced"] = sp.csr_matrix((adata.n_obs, adata.n_vars + 1))


def _string_layer(adata):
    adata.layers["spliced"] = np.full(adata.shape, "a", dtype=object)


BAD_INPUTS = {
    "missing layer": (_drop_unspliced, {}, MissingLayerError, r"'unspliced'.*Available.*'spliced'"),
    "unknown layer name": (None, {"spliced_layer": "S"}, MissingLayerError, r"'S' not found"),
    "NaN": (_nan_spliced, {}, InputError, r"layers\['spliced'\] contains 1 NaN"),
    "inf": (_inf_unspliced, {}, InputError, r"layers\['unspliced'\] contains 0 NaN and 1 inf"),
    "NaN in X": (_nan_x, {}, InputError, r"adata.X contains 1 NaN"),
    "negative": (_negative_spliced, {}, InputError, r"1 negative value.*-2"),
    "shapes differ": (_bad_shape_unspliced, {}, InputError, r"shape"),
    "non-numeric": (_string_layer, {}, InputError, r"dtype object"),
    "too few cells": (None, {"n_neighbors": 250}, InputError, r"200 cells.*n_neighbors=250"),
    "no genes left": (None, {"min_shared_counts": 10**9}, InputError, r"No genes left.*lower min"),
    "n_pcs": (None, {"n_pcs": 0}, InputError, r"n_pcs must be at least 1"),
    "n_neighbors": (None, {"n_neighbors": 1.5}, InputError, r"n_neighbors must be an integer"),
    "n_top_genes": (None, {"n_top_genes": 1}, InputError, r"n_top_genes must be at least 2"),
    "min_shared_counts": (None, {"min_shared_counts": -1}, InputError, r"min_shared_counts"),
    "same layers": (None, {"unspliced_layer": "spliced"}, InputError, r"must differ"),
    "output collision": (None, {"spliced_layer": "Ms"}, InputError, r"collides"),
    "size factors": (None, {"size_factors": "median"}, InputError, r"size_factors must be"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("copy", [False, True])
def test_bad_input_raises_and_leaves_input_unchanged(synthetic_adata, case, copy):
    mutate, kwargs, error, pattern = BAD_INPUTS[case]
    if mutate is not None:
        mutate(synthetic_adata)
    snap = _snapshot(synthetic_adata)
    with pytest.raises(error, match=pattern):
        pp.preprocess(synthetic_adata, copy=copy, **kwargs)
    _assert_unchanged(synthetic_adata, snap)


def test_too_few_cells_suggests_smaller_n_neighbors(synthetic_adata):
    small = synthetic_adata[:20].copy()
    with pytest.raises(InputError, match=r"20 cells.*n_neighbors \+ 1 = 31.*n_neighbors=19"):
        pp.preprocess(small, n_neighbors=30)


@pytest.mark.parametrize(("n_cells", "expected"), [
    (200, 30), (150, 30), (149, 29), (100, 20), (50, 10), (20, 5), (4, 3), (1, 2)])
def test_default_neighbourhood_is_at_most_a_fifth_of_a_small_data_set(n_cells, expected):
    assert policies.NEIGHBOURS.n_neighbors(n_cells) == expected


def test_stand_in_graph_follows_the_same_neighbourhood():
    """Where there is no kNN graph (e.g. cells read from a file) training builds its own
    with the neighbourhood preprocess would use."""
    from pyro_velo.initialize import knn_graph

    x = np.random.default_rng(0).random((50, 20))
    graph = knn_graph(x)
    assert graph.shape == (50, 50) and (graph != graph.T).nnz == 0
    # each cell links to its 10 nearest other cells and to the cells that chose it
    assert np.asarray(graph.sum(1)).min() == 10
    assert np.asarray(knn_graph(x, n_neighbors=30).sum(1)).min() == 30


def test_small_data_get_a_smaller_neighbourhood_by_default(synthetic_adata):
    """The default neighbourhood is recorded, used for the graph and the moments, and an
    explicit n_neighbors is kept whatever the size."""
    small = synthetic_adata[:50].copy()
    out = pp.preprocess(small, random_state=0, copy=True)
    assert out.uns["pyro_velo"]["preprocess"]["n_neighbors"] == 10
    assert out.uns["neighbors"]["params"]["n_neighbors"] == 10
    distances = out.obsp["distances"]
    assert np.asarray((distances > 0).sum(axis=1)).max() == 9  # itself stored as 0
    explicit = pp.preprocess(small, n_neighbors=30, random_state=0, copy=True)
    assert explicit.uns["pyro_velo"]["preprocess"]["n_neighbors"] == 30
    assert not np.allclose(explicit.layers["Ms"], out.layers["Ms"])


def test_missing_layer_error_is_also_a_key_error(synthetic_adata):
    del synthetic_adata.layers["spliced"]
    with pytest.raises(KeyError) as info:
        pp.preprocess(synthetic_adata)
    assert isinstance(info.value, InputError) and isinstance(info.value, ValueError)
    assert str(info.value).startswith("Layer 'spliced' not found")  # no KeyError quoting


def test_backed_input_rejected(synthetic_adata, tmp_path):
    path = tmp_path / "backed.h5ad"
    synthetic_adata.write_h5ad(path)
    backed = read_h5ad(path, backed="r")
    try:
        with pytest.raises(InputError, match="to_memory"):
            pp.preprocess(backed)
    finally:
        backed.file.close()


def test_not_anndata():
    with pytest.raises(TypeError, match="AnnData"):
        pp.preprocess(np.zeros((5, 5)))


# --------------------------------------------------------------------------------------
# _checks unit tests
# --------------------------------------------------------------------------------------


def test_checks_on_huge_sparse_do_not_densify():
    matrix = sp.csr_matrix(([1.0, 2.0, 3.0], ([0, 5, 10], [1, 7, 99])), shape=(10**6, 10**6))
    check_finite(matrix, "m")
    check_nonnegative(matrix, "m")
    check_numeric(matrix, "m")
    assert is_integer_valued(matrix)
    matrix.data[1] = 0.5
    assert not is_integer_valued(matrix)
    matrix.data[1] = -0.5
    with pytest.raises(InputError, match="m contains 1 negative"):
        check_nonnegative(matrix, "m")


@pytest.mark.parametrize("to_format", [np.asarray, sp.csr_matrix, sp.csc_matrix, sp.coo_matrix])
def test_checks_dense_and_sparse(to_format):
    good = np.array([[0.0, 1.0], [2.0, 3.0]])
    check_finite(to_format(good), "good")
    check_nonnegative(to_format(good), "good")
    assert is_integer_valued(to_format(good))
    assert not is_integer_valued(to_format(good + 0.1))
    with pytest.raises(InputError, match=r"bad contains 1 NaN and 1 infinite"):
        check_finite(to_format(np.array([[np.nan, 1.0], [np.inf, 0.0]])), "bad")
    assert not is_integer_valued(to_format(np.array([[np.nan, 1.0]])))


def test_integer_dtypes_short_circuit():
    ints = np.arange(6, dtype=np.int64).reshape(2, 3)
    check_finite(ints, "ints")
    assert is_integer_valued(ints)
    with pytest.raises(InputError, match="negative"):
        check_nonnegative(-ints, "ints")


def test_check_same_shape():
    a, b = np.zeros((2, 3)), sp.csr_matrix((2, 3))
    assert check_same_shape({"a": a, "b": b}) == (2, 3)
    assert check_same_shape({"a": a}, expected=(2, 3)) == (2, 3)
    with pytest.raises(InputError, match=r"Shapes differ: a: \(2, 3\), c: \(3, 2\)"):
        check_same_shape({"a": a, "c": np.zeros((3, 2))})
    with pytest.raises(InputError, match=r"expected \(4, 3\)"):
        check_same_shape({"a": a, "b": b}, expected=(4, 3))


def test_check_layers_lists_available():
    adata = AnnData(np.zeros((2, 2)), layers={"spliced": np.zeros((2, 2))})
    check_layers(adata, "spliced")
    with pytest.raises(MissingLayerError, match=r"Layers 'u', 'v' not found.*'spliced'"):
        check_layers(adata, ["spliced", "u", "v"])
    with pytest.raises(MissingLayerError, match="Available layers: none"):
        check_layers(AnnData(np.zeros((2, 2))), "spliced")


def test_check_int():
    assert check_int(np.int64(3), "k", minimum=1) == 3
    assert check_int(None, "k", allow_none=True) is None
    for bad in (True, 2.0, "3", None):
        with pytest.raises(InputError, match="k must be an integer"):
            check_int(bad, "k")
    with pytest.raises(InputError, match="at least 5"):
        check_int(4, "k", minimum=5)


def test_large_data_gets_an_approximate_knn_graph():
    """From 8192 cells scanpy switches to pynndescent, whose sparse-array output scanpy
    1.11 cannot read; preprocess must still build the kNN graph."""
    from pyro_velo.datasets import simulate

    adata = simulate(n_cells=pp.APPROXIMATE_KNN_FROM, n_genes=20, seed=0)
    out = pp.preprocess(adata, n_top_genes=20, n_pcs=19, random_state=0, copy=True)
    distances = out.obsp["distances"]
    assert sp.issparse(distances) and distances.shape == (adata.n_obs,) * 2
    neighbours = np.asarray((distances > 0).sum(axis=1)).ravel()  # self is stored as 0
    assert neighbours.min() >= 29 and neighbours.max() <= 30
    # approximate, but close to exact on 20 genes: most neighbours are the true ones
    exact = sc.pp.neighbors(out, n_neighbors=30, use_rep="X_pca", transformer="sklearn",
                            copy=True).obsp["distances"]
    rows = np.random.default_rng(0).choice(adata.n_obs, 200, replace=False)
    overlap = [len(set(distances[i].indices) & set(exact[i].indices) - {i}) / exact[i].nnz
               for i in rows]
    assert np.mean(overlap) > 0.9, np.mean(overlap)
    assert {"Ms", "Mu"} <= set(out.layers)
