"""Data-parallel training on several processes (GPUs or nodes) with PyTorch DDP.

Training is data-parallel through :class:`torch.nn.parallel.DistributedDataParallel`
whenever a default process group is initialised: :func:`pyro_velo.inference.fit`, and with
it every stage of :meth:`pyro_velo.VeloVAE.train` (warm-up, basic, full, refine), then
runs on every process ("rank") of the group. There is no other code path: the user's
script is the single-process script plus a few lines. Every rank must make the same
training calls with the same data and arguments; to train in one process of an
initialised group, call :func:`pyro_velo.inference.fit` with ``distributed=False``.

Launch a script on 2 GPUs of one machine (or ``--nnodes``/``--rdzv-endpoint`` for
several machines) with ``torchrun``::

    torchrun --nproc_per_node=2 fit_script.py

where ``fit_script.py`` initialises the process group, picks its device, and otherwise
does what a single-process script does::

    import os
    import torch
    import torch.distributed as dist
    import pyro_velo as pv

    dist.init_process_group("nccl")           # "gloo" for CPU processes
    rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)          # CPU: leave out
    adata = ...                                # every rank loads the same data
    pv.pp.preprocess(adata)
    vae = pv.VeloVAE(adata, seed=0)            # same arguments (and seed) on every rank
    vae.train(seed=0, device=f"cuda:{local_rank}")  # CPU: device="cpu"
    if rank == 0:                              # every rank holds the same fitted model
        vae.export_to_anndata(adata)
        adata.write_h5ad("fitted.h5ad")
    dist.destroy_process_group()

What happens on the ranks:

- Every rank draws the same minibatch order (the seed of the order is broadcast from
  rank 0). Each minibatch of ``batch_size`` cells is split into ``world_size`` nearly
  equal parts and each rank computes the ELBO of its part, scaled to the whole train
  set (the cell plate keeps ``n_obs`` = all train cells); DDP averages the gradients, so
  one optimiser step sees the gradient of the whole minibatch, as in a single process.
  ``batch_size`` is the *global* minibatch: raise it with the number of GPUs to keep each
  GPU busy. Every rank takes the same number of steps (a minibatch that would leave a
  rank with fewer than two cells is skipped by all).
- Each rank reads the whole minibatch from its data object and keeps its part: with
  in-memory data this is a cheap gather; streamed data (``DiskVelocityData``) is read by
  every rank.
- Latent samples are drawn from a per-rank random stream (derived each epoch from the
  common one), so ranks do not share noise; the common stream, which the rest of
  training uses, stays the same on all ranks.
- Batch-normalisation statistics are accumulated per rank and averaged across ranks at
  the end of every epoch; other buffers (e.g. per-cell initial conditions) are not sent
  per step (they are broadcast from rank 0 when DDP wraps the model at each stage).
- The ancestral model's table of ancestors (``rate_history='ancestors'``) is updated on
  every rank with the whole minibatch's cells (gathered from the ranks in rank order),
  so the tables stay the same on all ranks.
- The epoch's train loss and the validation loss (each rank evaluates a share of the
  validation cells) are summed across ranks, so early stopping decides the same on all
  ranks, and parameters stay identical on all ranks.
- Checkpoints are written by rank 0 only (``checkpoint_dir`` must be on a file system
  every rank can read to resume); progress bars show on rank 0 only.
- Divergence on CPU: a non-finite loss or gradient raises
  :class:`~pyro_velo.inference.DivergenceError` at its step; gradients are averaged across
  ranks, so all ranks raise together. Should only one rank's loss be non-finite while
  the averaged gradients are finite, that rank raises alone and the launcher
  (``torchrun``, ``torch.multiprocessing.spawn``) ends the others.
- Divergence off the CPU: :func:`pyro_velo.inference.fit` records the finiteness of every
  step on the device and reads it every ``DEFERRED_CHECK_EVERY`` steps and at the end of
  every epoch (a maximum over the ranks, so all raise together); no optimiser step is
  taken from the first non-finite one on (see ``divergence_check_every``).

Measured with 2 CPU processes (gloo) against one process (``tests/test_distributed.py``;
600 simulated cells, basic model, 20 epochs, train seeds 0-7): final validation loss
(negative ELBO per cell) 80.82 +- 0.29 with two processes, 80.65 +- 0.38 with one; every
rank ends with bitwise the same parameters and history. On CPU with small models two
processes are not faster (each step waits for a gradient all-reduce); the gain is on
GPUs, with a ``batch_size`` large enough to keep each one busy.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Group:
    """This process's place in the default process group."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_group(distributed: bool | None = None) -> Group | None:
    """The default process group as a :class:`Group`, or None for single-process training.

    ``distributed``: None uses the group when one is initialised with more than one
    process; True requires one (``RuntimeError`` otherwise); False never uses it.
    """
    if distributed is False:
        return None
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not initialised:
        if distributed:
            raise RuntimeError("distributed=True needs torch.distributed.init_process_group "
                               "to be called first (e.g. in a script run by torchrun)")
        return None
    world_size = torch.distributed.get_world_size()
    if world_size < 2 and not distributed:
        return None
    return Group(torch.distributed.get_rank(), world_size)


def is_main_process(distributed: bool | None = None) -> bool:
    """True except on ranks other than 0 of the group :func:`current_group` would use."""
    group = current_group(distributed)
    return group is None or group.is_main


def shard(n: int, group: Group) -> tuple[int, int]:
    """``(start, stop)`` of this rank's part of ``n`` items (parts differ by at most one)."""
    base, extra = divmod(n, group.world_size)
    start = group.rank * base + min(group.rank, extra)
    return start, start + base + (group.rank < extra)


def smallest_shard(n: int, group: Group) -> int:
    """Size of the smallest rank's part of ``n`` items."""
    return n // group.world_size


def take(obj: Any, n: int, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor in ``obj`` (nested tuples, lists, dicts) whose
    first dimension is ``n`` (the minibatch's cells); everything else unchanged."""
    if isinstance(obj, Tensor):
        return obj[start:stop] if obj.dim() >= 1 and obj.shape[0] == n else obj
    if isinstance(obj, tuple):
        return tuple(take(x, n, start, stop) for x in obj)
    if isinstance(obj, list):
        return [take(x, n, start, stop) for x in obj]
    if isinstance(obj, dict):
        return {k: take(v, n, start, stop) for k, v in obj.items()}
    return obj


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in :class:`~torch.nn.parallel.DistributedDataParallel`.

    Buffers are not broadcast at every forward (per-cell buffers would make that cost
    grow with the data; see :func:`average_norm_statistics`); ``static_graph`` lets
    parameters unused in a stage (the graph is the same at every step) be handled
    without searching the graph at every step.
    """
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    options: dict[str, Any] = {"static_graph": True}
    if "forward_sync_buffers" in params:  # torch >= 2.13
        options["forward_sync_buffers"] = False
    else:  # older torch: broadcast_buffers=False also leaves buffers out of the init sync
        broadcast_buffers(module)
        options["broadcast_buffers"] = False
    if device.type == "cuda":
        options["device_ids"] = [device]
    return torch.nn.parallel.DistributedDataParallel(module, **options)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers."""
    for buffer in module.buffers():
        torch.distributed.broadcast(buffer, src=0)


def average_norm_statistics(module: torch.nn.Module, group: Group) -> None:
    """Average the running statistics of normalisation layers across ranks.

    Each rank updates them from its own part of every minibatch; the average is what one
    process seeing every part would estimate (and makes them identical on all ranks).
    """
    stats = [buffer for sub in module.modules()
             if isinstance(sub, torch.nn.modules.batchnorm._NormBase)
             and sub.track_running_stats
             for buffer in (sub.running_mean, sub.running_var) if buffer is not None]
    if not stats:
        return
    flat = torch.cat([s.reshape(-1) for s in stats])
    torch.distributed.all_reduce(flat)
    flat /= group.world_size
    offset = 0
    for s in stats:
        s.copy_(flat[offset:offset + s.numel()].view_as(s))
        offset += s.numel()


#: the group of the :func:`pyro_velo.inference.fit` steps running now (see training_group)
_TRAINING_GROUP: Group | None = None


@contextmanager
def training_group(group: Group | None) -> Iterator[None]:
    """Within the block :func:`active_training_group` returns ``group``: set by
    :func:`pyro_velo.inference.fit` around its training steps, for model code that must
    combine something across the ranks (the ancestors' table)."""
    global _TRAINING_GROUP
    previous, _TRAINING_GROUP = _TRAINING_GROUP, group
    try:
        yield
    finally:
        _TRAINING_GROUP = previous


def active_training_group() -> Group | None:
    """The group of the training steps running now; None outside them or in one process."""
    return _TRAINING_GROUP


def all_gather_rows(group: Group, *xs: Tensor) -> tuple[Tensor, ...]:
    """Every rank's rows of each of ``xs``, concatenated in rank order: the whole minibatch
    again when each rank holds its :func:`shard`.

    The ``xs`` (one dtype; the same number of rows on a rank, any trailing shapes) travel
    side by side in one padded message, so a call costs two collectives whatever their
    number: one for the ranks' row counts, one for the rows.
    """
    n = xs[0].shape[0]
    columns = torch.cat([x.reshape(n, math.prod(x.shape[1:])) for x in xs], dim=1)
    rows = torch.tensor([n], device=columns.device)
    sizes = [torch.zeros_like(rows) for _ in range(group.world_size)]
    torch.distributed.all_gather(sizes, rows)
    counts = [int(size.item()) for size in sizes]
    padded = columns.new_zeros((max(counts), columns.shape[1]))
    padded[:n] = columns
    parts = [torch.empty_like(padded) for _ in range(group.world_size)]
    torch.distributed.all_gather(parts, padded)
    gathered = torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])
    widths = [math.prod(x.shape[1:]) for x in xs]
    return tuple(block.reshape(-1, *x.shape[1:])
                 for block, x in zip(gathered.split(widths, dim=1), xs, strict=True))


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum of ``values`` over the ranks (in place, returned)."""
    torch.distributed.all_reduce(values)
    return values


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank."""
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.broadcast(tensor, src=0)
    return int(tensor.item())


@contextmanager
def rank_random_stream(group: Group, device: torch.device) -> Iterator[None]:
    """A random stream of this rank's own inside; the common stream outside.

    One number is drawn from the common (torch) stream, the same on every rank when the
    ranks' streams agree; inside, torch is seeded from it and the rank. On leaving, the
    common stream continues after that one draw.
    """
    seed = int(torch.randint(0, 2**62, (1,)).item())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed((seed + 7919 * group.rank) % 2**63)
        yield
