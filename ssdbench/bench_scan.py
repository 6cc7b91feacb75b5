"""GPU benchmark of the Mamba-1 selective scan and the shared causal conv1d.

    python -m ssdbench.bench_scan                 # (a) scan vs L and (b) scan (and SSD) vs N
    python -m ssdbench.bench_scan --op conv       # (c) causal conv1d: Triton vs PyTorch
    python -m ssdbench.bench_scan --op long       # (d) forward at fixed tokens, L = 2K .. 1M
    python -m ssdbench.bench_scan --bwd-impl walk assoc   # both backwards, a row each
    python -m ssdbench.bench_scan --smoke         # tiny shapes, runs on a CPU (interpreter) too

(a) Selective scan at D=2048 channels, N=16, bf16, 65,536 tokens per batch (batch = tokens / L),
    L = 512 .. 16K, forward and forward+backward, against the plain-PyTorch sequential scan
    (forward only, L <= 2K: it is slow).
(b) Scan time as N grows (16, 64, 128, 256) at L=4K, same tokens; if ``ssdbench.kernels.ssd``
    exists, SSD (``ssd_chunked``) at equal tokens and equal total state (H*P = D, P=64, same N):
    the comparison of the Mamba-2 paper's Figure 10.
(c) Causal conv1d (batch*L = 65,536, D = 4096, W = 4, silu) bf16, Triton vs F.conv1d + silu,
    forward and forward+backward, channel-first and channel-last inputs.
(d) Long sequences (issue 26): the scan forward at a fixed token count (default 2^20, batch =
    tokens / L) for L = 2K .. 1M, with the launcher's choice of time segments S ("auto") and,
    for comparison, the single walk (S = 1) or any forced S (``--segments auto 1 8``); the
    column S is the number of segments that ran. ``--long-bwd`` adds forward+backward rows.

Forward+backward rows carry the backward in the column bwd_impl: "walk" (the reverse walk of
issue 26) or "assoc" (the associative-scan backward before it); ``--bwd-impl`` lists those to
time, a row each, in the same process (so on the same GPU).

Times are medians of ``triton.testing.do_bench``. FLOP and byte counts are explicit formulas
(below, per row) so TFLOP/s and GB/s are comparable across rows, not profiler counters.
Selective scan FLOPs per (token, channel, state): 7 forward (delta*A, exp, delta*u*B, a*h + b,
C*h accumulate); forward+backward counted as 4x that (recompute, reverse scan, gradients).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

from ssdbench import bench_report
import torch

SCAN_FLOPS_PER_STATE = 7
FWD_BWD_FACTOR = 4


def _timer(fn, grad_to_none=None, quick=False) -> float:
    """Median milliseconds: triton's do_bench on CUDA, a few perf_counter runs elsewhere."""
    if torch.cuda.is_available():
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100,
                                             grad_to_none=grad_to_none, return_mode="median"))
    fn()
    times = []
    for _ in range(1 if quick else 3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _row(op, impl, mode, L, batch, ms, flops, nbytes, **extra):
    return dict(op=op, impl=impl, mode=mode, L=L, batch=batch, **extra, ms=round(ms, 4),
                tflops=round(flops / ms / 1e9, 2), gbps=round(nbytes / ms / 1e6, 1))


# ----------------------------------------------------------------------------------------------
# Selective scan
# ----------------------------------------------------------------------------------------------
def _scan_inputs(batch, dim, L, N, dtype, device, requires_grad):
    g = dict(device=device)
    u = torch.randn(batch, dim, L, **g).to(dtype)  # (batch, D, L)
    delta = (0.5 * torch.randn(batch, dim, L, **g) - 2.0).to(dtype)  # (batch, D, L) pre-softplus
    A = -torch.arange(1, N + 1, **g, dtype=torch.float32).repeat(dim, 1)  # (D, N) S4D-real
    B = torch.randn(batch, N, L, **g).to(dtype)  # (batch, N, L)
    C = torch.randn(batch, N, L, **g).to(dtype)
    D = torch.ones(dim, **g)  # (D,)
    z = torch.randn(batch, dim, L, **g).to(dtype)  # (batch, D, L)
    bias = torch.full((dim,), -1.0, **g)  # (D,)
    ins = [u, delta, A, B, C, D, z, bias]
    if requires_grad:
        for t in ins:
            t.requires_grad_(True)
    return ins


def _scan_bytes(batch, dim, L, N, esize, fwd_bwd):
    tokens = batch * L
    fwd = tokens * (dim * 4 + 2 * N) * esize  # read u, delta, z; write y; read B, C
    if not fwd_bwd:
        return fwd
    # + saved block states (fp32, every 64 steps) written and read, backward reads u, delta, z,
    # dy, B, C, writes du, ddelta, dz and dB, dC (fp32 atomics + cast)
    states = batch * dim * N * (L // 64) * 4 * 2
    bwd = tokens * (dim * 7 * esize + 2 * N * (esize + 8))
    return fwd + states + bwd


def _time_fwd_bwd(args, rows, batch, dim, L, N, kw, flops):
    """A forward+backward row for each backward in ``args.bwd_impl`` (same inputs, same process)."""
    from ssdbench.kernels.selective_scan import selective_scan
    gins = _scan_inputs(batch, dim, L, N, args.dtype, args.device, requires_grad=True)
    dy = torch.randn(batch, dim, L, device=args.device).to(args.dtype)
    for impl in args.bwd_impl:
        def fwd_bwd():
            torch.autograd.backward(selective_scan(*gins, **kw, bwd_impl=impl), dy)
        ms = _timer(fwd_bwd, grad_to_none=gins, quick=args.smoke)
        rows.append(_row("selective_scan", "triton", "fwd+bwd", L, batch, ms, flops * FWD_BWD_FACTOR,
                         _scan_bytes(batch, dim, L, N, gins[0].element_size(), True), N=N, D=dim,
                         bwd_impl=impl))
        _print_last(rows)
    del gins, dy


def bench_scan_long(args, rows):
    """(d) The forward at a fixed token count as L grows to 1M: time segments against one walk."""
    from ssdbench.kernels import selective_scan as ss
    dtype, dev, dim, N = args.dtype, args.device, args.dim, args.long_state
    saved = ss.FORCE_SEGMENTS
    try:
        for L in args.long_lengths:
            batch = max(1, args.long_tokens // L)
            flops = batch * L * dim * N * SCAN_FLOPS_PER_STATE
            ins = _scan_inputs(batch, dim, L, N, dtype, dev, requires_grad=False)
            for seg in args.segments:
                ss.FORCE_SEGMENTS = None if seg == "auto" else int(seg)
                S = ss._n_segments(batch, dim, L, N, ss._block_t())[0]
                with torch.no_grad():
                    ms = _timer(lambda: ss.selective_scan(*ins, delta_softplus=True), quick=args.smoke)
                rows.append(_row("selective_scan", "triton", "fwd", L, batch, ms, flops,
                                 _scan_bytes(batch, dim, L, N, ins[0].element_size(), False), N=N, D=dim,
                                 segments=seg, S=S))
                _print_last(rows)
                if args.long_bwd:
                    n0 = len(rows)
                    _time_fwd_bwd(args, rows, batch, dim, L, N, dict(delta_softplus=True), flops)
                    for r in rows[n0:]:
                        r.update(segments=seg, S=S)
            del ins
    finally:
        ss.FORCE_SEGMENTS = saved


def bench_scan_vs_length(args, rows):
    from ssdbench.kernels.selective_scan import selective_scan, selective_scan_ref
    dtype, dev, dim, N = args.dtype, args.device, args.dim, 16
    for L in args.lengths:
        batch = max(1, args.tokens // L)
        flops = batch * L * dim * N * SCAN_FLOPS_PER_STATE
        ins = _scan_inputs(batch, dim, L, N, dtype, dev, requires_grad=False)
        kw = dict(delta_softplus=True)
        with torch.no_grad():
            ms = _timer(lambda: selective_scan(*ins, **kw), quick=args.smoke)
        rows.append(_row("selective_scan", "triton", "fwd", L, batch, ms, flops,
                         _scan_bytes(batch, dim, L, N, ins[0].element_size(), False), N=N, D=dim))
        _time_fwd_bwd(args, rows, batch, dim, L, N, kw, flops)
        if L <= args.ref_max_len:
            with torch.no_grad():
                ms = _timer(lambda: selective_scan_ref(*ins, **kw), quick=True)
            rows.append(_row("selective_scan", "torch_sequential", "fwd", L, batch, ms, flops,
                             _scan_bytes(batch, dim, L, N, ins[0].element_size(), False), N=N, D=dim))
        del ins
        _print_last(rows)


def _ssd_module():
    try:
        from ssdbench.kernels import ssd  # written by another helper; optional here
    except ImportError:
        return None
    return ssd if hasattr(ssd, "ssd_chunked") else None


def bench_scan_vs_state(args, rows):
    from ssdbench.kernels.selective_scan import selective_scan
    ssd = _ssd_module()
    dtype, dev, dim, L = args.dtype, args.device, args.dim, args.state_len
    batch = max(1, args.tokens // L)
    P = args.headdim
    H = max(1, dim // P)
    for N in args.states:
        flops = batch * L * dim * N * SCAN_FLOPS_PER_STATE
        ins = _scan_inputs(batch, dim, L, N, dtype, dev, requires_grad=False)
        with torch.no_grad():
            ms = _timer(lambda: selective_scan(*ins, delta_softplus=True), quick=args.smoke)
        rows.append(_row("selective_scan", "triton", "fwd", L, batch, ms, flops,
                         _scan_bytes(batch, dim, L, N, ins[0].element_size(), False), N=N, D=dim))
        del ins
        _time_fwd_bwd(args, rows, batch, dim, L, N, dict(delta_softplus=True), flops)
        _print_last(rows)
        if ssd is None:
            continue
        # SSD at equal tokens and equal total state: H heads x P = D channels, same N.
        Q = args.chunk
        x = torch.randn(batch, L, H, P, device=dev).to(dtype)  # (batch, L, H, P)
        dt = torch.nn.functional.softplus(torch.randn(batch, L, H, device=dev) - 2.0).to(dtype)  # (batch, L, H)
        A = -torch.rand(H, device=dev) * 15 - 1  # (H,)
        Bm = torch.randn(batch, L, 1, N, device=dev).to(dtype)  # (batch, L, G, N)
        Cm = torch.randn(batch, L, 1, N, device=dev).to(dtype)
        # SSD FLOPs (Mamba-2 §6): intra-chunk C B^T and its product with X (2 Q N + 2 Q P per
        # token-head), chunk states and state-to-output (2 N P each per token-head).
        ssd_flops = batch * L * H * (2 * Q * N + 2 * Q * P + 4 * N * P)
        ssd_bytes = batch * L * (2 * H * P + H + 2 * N) * x.element_size()

        def first(out):
            return out[0] if isinstance(out, (tuple, list)) else out
        try:
            with torch.no_grad():
                ms = _timer(lambda: ssd.ssd_chunked(x, dt, A, Bm, Cm, Q), quick=args.smoke)
            rows.append(_row("ssd", "triton", "fwd", L, batch, ms, ssd_flops, ssd_bytes, N=N, D=H * P))
            gx = [t.detach().clone().requires_grad_(True) for t in (x, dt, A, Bm, Cm)]
            dy_ssd = torch.randn_like(x)

            def ssd_fwd_bwd():
                torch.autograd.backward(first(ssd.ssd_chunked(*gx, Q)), dy_ssd)
            ms = _timer(ssd_fwd_bwd, grad_to_none=gx, quick=args.smoke)
            rows.append(_row("ssd", "triton", "fwd+bwd", L, batch, ms, ssd_flops * 3, ssd_bytes * 3, N=N, D=H * P))
        except Exception as e:  # another helper's module: report, do not abort the table
            print(f"ssd at N={N} skipped: {type(e).__name__}: {e}")
        _print_last(rows)


# ----------------------------------------------------------------------------------------------
# Causal conv1d
# ----------------------------------------------------------------------------------------------
def bench_conv(args, rows):
    from ssdbench.kernels.causal_conv1d import causal_conv1d
    dtype, dev, dim, W = args.dtype, args.device, args.conv_dim, 4
    L = args.conv_len
    batch = max(1, args.tokens // L)
    n = batch * dim * L
    flops = n * (2 * W + 4)  # taps + bias + silu
    esize = torch.tensor([], dtype=dtype).element_size()
    fwd_bytes = 2 * n * esize
    fb_bytes = fwd_bytes + 3 * n * esize  # backward reads x and dout, writes dx
    for layout in ("channel_first", "channel_last"):
        if layout == "channel_first":
            x = torch.randn(batch, dim, L, device=dev).to(dtype)  # (batch, D, L)
        else:
            x = torch.randn(batch, L, dim, device=dev).to(dtype).transpose(1, 2)  # (batch, D, L) view
        w = torch.randn(dim, W, device=dev).to(dtype)  # (D, W)
        b = torch.randn(dim, device=dev).to(dtype)  # (D,)
        dout = torch.randn_like(x)
        for impl in ("triton", "torch"):
            with torch.no_grad():
                ms = _timer(lambda: causal_conv1d(x, w, b, "silu", impl=impl), quick=args.smoke)
            rows.append(_row("causal_conv1d", impl, "fwd", L, batch, ms, flops, fwd_bytes, D=dim, layout=layout))
            gx = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
            if layout == "channel_last":
                gx[0] = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)

            def fwd_bwd():
                torch.autograd.backward(causal_conv1d(*gx, "silu", impl=impl), dout)
            ms = _timer(fwd_bwd, grad_to_none=gx, quick=args.smoke)
            rows.append(_row("causal_conv1d", impl, "fwd+bwd", L, batch, ms, 3 * flops, fb_bytes,
                             D=dim, layout=layout))
            _print_last(rows)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
_printed = [0]


def _print_last(rows):
    """Print the rows added since the last call (progress while the long sweep runs)."""
    for r in rows[_printed[0]:]:
        print("  " + ", ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    _printed[0] = len(rows)


def _show(df: pd.DataFrame, title: str):
    try:
        from rich.console import Console
        from rich.table import Table
        t = Table(title=title)
        for c in df.columns:
            t.add_column(str(c))
        for _, r in df.iterrows():
            t.add_row(*["" if pd.isna(v) else str(v) for v in r.tolist()])
        Console().print(t)
    except ImportError:
        print(title)
        print(df.to_string(index=False))


def _segments_arg(value: str) -> str:
    """--segments: "auto" or a positive number of time segments (argparse reports the rest)."""
    if value != "auto" and not (value.isdigit() and int(value) > 0):
        raise argparse.ArgumentTypeError(f"expected auto or a positive integer, got {value!r}")
    return value


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(prog="bench_scan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=["scan", "conv", "long", "all"], default="scan",
                    help="scan: (a) vs L and (b) vs N (+SSD); conv: (c) causal conv1d; long: (d) the "
                         "forward at fixed tokens up to L = 1M; all: scan and conv")
    ap.add_argument("--bwd-impl", nargs="+", default=["walk"], choices=["walk", "assoc"],
                    help="scan backward(s) to time, a fwd+bwd row each (walk: reverse walk; assoc: before issue 26)")
    ap.add_argument("--long-lengths", type=int, nargs="+", default=[2048, 16384, 65536, 262144, 1048576],
                    help="L values for (d)")
    ap.add_argument("--long-tokens", type=int, default=1 << 20, help="tokens per batch for (d) (batch = tokens / L)")
    ap.add_argument("--long-state", type=int, default=16, help="N for (d)")
    ap.add_argument("--segments", nargs="+", default=["auto", "1"], type=_segments_arg,
                    help="time segments for (d): auto (the launcher's rule) and/or forced counts, a row each")
    ap.add_argument("--long-bwd", action="store_true", help="(d) also times forward+backward")
    ap.add_argument("--out", default="results/bench/scan", help="folder for the CSV and Markdown tables")
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per batch (batch = tokens / L)")
    ap.add_argument("--dim", type=int, default=2048, help="scan channels D")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--ref-max-len", type=int, default=2048, help="longest L for the PyTorch sequential scan")
    ap.add_argument("--states", type=int, nargs="+", default=[16, 64, 128, 256], help="N values for (b)")
    ap.add_argument("--state-len", type=int, default=4096, help="L for (b)")
    ap.add_argument("--headdim", type=int, default=64, help="SSD head dim P for (b)")
    ap.add_argument("--chunk", type=int, default=256, help="SSD chunk length Q for (b)")
    ap.add_argument("--conv-dim", type=int, default=4096)
    ap.add_argument("--conv-len", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script; any device)")
    args = ap.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        if not args.smoke:
            bench_report.require_cuda("scan", " (use --smoke to check the script on a CPU)")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.smoke:
        args.tokens, args.dim, args.lengths, args.ref_max_len = 64, 8, [16, 32], 32
        args.states, args.state_len, args.conv_dim, args.conv_len = [4, 16], 32, 16, 32
        args.headdim, args.chunk = 4, 16
        args.long_lengths, args.long_tokens, args.segments = [32, 64], 64, ["auto", "1", "2"]
        if args.device == "cpu":
            args.dtype = torch.float32  # the interpreter has no bf16 arithmetic worth timing
    rows: list[dict] = []
    _printed[0] = 0
    if args.op in ("scan", "all"):
        print(f"(a) selective scan vs L: D={args.dim}, N=16, {args.tokens} tokens, {args.dtype}")
        bench_scan_vs_length(args, rows)
        print(f"(b) scan vs state size at L={args.state_len}")
        bench_scan_vs_state(args, rows)
    if args.op == "long":
        print(f"(d) scan forward at {args.long_tokens} tokens vs L: D={args.dim}, N={args.long_state}, "
              f"segments {args.segments}")
        bench_scan_long(args, rows)
    if args.op in ("conv", "all"):
        print(f"(c) causal conv1d: D={args.conv_dim}, W=4, {args.tokens} tokens, {args.dtype}")
        bench_conv(args, rows)
    df = pd.DataFrame(rows)
    for col in ("N", "S"):
        if col in df:
            df[col] = df[col].astype("Int64")  # conv rows have no N; only (d) rows have S
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (interpreter)"
    _show(df, f"bench_scan --op {args.op} on {gpu}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"bench_{args.op}"
    df.to_csv(out / f"{name}.csv", index=False)
    cmd = "python -m ssdbench.bench_scan " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / f"{name}.md").write_text(f"# {name} on {gpu}\n\nCommand: `{cmd.strip()}`\n\n" + bench_report.markdown(df))
    return df


if __name__ == "__main__":
    main()
