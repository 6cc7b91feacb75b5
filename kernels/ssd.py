"""Chunked SSD (Mamba-2 structured state-space duality) scan: public entry points.

    from ssdbench.kernels.ssd import ssd_chunked, ssd_chunked_ref, ssd_sequential_ref, ssd_step

``ssd_chunked`` has the names and meaning of mamba_ssm's ``mamba_chunk_scan_combined``.
Per head h, with a_t = exp(dt_t A_h):

    h_t = a_t h_{t-1} + dt_t x_t B_t^T        (state P x N)
    y_t = h_t C_t + D x_t;   y_t *= silu(z_t)  (if z is given)

Shapes: x (batch, L, Hx, P); dt (batch, L, H); A (H,); B (batch, L, Gb, N);
C (batch, L, Gc, N); D (H,) or (H, P); z (batch, L, H, P); dt_bias (H,);
initial_states (batch, H, P, N); seq_idx (batch, L) integer. Returns y (batch, L, H, P) in
x's dtype and, with ``return_final_states``, the state after the last token of each row
(batch, H, P, N) float32.

dt processing: dt <- dt + dt_bias; softplus if dt_softplus; clamp to dt_limit (as in
mamba_ssm, the clamp is applied only when dt_limit is not the default (0, inf); its gradient
is zero where it clamps).

Head structures (Mamba-2 §7) without copies: H comes from dt and A; x, B and C carry their
own group counts Hx, Gb, Gc (each divides H) and head h reads group h // (H // G). Gradients
of a shared tensor are summed over the heads that read it.

    pattern (paper name)                        Hx   Gb   Gc
    multi-value / multi-input SSM (Mamba's)     H    1    1
    multi-query / multi-contract SSM            1    1    H
    multi-key / multi-expand SSM                1    H    1
    multi-head SSM                              H    H    H
    grouped-value (GVA, ``ngroups`` = g)        H    g    g

Variable length (§8.3): ``seq_idx`` must be non-decreasing along each row; the state is reset
where it changes (the same as a_t = 0 at the first token of a sequence), so no token sees an
earlier sequence. ``initial_states`` is the state before token 0 and therefore reaches only
the first sequence of the row (mamba_ssm applies it to the tokens whose seq_idx is 0, which is
the same whenever rows start at 0). The final state is that of the row's last sequence.

Dispatch: the Triton kernels (``ssd_triton.py``) run when the tensors are on CUDA or
TRITON_INTERPRET=1 (float64 inputs always take the reference); otherwise the plain-PyTorch
chunked reference runs, with autograd. chunk_size (Q) must be a power of two; it changes
the work split, not the function (the Triton path uses at least 16).
"""
from __future__ import annotations

import math

import torch

from .ssd_reference import ssd_chunked_ref, ssd_sequential_ref, ssd_step
from .triton_util import check_seq_idx_order, interpreting

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def use_triton(x: torch.Tensor) -> bool:
    """Whether ssd_chunked runs the Triton kernels on x (else the PyTorch reference)."""
    if x.dtype == torch.float64:
        return False
    return x.is_cuda or interpreting()


def _check(name, t, dims, floating=True, shape=None):
    """ValueError naming ``name`` unless t is a tensor with ``dims`` dimensions (and ``shape``)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dimensions, got shape {tuple(t.shape)}")
    if floating and t.dtype not in _FLOATS:
        raise ValueError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def validate(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
             dt_limit=(0.0, float("inf")), initial_states=None, seq_idx=None):
    """Raise ValueError (naming the argument) unless the inputs describe a valid SSD call."""
    _check("x", x, 4)
    _check("dt", dt, 3)
    _check("A", A, 1)
    _check("B", B, 4)
    _check("C", C, 4)
    batch, L, Hx, P = x.shape
    H = dt.shape[2]
    if batch < 1 or L < 1 or P < 1:
        raise ValueError(f"x: empty shape {tuple(x.shape)}")
    if tuple(dt.shape[:2]) != (batch, L) or H < 1:
        raise ValueError(f"dt: shape {tuple(dt.shape)} does not match x {tuple(x.shape)}")
    if tuple(A.shape) != (H,):
        raise ValueError(f"A: expected shape ({H},) (H from dt), got {tuple(A.shape)}")
    N = B.shape[3]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape[:2]) != (batch, L) or t.shape[3] != N or N < 1 or t.shape[2] < 1:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match (batch={batch}, L={L}, G, N={N})")
    for name, G in (("x", Hx), ("B", B.shape[2]), ("C", C.shape[2])):
        if G < 1 or H % G:
            raise ValueError(f"{name}: its group count {G} does not divide the number of heads H={H}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1 \
            or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: must be a positive power of two, got {chunk_size!r}")
    if D is not None:
        if not isinstance(D, torch.Tensor) or D.dtype not in _FLOATS:
            raise ValueError("D: expected a float tensor of shape (H,) or (H, P)")
        if tuple(D.shape) not in ((H,), (H, P)):
            raise ValueError(f"D: expected shape ({H},) or ({H}, {P}), got {tuple(D.shape)}")
    if z is not None:
        _check("z", z, 4, shape=(batch, L, H, P))
    if dt_bias is not None:
        _check("dt_bias", dt_bias, 1, shape=(H,))
    try:
        lo, hi = (float(v) for v in dt_limit)
    except Exception:
        raise ValueError(f"dt_limit: expected a pair of numbers, got {dt_limit!r}") from None
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"dt_limit: expected lo <= hi, got {dt_limit!r}")
    if initial_states is not None:
        _check("initial_states", initial_states, 4, shape=(batch, H, P, N))
    if seq_idx is not None:
        if not isinstance(seq_idx, torch.Tensor) or seq_idx.dim() != 2:
            raise ValueError("seq_idx: expected a (batch, L) integer tensor")
        if seq_idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"seq_idx: expected int32 or int64, got {seq_idx.dtype}")
        if tuple(seq_idx.shape) != (batch, L):
            raise ValueError(f"seq_idx: expected shape {(batch, L)}, got {tuple(seq_idx.shape)}")
        check_seq_idx_order(seq_idx)
    for name, t in (("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("dt_bias", dt_bias), ("initial_states", initial_states), ("seq_idx", seq_idx)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, but x is on {x.device}")


class _SSDChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, Q, dt_softplus,
                dt_limit, return_final_states):
        from .ssd_triton import ssd_forward

        need_grad = any(ctx.needs_input_grad)
        out, final, (dtp, cs, states, ypre, cb) = ssd_forward(
            x, dt, A, B, C, Q, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx,
            need_ypre=need_grad and z is not None)
        if need_grad:
            ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx,
                                  dtp, cs, states, ypre, cb)
        ctx.opts = (Q, dt_softplus, dt_limit, return_final_states)
        if return_final_states:
            return out, final
        return out

    @staticmethod
    def backward(ctx, dout, dfinal=None):
        from .ssd_triton import ssd_backward

        x, dt, A, B, C, D, z, dt_bias, h0, seq_idx, dtp, cs, states, ypre, cb = ctx.saved_tensors
        Q, dt_softplus, dt_limit, _ = ctx.opts
        if dfinal is not None:
            dfinal = dfinal.float().contiguous()  # (batch, H, P, N)
        dx, ddt, dA, dB, dC, dD, dz, ddb, dh0 = ssd_backward(
            dout, dfinal, x, dt, A, B, C, Q, D, z, dt_bias, dt_softplus, dt_limit, h0,
            seq_idx, dtp, cs, states, ypre, cb)
        return (dx, ddt, dA.to(A.dtype), dB, dC,
                None if D is None else dD.to(D.dtype), dz,
                None if dt_bias is None else ddb.to(dt_bias.dtype),
                None if h0 is None else dh0.to(h0.dtype),
                None, None, None, None, None)


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                dt_limit=(0.0, float("inf")), initial_states=None, seq_idx=None,
                return_final_states=False):
    """Chunked SSD scan (see the module docstring). Returns y, or (y, final_states)."""
    validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, initial_states, seq_idx)
    if not use_triton(x):
        return ssd_chunked_ref(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                               dt_softplus=dt_softplus, dt_limit=dt_limit,
                               initial_states=initial_states, seq_idx=seq_idx,
                               return_final_states=return_final_states)
    Q = max(int(chunk_size), 16)  # tl.dot needs tiles of at least 16
    A = A.contiguous()  # (H,) read by index
    if dt_bias is not None:
        dt_bias = dt_bias.contiguous()  # (H,)
    return _SSDChunked.apply(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, Q,
                             bool(dt_softplus), (float(dt_limit[0]), float(dt_limit[1])),
                             bool(return_final_states))


__all__ = ["ssd_chunked", "ssd_chunked_ref", "ssd_sequential_ref", "ssd_step", "validate"]
