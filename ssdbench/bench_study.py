"""How close `ssdbench run` trains a study's small model to the pace of its bare step (GPU).

    python -m ssdbench.bench_study --out results/mine     # or: ssdbench bench study

For each architecture, width D and batch at the Mamba-2 Figure 8 shape (MQAR, T=256,
vocabulary 8192, 2 layers) it runs ``ssdbench run`` for ``--steps`` steps in a fresh process and
reads from its record

* ``run_step_ms``: the loop's mean step time past the first 20 % of steps (captures and
  compiles are over), as the graphed loop measures it between its loss read-backs;
* ``start_s``: seconds from launching the process to the end of its first optimizer step
  (imports, config, data, model, the first step's compiles and autotuning); ``startup`` splits
  it by the record's marks (``startup_s``: the end of each phase from the process's start);

and times the same model's bare training step replayed from a CUDA graph in this process
(``bench_train.time_training``: same batch, same tokens, no data loading, no logging), the
floor the loop can reach. ``ratio`` = run_step_ms / graph_step_ms.

``--lightning`` adds rows for Lightning's loop (``trainer.cuda_graph=false``), whose step time
is the record's wall-time difference between a run of ``--steps`` and one of a fifth as many
steps, over the difference in steps. ``--jobs-per-gpu k`` adds the aggregate tokens/s of k
runs sharing the GPU against one run alone.

``--gather-labels off`` runs with ``trainer.gather_labels=false`` (the loss's head on every
token instead of MQAR's labelled ones only); ``both`` gives a row for each, column
``gather_labels``, to compare them in one call. The bare step computes the head on every
token either way (random tokens, all labelled), so with the gather ``ratio`` can fall below 1.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from ssdbench import bench_report

ARCHS = ("mamba2", "transformerpp", "mamba1", "based")
T, VOCAB = 256, 8192


def overrides(arch: str, d_model: int, batch: int, steps: int, graphs: bool, gather: bool = True) -> list[str]:
    """A Figure 8 shaped run: one MQAR segment at T/4 pairs, 50 batches an epoch, no validation
    until the end and no checkpoint before it (both would be timed in the loop); ``gather``:
    trainer.gather_labels."""
    n_train = 50 * batch
    return [f"model={arch}", "model.n_layers=2", f"model.d_model={d_model}", "task=mqar",
            f"task.vocab_size={VOCAB}", f"task.seq_len={T}", f"task.batch_size={batch}",
            f"task.train_segments=[{{kv_fraction:0.25,num_examples:{n_train}}}]",
            "task.test_segments=[{kv_fraction:0.25,num_examples:256}]",
            f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
            f"checkpoint_every={steps}", "trainer.log_every_n_steps=50",
            f"trainer.cuda_graph={'true' if graphs else 'false'}", f"trainer.gather_labels={str(gather).lower()}",
            "progress_bar=false", "optim.lr=1e-3"]


def launch(args: list[str], results: Path, tag: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ssdbench.cli", "run", *args, f"results_dir={results}", f"study={tag}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def record_of(results: Path, tag: str) -> dict:
    found = list((results / tag).glob("*/record.json"))
    if len(found) != 1:
        raise RuntimeError(f"expected one record under {results / tag}, found {len(found)}")
    return json.loads(found[0].read_text())


def run_once(args: list[str], results: Path, tag: str) -> tuple[dict, float, str]:
    t0 = time.time()
    p = launch(args, results, tag)
    out, _ = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"ssdbench run exited {p.returncode}: {out[-2000:]}")
    return record_of(results, tag), t0, out


def graph_step_ms(arch: str, d_model: int, batch: int) -> float:
    """The bare step of the same model, replayed from a CUDA graph (bench_train's harness)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from ssdbench import bench_train

    GlobalHydra.instance().clear()
    with initialize_config_module("ssdbench.conf", version_base="1.3"):
        cfg = compose("config", overrides=[o for o in overrides(arch, d_model, batch, 10, True)
                                           if o.startswith("model")] + [f"model.vocab_size={VOCAB}"])
    model = instantiate(cfg.model)
    r = bench_train.time_training(model, T, batch, steps=50, warmup=3, compile_=False, cuda_graph=True,
                                  vocab=VOCAB)
    del model
    torch.cuda.empty_cache()
    return r["step_ms"]


def _phases(startup: dict | None) -> str | None:
    """The record's start-up marks as "phase time" pairs, e.g. "imports_and_config 6.1, ...",
    in seconds from the process's start."""
    return None if not startup else ", ".join(f"{k} {v:.1f}" for k, v in startup.items())


def case(arch: str, d_model: int, batch: int, steps: int, results: Path, lightning: bool,
         gathers: tuple[bool, ...] = (True,)) -> list[dict]:
    rows = []
    try:
        floor = graph_step_ms(arch, d_model, batch)
    except Exception as e:  # noqa: BLE001 - one failing case must not end the table
        return [dict(model=arch, d_model=d_model, batch=batch, T=T, loop="graphs",
                     status=f"bare step failed: {type(e).__name__}: {e}"[:160])]
    for gather in gathers:
        rows += _runs(arch, d_model, batch, steps, results, lightning, gather, floor)
    for row in rows:
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    return rows


def _runs(arch: str, d_model: int, batch: int, steps: int, results: Path, lightning: bool, gather: bool,
          floor: float) -> list[dict]:
    """The rows of one case at one trainer.gather_labels: the graphed loop (and Lightning's)."""
    rows = []
    base = dict(model=arch, d_model=d_model, batch=batch, T=T, gather_labels=gather)
    tag = f"{arch}_d{d_model}_b{batch}" + ("" if gather else "_nogather")

    def args(n, graphs):
        return overrides(arch, d_model, batch, n, graphs, gather)

    try:
        r, t0, _ = run_once(args(steps, True), results, tag + "_graphs")
        g = r.get("cuda_graph") or {}
        run_ms = g.get("steady_step_ms")
        rows.append(dict(base, loop=g.get("mode"), graph_step_ms=floor, run_step_ms=run_ms,
                         ratio=run_ms / floor if run_ms else None,
                         start_s=(g["first_step_at"] - t0) if g.get("first_step_at") else None,
                         tokens_per_s=batch * T / (run_ms / 1e3) if run_ms else None,
                         val_acc=(r.get("metrics") or {}).get("val/acc"), fallback=g.get("fallback"),
                         startup=_phases(r.get("startup_s")), status="ok"))
    except Exception as e:  # noqa: BLE001
        rows.append(dict(base, loop="graphs", graph_step_ms=floor, status=f"failed: {e}"[:300]))
    if lightning:
        try:
            short = max(50, steps // 5)
            r_long, _, _ = run_once(args(steps, False), results, tag + "_pl_long")
            r_short, _, _ = run_once(args(short, False), results, tag + "_pl_short")
            ms = 1e3 * (r_long["wall_time_s"] - r_short["wall_time_s"]) / (steps - short)
            rows.append(dict(base, loop="lightning", graph_step_ms=floor, run_step_ms=ms, ratio=ms / floor,
                             tokens_per_s=batch * T / (ms / 1e3), val_acc=(r_long.get("metrics") or {}).get("val/acc"),
                             status="ok"))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(base, loop="lightning", graph_step_ms=floor, status=f"failed: {e}"[:300]))
    return rows


def shared_gpu(arch: str, d_model: int, batch: int, steps: int, k: int, results: Path) -> dict:
    """Aggregate tokens/s of k runs started together on one GPU, against one run alone (each
    run's tokens over its loop's steady step time, summed)."""
    def tok_s(r):
        ms = (r.get("cuda_graph") or {}).get("steady_step_ms")
        return batch * T / (ms / 1e3) if ms else float("nan")

    one, _, _ = run_once(overrides(arch, d_model, batch, steps, True), results, f"share1_{arch}")
    procs = [launch(overrides(arch, d_model, batch, steps, True) + [f"seed={i}"], results, f"share{k}_{arch}_{i}")
             for i in range(k)]
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"a shared run exited {p.returncode}: {out[-1000:]}")
    total = sum(tok_s(record_of(results, f"share{k}_{arch}_{i}")) for i in range(k))
    return dict(model=arch, d_model=d_model, batch=batch, jobs=k, tokens_per_s_one=tok_s(one),
                tokens_per_s_all=total, speedup=total / tok_s(one))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ssdbench bench study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--d-model", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 1024],
                    help="64, and 1024 = 2^18 tokens at T=256 (the Figure 8 protocol's batch)")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--lightning", action="store_true", help="also time Lightning's loop (trainer.cuda_graph=false)")
    ap.add_argument("--gather-labels", choices=("on", "off", "both"), default="on",
                    help="trainer.gather_labels of the runs (off: the head on every token; both: a row each)")
    ap.add_argument("--jobs-per-gpu", type=int, default=0, help="also time k runs sharing the GPU (first model, "
                                                                "first width, first batch)")
    ap.add_argument("--out", type=Path, default=None, help="folder for bench_study.csv / .md")
    args = ap.parse_args(argv)
    if args.steps < 100:
        print("ssdbench bench study: --steps must be at least 100", file=sys.stderr)
        return 2
    bench_report.require_cuda("study")
    gathers = {"on": (True,), "off": (False,), "both": (True, False)}[args.gather_labels]
    rows, share = [], []
    with tempfile.TemporaryDirectory(prefix="ssdbench-study-") as tmp:
        results = Path(tmp)
        for arch in args.models:
            for d in args.d_model:
                for b in args.batch:
                    rows += case(arch, d, b, args.steps, results, args.lightning, gathers)
        if args.jobs_per_gpu > 1:
            share.append(shared_gpu(args.models[0], args.d_model[0], args.batch[0], args.steps,
                                    args.jobs_per_gpu, results))
    df = pd.DataFrame(rows)
    bench_report.print_table(df, f"ssdbench run against the bare graph step on {torch.cuda.get_device_name()}")
    bench_report.write(df, args.out, "bench_study", "ssdbench.bench_study", argv)
    if share:
        sf = pd.DataFrame(share)
        bench_report.print_table(sf, "runs sharing one GPU")
        bench_report.write(sf, args.out, "bench_study_shared", "ssdbench.bench_study", argv)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
