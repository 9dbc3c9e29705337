"""Tests for the velocity-evaluation metrics in pyro_velo.tl, on hand-made cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from scipy import stats

import pyro_velo as pv
from pyro_velo import tl
from pyro_velo._checks import InputError


def _chain_graph(n: int) -> sp.csr_matrix:
    """Symmetric graph linking consecutive cells 0-1-2-...-(n-1)."""
    off = np.ones(n - 1)
    return sp.diags([off, off], [-1, 1], shape=(n, n), format="csr")


def _line(velocity_direction: float = 1.0, orthogonal: bool = False) -> AnnData:
    """Six cells on the x axis, A = cells 0-2 then B = cells 3-5, chained neighbours.

    Cells live in 2 genes (layers['Ms']) and in a 2-D 'umap' embedding at the same place.
    Velocity is +/- the x direction (along x_B - x_A) or, if ``orthogonal``, the y direction.
    """
    n = 6
    x = np.column_stack([np.arange(n, dtype=float), np.zeros(n)])
    v = np.tile([0.0, 1.0] if orthogonal else [velocity_direction, 0.0], (n, 1))
    adata = AnnData(np.zeros((n, 2)))
    adata.obs["cell_type"] = pd.Categorical(["A"] * 3 + ["B"] * 3)
    adata.layers["Ms"] = x.copy()
    adata.layers["velocity"] = 2.5 * v  # cosine ignores the scale
    adata.obsm["X_umap"] = x.copy()
    adata.obsm["velocity_umap"] = v
    adata.obsp["connectivities"] = _chain_graph(n)
    return adata


# ------------------------------------------------------------------- time_correlation


def test_time_correlation_perfect_reversed_and_kendall():
    adata = AnnData(np.zeros((5, 1)))
    adata.obs["true_t"] = [0.0, 1.0, 2.0, 3.0, 4.0]
    adata.obs["latent_time"] = [0.0, 0.1, 0.5, 0.6, 0.9]  # monotone, not linear
    assert tl.time_correlation(adata) == pytest.approx(1.0)
    assert tl.time_correlation(adata, method="kendall") == pytest.approx(1.0)
    adata.obs["latent_time"] = -adata.obs["latent_time"]
    assert tl.time_correlation(adata) == pytest.approx(-1.0)


def test_time_correlation_drops_nan_cells():
    adata = AnnData(np.zeros((5, 1)))
    adata.obs["true_t"] = [0.0, 1.0, np.nan, 3.0, 4.0]
    # the cell with NaN reference time would break monotonicity if it were kept
    adata.obs["latent_time"] = [0.0, 0.1, 9.0, np.nan, 0.9]
    assert tl.time_correlation(adata) == pytest.approx(1.0)


def test_time_correlation_numeric_categories_and_string_labels():
    adata = AnnData(np.zeros((4, 1)))
    adata.obs["latent_time"] = [0.1, 0.2, 0.3, 0.4]
    adata.obs["day"] = pd.Categorical([1.0, 1.0, 2.0, 3.0])
    assert tl.time_correlation(adata, key="day") > 0.9
    # capture labels are read as numbers: E12.5 < E13.5 < P0 (after birth)
    adata.obs["stage"] = pd.Categorical(["E12.5", "E12.5", "E13.5", "P0"])
    assert tl.time_correlation(adata, key="stage") == pytest.approx(
        stats.spearmanr([0.1, 0.2, 0.3, 0.4], [12.5, 12.5, 13.5, 19.5])[0])
    adata.obs["stage"] = ["late", "early", "mid", "late"]
    with pytest.raises(InputError, match="'late'.*capture_time_mapping"):
        tl.time_correlation(adata, key="stage")
    mapping = {"early": 0, "mid": 1, "late": 2}
    assert tl.time_correlation(adata, key="stage", mapping=mapping) == pytest.approx(
        stats.spearmanr([0.1, 0.2, 0.3, 0.4], [2, 0, 1, 2])[0])


def test_time_correlation_errors():
    adata = AnnData(np.zeros((3, 1)))
    adata.obs["latent_time"] = [0.1, 0.2, 0.3]
    with pytest.raises(InputError, match="'true_t' not found in adata.obs"):
        tl.time_correlation(adata)
    adata.obs["true_t"] = [0.0, np.nan, np.nan]
    with pytest.raises(InputError, match="at least 2"):
        tl.time_correlation(adata)
    with pytest.raises(InputError, match="method"):
        tl.time_correlation(adata, method="pearson")


# ------------------------------------------------------------------- cross-boundary


@pytest.mark.parametrize("basis", [None, "umap"])
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"velocity_direction": 1.0}, 1.0),
        ({"velocity_direction": -1.0}, -1.0),
        ({"orthogonal": True}, 0.0),
    ],
)
def test_cbdir_on_a_line(basis, kwargs, expected):
    adata = _line(**kwargs)
    scores, mean = tl.cross_boundary_correctness(adata, "cell_type", [("A", "B")], basis=basis)
    assert scores == {("A", "B"): pytest.approx(expected, abs=1e-12)}
    assert mean == pytest.approx(expected, abs=1e-12)


def test_cbdir_reverse_transition_and_distances_graph():
    adata = _line()
    # B -> A: the velocity points away from A
    scores, _ = tl.cross_boundary_correctness(adata, "cell_type", [("B", "A")])
    assert scores[("B", "A")] == pytest.approx(-1.0)
    # the directed kNN graph in 'distances' works too, and a sparse matrix may be passed
    adata.obsp["distances"] = sp.triu(_chain_graph(6)).tocsr()
    scores, _ = tl.cross_boundary_correctness(
        adata, "cell_type", [("A", "B")], neighbors="distances"
    )
    assert scores[("A", "B")] == pytest.approx(1.0)
    scores, _ = tl.cross_boundary_correctness(
        adata, "cell_type", [("A", "B")], neighbors=adata.obsp["distances"]
    )
    assert scores[("A", "B")] == pytest.approx(1.0)


def test_cbdir_drops_nan_velocity_genes_and_averages_neighbours():
    adata = _line()
    # gene 1 is unfitted (NaN velocity): it must be ignored, not poison the score
    adata.layers["velocity"][:, 1] = np.nan
    # cell 2 (A) gets a second B neighbour, off the axis at 45 degrees: cos = 1/sqrt(2)
    adata.layers["Ms"][4, 1] = 1.0  # moves cell 4 in the dropped gene only: no effect
    graph = adata.obsp["connectivities"].tolil()
    graph[2, 4] = graph[4, 2] = 1.0
    adata.obsp["connectivities"] = graph.tocsr()
    scores, _ = tl.cross_boundary_correctness(adata, "cell_type", [("A", "B")])
    assert scores[("A", "B")] == pytest.approx(1.0)
    adata.obsm["X_umap"][4, 1] = 2.0  # in the embedding, cell 4 is at (4, 2) seen from (2, 0)
    scores, _ = tl.cross_boundary_correctness(adata, "cell_type", [("A", "B")], basis="umap")
    assert scores[("A", "B")] == pytest.approx((1.0 + 1 / np.sqrt(2)) / 2)


def _naive_cbdir(x, v, labels, graph, a, b):
    """Reference CBDir with explicit loops over cells and neighbours (tests only)."""
    dense = graph.toarray()
    per_cell = []
    for i in np.flatnonzero(labels == a):
        nbrs = [j for j in np.flatnonzero(dense[i]) if labels[j] == b and j != i]
        if not nbrs:
            continue
        cosines = []
        for j in nbrs:
            d = x[j] - x[i]
            denom = np.linalg.norm(v[i]) * np.linalg.norm(d)
            cosines.append(v[i] @ d / denom if denom > 0 else 0.0)
        per_cell.append(np.mean(cosines))
    return np.mean(per_cell)


@pytest.mark.parametrize("sparse_ms", [False, True])
def test_cbdir_gene_space_matches_naive_loop(monkeypatch, sparse_ms):
    rng = np.random.default_rng(0)
    n, g = 60, 7
    labels = rng.choice(np.array(["A", "B", "C"]), n)
    x = rng.normal(size=(n, g))
    v = rng.normal(size=(n, g))
    v[:, 3] = np.nan  # an unfitted gene
    graph = sp.random(n, n, density=0.15, random_state=1, format="csr")
    adata = AnnData(np.zeros((n, g)))
    adata.obs["cluster"] = labels
    adata.layers["Ms"] = sp.csr_matrix(x) if sparse_ms else x
    adata.layers["velocity"] = v
    adata.obsp["connectivities"] = graph
    # tiny chunks so that the edge loop runs over many chunks
    monkeypatch.setattr(tl.metrics, "_CHUNK_VALUES", 10)
    transitions = [("A", "B"), ("B", "C"), ("C", "A")]
    scores, mean = tl.cross_boundary_correctness(adata, "cluster", transitions)
    keep = np.arange(g) != 3
    for a, b in transitions:
        expected = _naive_cbdir(x[:, keep], v[:, keep], labels, graph, a, b)
        assert scores[(a, b)] == pytest.approx(expected, rel=1e-10)
    assert mean == pytest.approx(np.mean(list(scores.values())))


def test_cbdir_errors_name_the_missing_key():
    adata = _line()
    with pytest.raises(InputError, match="'clusters' not found in adata.obs"):
        tl.cross_boundary_correctness(adata, "clusters", [("A", "B")])
    with pytest.raises(InputError, match="'C'.*not found.*'A', 'B'"):
        tl.cross_boundary_correctness(adata, "cell_type", [("A", "C")])
    with pytest.raises(InputError, match="'velocity_tsne' not found in adata.obsm"):
        tl.cross_boundary_correctness(adata, "cell_type", [("A", "B")], basis="tsne")
    with pytest.raises(InputError, match="'knn' not found in adata.obsp"):
        tl.cross_boundary_correctness(adata, "cell_type", [("A", "B")], neighbors="knn")
    with pytest.raises(InputError, match="'velo'.*not found in adata.layers"):
        tl.cross_boundary_correctness(adata, "cell_type", [("A", "B")], velocity_key="velo")
    del adata.layers["Ms"]
    with pytest.raises(InputError, match="'Ms'"):
        tl.cross_boundary_correctness(adata, "cell_type", [("A", "B")])
    del adata.obsp["connectivities"]
    with pytest.raises(InputError, match="connectivities"):
        tl.cross_boundary_correctness(adata, "cell_type", [("A", "B")], basis="umap")
    adata = _line()
    adata.layers["velocity"][:] = np.nan
    with pytest.raises(InputError, match="No gene"):
        tl.cross_boundary_correctness(adata, "cell_type", [("A", "B")])


def test_cbdir_no_boundary_cells_gives_nan_with_warning():
    adata = _line()
    adata.obsp["connectivities"] = sp.csr_matrix((6, 6))  # no edges at all
    with pytest.warns(UserWarning, match="No cell qualified"):
        scores, mean = tl.cross_boundary_correctness(adata, "cell_type", [("A", "B")])
    assert np.isnan(scores[("A", "B")]) and np.isnan(mean)


def test_metrics_do_not_modify_adata():
    adata = _line()
    adata.obs["latent_time"] = np.linspace(0, 1, 6)
    before = adata.copy()
    tl.cross_boundary_correctness(adata, "cell_type", [("A", "B")])
    tl.in_cluster_coherence(adata, "cell_type")
    tl.velocity_consistency(adata)
    tl.transition_time_score(adata, "cell_type", [("A", "B")])
    assert list(adata.obs.columns) == list(before.obs.columns)
    assert set(adata.layers) == set(before.layers) and set(adata.obsm) == set(before.obsm)
    assert (adata.obsp["connectivities"] != before.obsp["connectivities"]).nnz == 0
    np.testing.assert_array_equal(adata.layers["velocity"], before.layers["velocity"])


# ------------------------------------------------------------------- coherence


def test_in_cluster_coherence_equal_and_opposed_velocities():
    adata = _line()
    scores, mean = tl.in_cluster_coherence(adata, "cell_type")
    assert scores == {"A": pytest.approx(1.0), "B": pytest.approx(1.0)}
    assert mean == pytest.approx(1.0)
    # in B, flip the middle cell: cells 3 and 5 each see only cell 4 (cos -1), and cell 4
    # sees cells 3 and 5 (cos -1 both); edge 2-3 crosses clusters and is ignored
    adata.layers["velocity"][4] *= -1
    scores, mean = tl.in_cluster_coherence(adata, "cell_type")
    assert scores["A"] == pytest.approx(1.0) and scores["B"] == pytest.approx(-1.0)
    assert mean == pytest.approx(0.0)


def test_in_cluster_coherence_ignores_self_loops_and_uses_embedding():
    adata = _line(orthogonal=True)
    adata.obsm["velocity_umap"][0] = [1.0, 0.0]  # orthogonal to its only A neighbour
    adata.obsp["connectivities"] = adata.obsp["connectivities"] + sp.eye(6, format="csr")
    scores, _ = tl.in_cluster_coherence(adata, "cell_type", basis="umap")
    # cell 0: cos 0; cell 1: mean(0, 1) = 0.5; cell 2: 1 (its B neighbour is ignored)
    assert scores["A"] == pytest.approx((0.0 + 0.5 + 1.0) / 3)


# ------------------------------------------------------------------- consistency


def test_velocity_consistency_is_per_cell_pearson():
    n, g = 4, 5
    base = np.array([1.0, 2.0, 0.0, -1.0, 3.0])
    adata = AnnData(np.zeros((n, g)))
    # correlation is invariant to shift and positive scale, flips sign with negative scale
    adata.layers["velocity"] = np.vstack([base, 2 * base + 7, -base, base])
    adata.obsp["connectivities"] = sp.csr_matrix(
        np.array([[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=float)
    )
    result = tl.velocity_consistency(adata)
    assert result.shape == (n,)
    np.testing.assert_allclose(result[:3], [1.0, 0.0, -1.0])  # cell 1: mean(1, -1)
    assert np.isnan(result[3])  # no neighbours


def test_velocity_consistency_matches_numpy_corrcoef_and_drops_nan_genes():
    rng = np.random.default_rng(3)
    n, g = 30, 6
    v = rng.normal(size=(n, g))
    v[:, 0] = np.nan
    graph = sp.random(n, n, density=0.2, random_state=4, format="csr")
    adata = AnnData(np.zeros((n, g)))
    adata.layers["velocity"] = v
    adata.obsp["distances"] = graph
    result = tl.velocity_consistency(adata)  # falls back to 'distances'
    corr = np.corrcoef(v[:, 1:])
    dense = graph.toarray() != 0
    np.fill_diagonal(dense, False)
    expected = np.array([corr[i, dense[i]].mean() if dense[i].any() else np.nan for i in range(n)])
    np.testing.assert_allclose(result, expected, rtol=1e-10)


def test_velocity_consistency_errors():
    adata = AnnData(np.zeros((3, 2)))
    with pytest.raises(InputError, match="'velocity'"):
        tl.velocity_consistency(adata)
    adata.layers["velocity"] = np.ones((3, 2))
    with pytest.raises(InputError, match="No neighbour graph"):
        tl.velocity_consistency(adata)
    with pytest.raises(InputError, match="shape"):
        tl.velocity_consistency(adata, neighbors=sp.eye(4, format="csr"))


# ------------------------------------------------------------------- transition time


def test_transition_time_score_known_cases():
    adata = AnnData(np.zeros((7, 1)))
    adata.obs["cell_type"] = ["A"] * 3 + ["B"] * 4
    adata.obs["latent_time"] = [0.0, 0.1, 0.2, 0.5, 0.6, 0.7, 0.8]
    scores, mean = tl.transition_time_score(adata, "cell_type", [("A", "B"), ("B", "A")])
    assert scores == {("A", "B"): 1.0, ("B", "A"): 0.0}
    assert mean == pytest.approx(0.5)
    adata.obs["latent_time"] = 0.3  # identical times: every pair is a tie
    scores, _ = tl.transition_time_score(adata, "cell_type", [("A", "B")])
    assert scores[("A", "B")] == pytest.approx(0.5)


def test_transition_time_score_matches_pair_count_and_drops_nan():
    rng = np.random.default_rng(5)
    t = rng.integers(0, 5, 40).astype(float)  # many ties
    t[:4] = np.nan
    labels = np.array(["A", "B"] * 20)
    adata = AnnData(np.zeros((40, 1)))
    adata.obs["cell_type"] = pd.Categorical(labels)
    adata.obs["latent_time"] = t
    scores, _ = tl.transition_time_score(adata, "cell_type", [("A", "B")])
    t_a = t[(labels == "A") & ~np.isnan(t)]
    t_b = t[(labels == "B") & ~np.isnan(t)]
    pairs = (t_a[:, None] < t_b[None, :]) + 0.5 * (t_a[:, None] == t_b[None, :])
    assert scores[("A", "B")] == pytest.approx(pairs.mean())


def test_transition_time_score_errors():
    adata = AnnData(np.zeros((2, 1)))
    adata.obs["cell_type"] = ["A", "B"]
    with pytest.raises(InputError, match="'latent_time' not found in adata.obs"):
        tl.transition_time_score(adata, "cell_type", [("A", "B")])
    adata.obs["latent_time"] = ["early", "late"]
    with pytest.raises(InputError, match="numeric"):
        tl.transition_time_score(adata, "cell_type", [("A", "B")])
    adata.obs["latent_time"] = [0.0, 1.0]
    with pytest.raises(InputError, match="'Z'"):
        tl.transition_time_score(adata, "cell_type", [("Z", "B")])
    with pytest.raises(InputError, match="pair"):
        tl.transition_time_score(adata, "cell_type", [("A", "B", "C")])
    with pytest.raises(InputError, match="empty"):
        tl.transition_time_score(adata, "cell_type", [])


def test_time_resolution_is_the_spread_over_the_moment_neighbourhood():
    # a path 0 - 1 - 2 plus cell 3 hanging on cell 1 (NaN time) and cell 4 alone
    graph = sp.csr_matrix(np.array([[0, 1, 0, 0, 0], [1, 0, 1, 1, 0], [0, 1, 0, 0, 0],
                                    [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]]) * 0.3)
    adata = AnnData(np.zeros((5, 1)))
    adata.obs["pyro_velo_time"] = [10.0, 11.0, 13.0, np.nan, 7.0]
    adata.obsp["connectivities"] = graph
    before = adata.obs.copy()
    got = tl.time_resolution(adata)
    # cell 0: {10, 11}; cell 1: {10, 11, 13} (the NaN neighbour left out); cell 2:
    # {11, 13}; cell 3: NaN; cell 4: only itself
    expected = [np.std([10, 11]), np.std([10, 11, 13]), np.std([11, 13]), np.nan, 0.0]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    pd.testing.assert_frame_equal(adata.obs, before)  # nothing written
    # the weights of the graph do not matter, a stored diagonal does not count twice
    np.testing.assert_allclose(
        tl.neighbourhood_spread((graph > 0) * 7.0 + sp.identity(5), adata.obs["pyro_velo_time"]),
        expected, rtol=1e-12)
    # far from zero the spread is kept to its size (no cancellation of large squares)
    far = tl.neighbourhood_spread(graph, np.array([1e8, 1e8 + 1, 1e8 + 3, np.nan, 1e8]))
    np.testing.assert_allclose(far, expected, rtol=1e-9)


def test_time_resolution_errors():
    adata = AnnData(np.zeros((3, 1)))
    adata.obs["pyro_velo_time"] = [0.0, 1.0, 2.0]
    with pytest.raises(InputError, match="No neighbour graph"):
        tl.time_resolution(adata)
    adata.obsp["distances"] = sp.csr_matrix(np.ones((3, 3)))
    with pytest.raises(InputError, match="'latent' not found in adata.obs"):
        tl.time_resolution(adata, time_key="latent")
    with pytest.raises(InputError, match="shape"):
        tl.neighbourhood_spread(sp.csr_matrix(np.ones((2, 2))), np.zeros(3))
    np.testing.assert_allclose(tl.time_resolution(adata), np.std([0.0, 1.0, 2.0]))


def test_tl_is_exported():
    assert pv.tl is tl
