"""Capture times: from obs labels such as ``'E12.5'``, ``'day7'`` or ``'P0'`` to numbers.

Experiments that sample cells at several time points (days of differentiation, embryonic
stages) label each cell with its capture time. :func:`parse_capture_times` turns such
labels into numbers, :func:`capture_time_axis` maps them onto the model's time axis and
:func:`capture_time_prior` gives them with the spread of the informative time prior
(paper sections 3.3 and 4.2).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from ._checks import InputError
from .priors import default_time_scale

#: Days from conception to birth used to put postnatal labels ``'P<n>'`` after embryonic
#: labels ``'E<n>'`` on one axis (mouse: birth at about E19.5).
MOUSE_GESTATION_DAYS = 19.5

# optional prefix word, a number, optional unit suffix: 'E12.5', 'day 7', 'D3', 'P0', '12h'
_LABEL = re.compile(r"^\s*([A-Za-z]*)\s*[_\-]?\s*([-+]?\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_HOURS = {"h", "hr", "hrs", "hour", "hours"}


def parse_capture_times(
    values,
    mapping: Mapping[object, float] | None = None,
    gestation_days: float = MOUSE_GESTATION_DAYS,
) -> np.ndarray:
    """Numeric capture time of every cell.

    Parameters
    ----------
    values
        One entry per cell: numbers, or labels made of an optional word, a number and an
        optional unit (``'E12.5'``, ``'day7'``, ``'Day 7'``, ``'D3'``, ``'P0'``, ``'12h'``,
        ``'t_3'``). Missing entries (NaN, None, ``''``) give NaN: those cells fall back to
        the uninformative prior.
    mapping
        Explicit label-to-number map; when given it is used for every non-missing entry
        (labels it lacks are an error), e.g. ``{'early': 0, 'mid': 1, 'late': 2}``.
    gestation_days
        When labels mix embryonic (``E<n>``) and postnatal (``P<n>``) stages, ``P<n>`` is
        placed at ``gestation_days + n`` so that birth follows the last embryonic day.

    Units: labels ending in hours (``'12h'``) are converted to days when the labels mix
    hours and days; otherwise numbers are taken as they are (only their order and
    spacing matter to the prior).

    Returns
    -------
    numpy.ndarray
        ``float64`` capture times, NaN where missing.

    Raises
    ------
    InputError
        A label that cannot be parsed (the message names it and suggests ``mapping``).
    """
    series = pd.Series(np.asarray(values, dtype=object))
    missing = series.isna() | series.map(lambda v: isinstance(v, str) and not v.strip())
    out = np.full(len(series), np.nan)
    present = series[~missing]
    if mapping is not None:
        unknown = sorted({str(v) for v in present if v not in mapping})
        if unknown:
            raise InputError(f"capture-time labels missing from the mapping: {unknown[:5]}")
        out[~missing.to_numpy()] = [float(mapping[v]) for v in present]
        return out
    numbers = pd.to_numeric(present, errors="coerce")
    if not numbers.isna().any():
        out[~missing.to_numpy()] = numbers.to_numpy(dtype=float)
        return out
    parsed = {label: _parse_label(str(label)) for label in pd.unique(present)}
    prefixes = {prefix for prefix, _, _ in parsed.values()}
    units = {unit in _HOURS for _, _, unit in parsed.values()}
    numeric = {}
    for label, (prefix, number, unit) in parsed.items():
        if "e" in prefixes and prefix == "p":
            number = gestation_days + number
        if len(units) > 1 and unit in _HOURS:
            number = number / 24.0
        numeric[label] = number
    out[~missing.to_numpy()] = [numeric[v] for v in present]
    return out


def _parse_label(label: str) -> tuple[str, float, str]:
    match = _LABEL.match(label)
    if match is None:
        raise InputError(
            f"cannot read a capture time from the label {label!r}: expected a number with "
            "an optional prefix or unit ('E12.5', 'day7', 'P0', '12h'); pass "
            "capture_time_mapping={label: number, ...} for other labels"
        )
    prefix, number, unit = match.groups()
    return prefix.lower(), float(number), unit.lower()


def capture_times_from_obs(
    adata: AnnData, key: str, mapping: Mapping[object, float] | None = None
) -> np.ndarray:
    """Parsed capture times of ``adata.obs[key]`` (see :func:`parse_capture_times`).

    Raises
    ------
    InputError
        Unknown key, unparseable labels, no cell with a capture time, or fewer than two
        distinct capture times (one time point carries no information on order).
    """
    if key not in adata.obs:
        raise InputError(f"capture_time_key {key!r} is not a column of adata.obs "
                         f"(columns: {list(adata.obs.columns)[:10]})")
    times = parse_capture_times(adata.obs[key].to_numpy(), mapping)
    if np.isinf(times).any():
        raise InputError(f"obs[{key!r}] holds infinite capture times")
    distinct = np.unique(times[np.isfinite(times)])
    if len(distinct) < 2:
        raise InputError(
            f"obs[{key!r}] has {len(distinct)} distinct capture time(s); an informative "
            "time prior needs at least two (leave capture_time_key=None otherwise)"
        )
    return times


def capture_time_axis(times: np.ndarray, t_max: float, margin: float = 0.1) -> np.ndarray:
    """Map capture times linearly onto the model's time axis.

    The earliest capture time goes to ``margin * t_max`` and the latest to
    ``(1 - margin) * t_max``: cells captured at one time point spread around it, so the
    ends of the axis are left free. NaN stays NaN.
    """
    lo, hi = np.nanmin(times), np.nanmax(times)
    return t_max * (margin + (1 - 2 * margin) * (times - lo) / (hi - lo))


def capture_time_prior(adata: AnnData, key: str, mapping: Mapping[object, float] | None,
                       scale: float | None, t_max: float) -> tuple[torch.Tensor, float]:
    """Per-cell capture times on the model's axis and the standard deviation of their
    prior.

    Returns the times of ``adata.obs[key]`` mapped by :func:`capture_time_axis` (a
    float32 tensor; NaN for cells without one) and ``scale``, by default the spacing of
    consecutive capture times on the axis (:func:`~pyro_velo.priors.default_time_scale`).
    """
    times = capture_times_from_obs(adata, key, mapping)
    if scale is None:
        scale = default_time_scale(len(np.unique(times[np.isfinite(times)])), t_max)
    return (torch.as_tensor(capture_time_axis(times, t_max), dtype=torch.float32),
            float(scale))
