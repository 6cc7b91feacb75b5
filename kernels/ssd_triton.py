"""Triton kernels of the chunked SSD scan (forward and backward) and their launchers.

Layout of the work (Mamba-2 paper §6; symbols: Q chunk, T = min(Q, 64) the tile inside a
chunk, P head dim, N state size, H heads; x, B, C carry their own group counts Hx, Gb, Gc):

forward
  _ssd_dt_fwd      dt -> dt' = clamp(softplus(dt + bias)), chunk-local cumsum cs of dt' A
                   (stored in log2 units, cs log2 e: the chunk kernels' decays are 2^(cs_t - cs_s)).
  _ssd_state_fwd   steps (2)+(3): one program per (batch, head, P-tile, N-tile; a head's tiles
                   side by side in launch order) walks the row in T-token tiles with the
                   state in registers, S <- exp(sum dA) S + (dt x)^T B,
                   writing S at every chunk start (the checkpoints) and at the end (final).
  _ssd_chunk_fwd   steps (1)+(4): one program per (batch, chunk, T-tile, head):
                   y = exp(cs) C S_prev^T + sum_{s-tiles <= t} (C B^T o L)(dt x) + D x, gated.
backward (dy = dL/dy before the gate)
  _ssd_gate_bwd    dy = dout silu(z), dz = dout y silu'(z).
  _ssd_state_bwd   reverse walk: dS <- exp(sum dA) dS + (exp(cs) dy)^T C, written at chunk ends.
  _ssd_chunk_bwd_dc  dC (summed over the heads of a C group) and per head dy_t . y_inter_t and
                     the row sums of the fp32 G tiles (below).
  _ssd_chunk_bwd_dx  dx (summed over the heads of an x group), d(dt x) . x, dD partials,
                     and the pieces of the log-decay gradient.
  _ssd_chunk_bwd_db  dB (summed over the heads of a B group) and per head the column sums of
                     the G tiles, B_s . (a head's in-chunk dB).
  _ssd_dt_bwd      d(dA) from the pieces (reverse cumsums inside a chunk), ddt, dA, dt_bias.

The log-decay gradient. Inside a chunk, with cs the cumsum of dA from the chunk start,
dL/d(dA_j) = sum over every term whose decay factor spans j:
   sum_{t>=j, s<j} G_ts (pairs inside the chunk, G_ts = dy_t.(C_t.B_s) dt_s x_s M_ts)
 + sum_{t>=j} dy_t . y_inter_t                    (outputs fed by the previous chunk's state)
 + sum_{s<j} dt_s x_s^T dS_end B_s exp(cs_last - cs_s)   (inputs that reach the chunk end)
 + exp(cs_last) <dS_end, S_prev>                 (the state carried through the chunk).
The first sum is revcumsum_j(rowsum G - colsum G). The row sums are taken over T x T tiles of
G (_ssd_chunk_bwd_dc, from dy x^T and C B^T), the column sums as B_s . sum_t W_ts C_t from
the dB kernel's dot (_ssd_chunk_bwd_db); both use W = (dy.x) M dt formed by the same fp32
operations and rounded alike, so that the pairs inside [j, Q) cancel. No Q x Q matrix is
stored.
C B^T is computed once per chunk for all heads that share it (_ssd_bmm_cb) when B and C
are shared (GH > 1 heads per (B group, C group) pair), else inside the kernels.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .triton_util import autotune, exp2_ftz, exp_ftz

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@triton.jit
def _dot_operand(a, DT: tl.constexpr):
    """a rounded as _dot rounds its operands, returned in fp32 (kernels that must sum the
    same numbers a dot multiplies use it; the interpreter's dot takes it as its operands)."""
    if DT == "bf16" or DT == "bf16emu":
        return a.to(tl.bfloat16).to(tl.float32)
    elif DT == "fp16" or DT == "fp16emu":
        return a.to(tl.float16).to(tl.float32)
    else:
        return a.to(tl.float32)


@triton.jit
def _dot(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    # operands in the input dtype (tensor cores); fp32 inputs (and the interpreter, whose
    # bf16 dot is wrong) use exact fp32 products. PREC is kept for the call sites' sake.
    if DT == "fp32":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DT == "bf16emu" or DT == "fp16emu":  # interpreter: operands rounded as on the GPU, fp32 products
        return tl.dot(_dot_operand(a, DT), _dot_operand(b, DT))
    elif DT == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))


@triton.jit
def _tile_ids(NTB: tl.constexpr, NK, nc):
    """Program -> (tile in chunk, k, chunk, batch) over a 1-D grid of batch * nc * NK * NTB.

    The NTB tiles of a chunk and then the NK programs beside them (heads, or head splits of a
    group) are neighbours in launch order, so the tiles they share (C, B, the fp32 C B^T
    block, the x or dy tiles of one head) are read from L2 by programs running at the same
    time. With heads on a separate grid axis the 32 heads of a chunk ran ~1000 programs apart
    and every one re-read those tiles from DRAM (ncu, H100: the forward chunk kernel moved
    2.6 GB for 0.6 GB of inputs and outputs, at 82 % of DRAM bandwidth)."""
    pid = tl.program_id(0)
    tb = pid % NTB
    k = (pid // NTB) % NK
    c = (pid // NTB // NK) % nc
    b = (pid // NTB // NK // nc).to(tl.int64)
    return tb, k, c, b


@triton.jit
def _state_tile_ids(H, P, N, BP: tl.constexpr, BN: tl.constexpr):
    """Program -> (batch, head, P offsets, N offsets) of a state walk over a 1-D grid of
    batch * H * cdiv(P, BP) * cdiv(N, BN).

    The (P, N) tiles of one (batch, head) are neighbours in launch order, so they walk the row
    at the same time and the x (dy) and B (C) tiles they all read come from L2. With the N
    tiles on the last grid axis they ran batch * H programs apart: at N = 256 (four 64-wide N
    tiles) every tile re-read x from DRAM, and the forward walk took 0.54 ms against 0.16 at
    N = 64 (H100, 65,536 tokens, H = 32, P = 64; session 8)."""
    n_p = tl.cdiv(P, BP)
    n_n = tl.cdiv(N, BN)
    pid = tl.program_id(0)
    tile = pid % (n_p * n_n)
    bh = pid // (n_p * n_n)
    b = (bh // H).to(tl.int64)
    h = bh % H
    p = (tile // n_n) * BP + tl.arange(0, BP)  # (BP,)
    n = (tile % n_n) * BN + tl.arange(0, BN)  # (BN,)
    return b, h, p, n


# ----------------------------------------------------------------------------------------
# dt processing and the chunk-local cumulative log-decay
# ----------------------------------------------------------------------------------------
@triton.jit
def _ssd_dt_fwd(dt_ptr, bias_ptr, A_ptr, dtp_ptr, cs_ptr,
                L, H, s_dt_b, s_dt_l, s_dt_h, lo, hi,
                Q: tl.constexpr, BH: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    h = tl.program_id(2) * BH + tl.arange(0, BH)  # (BH,)
    t = c * Q + tl.arange(0, Q)  # (Q,)
    m = (t < L)[:, None] & (h < H)[None, :]  # (Q, BH)
    v = tl.load(dt_ptr + b * s_dt_b + t[:, None] * s_dt_l + h[None, :] * s_dt_h, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + h, mask=h < H, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        v = tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(v)))
    if HAS_LIMIT:
        v = tl.minimum(tl.maximum(v, lo), hi)
    v = tl.where(m, v, 0.0)  # padded steps: dt' = 0, decay 1, no input
    A = tl.load(A_ptr + h, mask=h < H, other=0.0).to(tl.float32)  # (BH,)
    # cs in log2 units (log2 e folded into A once): the chunk kernels take 2^(cs_t - cs_s)
    # with one subtraction per element of their T x T decay tiles, no multiply
    cs = tl.cumsum(v * (A * 1.4426950408889634)[None, :], axis=0)  # (Q, BH)
    off = (b * H + h[None, :]) * L + t[:, None]  # (Q, BH) into (batch, H, L)
    tl.store(dtp_ptr + off, v, mask=m)
    tl.store(cs_ptr + off, cs, mask=m)


# ----------------------------------------------------------------------------------------
# steps (2) + (3): chunk states and the recurrence over them, one sequential walk per row
# ----------------------------------------------------------------------------------------
@triton.jit
def _ssd_state_fwd(x_ptr, B_ptr, dtp_ptr, A_ptr, seq_ptr, init_ptr, st_ptr, fin_ptr,
                   L, H, P, N, HPX, HPB,
                   sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, ss_b, ss_l,
                   si_b, si_h, si_p, si_n,
                   Q: tl.constexpr, T: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                   HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
                   DT: tl.constexpr, PREC: tl.constexpr):
    b, h, p, n = _state_tile_ids(H, P, N, BP, BN)  # p (BP,), n (BN,)
    pn_mask = (p < P)[:, None] & (n < N)[None, :]  # (BP, BN)
    A = tl.load(A_ptr + h).to(tl.float32)
    if HAS_INIT:
        S = tl.load(init_ptr + b * si_b + h * si_h + p[:, None] * si_p + n[None, :] * si_n,
                    mask=pn_mask, other=0.0).to(tl.float32)  # (BP, BN)
    else:
        S = tl.zeros((BP, BN), dtype=tl.float32)
    x_base = x_ptr + b * sx_b + (h // HPX) * sx_h
    B_base = B_ptr + b * sB_b + (h // HPB) * sB_g
    dt_base = dtp_ptr + (b * H + h) * L
    nc = tl.cdiv(L, Q)
    st_base = st_ptr + ((b * nc) * H + h) * P * N
    st_off = p[:, None] * N + n[None, :]  # (BP, BN)
    if HAS_SEQ:
        seq_prev = tl.load(seq_ptr + b * ss_b)  # the row's first seq carries the initial state
    nblk = tl.cdiv(L, T)
    for blk in range(0, nblk):
        t0 = blk * T
        if t0 % Q == 0:  # checkpoint: the state entering chunk t0 // Q
            tl.store(st_base + (t0 // Q) * H * P * N + st_off, S.to(st_ptr.dtype.element_ty), mask=pn_mask)
        t = t0 + tl.arange(0, T)  # (T,)
        tm = t < L
        dtv = tl.load(dt_base + t, mask=tm, other=0.0)  # (T,)
        cs = tl.cumsum(dtv * A, axis=0)  # (T,)
        total = tl.sum(dtv * A, axis=0)
        w = exp_ftz(total - cs) * dtv  # (T,) decay to the tile end times dt
        decay = exp_ftz(total)
        if HAS_SEQ:
            seq_last = tl.load(seq_ptr + b * ss_b + (tl.minimum(t0 + T, L) - 1) * ss_l)
            sq = tl.load(seq_ptr + b * ss_b + t * ss_l, mask=tm, other=0)
            w = tl.where(sq == seq_last, w, 0.0)  # only the tile's last seq reaches its end
            decay = tl.where(seq_last == seq_prev, decay, 0.0)  # reset inside/at the tile
            seq_prev = seq_last
        xT = tl.load(x_base + t[None, :] * sx_l + p[:, None] * sx_p,
                     mask=tm[None, :] & (p < P)[:, None], other=0.0)  # (BP, T)
        Bt = tl.load(B_base + t[:, None] * sB_l + n[None, :] * sB_n,
                     mask=tm[:, None] & (n < N)[None, :], other=0.0)  # (T, BN)
        S = S * decay + _dot(xT * w[None, :], Bt, DT, PREC)  # (BP, BN)
    tl.store(fin_ptr + (b * H + h) * P * N + st_off, S, mask=pn_mask)


@triton.jit
def _ssd_state_bwd(dy_ptr, C_ptr, dtp_ptr, A_ptr, seq_ptr, dfin_ptr, dst_ptr, dinit_ptr,
                   L, H, P, N, HPC,
                   sy_b, sy_l, sy_h, sy_p, sC_b, sC_l, sC_g, sC_n, ss_b, ss_l,
                   Q: tl.constexpr, T: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                   HAS_SEQ: tl.constexpr, HAS_DFIN: tl.constexpr,
                   DT: tl.constexpr, PREC: tl.constexpr):
    """Reverse walk of the state gradient dS = dL/dS (P x N), written at every chunk end."""
    b, h, p, n = _state_tile_ids(H, P, N, BP, BN)  # p (BP,), n (BN,)
    pn_mask = (p < P)[:, None] & (n < N)[None, :]
    st_off = p[:, None] * N + n[None, :]  # (BP, BN)
    A = tl.load(A_ptr + h).to(tl.float32)
    if HAS_DFIN:
        dS = tl.load(dfin_ptr + (b * H + h) * P * N + st_off, mask=pn_mask, other=0.0)  # (BP, BN)
    else:
        dS = tl.zeros((BP, BN), dtype=tl.float32)
    dy_base = dy_ptr + b * sy_b + h * sy_h
    C_base = C_ptr + b * sC_b + (h // HPC) * sC_g
    dt_base = dtp_ptr + (b * H + h) * L
    nc = tl.cdiv(L, Q)
    dst_base = dst_ptr + ((b * nc) * H + h) * P * N
    nblk = tl.cdiv(L, T)
    for i in range(0, nblk):
        blk = nblk - 1 - i
        t0 = blk * T
        if ((t0 + T) % Q == 0) | (blk == nblk - 1):  # dS at the end of chunk t0 // Q
            tl.store(dst_base + (t0 // Q) * H * P * N + st_off, dS.to(dst_ptr.dtype.element_ty), mask=pn_mask)
        t = t0 + tl.arange(0, T)
        tm = t < L
        dtv = tl.load(dt_base + t, mask=tm, other=0.0)  # (T,)
        cs = tl.cumsum(dtv * A, axis=0)  # (T,)
        total = tl.sum(dtv * A, axis=0)
        w = tl.where(tm, exp_ftz(cs), 0.0)  # (T,) decay from the tile start to t
        decay = exp_ftz(total)
        if HAS_SEQ:
            seq_prev = tl.load(seq_ptr + b * ss_b + tl.maximum(t0 - 1, 0) * ss_l)
            seq_last = tl.load(seq_ptr + b * ss_b + (tl.minimum(t0 + T, L) - 1) * ss_l)
            sq = tl.load(seq_ptr + b * ss_b + t * ss_l, mask=tm, other=0)
            w = tl.where(sq == seq_prev, w, 0.0)
            decay = tl.where(seq_last == seq_prev, decay, 0.0)
        dyT = tl.load(dy_base + t[None, :] * sy_l + p[:, None] * sy_p,
                      mask=tm[None, :] & (p < P)[:, None], other=0.0)  # (BP, T)
        Ct = tl.load(C_base + t[:, None] * sC_l + n[None, :] * sC_n,
                     mask=tm[:, None] & (n < N)[None, :], other=0.0)  # (T, BN)
        dS = dS * decay + _dot(dyT * w[None, :], Ct, DT, PREC)
    tl.store(dinit_ptr + (b * H + h) * P * N + st_off, dS, mask=pn_mask)


# ----------------------------------------------------------------------------------------
# C B^T per chunk, once for all the heads that share it (the "CB groups")
# ----------------------------------------------------------------------------------------
@triton.jit
def _ssd_bmm_cb(B_ptr, C_ptr, cb_ptr, L, N, GH, HPB, HPC,
                sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
                Q: tl.constexpr, T: tl.constexpr, BN: tl.constexpr,
                DT: tl.constexpr, PREC: tl.constexpr):
    """cb[b, c, k, t, s] = C_t . B_s (fp32) for all t, s of chunk c (every tile is written,
    so readers may use any tile size); CB group k serves heads [k GH, (k+1) GH), which all
    read the same B and C groups."""
    NTB: tl.constexpr = Q // T
    pid = tl.program_id(0)
    k = tl.program_id(1)
    nc = tl.cdiv(L, Q)
    tb = pid % NTB
    c = (pid // NTB) % nc
    b = (pid // NTB // nc).to(tl.int64)
    t = c * Q + tb * T + tl.arange(0, T)
    tm = t < L
    n = tl.arange(0, BN)
    nm = n < N
    h0 = k * GH
    Ct = tl.load(C_ptr + b * sC_b + (h0 // HPC) * sC_g + t[:, None] * sC_l + n[None, :] * sC_n,
                 mask=tm[:, None] & nm[None, :], other=0.0)  # (T, BN)
    cb_base = cb_ptr + ((b * nc + c) * tl.num_programs(1) + k) * Q * Q
    r = tl.arange(0, T)
    for sb in range(0, NTB):
        s = c * Q + sb * T + tl.arange(0, T)
        sm = s < L
        B_T = tl.load(B_ptr + b * sB_b + (h0 // HPB) * sB_g + s[None, :] * sB_l + n[:, None] * sB_n,
                      mask=sm[None, :] & nm[:, None], other=0.0)  # (BN, T)
        CB = _dot(Ct, B_T, DT, PREC)  # (T, T)
        tl.store(cb_base + (tb * T + r[:, None]) * Q + sb * T + r[None, :], CB)


# ----------------------------------------------------------------------------------------
# steps (1) + (4): outputs of one T-tile of a chunk
# ----------------------------------------------------------------------------------------
@triton.jit
def _ssd_chunk_fwd(x_ptr, B_ptr, C_ptr, z_ptr, D_ptr, dtp_ptr, cs_ptr, seq_ptr, st_ptr,
                   cb_ptr, out_ptr, ypre_ptr,
                   L, H, P, N, HPX, HPB, HPC, GH,
                   sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
                   sz_b, sz_l, sz_h, sz_p, so_b, so_l, so_h, so_p, ss_b, ss_l, sD_h, sD_p,
                   Q: tl.constexpr, T: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                   BNK: tl.constexpr,
                   HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                   STORE_YPRE: tl.constexpr, USE_CB: tl.constexpr,
                   DT: tl.constexpr, PREC: tl.constexpr):
    NTB: tl.constexpr = Q // T
    nc = tl.cdiv(L, Q)
    tb, h, c, b = _tile_ids(NTB, H, nc)
    t = c * Q + tb * T + tl.arange(0, T)  # (T,)
    tm = t < L
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    x_base = x_ptr + b * sx_b + (h // HPX) * sx_h
    B_base = B_ptr + b * sB_b + (h // HPB) * sB_g
    C_base = C_ptr + b * sC_b + (h // HPC) * sC_g
    cs_base = cs_ptr + (b * H + h) * L
    dt_base = dtp_ptr + (b * H + h) * L
    cs_t = tl.load(cs_base + t, mask=tm, other=0.0)  # (T,)
    # (4) state -> output: tokens of the seq the incoming state belongs to
    inter = exp2_ftz(cs_t)
    if HAS_SEQ:
        sq_t = tl.load(seq_ptr + b * ss_b + t * ss_l, mask=tm, other=0)
        seq_prev = tl.load(seq_ptr + b * ss_b + tl.maximum(c * Q - 1, 0) * ss_l)
        inter = tl.where(sq_t == seq_prev, inter, 0.0)
    # C_t S_prev^T over the state in BNK-wide slices: a loop the compiler pipelines, where the
    # whole (T, N) and (N, BP) tiles at N = 256 were loaded before one dot could start
    st_base = st_ptr + ((b * nc + c) * H + h) * P * N
    acc = tl.zeros((T, BP), dtype=tl.float32)  # (T, BP)
    for n0 in range(0, BN, BNK):
        nk = n0 + tl.arange(0, BNK)  # (BNK,)
        nkm = nk < N
        Ck = tl.load(C_base + t[:, None] * sC_l + nk[None, :] * sC_n, mask=tm[:, None] & nkm[None, :], other=0.0)  # (T, BNK)
        S_T = tl.load(st_base + p[None, :] * N + nk[:, None], mask=pm[None, :] & nkm[:, None], other=0.0)  # (BNK, BP) = S_prev^T
        acc += _dot(Ck, S_T, DT, PREC)
    acc = acc * inter[:, None]  # (T, BP)
    if not USE_CB:  # C B^T formed here per s-tile: the whole C_t again (an L1/L2 hit, just read above)
        Ct = tl.load(C_base + t[:, None] * sC_l + n[None, :] * sC_n, mask=tm[:, None] & nm[None, :], other=0.0)  # (T, BN)
    if HAS_D:
        Dv = tl.load(D_ptr + h * sD_h + p * sD_p, mask=pm, other=0.0).to(tl.float32)  # (BP,)
    # (1) diagonal blocks: (C B^T o L)(dt x) over the s-tiles up to this one
    for sb in range(0, tb + 1):
        s = c * Q + sb * T + tl.arange(0, T)  # (T,)
        sm = s < L
        cs_s = tl.load(cs_base + s, mask=sm, other=0.0)
        dt_s = tl.load(dt_base + s, mask=sm, other=0.0)
        if USE_CB:  # shared by the heads of a CB group: computed once by _ssd_bmm_cb
            r = tl.arange(0, T)
            CB = tl.load(cb_ptr + ((b * nc + c) * (H // GH) + h // GH) * Q * Q
                         + (tb * T + r[:, None]) * Q + sb * T + r[None, :])  # (T, T)
        else:
            B_T = tl.load(B_base + s[None, :] * sB_l + n[:, None] * sB_n, mask=sm[None, :] & nm[:, None], other=0.0)  # (BN, T)
            CB = _dot(Ct, B_T, DT, PREC)  # (T, T)
        seg = cs_t[:, None] - cs_s[None, :]  # (T, T) log2 decay from s to t
        if HAS_SEQ:
            sq_s = tl.load(seq_ptr + b * ss_b + s * ss_l, mask=sm, other=0)
            keep = (s[None, :] <= t[:, None]) & sm[None, :] & (sq_s[None, :] == sq_t[:, None])
            seg = tl.where(keep, seg, float("-inf"))
        elif sb == tb:
            # only the diagonal tile needs the causal mask: in an earlier s-tile every s < t
            # (and s < L wherever t < L; rows t >= L are not stored), so those tiles skip the
            # compare and select per element
            seg = tl.where(s[None, :] <= t[:, None], seg, float("-inf"))
        Lm = exp2_ftz(seg) * dt_s[None, :]  # (T, T)
        xs = tl.load(x_base + s[:, None] * sx_l + p[None, :] * sx_p, mask=sm[:, None] & pm[None, :], other=0.0)  # (T, BP)
        acc += _dot(CB * Lm, xs, DT, PREC)
        if HAS_D:
            if sb == tb:  # the last s-tile is this tile's own x: the skip term D x from it
                # (a separate reload of x cost 0.11 ms of 0.79 at the reference shape)
                acc += xs.to(tl.float32) * Dv[None, :]
    tp_mask = tm[:, None] & pm[None, :]
    o_off = b * so_b + h * so_h + t[:, None] * so_l + p[None, :] * so_p  # (T, BP)
    if STORE_YPRE:
        tl.store(ypre_ptr + o_off, acc.to(ypre_ptr.dtype.element_ty), mask=tp_mask)
    if HAS_Z:
        zt = tl.load(z_ptr + b * sz_b + h * sz_h + t[:, None] * sz_l + p[None, :] * sz_p, mask=tp_mask, other=0.0).to(tl.float32)
        acc = acc * zt * tl.sigmoid(zt)
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=tp_mask)


# ----------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------
@triton.jit
def _ssd_gate_bwd(dout_ptr, z_ptr, y_ptr, dy_ptr, dz_ptr, R, L, H, P,
                  sd_b, sd_l, sd_h, sd_p, sz_b, sz_l, sz_h, sz_p,
                  BR: tl.constexpr, BP: tl.constexpr):
    """out = y silu(z): dy = dout silu(z), dz = dout y silu'(z); y, dy, dz contiguous."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)  # (BR,) rows of (batch, L, H)
    p = tl.arange(0, BP)
    bb = (r // (L * H)).to(tl.int64)
    ll = (r // H) % L
    hh = r % H
    m = (r < R)[:, None] & (p < P)[None, :]  # (BR, BP)
    do = tl.load(dout_ptr + bb[:, None] * sd_b + ll[:, None] * sd_l + hh[:, None] * sd_h + p[None, :] * sd_p, mask=m, other=0.0).to(tl.float32)
    zz = tl.load(z_ptr + bb[:, None] * sz_b + ll[:, None] * sz_l + hh[:, None] * sz_h + p[None, :] * sz_p, mask=m, other=0.0).to(tl.float32)
    off = r.to(tl.int64)[:, None] * P + p[None, :]
    yy = tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32)
    sg = tl.sigmoid(zz)
    tl.store(dy_ptr + off, (do * zz * sg).to(dy_ptr.dtype.element_ty), mask=m)
    tl.store(dz_ptr + off, (do * yy * sg * (1.0 + zz * (1.0 - sg))).to(dz_ptr.dtype.element_ty), mask=m)


@triton.jit
def _ssd_chunk_bwd_dc(x_ptr, B_ptr, C_ptr, dy_ptr, dtp_ptr, cs_ptr, seq_ptr, st_ptr, cb_ptr,
                      dC_ptr, row_ptr,
                      L, H, P, N, HPX, HPB, HPC, GH, HS,
                      sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
                      sy_b, sy_l, sy_h, sy_p, ss_b, ss_l,
                      Q: tl.constexpr, T: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                      HAS_SEQ: tl.constexpr, USE_CB: tl.constexpr, ATOMIC: tl.constexpr,
                      DT: tl.constexpr, PREC: tl.constexpr):
    """For one T-tile of a chunk and one C group (or 1/HS of its heads, adding atomically):
    dC_t = sum_h [exp(cs_t) S_prev^T dy_t + sum_{s<=t} M_ts dt_s (dy_t.x_s) B_s];
    per head, row_t = dy_t . y_inter_t + sum_s G_ts with G_ts = (dy_t.x_s)(C_t.B_s) dt_s M_ts.
    G's column sums come from _ssd_chunk_bwd_db's dB dot (see there)."""
    NTB: tl.constexpr = Q // T
    nc = tl.cdiv(L, Q)
    tb, k, c, b = _tile_ids(NTB, (H // HPC) * HS, nc)
    g = k // HS
    hs = k % HS
    t = c * Q + tb * T + tl.arange(0, T)
    tm = t < L
    r = tl.arange(0, T)
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    if HAS_SEQ:
        sq_t = tl.load(seq_ptr + b * ss_b + t * ss_l, mask=tm, other=0)
        seq_prev = tl.load(seq_ptr + b * ss_b + tl.maximum(c * Q - 1, 0) * ss_l)
    # one (T, BN) fp32 accumulator for all heads: a second one per head made this kernel
    # spill (255 registers, 30M local-memory requests at the reference shape, ncu)
    acc = tl.zeros((T, BN), dtype=tl.float32)
    for hh in range(0, HPC // HS):
        h = g * HPC + hs * (HPC // HS) + hh
        x_base = x_ptr + b * sx_b + (h // HPX) * sx_h
        B_base = B_ptr + b * sB_b + (h // HPB) * sB_g
        cs_base = cs_ptr + (b * H + h) * L
        dt_base = dtp_ptr + (b * H + h) * L
        cb_base = cb_ptr + ((b * nc + c) * (H // GH) + h // GH) * Q * Q
        cs_t = tl.load(cs_base + t, mask=tm, other=0.0)
        dyt = tl.load(dy_ptr + b * sy_b + h * sy_h + t[:, None] * sy_l + p[None, :] * sy_p,
                      mask=tm[:, None] & pm[None, :], other=0.0)  # (T, BP)
        inter = exp2_ftz(cs_t)
        if HAS_SEQ:
            inter = tl.where(sq_t == seq_prev, inter, 0.0)
        S = tl.load(st_ptr + ((b * nc + c) * H + h) * P * N + p[:, None] * N + n[None, :],
                    mask=pm[:, None] & nm[None, :], other=0.0)  # (BP, BN) S_prev
        dC_in = _dot(dyt, S, DT, PREC) * inter[:, None]  # (T, BN) through the carried state
        # C_t is loaded per head (an L2 hit) rather than held in registers across the loop
        Ct = tl.load(C_ptr + b * sC_b + g * sC_g + t[:, None] * sC_l + n[None, :] * sC_n,
                     mask=tm[:, None] & nm[None, :], other=0.0)  # (T, BN)
        a_t = tl.sum(Ct.to(tl.float32) * dC_in, axis=1)  # (T,) dy_t . y_inter_t
        acc += dC_in
        rowg = tl.zeros((T,), dtype=tl.float32)  # rowsum of G over the s-tiles done
        for sb in range(0, tb + 1):
            s = c * Q + sb * T + tl.arange(0, T)
            sm = s < L
            cs_s = tl.load(cs_base + s, mask=sm, other=0.0)
            dt_s = tl.load(dt_base + s, mask=sm, other=0.0)
            xT = tl.load(x_base + s[None, :] * sx_l + p[:, None] * sx_p, mask=sm[None, :] & pm[:, None], other=0.0)  # (BP, T)
            dyx = _dot(dyt, xT, DT, PREC)  # (T, T) dy_t . x_s
            keep = (s[None, :] <= t[:, None]) & sm[None, :]
            if HAS_SEQ:
                sq_s = tl.load(seq_ptr + b * ss_b + s * ss_l, mask=sm, other=0)
                keep = keep & (sq_s[None, :] == sq_t[:, None])
            Lm = exp2_ftz(tl.where(keep, cs_t[:, None] - cs_s[None, :], float("-inf"))) * dt_s[None, :]
            W = dyx * Lm  # (T, T)
            Bs = tl.load(B_base + s[:, None] * sB_l + n[None, :] * sB_n, mask=sm[:, None] & nm[None, :], other=0.0)  # (T, BN)
            acc += _dot(W, Bs, DT, PREC)
            if USE_CB:
                CB = tl.load(cb_base + (tb * T + r[:, None]) * Q + sb * T + r[None, :])  # (T, T)
            else:
                B_T = tl.load(B_base + s[None, :] * sB_l + n[:, None] * sB_n, mask=sm[None, :] & nm[:, None], other=0.0)
                CB = _dot(Ct, B_T, DT, PREC)
            # G (T_t, T_s) summed along its rows, with W rounded as _ssd_chunk_bwd_db's dot
            # rounds it (its column sums come from that dot)
            rowg += tl.sum(_dot_operand(W, DT) * CB, axis=1)
        tl.store(row_ptr + (b * H + h) * L + t, a_t + rowg, mask=tm)
    o = dC_ptr + (b * L + t[:, None]) * ((H // HPC) * N) + g * N + n[None, :]
    if ATOMIC:
        tl.atomic_add(o, acc, mask=tm[:, None] & nm[None, :], sem="relaxed")
    else:
        tl.store(o, acc.to(dC_ptr.dtype.element_ty), mask=tm[:, None] & nm[None, :])


@triton.jit
def _dx_pair(dy_ptr, cb_ptr, C_base, cs_base, seq_ptr, Bs, s, cs_s, sq_s, p, pm, n, nm,
             b, c, h, sb, tb, L, H, GH, nc, sy_b, sy_l, sy_h, sy_p, sC_l, sC_n, ss_b, ss_l,
             Q: tl.constexpr, T: tl.constexpr, HAS_SEQ: tl.constexpr, USE_CB: tl.constexpr,
             DT: tl.constexpr, PREC: tl.constexpr):
    """One (s-tile, t-tile) pair of _ssd_chunk_bwd_dx: (B_s.C_t M_ts) dy_t summed over the
    t of the tile, (T_s, BP) fp32, and the dy tile itself (T_t, BP)."""
    t = c * Q + tb * T + tl.arange(0, T)
    tm = t < L
    cs_t = tl.load(cs_base + t, mask=tm, other=0.0)
    if USE_CB:
        r = tl.arange(0, T)
        BC = tl.load(cb_ptr + ((b * nc + c) * (H // GH) + h // GH) * Q * Q
                     + (tb * T + r[None, :]) * Q + sb * T + r[:, None])  # (T_s, T_t) = CB^T
    else:
        C_T = tl.load(C_base + t[None, :] * sC_l + n[:, None] * sC_n, mask=tm[None, :] & nm[:, None], other=0.0)  # (BN, T)
        BC = _dot(Bs, C_T, DT, PREC)  # (T_s, T_t)
    keep = (t[None, :] >= s[:, None]) & tm[None, :]
    if HAS_SEQ:
        sq_t = tl.load(seq_ptr + b * ss_b + t * ss_l, mask=tm, other=0)
        keep = keep & (sq_t[None, :] == sq_s[:, None])
    Mt = exp2_ftz(tl.where(keep, cs_t[None, :] - cs_s[:, None], float("-inf")))
    dyt = tl.load(dy_ptr + b * sy_b + h * sy_h + t[:, None] * sy_l + p[None, :] * sy_p,
                  mask=tm[:, None] & pm[None, :], other=0.0)  # (T, BP)
    return _dot(BC * Mt, dyt, DT, PREC), dyt


@triton.jit
def _ssd_chunk_bwd_dx(x_ptr, B_ptr, C_ptr, dy_ptr, D_ptr, A_ptr, dtp_ptr, cs_ptr, seq_ptr,
                      st_ptr, dst_ptr, cb_ptr, dx_ptr, u_ptr, ddtd_ptr, scal_ptr, dD_ptr,
                      L, H, P, N, HPX, HPB, HPC, GH, HS,
                      sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
                      sy_b, sy_l, sy_h, sy_p, ss_b, ss_l, sD_h, sD_p, sdx_b, sdx_l,
                      Q: tl.constexpr, T: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                      HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, USE_CB: tl.constexpr,
                      ATOMIC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """For one s-tile of a chunk and one x group: d(dt x)_s per head
    = sum_{t>=s} M_ts (C_t.B_s) dy_t + exp(cs_last - cs_s) dS_end B_s, then dx, the dt terms,
    dD partials and the pieces of the log-decay gradient."""
    NTB: tl.constexpr = Q // T
    nc = tl.cdiv(L, Q)
    sb, k, c, b = _tile_ids(NTB, (H // HPX) * HS, nc)
    gx = k // HS
    hs = k % HS
    s = c * Q + sb * T + tl.arange(0, T)  # (T,)
    sm = s < L
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    sp_mask = sm[:, None] & pm[None, :]
    xs = tl.load(x_ptr + b * sx_b + gx * sx_h + s[:, None] * sx_l + p[None, :] * sx_p,
                 mask=sp_mask, other=0.0)  # (T, BP)
    xf = xs.to(tl.float32)
    c_last = tl.minimum(c * Q + Q, L) - 1
    sq_s = s  # (T,) placeholder for _dx_pair when there is no seq_idx
    if HAS_SEQ:
        sq_s = tl.load(seq_ptr + b * ss_b + s * ss_l, mask=sm, other=0)
        seq_last = tl.load(seq_ptr + b * ss_b + c_last * ss_l)
        seq_prev = tl.load(seq_ptr + b * ss_b + tl.maximum(c * Q - 1, 0) * ss_l)
    acc = tl.zeros((T, BP), dtype=tl.float32)
    for hh in range(0, HPX // HS):
        h = gx * HPX + hs * (HPX // HS) + hh
        B_base = B_ptr + b * sB_b + (h // HPB) * sB_g
        C_base = C_ptr + b * sC_b + (h // HPC) * sC_g
        cs_base = cs_ptr + (b * H + h) * L
        cs_s = tl.load(cs_base + s, mask=sm, other=0.0)
        dt_s = tl.load(dtp_ptr + (b * H + h) * L + s, mask=sm, other=0.0)
        cs_last = tl.load(cs_base + c_last)
        Bs = tl.load(B_base + s[:, None] * sB_l + n[None, :] * sB_n, mask=sm[:, None] & nm[None, :], other=0.0)  # (T, BN)
        keep_u = sm
        if HAS_SEQ:
            keep_u = keep_u & (sq_s == seq_last)
        wst = exp2_ftz(tl.where(keep_u, cs_last - cs_s, float("-inf")))  # (T,)
        st_off = ((b * nc + c) * H + h) * P * N
        dS_T = tl.load(dst_ptr + st_off + p[None, :] * N + n[:, None], mask=pm[None, :] & nm[:, None], other=0.0)  # (BN, BP)
        dstate = _dot(Bs, dS_T, DT, PREC) * wst[:, None]  # (T, BP)
        # the diagonal pair first: its dy tile is the s-tile's own, which the D terms need
        # (reloading it after the loop cost 0.17 ms of 1.32 at the reference shape)
        dintra, dyt = _dx_pair(dy_ptr, cb_ptr, C_base, cs_base, seq_ptr, Bs, s, cs_s, sq_s,
                               p, pm, n, nm, b, c, h, sb, sb, L, H, GH, nc,
                               sy_b, sy_l, sy_h, sy_p, sC_l, sC_n, ss_b, ss_l,
                               Q, T, HAS_SEQ, USE_CB, DT, PREC)  # (T, BP)
        if HAS_D:
            dys = dyt.to(tl.float32)  # (T, BP)
            Dv = tl.load(D_ptr + h * sD_h + p * sD_p, mask=pm, other=0.0).to(tl.float32)  # (BP,)
            acc += dys * Dv[None, :]
            tl.store(dD_ptr + ((b * nc * NTB + c * NTB + sb) * H + h) * P + p, tl.sum(dys * xf, axis=0), mask=pm)
        for tb in range(sb + 1, NTB):
            d, _ = _dx_pair(dy_ptr, cb_ptr, C_base, cs_base, seq_ptr, Bs, s, cs_s, sq_s,
                            p, pm, n, nm, b, c, h, sb, tb, L, H, GH, nc,
                            sy_b, sy_l, sy_h, sy_p, sC_l, sC_n, ss_b, ss_l,
                            Q, T, HAS_SEQ, USE_CB, DT, PREC)
            dintra += d
        u = dt_s * tl.sum(xf * dstate, axis=1)  # (T,)
        hL = (b * H + h) * L
        tl.store(u_ptr + hL + s, u, mask=sm)
        tl.store(ddtd_ptr + hL + s, tl.sum(xf * (dintra + dstate), axis=1), mask=sm)
        acc += dt_s[:, None] * (dintra + dstate)
        if sb == 0:
            # exp(cs_last) <dS_end, S_prev>: the state carried through the whole chunk
            S_T = tl.load(st_ptr + st_off + p[None, :] * N + n[:, None], mask=pm[None, :] & nm[:, None], other=0.0)
            sc = exp2_ftz(cs_last) * tl.sum(tl.sum(S_T.to(tl.float32) * dS_T.to(tl.float32), axis=1), axis=0)
            if HAS_SEQ:
                sc = tl.where(seq_last == seq_prev, sc, 0.0)
            tl.store(scal_ptr + (b * H + h) * nc + c, sc)
    o = dx_ptr + b * sdx_b + s[:, None] * sdx_l + gx * P + p[None, :]  # dx rows may sit in a wider buffer
    if ATOMIC:
        tl.atomic_add(o, acc, mask=sp_mask, sem="relaxed")
    else:
        tl.store(o, acc.to(dx_ptr.dtype.element_ty), mask=sp_mask)


@triton.jit
def _ssd_chunk_bwd_db(x_ptr, B_ptr, C_ptr, dy_ptr, dtp_ptr, cs_ptr, seq_ptr, dst_ptr,
                      dB_ptr, col_ptr,
                      L, H, P, N, HPX, HPB, HPC, HS,
                      sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
                      sy_b, sy_l, sy_h, sy_p, ss_b, ss_l,
                      Q: tl.constexpr, T: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                      HAS_SEQ: tl.constexpr, ATOMIC: tl.constexpr,
                      DT: tl.constexpr, PREC: tl.constexpr):
    """dB_s = sum_h dt_s [sum_{t>=s} M_ts (dy_t.x_s) C_t + exp(cs_last - cs_s) dS_end^T x_s];
    per head, col_s = sum_t G_ts, the column sums of the pair matrix of _ssd_chunk_bwd_dc.

    The in-chunk part of a head's dB, D_s = sum_t W^T_st C_t with W^T_st = (x_s.dy_t) M_ts
    dt_s, gives them without a T x T tile: col_s = sum_t W_ts (C_t.B_s) = B_s . D_s. The dot
    rounds W to the operand dtype, so _ssd_chunk_bwd_dc sums the same rounded W (formed by
    the same fp32 operations on the same inputs) times C B^T along its rows: the row and
    column sums must cancel in revcumsum(row - col), and from differently rounded numbers
    they did not (10-100 % error in dA on the GPU). Summed along the columns of G in
    _ssd_chunk_bwd_dc, these sums crossed the warps through shared memory for every tile
    pair."""
    NTB: tl.constexpr = Q // T
    nc = tl.cdiv(L, Q)
    sb, k, c, b = _tile_ids(NTB, (H // HPB) * HS, nc)
    gb = k // HS
    hs = k % HS
    s = c * Q + sb * T + tl.arange(0, T)
    sm = s < L
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    c_last = tl.minimum(c * Q + Q, L) - 1
    if HAS_SEQ:
        sq_s = tl.load(seq_ptr + b * ss_b + s * ss_l, mask=sm, other=0)
        seq_last = tl.load(seq_ptr + b * ss_b + c_last * ss_l)
    acc = tl.zeros((T, BN), dtype=tl.float32)
    for hh in range(0, HPB // HS):
        h = gb * HPB + hs * (HPB // HS) + hh
        x_base = x_ptr + b * sx_b + (h // HPX) * sx_h
        C_base = C_ptr + b * sC_b + (h // HPC) * sC_g
        cs_base = cs_ptr + (b * H + h) * L
        cs_s = tl.load(cs_base + s, mask=sm, other=0.0)
        dt_s = tl.load(dtp_ptr + (b * H + h) * L + s, mask=sm, other=0.0)
        cs_last = tl.load(cs_base + c_last)
        xs = tl.load(x_base + s[:, None] * sx_l + p[None, :] * sx_p, mask=sm[:, None] & pm[None, :], other=0.0)  # (T, BP)
        keep_u = sm
        if HAS_SEQ:
            keep_u = keep_u & (sq_s == seq_last)
        wst = exp2_ftz(tl.where(keep_u, cs_last - cs_s, float("-inf")))
        dS = tl.load(dst_ptr + ((b * nc + c) * H + h) * P * N + p[:, None] * N + n[None, :],
                     mask=pm[:, None] & nm[None, :], other=0.0)  # (BP, BN)
        # dt_s (and the decay to the chunk end) scale the rows of x and of x.dy before the
        # products, so every head adds into one accumulator; the in-chunk part passes through
        # a per-head one first, which the column sums below need
        acc += _dot(xs * (dt_s * wst)[:, None], dS, DT, PREC)  # (T, BN)
        Dh = tl.zeros((T, BN), dtype=tl.float32)  # this head's in-chunk part of dB
        for tb in range(sb, NTB):
            t = c * Q + tb * T + tl.arange(0, T)
            tm = t < L
            cs_t = tl.load(cs_base + t, mask=tm, other=0.0)
            dyT = tl.load(dy_ptr + b * sy_b + h * sy_h + t[None, :] * sy_l + p[:, None] * sy_p,
                          mask=tm[None, :] & pm[:, None], other=0.0)  # (BP, T)
            xdy = _dot(xs, dyT, DT, PREC)  # (T_s, T_t)
            keep = (t[None, :] >= s[:, None]) & tm[None, :]
            if HAS_SEQ:
                sq_t = tl.load(seq_ptr + b * ss_b + t * ss_l, mask=tm, other=0)
                keep = keep & (sq_t[None, :] == sq_s[:, None])
            Mt = exp2_ftz(tl.where(keep, cs_t[None, :] - cs_s[:, None], float("-inf")))
            Ct = tl.load(C_base + t[:, None] * sC_l + n[None, :] * sC_n, mask=tm[:, None] & nm[None, :], other=0.0)  # (T, BN)
            Dh += _dot(xdy * (Mt * dt_s[:, None]), Ct, DT, PREC)  # W^T of _ssd_chunk_bwd_dc times C_t
        # B_s is the program's (one group) for every head, reloaded per head (an L1/L2 hit)
        # rather than held in registers across the loop beside two accumulators
        Bs = tl.load(B_ptr + b * sB_b + gb * sB_g + s[:, None] * sB_l + n[None, :] * sB_n,
                     mask=sm[:, None] & nm[None, :], other=0.0)  # (T, BN)
        tl.store(col_ptr + (b * H + h) * L + s, tl.sum(Bs.to(tl.float32) * Dh, axis=1), mask=sm)
        acc += Dh
    o = dB_ptr + (b * L + s[:, None]) * ((H // HPB) * N) + gb * N + n[None, :]
    if ATOMIC:
        tl.atomic_add(o, acc, mask=sm[:, None] & nm[None, :], sem="relaxed")
    else:
        tl.store(o, acc.to(dB_ptr.dtype.element_ty), mask=sm[:, None] & nm[None, :])


@triton.jit
def _ssd_dt_bwd(dt_ptr, bias_ptr, A_ptr, dtp_ptr, seq_ptr, row_ptr, col_ptr, u_ptr, ddtd_ptr,
                scal_ptr, ddt_ptr, dAp_ptr, dbp_ptr,
                L, H, s_dt_b, s_dt_l, s_dt_h, ss_b, ss_l, lo, hi,
                Q: tl.constexpr, BH: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    nc = tl.num_programs(1)
    h = tl.program_id(2) * BH + tl.arange(0, BH)  # (BH,)
    hm = h < H
    t = c * Q + tl.arange(0, Q)  # (Q,)
    m = (t < L)[:, None] & hm[None, :]  # (Q, BH)
    off = (b * H + h[None, :]) * L + t[:, None]  # (Q, BH)
    # (Q, BH) dy_t . y_inter_t + rowG_t - colG_t
    v = tl.load(row_ptr + off, mask=m, other=0.0) - tl.load(col_ptr + off, mask=m, other=0.0)
    u = tl.load(u_ptr + off, mask=m, other=0.0)
    sc = tl.load(scal_ptr + (b * H + h) * nc + c, mask=hm, other=0.0)  # (BH,)
    # dL/d(dA_j) = sum_{t>=j} (rowG_t + dy_t.y_inter_t - colG_t) + sum_{s<j} u_s + scal
    # (see the module docstring)
    cv = tl.cumsum(v, axis=0)
    cu = tl.cumsum(u, axis=0)
    ddA = (tl.sum(v, axis=0)[None, :] - cv + v) + (cu - u) + sc[None, :]
    if HAS_SEQ:
        sq = tl.load(seq_ptr + b * ss_b + t * ss_l, mask=t < L, other=0)
        sq_m1 = tl.load(seq_ptr + b * ss_b + (t - 1) * ss_l, mask=(t > 0) & (t < L), other=0)
        start = (t > 0) & (sq != sq_m1)  # first token of a new seq: its decay is replaced by 0
        ddA = tl.where(start[:, None], 0.0, ddA)
    ddA = tl.where(m, ddA, 0.0)
    dtp = tl.load(dtp_ptr + off, mask=m, other=0.0)
    A = tl.load(A_ptr + h, mask=hm, other=0.0).to(tl.float32)
    ddt = tl.load(ddtd_ptr + off, mask=m, other=0.0) + A[None, :] * ddA  # (Q, BH)
    tl.store(dAp_ptr + (b * nc + c) * H + h, tl.sum(dtp * ddA, axis=0), mask=hm)
    raw = tl.load(dt_ptr + b * s_dt_b + t[:, None] * s_dt_l + h[None, :] * s_dt_h, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + h, mask=hm, other=0.0).to(tl.float32)[None, :]
    if HAS_LIMIT:
        if SOFTPLUS:
            sp = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(raw)))
        else:
            sp = raw
        ddt = tl.where((sp >= lo) & (sp <= hi), ddt, 0.0)  # zero gradient where clamped
    if SOFTPLUS:
        ddt = tl.where(raw > 20.0, ddt, ddt * tl.sigmoid(raw))
    ddt = tl.where(m, ddt, 0.0)
    tl.store(ddt_ptr + b * L * H + t[:, None] * H + h[None, :], ddt.to(ddt_ptr.dtype.element_ty), mask=m)
    tl.store(dbp_ptr + (b * nc + c) * H + h, tl.sum(ddt, axis=0), mask=hm)


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------
# every buffer a kernel must fill comes from _alloc: tests replace it with a NaN filler so
# that an element no kernel wrote cannot pass
_alloc = torch.empty

_BIG = 3.0e38  # stands for +inf in dt_limit (a finite float keeps the kernel argument simple)


def _prune_tiles(configs, named_args, **kwargs):
    """Configs whose time tile T fits in the chunk (T must divide Q; both are powers of 2) and
    whose state tile BN, where they carry one, is no wider than N padded as `_tiles` pads it
    (a wider tile only adds masked columns). Register-capped configs only where the head-dim
    tile BP is at most 64: the caps were measured there, and a (T, 128) accumulator alone
    takes half of a 128-register cap."""
    Q = kwargs.get("Q", named_args.get("Q", 64))
    N = named_args.get("N", kwargs.get("N"))
    BP = kwargs.get("BP", named_args.get("BP", 64))
    n_max = _padded_tile(N) if N else float("inf")
    ok = [c for c in configs if c.kwargs.get("T", 0) <= Q and c.kwargs.get("BN", 0) <= n_max
          and (c.maxnreg is None or BP <= 64)]
    return ok or [triton.Config(dict(configs[0].kwargs, T=Q), num_warps=4, num_stages=1)]


def _tuned(kernel, configs, key, reset_to_zero=None, tile_T=False):
    """Autotune on a GPU (small config list keyed on the shapes); under the interpreter the
    first config is used as a fixed one (autotune needs a GPU). tile_T: the configs carry the
    time tile T, pruned to T <= Q (the launcher clamps a fixed T the same way)."""
    if INTERPRET or os.environ.get("SSD_NO_AUTOTUNE") == "1":
        cfg = configs[0]
        fixed = dict(cfg.kwargs)
        if not INTERPRET:
            fixed.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return kernel, fixed
    prune = {"early_config_prune": _prune_tiles} if tile_T else None
    # reset_to_zero: outputs that are accumulated atomically must start from zero in every
    # timing run of the autotuner, or the first (tuning) call returns a multiple of the sum
    # a list of its own per autotuner: torch.compile traces into the autotuner and refused two
    # of them sharing one configs list once they prune it ("already tracked for mutation")
    return autotune(list(configs), key=key, reset_to_zero=reset_to_zero,
                           prune_configs_by=prune)(kernel), {}


def _fixed(cfg: dict, BN: int) -> dict:
    """A fixed config (no autotune) with one pipeline stage where wide N tiles would not fit
    in shared memory (seen: N=256 needs more than the H100's 227 KB with two stages)."""
    cfg = dict(cfg)
    if BN > 128 and "num_stages" in cfg:
        cfg["num_stages"] = 1
    return cfg


def _clamp_T(kw: dict, Q: int) -> dict:
    """A fixed config's time tile, cut to the chunk (the autotuned path prunes instead)."""
    if "T" in kw:
        kw = dict(kw, T=min(kw["T"], Q))
    return kw


def _cfg(num_warps, num_stages, maxnreg=None, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)


# T, the time tile of the state walks: longer tiles give fewer dependent steps per row
_STATE_CONFIGS = [_cfg(4, 2, BP=64, BN=64, T=64), _cfg(8, 2, BP=64, BN=64, T=64),
                  _cfg(4, 3, BP=64, BN=64, T=64), _cfg(4, 2, BP=64, BN=32, T=64),
                  _cfg(4, 3, BP=32, BN=64, T=64), _cfg(8, 3, BP=64, BN=128, T=64),
                  _cfg(4, 2, BP=64, BN=64, T=128), _cfg(8, 3, BP=64, BN=64, T=128),
                  _cfg(4, 2, BP=64, BN=32, T=128), _cfg(8, 2, BP=64, BN=64, T=256),
                  # whole-N tiles for N = 128 and 256 (pruned below that): one program per
                  # (batch, head, P-tile) reads each x (dy) tile once
                  _cfg(8, 2, BP=64, BN=128, T=64), _cfg(8, 2, BP=64, BN=256, T=64),
                  _cfg(8, 1, BP=64, BN=256, T=64),
                  # the same on 4 warps: at L = 8K (8 rows of 32 heads: 512 programs with
                  # 64-wide N tiles, one wave) the forward took 0.967 ms with it against 1.004
                  # (H100, scripts/ssd_fwd_sweep.py, session 10)
                  _cfg(4, 2, BP=64, BN=128, T=64), _cfg(4, 3, BP=64, BN=128, T=64)]
_CHUNK_CONFIGS = [_cfg(4, 2), _cfg(8, 2), _cfg(4, 3), _cfg(8, 3), _cfg(4, 1)]
_STATE_KEY = ["L", "H", "P", "N", "Q"]
_state_fwd, _STATE_FWD_FIXED = _tuned(_ssd_state_fwd, _STATE_CONFIGS, _STATE_KEY, tile_T=True)
_state_bwd, _STATE_BWD_FIXED = _tuned(_ssd_state_bwd, _STATE_CONFIGS, _STATE_KEY, tile_T=True)
# maxnreg: a register cap per thread lets 3-4 programs of 4 warps share an SM where the
# compiler's own choice (ncu of the first config: 167 registers at N = 64, 217 at N = 256, the
# latter with the one stage of the untuned path) left room for 2-3. With
# the cap at 128 the forward at L = 4K took 0.749 instead of 0.792 ms at N = 64 and 1.154
# instead of 1.260 at N = 256 (H100, scripts/ssd_fwd_sweep.py, session 10). The backward chunk
# kernels carry no cap: with one at 128, ptxas could not build dC or dB (158 or more needed).
# A kernel that inductor itself launches loses the cap (it rebuilds a user kernel's configs
# from kwargs, num_warps and num_stages: torch 2.13's config_to_dict). These do not reach
# inductor in compiled training: Dynamo breaks the graph inside the fused Mamba-2 Function
# (scripts/graph_breaks.py, results/h100/session11), which then runs eagerly, caps included.
_CHUNK_FWD_CONFIGS = [_cfg(4, 2, T=64), _cfg(8, 2, T=64), _cfg(4, 3, T=64), _cfg(8, 2, T=128),
                      _cfg(8, 1, T=128), _cfg(8, 3, T=128), _cfg(4, 2, T=128),
                      _cfg(4, 2, maxnreg=128, T=64), _cfg(4, 3, maxnreg=168, T=64)]
_chunk_fwd, _CHUNK_FWD_FIXED = _tuned(_ssd_chunk_fwd, _CHUNK_FWD_CONFIGS, ["L", "H", "P", "N", "Q"],
                                      tile_T=True)
_chunk_dc, _CHUNK_DC_FIXED = _tuned(_ssd_chunk_bwd_dc, _CHUNK_CONFIGS, ["L", "H", "P", "N", "HPC", "HS"], ["dC_ptr"])
_chunk_dx, _CHUNK_DX_FIXED = _tuned(_ssd_chunk_bwd_dx, _CHUNK_CONFIGS, ["L", "H", "P", "N", "HPX", "HS"], ["dx_ptr"])
_chunk_db, _CHUNK_DB_FIXED = _tuned(_ssd_chunk_bwd_db, _CHUNK_CONFIGS, ["L", "H", "P", "N", "HPB", "HS"], ["dB_ptr"])


def _select(tuned, raw, fixed: dict, configs, x: torch.Tensor):
    """(kernel, launch kwargs). fp32 inputs on the GPU take the first config untuned: fp32 is
    the checking path, not the fast one, and tuning its slow IEEE dots took minutes per shape
    (N=256 spills registers in every candidate)."""
    if fixed or x.dtype != torch.float32:
        return tuned, dict(fixed)
    cfg = configs[0]
    return raw, dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _dot_cfg(x: torch.Tensor):
    """Operand dtype and precision of tl.dot: the input dtype on the GPU; fp32 under the
    interpreter (its bf16 dot is wrong) and for fp32 inputs (exact fp32 products)."""
    if INTERPRET and x.dtype in (torch.bfloat16, torch.float16):
        return ("bf16emu" if x.dtype == torch.bfloat16 else "fp16emu"), "ieee"
    if INTERPRET or x.dtype == torch.float32:
        return "fp32", "ieee"
    return ("bf16" if x.dtype == torch.bfloat16 else "fp16"), "tf32"


def _ckpt_dtype(x):
    return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32


def _tiles(P: int, N: int, Q: int):
    """T (time tile), BP and BN (head-dim and state tiles) of the chunk kernels.

    BP is at least 64, also for P = 16 or 32 (masked columns). With BP < 64 and BN = 64 the
    Triton 3.6 build of these kernels faulted on the H100 ("an illegal memory access";
    compute-sanitizer: out-of-range shared address inside a dot). Our reading of the compiled
    IR (not a confirmed Triton diagnosis): the (BN, BP) state operand, K-major in a
    128-byte-swizzled buffer at the end of the shared allocation, is read past that end, which
    faults only when the block's shared window sits at the top of the SM, i.e. at large grids.
    A stress run (scripts/ssd_fault_probe.py, batch 64 x
    256 tokens, 300 passes) failed at every P < 64 with N = 64 and passed at P >= 64 for
    every N (notes/ssd.md). The masked columns cost time only for P < 64 (N < 64 for BN)."""
    T = min(Q, 64)
    BP = _padded_tile(P)
    # BN likewise: with N = 16 one autotuned config of the dB kernel faulted the same way
    # ("an illegal memory access" at batch 16 x 4096 tokens, H = 32, P = 64; session 5)
    BN = _padded_tile(N)
    return T, BP, BN


def _padded_tile(n: int) -> int:
    """A head-dim or state tile: n rounded up to a power of two, at least 64 (see `_tiles`)."""
    return max(64, _next_pow2(n))


def _state_slice(BN: int) -> int:
    """BNK: how much of the state the forward chunk kernel's C_t S_prev^T loop takes per step.
    Whole up to N = 128; 64-wide slices above (see the kernel)."""
    return BN if BN <= 128 else 64


def _limits(dt_limit):
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    has = (lo, hi) != (0.0, float("inf"))
    return has, max(min(lo, _BIG), -_BIG), max(min(hi, _BIG), -_BIG)


def _seq_args(seq_idx, dummy):
    if seq_idx is None:
        return dummy, 0, 0
    return seq_idx, seq_idx.stride(0), seq_idx.stride(1)


def _D_strides(D):
    if D is None:
        return 0, 0
    return (D.stride(0), 0) if D.dim() == 1 else (D.stride(0), D.stride(1))


def _cb(B, C, H, L, N, Q, T, BN, nc, DT, PREC):
    """cb (batch, nc, H // GH, Q, Q) fp32 when GH > 1 heads share each (B group, C group)
    pair; else a placeholder (the kernels then form C B^T themselves)."""
    batch, Gb, Gc = B.shape[0], B.shape[2], C.shape[2]
    HPB, HPC = H // Gb, H // Gc
    GH = math.gcd(HPB, HPC)
    if GH == 1:
        return GH, B
    cb = _alloc((batch, nc, H // GH, Q, Q), device=B.device, dtype=torch.float32)  # (batch, nc, H/GH, Q, Q)
    _ssd_bmm_cb[(batch * nc * (Q // T), H // GH)](
        B, C, cb, L, N, GH, HPB, HPC, *B.stride(), *C.stride(),
        Q=Q, T=T, BN=BN, DT=DT, PREC=PREC, num_warps=4, num_stages=2)
    return GH, cb


def ssd_forward(x, dt, A, B, C, Q, D, z, dt_bias, dt_softplus, dt_limit, initial_states,
                seq_idx, need_ypre):
    """Forward launch. Returns out (batch, L, H, P), final states (batch, H, P, N) fp32 and
    what the backward needs (dtp, cs, states, ypre)."""
    batch, L, Hx, P = x.shape
    H = dt.shape[2]
    Gb, N = B.shape[2], B.shape[3]
    Gc = C.shape[2]
    dev = x.device
    nc = triton.cdiv(L, Q)
    T, BP, BN = _tiles(P, N, Q)
    DT, PREC = _dot_cfg(x)
    has_lim, lo, hi = _limits(dt_limit)
    seq, ss_b, ss_l = _seq_args(seq_idx, x)

    # dt' and the chunk-local cumulative log-decay cs, both (batch, H, L) fp32
    dtp = _alloc((batch, H, L), device=dev, dtype=torch.float32)  # (batch, H, L)
    cs = _alloc((batch, H, L), device=dev, dtype=torch.float32)  # (batch, H, L)
    BH = min(16, _next_pow2(H))
    _ssd_dt_fwd[(batch, nc, triton.cdiv(H, BH))](
        dt, dt_bias if dt_bias is not None else dt, A, dtp, cs, L, H, *dt.stride(), lo, hi,
        Q=Q, BH=BH, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_LIMIT=has_lim)

    # steps (2)+(3): checkpoints of the state at every chunk start, and the final state
    # checkpoints in bf16 for bf16 inputs (they enter bf16 products anyway; half the bytes)
    states = _alloc((batch, nc, H, P, N), device=dev, dtype=_ckpt_dtype(x))  # (batch, nc, H, P, N)
    final = _alloc((batch, H, P, N), device=dev, dtype=torch.float32)  # (batch, H, P, N)
    init = initial_states if initial_states is not None else final
    si = initial_states.stride() if initial_states is not None else (0, 0, 0, 0)
    grid = lambda META: (batch * H * triton.cdiv(P, META["BP"]) * triton.cdiv(N, META["BN"]),)
    kern, kw = _select(_state_fwd, _ssd_state_fwd, _STATE_FWD_FIXED, _STATE_CONFIGS, x)
    kern[grid](
        x, B, dtp, A, seq, init, states, final, L, H, P, N, H // Hx, H // Gb,
        *x.stride(), *B.stride(), ss_b, ss_l, *si,
        Q=Q, HAS_SEQ=seq_idx is not None,
        HAS_INIT=initial_states is not None, DT=DT, PREC=PREC, **_clamp_T(kw, Q))

    # C B^T per chunk for the heads that share it
    GH, cb = _cb(B, C, H, L, N, Q, T, BN, nc, DT, PREC)

    # steps (1)+(4): outputs
    out = _alloc((batch, L, H, P), device=dev, dtype=x.dtype)  # (batch, L, H, P)
    ypre = _alloc(out.shape, device=dev, dtype=out.dtype) if need_ypre else out  # (batch, L, H, P) y before the gate
    zz = z if z is not None else x
    sD = _D_strides(D)
    kern, fixed = _select(_chunk_fwd, _ssd_chunk_fwd, _CHUNK_FWD_FIXED, _CHUNK_FWD_CONFIGS, x)
    fixed = _clamp_T(_fixed(fixed, BN), Q)
    grid = lambda META: (batch * nc * (Q // META["T"]) * H,)
    kern[grid](
        x, B, C, zz, D if D is not None else x, dtp, cs, seq, states, cb, out, ypre,
        L, H, P, N, H // Hx, H // Gb, H // Gc, GH,
        *x.stride(), *B.stride(), *C.stride(), *zz.stride(), *out.stride(), ss_b, ss_l, *sD,
        Q=Q, BP=BP, BN=BN, BNK=_state_slice(BN), HAS_SEQ=seq_idx is not None, HAS_D=D is not None,
        HAS_Z=z is not None, STORE_YPRE=need_ypre, USE_CB=GH > 1, DT=DT, PREC=PREC, **fixed)
    return out, final, (dtp, cs, states, ypre if need_ypre else None, cb)


def _head_split(programs, heads_per_group):
    """Split the heads of a group over HS programs (adding atomically) until the launch has
    enough programs to fill the GPU: with one B/C group, dB and dC would otherwise be
    one program per tile looping over all H heads."""
    hs = 1
    while programs * hs < 4096 and heads_per_group % (2 * hs) == 0:
        hs *= 2
    return hs


def _out_buf(shape, dtype, dev, hs):
    if hs == 1:
        return _alloc(shape, device=dev, dtype=dtype)
    return torch.zeros(shape, device=dev, dtype=torch.float32)  # atomic fp32 accumulation


def ssd_backward(dout, dfinal, x, dt, A, B, C, Q, D, z, dt_bias, dt_softplus, dt_limit,
                 initial_states, seq_idx, dtp, cs, states, ypre, cb, out=None):
    """Backward launch. Returns dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states.

    out: optional (dx, ddt, dB, dC) views to write those gradients into (x's, dt's, B's, C's
    shapes and dtypes, unit stride along the last axis; a gradient that is None is
    allocated). Slices of one wider buffer let a caller that split x, B, C (and dt) from one
    projection receive its gradient whole instead of concatenating the pieces. dx is written
    in place when no head split adds it atomically; the others are copied in (small)."""
    out = out or (None, None, None, None)
    batch, L, Hx, P = x.shape
    H = dt.shape[2]
    Gb, N = B.shape[2], B.shape[3]
    Gc = C.shape[2]
    dev = x.device
    nc = triton.cdiv(L, Q)
    T, BP, BN = _tiles(P, N, Q)
    NTB = Q // T
    DT, PREC = _dot_cfg(x)
    has_lim, lo, hi = _limits(dt_limit)
    seq, ss_b, ss_l = _seq_args(seq_idx, x)
    f32 = dict(device=dev, dtype=torch.float32)

    # gate: dy = dL/dy before the gate
    dz = None
    if z is not None:
        dy = _alloc((batch, L, H, P), device=dev, dtype=x.dtype)  # (batch, L, H, P)
        dz = _alloc((batch, L, H, P), device=dev, dtype=z.dtype)  # (batch, L, H, P)
        R = batch * L * H
        BR = 64
        _ssd_gate_bwd[(triton.cdiv(R, BR),)](dout, z, ypre, dy, dz, R, L, H, P,
                                             *dout.stride(), *z.stride(), BR=BR, BP=BP)
    else:
        dy = dout  # (batch, L, H, P), any strides

    # reverse walk of the state gradient: dS at every chunk end, and at the row start
    dst = _alloc((batch, nc, H, P, N), device=dev, dtype=_ckpt_dtype(x))  # (batch, nc, H, P, N)
    dinit = _alloc((batch, H, P, N), **f32)  # (batch, H, P, N)
    grid = lambda META: (batch * H * triton.cdiv(P, META["BP"]) * triton.cdiv(N, META["BN"]),)
    kern, kw = _select(_state_bwd, _ssd_state_bwd, _STATE_BWD_FIXED, _STATE_CONFIGS, x)
    kern[grid](
        dy, C, dtp, A, seq, dfinal if dfinal is not None else dinit, dst, dinit,
        L, H, P, N, H // Gc, *dy.stride(), *C.stride(), ss_b, ss_l,
        Q=Q, HAS_SEQ=seq_idx is not None, HAS_DFIN=dfinal is not None,
        DT=DT, PREC=PREC, **_clamp_T(kw, Q))

    GH = math.gcd(H // Gb, H // Gc)
    common = (L, H, P, N, H // Hx, H // Gb, H // Gc, GH)
    base = batch * nc * NTB
    # dC, and per head dy . y_inter plus the row sums of the in-chunk pairs G
    HSc = _head_split(base * Gc, H // Gc)
    dC = _out_buf((batch, L, Gc, N), C.dtype, dev, HSc)  # (batch, L, Gc, N)
    row = _alloc((batch, H, L), **f32)  # (batch, H, L)
    kern, kw = _select(_chunk_dc, _ssd_chunk_bwd_dc, _CHUNK_DC_FIXED, _CHUNK_CONFIGS, x)
    kern[(base * Gc * HSc,)](
        x, B, C, dy, dtp, cs, seq, states, cb, dC, row, *common, HSc,
        *x.stride(), *B.stride(), *C.stride(), *dy.stride(), ss_b, ss_l,
        Q=Q, T=T, BP=BP, BN=BN, HAS_SEQ=seq_idx is not None, USE_CB=GH > 1, ATOMIC=HSc > 1,
        DT=DT, PREC=PREC, **_fixed(kw, BN))

    # dx, the dt terms, dD partials, pieces of the log-decay gradient
    HSx = _head_split(base * Hx, H // Hx)
    dx = out[0] if out[0] is not None and HSx == 1 else _out_buf((batch, L, Hx, P), x.dtype, dev, HSx)  # (batch, L, Hx, P)
    u = _alloc((batch, H, L), **f32)  # (batch, H, L)
    ddtd = _alloc((batch, H, L), **f32)  # (batch, H, L)
    scal = _alloc((batch, H, nc), **f32)  # (batch, H, nc)
    dDp = _alloc((batch, nc * NTB, H, P), **f32) if D is not None else scal  # (batch, tiles, H, P)
    sD = _D_strides(D)
    kern, kw = _select(_chunk_dx, _ssd_chunk_bwd_dx, _CHUNK_DX_FIXED, _CHUNK_CONFIGS, x)
    kern[(base * Hx * HSx,)](
        x, B, C, dy, D if D is not None else x, A, dtp, cs, seq, states, dst, cb, dx, u, ddtd,
        scal, dDp, *common, HSx,
        *x.stride(), *B.stride(), *C.stride(), *dy.stride(), ss_b, ss_l, *sD, dx.stride(0), dx.stride(1),
        Q=Q, T=T, BP=BP, BN=BN, HAS_SEQ=seq_idx is not None, HAS_D=D is not None,
        USE_CB=GH > 1, ATOMIC=HSx > 1, DT=DT, PREC=PREC, **_fixed(kw, BN))

    # dB, and per head the column sums of the in-chunk pairs G
    HSb = _head_split(base * Gb, H // Gb)
    dB = _out_buf((batch, L, Gb, N), B.dtype, dev, HSb)  # (batch, L, Gb, N)
    col = _alloc((batch, H, L), **f32)  # (batch, H, L)
    kern, kw = _select(_chunk_db, _ssd_chunk_bwd_db, _CHUNK_DB_FIXED, _CHUNK_CONFIGS, x)
    kern[(base * Gb * HSb,)](
        x, B, C, dy, dtp, cs, seq, dst, dB, col, *common[:7], HSb,
        *x.stride(), *B.stride(), *C.stride(), *dy.stride(), ss_b, ss_l,
        Q=Q, T=T, BP=BP, BN=BN, HAS_SEQ=seq_idx is not None, ATOMIC=HSb > 1,
        DT=DT, PREC=PREC, **_fixed(kw, BN))

    # d(dA) -> ddt, dA, dt_bias
    ddt = _alloc((batch, L, H), device=dev, dtype=dt.dtype)  # (batch, L, H)
    dAbp = _alloc((2, batch, nc, H), **f32)  # dA and ddt_bias partials: one reduction for both
    dAp, dbp = dAbp[0], dAbp[1]  # (batch, nc, H) each
    BH = min(16, _next_pow2(H))
    _ssd_dt_bwd[(batch, nc, triton.cdiv(H, BH))](
        dt, dt_bias if dt_bias is not None else dt, A, dtp, seq, row, col, u, ddtd, scal,
        ddt, dAp, dbp, L, H, *dt.stride(), ss_b, ss_l, lo, hi,
        Q=Q, BH=BH, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        HAS_LIMIT=has_lim, HAS_SEQ=seq_idx is not None)

    grads = []
    for g, dst_buf, like in zip((dx, ddt, dB, dC), out, (x, dt, B, C)):
        if dst_buf is None:
            grads.append(g.to(like.dtype))  # from fp32 where atomic
        else:
            if g is not dst_buf:
                dst_buf.copy_(g)
            grads.append(dst_buf)
    dx, ddt, dB, dC = grads
    dA, ddt_bias = dAbp.sum((1, 2))  # (H,) each
    ddt_bias = ddt_bias if dt_bias is not None else None
    dD = None
    if D is not None:
        dD = dDp.sum((0, 1) if D.dim() == 2 else (0, 1, 3))  # (H, P) or (H,)
    return dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit
