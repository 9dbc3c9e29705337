"""The pyro-velo command line: demo, fit, and its errors and exit codes."""

import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

import pyro_velo as pv
from pyro_velo import cli
from pyro_velo._checks import InputError


def test_demo_writes_h5ad_and_figure(tmp_path, capsys):
    code = cli.main(["demo", "-o", str(tmp_path), "--n-cells", "300", "--n-genes", "40",
                     "--max-epochs", "15", "--quiet"])
    assert code == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "Spearman" in out and "MSE train / test" in out
    adata = ad.read_h5ad(tmp_path / "demo.h5ad")
    assert "latent_time" in adata.obs and "velocity" in adata.layers
    assert (tmp_path / "summary.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def raw_h5ad(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "raw.h5ad"
    pv.datasets.simulate(n_cells=200, n_genes=40, topology="linear", seed=2).write_h5ad(path)
    return path


def test_fit_runs_on_a_users_file(raw_h5ad, tmp_path):
    out = tmp_path / "out.h5ad"
    code = cli.main(["fit", str(raw_h5ad), "-o", str(out), "--max-epochs", "5", "--quiet",
                     "--n-neighbors", "15", "--save-model", str(tmp_path / "model")])
    assert code == cli.EXIT_OK
    adata = ad.read_h5ad(out)
    assert adata.uns["velocity_params"]["mode"] == "pyro_velo"
    assert np.isfinite(adata.obs["latent_time"]).all()
    assert (tmp_path / "model" / "model.pt").exists()
    # an existing output is not overwritten silently
    assert cli.main(["fit", str(raw_h5ad), "-o", str(out), "--quiet"]) == cli.EXIT_USAGE


def test_fit_errors_have_exit_codes(raw_h5ad, tmp_path, capsys):
    missing = tmp_path / "nope.h5ad"
    assert cli.main(["fit", str(missing), "-o", str(tmp_path / "o.h5ad")]) == cli.EXIT_USAGE
    assert "not found" in capsys.readouterr().err
    garbage = tmp_path / "garbage.h5ad"
    garbage.write_text("not an h5ad file")
    assert cli.main(["fit", str(garbage), "-o", str(tmp_path / "o.h5ad")]) == cli.EXIT_BAD_INPUT
    assert "cannot read" in capsys.readouterr().err
    code = cli.main(["fit", str(raw_h5ad), "-o", str(tmp_path / "o.h5ad"),
                     "--spliced-layer", "exonic"])
    assert code == cli.EXIT_BAD_INPUT
    assert "exonic" in capsys.readouterr().err
    code = cli.main(["fit", str(raw_h5ad), "-o", str(tmp_path / "no_dir" / "o.h5ad")])
    assert code == cli.EXIT_USAGE


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "pyro_velo.cli", "--help"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "demo" in result.stdout and "fit" in result.stdout


@pytest.mark.parametrize(("flag", "option", "default"),
                         [("--threads", "num_threads", None), ("--n-starts", "n_starts", 1)])
def test_count_options_reach_training(monkeypatch, tmp_path, flag, option, default):
    options = {}
    monkeypatch.setattr(pv.VeloVAE, "train", lambda self, **kw: options.update(kw))
    monkeypatch.setattr(pv.VeloVAE, "export_to_anndata", lambda self, adata: None)
    args = cli.build_parser().parse_args(["demo", flag, "3", "-o", str(tmp_path)])
    adata = pv.datasets.simulate(n_cells=60, n_genes=20, topology="linear", seed=0)
    pv.pp.preprocess(adata, n_neighbors=10, n_pcs=10)
    cli._fit(adata, args)
    assert options[option] == 3
    cli._fit(adata, cli.build_parser().parse_args(["demo", "-o", str(tmp_path)]))
    assert options[option] == default
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", flag, "0"])


def test_threads_may_follow_the_load():
    assert cli.build_parser().parse_args(["demo", "--threads", "auto"]).threads == "auto"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--threads", "many"])


@pytest.mark.parametrize("option", ["compile", "bf16"])
@pytest.mark.parametrize("choice, value", [("auto", None), ("yes", True), ("no", False)])
def test_switch_options_reach_training(monkeypatch, tmp_path, option, choice, value):
    options = {}
    monkeypatch.setattr(pv.VeloVAE, "train", lambda self, **kw: options.update(kw))
    monkeypatch.setattr(pv.VeloVAE, "export_to_anndata", lambda self, adata: None)
    args = cli.build_parser().parse_args(["demo", f"--{option}", choice, "-o", str(tmp_path)])
    adata = pv.datasets.simulate(n_cells=60, n_genes=20, topology="linear", seed=0)
    pv.pp.preprocess(adata, n_neighbors=10, n_pcs=10)
    cli._fit(adata, args)
    assert options[option] is value
    other = {"compile": "bf16", "bf16": "compile"}[option]
    assert options[other] is None  # left at its default
    assert getattr(cli.build_parser().parse_args(["demo"]), option) == "auto"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", f"--{option}", "maybe"])


def test_lr_schedule_option_reaches_training(monkeypatch, tmp_path):
    options = {}
    monkeypatch.setattr(pv.VeloVAE, "train", lambda self, **kw: options.update(kw))
    monkeypatch.setattr(pv.VeloVAE, "export_to_anndata", lambda self, adata: None)
    adata = pv.datasets.simulate(n_cells=60, n_genes=20, topology="linear", seed=0)
    pv.pp.preprocess(adata, n_neighbors=10, n_pcs=10)
    cli._fit(adata, cli.build_parser().parse_args(["demo", "-o", str(tmp_path)]))
    assert options["lr_schedule"] is False
    cli._fit(adata, cli.build_parser().parse_args(["demo", "--lr-schedule", "-o",
                                                    str(tmp_path)]))
    assert options["lr_schedule"] is True


def test_rate_history_option_reaches_the_model(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(pv.VeloVAE, "train", lambda self, **kw: seen.update(self.config))
    monkeypatch.setattr(pv.VeloVAE, "export_to_anndata", lambda self, adata: None)
    adata = pv.datasets.simulate(n_cells=60, n_genes=20, topology="linear", seed=0)
    pv.pp.preprocess(adata, n_neighbors=10, n_pcs=10)
    args = cli.build_parser().parse_args(["demo", "--rate-history", "ancestors", "-o",
                                          str(tmp_path)])
    cli._fit(adata, args)
    assert seen["rate_history"] == "ancestors"
    assert cli.build_parser().parse_args(["demo"]).rate_history == "constant"
    args = cli.build_parser().parse_args(["demo", "--model", "basic", "--rate-history",
                                          "ancestors", "-o", str(tmp_path)])
    with pytest.raises(InputError, match="model='full'"):
        cli._fit(adata, args)
