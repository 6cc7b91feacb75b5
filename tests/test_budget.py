"""The papers' synthetic protocols as presets, and their `budget` knob (ssdbench/budget.py):
the presets compose and build, the budget scales the steps and what follows them, the record
says which fraction of the paper ran, and a bad budget is one line and exit code 2."""
import argparse
import json
import os
import subprocess
import sys
from fractions import Fraction

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch
from conftest import compose_config
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from ssdbench import budget, plots, table
from ssdbench import record as rec
from ssdbench.errors import ConfigError
from ssdbench.table import load_records
from ssdbench.train import _check_fields, _check_run_options, build

PROTOCOLS = ["mqar_fig8", "induction_heads", "selective_copying", "selective_copying_small"]

# Small enough to build and run a batch on a CPU in a second; the protocol keys are untouched.
TINY = {
    "mqar_fig8": ["task.seq_len=64", "task.vocab_size=256", "budget=1/1024",
                  "task.test_segments=[{kv_fraction:0.25,num_examples:8}]"],
    "induction_heads": ["task.num_train_examples=16", "task.num_test_examples=4", "task.test_lengths=[32]",
                        "task.eval_lengths=[]", "task.train_seq_len=32"],
    "selective_copying": ["task.seq_len=64", "task.num_train_examples=16", "task.num_test_examples=4"],
    "selective_copying_small": ["task.num_train_examples=16", "task.num_test_examples=4"],
}


# ----------------------------------------------------------------------------- the knob

@pytest.mark.parametrize("value,frac", [(0.125, Fraction(1, 8)), ("1/8", Fraction(1, 8)), ("0.125", Fraction(1, 8)),
                                        (1, Fraction(1)), (0.1, Fraction(1, 10)), ("abc", None), (True, None),
                                        ("inf", None), ("1/0", None)])
def test_parse_fraction(value, frac):
    assert budget.parse_fraction(value) == frac


def test_scaled_counts_and_intervals():
    assert budget.budget_steps(8192, "1/8") == 1024
    assert budget.budget_steps(8192, None) == 8192        # null: the paper's whole budget
    assert budget.budget_steps(8192, 1e-9) == 1           # never zero steps
    assert budget.budget_steps(8192, "abc") is None       # left to check_budget to report
    assert budget.budget_steps(8192, 0) is None
    assert budget.every(1024, 8) == 128 and budget.every(5, 8) == 1 and budget.every(None, 8) is None
    assert budget.mul(25, 8192) == 204800 and budget.div(2**18, 1024) == 256
    assert [budget.label(Fraction(x)) for x in ("1/8", "3/4", "1", "3/10", "1/3000")] == \
        ["1/8", "3/4", "1", "0.3", "0.000333"]


# ----------------------------------------------------------------------------- presets

@pytest.mark.parametrize("name", PROTOCOLS)
def test_protocol_presets_compose_validate_and_build(name):
    """Each protocol preset states the paper's budget, passes its checks, and its model and
    task build (tiny sizes) and run one training batch on the CPU."""
    cfg = compose_config(f"experiment={name}", "model=transformerpp", "model.d_model=16", *TINY[name])
    paper = OmegaConf.to_container(cfg.paper, resolve=True)
    assert set(budget.PAPER_KEYS) <= set(paper)
    assert paper["tokens"] == paper["steps"] * paper["batch_size"] * paper["seq_len"]
    assert "Appendix" in paper["source"]
    _check_run_options(cfg)
    _check_fields(cfg.task, "task")
    _check_fields(cfg.model, "model")
    data, model = build(cfg.task), build(cfg.model)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    logits = model(batch["input_ids"])
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    assert 1 <= cfg.trainer.val_check_interval <= cfg.trainer.max_steps


def test_paper_budgets_as_documented():
    """The numbers each preset's header states."""
    expect = {  # name: (steps, batch, seq_len, tokens)
        "mqar_fig8": (8192, 1024, 256, 2**31),
        "induction_heads": (204800, 8, 256, 419_430_400),
        "selective_copying": (400_000, 64, 4096, 104_857_600_000),
        "selective_copying_small": (400_000, 64, 256, 6_553_600_000),
    }
    for name, (steps, batch, T, tokens) in expect.items():
        cfg = compose_config(f"experiment={name}")
        p = cfg.paper
        assert (p.steps, p.batch_size, p.seq_len, p.tokens) == (steps, batch, T, tokens), name
        assert cfg.task.batch_size == batch
    fig8 = {T: compose_config("experiment=mqar_fig8", f"task.seq_len={T}").paper for T in (512, 1024)}
    assert (fig8[512].steps, fig8[512].batch_size, fig8[512].tokens) == (16384, 512, 2**32)
    assert (fig8[1024].steps, fig8[1024].batch_size, fig8[1024].tokens) == (32768, 256, 2**33)


def test_protocol_optimizers_follow_the_papers():
    fig8 = compose_config("experiment=mqar_fig8")
    assert (fig8.optim.schedule, fig8.optim.min_lr_ratio, fig8.optim.warmup_steps) == ("linear", 0.125, 0)
    assert (fig8.optim.weight_decay, list(fig8.optim.betas), fig8.trainer.gradient_clip_val) == \
        (0.1, [0.9, 0.999], None)  # Zoology's optimizer
    for name in ("induction_heads", "selective_copying"):
        o = compose_config(f"experiment={name}").optim
        assert (o.schedule, o.weight_decay, o.warmup_steps) == ("constant", 0.0, 0), name
    assert compose_config("experiment=induction_heads").optim.lr == 1e-3
    assert compose_config("experiment=selective_copying").optim.lr == 1e-4
    assert compose_config("experiment=induction_heads").task.fresh_data is True


def test_budget_scales_steps_examples_and_intervals():
    full = compose_config("experiment=mqar_fig8")
    eighth = compose_config("experiment=mqar_fig8", "budget=1/8")
    assert (full.trainer.max_steps, eighth.trainer.max_steps) == (8192, 1024)
    assert (full.trainer.val_check_interval, eighth.trainer.val_check_interval) == (1024, 128)
    # the curriculum keeps its 8 passes: each dataset shrinks with the budget, the batch does not
    assert [s.num_examples for s in eighth.task.train_segments] == [2**15] * 4
    assert eighth.task.batch_size == full.task.batch_size == 1024
    tiny = compose_config("experiment=induction_heads", "budget=0.00001")
    assert tiny.trainer.max_steps == 2 and tiny.trainer.val_check_interval == 1
    sc = compose_config("experiment=selective_copying", "budget=0.01")
    assert (sc.trainer.max_steps, sc.trainer.val_check_interval) == (4000, 200)
    # runs at different budgets are different runs (the override is part of the run name)
    with initialize_config_module("ssdbench.conf", version_base="1.3"):
        hydra_cfg = compose("config", return_hydra_config=True).hydra
    assert "budget" not in hydra_cfg.job.config.override_dirname.exclude_keys


def test_budget_cut_batch_keeps_the_steps_and_cuts_the_batch():
    """budget_cut=batch: all of the paper's steps at a fraction of its batch (the same tokens as
    budget_cut=steps); the curriculum's datasets shrink with the batch, so it keeps its 8 passes."""
    cfg = compose_config("experiment=mqar_fig8", "budget=1/8", "budget_cut=batch")
    budget.check_budget(cfg)
    assert (cfg.task.batch_size, cfg.trainer.max_steps, cfg.trainer.val_check_interval) == (128, 8192, 1024)
    assert [s.num_examples for s in cfg.task.train_segments] == [2**15] * 4
    r = budget.record_fields(cfg, tokens_seen=8192 * 128 * 256)
    assert (r["cut"], r["steps_fraction"], r["tokens_fraction"]) == ("batch", 1.0, 0.125)
    assert budget.record_fields(compose_config("experiment=mqar_fig8", "budget=1/8"))["cut"] == "steps"
    ih = compose_config("experiment=induction_heads", "budget=1/8", "budget_cut=batch")
    # an epoch is still 8,192 steps: its examples follow the batch run
    assert (ih.task.batch_size, ih.trainer.max_steps, ih.task.num_train_examples) == (1, 204800, 8192)
    sc = compose_config("experiment=selective_copying_small", "budget=1/64", "budget_cut=batch")
    assert (sc.task.batch_size, sc.trainer.max_steps) == (1, 400_000)
    # an unreadable cut resolves to None, left to check_budget to report
    assert budget.cut_if(8, "1/2", "sideways", "steps") is None


@pytest.mark.parametrize("overrides,key,needle", [
    (["experiment=mqar_fig8", "budget_cut=sideways"], "budget_cut", "must be steps"),
    (["experiment=mqar_fig8", "budget=1/3", "budget_cut=batch"], "budget", "not a whole number of sequences"),
    (["experiment=induction_heads", "budget=1/16", "budget_cut=batch"], "budget", "batch of 8 sequences"),
    (["budget_cut=batch"], "budget_cut", "no paper block"),
])
def test_bad_budget_cut_is_a_config_error(overrides, key, needle):
    with pytest.raises(ConfigError, match=f"^{key}: ") as e:
        _check_run_options(compose_config(*overrides))
    assert needle in str(e.value)


def test_presets_outside_the_protocols_have_no_budget():
    for name in ("mqar_fig8_quick", "mqar_tiny"):
        cfg = compose_config(f"experiment={name}")
        assert cfg.budget is None and cfg.paper is None
        budget.check_budget(cfg)
        assert budget.record_fields(cfg) is None
    quick = compose_config("experiment=mqar_fig8_quick")
    # it keeps the settings of the committed H100 results
    assert (quick.trainer.max_steps, quick.task.batch_size, quick.optim.schedule) == (1000, 64, "cosine")
    assert (quick.trainer.gradient_clip_val, list(quick.optim.betas), quick.optim.warmup_steps) == \
        (1.0, [0.9, 0.95], 100)


# ----------------------------------------------------------------------------- checks

@pytest.mark.parametrize("value,needle", [("0", "must be in (0, 1]"), ("-1", "must be in (0, 1]"),
                                          ("1.5", "budget_over_paper=true"), ("abc", "such as 0.125 or 1/8"),
                                          ("true", "such as 0.125 or 1/8")])
def test_bad_budget_is_a_config_error(value, needle):
    cfg = compose_config("experiment=induction_heads", f"budget={value}")
    with pytest.raises(ConfigError, match="^budget: ") as e:
        _check_run_options(cfg)  # before anything reads trainer.max_steps
    assert needle in str(e.value)


def test_budget_over_paper_needs_saying_so():
    cfg = compose_config("experiment=induction_heads", "budget=1.5", "budget_over_paper=true")
    budget.check_budget(cfg)
    assert cfg.trainer.max_steps == 307200
    assert budget.record_fields(cfg)["over_paper"] is True
    with pytest.raises(ConfigError, match="budget_over_paper"):
        budget.check_budget(compose_config("experiment=induction_heads", "budget_over_paper=maybe"))


def test_budget_without_a_paper_and_incomplete_paper_blocks():
    with pytest.raises(ConfigError, match="^budget: .*no paper block"):
        budget.check_budget(compose_config("budget=0.5"))
    with pytest.raises(ConfigError, match="^paper.steps: "):
        budget.check_budget(compose_config("experiment=selective_copying", "paper.steps=0"))
    with pytest.raises(ConfigError, match="^paper.source: "):
        budget.check_budget(compose_config("experiment=selective_copying", "paper.source=''"))


# ----------------------------------------------------------------------------- record, table, figures

def test_record_fields():
    cfg = compose_config("experiment=mqar_fig8", "budget=1/8", "task.seq_len=512")
    r = budget.record_fields(cfg, tokens_seen=2**29)
    assert (r["fraction"], r["label"], r["over_paper"]) == (0.125, "1/8", False)
    assert (r["steps"], r["steps_fraction"]) == (2048, 0.125)
    assert r["paper"]["steps"] == 16384 and r["paper"]["tokens"] == 2**32
    assert r["paper"]["source"].startswith("Mamba-2")
    assert r["tokens_fraction"] == 0.125
    json.dumps(r)  # goes into record.json as it is
    # an explicit trainer.max_steps moves the run off the knob: the record says what ran
    moved = budget.record_fields(compose_config("experiment=mqar_fig8", "trainer.max_steps=100"))
    assert moved["fraction"] == 1.0 and moved["steps_fraction"] == 100 / 8192


def _write_record(root, name, cfg_overrides, tokens_seen, acc, d_model=64):
    cfg = compose_config(*cfg_overrides)
    run = root / name
    r = {k: None for k in rec.REQUIRED_KEYS}
    r.update(schema=rec.SCHEMA_VERSION, status="ok", run_dir=str(run), params={"total": 1000},
             config={"model": {"d_model": d_model, "n_layers": 2}}, metrics={"val/acc": acc},
             model_name="mamba2", arch="mamba2", tokens_seen=tokens_seen, budget=budget.record_fields(cfg))
    rec.write_record(run, r)


def test_table_and_figures_show_the_budget(tmp_path, capsys):
    root = tmp_path / "fig8"
    for d, acc in ((32, 0.4), (64, 0.7)):
        _write_record(root, f"eighth-{d}", ["experiment=mqar_fig8", "budget=1/8"], 2**28, acc, d)
    _write_record(root, "plain", ["experiment=mqar_tiny"], 1000, 0.9)
    args = argparse.Namespace(results=root, out=None, columns=None, status=None, view="runs", loss_key="val/loss")
    assert table.main(args) == 0
    rows = {r["run"]: r for r in pd.read_csv(root / "table.csv").to_dict("records")}
    assert rows["eighth-32"]["budget"] == "1/8 of 8,192 steps"
    assert rows["eighth-32"]["tokens_of_paper"] == 0.125
    assert rows["plain"]["budget"] == "-"
    assert "| 1/8 of 8,192 steps |" in (root / "table.md").read_text()

    df = load_records(root)
    note = budget.figure_note(df)
    assert note.startswith("1/8 of the paper's training steps (Mamba-2") and "1 run(s) outside" in note
    figs, _ = plots.build_figures(df, root)
    assert "1/8 of the paper's training steps" in figs["acc_vs_d_model"].get_suptitle()
    plt.close("all")


def test_figure_note_names_the_token_fraction_when_the_batch_was_cut(tmp_path):
    """All of Figure 8's steps at 1/8 of its batch: the title must not read "the paper's full
    training budget"; it says the steps and the tokens."""
    full = ["experiment=mqar_fig8", "trainer.max_steps=8192"]
    _write_record(tmp_path, "small-batch", full, 2**28, 0.9)
    note = budget.figure_note(load_records(tmp_path))
    assert note.startswith("all of the paper's training steps, 1/8 of its tokens (Mamba-2")
    _write_record(tmp_path / "b", "paper-batch", full, 2**31, 0.9)
    assert budget.figure_note(load_records(tmp_path / "b")).startswith("the paper's full training budget")


def test_table_without_budgets_has_no_budget_column(tmp_path):
    _write_record(tmp_path, "plain", ["experiment=mqar_tiny"], 1000, 0.9)
    df = budget.add_table_columns(load_records(tmp_path))
    assert "budget" not in df.columns and budget.figure_note(df) is None


def test_lines_at_different_budgets_are_not_averaged(tmp_path):
    root = tmp_path / "s"
    _write_record(root, "a", ["experiment=mqar_fig8", "budget=1/8"], 2**28, 0.4)
    _write_record(root, "b", ["experiment=mqar_fig8", "budget=1/2"], 2**30, 0.8)
    hue = set(plots._hue_key(load_records(root)))
    assert hue == {"mamba2 (budget 1/8)", "mamba2 (budget 1/2)"}


def test_same_protocol_by_hand_or_by_budget_cut_is_one_line(tmp_path):
    """All of Figure 8's steps at 1/8 of its batch, set with budget_cut=batch or by hand (the
    steps and batch as overrides), is one protocol: one legend entry; the paper's batch with
    1/8 of its steps (the same tokens) is another."""
    root = tmp_path / "s"
    _write_record(root, "cut", ["experiment=mqar_fig8", "budget=1/8", "budget_cut=batch"], 2**28, 0.4, 32)
    _write_record(root, "hand", ["experiment=mqar_fig8", "trainer.max_steps=8192"], 2**28, 0.6, 64)
    _write_record(root, "steps", ["experiment=mqar_fig8", "budget=1/8"], 2**28, 0.1, 64)
    df = load_records(root)
    labels = dict(zip(df["run"], budget.run_labels(df)))
    assert labels == {"cut": "1 of steps, 1/8 of tokens", "hand": "1 of steps, 1/8 of tokens", "steps": "1/8"}
    assert set(plots._hue_key(df)) == {"mamba2 (budget 1 of steps, 1/8 of tokens)", "mamba2 (budget 1/8)"}


# ----------------------------------------------------------------------------- the command

def _ssdbench(*args, cwd, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "ssdbench.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("value", ["0", "-1", "1.5", "abc"])
def test_cli_bad_budget_one_line_exit_2(tmp_path, value):
    p = _ssdbench("run", "experiment=selective_copying_small", f"budget={value}", "trainer=cpu",
                  "progress_bar=false", f"results_dir={tmp_path}", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssdbench run: invalid config: budget: "), p.stderr
    assert not list(tmp_path.rglob("record.json")) and not list(tmp_path.rglob("*.ckpt"))  # nothing trained


@pytest.mark.slow
def test_cli_bad_budget_cut_one_line_exit_2(tmp_path):
    p = _ssdbench("run", "experiment=selective_copying_small", "budget_cut=sideways", "trainer=cpu",
                  "progress_bar=false", f"results_dir={tmp_path}", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssdbench run: invalid config: budget_cut: "), p.stderr
    assert not list(tmp_path.rglob("record.json"))


@pytest.mark.slow
def test_cli_budgeted_run_records_and_tables_its_budget(tmp_path):
    """A protocol run at a tiny budget: 10 of the reference's 400,000 steps, recorded and shown."""
    p = _ssdbench("run", "experiment=selective_copying_small", "budget=1/40000", "trainer=cpu",
                  "model=transformerpp", "model.d_model=16", "task.num_train_examples=640",
                  "task.num_test_examples=16", "progress_bar=false", f"results_dir={tmp_path}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "selective_copying_small"
    (path,) = run.rglob("record.json")
    assert "budget=1_40000" in path.parent.name  # the budget names the run
    r = json.loads(path.read_text())
    assert r["global_step"] == 10 and r["tokens_seen"] == 10 * 64 * 256
    b = r["budget"]
    assert (b["label"], b["steps"], b["paper"]["steps"], b["paper"]["tokens"]) == \
        ("2.5e-05", 10, 400_000, 6_553_600_000)
    assert _ssdbench("table", str(run), cwd=tmp_path).returncode == 0
    assert "| 2.5e-05 of 400,000 steps |" in (run / "table.md").read_text()
