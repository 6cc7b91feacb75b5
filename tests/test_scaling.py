"""Scaling fits (ssdbench/scaling.py) on synthetic points drawn from known laws."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from ssdbench import cli, scaling
from ssdbench.errors import ConfigError
from ssdbench.scaling import ParametricFit, ScalingDataError

CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022, eq. 10
EPOCH = dict(E=1.82, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)  # Besiroglu et al. 2024


def grid_points(law: dict, noise: float = 0.0, seed: int = 0, n=8) -> pd.DataFrame:
    """Losses of the law on an n x n grid of N in [1e7, 1e10] and D in [1e9, 1e12], times
    exp(noise * standard normal)."""
    f = ParametricFit(**law)
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e10, n), np.geomspace(1e9, 1e12, n)))
    loss = f.loss(N, D) * np.exp(noise * np.random.default_rng(seed).standard_normal(N.size))
    return pd.DataFrame(dict(run=[f"r{i}" for i in range(N.size)], model="m", params=N, tokens=D,
                             loss=loss, flops=6 * N * D))


def isoflop_points(law: dict, budgets=np.geomspace(1e18, 1e22, 5), sizes=np.geomspace(1e6, 1e12, 61),
                   width=1.0) -> pd.DataFrame:
    """IsoFLOP runs: for each budget C, every N of a fixed size grid within `width` decades of
    the law's optimum, trained on D = C / (6 N) tokens (noise-free)."""
    f = ParametricFit(**law)
    rows = []
    for C in budgets:
        n_opt = f.optimal(C)[0]
        for N in sizes[np.abs(np.log10(sizes / n_opt)) <= width]:
            D = C / (6 * N)
            rows.append(dict(run=f"C{C:.0e}-N{N:.2e}", model="m", params=N, tokens=D, flops=C,
                             loss=float(f.loss(N, D))))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- approach 3

@pytest.mark.parametrize("law", [CHINCHILLA, EPOCH], ids=["chinchilla", "epoch"])
def test_parametric_recovers_constants_without_noise(law):
    fit = scaling.fit_parametric(grid_points(law), n_bootstrap=0)
    for k, v in law.items():
        assert getattr(fit, k) == pytest.approx(v, rel=1e-6), k


@pytest.mark.parametrize("law", [CHINCHILLA, EPOCH], ids=["chinchilla", "epoch"])
def test_parametric_with_noise_and_bootstrap_contains_truth(law):
    """1 % multiplicative noise on 100 points: exponents within 0.03 (E within 3 %, A and B,
    which trade off against the exponents, within a factor 1.6); the compute-optimal exponent
    a = beta / (alpha + beta) within 0.03; 95 % bootstrap intervals contain the truth.

    Coverage is a 95 % property, so the data and resampling seeds are fixed: of noise seeds 0..3
    examined when this test was written, seed 1 left E's truth just outside its interval (for
    both laws); alpha, beta and a were covered every time."""
    pts = grid_points(law, noise=0.01, seed=0, n=10)
    fit = scaling.fit_parametric(pts, n_bootstrap=30, seed=0)
    assert fit.alpha == pytest.approx(law["alpha"], abs=0.03)
    assert fit.beta == pytest.approx(law["beta"], abs=0.03)
    assert fit.E == pytest.approx(law["E"], rel=0.03)
    for k in ("A", "B"):
        assert 1 / 1.6 < getattr(fit, k) / law[k] < 1.6, k
    truth = ParametricFit(**law)
    assert fit.a == pytest.approx(truth.a, abs=0.03)
    for k in ("E", "alpha", "beta", "a"):
        lo, hi = fit.ci[k]
        assert lo <= getattr(truth, k) <= hi, (k, lo, hi)
    # the compute-optimal size at 1e21 FLOPs lies inside its bootstrap interval too
    (n_lo, n_hi) = fit.optimal_ci(1e21)["N"]
    assert n_lo <= truth.optimal(1e21)[0] <= n_hi
    assert len(fit.boot) == 30 and fit.notes == []


def test_bootstrap_is_seeded():
    pts = grid_points(CHINCHILLA, noise=0.01, n=5)
    a = scaling.fit_parametric(pts, n_bootstrap=5, seed=3, n_starts=8)
    b = scaling.fit_parametric(pts, n_bootstrap=5, seed=3, n_starts=8)
    np.testing.assert_array_equal(a.boot, b.boot)


def test_bootstrap_resample_that_diverges_is_counted_not_fatal(monkeypatch):
    """A resample whose optimum has log A beyond a float's range (seen on a micro ladder whose
    longest runs overfit: exp() raised OverflowError and the command died) is left out and
    counted in the notes; the full fit and the other resamples stand."""
    pts = grid_points(CHINCHILLA, noise=0.01, n=5)
    real, calls = scaling._minimise, []

    def minimise(*args):
        res = real(*args)
        calls.append(1)
        if len(calls) == 3:  # the full fit is call 1; the second resample diverges
            res.x = np.array([800.0, *res.x[1:]])
        return res

    monkeypatch.setattr(scaling, "_minimise", minimise)
    fit = scaling.fit_parametric(pts, n_bootstrap=5, seed=3, n_starts=8)
    assert len(fit.boot) == 4 and np.all(np.isfinite(fit.boot))
    assert fit.notes == ["1 of 5 bootstrap resamples had a single size, did not converge or diverged"]


def test_parametric_fit_that_diverges_is_a_data_error(monkeypatch):
    real = scaling._minimise

    def minimise(*args):
        res = real(*args)
        res.x = np.array([800.0, *res.x[1:]])
        return res

    monkeypatch.setattr(scaling, "_minimise", minimise)
    with pytest.raises(ScalingDataError, match="diverged"):
        scaling.fit_parametric(grid_points(CHINCHILLA, n=5), n_bootstrap=0, n_starts=8)


def test_compute_optimal_closed_form_matches_numeric_minimum():
    """N_opt from G (C/6)^(beta/(alpha+beta)) is the minimum of L(N, C/(6N)) over N."""
    f = ParametricFit(**CHINCHILLA)
    C = 1e22
    N = np.geomspace(1e8, 1e12, 200001)
    n_num = N[np.argmin(f.loss(N, C / (6 * N)))]
    n, d, loss = f.optimal(C)
    assert n == pytest.approx(n_num, rel=1e-3)
    assert 6 * n * d == pytest.approx(C)
    assert loss == pytest.approx(f.loss(n, d))
    assert f.a + f.b == pytest.approx(1)


# --------------------------------------------------------------------------- approaches 1, 2

@pytest.mark.parametrize("law", [CHINCHILLA, EPOCH], ids=["chinchilla", "epoch"])
def test_envelope_and_isoflop_recover_compute_optimal_exponents(law):
    truth = ParametricFit(**law)
    pts = isoflop_points(law)
    env = scaling.fit_envelope(pts)
    assert len(env.table) == 5  # one best run per budget, all on the envelope
    assert env.n_opt.exponent == pytest.approx(truth.a, abs=0.03)
    assert env.d_opt.exponent == pytest.approx(truth.b, abs=0.03)

    iso = scaling.fit_isoflop(pts)
    assert len(iso.table) == 5 and iso.table["vertex_inside"].all()
    assert iso.n_opt.exponent == pytest.approx(truth.a, abs=0.01)
    assert iso.d_opt.exponent == pytest.approx(truth.b, abs=0.01)
    # the vertices sit near the true optima (the profiles are not exactly parabolas)
    n_true = truth.optimal(iso.table["budget"].to_numpy())[0]
    np.testing.assert_allclose(iso.table["params_opt"], n_true, rtol=0.25)
    lo, hi = iso.n_opt.exponent_ci  # noise-free: only the size grid's discreteness is left
    assert 0 < hi - lo < 0.01


def test_budgets_group_within_tolerance():
    ids = scaling.group_budgets([1e18, 1.05e18, 3e18, 2.9e18, 1e19], tolerance=0.1)
    assert ids.tolist() == [0, 0, 1, 1, 2]
    assert scaling.group_budgets([1e18, 1.05e18], tolerance=0.01).tolist() == [0, 1]


def test_isoflop_leaves_out_thin_budgets_with_a_note():
    pts = isoflop_points(CHINCHILLA, budgets=[1e18, 1e19, 1e20])
    thin = pts[pts["flops"] == 1e20].head(2)
    pts = pd.concat([pts[pts["flops"] < 1e20], thin])
    fit = scaling.fit_isoflop(pts)
    assert len(fit.table) == 2 and any("needs 3" in n for n in fit.notes)


# --------------------------------------------------------------------------- degenerate inputs

def _pts(**cols):
    base = dict(run=["a", "b", "c", "d", "e", "f"], model="m", params=[1e6, 2e6, 4e6, 1e6, 2e6, 4e6],
                tokens=[1e8, 1e8, 1e8, 4e8, 4e8, 4e8], loss=[4.0, 3.8, 3.7, 3.6, 3.3, 3.1])
    base.update(cols)
    df = pd.DataFrame(base)
    df["flops"] = 6 * df["params"] * df["tokens"]
    return df


@pytest.mark.parametrize("fit", [scaling.fit_envelope, scaling.fit_isoflop, scaling.fit_parametric])
def test_one_model_size_is_an_error(fit):
    with pytest.raises(ScalingDataError, match="params: .*2 model sizes"):
        fit(_pts(params=[1e6] * 6))


def test_too_few_points_for_parametric():
    with pytest.raises(ScalingDataError, match="points: .*at least 5 runs, got 4") as e:
        scaling.fit_parametric(_pts().head(4))
    assert isinstance(e.value, ConfigError) and isinstance(e.value, ValueError)
    assert e.value.field == "points"


def test_isoflop_needs_two_budgets_with_three_sizes():
    with pytest.raises(ScalingDataError, match="approach 2 needs at least 2 FLOP budgets"):
        scaling.fit_isoflop(_pts())  # every run is its own budget


@pytest.mark.parametrize("col, value, words", [("loss", math.nan, "not a number"), ("tokens", 0.0, "not positive"),
                                               ("params", -5.0, "not positive"), ("loss", math.inf, "not a number")])
def test_bad_values_are_named(col, value, words):
    df = _pts()
    df.loc[2, col] = value
    with pytest.raises(ScalingDataError, match=f"{col}: 1 point.*{words}.*first: c"):
        scaling.check_points(df)


# --------------------------------------------------------------------------- CLI

def test_cli_fit_scaling_on_csv_writes_tables(tmp_path, capsys):
    pts = pd.concat([isoflop_points(CHINCHILLA).assign(model="chin"),
                     isoflop_points(EPOCH).assign(model="epoch")])
    src = tmp_path / "runs.csv"
    pts[["model", "params", "tokens", "loss"]].to_csv(src, index=False)  # flops default 6ND
    out = tmp_path / "fit"
    assert cli.main(["fit-scaling", str(src), "--budgets", "1e20", "1e22", "--bootstrap", "3",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fitted constants" in text and "compute-optimal" in text
    consts = pd.read_csv(out / "scaling_constants.csv")
    alpha = consts.query("model == 'chin' and approach == 3 and quantity == 'alpha'")["estimate"].item()
    assert alpha == pytest.approx(0.34, abs=1e-3)
    opt = pd.read_csv(out / "scaling_optimal.csv")
    assert len(opt) == 2 * 3 * 2  # models x approaches x budgets
    row = opt.query("model == 'chin' and approach == 3 and flops == 1e22").iloc[0]
    assert row["params_opt"] == pytest.approx(ParametricFit(**CHINCHILLA).optimal(1e22)[0], rel=1e-3)
    doc = json.loads((out / "scaling_fit.json").read_text())
    assert set(doc["models"]) == {"chin", "epoch"}
    assert set(doc["models"]["chin"]) == {"envelope", "IsoFLOP", "parametric"}
    assert "## Compute-optimal allocation" in (out / "scaling.md").read_text()


def test_cli_reports_degenerate_input_in_one_line(tmp_path, capsys):
    src = tmp_path / "one.csv"
    pd.DataFrame(dict(params=[1e6] * 6, tokens=[1e8, 2e8, 4e8] * 2, loss=[3.0] * 6)).to_csv(src, index=False)
    assert cli.main(["fit-scaling", str(src), "--approach", "3"]) == 2
    err = capsys.readouterr().err
    assert "2 model sizes" in err and "no fit could be made" in err
    src.write_text("params,tokens\n1,2\n")
    assert cli.main(["fit-scaling", str(src)]) == 2
    assert "loss: " in capsys.readouterr().err


def test_cli_where_keeps_the_matching_points(tmp_path, capsys):
    """--where drops points by a pandas query (here the second model and every run past a token
    count) before fitting; the outputs say which points were kept."""
    pts = pd.concat([isoflop_points(CHINCHILLA).assign(model="chin"),
                     isoflop_points(EPOCH).assign(model="epoch")])
    src = tmp_path / "runs.csv"
    pts[["model", "params", "tokens", "loss"]].to_csv(src, index=False)
    cap = float(pts.tokens.median())
    out = tmp_path / "fit"
    where = f"model == 'chin' and tokens <= {cap}"
    assert cli.main(["fit-scaling", str(src), "--where", where, "--approach", "1", "3", "--bootstrap", "0",
                     "--out", str(out)]) == 0
    n = int(((pts.model == "chin") & (pts.tokens <= cap)).sum())
    assert 5 <= n < len(pts) / 2
    assert f"{n} runs (those matching `{where}`)" in (out / "scaling.md").read_text()
    doc = json.loads((out / "scaling_fit.json").read_text())
    assert set(doc["models"]) == {"chin"} and doc["settings"]["where"] == where


@pytest.mark.parametrize("where, words", [("tokens <=", "cannot apply"), ("steps > 3", "cannot apply"),
                                          ("tokens < 0", "keeps none of the"), ("tokens * 2", "not a filter")])
def test_cli_where_that_cannot_select_is_one_line_and_exit_2(tmp_path, capsys, where, words):
    src = tmp_path / "runs.csv"
    isoflop_points(CHINCHILLA)[["params", "tokens", "loss"]].to_csv(src, index=False)
    assert cli.main(["fit-scaling", str(src), "--where", where]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--where" in err and words in err, err


# --------------------------------------------------------------------------- records, table view

def write_scaling_records(root, models=("mamba2", "transformerpp"), budgets=(1e15, 1e16, 1e17),
                          widths=(64, 128, 256, 512, 1024)):
    """Fake LM records of an IsoFLOP study: every width trained at every budget, with the loss
    of Chinchilla's law (the transformer 3 % worse) and exact FLOPs 10 % above 6ND."""
    from ssdbench import record as rec

    law = ParametricFit(**CHINCHILLA)
    for m, model in enumerate(models):
        for C in budgets:
            for d in widths:
                layers = 4 * (2 if model.startswith("mamba") else 1)
                n_emb = 256 * d
                n = 12 * d * d * 4  # non-embedding parameters
                tokens = int(C / (6 * n))
                metrics = {"val/loss": float(law.loss(n, tokens)) * (1 + 0.03 * m), "val/acc": 0.5}
                cfg = {"model": {"d_model": d, "n_layers": layers}, "task": {"seq_len": 512}}
                if model == "transformerpp":
                    cfg["model"]["n_heads"] = d // 64 or 1
                else:
                    cfg["model"].update(d_state=64, expand=2, headdim=64)
                r = {k: None for k in rec.REQUIRED_KEYS}
                r.update(schema=rec.SCHEMA_VERSION, status="ok", run_dir=f"{model}-{d}-{C:.0e}", config=cfg,
                         model_name=model, arch=model, task_name="pile", metrics=metrics,
                         params={"total": n + n_emb, "non_embedding": n}, tokens_seen=tokens,
                         train_flops=int(1.1 * 6 * n * tokens), train_flops_6nd=int(6 * n * tokens),
                         state_size=None if model == "transformerpp" else 2 * d * 64 * layers)
                rec.write_record(root / f"{model}-d{d}-C{C:.0e}", r)
    return root


def test_fit_scaling_on_records(tmp_path, capsys):
    root = write_scaling_records(tmp_path / "study")
    pts = scaling.load_points(root)
    assert len(pts) == 30 and set(pts["model"]) == {"mamba2", "transformerpp"}
    assert (pts["flops"] / (6 * pts["params"] * pts["tokens"])).round(3).eq(1.1).all()  # exact FLOPs
    assert cli.main(["fit-scaling", str(root), "--bootstrap", "0", "--approach", "2", "3"]) == 0
    consts = pd.read_csv(root / "scaling_constants.csv")
    alpha = consts.query("model == 'mamba2' and approach == 3 and quantity == 'alpha'")["estimate"].item()
    assert alpha == pytest.approx(0.34, abs=0.02)  # tokens are rounded to integers
    with pytest.raises(ScalingDataError, match="loss: the records have no field 'metrics.val/nope'"):
        scaling.load_points(root, loss_key="val/nope")


def test_table_scaling_view(tmp_path, capsys):
    root = write_scaling_records(tmp_path / "study", budgets=(1e16,), widths=(64, 128))
    out = tmp_path / "out"
    assert cli.main(["table", str(root), "--view", "scaling", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tokens/param" in text and "FLOPs (6ND)" in text
    t = pd.read_csv(out / "scaling_table.csv")
    assert t["model"].tolist() == ["mamba2", "mamba2", "transformerpp", "transformerpp"]
    tpp = t[t["model"] == "transformerpp"].iloc[1]
    assert tpp["d_model"] == 128 and tpp["n_layers"] == 4 and tpp["heads"] == 2
    assert tpp["tokens_per_param"] == pytest.approx(tpp["tokens"] / tpp["params"])
    assert tpp["ppl"] == pytest.approx(math.exp(tpp["loss"]))
    m2 = t[t["model"] == "mamba2"].iloc[0]
    assert m2["heads"] == 2 and m2["d_state"] == 64 and m2["n_layers"] == 8  # SSD heads: 2 * 64 / 64
    tex = (out / "scaling_table.tex").read_text()
    assert tex.startswith("\\begin{tabular}") and "\\toprule" in tex and "tokens/param" in tex
    assert "| model" in (out / "scaling_table.md").read_text()
