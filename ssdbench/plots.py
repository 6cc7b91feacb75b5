"""`ssdbench plot-results DIR`: figures from the result records under DIR (PNG and PDF).

The figure set follows what the records hold:

* ``acc_vs_d_model``: accuracy against ``config.model.d_model``, one panel per sequence length
  when the per-slice metrics carry ``T=<len>`` (the layout of Mamba-2's Figure 8), one line per
  model (left out when every model has one width: dots, not lines);
* ``acc_vs_state_size``: accuracy against the recurrent state size (log x), one line per model
  (left out likewise);
* ``acc_vs_length``: induction-heads accuracy against test length (``extrapolation/acc/T=<len>``,
  log2 x), one line per model, the training length marked;
* ``training_curves``: ``train/loss`` and ``val/acc`` against step, read from each run's
  ``logs/version_*/metrics.csv``, one colour per model, N, width and (where it varies) rate;
* ``loss_vs_flops``: language-model loss against training FLOPs (log-log), one colour per
  model, with the lower envelope of the runs (Chinchilla approach 1) dashed and the
  compute-optimal frontier of the parametric fit ``L(N, D) = E + A/N^alpha + B/D^beta``
  (approach 3) solid; only for LM records (not the synthetic tasks) of several sizes;
* ``isoflop_profiles``: loss against parameters, one panel per model, one colour per FLOP budget,
  with each budget's fitted parabola in log N and its minimum (approach 2; needs 2 budgets
  of 3 or more sizes);
* ``custom_<y>_vs_<x>``: with ``--x`` and ``--y`` (optionally ``--facet`` and ``--hue``).

A figure whose fields are missing is skipped with a line on stdout. The building functions
return matplotlib Figures; `describe` turns one into ``{panel title: {line label: n points}}``.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from ssdbench import budget  # noqa: E402
from ssdbench import record as rec  # noqa: E402
from ssdbench.table import load_records  # noqa: E402

D_MODEL = "config.model.d_model"
STATE = "state_size"
MODEL = "model_name"
MARKERS = "osD^vP*X"
SLICE = re.compile(r"^metrics\.(?P<base>.+?)/(?P<tags>(?:[A-Za-z_]+=[^,/]+,?)+)$")
FORMATS = ("png", "pdf")


# ----------------------------------------------------------------------------- helpers

def resolve_field(df: pd.DataFrame, name: str) -> str | None:
    """A column of df for a user-given field: as written, or under metrics./config./config.model."""
    for cand in (name, f"metrics.{name}", f"config.{name}", f"config.model.{name}"):
        if cand in df.columns:
            return cand
    return None


def _label(field: str) -> str:
    return {D_MODEL: "model dimension (d_model)", STATE: "recurrent state size (elements)",
            MODEL: "model"}.get(field, field.removeprefix("metrics.").removeprefix("config."))


def _value(v) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _hue_key(df: pd.DataFrame, split_state: bool = True) -> pd.Series:
    """The model name of each row (falling back to arch, then run), with the state size N
    appended for models whose runs differ in it (Figure 8's Mamba-2 N=16/64/256 lines), unless
    ``split_state`` is false: in a figure against the state size, N is the x axis."""
    for c in (MODEL, "arch", "run"):
        if c in df.columns:
            key = df[c].astype(str)
            break
    else:
        return pd.Series(["all"] * len(df), index=df.index)
    n_col = "config.model.d_state"
    if split_state and n_col in df.columns:
        varies = df.groupby(key.values)[n_col].transform("nunique") > 1
        n = pd.to_numeric(df[n_col], errors="coerce")
        key = key.where(~varies | n.isna(), key + " N=" + n.astype("Int64").astype(str))
    # runs of one model at several budgets are separate lines, never averaged into one
    # (by steps and tokens run, not the budget knob's label: the same protocol set by hand or by
    # budget_cut is one line)
    runs = budget.run_labels(df)
    varies = runs.groupby(key.values).transform("nunique") > 1
    key = key.where(~varies | runs.isna(), key + " (budget " + runs.astype(str) + ")")
    return key


def best_over(df: pd.DataFrame, field: str = "config.optim.lr", metric: str = "val/acc") -> pd.DataFrame:
    """Keep, for each configuration that differs only in ``field`` (e.g. the learning rate of
    a sweep), the run with the best ``metric``: the papers report the best learning rate per
    point. Records without the field or with one value of it are returned unchanged."""
    col = f"metrics.{metric}"
    if field not in df.columns or col not in df.columns or df[field].nunique() < 2:
        return df
    # how a run was carried out (jobs_per_gpu, resume, ...) does not make it another point
    how = rec.OPERATIONAL_KEYS | {"hydra"}
    keys = [c for c in df.columns if c.startswith("config.") and c != field and c.split(".")[1] not in how]
    # map(str): a missing value becomes "nan" (pandas 3 keeps NaN under astype(str))
    keyed = df[keys].map(str).agg("|".join, axis=1)
    best = pd.to_numeric(df[col], errors="coerce").groupby(keyed).idxmax().dropna().astype(int)
    return df.loc[sorted(best.values)].reset_index(drop=True)


def _slices(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per-slice columns of a metric (e.g. ``metrics.val/acc/T=64,kv=8``), long format:
    one row per (record, slice) with the parsed tags as columns and the value as ``value``."""
    parts = []
    for col in df.columns:
        m = SLICE.match(col)
        if not m or m["base"] != metric:
            continue
        tags = dict(t.split("=", 1) for t in m["tags"].strip(",").split(","))
        part = df.drop(columns=[c for c in df.columns if c.startswith("metrics.")]).copy()
        part["value"] = pd.to_numeric(df[col], errors="coerce")
        for k, v in tags.items():
            part[k] = int(v) if v.lstrip("-").isdigit() else v
        parts.append(part.dropna(subset=["value"]))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _nice_log_axis(ax, values, base=2) -> None:
    """Log x with a tick at the values present, labelled plainly; a value within a factor 1.25
    of the last ticked one gets none (close state sizes, e.g. 2,432 and 2,624, overprint)."""
    vals = []
    for v in sorted({float(v) for v in values if np.isfinite(v) and v > 0}):
        if not vals or v / vals[-1] >= 1.25:
            vals.append(v)
    ax.set_xscale("log", base=base)
    if 0 < len(vals) <= 10:
        ax.set_xticks(vals)
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))


def _lines(ax, df: pd.DataFrame, x: str, y: str, hue: pd.Series, logx: bool = False) -> None:
    """One line per hue value: the mean of y over rows sharing x, a band for min..max when
    there are repeats (seeds)."""
    df = df.assign(_hue=hue.values, _x=pd.to_numeric(df[x], errors="coerce"),
                   _y=pd.to_numeric(df[y], errors="coerce")).dropna(subset=["_x", "_y"])
    for i, (name, g) in enumerate(sorted(df.groupby("_hue"), key=lambda kv: kv[0])):
        agg = g.groupby("_x")["_y"].agg(["mean", "min", "max", "count"]).sort_index()
        # a marker shape per line, each smaller than the last: lines that coincide (two models
        # at 100 %) stay visible around each other
        line, = ax.plot(agg.index, agg["mean"], marker=MARKERS[i % len(MARKERS)],
                        markersize=max(3.0, 8.0 - 1.0 * i), label=str(name))
        if (agg["count"] > 1).any():
            ax.fill_between(agg.index, agg["min"], agg["max"], color=line.get_color(), alpha=0.2)
    if logx:
        _nice_log_axis(ax, df["_x"])
    ax.grid(True, alpha=0.3)


def _finish(fig, axes, title: str) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        # beside the last panel, not on it: accuracy lines run along the top and bottom edges,
        # where "best" placement still covers some of them
        axes[-1].legend([handles[lab] for lab in labels], labels, loc="upper left",
                        bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize="small",
                        title="model" if len(labels) < 12 else None)
    fig.suptitle(title)
    fig.tight_layout()


def _panels(n: int, width=4.2, height=3.6):
    fig, axes = plt.subplots(1, n, figsize=(width * n + 0.6, height), squeeze=False, sharey=True)
    return fig, list(axes[0])


def describe(fig) -> dict[str, dict[str, int]]:
    """{panel title: {line label: number of points}} for a Figure (lines without a label skipped)."""
    out = {}
    for i, ax in enumerate(fig.axes):
        title = ax.get_title() or f"panel{i}"
        out[title] = {ln.get_label(): len(ln.get_xdata()) for ln in ax.get_lines()
                      if not ln.get_label().startswith("_")}
    return out


# ----------------------------------------------------------------------------- figures

def _one_point_per_line(df: pd.DataFrame, x: str, split_state: bool = True) -> bool:
    """True when no model (line of ``_hue_key``) has two values of ``x``: a figure of ``x``
    would be dots, not lines, e.g. a width figure for induction-heads runs of one width each."""
    xs = pd.to_numeric(df[x], errors="coerce")
    return bool((xs.groupby(_hue_key(df, split_state).values).nunique() < 2).all())


def fig_acc_vs_dim(df: pd.DataFrame, metric: str = "val/acc"):
    """Accuracy against d_model; one panel per sequence length if slices carry T."""
    if D_MODEL not in df.columns:
        return None, f"no {D_MODEL} in the records"
    if _one_point_per_line(df, D_MODEL):
        return None, f"each model has runs at one {D_MODEL} only (the table shows them)"
    long = _slices(df, metric)
    if not long.empty and "T" in long.columns:
        facets = sorted(long["T"].dropna().unique())
        fig, axes = _panels(len(facets))
        for ax, t in zip(axes, facets):
            sub = long[long["T"] == t]
            hue = _hue_key(sub)
            if "kv" in sub.columns and sub.groupby(hue.values)["kv"].nunique().max() > 1:
                hue = hue + " (kv=" + sub["kv"].astype(str) + ")"
            _lines(ax, sub, D_MODEL, "value", hue, logx=True)
            ax.set_title(f"sequence length {_value(t)}")
            ax.set_xlabel(_label(D_MODEL))
        axes[0].set_ylabel(f"{metric}")
    else:
        col = f"metrics.{metric}"
        if col not in df.columns:
            return None, f"no metric {metric} in the records"
        fig, axes = _panels(1)
        _lines(axes[0], df, D_MODEL, col, _hue_key(df), logx=True)
        axes[0].set_title("all runs")
        axes[0].set_xlabel(_label(D_MODEL))
        axes[0].set_ylabel(metric)
    _finish(fig, axes, f"{metric} vs model dimension")
    return fig, None


def fig_acc_vs_state(df: pd.DataFrame, metric: str = "val/acc"):
    col = f"metrics.{metric}"
    if STATE not in df.columns or df[STATE].isna().all():
        return None, f"no {STATE} in the records"
    if col not in df.columns:
        return None, f"no metric {metric} in the records"
    if _one_point_per_line(df[df[STATE].notna()], STATE, split_state=False):
        return None, f"each model has runs at one {STATE} only (the table shows them)"
    fig, axes = _panels(1, width=5.0)
    _lines(axes[0], df, STATE, col, _hue_key(df, split_state=False))
    _nice_log_axis(axes[0], pd.to_numeric(df[STATE], errors="coerce"), base=10)
    axes[0].xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axes[0].set_title("all runs")
    axes[0].set_xlabel(_label(STATE))
    axes[0].set_ylabel(metric)
    _finish(fig, axes, f"{metric} vs recurrent state size")
    hue = _hue_key(df, split_state=False)
    no_state = sorted(set(hue[df[STATE].isna()]) - set(hue[df[STATE].notna()]))
    return fig, (f"no {STATE} for {', '.join(no_state)} (left out)" if no_state else None)


def fig_acc_vs_length(df: pd.DataFrame, metric: str = "extrapolation/acc"):
    """Accuracy against test length (log2 x) from ``<metric>/T=<len>`` metrics, one line per
    model, the training length marked: the induction-heads extrapolation curve."""
    long = _slices(df, metric)
    if long.empty or "T" not in long.columns:
        return None, f"no {metric}/T=<len> metrics in the records"
    fig, axes = _panels(1, width=6.0)
    _lines(axes[0], long, "T", "value", _hue_key(long), logx=True)
    train_len = "config.task.train_seq_len"
    if train_len in long.columns:
        for t in pd.to_numeric(long[train_len], errors="coerce").dropna().unique():
            axes[0].axvline(t, color="grey", ls="--", lw=1)
            axes[0].annotate("train length", (t, 0.02), xycoords=("data", "axes fraction"),
                             rotation=90, fontsize="small", color="grey", ha="right")
    axes[0].xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"$2^{{{int(round(np.log2(v)))}}}$"))
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_xlabel("test sequence length")
    axes[0].set_ylabel(metric)
    axes[0].set_title("length extrapolation")
    _finish(fig, axes, f"{metric} vs test length")
    cols = [c for c in df.columns if c.startswith(f"metrics.{metric}/T=")]
    if df[cols].apply(pd.to_numeric, errors="coerce").isna().any().any():
        return fig, "NaN points (out of memory, or not run) are left out"
    return fig, None


def read_curves(run_dir: Path) -> pd.DataFrame | None:
    """All logs/version_*/metrics.csv of a run, concatenated in version order."""
    paths = sorted(Path(run_dir).glob("logs/version_*/metrics.csv"),
                   key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    frames = []
    for p in paths:
        try:
            frames.append(pd.read_csv(p))
        except (OSError, ValueError, pd.errors.EmptyDataError) as e:
            print(f"warning: skipping unreadable {p}: {e}", file=sys.stderr)
    return pd.concat(frames, ignore_index=True) if frames else None


def _curve_labels(df: pd.DataFrame) -> pd.Series:
    """One label per run: the model (with N where it varies, as ``_hue_key``), its width, and
    the learning rate where runs that share the rest differ in it. Runs left with one label
    (seeds) share a colour."""
    label = _hue_key(df)
    if D_MODEL in df.columns:
        d = pd.to_numeric(df[D_MODEL], errors="coerce")
        label = label.where(d.isna(), label + " d=" + d.astype("Int64").astype(str))
    lr = "config.optim.lr"
    if lr in df.columns:
        varies = df.groupby(label.values)[lr].transform("nunique") > 1
        label = label.where(~varies | df[lr].isna(), label + " lr=" + df[lr].map("{:.3g}".format))
    # Runs still sharing a label that differ in another model/task/optim key (an ablation such
    # as model.selective=false) get that key as well; seeds keep sharing theirs.
    keys = [c for c in df.columns if c.startswith(("config.model.", "config.task.", "config.optim."))
            and "seed" not in c and c != lr]
    label = label.copy()
    for idx in label.groupby(label.values).groups.values():
        if len(idx) > 1:
            differ = [c for c in keys if df.loc[idx, c].astype(str).nunique() > 1]
            for i in idx:
                label[i] += "".join(f" {c.split('.', 2)[2]}={df.at[i, c]}" for c in differ)
    return label


def fig_training_curves(df: pd.DataFrame, root: Path, keys=("train/loss", "val/acc")):
    curves = []
    for (_, row), name in zip(df.iterrows(), _curve_labels(df)):
        c = read_curves(Path(root) / row["run"])
        if c is None or "step" not in c.columns:
            continue
        curves.append((name, row["run"], c))
    if not curves:
        return None, "no logs/version_*/metrics.csv under the runs"
    keys = [k for k in keys if any(k in c.columns for _, _, c in curves)]
    if not keys:
        return None, "metrics.csv files have none of train/loss, val/acc"
    # Runs sharing a label (seeds) get the same colour; the label is shown once.
    names = sorted({n for n, _, _ in curves})
    colours = {n: plt.get_cmap("tab10" if len(names) <= 10 else "tab20")(i % 20)
               for i, n in enumerate(names)}
    # room on the right for the legend: about 0.07 inch a character of the longest label
    legend_w = max(1.8, 0.07 * max(len(n) for n in names) + 0.5)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys) + legend_w, 3.8), squeeze=False)
    axes = list(axes[0])
    for ax, k in zip(axes, keys):
        seen = set()
        for name, _, c in sorted(curves, key=lambda t: t[0]):
            if k not in c.columns:
                continue
            s = c[["step", k]].dropna().sort_values("step")
            if s.empty:
                continue
            ax.plot(s["step"], s[k], color=colours[name], marker="." if len(s) < 30 else None,
                    label=name if name not in seen else "_" + name)
            seen.add(name)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.set_ylabel(k)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.suptitle("training curves")
    fig.tight_layout(rect=(0, 0, 1 - legend_w / (5.2 * len(keys) + legend_w), 1))
    fig.legend(handles, labels, loc="center right", fontsize="small", title="run")
    return fig, None


def fig_custom(df: pd.DataFrame, x: str, y: str, facet: str | None = None, hue: str | None = None):
    fields = {"x": x, "y": y, "facet": facet, "hue": hue}
    cols = {}
    for role, name in fields.items():
        if name is None:
            continue
        cols[role] = resolve_field(df, name)
        if cols[role] is None:
            return None, f"no field {name!r} (--{role}) in the records"
    data = df.dropna(subset=[cols["x"], cols["y"]])
    if data.empty:
        return None, f"no record has both {x} and {y}"
    facets = sorted(data[cols["facet"]].dropna().unique(), key=str) if facet else [None]
    fig, axes = _panels(len(facets))
    xv = pd.to_numeric(data[cols["x"]], errors="coerce")
    logx = bool((xv > 0).all() and xv.max() / max(xv.min(), 1e-300) >= 8)
    for ax, f in zip(axes, facets):
        sub = data if f is None else data[data[cols["facet"]] == f]
        hue_s = sub[cols["hue"]].astype(str) if hue else _hue_key(sub)
        _lines(ax, sub, cols["x"], cols["y"], hue_s, logx=logx)
        ax.set_title("all runs" if f is None else f"{_label(cols['facet'])} = {_value(f)}")
        ax.set_xlabel(_label(cols["x"]))
    axes[0].set_ylabel(_label(cols["y"]))
    _finish(fig, axes, f"{_label(cols['y'])} vs {_label(cols['x'])}")
    if hue:
        axes[-1].get_legend().set_title(_label(cols["hue"]))
    return fig, None


# The synthetic tasks log a val/loss too, but over query positions only: not a scaling loss.
SYNTHETIC_TASKS = ("mqar", "selective_copying", "induction_heads")


def _lm_points(df: pd.DataFrame, loss_key: str = "val/loss"):
    """(scaling points of the language-model records, None) or (None, why not)."""
    from ssdbench.scaling import ScalingDataError, points_from_records

    col = f"metrics.{loss_key}"
    if col not in df.columns:
        return None, f"no metric {loss_key} in the records"
    lm = df[pd.to_numeric(df[col], errors="coerce").notna()]
    if "task_name" in lm.columns:
        lm = lm[~lm["task_name"].isin(SYNTHETIC_TASKS)]
    if lm.empty:
        return None, f"no language-model record with {loss_key}"
    try:
        pts = points_from_records(lm.reset_index(drop=True), loss_key, flops="exact")
    except ScalingDataError as e:
        return None, str(e)
    if pts["params"].nunique() < 2:
        return None, "a single model size"
    pts["ratio_6nd"] = pts["flops"] / (6 * pts["params"] * pts["tokens"])
    return pts, None


def _colours(names) -> dict:
    names = sorted(set(names))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {n: cmap(i % 20) for i, n in enumerate(names)}


def fig_loss_vs_flops(df: pd.DataFrame, loss_key: str = "val/loss"):
    """Loss vs training FLOPs per model, the runs' lower envelope and the approach-3 frontier.

    The x axis is the records' exact FLOP count. Approach 3's frontier is defined for
    C = 6 N D; it is drawn at C_exact = r * 6 N D with r the median exact/6ND ratio of that
    model's runs (the legend gives r), so it lines up with the points it was fitted to.
    """
    from ssdbench.scaling import ScalingDataError, fit_envelope, fit_parametric

    pts, why = _lm_points(df, loss_key)
    if pts is None:
        return None, why
    fig, axes = _panels(1, width=6.0, height=4.4)
    fig.set_figwidth(9.5)  # room for the legend on the right, off the points
    ax = axes[0]
    colours = _colours(pts["model"])
    notes = []
    for model, g in sorted(pts.groupby("model"), key=lambda kv: kv[0]):
        c = colours[model]
        ax.plot(g["flops"], g["loss"], "o", color=c, alpha=0.7, label=model)
        try:
            env = fit_envelope(g)
            ax.plot(env.table["flops"], env.table["loss"], "--", color=c, lw=1.2, label=f"{model} envelope")
        except ScalingDataError as e:
            notes.append(f"{model}: no envelope ({e})")
        try:
            fit = fit_parametric(g, n_bootstrap=0, n_starts=16)
        except ScalingDataError as e:
            notes.append(f"{model}: no parametric fit ({e})")
            continue
        r = float(np.median(g["ratio_6nd"]))
        C = np.geomspace(g["flops"].min() / 2, g["flops"].max() * 4, 100)
        ax.plot(C, fit.optimal(C / r)[2], "-", color=c, lw=1.8,
                label=f"{model} L(N,D) frontier" + (f" (C = {r:.2f}x6ND)" if abs(r - 1) > 1e-3 else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(loss_key)
    ax.set_title("all runs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle(f"{loss_key} vs training compute")
    fig.tight_layout()
    return fig, "; ".join(notes) or None


def fig_isoflop(df: pd.DataFrame, loss_key: str = "val/loss", tolerance: float = 0.1):
    """IsoFLOP profiles (approach 2): per model, loss vs parameters for each FLOP budget with
    the fitted parabola in log N and its minimum."""
    from ssdbench.scaling import ScalingDataError, fit_isoflop, group_budgets

    pts, why = _lm_points(df, loss_key)
    if pts is None:
        return None, why
    fits, notes = {}, []
    for model, g in pts.groupby("model"):
        try:
            fits[model] = (g.reset_index(drop=True), fit_isoflop(g.reset_index(drop=True), tolerance))
        except ScalingDataError as e:
            notes.append(f"{model}: {e}")
    if not fits:
        return None, "; ".join(notes)
    fig, axes = _panels(len(fits), width=4.8, height=4.0)
    for ax, (model, (g, fit)) in zip(axes, sorted(fits.items())):
        budgets = fit.table["budget"].to_numpy()
        cmap = plt.get_cmap("viridis")
        gid = group_budgets(g["flops"], tolerance)
        for i, row in fit.table.iterrows():
            colour = cmap(i / max(1, len(budgets) - 1) * 0.9)
            sub = g[gid == row["budget_id"]]  # the same grouping as the fit's
            ax.plot(sub["params"], sub["loss"], "o", color=colour, label=f"C = {row['budget']:.2g}")
            ln = np.log(sub["params"].to_numpy(float))
            x = np.linspace(ln.min() - 0.3, ln.max() + 0.3, 100)
            ax.plot(np.exp(x), np.polyval(row["coef_logN"], x), "-", color=colour, lw=1.2, label="_fit")
            ax.plot([row["params_opt"]], [row["loss_min"]], "*", color=colour, ms=12, mec="k", label="_min")
        ax.set_xscale("log")
        ax.set_title(f"{model}: N_opt ~ C^{fit.n_opt.exponent:.2f}")
        ax.set_xlabel("parameters (non-embedding)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small", title="budget (FLOPs)")
    axes[0].set_ylabel(loss_key)
    fig.suptitle("IsoFLOP profiles (star: fitted minimum)")
    fig.tight_layout()
    return fig, "; ".join(notes) or None


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s.removeprefix("metrics.").removeprefix("config.")).strip("_")


def build_figures(df: pd.DataFrame, root: Path, x=None, y=None, facet=None, hue=None,
                  metric: str = "val/acc"):
    """{name: Figure} for what df holds, and the skip messages for the rest."""
    figs, skipped = {}, []
    plans = [("acc_vs_d_model", lambda: fig_acc_vs_dim(df, metric)),
             ("acc_vs_state_size", lambda: fig_acc_vs_state(df, metric)),
             ("acc_vs_length", lambda: fig_acc_vs_length(df)),
             ("training_curves", lambda: fig_training_curves(df, root)),
             ("loss_vs_flops", lambda: fig_loss_vs_flops(df)),
             ("isoflop_profiles", lambda: fig_isoflop(df))]
    if x or y:
        plans.append((f"custom_{_slug(y or '')}_vs_{_slug(x or '')}",
                      (lambda: fig_custom(df, x, y, facet, hue)) if x and y
                      else (lambda: (None, "--x and --y go together"))))
    note = budget.figure_note(df)
    for name, make in plans:
        fig, why = make()
        if fig is None:
            skipped.append(f"skipped {name}: {why}")
        else:
            figs[name] = fig
            if note:
                _add_budget_note(fig, note)
            if why:
                skipped.append(f"note {name}: {why}")
    return figs, skipped


def _add_budget_note(fig, note: str) -> None:
    """The runs' budget as a second line of the figure's title, so that a figure of runs cut
    short of a paper's training says so. Both lines sit above the panels (the figure is saved
    with bbox_inches="tight", which grows the image to hold them)."""
    title = fig.get_suptitle()
    fig.suptitle(f"{title}\n{note}" if title else note, y=1.0, va="bottom")


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", type=Path, help="a results directory, e.g. results/<study>")
    p.add_argument("--out", type=Path, default=None, help="where figures go (default: RESULTS/figures)")
    p.add_argument("--status", default="ok",
                   help="keep only records with this status (default ok; 'all' keeps every record)")
    p.add_argument("--metric", default="val/acc", help="metric of the accuracy figures (default val/acc)")
    p.add_argument("--x", default=None, help="custom figure: x field (dotted, e.g. config.model.d_model)")
    p.add_argument("--y", default=None, help="custom figure: y field (e.g. val/loss or metrics.val/loss)")
    p.add_argument("--facet", default=None, help="custom figure: one panel per value of this field")
    p.add_argument("--hue", default=None, help="custom figure: one line per value of this field "
                                               "(default model_name)")
    p.add_argument("--best-over", default=None,
                   help="for runs that differ only in this field, plot the best one (default: optim.lr "
                        "when the records have it: the best learning rate per point, as the papers "
                        "report); 'none' keeps all")


def _fail(msg: str) -> int:
    print(f"ssdbench plot-results: {msg}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    root = Path(args.results)
    if not root.is_dir():
        return _fail(f"{root} is not a directory")
    df = load_records(root)
    if df.empty:
        return _fail(f"no {rec.RECORD_NAME} under {root}")
    if args.status and args.status != "all":
        df = df[df["status"] == args.status].reset_index(drop=True)
        if df.empty:
            return _fail(f"no record with status {args.status!r} under {root} (try --status all)")
    if args.best_over is not None and args.best_over != "none":
        field = resolve_field(df, args.best_over)
        if field is None:  # a typo must not silently plot every learning rate as one mean
            return _fail(f"--best-over: no field {args.best_over!r} in the records")
    elif args.best_over is None:  # the default: the best learning rate when the runs have one
        field = resolve_field(df, "optim.lr")
    else:
        field = None
    if field is not None:
        n = len(df)
        df = best_over(df, field, getattr(args, "metric", "val/acc"))
        if len(df) < n:
            print(f"best over {field}: kept {len(df)} of {n} runs (the best {field} per point)")
    figs, skipped = build_figures(df, root, x=args.x, y=args.y, facet=args.facet, hue=args.hue,
                                  metric=getattr(args, "metric", "val/acc"))
    for line in skipped:
        print(line)
    if not figs:
        return _fail("no figure could be made from these records")
    out = Path(args.out) if args.out else root / "figures"
    out.mkdir(parents=True, exist_ok=True)
    for name, fig in figs.items():
        for ext in FORMATS:
            fig.savefig(out / f"{name}.{ext}", dpi=150, bbox_inches="tight")
        plt.close(fig)
        print(f"wrote {out / name}.{{{','.join(FORMATS)}}}")
    return 0
