"""Output shared by the kernel benchmarks: a rich table on the terminal, CSV and Markdown files."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table


def require_cuda(name: str, hint: str = "") -> None:
    """Stop a GPU benchmark on a machine without CUDA: one line on stderr and exit code 2 (a
    timing taken on the CPU would be no claim about the kernels)."""
    import torch

    if not torch.cuda.is_available():
        print(f"ssdbench bench {name}: needs a CUDA GPU{hint}", file=sys.stderr)
        raise SystemExit(2)


def markdown(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".4g") + "\n"


def print_table(df: pd.DataFrame, title: str) -> None:
    t = Table(title=title)
    for c in df.columns:
        t.add_column(str(c))
    for _, r in df.iterrows():
        t.add_row(*[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in df.columns])
    Console().print(t)


def write(df: pd.DataFrame, out: Path | None, name: str, module: str, argv: list[str] | None,
          header: str = "") -> None:
    """<out>/<name>.csv and <out>/<name>.md, the Markdown headed by the command that made it."""
    if out is None:
        return
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / f"{name}.csv", index=False)
    cmd = f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    (out / f"{name}.md").write_text(f"Command: `{cmd.strip()}`\n\nDevice: {device}\n\n{header}" + markdown(df))


def kernel_times(fn, iters: int = 5, width: int = 60) -> pd.DataFrame:
    """GPU time per kernel of fn() (torch.profiler over ``iters`` calls after the caller's
    warm-up): columns kernel (name cut to ``width``), ms_per_iter, calls_per_iter, largest
    first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((e.key[:width], t / iters / 1000.0, e.count // iters))
    rows.sort(key=lambda r: -r[1])
    return pd.DataFrame(rows, columns=["kernel", "ms_per_iter", "calls_per_iter"])


def op_times(fn, iters: int = 1) -> pd.DataFrame:
    """GPU time of fn() by ATen operator and input shapes (torch.profiler with shapes):
    columns op, shapes, ms_per_iter, calls_per_iter, largest first. Names the call behind an
    anonymous kernel such as a strided copy (kernels that inductor or Triton launch are not
    ATen operators and do not appear)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0 and e.key.startswith("aten::"):
            rows.append((e.key, str(e.input_shapes)[:200], t / iters / 1000.0, e.count // iters))
    rows.sort(key=lambda r: -r[2])
    return pd.DataFrame(rows, columns=["op", "shapes", "ms_per_iter", "calls_per_iter"])
