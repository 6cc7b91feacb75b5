"""Causal depthwise conv1d (the short convolution in Mamba-1 and Mamba-2 blocks).

For channel d and width W (2..4):  out[b, d, t] = act(bias[d] + sum_k w[d, k] x[b, d, t - (W-1) + k]),
so output t sees x[t-W+1 .. t] (zeros before the start). With ``seq_idx`` (batch, L) a tap never
reaches into a previous packed sequence (Mamba-2 §8.3): x[s] counts only if seq_idx[s] == seq_idx[t].

Two implementations behind one entry point:
* ``impl="torch"``: F.conv1d with W-1 left padding (or masked shifted taps with seq_idx) + silu,
  autograd does the backward. Also the float64 oracle of the tests.
* ``impl="triton"``: one fused kernel forward (taps + bias + silu + seq mask, one read of x, one
  write), and a backward of two kernels: the gradient at the pre-activation g (recomputed from
  x, not saved) with the dweight/dbias partial sums (per program, reduced in PyTorch;
  deterministic, no atomics), then dx from W shifted reads of g.
``impl="auto"`` picks ``AUTO_IMPL`` (see its comment) on CUDA and the PyTorch path elsewhere (the interpreter is far slower than F.conv1d on a CPU). The comparison is
``ssdbench bench scan --op conv``; its H100 table is results/h100/conv_bench.md.
Both accept channel-last inputs (a (batch, L, D) tensor viewed as (batch, D, L)) without copies
on the Triton path; outputs keep the input's memory layout.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

from .triton_util import autotune, check_seq_idx_order, interpreting, pow2_factor

# Default for impl="auto" on CUDA: this Triton kernel. It is faster on an H100
# (results/h100/conv_bench.md, bf16, D=4096, L=2K: forward 0.50 vs 3.84 ms for F.conv1d,
# forward+backward 2.36 vs 9.27 ms with the two-kernel backward of session 4, 3.0 before) and its tests pass there in fp32/bf16/fp16. It was held back
# in session 2 while an illegal memory access in Mamba-2 training was unexplained; that fault
# was the SSD kernels' (kernels/ssd_triton.py `_tiles`), and 16 runs on the H100 in session 3
# (Mamba-1, Mamba-2 and Based MQAR, Mamba-1 LTI selective copying: scripts/jobs_fig8_t256_2k.txt)
# trained on this kernel without a fault. SSDBENCH_CONV_IMPL=torch selects PyTorch's conv1d for a whole run.
AUTO_IMPL = os.environ.get("SSDBENCH_CONV_IMPL", "triton")

_BWD_SPAN = 512  # time steps per backward program: dweight partials are (L / 512) x D x W


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _conv_pre(x_base, w_ptr, q_base, offs_d, d_mask, offs_t, t_mask, bias,
              s_xd, s_xl, s_wd, s_wk, s_ql,
              W: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """Pre-activation bias + sum_j w[:, W-1-j] x[t-j] on a (BLOCK_D, BLOCK_L) tile, in fp32."""
    acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32) + bias[:, None]  # (BLOCK_D, BLOCK_L)
    q = offs_t
    if HAS_SEQ:
        q = tl.load(q_base + offs_t * s_ql, mask=t_mask, other=0)  # (BLOCK_L,)
    for j in tl.static_range(W):
        xj, wj = _lag_tap(x_base, w_ptr, q_base, q, offs_d, d_mask, offs_t, t_mask, s_xd, s_xl, s_wd, s_wk,
                          s_ql, j, W, HAS_SEQ, BLOCK_D, BLOCK_L)
        acc += wj[:, None] * xj
    return acc


@triton.jit
def _causal_conv1d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, o_ptr,
    DIM, L,
    s_xb, s_xd, s_xl, s_wd, s_wk, s_ob, s_od, s_ol, s_qb, s_ql,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_SEQ: tl.constexpr,
    XV: tl.constexpr, OV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    s_xl, s_ol = s_xl * XV, s_ol * OV  # time strides passed divided by their power-of-two factor
    pid_b = tl.program_id(2).to(tl.int64)  # program axes: (D block, time block, batch); see _grid
    offs_t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    d_mask = offs_d < DIM
    t_mask = offs_t < L
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc = _conv_pre(x_ptr + pid_b * s_xb, w_ptr, seq_ptr + pid_b * s_qb, offs_d, d_mask, offs_t, t_mask,
                    bias, s_xd, s_xl, s_wd, s_wk, s_ql, W, HAS_SEQ, BLOCK_D, BLOCK_L)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(o_ptr + pid_b * s_ob + offs_d[:, None] * s_od + offs_t[None, :] * s_ol,
             acc.to(o_ptr.dtype.element_ty), mask=d_mask[:, None] & t_mask[None, :])


@triton.jit
def _lag_tap(x_base, w_ptr, q_base, q, offs_d, d_mask, offs_t, t_mask, s_xd, s_xl, s_wd, s_wk, s_ql,
             J: tl.constexpr, W: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_L: tl.constexpr):
    """x[t - J] as fp32 (BLOCK_D, BLOCK_L) (0 before the start and, with seq_idx, across a
    sequence boundary) and its weight w[:, W-1-J]; both zero for a lag J >= W."""
    xj = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)  # (BLOCK_D, BLOCK_L)
    wj = tl.zeros([BLOCK_D], dtype=tl.float32)  # (BLOCK_D,)
    if J < W:
        s = offs_t - J
        valid = t_mask & (s >= 0)
        if HAS_SEQ:
            qs = tl.load(q_base + s * s_ql, mask=valid, other=0)
            valid = valid & (qs == q)
        xj = tl.load(x_base + offs_d[:, None] * s_xd + s[None, :] * s_xl,
                     mask=d_mask[:, None] & valid[None, :], other=0.0).to(tl.float32)
        wj = tl.load(w_ptr + offs_d * s_wd + (W - 1 - J) * s_wk, mask=d_mask, other=0.0).to(tl.float32)
    return xj, wj


@triton.jit
def _causal_conv1d_bwd_g_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, do_ptr, g_ptr, dw_ptr, db_ptr,
    DIM, L, n_lchunks, s_part,
    s_xb, s_xd, s_xl, s_wd, s_wk, s_ob, s_od, s_ol, s_qb, s_ql,
    W: tl.constexpr, WP: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_SEQ: tl.constexpr,
    XV: tl.constexpr, OV: tl.constexpr, SPAN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Backward, step 1: g = dL/d(pre-activation) at every output (the pre-activation
    recomputed from x, not saved), written (batch, L, D) in g's dtype; and the dweight/dbias
    partial sums of this program's SPAN time steps, which need g against x at the same outputs.

    The W lagged x tiles are loaded once per tile and kept for both uses. The dweight and
    dbias products accumulate elementwise and are summed over time once at the end: a sum
    along the time axis crosses the warps (shared memory and a barrier), and one per tap and
    tile (session 6) kept this kernel at a third of its bandwidth."""
    s_xl, s_ol = s_xl * XV, s_ol * OV  # time strides passed divided by their power-of-two factor
    pid_b = tl.program_id(2).to(tl.int64)  # program axes: (D block, time span, batch); see _grid
    pid_l = tl.program_id(1)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    d_mask = offs_d < DIM
    offs_k = tl.arange(0, WP)  # (WP,) tap index, padded to a power of two
    x_base = x_ptr + pid_b * s_xb
    q_base = seq_ptr + pid_b * s_qb
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    a0 = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)  # sum_t g x[t - j] elementwise, lag j = 0..3
    a1 = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    a3 = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    ab = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)  # sum_t g
    for i in range(SPAN // BLOCK_L):
        offs_t = pid_l * SPAN + i * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
        t_mask = offs_t < L
        q = offs_t
        if HAS_SEQ:
            q = tl.load(q_base + offs_t * s_ql, mask=t_mask, other=0)
        x0, w0 = _lag_tap(x_base, w_ptr, q_base, q, offs_d, d_mask, offs_t, t_mask, s_xd, s_xl, s_wd, s_wk,
                          s_ql, 0, W, HAS_SEQ, BLOCK_D, BLOCK_L)
        x1, w1 = _lag_tap(x_base, w_ptr, q_base, q, offs_d, d_mask, offs_t, t_mask, s_xd, s_xl, s_wd, s_wk,
                          s_ql, 1, W, HAS_SEQ, BLOCK_D, BLOCK_L)
        x2, w2 = _lag_tap(x_base, w_ptr, q_base, q, offs_d, d_mask, offs_t, t_mask, s_xd, s_xl, s_wd, s_wk,
                          s_ql, 2, W, HAS_SEQ, BLOCK_D, BLOCK_L)
        x3, w3 = _lag_tap(x_base, w_ptr, q_base, q, offs_d, d_mask, offs_t, t_mask, s_xd, s_xl, s_wd, s_wk,
                          s_ql, 3, W, HAS_SEQ, BLOCK_D, BLOCK_L)
        mo = d_mask[:, None] & t_mask[None, :]
        g = tl.load(do_ptr + pid_b * s_ob + offs_d[:, None] * s_od + offs_t[None, :] * s_ol,
                    mask=mo, other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_L)
        if SILU:
            pre = bias[:, None] + w0[:, None] * x0 + w1[:, None] * x1 + w2[:, None] * x2 + w3[:, None] * x3
            sg = tl.sigmoid(pre)
            g = g * sg * (1.0 + pre * (1.0 - sg))
        tl.store(g_ptr + (pid_b * L + offs_t[None, :]) * DIM + offs_d[:, None], g.to(g_ptr.dtype.element_ty), mask=mo)
        ab += g
        a0 += g * x0
        a1 += g * x1
        a2 += g * x2
        a3 += g * x3
    # Partial sums of this (sequence, time span): rows of s_part numbers, dw (D, WP) then db (D,)
    # (db_ptr points past dw in the same rows: one sum reduces both); lag j is tap W-1-j
    k = offs_k[None, :]  # (1, WP)
    dw = tl.where(k == W - 1, tl.sum(a0, axis=1)[:, None], 0.0)  # (BLOCK_D, WP)
    dw = tl.where(k == W - 2, tl.sum(a1, axis=1)[:, None], dw)
    dw = tl.where(k == W - 3, tl.sum(a2, axis=1)[:, None], dw)
    dw = tl.where(k == W - 4, tl.sum(a3, axis=1)[:, None], dw)
    part = pid_b * n_lchunks + pid_l
    tl.store(dw_ptr + part * s_part + offs_d[:, None] * WP + k, dw,
             mask=d_mask[:, None] & (offs_k < W)[None, :])
    tl.store(db_ptr + part * s_part + offs_d, tl.sum(ab, axis=1), mask=d_mask)


@triton.jit
def _causal_conv1d_bwd_dx_kernel(
    g_ptr, w_ptr, seq_ptr, dx_ptr,
    DIM, L,
    s_wd, s_wk, s_dxb, s_dxd, s_dxl, s_qb, s_ql,
    W: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Backward, step 2: dx[t] = sum_j w[W-1-j] g[t+j] over the outputs t+j of x[t]'s sequence
    (g from step 1, read W times shifted, mostly from L2)."""
    pid_b = tl.program_id(2).to(tl.int64)  # program axes: (D block, time block, batch); see _grid
    offs_t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    d_mask = offs_d < DIM
    t_mask = offs_t < L
    q_base = seq_ptr + pid_b * s_qb
    if HAS_SEQ:
        q = tl.load(q_base + offs_t * s_ql, mask=t_mask, other=0)
    dx = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)  # (BLOCK_D, BLOCK_L)
    for j in tl.static_range(W):
        tp = offs_t + j  # (BLOCK_L,) the outputs x[t] feeds through tap W-1-j
        valid = t_mask & (tp < L)
        if HAS_SEQ:
            qp = tl.load(q_base + tp * s_ql, mask=valid, other=0)
            valid = valid & (qp == q)
        g = tl.load(g_ptr + (pid_b * L + tp[None, :]) * DIM + offs_d[:, None],
                    mask=d_mask[:, None] & valid[None, :], other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_L)
        wk = tl.load(w_ptr + offs_d * s_wd + (W - 1 - j) * s_wk, mask=d_mask, other=0.0).to(tl.float32)
        dx += wk[:, None] * g
    tl.store(dx_ptr + pid_b * s_dxb + offs_d[:, None] * s_dxd + offs_t[None, :] * s_dxl,
             dx.to(dx_ptr.dtype.element_ty), mask=d_mask[:, None] & t_mask[None, :])


_FWD_CONFIGS = ((16, 128, 4), (32, 64, 4), (64, 32, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8))
# (BLOCK_D, BLOCK_L, num_warps) of the g-kernel: it holds ten fp32 tiles (four x lags, five
# accumulators, g), so at most 16 elements per thread and tile. The best of a 48-config sweep
# at Mamba-2 training's shape (results/h100/session7/conv_sweep.txt): (16, 32, 4) 117 us,
# (16, 64, 8) 130, (32, 32, 8) 129, against 138 for (32, 64, 4)
_BWD_CONFIGS = ((16, 32, 4), (16, 64, 8), (32, 32, 8), (32, 64, 4), (64, 32, 4), (16, 64, 2))


def _grid(dim: int, block_d: int, n_time: int, batch: int) -> tuple[int, int, int]:
    """Program grid of all three kernels: D blocks on the fastest axis, so the programs that
    run side by side read neighbouring channels of the same time rows (one channel-last row
    of 16 bf16 channels is a quarter of a 128-byte line). With the batch there instead, at
    Mamba-2 training's shape (results/h100/session11/conv_ab_call3.txt) the forward took
    67 us and the backward 189, against 62 and 175 now."""
    if batch > 65535 or n_time > 65535:  # CUDA's limit on the grid's second and third axes
        raise ValueError(f"x: batch {batch} or length (in {n_time} blocks) too large for the conv kernels' grid")
    return triton.cdiv(dim, block_d), n_time, batch


@functools.lru_cache(maxsize=None)
def _tuned_fwd():
    cfgs = [triton.Config({"BLOCK_D": bd, "BLOCK_L": bl}, num_warps=nw) for bd, bl, nw in _FWD_CONFIGS]
    return autotune(cfgs, key=["DIM", "L", "s_xd", "s_xl"])(_causal_conv1d_fwd_kernel)


@functools.lru_cache(maxsize=None)
def _tuned_bwd_g():
    cfgs = [triton.Config({"BLOCK_D": bd, "BLOCK_L": bl}, num_warps=nw) for bd, bl, nw in _BWD_CONFIGS]
    return autotune(cfgs, key=["DIM", "L", "s_xd", "s_xl"])(_causal_conv1d_bwd_g_kernel)


@functools.lru_cache(maxsize=None)
def _tuned_bwd_dx():
    cfgs = [triton.Config({"BLOCK_D": bd, "BLOCK_L": bl}, num_warps=nw) for bd, bl, nw in _FWD_CONFIGS]
    return autotune(cfgs, key=["DIM", "L", "s_dxd", "s_dxl"])(_causal_conv1d_bwd_dx_kernel)


# ----------------------------------------------------------------------------------------------
# Checks, autograd Function, reference
# ----------------------------------------------------------------------------------------------
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(x, weight, bias, activation, seq_idx):
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        raise ValueError(f"x: expected a float tensor (batch, D, L), got {getattr(x, 'dtype', type(x))}")
    if x.dim() != 3:
        raise ValueError(f"x: expected (batch, D, L), got shape {tuple(x.shape)}")
    batch, dim, L = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _FLOATS:
        raise ValueError("weight: expected a float tensor (D, W)")
    if weight.dim() == 3 and weight.shape[1] == 1:  # nn.Conv1d's (D, 1, W) layout
        weight = weight[:, 0]
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"weight: expected (D, W) = ({dim}, W), got shape {tuple(weight.shape)}")
    if not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"weight: width W = {weight.shape[1]} is not supported (2..4)")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype not in _FLOATS
                             or tuple(bias.shape) != (dim,)):
        raise ValueError(f"bias: expected a float tensor of shape ({dim},)")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation: expected None or 'silu', got {activation!r}")
    if seq_idx is not None:
        if not isinstance(seq_idx, torch.Tensor) or seq_idx.dtype not in (torch.int32, torch.int64):
            raise ValueError("seq_idx: expected an int32 tensor of shape (batch, L)")
        if tuple(seq_idx.shape) != (batch, L):
            raise ValueError(f"seq_idx: expected shape ({batch}, {L}), got {tuple(seq_idx.shape)}")
        check_seq_idx_order(seq_idx)  # skipped while a CUDA graph is captured (no sync there)
    for name, t in (("weight", weight), ("bias", bias), ("seq_idx", seq_idx)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: on device {t.device} but x is on {x.device}")
    return weight


def conv_fwd(x, weight, bias, silu, seq_idx):
    """Forward launch: x (batch, D, L) any strides (channel-last welcome), weight (D, W), bias
    (D,) or None, seq_idx (batch, L) int32 or None. Returns out in x's layout and dtype."""
    batch, dim, L = x.shape  # (batch, D, L)
    W = weight.shape[1]
    out = torch.empty_like(x)  # keeps a channel-last layout if x has one
    q = seq_idx if seq_idx is not None else x
    qs = seq_idx.stride() if seq_idx is not None else (0, 0)
    xv, ov = pow2_factor(x.stride(2)), pow2_factor(out.stride(2))
    args = (x, weight, bias if bias is not None else x, q, out, dim, L,
            x.stride(0), x.stride(1), x.stride(2) // xv, *weight.stride(),
            out.stride(0), out.stride(1), out.stride(2) // ov, *qs)
    kw = dict(W=W, HAS_BIAS=bias is not None, SILU=silu, HAS_SEQ=seq_idx is not None, XV=xv, OV=ov)
    if interpreting():
        _causal_conv1d_fwd_kernel[_grid(dim, 16, triton.cdiv(L, 32), batch)](
            *args, **kw, BLOCK_D=16, BLOCK_L=32)
    else:
        grid = lambda m: _grid(dim, m["BLOCK_D"], triton.cdiv(L, m["BLOCK_L"]), batch)  # noqa: E731
        _tuned_fwd()[grid](*args, **kw)
    return out


def conv_bwd(x, weight, bias, seq_idx, silu, dout, dx=None):
    """Backward launch: dx (x's layout, or written into the given (batch, D, L) view), dweight,
    dbias (None without bias)."""
    batch, dim, L = x.shape
    W = weight.shape[1]
    WP = triton.next_power_of_2(W)
    span = 32 if interpreting() else _BWD_SPAN  # (interpreter: 2 tiles of 16 per program)
    n_lchunks = triton.cdiv(L, span)
    if dx is None:
        dx = torch.empty_like(x)  # (batch, D, L), x's layout
    # g in bf16 for bf16 inputs: dx is rounded to bf16 anyway, and g's write and the
    # dx-kernel's W reads of it are most of the backward's memory traffic
    g_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    g = torch.empty((batch, L, dim), device=x.device, dtype=g_dtype)  # (batch, L, D) dL/d(pre)
    # per (sequence, time span) partial sums, dw (D, WP) then db (D,) in one row: one reduction
    part = torch.empty((batch, n_lchunks, dim * (WP + 1)), device=x.device, dtype=torch.float32)
    q = seq_idx if seq_idx is not None else x
    qs = seq_idx.stride() if seq_idx is not None else (0, 0)
    # two kernels: g once per output, then dx from W shifted reads of g (one fused kernel
    # recomputed g, with its W-tap pre-activation, at each of the W shifts: 0.36 ms a layer
    # of Mamba-2 training on the H100, 5x its forward)
    xv, ov = pow2_factor(x.stride(2)), pow2_factor(dout.stride(2))
    args = (x, weight, bias if bias is not None else x, q, dout, g, part, part[..., dim * WP:], dim, L, n_lchunks,
            part.stride(1),
            x.stride(0), x.stride(1), x.stride(2) // xv, *weight.stride(),
            dout.stride(0), dout.stride(1), dout.stride(2) // ov, *qs)
    kw = dict(W=W, WP=WP, HAS_BIAS=bias is not None, SILU=silu, HAS_SEQ=seq_idx is not None,
              XV=xv, OV=ov, SPAN=span)
    args_dx = (g, weight, q, dx, dim, L, *weight.stride(), *dx.stride(), *qs)
    kw_dx = dict(W=W, HAS_SEQ=seq_idx is not None)
    if interpreting():
        _causal_conv1d_bwd_g_kernel[_grid(dim, 16, n_lchunks, batch)](*args, **kw, BLOCK_D=16, BLOCK_L=16)
        _causal_conv1d_bwd_dx_kernel[_grid(dim, 16, triton.cdiv(L, 32), batch)](
            *args_dx, **kw_dx, BLOCK_D=16, BLOCK_L=32)
    else:
        grid = lambda m: _grid(dim, m["BLOCK_D"], n_lchunks, batch)  # noqa: E731
        _tuned_bwd_g()[grid](*args, **kw)
        grid = lambda m: _grid(dim, m["BLOCK_D"], triton.cdiv(L, m["BLOCK_L"]), batch)  # noqa: E731
        _tuned_bwd_dx()[grid](*args_dx, **kw_dx)
    tot = part.sum((0, 1))  # (D * (WP + 1),)
    dw = tot[:dim * WP].view(dim, WP)[:, :W].to(weight.dtype)  # (D, W)
    db = tot[dim * WP:].to(bias.dtype) if bias is not None else None
    return dx, dw, db


class CausalConv1dFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, silu, seq_idx):
        if seq_idx is not None:
            seq_idx = seq_idx.to(torch.int32)
        out = conv_fwd(x, weight, bias, silu, seq_idx)
        ctx.save_for_backward(x, weight, bias, seq_idx)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, seq_idx = ctx.saved_tensors
        dx, dw, db = conv_bwd(x, weight, bias, seq_idx, ctx.silu, dout)
        return dx, dw, db, None, None


def causal_conv1d_ref(x, weight, bias=None, activation=None, seq_idx=None):
    """Plain-PyTorch causal depthwise conv1d: F.conv1d with W-1 left padding; with seq_idx the
    shifted taps are masked where they cross into a previous sequence. Differentiable."""
    weight = _check(x, weight, bias, activation, seq_idx)
    batch, dim, L = x.shape
    W = weight.shape[1]
    wc = weight.to(x.dtype)
    bc = bias.to(x.dtype) if bias is not None else None
    if seq_idx is None:
        out = F.conv1d(F.pad(x, (W - 1, 0)), wc[:, None, :], bc, groups=dim)  # (batch, D, L)
    else:
        xp = F.pad(x, (W - 1, 0))  # (batch, D, L + W - 1)
        qp = F.pad(seq_idx.to(torch.int64), (W - 1, 0), value=-1)  # (batch, L + W - 1)
        out = torch.zeros_like(x) if bc is None else bc[None, :, None].expand_as(x).clone()
        for k in range(W):  # tap k reads x[t - (W-1) + k]
            same = (qp[:, k:k + L] == seq_idx).to(x.dtype)[:, None, :]  # (batch, 1, L)
            out = out + wc[None, :, k, None] * xp[:, :, k:k + L] * same
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return out


def causal_conv1d(x, weight, bias=None, activation=None, seq_idx=None, impl="auto", channel_last=False):
    """Causal depthwise conv1d. x (batch, D, L) (channel-last strides welcome), weight (D, W) or
    (D, 1, W) with W in 2..4, bias (D,), activation None or "silu", seq_idx (batch, L) int32.

    impl: "triton" (fused kernels; CUDA or TRITON_INTERPRET=1), "torch" (F.conv1d path) or
    "auto" (AUTO_IMPL on CUDA, the torch path elsewhere). Returns (batch, D, L) in x's dtype.

    channel_last=True: x is (batch, L, D) (as a projection's output slices it) and so is the
    result. The transposes then happen inside the autograd Function, out of torch.compile's
    sight: when the model passed ``x.transpose(1, 2)`` itself, the compiled graph ended in that
    transposed view and AOTAutograd made the gradient coming back through it contiguous in
    (batch, D, L): a transposing copy per layer (5.1 ms of a Mamba-2 training step on the H100,
    16K tokens, 24 layers; results/h100/session6).
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl: expected 'auto', 'triton' or 'torch', got {impl!r}")
    if channel_last:
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"x: expected (batch, L, D) with channel_last=True, got {getattr(x, 'shape', type(x))}")
        x = x.transpose(1, 2)  # (batch, D, L) view
    weight = _check(x, weight, bias, activation, seq_idx)
    if impl == "auto":
        impl = AUTO_IMPL if x.is_cuda else "torch"
    if impl == "torch":
        out = causal_conv1d_ref(x, weight, bias, activation, seq_idx)  # (batch, D, L)
        return out.transpose(1, 2) if channel_last else out
    if not (x.is_cuda or interpreting()):
        raise ValueError("impl: 'triton' needs CUDA tensors or TRITON_INTERPRET=1")
    if channel_last:
        return _CausalConv1dChannelLastFn.apply(x.transpose(1, 2), weight, bias, activation in ("silu", "swish"), seq_idx)
    return CausalConv1dFn.apply(x, weight, bias, activation in ("silu", "swish"), seq_idx)


class _CausalConv1dChannelLastFn(torch.autograd.Function):
    """CausalConv1dFn on a (batch, L, D) tensor: the same kernels through transposed views."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu, seq_idx):
        out = CausalConv1dFn.forward(ctx, x.transpose(1, 2), weight, bias, silu, seq_idx)  # (batch, D, L)
        return out.transpose(1, 2)  # (batch, L, D); contiguous when x's rows are

    @staticmethod
    def backward(ctx, dout):
        dx, dw, db, _, _ = CausalConv1dFn.backward(ctx, dout.transpose(1, 2))
        return dx.transpose(1, 2), dw, db, None, None


@triton.jit
def _conv_update_kernel(x_ptr, state_ptr, w_ptr, b_ptr, out_ptr, C_DIM,
                        stride_xb, stride_sb, stride_sc, stride_ob,
                        W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr):
    """One decoding step of the conv for BLOCK channels of one row: out = act(w . [state, x] + b),
    and the state (W-1 inputs, oldest first) shifts left in place. One program owns its channels,
    so the in-place shift has no reader elsewhere."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) channels
    mask = c < C_DIM
    xv = tl.load(x_ptr + b * stride_xb + c, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
    acc = xv * tl.load(w_ptr + c * W + (W - 1), mask=mask, other=0.0).to(tl.float32)
    srow = state_ptr + b * stride_sb + c * stride_sc  # (BLOCK,) pointers to each channel's inputs
    for k in tl.static_range(W - 1):  # oldest first
        sk = tl.load(srow + k, mask=mask, other=0.0)
        acc += sk.to(tl.float32) * tl.load(w_ptr + c * W + k, mask=mask, other=0.0).to(tl.float32)
        if k > 0:  # shift left: input k moves to slot k - 1
            tl.store(srow + (k - 1), sk, mask=mask)
    tl.store(srow + (W - 2), xv.to(state_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + b * stride_ob + c, acc.to(out_ptr.dtype.element_ty), mask=mask)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, impl="torch"):
    """One decoding step; shifts ``conv_state`` in place.

    x: (batch, D) the new input. conv_state holds the previous inputs, oldest first, either
    (batch, D, W-1) — exactly the W-1 past inputs the next output needs — or (batch, D, W) as in
    mamba_ssm / causal-conv1d (the window *including* the newest input after the update). Both
    end holding the most recent inputs. Returns out (batch, D) in x's dtype, equal to the last
    position of :func:`causal_conv1d` over the same history.

    impl "torch" (default): plain PyTorch, about eight small kernels. "triton": one kernel (the
    decode steps of both Mamba mixers on the GPU); "auto": the kernel on CUDA. The kernel takes the (batch, D, W-1) state with a unit
    last stride, and x with any row stride (a slice of a projection) and a unit column stride.
    """
    if x.dim() != 2:
        raise ValueError(f"x: expected (batch, D), got shape {tuple(x.shape)}")
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0]
    if weight.dim() != 2 or weight.shape[0] != x.shape[1] or not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"weight: expected (D, W) with W in 2..4, got shape {tuple(weight.shape)}")
    W = weight.shape[1]
    if conv_state.dim() != 3 or conv_state.shape[:2] != x.shape or conv_state.shape[2] not in (W - 1, W):
        raise ValueError(f"conv_state: expected (batch, D, {W - 1}) or (batch, D, {W}), got {tuple(conv_state.shape)}")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation: expected None or 'silu', got {activation!r}")
    if impl == "auto":  # as causal_conv1d's auto: the kernel on CUDA (for the state it takes)
        impl = "triton" if x.is_cuda and conv_state.shape[2] == W - 1 and x.dtype != torch.float64 else "torch"
    if impl == "triton":
        if conv_state.shape[2] != W - 1 or conv_state.stride(2) != 1 or x.stride(1) != 1:
            raise ValueError(f"conv_state: the Triton step takes (batch, D, {W - 1}) with unit last strides "
                             f"(x too), got {tuple(conv_state.shape)}")
        batch, dim = x.shape
        weight = weight.contiguous()
        out = torch.empty(batch, dim, device=x.device, dtype=x.dtype)  # (batch, D)
        BLOCK = 256
        _conv_update_kernel[(batch, triton.cdiv(dim, BLOCK))](
            x, conv_state, weight, bias if bias is not None else weight, out, dim,
            x.stride(0), conv_state.stride(0), conv_state.stride(1), out.stride(0),
            W=W, HAS_BIAS=bias is not None, SILU=activation is not None, BLOCK=BLOCK)
        return out
    if impl != "torch":
        raise ValueError(f"impl: expected 'torch', 'triton' or 'auto', got {impl!r}")
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    window = torch.cat([conv_state[:, :, conv_state.shape[2] - (W - 1):].to(cdt), x.to(cdt)[:, :, None]], dim=-1)  # (batch, D, W)
    out = (window * weight.to(cdt)).sum(-1)  # (batch, D)
    if bias is not None:
        out = out + bias.to(cdt)
    if activation in ("silu", "swish"):
        out = F.silu(out)
    keep = conv_state.shape[2]
    conv_state.copy_(window[:, :, W - keep:].to(conv_state.dtype))
    return out.to(x.dtype)
