"""Mamba-2's decoding step in two Triton kernels: the conv update, then the SSD state update.

The plain-PyTorch step (``causal_conv1d_update`` then ``ssd_step``) launches about 25 small
kernels per layer (cat, multiply, sum, silu, copy; softplus, exp, repeat, the state update, an
einsum, the skip). In a 1.3B model's decode step, replayed from a CUDA graph, those launches cost
more than reading the weights: 6.16 ms against a 0.91 ms weight-read floor at batch 1
(results/h100/generate/README.md). Here the same step is two launches:

1. the conv's step (``causal_conv1d_update(impl="triton")``, kernels/causal_conv1d.py): per
   channel c of xBC, out = silu(w . [conv_state[c, :], x[c]] + b); conv_state shifts left in place.
2. ``_ssd_step``: per (batch, head h, block of P rows): dt = clamp(softplus(dt_raw + dt_bias));
   a = exp(dt * A), A = -exp(A_log); state (P, N) <- a * state + dt * x B^T;
   y = state C + D x. B and C are read from the group of head h (head structure: x has Hx heads,
   B Gb groups, C Gc groups; head h reads x head h // (H / Hx), and so on, as ``expand_heads``).

The conv output goes through memory between the two (conv_dim values a row): B and C are shared
by every head of a group, and a single kernel would have to update their conv state from one
program while others still read it. The gated norm and the projections stay as they are.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .causal_conv1d import causal_conv1d_update
from .mamba2_fused import Dims
from .triton_util import softplus

STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _ssd_step(xbc_ptr, dt_ptr, state_ptr, alog_ptr, d_ptr, dtb_ptr, y_ptr,
              P, N, B_OFF, C_OFF, DT_LO, DT_HI,
              stride_xbc, stride_dtb, stride_sb, stride_sh, stride_sp, stride_yb,
              H_PER_X: tl.constexpr, H_PER_B: tl.constexpr, H_PER_C: tl.constexpr,
              HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
              BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mp, mn = p < P, n < N
    row = xbc_ptr + b * stride_xbc
    dt = tl.load(dt_ptr + b * stride_dtb + h).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dtb_ptr + h).to(tl.float32)
    dt = softplus(dt)
    dt = tl.minimum(tl.maximum(dt, DT_LO), DT_HI)
    a = tl.exp(-tl.exp(tl.load(alog_ptr + h).to(tl.float32)) * dt)  # exp(dt A), A = -exp(A_log)
    x = tl.load(row + (h // H_PER_X) * P + p, mask=mp, other=0.0).to(tl.float32)  # (BLOCK_P,)
    Bv = tl.load(row + B_OFF + (h // H_PER_B) * N + n, mask=mn, other=0.0).to(tl.float32)  # (BLOCK_N,)
    Cv = tl.load(row + C_OFF + (h // H_PER_C) * N + n, mask=mn, other=0.0).to(tl.float32)  # (BLOCK_N,)
    sp = state_ptr + b * stride_sb + h * stride_sh + p[:, None] * stride_sp + n[None, :]  # (BLOCK_P, BLOCK_N)
    m2 = mp[:, None] & mn[None, :]
    s = tl.load(sp, mask=m2, other=0.0).to(tl.float32)  # (BLOCK_P, BLOCK_N), stored in any float dtype
    s = a * s + (dt * x)[:, None] * Bv[None, :]
    tl.store(sp, s.to(state_ptr.dtype.element_ty), mask=m2)  # y below reads the unrounded update
    y = tl.sum(s * Cv[None, :], axis=1)  # (BLOCK_P,)
    if HAS_D:
        y += tl.load(d_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + b * stride_yb + h * P + p, y.to(y_ptr.dtype.element_ty), mask=mp)


def mamba2_decode_step(xBC: torch.Tensor, dt: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor,
                       conv_bias: torch.Tensor | None, ssm_state: torch.Tensor, A_log: torch.Tensor,
                       D: torch.Tensor | None, dt_bias: torch.Tensor | None, dims: Dims,
                       dt_limit: tuple[float, float] = (0.0, float("inf"))) -> torch.Tensor:
    """One decoding step of Mamba-2's mixer between its projections.

    xBC (batch, conv_dim) and dt (batch, H): slices of in_proj's output (any row stride, unit
    column stride), before the conv and before dt's bias and softplus. conv_state (batch,
    conv_dim, W-1), oldest input first, and ssm_state (batch, H, P, N) advance in place; the
    state is updated in fp32 and stored in its own dtype (float32, or bfloat16/float16 to halve
    its memory traffic at large batch, as mamba_ssm's inference cache keeps it).
    conv_weight (conv_dim, 1, W) or (conv_dim, W), W in 2..4; A_log, D, dt_bias (H,).
    Returns y (batch, H * P) = the SSD output plus D x, in xBC's dtype (the gate is the norm's).
    Equals ``causal_conv1d_update(..., activation="silu")`` then ``ssd_step(..., dt_softplus=True)``.
    """
    batch, conv_dim = xBC.shape
    H, P, N = dims.H, dims.P, dims.N
    if conv_dim != dims.conv_dim:
        raise ValueError(f"xBC: expected (batch, {dims.conv_dim}) for {dims}, got {tuple(xBC.shape)}")
    if ssm_state.shape != (batch, H, P, N) or ssm_state.dtype not in STATE_DTYPES or ssm_state.stride(3) != 1:
        raise ValueError(f"ssm_state: expected float32/bfloat16/float16 (batch, {H}, {P}, {N}), got {ssm_state.dtype} "
                         f"{tuple(ssm_state.shape)}")
    if dt.shape != (batch, H) or xBC.stride(1) != 1 or dt.stride(1) != 1:
        raise ValueError(f"dt: expected (batch, {H}) and unit column strides, got {tuple(dt.shape)}")
    if D is not None and D.shape != (H,):
        raise ValueError(f"D: expected ({H},), got {tuple(D.shape)}")
    # (the conv's weight and state are checked there)
    xa = causal_conv1d_update(xBC, conv_state, conv_weight, conv_bias, activation="silu", impl="triton")  # (batch, conv_dim)
    y = torch.empty(batch, H * P, device=xBC.device, dtype=xBC.dtype)  # (batch, H * P)
    BLOCK_N = triton.next_power_of_2(N)
    # P rows per program: enough programs to fill the GPU at batch 1 (H * P / 16 of them), a tile
    # of 16 x N states per program (2,048 at N=128: 16 registers a thread at 4 warps)
    BLOCK_P = min(16, triton.next_power_of_2(P))
    _ssd_step[(batch, H, triton.cdiv(P, BLOCK_P))](
        xa, dt, ssm_state, A_log, D if D is not None else A_log, dt_bias if dt_bias is not None else A_log, y,
        P, N, dims.Hx * P, dims.Hx * P + dims.Gb * N, float(dt_limit[0]), float(dt_limit[1]),
        xa.stride(0), dt.stride(0), ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), y.stride(0),
        H_PER_X=H // dims.Hx, H_PER_B=H // dims.Gb, H_PER_C=H // dims.Gc,
        HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N)
    return y


__all__ = ["mamba2_decode_step"]
