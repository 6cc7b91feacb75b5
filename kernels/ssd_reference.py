"""Plain-PyTorch references for the chunked SSD (Mamba-2) scan.

Three functions, all differentiable by autograd and all accepting every option of
``ssd_chunked`` (see ``ssdbench.kernels.ssd`` for the argument meanings and head structures):

* ``ssd_chunked_ref``    -- the chunked algorithm of the Mamba-2 paper (§6) written with einsum;
                            this is the CPU path of the model and the readable statement of
                            the four steps that the Triton kernels implement;
* ``ssd_sequential_ref`` -- the recurrence itself, one time step at a time: the test oracle
                            (run in float64);
* ``ssd_step``           -- one recurrent step, for decoding.

Symbols: batch, L sequence length, H heads, P head dim, N state size, Q chunk length,
G groups (Hx, Gb, Gc: the group counts of x, B and C).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------
def process_dt(dt, dt_bias, dt_softplus, dt_limit):
    """dt (batch, L, H) -> float dt after bias, softplus and clamp (the clamp, as in
    mamba_ssm, only when dt_limit differs from the default (0, inf))."""
    dt = dt.float() if dt.dtype in (torch.float16, torch.bfloat16) else dt
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)  # (batch, L, H)
    if dt_softplus:
        dt = F.softplus(dt)  # (batch, L, H)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])  # (batch, L, H)
    return dt


def expand_heads(t, H):
    """(batch, L, G, K) -> (batch, L, H, K): head h reads group h // (H // G)."""
    G = t.shape[2]
    if G == H:
        return t
    return t.repeat_interleave(H // G, dim=2)


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _finish(y, x, D, z, cdt):
    """y (batch, L, H, P) in cdt: add D x, gate with silu(z), cast to x's dtype."""
    H = y.shape[2]
    xh = expand_heads(x.to(cdt), H)  # (batch, L, H, P)
    if D is not None:
        Dh = D.to(cdt)
        Dh = Dh[:, None] if Dh.dim() == 1 else Dh  # (H, 1) or (H, P)
        y = y + xh * Dh
    if z is not None:
        zc = z.to(cdt)
        y = y * zc * torch.sigmoid(zc)  # y * silu(z)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------
# the sequential oracle
# ----------------------------------------------------------------------------------------
def ssd_sequential_ref(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None,
                       dt_softplus=False, dt_limit=(0.0, float("inf")), initial_states=None,
                       seq_idx=None, return_final_states=False):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T;  y_t = h_t C_t + D x_t;  y *= silu(z).

    The state is reset (h_{t-1} := 0) where seq_idx changes; ``initial_states`` is the state
    before token 0 and so reaches only the first sequence of a row. ``chunk_size`` is
    accepted for signature compatibility and ignored.
    """
    batch, L, Hx, P = x.shape
    H = dt.shape[-1]
    N = B.shape[-1]
    cdt = _compute_dtype(x)
    dtp = process_dt(dt.to(cdt) if cdt == torch.float64 else dt, dt_bias, dt_softplus, dt_limit).to(cdt)
    xh = expand_heads(x.to(cdt), H)  # (batch, L, H, P)
    Bh = expand_heads(B.to(cdt), H)  # (batch, L, H, N)
    Ch = expand_heads(C.to(cdt), H)  # (batch, L, H, N)
    Af = A.to(cdt)  # (H,)
    if initial_states is not None:
        h = initial_states.to(cdt)  # (batch, H, P, N)
    else:
        h = x.new_zeros((batch, H, P, N), dtype=cdt)
    ys = []
    for t in range(L):
        a = torch.exp(dtp[:, t] * Af)  # (batch, H)
        if seq_idx is not None and t > 0:
            same = (seq_idx[:, t] == seq_idx[:, t - 1]).to(cdt)  # (batch,)
            a = a * same[:, None]
        inp = (dtp[:, t, :, None, None] * xh[:, t, :, :, None]) * Bh[:, t, :, None, :]  # (batch, H, P, N)
        h = a[:, :, None, None] * h + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))  # (batch, H, P)
    y = torch.stack(ys, dim=1)  # (batch, L, H, P)
    y = _finish(y, x, D, z, cdt)
    if return_final_states:
        return y, h.float() if cdt != torch.float64 else h
    return y


# ----------------------------------------------------------------------------------------
# the chunked reference (Mamba-2 §6): the four steps
# ----------------------------------------------------------------------------------------
def ssd_chunked_ref(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                    dt_softplus=False, dt_limit=(0.0, float("inf")), initial_states=None,
                    seq_idx=None, return_final_states=False):
    """Chunked SSD in plain PyTorch; same function as ``ssd_sequential_ref``.

    Tensors are laid out heads-first per chunk, (batch, nc, H, Q, K), so every step is a
    batched matmul; a shared group is broadcast to its heads as a view.
    """
    batch, L, Hx, P = x.shape
    H = dt.shape[-1]
    N = B.shape[-1]
    Q = int(chunk_size)
    cdt = _compute_dtype(x)
    dtp = process_dt(dt.to(cdt) if cdt == torch.float64 else dt, dt_bias, dt_softplus, dt_limit).to(cdt)
    nc = (L + Q - 1) // Q
    pad = nc * Q - L  # padded steps have dt = 0: decay 1 and no input, so they change nothing

    def chunked(t):
        """(batch, L, G, K) -> (batch, nc, H, Q, K); head h reads group h // (H // G)."""
        G, K = t.shape[2], t.shape[3]
        t = F.pad(t.to(cdt), (0, 0, 0, 0, 0, pad)) if pad else t.to(cdt)
        t = t.view(batch, nc, Q, G, K).permute(0, 1, 3, 2, 4)  # (batch, nc, G, Q, K)
        if G != H:
            t = t.unsqueeze(3).expand(batch, nc, G, H // G, Q, K).reshape(batch, nc, H, Q, K)
        return t

    xc, Bc, Cc = chunked(x), chunked(B), chunked(C)  # (batch, nc, H, Q, P|N|N)
    dtc = (F.pad(dtp, (0, 0, 0, pad)) if pad else dtp).view(batch, nc, Q, H).transpose(2, 3)  # (batch, nc, H, Q)
    cs = torch.cumsum(dtc * A.to(cdt)[:, None], dim=-1)  # (batch, nc, H, Q) log-decay from the chunk start
    xdt = xc * dtc[..., None]  # (batch, nc, H, Q, P)

    # Packed sequences: masks that keep every contribution inside its own sequence.
    if seq_idx is not None:
        seq = seq_idx.to(torch.int64)  # (batch, L)
        if pad:
            seq = torch.cat([seq, seq[:, -1:].expand(batch, pad)], dim=1)
        sc = seq.view(batch, nc, Q)  # (batch, nc, Q)
        # seq of the token before each chunk (chunk 0: the row's first seq, so the initial
        # state reaches the first sequence)
        seq_prev = torch.cat([sc[:, :1, 0], sc[:, :-1, -1]], dim=1)  # (batch, nc)
        seq_last = sc[:, :, -1]  # (batch, nc)

    # (1) diagonal blocks: masked attention (C B^T o L) (dt x) inside each chunk
    mask = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=x.device))  # (Q, Q)
    if seq_idx is not None:
        mask = (mask & (sc[:, :, :, None] == sc[:, :, None, :]))[:, :, None]  # (batch, nc, 1, Q, Q)
    segsum = cs[..., :, None] - cs[..., None, :]  # (batch, nc, H, Q(t), Q(s))
    Lmat = torch.exp(segsum.masked_fill(~mask, float("-inf")))  # (batch, nc, H, Q, Q)
    scores = Cc @ Bc.transpose(-1, -2)  # (batch, nc, H, Q, Q)
    y_diag = (scores * Lmat) @ xdt  # (batch, nc, H, Q, P)

    # (2) each chunk's final state from its own inputs (only tokens of the chunk's last seq)
    decay_states = torch.exp(cs[..., -1:] - cs)  # (batch, nc, H, Q)
    if seq_idx is not None:
        decay_states = decay_states * (sc == seq_last[:, :, None]).to(cdt)[:, :, None]
    states = (Bc * decay_states[..., None]).transpose(-1, -2) @ xdt  # (batch, nc, H, N, P)

    # (3) recurrence over chunk states, reset where the seq changes inside or at a chunk
    if initial_states is not None:
        s = initial_states.to(cdt).transpose(-1, -2)  # (batch, H, N, P)
    else:
        s = x.new_zeros((batch, H, N, P), dtype=cdt)
    chunk_decay = torch.exp(cs[..., -1])  # (batch, nc, H)
    if seq_idx is not None:
        chunk_decay = chunk_decay * (seq_last == seq_prev).to(cdt)[..., None]
    prev = []
    for c in range(nc):
        prev.append(s)
        s = chunk_decay[:, c, :, None, None] * s + states[:, c]  # (batch, H, N, P)
    prev = torch.stack(prev, dim=1)  # (batch, nc, H, N, P): the state entering each chunk

    # (4) state -> output for each chunk (tokens of the seq that the state belongs to)
    out_decay = torch.exp(cs)  # (batch, nc, H, Q)
    if seq_idx is not None:
        out_decay = out_decay * (sc == seq_prev[:, :, None]).to(cdt)[:, :, None]
    y_off = (Cc * out_decay[..., None]) @ prev  # (batch, nc, H, Q, P)

    y = (y_diag + y_off).permute(0, 1, 3, 2, 4).reshape(batch, nc * Q, H, P)[:, :L]  # (batch, L, H, P)
    y = _finish(y, x, D, z, cdt)
    if return_final_states:
        s = s.transpose(-1, -2)  # (batch, H, P, N)
        return y, s.float() if cdt != torch.float64 else s
    return y


# ----------------------------------------------------------------------------------------
# one recurrent step (decoding)
# ----------------------------------------------------------------------------------------
def ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, float("inf"))):
    """One step of the recurrence.

    state (batch, H, P, N) float32; x (batch, Hx, P); dt (batch, H); B (batch, Gb, N);
    C (batch, Gc, N); z (batch, H, P). Returns (y (batch, H, P) in x's dtype, new state).
    """
    batch, Hx, P = x.shape
    H = dt.shape[-1]
    cdt = torch.float64 if state.dtype == torch.float64 else torch.float32
    dtp = process_dt(dt[:, None], dt_bias, dt_softplus, dt_limit)[:, 0].to(cdt)  # (batch, H)
    xh = expand_heads(x[:, None].to(cdt), H)[:, 0]  # (batch, H, P)
    Bh = expand_heads(B[:, None].to(cdt), H)[:, 0]  # (batch, H, N)
    Ch = expand_heads(C[:, None].to(cdt), H)[:, 0]  # (batch, H, N)
    a = torch.exp(dtp * A.to(cdt))  # (batch, H)
    new = a[..., None, None] * state.to(cdt) + (dtp[..., None] * xh)[..., None] * Bh[:, :, None, :]  # (batch, H, P, N)
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)  # (batch, H, P)
    y = _finish(y[:, None], x[:, None], D, None if z is None else z[:, None], cdt)[:, 0]
    return y, new.to(state.dtype)


__all__ = ["ssd_chunked_ref", "ssd_sequential_ref", "ssd_step", "process_dt", "expand_heads"]
