"""From an AnnData to the tensors the models train on: validation, gene scaling, splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData
from torch import Tensor

from ._checks import InputError, check_finite, check_layers, check_nonnegative

SPLIT_NAMES = ("train", "validation", "test")


@dataclass
class VelocityData:
    """Abundances of the fitted genes, scaled per gene, with a train/validation/test split.

    The model works on ``u / scale_u`` and ``s / scale_s`` where the fixed per-gene
    scales are the standard deviations of the observed abundances: every gene then has
    unit spread, which keeps the encoder input and the ODE parameters well conditioned.
    Velocities are multiplied back by these scales when exported.

    Attributes
    ----------
    u, s
        ``(cells, fitted genes)`` float32 tensors on the scaled axis.
    gene_scale_u, gene_scale_s
        ``(fitted genes,)`` the scales.
    fitted
        ``(n_vars,)`` boolean mask of the genes of the AnnData that are fitted.
    split
        ``(cells,)`` integer array: 0 train, 1 validation, 2 test.
    """

    u: Tensor
    s: Tensor
    gene_scale_u: Tensor
    gene_scale_s: Tensor
    fitted: np.ndarray
    split: np.ndarray

    @property
    def n_cells(self) -> int:
        return int(self.u.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.u.shape[1])

    def indices(self, name: str) -> Tensor:
        """Cell indices of one split (``'train'``, ``'validation'``, ``'test'``)."""
        return torch.from_numpy(np.flatnonzero(self.split == SPLIT_NAMES.index(name)))

    def to(self, device: str | torch.device) -> VelocityData:
        """The same data with its tensors on ``device``."""
        return VelocityData(
            self.u.to(device), self.s.to(device), self.gene_scale_u.to(device),
            self.gene_scale_s.to(device), self.fitted, self.split,
        )

    @classmethod
    def from_anndata(
        cls,
        adata: AnnData,
        unspliced_layer: str = "Mu",
        spliced_layer: str = "Ms",
        split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
        split: np.ndarray | None = None,
        seed: int = 0,
    ) -> VelocityData:
        """Validate and read the abundances; draw (or reuse) the split.

        Genes with no variation in ``u`` or ``s`` carry no information on time and are
        not fitted (``fitted`` is False for them).

        Raises
        ------
        InputError
            Missing layers, NaN/inf or negative values, too few cells, no usable gene.
        """
        check_layers(adata, [unspliced_layer, spliced_layer])
        u = _dense(adata.layers[unspliced_layer])
        s = _dense(adata.layers[spliced_layer])
        for x, name in ((u, unspliced_layer), (s, spliced_layer)):
            check_finite(x, f"layers['{name}']")
            check_nonnegative(x, f"layers['{name}']")
        if adata.n_obs < 10:
            raise InputError(f"need at least 10 cells to fit, got {adata.n_obs}")
        scale_u = u.std(0)
        scale_s = s.std(0)
        fitted = (scale_u > 1e-8) & (scale_s > 1e-8)
        if not fitted.any():
            raise InputError(
                f"no gene varies in both layers['{unspliced_layer}'] and "
                f"layers['{spliced_layer}']: nothing to fit"
            )
        if split is None:
            split = random_split(adata.n_obs, split_fractions, seed)
        elif len(split) != adata.n_obs:
            raise InputError(f"split has {len(split)} entries for {adata.n_obs} cells")
        return cls(
            u=torch.from_numpy(u[:, fitted] / scale_u[fitted]).float(),
            s=torch.from_numpy(s[:, fitted] / scale_s[fitted]).float(),
            gene_scale_u=torch.from_numpy(scale_u[fitted]).float(),
            gene_scale_s=torch.from_numpy(scale_s[fitted]).float(),
            fitted=fitted,
            split=np.asarray(split, dtype=np.int8),
        )


def random_split(n_cells: int, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """Seeded assignment of cells to train (0), validation (1) and test (2).

    Every split with a positive fraction gets at least one cell.
    """
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1):
        raise InputError(
            f"split_fractions must be three non-negative numbers summing to 1, got {fractions}"
        )
    if fractions[0] == 0:
        raise InputError("the train fraction of split_fractions must be positive")
    counts = np.floor(fractions * n_cells).astype(int)
    counts[(fractions > 0) & (counts == 0)] = 1
    counts[0] = n_cells - counts[1:].sum()
    labels = np.repeat(np.arange(3, dtype=np.int8), counts)
    return np.random.default_rng(seed).permutation(labels)


def _dense(x) -> np.ndarray:
    """float64 dense copy of a layer (dense or sparse)."""
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
