# %% [markdown]
# # pyro_velo quick start
#
# Simulate a bifurcating differentiation, preprocess it the scVelo way, fit the
# variational mixture of ODEs, export to AnnData and look at latent time and velocity.
# Runs offline on built-in simulated data in about two minutes on 2 CPU cores:
# `python tutorials/01_quickstart.py` (or open it as a notebook with jupytext).

# %%
import matplotlib

matplotlib.use("Agg")
import scvelo as scv  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import pyro_velo as pv  # noqa: E402

# %% [markdown]
# ## Data: 1000 cells, 200 genes, a root splitting into two branches

# %%
adata = pv.datasets.simulate(n_cells=1000, n_genes=200, topology="bifurcation", seed=0)
pv.pp.preprocess(adata)  # filter, normalise, log1p, HVG, PCA, kNN, Mu/Ms

# %% [markdown]
# ## Fit the full model (cell time t and cell state c per cell)

# %%
vae = pv.VeloVAE(adata, model="full", seed=0)
vae.train(max_epochs=200, batch_size=256, seed=0)
print(vae.evaluate())  # MSE, MAE, log-likelihood on train and held-out test cells

# %% [markdown]
# ## Export and compare with the simulation's ground truth

# %%
vae.export_to_anndata(adata)
print("Spearman(latent time, true time):",
      round(spearmanr(adata.obs["latent_time"], adata.obs["true_t"])[0], 3))
scv.tl.velocity_graph(adata)
fig = pv.pl.summary(adata, vae.history, true_time_key="true_t", show=False)
fig.savefig("quickstart_summary.png", dpi=100)
