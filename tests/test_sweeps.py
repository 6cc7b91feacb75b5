"""Sweeps that survive: failure isolation, skipping finished jobs, launcher presets, SLURM requeue
checkpoints and the W&B logger, on a CPU with the tiniest configs.

Interrupt-and-resume of a single run is tested in test_cli.py
(test_interrupt_keeps_checkpoint_and_resume_finishes); here the SLURM variant of it.
"""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_cli import TINY, _env, record, ssdbench

pytestmark = pytest.mark.slow

SWEEP = ["-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", *TINY, "study=sw",
         "trainer.max_steps=5", "optim.warmup_steps=1", "optim.lr=1e-3,1e-2,1e30"]


def _records(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in root.rglob("record.json")}


def _lr(name: str) -> str:
    return next(part for part in name.split(",") if part.startswith("optim.lr="))


def test_parallel_sweep_isolates_a_diverging_job_and_rerun_skips_finished(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    # lr=1e30 diverges by design; the two other jobs run in other worker processes and finish.
    p = ssdbench("run", *SWEEP, f"results_dir={tmp_path}", cwd=tmp_path, timeout=240)
    assert p.returncode == 1, p.stderr[-3000:]
    recs = {_lr(k): r for k, r in _records(tmp_path / "sw").items()}
    assert {k: r["status"] for k, r in recs.items()} == {
        "optim.lr=0.001": "ok", "optim.lr=0.01": "ok", "optim.lr=1e+30": "diverged"}
    assert "at step" in recs["optim.lr=1e+30"]["error"]
    assert recs["optim.lr=0.01"]["global_step"] == 5
    # the summary table, printed by the parent from the jobs' journal
    assert "sweep: 3 job(s)" in p.stderr and "1 diverged, 2 ok" in p.stderr
    assert "optim.lr=1e+30" in p.stderr and "loss became nan" in p.stderr

    # Restarting the same sweep reruns only the job that did not finish ok.
    finished = {k: r["finished_at"] for k, r in recs.items()}
    p = ssdbench("run", *SWEEP, f"results_dir={tmp_path}", cwd=tmp_path, timeout=240)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "1 diverged, 2 skipped" in p.stderr
    recs = {_lr(k): r for k, r in _records(tmp_path / "sw").items()}
    for k in ("optim.lr=0.001", "optim.lr=0.01"):
        assert recs[k]["finished_at"] == finished[k] and recs[k]["status"] == "ok"


def test_force_reruns_and_changed_config_starts_afresh(tmp_path):
    args = ["run", *TINY, f"results_dir={tmp_path}", "study=f", "trainer.max_steps=3"]
    ssdbench(*args, cwd=tmp_path, check=0)
    (run_dir,) = (tmp_path / "f").iterdir()
    first = record(run_dir)
    p = ssdbench(*args, cwd=tmp_path, check=0)
    assert "skipped" in p.stderr and record(run_dir)["finished_at"] == first["finished_at"]
    # force=true does not change the run directory and retrains from step 0 (no resume)
    p = ssdbench(*args, "force=true", cwd=tmp_path, check=0)
    r = record(run_dir)
    assert r["status"] == "ok" and r["resumed_from"] is None and r["previous_status"] == "ok"
    assert r["tokens_seen"] == first["tokens_seen"] and len(list((tmp_path / "f").iterdir())) == 1
    # A record of another config in the same directory (e.g. the defaults changed since):
    # neither skipped nor resumed from its checkpoint.
    r["config"]["optim"]["weight_decay"] = 0.5
    (run_dir / "record.json").write_text(json.dumps(r))
    p = ssdbench(*args, cwd=tmp_path, check=0)
    assert "another config (optim.weight_decay)" in p.stderr
    r = record(run_dir)
    assert r["resumed_from"] is None and r["config"]["optim"]["weight_decay"] == 0.1


def test_journal_summary_counts_failures(tmp_path):
    from rich.console import Console

    from ssdbench.train import print_sweep_summary

    for i, (status, err) in enumerate([("ok", None), ("skipped", "ok record exists"),
                                       ("failed", "RuntimeError: boom"), ("invalid", "optim.lr: ...")]):
        (tmp_path / f"job{i:05d}.json").write_text(json.dumps(
            {"job": i, "name": f"a={i}", "run_dir": "x", "overrides": ["m=1", f"a={i}"],
             "status": status, "error": err, "metrics": {"val/acc": 0.5} if status == "ok" else {}}))
    console = Console(record=True, width=150)
    assert print_sweep_summary(tmp_path, console) == 2
    text = console.export_text()
    assert "RuntimeError: boom" in text and "common: m=1" in text and "0.5000" in text
    assert "1 failed, 1 invalid, 1 ok, 1 skipped" in text


def _claim(args):
    from ssdbench.train import claim_gpu_slot

    gpu = claim_gpu_slot(*args)
    time.sleep(1.0)  # hold the slot while the other workers try
    return gpu


def test_gpu_slots_are_exclusive_per_worker(tmp_path):
    """hydra/launcher=local pins a worker to a GPU slot for its lifetime: with 2 GPUs x 1 job
    per GPU, two workers get GPUs 0 and 1 and a third gets none (it then shares)."""
    key = f"test{os.getpid()}"
    with multiprocessing.get_context("fork").Pool(3) as pool:
        got = pool.map(_claim, [(2, 1, key)] * 3)
    assert sorted(got, key=str) == [0, 1, None]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        got = pool.map(_claim, [(2, 2, key + "b")] * 4)
    assert sorted(got) == [0, 0, 1, 1]


def test_launcher_and_trainer_presets_compose():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf
    from submitit.slurm.slurm import _make_sbatch_string

    import ssdbench.train  # noqa: F401 - registers the resolvers

    with initialize_config_module("ssdbench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                           "trainer=slurm"], return_hydra_config=True)
        local = compose("config", overrides=["hydra/launcher=local", "jobs_per_gpu=3"],
                        return_hydra_config=True)
        fsdp = compose("config", overrides=["trainer=fsdp"])
        ddp = compose("config", overrides=["trainer=ddp"])
    lc = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert lc["_target_"].endswith("SlurmLauncher") and lc["max_num_timeout"] == 0
    # SLURM sends USR1 (Lightning's requeue signal) instead of submitit's USR2
    sbatch = _make_sbatch_string(
        command="python -c pass", folder=str(Path("/tmp/ssdbench-test/%j")), map_count=10,
        partition=lc["partition"], time=lc["timeout_min"], gpus_per_node=lc["gpus_per_node"],
        ntasks_per_node=lc["tasks_per_node"], signal_delay_s=lc["signal_delay_s"],
        additional_parameters=lc["additional_parameters"], array_parallelism=lc["array_parallelism"])
    assert "#SBATCH --signal=USR1@120" in sbatch and "USR2" not in sbatch
    assert "#SBATCH --partition=gpu" in sbatch and "#SBATCH --array=0-9%10" in sbatch
    assert cfg.trainer.plugins[0].auto_requeue is True
    n_jobs = OmegaConf.to_container(local.hydra.launcher, resolve=True)["n_jobs"]
    import torch
    assert n_jobs == (3 * torch.cuda.device_count() or max(1, (os.cpu_count() or 2) // 2))
    assert ddp.trainer.strategy == "ddp" and fsdp.trainer.strategy.state_dict_type == "full"


def test_latest_checkpoint_prefers_newer_slurm_requeue_checkpoint(tmp_path):
    from ssdbench.train import _latest_checkpoint

    assert _latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_text("x")
    assert _latest_checkpoint(tmp_path) == last
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_text("y")
    os.utime(last, (time.time() - 60, time.time() - 60))
    assert _latest_checkpoint(tmp_path) == hpc


def test_slurm_requeue_signal_saves_checkpoint_and_rerun_resumes(tmp_path):
    """Inside a (simulated) SLURM job, SIGUSR1 makes Lightning save hpc_ckpt_1.ckpt in the run
    directory (`scontrol requeue` is absent here and only logs a warning); a SIGTERM then stops
    the run, and the rerun (the requeued job) resumes and reaches the final step."""
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "ssdbench", "SLURM_JOB_ID": "4242",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NODELIST": "localhost", "SLURM_CPUS_ON_NODE": "1"}
    env = dict(_env(), **slurm)
    args = ["run", *TINY, "trainer=slurm", f"results_dir={tmp_path}", "study=req",
            "trainer.max_steps=600", "checkpoint_every=25", "trainer.val_check_interval=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "ssdbench.cli", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = list(tmp_path.glob("req/*/checkpoints/last.ckpt"))
        if found:
            run_dir = found[0].parent.parent
            break
        time.sleep(0.2)
    assert run_dir is not None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGUSR1)
    while time.time() < deadline and proc.poll() is None and not (run_dir / "hpc_ckpt_1.ckpt").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert (run_dir / "hpc_ckpt_1.ckpt").exists(), out[-3000:]
    r = record(run_dir)
    assert r["status"] == "interrupted" and 0 < r["global_step"] < 600, out[-3000:]

    p = subprocess.run([sys.executable, "-m", "ssdbench.cli", *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    r = record(run_dir)
    assert r["status"] == "ok" and r["global_step"] == 600 and r["resumed_from"]
    assert r["tokens_seen"] == 600 * 64 * 32


def test_wandb_offline_run_keeps_its_id(tmp_path):
    pytest.importorskip("wandb")
    from ssdbench.train import _wandb_id, _wandb_tags

    assert _wandb_id(str(tmp_path / "x")) == _wandb_id(str(tmp_path / "x"))  # kept for resumes
    assert _wandb_tags(["results_dir=/a", "model=mamba2", "progress_bar=false"]) == ["model=mamba2"]
    env = _env()  # offline by the config: no API key, no network
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        env.pop(key, None)
    p = subprocess.run([sys.executable, "-m", "ssdbench.cli", "run", *TINY, f"results_dir={tmp_path}",
                        "study=wb", "trainer.max_steps=3", "logger=wandb"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = (tmp_path / "wb").iterdir()
    assert "logger" not in run_dir.name  # adding a logger does not make it another run
    r = record(run_dir)
    assert r["config"]["logger"]["wandb"]["id"] == (run_dir / "wandb_id").read_text().strip()
    assert r["config"]["logger"]["wandb"]["group"] == "wb"
    assert list(run_dir.glob("wandb/offline-run-*"))


def test_table_does_not_need_wandb():
    code = "import sys, ssdbench.cli, ssdbench.table; assert 'wandb' not in sys.modules, 'wandb imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(), timeout=120)


def test_sigterm_during_sequential_sweep_stops_it_with_records(tmp_path):
    """SIGTERM while the first job of a sequential (-m, basic launcher) sweep trains: the
    command exits non-zero, the first job's record says interrupted with its last.ckpt on disk,
    and the second job either never started or is recorded as interrupted too (it must not run on)."""
    args = ["run", "-m", *TINY, f"results_dir={tmp_path}", "study=seq", "trainer.max_steps=400",
            "checkpoint_every=5", "trainer.val_check_interval=1000", "model.d_model=16,32"]
    proc = subprocess.Popen([sys.executable, "-m", "ssdbench.cli", *args], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.rglob("last.ckpt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert list(tmp_path.rglob("last.ckpt")), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, out[-2000:]
    first = tmp_path / "seq" / ("experiment=mqar_tiny,model.d_model=16,model=transformerpp,trainer.max_steps=400,"
                                "trainer.val_check_interval=1000,trainer=cpu")
    r = record(first)
    assert r["status"] == "interrupted" and 0 < r["global_step"] < 400, out[-2000:]
    assert (first / "checkpoints" / "last.ckpt").exists()
    second = Path(str(first).replace("model.d_model=16", "model.d_model=32"))
    if (second / "record.json").exists():
        assert record(second)["status"] == "interrupted", out[-2000:]  # SIGTERM is for the whole sweep
    else:  # not started: nothing trained there
        assert not list(second.rglob("*.ckpt"))


def test_no_job_starts_after_the_deadline(tmp_path, monkeypatch):
    """SSDBENCH_NO_START_AFTER (Unix time): past it a sweep starts no new job (one finished ok
    is still skipped as usual), so a time-limited allocation ends without runs killed
    half-way; the summary counts them and the exit code says the sweep is incomplete."""
    args = [*TINY, f"results_dir={tmp_path}", "study=dl", "trainer.max_steps=3"]
    ssdbench("run", *args, "seed=1", cwd=tmp_path, check=0)
    monkeypatch.setenv("SSDBENCH_NO_START_AFTER", str(time.time() - 1))
    p = ssdbench("run", "-m", *args, "seed=1,2", cwd=tmp_path)
    assert p.returncode == 1, p.stderr[-3000:]
    assert p.stderr.count("not started, past SSDBENCH_NO_START_AFTER") == 1, p.stderr[-3000:]
    assert "1 not started, 1 skipped" in p.stderr, p.stderr[-3000:]
    recs = _records(tmp_path / "dl")
    assert sorted(r["status"] for r in recs.values()) == ["ok"]  # seed=2 left no record
    # not a Unix time: one line, exit 2
    monkeypatch.setenv("SSDBENCH_NO_START_AFTER", "tomorrow")
    p = ssdbench("run", *args, "seed=4", cwd=tmp_path, check=2)
    assert "SSDBENCH_NO_START_AFTER: must be a Unix time" in p.stderr and "Traceback" not in p.stderr
    monkeypatch.setenv("SSDBENCH_NO_START_AFTER", str(time.time() - 1))
    # a single run past the deadline: one line, exit 130, nothing trained
    p = ssdbench("run", *args, "seed=3", cwd=tmp_path, check=130)
    assert "not started" in p.stderr and "Traceback" not in p.stderr
    assert len(_records(tmp_path / "dl")) == 1
