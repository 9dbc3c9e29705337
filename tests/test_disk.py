"""Streaming from an .h5ad file: the same data as in memory, bounded reads, export in chunks."""

import anndata
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import spearmanr

import pyro_velo as pv
from pyro_velo._checks import InputError, MissingFileError
from pyro_velo.data import VelocityData
from pyro_velo.disk import DiskVelocityData, H5adLayer


@pytest.fixture(scope="module")
def adata():
    data = pv.datasets.simulate(n_cells=700, n_genes=40, topology="linear", seed=4)
    pv.pp.preprocess(data)
    return data


@pytest.fixture(scope="module")
def h5ad(adata, tmp_path_factory):
    path = tmp_path_factory.mktemp("disk") / "cells.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def sparse_h5ad(adata, tmp_path_factory):
    """The same abundances stored as CSR layers."""
    copy = adata.copy()
    for name in ("Mu", "Ms"):
        copy.layers[name] = sp.csr_matrix(copy.layers[name])
    path = tmp_path_factory.mktemp("disk") / "sparse.h5ad"
    copy.write_h5ad(path)
    return path


@pytest.mark.parametrize("fixture", ["h5ad", "sparse_h5ad"])
def test_disk_data_equals_memory_data(adata, fixture, request):
    disk = DiskVelocityData.from_h5ad(request.getfixturevalue(fixture), seed=3,
                                      block_cells=64, buffer_blocks=2)
    memory = VelocityData.from_anndata(adata, seed=3)
    np.testing.assert_array_equal(disk.fitted, memory.fitted)
    np.testing.assert_array_equal(disk.split, memory.split)
    torch.testing.assert_close(disk.gene_scale_u, memory.gene_scale_u)
    torch.testing.assert_close(disk.gene_scale_s, memory.gene_scale_s)
    idx = torch.tensor([5, 699, 0, 5, 300, 64, 63])  # any order, repeats, block edges
    for got, want in zip(disk.rows(idx), memory.rows(idx), strict=True):
        torch.testing.assert_close(got, want)
    assert (disk.n_cells, disk.n_genes) == (memory.n_cells, memory.n_genes)


def test_memory_data_keeps_each_cell_contiguous(adata):
    """Minibatches gather rows: every in-memory matrix is row-major, whatever the layer's
    layout or the gene selection (numpy hands back column-major arrays for some)."""
    fortran = adata.copy()
    for name in ("Mu", "Ms"):
        fortran.layers[name] = np.asfortranarray(fortran.layers[name])
    fortran.layers["Mu"][:, 0] = 0.0  # an unfitted gene: the layers are column-selected
    data = VelocityData.from_anndata(fortran).with_counts(fortran)
    new = VelocityData.for_new_cells(fortran, fortran.var_names.to_numpy(), data.fitted,
                                     data.gene_scale_u, data.gene_scale_s)
    assert not data.fitted[0]
    for matrix in (data.u, data.s, *data.counts[:2], new.u, new.s):
        assert matrix.is_contiguous()
    np.testing.assert_allclose(
        data.u.numpy(), adata.layers["Mu"][:, data.fitted] / data.gene_scale_u.numpy(),
        rtol=1e-6)
    torch.testing.assert_close(new.u, data.u)


def test_shuffled_minibatches_visit_every_cell_once_in_blocks(h5ad, adata):
    disk = DiskVelocityData.from_h5ad(h5ad, block_cells=32, buffer_blocks=3)
    memory = VelocityData.from_anndata(adata)
    train = disk.indices("train")
    seen, sizes = [], []
    for batch, (u, s, idx, n_obs), kwargs in disk.minibatches(
            train, 50, n_obs=len(train), generator=torch.Generator().manual_seed(1)):
        assert n_obs == len(train) and kwargs == {}
        torch.testing.assert_close(u, memory.u[batch])  # rows belong to their cells
        torch.testing.assert_close(s, memory.s[batch])
        assert torch.equal(idx, batch)
        seen.append(batch)
        sizes.append(len(batch))
    seen = torch.cat(seen)
    assert sorted(seen.tolist()) == train.tolist()
    assert all(size == 50 for size in sizes[:-1]) and 0 < sizes[-1] <= 50
    assert not torch.equal(seen, train)  # shuffled
    again = torch.cat([b for b, *_ in disk.minibatches(
        train, 50, generator=torch.Generator().manual_seed(1))])
    assert torch.equal(seen, again)  # reproducible


def test_ordered_minibatches_follow_the_indices(h5ad, adata):
    disk = DiskVelocityData.from_h5ad(h5ad, block_cells=16, buffer_blocks=2)
    memory = VelocityData.from_anndata(adata)
    idx = torch.randperm(700, generator=torch.Generator().manual_seed(0))[:333]
    batches = list(disk.minibatches(idx, 40))
    assert torch.equal(torch.cat([b for b, *_ in batches]), idx)
    torch.testing.assert_close(torch.cat([args[0] for _, args, _ in batches]), memory.u[idx])
    assert [args[3] for _, args, _ in batches][0] == 40  # plate size: the batch by default


def test_reads_are_bounded_by_the_buffer(h5ad, monkeypatch):
    disk = DiskVelocityData.from_h5ad(h5ad, block_cells=32, buffer_blocks=2)
    largest = []
    original = H5adLayer.read

    def read(self, start, stop, *args):
        largest.append(stop - start)
        return original(self, start, stop, *args)

    monkeypatch.setattr(H5adLayer, "read", read)
    for _ in disk.minibatches(disk.indices("train"), 20,
                              generator=torch.Generator().manual_seed(0)):
        pass
    for _ in disk.minibatches(torch.arange(700), 100):
        pass
    assert largest and max(largest) <= 32


def test_disk_input_errors(h5ad, adata, tmp_path):
    with pytest.raises(MissingFileError, match="no .h5ad file"):
        DiskVelocityData.from_h5ad(tmp_path / "missing.h5ad")
    (tmp_path / "text.h5ad").write_text("not hdf5")
    with pytest.raises(InputError, match="cannot open"):
        DiskVelocityData.from_h5ad(tmp_path / "text.h5ad")
    with pytest.raises(InputError, match="has no layers\\['nope'\\]"):
        DiskVelocityData.from_h5ad(h5ad, unspliced_layer="nope")
    bad = adata.copy()
    bad.layers["Mu"] = bad.layers["Mu"].copy()
    bad.layers["Mu"][123, 4] = np.nan
    bad.write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(InputError, match="NaN or infinite.*cell 123"):
        DiskVelocityData.from_h5ad(tmp_path / "nan.h5ad")
    bad.layers["Mu"][123, 4] = -1.0
    bad.write_h5ad(tmp_path / "negative.h5ad")
    with pytest.raises(InputError, match="negative values.*cell 123"):
        pv.VeloVAE(tmp_path / "negative.h5ad")
    with pytest.raises(InputError, match="count likelihoods.*cannot stream"):
        pv.VeloVAE(h5ad, likelihood="poisson")
    text = anndata.AnnData(X=np.zeros((20, 3)))
    text.layers["Mu"] = np.full((20, 3), "a", dtype=object)
    text.layers["Ms"] = np.ones((20, 3))
    text.write_h5ad(tmp_path / "text_layer.h5ad")
    with pytest.raises(InputError, match="Mu.*not numeric"):
        pv.VeloVAE(tmp_path / "text_layer.h5ad")


def test_validation_cells_are_held_in_memory_within_a_budget(h5ad, adata):
    disk = DiskVelocityData.from_h5ad(h5ad, seed=3, block_cells=64)
    memory = VelocityData.from_anndata(adata, seed=3)
    validation = disk.indices("validation")
    held, idx = disk.validation_cells()
    assert isinstance(held, VelocityData)
    torch.testing.assert_close(held.cell_ids, validation)
    torch.testing.assert_close(idx, torch.arange(len(validation)))
    for got, want in zip(held.rows(idx), memory.rows(validation), strict=True):
        torch.testing.assert_close(got, want)
    # over budget: a fixed, evenly spaced subset of them, first and last included
    held, idx = disk.validation_cells(max_bytes=10 * 2 * disk.n_genes * 4)
    assert len(idx) == 10
    chosen = held.cell_ids.numpy()
    assert chosen[0] == validation[0] and chosen[-1] == validation[-1]
    assert np.isin(chosen, validation.numpy()).all() and (np.diff(chosen) > 0).all()
    gaps = np.diff(np.searchsorted(validation.numpy(), chosen))
    assert gaps.max() - gaps.min() <= 1
    again, _ = disk.validation_cells(max_bytes=10 * 2 * disk.n_genes * 4)
    torch.testing.assert_close(again.cell_ids, held.cell_ids)


def test_training_from_a_file_reads_the_validation_cells_once(h5ad, monkeypatch):
    """Each further epoch reads only the blocks of the train cells, not the file again."""
    from pyro_velo import train as train_module

    vae = pv.VeloVAE(str(h5ad), model="basic", hidden=(8,), seed=0, progress_bar=False)
    data = DiskVelocityData.from_h5ad(h5ad, split=vae.data.split, block_cells=64)
    reads = []
    original = DiskVelocityData._read_range
    monkeypatch.setattr(DiskVelocityData, "_read_range",
                        lambda self, a, b: reads.append(a) or original(self, a, b))
    counts = []
    for epochs in (1, 3):
        reads.clear()
        train_module.fit(vae.model, vae.guide, data, max_epochs=epochs,
                         early_stopping=False, progress_bar=False)
        counts.append(len(reads))
    train_blocks = len(np.unique(data.indices("train").numpy() // 64))
    assert counts[1] - counts[0] == 2 * train_blocks


def test_data_without_held_validation_cells_is_validated_in_place(adata):
    """fit takes any data object with the minibatch protocol; one without
    ``validation_cells`` has its validation cells scored where they are."""
    from pyro_velo.inference import loop as train_module

    class Plain:  # the VelocityData protocol minus validation_cells
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            if name == "validation_cells":
                raise AttributeError(name)
            return getattr(self._inner, name)

    vae = pv.VeloVAE(adata, model="basic", hidden=(8,), seed=0)
    seen = []
    original = train_module.loss_total
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "loss_total",
                      lambda m, g, data, idx: seen.append((data, idx)) or original(m, g, data, idx))
        history = train_module.fit(vae.model, vae.guide, Plain(vae.data), max_epochs=2,
                                   progress_bar=False)
    assert len(history.validation) == 2 and np.isfinite(history.validation).all()
    assert all(isinstance(data, Plain) for data, _ in seen)
    torch.testing.assert_close(seen[0][1], vae.data.indices("validation"))


def test_reading_a_file_shows_progress_unless_asked_not_to(h5ad, capsys):
    pv.VeloVAE(h5ad, hidden=(8,))
    assert "Reading layers: 100%" in capsys.readouterr().err
    pv.VeloVAE(h5ad, hidden=(8,), progress_bar=False)
    assert "Reading layers" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def streamed(h5ad):
    vae = pv.VeloVAE(str(h5ad), model="full", seed=0)
    vae.train(max_epochs=40, refine_epochs=5, progress_bar=False)
    return vae


def test_model_trained_from_a_file_recovers_time(streamed, adata):
    assert isinstance(streamed.data, DiskVelocityData)
    rho = spearmanr(streamed.get_latent_time(), adata.obs["true_t"])[0]
    assert rho > 0.9
    assert streamed.model.has_initial_conditions or streamed.config["refined"] is False
    metrics = streamed.evaluate()
    assert np.isfinite(metrics.to_numpy()).all()


def test_export_to_h5ad_writes_what_export_to_anndata_writes(streamed, adata, h5ad, tmp_path):
    path = tmp_path / "export.h5ad"
    path.write_bytes(h5ad.read_bytes())
    streamed.export_to_h5ad(path, batch_size=128, progress_bar=False)
    written = anndata.read_h5ad(path)
    expected = adata.copy()
    streamed.export_to_anndata(expected)
    for name in ("velocity", "velocity_u", "pyro_velo_u", "pyro_velo_s", "pyro_velo_rho"):
        np.testing.assert_allclose(written.layers[name], expected.layers[name], rtol=1e-5,
                                   atol=1e-6)
    for column in ("latent_time", "pyro_velo_time", "pyro_velo_time_std",
                   "pyro_velo_time_resolution"):  # the file's kNN graph read for the last
        np.testing.assert_allclose(written.obs[column], expected.obs[column], rtol=1e-6)
    assert (written.obs["pyro_velo_split"].astype(str)
            == expected.obs["pyro_velo_split"].astype(str)).all()
    np.testing.assert_allclose(written.obsm["pyro_velo_cell_state"],
                               expected.obsm["pyro_velo_cell_state"], rtol=1e-6)
    np.testing.assert_array_equal(written.var["velocity_genes"], expected.var["velocity_genes"])
    np.testing.assert_allclose(written.var["velocity_score"], expected.var["velocity_score"],
                               rtol=1e-5, atol=1e-6)
    assert written.uns["velocity_params"]["mode"] == "pyro_velo"
    np.testing.assert_array_equal(written.layers["Mu"], adata.layers["Mu"])  # untouched
    # the model still reads its own file afterwards
    assert np.isfinite(streamed.get_latent_time()).all()


def test_failed_export_leaves_the_file_as_it_was(streamed, h5ad, tmp_path, monkeypatch):
    path = tmp_path / "failing.h5ad"
    path.write_bytes(h5ad.read_bytes())
    before = path.read_bytes()
    calls = []
    original = pv.predict.Predictor.expected

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pv.predict.Predictor, "expected", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        streamed.export_to_h5ad(path, batch_size=100, progress_bar=False)
    with h5py.File(path) as file:
        assert sorted(file["layers"]) == sorted(h5py.File(h5ad)["layers"])
    assert "velocity" not in anndata.read_h5ad(path).layers
    assert len(before) > 0


def test_export_to_h5ad_rejects_other_cells(streamed, adata, tmp_path):
    other = adata[:100].copy()
    other.write_h5ad(tmp_path / "other.h5ad")
    with pytest.raises(InputError, match="cells"):
        streamed.export_to_h5ad(tmp_path / "other.h5ad", progress_bar=False)


def test_streamed_model_saves_and_loads_with_the_path(streamed, h5ad, tmp_path):
    streamed.save(tmp_path / "model")
    loaded = pv.VeloVAE.load(tmp_path / "model", h5ad)
    np.testing.assert_array_equal(loaded.get_latent_time(), streamed.get_latent_time())
    np.testing.assert_array_equal(loaded.get_velocity()[0], streamed.get_velocity()[0])


def test_uncertainty_streams_too(streamed):
    frame = streamed.get_uncertainty(n_samples=5, batch_size=100)
    assert len(frame) == 700 and np.isfinite(frame["time_cv"]).all()
