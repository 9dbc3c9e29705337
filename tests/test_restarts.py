"""Restarts (``train(n_starts=k)``) on a set where single starts fail.

The 1000 x 100 2-branch simulation with data seed 3 has few root cells (9%). With
neighbourhood size factors, single fits put its branches on different clocks at model
seeds 0 and 2 of seeds 0-5 (Spearman 0.82 and 0.79 against 0.94-0.97), and those fits
have the lower validation ELBO (``benchmarks/restarts.py``).

Among the fits on one clock the ELBO does not rank the velocity, and their velocity
depends on the processor's rounding: on an AMD EPYC, model seeds 0-3 give cosines 0.51
and 0.50 for the two that split the clocks and 0.78 and 0.88 for the two that do not,
and the ELBO keeps the 0.78 (0.83 on a Xeon). The velocity bar therefore separates the
two kinds of fit instead of ranking fits of one kind.
"""

import warnings

import numpy as np
import pytest
from scipy.stats import spearmanr

import pyro_velo as pv

pytestmark = pytest.mark.slow


def test_restarts_keep_a_fit_with_the_branches_on_one_clock():
    adata = pv.datasets.simulate(n_cells=1000, n_genes=100, topology="bifurcation",
                                 n_branches=2, noise="nb", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pv.pp.preprocess(adata, random_state=0, size_factors="neighbourhood")
    vae = pv.VeloVAE(adata, seed=0)
    vae.train(progress_bar=False, seed=0, n_starts=2)
    losses = vae.config["start_losses"]
    assert vae.config["start"] == int(np.argmin(losses))
    assert spearmanr(vae.get_latent_time(), adata.obs["true_t"])[0] >= 0.9
    branch = adata.obs["branch"].astype(str).to_numpy()
    latent, true_t = vae.get_latent_time(), adata.obs["true_t"].to_numpy()
    # the branches' clocks agree: late cells of both branches reach similar latent times
    late = true_t > np.quantile(true_t, 0.75)
    medians = [np.median(latent[late & (branch == b)]) for b in ("branch_1", "branch_2")]
    assert abs(medians[0] - medians[1]) < 0.1 * vae.config["t_max"], medians
    genes = vae.data.fitted
    velocity = vae.get_velocity()[0][:, genes]
    truth = adata.layers["true_velocity"][:, genes]
    cosine = (velocity * truth).sum(1) / (np.linalg.norm(velocity, axis=1)
                                          * np.linalg.norm(truth, axis=1) + 1e-12)
    assert cosine.mean() >= 0.7, cosine.mean()  # clocks split: 0.50-0.51
