"""Data-parallel training on a CPU: 2 processes (gloo), started by Lightning re-running the
`ssdbench run` command."""
import json

import pytest

from test_cli import TINY, ssdbench

pytestmark = pytest.mark.slow

DDP = [*TINY[:2], "model=transformerpp", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
       "trainer.precision=32-true"]


def test_two_process_ddp_writes_one_record_with_global_counts(tmp_path):
    p = ssdbench("run", *DDP, f"results_dir={tmp_path}", "study=ddp", "trainer.max_steps=10",
                 cwd=tmp_path, check=0, timeout=240)
    run_dirs = list((tmp_path / "ddp").iterdir())
    assert len(run_dirs) == 1, run_dirs  # the second process did not make a run directory of its own
    (run_dir,) = run_dirs
    records = list(tmp_path.rglob("record.json"))
    assert records == [run_dir / "record.json"]
    r = json.loads(records[0].read_text())
    assert r["status"] == "ok" and r["world_size"] == 2 and r["global_step"] == 10
    # task.batch_size=64 is the global batch: 32 per process, 64 x 32 tokens a step in all
    assert r["batch_size_per_device"] == 32
    assert r["tokens_seen"] == 10 * 64 * 32
    assert 0.0 <= r["metrics"]["val/acc"] <= 1.0
    assert len(list(run_dir.glob("logs/version_*"))) == 1
    assert p.stdout.count("record:") == 1  # one summary, from rank 0


def test_global_batch_must_divide_across_processes(tmp_path):
    p = ssdbench("run", *DDP, f"results_dir={tmp_path}", "task.batch_size=63", cwd=tmp_path, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "task.batch_size" in p.stderr and "not divisible" in p.stderr and "Traceback" not in p.stderr


def test_ddp_jobs_of_a_sequential_sweep_each_start_their_processes(tmp_path):
    """The second job must not reuse the first one's (closed) process group or take itself for
    a process started by a launcher."""
    p = ssdbench("run", "-m", *DDP, f"results_dir={tmp_path}", "study=sw", "trainer.max_steps=3,4",
                 cwd=tmp_path, check=0, timeout=240)
    records = sorted((json.loads(r.read_text()) for r in tmp_path.rglob("record.json")),
                     key=lambda r: r["global_step"])
    assert [(r["status"], r["global_step"], r["tokens_seen"]) for r in records] == [
        ("ok", 3, 3 * 64 * 32), ("ok", 4, 4 * 64 * 32)]
    assert "2 ok" in p.stderr
