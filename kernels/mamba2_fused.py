"""Mamba-2's inner path, conv -> SSD -> gated RMSNorm, as one autograd Function.

    y = mamba2_inner(proj, conv_weight, conv_bias, A, D, dt_bias, norm_weight, dims, ...)

proj (batch, L, d_inner + conv_dim + H [+ pad]) is the block's in_proj output
[z | x B C | dt]. As three Functions (causal_conv1d, ssd_chunked, gated_rms_norm) on slices
of proj, autograd receives a gradient per slice and concatenates them twice: dx, dB, dC into
d(xBC), then dz, d(xBC), ddt into d(proj). Those two copies move ~170 MB per layer, 2.6 ms of
a 67 ms Mamba-2 training step at 125M on an H100 (results/h100/session7). Here the backward
allocates d(proj) and d(xBC) once and each kernel writes its piece in place: the norm's dz
and the conv's dx into d(proj), the SSD's dx into d(xBC) (its dB, dC and ddt, which the
kernels accumulate in fp32 or lay out per head, are copied into their slices: small).

The kernels are the same ones (kernels/causal_conv1d.py, ssd_triton.py, gated_rmsnorm.py);
the unfused composition in ``ssdbench.models.mamba2`` is the reference the tests compare
against. CUDA tensors, or CPU ones under TRITON_INTERPRET=1.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import gated_rmsnorm as gr
from .causal_conv1d import _check as _check_conv
from .causal_conv1d import conv_bwd, conv_fwd
from .ssd import validate
from .ssd_triton import ssd_backward, ssd_forward


class Dims(NamedTuple):
    """Widths of proj's pieces: z and y have d_inner = H * P channels; x has Hx heads of P,
    B and C Gb and Gc groups of N; dt H."""
    d_inner: int
    Hx: int
    P: int
    Gb: int
    Gc: int
    N: int
    H: int

    @property
    def conv_dim(self) -> int:
        return self.Hx * self.P + (self.Gb + self.Gc) * self.N

    @property
    def width(self) -> int:
        """Columns of [z | x B C | dt]: proj may be wider (padding columns, never read)."""
        return self.d_inner + self.conv_dim + self.H


def _pieces(t: torch.Tensor, dims: Dims):
    """z, xBC, dt views of a (batch, L, width) projection (or of its gradient)."""
    d, c = dims.d_inner, dims.conv_dim
    return t[..., :d], t[..., d:d + c], t[..., d + c:dims.width]


def _xbc(t: torch.Tensor, dims: Dims):
    """x (batch, L, Hx, P), B (batch, L, Gb, N), C (batch, L, Gc, N) views of a (batch, L, conv_dim) tensor."""
    batch, L, _ = t.shape
    x, B, C = torch.split(t, [dims.Hx * dims.P, dims.Gb * dims.N, dims.Gc * dims.N], dim=-1)
    return (x.view(batch, L, dims.Hx, dims.P), B.view(batch, L, dims.Gb, dims.N),
            C.view(batch, L, dims.Gc, dims.N))


class _Mamba2Inner(torch.autograd.Function):

    @staticmethod
    def forward(ctx, proj, conv_w, conv_b, A, D, dt_bias, norm_w, dims, chunk, dt_limit, eps, group, seq_idx):
        batch, L, _ = proj.shape
        z, xBC, dt = _pieces(proj, dims)  # (batch, L, d_inner), (batch, L, conv_dim), (batch, L, H)
        xa = conv_fwd(xBC.transpose(1, 2), conv_w, conv_b, True, seq_idx).transpose(1, 2)  # (batch, L, conv_dim)
        x, B, C = _xbc(xa, dims)
        y, _, (dtp, cs, states, _, cb) = ssd_forward(
            x, dt, A, B, C, chunk, D, None, dt_bias, True, dt_limit, None, seq_idx, need_ypre=False)  # y (batch, L, H, P)
        y2 = y.view(batch * L, dims.d_inner)  # (rows, d_inner)
        out, rstd = gr._fwd(y2, gr._rows2d(z, dims.d_inner), norm_w, eps, group)  # (rows, d_inner)
        ctx.save_for_backward(proj, conv_w, conv_b, A, D, dt_bias, norm_w, seq_idx, xa, y2, rstd,
                              dtp, cs, states, cb)
        ctx.opts = (dims, chunk, dt_limit, group)
        return out.view(batch, L, dims.d_inner)

    @staticmethod
    def backward(ctx, dout):
        proj, conv_w, conv_b, A, D, dt_bias, norm_w, seq_idx, xa, y2, rstd, dtp, cs, states, cb = ctx.saved_tensors
        dims, chunk, dt_limit, group = ctx.opts
        batch, L, _ = proj.shape
        z, xBC, dt = _pieces(proj, dims)
        dproj = torch.empty_like(proj)  # (batch, L, width + pad)
        if proj.shape[-1] > dims.width:
            dproj[..., dims.width:].zero_()  # padding columns (never read) get zero gradient
        dz, dxBC_in, ddt = _pieces(dproj, dims)
        # norm: dy into a fresh buffer, dz into d(proj)
        dy, _, dnorm_w = gr._bwd(y2, gr._rows2d(z, dims.d_inner), norm_w, rstd, dout, group,
                                 dz=gr._rows2d(dz, dims.d_inner))  # dy (rows, d_inner)
        # SSD: dx, dB, dC into one d(xBC) buffer, ddt into d(proj)
        dxa = torch.empty_like(xa)  # (batch, L, conv_dim) gradient of the conv's output
        x, B, C = _xbc(xa, dims)
        _, _, dA, _, _, dD, _, ddb, _ = ssd_backward(
            dy.view(batch, L, dims.H, dims.P), None, x, dt, A, B, C, chunk, D, None, dt_bias, True, dt_limit,
            None, seq_idx, dtp, cs, states, None, cb, out=(*_xbc(dxa, dims)[:1], ddt, *_xbc(dxa, dims)[1:]))
        # conv: its input gradient straight into d(proj)
        _, dcw, dcb = conv_bwd(xBC.transpose(1, 2), conv_w, conv_b, seq_idx, True, dxa.transpose(1, 2),
                               dx=dxBC_in.transpose(1, 2))
        return (dproj, dcw, dcb, dA.to(A.dtype), None if D is None else dD.to(D.dtype),
                None if dt_bias is None else ddb.to(dt_bias.dtype), dnorm_w,
                None, None, None, None, None, None)


def mamba2_inner(proj, conv_weight, conv_bias, A, D, dt_bias, norm_weight, dims: Dims, chunk_size: int,
                 dt_limit=(0.0, float("inf")), eps: float = 1e-5, group_size: int | None = None, seq_idx=None):
    """norm(SSD(silu(conv(xBC))) * silu(z)) for proj = [z | xBC | dt (| padding)] (batch, L, width).

    conv_weight (conv_dim, W) or nn.Conv1d's (conv_dim, 1, W); conv_bias (conv_dim,) or None;
    A (H,) (negative); D (H,) or (H, P) or None; dt_bias (H,) (dt_softplus always, as the
    Mamba-2 block uses it); norm_weight (d_inner,); group_size: the norm's group (None: all of
    d_inner); seq_idx (batch, L) marks packed sequences (conv taps and the state reset at its
    changes). Returns (batch, L, d_inner) in proj's dtype."""
    if proj.dim() != 3 or proj.shape[-1] < dims.width:
        raise ValueError(f"proj: expected (batch, L, >= {dims.width}), "
                         f"got {tuple(proj.shape)}")
    if dims.H * dims.P != dims.d_inner:
        raise ValueError(f"dims: H * P = {dims.H * dims.P} differs from d_inner = {dims.d_inner}")
    proj = proj.contiguous()
    _, xBC, dt = _pieces(proj, dims)
    conv_weight = _check_conv(xBC.transpose(1, 2), conv_weight, conv_bias, "silu", seq_idx)  # (conv_dim, W)
    x, B, C = _xbc(xBC, dims)
    validate(x, dt, A, B, C, chunk_size, D, None, dt_bias, dt_limit, None, seq_idx)
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32)
    group = dims.d_inner if group_size is None else group_size
    return _Mamba2Inner.apply(proj, conv_weight, conv_bias, A.contiguous(), D, dt_bias, norm_weight, dims,
                              max(int(chunk_size), 16), (float(dt_limit[0]), float(dt_limit[1])), float(eps),
                              group, seq_idx)
