"""Fused gated RMSNorm (Mamba-2's output norm), Triton forward and backward.

For a row x of width d, gate z, weight w and group size g (dividing d):
    v = x * silu(z);  per group of g channels rstd = 1 / sqrt(mean(v^2) + eps);  out = v * rstd * w
all in fp32, out in x's dtype (what ``ssdbench.models.layers.GatedRMSNorm`` computes in PyTorch).

The forward reads x and z once and writes out plus rstd (fp32, one per row and group). The
backward recomputes v from x and z (cheaper than saving it) and writes dx, dz and per-program
fp32 partial sums of dout * v * rstd, summed in PyTorch: deterministic, no atomics. A row tile
is held as (rows, groups, channels) so each group's reductions are a sum over the last axis;
group size d gives (rows, 1, next_pow2(d)).
float64 inputs, and CPU tensors unless TRITON_INTERPRET=1, go to ``gated_rms_norm_ref``.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

from .triton_util import interpreting, pow2_factor

_MAX_WIDTH = 32768  # wider rows would not fit in registers: the PyTorch path takes them


@triton.jit
def _tile_offsets(G: tl.constexpr, NG: tl.constexpr, BLOCK_NG: tl.constexpr, BLOCK_G: tl.constexpr):
    """Channel index and mask of the (BLOCK_NG, BLOCK_G) group x channel layout of a row."""
    gi = tl.arange(0, BLOCK_NG)  # (BLOCK_NG,)
    ci = tl.arange(0, BLOCK_G)  # (BLOCK_G,)
    cols = gi[:, None] * G + ci[None, :]  # (BLOCK_NG, BLOCK_G)
    cmask = (gi[:, None] < NG) & (ci[None, :] < G)  # (BLOCK_NG, BLOCK_G)
    return gi, cols, cmask


@triton.jit
def _gated_rmsnorm_fwd_kernel(x_ptr, z_ptr, w_ptr, o_ptr, rstd_ptr, n_rows, s_x, s_z, s_o, eps,
                              G: tl.constexpr, NG: tl.constexpr, BLOCK_R: tl.constexpr,
                              BLOCK_NG: tl.constexpr, BLOCK_G: tl.constexpr, RV: tl.constexpr):
    s_x, s_z, s_o = s_x * RV, s_z * RV, s_o * RV  # row strides passed divided by RV (pow2_factor)
    gi, cols, cmask = _tile_offsets(G, NG, BLOCK_NG, BLOCK_G)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    r = rows.to(tl.int64)[:, None, None]  # (BLOCK_R, 1, 1); int64: rows * stride may pass 2^31
    mask = (rows < n_rows)[:, None, None] & cmask[None, :, :]  # (BLOCK_R, BLOCK_NG, BLOCK_G)
    x = tl.load(x_ptr + r * s_x + cols[None, :, :], mask=mask, other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_NG, BLOCK_G)
    z = tl.load(z_ptr + r * s_z + cols[None, :, :], mask=mask, other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_NG, BLOCK_G)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)  # (BLOCK_NG, BLOCK_G)
    v = x * z * tl.sigmoid(z)  # masked lanes are 0 and add nothing to the sums
    rstd = tl.rsqrt(tl.sum(v * v, axis=2) / G + eps)  # (BLOCK_R, BLOCK_NG)
    out = v * rstd[:, :, None] * w[None, :, :]  # (BLOCK_R, BLOCK_NG, BLOCK_G)
    tl.store(o_ptr + r * s_o + cols[None, :, :], out.to(o_ptr.dtype.element_ty), mask=mask)
    rmask = (rows < n_rows)[:, None] & (gi < NG)[None, :]  # (BLOCK_R, BLOCK_NG)
    tl.store(rstd_ptr + rows.to(tl.int64)[:, None] * NG + gi[None, :], rstd, mask=rmask)


@triton.jit
def _gated_rmsnorm_bwd_kernel(x_ptr, z_ptr, w_ptr, do_ptr, rstd_ptr, dx_ptr, dz_ptr, dw_ptr,
                              n_rows, tiles_per_prog, s_x, s_z, s_do, s_dx, s_dz,
                              G: tl.constexpr, NG: tl.constexpr, BLOCK_R: tl.constexpr,
                              BLOCK_NG: tl.constexpr, BLOCK_G: tl.constexpr, RV: tl.constexpr):
    # row strides passed divided by RV (pow2_factor)
    s_x, s_z, s_do, s_dx, s_dz = s_x * RV, s_z * RV, s_do * RV, s_dx * RV, s_dz * RV
    gi, cols, cmask = _tile_offsets(G, NG, BLOCK_NG, BLOCK_G)
    pid = tl.program_id(0)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)  # (BLOCK_NG, BLOCK_G)
    dw_acc = tl.zeros([BLOCK_NG, BLOCK_G], dtype=tl.float32)  # this program's share of dweight
    for i in range(tiles_per_prog):  # several row tiles per program: fewer dweight partials
        rows = (pid * tiles_per_prog + i) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        r = rows.to(tl.int64)[:, None, None]  # (BLOCK_R, 1, 1)
        mask = (rows < n_rows)[:, None, None] & cmask[None, :, :]  # (BLOCK_R, BLOCK_NG, BLOCK_G)
        x = tl.load(x_ptr + r * s_x + cols[None, :, :], mask=mask, other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_NG, BLOCK_G)
        z = tl.load(z_ptr + r * s_z + cols[None, :, :], mask=mask, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + r * s_do + cols[None, :, :], mask=mask, other=0.0).to(tl.float32)
        rmask = (rows < n_rows)[:, None] & (gi < NG)[None, :]  # (BLOCK_R, BLOCK_NG)
        rstd = tl.load(rstd_ptr + rows.to(tl.int64)[:, None] * NG + gi[None, :], mask=rmask, other=0.0)
        sig = tl.sigmoid(z)
        silu = z * sig
        u = x * silu * rstd[:, :, None]  # normalised v; 0 on masked lanes and rows
        gw = do * w[None, :, :]  # (BLOCK_R, BLOCK_NG, BLOCK_G)
        mean_gu = tl.sum(gw * u, axis=2) / G  # (BLOCK_R, BLOCK_NG)
        dv = rstd[:, :, None] * (gw - u * mean_gu[:, :, None])  # (BLOCK_R, BLOCK_NG, BLOCK_G)
        dx = dv * silu
        dz = dv * x * sig * (1.0 + z * (1.0 - sig))  # d silu(z)/dz = sig * (1 + z (1 - sig))
        tl.store(dx_ptr + r * s_dx + cols[None, :, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptr + r * s_dz + cols[None, :, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(do * u, axis=0)  # (BLOCK_NG, BLOCK_G)
    tl.store(dw_ptr + pid.to(tl.int64) * (G * NG) + cols, dw_acc, mask=cmask)


def _check(x, z, weight, eps, group_size) -> int:
    """Validate the arguments; returns the group size."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x: expected a floating-point tensor (..., d), got {getattr(x, 'dtype', type(x))}")
    d = x.shape[-1]
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise ValueError(f"z: expected a floating-point tensor, got {getattr(z, 'dtype', type(z))}")
    if z.shape != x.shape:
        raise ValueError(f"z: shape {tuple(z.shape)} differs from x's {tuple(x.shape)}")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise ValueError(f"weight: expected a floating-point tensor, got {getattr(weight, 'dtype', type(weight))}")
    if weight.shape != (d,):
        raise ValueError(f"weight: expected shape ({d},), got {tuple(weight.shape)}")
    for name, t in (("z", z), ("weight", weight)):
        if t.device != x.device:
            raise ValueError(f"{name}: on device {t.device} but x is on {x.device}")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")
    g = d if group_size is None else group_size
    if not isinstance(g, int) or g < 1 or d % g:
        raise ValueError(f"group_size: expected a positive divisor of d={d}, got {group_size!r}")
    return g


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _rows2d(t: torch.Tensor, d: int) -> torch.Tensor:
    """(rows, d) view of t (a copy only where the leading dims cannot be flattened) with unit
    channel stride; rows may keep a stride > d (a column slice of a wider projection)."""
    t = t.reshape(-1, d)
    return t if t.stride(1) == 1 or d == 1 else t.contiguous()


def _fwd(x2: torch.Tensor, z2: torch.Tensor, weight: torch.Tensor, eps: float, g: int):
    """Forward launch on (rows, d) views: returns out (rows, d) in x's dtype and rstd (rows, groups) fp32."""
    rows, d = x2.shape
    ng = d // g
    out = torch.empty((rows, d), device=x2.device, dtype=x2.dtype)  # (rows, d)
    rstd = torch.empty((rows, ng), device=x2.device, dtype=torch.float32)  # (rows, groups)
    block_r, warps = _config(d, bwd=False)
    if rows:
        strides = (x2.stride(0), z2.stride(0), out.stride(0))
        rv = pow2_factor(*strides)
        _gated_rmsnorm_fwd_kernel[(triton.cdiv(rows, block_r),)](
            x2, z2, weight, out, rstd, rows, *(s // rv for s in strides), float(eps),
            G=g, NG=ng, BLOCK_R=block_r, BLOCK_NG=triton.next_power_of_2(ng),
            BLOCK_G=triton.next_power_of_2(g), RV=rv, num_warps=warps)
    return out, rstd


def _bwd(x2, z2, weight, rstd, dout, g: int, dz=None):
    """Backward launch: dx, dz (rows, d) and dweight (d,) in the inputs' dtypes; dz may be a
    given (rows, d) view with unit column stride (rows of a wider gradient buffer)."""
    rows, d = x2.shape
    ng = d // g
    do2 = _rows2d(dout, d)  # (rows, d)
    dx = torch.empty((rows, d), device=x2.device, dtype=x2.dtype)  # (rows, d)
    if dz is None:
        dz = torch.empty((rows, d), device=x2.device, dtype=z2.dtype)  # (rows, d)
    block_r, warps = _config(d, bwd=True)
    n_tiles = triton.cdiv(rows, block_r)
    # a few programs per SM, each looping over row tiles: dweight partials stay (n_prog, d).
    # 8 per SM: 116 against 126 us for 2 at Mamba-2 130M's shape on the H100, the best of 27
    # choices (results/h100/session7/norm_sweep.txt)
    max_prog = 3 if interpreting() else 8 * _sm_count(x2.device.index)
    tiles_per_prog = max(1, triton.cdiv(n_tiles, max_prog))
    n_prog = triton.cdiv(n_tiles, tiles_per_prog)  # every program gets >= 1 tile
    dw_part = torch.empty((n_prog, d), device=x2.device, dtype=torch.float32)  # (programs, d)
    if rows:
        strides = (x2.stride(0), z2.stride(0), do2.stride(0), dx.stride(0), dz.stride(0))
        rv = pow2_factor(*strides)
        _gated_rmsnorm_bwd_kernel[(n_prog,)](
            x2, z2, weight, do2, rstd, dx, dz, dw_part, rows, tiles_per_prog, *(s // rv for s in strides),
            G=g, NG=ng, BLOCK_R=block_r, BLOCK_NG=triton.next_power_of_2(ng),
            BLOCK_G=triton.next_power_of_2(g), RV=rv, num_warps=warps)
    dw = dw_part.sum(0).to(weight.dtype)  # (d,); zeros when there are no rows
    return dx, dz, dw


# The kernels are registered as custom operators (not an autograd.Function) so that
# torch.compile keeps them inside its graph: no graph break around the norm, and inductor
# schedules them like its own kernels. Inductor's fusion of the PyTorch form
# (gated_rms_norm_ref) took 7.9 ms of a 74 ms Mamba-2 training step on the H100, these
# kernels 4.1 ms (results/h100/session7).
@torch.library.custom_op("ssdbench::gated_rms_norm_fwd", mutates_args=())
def _fwd_op(x2: torch.Tensor, z2: torch.Tensor, weight: torch.Tensor, eps: float, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd(x2, z2, weight, eps, g)


@_fwd_op.register_fake
def _(x2, z2, weight, eps, g):
    rows, d = x2.shape
    return x2.new_empty((rows, d)), x2.new_empty((rows, d // g), dtype=torch.float32)


@torch.library.custom_op("ssdbench::gated_rms_norm_bwd", mutates_args=())
def _bwd_op(x2: torch.Tensor, z2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dout: torch.Tensor,
            g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(x2, z2, weight, rstd, dout, g)


@_bwd_op.register_fake
def _(x2, z2, weight, rstd, dout, g):
    return x2.new_empty(x2.shape), z2.new_empty(z2.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x2, z2, weight, _, g = inputs
    ctx.save_for_backward(x2, z2, weight, output[1])
    ctx.g = g


def _backward(ctx, dout, drstd):
    x2, z2, weight, rstd = ctx.saved_tensors
    dx, dz, dw = _bwd_op(x2, z2, weight, rstd, dout, ctx.g)
    return dx, dz, dw, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _config(d: int, bwd: bool) -> tuple[int, int]:
    """(rows per tile, num_warps) from the row width: tiles of about 4K (forward) or 2K
    (backward, which holds more live values) fp32 elements, 8 warps for rows wider than 2048."""
    if interpreting():
        return 2, 1  # small tiles so tests cross tile boundaries with few rows
    width = triton.next_power_of_2(d)
    return max(1, min(16, (2048 if bwd else 4096) // width)), (4 if width <= 2048 else 8)


@triton.jit
def _rms_norm_rows_kernel(x_ptr, r_ptr, w_ptr, o_ptr, sum_ptr, d, s_x, s_r, s_o, s_sum, eps,
                          HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One row: out = x / sqrt(mean(x^2) + eps) * w, in fp32, stored in out's dtype. With a
    residual r: x <- x + r first, rounded to x's dtype (as PyTorch's x + r) and stored in sum."""
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)  # (BLOCK,)
    m = c < d
    x = tl.load(x_ptr + row * s_x + c, mask=m, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(r_ptr + row * s_r + c, mask=m, other=0.0).to(tl.float32)
        x_rounded = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * s_sum + c, x_rounded, mask=m)
        x = x_rounded.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / d + eps)
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * s_o + c, (x * rstd * w).to(o_ptr.dtype.element_ty), mask=m)


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, residual: torch.Tensor | None = None):
    """The plain (ungated) RMSNorm of ``models.layers.RMSNorm`` as one kernel, forward only:
    x (rows, d) with a unit column stride, weight (d,) -> (rows, d) in x's dtype. For the decode
    step, where the PyTorch form's eight small kernels (casts, square, mean, rsqrt, products)
    are eight launches per norm in the step's graph; training keeps the differentiable form.

    ``residual`` (rows, d), x's dtype: norm the sum s = x + residual instead and return
    (norm(s), s), s rounded to x's dtype as PyTorch's ``x + residual`` is: the decode step's
    residual add folded into the next norm (one launch fewer per add)."""
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != (x.shape[1],):
        raise ValueError(f"x: expected (rows, d) with a unit column stride and weight (d,), got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(1) != 1 or residual.dtype != x.dtype):
        raise ValueError(f"residual: expected {x.dtype} {tuple(x.shape)} with a unit column stride, got "
                         f"{residual.dtype} {tuple(residual.shape)}")
    if x.shape[1] > _MAX_WIDTH:
        raise ValueError(f"d={x.shape[1]}: rows wider than {_MAX_WIDTH} do not fit one program")
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)  # (rows, d)
    total = torch.empty_like(out) if residual is not None else out  # (rows, d) x + residual
    r = residual if residual is not None else x
    BLOCK = triton.next_power_of_2(x.shape[1])
    _rms_norm_rows_kernel[(x.shape[0],)](x, r, weight, out, total, x.shape[1], x.stride(0), r.stride(0),
                                         out.stride(0), total.stride(0), float(eps),
                                         HAS_RESIDUAL=residual is not None, BLOCK=BLOCK,
                                         num_warps=4 if BLOCK <= 2048 else 8)
    return out if residual is None else (out, total)


def gated_rms_norm_ref(x, z, weight, eps=1e-5, group_size=None):
    """Plain-PyTorch gated RMSNorm (differentiable): fp32 math (float64 if any input is
    float64), result in x's dtype."""
    g = _check(x, z, weight, eps, group_size)
    ct = torch.float64 if torch.float64 in (x.dtype, z.dtype, weight.dtype) else torch.float32
    v = (x.to(ct) * F.silu(z.to(ct))).unflatten(-1, (-1, g))  # (..., groups, g)
    v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    return (v.flatten(-2) * weight.to(ct)).to(x.dtype)


def gated_rms_norm(x, z, weight, eps=1e-5, group_size=None):
    """Gated RMSNorm: norm(x * silu(z)) * weight per group of ``group_size`` channels (None: all
    of d). x, z (..., d), rows may be strided; weight (d,). Returns x's shape and dtype."""
    g = _check(x, z, weight, eps, group_size)
    if (torch.float64 in (x.dtype, z.dtype, weight.dtype) or x.shape[-1] > _MAX_WIDTH
            or not (x.is_cuda or interpreting())):
        return gated_rms_norm_ref(x, z, weight, eps, g)
    d = x.shape[-1]
    out, _ = _fwd_op(_rows2d(x, d), _rows2d(z, d), weight, float(eps), g)  # (rows, d)
    return out.view(x.shape)
