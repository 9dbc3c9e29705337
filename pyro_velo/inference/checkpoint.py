"""Checkpoints of a training run: what is written, how it is validated, how a run resumes.

:class:`Checkpointer` wraps the stages of a schedule (see
:func:`~pyro_velo.inference.stages.run_stages`): it skips the stages a resumed run has
finished, hands the stage in progress its saved loop state, and writes a checkpoint every
few epochs inside a stage (through a :class:`~pyro_velo.inference.callbacks.CheckpointHook`)
and at the end of every stage. The stages themselves know nothing of it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyro.util
import torch

from .. import distributed as dist_
from .._checks import InputError, MissingFileError, check_int
from .history import TRAINING_RECORDS, TrainingHistory


def get_rng_state() -> dict[str, Any]:
    """torch, numpy and Python random states, storable with ``torch.load(weights_only=True)``."""
    state = pyro.util.get_rng_state()
    kind, keys, pos, has_gauss, cached = state["numpy"]
    return {"torch": state["torch"], "random": state["random"],
            "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                      int(has_gauss), float(cached))}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states returned by :func:`get_rng_state`."""
    kind, keys, pos, has_gauss, cached = state["numpy"]
    pyro.util.set_rng_state({
        "torch": state["torch"], "random": state["random"],
        "numpy": (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)})


def write_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (a partly written file is never left)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`write_checkpoint`.

    Raises
    ------
    MissingFileError
        No file at ``path``.
    InputError
        The file cannot be read as a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"no checkpoint to resume from: {path} does not exist. Train once with "
            f"checkpoint_dir={str(path.parent)!r} first, or pass resume=False.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of many types for a damaged file
        raise InputError(f"cannot read the checkpoint {path} (damaged or not a "
                         f"checkpoint): {err}") from err
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise InputError(f"{path} is not a pyro_velo training checkpoint")
    return payload


#: Version of the checkpoint layout written by :class:`Checkpointer`.
CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"


class Checkpointer:
    """Checkpoints of a multi-stage training run (used by :meth:`pyro_velo.VeloVAE.train`).

    A checkpoint (``folder/checkpoint.pt``, rewritten atomically) holds the parameters and
    buffers of every registered module, the training history, the model configuration,
    the random states, the run's arguments and the position: the stage in progress and,
    inside a stage, the state of the SVI loop (see
    :func:`~pyro_velo.inference.loop.fit`'s ``resume_state``). Checkpoints are
    written every ``every`` epochs inside a stage and at the end of each stage; in
    distributed training by rank 0 only.

    With ``folder=None`` it does nothing: every stage is to do, nothing is written.

    Parameters
    ----------
    folder
        Where the checkpoint lives (created if missing), or ``None``.
    every
        Epochs between checkpoints inside a stage.
    header
        What must match for a resume: ``config`` (model configuration), ``split``
        (int8 tensor), ``fitted`` (bool tensor).
    run
        The run's arguments that determine its course (epochs, batch size, learning
        rates, seed...): a resume must pass the same.
    distributed
        As for :func:`~pyro_velo.inference.loop.fit`: whether the run is data-parallel
        over the process group (then only rank 0 writes); ``False`` makes every process
        write its own.
    """

    def __init__(
        self,
        folder: str | Path | None,
        every: int,
        header: dict[str, Any],
        run: dict[str, Any],
        distributed: bool | None = None,
    ) -> None:
        self.folder = None if folder is None else Path(folder)
        self.every = check_int(every, "checkpoint_every", minimum=1)
        self.header = header
        self.run = run
        self.distributed = distributed
        self.modules: dict[str, torch.nn.Module] = {}
        self.saved: dict[str, Any] | None = None

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / CHECKPOINT_FILE

    def start(self, resume: bool) -> None:
        """Check the folder; with ``resume`` read and validate its checkpoint.

        Raises
        ------
        InputError
            ``resume`` without a folder; a checkpoint exists but ``resume`` is False; the
            checkpoint belongs to another model, data split or set of run arguments.
        MissingFileError
            ``resume`` but no checkpoint in the folder.
        """
        if self.folder is None:
            if resume:
                raise InputError("resume=True needs checkpoint_dir: the folder that holds "
                                 "the checkpoint of the interrupted run")
            return
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"checkpoint_dir {self.folder} exists and is not a folder")
        if not resume:
            if self.path.exists():
                raise InputError(
                    f"{self.path} already exists: pass resume=True to continue that run, "
                    "or remove it (or choose another checkpoint_dir) to start afresh")
            self.folder.mkdir(parents=True, exist_ok=True)
            return
        saved = read_checkpoint(self.path)
        if saved["format_version"] != CHECKPOINT_FORMAT_VERSION:
            raise InputError(
                f"{self.path} has checkpoint format {saved['format_version']}, this "
                f"pyro_velo reads format {CHECKPOINT_FORMAT_VERSION}: it cannot be resumed")

        def strip(config: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in config.items() if k not in TRAINING_RECORDS}

        if strip(saved["header"]["config"]) != strip(self.header["config"]):
            diff = sorted(k for k in set(strip(saved["header"]["config"]))
                          | set(strip(self.header["config"]))
                          if saved["header"]["config"].get(k) != self.header["config"].get(k))
            raise InputError(f"the checkpoint in {self.folder} belongs to a model with another "
                             f"configuration (differs in: {', '.join(diff)})")
        for key in ("split", "fitted"):
            if not torch.equal(saved["header"][key], self.header[key]):
                raise InputError(
                    f"the checkpoint in {self.folder} was written for other data: its cells' "
                    f"{'train/validation/test split' if key == 'split' else 'fitted genes'} "
                    "differ from this model's")
        if saved["run"] != self.run:
            diff = sorted(k for k in set(saved["run"]) | set(self.run)
                          if saved["run"].get(k) != self.run.get(k))
            listing = ", ".join(f"{k}={saved['run'].get(k)!r}" for k in diff)
            raise InputError(f"resume=True must repeat the interrupted call's arguments; the "
                             f"checkpoint in {self.folder} was written with {listing}")
        self.saved = saved

    def restore(self, modules: dict[str, torch.nn.Module], config: dict[str, Any],
                history: TrainingHistory) -> None:
        """Register ``modules``; when resuming, load their state, ``config`` and ``history``.

        At a stage boundary the random states are restored too (inside a stage the
        loop restores them with the rest of its state).
        """
        self.modules = modules
        if self.saved is None:
            return
        for name, module in modules.items():
            module.load_state_dict(self.saved["modules"][name])
        config.clear()
        config.update(self.saved["header"]["config"])
        saved_history = self.saved["history"]
        history.train[:] = saved_history["train"]
        history.validation[:] = saved_history["validation"]
        history.stages[:] = [tuple(s) for s in saved_history["stages"]]
        history.best_epoch = saved_history["best_epoch"]
        history.stopped_early = saved_history["stopped_early"]
        if self.saved["fit"] is None:
            set_rng_state(self.saved["rng"])

    def todo(self, stage: str, order: list[str]) -> bool:
        """Whether ``stage`` still has to run (all do unless resuming).

        ``order``: the checkpoint names of the schedule's stages, in the order they run.
        """
        if self.saved is None:
            return True
        position = order.index(self.saved["stage"])
        return order.index(stage) > position or (
            order.index(stage) == position and not self.saved["done"])

    def resuming(self, stage: str) -> bool:
        """Whether the run resumes inside ``stage`` (its stage marker is in the history)."""
        return (self.saved is not None and self.saved["stage"] == stage
                and not self.saved["done"])

    @property
    def finished(self) -> bool:
        """Whether the resumed checkpoint was written at the end of training."""
        return self.saved is not None and self.saved.get("finished", False)

    def fit_options(self, stage: str, history: TrainingHistory,
                    config: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of :func:`~pyro_velo.inference.loop.fit` in ``stage``: the
        checkpoint hook and, when resuming inside it, the saved loop state."""
        if self.folder is None:
            return {}
        resume_state = self.saved["fit"] if self.resuming(stage) else None

        def hook(state: dict[str, Any]) -> None:
            self._write(stage, False, state, history, config)

        return {"checkpoint": hook, "checkpoint_every": self.every,
                "resume_state": resume_state}

    def stage_done(self, stage: str, history: TrainingHistory, config: dict[str, Any],
                   finished: bool = False) -> None:
        """Write a checkpoint at the end of ``stage`` (``finished``: training is over)."""
        if self.folder is not None:
            self._write(stage, True, None, history, config, finished)

    def _write(self, stage: str, done: bool, state: dict[str, Any] | None,
               history: TrainingHistory, config: dict[str, Any],
               finished: bool = False) -> None:
        if not dist_.is_main_process(self.distributed):  # distributed: rank 0 writes
            return
        from .. import __version__

        payload = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "package_version": __version__,
            "header": {**self.header, "config": copy.deepcopy(config)},
            "run": self.run,
            "stage": stage,
            "done": done,
            "finished": finished,
            "fit": state,
            "rng": get_rng_state(),
            "modules": {name: {k: v.detach().cpu() for k, v in m.state_dict().items()}
                        for name, m in self.modules.items()},
            "history": {"train": list(history.train), "validation": list(history.validation),
                        "stages": [tuple(s) for s in history.stages],
                        "best_epoch": history.best_epoch,
                        "stopped_early": history.stopped_early},
        }
        write_checkpoint(self.path, payload)
