"""Plots (pyro_velo.pl): every function renders to a file without a display."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import pyro_velo as pv  # noqa: E402
from pyro_velo.train import TrainingHistory  # noqa: E402

MIN_PNG_BYTES = 5_000  # a blank or failed figure is a few hundred bytes


@pytest.fixture(scope="module")
def fitted():
    """A tiny full-model fit shared by all tests: (adata, history), plus uncertainty
    columns filled with random positive numbers (until get_uncertainty writes them)."""
    adata = pv.datasets.simulate(n_cells=300, n_genes=30, topology="bifurcation", seed=0)
    pv.pp.preprocess(adata, n_pcs=25, random_state=0)
    vae = pv.VeloVAE(adata, model="full", seed=0)
    vae.train(max_epochs=10, warmup_epochs=3, refine_epochs=3, progress_bar=False)
    vae.export_to_anndata(adata)
    rng = np.random.default_rng(0)
    adata.obs["pyro_velo_time_cv"] = rng.gamma(2.0, 0.05, adata.n_obs)
    adata.obs["pyro_velo_state_cv"] = rng.gamma(2.0, 0.1, adata.n_obs)
    return adata, vae.history


@pytest.fixture
def adata(fitted):
    """A copy per test, so that no test sees another's writes."""
    return fitted[0].copy()


@pytest.fixture
def history(fitted):
    return fitted[1]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def genes_of(adata, n=2):
    return list(adata.var_names[np.asarray(adata.var["velocity_genes"], bool)][:n])


def assert_png(path):
    assert path.is_file(), f"{path} was not written"
    assert path.stat().st_size > MIN_PNG_BYTES, f"{path} is nearly empty"


@pytest.fixture
def results():
    rows = []
    for dataset in ("linear", "bifurcation"):
        for method, base in (("pyro_velo", 0.9), ("scvelo", 0.7)):
            rows.append({"dataset": dataset, "method": method, "spearman_t": base,
                         "velocity_cosine": base - 0.1, "cbdir": base - 0.3,
                         "mse_test": 1 - base, "wall_s": 60 * base})
    return pd.DataFrame(rows)


# ---- every function renders ------------------------------------------------------------
def test_gene_fits_renders(adata, tmp_path):
    genes = genes_of(adata, 3)
    fig = pv.pl.gene_fits(adata, genes, show=False, save=tmp_path / "gene_fits.png")
    assert isinstance(fig, Figure)
    assert_png(tmp_path / "gene_fits.png")
    # 3 genes x (u, s) panels drawn; each has the observed points and one line per type
    drawn = [ax for ax in fig.axes if ax.axison and ax.collections]
    assert len(drawn) == 6
    n_types = adata.obs["cell_type"].nunique()
    assert len(drawn[0].lines) == n_types


def test_gene_fits_continuous_colour_and_no_cloud(adata, tmp_path):
    fig = pv.pl.gene_fits(adata, genes_of(adata, 1)[0], color="latent_time", show_cloud=False,
                          show=False, save=tmp_path / "g.png")
    assert_png(tmp_path / "g.png")
    u_panel = fig.axes[0]
    assert len(u_panel.collections) == 1  # observed points only, no fitted cloud
    assert len(u_panel.lines) == 1  # one fit line over all cells


def test_gene_fits_unfitted_gene(adata, tmp_path):
    gene = adata.var_names[0]
    adata.layers["pyro_velo_u"][:, 0] = np.nan
    adata.layers["pyro_velo_s"][:, 0] = np.nan
    fig = pv.pl.gene_fits(adata, gene, show=False, save=tmp_path / "g.png")
    assert "not fitted" in fig.axes[0].get_title()
    assert not fig.axes[0].lines


def test_points_keep_their_cells_data_and_colours(adata):
    """Cells are drawn in shuffled order: x, y (and z) and colour must stay together."""
    gene = genes_of(adata, 1)[0]
    fig = pv.pl.gene_fits(adata, gene, show_cloud=False, show=False)
    points = fig.axes[0].collections[0]
    drawn = np.column_stack([points.get_offsets(), points.get_facecolors()[:, :3]])
    g = adata.var_names.get_loc(gene)
    types = adata.obs["cell_type"].cat.codes.to_numpy()
    palette = plt.get_cmap("tab10").colors
    expected = np.column_stack([adata.obs["latent_time"], np.asarray(adata.layers["Mu"])[:, g],
                                np.array(palette)[types]])
    sort = np.lexsort
    np.testing.assert_allclose(drawn[sort(drawn[:, :2].T)], expected[sort(expected[:, :2].T)],
                               rtol=1e-5)

    fig = pv.pl.cell_state_3d(adata, show=False)
    xs, _, zs = fig.axes[0].collections[0]._offsets3d
    state = np.asarray(adata.obsm["pyro_velo_cell_state"], float)
    pc1 = (state - state.mean(0)) @ np.linalg.svd(state - state.mean(0))[2][0]
    # PC signs are arbitrary: compare |PC1| with the time of the same cell
    drawn = np.column_stack([np.abs(np.asarray(xs)), np.asarray(zs)])
    expected = np.column_stack([np.abs(pc1), adata.obs["latent_time"]])
    np.testing.assert_allclose(drawn[sort(drawn.T[::-1])], expected[sort(expected.T[::-1])],
                               rtol=1e-5, atol=1e-6)


def test_phase_portraits_renders(adata, tmp_path):
    fig = pv.pl.phase_portraits(adata, genes_of(adata, 5), show=False,
                                save=tmp_path / "phase.png")
    assert isinstance(fig, Figure)
    assert_png(tmp_path / "phase.png")


def test_embedding_renders_numeric_and_categorical(adata, tmp_path):
    fig = pv.pl.embedding(adata, basis="pca", show=False, save=tmp_path / "time.png")
    assert_png(tmp_path / "time.png")
    assert len(fig.axes) == 2  # panel and colorbar
    fig = pv.pl.embedding(adata, color="cell_type", basis="pca", show=False,
                          save=tmp_path / "type.png")
    assert_png(tmp_path / "type.png")
    assert fig.axes[0].get_legend() is not None


def test_cell_state_3d_renders(adata, tmp_path):
    fig = pv.pl.cell_state_3d(adata, show=False, save=tmp_path / "state.png")
    assert_png(tmp_path / "state.png")
    assert fig.axes[0].name == "3d"
    assert "PC1" in fig.axes[0].get_xlabel()
    pv.pl.cell_state_3d(adata, color="latent_time", show=False, save=tmp_path / "state_t.png")
    assert_png(tmp_path / "state_t.png")


def test_uncertainty_renders(adata, tmp_path):
    fig = pv.pl.uncertainty(adata, basis="pca", show=False, save=tmp_path / "unc.png")
    assert_png(tmp_path / "unc.png")
    fig = pv.pl.uncertainty(adata, keys="pyro_velo_time_cv", basis="pca", kind="violin",
                            groupby=None, show=False, save=tmp_path / "unc_violin.png")
    assert_png(tmp_path / "unc_violin.png")
    assert isinstance(fig, Figure)


def test_training_curves_renders(history, tmp_path):
    fig = pv.pl.training_curves(history, show=False, save=tmp_path / "loss.png")
    assert_png(tmp_path / "loss.png")
    ax = fig.axes[0]
    assert [t.get_text().strip() for t in ax.texts] == [name for name, _ in history.stages]
    for scale in ("symlog", "linear"):
        pv.pl.training_curves(history, yscale=scale, show=False, save=tmp_path / f"{scale}.png")
        assert_png(tmp_path / f"{scale}.png")
    # a saved history (a plain dict) works too
    pv.pl.training_curves(dict(history.__dict__), show=False, save=tmp_path / "dict.png")
    assert_png(tmp_path / "dict.png")


def test_benchmark_renders(results, tmp_path):
    fig = pv.pl.benchmark(results, show=False, save=tmp_path / "bench.png")
    assert_png(tmp_path / "bench.png")
    assert sum(ax.axison for ax in fig.axes) == 5
    # repeats per (dataset, method) give error bars; a subset of metrics
    repeated = pd.concat([results, results.assign(spearman_t=results.spearman_t - 0.05)])
    fig = pv.pl.benchmark(repeated, metrics=["spearman_t"], show=False,
                          save=tmp_path / "bench_rep.png")
    assert_png(tmp_path / "bench_rep.png")
    assert sum(ax.axison for ax in fig.axes) == 1


def test_velocity_stream_draws_float32_embeddings_far_from_zero(adata):
    # scVelo's grid from a float32 embedding is float32 under numpy >= 2; around 1000 its
    # rounded spacing failed matplotlib's "equally spaced" check (scVelo alone raises)
    rng = np.random.default_rng(0)
    adata.obsm["X_far"] = (1000 + 3 * rng.normal(size=(adata.n_obs, 2))).astype(np.float32)
    before = adata.obsm["X_far"].copy()
    fig = pv.pl.velocity_stream(adata, basis="far", color="cell_type", show=False)
    assert isinstance(fig, Figure)
    np.testing.assert_array_equal(adata.obsm["X_far"], before)  # not rewritten
    assert adata.obsm["X_far"].dtype == np.float32
    assert adata.obsm["velocity_far"].shape == (adata.n_obs, 2)


def test_velocity_stream_renders_and_writes_graph(adata, tmp_path):
    assert "velocity_graph" not in adata.uns
    fig = pv.pl.velocity_stream(adata, basis="pca", show=False, save=tmp_path / "stream.png")
    assert_png(tmp_path / "stream.png")
    assert "velocity_graph" in adata.uns  # documented side effect
    assert isinstance(fig, Figure)


def test_velocity_stream_draws_fewer_than_50_cells(adata, tmp_path):
    # scVelo smooths its grid over n_obs // 50 neighbours, which scikit-learn refuses
    # when it is 0
    small = adata[:30].copy()
    pv.pl.velocity_stream(small, basis="pca", show=False, save=tmp_path / "small.png")
    assert_png(tmp_path / "small.png")


def test_summary_still_works(adata, history, tmp_path):
    fig = pv.pl.summary(adata, history, true_time_key="true_t", show=False,
                        save=tmp_path / "summary.png")
    assert_png(tmp_path / "summary.png")
    assert isinstance(fig, Figure)
    assert "Spearman" in fig.axes[1].get_title()


# ---- ax= returns that axes' figure -----------------------------------------------------
def test_single_panel_functions_draw_into_given_ax(adata, history, tmp_path):
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    a, b, c, d = axes.ravel()
    assert pv.pl.embedding(adata, basis="pca", ax=a, show=False) is fig
    assert a.collections
    assert pv.pl.phase_portraits(adata, genes_of(adata, 1), ax=b, show=False) is fig
    assert b.lines
    assert pv.pl.training_curves(history, ax=c, show=False) is fig
    assert c.lines
    assert pv.pl.velocity_stream(adata, basis="pca", ax=d, show=False) is fig
    fig.savefig(tmp_path / "grid.png")
    assert_png(tmp_path / "grid.png")

    fig3d = plt.figure()
    ax3d = fig3d.add_subplot(projection="3d")
    assert pv.pl.cell_state_3d(adata, ax=ax3d, show=False) is fig3d
    assert ax3d.collections


def test_ax_misuse_is_a_clear_error(adata):
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="one gene"):
        pv.pl.phase_portraits(adata, genes_of(adata, 2), ax=ax, show=False)
    with pytest.raises(ValueError, match="3D axes"):
        pv.pl.cell_state_3d(adata, ax=ax, show=False)


def test_show_true_works_headless(adata):
    fig = pv.pl.embedding(adata, basis="pca")  # default show=True must not fail on Agg
    assert isinstance(fig, Figure)


# ---- errors name the missing key -------------------------------------------------------
def test_missing_export_names_key_and_fix(adata):
    gene = genes_of(adata, 1)[0]
    for key in ("pyro_velo_u", "pyro_velo_s", "velocity"):
        del adata.layers[key]
    del adata.obsm["pyro_velo_cell_state"]
    adata.obs = adata.obs.drop(columns=["latent_time"])
    for call in (lambda: pv.pl.gene_fits(adata, gene, show=False),
                 lambda: pv.pl.phase_portraits(adata, gene, show=False)):
        with pytest.raises(KeyError, match=r"layers\['pyro_velo_u'\].*export_to_anndata"):
            call()
    with pytest.raises(KeyError, match=r"obs\['latent_time'\].*export_to_anndata"):
        pv.pl.embedding(adata, basis="pca", show=False)
    with pytest.raises(KeyError, match=r"layers\['velocity'\].*export_to_anndata"):
        pv.pl.velocity_stream(adata, basis="pca", color="cell_type", show=False)
    with pytest.raises(KeyError, match=r"obsm\['pyro_velo_cell_state'\].*model='full'"):
        pv.pl.cell_state_3d(adata, show=False)
    with pytest.raises(KeyError, match="export_to_anndata"):
        pv.pl.summary(adata, show=False)


def test_missing_basis_suggests_pca(adata):
    assert "X_umap" not in adata.obsm
    for call in (lambda: pv.pl.embedding(adata, show=False),
                 lambda: pv.pl.velocity_stream(adata, show=False),
                 lambda: pv.pl.uncertainty(adata, show=False)):
        with pytest.raises(KeyError, match=r"obsm\['X_umap'\].*basis='pca'"):
            call()


def test_missing_keys_and_bad_arguments(adata, history, results):
    with pytest.raises(KeyError, match=r"obs\['no_such'\]"):
        pv.pl.embedding(adata, color="no_such", basis="pca", show=False)
    with pytest.raises(KeyError, match="not in adata.var_names.*no_gene"):
        pv.pl.gene_fits(adata, ["no_gene"], show=False)
    with pytest.raises(KeyError, match=r"obs\['my_time'\]"):
        pv.pl.gene_fits(adata, genes_of(adata, 1), time_key="my_time", show=False)
    adata.obs = adata.obs.drop(columns=["pyro_velo_state_cv"])
    with pytest.raises(KeyError, match=r"obs\['pyro_velo_state_cv'\].*get_uncertainty"):
        pv.pl.uncertainty(adata, basis="pca", show=False)
    with pytest.raises(ValueError, match="kind"):
        pv.pl.uncertainty(adata, keys="pyro_velo_time_cv", basis="pca", kind="bar", show=False)
    with pytest.raises(ValueError, match="method"):
        pv.pl.cell_state_3d(adata, method="umap", show=False)
    with pytest.raises(ValueError, match="no epochs"):
        pv.pl.training_curves(TrainingHistory(), show=False)
    with pytest.raises(KeyError, match="method"):
        pv.pl.benchmark(results.drop(columns="method"), show=False)
    with pytest.raises(KeyError, match="no_metric"):
        pv.pl.benchmark(results, metrics=["no_metric"], show=False)
