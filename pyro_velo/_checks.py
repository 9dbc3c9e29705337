"""Reusable input validation with readable error messages.

Every check raises :class:`InputError` (a :class:`ValueError`) that names the
offending object and says what to do about it, so that users can catch all
input problems of ``pyro_velo`` with a single ``except InputError``. None of the
checks modifies its input, and none of them densifies a sparse matrix.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = [
    "InputError",
    "MissingFileError",
    "MissingLayerError",
    "check_finite",
    "check_int",
    "check_layers",
    "check_nonnegative",
    "check_names_present",
    "check_numeric",
    "check_same_shape",
    "check_unique_cell_names",
    "check_unique_names",
    "is_integer_valued",
]

#: Number of values inspected at a time, to bound temporary memory on large matrices.
_CHUNK_SIZE = 1 << 22

_SPARSE_FORMATS_WITH_DATA = ("csr", "csc", "coo", "bsr")


class InputError(ValueError):
    """Invalid input data or parameters passed to a ``pyro_velo`` function.

    Subclass of :class:`ValueError`; the message names the problem and, where
    possible, how to fix it.
    """


class MissingLayerError(InputError, KeyError):
    """A required layer is missing from ``adata.layers``.

    Subclass of both :class:`InputError` and :class:`KeyError`, so it can be caught
    either way. Unlike a plain :class:`KeyError`, its message is printed verbatim.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingFileError(InputError, FileNotFoundError):
    """A file or folder that ``pyro_velo`` needs (saved model, checkpoint) does not exist.

    Subclass of both :class:`InputError` and :class:`FileNotFoundError`.
    """


def _values(matrix: Any) -> Iterator[np.ndarray]:
    """Yield the stored values of ``matrix`` as 1-D chunks.

    Sparse matrices yield only their stored (structurally non-zero) values and
    are never densified; dense arrays are walked in row blocks so that
    temporaries stay small.
    """
    if sp.issparse(matrix):
        if matrix.format not in _SPARSE_FORMATS_WITH_DATA:
            matrix = matrix.tocsr()
        data = np.asarray(matrix.data).ravel()
        for start in range(0, data.size, _CHUNK_SIZE):
            yield data[start : start + _CHUNK_SIZE]
        return
    array = np.asarray(matrix)
    if array.ndim < 2:
        array = array.reshape(1, -1)
    else:
        array = array.reshape(array.shape[0], -1)
    rows_per_chunk = max(1, _CHUNK_SIZE // max(1, array.shape[1]))
    for start in range(0, array.shape[0], rows_per_chunk):
        yield array[start : start + rows_per_chunk].ravel()


def _dtype(matrix: Any) -> np.dtype:
    dtype = getattr(matrix, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.asarray(matrix).dtype


def check_numeric(matrix: Any, name: str) -> None:
    """Check that ``matrix`` holds real numbers (bool, integer or float dtype).

    Parameters
    ----------
    matrix
        Dense array-like or :mod:`scipy.sparse` matrix.
    name
        How to refer to ``matrix`` in the error message, e.g. ``"layers['spliced']"``.

    Raises
    ------
    InputError
        If the dtype is not boolean, integer or floating point.
    """
    dtype = _dtype(matrix)
    if dtype.kind not in "biuf":
        raise InputError(
            f"{name} has dtype {dtype}, but a numeric (integer or float) matrix of "
            "counts is required."
        )


def check_finite(matrix: Any, name: str) -> None:
    """Check that ``matrix`` contains no NaN or infinite values.

    Works on dense arrays and on :mod:`scipy.sparse` matrices (only the stored
    values are inspected; the matrix is not densified).

    Parameters
    ----------
    matrix
        Dense array-like or :mod:`scipy.sparse` matrix.
    name
        How to refer to ``matrix`` in the error message.

    Raises
    ------
    InputError
        If any value is NaN or +/-inf; the message gives how many of each.
    """
    if _dtype(matrix).kind in "biu":
        return
    n_nan = 0
    n_inf = 0
    for chunk in _values(matrix):
        n_nan += int(np.count_nonzero(np.isnan(chunk)))
        n_inf += int(np.count_nonzero(np.isinf(chunk)))
    if n_nan or n_inf:
        raise InputError(
            f"{name} contains {n_nan} NaN and {n_inf} infinite value(s). Counts must be "
            "finite; remove or replace these entries before preprocessing."
        )


def check_nonnegative(matrix: Any, name: str) -> None:
    """Check that ``matrix`` contains no negative values.

    Parameters
    ----------
    matrix
        Dense array-like or :mod:`scipy.sparse` matrix.
    name
        How to refer to ``matrix`` in the error message.

    Raises
    ------
    InputError
        If any value is negative; the message gives how many and the minimum.
    """
    if _dtype(matrix).kind in "bu":
        return
    n_negative = 0
    minimum = np.inf
    for chunk in _values(matrix):
        negative = chunk < 0
        count = int(np.count_nonzero(negative))
        if count:
            n_negative += count
            minimum = min(minimum, float(chunk[negative].min()))
    if n_negative:
        raise InputError(
            f"{name} contains {n_negative} negative value(s) (minimum {minimum:g}). "
            "Raw counts must be non-negative; pass unnormalised, untransformed counts."
        )


def check_same_shape(
    matrices: Mapping[str, Any], expected: tuple[int, ...] | None = None
) -> tuple[int, ...] | None:
    """Check that all ``matrices`` have the same shape (and ``expected``, if given).

    Parameters
    ----------
    matrices
        Mapping from a descriptive name to a matrix (anything with ``.shape``).
    expected
        Shape all matrices must have, e.g. ``adata.shape``. If ``None``, the
        matrices only have to agree with each other.

    Returns
    -------
    tuple of int or None
        The common shape, or ``None`` if ``matrices`` is empty and ``expected`` is None.

    Raises
    ------
    InputError
        If the shapes differ; the message lists every shape.
    """
    shapes = {name: tuple(np.shape(matrix)) for name, matrix in matrices.items()}
    reference = tuple(expected) if expected is not None else None
    if reference is None and shapes:
        reference = next(iter(shapes.values()))
    if any(shape != reference for shape in shapes.values()):
        listing = ", ".join(f"{name}: {shape}" for name, shape in shapes.items())
        required = f" (expected {reference})" if expected is not None else ""
        raise InputError(f"Shapes differ{required}: {listing}.")
    return reference


def check_layers(adata: Any, layers: str | Iterable[str]) -> None:
    """Check that ``adata.layers`` contains all of ``layers``.

    Parameters
    ----------
    adata
        :class:`~anndata.AnnData` object.
    layers
        Name or names of the required layers.

    Raises
    ------
    MissingLayerError
        If any layer is missing; the message names the missing layers and lists
        the available ones. Subclass of :class:`InputError` and :class:`KeyError`.
    """
    required = [layers] if isinstance(layers, str) else list(layers)
    available = list(adata.layers.keys())
    missing = [layer for layer in required if layer not in available]
    if missing:
        shown = ", ".join(repr(layer) for layer in available) if available else "none"
        plural = "s" if len(missing) > 1 else ""
        raise MissingLayerError(
            f"Layer{plural} {', '.join(repr(m) for m in missing)} not found in "
            f"adata.layers. Available layers: {shown}."
        )


def is_integer_valued(matrix: Any) -> bool:
    """Return whether every value of ``matrix`` is a whole number.

    Integer and boolean dtypes are integer-valued by definition; for floating
    point matrices every stored value is compared with its rounded value. NaN
    or infinite values make the result ``False``.

    Parameters
    ----------
    matrix
        Dense array-like or :mod:`scipy.sparse` matrix.

    Returns
    -------
    bool
        ``True`` if all values are whole numbers (raw counts), ``False`` if any
        value is fractional (e.g. data that has already been normalised).
    """
    if _dtype(matrix).kind in "biu":
        return True
    for chunk in _values(matrix):
        if not np.all(chunk == np.round(chunk)):
            return False
    return True


def check_int(
    value: Any,
    name: str,
    *,
    minimum: int | None = None,
    allow_none: bool = False,
) -> int | None:
    """Check that a parameter is an integer, optionally at least ``minimum``.

    Parameters
    ----------
    value
        Value to check. ``bool`` is rejected; integral numpy scalars are accepted.
    name
        Parameter name used in the error message.
    minimum
        Smallest allowed value, or ``None`` for no lower bound.
    allow_none
        Whether ``None`` is an accepted value.

    Returns
    -------
    int or None
        ``value`` as a Python ``int`` (or ``None``).

    Raises
    ------
    InputError
        If ``value`` is not an integer or is smaller than ``minimum``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {value!r}.")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {value}.")
    return int(value)


def check_real(
    value: Any,
    name: str,
    *,
    positive: bool = False,
    allow_none: bool = False,
) -> float | None:
    """Check that a parameter is a finite real number (optionally a positive one).

    Returns
    -------
    float or None
        ``value`` as a Python ``float`` (or ``None``).

    Raises
    ------
    InputError
        If ``value`` is not a finite real number, or not positive when it must be.
    """
    if value is None and allow_none:
        return None
    what = "a positive number" if positive else "a finite number"
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not np.isfinite(value) or (positive and not value > 0)):
        raise InputError(f"{name} must be {what}, got {value!r}.")
    return float(value)


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_unique_names(names: Iterable[str], what: str, remedy: str | None = None) -> None:
    """Check that ``names`` (e.g. ``adata.var_names``) has no duplicates.

    Parameters
    ----------
    names
        The names to check.
    what
        How to refer to them in the error message, e.g. ``"adata.var_names"``.
    remedy
        The call that makes them unique, e.g. ``"adata.obs_names_make_unique()"``;
        ``None`` names both AnnData methods (genes and cells).

    Raises
    ------
    InputError
        If a name occurs more than once; the message lists the duplicated names.
    """
    values = np.asarray(list(names), dtype=object)
    unique, counts = np.unique(values.astype(str), return_counts=True)
    duplicated = [str(n) for n in unique[counts > 1]]
    if duplicated:
        remedy = remedy or ("adata.var_names_make_unique() (genes) or "
                            "adata.obs_names_make_unique() (cells)")
        raise InputError(
            f"{what} contains {len(duplicated)} duplicated name(s): {_listing(duplicated)}. "
            f"Names must be unique; e.g. call {remedy}."
        )


def check_unique_cell_names(names: Iterable[str], what: str = "adata.obs_names") -> None:
    """Check that the cell names ``names`` have no duplicates.

    Results are matched to cells by name (``obs`` columns, the train/validation/test
    split, saved models, exports into files), so duplicated cell names would silently
    misalign them.

    Parameters
    ----------
    names
        The cell names, e.g. ``adata.obs_names``.
    what
        How to refer to them in the error message.

    Raises
    ------
    InputError
        If a name occurs more than once; the message lists (up to ten of) the duplicated
        names and suggests ``adata.obs_names_make_unique()``.
    """
    if pd.Index(names).is_unique:  # a hash table: fast on millions of cells
        return
    check_unique_names(names, what, remedy="adata.obs_names_make_unique()")


def check_names_present(required: Iterable[str], available: Iterable[str], what: str) -> None:
    """Check that every name in ``required`` occurs in ``available``.

    Parameters
    ----------
    required
        Names that must be present (e.g. the genes a model was fitted on).
    available
        Names that are present (e.g. ``adata.var_names``).
    what
        How to refer to ``available`` in the error message, e.g. ``"adata.var_names"``.

    Raises
    ------
    InputError
        If some names are missing; the message gives how many and lists them.
    """
    present = set(map(str, available))
    required = [str(n) for n in required]
    missing = [n for n in required if n not in present]
    if missing:
        raise InputError(
            f"{len(missing)} of the {len(required)} required name(s) are missing from "
            f"{what}: {_listing(missing)}."
        )
