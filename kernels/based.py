"""Based linear attention with the 2nd-order Taylor feature map (Arora et al. 2024).

Feature map on a feature-dim-F vector x (F = 16 in Based)::

    phi(x) = [1,  x / F^(1/4),  vec(x ⊗ x) / (sqrt(2) sqrt(F))]          (1 + F + F^2 features)
    phi(q) . phi(k) = 1 + s + s^2 / 2,   s = q . k / sqrt(F)             (Taylor series of exp(s))

Causal linear attention per head, with S_t (1+F+F^2, P) and z_t (1+F+F^2,)::

    S_t = sum_{s<=t} phi(k_s) v_s^T,   z_t = sum_{s<=t} phi(k_s)
    y_t = phi(q_t) S_t / (phi(q_t) . z_t + eps)      (normalize=True)
    y_t = phi(q_t) S_t                               (normalize=False)

Options
-------
* ``initial_state = (S0, z0)``: the state before token 0, shapes (batch, H, 1+F+F^2, P) and
  (batch, H, 1+F+F^2), fp32; the feature order is [1, x_0..x_{F-1}, x_i x_j at 1+F+i*F+j].
* ``seq_idx`` (batch, L) int, non-decreasing per row: packed sequences; S and z reset where it
  changes, so a token never sees an earlier sequence. The initial state belongs to the *first*
  sequence of each row (it is the state before token 0); the final state returned with
  ``return_final_state`` is the state after the last token of the *last* sequence of each row.
* ``return_final_state``: return ``(y, (S_L, z_L))`` with the final state in fp32.

Implementation (Triton, ``_based_fwd_kernel`` / ``_based_bwd_kernel``)
----------------------------------------------------------------------
One program per (batch, head, block of BV value columns, segment of the row) walks its
segment (the whole row when NS = 1, see Segments below) in chunks of Q tokens and keeps the
state in registers, split into its three orders:

    order 0: S0 = sum v (BV,),              z0 = count            (scalar)
    order 1: S1 = sum phi1(k) v^T (F, BV),  z1 = sum phi1(k)      (F,)
    order 2: S2 = sum phi2(k) v^T (F^2, BV), z2 = sum phi2(k)      (F^2,)

Inside a chunk the output is the masked quadratic form (1 + s + s^2/2) @ v with s = q k^T /
sqrt(F) from ``tl.dot`` (causal and seq_idx masks), plus the carried state read through
phi(q); phi2 of a Q x F tile is built in registers as a (Q, F^2) outer-product tile. The
expanded features (batch, L, H, 273) are never written to memory; only the per-token
normaliser (batch, L, H) is saved for the backward. The backward kernel runs the same chunk
walk forwards (dq: intra-chunk quadratic form + gradient through phi(q) of the carried
state) and then backwards with the adjoint state dS = sum_{later t} phi(q_t) dnum_t^T
(dk, dv, and the initial-state gradient). The normaliser is handled as an extra value
column of ones: dnum = dy / den, dden = -(dy . y) / den.

Segments. One program per (batch, head, BV) under-fills the GPU when rows are long and few
(65,536 tokens per batch at L = 16K, H = 16: 64 (batch, head) pairs on 132 SMs), and a
smaller BV only repeats the phi(k), phi(q) work per value block. So a row is split into NS
segments of SEG tokens (a multiple of Q; the last one may be short), one program each
(grid: batch*H, value blocks, segments). The state has no decay, so the state entering
segment j is a prefix sum of per-segment contributions, with resets from seq_idx:

    keep_j = [seq at the segment's last token == seq at the token before it]  (j = 0: token 0)
    S_in[0] = S0 (or 0),   S_in[j] = S_in[j-1] keep_{j-1} + dS_{j-1}

Forward with NS > 1: (1) the forward kernel with STATE_ONLY (state update only) from a zero
state gives each segment's own dS_j, dz_j; (2) a short loop in torch forms S_in, z_in (and
the final state); (3) the full forward kernel runs every segment from its S_in. Inside a
segment's first chunk the usual chunk logic applies (s_prev = the previous segment's last
token), so nothing else changes. Backward: (1) the backward kernel with ADJ_ONLY (pass 2's
adjoint accumulation only, from zero) gives each segment's own adjoint of its entering state;
(2) in reverse, dS_out[NS-1] = dS_L (or 0), dS_out[j-1] = dS_out[j] keep_j + ddS_j; (3) the
full backward kernel runs every segment with S_in[j] (dq) and dS_out[j] (dk, dv); segment 0
returns the initial-state gradient. Per-segment states are (NS, batch, H, D[, P]) fp32, so
with NS = 1 they are the user's (batch, H, D[, P]) tensors and nothing extra runs. The rule
for NS (``_plan`` / ``_segments_rule``): BV = min(64, P), then the smallest power of two NS
that gives >= 3 programs per SM, with segments of >= 8 chunks; BV shrinks only when that
cap leaves the grid short. The interpreter uses NS = 1 unless a test forces it.

Plain-PyTorch references beside the kernels: ``taylor_linear_attention_ref`` (quadratic
form, explicit phi), ``taylor_linear_attention_recurrent`` (explicit phi, step by step: the
test oracle) and ``taylor_linear_attention_chunked_torch`` (the CPU path of the model).

Symbols: batch, L sequence length, H heads, F feature dim of q/k, P head dim of v,
D = 1 + F + F^2 expanded feature count, Q chunk length, BV value-column block, NS segments
per row, SEG tokens per segment.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

try:  # Triton is optional: the CPU path of the model is plain PyTorch
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

# Largest q/k feature dim the Triton kernels accept: phi2 of a chunk is a (Q, F^2) register
# tile and the order-2 state a (F^2, BV) one, so F = 32 (1024 features) is the practical end.
MAX_FEATURE_DIM = 32
# Fill kernel outputs with NaN before launch (tests turn this on to catch unwritten elements).
_POISON = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------
# feature map, state size, one decoding step
# ----------------------------------------------------------------------------------------
def feature_count(F: int) -> int:
    """Number of Taylor features of a feature-dim-F vector: 1 + F + F^2 (273 for F = 16)."""
    return 1 + F + F * F


def taylor_feature_map(x: torch.Tensor) -> torch.Tensor:
    """Explicit phi: (..., F) -> (..., 1 + F + F^2), order [1, x / F^(1/4), vec(x ⊗ x) / sqrt(2F)]."""
    F = x.shape[-1]
    ones = torch.ones_like(x[..., :1])  # (..., 1)
    x1 = x / F ** 0.25  # (..., F)
    x2 = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2 * F)  # (..., F^2)
    return torch.cat([ones, x1, x2], dim=-1)  # (..., D)


def based_state_size(F: int, P: int, H: int) -> int:
    """Recurrent state of one Based linear-attention layer, in numbers, counted as Zoology counts it.

    Zoology's ``Based.state_size`` (the code of the Based paper, Arora et al. 2024) adds the
    KV state ``H * P * expanded`` and the normaliser (its ``k_state``) ``H * expanded`` with
    ``expanded = F^2 + F + 1`` (``TaylorExp.expanded_size``): H * (1 + F + F^2) * (P + 1).
    For F = 16, P = 64: 273 * 65 = 17,745 numbers per head. The paper's prose often quotes only
    the leading term d * F^2; the window KV cache and the short-conv state of the other Based
    layers are not included here (the model adds them).
    """
    return H * feature_count(F) * (P + 1)


def taylor_step(q_t, k_t, v_t, state=None, eps: float = 1e-6, normalize: bool = True):
    """One recurrent step for decoding.

    q_t, k_t (batch, H, F); v_t (batch, H, P); state (S (batch, H, D, P), z (batch, H, D)) or
    None (zero state). The state is updated with (k_t, v_t) first, then read with q_t, so
    token t sees itself (causal, s <= t). Returns (y_t (batch, H, P), (S, z)).
    """
    if q_t.dim() != 3:
        raise ValueError(f"q_t must be (batch, H, F), got shape {tuple(q_t.shape)}")
    if k_t.shape != q_t.shape:
        raise ValueError(f"k_t must have q_t's shape {tuple(q_t.shape)}, got {tuple(k_t.shape)}")
    if v_t.dim() != 3 or v_t.shape[:2] != q_t.shape[:2]:
        raise ValueError(f"v_t must be (batch, H, P) = ({q_t.shape[0]}, {q_t.shape[1]}, P), got {tuple(v_t.shape)}")
    if state is not None:
        batch, H, F = q_t.shape
        D, P = feature_count(F), v_t.shape[2]
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise ValueError("state must be a tuple (S, z) or None")
        if tuple(state[0].shape) != (batch, H, D, P):
            raise ValueError(f"state S must be {(batch, H, D, P)}, got {tuple(state[0].shape)}")
        if tuple(state[1].shape) != (batch, H, D):
            raise ValueError(f"state z must be {(batch, H, D)}, got {tuple(state[1].shape)}")
    pk = taylor_feature_map(k_t)  # (batch, H, D)
    pq = taylor_feature_map(q_t)  # (batch, H, D)
    if state is None:
        S = pk[..., :, None] * v_t[..., None, :]  # (batch, H, D, P)
        z = pk  # (batch, H, D)
    else:
        S0, z0 = state
        S = S0 + pk[..., :, None] * v_t[..., None, :]  # (batch, H, D, P)
        z = z0 + pk  # (batch, H, D)
    num = torch.einsum("bhd,bhdp->bhp", pq, S)  # (batch, H, P)
    if normalize:
        num = num / ((pq * z).sum(-1, keepdim=True) + eps)  # (batch, H, P)
    return num, (S, z)


# ----------------------------------------------------------------------------------------
# argument checks (shared by every path)
# ----------------------------------------------------------------------------------------
def _check_args(q, k, v, initial_state, seq_idx, max_feature_dim=MAX_FEATURE_DIM):
    if q.dim() != 4:
        raise ValueError(f"q must be (batch, L, H, F), got shape {tuple(q.shape)}")
    batch, L, H, F = q.shape
    if F > max_feature_dim:
        raise ValueError(f"q feature dim F={F} exceeds the supported maximum {max_feature_dim}")
    if F < 1:
        raise ValueError(f"q feature dim must be >= 1, got {F}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (batch, L, H, P) = ({batch}, {L}, {H}, P), got {tuple(v.shape)}")
    if L < 1:
        raise ValueError("q must have at least one token (L >= 1)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    P = v.shape[-1]
    D = feature_count(F)
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError("initial_state must be a tuple (S0, z0) or None")
        S0, z0 = initial_state
        if tuple(S0.shape) != (batch, H, D, P):
            raise ValueError(f"initial_state S0 must be {(batch, H, D, P)}, got {tuple(S0.shape)}")
        if tuple(z0.shape) != (batch, H, D):
            raise ValueError(f"initial_state z0 must be {(batch, H, D)}, got {tuple(z0.shape)}")
    if seq_idx is not None:
        if tuple(seq_idx.shape) != (batch, L):
            raise ValueError(f"seq_idx must be (batch, L) = {(batch, L)}, got {tuple(seq_idx.shape)}")
        if seq_idx.dtype.is_floating_point:
            raise ValueError(f"seq_idx must be an integer tensor, got {seq_idx.dtype}")
        # as kernels/triton_util.check_seq_idx_order (not imported: Triton is optional here):
        # the read-back is a sync, skipped while a CUDA graph is captured
        if L > 1 and not (seq_idx.is_cuda and torch.cuda.is_current_stream_capturing()) \
                and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
            raise ValueError("seq_idx: must be non-decreasing along each row")


def _cdt(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------
# plain-PyTorch references
# ----------------------------------------------------------------------------------------
def taylor_linear_attention_recurrent(q, k, v, eps=1e-6, normalize=True, initial_state=None,
                                      return_final_state=False, seq_idx=None):
    """Explicit phi, one token at a time (``taylor_step``): the test oracle. Computes in
    float64 for float64 inputs, else float32; returns y in v's dtype."""
    _check_args(q, k, v, initial_state, seq_idx, max_feature_dim=10 ** 9)
    batch, L, H, F = q.shape
    P = v.shape[-1]
    cdt = _cdt(v)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    if initial_state is not None:
        state = (initial_state[0].to(cdt), initial_state[1].to(cdt))
    else:
        D = feature_count(F)
        state = (q.new_zeros((batch, H, D, P), dtype=cdt), q.new_zeros((batch, H, D), dtype=cdt))
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(cdt)  # (batch,): 0 resets the state
            state = (state[0] * keep[:, None, None, None], state[1] * keep[:, None, None])
        y_t, state = taylor_step(qc[:, t], kc[:, t], vc[:, t], state, eps, normalize)
        ys.append(y_t)  # (batch, H, P)
    y = torch.stack(ys, dim=1).to(v.dtype)  # (batch, L, H, P)
    if return_final_state:
        return y, state
    return y


def _seq_masks(seq_idx, batch, L, device):
    """(same (batch, L, L): token pairs of one sequence, first (batch, L): tokens of the first
    sequence, last (batch, L): tokens of the last sequence)."""
    if seq_idx is None:
        ones = torch.ones((batch, L), dtype=torch.bool, device=device)
        return torch.ones((batch, L, L), dtype=torch.bool, device=device), ones, ones
    s = seq_idx.to(device)
    same = s[:, :, None] == s[:, None, :]  # (batch, L, L)
    return same, s == s[:, :1], s == s[:, -1:]


def taylor_linear_attention_ref(q, k, v, eps=1e-6, normalize=True, initial_state=None,
                                return_final_state=False, seq_idx=None):
    """Quadratic form with explicit phi: A = (phi(q) phi(k)^T) ∘ causal ∘ same-sequence mask."""
    _check_args(q, k, v, initial_state, seq_idx, max_feature_dim=10 ** 9)
    batch, L, H, F = q.shape
    cdt = _cdt(v)
    pq = taylor_feature_map(q.to(cdt))  # (batch, L, H, D)
    pk = taylor_feature_map(k.to(cdt))  # (batch, L, H, D)
    vc = v.to(cdt)  # (batch, L, H, P)
    same, first, last = _seq_masks(seq_idx, batch, L, q.device)
    causal = torch.ones((L, L), dtype=torch.bool, device=q.device).tril()  # (L, L)
    mask = (same & causal).to(cdt)  # (batch, L, L)
    A = torch.einsum("bthd,bshd->bhts", pq, pk) * mask[:, None]  # (batch, H, L, L)
    num = torch.einsum("bhts,bshp->bthp", A, vc)  # (batch, L, H, P)
    den = A.sum(-1).transpose(1, 2)  # (batch, L, H)
    if initial_state is not None:
        S0, z0 = initial_state[0].to(cdt), initial_state[1].to(cdt)
        g = first.to(cdt)[:, :, None]  # (batch, L, 1): only the first sequence sees S0
        num = num + torch.einsum("bthd,bhdp->bthp", pq, S0) * g[..., None]
        den = den + torch.einsum("bthd,bhd->bth", pq, z0) * g
    y = num / (den[..., None] + eps) if normalize else num  # (batch, L, H, P)
    y = y.to(v.dtype)
    if not return_final_state:
        return y
    m = last.to(cdt)  # (batch, L): tokens of the last sequence feed the final state
    SL = torch.einsum("bshd,bshp,bs->bhdp", pk, vc, m)  # (batch, H, D, P)
    zL = torch.einsum("bshd,bs->bhd", pk, m)  # (batch, H, D)
    if initial_state is not None:
        keep = first[:, -1].to(cdt)  # (batch,): one sequence in the row -> S0 carries through
        SL = SL + S0 * keep[:, None, None, None]
        zL = zL + z0 * keep[:, None, None]
    return y, (SL, zL)


def taylor_linear_attention_chunked_torch(q, k, v, eps=1e-6, normalize=True, initial_state=None,
                                          return_final_state=False, seq_idx=None, chunk_size=64):
    """Chunked PyTorch version (explicit phi within a chunk, state carried across chunks):
    the CPU path of the model; differentiable by autograd, all options."""
    _check_args(q, k, v, initial_state, seq_idx, max_feature_dim=10 ** 9)
    batch, L, H, F = q.shape
    P = v.shape[-1]
    D = feature_count(F)
    Q = int(chunk_size)
    cdt = _cdt(v)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    seq = seq_idx.to(torch.int64) if seq_idx is not None else None
    if initial_state is not None:
        S, z = initial_state[0].to(cdt), initial_state[1].to(cdt)  # (batch, H, D, P), (batch, H, D)
    else:
        S = q.new_zeros((batch, H, D, P), dtype=cdt)
        z = q.new_zeros((batch, H, D), dtype=cdt)
    causal = torch.ones((Q, Q), dtype=torch.bool, device=q.device).tril()  # (Q, Q)
    ys = []
    for c0 in range(0, L, Q):
        c1 = min(c0 + Q, L)
        n = c1 - c0
        pq = taylor_feature_map(qc[:, c0:c1])  # (batch, n, H, D)
        pk = taylor_feature_map(kc[:, c0:c1])  # (batch, n, H, D)
        vv = vc[:, c0:c1]  # (batch, n, H, P)
        if seq is None:
            mask = causal[:n, :n].expand(batch, n, n)  # (batch, n, n)
            g = torch.ones((batch, n), dtype=cdt, device=q.device)  # sees the carried state
            m = g  # feeds the carried state
            gc = torch.ones((batch,), dtype=cdt, device=q.device)  # carried state survives
        else:
            sc = seq[:, c0:c1]  # (batch, n)
            prev = seq[:, max(c0 - 1, 0)]  # (batch,): sequence of the carried state
            mask = causal[:n, :n] & (sc[:, :, None] == sc[:, None, :])  # (batch, n, n)
            g = (sc == prev[:, None]).to(cdt)  # (batch, n)
            m = (sc == sc[:, -1:]).to(cdt)  # (batch, n)
            gc = (sc[:, -1] == prev).to(cdt)  # (batch,)
        A = torch.einsum("bthd,bshd->bhts", pq, pk) * mask[:, None].to(cdt)  # (batch, H, n, n)
        num = torch.einsum("bhts,bshp->bthp", A, vv)  # (batch, n, H, P)
        num = num + torch.einsum("bthd,bhdp->bthp", pq, S) * g[:, :, None, None]
        if normalize:
            den = A.sum(-1).transpose(1, 2) + torch.einsum("bthd,bhd->bth", pq, z) * g[:, :, None]
            num = num / (den[..., None] + eps)
        ys.append(num)
        S = S * gc[:, None, None, None] + torch.einsum("bshd,bshp,bs->bhdp", pk, vv, m)
        z = z * gc[:, None, None] + torch.einsum("bshd,bs->bhd", pk, m)
    y = torch.cat(ys, dim=1).to(v.dtype)  # (batch, L, H, P)
    if return_final_state:
        return y, (S, z)
    return y


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _outer_flat(x, BQ: tl.constexpr, BF: tl.constexpr):
        """x (BQ, BF) -> (BQ, BF*BF) with column i*BF + j = x_i x_j (phi2 before scaling)."""
        return tl.reshape(x[:, :, None] * x[:, None, :], (BQ, BF * BF))

    @triton.jit
    def _grad_through_phi(w1, w2, x, c1, c2, BQ: tl.constexpr, BF: tl.constexpr):
        """d/dx of phi1(x).w1 + phi2(x).w2 per row: c1 w1 + c2 (W2 + W2^T) x, W2 = w2 as (BF, BF).

        w1 (BQ, BF), w2 (BQ, BF*BF), x (BQ, BF) -> (BQ, BF). Both transposes are needed: a
        user-given initial state need not be symmetric in (i, j).
        """
        W2 = tl.reshape(w2, (BQ, BF, BF))  # (BQ, BF, BF)
        g2 = tl.sum(W2 * x[:, None, :], axis=2) + tl.sum(W2 * x[:, :, None], axis=1)  # (BQ, BF)
        return c1 * w1 + c2 * g2

    @triton.jit
    def _load_state(Sp, Zp, base, P, offs_f, offs_v, row_2, mask_f, mask_v, mask_2):
        """One (D, P) state and its (D,) normaliser at row ``base``, split by order:
        S0v (BV,), S1 (BF, BV), S2 (BF*BF, BV), z0 scalar, z1 (BF,), z2 (BF*BF,)."""
        S0v = tl.load(Sp + base * P + offs_v, mask=mask_v, other=0.0)
        S1 = tl.load(Sp + (base + 1 + offs_f[:, None]) * P + offs_v[None, :],
                     mask=mask_f[:, None] & mask_v[None, :], other=0.0)
        S2 = tl.load(Sp + (base + row_2[:, None]) * P + offs_v[None, :],
                     mask=mask_2[:, None] & mask_v[None, :], other=0.0)
        z0 = tl.load(Zp + base)
        z1 = tl.load(Zp + base + 1 + offs_f, mask=mask_f, other=0.0)
        z2 = tl.load(Zp + base + row_2, mask=mask_2, other=0.0)
        return S0v, S1, S2, z0, z1, z2

    @triton.jit
    def _store_state(Sp, Zp, base, P, S0v, S1, S2, z0, z1, z2, pid_v,
                     offs_f, offs_v, ii, row_2, mask_f, mask_v, mask_2, BF: tl.constexpr):
        """Inverse of ``_load_state``. z is the same for every value block: the first one
        writes it (vector masks, since a scalar-and-vector mask is not accepted everywhere)."""
        tl.store(Sp + base * P + offs_v, S0v, mask=mask_v)
        tl.store(Sp + (base + 1 + offs_f[:, None]) * P + offs_v[None, :], S1,
                 mask=mask_f[:, None] & mask_v[None, :])
        tl.store(Sp + (base + row_2[:, None]) * P + offs_v[None, :], S2,
                 mask=mask_2[:, None] & mask_v[None, :])
        first_f = (offs_f * 0 + pid_v) == 0
        first_2 = (ii * 0 + pid_v) == 0
        tl.store(Zp + base + offs_f * 0, tl.zeros([BF], dtype=tl.float32) + z0,
                 mask=(offs_f == 0) & first_f)
        tl.store(Zp + base + 1 + offs_f, z1, mask=mask_f & first_f)
        tl.store(Zp + base + row_2, z2, mask=mask_2 & first_2)

    @triton.jit
    def _fp32_scalars(a, b, c, d):
        """Float arguments as fp32: torch.compile's inductor launches these kernels with Python
        floats typed fp64, and fp64 products would then meet fp32 tiles in tl.dot (seen on
        the H100: "Both operands must be same dtype")."""
        return tl.cast(a, tl.float32), tl.cast(b, tl.float32), tl.cast(c, tl.float32), tl.cast(d, tl.float32)

    @triton.jit
    def _based_fwd_kernel(
        Qp, Kp, Vp, SEQ, S0p, Z0p,  # inputs (S0p, Z0p: the state entering each segment)
        Yp, DENp, SLp, ZLp,  # outputs (SLp, ZLp: the state leaving each segment)
        B, L, H, F, P, SEG_CHUNKS, eps, c_s, c_1, c_2,
        BQ: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
        HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
        STATE_ONLY: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        # grid (batch * H, value blocks, segments). STATE_ONLY: only the state update (no y,
        # no normaliser), for the segment-contribution pass of a split sequence.
        eps, c_s, c_1, c_2 = _fp32_scalars(eps, c_s, c_1, c_2)
        pid_bh = tl.program_id(0)  # batch * H on axis 0 (no 65535 limit)
        pid_v = tl.program_id(1)
        pid_s = tl.program_id(2).to(tl.int64)  # segment of SEG_CHUNKS chunks
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        D = 1 + F + F * F
        offs_t = tl.arange(0, BQ)  # (BQ,) token within chunk
        offs_f = tl.arange(0, BF)  # (BF,) feature
        offs_v = pid_v * BV + tl.arange(0, BV)  # (BV,) value column
        mask_f = offs_f < F
        mask_v = offs_v < P
        # order-2 feature (i, j): register column i*BF + j, memory row 1 + F + i*F + j
        ii = tl.arange(0, BF * BF) // BF
        jj = tl.arange(0, BF * BF) % BF
        mask_2 = (ii < F) & (jj < F)
        row_2 = 1 + F + ii * F + jj  # (BF*BF,)

        # row offset of this (segment, batch, head) in the per-segment states (NS, batch, H, D);
        # with one segment that is the (batch, H, D) layout of the user's state
        st_base = ((pid_s * B + b) * H + h) * D
        if HAS_INIT:
            S0v, S1, S2, z0, z1, z2 = _load_state(S0p, Z0p, st_base, P, offs_f, offs_v, row_2,
                                                  mask_f, mask_v, mask_2)
        else:
            S0v = tl.zeros([BV], dtype=tl.float32)  # (BV,) order 0
            S1 = tl.zeros([BF, BV], dtype=tl.float32)  # (F, BV) order 1
            S2 = tl.zeros([BF * BF, BV], dtype=tl.float32)  # (F^2, BV) order 2
            z0 = tl.sum(tl.zeros([BV], dtype=tl.float32), axis=0)  # scalar
            z1 = tl.zeros([BF], dtype=tl.float32)  # (F,)
            z2 = tl.zeros([BF * BF], dtype=tl.float32)  # (F^2,)

        causal = offs_t[:, None] >= offs_t[None, :]  # (BQ, BQ)
        c_lo = tl.program_id(2) * SEG_CHUNKS  # first chunk of this segment
        c_hi = tl.minimum(c_lo + SEG_CHUNKS, tl.cdiv(L, BQ))  # one past its last chunk
        for c in range(c_lo, c_hi):
            t = c * BQ + offs_t  # (BQ,) token index
            mask_t = t < L
            tok = (b * L + t) * H + h  # (BQ,) row of (batch, L, H)
            mqf = mask_t[:, None] & mask_f[None, :]
            k = tl.load(Kp + tok[:, None] * F + offs_f[None, :], mask=mqf, other=0.0).to(tl.float32)  # (BQ, BF)
            v = tl.load(Vp + tok[:, None] * P + offs_v[None, :],
                        mask=mask_t[:, None] & mask_v[None, :], other=0.0).to(tl.float32)  # (BQ, BV)
            # at a segment's first chunk c*BQ - 1 is the previous segment's last token, so the
            # carried state (the segment's entering state) is read exactly as between chunks
            if HAS_SEQ:
                sq = tl.load(SEQ + b * L + t, mask=mask_t, other=-1)  # (BQ,)
                s_prev = tl.load(SEQ + b * L + tl.maximum(c * BQ - 1, 0))  # sequence of the carried state
                s_last = tl.load(SEQ + b * L + tl.minimum(c * BQ + BQ, L) - 1)  # sequence carried onwards
                g_t = mask_t & (sq == s_prev)  # rows that read the carried state
                m_s = mask_t & (sq == s_last)  # tokens that feed the carried state
                keep = (s_last == s_prev).to(tl.float32)  # carried state survives this chunk
                intra = causal & mask_t[None, :] & (sq[:, None] == sq[None, :])
            else:
                g_t = mask_t
                m_s = mask_t
                keep = 1.0
                intra = causal & mask_t[None, :]
            if not STATE_ONLY:
                q = tl.load(Qp + tok[:, None] * F + offs_f[None, :], mask=mqf, other=0.0).to(tl.float32)  # (BQ, BF)
                # intra-chunk: (1 + s + s^2/2) masked, s = q k^T / sqrt(F)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * c_s  # (BQ, BQ)
                A = tl.where(intra, 1.0 + s + 0.5 * s * s, 0.0)  # (BQ, BQ)
                num = tl.dot(A, v, input_precision=DOT_PREC)  # (BQ, BV)
                # inter-chunk: phi(q) applied to the carried state, one order at a time
                q1 = q * c_1  # (BQ, BF)
                q2 = _outer_flat(q, BQ, BF) * c_2  # (BQ, F^2)
                inter = S0v[None, :] + tl.dot(q1, S1, input_precision=DOT_PREC) \
                    + tl.dot(q2, S2, input_precision=DOT_PREC)  # (BQ, BV)
                num += tl.where(g_t[:, None], inter, 0.0)
                if NORMALIZE:
                    den_in = z0 + tl.sum(q1 * z1[None, :], axis=1) + tl.sum(q2 * z2[None, :], axis=1)  # (BQ,)
                    den = tl.sum(A, axis=1) + tl.where(g_t, den_in, 0.0) + eps  # (BQ,)
                    y = num / den[:, None]
                    tl.store(DENp + tok, den, mask=mask_t & ((offs_t * 0 + pid_v) == 0))
                else:
                    y = num
                tl.store(Yp + tok[:, None] * P + offs_v[None, :], y.to(Yp.dtype.element_ty),
                         mask=mask_t[:, None] & mask_v[None, :])
            # state update with this chunk's keys (only those of the sequence carried onwards)
            mf = m_s.to(tl.float32)  # (BQ,)
            k1 = k * c_1 * mf[:, None]  # (BQ, BF)
            k2 = _outer_flat(k, BQ, BF) * (c_2 * mf[:, None])  # (BQ, F^2)
            S0v = S0v * keep + tl.sum(v * mf[:, None], axis=0)
            S1 = S1 * keep + tl.dot(tl.trans(k1), v, input_precision=DOT_PREC)
            S2 = S2 * keep + tl.dot(tl.trans(k2), v, input_precision=DOT_PREC)
            z0 = z0 * keep + tl.sum(mf, axis=0)
            z1 = z1 * keep + tl.sum(k1, axis=0)
            z2 = z2 * keep + tl.sum(k2, axis=0)

        if STORE_FINAL:
            _store_state(SLp, ZLp, st_base, P, S0v, S1, S2, z0, z1, z2, pid_v,
                         offs_f, offs_v, ii, row_2, mask_f, mask_v, mask_2, BF)

    @triton.jit
    def _based_bwd_kernel(
        Qp, Kp, Vp, SEQ, S0p, Z0p, DYp, DENp, DELTAp, DSLp, DZLp,  # inputs (per-segment states)
        DQp, DKp, DVp, DS0p, DZ0p,  # outputs (DQ, DK: one partial per value block)
        B, L, H, F, P, SEG_CHUNKS, c_s, c_1, c_2,
        BQ: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
        HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
        STORE_DINIT: tl.constexpr, ADJ_ONLY: tl.constexpr,
        NORMALIZE: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        # grid (batch * H, value blocks, segments). S0p/Z0p: the state entering each segment,
        # DSLp/DZLp: the adjoint of the state leaving it, both (NS, batch, H, D[, P]).
        # ADJ_ONLY: only pass 2's adjoint accumulation from zero, stored per segment into
        # DS0p/DZ0p (no dq, dk, dv). Otherwise STORE_DINIT stores the adjoint of the state
        # entering segment 0 (the user's initial state) into DS0p/DZ0p (batch, H, D[, P]).
        _, c_s, c_1, c_2 = _fp32_scalars(c_s, c_s, c_1, c_2)
        pid_bh = tl.program_id(0)
        pid_v = tl.program_id(1)
        pid_s = tl.program_id(2).to(tl.int64)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        D = 1 + F + F * F
        offs_t = tl.arange(0, BQ)
        offs_f = tl.arange(0, BF)
        offs_v = pid_v * BV + tl.arange(0, BV)
        mask_f = offs_f < F
        mask_v = offs_v < P
        ii = tl.arange(0, BF * BF) // BF
        jj = tl.arange(0, BF * BF) % BF
        mask_2 = (ii < F) & (jj < F)
        row_2 = 1 + F + ii * F + jj
        # the normaliser column (dden, z) is counted once, by the first value block
        first = (pid_v == 0).to(tl.float32)
        st_base = ((pid_s * B + b) * H + h) * D  # this (segment, batch, head) in (NS, batch, H, D)
        part = pid_v.to(tl.int64) * B * L * H  # offset of this value block's dq/dk partial (rows)
        causal = offs_t[:, None] >= offs_t[None, :]
        c_lo = tl.program_id(2) * SEG_CHUNKS  # first chunk of this segment
        c_hi = tl.minimum(c_lo + SEG_CHUNKS, tl.cdiv(L, BQ))  # one past its last chunk

        # ---- pass 1, forwards over chunks: dq (needs the carried state S, z) ----------------
        if not ADJ_ONLY:
            if HAS_INIT:
                S0v, S1, S2, z0, z1, z2 = _load_state(S0p, Z0p, st_base, P, offs_f, offs_v, row_2,
                                                      mask_f, mask_v, mask_2)
            else:
                S1 = tl.zeros([BF, BV], dtype=tl.float32)
                S2 = tl.zeros([BF * BF, BV], dtype=tl.float32)
                z1 = tl.zeros([BF], dtype=tl.float32)
                z2 = tl.zeros([BF * BF], dtype=tl.float32)
            for c in range(c_lo, c_hi):
                t = c * BQ + offs_t
                mask_t = t < L
                tok = (b * L + t) * H + h
                mqf = mask_t[:, None] & mask_f[None, :]
                mqv = mask_t[:, None] & mask_v[None, :]
                q = tl.load(Qp + tok[:, None] * F + offs_f[None, :], mask=mqf, other=0.0).to(tl.float32)  # (BQ, BF)
                k = tl.load(Kp + tok[:, None] * F + offs_f[None, :], mask=mqf, other=0.0).to(tl.float32)  # (BQ, BF)
                v = tl.load(Vp + tok[:, None] * P + offs_v[None, :], mask=mqv, other=0.0).to(tl.float32)  # (BQ, BV)
                dy = tl.load(DYp + tok[:, None] * P + offs_v[None, :], mask=mqv, other=0.0).to(tl.float32)  # (BQ, BV)
                if NORMALIZE:
                    den = tl.load(DENp + tok, mask=mask_t, other=1.0)  # (BQ,)
                    dnum = dy / den[:, None]  # (BQ, BV)
                    dden = -tl.load(DELTAp + tok, mask=mask_t, other=0.0) / den * first  # (BQ,)
                else:
                    dnum = dy
                    dden = tl.zeros([BQ], dtype=tl.float32)
                if HAS_SEQ:
                    sq = tl.load(SEQ + b * L + t, mask=mask_t, other=-1)
                    s_prev = tl.load(SEQ + b * L + tl.maximum(c * BQ - 1, 0))
                    s_last = tl.load(SEQ + b * L + tl.minimum(c * BQ + BQ, L) - 1)
                    g_t = mask_t & (sq == s_prev)
                    m_s = mask_t & (sq == s_last)
                    keep = (s_last == s_prev).to(tl.float32)
                    intra = causal & mask_t[None, :] & (sq[:, None] == sq[None, :])
                else:
                    g_t = mask_t
                    m_s = mask_t
                    keep = 1.0
                    intra = causal & mask_t[None, :]
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * c_s  # (BQ, BQ)
                dA = tl.dot(dnum, tl.trans(v), input_precision=DOT_PREC) + dden[:, None]  # (BQ, BQ)
                dS = tl.where(intra, dA * (1.0 + s), 0.0)  # (BQ, BQ): d/ds of (1 + s + s^2/2)
                dq = tl.dot(dS, k, input_precision=DOT_PREC) * c_s  # (BQ, BF)
                w1 = tl.dot(dnum, tl.trans(S1), input_precision=DOT_PREC) + dden[:, None] * z1[None, :]  # (BQ, F)
                w2 = tl.dot(dnum, tl.trans(S2), input_precision=DOT_PREC) + dden[:, None] * z2[None, :]  # (BQ, F^2)
                dq_in = _grad_through_phi(w1, w2, q, c_1, c_2, BQ, BF)  # (BQ, BF)
                dq += tl.where(g_t[:, None], dq_in, 0.0)
                tl.store(DQp + (part + tok[:, None]) * F + offs_f[None, :], dq, mask=mqf)
                mf = m_s.to(tl.float32)
                k1 = k * c_1 * mf[:, None]
                k2 = _outer_flat(k, BQ, BF) * (c_2 * mf[:, None])
                S1 = S1 * keep + tl.dot(tl.trans(k1), v, input_precision=DOT_PREC)
                S2 = S2 * keep + tl.dot(tl.trans(k2), v, input_precision=DOT_PREC)
                z1 = z1 * keep + tl.sum(k1, axis=0)
                z2 = z2 * keep + tl.sum(k2, axis=0)

        # ---- pass 2, backwards over chunks: dk, dv with the adjoint state ----------------------
        # dS* = d loss / d (state carried out of the current chunk), split by order like S.
        if HAS_DFINAL:
            dS0v, dS1, dS2, dz0, dz1, dz2 = _load_state(DSLp, DZLp, st_base, P, offs_f, offs_v, row_2,
                                                        mask_f, mask_v, mask_2)
        else:
            dS0v = tl.zeros([BV], dtype=tl.float32)
            dS1 = tl.zeros([BF, BV], dtype=tl.float32)
            dS2 = tl.zeros([BF * BF, BV], dtype=tl.float32)
            dz0 = tl.sum(tl.zeros([BV], dtype=tl.float32), axis=0)
            dz1 = tl.zeros([BF], dtype=tl.float32)
            dz2 = tl.zeros([BF * BF], dtype=tl.float32)
        for i in range(0, c_hi - c_lo):
            c = c_hi - 1 - i
            t = c * BQ + offs_t
            mask_t = t < L
            tok = (b * L + t) * H + h
            mqf = mask_t[:, None] & mask_f[None, :]
            mqv = mask_t[:, None] & mask_v[None, :]
            q = tl.load(Qp + tok[:, None] * F + offs_f[None, :], mask=mqf, other=0.0).to(tl.float32)
            dy = tl.load(DYp + tok[:, None] * P + offs_v[None, :], mask=mqv, other=0.0).to(tl.float32)
            if NORMALIZE:
                den = tl.load(DENp + tok, mask=mask_t, other=1.0)
                dnum = dy / den[:, None]
                dden = -tl.load(DELTAp + tok, mask=mask_t, other=0.0) / den * first
            else:
                dnum = dy
                dden = tl.zeros([BQ], dtype=tl.float32)
            if HAS_SEQ:
                sq = tl.load(SEQ + b * L + t, mask=mask_t, other=-1)
                s_prev = tl.load(SEQ + b * L + tl.maximum(c * BQ - 1, 0))
                s_last = tl.load(SEQ + b * L + tl.minimum(c * BQ + BQ, L) - 1)
                g_t = mask_t & (sq == s_prev)
                m_s = mask_t & (sq == s_last)
                keep = (s_last == s_prev).to(tl.float32)
                intra = causal & mask_t[None, :] & (sq[:, None] == sq[None, :])
            else:
                g_t = mask_t
                m_s = mask_t
                keep = 1.0
                intra = causal & mask_t[None, :]
            if not ADJ_ONLY:
                k = tl.load(Kp + tok[:, None] * F + offs_f[None, :], mask=mqf, other=0.0).to(tl.float32)
                v = tl.load(Vp + tok[:, None] * P + offs_v[None, :], mask=mqv, other=0.0).to(tl.float32)
                # intra-chunk
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * c_s  # (BQ, BQ)
                A = tl.where(intra, 1.0 + s + 0.5 * s * s, 0.0)  # (BQ, BQ)
                dA = tl.dot(dnum, tl.trans(v), input_precision=DOT_PREC) + dden[:, None]
                dS = tl.where(intra, dA * (1.0 + s), 0.0)
                dv = tl.dot(tl.trans(A), dnum, input_precision=DOT_PREC)  # (BQ, BV)
                dk = tl.dot(tl.trans(dS), q, input_precision=DOT_PREC) * c_s  # (BQ, BF)
                # inter-chunk: keys of this chunk feed the state carried out of it
                k1 = k * c_1
                k2 = _outer_flat(k, BQ, BF) * c_2  # (BQ, F^2)
                dv_in = dS0v[None, :] + tl.dot(k1, dS1, input_precision=DOT_PREC) \
                    + tl.dot(k2, dS2, input_precision=DOT_PREC)  # (BQ, BV)
                dv += tl.where(m_s[:, None], dv_in, 0.0)
                w1 = tl.dot(v, tl.trans(dS1), input_precision=DOT_PREC) + first * dz1[None, :]  # (BQ, F)
                w2 = tl.dot(v, tl.trans(dS2), input_precision=DOT_PREC) + first * dz2[None, :]  # (BQ, F^2)
                dk_in = _grad_through_phi(w1, w2, k, c_1, c_2, BQ, BF)
                dk += tl.where(m_s[:, None], dk_in, 0.0)
                tl.store(DKp + (part + tok[:, None]) * F + offs_f[None, :], dk, mask=mqf)
                tl.store(DVp + tok[:, None] * P + offs_v[None, :], dv.to(DVp.dtype.element_ty), mask=mqv)
            # adjoint of the state carried into this chunk: queries that read it, plus what survives
            gf = g_t.to(tl.float32)
            q1 = q * c_1 * gf[:, None]
            q2 = _outer_flat(q, BQ, BF) * (c_2 * gf[:, None])
            dS0v = dS0v * keep + tl.sum(dnum * gf[:, None], axis=0)
            dS1 = dS1 * keep + tl.dot(tl.trans(q1), dnum, input_precision=DOT_PREC)
            dS2 = dS2 * keep + tl.dot(tl.trans(q2), dnum, input_precision=DOT_PREC)
            dz0 = dz0 * keep + tl.sum(gf * dden, axis=0)
            dz1 = dz1 * keep + tl.sum(q1 * dden[:, None], axis=0)
            dz2 = dz2 * keep + tl.sum(q2 * dden[:, None], axis=0)

        if ADJ_ONLY:  # this segment's own adjoint of its entering state, per segment
            _store_state(DS0p, DZ0p, st_base, P, dS0v, dS1, dS2, dz0, dz1, dz2, pid_v,
                         offs_f, offs_v, ii, row_2, mask_f, mask_v, mask_2, BF)
        elif STORE_DINIT:
            if pid_s == 0:  # the user's initial state enters segment 0; st_base = (b*H + h)*D
                _store_state(DS0p, DZ0p, st_base, P, dS0v, dS1, dS2, dz0, dz1, dz2, pid_v,
                             offs_f, offs_v, ii, row_2, mask_f, mask_v, mask_2, BF)


# ----------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------
def _pow2_at_least(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


# Test hooks: force (BQ, BV) for both kernels, e.g. a small chunk to exercise many chunks;
# force the number of segments NS (SEG = ceil(n_chunks / NS) chunks, so the effective NS can
# come out smaller: 3 chunks forced to 2 segments give segments of 2 and 1 chunks).
_FORCE_BLOCKS: tuple[int, int] | None = None
_FORCE_SEGMENTS: int | None = None

# Segment rule constants (see ``_plan``).
_PROGRAMS_PER_SM = 3  # aim for at least this many programs per SM (2K tokens x 32 rows: 512 on 132 SMs)
_MIN_SEG_CHUNKS = 8  # a segment spans >= 8 chunks (256 tokens at Q = 32): the extra passes stay cheap
_MAX_SEGMENTS = 64  # bounds the torch combine loop (one small op per segment)


class _Plan(NamedTuple):
    BQ: int  # chunk length Q
    BV: int  # value-column block
    warps: int
    NS: int  # segments per row (1: one program walks the whole row)
    SEG: int  # tokens per segment (a multiple of BQ; the last segment may be shorter)


def _segments_rule(n_bh: int, P: int, L: int, BQ: int, BV: int, n_sm: int, shrink_bv: bool) -> tuple[int, int]:
    """(NS, BV) on a GPU with n_sm SMs. The kernels run one program per (batch*head, value
    block, segment) and walk their chunks one after another, so a long row with few (batch,
    head) pairs leaves SMs idle. Keep BV = min(64, P) (a smaller BV recomputes phi(k), phi(q)
    for every value block) and split rows into NS segments, NS the smallest power of two with
    n_bh * nV * NS >= 3 * n_sm (65,536-token batches, H = 16, P = 64 on 132 SMs: 512 programs
    at every L from 2K up; 4 * n_sm = 528 would push L = 2K itself to two segments for 3 %
    more programs). Each segment costs a state-only forward pass and an adjoint-only backward
    pass over its tokens plus a combine in torch, so segments keep >= _MIN_SEG_CHUNKS chunks;
    only when that caps NS (short rows) is BV halved, as before segments existed, while the
    grid has fewer than 2 * n_sm programs."""
    n_chunks = -(-L // BQ)
    ns_max = max(1, min(_MAX_SEGMENTS, n_chunks // _MIN_SEG_CHUNKS))
    nV = -(-P // BV)
    NS = 1
    while NS * 2 <= ns_max and n_bh * nV * NS < _PROGRAMS_PER_SM * n_sm:
        NS *= 2
    while shrink_bv and BV > 16 and n_bh * (-(-P // BV)) * NS < 2 * n_sm:
        BV //= 2
    return NS, BV


def _plan(F: int, P: int, n_bh: int, L: int, device) -> _Plan:
    """Launch plan of both kernels. Fixed rules rather than autotuning: the backward's dq/dk
    partial buffers depend on BV, and autotune cannot run in the interpreter. Under the
    interpreter (and with forced blocks) NS = 1 unless ``_FORCE_SEGMENTS`` asks for more."""
    BF = _pow2_at_least(F)
    BPv = _pow2_at_least(P)
    rule = False
    if _FORCE_BLOCKS is not None:
        BQ, BV, warps = _FORCE_BLOCKS[0], min(_FORCE_BLOCKS[1], BPv), 4
    elif _interpreting():
        BQ, BV, warps = 32, min(64, BPv), 4
    elif BF >= 32:  # 1024 order-2 features: keep register tiles at 16K floats
        BQ, BV, warps, rule = 16, 16, 8, True
    else:
        BQ, BV, warps, rule = 32, min(64, BPv), None, True
    n_chunks = -(-L // BQ)
    NS = 1
    if rule:
        n_sm = torch.cuda.get_device_properties(device).multi_processor_count
        NS, BV = _segments_rule(n_bh, P, L, BQ, BV, n_sm, shrink_bv=BF < 32)
    if warps is None:
        warps = 4 if BV <= 32 else 8
    if _FORCE_SEGMENTS is not None:
        NS = max(1, min(int(_FORCE_SEGMENTS), n_chunks))
    seg_chunks = -(-n_chunks // NS)
    NS = -(-n_chunks // seg_chunks)  # no empty segment
    return _Plan(BQ, BV, warps, NS, seg_chunks * BQ)


def _dot_precision(dtype) -> str:
    # fp32 inputs: exact fp32 products (tests ask for errors far below 1e-3); half inputs: TF32,
    # whose 10-bit mantissa is finer than bf16's and runs on tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _new(shape, like, dtype=None):
    dtype = dtype or like.dtype
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _consts(F):
    # s = q.k / sqrt(F); phi1 = x / F^(1/4); phi2 = x_i x_j / sqrt(2F)
    return 1.0 / math.sqrt(F), F ** -0.25, 1.0 / math.sqrt(2.0 * F)


def _segment_keep(seq, L: int, NS: int, SEG: int):
    """(NS, batch) fp32: 1 where the state entering segment j survives it (the segment's last
    token is in the sequence of the token before the segment; for j = 0 the row's first token),
    0 where a sequence starts inside it; None without seq_idx (always 1). seq is non-decreasing,
    so equal endpoints mean no boundary in between."""
    if seq is None:
        return None
    start = torch.arange(NS, device=seq.device) * SEG  # (NS,) first token a_j
    end = torch.clamp(start + SEG, max=L) - 1  # (NS,) last token e_j
    before = torch.clamp(start - 1, min=0)  # (NS,) token a_j - 1 (token 0 for j = 0)
    return (seq[:, end] == seq[:, before]).to(torch.float32).t().contiguous()  # (NS, batch)


def _scan_segments(dS, dz, keep, S_first, z_first, reverse: bool):
    """Sequential combine over segments in torch (NS is small).

    Forward (reverse=False): dS, dz (NS, batch, H, D, P), (NS, batch, H, D) are the segments'
    own contributions; returns the states entering each segment, S_in[0] = S_first,
    S_in[j] = S_in[j-1] * keep[j-1] + dS[j-1], and the state leaving the last segment.
    Backward (reverse=True): dS, dz are the segments' own adjoints of their entering states;
    returns the adjoints of the states leaving each segment, A[NS-1] = S_first,
    A[j-1] = A[j] * keep[j] + dS[j] (and, last, the adjoint entering segment 0, unused).
    S_first/z_first None mean zeros."""
    NS = dS.shape[0]
    S_all = torch.empty_like(dS)  # (NS, batch, H, D, P)
    z_all = torch.empty_like(dz)  # (NS, batch, H, D)
    order = range(NS - 1, -1, -1) if reverse else range(NS)
    S, z = S_first, z_first
    for j in order:
        if S is None:
            S_all[j].zero_()
            z_all[j].zero_()
        else:
            S_all[j].copy_(S)
            z_all[j].copy_(z)
        if keep is None:
            S = S_all[j] + dS[j]
            z = z_all[j] + dz[j]
        else:
            kj = keep[j]  # (batch,)
            S = torch.addcmul(dS[j], S_all[j], kj[:, None, None, None])  # (batch, H, D, P)
            z = torch.addcmul(dz[j], z_all[j], kj[:, None, None])  # (batch, H, D)
    return S_all, z_all, S, z


def _fwd(q, k, v, S0, z0, seq, eps, normalize, store_final, plan):
    """Returns y, den, the states entering each segment (S_in (NS, batch, H, D, P), z_in; the
    user's S0, z0 or None when NS = 1), and the final state if asked."""
    batch, L, H, F = q.shape
    P = v.shape[-1]
    D = feature_count(F)
    BQ, BV, warps, NS, SEG = plan
    BF = _pow2_at_least(F)
    y = _new((batch, L, H, P), v)  # (batch, L, H, P)
    den = _new((batch, L, H), v, torch.float32) if normalize else y  # (batch, L, H)
    c_s, c_1, c_2 = _consts(F)
    grid = (batch * H, triton.cdiv(P, BV), NS)
    meta = dict(BQ=BQ, BF=BF, BV=BV, HAS_SEQ=seq is not None, NORMALIZE=normalize,
                DOT_PREC=_dot_precision(q.dtype), num_warps=warps)
    seq_arg = seq if seq is not None else q
    SL = zL = None
    if NS == 1:
        S_in, z_in = S0, z0
        if store_final:
            SL = _new((batch, H, D, P), v, torch.float32)  # (batch, H, D, P)
            zL = _new((batch, H, D), v, torch.float32)  # (batch, H, D)
    else:
        # 1. each segment's own contribution to the state leaving it, from a zero state
        dS = _new((NS, batch, H, D, P), v, torch.float32)  # (NS, batch, H, D, P)
        dz = _new((NS, batch, H, D), v, torch.float32)  # (NS, batch, H, D)
        _based_fwd_kernel[grid](
            q, k, v, seq_arg, q, q, y, den, dS, dz,
            batch, L, H, F, P, SEG // BQ, float(eps), c_s, c_1, c_2,
            HAS_INIT=False, STORE_FINAL=True, STATE_ONLY=True, **meta,
        )
        # 2. states entering the segments (and leaving the last one)
        keep = _segment_keep(seq, L, NS, SEG)  # (NS, batch) or None
        S_in, z_in, SL, zL = _scan_segments(dS, dz, keep, S0, z0, reverse=False)
    # 3. the outputs, every segment starting from its entering state
    _based_fwd_kernel[grid](
        q, k, v, seq_arg, S_in if S_in is not None else q, z_in if z_in is not None else q,
        y, den, SL if NS == 1 and store_final else y, zL if NS == 1 and store_final else y,
        batch, L, H, F, P, SEG // BQ, float(eps), c_s, c_1, c_2,
        HAS_INIT=S_in is not None, STORE_FINAL=NS == 1 and store_final, STATE_ONLY=False, **meta,
    )
    if not store_final:
        SL = zL = None
    return y, (den if normalize else None), S_in, z_in, SL, zL


def _bwd(q, k, v, S_in, z_in, seq, dy, den, delta, dSL, dzL, normalize, plan, want_dinit):
    batch, L, H, F = q.shape
    P = v.shape[-1]
    D = feature_count(F)
    BQ, BV, warps, NS, SEG = plan
    BF = _pow2_at_least(F)
    nV = triton.cdiv(P, BV)
    c_s, c_1, c_2 = _consts(F)
    grid = (batch * H, nV, NS)
    meta = dict(BQ=BQ, BF=BF, BV=BV, HAS_SEQ=seq is not None, NORMALIZE=normalize,
                DOT_PREC=_dot_precision(q.dtype), num_warps=warps)
    seq_arg = seq if seq is not None else q
    den_arg = den if normalize else q
    delta_arg = delta if normalize else q
    if NS > 1:
        # 1. each segment's own adjoint of its entering state (its queries only, from zero)
        ddS = _new((NS, batch, H, D, P), q, torch.float32)  # (NS, batch, H, D, P)
        ddz = _new((NS, batch, H, D), q, torch.float32)  # (NS, batch, H, D)
        _based_bwd_kernel[grid](
            q, k, v, seq_arg, q, q, dy, den_arg, delta_arg, q, q,
            ddS, ddS, ddS, ddS, ddz,
            batch, L, H, F, P, SEG // BQ, c_s, c_1, c_2,
            HAS_INIT=False, HAS_DFINAL=False, STORE_DINIT=False, ADJ_ONLY=True, **meta,
        )
        # 2. adjoints of the states leaving the segments, last to first
        keep = _segment_keep(seq, L, NS, SEG)  # (NS, batch) or None
        dSL, dzL, _, _ = _scan_segments(ddS, ddz, keep, dSL, dzL, reverse=True)
    # 3. dq, dk, dv per segment (and the user's initial-state gradient from segment 0)
    dq = _new((nV, batch, L, H, F), q, torch.float32)  # per value block partials, summed below
    dk = _new((nV, batch, L, H, F), q, torch.float32)
    dv = _new((batch, L, H, P), v)
    dS0 = _new((batch, H, D, P), q, torch.float32) if want_dinit else dv
    dz0 = _new((batch, H, D), q, torch.float32) if want_dinit else dv
    has_init = S_in is not None
    has_dfinal = dSL is not None
    _based_bwd_kernel[grid](
        q, k, v, seq_arg, S_in if has_init else q, z_in if has_init else q,
        dy, den_arg, delta_arg, dSL if has_dfinal else q, dzL if has_dfinal else q,
        dq, dk, dv, dS0, dz0,
        batch, L, H, F, P, SEG // BQ, c_s, c_1, c_2,
        HAS_INIT=has_init, HAS_DFINAL=has_dfinal, STORE_DINIT=want_dinit, ADJ_ONLY=False, **meta,
    )
    dq = dq.sum(0).to(q.dtype)  # (batch, L, H, F)
    dk = dk.sum(0).to(k.dtype)  # (batch, L, H, F)
    return dq, dk, dv, (dS0 if want_dinit else None), (dz0 if want_dinit else None)


class _TaylorLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, S0, z0, seq, eps, normalize, return_final):
        batch, L, H, F = q.shape
        plan = _plan(F, v.shape[-1], batch * H, L, q.device)
        y, den, S_in, z_in, SL, zL = _fwd(q, k, v, S0, z0, seq, eps, normalize, return_final, plan)
        # the states entering the segments (the user's initial state when NS = 1)
        ctx.save_for_backward(q, k, v, S_in, z_in, seq, y, den)
        ctx.normalize = normalize
        ctx.return_final = return_final
        ctx.plan = plan  # the backward must split the rows the same way
        ctx.has_init = S0 is not None
        if return_final:
            return y, SL, zL
        return y

    @staticmethod
    def backward(ctx, dy, *dfinal):
        q, k, v, S_in, z_in, seq, y, den = ctx.saved_tensors
        dy = dy.contiguous()
        delta = None
        if ctx.normalize:
            delta = (dy.float() * y.float()).sum(-1).contiguous()  # (batch, L, H): dy . y
        dSL = dzL = None
        if ctx.return_final and (dfinal[0] is not None or dfinal[1] is not None):
            batch, L, H, F = q.shape
            D, P = feature_count(F), v.shape[-1]
            dSL = dfinal[0] if dfinal[0] is not None else q.new_zeros((batch, H, D, P), dtype=torch.float32)
            dzL = dfinal[1] if dfinal[1] is not None else q.new_zeros((batch, H, D), dtype=torch.float32)
            dSL, dzL = dSL.float().contiguous(), dzL.float().contiguous()
        dq, dk, dv, dS0, dz0 = _bwd(q, k, v, S_in, z_in, seq, dy, den, delta, dSL, dzL, ctx.normalize,
                                    ctx.plan, ctx.has_init)
        return dq, dk, dv, dS0, dz0, None, None, None, None


def taylor_linear_attention_triton(q, k, v, eps=1e-6, normalize=True, initial_state=None,
                                   return_final_state=False, seq_idx=None):
    """The Triton path (CUDA, or the CPU interpreter with TRITON_INTERPRET=1); computes in fp32."""
    _check_args(q, k, v, initial_state, seq_idx)
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q dtype must be float32, float16 or bfloat16 for the Triton path, got {q.dtype}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    S0 = z0 = None
    if initial_state is not None:
        S0 = initial_state[0].float().contiguous()  # (batch, H, D, P)
        z0 = initial_state[1].float().contiguous()  # (batch, H, D)
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None  # (batch, L)
    out = _TaylorLinearAttention.apply(q, k, v, S0, z0, seq, float(eps), bool(normalize),
                                       bool(return_final_state))
    if return_final_state:
        y, SL, zL = out
        return y, (SL, zL)
    return out


def taylor_linear_attention(q, k, v, eps=1e-6, normalize=True, initial_state=None,
                            return_final_state=False, seq_idx=None):
    """Causal Based (Taylor) linear attention; see the module docstring for the definition.

    q, k (batch, L, H, F), F <= 32 (16 in Based); v (batch, L, H, P). Returns y (batch, L, H, P)
    in v's dtype, or (y, (S_L, z_L)) with ``return_final_state`` (fp32 state).

    Dispatch: the Triton kernels on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1
    (the test set-up), for float32/float16/bfloat16; otherwise (a CPU, or float64 inputs) the
    chunked PyTorch version, which is differentiable by autograd with every option.
    """
    _check_args(q, k, v, initial_state, seq_idx)
    use_triton = HAS_TRITON and q.dtype != torch.float64 and (q.is_cuda or _interpreting())
    fn = taylor_linear_attention_triton if use_triton else taylor_linear_attention_chunked_torch
    return fn(q, k, v, eps=eps, normalize=normalize, initial_state=initial_state,
              return_final_state=return_final_state, seq_idx=seq_idx)


__all__ = [
    "MAX_FEATURE_DIM", "feature_count", "taylor_feature_map", "based_state_size", "taylor_step",
    "taylor_linear_attention", "taylor_linear_attention_triton", "taylor_linear_attention_ref",
    "taylor_linear_attention_recurrent", "taylor_linear_attention_chunked_torch",
]
