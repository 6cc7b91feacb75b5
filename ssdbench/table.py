"""`ssdbench table DIR`: one row per result record under DIR, as a rich table, CSV and Markdown."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from ssdbench import record as rec

# Columns shown by default, from the flattened record (pandas.json_normalize uses dots).
DEFAULT_COLUMNS = [
    "run", "status", "model_name", "task_name", "config.model.d_model", "config.model.n_layers",
    "params.total", "state_size", "global_step", "tokens_seen", "train_flops", "wall_time_s",
    "tokens_per_s",
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
    cols = [c for c in (columns or DEFAULT_COLUMNS) if c in df.columns] + metric_cols
    out = df[cols].copy()
    out.columns = [c.removeprefix("metrics.").removeprefix("config.") for c in cols]
    return out.sort_values("run").reset_index(drop=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        if pd.isna(v):
            return "-"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, int) and abs(v) >= 1e6:
        return f"{v:.3e}"
    return str(v)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", type=Path, help="a results directory, e.g. results/<study>")
    p.add_argument("--out", type=Path, default=None,
                   help="where table.csv and table.md go (default: the results directory)")
    p.add_argument("--columns", nargs="+", default=None,
                   help="record fields to show (dotted, e.g. config.model.d_model); metrics are always added")
    p.add_argument("--status", default=None, help="keep only records with this status (e.g. ok)")


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
    table = summarise(df, args.columns)
    out = args.out or args.results
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
