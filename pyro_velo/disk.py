"""Abundances read from an ``.h5ad`` file on disk, one block of cells at a time.

Atlases of 10^5 to 10^6 cells do not fit in memory as dense ``Mu`` / ``Ms`` matrices
(10^6 cells x 2000 genes x 2 layers is 16 GB in float32). :class:`DiskVelocityData`
keeps the matrices in the file and reads rows on demand, so memory depends on the block
and minibatch sizes, not on the number of cells. It offers the interface of
:class:`~pyro_velo.data.VelocityData` that training, inference, export and uncertainty
use (``minibatches``, ``rows``, ``indices``, the split and per-gene scales).

Why blocks: a minibatch of random rows touches a random place of the file for every
cell. Reading contiguous blocks of rows and shuffling within a buffer of several random
blocks (block-shuffled minibatches) keeps reads sequential while still mixing cells from
all over the file into every minibatch.

``anndata.read_h5ad(path, backed='r')`` keeps only ``X`` on disk and loads every layer
into memory, so a path is what selects streaming: ``VeloVAE('atlas.h5ad')``
(:func:`read_cells` opens an AnnData in memory or a path this way).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from torch import Tensor

from ._checks import InputError, MissingFileError, check_unique_cell_names, check_unique_names
from ._settings import settings
from .data import VelocityData, random_split, split_indices

#: cells per contiguous block read from the file
BLOCK_CELLS = 256
#: blocks gathered (in random order) into one shuffling buffer while training
BUFFER_BLOCKS = 32
#: memory for the validation cells held during training (see ``validation_cells``)
VALIDATION_BYTES = 256 * 2**20


class H5adLayer:
    """One cell x gene matrix of an ``.h5ad`` file: ``X`` or ``layers/<name>``.

    Dense (HDF5 dataset) and CSR (group with ``data``, ``indices``, ``indptr``) encodings,
    as written by anndata, are read; rows come back as dense float64 arrays.
    """

    def __init__(self, file: h5py.File, key: str, name: str) -> None:
        if key not in file:
            raise InputError(f"{file.filename} has no {name}")
        node = file[key]
        self.name = name
        if isinstance(node, h5py.Dataset):
            if node.ndim != 2:
                raise InputError(f"{name} in {file.filename} is not a matrix")
            self.dense = node
            self.shape = tuple(node.shape)
        else:
            encoding = node.attrs.get("encoding-type", "")
            encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
            if encoding != "csr_matrix":
                raise InputError(
                    f"{name} in {file.filename} is stored as {encoding or 'an unknown type'}; "
                    "streaming reads dense or CSR (cells x genes) matrices: rewrite it as CSR")
            self.dense = None
            self.data, self.indices = node["data"], node["indices"]
            self.indptr = node["indptr"][:]
            self.shape = tuple(int(x) for x in node.attrs["shape"])
        dtype = (self.dense if self.dense is not None else self.data).dtype
        if dtype.kind not in "iufb":
            raise InputError(f"{name} in {file.filename} is not numeric (dtype {dtype})")

    def read(self, start: int, stop: int, dtype: type = np.float64) -> np.ndarray:
        """Rows ``start:stop`` as a dense array of ``dtype``."""
        if self.dense is not None:
            return np.asarray(self.dense[start:stop], dtype=dtype)
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        block = sp.csr_matrix(
            (self.data[lo:hi], self.indices[lo:hi], self.indptr[start:stop + 1] - lo),
            shape=(stop - start, self.shape[1]))
        return block.toarray().astype(dtype, copy=False)


def read_annotations(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``obs`` and ``var`` data frames of an ``.h5ad`` file, without its matrices."""
    from anndata.io import read_elem

    with open_h5ad(path) as file:
        return read_elem(file["obs"]), read_elem(file["var"])


def open_h5ad(path: str | Path, mode: str = "r") -> h5py.File:
    """Open an ``.h5ad`` file with a clear error when it is missing or not HDF5."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no .h5ad file at {path}")
    try:
        return h5py.File(path, mode)
    except OSError as err:
        raise InputError(f"cannot open {path} as an .h5ad (HDF5) file: {err}") from err


class DiskVelocityData:
    """The abundances of an ``.h5ad`` file, scaled per gene, read block by block.

    Same meaning as :class:`~pyro_velo.data.VelocityData` (scaled ``u``, ``s`` of the
    fitted genes, split, per-gene scales); build it with :meth:`from_h5ad`. Rows are
    read from the file whenever they are needed; nothing of size cells x genes is held.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    unspliced_layer, spliced_layer
        Layer names (``'X'`` means the main matrix).
    fitted, split, gene_scale_u, gene_scale_s
        As in :class:`~pyro_velo.data.VelocityData`.
    block_cells, buffer_blocks
        Rows per contiguous read and blocks per shuffling buffer (training reads
        ``block_cells * buffer_blocks`` rows at a time; memory is about that many rows of
        both layers in float64).
    """

    counts = None  # count likelihoods need raw counts in memory: not streamed

    def __init__(self, path: str | Path, unspliced_layer: str, spliced_layer: str,
                 fitted: np.ndarray, split: np.ndarray, gene_scale_u: Tensor,
                 gene_scale_s: Tensor, block_cells: int = BLOCK_CELLS,
                 buffer_blocks: int = BUFFER_BLOCKS) -> None:
        self.path = Path(path)
        self.layers = (unspliced_layer, spliced_layer)
        self.fitted = np.asarray(fitted, dtype=bool)
        self.split = np.asarray(split, dtype=np.int8)
        self.gene_scale_u = gene_scale_u
        self.gene_scale_s = gene_scale_s
        self.block_cells = int(block_cells)
        self.buffer_blocks = int(buffer_blocks)
        self.device = torch.device("cpu")
        self._file: h5py.File | None = None
        self._readers: tuple[H5adLayer, H5adLayer] | None = None
        self._divisors = np.concatenate([gene_scale_u.cpu().numpy(),
                                         gene_scale_s.cpu().numpy()]).astype(np.float32)

    # ---- file access -----------------------------------------------------------------
    def _open(self) -> tuple[H5adLayer, H5adLayer]:
        if self._readers is None:
            self._file = open_h5ad(self.path)
            self._readers = tuple(_layer(self._file, name) for name in self.layers)
        return self._readers

    def close(self) -> None:
        """Close the file (it is reopened when rows are read again)."""
        if self._file is not None:
            self._file.close()
        self._file, self._readers = None, None

    def __getstate__(self) -> dict:  # h5py handles do not pickle (e.g. for spawned workers)
        state = self.__dict__.copy()
        state["_file"], state["_readers"] = None, None
        return state

    @property
    def n_cells(self) -> int:
        return int(len(self.split))

    @property
    def n_genes(self) -> int:
        return int(self.fitted.sum())

    def indices(self, name: str) -> Tensor:
        """Cell indices of one split (``'train'``, ``'validation'``, ``'test'``)."""
        return split_indices(self.split, name)

    def to(self, device: str | torch.device) -> DiskVelocityData:
        """The same data, delivering its minibatches on ``device``."""
        other = DiskVelocityData(self.path, *self.layers, self.fitted, self.split,
                                 self.gene_scale_u.to(device), self.gene_scale_s.to(device),
                                 self.block_cells, self.buffer_blocks)
        other.device = torch.device(device)
        return other

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        """Scaled ``[u | s]`` of the fitted genes for file rows ``start:stop``, float32."""
        # float32 throughout, scaled in place: reading is CPU-bound, and float64
        # copies cost ~15x the time of the read itself
        g = self.n_genes
        both = np.empty((stop - start, 2 * g), dtype=np.float32)
        for reader, columns in zip(self._open(), (slice(0, g), slice(g, 2 * g)), strict=True):
            values = reader.read(start, stop, np.float32)
            both[:, columns] = values if g == values.shape[1] else values[:, self.fitted]
        both /= self._divisors
        return both

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        """Scaled ``[u | s]`` of the sorted, distinct file rows ``rows`` (block reads)."""
        blocks = rows // self.block_cells
        parts = []
        for block in np.unique(blocks):
            start = int(block) * self.block_cells
            stop = min(start + self.block_cells, self.n_cells)
            wanted = rows[blocks == block] - start
            values = self._read_range(start, stop)
            parts.append(values if len(wanted) == stop - start else values[wanted])
        return np.concatenate(parts) if parts else np.zeros((0, 2 * self.n_genes), np.float32)

    def _split_tensor(self, both: np.ndarray) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(both).to(self.device)
        return x[:, :self.n_genes], x[:, self.n_genes:]

    # ---- the VelocityData interface --------------------------------------------------
    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled ``(u, s)`` of the cells ``idx`` (any order, repeats allowed)."""
        idx = np.asarray(idx.cpu(), dtype=np.int64)
        distinct, inverse = np.unique(idx, return_inverse=True)
        both = self._read_sorted(distinct)
        if len(distinct) < len(idx) or not np.array_equal(distinct, idx):
            both = both[inverse]  # sorted, distinct rows (samples, held cells): no copy
        return self._split_tensor(both)

    def model_inputs(self, idx: Tensor, n_obs: int) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of a model / guide call on the cells ``idx``."""
        u, s = self.rows(idx)
        return (u, s, idx.to(self.device), n_obs), {}

    def minibatches(self, idx: Tensor, batch_size: int, n_obs: int | None = None,
                    generator: torch.Generator | None = None
                    ) -> Iterator[tuple[Tensor, tuple, dict]]:
        """``(batch, args, kwargs)`` for minibatches of the cells ``idx``.

        Without ``generator`` the batches follow ``idx`` in order (reads are grouped in
        buffers of ``block_cells * buffer_blocks`` cells). With it, block-shuffled: the
        blocks that hold the cells of ``idx`` are visited in random order,
        ``buffer_blocks`` at a time, and the cells of each buffer are shuffled; a
        remainder smaller than a batch is carried into the next buffer. ``n_obs`` is the
        plate size passed to the model (default: the batch's length).
        """
        idx = idx.cpu()
        if generator is None:
            # whole batches per read (the last may be smaller), about one buffer at a time
            buffer = max(1, self.block_cells * self.buffer_blocks // batch_size) * batch_size
            for chunk in idx.split(buffer):
                u, s = self.rows(chunk)
                for pos in torch.arange(len(chunk)).split(batch_size):
                    batch = chunk[pos].to(self.device)
                    yield batch, (u[pos], s[pos], batch,
                                  len(pos) if n_obs is None else n_obs), {}
            return
        cells = np.sort(np.asarray(idx, dtype=np.int64))
        blocks = cells // self.block_cells
        order = torch.randperm(int(blocks.max()) + 1 if len(blocks) else 0,
                               generator=generator).numpy()
        order = order[np.isin(order, blocks)]
        carry_idx = np.zeros(0, dtype=np.int64)
        carry = np.zeros((0, 2 * self.n_genes), dtype=np.float32)
        for group in np.array_split(order, max(1, -(-len(order) // self.buffer_blocks))):
            group = np.sort(group)  # cells and blocks are sorted: slice each block's cells
            lo, hi = np.searchsorted(blocks, group), np.searchsorted(blocks, group, "right")
            rows = np.concatenate([cells[a:b] for a, b in zip(lo, hi, strict=True)])
            both = np.concatenate([carry, self._read_sorted(rows)])
            rows = np.concatenate([carry_idx, rows])
            shuffle = torch.randperm(len(rows), generator=generator).numpy()
            both, rows = both[shuffle], rows[shuffle]
            n_full = len(rows) // batch_size * batch_size
            for start in range(0, n_full, batch_size):
                yield self._batch(rows[start:start + batch_size],
                                  both[start:start + batch_size], n_obs)
            # copies: a view would keep the whole buffer alive until the next one
            carry_idx, carry = rows[n_full:].copy(), both[n_full:].copy()
        if len(carry_idx):
            yield self._batch(carry_idx, carry, n_obs)

    def _batch(self, rows: np.ndarray, both: np.ndarray, n_obs: int | None
               ) -> tuple[Tensor, tuple, dict]:
        batch = torch.from_numpy(rows).to(self.device)
        u, s = self._split_tensor(np.ascontiguousarray(both))
        return batch, (u, s, batch, len(rows) if n_obs is None else n_obs), {}

    def sample(self, n: int, seed: int) -> Tensor:
        """About ``n`` cells (all if fewer) drawn as whole random blocks, in file order.

        Whole blocks keep the reads contiguous; with many small blocks the sample still
        covers the whole file.
        """
        if n >= self.n_cells:
            return torch.arange(self.n_cells)
        block = max(1, min(self.block_cells, n // 64))
        n_blocks = -(-self.n_cells // block)
        chosen = np.random.default_rng(seed).permutation(n_blocks)[: -(-n // block)]
        rows = (np.sort(chosen)[:, None] * block + np.arange(block)).ravel()
        return torch.from_numpy(rows[rows < self.n_cells][:n])

    def validation_cells(self, max_bytes: int = VALIDATION_BYTES
                         ) -> tuple[VelocityData, Tensor]:
        """``(data, idx)`` on which training evaluates its per-epoch validation loss.

        The validation cells are read once and held in memory, so that the loss checked
        every epoch does not read the whole file again (the validation cells are spread
        over every block: at 10^6 cells that re-read was 138 of 1023 s per epoch). When
        they need more than ``max_bytes`` (float32 ``u`` and ``s``; 256 MiB by default,
        i.e. about 16,000 cells at 2,000 genes), an evenly spaced subset of them (in file
        order) that fits is used: the same cells every epoch, so the loss is compared
        like with like.
        """
        idx = self.indices("validation")
        keep = max(1, int(max_bytes) // (2 * self.n_genes * 4))
        if len(idx) > keep:
            idx = idx[np.linspace(0, len(idx) - 1, keep).round().astype(np.int64)]
        return self.load(idx).to(self.device), torch.arange(len(idx))

    def load(self, idx: Tensor) -> VelocityData:
        """The cells ``idx`` as an in-memory :class:`~pyro_velo.data.VelocityData`.

        Their split labels are kept; used to warm up and initialise on a sample.
        """
        u, s = self.rows(idx)
        return VelocityData(u.cpu(), s.cpu(), self.gene_scale_u.cpu(), self.gene_scale_s.cpu(),
                            self.fitted, self.split[np.asarray(idx)], cell_ids=idx.clone())

    # ---- construction ----------------------------------------------------------------
    @classmethod
    def from_h5ad(
        cls,
        path: str | Path,
        unspliced_layer: str = "Mu",
        spliced_layer: str = "Ms",
        split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
        split: np.ndarray | None = None,
        seed: int = 0,
        block_cells: int = BLOCK_CELLS,
        buffer_blocks: int = BUFFER_BLOCKS,
        progress_bar: bool = False,
    ) -> DiskVelocityData:
        """Check the layers of ``path`` and compute the per-gene scales in one pass.

        The pass reads ``block_cells * buffer_blocks`` rows at a time: it checks for
        NaN/inf and negative values and accumulates every gene's mean and variance
        (Chan et al.'s pairwise update, in float64), giving the same scales (standard
        deviations) and fitted genes as :meth:`VelocityData.from_anndata` on the same data.

        Raises
        ------
        MissingFileError
            No file at ``path``.
        InputError
            Not an HDF5 file, missing or non-numeric layers, layers of other shapes,
            duplicated gene or cell names, NaN/inf or negative values (the first
            offending rows are named), fewer than 10 cells, no gene that varies, an
            invalid split.
        """
        from tqdm.auto import tqdm

        file = open_h5ad(path)
        try:
            readers = [_layer(file, name) for name in (unspliced_layer, spliced_layer)]
            if readers[0].shape != readers[1].shape:
                raise InputError(f"layers '{unspliced_layer}' {readers[0].shape} and "
                                 f"'{spliced_layer}' {readers[1].shape} differ in shape")
            n_cells, n_vars = readers[0].shape
            if n_cells < 10:
                raise InputError(f"need at least 10 cells to fit, got {n_cells}")
            check_unique_names(_index(file["var"]), "var_names")
            check_unique_cell_names(_index(file["obs"]), "obs_names")
            stats = [_RunningMoments(n_vars), _RunningMoments(n_vars)]
            step = block_cells * buffer_blocks
            for start in tqdm(range(0, n_cells, step), desc="Reading layers",
                              disable=not progress_bar or settings.verbosity == 0):
                stop = min(start + step, n_cells)
                for reader, acc in zip(readers, stats, strict=True):
                    values = reader.read(start, stop)
                    _check_block(values, reader.name, start)
                    acc.add(values)
        finally:
            file.close()
        scale_u, scale_s = stats[0].std(), stats[1].std()
        fitted = (scale_u > 1e-8) & (scale_s > 1e-8)
        if not fitted.any():
            raise InputError(f"no gene varies in both layers['{unspliced_layer}'] and "
                             f"layers['{spliced_layer}']: nothing to fit")
        if split is None:
            split = random_split(n_cells, split_fractions, seed)
        elif len(split) != n_cells or not np.isin(split, (0, 1, 2)).all():
            raise InputError(f"split must hold 0, 1 or 2 for each of the {n_cells} cells")
        return cls(path, unspliced_layer, spliced_layer, fitted, split,
                   torch.from_numpy(scale_u[fitted].astype(np.float32)),
                   torch.from_numpy(scale_s[fitted].astype(np.float32)),
                   block_cells, buffer_blocks)


def read_cells(adata: AnnData | str | Path, unspliced_layer: str, spliced_layer: str,
               split_fractions: tuple[float, float, float], split: np.ndarray | None,
               seed: int, counts: bool, progress_bar: bool
               ) -> tuple[VelocityData | DiskVelocityData, AnnData, np.ndarray, Any]:
    """The cells a :class:`~pyro_velo.VeloVAE` fits: ``adata`` in memory, or streamed from
    the ``.h5ad`` file at that path (:meth:`DiskVelocityData.from_h5ad`).

    Returns the data (with the raw counts a count likelihood reads, when ``counts``), the
    cells' annotations (``adata`` itself, or the file's ``obs`` without matrices), the
    gene names and the kNN graph ``obsp['connectivities']`` (a reference, not a copy;
    None where absent or from a file). Raises :class:`~pyro_velo._checks.InputError` for
    ``counts`` from a file: those are read into memory.
    """
    layers = (unspliced_layer, spliced_layer, split_fractions, split, seed)
    if isinstance(adata, str | Path):
        if counts:
            raise InputError(
                "count likelihoods read raw counts into memory and cannot stream from "
                "a file: pass an AnnData, or use the default likelihood='normal'")
        data = DiskVelocityData.from_h5ad(adata, *layers, progress_bar=progress_bar)
        obs, var = read_annotations(adata)
        return data, AnnData(obs=obs), np.asarray(var.index), None
    data = VelocityData.from_anndata(adata, *layers)
    graph = adata.obsp["connectivities"] if "connectivities" in adata.obsp else None
    if counts:
        data = data.with_counts(adata)
    return data, adata, np.asarray(adata.var_names), graph


def _index(group: h5py.Group) -> np.ndarray:
    """The names (index column) of an ``obs`` or ``var`` group of an .h5ad file."""
    key = group.attrs.get("_index", "_index")
    names = group[key.decode() if isinstance(key, bytes) else key]
    return names.asstr()[:] if names.dtype.kind == "O" else names[:]


def _layer(file: h5py.File, name: str) -> H5adLayer:
    if name == "X":
        return H5adLayer(file, "X", "X")
    return H5adLayer(file, f"layers/{name}", f"layers['{name}']")


def _check_block(values: np.ndarray, name: str, start: int) -> None:
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise InputError(f"{name} contains NaN or infinite values (first in cell "
                         f"{start + int(np.flatnonzero(bad)[0])})")
    negative = (values < 0).any(axis=1)
    if negative.any():
        raise InputError(f"{name} contains negative values (first in cell "
                         f"{start + int(np.flatnonzero(negative)[0])})")


class _RunningMoments:
    """Per-column mean and variance over row blocks (Chan et al. 1979 pairwise update)."""

    def __init__(self, n_columns: int) -> None:
        self.n = 0
        self.mean = np.zeros(n_columns)
        self.m2 = np.zeros(n_columns)

    def add(self, block: np.ndarray) -> None:
        m = block.shape[0]
        if m == 0:
            return
        block_mean = block.mean(0)
        block_m2 = ((block - block_mean) ** 2).sum(0)
        delta = block_mean - self.mean
        total = self.n + m
        self.mean = self.mean + delta * (m / total)
        self.m2 = self.m2 + block_m2 + delta ** 2 * (self.n * m / total)
        self.n = total

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.n, 1))
