"""What a fitted VeloVAE writes into an AnnData or, chunk by chunk, into an .h5ad file.

:meth:`~pyro_velo.VeloVAE.export_to_anndata` and :meth:`~pyro_velo.VeloVAE.export_to_h5ad`
write the same keys (:func:`annotations` for ``obs``/``obsm``/``var``/``uns``, and the
per-cell x gene layers of :data:`LAYERS`); the file export computes and writes the layers
one block of cells at a time, so it works for data that does not fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from . import tl, velocity_genes
from ._checks import InputError
from ._settings import settings
from .predict import Predictor

PREFIX = "pyro_velo_"
#: layer name -> quantity of the model's expectation (:meth:`Predictor.expected`)
LAYERS = {"velocity": "ds", "velocity_u": "du", PREFIX + "u": "u", PREFIX + "s": "s"}
#: rho is exported as a dense layer only below this many bytes (float32), unless asked
MAX_DENSE_RHO_BYTES = 2 * 1024**3


class Fitted(Protocol):
    """What the export reads of a fitted model (:class:`~pyro_velo.VeloVAE` has it all)."""

    config: dict[str, Any]
    obs_names: np.ndarray
    var_names: np.ndarray
    #: per-cell posterior uncertainty, once computed (else None)
    uncertainty: pd.DataFrame | None

    @property
    def predictor(self) -> Predictor: ...

    def get_split(self) -> pd.Series: ...

    def get_rates(self) -> pd.DataFrame: ...


@dataclass
class Annotations:
    """Per-cell, per-gene and unstructured keys of an export (everything but layers)."""

    obs: dict[str, np.ndarray] = field(default_factory=dict)
    obsm: dict[str, np.ndarray] = field(default_factory=dict)
    var: dict[str, np.ndarray] = field(default_factory=dict)
    uns: dict[str, dict] = field(default_factory=dict)


def annotations(vae: Fitted, latent: dict[str, torch.Tensor], graph: Any = None
                ) -> Annotations:
    """The ``obs``, ``obsm``, ``var`` and ``uns`` entries of a fitted model.

    ``latent``: :meth:`Predictor.encode` of all fitted cells; ``graph``: their kNN graph
    (:func:`neighbour_graph`), from which ``obs['pyro_velo_time_resolution']`` is
    computed (left out without one).
    """
    from . import __version__

    t_loc = latent["t"].cpu().numpy().astype(np.float64)
    out = Annotations()
    out.obs["latent_time"] = (t_loc - t_loc.min()) / max(t_loc.max() - t_loc.min(), 1e-12)
    out.obs[PREFIX + "time"] = t_loc
    out.obs[PREFIX + "time_std"] = latent["t_std"].cpu().numpy().astype(np.float64)
    if graph is not None:
        out.obs[PREFIX + "time_resolution"] = tl.neighbourhood_spread(graph, t_loc)
    out.obs[PREFIX + "split"] = vae.get_split().values
    if vae.uncertainty is not None:
        for name in ("time_cv", "state_cv", "rho_cv", "velocity_cv"):
            if name in vae.uncertainty:
                out.obs[PREFIX + name] = vae.uncertainty[name].to_numpy()
    if vae.config["model"] == "full":
        out.obsm[PREFIX + "cell_state"] = latent["c"].cpu().numpy()
    rates = vae.get_rates()
    # the genes with a velocity: every gene the model fitted
    out.var["velocity_genes"] = rates["fitted"].to_numpy().copy()
    for name in rates.columns.drop("fitted"):
        out.var[PREFIX + name] = rates[name].to_numpy()
    out.uns["velocity_params"] = {
        "mode": "pyro_velo",
        "model": vae.config["model"],
        "t_max": vae.config["t_max"],
        "version": __version__,
        "unspliced_layer": vae.config["unspliced_layer"],
        "spliced_layer": vae.config["spliced_layer"],
        "direction": vae.direction(),
    }
    return out


def export_rho(vae: Fitted, rho: bool | None) -> bool:
    """Whether rho is exported: full model only; ``None``: when under 2 GiB dense."""
    if vae.config["model"] != "full":
        if rho:
            raise InputError("rho=True needs the full model (model='full')")
        return False
    if rho is None:
        return len(vae.obs_names) * len(vae.var_names) * 4 <= MAX_DENSE_RHO_BYTES
    return bool(rho)


def check_same_cells(vae: Fitted, obs_names, var_names, what: str) -> None:
    """Raise InputError unless ``what`` has the model's cells and genes, in order."""
    if len(obs_names) != len(vae.obs_names) or not np.array_equal(
            np.asarray(obs_names).astype(str), vae.obs_names.astype(str)):
        raise InputError(f"{what}'s cells (obs_names) differ from the data the model was fit on")
    if not np.array_equal(np.asarray(var_names).astype(str), vae.var_names.astype(str)):
        raise InputError(f"{what}'s genes (var_names) differ from the data the model was fit on")


def neighbour_graph(obsp: Any) -> Any:
    """The kNN graph of an AnnData's (or an open file's) ``obsp`` that the time
    resolution is computed on (:func:`pyro_velo.tl.metrics.default_graph_key`), or None."""
    key = tl.metrics.default_graph_key(obsp)
    return None if key is None else obsp[key]


def write_h5ad(vae: Fitted, path: str | Path, rho: bool | None = None,
               batch_size: int = 4096, progress_bar: bool = True) -> None:
    """Write the export of ``vae`` into the existing ``.h5ad`` file ``path``, in chunks.

    The layers are written to temporary datasets one block of ``batch_size`` cells at a
    time and moved to their names only when all are complete; ``obs``, ``obsm``, ``var``
    and ``uns`` are then rewritten with the new keys. If anything fails before the move,
    the temporary datasets are deleted and the file keeps its previous content.
    """
    from anndata.io import read_elem, write_elem
    from tqdm.auto import tqdm

    from .disk import open_h5ad

    path = Path(path)
    with open_h5ad(path) as file:
        obs, var = read_elem(file["obs"]), read_elem(file["var"])
        check_same_cells(vae, obs.index, var.index, str(path))
        graph = neighbour_graph(file.get("obsp"))
        graph = None if graph is None else read_elem(graph)
    predictor = vae.predictor
    latent = predictor.encode()
    notes = annotations(vae, latent, graph)
    layers = dict(LAYERS)
    if export_rho(vae, rho):
        layers[PREFIX + "rho"] = "rho"
    close = getattr(predictor.data, "close", None)
    if close is not None:  # the model may stream from this very file: reopen it to write
        close()
    n_cells, n_vars = len(vae.obs_names), len(vae.var_names)
    with open_h5ad(path, "r+") as file:
        group = file.require_group("layers")
        temporary = {name: f"__{PREFIX}tmp_{name}" for name in layers}
        try:
            for tmp in temporary.values():
                if tmp in group:
                    del group[tmp]
                group.create_dataset(tmp, shape=(n_cells, n_vars), dtype="float32",
                                     chunks=(min(n_cells, 256), n_vars))
            blocks = predictor.expected_blocks(chunk=batch_size, encoded=latent)
            for rows, expected, encoded in tqdm(blocks, desc="Writing layers",
                                                total=-(-n_cells // batch_size),
                                                disable=not progress_bar
                                                or settings.verbosity == 0):
                if "rho" in layers.values():
                    expected["rho"] = predictor.model.transcription_rate(encoded["c"])
                for name, key in layers.items():
                    group[temporary[name]][rows] = predictor.full_width(
                        expected[key].detach().cpu().numpy())
            # velocity genes, as in write_anndata, from the file's layers block by block
            notes.var.update(velocity_genes.h5ad_gene_columns(
                file, vae.config["unspliced_layer"], temporary[PREFIX + "u"],
                temporary[PREFIX + "s"], notes.obs[PREFIX + "split"]))
        except BaseException:
            for tmp in temporary.values():
                if tmp in group:
                    del group[tmp]
            raise
        for name, tmp in temporary.items():
            if name in group:
                del group[name]
            group.move(tmp, name)
            group[name].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        for column, value in notes.obs.items():
            obs[column] = value
        for column, value in notes.var.items():
            var[column] = value
        write_elem(file, "obs", obs)
        write_elem(file, "var", var)
        obsm = file.require_group("obsm")
        _encode_group(obsm, "dict")
        for key, value in notes.obsm.items():
            write_elem(obsm, key, value)
        uns = file.require_group("uns")
        _encode_group(uns, "dict")
        for key, value in notes.uns.items():
            write_elem(uns, key, value)


def _encode_group(group, encoding: str) -> None:
    if "encoding-type" not in group.attrs:
        group.attrs.update({"encoding-type": encoding, "encoding-version": "0.1.0"})


def write_anndata(vae: Fitted, adata, rho: bool | None = None) -> None:
    """Write the export of ``vae`` into the in-memory ``adata`` (nothing on error).

    The scVelo / CellRank contract: ``obs['latent_time']`` (posterior mean time rescaled
    to [0, 1]), ``layers['velocity']`` (ds/dt on the ``Ms`` scale, NaN columns for genes
    not fitted), ``layers['velocity_u']`` (du/dt on the ``Mu`` scale),
    ``var['velocity_genes']`` and ``uns['velocity_params']`` (``mode='pyro_velo'``). Our
    own keys: ``obs['pyro_velo_time']`` (raw posterior mean), ``obs['pyro_velo_time_std']``,
    ``obs['pyro_velo_time_resolution']`` (where ``adata`` has a kNN graph:
    :func:`pyro_velo.tl.time_resolution`), ``obs['pyro_velo_split']``,
    ``layers['pyro_velo_u']`` / ``layers['pyro_velo_s']`` (fitted abundances) and
    ``var['pyro_velo_<rate>']`` for each column of :meth:`~pyro_velo.VeloVAE.get_rates`;
    after :meth:`~pyro_velo.VeloVAE.get_uncertainty` also ``obs['pyro_velo_time_cv']``,
    ``obs['pyro_velo_state_cv']``, ``obs['pyro_velo_rho_cv']``,
    ``obs['pyro_velo_velocity_cv']``. Full model also: ``obsm['pyro_velo_cell_state']``
    (posterior mean c) and ``layers['pyro_velo_rho']`` (rho; with ``rho=None`` only when
    the dense float32 array is under 2 GiB, :data:`MAX_DENSE_RHO_BYTES`; ``rho=False``
    never).
    """
    check_same_cells(vae, adata.obs_names, adata.var_names, "adata")
    predictor = vae.predictor
    latent = predictor.encode()
    notes = annotations(vae, latent, neighbour_graph(adata.obsp))
    layers = dict(zip(LAYERS, predictor.expected_arrays(tuple(LAYERS.values()),
                                                        encoded=latent), strict=True))
    if export_rho(vae, rho):
        layers[PREFIX + "rho"] = predictor.transcription_rate(latent["c"])
    # velocity genes: the fitted genes whose dynamics predict held-out cells
    notes.var.update(velocity_genes.gene_columns(
        adata.layers[vae.config["unspliced_layer"]], layers[PREFIX + "u"],
        layers[PREFIX + "s"], notes.obs[PREFIX + "split"]))
    # everything is computed: now write
    for column, value in notes.obs.items():
        adata.obs[column] = value
    for name, value in layers.items():
        adata.layers[name] = value
    for key, value in notes.obsm.items():
        adata.obsm[key] = value
    for column, value in notes.var.items():
        adata.var[column] = value
    adata.uns.update(notes.uns)
