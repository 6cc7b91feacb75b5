"""GPU probe for the SSD backward fault (notes/ssd.md, "Open defect"): runs forward+backward of
ssd_chunked at one shape with the fixed (untuned) configs, optionally overriding the launch
settings of the three chunk-backward kernels, and prints one line: OK or the error.

    python scripts/ssd_fault_probe.py --warps 4 --stages 2 --iters 50
    compute-sanitizer --tool memcheck python scripts/ssd_fault_probe.py --iters 1

Run it in a fresh process per variant: after an illegal access the CUDA context is dead.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ["SSD_NO_AUTOTUNE"] = "1"  # fixed configs, before the kernels module is imported

import torch  # noqa: E402

from ssdbench.kernels import ssd_triton  # noqa: E402
from ssdbench.kernels.based import taylor_linear_attention  # noqa: E402
from ssdbench.kernels.ssd import ssd_chunked  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--L", type=int, default=256)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--P", type=int, default=32)
    ap.add_argument("--N", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--warps", type=int, default=None, help="num_warps of the chunk-backward kernels")
    ap.add_argument("--stages", type=int, default=None, help="num_stages of the chunk-backward kernels")
    ap.add_argument("--kernels", default="dc,dx,db", help="which chunk-backward kernels get the override")
    ap.add_argument("--min-bp", type=int, default=None, help="pad the P tile to at least this")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dump", default=None, help="folder for the chunk kernels' TTGIR/PTX and metadata")
    ap.add_argument("--fwd-only", action="store_true", help="forward passes only (no backward)")
    ap.add_argument("--op", default="ssd", choices=["ssd", "based"],
                    help="based: the Taylor linear-attention kernels instead (q, k with F = --N, v with --P)")
    a = ap.parse_args()

    names = {"dc": "_CHUNK_DC_FIXED", "dx": "_CHUNK_DX_FIXED", "db": "_CHUNK_DB_FIXED"}
    for k in a.kernels.split(","):
        cfg = getattr(ssd_triton, names[k])
        if a.warps is not None:
            cfg["num_warps"] = a.warps
        if a.stages is not None:
            cfg["num_stages"] = a.stages
    if a.min_bp is not None:
        tiles = ssd_triton._tiles
        ssd_triton._tiles = lambda P, N, Q: (lambda T, BP, BN: (T, max(BP, a.min_bp), BN))(*tiles(P, N, Q))

    dt_ = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    Bt, L, H, P, N = a.batch, a.L, a.H, a.P, a.N
    # x, B, C, dt as slices of one projection, as the Mamba-2 block makes them (strided views)
    proj = torch.randn(Bt, L, H * P + 2 * N + H, device=dev, generator=g).to(dt_)  # (batch, L, HP + 2N + H)
    x = proj[..., :H * P].view(Bt, L, H, P).requires_grad_(False)  # (batch, L, H, P)
    Bm = proj[..., H * P:H * P + N].view(Bt, L, 1, N)  # (batch, L, 1, N)
    Cm = proj[..., H * P + N:H * P + 2 * N].view(Bt, L, 1, N)  # (batch, L, 1, N)
    dt = proj[..., H * P + 2 * N:]  # (batch, L, H)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, dt, Bm, Cm)]
    A = -torch.rand(H, device=dev, generator=g).add(0.5).requires_grad_(True)  # (H,)
    D = torch.randn(H, device=dev, generator=g).requires_grad_(True)  # (H,)
    bias = torch.randn(H, device=dev, generator=g).mul(0.5).requires_grad_(True)  # (H,)
    ok = True
    try:
        for _ in range(a.iters):
            for t in leaves:
                t.grad = None  # fresh gradients each pass (accumulating fp16 ones overflows)
            if a.op == "based":  # q = x's first N columns, k = the next N, v = x
                q = leaves[0][..., :1].expand(Bt, L, H, N) * leaves[2]  # (batch, L, H, N)
                k = leaves[0][..., 1:2].expand(Bt, L, H, N) * leaves[3]  # (batch, L, H, N)
                y = taylor_linear_attention(q, k, leaves[0])  # (batch, L, H, P)
            else:
                y = ssd_chunked(leaves[0], leaves[1], A, leaves[2], leaves[3], a.chunk, D=D,
                                dt_bias=bias, dt_softplus=True)  # (batch, L, H, P)
            if not a.fwd_only:
                y.float().square().mean().backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        finite = a.fwd_only or all(torch.isfinite(t.grad).all().item() for t in leaves if t.grad is not None)
        print("OK", "grads finite" if finite else "NON-FINITE GRADS")
    except Exception as e:  # noqa: BLE001 - the probe reports any failure as one line
        ok = False
        print("FAIL", type(e).__name__, str(e).splitlines()[0][:160])
        # with CUDA_LAUNCH_BLOCKING=1 the failing launch is the last kernel frame
        import traceback
        for fr in traceback.extract_tb(e.__traceback__):
            if "ssd" in fr.filename:
                print("   at", os.path.basename(fr.filename), fr.lineno, fr.line)
    if a.dump:
        _dump(a.dump)
    return 0 if ok else 1


def _dump(folder: str) -> None:
    """Metadata (shared memory, registers, spills) and TTGIR/PTX of the compiled chunk kernels."""
    os.makedirs(folder, exist_ok=True)
    for kname in ("_ssd_chunk_fwd", "_ssd_chunk_bwd_dx", "_ssd_chunk_bwd_db", "_ssd_chunk_bwd_dc"):
        try:  # triton 3.x keeps compiled kernels per device in device_caches
            fn = getattr(ssd_triton, kname)
            for i, ck in enumerate(fn.device_caches[0][0].values()):
                md = ck.metadata
                print(kname, "shared", md.shared, "warps", md.num_warps, "stages", md.num_stages,
                      "regs", ck.n_regs, "spills", ck.n_spills)
                for ext in ("ttgir", "ptx"):
                    with open(os.path.join(folder, f"{kname}.{i}.{ext}"), "w") as f:
                        f.write(ck.asm[ext])
        except Exception as e:  # noqa: BLE001 - the dump is best effort
            print("dump of", kname, "failed:", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
