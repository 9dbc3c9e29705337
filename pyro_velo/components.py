"""The swappable components of a VeloVAE: their checks and the (model, guide) they build.

:func:`configure` checks the constructor's arguments (:func:`check_settings` for its
numbers, :func:`check_components` for its pieces) before anything is built and records
them as the JSON configuration; :func:`build_pair` builds a model (ours by name, or the
user's class or instance) with its guide from the configuration; :func:`describe`
records a component in the configuration (objects as ``'custom:<class>'``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from . import policies
from ._checks import InputError, check_int, check_real
from ._params import adopt_module, local_params
from .data import VelocityData
from .disk import DiskVelocityData
from .guides import AmortizedGuide, AmortizedMVNGuide, CombinedGuide, RateGuide
from .initialize import RateInit
from .likelihoods import LIKELIHOODS, Likelihood, make_likelihood
from .model import AncestralModel, BasicModel, FullModel
from .priors import CaptureTimePrior, LogNormalRatePrior, NormalTimePrior

MODELS = ("basic", "full")
#: values of ``rate_history``: the paper's one rate per cell, or rates from the ancestors
RATE_HISTORIES = ("constant", "ancestors")
GUIDES = ("amortized", "amortized_mvn")
COMPONENTS = ("likelihood", "guide", "time_prior", "state_prior", "rate_prior")
#: config value of a component passed as an object: it must be passed again to load()
CUSTOM = "custom:"


def configure(model, *, unspliced_layer: str, spliced_layer: str, t_max: float,
              time_prior_loc: float | None, time_prior_scale: float | None,
              hidden: Sequence[int], dropout: float, latent_dim: int, c_prior_scale: float,
              rate_history: str, likelihood, guide, time_prior, state_prior, rate_prior,
              capture_time_key: str | None, capture_time_mapping: dict | None,
              capture_time_scale: float | None, split_fractions: Sequence[float],
              seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check :class:`~pyro_velo.VeloVAE`'s arguments; return its configuration and parts.

    The configuration (JSON-able, saved by :mod:`pyro_velo.persist`) records the
    arguments, components by :func:`describe`; the parts are the components by name
    (see :func:`check_components`), with ``'model'`` the user's model class or instance
    when one was given. Raises :class:`~pyro_velo._checks.InputError` before anything is
    built.
    """
    model, custom_model = model_kind(model)
    if rate_history not in RATE_HISTORIES:
        raise InputError(f"unknown rate_history {rate_history!r}; choose one of "
                         f"{RATE_HISTORIES}")
    if rate_history != "constant" and model != "full":
        raise InputError(f"rate_history={rate_history!r} applies to model='full'")
    check_settings(t_max=t_max, time_prior_loc=time_prior_loc,
                   time_prior_scale=time_prior_scale, hidden=hidden, dropout=dropout,
                   latent_dim=latent_dim, c_prior_scale=c_prior_scale,
                   capture_time_scale=capture_time_scale, seed=seed)
    components = check_components(model, likelihood, guide, time_prior, state_prior,
                                  rate_prior, capture_time_key)
    config = {
        "model": model,
        "unspliced_layer": unspliced_layer,
        "spliced_layer": spliced_layer,
        "t_max": float(t_max),
        "time_prior_loc": time_prior_loc,
        "time_prior_scale": time_prior_scale,
        "hidden": [int(width) for width in hidden],
        "dropout": float(dropout),
        "latent_dim": int(latent_dim),
        "c_prior_scale": float(c_prior_scale),
        "rate_history": rate_history,
        **{name: describe(value) for name, value in components.items()},
        "capture_time_key": capture_time_key,
        "capture_time_mapping": capture_time_mapping,
        "capture_time_scale": capture_time_scale,
        "split_fractions": list(split_fractions),
        "seed": int(seed),
    }
    if custom_model is not None:
        config["model_class"] = describe(custom_model)
        components["model"] = custom_model
    return config, components


def ancestral(config: dict[str, Any]) -> bool:
    """Whether the full model of ``config`` takes each cell's past rates from its
    ancestors (``rate_history='ancestors'``)."""
    return config.get("rate_history") == "ancestors"  # absent in older saves


def check_settings(*, t_max, time_prior_loc, time_prior_scale, hidden, dropout,
                   latent_dim, c_prior_scale, capture_time_scale, seed) -> None:
    """Numbers and sizes of the constructor, checked before anything is built."""
    check_real(t_max, "t_max", positive=True)
    check_real(time_prior_loc, "time_prior_loc", allow_none=True)
    for name, value in (("time_prior_scale", time_prior_scale),
                        ("capture_time_scale", capture_time_scale)):
        check_real(value, name, positive=True, allow_none=True)
    check_real(c_prior_scale, "c_prior_scale", positive=True)
    check_real(dropout, "dropout")
    if not 0 <= dropout < 1:
        raise InputError(f"dropout must be in [0, 1), got {dropout!r}.")
    try:
        widths = [] if isinstance(hidden, str | bytes) else list(hidden)
    except TypeError:
        widths = []
    if not widths:
        raise InputError(f"hidden must be a non-empty sequence of layer widths, got "
                         f"{hidden!r}.")
    for width in widths:
        check_int(width, "each width in hidden", minimum=1)
    check_int(latent_dim, "latent_dim", minimum=1)
    check_int(seed, "seed", minimum=0)


def check_components(model, likelihood, guide, time_prior, state_prior, rate_prior,
                     capture_time_key) -> dict:
    """Validate the swappable pieces; return them by name (objects or names)."""
    if isinstance(likelihood, str) and likelihood not in LIKELIHOODS:
        raise InputError(f"unknown likelihood {likelihood!r}; choose one of "
                         f"{sorted(LIKELIHOODS)} or pass a Likelihood object")
    if not isinstance(likelihood, str | Likelihood):
        raise InputError("likelihood must be a name or a pyro_velo.likelihoods.Likelihood")
    if isinstance(guide, str):
        if guide not in GUIDES:
            raise InputError(f"unknown guide {guide!r}; choose one of {GUIDES} or pass "
                             "a guide object")
        if guide == "amortized_mvn" and model != "full":
            raise InputError("guide='amortized_mvn' correlates t with the cell state c: "
                             "it needs model='full'")
    elif not (hasattr(guide, "summary") and hasattr(guide, "encoder")):
        raise InputError("a guide object needs an encoder and a summary(u, s) method "
                         "(posterior means and standard deviations, see AmortizedGuide)")
    if time_prior is not None and capture_time_key is not None:
        raise InputError("pass either time_prior or capture_time_key, not both")
    if state_prior is not None and model != "full":
        raise InputError("state_prior applies to the cell state of model='full'")
    if rate_prior is not None and not isinstance(rate_prior, LogNormalRatePrior):
        if isinstance(rate_prior, bool) or not isinstance(rate_prior, int | float) \
                or not rate_prior > 0:
            raise InputError("rate_prior must be None, a positive log-scale standard "
                             f"deviation or a LogNormalRatePrior, got {rate_prior!r}")
    return {"likelihood": likelihood, "guide": guide, "time_prior": time_prior,
            "state_prior": state_prior, "rate_prior": rate_prior}


def build_pair(kind: str, cfg: dict[str, Any], parts: dict[str, Any], init: RateInit,
               data: VelocityData | DiskVelocityData, capture_times: torch.Tensor | None
               ) -> tuple[BasicModel, torch.nn.Module]:
    """A fresh (model, guide) of ``kind`` (``'basic'`` or ``'full'``).

    ``cfg``: the VeloVAE's configuration; ``parts``: its components (names or objects,
    see :func:`check_components`; ``parts['model']`` a user's model class or instance);
    ``init``: the steady-state initialisation; ``data``: the fitted cells (their number
    of genes and per-gene scales); ``capture_times``: per-cell times on the model's axis
    or None. A user's model class is built with the arguments of ours (steady-state
    initialisation, ``t_max``, time-prior settings and the components); a user's model
    instance is used as built. Per-gene parameters such a model adds are trained at
    ``lr_ode`` when its ``ode_parameters()`` lists them, and exported by
    :meth:`~pyro_velo.VeloVAE.get_rates` when its ``gene_parameters()`` does. Objects
    passed by the user are copied, so the first-stage basic model and the final model
    never share parameters.
    """
    with local_params():
        return _build_pair(kind, cfg, parts, init, data, capture_times)


def _build_pair(kind, cfg, parts, init, data, capture_times):
    likelihood = adopt_module(copy.deepcopy(make_likelihood(parts["likelihood"])))
    if not likelihood.ready:
        likelihood.setup(init, data.gene_scale_u, data.gene_scale_s)
    time_prior = adopted_copy(parts["time_prior"])
    if capture_times is not None:
        fallback = NormalTimePrior(
            policies.TIME_PRIOR.loc(cfg["t_max"], cfg["time_prior_loc"]),
            policies.TIME_PRIOR.scale(cfg["t_max"], cfg["time_prior_scale"]))
        time_prior = CaptureTimePrior(capture_times, cfg["capture_time_scale"],
                                      fallback)
    rate_prior = parts["rate_prior"]
    rate_prior = (LogNormalRatePrior(float(rate_prior))
                  if isinstance(rate_prior, int | float) else adopted_copy(rate_prior))
    common = (init, cfg["t_max"], cfg["time_prior_loc"], cfg["time_prior_scale"],
              likelihood, time_prior, rate_prior)
    latent_dim = 0 if kind == "basic" else cfg["latent_dim"]
    options = {} if kind == "basic" else dict(
        latent_dim=cfg["latent_dim"], c_prior_scale=cfg["c_prior_scale"],
        state_prior=adopted_copy(parts["state_prior"]))
    custom = parts.get("model") if kind == cfg["model"] else None
    if isinstance(custom, type):  # the user's model class, built like ours
        model = custom(*common, **options)
    elif custom is not None:  # the user's model, as built
        model = adopted_copy(custom)
    elif kind == "basic":
        model = BasicModel(*common)
    else:
        if cfg.get("rate_history") == "ancestors":
            # prototypes no training cell has visited for two epochs are dropped
            model = AncestralModel(*common, memory=2 * len(data.indices("train")),
                                   **options)
        else:
            model = FullModel(*common, **options)
    chosen = parts["guide"]
    if kind != cfg["model"] or chosen == "amortized":
        guide = AmortizedGuide(data.n_genes, cfg["hidden"], cfg["dropout"],
                               cfg["t_max"], latent_dim=latent_dim)
    elif chosen == "amortized_mvn":
        guide = AmortizedMVNGuide(data.n_genes, cfg["hidden"], cfg["dropout"],
                                  cfg["t_max"], latent_dim=latent_dim)
    else:
        guide = adopt_module(chosen)
    if rate_prior is not None:
        guide = CombinedGuide(guide, RateGuide(model))
    return model, guide


def model_kind(model) -> tuple[str, type[BasicModel] | BasicModel | None]:
    """``('basic' | 'full', the user's class or instance or None)`` of a ``model`` argument.

    A subclass (or instance) of :class:`~pyro_velo.model.FullModel` is a full model (a
    cell state and a decoder), any other :class:`~pyro_velo.model.BasicModel` a basic
    one.
    """
    if isinstance(model, str):
        if model not in MODELS:
            raise InputError(f"unknown model {model!r}; choose one of {MODELS}, or pass a "
                             "model class or instance (a pyro_velo.model.BasicModel)")
        return model, None
    kind = model if isinstance(model, type) else type(model)
    if not (isinstance(kind, type) and issubclass(kind, BasicModel)):
        raise InputError(f"model must be 'basic', 'full', or a subclass or instance of "
                         f"pyro_velo.model.BasicModel, got {model!r}")
    return ("full" if issubclass(kind, FullModel) else "basic"), model


def describe(value) -> object:
    """JSON-able record of a component: names and numbers as they are, objects by class."""
    if value is None or isinstance(value, str | int | float):
        return value
    return CUSTOM + (value if isinstance(value, type) else type(value)).__name__


def adopted_copy(component):
    """A private copy of a user's component, ready to join our modules."""
    component = copy.deepcopy(component)
    return adopt_module(component) if isinstance(component, torch.nn.Module) else component
