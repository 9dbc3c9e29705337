"""The user-facing model class: fit VeloVAE to an AnnData and export the results."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from . import __version__
from ._checks import InputError
from .data import SPLIT_NAMES, VelocityData
from .guides import AmortizedGuide
from .initialize import steady_state_init, time_informed_init
from .model import BasicModel
from .train import TrainingHistory, cpu_threads, evaluate_loss, fit, local_params, set_seed

MODELS = ("basic",)
PREFIX = "pyro_velo_"


class VeloVAE:
    """Variational mixture of ODEs for RNA velocity (Gu et al., VeloVAE), in Pyro.

    Parameters
    ----------
    adata
        Preprocessed AnnData (see :func:`pyro_velo.pp.preprocess`) with first-order
        moments in ``layers['Mu']`` and ``layers['Ms']``. Not modified.
    model
        ``'basic'``: one latent time per cell and fixed per-gene rates with switch-on and
        switch-off times (paper section 3.3).
    unspliced_layer, spliced_layer
        Layers holding the unspliced / spliced abundances.
    t_max
        Length of the model's time axis (time is exported rescaled to ``[0, 1]``).
    time_prior_loc, time_prior_scale
        Mean and standard deviation of the Normal time prior (default ``t_max/2``,
        ``t_max/4``).
    hidden, dropout
        Encoder architecture (paper: ``(500, 250)`` with batch norm and dropout).
    split_fractions
        Fractions of cells for train, validation (early stopping) and test (held out).
    seed
        Seed of the split and of the parameter initialisation.

    Examples
    --------
    >>> import pyro_velo as pv
    >>> adata = pv.datasets.simulate(n_cells=1000, n_genes=100, topology="linear")
    >>> pv.pp.preprocess(adata)
    >>> vae = pv.VeloVAE(adata, model="basic")
    >>> vae.train()
    >>> vae.export_to_anndata(adata)
    """

    def __init__(
        self,
        adata: AnnData,
        model: str = "basic",
        unspliced_layer: str = "Mu",
        spliced_layer: str = "Ms",
        t_max: float = 20.0,
        time_prior_loc: float | None = None,
        time_prior_scale: float | None = None,
        hidden: Sequence[int] = (500, 250),
        dropout: float = 0.2,
        split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
        seed: int = 0,
        _split: np.ndarray | None = None,
    ) -> None:
        if model not in MODELS:
            raise InputError(f"unknown model {model!r}; choose one of {MODELS}")
        if t_max <= 0:
            raise InputError(f"t_max must be positive, got {t_max}")
        self.config = {
            "model": model,
            "unspliced_layer": unspliced_layer,
            "spliced_layer": spliced_layer,
            "t_max": float(t_max),
            "time_prior_loc": time_prior_loc,
            "time_prior_scale": time_prior_scale,
            "hidden": list(hidden),
            "dropout": float(dropout),
            "split_fractions": list(split_fractions),
            "seed": int(seed),
        }
        self.data = VelocityData.from_anndata(
            adata, unspliced_layer, spliced_layer, tuple(split_fractions), _split, seed
        )
        self.obs_names = np.asarray(adata.obs_names)
        self.var_names = np.asarray(adata.var_names)
        set_seed(seed)
        train = self.data.indices("train")
        init = steady_state_init(self.data.u[train], self.data.s[train], t_max)
        with local_params():
            self.model = BasicModel(init, t_max, time_prior_loc, time_prior_scale)
            self.guide = AmortizedGuide(self.data.n_genes, hidden, dropout, t_max)
        self.history = TrainingHistory()
        self.is_trained = False
        self.device = torch.device("cpu")

    def __repr__(self) -> str:
        state = "trained" if self.is_trained else "not trained"
        return (
            f"VeloVAE(model={self.config['model']!r}, cells={self.data.n_cells}, "
            f"fitted genes={self.data.n_genes}, {state})"
        )

    # ---- training --------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 2e-4,
        lr_ode: float = 1e-2,
        seed: int = 0,
        device: str = "cpu",
        early_stopping: bool = True,
        patience: int = 30,
        warmup_epochs: int | None = None,
        progress_bar: bool = True,
        num_threads: int | None = 1,
    ) -> TrainingHistory:
        """Fit by minibatch SVI with early stopping on the validation ELBO.

        Training has two stages. A warm-up trains encoder and rates from the
        steady-state initialisation; then every gene's switch times and transcription
        rate are re-initialised by a grid search given the warm-up's cell times
        (:func:`~pyro_velo.initialize.time_informed_init`) and training continues until
        the validation ELBO stops improving (or ``max_epochs``).

        Parameters
        ----------
        max_epochs
            Upper bound on epochs after warm-up; default scales with data size
            (``clip(400_000 / n_cells, 100, 1000)``).
        batch_size, lr, lr_ode
            Minibatch size, learning rate of the networks (paper: 2e-4) and of the
            per-gene ODE parameters.
        seed
            Seeds minibatch order and sampling: the same seed gives the same fit on CPU.
        device
            ``'cpu'`` or ``'cuda'``.
        early_stopping, patience
            Stop after ``patience`` epochs without validation improvement and keep the
            best parameters.
        warmup_epochs
            Epochs before the re-initialisation (default ``max(20, max_epochs // 10)``;
            0 skips the warm-up and the re-initialisation).
        progress_bar
            Show tqdm progress bars with the current losses.
        num_threads
            CPU threads torch may use while training (restored afterwards). Minibatches
            are small, so one thread is fastest on CPU; ``None`` keeps torch's setting.

        Returns
        -------
        TrainingHistory
            Per-epoch train and validation loss (negative ELBO per cell), also in
            ``self.history``.
        """
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("device='cuda' was requested but CUDA is not available")
        if batch_size < 2:
            raise InputError(f"batch_size must be at least 2, got {batch_size}")
        if max_epochs is None:
            max_epochs = int(np.clip(400_000 / self.data.n_cells, 100, 1000))
        if warmup_epochs is None:
            warmup_epochs = max(20, max_epochs // 10)
        self._to(device)
        set_seed(seed)
        common = dict(batch_size=batch_size, lr=lr, lr_ode=lr_ode, progress_bar=progress_bar,
                      history=self.history)
        with cpu_threads(num_threads if self.device.type == "cpu" else None):
            if warmup_epochs > 0:
                fit(self.model, self.guide, self.data, warmup_epochs, early_stopping=False,
                    description="Warm-up", **common)
                self._reinitialize_rates()
            fit(self.model, self.guide, self.data, max_epochs, early_stopping=early_stopping,
                patience=patience, description="Training", **common)
        self.is_trained = True
        return self.history

    def _reinitialize_rates(self) -> None:
        """Re-fit every gene's switch times and rate to the warm-up's cell times.

        The warm-up orders cells but may run time backwards (the encoder is free to).
        Genes are fitted to the order and to its reverse; unspliced must lead spliced,
        so the ODE fits the true direction better, and the encoder's time output is
        mirrored when the reverse wins.
        """
        train = self.data.indices("train").to(self.device)
        t = self._encode(train)[0].cpu()
        rates = {k: v.detach().cpu() for k, v in self.model.rates().items()}
        u, s = self.data.u[train].cpu(), self.data.s[train].cpu()
        t_max = self.config["t_max"]
        fits = {
            reverse: time_informed_init(
                u, s, t_max - t if reverse else t, rates["beta"], rates["gamma"],
                rates["scale_u"], seed=self.config["seed"],
            )
            for reverse in (False, True)
        }
        reverse = fits[True][3] < fits[False][3]
        if reverse:
            self.guide.encoder.mirror_time()
        t_on, t_off, alpha, _ = fits[reverse]
        self.model.load_rates(t_on=t_on.to(self.device), t_off=t_off.to(self.device),
                              alpha=alpha.to(self.device))

    def _to(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.model.to(self.device)
        self.guide.to(self.device)
        self.data = self.data.to(self.device)

    # ---- posterior summaries ---------------------------------------------------------
    @torch.no_grad()
    def _encode(self, idx: torch.Tensor | None = None, batch_size: int = 4096):
        """Posterior mean and std of t for the cells ``idx`` (default: all)."""
        idx = torch.arange(self.data.n_cells, device=self.device) if idx is None else idx
        self.guide.eval()
        locs, scales = [], []
        for batch in idx.split(batch_size):
            loc, scale, _, _ = self.guide.encoder(self.data.u[batch], self.data.s[batch])
            locs.append(loc)
            scales.append(scale)
        return torch.cat(locs), torch.cat(scales)

    def _check_trained(self) -> None:
        if not self.is_trained:
            raise RuntimeError("the model is not trained yet: call .train() first")

    def get_latent_time(self, scaled: bool = False) -> np.ndarray:
        """Posterior mean latent time of every cell.

        Parameters
        ----------
        scaled
            Rescale to ``[0, 1]`` (as exported to ``obs['latent_time']``).
        """
        self._check_trained()
        t = self._encode()[0].cpu().numpy().astype(np.float64)
        if scaled:
            t = (t - t.min()) / max(t.max() - t.min(), 1e-12)
        return t

    @torch.no_grad()
    def _expected(self) -> dict[str, np.ndarray]:
        """Model's u, s, du/dt, ds/dt at each cell's posterior mean time, on data scales."""
        t = self._encode()[0]
        out = {k: [] for k in ("u", "s", "du", "ds")}
        for batch in t.split(4096):
            for k, v in self.model.kinetic(batch).items():
                out[k].append(v)
        scale = {"u": self.data.gene_scale_u, "du": self.data.gene_scale_u,
                 "s": self.data.gene_scale_s, "ds": self.data.gene_scale_s}
        return {k: self._full_width((torch.cat(v) * scale[k]).cpu().numpy()) for k, v in
                out.items()}

    def _full_width(self, x: np.ndarray) -> np.ndarray:
        """Embed a ``(cells, fitted genes)`` array into ``(cells, n_vars)`` with NaN."""
        full = np.full((x.shape[0], len(self.var_names)), np.nan, dtype=np.float32)
        full[:, self.data.fitted] = x
        return full

    def get_velocity(self) -> tuple[np.ndarray, np.ndarray]:
        """RNA velocity ``(ds/dt, du/dt)`` at each cell's inferred state.

        Returns
        -------
        velocity_s, velocity_u
            ``(n_cells, n_vars)`` float32 arrays on the scale of ``Ms`` and ``Mu``; columns
            of genes that are not fitted are NaN.
        """
        self._check_trained()
        expected = self._expected()
        return expected["ds"], expected["du"]

    def get_expression_fit(self) -> tuple[np.ndarray, np.ndarray]:
        """Fitted (expected) unspliced and spliced abundances ``(u, s)`` of every cell.

        Returns ``(n_cells, n_vars)`` float32 arrays on the ``Mu`` / ``Ms`` scale (NaN for
        genes not fitted).
        """
        self._check_trained()
        expected = self._expected()
        return expected["u"], expected["s"]

    def get_rates(self) -> pd.DataFrame:
        """Per-gene ODE parameters on the data scale (NaN rows for genes not fitted).

        Columns: ``alpha`` (transcription rate, in ``Ms`` units per unit time), ``beta``,
        ``gamma`` (splicing and degradation rates), ``t_on``, ``t_off`` (switch times on
        the model's time axis), ``scaling`` (``Mu`` per model unspliced unit),
        ``sigma_u``, ``sigma_s`` (noise standard deviations), ``fitted``.
        """
        r = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in
             self.model.rates().items()}
        su = self.data.gene_scale_u.cpu().numpy()
        ss = self.data.gene_scale_s.cpu().numpy()
        values = {
            "alpha": r["alpha"] * ss,
            "beta": r["beta"],
            "gamma": r["gamma"],
            "t_on": r["t_on"],
            "t_off": r["t_off"],
            "scaling": r["scale_u"] * su / ss,
            "sigma_u": r["sigma_u"] * su,
            "sigma_s": r["sigma_s"] * ss,
        }
        frame = pd.DataFrame(np.nan, index=self.var_names, columns=list(values))
        for name, value in values.items():
            frame.loc[self.data.fitted, name] = value
        frame["fitted"] = self.data.fitted
        return frame

    def get_split(self) -> pd.Series:
        """Which split (train / validation / test) each cell belongs to."""
        return pd.Series(pd.Categorical.from_codes(self.data.split, SPLIT_NAMES),
                         index=self.obs_names, name="split")

    # ---- evaluation ------------------------------------------------------------------
    def elbo(self, split: str = "test") -> float:
        """Mean ELBO per cell on one split (higher is better)."""
        self._check_trained()
        return -evaluate_loss(self.model, self.guide, self.data, self.data.indices(split))

    def mse(self, split: str = "test") -> float:
        """Mean squared error of the fit on one split, on the scaled abundances."""
        self._check_trained()
        idx = self.data.indices(split).to(self.device)
        with torch.no_grad():
            t = self._encode(idx)[0]
            expected = self.model.kinetic(t)
            err = ((expected["u"] - self.data.u[idx]) ** 2).mean() + (
                (expected["s"] - self.data.s[idx]) ** 2).mean()
        return float(err / 2)

    # ---- AnnData export --------------------------------------------------------------
    def export_to_anndata(self, adata: AnnData) -> None:
        """Write the fit to ``adata`` (the scVelo / CellRank contract plus our own keys).

        Written keys: ``obs['latent_time']`` (posterior mean time rescaled to [0, 1]),
        ``layers['velocity']`` (ds/dt on the ``Ms`` scale, NaN columns for genes not
        fitted), ``layers['velocity_u']`` (du/dt on the ``Mu`` scale),
        ``var['velocity_genes']`` and ``uns['velocity_params']`` (``mode='pyro_velo'``);
        ours: ``obs['pyro_velo_time']`` (raw posterior mean), ``obs['pyro_velo_time_std']``,
        ``obs['pyro_velo_split']``, ``layers['pyro_velo_u']`` / ``layers['pyro_velo_s']``
        (fitted abundances) and ``var['pyro_velo_<rate>']`` for each column of
        :meth:`get_rates`. Nothing is written if an error is raised.
        """
        self._check_trained()
        if adata.n_obs != len(self.obs_names) or not np.array_equal(
            np.asarray(adata.obs_names), self.obs_names
        ):
            raise InputError("adata's cells (obs_names) differ from the data the model was fit on")
        if not np.array_equal(np.asarray(adata.var_names), self.var_names):
            raise InputError("adata's genes (var_names) differ from the data the model was fit on")
        t_loc, t_scale = (x.cpu().numpy().astype(np.float64) for x in self._encode())
        expected = self._expected()
        rates = self.get_rates()
        latent = (t_loc - t_loc.min()) / max(t_loc.max() - t_loc.min(), 1e-12)
        params = {
            "mode": "pyro_velo",
            "model": self.config["model"],
            "t_max": self.config["t_max"],
            "version": __version__,
            "unspliced_layer": self.config["unspliced_layer"],
            "spliced_layer": self.config["spliced_layer"],
        }
        # everything is computed: now write
        adata.obs["latent_time"] = latent
        adata.obs[PREFIX + "time"] = t_loc
        adata.obs[PREFIX + "time_std"] = t_scale
        adata.obs[PREFIX + "split"] = self.get_split().values
        adata.layers["velocity"] = expected["ds"]
        adata.layers["velocity_u"] = expected["du"]
        adata.layers[PREFIX + "u"] = expected["u"]
        adata.layers[PREFIX + "s"] = expected["s"]
        adata.var["velocity_genes"] = self.data.fitted
        for name in rates.columns.drop("fitted"):
            adata.var[PREFIX + name] = rates[name].values
        adata.uns["velocity_params"] = params

    # ---- persistence -----------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Save parameters, configuration, split and history to the folder ``path``."""
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True")
        path.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": {k: v.cpu() for k, v in self.model.state_dict().items()},
                "guide": {k: v.cpu() for k, v in self.guide.state_dict().items()},
                "split": self.data.split,
                "obs_names": self.obs_names.tolist(),
                "var_names": self.var_names.tolist(),
                "history": self.history.__dict__,
                "is_trained": self.is_trained,
            },
            path / "model.pt",
        )
        (path / "config.json").write_text(json.dumps({**self.config, "version": __version__},
                                                     indent=2))

    @classmethod
    def load(cls, path: str | Path, adata: AnnData) -> VeloVAE:
        """Load a model saved by :meth:`save` for the same cells and genes as ``adata``."""
        path = Path(path)
        if not (path / "model.pt").exists():
            raise FileNotFoundError(f"no saved VeloVAE in {path} (model.pt missing)")
        config = json.loads((path / "config.json").read_text())
        config.pop("version", None)
        state = torch.load(path / "model.pt", weights_only=False)
        if list(adata.obs_names) != state["obs_names"] or list(adata.var_names) != state[
            "var_names"
        ]:
            raise InputError("adata's cells or genes differ from those the model was saved with")
        hidden = config.pop("hidden")
        split_fractions = tuple(config.pop("split_fractions"))
        vae = cls(adata, hidden=tuple(hidden), split_fractions=split_fractions,
                  _split=state["split"], **config)
        vae.model.load_state_dict(state["model"])
        vae.guide.load_state_dict(state["guide"])
        vae.history = TrainingHistory(**state["history"])
        vae.is_trained = state["is_trained"]
        vae.model.eval()
        vae.guide.eval()
        return vae

