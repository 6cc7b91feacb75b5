"""Mamba-1 selective scan: Triton kernels, autograd Function and a plain-PyTorch reference.

Per channel d (D channels) and state n (N states), with diagonal real A (Mamba §3, S6):

    h_t[n] = exp(delta_t A[d, n]) h_{t-1}[n] + delta_t B_t[n] u_t
    y_t    = sum_n C_t[n] h_t[n] + D[d] u_t,     then  y_t * silu(z_t)

Hardware-aware design (Mamba §3.3): the expanded state (batch, D, L, N) never touches memory.

Forward: a sequential walk. A program owns (one sequence, BLOCK_D channels, all N states, one
time segment); its threads hold the state h (N, BLOCK_D) in registers, 16 or 32 states of a
channel per thread (one channel per lane up to N = 16, beyond that a few lanes share one), and
advance it one time step at a time (one exp and three FMAs per state element).

Time segments (issue 26): the walk is parallel over (sequence, channel block) only, so a few
long sequences leave the GPU idle (4.93 ms at L = 16K against 1.44 ms at 2K for the same
65,536 tokens on an H100). When batch x D x N is below what fills the GPU (``_n_segments``),
L is split into S segments of whole checkpoint blocks and the scan runs as a chunked scan:
  1. each segment walks from a zero state, writing its final local state and its total decay
     P = prod_t exp(delta_t A) (= exp(A sum_t delta_t); 0 when a document starts in it);
  2. ``_segment_combine_kernel`` walks the S segments: h_in[s + 1] = P[s] h_in[s] + h_loc[s];
  3. each segment walks again from its true entering state, writing y (and the checkpoints).
Pass 1 computes no y, so the split costs ~1.6x the walk's work spread over S times the
programs. With S = 1 (short L, or enough sequences) the single walk runs as before.

Backward, "walk" (the default since issue 26; ``bwd_impl="assoc"`` keeps the one before): a
reverse walk in the forward's layout. The forward (when gradients are needed) keeps the state
at every BLOCK_T = 64 boundary, (batch, D, L / BLOCK_T, N) fp32. A program owns (one sequence,
BLOCK_D channels, one segment) and walks its blocks from the last: it recomputes the block's
states at every KB = 4 step sub-block boundary into a small per-program scratch (L2), then for
each sub-block from the last recomputes its KB states into registers and steps backward through
them, carrying the adjoint  lam = a_{t+1} dh_{t+1}  (see the comment above the kernel). With
S > 1 segments a first pass walks only the adjoint of each segment from zero (one exp, two FMAs
per element and step) and a reverse combine, started at dL/d(last state), gives each segment
the adjoint entering from its right, like the forward's states.

Backward, "assoc": a program owns (one sequence, BLOCK_D channels), walks L in time blocks of
BLOCK_T and, inside a block, solves the linear recurrences with ``tl.associative_scan`` over time
on pairs (a, b) with combine (a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2), N in BLOCK_N slices,
recomputing each block's states from its checkpoint. 38 ms forward+backward against the
forward's 1.44 (26x) at D = 2048, N = 16, 65,536 tokens, 553 ms at N = 256 (H100, session 11).

Measured on an H100 (results/h100/scan_walk/README.md, `ssdbench bench scan`): at D = 2048,
N = 16, 65,536 tokens the walk backward takes forward+backward to 14.1 ms (L = 2K) against the
associative scan's 38.3 ms, still 9.4x the forward's 1.49 ms; with time segments the forward at
L = 16K (batch 4) takes 2.38 ms against 4.93 before. N > 16 is not yet measured.

Gradients: with  a_t h_{t-1} = h_t - b_t  every gradient is a local product:
    d delta_t = sum_n dh_t (h_t - b_t) A + sum_n dh_t B_t u_t
    dA[d, n]  = sum_t dh_t (h_t - b_t) delta_t
    dB_t[n]   = sum_d dh_t delta_t u_t,   dC_t[n] = sum_d h_t g_t,   du_t = sum_n dh_t delta_t B_t + D g_t
with the adjoint  dh_t = C_t g_t + a_{t+1} dh_{t+1}  (g = dL/dy before the gate).

Variable length (Mamba-2 §8.3): with ``seq_idx`` the decay a_t is 0 where seq_idx changes, so
the state restarts from zero at each document boundary, with no padding; a segment's total
decay is then 0 too, and the combines carry nothing across the boundary.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

from .triton_util import autotune, check_seq_idx_order, exp2_ftz, interpreting, softplus

MAX_N = 256  # largest state size N (the backward holds BLOCK_N slices; the ceiling is the brief's)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _linear_combine(a1, b1, a2, b2):
    # Composition of the affine maps h -> a1 h + b1 then h -> a2 h + b2 (first one earlier in time).
    return a1 * a2, a2 * b1 + b2


# The walk reads K = 8 time steps of u, delta, z as one (BLOCK_D, K) tile along contiguous memory
# and unpacks it into K per-step vectors with reshape / permute / split: Triton stages the
# tile through shared memory once, and every thread then holds its channel's K values in
# registers (a per-step load of (BLOCK_D,) values L apart made each warp touch 32 cache
# lines per step: ncu showed the L1 87 % busy and the kernel at 4 ms). The outputs go back
# the same way (join, then one tile store).
@triton.jit
def _halves(x, BD: tl.constexpr, K: tl.constexpr):
    """(BD, K) -> its first and second (BD, K/2) halves along time."""
    return tl.split(tl.permute(tl.reshape(x, (BD, 2, K // 2)), (0, 2, 1)))


@triton.jit
def _cols4(x, BD: tl.constexpr):
    """(BD, 4) -> its 4 columns, each (BD,)."""
    a, b = _halves(x, BD, 4)
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    return a0, a1, b0, b1


@triton.jit
def _cols8(x, BD: tl.constexpr):
    a, b = _halves(x, BD, 8)
    a0, a1, a2, a3 = _cols4(a, BD)
    b0, b1, b2, b3 = _cols4(b, BD)
    return a0, a1, a2, a3, b0, b1, b2, b3


@triton.jit
def _cat(a, b, BD: tl.constexpr, K: tl.constexpr):
    """Two (BD, K/2) tiles (or (BD,) vectors for K = 2) side by side along time: (BD, K)."""
    if K == 2:
        return tl.join(a, b)
    else:
        return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (BD, K))


@triton.jit
def _tile8(ys, BD: tl.constexpr):
    """A tuple of 8 (BD,) vectors -> the (BD, 8) tile."""
    q0 = _cat(_cat(ys[0], ys[1], BD, 2), _cat(ys[2], ys[3], BD, 2), BD, 4)
    q1 = _cat(_cat(ys[4], ys[5], BD, 2), _cat(ys[6], ys[7], BD, 2), BD, 4)
    return _cat(q0, q1, BD, 8)


# do_not_specialize: with A's strides unknown (not the constant 1) the compiler has no
# contiguous axis to vectorise A's load along, and lays the (NP, BLOCK_D) tiles out with the
# lanes along the channels: each thread then owns whole columns of states, so the sum over
# N for y_t stays inside a thread (with A's state axis contiguous, Triton spread N over 16
# lanes and every step paid 4 shuffle levels per channel; checked in the TTGIR for sm_90).
@triton.jit(do_not_specialize=["s_Ad", "s_An"])
def _selective_scan_fwd_walk_kernel(
    u_ptr, delta_ptr, A_ptr, BC_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, y_ptr, st_ptr, h0_ptr, P_ptr,
    DIM, N, L, DPG, n_chunks, NB, SEG,  # NB = batch: only an autotuning key; SEG: steps per time segment
    s_ub, s_ud, s_ul,
    s_db, s_dd, s_dl,
    s_Ad, s_An,
    s_cb, s_cg, s_cl,  # BC (batch, G, L, 2, NP) fp32, zero-padded: B_t = BC[.., t, 0], C_t = [.., t, 1]
    s_zb, s_zd, s_zl,
    s_yb, s_yd, s_yl,
    s_sb, s_sd, s_sc, s_sn,
    s_qb, s_ql,
    s_hb, s_hs, s_hd, s_hn,  # h0 and P: (batch, S, D, N) fp32 per-segment buffers
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr, SAVE_ALL: tl.constexpr, LOCAL: tl.constexpr, HAS_H0: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_D: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Forward as a sequential walk over time: the state h^T (NP, BLOCK_D) stays in registers
    and advances one step at a time, one exp and three FMAs per state element and step.

    (The first design ran tl.associative_scan over (BLOCK_D, N, BLOCK_T) tiles: each element
    paid the scan's shuffle levels, and blocks handed their state over through global memory:
    10 ms at D=2048, N=16, 65,536 tokens on an H100; this walk takes 1.44 ms.) Per block of
    K steps: u, delta, z are loaded as tiles and unpacked (above); delta's bias and softplus,
    the D skip and the gate act on whole tiles. The state is stored at every BLOCK_T boundary
    (the backward's checkpoints; BLOCK_T is a multiple of K) when SAVE_ALL, and after the
    last step in every case (slot n_chunks - 1, or slot 0 of a one-slot buffer without
    SAVE_ALL).

    Time segments (grid axis 2; one segment, SEG >= L, unless the launcher splits L): the
    program walks steps [pid_s SEG, min((pid_s + 1) SEG, L)). With LOCAL (pass 1 of the
    time-parallel forward) it starts from h = 0, writes no y, and stores the segment's local
    final state (slot pid_s of st_ptr, a (batch, S, D, N) buffer then) and its total decay
    P = prod_t exp(delta_t A) = exp(A sum_t delta_t), 0 if a document starts inside the
    segment or at its first step, to P_ptr. With HAS_H0 (pass 3) it starts from the entering
    state h0[pid_s] that the combine computed. SEG is a multiple of BLOCK_T, so the
    checkpoints of SAVE_ALL fall where the single walk puts them."""
    LOG2E: tl.constexpr = 1.4426950408889634
    tl.static_assert(K == 8, "the tile unpacking (_cols8, _tile8) is written for K = 8")
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    t_lo = pid_s * SEG
    t_hi = tl.minimum(t_lo + SEG, L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    d_mask = offs_d < DIM
    offs_n = tl.arange(0, NP)  # (NP,)
    n_mask = offs_n < N
    if IDX64:  # element offsets past 2^31 within a sequence (D L >= 2^31: D = 4096 at L = 2^20)
        offs_k = tl.arange(0, K).to(tl.int64)  # (K,)
        offs_d64 = offs_d.to(tl.int64)  # (BLOCK_D,)
    else:  # 32-bit index math (the launcher checks the extents; 64-bit changed ptxas' allocation)
        offs_k = tl.arange(0, K)  # (K,)
        offs_d64 = offs_d
    mnd = n_mask[:, None] & d_mask[None, :]  # (NP, BLOCK_D)
    grp = (pid_d * BLOCK_D) // DPG  # the wrapper keeps a block inside one B/C group

    # exp(delta A) = exp2(delta A log2 e): log2 e folded into A once
    A2 = tl.load(A_ptr + offs_n[:, None] * s_An + offs_d[None, :] * s_Ad, mask=mnd, other=0.0).to(tl.float32) * LOG2E  # (NP, BLOCK_D)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)  # (BLOCK_D,)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)  # (BLOCK_D,)
    u_p = u_ptr + pid_b * s_ub + offs_d64[:, None] * s_ud  # (BLOCK_D, 1)
    dl_p = delta_ptr + pid_b * s_db + offs_d64[:, None] * s_dd
    z_p = z_ptr + pid_b * s_zb + offs_d64[:, None] * s_zd
    y_p = y_ptr + pid_b * s_yb + offs_d64[:, None] * s_yd
    # B_t and C_t from one fp32 row of 2 NP values: constant offsets from one address per
    # step and no mask (read from the (batch, G, N, L) inputs, the bf16 loads, conversions and
    # per-state addresses were 180 of 420 instructions per step)
    if IDX64:
        B_p = BC_ptr + pid_b * s_cb + grp.to(tl.int64) * s_cg + offs_n  # (NP,)
    else:
        B_p = BC_ptr + pid_b * s_cb + grp * s_cg + offs_n  # (NP,)
    C_p = B_p + NP
    st_p = st_ptr + pid_b * s_sb + offs_n[:, None] * s_sn + offs_d64[None, :] * s_sd  # (NP, BLOCK_D)

    h0_off = pid_b * s_hb + pid_s * s_hs + offs_n[:, None] * s_hn + offs_d[None, :] * s_hd  # (NP, BLOCK_D)
    if HAS_H0:
        h = tl.load(h0_ptr + h0_off, mask=mnd, other=0.0)  # (NP, BLOCK_D) the true entering state
    else:
        h = tl.zeros([NP, BLOCK_D], dtype=tl.float32)  # (NP, BLOCK_D) = h^T
    if LOCAL:
        dt_sum = tl.zeros([BLOCK_D], dtype=tl.float32)  # (BLOCK_D,) sum of delta over the segment
        alive = tl.full([BLOCK_D], 1.0, tl.float32)  # 0 once a document starts in the segment
    for t0 in range(t_lo, t_hi, K):
        t = t0 + offs_k  # (K,)
        m = d_mask[:, None] & (t < t_hi)[None, :]  # (BLOCK_D, K)
        u = tl.load(u_p + t[None, :] * s_ul, mask=m, other=0.0).to(tl.float32)  # (BLOCK_D, K)
        dt = tl.load(dl_p + t[None, :] * s_dl, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt = dt + bias[:, None]
        if SOFTPLUS:
            dt = softplus(dt)
        dt = tl.where(m, dt, 0.0)  # steps past L: decay 1, no input (the state is kept)
        if HAS_SEQ:
            q = tl.load(seq_ptr + pid_b * s_qb + t * s_ql, mask=t < L, other=0)  # (K,)
            q_prev = tl.load(seq_ptr + pid_b * s_qb + (t - 1) * s_ql, mask=(t >= 1) & (t < L), other=0)
            keep = tl.where((q == q_prev) | (t == 0), 1.0, 0.0)  # (K,) 0 where a document starts
            keeps = _cols8(keep[None, :] + tl.zeros([BLOCK_D, K], dtype=tl.float32), BLOCK_D)
            if LOCAL:
                alive = alive * tl.min(tl.where(t < t_hi, keep, 1.0), axis=0)
        if LOCAL:
            dt_sum += tl.sum(dt, axis=1)
        dts = _cols8(dt, BLOCK_D)
        dtus = _cols8(dt * u, BLOCK_D)
        ys = ()
        for k in tl.static_range(K):
            Bt = tl.load(B_p + (t0 + k) * s_cl)  # (NP,) rows past L: the launcher's zero padding
            a = exp2_ftz(dts[k][None, :] * A2)  # (NP, BLOCK_D)
            if HAS_SEQ:
                a = a * keeps[k][None, :]  # a new document starts from a zero state
            h = a * h + Bt[:, None] * dtus[k][None, :]  # (NP, BLOCK_D)
            if not LOCAL:  # pass 1 of the time-parallel forward needs the state only
                Ct = tl.load(C_p + (t0 + k) * s_cl)  # (NP,) (L is padded to a multiple of 16 steps)
                ys = ys + (tl.sum(h * Ct[:, None], axis=0),)  # (BLOCK_D,)
        if not LOCAL:
            y = _tile8(ys, BLOCK_D)  # (BLOCK_D, K)
            if HAS_D:
                y += Dv[:, None] * u
            if HAS_Z:
                z = tl.load(z_p + t[None, :] * s_zl, mask=m, other=0.0).to(tl.float32)
                y = y * z * tl.sigmoid(z)
            tl.store(y_p + t[None, :] * s_yl, y.to(y_ptr.dtype.element_ty), mask=m)
            if SAVE_ALL:
                t_end = tl.minimum(t0 + K, L)
                if (t_end % BLOCK_T == 0) | (t_end == L):  # the checkpoint of block (t_end - 1) // BLOCK_T
                    tl.store(st_p + ((t_end - 1) // BLOCK_T) * s_sc, h, mask=mnd)
    if LOCAL:
        # P = prod_t exp(delta_t A) = exp2(A log2(e) sum_t delta_t): one add per channel and
        # step instead of one multiply per state element and step
        P = exp2_ftz(A2 * dt_sum[None, :]) * alive[None, :]  # (NP, BLOCK_D)
        tl.store(P_ptr + h0_off, P, mask=mnd)
        tl.store(st_p + pid_s * s_sc, h, mask=mnd)
    elif not SAVE_ALL:
        tl.store(st_p + pid_s * s_sc, h, mask=mnd)  # segment pid_s's final state (the wrapper reads the last)


# The associative-scan backward (bwd_impl="assoc"; the only one before issue 26), kept so the
# two can be timed in one GPU run (ssdbench bench scan --bwd-impl walk assoc).
@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, st_ptr, dy_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, lam_ptr,
    DIM, N, L, DPG, n_chunks,
    s_ub, s_ud, s_ul,
    s_db, s_dd, s_dl,
    s_Ad, s_An,
    s_Bb, s_Bg, s_Bn, s_Bl,
    s_Cb, s_Cg, s_Cn, s_Cl,
    s_zb, s_zd, s_zl,
    s_ob, s_od, s_ol,  # dy, du, ddelta, dz: contiguous (batch, D, L)
    s_sb, s_sd, s_sc, s_sn,  # saved block-boundary states (batch, D, n_chunks, N)
    s_qb, s_ql,
    s_gb, s_gg, s_gn, s_gl,  # dB, dC fp32 accumulators (batch, G, N, L)
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_DLAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    d_mask = offs_d < DIM
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_tl = tl.arange(0, BLOCK_T)
    is_first = (offs_tl == 0)[None, None, :]
    is_last = (offs_tl == BLOCK_T - 1)[None, None, :]
    grp = (pid_d * BLOCK_D) // DPG

    u_base = u_ptr + pid_b * s_ub
    dl_base = delta_ptr + pid_b * s_db
    B_base = B_ptr + pid_b * s_Bb + grp * s_Bg
    C_base = C_ptr + pid_b * s_Cb + grp * s_Cg
    dB_base = dB_ptr + pid_b * s_gb + grp * s_gg
    dC_base = dC_ptr + pid_b * s_gb + grp * s_gg
    st_base = st_ptr + pid_b * s_sb
    # Small per-(sequence, channel) fp32 buffers: lam (batch, 2, D, N), dA (batch, D, N), dD/dbias (batch, D).
    lam_base = lam_ptr + pid_b * DIM * 2 * N
    dA_base = dA_ptr + pid_b * DIM * N
    dlast_base = dlast_ptr + pid_b * DIM * N

    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)

    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc  # walk the time blocks backwards
        offs_t = c * BLOCK_T + offs_tl
        c_dn = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.int32) + c  # (BLOCK_D, BLOCK_N)
        t_mask = offs_t < L
        tn_mask = (offs_t + 1) < L
        m2 = d_mask[:, None] & t_mask[None, :]  # (BLOCK_D, BLOCK_T)
        m2n = d_mask[:, None] & tn_mask[None, :]
        u = tl.load(u_base + offs_d[:, None] * s_ud + offs_t[None, :] * s_ul, mask=m2, other=0.0).to(tl.float32)
        dt_raw = tl.load(dl_base + offs_d[:, None] * s_dd + offs_t[None, :] * s_dl, mask=m2, other=0.0).to(tl.float32)
        # delta one step ahead, for the decay a_{t+1} that carries dh_{t+1} back to h_t.
        dtn = tl.load(dl_base + offs_d[:, None] * s_dd + (offs_t[None, :] + 1) * s_dl, mask=m2n, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt_raw = dt_raw + bias[:, None]
            dtn = dtn + bias[:, None]
        if SOFTPLUS:
            dt = softplus(dt_raw)
            dtn = softplus(dtn)
        else:
            dt = dt_raw
        dt = tl.where(m2, dt, 0.0)  # (BLOCK_D, BLOCK_T)
        dtn = tl.where(m2n, dtn, 0.0)  # (BLOCK_D, BLOCK_T)
        dtu = dt * u
        if HAS_SEQ:
            q = tl.load(seq_ptr + pid_b * s_qb + offs_t * s_ql, mask=t_mask, other=0)
            q_prev = tl.load(seq_ptr + pid_b * s_qb + (offs_t - 1) * s_ql, mask=t_mask & (offs_t > 0), other=0)
            q_next = tl.load(seq_ptr + pid_b * s_qb + (offs_t + 1) * s_ql, mask=tn_mask, other=0)
            reset = ((q != q_prev) & t_mask & (offs_t > 0))[None, None, :]
            reset_next = ((q_next != q) & tn_mask)[None, None, :]
        o_off = offs_d[:, None] * s_od + offs_t[None, :] * s_ol  # (BLOCK_D, BLOCK_T)
        dy = tl.load(dy_ptr + pid_b * s_ob + o_off, mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + pid_b * s_zb + offs_d[:, None] * s_zd + offs_t[None, :] * s_zl,
                        mask=m2, other=0.0).to(tl.float32)
            sig_z = tl.sigmoid(z)
            g = dy * z * sig_z  # dL/dy before the gate
        else:
            g = dy
        if HAS_D:
            y_pre = Dv[:, None] * u
            du = Dv[:, None] * g
        else:
            y_pre = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
            du = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
        ddt = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + offs_n0
            n_mask = offs_n < N
            mdn = d_mask[:, None] & n_mask[None, :]
            mnt = n_mask[:, None] & t_mask[None, :]
            A = tl.load(A_ptr + offs_d[:, None] * s_Ad + offs_n[None, :] * s_An, mask=mdn, other=0.0).to(tl.float32)
            Bt = tl.load(B_base + offs_n[:, None] * s_Bn + offs_t[None, :] * s_Bl, mask=mnt, other=0.0).to(tl.float32)
            Ct = tl.load(C_base + offs_n[:, None] * s_Cn + offs_t[None, :] * s_Cl, mask=mnt, other=0.0).to(tl.float32)
            dn_off = offs_d[:, None] * N + offs_n[None, :]  # (BLOCK_D, BLOCK_N) in (D, N) buffers
            # 1. Recompute the block's states from the saved entering state.
            h0 = tl.load(st_base + (c - 1) * s_sc + offs_d[:, None] * s_sd + offs_n[None, :] * s_sn,
                         mask=mdn & (c_dn > 0), other=0.0)
            a = tl.exp(dt[:, None, :] * A[:, :, None])  # (BLOCK_D, BLOCK_N, BLOCK_T)
            if HAS_SEQ:
                a = tl.where(reset, 0.0, a)
            b = dtu[:, None, :] * Bt[None, :, :]  # (BLOCK_D, BLOCK_N, BLOCK_T) true input term
            _, h = tl.associative_scan((a, b + tl.where(is_first, a * h0[:, :, None], 0.0)), 2, _linear_combine)
            y_pre += tl.sum(h * Ct[None, :, :], axis=1)
            # 2. Adjoint, reverse in time: dh_t = C_t g_t + a_{t+1} dh_{t+1}; the later blocks'
            #    contribution a_{t1} dh_{t1} (t1 = next block's first step) enters at the last slot.
            lam = tl.load(lam_base + ((c + 1) % 2) * DIM * N + dn_off, mask=mdn & (c_dn < n_chunks - 1), other=0.0)
            if HAS_DLAST:
                lam += tl.load(dlast_base + dn_off, mask=mdn & (c_dn == n_chunks - 1), other=0.0)
            cg = Ct[None, :, :] * g[:, None, :] + tl.where(is_last, lam[:, :, None], 0.0)
            an = tl.exp(dtn[:, None, :] * A[:, :, None])  # a_{t+1}
            if HAS_SEQ:
                an = tl.where(reset_next, 0.0, an)
            _, dh = tl.associative_scan((an, cg), 2, _linear_combine, reverse=True)  # (BLOCK_D, BLOCK_N, BLOCK_T)
            lam_new = tl.sum(tl.where(is_first, a * dh, 0.0), axis=2)  # (BLOCK_D, BLOCK_N)
            tl.store(lam_base + (c % 2) * DIM * N + dn_off, lam_new, mask=mdn)
            # 3. Local gradients; a_t h_{t-1} = h_t - b_t avoids dividing by a.
            dh_ah = dh * (h - b)  # (BLOCK_D, BLOCK_N, BLOCK_T)
            dhB = tl.sum(dh * Bt[None, :, :], axis=1)  # (BLOCK_D, BLOCK_T)
            ddt += tl.sum(dh_ah * A[:, :, None], axis=1) + dhB * u
            du += dhB * dt
            dA_c = tl.sum(dh_ah * dt[:, None, :], axis=2)  # (BLOCK_D, BLOCK_N)
            dA_c += tl.load(dA_base + dn_off, mask=mdn & (c_dn < n_chunks - 1), other=0.0)
            tl.store(dA_base + dn_off, dA_c, mask=mdn)
            dB_c = tl.sum(dh * dtu[:, None, :], axis=0)  # (BLOCK_N, BLOCK_T), summed over this block's channels
            dC_c = tl.sum(h * g[:, None, :], axis=0)  # (BLOCK_N, BLOCK_T)
            g_off = offs_n[:, None] * s_gn + offs_t[None, :] * s_gl
            tl.atomic_add(dB_base + g_off, dB_c, mask=mnt)
            tl.atomic_add(dC_base + g_off, dC_c, mask=mnt)
        tl.debug_barrier()
        if HAS_Z:
            dz = dy * y_pre * sig_z * (1.0 + z * (1.0 - sig_z))
            tl.store(dz_ptr + pid_b * s_ob + o_off, dz.to(dz_ptr.dtype.element_ty), mask=m2)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(dt_raw)
        ddt = tl.where(m2, ddt, 0.0)
        tl.store(ddelta_ptr + pid_b * s_ob + o_off, ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)
        tl.store(du_ptr + pid_b * s_ob + o_off, du.to(du_ptr.dtype.element_ty), mask=m2)
        dD_acc += tl.sum(g * u, axis=1)
        dbias_acc += tl.sum(ddt, axis=1)
    tl.store(dD_ptr + pid_b * DIM + offs_d, dD_acc, mask=d_mask)
    tl.store(dbias_ptr + pid_b * DIM + offs_d, dbias_acc, mask=d_mask)


@triton.jit
def _segment_combine_kernel(loc_ptr, P_ptr, init_ptr, out_ptr, S, M, s_b, s_s,
                            HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2 of the time-parallel scan: the sequential combine over S segments.

    loc, P, out: (batch, S, M) fp32 with M = D N flattened (element (d, n) of a segment's
    state); init: (batch, M). Forward (REVERSE false): out[s] = the state entering segment s,
    out[0] = 0 and out[s + 1] = P[s] out[s] + loc[s] (loc: the segment's final state from a
    zero start). Backward (REVERSE): the same recurrence from the last segment down, started
    from init = dL/d(last state); out[s] is then the adjoint a_{t+1} dh_{t+1} entering segment
    s from its right, and loc[s] the segment's a_{t0} dh_{t0} from a zero adjoint.
    S is at most a few hundred and M elements are independent: one program per BLOCK elements
    walks the segments (a few microseconds, against the passes' milliseconds)."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = offs < M
    base = pid_b * s_b + offs
    if HAS_INIT:
        h = tl.load(init_ptr + pid_b * M + offs, mask=mask, other=0.0)  # (BLOCK,)
    else:
        h = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, S):
        if REVERSE:
            s = S - 1 - i
        else:
            s = i
        tl.store(out_ptr + base + s * s_s, h, mask=mask)
        h = tl.load(P_ptr + base + s * s_s, mask=mask, other=0.0) * h \
            + tl.load(loc_ptr + base + s * s_s, mask=mask, other=0.0)


# Backward as a reverse walk (bwd_impl="walk"). The layout is the forward walk's: a program owns
# (one sequence, BLOCK_D channels, one time segment), holds (NP, BLOCK_D) tiles with the lanes
# along the channels, and steps through time; no (BLOCK_D, N, BLOCK_T) tile and no
# associative scan. Reverse order needs every state of a block in reverse: the forward's
# checkpoints are BLOCK_T = 64 steps apart (a denser set would cost (batch, D, L / 16, N)
# fp32: 8.6 GB at N = 256 and 65,536 tokens), so a block is recomputed in two levels:
#   R: walk the block forward from its checkpoint and store the state at every KB-step
#      sub-block boundary in a per-program scratch (BLOCK_T / KB states of (NP, BLOCK_D) fp32:
#      16 KB at N = 16, BLOCK_D = 16, KB = 4; written and read back within the block, so it
#      should stay in L2; 1 / KB of the traffic a per-step scratch would cost: that one, at
#      8 bytes per state element and step, would move 17 GB at the benchmark's shape);
#   B: for each sub-block from the last, reload its entering state, recompute its KB states
#      into registers (a tuple, static indices) and walk them backward:
#         dh_t  = C_t g_t + lam,   lam <- a_t dh_t          (lam = a_{t+1} dh_{t+1} on entry)
#         w     = dh_t a_t h_{t-1}  (= dh_t (h_t - b_t))
#         d delta_t = ln2 sum_n w A2 + u_t sum_n dh_t B_t,  du_t = delta_t sum_n dh_t B_t + D g_t
#         dA   += w delta_t (registers),  dB_t = sum_d dh_t delta_t u_t,  dC_t = sum_d h_t g_t
# Per state element and step that is ~3 exps and ~16 FMAs (the forward: 1 exp, 4 FMAs) and two
# sums over the program's channels (dB_t, dC_t: across lanes), then one fp32 atomic add of
# NP values per step and program for each of dB_t and dC_t (channels of other programs of the
# same B/C group add into the same row: BLOCK_D x fewer atomics than mamba_ssm's CUDA
# backward, which adds per channel). No state of the block goes to HBM except the scratch;
# u, delta, z, dy are read as (BLOCK_D, KB) tiles like the forward's.
@triton.jit
def _tile4(ys, BD: tl.constexpr):
    """A tuple of 4 (BD,) vectors -> the (BD, 4) tile."""
    return _cat(_cat(ys[0], ys[1], BD, 2), _cat(ys[2], ys[3], BD, 2), BD, 4)


@triton.jit
def _bwd_tiles(u_ptr, delta_ptr, z_ptr, dy_ptr, bias, b_off_u, b_off_dl, b_off_z, b_off_o,
               offs_d, d_mask, t, t_hi, s_ud, s_ul, s_dd, s_dl, s_zd, s_zl, s_od, s_ol,
               HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LOAD_U: tl.constexpr):
    """The (BLOCK_D, KB) tiles of one sub-block: u (if LOAD_U, else 0), delta (after bias,
    softplus; 0 past the segment), its raw value (for softplus' derivative), z and
    g = dL/dy before the gate."""
    m = d_mask[:, None] & (t < t_hi)[None, :]  # (BLOCK_D, KB)
    if LOAD_U:
        u = tl.load(u_ptr + b_off_u + offs_d[:, None] * s_ud + t[None, :] * s_ul, mask=m, other=0.0).to(tl.float32)
    else:
        u = 0.0  # unused (pass 1 of the time-parallel backward)
    dt_raw = tl.load(delta_ptr + b_off_dl + offs_d[:, None] * s_dd + t[None, :] * s_dl, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt_raw = dt_raw + bias[:, None]
    if SOFTPLUS:
        dt = softplus(dt_raw)
    else:
        dt = dt_raw
    dt = tl.where(m, dt, 0.0)  # (BLOCK_D, KB) steps past the segment: decay 1, no input
    dy = tl.load(dy_ptr + b_off_o + offs_d[:, None] * s_od + t[None, :] * s_ol, mask=m, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b_off_z + offs_d[:, None] * s_zd + t[None, :] * s_zl, mask=m, other=0.0).to(tl.float32)
        g = dy * z * tl.sigmoid(z)  # (BLOCK_D, KB)
    else:
        z = dy
        g = dy
    return m, u, dt, dt_raw, z, dy, g


@triton.jit
def _keep(seq_ptr, q_base, s_ql, t, L):
    """(KB,) 1.0, or 0.0 at a step where a new document starts (seq_idx changes)."""
    q = tl.load(seq_ptr + q_base + t * s_ql, mask=t < L, other=0)
    q_prev = tl.load(seq_ptr + q_base + (t - 1) * s_ql, mask=(t >= 1) & (t < L), other=0)
    return tl.where((q == q_prev) | (t == 0), 1.0, 0.0)


@triton.jit(do_not_specialize=["s_Ad", "s_An"])
def _selective_scan_bwd_walk_kernel(
    u_ptr, delta_ptr, A_ptr, BC_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, st_ptr, dy_ptr, lam_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dBC_ptr, dA_ptr, dDb_ptr, scr_ptr,
    DIM, N, L, DPG, SEG, NB,  # NB = batch: only an autotuning key
    s_ub, s_ud, s_ul,
    s_db, s_dd, s_dl,
    s_Ad, s_An,
    s_cb, s_cg, s_cl,  # BC and dBC: (batch, G, Lp, 2, NP) fp32 (B_t = [.., t, 0], C_t = [.., t, 1])
    s_zb, s_zd, s_zl,
    s_ob, s_od, s_ol,  # dy, du, ddelta, dz: one set of strides (batch, D, L)
    s_sb, s_sd, s_sc, s_sn,  # forward checkpoints (batch, D, n_chunks, N)
    s_qb, s_ql,
    s_lb, s_ls, s_ld, s_ln,  # lam_in and dA partials: (batch, S, D, N) fp32
    s_eb, s_es,  # dD, d delta_bias partials: (batch, S, 2, D) fp32
    s_xb, s_xs, s_xj, s_xn,  # scratch (batch, S, BLOCK_T / KB, NP, D) fp32, D contiguous
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_LAM: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_D: tl.constexpr, NP: tl.constexpr, KB: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Backward of one (sequence, BLOCK_D channels, time segment) as a reverse walk (above)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    NSUB: tl.constexpr = BLOCK_T // KB
    tl.static_assert(KB == 4, "the tile unpacking (_cols4, _tile4) is written for KB = 4")
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    t_lo = pid_s * SEG  # a multiple of BLOCK_T
    t_hi = tl.minimum(t_lo + SEG, L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    d_mask = offs_d < DIM
    offs_n = tl.arange(0, NP)  # (NP,)
    n_mask = offs_n < N
    if IDX64:  # as the forward's
        offs_k = tl.arange(0, KB).to(tl.int64)  # (KB,)
        offs_d64 = offs_d.to(tl.int64)  # (BLOCK_D,)
    else:
        offs_k = tl.arange(0, KB)
        offs_d64 = offs_d
    mnd = n_mask[:, None] & d_mask[None, :]  # (NP, BLOCK_D)
    grp = (pid_d * BLOCK_D) // DPG

    A2 = tl.load(A_ptr + offs_n[:, None] * s_An + offs_d[None, :] * s_Ad, mask=mnd, other=0.0).to(tl.float32) * LOG2E  # (NP, BLOCK_D)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)  # (BLOCK_D,)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)  # (BLOCK_D,)
    else:
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    b_off_u = pid_b * s_ub
    b_off_dl = pid_b * s_db
    b_off_z = pid_b * s_zb
    b_off_o = pid_b * s_ob
    q_base = pid_b * s_qb
    if IDX64:
        grp_off = grp.to(tl.int64) * s_cg
        pid_s64 = pid_s.to(tl.int64)
    else:
        grp_off = grp * s_cg
        pid_s64 = pid_s
    B_p = BC_ptr + pid_b * s_cb + grp_off + offs_n  # (NP,)
    dB_p = dBC_ptr + pid_b * s_cb + grp_off + offs_n  # (NP,)
    st_p = st_ptr + pid_b * s_sb + offs_n[:, None] * s_sn + offs_d64[None, :] * s_sd  # (NP, BLOCK_D)
    scr_p = scr_ptr + pid_b * s_xb + pid_s64 * s_xs + offs_n[:, None] * s_xn + offs_d64[None, :]  # (NP, BLOCK_D)
    seg_off = pid_b * s_lb + pid_s64 * s_ls + offs_n[:, None] * s_ln + offs_d64[None, :] * s_ld  # (NP, BLOCK_D)
    if HAS_LAM:  # a_{t+1} dh_{t+1} entering from the right: dL/d(last state), or the combine's
        lam = tl.load(lam_ptr + seg_off, mask=mnd, other=0.0)  # (NP, BLOCK_D)
    else:
        lam = tl.zeros([NP, BLOCK_D], dtype=tl.float32)
    dA = tl.zeros([NP, BLOCK_D], dtype=tl.float32)  # (NP, BLOCK_D)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    one = tl.full([KB], 1.0, tl.float32)  # (KB,) keep without seq_idx

    c_lo = t_lo // BLOCK_T
    c_hi = tl.cdiv(t_hi, BLOCK_T)
    for cc in range(c_lo, c_hi):
        c = c_hi - 1 - (cc - c_lo)  # the segment's blocks from the last
        bt_lo = c * BLOCK_T
        n_sub = tl.cdiv(tl.minimum(bt_lo + BLOCK_T, t_hi) - bt_lo, KB)  # sub-blocks holding steps
        # R: the block's states at its sub-block boundaries, from the forward's checkpoint.
        first = (tl.zeros([NP, BLOCK_D], dtype=tl.int32) + c) == 0  # (NP, BLOCK_D) block 0 starts from 0
        h = tl.load(st_p + (c - 1) * s_sc, mask=mnd & (first == 0), other=0.0)  # (NP, BLOCK_D)
        tl.store(scr_p, h, mask=mnd)
        for j in range(1, n_sub):
            t = bt_lo + (j - 1) * KB + offs_k  # (KB,)
            m = d_mask[:, None] & (t < t_hi)[None, :]  # (BLOCK_D, KB)
            u = tl.load(u_ptr + b_off_u + offs_d64[:, None] * s_ud + t[None, :] * s_ul, mask=m, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + b_off_dl + offs_d64[:, None] * s_dd + t[None, :] * s_dl, mask=m, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias[:, None]
            if SOFTPLUS:
                dt = softplus(dt)
            dt = tl.where(m, dt, 0.0)
            if HAS_SEQ:
                keep = _keep(seq_ptr, q_base, s_ql, t, L)
            else:
                keep = one
            keeps = _cols4(keep[None, :] + tl.zeros([BLOCK_D, KB], dtype=tl.float32), BLOCK_D)
            dts = _cols4(dt, BLOCK_D)
            dtus = _cols4(dt * u, BLOCK_D)
            for k in tl.static_range(KB):
                Bt = tl.load(B_p + (bt_lo + (j - 1) * KB + k) * s_cl)  # (NP,)
                a = exp2_ftz(dts[k][None, :] * A2) * keeps[k][None, :]  # (NP, BLOCK_D)
                h = a * h + Bt[:, None] * dtus[k][None, :]
            tl.store(scr_p + j * s_xj, h, mask=mnd)
        tl.debug_barrier()
        # B: the sub-blocks from the last, each recomputed into registers and walked backward.
        for jj in range(0, n_sub):
            j = n_sub - 1 - jj
            tb = bt_lo + j * KB
            t = tb + offs_k  # (KB,)
            h_in = tl.load(scr_p + j * s_xj, mask=mnd, other=0.0)  # (NP, BLOCK_D)
            m, u, dt, dt_raw, z, dy, g = _bwd_tiles(
                u_ptr, delta_ptr, z_ptr, dy_ptr, bias, b_off_u, b_off_dl, b_off_z, b_off_o,
                offs_d64, d_mask, t, t_hi, s_ud, s_ul, s_dd, s_dl, s_zd, s_zl, s_od, s_ol,
                HAS_Z, HAS_BIAS, SOFTPLUS, True)
            if HAS_SEQ:
                keep = _keep(seq_ptr, q_base, s_ql, t, L)
            else:
                keep = one
            keeps = _cols4(keep[None, :] + tl.zeros([BLOCK_D, KB], dtype=tl.float32), BLOCK_D)
            dts = _cols4(dt, BLOCK_D)
            dtus = _cols4(dt * u, BLOCK_D)
            us = _cols4(u, BLOCK_D)
            gs = _cols4(g, BLOCK_D)
            # forward over the sub-block: its KB states in registers
            hs = ()
            hk = h_in
            for k in tl.static_range(KB):
                Bt = tl.load(B_p + (tb + k) * s_cl)  # (NP,)
                a = exp2_ftz(dts[k][None, :] * A2) * keeps[k][None, :]
                hk = a * hk + Bt[:, None] * dtus[k][None, :]  # (NP, BLOCK_D)
                hs = hs + (hk,)
            # backward over the sub-block
            ddts = ()
            dus = ()
            yps = ()
            for r in tl.static_range(KB - 1, -1, -1):  # the sub-block's steps from the last
                Bt = tl.load(B_p + (tb + r) * s_cl)  # (NP,)
                Ct = tl.load(B_p + NP + (tb + r) * s_cl)  # (NP,)
                a = exp2_ftz(dts[r][None, :] * A2) * keeps[r][None, :]  # (NP, BLOCK_D) a_t
                if r == 0:
                    h_prev = h_in
                else:
                    h_prev = hs[r - 1]
                dh = Ct[:, None] * gs[r][None, :] + lam  # (NP, BLOCK_D)
                w = dh * a * h_prev  # dh_t a_t h_{t-1}
                dA += w * dts[r][None, :]
                dhB = tl.sum(dh * Bt[:, None], axis=0)  # (BLOCK_D,)
                ddts = (tl.sum(w * A2, axis=0) * LN2 + dhB * us[r],) + ddts
                dus = (dhB * dts[r],) + dus
                yps = (tl.sum(hs[r] * Ct[:, None], axis=0),) + yps
                dB_t = tl.sum(dh * dtus[r][None, :], axis=1)  # (NP,) over this program's channels
                dC_t = tl.sum(hs[r] * gs[r][None, :], axis=1)  # (NP,)
                live = n_mask & ((offs_n * 0 + tb + r) < t_hi)  # (NP,) (a tensor: the interpreter rejects scalar masks)
                tl.atomic_add(dB_p + (tb + r) * s_cl, dB_t, mask=live, sem="relaxed")
                tl.atomic_add(dB_p + NP + (tb + r) * s_cl, dC_t, mask=live, sem="relaxed")
                lam = a * dh
            ddt = _tile4(ddts, BLOCK_D)  # (BLOCK_D, KB)
            du = _tile4(dus, BLOCK_D)
            o_off = b_off_o + offs_d64[:, None] * s_od + t[None, :] * s_ol  # (BLOCK_D, KB)
            if HAS_D:
                du += Dv[:, None] * g
            if HAS_Z:
                y_pre = _tile4(yps, BLOCK_D)
                if HAS_D:
                    y_pre += Dv[:, None] * u
                sig_z = tl.sigmoid(z)
                dz = dy * y_pre * sig_z * (1.0 + z * (1.0 - sig_z))
                tl.store(dz_ptr + o_off, dz.to(dz_ptr.dtype.element_ty), mask=m)
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(dt_raw)
            ddt = tl.where(m, ddt, 0.0)
            tl.store(ddelta_ptr + o_off, ddt.to(ddelta_ptr.dtype.element_ty), mask=m)
            tl.store(du_ptr + o_off, du.to(du_ptr.dtype.element_ty), mask=m)
            dD_acc += tl.sum(g * u, axis=1)
            dbias_acc += tl.sum(ddt, axis=1)
        tl.debug_barrier()  # the next block's R overwrites the scratch this block's B read
    tl.store(dA_ptr + seg_off, dA, mask=mnd)  # this segment's sum_t dh_t a_t h_{t-1} delta_t
    e_off = pid_b * s_eb + pid_s * s_es + offs_d
    tl.store(dDb_ptr + e_off, dD_acc, mask=d_mask)
    tl.store(dDb_ptr + e_off + DIM, dbias_acc, mask=d_mask)


@triton.jit(do_not_specialize=["s_Ad", "s_An"])
def _selective_scan_bwd_seg_kernel(
    delta_ptr, A_ptr, BC_ptr, z_ptr, bias_ptr, seq_ptr, dy_ptr, mu_ptr, P_ptr,
    DIM, N, L, DPG, SEG, NB,
    s_db, s_dd, s_dl,
    s_Ad, s_An,
    s_cb, s_cg, s_cl,
    s_zb, s_zd, s_zl,
    s_ob, s_od, s_ol,
    s_qb, s_ql,
    s_lb, s_ls, s_ld, s_ln,  # mu and P: (batch, S, D, N) fp32
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_D: tl.constexpr, NP: tl.constexpr, KB: tl.constexpr,
):
    """Pass 1 of the time-parallel backward: the adjoint alone, walked backward over a segment
    from lam = 0 (dh_t = C_t g_t + lam, lam <- a_t dh_t: one exp and two FMAs per state
    element and step, no state recompute), giving mu = the segment's a_{t0} dh_{t0} for a
    zero adjoint from the right, and the segment's total decay P (as the forward's pass 1)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    tl.static_assert(KB == 4, "the tile unpacking is written for KB = 4")
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    t_lo = pid_s * SEG
    t_hi = tl.minimum(t_lo + SEG, L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    d_mask = offs_d < DIM
    offs_n = tl.arange(0, NP)
    n_mask = offs_n < N
    if IDX64:
        offs_k = tl.arange(0, KB).to(tl.int64)
        offs_d64 = offs_d.to(tl.int64)
    else:
        offs_k = tl.arange(0, KB)
        offs_d64 = offs_d
    mnd = n_mask[:, None] & d_mask[None, :]  # (NP, BLOCK_D)
    grp = (pid_d * BLOCK_D) // DPG
    A2 = tl.load(A_ptr + offs_n[:, None] * s_An + offs_d[None, :] * s_Ad, mask=mnd, other=0.0).to(tl.float32) * LOG2E
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if IDX64:
        C_p = BC_ptr + pid_b * s_cb + grp.to(tl.int64) * s_cg + NP + offs_n  # (NP,)
    else:
        C_p = BC_ptr + pid_b * s_cb + grp * s_cg + NP + offs_n  # (NP,)
    lam = tl.zeros([NP, BLOCK_D], dtype=tl.float32)  # (NP, BLOCK_D)
    dt_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    alive = tl.full([BLOCK_D], 1.0, tl.float32)
    one = tl.full([KB], 1.0, tl.float32)
    n_tiles = tl.cdiv(t_hi - t_lo, KB)
    for jj in range(0, n_tiles):
        tb = t_lo + (n_tiles - 1 - jj) * KB
        t = tb + offs_k  # (KB,)
        m, _, dt, dt_raw, z, dy, g = _bwd_tiles(
            dy_ptr, delta_ptr, z_ptr, dy_ptr, bias, 0, pid_b * s_db, pid_b * s_zb, pid_b * s_ob,
            offs_d64, d_mask, t, t_hi, s_od, s_ol, s_dd, s_dl, s_zd, s_zl, s_od, s_ol,
            HAS_Z, HAS_BIAS, SOFTPLUS, False)
        if HAS_SEQ:
            keep = _keep(seq_ptr, pid_b * s_qb, s_ql, t, L)
            alive = alive * tl.min(tl.where(t < t_hi, keep, 1.0), axis=0)
        else:
            keep = one
        keeps = _cols4(keep[None, :] + tl.zeros([BLOCK_D, KB], dtype=tl.float32), BLOCK_D)
        dt_sum += tl.sum(dt, axis=1)
        dts = _cols4(dt, BLOCK_D)
        gs = _cols4(g, BLOCK_D)
        for k in tl.static_range(KB - 1, -1, -1):
            Ct = tl.load(C_p + (tb + k) * s_cl)  # (NP,)
            a = exp2_ftz(dts[k][None, :] * A2) * keeps[k][None, :]
            lam = a * (Ct[:, None] * gs[k][None, :] + lam)
    off = pid_b * s_lb + pid_s * s_ls + offs_n[:, None] * s_ln + offs_d[None, :] * s_ld
    tl.store(mu_ptr + off, lam, mask=mnd)
    tl.store(P_ptr + off, exp2_ftz(A2 * dt_sum[None, :]) * alive[None, :], mask=mnd)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------
# (BLOCK_D, num_warps) candidates tried by the autotuner on the GPU; BLOCK_T is fixed per call
# because the backward reads the states the forward saved at every BLOCK_T boundary.
_GPU_CANDIDATES = ((2, 4), (4, 4), (4, 8), (8, 8))
_GPU_BLOCK_T = 64
_INTERP_BLOCK_T = 16  # the interpreter's scan is a Python loop per element: keep tiles small


def _block_t() -> int:
    return _INTERP_BLOCK_T if interpreting() else _GPU_BLOCK_T


def _block_n(N: int) -> int:
    return min(triton.next_power_of_2(N), 16)


def _allowed_block_d(dim: int, G: int, candidates) -> tuple:
    # A block of channels must sit inside one B/C group (channel d uses group d // (D // G)).
    dpg = dim // G
    ok = tuple(c for c in candidates if G == 1 or dpg % c[0] == 0)
    if not ok:
        bd = 1
        while dpg % (bd * 2) == 0 and bd * 2 <= 8:
            bd *= 2
        ok = ((bd, 4 if bd >= 4 else 2),)
    return ok


def _walk_candidates(N: int) -> tuple:
    """(BLOCK_D, num_warps) of the forward walk: 16 or 32 of a channel's NP states per thread
    (NP / 16 or NP / 32 lanes share a channel; one channel per lane up to N = 16) on one or
    two warps; at N = 64 instead 16 per thread on 1, 2 or 4 warps and 64 per thread (one
    channel per lane) on 4.

    From `scripts/scan_sweep.py` on the H100 (session 8, results/h100/session8): at N = 128 and
    256, 16 states per thread on one warp were fastest (12.3 and 19.9 ms at L = 4K, 65,536
    tokens, D = 2048), 32 per thread 8-30 % slower, 64 per thread spilled (79-249 ms); wider
    programs (4-8 warps) lost at every N. Few candidates on purpose: each is a long unrolled
    kernel to compile, and the GPU tests autotune every shape they run."""
    NP = triton.next_power_of_2(N)
    layouts = [(e, nw) for e in sorted({min(NP, 16), min(NP, 32)}) for nw in (1, 2)]
    if NP == 64:  # session 9's sweep at N = 64: 4 warps won with 16 (6.157 ms) or 64 (6.150) a thread
        layouts = [(16, 1), (16, 2), (16, 4), (64, 4)]
    return tuple((32 * nw * e // NP, nw) for e, nw in layouts)


_WALK_K = 8  # time steps per tile of the forward walk (16 ran out of registers: ptxas, sm_90)
_BWD_KB = 4  # steps per sub-block of the backward walk: KB states of (NP, BLOCK_D) live in registers


def _bwd_walk_candidates(N: int) -> tuple:
    """(BLOCK_D, num_warps) of the backward walk: 8 or 4 of a channel's states per thread
    (NP / 8 or NP / 4 lanes per channel), 1 or 2 warps. The backward holds KB + 4 tiles of
    (NP, BLOCK_D) (KB states, lam/dh, dA, A2, the step's products) where the forward holds
    about 3. Compiled for sm_90 without a GPU (triton 3.9's triton.compile with
    GPUTarget("cuda", 90, 32), then cuobjdump --dump-resource-usage; all options on, N = 16):
    16 states per thread used 255 registers and spilled 992 bytes (408 at N = 256); 8 per
    thread 254 registers and no spill, 4 per thread 166. Wider programs mean fewer dB/dC
    atomics (one row of NP per step and program) but fewer programs; the autotuner picks.
    Unmeasured on a GPU when written."""
    NP = triton.next_power_of_2(N)
    return tuple(dict.fromkeys((max(1, 32 * nw * e // NP), nw) for e in sorted({min(NP, 8), min(NP, 4)}) for nw in (1, 2)))


# Time segments. The walk is parallel over (sequence, channel block) only: at 65,536 tokens and
# D = 2048 on the H100 (results/h100/session11/scan_bench_call6.md) the forward took 1.44 ms with
# batch x D = 65,536 sequence-channels (L = 2K), 1.52 ms with 32,768 (L = 4K), then 2.58 ms with
# 16,384 (L = 8K) and 4.93 ms with 8,192 (L = 16K): below ~32K sequence-channels at N = 16
# (about 1024 one-warp programs, 8 per SM, too few warps to hide the exp and load latency of a
# dependent chain) the GPU idles. A state-heavier N fills it with fewer channels (NP / 16
# lanes per channel), so the measure is sequence-channel-states. Splitting L into S segments
# costs a second walk (pass 1 computes no y, so ~1.6x the work in all) plus the combine: it is
# used only below the fill point. 1024 one-warp programs are one wave (the walk at N = 16 uses
# 254 registers, ptxas sm_90: 8 warps per SM); 2 waves ran 5 % faster than one (L = 2K vs
# 4K), and once L is split, more segments cost only their combine and per-segment set-up, so
# S is the smallest power of two reaching 2 waves, with segments of at least _MIN_SEG_BLOCKS
# checkpoint blocks (256 steps on the GPU) so that the per-segment work (loading A, storing
# two (N, BLOCK_D) states, one combine step) stays a few percent of the walk.
_FILL_WORK = 32768 * 16  # batch x D x max(NP, 16) at which one walk over L fills an H100
_MIN_SEG_BLOCKS = 4
FORCE_SEGMENTS = None  # tests and benchmarks: force this many segments (None = the rule above)
BWD_IMPL = "walk"  # default backward: "walk" (reverse walk) or "assoc" (associative scan, before issue 26)


def _n_segments(batch: int, dim: int, L: int, N: int, block_t: int) -> tuple:
    """(S, SEG): the number of time segments and their length (a multiple of block_t)."""
    if FORCE_SEGMENTS is not None:
        S = max(1, int(FORCE_SEGMENTS))
    else:
        work = batch * dim * max(triton.next_power_of_2(N), 16)
        S = 1
        if work < _FILL_WORK:
            while work * S < 2 * _FILL_WORK:
                S *= 2
        S = max(1, min(S, L // (block_t * _MIN_SEG_BLOCKS)))
    seg = triton.cdiv(triton.cdiv(L, S), block_t) * block_t
    return triton.cdiv(L, seg), seg


_KERNELS = {"fwd": "_selective_scan_fwd_walk_kernel", "bwd": "_selective_scan_bwd_kernel",
            "bwd_walk": "_selective_scan_bwd_walk_kernel", "bwd_seg": "_selective_scan_bwd_seg_kernel",
            "combine": "_segment_combine_kernel"}
_EXTRA = {"fwd": dict(K=_WALK_K), "bwd_walk": dict(KB=_BWD_KB), "bwd_seg": dict(KB=_BWD_KB)}
_KEYS = {"fwd": ["DIM", "N", "L", "DPG", "NB", "SEG", "LOCAL"], "bwd": ["DIM", "N", "L", "DPG"],
         "bwd_walk": ["DIM", "N", "L", "DPG", "NB", "SEG"], "bwd_seg": ["DIM", "N", "L", "DPG", "NB", "SEG"]}


def _kernel(kind: str):
    return globals()[_KERNELS[kind]]


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, configs: tuple):
    fn = _kernel(kind)
    extra = _EXTRA.get(kind, {})
    cfgs = [triton.Config({"BLOCK_D": bd, **extra}, num_warps=nw) for bd, nw in configs]
    reset = {"bwd": ["dB_ptr", "dC_ptr"], "bwd_walk": ["dBC_ptr"]}.get(kind)
    return autotune(cfgs, key=_KEYS[kind], reset_to_zero=reset)(fn)


def _launch(kind: str, dim: int, G: int, batch: int, N: int, args: tuple, kwargs: dict, S: int = 1):
    """Launch a scan kernel on a (batch, channel blocks[, segments]) grid."""
    seg = (S,) if kind != "bwd" else ()
    if interpreting():
        bd = min(4, triton.next_power_of_2(dim))
        configs = _allowed_block_d(dim, G, ((bd, 4),))
        bd = configs[0][0]
        _kernel(kind)[(batch, triton.cdiv(dim, bd)) + seg](*args, **kwargs, BLOCK_D=bd, **_EXTRA.get(kind, {}))
        return
    cands = {"fwd": _walk_candidates(N), "bwd": _GPU_CANDIDATES}.get(kind) or _bwd_walk_candidates(N)
    configs = _allowed_block_d(dim, G, cands)
    grid = lambda meta: (batch, triton.cdiv(dim, meta["BLOCK_D"])) + seg  # noqa: E731
    _tuned(kind, configs)[grid](*args, **kwargs)


def _idx64(*tensors) -> bool:
    """Whether an element offset inside one sequence of these tensors (the batch offset is
    64-bit in the kernels already) may pass 2^30 (half of int32, a margin for the
    masked steps past L): the kernels then do their index math in 64 bits."""
    return any(t is not None and sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:])) >= 2**30
               for t in tensors)


def _combine(loc, P, out, init, reverse: bool):
    """Pass 2: the sequential combine over segments of (batch, S, D, N) fp32 buffers."""
    batch, S = loc.shape[:2]
    M = loc.shape[2] * loc.shape[3]
    BLOCK = 256 if interpreting() else 1024
    _segment_combine_kernel[(batch, triton.cdiv(M, BLOCK))](
        loc, P, init if init is not None else loc, out, S, M, loc.stride(0), loc.stride(1),
        HAS_INIT=init is not None, REVERSE=reverse, BLOCK=BLOCK, num_warps=4)


# ----------------------------------------------------------------------------------------------
# Input checking (shared by the Triton path, the reference and the decoding step)
# ----------------------------------------------------------------------------------------------
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_float(name, t):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise ValueError(f"{name}: complex tensors are not supported (only real diagonal A)")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name}: dtype {t.dtype} is not supported (float32, float16, bfloat16, float64)")


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, seq_idx):
    """Validate shapes/dtypes; return (batch, dim, L, N, G) and B, C as (batch, G, N, L) views."""
    if isinstance(A, torch.Tensor) and A.is_complex():
        raise ValueError("A: complex A is not supported; only real diagonal A (S4D-real / Mamba-1)")
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        _check_float(name, t)
    if u.dim() != 3:
        raise ValueError(f"u: expected (batch, D, L), got shape {tuple(u.shape)}")
    batch, dim, L = u.shape
    if L == 0 or dim == 0 or batch == 0:
        raise ValueError(f"u: empty shape {tuple(u.shape)}")
    if delta.shape != u.shape:
        raise ValueError(f"delta: expected shape {tuple(u.shape)} like u, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A: expected (D, N) = ({dim}, N), got shape {tuple(A.shape)}")
    N = A.shape[1]
    if N < 1 or N > MAX_N:
        raise ValueError(f"A: state size N = {N} is out of range; supported 1 <= N <= {MAX_N}")
    views = []
    G = None
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            if tuple(t.shape) != (batch, N, L):
                raise ValueError(f"{name}: expected (batch, N, L) = ({batch}, {N}, {L}), got {tuple(t.shape)}")
            t = t.unsqueeze(1)  # (batch, 1, N, L)
        elif t.dim() == 4:
            g = t.shape[1]
            if t.shape[0] != batch or t.shape[2] != N or t.shape[3] != L or g < 1:
                raise ValueError(f"{name}: expected (batch, G, N, L) = ({batch}, G, {N}, {L}), got {tuple(t.shape)}")
            if dim % g != 0:
                raise ValueError(f"{name}: number of groups G = {g} must divide D = {dim}")
        else:
            raise ValueError(f"{name}: expected (batch, N, L) or (batch, G, N, L), got shape {tuple(t.shape)}")
        if G is not None and t.shape[1] != G:
            raise ValueError(f"C: has {t.shape[1]} groups but B has {G}")
        G = t.shape[1]
        views.append(t)
    if D is not None:
        _check_float("D", D)
        if tuple(D.shape) != (dim,):
            raise ValueError(f"D: expected shape ({dim},), got {tuple(D.shape)}")
    if z is not None:
        _check_float("z", z)
        if z.shape != u.shape:
            raise ValueError(f"z: expected shape {tuple(u.shape)} like u, got {tuple(z.shape)}")
    if delta_bias is not None:
        _check_float("delta_bias", delta_bias)
        if tuple(delta_bias.shape) != (dim,):
            raise ValueError(f"delta_bias: expected shape ({dim},), got {tuple(delta_bias.shape)}")
    if seq_idx is not None:
        if not isinstance(seq_idx, torch.Tensor) or seq_idx.dtype not in (torch.int32, torch.int64):
            raise ValueError("seq_idx: expected an int32 tensor of shape (batch, L)")
        if tuple(seq_idx.shape) != (batch, L):
            raise ValueError(f"seq_idx: expected shape ({batch}, {L}), got {tuple(seq_idx.shape)}")
        check_seq_idx_order(seq_idx)  # skipped while a CUDA graph is captured (no sync there)
    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias), ("seq_idx", seq_idx)):
        if t is not None and t.device != u.device:
            raise ValueError(f"{name}: on device {t.device} but u is on {u.device}")
    return batch, dim, L, N, G, views[0], views[1]


# ----------------------------------------------------------------------------------------------
# Autograd Function
# ----------------------------------------------------------------------------------------------
def _strides(t, n):
    return tuple(t.stride()) if t is not None else (0,) * n


class SelectiveScanFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, seq_idx, need_grad, bwd_impl):
        ctx.set_materialize_grads(False)  # unused outputs (often last_state) arrive as None
        batch, dim, L = u.shape  # (batch, D, L)
        G, N = B4.shape[1], A.shape[1]  # B4, C4: (batch, G, N, L)
        BT = _block_t()
        n_chunks = triton.cdiv(L, BT)
        S, SEG = _n_segments(batch, dim, L, N, BT)
        save = bool(need_grad)  # keep the block-boundary states only when a backward will come
        # with save: the state after every BT-block (the last slot holds the final state);
        # without: each segment's final state (the last segment's is the sequence's)
        n_slots = n_chunks if save else S
        states = torch.empty((batch, dim, n_slots, N), device=u.device, dtype=torch.float32)  # (batch, D, slots, N)
        y = torch.empty((batch, dim, L), device=u.device, dtype=u.dtype)  # (batch, D, L)
        NP = triton.next_power_of_2(N)
        # B_t and C_t side by side per step, fp32, zero-padded to NP (a few MB: the inputs of one
        # step then sit at constant offsets from one address; see the kernel)
        # and L padded to a multiple of 16 (K = 8 divides it) with zero rows
        BC = torch.zeros((batch, G, triton.cdiv(L, 16) * 16, 2, NP), device=u.device, dtype=torch.float32)  # (batch, G, Lp, 2, NP)
        BC[:, :, :L, 0, :N] = B4.transpose(2, 3)
        BC[:, :, :L, 1, :N] = C4.transpose(2, 3)
        if seq_idx is not None:
            seq_idx = seq_idx.to(torch.int32)
        dummy = u
        head = (u, delta, A, BC, D if D is not None else dummy, z if z is not None else dummy,
                delta_bias if delta_bias is not None else dummy, seq_idx if seq_idx is not None else dummy, y)
        sizes = (dim, N, L, dim // G, n_chunks, batch, SEG)
        in_strides = (*u.stride(), *delta.stride(), *A.stride(), *BC.stride()[:3], *_strides(z, 3), *y.stride())
        kwargs = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                      SOFTPLUS=bool(delta_softplus), HAS_SEQ=seq_idx is not None, BLOCK_T=BT, NP=NP,
                      IDX64=_idx64(u, delta, z, y, states, BC))
        if S == 1:
            args = (*head, states, dummy, dummy, *sizes, *in_strides, *states.stride(),
                    *_strides(seq_idx, 2), 0, 0, 0, 0)
            _launch("fwd", dim, G, batch, N, args, dict(kwargs, SAVE_ALL=save, LOCAL=False, HAS_H0=False))
        else:
            # Time-parallel forward. Pass 1: each segment from a zero state -> its local final
            # state and total decay; pass 2: combine -> each segment's entering state; pass 3:
            # the walk again from the true entering states, writing y (and the checkpoints).
            f32 = dict(device=u.device, dtype=torch.float32)
            h_loc = torch.empty((batch, S, dim, N), **f32)  # (batch, S, D, N)
            P = torch.empty((batch, S, dim, N), **f32)  # (batch, S, D, N) prod_t exp(delta_t A)
            h_in = torch.empty((batch, S, dim, N), **f32)  # (batch, S, D, N) entering states
            hs = h_loc.stride()
            args = (*head, h_loc, dummy, P, *sizes, *in_strides, hs[0], hs[2], hs[1], hs[3],
                    *_strides(seq_idx, 2), *hs)
            _launch("fwd", dim, G, batch, N, args, dict(kwargs, SAVE_ALL=False, LOCAL=True, HAS_H0=False), S)
            _combine(h_loc, P, h_in, None, reverse=False)
            args = (*head, states, h_in, dummy, *sizes, *in_strides, *states.stride(),
                    *_strides(seq_idx, 2), *h_in.stride())
            _launch("fwd", dim, G, batch, N, args, dict(kwargs, SAVE_ALL=save, LOCAL=False, HAS_H0=True), S)
        last_state = states[:, :, n_slots - 1]  # (batch, D, N)
        if save:
            ctx.save_for_backward(u, delta, A, B4, C4, D, z, delta_bias, seq_idx, states, BC)
            ctx.delta_softplus = bool(delta_softplus)
            ctx.n_chunks, ctx.BT = n_chunks, BT
            ctx.bwd_impl = bwd_impl
        return y, last_state.clone()

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B4, C4, D, z, delta_bias, seq_idx, states, BC = ctx.saved_tensors
        batch, dim, L = u.shape
        G, N = B4.shape[1], A.shape[1]
        dev = u.device
        if dy is None:
            dy = torch.zeros((batch, dim, L), device=dev, dtype=u.dtype)
        du = torch.empty((batch, dim, L), device=dev, dtype=u.dtype)  # (batch, D, L)
        ddelta = torch.empty((batch, dim, L), device=dev, dtype=delta.dtype)  # (batch, D, L)
        dz = torch.empty((batch, dim, L), device=dev, dtype=z.dtype) if z is not None else None
        if dy.stride() != du.stride():  # the kernels index dy, du, ddelta, dz with one set of strides
            dy = torch.empty_like(du, dtype=dy.dtype).copy_(dy)  # (batch, D, L)
        impl = ctx.bwd_impl
        if impl == "assoc":
            dA, dB, dC, dD, dbias = SelectiveScanFn._backward_assoc(ctx, u, delta, A, B4, C4, D, z, delta_bias,
                                                                    seq_idx, states, dy, dlast, du, ddelta, dz)
        else:
            dA, dB, dC, dD, dbias = SelectiveScanFn._backward_walk(ctx, u, delta, A, B4, C4, D, z, delta_bias,
                                                                   seq_idx, states, BC, dy, dlast, du, ddelta, dz)
        dA = dA.to(A.dtype)  # (D, N)
        dD = dD.to(D.dtype) if D is not None else None
        dbias = dbias.to(delta_bias.dtype) if delta_bias is not None else None
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None, None, None

    @staticmethod
    def _backward_walk(ctx, u, delta, A, B4, C4, D, z, delta_bias, seq_idx, states, BC, dy, dlast, du, ddelta, dz):
        batch, dim, L = u.shape
        G, N = B4.shape[1], A.shape[1]
        NP = BC.shape[-1]
        BT = ctx.BT
        S, SEG = _n_segments(batch, dim, L, N, BT)
        f32 = dict(device=u.device, dtype=torch.float32)
        dummy = u
        has_dlast = dlast is not None
        if has_dlast:
            dlast = dlast.float().contiguous()  # (batch, D, N)
        scratch = torch.empty((batch, S, BT // _BWD_KB, NP, dim), **f32)  # (batch, S, BT / KB, NP, D)
        kw = dict(HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.delta_softplus,
                  HAS_SEQ=seq_idx is not None, NP=NP, IDX64=_idx64(u, delta, z, dy, states, BC, scratch))
        if S == 1:
            lam = dlast[:, None] if has_dlast else None  # (batch, 1, D, N)
        else:
            # Time-parallel backward. Pass 1: each segment's adjoint from a zero one on its
            # right (mu = a_{t0} dh_{t0}) and its total decay; pass 2: combine from the last
            # segment, started at dL/d(last state) -> the adjoint entering each segment.
            mu = torch.empty((batch, S, dim, N), **f32)  # (batch, S, D, N)
            P = torch.empty((batch, S, dim, N), **f32)  # (batch, S, D, N)
            lam = torch.empty((batch, S, dim, N), **f32)  # (batch, S, D, N)
            args = (delta, A, BC, z if z is not None else dummy, delta_bias if delta_bias is not None else dummy,
                    seq_idx if seq_idx is not None else dummy, dy, mu, P, dim, N, L, dim // G, SEG, batch,
                    *delta.stride(), *A.stride(), *BC.stride()[:3], *_strides(z, 3), *dy.stride(),
                    *_strides(seq_idx, 2), mu.stride(0), mu.stride(1), mu.stride(2), mu.stride(3))
            _launch("bwd_seg", dim, G, batch, N, args, kw, S)
            _combine(mu, P, lam, dlast, reverse=True)
        dBC = torch.zeros_like(BC)  # (batch, G, Lp, 2, NP) fp32: dB_t, dC_t rows, atomically summed over channels
        dA_part = torch.empty((batch, S, dim, N), **f32)  # (batch, S, D, N) per (sequence, segment)
        dDb = torch.empty((batch, S, 2, dim), **f32)  # (batch, S, 2, D): dD and d delta_bias partials
        lam_t = lam if lam is not None else dA_part
        args = (u, delta, A, BC, D if D is not None else dummy, z if z is not None else dummy,
                delta_bias if delta_bias is not None else dummy, seq_idx if seq_idx is not None else dummy,
                states, dy, lam_t, du, ddelta, dz if dz is not None else du, dBC, dA_part, dDb, scratch,
                dim, N, L, dim // G, SEG, batch,
                *u.stride(), *delta.stride(), *A.stride(), *BC.stride()[:3], *_strides(z, 3), *dy.stride(),
                *states.stride(), *_strides(seq_idx, 2),
                lam_t.stride(0), lam_t.stride(1), lam_t.stride(2), lam_t.stride(3),
                dDb.stride(0), dDb.stride(1), *scratch.stride()[:4])
        assert lam is None or lam.stride() == dA_part.stride()  # the kernel indexes both with lam's strides
        _launch("bwd_walk", dim, G, batch, N, args, dict(kw, HAS_D=D is not None, HAS_LAM=lam is not None,
                                                         BLOCK_T=BT), S)
        dB = dBC[:, :, :L, 0, :N].transpose(2, 3).to(B4.dtype).contiguous()  # (batch, G, N, L)
        dC = dBC[:, :, :L, 1, :N].transpose(2, 3).to(C4.dtype).contiguous()
        dDb = dDb.sum((0, 1))  # (2, D)
        return dA_part.sum((0, 1)), dB, dC, dDb[0], dDb[1]

    @staticmethod
    def _backward_assoc(ctx, u, delta, A, B4, C4, D, z, delta_bias, seq_idx, states, dy, dlast, du, ddelta, dz):
        """The associative-scan backward (before issue 26), kept for comparison: bwd_impl="assoc"."""
        batch, dim, L = u.shape
        G, N = B4.shape[1], A.shape[1]
        f32 = dict(device=u.device, dtype=torch.float32)
        dA_part = torch.empty((batch, dim, N), **f32)  # per-sequence partial sums
        dB = torch.zeros((batch, G, N, L), **f32)  # atomically accumulated over channels
        dC = torch.zeros((batch, G, N, L), **f32)
        dD_part = torch.empty((batch, dim), **f32)
        dbias_part = torch.empty((batch, dim), **f32)
        lam = torch.empty((batch, 2, dim, N), **f32)  # adjoint carried between time blocks (ping-pong)
        has_dlast = dlast is not None
        dlast = dlast.float().contiguous() if has_dlast else dA_part
        args = (u, delta, A, B4, C4, D if D is not None else u, z if z is not None else u,
                delta_bias if delta_bias is not None else u, seq_idx if seq_idx is not None else u,
                states, dy, dlast, du, ddelta, dz if dz is not None else du, dA_part, dB, dC, dD_part,
                dbias_part, lam, dim, N, L, dim // G, ctx.n_chunks,
                *u.stride(), *delta.stride(), *A.stride(), *B4.stride(), *C4.stride(), *_strides(z, 3),
                *dy.stride(), *states.stride(), *_strides(seq_idx, 2), *dB.stride())
        kwargs = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                      SOFTPLUS=ctx.delta_softplus, HAS_SEQ=seq_idx is not None, HAS_DLAST=has_dlast,
                      BLOCK_N=_block_n(N), BLOCK_T=ctx.BT)
        _launch("bwd", dim, G, batch, N, args, kwargs)
        dD = dD_part.sum(0) if D is not None else None
        dbias = dbias_part.sum(0) if delta_bias is not None else None
        return dA_part.sum(0), dB.to(B4.dtype), dC.to(C4.dtype), dD, dbias


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, seq_idx=None, bwd_impl=None):
    """Selective scan (mamba_ssm ``selective_scan_fn`` semantics), differentiable.

    u, delta: (batch, D, L); A: (D, N) real; B, C: (batch, N, L) or (batch, G, N, L);
    D, delta_bias: (D,); z: (batch, D, L); seq_idx: (batch, L) int32, non-decreasing.
    Any strides are accepted (e.g. channel-last views of (batch, L, D) tensors) without copies.
    Returns y (batch, D, L) in u's dtype, and with ``return_last_state`` also the final state
    (batch, D, N) float32 (gradients through it are supported).
    Runs the Triton kernels when the tensors are on CUDA or TRITON_INTERPRET=1, else the
    PyTorch reference. ``bwd_impl``: "walk" (reverse walk) or "assoc" (the associative-scan
    backward before issue 26), default the module's ``BWD_IMPL``.
    """
    bwd_impl = BWD_IMPL if bwd_impl is None else bwd_impl
    if bwd_impl not in ("walk", "assoc"):
        raise ValueError(f"bwd_impl: expected 'walk' or 'assoc', got {bwd_impl!r}")
    batch, dim, L, N, G, B4, C4 = _check_inputs(u, delta, A, B, C, D, z, delta_bias, seq_idx)
    if not (u.is_cuda or interpreting()):
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  return_last_state, seq_idx)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    y, last = SelectiveScanFn.apply(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, seq_idx, need_grad,
                                    bwd_impl)
    return (y, last) if return_last_state else y


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, seq_idx=None):
    """Plain-PyTorch sequential selective scan: the oracle (in float64) and the CPU path.

    Same signature and outputs as :func:`selective_scan`. Computes in float32 (float64 if u is
    float64), one time step at a time, so memory stays O(batch D N) like the kernel.
    """
    batch, dim, L, N, G, B4, C4 = _check_inputs(u, delta, A, B, C, D, z, delta_bias, seq_idx)
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    uf = u.to(cdt)  # (batch, D, L)
    dt = delta.to(cdt)  # (batch, D, L)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    Af = A.to(cdt)  # (D, N)
    # Expand groups to channels: channel d reads group d // (D // G).
    Bx = B4.to(cdt).repeat_interleave(dim // G, dim=1)  # (batch, D, N, L)
    Cx = C4.to(cdt).repeat_interleave(dim // G, dim=1)  # (batch, D, N, L)
    keep = None
    if seq_idx is not None:
        keep = torch.ones((batch, L), dtype=cdt, device=u.device)  # (batch, L): 0 where a new sequence starts
        keep[:, 1:] = (seq_idx[:, 1:] == seq_idx[:, :-1]).to(cdt)
    h = torch.zeros((batch, dim, N), dtype=cdt, device=u.device)  # (batch, D, N)
    ys = []
    # unbind once: indexing [..., t] inside the loop would make autograd scatter every step's
    # gradient into a full-length zero tensor (quadratic in L in the backward).
    dts, dtus = dt.unbind(-1), (dt * uf).unbind(-1)  # L x (batch, D)
    Bs, Cs = Bx.unbind(-1), Cx.unbind(-1)  # L x (batch, D, N)
    keeps = keep.unbind(-1) if keep is not None else None  # L x (batch,)
    for t in range(L):
        a = torch.exp(dts[t][:, :, None] * Af)  # (batch, D, N)
        if keeps is not None:
            a = a * keeps[t][:, None, None]
        h = a * h + dtus[t][:, :, None] * Bs[t]  # (batch, D, N)
        ys.append((h * Cs[t]).sum(-1))  # (batch, D)
    y = torch.stack(ys, dim=-1)  # (batch, D, L)
    if D is not None:
        y = y + D.to(cdt)[:, None] * uf
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(u.dtype)
    if return_last_state:
        return y, h.to(torch.float32) if cdt == torch.float32 else h
    return y


@triton.jit
def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                         DIM, N, D_PER_GB, D_PER_GC,
                         s_sb, s_sd, s_xb, s_dtb, s_Ad, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_zb, s_yb,
                         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """One step for BLOCK_D channels of one row: h = exp(dt A) h + dt x B; y = h C (+ D x)
    (* silu(z)). The state (BLOCK_D, N) stays in registers between its load and its store."""
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    md, mn = d < DIM, n < N
    m2 = md[:, None] & mn[None, :]
    x = tl.load(x_ptr + b * s_xb + d, mask=md, other=0.0).to(tl.float32)  # (BLOCK_D,)
    dt = tl.load(dt_ptr + b * s_dtb + d, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)
    A = tl.load(A_ptr + d[:, None] * s_Ad + n[None, :], mask=m2, other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_N)
    gb, gc = d // D_PER_GB, d // D_PER_GC  # each channel's B group and C group
    Bv = tl.load(B_ptr + b * s_Bb + gb[:, None] * s_Bg + n[None, :] * s_Bn, mask=m2, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_Cb + gc[:, None] * s_Cg + n[None, :] * s_Cn, mask=m2, other=0.0).to(tl.float32)
    sp = state_ptr + b * s_sb + d[:, None] * s_sd + n[None, :]  # (BLOCK_D, BLOCK_N)
    h = tl.load(sp, mask=m2, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv
    tl.store(sp, h.to(state_ptr.dtype.element_ty), mask=m2)
    y = tl.sum(h * Cv, axis=1)  # (BLOCK_D,)
    if HAS_D:
        y += tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32) * x
    if HAS_Z:
        zv = tl.load(z_ptr + b * s_zb + d, mask=md, other=0.0).to(tl.float32)
        y = y * zv * tl.sigmoid(zv)
    tl.store(y_ptr + b * s_yb + d, y.to(y_ptr.dtype.element_ty), mask=md)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, impl="torch"):
    """One decoding step of the selective scan; updates ``state`` in place.

    state: (batch, D, N) (any float dtype, usually float32); x, dt, z: (batch, D);
    A: (D, N); B, C: (batch, N) or (batch, G, N); D, dt_bias: (D,). Returns y (batch, D) in x's
    dtype, equal to one step of :func:`selective_scan` carried from ``state``.
    impl "torch" (default): plain PyTorch, about fifteen small kernels. "triton": one kernel
    (Mamba-1's decode step on the GPU); x, dt, z, B, C may be strided views (slices of a
    projection, or LTI's broadcast B and C), state must have a unit last stride.
    """
    if isinstance(A, torch.Tensor) and A.is_complex():
        raise ValueError("A: complex A is not supported; only real diagonal A")
    for name, t in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        _check_float(name, t)
    if state.dim() != 3:
        raise ValueError(f"state: expected (batch, D, N), got shape {tuple(state.shape)}")
    batch, dim, N = state.shape
    if x.shape != (batch, dim) or dt.shape != (batch, dim):
        raise ValueError(f"x/dt: expected shape ({batch}, {dim}), got {tuple(x.shape)} and {tuple(dt.shape)}")
    if tuple(A.shape) != (dim, N):
        raise ValueError(f"A: expected shape ({dim}, {N}), got {tuple(A.shape)}")
    cdt = torch.float64 if state.dtype == torch.float64 else torch.float32

    def groups(name, t):  # -> (batch, D, N)
        if t.dim() == 2:
            t = t.unsqueeze(1)
        if t.dim() != 3 or t.shape[0] != batch or t.shape[2] != N or dim % t.shape[1] != 0:
            raise ValueError(f"{name}: expected (batch, N) or (batch, G, N) with G dividing D, got {tuple(t.shape)}")
        return t.to(cdt).repeat_interleave(dim // t.shape[1], dim=1)

    if impl == "triton":
        return _state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if impl != "torch":
        raise ValueError(f"impl: expected 'torch' or 'triton', got {impl!r}")
    Bx, Cx = groups("B", B), groups("C", C)  # (batch, D, N)
    dtf = dt.to(cdt)  # (batch, D)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(cdt)
    if dt_softplus:
        dtf = F.softplus(dtf)
    a = torch.exp(dtf[:, :, None] * A.to(cdt))  # (batch, D, N)
    h = a * state.to(cdt) + (dtf * x.to(cdt))[:, :, None] * Bx  # (batch, D, N)
    state.copy_(h)
    y = (h * Cx).sum(-1)  # (batch, D)
    if D is not None:
        y = y + D.to(cdt) * x.to(cdt)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype)


def _state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """The Triton launch of :func:`selective_state_update` (shapes checked by it)."""
    batch, dim, N = state.shape
    B3 = B if B.dim() == 3 else B.unsqueeze(1)  # (batch, G, N)
    C3 = C if C.dim() == 3 else C.unsqueeze(1)
    for name, t in (("B", B3), ("C", C3)):
        if t.shape[0] != batch or t.shape[2] != N or dim % t.shape[1] != 0:
            raise ValueError(f"{name}: expected (batch, N) or (batch, G, N) with G dividing D, got "
                             f"{tuple(t.shape)}")
    if state.stride(2) != 1 or x.stride(1) != 1 or dt.stride(1) != 1 or (z is not None and z.stride(1) != 1) \
            or A.stride(1) != 1:
        raise ValueError("state, x, dt, z, A: the Triton step takes unit last strides")
    if N > MAX_N:
        raise ValueError(f"N={N}: the Triton step takes N <= {MAX_N}")
    y = torch.empty(batch, dim, device=x.device, dtype=x.dtype)  # (batch, D)
    BLOCK_N = triton.next_power_of_2(N)
    # channels a program: a (BLOCK_D, N) state tile of 2,048 fp32 values (16 registers a thread)
    BLOCK_D = max(1, min(triton.next_power_of_2(dim), 2048 // BLOCK_N))
    dummy = A  # stands for the absent optional inputs (never read)
    _state_update_kernel[(batch, triton.cdiv(dim, BLOCK_D))](
        state, x, dt, A, B3, C3, D if D is not None else dummy, z if z is not None else dummy,
        dt_bias if dt_bias is not None else dummy, y, dim, N, dim // B3.shape[1], dim // C3.shape[1],
        state.stride(0), state.stride(1), x.stride(0), dt.stride(0), A.stride(0),
        B3.stride(0), B3.stride(1), B3.stride(2), C3.stride(0), C3.stride(1), C3.stride(2),
        z.stride(0) if z is not None else 0, y.stride(0),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N)
    return y
