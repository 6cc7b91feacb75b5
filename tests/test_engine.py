"""The study engine (ssdbench/engine.py): its loop trains what Lightning's loop trains, resumes
exactly, and replays steps from CUDA graphs on a GPU without changing what a run computes.

On a CPU the engine's loop runs without graphs when SSDBENCH_ENGINE_ON_CPU=1 (the loop, the
schedule, clipping, the optimizer and the data order are the same code that replays graphs on
a GPU); the GPU tests compare the graphed loop with Lightning's on the device.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ON_GPU
from test_cli import TINY, _env, ssdbench

from ssdbench import engine, preflight
from ssdbench.errors import ConfigError

pytestmark = pytest.mark.slow
cpu_only = pytest.mark.skipif(ON_GPU, reason="the engine's loop without graphs, against Lightning's, on a CPU")
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


def loop_env(on: bool = True) -> dict:
    env = _env()
    if on:
        env[engine.CPU_LOOP_ENV] = "1"
    else:
        env.pop(engine.CPU_LOOP_ENV, None)
    return env


def run(args, cwd, env, check=0, timeout=300):
    p = subprocess.run([sys.executable, "-m", "ssdbench.cli", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert p.returncode == check, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def only_run_dir(root: Path) -> Path:
    (path,) = root.rglob("record.json")
    return path.parent


def curve(run_dir: Path, version: int = 0) -> pd.DataFrame:
    df = pd.read_csv(run_dir / "logs" / f"version_{version}" / "metrics.csv")
    return df[df["train/loss"].notna()][["step", "train/loss", "lr"]].reset_index(drop=True)


@pytest.mark.parametrize("value, ok", [("auto", "auto"), ("true", True), ("off", False), (False, False),
                                       ("maybe", None), (2, None)])
def test_parse_choice(value, ok):
    if ok is None:
        with pytest.raises(ConfigError, match="trainer.cuda_graph"):
            preflight.parse_cuda_graph(value)
    else:
        assert preflight.parse_cuda_graph(value) == ok


@cpu_only
def test_cuda_graph_true_without_cuda_is_one_line_and_exit_2(tmp_path):
    for value, needle in (("true", "needs a CUDA GPU"), ("maybe", "must be auto, true or false")):
        p = ssdbench("run", *TINY, f"results_dir={tmp_path}", f"trainer.cuda_graph={value}", cwd=tmp_path, check=2)
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and "trainer.cuda_graph" in err[0] and needle in err[0], p.stderr
        assert not list(tmp_path.rglob("last.ckpt"))  # nothing trained


@cpu_only
def test_loop_trains_what_lightning_trains(tmp_path):
    """Same seed, same config: the engine's loop (graphs off on a CPU) and Lightning's loop log
    the same losses, learning rates and validation metrics (float32 on a CPU: to rounding)."""
    args = ["run", *TINY, "trainer.max_steps=60", "trainer.log_every_n_steps=10", "trainer.val_check_interval=30"]
    run([*args, f"results_dir={tmp_path / 'pl'}"], tmp_path, loop_env(False))
    run([*args, f"results_dir={tmp_path / 'loop'}"], tmp_path, loop_env(True))
    pl_dir, loop_dir = only_run_dir(tmp_path / "pl"), only_run_dir(tmp_path / "loop")
    a, b = curve(pl_dir), curve(loop_dir)
    assert list(a["step"]) == list(b["step"]) == [9, 19, 29, 39, 49, 59]
    pd.testing.assert_series_equal(a["train/loss"], b["train/loss"], rtol=1e-5)
    pd.testing.assert_series_equal(a["lr"], b["lr"], rtol=1e-6)
    ra, rb = (json.loads((d / "record.json").read_text()) for d in (pl_dir, loop_dir))
    assert ra["cuda_graph"]["mode"] == "lightning" and rb["cuda_graph"]["mode"] == "eager-loop"
    assert rb["global_step"] == ra["global_step"] == 60 and rb["tokens_seen"] == ra["tokens_seen"]
    for key in ("val/loss", "val/acc"):
        assert rb["metrics"][key] == pytest.approx(ra["metrics"][key], rel=1e-5)


def _interrupt_after_first_checkpoint(args, cwd, env, run_dir_glob) -> Path:
    proc = subprocess.Popen([sys.executable, "-m", "ssdbench.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 180
    ckpts = []
    while not ckpts and time.time() < deadline and proc.poll() is None:
        ckpts = list(Path(cwd).glob(run_dir_glob))
        time.sleep(0.1)
    assert ckpts, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out[-3000:]
    return ckpts[0].parent.parent


@cpu_only
def test_loop_resumes_exactly_where_it_stopped(tmp_path):
    """SIGTERM a run of the engine's loop after its first checkpoint, rerun the command: the
    second attempt's log starts after the step the first one stopped at, and the finished run's
    validation loss equals that of a run never interrupted (the loop keeps its place in the
    data, the optimizer and the schedule; a rerun that ignored the checkpoint would differ)."""
    common = [*TINY, "trainer.max_steps=100", "checkpoint_every=10", "trainer.val_check_interval=1000",
              "trainer.log_every_n_steps=10"]
    run(["run", *common, f"results_dir={tmp_path / 'whole'}"], tmp_path, loop_env())
    whole = json.loads((only_run_dir(tmp_path / "whole") / "record.json").read_text())

    args = ["run", *common, f"results_dir={tmp_path / 'cut'}"]
    run_dir = _interrupt_after_first_checkpoint(args, tmp_path, loop_env(), "cut/*/*/checkpoints/last.ckpt")
    first = json.loads((run_dir / "record.json").read_text())
    assert first["status"] == "interrupted" and 10 <= first["global_step"] < 100, first
    stopped = first["global_step"]
    run(args, tmp_path, loop_env())
    done = json.loads((run_dir / "record.json").read_text())
    assert done["status"] == "ok" and done["global_step"] == 100 and done["resumed_from"]
    assert done["tokens_seen"] == whole["tokens_seen"] == 100 * 64 * 32
    second = curve(run_dir, version=1)
    assert second["step"].iloc[0] >= stopped, second.head()
    assert done["metrics"]["val/loss"] == pytest.approx(whole["metrics"]["val/loss"], rel=1e-6)
    # the uninterrupted run's logged losses after the stop are the resumed run's
    ref = curve(only_run_dir(tmp_path / "whole"))
    ref = ref[ref["step"].isin(second["step"])].reset_index(drop=True)
    pd.testing.assert_series_equal(ref["train/loss"], second["train/loss"], rtol=1e-5)


# ---- on the GPU: graphs against Lightning's loop ------------------------------------------------
GPU_RUN = ["progress_bar=false", "model=mamba2", "model.n_layers=2", "model.d_model=64", "task=mqar",
           "task.vocab_size=256", "task.batch_size=64", "optim.lr=1e-3", "optim.warmup_steps=20",
           "trainer.log_every_n_steps=10", "trainer.val_check_interval=1000"]


def _graph_vs_lightning(tmp_path, extra, steps=200):
    args = ["run", *GPU_RUN, *extra, f"trainer.max_steps={steps}"]
    run([*args, "trainer.cuda_graph=false", f"results_dir={tmp_path / 'pl'}"], tmp_path, _env(), timeout=600)
    p = run([*args, "trainer.cuda_graph=true", f"results_dir={tmp_path / 'g'}"], tmp_path, _env(), timeout=600)
    pl_dir, g_dir = only_run_dir(tmp_path / "pl"), only_run_dir(tmp_path / "g")
    rg = json.loads((g_dir / "record.json").read_text())
    assert rg["cuda_graph"]["mode"] == "graphs" and rg["cuda_graph"]["fallback"] is None, (rg["cuda_graph"], p.stderr)
    a, b = curve(pl_dir), curve(g_dir)
    assert list(a["step"]) == list(b["step"])
    # bf16 autocast: the two loops round differently (fused vs foreach AdamW, the weight-cast
    # cache) and the curves drift apart by rounding; a wrong step (no clipping, a stale lr, a
    # skipped gradient) moves them by far more
    rel = ((a["train/loss"] - b["train/loss"]).abs() / a["train/loss"].abs())
    print("relative loss differences:", rel.round(4).tolist())
    assert rel.max() < 0.03, rel.tolist()
    pd.testing.assert_series_equal(a["lr"], b["lr"], rtol=1e-5)
    return rg


@gpu_only
def test_graphs_train_what_lightning_trains(tmp_path):
    rg = _graph_vs_lightning(tmp_path, ["task.seq_len=64",
                                        "task.train_segments=[{kv_fraction:0.125,num_examples:6400}]",
                                        "task.test_segments=[{kv_fraction:0.125,num_examples:256}]"])
    assert rg["cuda_graph"]["graphs"] == 1


@gpu_only
def test_graphs_with_a_curriculum_of_several_shapes(tmp_path):
    """Two sequence lengths interleaved and a curriculum's stages: one graph per shape."""
    segs = ("task.train_segments=[{input_seq_len:32,num_kv_pairs:4,num_examples:3200},"
            "{input_seq_len:64,num_kv_pairs:8,num_examples:3200}]")
    rg = _graph_vs_lightning(tmp_path, [segs, "task.test_segments=[{input_seq_len:64,num_kv_pairs:8,num_examples:256}]"])
    assert rg["cuda_graph"]["graphs"] == 2


@gpu_only
def test_graphs_with_and_without_the_label_gather_train_alike(tmp_path):
    """The head on the labelled rows only (trainer.gather_labels) changes neither the loss nor
    a gradient (tests/test_label_gather.py, float64 on a CPU); on the GPU, graphed under bf16
    autocast, the two curves agree to rounding, and the gathered run really replays graphs
    (argsort and the gather capture)."""
    args = ["run", *GPU_RUN, "task.seq_len=64", "task.train_segments=[{kv_fraction:0.125,num_examples:6400}]",
            "task.test_segments=[{kv_fraction:0.125,num_examples:256}]", "trainer.max_steps=200",
            "trainer.cuda_graph=true"]
    records, curves = [], []
    for on in (False, True):
        root = tmp_path / f"gather_{on}"
        p = run([*args, f"trainer.gather_labels={str(on).lower()}", f"results_dir={root}"], tmp_path, _env(),
                timeout=600)
        run_dir = only_run_dir(root)
        records.append(json.loads((run_dir / "record.json").read_text()))
        assert records[-1]["cuda_graph"]["mode"] == "graphs" and records[-1]["cuda_graph"]["fallback"] is None, \
            (records[-1]["cuda_graph"], p.stderr)
        curves.append(curve(run_dir))
    a, b = curves
    assert list(a["step"]) == list(b["step"])
    rel = (a["train/loss"] - b["train/loss"]).abs() / a["train/loss"].abs()
    print("relative loss differences, gather off vs on:", rel.round(4).tolist())
    assert rel.max() < 0.03, rel.tolist()
    off, on = (r["metrics"]["val/loss"] for r in records)
    assert abs(off - on) <= 0.03 * abs(off), (off, on)


@gpu_only
def test_graphed_run_resumes_from_its_checkpoint(tmp_path):
    common = [*GPU_RUN, "task.seq_len=64", "task.train_segments=[{kv_fraction:0.125,num_examples:6400}]",
              "task.test_segments=[{kv_fraction:0.125,num_examples:256}]", "trainer.max_steps=3000",
              "checkpoint_every=100"]
    args = ["run", *common, f"results_dir={tmp_path}"]
    run_dir = _interrupt_after_first_checkpoint(args, tmp_path, _env(), "*/*/checkpoints/last.ckpt")
    first = json.loads((run_dir / "record.json").read_text())
    assert first["status"] == "interrupted" and 100 <= first["global_step"] < 3000
    run(args, tmp_path, _env(), timeout=600)
    done = json.loads((run_dir / "record.json").read_text())
    assert done["status"] == "ok" and done["global_step"] == 3000 and done["cuda_graph"]["mode"] == "graphs"
    assert done["tokens_seen"] == 3000 * 64 * 64
    assert curve(run_dir, version=1)["step"].iloc[0] >= first["global_step"]


@pytest.mark.parametrize("kwargs, reason", [
    (dict(), "the trainer runs on cpu"),
    (dict(precision="bf16-mixed"), "the trainer runs on cpu"),
    (dict(precision="16-true"), "precision 16-true"),
    (dict(accumulate_grad_batches=2), "accumulate_grad_batches > 1"),
    (dict(gradient_clip_algorithm="value", gradient_clip_val=1.0), "gradient_clip_algorithm=value"),
    ("slurm", "SLURM auto-requeue"),
])
def test_what_the_graphed_loop_does_not_do(kwargs, reason):
    """The settings checked before a run is given to the graphed loop, read off real Trainers
    (every check runs here, on a CPU: a Trainer attribute renamed by Lightning would fail it)."""
    import lightning as L
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if kwargs == "slurm":
        kwargs = dict(plugins=[SLURMEnvironment(auto_requeue=True)])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, max_steps=1, **kwargs)
    assert reason in engine.unsupported(trainer)


def test_examples_moved_to_the_device_give_the_same_batches():
    """The graphed loop gathers batches from a copy of the dataset on the GPU
    (SegmentDataset.on_device): same tensors, dtypes and slice ids as from host memory."""
    import torch

    from ssdbench.tasks.base import Segment, SegmentDataset

    device = "cuda" if ON_GPU else "cpu"
    g = torch.Generator().manual_seed(0)
    segs = [Segment(f"s{i}", torch.randint(-100, 100, (n, 8), generator=g, dtype=torch.int16),
                    torch.randint(-100, 100, (n, 8), generator=g, dtype=torch.int16)) for i, n in enumerate((5, 7))]
    host = SegmentDataset(segs)
    dev = host.on_device(device)
    assert dev.nbytes() == host.nbytes() == 2 * 12 * 8 * 2
    for idx in ([0, 3, 4], [9, 5, 11], [6]):
        a, b = host.__getitems__(idx), dev.__getitems__(idx)
        assert a.pop("max_labels") == b.pop("max_labels")  # counted on the host, kept by the copy
        for k in a:
            assert b[k].device.type == device and b[k].dtype == a[k].dtype == torch.long
            assert torch.equal(a[k], b[k].cpu()), (idx, k)
