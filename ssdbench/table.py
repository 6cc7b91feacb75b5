"""`ssdbench table DIR`: one row per result record under DIR, as a rich table, CSV and Markdown.

``--view scaling`` is the Chinchilla-style table of a scaling study instead: one row per model
size of each architecture (parameters, shape, tokens, FLOPs, final loss and perplexity), also
written as LaTeX (``scaling_table.tex``).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from ssdbench import budget
from ssdbench import record as rec

# Columns shown by default, from the flattened record (pandas.json_normalize uses dots).
# budget / tokens_of_paper: for runs of a paper's protocol, the steps run as a fraction of the
# paper's and the tokens trained over the paper's (see budget.add_table_columns).
DEFAULT_COLUMNS = [
    "run", "status", "model_name", "task_name", "config.model.d_model", "config.model.n_layers",
    "params.total", "state_size", "global_step", "tokens_seen", "budget", "tokens_of_paper", "train_flops",
    "wall_time_s", "tokens_per_s",
]


def load_records(root: Path) -> pd.DataFrame:
    """All records under root, flattened: nested keys become dotted columns."""
    paths = rec.find_records(root)
    rows = []
    for p in paths:
        try:
            r = rec.read_record(p)
        except (OSError, ValueError) as e:
            print(f"warning: skipping unreadable record {p}: {e}", file=sys.stderr)
            continue
        r.pop("hardware", None), r.pop("versions", None)
        r["run"] = str(p.parent.relative_to(root)) if p.parent != Path(root) else p.parent.name
        rows.append(r)
    if not rows:
        return pd.DataFrame()
    return pd.json_normalize(rows)


def summarise(df: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    metric_cols = sorted(c for c in df.columns if c.startswith("metrics."))
    # the run name always comes first (it says which run a row is); chosen metrics keep their place
    chosen = [c for c in (columns or DEFAULT_COLUMNS) if c in df.columns]
    cols = ["run"] * ("run" in df.columns and "run" not in chosen) + chosen
    cols += [c for c in metric_cols if c not in cols] if not columns else []
    out = df[cols].copy()
    out.columns = [c.removeprefix("metrics.").removeprefix("config.") for c in cols]
    return out.sort_values(cols[0]).reset_index(drop=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        if pd.isna(v):
            return "-"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, int) and abs(v) >= 1e6:
        return f"{v:.3e}"
    return str(v)


# ----------------------------------------------------------------------------- scaling view

# (column, title) of the scaling view; values come from scaling_rows().
SCALING_COLUMNS = [
    ("model", "model"), ("params", "params"), ("non_embedding", "non-emb. params"),
    ("n_layers", "layers"), ("d_model", "width"), ("heads", "heads"), ("d_state", "d_state"),
    ("state_size", "state size"), ("tokens", "tokens"), ("tokens_per_param", "tokens/param"),
    ("flops", "FLOPs (exact)"), ("flops_6nd", "FLOPs (6ND)"), ("loss", "loss"), ("ppl", "ppl"),
]


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column of df, all-NaN when the records lack it."""
    if name in df.columns:
        return pd.to_numeric(df[name], errors="coerce")
    return pd.Series(math.nan, index=df.index, dtype=float)


def scaling_rows(df: pd.DataFrame, loss_key: str = "val/loss") -> pd.DataFrame:
    """One row per record for the scaling view, sorted by architecture then size.

    heads: ``n_heads`` of attention models; for Mamba-2, its SSD heads ``expand * d_model /
    headdim``; none for Mamba-1. ppl is the record's ``val/ppl`` if logged, else ``exp(loss)``.
    """
    model = next((df[c].astype(str) for c in ("model_name", "arch") if c in df.columns),
                 pd.Series("model", index=df.index))
    heads = _col(df, "config.model.n_heads")
    ssd_heads = _col(df, "config.model.expand") * _col(df, "config.model.d_model") / _col(df, "config.model.headdim")
    heads = heads.fillna(ssd_heads)
    params = _col(df, "params.total")
    tokens = _col(df, "tokens_seen")
    loss = _col(df, f"metrics.{loss_key}")
    ppl_key = loss_key.rsplit("/", 1)[0] + "/ppl" if "/" in loss_key else "ppl"
    ppl = _col(df, f"metrics.{ppl_key}").fillna(np.exp(loss))
    out = pd.DataFrame({
        "model": model, "params": params, "non_embedding": _col(df, "params.non_embedding"),
        "n_layers": _col(df, "config.model.n_layers"), "d_model": _col(df, "config.model.d_model"),
        "heads": heads, "d_state": _col(df, "config.model.d_state"), "state_size": _col(df, "state_size"),
        "tokens": tokens, "tokens_per_param": tokens / params, "flops": _col(df, "train_flops"),
        "flops_6nd": _col(df, "train_flops_6nd"), "loss": loss, "ppl": ppl,
    })
    if "run" in df.columns:
        out["run"] = df["run"].astype(str)
    out = out.sort_values(["model", "params", "tokens"], na_position="last").reset_index(drop=True)
    # integer-valued columns print without a decimal point (nullable ints keep the gaps)
    for c in ("params", "non_embedding", "n_layers", "d_model", "heads", "d_state", "state_size", "tokens"):
        if out[c].notna().any() and (out[c].dropna() % 1 == 0).all():
            out[c] = out[c].astype("Int64")
    return out


def _latex(table: pd.DataFrame) -> str:
    """A booktabs tabular (pandas to_latex, which needs jinja2), numbers as plain text so it
    compiles with the booktabs package alone."""
    text = _formatted(table)
    return text.to_latex(index=False, escape=True, column_format="l" + "r" * (len(text.columns) - 1))


def _fmt_plain(v, column: str = "") -> str:
    """Counts with SI suffixes (12.7M parameters, 2.5B tokens), FLOPs in e-notation."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "--"
    if column.startswith("flops"):
        return f"{float(v):.3g}".replace("e+", "e")
    if column in ("params", "non_embedding", "tokens", "state_size") and abs(v) >= 1e4:
        for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
            if abs(v) >= div:
                return f"{v / div:.3g}{suffix}"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}" if abs(v) < 1e3 else f"{v:,.0f}" if abs(v) < 1e7 else f"{v:.3g}"
    return str(v)


def _formatted(table: pd.DataFrame) -> pd.DataFrame:
    """The scaling view's columns as text, titled."""
    cols = [c for c, _ in SCALING_COLUMNS]
    text = pd.DataFrame({c: [_fmt_plain(v, c) for v in table[c]] for c in cols})
    return text.rename(columns=dict(SCALING_COLUMNS))


def write_scaling_view(df: pd.DataFrame, out: Path, loss_key: str = "val/loss", title: str = "") -> pd.DataFrame:
    """The scaling view: rich table on stdout, scaling_table.{csv,md,tex} in out."""
    table = scaling_rows(df, loss_key)
    if table["loss"].isna().all():
        print(f"warning: no record has metrics.{loss_key} (choose the loss with --loss-key)", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "scaling_table.csv", index=False)
    (out / "scaling_table.md").write_text(_formatted(table).to_markdown(index=False, disable_numparse=True,
                                                                         colalign=("left",) + ("right",) * 13) + "\n")
    (out / "scaling_table.tex").write_text(_latex(table))

    view = Table(title=title or f"scaling: {len(table)} runs")
    for c, t in SCALING_COLUMNS:
        view.add_column(t, justify="left" if c == "model" else "right")
    previous = None
    for row in table.itertuples(index=False):
        if previous is not None and row.model != previous:
            view.add_section()  # one block per architecture
        previous = row.model
        view.add_row(*(_fmt_plain(getattr(row, c), c) for c, _ in SCALING_COLUMNS))
    # 14 columns: when piped (not a terminal) print at full width instead of rich's 80
    Console(width=None if sys.stdout.isatty() else 200).print(view)
    print(f"wrote {out / 'scaling_table.csv'}, {out / 'scaling_table.md'} and {out / 'scaling_table.tex'}")
    return table


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", type=Path, help="a results directory, e.g. results/<study>")
    p.add_argument("--out", type=Path, default=None,
                   help="where table.csv and table.md go (default: the results directory)")
    p.add_argument("--columns", nargs="+", default=None,
                   help="record fields to show (dotted, e.g. config.model.d_model); metrics are always added")
    p.add_argument("--status", default=None, help="keep only records with this status (e.g. ok)")
    p.add_argument("--view", choices=("runs", "scaling"), default="runs",
                   help="runs: one row per record (table.csv/.md); scaling: model sizes per architecture "
                        "with shape, tokens, FLOPs, loss and perplexity (scaling_table.csv/.md/.tex)")
    p.add_argument("--loss-key", default="val/loss", help="the loss metric of the scaling view (default val/loss)")


def main(args: argparse.Namespace) -> int:
    if not args.results.is_dir():
        print(f"ssdbench table: {args.results} is not a directory", file=sys.stderr)
        return 2
    df = load_records(args.results)
    if df.empty:
        print(f"ssdbench table: no {rec.RECORD_NAME} under {args.results}", file=sys.stderr)
        return 2
    if args.status:
        df = df[df["status"] == args.status]
    out = args.out or args.results
    if getattr(args, "view", "runs") == "scaling":
        if df.empty:
            print(f"ssdbench table: no record with status {args.status!r}", file=sys.stderr)
            return 2
        write_scaling_view(df.reset_index(drop=True), out, args.loss_key, f"scaling: {len(df)} runs in {args.results}")
        return 0
    table = summarise(budget.add_table_columns(df), args.columns)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(table.to_markdown(index=False) + "\n")

    view = Table(title=f"{len(table)} runs in {args.results}")
    for c in table.columns:
        view.add_column(c, justify="left" if table[c].dtype == object else "right")
    for row in table.itertuples(index=False):
        view.add_row(*(_fmt(v) for v in row))
    Console().print(view)
    print(f"wrote {out / 'table.csv'} and {out / 'table.md'}")
    return 0
