"""End-to-end tests of the `ssdbench` command, each run in a temporary results directory."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ON_GPU

pytestmark = pytest.mark.slow

# Transformer++ is the fastest model on a CPU; the zoo test below trains every architecture.
TINY = ["experiment=mqar_tiny", "progress_bar=false", "trainer=cpu", "model=transformerpp"]


def _env():
    # conftest turns the Triton interpreter on for kernel tests; runs of the CLI must not
    # inherit it (a user's CPU run never has it).
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def ssdbench(*args, cwd, check=None, timeout=300):
    env = _env()
    p = subprocess.run([sys.executable, "-m", "ssdbench.cli", *args], cwd=cwd, capture_output=True,
                       text=True, timeout=timeout, env=env)
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p


def test_bench_bad_override_is_one_line_and_exit_2(tmp_path):
    """A model override Hydra cannot apply stops `bench train` before any GPU work (so also
    here, without one), and the bench's exit code reaches the shell."""
    p = ssdbench("bench", "train", "--models", "mamba2", "transformerpp", "--override", "model.proj_align=1",
                 cwd=tmp_path, check=2)
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == \
        "ssdbench bench train: --override for transformerpp: Could not override 'model.proj_align'."


@pytest.mark.skipif(ON_GPU, reason="checks the answer on a machine without CUDA")
@pytest.mark.parametrize("name", ["ssd", "scan", "based", "window", "train"])
def test_bench_without_gpu_is_one_line_and_exit_2(name, capsys):
    """Every GPU benchmark refuses a CPU the same way: one line naming it, exit code 2 through
    the CLI (in process: the five subprocesses would each import torch)."""
    from ssdbench import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", name])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ssdbench bench {name}: needs a CUDA GPU"), err


def record(path: Path) -> dict:
    return json.loads((path / "record.json").read_text())


def test_help_lists_subcommands(tmp_path):
    out = ssdbench("--help", cwd=tmp_path, check=0).stdout
    assert "run" in out and "table" in out and "plot-results" in out and "bench" in out
    out = ssdbench("run", "--help", cwd=tmp_path, check=0).stdout
    assert "model: based, mamba1, mamba2, transformerpp" in out and "task: induction_heads, mqar, pile, selective_copying" in out


def test_single_run_then_sweep_then_table(tmp_path):
    p = ssdbench("run", *TINY, f"results_dir={tmp_path}", "study=one", cwd=tmp_path, check=0)
    run_dir = tmp_path / "one" / "experiment=mqar_tiny,model=transformerpp,trainer=cpu"
    r = record(run_dir)
    assert r["status"] == "ok" and r["global_step"] == 50
    assert r["tokens_seen"] == 50 * 64 * 32
    assert 0.0 <= r["metrics"]["val/acc"] <= 1.0 and "val/acc/T=32,kv=4" in r["metrics"]
    assert r["params"]["total"] > r["params"]["non_embedding"] > 0
    assert r["train_flops"] > 0 and r["config"]["model"]["d_model"] == 64
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert list(run_dir.glob("logs/version_*/metrics.csv"))
    assert "val/acc" in p.stdout and str(run_dir / "record.json") in p.stdout.replace("\n", "")

    ssdbench("run", "-m", *TINY, f"results_dir={tmp_path}", "study=sweep", "model.d_model=16,32",
             cwd=tmp_path, check=0)
    dirs = sorted(d.name for d in (tmp_path / "sweep").iterdir() if (d / "record.json").exists())
    assert dirs == ["experiment=mqar_tiny,model.d_model=16,model=transformerpp,trainer=cpu",
                    "experiment=mqar_tiny,model.d_model=32,model=transformerpp,trainer=cpu"]
    out = ssdbench("table", str(tmp_path / "sweep"), cwd=tmp_path, check=0).stdout
    assert "2 runs" in out
    table = pd.read_csv(tmp_path / "sweep" / "table.csv")
    assert sorted(table["model.d_model"]) == [16, 32] and set(table["status"]) == {"ok"}
    assert "val/acc" in table.columns
    assert (tmp_path / "sweep" / "table.md").read_text().startswith("|")


@pytest.mark.parametrize("args,needle", [
    (["model=nope"], "unknown model 'nope' (available: "),
    (["-m", "task=mqar,bogus"], "unknown task 'bogus'"),
    (["trainer=tpu"], "unknown trainer 'tpu'"),
    (["model.n_heads=5"], "model.d_model"),
    (["task.vocab_size=32"], "task.vocab_size"),
    (["task.train_segments=[{input_seq_len:32,num_kv_pairs:9,num_examples:8}]"], "num_kv_pairs"),
    (["trainer.max_steps=0"], "trainer.max_steps"),
    (["+model.foo=1"], "model.foo"),
    (["heads=nope"], "unknown heads 'nope'"),
    (["heads=gva", "model.ngroups=3"], "model.ngroups"),
    (["model=mamba2", "model.headdim=24"], "model.headdim"),
    (["model=mamba1", "heads=mqa"], "model.head_structure"),
    (["compile=maybe"], "compile"),
    (["model=mamba1", "model.selective=maybe"], "model.selective"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, needle):
    base = TINY if not any(a.startswith("model=") for a in args) else TINY[:-1]
    p = ssdbench("run", *base, f"results_dir={tmp_path}", *args, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing was trained


@pytest.mark.parametrize("model,heads", [("mamba2", "mqa"), ("transformerpp", "gva"), ("mamba1", None),
                                         ("based", None)])
def test_models_and_head_structures_train(tmp_path, model, heads):
    extra = [f"heads={heads}"] if heads else []
    ssdbench("run", *TINY[:-1], f"results_dir={tmp_path}", f"model={model}", *extra,
             "trainer.max_steps=10", cwd=tmp_path, check=0)
    (r,) = [json.loads(p.read_text()) for p in tmp_path.rglob("record.json")]
    assert r["status"] == "ok" and r["arch"] == model and r["global_step"] == 10
    if heads:
        assert r["config"]["model"]["head_structure"] == heads


def test_mixed_precision_with_clipping(tmp_path):
    """bf16 autocast + gradient clipping (the GPU default) also runs on a CPU: the optimizer
    must be one that Lightning's mixed-precision plugin lets clip (not fused AdamW)."""
    ssdbench("run", *TINY, f"results_dir={tmp_path}", "trainer.precision=bf16-mixed",
             "trainer.max_steps=5", cwd=tmp_path, check=0)


def test_compile_trains_and_names_the_same_run(tmp_path):
    """compile=true runs the model through torch.compile (in place: the checkpoint keeps the
    plain keys) and, being how a run is carried out, not what it computes, shares the run
    directory of the plain run."""
    ssdbench("run", *TINY, f"results_dir={tmp_path}", "study=c", "compile=true", "trainer.max_steps=3",
             "trainer.val_check_interval=3", cwd=tmp_path, check=0)
    (path,) = tmp_path.rglob("record.json")
    r = json.loads(path.read_text())
    assert r["status"] == "ok" and r["config"]["compile"] is True
    assert "compile" not in path.parent.name
    import torch
    state = torch.load(path.parent / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state and not any("_orig_mod" in k for k in state)


def test_table_on_missing_dir(tmp_path):
    p = ssdbench("table", str(tmp_path / "nothing"), cwd=tmp_path)
    assert p.returncode == 2 and "not a directory" in p.stderr


def test_divergence_is_reported(tmp_path):
    p = ssdbench("run", *TINY, f"results_dir={tmp_path}", "optim.lr=1e30", "optim.warmup_steps=1",
                 "study=div", cwd=tmp_path)
    assert p.returncode == 3, p.stderr
    assert "diverged" in p.stderr and "at step" in p.stderr and "Traceback" not in p.stderr
    (run_dir,) = [d for d in (tmp_path / "div").iterdir()]
    r = record(run_dir)
    assert r["status"] == "diverged" and "at step" in r["error"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_keeps_checkpoint_and_resume_finishes(tmp_path, sig):
    # 400 steps: the signal lands a few steps after the first checkpoint (step 25), and the
    # resume has to train the rest (2,000 steps here took 100 s a resume on a slow CPU)
    args = ["run", *TINY, f"results_dir={tmp_path}", "study=int", "trainer.max_steps=400",
            "checkpoint_every=25", "trainer.val_check_interval=1000"]
    env = _env()
    # Ctrl-C's default action in the child even when the tests run as a background job (a
    # non-interactive shell starts those with SIGINT ignored, and the child would inherit it)
    proc = subprocess.Popen([sys.executable, "-m", "ssdbench.cli", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run_dir = (tmp_path / "int" / "experiment=mqar_tiny,model=transformerpp,trainer.max_steps=400,"
               "trainer.val_check_interval=1000,trainer=cpu")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), proc.communicate()[0][-3000:]
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, out[-2000:]
    r = record(run_dir)
    assert r["status"] == "interrupted", out[-2000:]
    stopped_at = r["global_step"]
    assert 0 < stopped_at < 400

    ssdbench(*args, cwd=tmp_path, check=0)
    r = record(run_dir)
    assert r["status"] == "ok" and r["global_step"] == 400
    assert r["resumed_from"] == str(ckpt)
    assert r["tokens_seen"] == 400 * 64 * 32  # the count survives the resume

    # The resumed attempt trained on from the checkpoint, not from scratch: its log (a CSV of
    # its own, version_1) starts after the interrupted step, and the learning rate it logged at
    # each step is the uninterrupted schedule's (cosine from 1e-2 to 1e-5 after 10 warmup steps
    # over 400, by hand) - a rerun that ignored the checkpoint, or one that restored the step
    # count but not the schedule, fails here.
    resumed = pd.read_csv(run_dir / "logs" / "version_1" / "metrics.csv").dropna(subset=["lr"])
    assert len(resumed) > 0 and resumed["step"].min() >= stopped_at, (stopped_at, resumed["step"].tolist())
    for s, lr in zip(resumed["step"], resumed["lr"]):
        want = 1e-2 * (1e-3 + 0.999 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 390)))
        assert lr == pytest.approx(want, rel=1e-5), (s, lr, want)


def test_sigterm_during_evaluation_keeps_record_and_checkpoint(tmp_path):
    """SIGTERM after training, while induction heads is scored at long lengths (Lightning no
    longer handles signals then): the record says interrupted with the validation metrics and
    last.ckpt holds the weights; the rerun resumes at the last step, scores again and ends ok
    (its evaluation stopped by the time limit, which looks ahead to the next length)."""
    args = ["run", "task=induction_heads", "model=mamba2", "progress_bar=false", "trainer=cpu",
            f"results_dir={tmp_path}", "study=ev", "trainer.max_steps=4", "trainer.val_check_interval=4",
            "task.train_seq_len=32", "task.test_lengths=[32]", "task.num_train_examples=64",
            "task.num_test_examples=16", "task.batch_size=16", "task.eval_examples=1",
            "task.eval_lengths=[64,128,256,512,1024,2048,4096,8192,16384,32768,65536,131072,262144]",
            "task.eval_time_limit_s=8"]
    proc = subprocess.Popen([sys.executable, "-m", "ssdbench.cli", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    lines = []
    for line in proc.stdout:  # wait until the evaluation has scored its first length
        lines.append(line)
        if "induction heads: T=64 accuracy" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, out[-2000:]
    (path,) = tmp_path.rglob("record.json")
    r = json.loads(path.read_text())
    assert r["status"] == "interrupted" and r["global_step"] == 4, out[-2000:]
    assert "val/acc" in r["metrics"] and "Terminated" in r["error"]
    ckpt = path.parent / "checkpoints" / "last.ckpt"
    assert ckpt.exists()

    ssdbench(*args, cwd=tmp_path, check=0)
    r = json.loads(path.read_text())
    assert r["status"] == "ok" and r["global_step"] == 4 and r["resumed_from"] == str(ckpt)
    assert r["metrics"]["extrapolation/acc/T=64"] in (0.0, 1.0)
    assert r["metrics"]["extrapolation/time_limit_from"] <= 262144


def test_tokens_counted_over_accumulated_micro_batches(tmp_path):
    """With gradient accumulation an optimizer step consumes several batches; the record's
    token count (and so its FLOPs, and the scaling fits built on them) must include all."""
    # 2 divides mqar_tiny's 8 batches per epoch (Lightning also steps on an epoch's last,
    # incomplete group of batches, which a count per optimizer step must follow)
    ssdbench("run", *TINY, f"results_dir={tmp_path}", "study=acc", "trainer.max_steps=6",
             "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=6", cwd=tmp_path, check=0)
    (path,) = tmp_path.rglob("record.json")
    r = json.loads(path.read_text())
    assert r["global_step"] == 6 and r["tokens_seen"] == 6 * 2 * 64 * 32


def test_training_lowers_the_loss(tmp_path):
    """Training learns: over 30 steps of mqar_tiny the logged train/loss falls well below its
    first value (5.4-5.5 -> 3.2 over seeds 0-2; with optim.lr=1e-9 it stays at 5.5)."""
    ssdbench("run", *TINY, f"results_dir={tmp_path}", "study=learn", "trainer.max_steps=30",
             "trainer.val_check_interval=30", "trainer.log_every_n_steps=5", cwd=tmp_path, check=0)
    (csv,) = tmp_path.rglob("logs/version_0/metrics.csv")
    loss = pd.read_csv(csv).dropna(subset=["train/loss"]).sort_values("step")["train/loss"].tolist()
    assert len(loss) == 6, loss  # steps 4, 9, ..., 29
    assert loss[-1] < 0.7 * loss[0], loss
    assert min(loss[-3:]) < min(loss[:3]), loss
    # the record times the start-up: seconds from the process's start to the end of each phase
    (path,) = tmp_path.rglob("record.json")
    startup = json.loads(path.read_text())["startup_s"]
    phases = ["imports_and_config", "trainer", "model_and_data", "first_step"]
    assert list(startup) == phases, startup
    assert 0 < startup["imports_and_config"] <= startup["trainer"] <= startup["model_and_data"] \
        <= startup["first_step"] < 120, startup


def test_resume_from_missing_checkpoint_is_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "nowhere" / "last.ckpt"
    p = ssdbench("run", *TINY, f"results_dir={tmp_path}", f"resume={missing}", cwd=tmp_path, check=2)
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "resume" in err[0] and f"checkpoint {missing} does not exist" in err[0], err
    assert not list(tmp_path.rglob("*.ckpt"))
