"""Inference throughput of the four architectures: prefill and decode (GPU).

    ssdbench bench generate --out results/h100/generate      # or: python -m ssdbench.bench_generate

The protocol of the Mamba paper's inference benchmark (Mamba-1 Appendix E.5, Figure 8 right):
a prompt of 2048 tokens, 128 tokens generated, batch 1, 2, 4, ... until the batch does not fit
in memory, random weights. Models: the ladder's presets ``experiment=gpt3_<size>_<arch>``
(vocabulary 50,280 of GPT-NeoX), so the benchmark measures the configurations the ladder trains:

    size   Transformer++ / Based     Mamba-1 / Mamba-2       parameters (measured, tied head)
    125m   12 layers x 768           24 layers x 768          124M / 129M / 129M / 129M
    1.3b   24 layers x 2048          48 layers x 2048         1.32B / 1.34B / 1.37B / 1.40B

(Transformer++ / Mamba-2 / Mamba-1 / Based.) Weights in ``--dtype`` (bf16: not autocast, so a
decode step reads every weight once, in 2 bytes).

Per model and batch (``measure``): a ``generate.Decoder`` with its state allocated for prompt +
generated tokens (Transformer++'s KV cache at that capacity); an eager prefill (``--prefill-rows``
rows at a time, so the prompt's activations do not decide the largest batch: the state or KV
cache does, which is the paper's point); the decode step captured once in a CUDA graph
(``--cuda-graph``, default on); one untimed generation; then ``--repeats`` timed generations
(median): prefill_ms, the prompt's prefill; decode_ms, ``gen_len`` steps, each sampling the
next token from the last logits (argmax, on the device) and running the step from the state.

Columns: decode_tok_s = batch x gen_len / decode time (the paper's throughput); step_ms =
decode_ms / gen_len; peak_mem_gb (torch.cuda.max_memory_allocated: weights, state, prefill
activations, the graph's pool); state_mb (the decoding state of the whole batch); vs_tpp: decode
tokens/s over Transformer++'s at the same size and batch. At batch 1, floor_ms = weight bytes /
the copy bandwidth measured here (a 256 MiB device-to-device copy: bytes read + written over
time): a decode step must read every weight once, so at batch 1 it cannot run faster than that
(the state's reads come on top: Transformer++'s KV cache of 2,176 tokens is 80 MB at 125M).
step_over_floor = step_ms / floor_ms. A batch that does not fit: status "OOM", and that
model's sweep stops. The summary gives each model's best batch (highest decode tokens/s), its
throughput there and the ratio to Transformer++'s best (at Transformer++'s own best batch).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path

import pandas as pd
import torch

from ssdbench import bench_report

ARCHS = ("transformerpp", "mamba2", "mamba1", "based")
SIZES = {"125m": "125m", "350m": "350m", "760m": "760m", "1.3b": "1p3b"}  # --sizes -> experiment preset
VOCAB = 50280  # GPT-NeoX-20B's vocabulary (the released Mamba models)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_config(arch: str, size: str):
    """The model config of experiment=gpt3_<size>_<arch>, vocabulary 50,280."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import ssdbench.tokenizer  # noqa: F401 - registers the config's tokenizer resolver

    GlobalHydra.instance().clear()
    with initialize_config_module("ssdbench.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment=gpt3_{SIZES[size]}_{arch}", "task.data_dir=unused",
                                           f"model.vocab_size={VOCAB}"])
    return cfg.model


def build_model(arch: str, size: str, device, dtype: torch.dtype):
    """Random weights (the model's own initialisation, run on the device), cast to dtype."""
    from hydra.utils import instantiate

    with torch.device(device):
        model = instantiate(model_config(arch, size))
    return model.to(dtype).eval().requires_grad_(False)


def copy_bandwidth_gbs(device="cuda") -> float:
    """Device memory bandwidth from a 256 MiB copy: (read + write bytes) / time, GB/s."""
    from triton.testing import do_bench

    a = torch.empty(1 << 28, dtype=torch.uint8, device=device).random_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * (1 << 28) / ms / 1e6


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # the tied head once


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model, batch: int, prompt_len: int, gen_len: int, repeats: int = 3, cuda_graph: bool = True,
            prefill_rows: int | None = None, ssm_dtype: torch.dtype | None = None) -> dict:
    """Prefill and decode times (median of ``repeats`` after one untimed run) of one batch of
    random prompts; runs anywhere (the CPU for the tests), peak memory on CUDA only.
    ``ssm_dtype``: the SSM state's dtype (None: float32)."""
    from ssdbench.generate import Decoder, _leaves

    device = model.embedding.weight.device
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    decoder = Decoder(model, batch, prompt_len + gen_len, ssm_dtype=ssm_dtype)
    state_mb = sum(t.numel() * t.element_size() for t in _leaves(decoder.state)) / 1e6
    prompt = torch.randint(0, model.vocab_size, (batch, prompt_len), device=device)  # (batch, prompt_len)
    decoder.prefill(prompt, prefill_rows)  # eager first: a batch too large fails here, before any capture
    if cuda_graph:
        decoder.capture()

    def run() -> tuple[float, float]:
        _sync(device)
        t0 = time.perf_counter()
        logits = decoder.prefill(prompt, prefill_rows)  # (batch, V)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(gen_len):
            logits = decoder.step(logits.argmax(-1))  # (batch, V); the next token stays on the device
        _sync(device)
        return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3

    run()  # untimed: Triton autotuning at these shapes, the allocator's first blocks
    times = [run() for _ in range(repeats)]
    prefill_ms = statistics.median(t[0] for t in times)
    decode_ms = statistics.median(t[1] for t in times)
    return dict(prefill_ms=prefill_ms, decode_ms=decode_ms, step_ms=decode_ms / gen_len,
                decode_tok_s=batch * gen_len / (decode_ms / 1e3), state_mb=state_mb,
                peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else float("nan"))


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sweep(model, arch: str, size: str, batches: list[int], measure_fn, floor_ms: float | None = None,
          on_row=None) -> list[dict]:
    """Rows for batch in ``batches`` until one does not fit ("OOM", then the sweep stops) or
    fails (its error in ``status``; the sweep goes on). ``on_row(row)`` is called after each
    (the benchmark writes its tables there, so a run stopped by a time limit keeps its rows)."""
    rows = []
    params_m = model.num_params() / 1e6
    for batch in batches:
        row = dict(model=arch, size=size, params_m=params_m, batch=batch)
        try:
            row.update(measure_fn(model, batch), status="ok")
        except torch.cuda.OutOfMemoryError:
            row.update(status="OOM")
        except Exception as e:  # noqa: BLE001 - one failing case (a capture, a kernel) must not end the table
            if "out of memory" in str(e).lower():  # e.g. raised again while a failed graph capture ends
                row.update(status="OOM")
            else:
                traceback.print_exc()
                row.update(status=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
        finally:
            _free()
        if batch == 1 and floor_ms is not None and row["status"] == "ok":
            row.update(floor_ms=floor_ms, step_over_floor=row["step_ms"] / floor_ms)
        rows.append(row)
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
        if on_row is not None:
            on_row(row)
        if row["status"] == "OOM":
            break
    return rows


def add_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """vs_tpp: decode tokens/s over Transformer++'s at the same size and batch (NaN where
    Transformer++ did not run or did not fit)."""
    df = df.copy()
    if "decode_tok_s" not in df:
        df["decode_tok_s"] = float("nan")
    ok = df[(df.model == "transformerpp") & (df.status == "ok")]
    ref = {(r.size, r.batch): r.decode_tok_s for r in ok.itertuples()}
    df["vs_tpp"] = [row.decode_tok_s / ref[(row.size, row.batch)]
                    if row.status == "ok" and (row.size, row.batch) in ref else float("nan")
                    for row in df.itertuples()]
    return df


def summarize(df: pd.DataFrame, unfinished: set | None = None) -> pd.DataFrame:
    """One row per (model, size): the largest batch that fit and what stopped the sweep there
    (out of memory; the sweep's last batch: then a larger batch may do better; or "unfinished"
    for the (model, size) pairs in ``unfinished``, still running when the table was written), the best
    batch (highest decode tokens/s), its tokens/s and the ratio to Transformer++'s best at the
    same size."""
    ok = df[df.status == "ok"]
    rows = []
    for (size, arch), g in ok.groupby(["size", "model"], sort=False):
        best = g.loc[g.decode_tok_s.idxmax()]
        oom = ((df.model == arch) & (df["size"] == size) & (df.status == "OOM")).any()
        stopped_by = ("out of memory" if oom else
                      "unfinished" if unfinished and (arch, size) in unfinished else "--max-batch")
        rows.append(dict(model=arch, size=size, params_m=best.params_m, max_batch=int(g.batch.max()),
                         stopped_by=stopped_by,
                         best_batch=int(best.batch), best_decode_tok_s=best.decode_tok_s,
                         step_ms_at_best=best.step_ms, peak_mem_gb_at_best=best.peak_mem_gb))
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    tpp = {r.size: r.best_decode_tok_s for r in out.itertuples() if r.model == "transformerpp"}
    out["best_vs_tpp_best"] = [r.best_decode_tok_s / tpp[r.size] if r.size in tpp else float("nan")
                               for r in out.itertuples()]
    return out


def plot(df: pd.DataFrame, path: Path) -> None:
    """Decode throughput against batch, one panel per size, log-log (as the paper's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df.status == "ok"]
    sizes = list(dict.fromkeys(ok["size"]))
    if not sizes:
        return
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for arch, g in ok[ok["size"] == size].groupby("model", sort=False):
            # one colour per architecture in every panel, whatever order the rows came in
            ax.plot(g.batch, g.decode_tok_s, marker="o", label=arch, color=f"C{ARCHS.index(arch)}")
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tokens/s", title=f"{size}")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(prog="ssdbench bench generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--sizes", nargs="+", default=["125m", "1.3b"], choices=list(SIZES))
    ap.add_argument("--max-batch", type=int, default=1024, help="the sweep's last batch (1, 2, 4, ... up to it)")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="the weights' dtype")
    ap.add_argument("--ssm-state", default="fp32", choices=["fp32", "weights"],
                    help="Mamba-1/2's recurrent state: fp32, or the weights' dtype (mamba_ssm's inference "
                         "cache; half the state's memory traffic at large batch)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per batch (median)")
    ap.add_argument("--prefill-rows", type=int, default=8,
                    help="rows prefilled at a time (0: the whole batch at once)")
    ap.add_argument("--cuda-graph", choices=["on", "off"], default="on",
                    help="replay the decode step from a CUDA graph")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for bench_generate.csv / .md, bench_generate_summary.csv / .md and a plot")
    args = ap.parse_args(argv)
    for name in ("max_batch", "prompt_len", "gen_len", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.prefill_rows < 0:
        ap.error(f"--prefill-rows must be >= 0, got {args.prefill_rows}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench_report.require_cuda("generate")
    dtype = DTYPES[args.dtype]
    gbs = copy_bandwidth_gbs()
    print(f"device: {torch.cuda.get_device_name()}  copy {gbs:.0f} GB/s")
    batches = [1 << i for i in range(args.max_batch.bit_length()) if 1 << i <= args.max_batch]
    header = (f"Prompt {args.prompt_len} tokens, {args.gen_len} generated, random weights in {args.dtype}, "
              f"decode step {'replayed from a CUDA graph' if args.cuda_graph == 'on' else 'eager'}, prefill "
              f"{args.prefill_rows or 'all'} rows at a time, SSM state in "
              f"{args.dtype if args.ssm_state == 'weights' else 'fp32'}; measured copy bandwidth {gbs:.0f} GB/s "
              f"(floor_ms = weight bytes / bandwidth).\n\n")
    rows = []

    def save(unfinished: set | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The tables so far (after every row: a run stopped by a time limit keeps what it measured)."""
        df = add_ratios(pd.DataFrame(rows))
        summary = summarize(df, unfinished)
        bench_report.write(df, args.out, "bench_generate", "ssdbench.bench_generate", argv, header=header)
        bench_report.write(summary, args.out, "bench_generate_summary", "ssdbench.bench_generate", argv,
                           header=header)
        return df, summary

    for size in args.sizes:
        for arch in args.models:
            try:
                model = build_model(arch, size, "cuda", dtype)
            except torch.cuda.OutOfMemoryError:
                rows.append(dict(model=arch, size=size, batch=1, status="OOM"))
                _free()
                continue
            floor_ms = weight_bytes(model) / (gbs * 1e6)

            def measure_fn(m, batch):
                return measure(m, batch, args.prompt_len, args.gen_len, args.repeats, args.cuda_graph == "on",
                               args.prefill_rows or None, dtype if args.ssm_state == "weights" else None)

            def on_row(row, key=(arch, size)):
                rows.append(row)
                save({key})

            print(f"{arch} {size}: {model.num_params() / 1e6:.0f}M parameters, weight floor {floor_ms:.3f} ms a step")
            sweep(model, arch, size, batches, measure_fn, floor_ms, on_row=on_row)
            del model
            _free()
    df, summary = save()
    device = torch.cuda.get_device_name()
    bench_report.print_table(df, f"generation: prompt {args.prompt_len}, {args.gen_len} generated, "
                                 f"{args.dtype}, {device}")
    if not summary.empty:
        bench_report.print_table(summary, "best batch of each model")
    if args.out is not None:
        plot(df, args.out / "bench_generate.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
