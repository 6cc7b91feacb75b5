"""Training throughput of the four architectures at the GPT-3 ladder's first rung (GPU).

    python -m ssdbench.bench_train --out results/h100      # or: ssdbench bench train

For each model (built from the ``gpt3_125m_<arch>`` experiment presets, so the benchmark
measures the configuration the ladder trains: Transformer++ and Based 12 x 768, Mamba-1 and
Mamba-2 24 x 768, vocabulary 50,280 of GPT-NeoX) and each sequence length, it runs full
training steps (bf16 autocast forward, cross-entropy, backward, AdamW) on random tokens and
reports

* tokens/s (median step time over ``--steps`` after ``--warmup`` steps),
* model FLOPs utilisation: 3 x the model's exact forward FLOPs per token at that length
  (``LanguageModel.flops_per_token``: projections, MLP, head, attention's L-term, SSD's chunk
  terms, ...) x tokens/s, over the GPU's measured dense bf16 matmul rate (an 8192^3 product
  timed in the same process, the "achievable peak"), and the same with 6N for comparison;
* peak GPU memory.

``--cuda-graph on`` (default) replays each step from a CUDA graph (see ``time_training``).
A model that does not fit reports ``oom``. ``--compile`` adds ``torch.compile`` rows.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import pandas as pd
import torch

from ssdbench import bench_report

ARCHS = ("transformerpp", "mamba2", "mamba1", "based")
VOCAB = 50280  # GPT-NeoX-20B's vocabulary (the released Mamba models)


def model_config(arch: str, overrides: list[str] = ()):
    """The model config of experiment=gpt3_125m_<arch> with ``overrides`` (Hydra syntax);
    raises Hydra's ConfigCompositionException for an override it cannot apply."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import ssdbench.train  # noqa: F401 - registers the config resolvers

    GlobalHydra.instance().clear()
    with initialize_config_module("ssdbench.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment=gpt3_125m_{arch}", "task.data_dir=unused",
                                           f"model.vocab_size={VOCAB}", *overrides])
    return cfg.model


def build_model(arch: str, overrides: list[str] = ()):
    """The model of experiment=gpt3_125m_<arch> (only the model; no data needed)."""
    from hydra.utils import instantiate

    return instantiate(model_config(arch, overrides))


def matmul_peak_tflops() -> float:
    from triton.testing import do_bench

    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: m @ m, return_mode="median")
    return 2 * 8192 ** 3 / ms / 1e9


def time_training(model, L: int, batch: int, steps: int, warmup: int, compile_: bool,
                  profile: bool = False, cuda_graph: bool = False, vocab: int = VOCAB) -> dict:
    """Median step time (and peak memory) of full training steps on random tokens.

    cuda_graph: capture one whole step (forward, loss, backward, AdamW) in a CUDA graph after
    the warm-up and time its replays. A Mamba-2 step launches about 40 kernels per layer, many
    through Python (Triton launchers, autograd); replaying removes that host time, which kept
    the GPU idle a quarter of the step (session 4: 95.6 of 129 ms busy). Shapes are static
    here, which is what capture needs; autocast runs without its weight-cast cache, as the
    CUDA-graph notes of PyTorch ask."""
    model = model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=cuda_graph)
    fwd = torch.compile(model) if compile_ else model
    x = torch.randint(0, vocab, (batch, L + 1), device="cuda")  # (batch, L + 1)
    inp, tgt = x[:, :-1], x[:, 1:]

    def body():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not cuda_graph):
            loss = fwd(inp, labels=tgt)  # the model's fused cross-entropy (as the trainer calls it)
        loss.backward()
        opt.step()

    def eager_step():
        body()
        opt.zero_grad(set_to_none=True)

    step = eager_step
    if cuda_graph:
        # warm-up on a side stream (compiles, autotunes, allocates), then capture one step; the
        # gradients are allocated inside the capture and stay at fixed addresses
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 1)):
                eager_step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        step = graph.replay
        warmup = 1
    for _ in range(warmup):  # compiles, autotunes the kernels, warms the allocator
        step()
    torch.cuda.synchronize()
    if not cuda_graph:  # (a graph's buffers were all allocated during the capture: keep that peak)
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    res = dict(step_ms=1e3 * float(pd.Series(times).median()),
               peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30)
    if profile:  # where a step's GPU time goes, kernel by kernel
        res["kernels"] = bench_report.kernel_times(step, iters=2, width=90)
        if not cuda_graph:  # the ATen ops behind the kernels, with their shapes (not visible in a graph)
            res["ops"] = bench_report.op_times(step, iters=1)
    return res


def run_case(arch: str, L: int, tokens: int, steps: int, warmup: int, compile_: bool, peak: float,
             profile: bool = False, out: Path | None = None, argv: list[str] | None = None,
             cuda_graph: bool = False, overrides: list[str] = ()) -> dict:
    batch = max(1, tokens // L)
    row = dict(model=arch, L=L, batch=batch, compile=compile_, cuda_graph=cuda_graph)
    model = None
    try:
        model = build_model(arch, overrides)
        n_params = model.num_params()
        row.update(params_m=n_params / 1e6)
        r = time_training(model, L, batch, steps, warmup, compile_, profile=profile, cuda_graph=cuda_graph)
        tag = f"{arch}_L{L}{'_compiled' if compile_ else ''}{'_graph' if cuda_graph else ''}"
        if "ops" in r:
            ops = r.pop("ops")
            print(ops.head(15).to_string(index=False))
            bench_report.write(ops, out, f"train_ops_{tag}", "ssdbench.bench_train", argv)
        if "kernels" in r:
            k = r.pop("kernels")
            name = f"train_kernels_{tag}"
            print(f"{name}: step {r['step_ms']:.1f} ms, kernels {k.ms_per_iter.sum():.1f} ms")
            print(k.head(25).to_string(index=False))
            bench_report.write(k, out, name, "ssdbench.bench_train", argv)  # nothing without --out
        tok_s = batch * L / (r["step_ms"] / 1e3)
        fpt = 3 * model.flops_per_token(L)  # training FLOPs per token, exact count
        row.update(step_ms=r["step_ms"], tokens_per_s=tok_s, mfu=fpt * tok_s / (peak * 1e12),
                   mfu_6n=6 * model.num_params(non_embedding=True) * tok_s / (peak * 1e12),
                   peak_mem_gb=r["peak_mem_gb"], status="ok")
    except torch.cuda.OutOfMemoryError:
        row.update(status="oom")
    except Exception as e:  # noqa: BLE001 - a failing case (compile, capture) must not end the table
        traceback.print_exc()
        row.update(status=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
    finally:
        del model
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ssdbench bench train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per training step (batch = tokens / L)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", choices=["off", "on", "both"], default="off",
                    help="torch.compile the model (kernels of the project stay Triton either way)")
    ap.add_argument("--cuda-graph", choices=["off", "on", "both"], default="on",
                    help="replay each training step from a CUDA graph (removes the host's launch time)")
    ap.add_argument("--out", type=Path, default=None, help="folder for bench_train.csv / .md")
    ap.add_argument("--profile", action="store_true",
                    help="also print the GPU time per kernel of a step (and write train_kernels_*.csv / .md to --out)")
    ap.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                    help="Hydra overrides of the model config, applied to every model (e.g. model.proj_align=1 "
                         "for Mamba-2 alone); the table's rows carry them")
    args = ap.parse_args(argv)
    for arch in args.models if args.override else ():  # a bad override: one line, before any GPU work
        try:
            model_config(arch, args.override)
        except Exception as e:  # noqa: BLE001 - Hydra's composition errors have no common public base
            print(f"ssdbench bench train: --override for {arch}: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
    bench_report.require_cuda("train")
    peak = matmul_peak_tflops()
    print(f"measured bf16 matmul peak: {peak:.0f} TFLOP/s")
    modes = {"off": [False], "on": [True], "both": [False, True]}
    rows = []
    for arch in args.models:
        for L in args.lengths:
            for c in modes[args.compile]:
                for g in modes[args.cuda_graph]:
                    rows.append(run_case(arch, L, args.tokens, args.steps, args.warmup, c, peak,
                                         profile=args.profile, out=args.out, argv=argv, cuda_graph=g,
                                         overrides=args.override))
                    if args.override:
                        rows[-1]["overrides"] = " ".join(args.override)
                    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in rows[-1].items()), flush=True)
    df = pd.DataFrame(rows)
    bench_report.print_table(df, f"training throughput on {torch.cuda.get_device_name()}")
    bench_report.write(df, args.out, "bench_train", "ssdbench.bench_train", argv,
                       header=f"Measured bf16 matmul peak: {peak:.0f} TFLOP/s (MFU denominator).\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
