"""Compile a kernel for the H100 (sm_90a) on a machine without a GPU and report what the
compiler made of it: registers and spill bytes (the triton wheel's ptxas) and the global
loads by width in the PTX.

    python scripts/sm90_compile_stats.py conv_g [--row 3352]      # conv backward g-kernel
    python scripts/sm90_compile_stats.py ssd_dc                    # SSD dC kernel, 125M Mamba-2 shape
    python scripts/sm90_compile_stats.py scan_bwd                  # selective scan's walk backward

scan_bwd: every (BLOCK_D, num_warps) of the autotune list at N = 16 and 64, with the SASS
instruction mix (whole kernel, its KB-step sub-block unrolled once): exps (MUFU), FMAs,
cross-lane shuffles (SHFL, the reductions over N and over the program's channels), barriers,
the dB/dC atomics (REDG), local-memory spills (LDL/STL).

conv_g: the x row stride of Mamba-2 125M training (3352) passed as the launcher passes it
(divided by its power-of-two factor, the factor a constexpr) and raw, as before session 7
(Triton then sees no divisibility): 2-byte scalar loads against 16-byte vectors.
ssd_dc: one C B^T group shared by all heads (USE_CB), atomic head split, bf16, per
(num_warps, num_stages) of the autotune list. The local triton may differ from the GPU
machine's (3.6): counts are a guide; results/h100/session7 has the ncu view.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ssdbench.kernels import causal_conv1d as cc
from ssdbench.kernels import selective_scan as ss
from ssdbench.kernels import ssd_triton as st
from ssdbench.kernels.triton_util import pow2_factor

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


SASS_OPS = ("MUFU", "FFMA", "FMUL", "FADD", "SHFL", "BAR", "REDG", "ATOMG", "LDG", "STG", "LDS", "STS", "LDL", "STL")


def compile_stats(jit, consts: dict, ptr_types: dict, div16: set, num_warps: int, num_stages: int = 2,
                  sass: bool = False) -> dict:
    """Compile jit for sm_90a: pointer arguments 16-byte aligned, integer arguments in div16
    marked multiples of 16 (as Triton specialises them at launch), the rest plain. With sass,
    also the count of each SASS opcode of SASS_OPS in the cubin (nvdisasm)."""
    sig, attrs = {}, {}
    for i, (name, p) in enumerate(zip(jit.arg_names, jit.params)):
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name in div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn=jit, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = kernel.asm["ptx"]
    loads = {}
    for m in re.finditer(r"ld\.global((?:\.\w+)*)", ptx):  # by vector width and element type
        kind = ".".join(p for p in m.group(1).split(".") if p[:1] in ("v", "b", "u", "f", "s") and p[1:].isdigit())
        loads[kind] = loads.get(kind, 0) + 1
    out = {"global loads": loads}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    cubin = f.name[:-4] + ".cubin"
    for ptxas in ("ptxas", "ptxas-blackwell"):  # the one whose PTX version matches this triton
        res = subprocess.run([os.path.join(BIN, ptxas), "-arch=sm_90a", "-v", f.name, "-o", cubin],
                             capture_output=True, text=True)
        text = res.stdout + res.stderr
        regs = re.search(r"Used (\d+) registers", text)
        if regs:
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
            out.update(registers=int(regs.group(1)), spill_store_bytes=int(spill.group(1)) if spill else 0)
            break
    if sass and regs:
        dis = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
        ops = collections.Counter(m.group(1).split(".")[0] for m in
                                  re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", dis))
        out["sass"] = {k: ops[k] for k in SASS_OPS if ops[k]}
    return out


def conv_g(row: int) -> None:
    ptrs = {n: "*fp32" for n in ("w_ptr", "bias_ptr", "dw_ptr", "db_ptr")}
    ptrs.update(seq_ptr="*i32", g_ptr="*bf16")
    base = dict(s_xd=1, s_wk=1, s_od=1, W=4, WP=4, HAS_BIAS=True, SILU=True, HAS_SEQ=False, SPAN=512,
                BLOCK_D=64, BLOCK_L=32)  # one of the autotune list's configs
    div16 = {"DIM", "L", "s_part", "s_xb", "s_ob", "s_ol", "s_wd"}  # 1792-wide dout rows etc.
    f = pow2_factor(row)
    for label, xv, d16 in ((f"stride {row} passed as {row // f} x constexpr {f} (launcher)", f, div16),
                           (f"stride {row} passed raw (before session 7)", 1, div16)):
        if row % 16 == 0 and xv == 1:
            d16 = div16 | {"s_xl"}  # a multiple of 16 is marked so by Triton itself
        print(label, compile_stats(cc._causal_conv1d_bwd_g_kernel, dict(base, XV=xv, OV=16), ptrs, d16, 4))


def ssd_dc() -> None:
    ptrs = {n: "*fp32" for n in ("dtp_ptr", "cs_ptr", "cb_ptr", "dC_ptr", "row_ptr")}
    ptrs["seq_ptr"] = "*i32"
    consts = dict(Q=256, T=64, BP=64, BN=128, HAS_SEQ=False, USE_CB=True, ATOMIC=True, DT="bf16", PREC="tf32")
    div16 = {"L", "P", "N", "sx_b", "sx_l", "sx_h", "sB_b", "sB_l", "sC_b", "sC_l", "sy_b", "sy_l", "sy_h", "ss_b"}
    for cfg in st._CHUNK_CONFIGS:
        print(f"num_warps {cfg.num_warps}, num_stages {cfg.num_stages}:",
              compile_stats(st._ssd_chunk_bwd_dc, consts, ptrs, div16, cfg.num_warps, cfg.num_stages))


def scan_bwd() -> None:
    bf16 = {"u_ptr", "delta_ptr", "z_ptr", "dy_ptr", "du_ptr", "ddelta_ptr", "dz_ptr"}
    jit = ss._selective_scan_bwd_walk_kernel
    ptrs = {n: "*bf16" if n in bf16 else "*i32" if n == "seq_ptr" else "*fp32"
            for n in jit.arg_names if n.endswith("_ptr")}
    div16 = {"DIM", "L", "SEG", "s_ub", "s_ud", "s_db", "s_dd", "s_zb", "s_zd", "s_ob", "s_od", "s_cb", "s_cg",
             "s_cl", "s_sb", "s_sd", "s_sc", "s_lb", "s_ls", "s_ld", "s_xb", "s_xs", "s_xj", "s_xn"}
    for N in (16, 64):
        for block_d, nw in ss._bwd_walk_candidates(N):
            consts = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_SEQ=False, HAS_LAM=False,
                          IDX64=False, BLOCK_D=block_d, NP=triton.next_power_of_2(N), KB=ss._BWD_KB,
                          BLOCK_T=ss._GPU_BLOCK_T)
            print(f"N={N} BLOCK_D={block_d} num_warps={nw}:", compile_stats(jit, consts, ptrs, div16, nw, 1, sass=True))


TARGETS = {"conv_g": lambda a: conv_g(a.row), "ssd_dc": lambda a: ssd_dc(), "scan_bwd": lambda a: scan_bwd()}

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kernel", choices=list(TARGETS))
    ap.add_argument("--row", type=int, default=3352, help="conv_g: the x row stride")
    a = ap.parse_args()
    print(f"triton {triton.__version__}, target sm_90a, compiled on {os.uname().machine} (no GPU)")
    TARGETS[a.kernel](a)
    sys.exit(0)
