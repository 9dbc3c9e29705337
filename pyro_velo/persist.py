"""Saving a fitted VeloVAE to a folder and loading it back, bitwise.

A saved model is two files: ``model.pt`` (parameters, buffers, split, names, per-gene
scales, history; readable with ``torch.load(weights_only=True)``) and ``config.json``
(the constructor's arguments, training records, package and format versions).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anndata import AnnData

from . import __version__
from ._checks import InputError, MissingFileError
from .components import COMPONENTS, CUSTOM
from .data import VelocityData
from .disk import DiskVelocityData, read_annotations
from .inference.history import TRAINING_RECORDS, TrainingHistory

#: Version of the layout :func:`save` writes (``config.json['format_version']``);
#: :func:`load` reads this version only.
FORMAT_VERSION = 2
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"


def save(vae, path: str | Path, overwrite: bool = False) -> None:
    """Write ``vae`` to the folder ``path`` (created if missing), so that :func:`load`
    predicts identically (:meth:`pyro_velo.VeloVAE.save`).

    Two files are written:

    - ``model.pt`` (``torch.save``; readable with ``weights_only=True``): parameters and
      buffers of the model and the guide (encoder, for the full model also the decoder,
      per-gene rates, switch times, scaling, noise and, after refinement, every cell's
      initial condition), the train/validation/test split, cell and gene names, the
      fitted-gene mask, the per-gene scales the data were divided by, the training
      history and whether the model is trained;
    - ``config.json``: the constructor arguments (and the
      :data:`~pyro_velo.inference.history.TRAINING_RECORDS`), the
      package version and ``format_version`` (:data:`FORMAT_VERSION`).

    The data themselves are not saved. Parameters are saved on the CPU. ``overwrite``
    replaces the files of a folder that is not empty; otherwise such a folder raises
    :class:`FileExistsError`, and a ``path`` that is not a folder
    :class:`~pyro_velo._checks.InputError`.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"cannot save to {path}: it exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True")
    path.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": {k: v.detach().cpu() for k, v in vae.model.state_dict().items()},
            "guide": {k: v.detach().cpu() for k, v in vae.guide.state_dict().items()},
            "split": torch.from_numpy(vae.data.split.copy()),
            "fitted": torch.from_numpy(vae.data.fitted.copy()),
            "gene_scale_u": vae.data.gene_scale_u.detach().cpu(),
            "gene_scale_s": vae.data.gene_scale_s.detach().cpu(),
            "obs_names": [str(n) for n in vae.obs_names],
            "var_names": [str(n) for n in vae.var_names],
            "history": {"train": list(vae.history.train),
                        "validation": list(vae.history.validation),
                        "stages": [tuple(x) for x in vae.history.stages],
                        "best_epoch": vae.history.best_epoch,
                        "stopped_early": vae.history.stopped_early},
            "is_trained": vae.is_trained,
        },
        path / MODEL_FILE,
    )
    config = {**vae.config, "version": __version__, "format_version": FORMAT_VERSION}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def load(cls, path: str | Path, adata, components: dict[str, Any]):
    """A ``cls`` (VeloVAE) read from the folder ``path`` for the cells and genes of
    ``adata`` (:meth:`pyro_velo.VeloVAE.load`).

    Components passed as objects when the model was built (``model`` as a class or
    instance, ``likelihood``, ``guide``, ``time_prior``, ``state_prior``, ``rate_prior``;
    recorded in the configuration as ``'custom:<class>'``) must be in ``components``,
    freshly constructed: their parameters are then restored from the file.

    No training happens: the saved parameters, initial conditions, split and per-gene
    scales are restored, so that every ``get_*`` method returns what it returned before
    saving (bitwise, on the same machine). ``adata`` (an AnnData, or the path of an
    ``.h5ad`` file to stream from; not modified) must have the same cells and genes, in
    the same order, as the data the model was fitted on, with the same abundance layers.
    If its abundances differ from the fitted data's (their per-gene scales differ), a
    warning is given and the stored scales are used. The model is loaded on the CPU.

    Raises
    ------
    MissingFileError
        ``path`` is not a folder or lacks ``config.json`` / ``model.pt`` (also a
        :class:`FileNotFoundError`).
    InputError
        A file is damaged, the format version differs from :data:`FORMAT_VERSION`, or
        ``adata``'s cells, genes or fitted genes differ from the saved ones.
    """
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"no saved VeloVAE at {path}: the folder does not exist")
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (path / name).is_file():
            raise MissingFileError(f"no saved VeloVAE in {path}: {name} is missing")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path / CONFIG_FILE} is damaged (not valid JSON): {err}"
                         ) from err
    if not isinstance(config, dict):
        raise InputError(f"{path / CONFIG_FILE} is damaged: expected a JSON object")
    version = config.pop("format_version", None)
    if version != FORMAT_VERSION:
        found = ("has no format version (saved by an older pyro_velo)" if version is None
                 else f"has format version {version!r}")
        raise InputError(f"the model in {path} {found}; this pyro_velo "
                         f"({__version__}) reads format version {FORMAT_VERSION}. "
                         "Refit the model, or load it with the version that saved it.")
    config.pop("version", None)
    try:
        state = torch.load(path / MODEL_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # zip/pickle errors of many types for a damaged file
        raise InputError(f"{path / MODEL_FILE} is damaged and cannot be read: {err}"
                         ) from err
    required = ("model", "guide", "split", "fitted", "gene_scale_u", "gene_scale_s",
                "obs_names", "var_names", "history", "is_trained")
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise InputError(f"{path / MODEL_FILE} is damaged: it lacks {', '.join(missing)}")
    obs_names, var_names = ((adata.obs_names, adata.var_names)
                            if isinstance(adata, AnnData)
                            else (frame.index for frame in read_annotations(adata)))
    for what, names, saved in (("cells (obs_names)", obs_names, state["obs_names"]),
                               ("genes (var_names)", var_names, state["var_names"])):
        if [str(n) for n in names] != saved:
            raise InputError(
                f"adata's {what} differ from those the model in {path} was saved with "
                f"({len(names)} in adata, {len(saved)} saved; same names in the same "
                "order are needed). For other cells use get_latent_time(adata) etc.")
    accepted = ("model", *COMPONENTS)
    unknown = sorted(set(components) - set(accepted))
    if unknown:
        raise InputError(f"unknown component(s) {unknown}; load accepts {accepted}")
    recorded = {**{name: config.get(name) for name in COMPONENTS},
                "model": config.pop("model_class", None)}
    needed = [name for name in accepted if isinstance(recorded[name], str)
              and recorded[name].startswith(CUSTOM) and name not in components]
    if needed:
        raise InputError(
            f"the model in {path} was built with custom {', '.join(needed)} "
            f"({', '.join(recorded[n] for n in needed)}): pass them again, e.g. "
            f"VeloVAE.load(path, adata, {needed[0]}=...)")
    config.update(components)
    hidden = config.pop("hidden")
    split_fractions = tuple(config.pop("split_fractions"))
    records = {k: config.pop(k) for k in TRAINING_RECORDS if k in config}
    split = state["split"].numpy()
    vae = cls(adata, hidden=tuple(hidden), split_fractions=split_fractions,
              _split=split, **config)
    vae.config.update(records)
    fitted = state["fitted"].numpy()
    if not np.array_equal(vae.data.fitted, fitted):
        raise InputError(
            f"adata's abundances differ from the data the model in {path} was fitted on: "
            f"{int(fitted.sum())} genes were fitted, {int(vae.data.fitted.sum())} genes "
            "of adata vary (different layers or preprocessing?)")
    scales = (state["gene_scale_u"], state["gene_scale_s"])
    if not (torch.equal(vae.data.gene_scale_u, scales[0])
            and torch.equal(vae.data.gene_scale_s, scales[1])):
        warnings.warn(
            "adata's abundances differ from the data the model was fitted on (their "
            "per-gene scales differ); they are divided by the stored scales",
            stacklevel=2)
        if isinstance(vae.data, DiskVelocityData):
            data = DiskVelocityData(adata, *vae.data.layers, fitted, split, *scales)
        else:
            data = VelocityData.for_new_cells(adata, vae.var_names, fitted, *scales,
                                              config["unspliced_layer"],
                                              config["spliced_layer"])
            data.split = split.astype(np.int8)
            data.counts = vae.data.counts  # raw counts of a count likelihood: unscaled
        vae.data = data
    vae.model.load_state_dict(state["model"])
    vae.guide.load_state_dict(state["guide"])
    history = state["history"]
    vae.history = TrainingHistory(
        train=list(history["train"]), validation=list(history["validation"]),
        stages=[tuple(x) for x in history["stages"]], best_epoch=history["best_epoch"],
        stopped_early=history["stopped_early"])
    vae.is_trained = bool(state["is_trained"])
    vae.model.eval()
    vae.guide.eval()
    return vae
