"""Scale and speed: seconds per epoch and peak memory streaming from disk, Pyro overhead.

Usage::

    python benchmarks/scale.py [--sizes 10000 100000 1000000] [--genes 2000]
                               [--data-dir benchmarks/scale_data] [--quick]
                               [--results benchmarks/RESULTS.md]

For each size a simulated file (:func:`pyro_velo.datasets.simulate_h5ad`, bifurcation,
seed 0; dense float32 ``Mu``/``Ms``) is generated once into ``--data-dir`` (cached: the
generation's time and peak memory are kept beside it in ``<file>.json``). Then, each in a
fresh Python process so that its peak resident memory is its own:

(a, b) ``train``: ``pv.VeloVAE(path)`` (the full model, streaming ``Mu``/``Ms`` from the
    file; construction = one pass over the file for the per-gene scales and checks, a
    20k-cell sample loaded for the initialisation), then one full-model training run of
    ``--epochs`` epochs, each epoch timed: ``pyro_velo.inference.fit(vae.model, vae.guide,
    vae.data, max_epochs=EPOCHS, early_stopping=False)`` on one torch thread (so that
    the figures compare across sizes and loads), timed by a
    :class:`pyro_velo.inference.Timer` callback: block-shuffled minibatches of 128 over
    the 70% training cells, then the validation ELBO over the 10% validation cells (held
    in memory after the first epoch reads them; at most 256 MiB of them). Reported:
    seconds per epoch (median), of it the seconds spent reading and scaling rows from
    the file and the validation pass, and the process's peak resident memory
    (``VmHWM``) over the whole run (imports, construction, epochs).
(c) ``overhead``: one training step (Trace_ELBO loss module + backward + Adam, as
    ``pyro_velo.inference.fit``) of the full model on in-memory minibatches of 128 cells
    x ``--genes`` genes, against a plain-torch function computing the same ELBO by hand
    with the same networks (encoder -> Normal q(t), q(c), rsample, decoder rho, the
    switching solution of :mod:`pyro_velo.kinetics`, Normal log-likelihoods, log prior -
    log q, scaled by n / batch). Both losses are first compared on the same random
    draws. Steps are timed in alternating rounds so that a change of machine load hits
    both alike; with distribution argument validation on (the default) and off.
(d) ``pancreas``: ``pv.datasets.simulate(3700, 2000)`` + ``pv.pp.preprocess`` in memory,
    then the default ``pv.VeloVAE(adata).train()`` (``--rate-history ancestors``: with
    the ancestors' rates): wall time and epochs per stage, on torch's default threads
    (one per core) or ``--threads N``; ``--profile`` adds a
    pyinstrument profile of ``train()`` (needs ``pip install pyinstrument``).

Machine load (``os.getloadavg`` and the busiest other processes) is recorded around every
measurement: the CPU may be shared. ``--results`` writes the table, the commands and the
load into the "Scale and speed" section of that markdown file (between
``<!-- scale.py begin -->`` / ``<!-- scale.py end -->`` markers, replacing an earlier run's
block; the section is appended at the end if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- scale.py begin -->", "<!-- scale.py end -->"
SECTION = "## Scale and speed"
PANCREAS_CELLS, PANCREAS_GENES = 3700, 2000
TARGETS = {"rss_gb_1m": 4.0, "linear_ratio": 12.0, "overhead": 1.3, "pancreas_s": 180.0}


# ---- measurements common to the children ---------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident memory of this process (``VmHWM``; ``ru_maxrss`` as a fallback)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current resident memory of this process (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_model() -> str | None:
    """The processor's model name (timings differ several-fold between CPU models)."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_load() -> dict:
    """Load averages and the busiest processes (other than this benchmark's own)."""
    try:
        ps = subprocess.run(["ps", "-eo", "pid,pcpu,rss,etime,args", "--sort=-pcpu"],
                            capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        ps = []
    mine = {str(os.getpid())}
    busy = [f"pid {line.split()[0]} at {line.split()[1]}% CPU: "
            + " ".join(line.split()[4:])[:70]
            for line in ps[1:] if line.split() and line.split()[0] not in mine
            and float(line.split()[1]) >= 5.0 and "ps -eo" not in line][:5]
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "busy": busy}


# ---- children: each runs in a fresh process ------------------------------------------
def child_generate(args: argparse.Namespace) -> dict:
    import pyro_velo as pv

    start = time.perf_counter()
    pv.datasets.simulate_h5ad(args.path, args.n_cells, args.genes, seed=0,
                              progress_bar=args.progress, overwrite=True)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
            "bytes": Path(args.path).stat().st_size}


def child_train(args: argparse.Namespace) -> dict:
    import pyro_velo as pv
    from pyro_velo._threads import cpu_threads

    rss_imports = rss_mb()
    start = time.perf_counter()
    vae = pv.VeloVAE(args.path, seed=0)  # full model, streaming
    construct = time.perf_counter() - start
    rss_constructed = rss_mb()
    data = vae.data
    timer = pv.inference.Timer()  # seconds per epoch, reading and validation
    pv.train.set_seed(0)
    with cpu_threads(1):
        pv.inference.fit(vae.model, vae.guide, data, max_epochs=args.epochs[0],
                         early_stopping=False, progress_bar=args.progress, callbacks=[timer])
    epochs = timer.epochs
    n_train = len(data.indices("train"))
    return {"n_cells": data.n_cells, "n_genes": data.n_genes, "n_train": n_train,
            "steps": -(-n_train // 128), "construct_s": construct, "epochs": epochs,
            "rss_imports_mb": rss_imports, "rss_constructed_mb": rss_constructed,
            "peak_rss_mb": peak_rss_mb()}


def _adam(module):
    """Adam with the two parameter groups of the training loop (and its implementation)."""
    from pyro_velo.inference.loop import adam, ode_parameter_ids

    ids = ode_parameter_ids(module)
    ode = [p for p in module.parameters() if id(p) in ids]
    net = [p for p in module.parameters() if id(p) not in ids]
    return adam([{"params": net, "lr": 2e-4}, {"params": ode, "lr": 1e-2}])


def child_overhead(args: argparse.Namespace) -> dict:
    import anndata
    import h5py
    import pyro
    import torch
    from torch.distributions import Distribution
    from torch.distributions import Normal as TorchNormal

    import pyro_velo as pv
    from pyro_velo import kinetics
    from pyro_velo.disk import read_annotations
    from pyro_velo.train import local_params, loss_module

    torch.set_num_threads(1)
    n = min(args.overhead_cells, args.n_cells)
    with h5py.File(args.path, "r") as file:  # in memory: no I/O in the steps
        layers = {k: file[f"layers/{k}"][:n] for k in ("Mu", "Ms")}
    obs, var = read_annotations(args.path)
    adata = anndata.AnnData(obs=obs.iloc[:n], var=var, layers=layers)
    pair = []
    for _ in range(2):  # identical initial parameters (same seed)
        vae = pv.VeloVAE(adata, seed=0)
        vae.model.train()
        vae.guide.train()
        pair.append((vae.model, vae.guide))
    data = vae.data
    train_idx = data.indices("train")
    n_obs = len(train_idx)
    gen = torch.Generator().manual_seed(0)
    batches = [a for _, a, _ in data.minibatches(train_idx, args.batch_size, n_obs,
                                                   generator=gen)
               if len(a[2]) == args.batch_size][:32]

    (model_p, guide_p), (model_t, guide_t) = pair
    elbo = loss_module(model_p, guide_p)

    def plain_loss(u, s, idx, n_obs, velocity=True):
        t_loc, t_scale, c_loc, c_scale = guide_t.encoder(u, s)
        q_t, q_c = TorchNormal(t_loc, t_scale), TorchNormal(c_loc, c_scale)
        t, c = q_t.rsample(), q_c.rsample()
        r = model_t.rates()
        rate = model_t.decoder(c) * r["alpha"]
        u_hat, s_hat, alpha_t = kinetics.switching_solve(
            t.unsqueeze(-1), rate, r["beta"], r["gamma"], r["t_on"], r["t_off"])
        if velocity:  # the model computes the velocities too (unused by the ELBO)
            kinetics.velocity(u_hat, s_hat, alpha_t, r["beta"], r["gamma"])
        lik = model_t.likelihood
        prior_t, prior_c = model_t.time_prior, model_t.state_prior
        log_p = (TorchNormal(r["scale_u"] * u_hat, lik.log_sigma_u.exp()).log_prob(u).sum(-1)
                 + TorchNormal(s_hat, lik.log_sigma_s.exp()).log_prob(s).sum(-1)
                 + TorchNormal(prior_t.loc, prior_t.scale).log_prob(t)
                 + TorchNormal(0.0, prior_c.scale).log_prob(c).sum(-1))
        log_q = q_t.log_prob(t) + q_c.log_prob(c).sum(-1)
        return -(n_obs / u.shape[0]) * (log_p - log_q).sum()

    # sanity check: same parameters, same random draws -> same loss and gradients
    u, s, idx, n_obs_b = batches[0]
    with local_params():
        torch.manual_seed(123)
        loss_p = elbo(u, s, idx, n_obs_b)
    torch.manual_seed(123)
    loss_t = plain_loss(u, s, idx, n_obs_b)
    loss_p.backward()
    loss_t.backward()
    grad_p = guide_p.encoder.body[0].weight.grad
    grad_t = guide_t.encoder.body[0].weight.grad
    check = {"pyro_loss": loss_p.item(), "torch_loss": loss_t.item(),
             "loss_rel_diff": abs(loss_p.item() - loss_t.item()) / abs(loss_t.item()),
             "grad_rel_diff": ((grad_p - grad_t).norm() / grad_t.norm()).item()}
    for module in (model_p, guide_p, model_t, guide_t):
        module.zero_grad(set_to_none=True)

    opt_p, opt_t = _adam(elbo), _adam(torch.nn.ModuleList([model_t, guide_t]))

    def pyro_steps(k):
        with local_params():
            for i in range(k):
                loss = elbo(*batches[i % len(batches)])
                opt_p.zero_grad()
                loss.backward()
                opt_p.step()

    def torch_steps(k, velocity=True):
        for i in range(k):
            loss = plain_loss(*batches[i % len(batches)], velocity=velocity)
            opt_t.zero_grad()
            loss.backward()
            opt_t.step()

    def measure(validate: bool) -> dict:
        pyro.enable_validation(validate)
        Distribution.set_default_validate_args(validate)
        pyro_steps(5)
        torch_steps(5)
        times = {"pyro": 0.0, "torch": 0.0, "torch_no_velocity": 0.0}
        rounds = 5
        per = max(1, args.steps // rounds)
        for _ in range(rounds):
            for name, run in (("pyro", pyro_steps), ("torch", torch_steps),
                              ("torch_no_velocity", lambda k: torch_steps(k, False))):
                t0 = time.perf_counter()
                run(per)
                times[name] += time.perf_counter() - t0
        ms = {f"{k}_ms": 1000 * v / (per * rounds) for k, v in times.items()}
        return {**ms, "ratio": times["pyro"] / times["torch"],
                "ratio_no_velocity": times["pyro"] / times["torch_no_velocity"],
                "steps": per * rounds}

    result = {"check": check, "batch_size": args.batch_size, "n_genes": data.n_genes,
              "validation_on": measure(True), "validation_off": measure(False)}
    pyro.enable_validation(True)
    Distribution.set_default_validate_args(True)
    return result


def child_pancreas(args: argparse.Namespace) -> dict:
    import pyro_velo as pv

    start = time.perf_counter()
    adata = pv.datasets.simulate(n_cells=args.n_cells, n_genes=args.genes, seed=0)
    simulate_s = time.perf_counter() - start
    start = time.perf_counter()
    pv.pp.preprocess(adata)
    preprocess_s = time.perf_counter() - start
    timer = pv.inference.Timer()  # wall time of every stage's loop
    profiler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.005)
    start = time.perf_counter()
    vae = pv.VeloVAE(adata, rate_history=args.rate_history)
    construct_s = time.perf_counter() - start
    if profiler is not None:
        profiler.start()
    import torch

    threads = args.threads or torch.get_num_threads()
    start = time.perf_counter()
    history = vae.train(progress_bar=args.progress, num_threads=args.threads,
                        callbacks=[timer])
    train_s = time.perf_counter() - start
    profile = None
    if profiler is not None:
        profiler.stop()
        profile = profiler.output_text(unicode=False, color=False, show_all=False)
        Path(args.profile).write_text(profile)
    bounds = [first for _, first in history.stages] + [len(history.train)]
    stages = {name: bounds[i + 1] - bounds[i] for i, (name, _) in enumerate(history.stages)}
    return {"n_cells": adata.n_obs, "n_genes": int(vae.data.n_genes),
            "simulate_s": simulate_s, "preprocess_s": preprocess_s,
            "construct_s": construct_s, "train_s": train_s, "stages": stages,
            "stage_seconds": [(name, seconds) for name, seconds, _ in timer.stages],
            "warm_start": vae.config.get("warm_start"),
            "refined": vae.config.get("refined"), "stopped_early": history.stopped_early,
            "train_cells": int((vae.data.split == 0).sum()), "peak_rss_mb": peak_rss_mb(),
            "threads": threads, "rate_history": args.rate_history}


CHILDREN = {"generate": child_generate, "train": child_train, "overhead": child_overhead,
            "pancreas": child_pancreas}


# ---- the parent: orchestration and report ---------------------------------------------
def run_child(kind: str, log: Path, **options) -> dict:
    """Run one measurement in a fresh interpreter; its stderr goes to ``log``."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        out_path = Path(out.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind,
           "--child-out", str(out_path)]
    for key, value in options.items():
        if value is None or value is False:
            continue
        cmd.append("--" + key.replace("_", "-"))
        if value is not True:
            cmd.append(str(value))
    before = machine_load()
    print(f"[{time.strftime('%H:%M:%S')}] {kind}: {shlex.join(cmd[1:])}", flush=True)
    with open(log, "a") as err:
        err.write(f"\n==== {kind} {options}\n")
        err.flush()
        proc = subprocess.run(cmd, stdout=err, stderr=err)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed (exit {proc.returncode}); see {log}")
    result = json.loads(out_path.read_text())
    out_path.unlink()
    result["load_before"], result["load_after"] = before, machine_load()
    print(f"    -> {json.dumps({k: v for k, v in result.items() if not k.startswith('load')})}",
          flush=True)
    return result


def data_file(data_dir: Path, n_cells: int, n_genes: int, log: Path, progress: bool
              ) -> tuple[Path, dict]:
    """The cached simulated file (generated in a child process when missing)."""
    path = data_dir / f"sim_{n_cells}x{n_genes}_seed0.h5ad"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        return path, {**json.loads(meta.read_text()), "cached": True}
    result = run_child("generate", log, path=path, n_cells=n_cells, genes=n_genes,
                       progress=progress)
    meta.write_text(json.dumps(result, indent=1))
    return path, {**result, "cached": False}


def fmt_load(result: dict) -> str:
    a, b = result["load_before"]["loadavg"][0], result["load_after"]["loadavg"][0]
    return f"{a:.1f} / {b:.1f}"


def merge(parts: list[dict]) -> dict:
    """One result from several runs (``--from-json``): sizes, overhead, pancreas, loads."""
    merged = {**parts[0], "sizes": [], "loads": [], "runs": []}
    for part in parts:
        merged["sizes"] += part["sizes"]
        merged["loads"] += part["loads"]
        merged["runs"] += part.get("runs") or [
            {"started": part["started"], "commit": part["commit"], "argv": part["argv"]}]
        for key in ("overhead", "pancreas", "pancreas_genes"):
            if key in part:
                merged[key] = part[key]
    merged["sizes"].sort(key=lambda row: row["n_cells"])
    return merged


def report(results: dict) -> str:
    """Markdown block: tables, targets, commands, machine load."""
    runs = results.get("runs") or [{"started": results["started"],
                                    "commit": results["commit"], "argv": results["argv"]}]
    lines = [BEGIN, "",
             f"Machine: {results['cpus']} CPU cores"
             + (f" ({results['cpu_model']})" if results.get("cpu_model") else "")
             + f", {results['mem_gb']:.0f} GB RAM, no GPU; "
             "torch on one thread for (a-c). Commands (run from the repository "
             "root):", "", "```bash"]
    lines += [f"# {run['started']}, {run['commit']}\npython " + shlex.join(run["argv"])
              for run in runs]
    lines += ["```", ""]
    sizes = results["sizes"]
    if sizes:
        lines += ["**(a, b) Streaming from disk, full model** (one epoch = block-shuffled "
                  "minibatches of 128 over the 70% training cells + the validation ELBO over "
                  "the 10% validation cells; one `fit(vae.model, vae.guide, vae.data, "
                  "max_epochs=EPOCHS, early_stopping=False)`, each epoch timed; the "
                  "validation cells are read once, in the first epoch; peak RSS = `VmHWM` "
                  "of the process "
                  "over imports, construction and all epochs):", "",
                  "| cells x genes | file (GB) | generate (s) | construct (s) | epochs timed "
                  "| s / epoch | of it: reading rows (s) | of it: validation pass (s) | steps / "
                  "epoch | ms / step (reads included) | peak RSS (GiB) | load avg before / "
                  "after |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in sizes:
            t, g = row["train"], row["generate"]
            per = statistics.median(e["seconds"] for e in t["epochs"])
            read = statistics.median(e["read"] for e in t["epochs"])
            val = statistics.median(e["validation"] for e in t["epochs"])
            lines.append(
                f"| {row['n_cells']:,} x {t['n_genes']} | {g['bytes'] / 1e9:.2f} | "
                f"{g['seconds']:.0f} | {t['construct_s']:.1f} | {len(t['epochs'])} | "
                f"{per:.1f} | {read:.1f} | {val:.1f} | {t['steps']} | "
                f"{1000 * (per - val) / t['steps']:.1f} | {t['peak_rss_mb'] / 1024:.2f} | "
                f"{fmt_load(t)} |")
        lines.append("")
        by_n = {row["n_cells"]: row for row in sizes}
        ratios = []
        for small, big in ((10_000, 100_000), (100_000, 1_000_000)):
            if small in by_n and big in by_n:
                a = statistics.median(e["seconds"] for e in by_n[small]["train"]["epochs"])
                b = statistics.median(e["seconds"] for e in by_n[big]["train"]["epochs"])
                ratios.append(f"{big:,} / {small:,} cells: {b / a:.2f}x time per epoch "
                              "(10x cells)")
        if ratios:
            lines += ["Linearity: " + "; ".join(ratios) + ".", ""]
    if results.get("overhead"):
        o = results["overhead"]
        c = o["check"]
        lines += [f"**(c) Pyro step vs plain torch** (full model, in-memory minibatches of "
                  f"{o['batch_size']} cells x {o['n_genes']} genes; step = loss + backward + "
                  "Adam; same networks and parameters; 5 alternating rounds):", "",
                  "| distribution validation | Pyro Trace_ELBO (ms / step) | plain torch, "
                  "same computation (ms / step) | ratio | plain torch without the unused "
                  "velocities (ms / step) | ratio | load avg before / after |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for key, label in (("validation_on", "on (default)"), ("validation_off", "off")):
            m = o[key]
            lines.append(f"| {label} | {m['pyro_ms']:.2f} | {m['torch_ms']:.2f} | "
                         f"{m['ratio']:.3f} | {m['torch_no_velocity_ms']:.2f} | "
                         f"{m['ratio_no_velocity']:.3f} | {fmt_load(o)} |")
        lines += ["", f"Same draws (seeded): Pyro loss {c['pyro_loss']:.6g}, plain-torch loss "
                  f"{c['torch_loss']:.6g} (relative difference {c['loss_rel_diff']:.1e}); "
                  f"first encoder layer's gradients differ by {c['grad_rel_diff']:.1e} "
                  "(relative norm).", ""]
    if results.get("pancreas"):
        p = results["pancreas"]
        stages = ", ".join(f"{k} {v}" for k, v in p["stages"].items())
        stage_s = ", ".join(f"{name} {sec:.0f} s" for name, sec in p["stage_seconds"])
        lines += [f"**(d) Pancreas-size run** (`simulate(n_cells={p['n_cells']}, "
                  f"n_genes={results['pancreas_genes']})` + `pp.preprocess` -> "
                  f"{p['n_genes']} fitted genes, {p['train_cells']} training cells; default "
                  f"`VeloVAE(adata, rate_history='{p.get('rate_history', 'constant')}')"
                  f".train()` on {p.get('threads', 1)} torch thread(s)):", "",
                  "| simulate (s) | preprocess (s) | construct (s) | train (s) | epochs per "
                  "stage | seconds per stage | warm start | refined | peak RSS (GiB) | "
                  "load avg before / after |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
                  f"| {p['simulate_s']:.0f} | {p['preprocess_s']:.0f} | {p['construct_s']:.1f} "
                  f"| {p['train_s']:.0f} | {stages} | {stage_s} | {p['warm_start']} | "
                  f"{p['refined']} | {p['peak_rss_mb'] / 1024:.2f} | {fmt_load(p)} |", ""]
    busy = sorted({b for r in results["loads"] for b in r})
    lines += ["Other processes using >= 5% CPU when a measurement started (`ps`; CPU% is "
              "averaged over each process's life):", ""]
    lines += [f"- `{b}`" for b in busy] or ["- none"]
    lines += ["", END]
    return "\n".join(lines)


def write_results(path: Path, block: str) -> None:
    """Put ``block`` into the "Scale and speed" section of ``path`` (replacing a previous
    block between the markers, or appending the section at the end)."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--data-dir", type=Path, default=HERE / "scale_data")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (2000, 5000 cells x 200 genes), few steps, a small "
                             "pancreas-like run; for trying the script")
    parser.add_argument("--epochs", type=int, nargs="+", default=None,
                        help="epochs timed per size (default 3 below 1M cells, 1 from 1M)")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per method (c)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["train", "overhead", "pancreas"],
                        help="measurements to leave out (all three: only generate the files)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="write a pyinstrument profile of the pancreas-size train() here")
    parser.add_argument("--results", type=Path, default=None,
                        help="markdown file to write the 'Scale and speed' block into")
    parser.add_argument("--json", type=Path, default=None, help="also save raw results here")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None,
                        help="measure nothing: report the results saved by earlier runs' "
                             "--json (merged)")
    parser.add_argument("--progress", action="store_true", help="progress bars (to the log)")
    parser.add_argument("--rate-history", choices=["constant", "ancestors"],
                        default="constant", help="VeloVAE(rate_history=...) of (d)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the pancreas-size train() (default: torch's)")
    # internal: one measurement in a child process
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n-cells", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--overhead-cells", type=int, default=5000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = CHILDREN[args.child](args)
        args.child_out.write_text(json.dumps(result))
        return

    if args.from_json:
        block = report(merge([json.loads(p.read_text()) for p in args.from_json]))
        print(block)
        if args.results:
            write_results(args.results, block)
            print(f"written to {args.results}")
        return
    if args.quick:
        if "--sizes" not in argv:
            args.sizes = [2000, 5000]
        if "--genes" not in argv:
            args.genes = 200
        if "--steps" not in argv:
            args.steps = 40
    args.data_dir.mkdir(parents=True, exist_ok=True)
    log = args.data_dir / "scale.log"
    print(f"log of the child processes: {log}", flush=True)
    try:
        commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain",
                                "--untracked-files=no", "--", "../pyro_velo"],
                               capture_output=True, text=True).stdout.strip()
        commit = f"commit {commit}" + (", with uncommitted changes in pyro_velo/"
                                       if dirty else "")
    except OSError:
        commit = "commit unknown"
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M"), "commit": commit,
                     "cpus": os.cpu_count(), "cpu_model": cpu_model(),
                     "mem_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
                     "sizes": [], "loads": [], "argv": ["benchmarks/scale.py", *argv]}
    files = {}
    generate_only = {"train", "overhead", "pancreas"} <= set(args.skip)
    for i, n in enumerate(args.sizes):
        if "train" in args.skip and not generate_only:
            continue
        path, gen = data_file(args.data_dir, n, args.genes, log, args.progress)
        files[n] = path
        if "train" in args.skip:
            continue
        epochs = (args.epochs[min(i, len(args.epochs) - 1)] if args.epochs
                  else (1 if n >= 1_000_000 else 3))
        train = run_child("train", log, path=path, epochs=epochs, progress=args.progress)
        results["loads"].append(train["load_before"]["busy"])
        results["sizes"].append({"n_cells": n, "generate": gen, "train": train})
    if "overhead" not in args.skip:
        n = min(args.sizes)
        path = files.get(n) or data_file(args.data_dir, n, args.genes, log, args.progress)[0]
        results["overhead"] = run_child("overhead", log, path=path, n_cells=n,
                                        steps=args.steps, batch_size=args.batch_size)
        results["loads"].append(results["overhead"]["load_before"]["busy"])
    if "pancreas" not in args.skip:
        cells, genes = (600, 200) if args.quick else (PANCREAS_CELLS, PANCREAS_GENES)
        results["pancreas_genes"] = genes
        results["pancreas"] = run_child("pancreas", log, n_cells=cells, genes=genes,
                                        profile=args.profile, progress=args.progress,
                                        threads=args.threads, rate_history=args.rate_history)
        results["loads"].append(results["pancreas"]["load_before"]["busy"])
    block = report(results)
    print(block)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.results:
        write_results(args.results, block)
        print(f"written to {args.results}")


if __name__ == "__main__":
    main()
