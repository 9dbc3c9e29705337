"""The velocity-gene rule: held-out gain of the dynamic fit over the steady-state fit."""

import warnings

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import pyro_velo as pv
from pyro_velo._checks import InputError, MissingLayerError
from pyro_velo.velocity_genes import (
    EXPORT_MIN_SCORE,
    gene_columns,
    h5ad_gene_columns,
    select_velocity_genes,
    selection,
    velocity_gene_scores,
)

N_CELLS = 400


def three_genes(seed: int = 0):
    """Observed u, fitted u and s, split of three genes: dynamic, steady state, unfitted.

    Gene 0: u leads s along time (u_hat away from the steady-state line), observed with
    noise. Gene 1: u_hat = 0.5 s_hat (zero velocity), observed u on that line plus noise.
    Gene 2: not fitted (NaN).
    """
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, 5, N_CELLS))
    s_hat = np.stack([1 - np.exp(-0.5 * t), 1 + np.sin(t) ** 2, np.full_like(t, np.nan)], 1)
    u_hat = np.stack([np.exp(-2 * t), 0.5 * s_hat[:, 1], np.full_like(t, np.nan)], 1)
    observed_u = u_hat + rng.normal(0, 0.02, u_hat.shape)
    observed_u[:, 2] = rng.poisson(1.0, N_CELLS)
    split = rng.choice(["train", "validation", "test"], N_CELLS, p=[0.7, 0.15, 0.15])
    return observed_u, u_hat, s_hat, split


def test_dynamic_genes_score_high_steady_state_genes_near_zero():
    observed_u, u_hat, s_hat, split = three_genes()
    scores = velocity_gene_scores(observed_u, u_hat, s_hat, split)
    assert scores[0] > 0.9
    assert abs(scores[1]) < 0.05
    assert np.isnan(scores[2])
    columns = gene_columns(observed_u, u_hat, s_hat, split, min_score=0.1)
    np.testing.assert_array_equal(columns["velocity_genes"], [True, False, False])
    everything = gene_columns(observed_u, u_hat, s_hat, split, min_score=None)
    np.testing.assert_array_equal(everything["velocity_genes"], [True, True, False])


def test_the_score_is_taken_on_held_out_cells_only():
    observed_u, u_hat, s_hat, split = three_genes()
    train = split == "train"
    # a fit that is perfect on the held-out cells scores 1, whatever it does on the others
    perfect = u_hat.copy()
    perfect[~train, 0] = observed_u[~train, 0]
    perfect[train, 0] += 5.0
    assert velocity_gene_scores(observed_u, perfect, s_hat, split)[0] == pytest.approx(1.0)
    # and worse held-out predictions lower it
    worse = u_hat.copy()
    worse[~train, 0] += 0.3
    assert (velocity_gene_scores(observed_u, worse, s_hat, split)[0]
            < velocity_gene_scores(observed_u, u_hat, s_hat, split)[0] - 0.5)


def test_bad_arguments_are_named():
    observed_u, u_hat, s_hat, split = three_genes()
    with pytest.raises(InputError, match="shapes differ"):
        velocity_gene_scores(observed_u[:, :2], u_hat, s_hat, split)
    with pytest.raises(InputError, match="training and held-out"):
        velocity_gene_scores(observed_u, u_hat, s_hat, np.full(N_CELLS, "train"))
    # an export without held-out cells keeps every fitted gene, without scores
    columns = gene_columns(observed_u, u_hat, s_hat, np.full(N_CELLS, "train"))
    np.testing.assert_array_equal(columns["velocity_genes"], [True, True, False])
    assert np.isnan(columns["velocity_score"]).all()


def exported_like(seed: int = 0) -> AnnData:
    observed_u, u_hat, s_hat, split = three_genes(seed)
    adata = AnnData(np.zeros_like(observed_u, dtype=np.float32),
                    layers={"Mu": observed_u, "pyro_velo_u": u_hat, "pyro_velo_s": s_hat})
    adata.obs["pyro_velo_split"] = pd.Categorical(split)
    return adata


def test_select_velocity_genes_writes_only_its_columns():
    adata = exported_like()
    before = adata.copy()
    table = select_velocity_genes(adata, min_score=0.1)
    assert list(table.columns) == ["velocity_score", "velocity_genes"]
    assert list(adata.var.columns) == ["velocity_score", "velocity_genes"]
    np.testing.assert_array_equal(adata.var["velocity_genes"], [True, False, False])
    assert adata.layers.keys() == before.layers.keys()
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    select_velocity_genes(adata, min_score=None)
    np.testing.assert_array_equal(adata.var["velocity_genes"], [True, True, False])
    with pytest.raises(InputError, match="min_score"):
        select_velocity_genes(adata, min_score="high")
    del adata.layers["pyro_velo_u"]
    with pytest.raises(MissingLayerError, match="pyro_velo_u"):
        select_velocity_genes(adata)
    with pytest.raises(InputError, match="export a fitted model"):
        select_velocity_genes(exported_like(), split_key="split")


def test_scores_read_from_a_file_equal_those_in_memory(tmp_path):
    h5py = pytest.importorskip("h5py")
    adata = exported_like()
    adata.write_h5ad(tmp_path / "export.h5ad")
    split = adata.obs["pyro_velo_split"].to_numpy()
    in_memory = gene_columns(adata.layers["Mu"], adata.layers["pyro_velo_u"],
                             adata.layers["pyro_velo_s"], split, min_score=0.1)
    with h5py.File(tmp_path / "export.h5ad", "r") as file:
        from_file = h5ad_gene_columns(file, "Mu", "pyro_velo_u", "pyro_velo_s", split,
                                      min_score=0.1)
        # a file without the observed layer: no evidence, every fitted gene is kept
        without = h5ad_gene_columns(file, "no_such_layer", "pyro_velo_u", "pyro_velo_s",
                                    split, min_score=0.1)
    np.testing.assert_allclose(from_file["velocity_score"], in_memory["velocity_score"])
    np.testing.assert_array_equal(from_file["velocity_genes"], [True, False, False])
    assert np.isnan(without["velocity_score"]).all()
    np.testing.assert_array_equal(without["velocity_genes"], [True, True, False])


@pytest.mark.slow
def test_export_scores_separate_dynamic_from_static_genes():
    """On a simulation with static genes, the scores of an export tell them apart."""
    adata = pv.datasets.simulate(
        n_cells=500, n_genes=60, topology="linear", seed=0,
        behaviours={"induction_repression": 0.6, "constant": 0.4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pv.pp.preprocess(adata, n_pcs=10)
    vae = pv.VeloVAE(adata, model="basic", seed=0)
    vae.train(seed=0, max_epochs=150, progress_bar=False)
    vae.export_to_anndata(adata)
    score = adata.var["velocity_score"].to_numpy()
    fitted = vae.get_rates()["fitted"].to_numpy()
    assert np.isfinite(score[fitted]).all() and np.isnan(score[~fitted]).all()
    np.testing.assert_array_equal(adata.var["velocity_genes"],
                                  selection(score, fitted, EXPORT_MIN_SCORE))
    behaviour = adata.var["behaviour"].astype(str).to_numpy()
    dynamic = score[behaviour == "induction_repression"]
    static = score[behaviour == "constant"]
    assert np.median(dynamic) > 0.5 and np.median(static) < 0.05
    selected = select_velocity_genes(adata, min_score=0.1)["velocity_genes"].to_numpy()
    assert selected[behaviour == "induction_repression"].mean() > 0.8
    assert selected[behaviour == "constant"].mean() < 0.2
