"""`ssdbench plot-results`: figures from fake result records."""
import argparse

import matplotlib.pyplot as plt
import pytest

from ssdbench import plots
from ssdbench import record as rec
from ssdbench.table import load_records


def _write(root, name, model, d_model, accs, state=None, status="ok", seed=0, curves=True):
    """A run with per-slice accuracy {T: acc} and a two-version metrics.csv."""
    run = root / name
    metrics = {"val/acc": sum(accs.values()) / len(accs), "val/loss": 5.0 - d_model / 100}
    metrics.update({f"val/acc/T={t},kv={t // 8}": a for t, a in accs.items()})
    r = {k: None for k in rec.REQUIRED_KEYS}
    r.update(schema=rec.SCHEMA_VERSION, status=status, run_dir=str(run), params={"total": d_model * 100},
             config={"model": {"d_model": d_model, "n_layers": 2}, "seed": seed}, metrics=metrics,
             model_name=model, arch=model, state_size=state)
    rec.write_record(run, r)
    if curves:
        for v, steps in enumerate([(0, 10), (20, 30, 40)]):
            d = run / "logs" / f"version_{v}"
            d.mkdir(parents=True)
            rows = ["epoch,step,train/loss,val/acc"]
            for s in steps:
                rows += [f"0,{s},{5 - s / 20},", f"0,{s},,{s / 100}"]
            (d / "metrics.csv").write_text("\n".join(rows) + "\n")
    return run


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "study"
    for d in (16, 32, 64):
        _write(root, f"mamba2-{d}", "mamba2", d, {64: 0.5, 128: 0.3}, state=d * 64)
        _write(root, f"tpp-{d}", "transformerpp", d, {64: 0.9, 128: 0.8})
    _write(root, "mamba2-64-seed1", "mamba2", 64, {64: 0.7, 128: 0.5}, state=64 * 64, seed=1)
    _write(root, "broken", "mamba2", 128, {64: 0.0, 128: 0.0}, state=128 * 64, status="failed")
    return root


def _args(*argv):
    p = argparse.ArgumentParser()
    plots.add_arguments(p)
    return p.parse_args([str(a) for a in argv])


def _ok_records(root):
    df = load_records(root)
    return df[df["status"] == "ok"].reset_index(drop=True)


def test_main_writes_default_figures(results, capsys):
    assert plots.main(_args(results)) == 0
    out = results / "figures"
    for name in ("acc_vs_d_model", "acc_vs_state_size", "training_curves"):
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000
    text = capsys.readouterr().out
    assert "note acc_vs_state_size: no state_size for transformerpp" in text
    assert not list(out.glob("custom_*"))


def test_acc_vs_dim_facets_by_sequence_length(results):
    fig, why = plots.fig_acc_vs_dim(_ok_records(results))
    assert why is None
    # One panel per T, one line per model, one point per d_model (the failed d=128 run is out).
    assert plots.describe(fig) == {
        "sequence length 64": {"mamba2": 3, "transformerpp": 3},
        "sequence length 128": {"mamba2": 3, "transformerpp": 3},
    }
    line = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "mamba2")
    assert list(line.get_xdata()) == [16, 32, 64]
    assert line.get_ydata()[-1] == pytest.approx(0.6)  # mean of the two seeds at d=64
    assert fig.axes[0].get_xlabel() == "model dimension (d_model)"
    plt.close(fig)


def test_acc_vs_dim_without_slices_is_one_panel(tmp_path):
    r = {k: None for k in rec.REQUIRED_KEYS}
    for d in (8, 16):
        r.update(schema=1, status="ok", config={"model": {"d_model": d}}, metrics={"val/acc": d / 100},
                 model_name="m", params={"total": 1})
        rec.write_record(tmp_path / f"r{d}", r)
    fig, _ = plots.fig_acc_vs_dim(load_records(tmp_path))
    assert plots.describe(fig) == {"all runs": {"m": 2}}
    plt.close(fig)


def test_state_and_training_curves(results):
    df = _ok_records(results)
    fig, note = plots.fig_acc_vs_state(df)
    assert plots.describe(fig) == {"all runs": {"mamba2": 3}}
    assert fig.axes[0].get_xscale() == "log" and "transformerpp" in note
    plt.close(fig)

    fig, why = plots.fig_training_curves(df, results)
    assert why is None
    desc = plots.describe(fig)
    assert set(desc) == {"train/loss", "val/acc"}
    assert desc["train/loss"]["mamba2 d=16"] == 5  # both versions concatenated
    # the two d=64 mamba2 seeds share one legend entry
    assert len(desc["val/acc"]) == 6
    plt.close(fig)


def test_custom_figure_and_status_all(results, capsys):
    out = results / "figs"
    args = _args(results, "--out", out, "--status", "all", "--x", "d_model", "--y", "val/loss",
                 "--facet", "config.seed", "--hue", "arch")
    assert plots.main(args) == 0
    assert (out / "custom_val_loss_vs_d_model.png").exists()
    figs, _ = plots.build_figures(load_records(results), results, x="d_model", y="val/loss",
                                  facet="config.seed", hue="arch")
    desc = plots.describe(figs["custom_val_loss_vs_d_model"])
    assert desc == {"seed = 0": {"mamba2": 4, "transformerpp": 3},  # failed d=128 kept
                    "seed = 1": {"mamba2": 1}}
    for f in figs.values():
        plt.close(f)


def test_missing_fields_are_skipped(tmp_path, capsys):
    _write(tmp_path, "a", "m", 16, {64: 0.5}, curves=False)
    _write(tmp_path, "b", "m", 32, {64: 0.6}, curves=False)
    assert plots.main(_args(tmp_path, "--x", "nope", "--y", "val/acc")) == 0
    text = capsys.readouterr().out
    assert "skipped acc_vs_state_size: no state_size" in text
    assert "skipped training_curves" in text
    assert "skipped custom_val_acc_vs_nope: no field 'nope'" in text
    assert (tmp_path / "figures" / "acc_vs_d_model.png").exists()


def test_figures_of_one_point_per_model_are_left_out(tmp_path, capsys):
    """Induction-heads-like runs, one width and state per model: no width or state figure,
    but the other figures are still made."""
    _write(tmp_path, "m2", "mamba2", 64, {256: 1.0}, state=64 * 64)
    _write(tmp_path, "tpp", "transformerpp", 128, {256: 0.1})
    assert plots.main(_args(tmp_path)) == 0
    text = capsys.readouterr().out
    assert "skipped acc_vs_d_model: each model has runs at one" in text
    assert "skipped acc_vs_state_size: each model has runs at one" in text
    assert (tmp_path / "figures" / "training_curves.png").exists()


def test_curve_labels_name_state_width_and_rate_where_they_vary(tmp_path):
    for name, N, lr in (("a", 16, 1e-2), ("b", 64, 1e-2), ("c", 64, 1e-3), ("d", 64, 1e-3)):
        run = _write(tmp_path, name, "mamba2", 64, {256: 0.5}, state=N * 64, seed=name == "d")
        r = rec.read_record(run / rec.RECORD_NAME)
        r["config"]["model"]["d_state"] = N
        r["config"]["optim"] = {"lr": lr}
        rec.write_record(run, r)
    df = _ok_records(tmp_path).sort_values("run").reset_index(drop=True)
    assert list(plots._curve_labels(df)) == ["mamba2 N=16 d=64", "mamba2 N=64 d=64 lr=0.01",
                                             "mamba2 N=64 d=64 lr=0.001", "mamba2 N=64 d=64 lr=0.001"]


def test_curve_labels_name_an_ablation_key_that_alone_tells_runs_apart(tmp_path):
    """S6 and its LTI ablation (model.selective) at the same width and rate: two labels, not
    one shared colour; a seed still shares its run's label."""
    for name, selective, seed in (("a", True, False), ("b", False, False), ("c", False, True)):
        run = _write(tmp_path, name, "mamba1", 64, {256: 0.5}, state=64 * 16, seed=seed)
        r = rec.read_record(run / rec.RECORD_NAME)
        r["config"]["model"]["selective"] = selective
        rec.write_record(run, r)
    df = _ok_records(tmp_path).sort_values("run").reset_index(drop=True)
    assert list(plots._curve_labels(df)) == ["mamba1 d=64 selective=True", "mamba1 d=64 selective=False",
                                             "mamba1 d=64 selective=False"]


def test_state_sweep_at_one_width_is_one_line_per_model(tmp_path):
    """Figure 8 at one width: Mamba-2 at N=16/64/256 is one model whose line runs over the
    state size (N is the x axis there, not a separate line), so the state figure is drawn."""
    for N in (16, 64, 256):
        run = _write(tmp_path, f"m2-{N}", "mamba2", 64, {256: N / 300}, state=2 * 64 * N, curves=False)
        r = rec.read_record(run / rec.RECORD_NAME)
        r["config"]["model"]["d_state"] = N
        rec.write_record(run, r)
    _write(tmp_path, "m1", "mamba1", 64, {256: 0.2}, state=2 * 64 * 16, curves=False)
    fig, note = plots.fig_acc_vs_state(_ok_records(tmp_path))
    assert fig is not None and note is None
    assert plots.describe(fig)["all runs"] == {"mamba2": 3, "mamba1": 1}
    plt.close("all")


@pytest.mark.parametrize("case", ["missing", "empty", "no_ok"])
def test_errors_exit_2_with_one_line(tmp_path, capsys, case):
    root = tmp_path / "r"
    if case != "missing":
        root.mkdir()
    if case == "no_ok":
        _write(root, "a", "m", 16, {64: 0.5}, status="failed", curves=False)
    assert plots.main(_args(root)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ssdbench plot-results:")
    assert not (root / "figures").exists()


def test_best_learning_rate_per_point_and_state_size_lines(tmp_path):
    """A learning-rate sweep keeps the best run per point; Mamba-2 runs that differ in d_state
    become one line per N (Figure 8's N=16/64/256)."""
    root = tmp_path / "fig8"
    for d in (32, 64):
        for lr, acc in ((1e-3, 0.2), (1e-2, 0.6)):
            for N in (16, 64):
                run = _write(root, f"m2-{d}-{lr}-{N}", "mamba2", d, {256: acc + N / 1000}, curves=False)
                r = rec.read_record(run / rec.RECORD_NAME)
                r["config"]["optim"] = {"lr": lr}
                r["config"]["model"]["d_state"] = N
                # how a run was launched is not what it trains: a rerun at another
                # jobs_per_gpu, or a resumed run, is still the same point
                r["config"].update(jobs_per_gpu=4 if lr == 1e-3 else 5, resume=None if N == 16 else "x.ckpt")
                rec.write_record(run, r)
    df = _ok_records(root)
    best = plots.best_over(df, "config.optim.lr")
    assert len(best) == 4 and set(best["config.optim.lr"]) == {1e-2}
    fig, _ = plots.fig_acc_vs_dim(best)
    lines = plots.describe(fig)["sequence length 256"]
    assert lines == {"mamba2 N=16": 2, "mamba2 N=64": 2}
    assert plots.main(_args(root)) == 0
    plt.close("all")


def test_best_over_with_fields_missing_in_some_records(tmp_path):
    """Records of different models have different config fields (Mamba-2's d_state, absent
    for attention): the grouping must treat a missing value as a value (pandas 3 keeps NaN
    under astype(str), which broke the join on the first real study)."""
    root = tmp_path / "mixed"
    for lr, acc in ((1e-3, 0.2), (1e-2, 0.6)):
        for model, N in (("mamba2", 64), ("transformerpp", None)):
            run = _write(root, f"{model}-{lr}", model, 64, {256: acc if model == "mamba2" else 1 - acc},
                         curves=False)
            r = rec.read_record(run / rec.RECORD_NAME)
            r["config"]["optim"] = {"lr": lr}
            if N is not None:
                r["config"]["model"]["d_state"] = N
            rec.write_record(run, r)
    best = plots.best_over(_ok_records(root), "config.optim.lr")
    assert len(best) == 2
    assert dict(zip(best[plots.MODEL], best["config.optim.lr"])) == {"mamba2": 1e-2, "transformerpp": 1e-3}


def test_acc_vs_length_extrapolation_curve(tmp_path, capsys):
    root = tmp_path / "ih"
    for model, accs in (("mamba2", {64: 1.0, 1024: 1.0, 2**20: 1.0}),
                        ("transformerpp", {64: 0.9, 1024: 0.1, 2**20: float("nan")})):
        run = _write(root, model, model, 64, {256: 1.0}, curves=False)
        r = rec.read_record(run / rec.RECORD_NAME)
        r["metrics"].update({f"extrapolation/acc/T={T}": a for T, a in accs.items()})
        r["config"]["task"] = {"train_seq_len": 256}
        rec.write_record(run, r)
    fig, note = plots.fig_acc_vs_length(_ok_records(root))
    assert plots.describe(fig)["length extrapolation"] == {"mamba2": 3, "transformerpp": 2}
    assert "out of memory" in note
    assert plots.main(_args(root)) == 0
    assert (root / "figures" / "acc_vs_length.png").stat().st_size > 1000
    plt.close("all")


# ----------------------------------------------------------------------------- scaling figures

def test_scaling_figures_from_lm_records(tmp_path, capsys):
    """Loss vs FLOPs with the envelope and the L(N, D) frontier, and IsoFLOP profiles, from an
    IsoFLOP study of two models (3 budgets x 5 sizes each)."""
    from test_scaling import write_scaling_records  # the fake LM records of the scaling tests

    root = write_scaling_records(tmp_path / "study")
    df = load_records(root)
    fig, note = plots.fig_loss_vs_flops(df)
    assert note is None
    lines = plots.describe(fig)["all runs"]
    assert lines["mamba2"] == 15 and lines["transformerpp"] == 15  # the runs
    assert lines["mamba2 envelope"] == 3  # one best run per budget
    frontier = next(ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("mamba2 L(N,D)"))
    assert "1.10x6ND" in frontier.get_label()  # the exact/6ND ratio of these records
    assert fig.axes[0].get_xscale() == "log"
    plt.close(fig)

    fig, note = plots.fig_isoflop(df)
    desc = plots.describe(fig)
    assert len(desc) == 2 and all(title.startswith(("mamba2: N_opt", "transformerpp: N_opt")) for title in desc)
    panel = next(v for k, v in desc.items() if k.startswith("mamba2"))
    assert panel == {"C = 1.1e+15": 5, "C = 1.1e+16": 5, "C = 1.1e+17": 5}  # exact FLOPs: 1.1 x 6ND
    plt.close(fig)

    assert plots.main(_args(root)) == 0
    for name in ("loss_vs_flops", "isoflop_profiles"):
        assert (root / "figures" / f"{name}.png").stat().st_size > 1000


def test_scaling_figures_skipped_for_synthetic_tasks_and_one_size(tmp_path):
    df = load_records(_write(tmp_path, "a", "m", 16, {64: 0.5}, curves=False).parent)
    fig, why = plots.fig_loss_vs_flops(df)
    assert fig is None and "params.non_embedding" in why  # the fake MQAR-like record lacks it
    from test_scaling import write_scaling_records

    root = write_scaling_records(tmp_path / "one", widths=(64,))
    assert plots.fig_isoflop(load_records(root)) == (None, "a single model size")
    df = load_records(write_scaling_records(tmp_path / "mqar", widths=(64, 128)))
    df["task_name"] = "mqar"
    assert plots.fig_loss_vs_flops(df)[1] == "no language-model record with val/loss"


def test_best_over_unknown_field_is_one_line_exit_2(results, capsys):
    assert plots.main(_args(results, "--best-over", "optim.lrr")) == 2
    assert "--best-over: no field 'optim.lrr'" in capsys.readouterr().err
    assert not (results / "figures").exists()  # nothing half-written


def test_log_axis_ticks_skip_values_too_close_to_read():
    fig, ax = plt.subplots()
    plots._nice_log_axis(ax, [2432, 2624, 4864, 5056, 9344, 17920, 18000], base=10)
    assert list(ax.get_xticks()) == [2432, 4864, 9344, 17920]
    plt.close(fig)
