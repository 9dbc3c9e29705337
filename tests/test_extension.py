"""Extension by objects: a user's model class or instance, its declared ODE parameters and
its exported per-gene values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pyro_velo as pv
from pyro_velo._checks import InputError
from pyro_velo.inference.loop import loss_module, ode_parameter_ids

SMALL = dict(hidden=(8,), latent_dim=2, seed=0)
QUICK = dict(max_epochs=2, warmup_epochs=1, refine_epochs=0, progress_bar=False,
             num_threads=1)


class WithOffset(pv.model.FullModel):
    """A full model with one more per-gene parameter, declared and exported."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_offset = nn.Parameter(torch.zeros(self.n_genes))

    def ode_parameters(self):
        return [*super().ode_parameters(), self.log_offset]

    def gene_parameters(self, gene_scale_u, gene_scale_s):
        values = super().gene_parameters(gene_scale_u, gene_scale_s)
        values["offset"] = self.log_offset.detach().cpu().double().exp().numpy()
        return values


@pytest.fixture(scope="module")
def adata():
    adata = pv.datasets.simulate(n_cells=200, n_genes=20, topology="bifurcation", seed=0)
    pv.pp.preprocess(adata, random_state=0, n_pcs=10)
    return adata


def test_a_model_class_is_built_trained_exported_and_reloaded(adata, tmp_path):
    vae = pv.VeloVAE(adata, model=WithOffset, **SMALL)
    assert type(vae.model) is WithOffset
    assert vae.config["model"] == "full" and vae.config["model_class"] == "custom:WithOffset"
    ode = ode_parameter_ids(vae.model, vae.guide)
    assert id(vae.model.log_offset) in ode and id(vae.model.log_alpha) in ode
    # everything else is a network weight or bias, trained at lr
    named = dict(loss_module(vae.model, vae.guide).named_parameters())
    assert all(name.rsplit(".", 1)[-1] in ("weight", "bias")
               for name, p in named.items() if id(p) not in ode)
    vae.train(**QUICK)
    rates = vae.get_rates()
    np.testing.assert_array_equal(rates.loc[vae.data.fitted, "offset"].to_numpy(),
                                  vae.model.log_offset.detach().double().exp().numpy())
    assert rates.loc[~vae.data.fitted, "offset"].isna().all()
    vae.save(tmp_path / "fit")
    with pytest.raises(InputError, match="custom model .*custom:WithOffset"):
        pv.VeloVAE.load(tmp_path / "fit", adata)
    loaded = pv.VeloVAE.load(tmp_path / "fit", adata, model=WithOffset)
    assert type(loaded.model) is WithOffset
    np.testing.assert_array_equal(loaded.get_latent_time(), vae.get_latent_time())


def test_a_model_instance_is_copied_and_used_as_built(adata):
    template = pv.VeloVAE(adata, model="basic", **SMALL).model
    with torch.no_grad():
        template.log_beta.add_(0.5)  # a user's own starting values
    vae = pv.VeloVAE(adata, model=template, **SMALL)
    assert vae.config["model"] == "basic" and vae.model is not template
    torch.testing.assert_close(vae.model.log_beta, template.log_beta)
    vae.train(**QUICK)
    assert vae.is_trained and not torch.equal(vae.model.log_beta, template.log_beta)


@pytest.mark.parametrize("model", ["fancy", 3, nn.Linear, nn.Linear(2, 2)])
def test_other_models_are_refused(adata, model):
    with pytest.raises(InputError, match="model"):
        pv.VeloVAE(adata, model=model, **SMALL)


class Probe(pv.inference.Stage):
    """A stage without epochs that reads the encoded times of the training cells."""

    name = "probe"

    def __init__(self, model, guide, data, seen):
        super().__init__(model, guide, data, epochs=0)
        self.seen = seen

    def train(self, run, **_):
        self.seen.append(self.predictor().encode(self.data.indices("train"))["t"])


class Probed(pv.VeloVAE):
    """VeloVAE with a :class:`Probe` inserted after the warm-up."""

    seen: list = []

    def schedule(self, basic_model, basic_guide, *epochs):
        stages = super().schedule(basic_model, basic_guide, *epochs)
        assert stages[0].name == "warm-up"
        stages.insert(1, Probe(basic_model, basic_guide, self.data, self.seen))
        return stages


def test_a_stage_inserted_after_the_warm_up_runs_and_is_checkpointed(adata, tmp_path):
    vae = Probed(adata, model="basic", **SMALL)
    vae.train(**QUICK, checkpoint_dir=tmp_path / "run")
    names = [name for name, _ in vae.history.stages]
    assert names == ["warm-up", "probe", "basic"]
    assert dict(vae.history.stages)["probe"] == dict(vae.history.stages)["basic"] == 1
    (times,) = Probed.seen
    assert times.shape == (len(vae.data.indices("train")),) and torch.isfinite(times).all()
    again = Probed(adata, model="basic", **SMALL)  # a finished run resumes as it ended
    again.train(**QUICK, checkpoint_dir=tmp_path / "run", resume=True)
    assert len(Probed.seen) == 1 and again.history.stages == vae.history.stages
    np.testing.assert_array_equal(again.get_latent_time(), vae.get_latent_time())
