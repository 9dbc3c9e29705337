"""Smoke tests of the building blocks of benchmarks/compare.py (no model is fitted)."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from benchmarks import compare


def test_parse_transitions():
    assert compare.parse_transitions("A:B, B:C,") == [("A", "B"), ("B", "C")]
    assert compare.parse_transitions(None) == []
    with pytest.raises(ValueError, match="SOURCE:TARGET"):
        compare.parse_transitions("A-B")


def test_mean_cosine_uses_genes_finite_in_both_per_cell():
    a = np.array([[1.0, 0.0, np.nan], [1.0, 1.0, 5.0], [0.0, 0.0, 0.0]])
    b = np.array([[2.0, 0.0, 1.0], [-1.0, -1.0, np.nan], [1.0, 1.0, 1.0]])
    # row 0: cos over genes 0, 1 = 1; row 1: over genes 0, 1 = -1; row 2: zero vector, left out
    assert compare.mean_cosine(a, b) == pytest.approx(0.0)
    assert math.isnan(compare.mean_cosine(np.zeros((2, 2)), np.ones((2, 2))))


def test_standardised_mse_divides_each_gene_by_its_scale():
    u = np.zeros((2, 2))
    s = np.zeros((2, 2))
    fit = np.array([[2.0, 1.0], [2.0, 1.0]])
    value = compare.standardised_mse(fit, fit, u, s, np.array([2.0, 1.0]), np.array([2.0, 1.0]))
    assert value == pytest.approx(1.0)


def test_gene_time_correlations_and_summary():
    t = np.arange(10.0)
    fit_t = np.column_stack([t ** 2, -t, np.ones(10)])
    rho = compare.gene_time_correlations(fit_t, t)
    assert rho[:2] == pytest.approx([1.0, -1.0])
    assert math.isnan(rho[2])
    summary = compare.summarise_gene_times(rho)
    assert summary["n_genes"] == 2
    assert summary["mean"] == pytest.approx(0.0)
    assert summary["frac_below_0.5"] == pytest.approx(0.5)


def test_markdown_table_formats_failures_and_missing_values():
    rows = [
        {"dataset": "d", "method": "m1", "status": "ok", "spearman_t": 0.91234,
         "wall_s": 3.0, "mse_train": float("nan")},
        {"dataset": "d", "method": "m2", "status": "failed: ValueError: x"},
    ]
    lines = compare.markdown_table(rows).splitlines()
    assert len(lines) == 4
    assert "| 0.912 |" in lines[2] and "| 3.0 |" in lines[2] and "| - |" in lines[2]
    assert "failed: ValueError: x" in lines[3]
    assert lines[0].count("|") == lines[2].count("|") == lines[3].count("|")


def test_parse_args_sizes():
    quick = compare.parse_args(["--quick"])
    assert (quick.n_cells, quick.n_genes, quick.max_epochs) == (1000, 100, 100)
    full = compare.parse_args(["--n-genes", "50", "--datasets", "linear"])
    assert (full.n_cells, full.n_genes, full.max_epochs) == (2000, 50, None)
    assert full.size_factors == "total"
    assert compare.parse_args(["--size-factors", "neighbourhood"]).size_factors == "neighbourhood"
    with pytest.raises(SystemExit):
        compare.parse_args(["--datasets"])  # nothing to run


def test_scvelo_simulation_gets_stages_in_time_order():
    adata = compare.staged_scvelo_simulation(200, 5, seed=0)
    stages = adata.obs["cell_type"].astype(str).to_numpy()
    t = adata.obs["true_t"].to_numpy()
    labels = [f"stage_{k}" for k in range(1, compare.SCVELO_STAGES + 1)]
    assert sorted(set(stages)) == labels
    assert [t[stages == label].max() <= t[stages == nxt].min()
            for label, nxt in zip(labels[:-1], labels[1:], strict=True)] == [True] * 3
    assert adata.uns["transitions"] == list(zip(labels[:-1], labels[1:], strict=True))


def test_fixed_leastsq_generalized_matches_scvelo_semantics():
    optimization = pytest.importorskip("scvelo.tools.optimization")
    # scVelo's own function with the size-one result taken explicitly (its NumPy 1 meaning)
    source = inspect.getsource(optimization.leastsq_generalized).replace(
        "gamma[i] = np.linalg.pinv(A.T.dot(A)).dot(A.T.dot(y[:, i]))",
        "gamma[i] = np.linalg.pinv(A.T.dot(A)).dot(A.T.dot(y[:, i]))[0]")
    namespace = dict(vars(optimization))
    exec(source, namespace)  # noqa: S102 - scVelo's installed source, for reference
    reference = namespace["leastsq_generalized"]
    fixed = compare.fixed_leastsq_generalized(optimization.leastsq_generalized)
    rng = np.random.default_rng(0)
    x, y, x2, y2 = (rng.gamma(2.0, 1.0, (50, 4)) for _ in range(4))
    res_std, res2_std = rng.uniform(0.5, 2.0, 4), rng.uniform(0.5, 2.0, 4)
    for kwargs in ({}, {"perc": [5, 95]}, {"res_std": res_std, "res2_std": res2_std}):
        for got, want in zip(fixed(x, y, x2, y2, **kwargs), reference(x, y, x2, y2, **kwargs),
                             strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6)
