"""The built-in simulator: output format, ground truth, noise model, scale."""

import tracemalloc

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy import stats

from pyro_velo import kinetics
from pyro_velo.datasets import BEHAVIOURS, DEFAULT_BEHAVIOURS, expected_state, simulate

T_MAX = 20.0


@pytest.fixture(scope="module")
def bif():
    return simulate(n_cells=3000, n_genes=300, seed=1, n_capture_times=4)


@pytest.fixture(scope="module")
def lin():
    return simulate(n_cells=2000, n_genes=150, topology="linear", seed=2)


def _normalised(adata, layer="spliced"):
    """Dense counts divided by the true size factor."""
    x = adata.layers[layer].toarray().astype(np.float64)
    return x / adata.obs["size_factor"].to_numpy()[:, None]


def _assert_same(a, b):
    for key in ("spliced", "unspliced"):
        assert (a.layers[key] != b.layers[key]).nnz == 0
    for key in ("true_velocity", "true_velocity_u"):
        np.testing.assert_array_equal(a.layers[key], b.layers[key])
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)


# --------------------------------------------------------------------------------------
# format
# --------------------------------------------------------------------------------------


def test_shapes_dtypes_and_annotations(bif):
    n, g = 3000, 300
    assert bif.shape == (n, g)
    for key in ("spliced", "unspliced"):
        m = bif.layers[key]
        assert sp.issparse(m) and m.format == "csr"
        assert m.dtype == np.int32
        assert m.data.min() >= 0
    assert sp.issparse(bif.X) and bif.X.format == "csr"
    np.testing.assert_array_equal(bif.X.toarray(), bif.layers["spliced"].toarray())
    for key in ("true_velocity", "true_velocity_u"):
        v = bif.layers[key]
        assert isinstance(v, np.ndarray) and v.dtype == np.float32 and v.shape == (n, g)
        assert np.isfinite(v).all()

    assert bif.obs_names[0] == "cell_00000" and bif.obs_names[-1] == "cell_02999"
    assert bif.var_names[0] == "gene_0000" and bif.var_names[-1] == "gene_0299"
    obs = bif.obs
    assert obs["true_t"].dtype == np.float64
    assert obs["true_t"].between(0, T_MAX).all()
    assert isinstance(obs["branch"].dtype, pd.CategoricalDtype)
    assert list(obs["branch"].cat.categories) == ["root", "branch_1", "branch_2"]
    assert isinstance(obs["cell_type"].dtype, pd.CategoricalDtype)
    assert (obs["size_factor"] > 0).all()

    var = bif.var
    for col in ("true_alpha", "true_beta", "true_gamma"):
        assert (var[col] > 0).all()
    assert isinstance(var["behaviour"].dtype, pd.CategoricalDtype)
    assert set(var["behaviour"].cat.categories) == set(BEHAVIOURS)
    assert var["branch_specific"].dtype == bool
    assert set(bif.uns) >= {"transitions", "simulation", "true_schedule"}
    assert bif.uns["simulation"]["topology"] == "bifurcation"
    assert bif.uns["simulation"]["branch_time"] == pytest.approx(0.35 * T_MAX)


def test_bifurcation_branches_and_cell_types(bif):
    bt = bif.uns["simulation"]["branch_time"]
    t = bif.obs["true_t"].to_numpy()
    branch = bif.obs["branch"].astype(str).to_numpy()
    assert (branch[t < bt] == "root").all()
    assert (branch[t >= bt] != "root").all()
    sizes = pd.Series(branch[t >= bt]).value_counts()
    assert set(sizes.index) == {"branch_1", "branch_2"} and sizes.min() > 100

    types = bif.obs["cell_type"].astype(str).to_numpy()
    expected_types = {"root_early", "root_late", "branch_1_early", "branch_1_late",
                      "branch_2_early", "branch_2_late"}
    assert set(bif.obs["cell_type"].cat.categories) == expected_types
    # consecutive time segments: root halves split at bt / 2, branches at their midpoint
    assert t[types == "root_early"].max() < 0.5 * bt <= t[types == "root_late"].min()
    mid = bt + 0.5 * (T_MAX - bt)
    for k in (1, 2):
        early, late = t[types == f"branch_{k}_early"], t[types == f"branch_{k}_late"]
        assert bt <= early.min() and early.max() < mid <= late.min()
        assert (branch[types == f"branch_{k}_late"] == f"branch_{k}").all()
    transitions = {tuple(p) for p in bif.uns["transitions"]}
    assert transitions == {
        ("root_early", "root_late"), ("root_late", "branch_1_early"),
        ("branch_1_early", "branch_1_late"), ("root_late", "branch_2_early"),
        ("branch_2_early", "branch_2_late"),
    }


def test_linear_topology(lin):
    assert (lin.obs["branch"] == "root").all()
    assert list(lin.obs["cell_type"].cat.categories) == [f"stage_{k}" for k in range(1, 5)]
    t = lin.obs["true_t"].to_numpy()
    types = lin.obs["cell_type"].astype(str).to_numpy()
    for k in range(1, 4):
        assert t[types == f"stage_{k}"].max() < k * T_MAX / 4 <= t[types == f"stage_{k + 1}"].min()
    assert [list(p) for p in lin.uns["transitions"]] == [
        ["stage_1", "stage_2"], ["stage_2", "stage_3"], ["stage_3", "stage_4"]
    ]
    assert not lin.var["branch_specific"].any()
    assert np.isnan(lin.uns["simulation"]["branch_time"])


def test_three_branches():
    adata = simulate(n_cells=1500, n_genes=60, n_branches=3, seed=3, branch_time=5.0)
    t = adata.obs["true_t"].to_numpy()
    branch = adata.obs["branch"].astype(str)
    assert set(branch[t >= 5.0]) == {"branch_1", "branch_2", "branch_3"}
    assert len(adata.uns["transitions"]) == 1 + 2 * 3
    assert set(adata.var.loc[adata.var["branch_specific"], "specific_branch"]) <= {
        "branch_1", "branch_2", "branch_3"
    }


def test_time_density_is_not_uniform():
    for seed in range(3):
        t = simulate(n_cells=3000, n_genes=5, seed=seed).obs["true_t"].to_numpy()
        assert stats.kstest(t / T_MAX, "uniform").pvalue < 1e-3
        # but the whole trajectory is covered
        assert np.histogram(t, bins=10, range=(0, T_MAX))[0].min() > 0.02 * 3000


# --------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------


def test_same_seed_same_output_and_chunking_does_not_matter():
    kw = dict(n_cells=500, n_genes=40, seed=7, n_capture_times=3)
    a = simulate(**kw)
    _assert_same(a, simulate(**kw))
    _assert_same(a, simulate(**kw, chunk_size=37))
    b = simulate(**{**kw, "seed": 8})
    assert not np.array_equal(a.obs["true_t"], b.obs["true_t"])
    assert (a.layers["spliced"] != b.layers["spliced"]).nnz > 0
    assert not np.allclose(a.var["true_alpha"], b.var["true_alpha"])


# --------------------------------------------------------------------------------------
# ground truth
# --------------------------------------------------------------------------------------


def test_expected_state_matches_piecewise_solve(bif):
    """The fast evaluation equals kinetics.piecewise_solve over the whole schedule."""
    sched = bif.uns["true_schedule"]
    beta = torch.tensor(bif.var["true_beta"].to_numpy())
    gamma = torch.tensor(bif.var["true_gamma"].to_numpy())
    t = np.linspace(0, T_MAX, 41)
    for lin, name in enumerate(sched["lineages"]):
        u, s, du, ds = expected_state(bif, t, name)
        ru, rs, ra = kinetics.piecewise_solve(
            torch.tensor(t)[:, None], torch.tensor(sched["starts"][lin]),
            torch.tensor(sched["alphas"][lin]), beta, gamma,
            torch.tensor(sched["u0"]), torch.tensor(sched["s0"]),
        )
        rdu, rds = kinetics.velocity(ru, rs, ra, beta, gamma)
        for mine, ref in ((u, ru), (s, rs), (du, rdu), (ds, rds)):
            np.testing.assert_allclose(mine, ref.numpy(), rtol=1e-9, atol=1e-12)


def test_true_velocity_is_derivative_of_expected_abundance(bif):
    cells = np.random.default_rng(0).choice(bif.n_obs, 200, replace=False)
    t = bif.obs["true_t"].to_numpy()[cells]
    branch = bif.obs["branch"].astype(str).to_numpy()[cells]
    h = 1e-4
    # stay on one side of the split
    bt = bif.uns["simulation"]["branch_time"]
    t = np.where(np.abs(t - bt) < 2 * h, t + 4 * h * np.sign(t - bt + 1e-12), t)
    u_hi, s_hi, _, _ = expected_state(bif, t + h, branch)
    u_lo, s_lo, _, _ = expected_state(bif, t - h, branch)
    _, _, du, ds = expected_state(bif, t, branch)
    fd_s = (s_hi - s_lo) / (2 * h)
    scale = np.abs(ds).max(axis=0) + 1e-3
    assert np.all(np.abs(fd_s - ds) <= 1e-4 * scale)
    # the stored layer is this derivative at the cells' true times
    v = bif.layers["true_velocity"][cells]
    vu = bif.layers["true_velocity_u"][cells]
    np.testing.assert_allclose(v, ds.astype(np.float32), rtol=1e-5, atol=1e-6 * scale.max())
    # du/dt jumps at switches: compare away from them (switch times of each cell's lineage)
    fd_u = (u_hi - u_lo) / (2 * h)
    lineage = np.array([0 if b == "root" else int(b.split("_")[1]) - 1 for b in branch])
    starts = bif.uns["true_schedule"]["starts"][lineage]  # (cells, genes, segments)
    ok = ~(np.abs(t[:, None, None] - starts) < 2 * h).any(axis=-1)
    assert np.all(np.abs(fd_u - vu)[ok] <= 1e-3 * (np.abs(vu).max() + 1e-3))


def test_counts_are_unbiased_for_the_scaled_expected_abundance(bif):
    _, s, _, _ = expected_state(bif)
    u, _, _, _ = expected_state(bif)
    sf = bif.obs["size_factor"].to_numpy()[:, None]
    for layer, mean in (("spliced", s), ("unspliced", u)):
        observed = np.asarray(bif.layers[layer].sum(axis=0)).ravel()
        expected = (mean * sf).sum(axis=0)
        big = expected > 2000  # relative noise of the sum is a few percent at most
        assert big.sum() > 30
        ratio = observed[big] / expected[big]
        assert np.median(np.abs(ratio - 1)) < 0.05 and np.all(np.abs(ratio - 1) < 0.3)


def test_rates_are_varied_and_unspliced_is_lower(bif):
    var = bif.var
    level = var["true_alpha"] / var["true_gamma"]
    assert np.quantile(level, 0.95) / np.quantile(level, 0.05) > 10
    ratio = var["true_beta"] / var["true_gamma"]
    assert np.median(ratio) > 1.5
    assert (np.abs(np.log(ratio)) < 0.1).mean() > 0.05  # some genes with beta ~ gamma
    assert bif.layers["unspliced"].sum() < 0.6 * bif.layers["spliced"].sum()


def test_behaviour_mix(bif):
    counts = bif.var["behaviour"].value_counts()
    for name, frac in DEFAULT_BEHAVIOURS.items():
        assert abs(counts[name] - frac * 300) <= 1
    only = simulate(n_cells=50, n_genes=20, behaviours={"late_induction": 0.5, "constant": 0.5})
    assert only.var["behaviour"].value_counts()[["late_induction", "constant"]].tolist() == [
        10, 10
    ]


def _not_specific(adata, behaviour):
    var = adata.var
    return np.flatnonzero((var["behaviour"] == behaviour) & ~var["branch_specific"])


def test_early_repression_decreases(lin):
    genes = _not_specific(lin, "early_repression")
    assert genes.size >= 10
    var = lin.var.iloc[genes]
    assert var["true_t_on"].isna().all()
    assert var["true_t_off"].between(0, 0.35 * T_MAX).all()
    _, s, _, _ = expected_state(lin, np.array([0.0, T_MAX]))
    alpha, gamma = var["true_alpha"].to_numpy(), var["true_gamma"].to_numpy()
    # starts near its steady state, ends far below
    assert np.all(s[0, genes] > 0.9 * alpha / gamma)
    assert np.all(s[1, genes] < 0.5 * s[0, genes])
    x = _normalised(lin)
    rho = [stats.spearmanr(lin.obs["true_t"], x[:, g])[0] for g in genes]
    assert np.median(rho) < -0.3 and np.mean(np.array(rho) < 0) > 0.9


def test_late_induction_low_early_high_late(lin):
    genes = _not_specific(lin, "late_induction")
    assert genes.size >= 10
    var = lin.var.iloc[genes]
    assert var["true_t_off"].isna().all()
    assert var["true_t_on"].between(0.4 * T_MAX, 0.8 * T_MAX).all()
    _, s, _, _ = expected_state(lin, np.array([0.0, 0.3 * T_MAX, T_MAX]))
    assert np.allclose(s[0, genes], s[1, genes])  # flat before the switch
    assert np.all(s[2, genes] > 2 * s[0, genes])
    x = _normalised(lin)
    t = lin.obs["true_t"].to_numpy()
    early, late = x[t < 0.3 * T_MAX][:, genes].mean(0), x[t > 0.9 * T_MAX][:, genes].mean(0)
    assert np.mean(late > early) > 0.9


def test_transcriptional_boost_rate_rises(bif):
    genes = _not_specific(bif, "transcriptional_boost")
    assert genes.size >= 10
    sched = bif.uns["true_schedule"]
    for g in genes:
        starts, rates = sched["starts"][0, g], sched["alphas"][0, g]
        inside = starts <= T_MAX
        assert np.all(np.diff(rates) >= 0)
        assert np.count_nonzero(np.diff(rates[inside]) > 0) >= 2
        assert rates[inside][-1] == pytest.approx(bif.var["true_alpha"].iloc[g])
    _, s, _, _ = expected_state(bif, np.array([0.0, T_MAX]), "branch_1")
    assert np.all(s[1, genes] > s[0, genes])


def test_induction_repression_and_constant_genes(bif):
    var = bif.var
    ir = var[var["behaviour"] == "induction_repression"]
    assert (ir["true_t_on"] > 0).all() and (ir["true_t_off"] < T_MAX).all()
    assert (ir["true_t_off"] - ir["true_t_on"] >= 0.15 * T_MAX - 1e-9).all()
    const = np.flatnonzero(var["behaviour"] == "constant")
    assert var.iloc[const][["true_t_on", "true_t_off"]].isna().all().all()
    v = bif.layers["true_velocity"][:, const]
    assert np.abs(v).max() < 1e-4 * var["true_alpha"].iloc[const].max()
    # asynchronous switches
    assert ir["true_t_on"].std() > 0.1 * T_MAX


def test_branch_specific_genes_differ_between_branches(bif):
    var = bif.var
    spec = np.flatnonzero(var["branch_specific"])
    assert spec.size == 90  # 30% of 300 genes
    assert set(var["behaviour"].iloc[spec]) <= {
        "induction_repression", "late_induction", "transcriptional_boost"
    }
    bt = bif.uns["simulation"]["branch_time"]
    late_start = bt + 0.25 * (T_MAX - bt)  # switches of these genes lie after this
    late_t = np.linspace(late_start, T_MAX, 40)
    s1 = expected_state(bif, late_t, "branch_1")[1].mean(0)
    s2 = expected_state(bif, late_t, "branch_2")[1].mean(0)
    rel = (np.abs(s1 - s2) / np.maximum(s1, s2))[spec]
    assert rel.min() > 0.1 and np.quantile(rel, 0.1) > 0.4
    others = np.setdiff1d(np.arange(bif.n_vars), spec)
    np.testing.assert_array_equal(s1[others], s2[others])
    # before the split the branches agree for every gene
    early_t = np.linspace(0, bt - 1e-6, 20)
    np.testing.assert_array_equal(expected_state(bif, early_t, "branch_1")[1],
                                  expected_state(bif, early_t, "branch_2")[1])
    # and it shows in the counts of late cells
    x = _normalised(bif)
    t = bif.obs["true_t"].to_numpy()
    branch = bif.obs["branch"].astype(str).to_numpy()
    late = t > late_start
    a, b = x[late & (branch == "branch_1")], x[late & (branch == "branch_2")]
    p_spec = stats.ttest_ind(a[:, spec], b[:, spec], equal_var=False).pvalue
    p_other = stats.ttest_ind(a[:, others], b[:, others], equal_var=False).pvalue
    p_other = p_other[np.isfinite(p_other)]
    assert np.mean(p_spec < 0.01) > 0.7
    assert np.mean(p_other < 0.01) < 0.1


# --------------------------------------------------------------------------------------
# noise and library size
# --------------------------------------------------------------------------------------


def test_negative_binomial_is_overdispersed_compared_to_poisson():
    kw = dict(n_cells=4000, n_genes=40, behaviours={"constant": 1.0}, library_size_cv=0.0,
              topology="linear", seed=5)
    pois, nb = simulate(noise="poisson", **kw), simulate(noise="nb", dispersion=0.3, **kw)
    np.testing.assert_array_equal(pois.var["true_alpha"], nb.var["true_alpha"])
    assert (pois.var["true_dispersion"] == 0).all()
    for adata in (pois, nb):
        assert np.allclose(adata.obs["size_factor"], 1.0)
    x_p = pois.layers["spliced"].toarray().astype(float)
    x_n = nb.layers["spliced"].toarray().astype(float)
    mean_p, mean_n = x_p.mean(0), x_n.mean(0)
    ok = mean_p > 1
    assert ok.sum() > 10
    np.testing.assert_allclose(mean_n[ok], mean_p[ok], rtol=0.2)
    fano_p, fano_n = x_p.var(0)[ok] / mean_p[ok], x_n.var(0)[ok] / mean_n[ok]
    assert np.all(np.abs(fano_p - 1) < 0.15)
    assert np.all(fano_n > fano_p)
    # excess variance matches Var = mu + phi mu^2
    phi_hat = (x_n.var(0)[ok] - mean_n[ok]) / mean_n[ok] ** 2
    phi = nb.var["true_dispersion"].to_numpy()[ok]
    assert np.median(np.abs(np.log(phi_hat / phi))) < 0.2


def test_library_sizes_vary():
    adata = simulate(n_cells=3000, n_genes=100, library_size_cv=0.5, seed=4)
    sf = adata.obs["size_factor"].to_numpy()
    assert sf.std() / sf.mean() == pytest.approx(0.5, rel=0.15)
    assert sf.mean() == pytest.approx(1.0, rel=0.05)
    total = np.asarray(adata.layers["spliced"].sum(axis=1)).ravel()
    assert stats.spearmanr(sf, total)[0] > 0.5


# --------------------------------------------------------------------------------------
# capture times
# --------------------------------------------------------------------------------------


def test_capture_time_is_coarse_and_overlapping(bif, lin):
    assert "capture_time" not in lin.obs
    cap = bif.obs["capture_time"].to_numpy()
    t = bif.obs["true_t"].to_numpy()
    assert cap.dtype == np.float64
    values = np.linspace(0, T_MAX, 4)
    assert set(np.unique(cap)) == set(values)
    # 5% and 95% quantiles and mean of the true times of each capture batch
    ranges = [(*np.quantile(t[cap == v], [0.05, 0.95]), t[cap == v].mean()) for v in values]
    assert np.all(np.diff([r[2] for r in ranges]) > 0)
    for (lo, hi, _), (lo_next, _, _) in zip(ranges[:-1], ranges[1:], strict=True):
        assert hi - lo > 0.2 * T_MAX  # each batch spans a wide range
        assert hi > lo_next + 0.05 * T_MAX  # consecutive batches overlap
    assert 0.5 < stats.spearmanr(cap, t)[0] < 0.95  # informative, but coarse and noisy


# --------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(topology="tree"), "topology"),
        (dict(noise="zinb"), "noise"),
        (dict(n_branches=1), "n_branches"),
        (dict(n_cells=0), "n_cells"),
        (dict(n_genes=-3), "n_genes"),
        (dict(n_cells=10.5), "n_cells"),
        (dict(dispersion=0.0), "dispersion"),
        (dict(library_size_cv=-0.1), "library_size_cv"),
        (dict(t_max=0.0), "t_max"),
        (dict(branch_time=20.0), "branch_time"),
        (dict(branch_time=-1.0), "branch_time"),
        (dict(topology="linear", branch_time=5.0), "branch_time"),
        (dict(behaviours={"constant": 0.5, "late_induction": 0.4}), "sum to 1"),
        (dict(behaviours={"oscillation": 1.0}), "oscillation"),
        (dict(behaviours={"constant": 1.5, "late_induction": -0.5}), "late_induction"),
        (dict(n_capture_times=1), "n_capture_times"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(branch_specific_fraction=1.5), "branch_specific_fraction"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        simulate(**{"n_cells": 10, "n_genes": 5, **kwargs})


def test_expected_state_rejects_unknown_branch(lin):
    with pytest.raises(ValueError, match="branch_7"):
        expected_state(lin, np.array([1.0]), "branch_7")


# --------------------------------------------------------------------------------------
# I/O and scale
# --------------------------------------------------------------------------------------


def test_h5ad_round_trip(bif, tmp_path):
    path = tmp_path / "sim.h5ad"
    bif.write_h5ad(path)
    back = anndata.read_h5ad(path)
    assert [list(map(str, p)) for p in back.uns["transitions"]] == [
        list(p) for p in bif.uns["transitions"]
    ]
    _assert_same(bif, back)
    assert back.uns["simulation"]["behaviours"] == pytest.approx(DEFAULT_BEHAVIOURS)
    assert back.uns["simulation"]["n_capture_times"] == 4
    t = np.array([1.0, 15.0])
    for a, b in zip(expected_state(bif, t, "branch_2"), expected_state(back, t, "branch_2"),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_t_max_rescales_rates():
    a = simulate(n_cells=200, n_genes=30, t_max=20.0, seed=9)
    b = simulate(n_cells=200, n_genes=30, t_max=2.0, seed=9)
    np.testing.assert_allclose(b.var["true_gamma"], 10 * a.var["true_gamma"])
    np.testing.assert_allclose(b.obs["true_t"], a.obs["true_t"] / 10)
    # same trajectory in rescaled time: same expected abundance, velocity x 10
    np.testing.assert_allclose(b.layers["true_velocity"], 10 * a.layers["true_velocity"],
                               rtol=1e-4, atol=1e-4)


def test_large_run_stays_in_memory_budget():
    n_cells, n_genes = 100_000, 100
    simulate(n_cells=10, n_genes=5)  # warm up imports outside the trace
    threads = torch.get_num_threads()
    tracemalloc.start()
    try:
        adata = simulate(n_cells=n_cells, n_genes=n_genes, seed=11)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert adata.shape == (n_cells, n_genes)
    assert adata.obs_names[-1] == "cell_99999"
    assert torch.get_num_threads() == threads  # the one-thread evaluation is undone
    dense64 = n_cells * n_genes * 8
    nnz = adata.layers["spliced"].nnz + adata.layers["unspliced"].nnz + adata.X.nnz
    result = 2 * n_cells * n_genes * 4 + 8 * nnz
    # what is kept is the result; the transient overhead is far below one dense
    # float64 cells x genes matrix (numpy allocations only: torch's are not traced)
    assert current < 1.2 * result + 20e6
    assert peak - current < 0.75 * dense64


# --------------------------------------------------------------------------------------
# real data sets through scVelo: offline behaviour
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, scvelo_name", [("pancreas", "pancreas"),
                                               ("dentate_gyrus", "dentategyrus")])
def test_real_dataset_offline_raises_a_clear_error(name, scvelo_name, tmp_path, monkeypatch):
    import scvelo.datasets

    from pyro_velo import datasets

    checked = []

    def offline(host, port=443, timeout=datasets.NETWORK_TIMEOUT):
        checked.append((host, timeout))
        return False

    def must_not_download(*args, **kwargs):
        raise AssertionError("scVelo must not be called when offline")

    monkeypatch.setattr(datasets.loaders, "_reachable", offline)
    monkeypatch.setattr(scvelo.datasets, scvelo_name, must_not_download)
    target = tmp_path / "cache" / "data.h5ad"
    with pytest.raises(datasets.DatasetUnavailableError) as info:
        getattr(datasets, name)(file_path=target)
    message = str(info.value)
    assert f"The {name} data set" in message
    assert "offline" in message and "download" in message
    assert str(target.resolve()) in message and "https://" in message
    assert checked == [("github.com", datasets.NETWORK_TIMEOUT)]
    assert datasets.NETWORK_TIMEOUT <= 3
    assert isinstance(info.value, OSError)
    assert not target.exists()


def test_real_dataset_failed_download_is_reported(tmp_path, monkeypatch):
    from urllib.error import URLError

    import scvelo.datasets

    from pyro_velo import datasets

    def broken(*args, **kwargs):
        raise URLError("connection reset")

    monkeypatch.setattr(datasets.loaders, "_reachable", lambda *a, **k: True)
    monkeypatch.setattr(scvelo.datasets, "pancreas", broken)
    with pytest.raises(datasets.DatasetUnavailableError,
                       match=r"(?s)pancreas data set could not be loaded.*URLError.*"
                             r"connection reset.*download https://"):
        datasets.pancreas(file_path=tmp_path / "p.h5ad")


def test_real_dataset_is_read_from_the_cache_without_network(tmp_path, monkeypatch):
    from pyro_velo import datasets

    def no_network(*args, **kwargs):
        raise AssertionError("a cached file must not need the network")

    monkeypatch.setattr(datasets.loaders, "_reachable", no_network)
    cached = anndata.AnnData(sp.csr_matrix(np.eye(3, dtype=np.float32)))
    cached.layers["spliced"] = cached.X.copy()
    path = tmp_path / "dg.h5ad"
    cached.write_h5ad(path)
    adata = datasets.dentate_gyrus(file_path=path)
    assert adata.shape == (3, 3) and "spliced" in adata.layers


def test_network_check_fails_fast_on_a_closed_port():
    import socket
    import time

    from pyro_velo.datasets.loaders import _reachable

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.perf_counter()
    assert _reachable("127.0.0.1", port, timeout=1.0) is False
    assert time.perf_counter() - start < 1.5


# --------------------------------------------------------------------------------------
# simulate_h5ad: atlas-scale simulation straight to a file
# --------------------------------------------------------------------------------------

H5AD_CELLS, H5AD_GENES = 3000, 50


@pytest.fixture(scope="module")
def sim_file(tmp_path_factory):
    from pyro_velo.datasets import simulate_h5ad

    path = tmp_path_factory.mktemp("h5ad") / "sim.h5ad"
    assert simulate_h5ad(path, H5AD_CELLS, H5AD_GENES, chunk_cells=1000, seed=5) == path
    return path


def _layers(path):
    import h5py

    with h5py.File(path, "r") as file:
        return file["layers/Mu"][:], file["layers/Ms"][:]


def test_simulate_h5ad_writes_a_readable_file(sim_file):
    import h5py

    adata = anndata.read_h5ad(sim_file)
    assert adata.shape == (H5AD_CELLS, H5AD_GENES)
    assert set(adata.layers) == {"Mu", "Ms"}
    for key in ("Mu", "Ms"):
        x = adata.layers[key]
        assert isinstance(x, np.ndarray) and x.dtype == np.float32
        assert x.shape == (H5AD_CELLS, H5AD_GENES)
        assert np.isfinite(x).all() and x.min() >= 0 and x.max() > 0
    assert sp.issparse(adata.X) and adata.X.nnz == 0 and adata.X.shape == adata.shape
    assert {"true_t", "branch", "cell_type", "size_factor"} <= set(adata.obs)
    assert adata.obs["true_t"].between(0, T_MAX).all()
    assert {"true_alpha", "true_beta", "true_gamma", "behaviour"} <= set(adata.var)
    assert set(adata.uns) >= {"transitions", "simulation", "true_schedule"}
    with h5py.File(sim_file, "r") as file:  # dense layers with anndata's array encoding
        for key in ("Mu", "Ms"):
            node = file[f"layers/{key}"]
            assert isinstance(node, h5py.Dataset)
            assert node.attrs["encoding-type"] == "array"
            assert node.attrs["encoding-version"] == "0.2.0"
    backed = anndata.read_h5ad(sim_file, backed="r")  # every reader accepts it
    assert backed.shape == (H5AD_CELLS, H5AD_GENES)
    backed.file.close()
    u, s = expected_state(adata, np.array([2.0, 12.0]), "branch_1")[:2]
    assert u.shape == s.shape == (2, H5AD_GENES)
    assert not list(sim_file.parent.glob("*.partial"))


def test_simulate_h5ad_holds_simulate_counts_over_size_factors(sim_file):
    # the same draws as simulate(): Mu / Ms are its counts divided by the size factor
    adata = anndata.read_h5ad(sim_file)
    ref = simulate(n_cells=H5AD_CELLS, n_genes=H5AD_GENES, seed=5)
    size_factor = adata.obs["size_factor"].to_numpy()[:, None]
    for layer, counts in (("Mu", "unspliced"), ("Ms", "spliced")):
        np.testing.assert_allclose(adata.layers[layer] * size_factor,
                                   ref.layers[counts].toarray(), rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(adata.obs["true_t"], ref.obs["true_t"])
    np.testing.assert_array_equal(adata.var["true_beta"], ref.var["true_beta"])
    np.testing.assert_array_equal(adata.obs["branch"].astype(str), ref.obs["branch"].astype(str))


def test_simulate_h5ad_reproducible_and_independent_of_chunking(sim_file, tmp_path):
    from pyro_velo.datasets import simulate_h5ad

    same = simulate_h5ad(tmp_path / "same.h5ad", H5AD_CELLS, H5AD_GENES, seed=5,
                         chunk_cells=1000)
    rechunked = simulate_h5ad(tmp_path / "chunked.h5ad", H5AD_CELLS, H5AD_GENES, seed=5,
                              chunk_cells=77)
    other = simulate_h5ad(tmp_path / "other.h5ad", H5AD_CELLS, H5AD_GENES, seed=6,
                          chunk_cells=1000)
    reference = _layers(sim_file)
    for path in (same, rechunked):
        for a, b in zip(reference, _layers(path), strict=True):
            np.testing.assert_array_equal(a, b)
        pd.testing.assert_frame_equal(anndata.read_h5ad(path).obs,
                                      anndata.read_h5ad(sim_file).obs)
    assert not np.array_equal(reference[1], _layers(other)[1])


def test_simulate_h5ad_memory_is_flat_in_cells(tmp_path):
    from pyro_velo.datasets import simulate_h5ad

    n_genes = 100
    simulate_h5ad(tmp_path / "warm.h5ad", 100, 10)  # imports outside the trace
    peaks = {}
    for n_cells in (20_000, 60_000):
        tracemalloc.start()
        try:
            simulate_h5ad(tmp_path / f"{n_cells}.h5ad", n_cells, n_genes, chunk_cells=1000)
            peaks[n_cells] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    layers_60k = 60_000 * n_genes * 8
    # numpy / Python allocations only: per-cell vectors and one chunk, never the layers
    assert peaks[60_000] < 0.5 * layers_60k
    assert peaks[60_000] - peaks[20_000] < 0.25 * (layers_60k - 20_000 * n_genes * 8)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(chunk_cells=0), ValueError, "chunk_cells"),
        (dict(chunk_cells=2.5), ValueError, "chunk_cells"),
        (dict(n_cells=0), ValueError, "n_cells"),
        (dict(topology="tree"), ValueError, "topology"),
        (dict(overwrite="yes"), ValueError, "overwrite"),
        (dict(path=123), ValueError, "path"),
    ],
)
def test_simulate_h5ad_bad_arguments_raise(kwargs, error, message, tmp_path):
    from pyro_velo.datasets import simulate_h5ad

    args = {"path": tmp_path / "x.h5ad", "n_cells": 20, "n_genes": 5, **kwargs}
    with pytest.raises(error, match=message):
        simulate_h5ad(**args)
    assert not (tmp_path / "x.h5ad").exists()


def test_simulate_h5ad_refuses_to_overwrite_and_needs_the_folder(tmp_path):
    from pyro_velo.datasets import simulate_h5ad

    path = simulate_h5ad(tmp_path / "x.h5ad", 20, 5, seed=1)
    before = _layers(path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        simulate_h5ad(path, 20, 5, seed=2)
    np.testing.assert_array_equal(before[0], _layers(path)[0])
    simulate_h5ad(path, 20, 5, seed=2, overwrite=True)
    assert not np.array_equal(before[1], _layers(path)[1])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        simulate_h5ad(tmp_path / "missing" / "x.h5ad", 20, 5)


def test_streamed_fit_of_simulated_file_recovers_time(sim_file):
    import pyro_velo as pv

    vae = pv.VeloVAE(str(sim_file), model="basic", seed=0)
    assert vae.data.n_cells == H5AD_CELLS  # streamed from the file
    vae.train(max_epochs=20, warmup_epochs=10, progress_bar=False, seed=0)
    true_t = anndata.read_h5ad(sim_file).obs["true_t"].to_numpy()
    rho = stats.spearmanr(vae.get_latent_time(), true_t)[0]
    assert rho > 0.8, rho
