"""Mamba-2: the SSD layer inside the parallel Mamba block (Dao & Gu 2024, §7).

    u (batch, L, d_model)
      -> in_proj -> [z | x B C | dt]              one projection, all in parallel
      -> causal depthwise conv (width 4) + SiLU over x, B, C   (seq_idx-aware)
      -> SSD: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t + D x_t
      -> gated RMSNorm: norm(y * silu(z))
      -> out_proj

Symbols: P = headdim, H = d_inner / P heads, N = d_state, G = ngroups, Q = chunk_size.

Head structures (§7; the attention correspondence C<->Q, B<->K, x<->V): which of x, B, C are
per head, as (Hx, Gb, Gc) head counts given to the SSD kernel without copying:

    head_structure  paper name                              Hx   Gb   Gc
    mva             multi-value / multi-input (Mamba's)     H    1    1
    mqa             multi-query / multi-contract            1    1    H
    mka             multi-key / multi-expand                1    H    1
    mha             multi-head                              H    H    H
    gva             grouped-value (ngroups = G)             H    G    G

With Hx = 1 the block projects x to a single head of P channels shared by all H heads; z and
the output keep H * P = d_inner channels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssdbench.errors import require, require_positive_int
from ssdbench.kernels.causal_conv1d import causal_conv1d, causal_conv1d_update
from ssdbench.kernels.gated_rmsnorm import gated_rms_norm_ref
from ssdbench.kernels.mamba2_decode import mamba2_decode_step
from ssdbench.kernels.mamba2_fused import Dims, mamba2_inner
from ssdbench.kernels.ssd import ssd_chunked, ssd_chunked_ref, ssd_step, use_triton
from ssdbench.models.layers import GatedRMSNorm, ssm_state_dtype, store_conv_state
from ssdbench.models.lm import LanguageModel

HEAD_STRUCTURES = ("mva", "mqa", "mka", "mha", "gva")


def head_counts(head_structure: str, H: int, ngroups: int) -> tuple[int, int, int]:
    """(Hx, Gb, Gc): how many distinct x heads, B groups and C groups the structure has."""
    return {"mva": (H, 1, 1), "mqa": (1, 1, H), "mka": (1, H, 1), "mha": (H, H, H),
            "gva": (H, ngroups, ngroups)}[head_structure]


class Mamba2Mixer(nn.Module):
    def __init__(self, d_model: int, d_state: int = 128, headdim: int = 64, expand: int = 2,
                 ngroups: int = 1, head_structure: str = "gva", d_conv: int = 4, chunk_size: int = 256,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4,
                 A_init_range: tuple[float, float] = (1.0, 16.0), dt_limit: tuple[float, float] = (0.0, float("inf")),
                 impl: str = "auto", norm_eps: float = 1e-5, proj_align: int = 64):
        super().__init__()
        self.d_model, self.N, self.P = d_model, d_state, headdim
        self.d_inner = expand * d_model
        self.H = self.d_inner // headdim
        self.Hx, self.Gb, self.Gc = head_counts(head_structure, self.H, ngroups)
        self.head_structure, self.ngroups = head_structure, ngroups
        self.d_conv, self.chunk_size, self.impl = d_conv, chunk_size, impl
        # On the Triton path in_proj's output rows are padded to a multiple of proj_align
        # columns (1: none). 125M's rows are 3352 wide, 6,704 bytes in bf16, so most rows start
        # only 16 bytes aligned; 64 columns put every row on a 128-byte line. Measured in a
        # 125M training step on the H100 (results/h100/session11): 63.3 -> 62.4 ms, from the
        # in_proj matmuls (cuBLAS) and the dt kernel; the conv and norm kernels that read the
        # slices did not move. The pad columns are never read; the parameter is unchanged
        # (the weight is padded on the fly), and so are the parameter and FLOP counts.
        self.proj_align = proj_align
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.A_init_range, self.dt_limit = tuple(A_init_range), tuple(dt_limit)

        # [z | x | B | C | dt] widths
        self.splits = [self.d_inner, self.Hx * self.P, self.Gb * self.N, self.Gc * self.N, self.H]
        self.conv_dim = self.Hx * self.P + (self.Gb + self.Gc) * self.N
        self.dims = Dims(self.d_inner, self.Hx, self.P, self.Gb, self.Gc, self.N, self.H)  # the fused kernels' widths
        self.in_proj = nn.Linear(d_model, sum(self.splits), bias=False)
        # Depthwise conv parameters live in an nn.Conv1d for its default init; the computation
        # goes through the project's causal_conv1d (seq_idx-aware, Triton on GPUs).
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.H))  # A = -exp(A_log), one scalar per head
        self.dt_bias = nn.Parameter(torch.empty(self.H))
        self.D = nn.Parameter(torch.ones(self.H))
        for p in (self.A_log, self.dt_bias, self.D):
            p._no_weight_decay = True
        # Per-group norm for GVA (as mamba_ssm does, so tensor-parallel shards normalise alone).
        groups = ngroups if head_structure == "gva" else 1
        self.norm = GatedRMSNorm(self.d_inner, norm_eps, group_size=self.d_inner // groups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.out_proj._is_residual_out = True

    @torch.no_grad()
    def init_special(self) -> None:
        """Paper init: A = -U(1, 16); dt_bias = softplus^-1(dt0), dt0 log-uniform in [dt_min, dt_max]."""
        lo, hi = self.A_init_range
        self.A_log.copy_(torch.empty(self.H).uniform_(lo, hi).log())
        dt = torch.exp(torch.rand(self.H) * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        dt = dt.clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.D.fill_(1.0)

    def _triton(self, t: torch.Tensor) -> bool:
        """Whether this mixer runs the Triton kernels: impl "triton" wherever ssd_chunked would
        (CUDA, or the CPU interpreter), "auto" on CUDA only (the interpreter is for testing
        kernels, far too slow to train with), never "torch"."""
        wanted = self.impl == "triton" or (self.impl == "auto" and t.is_cuda)
        return wanted and use_triton(t)

    def forward(self, u: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        batch, L, _ = u.shape
        A = -torch.exp(self.A_log.float())  # (H,)
        if self._triton(u):  # conv, SSD and norm as one Function (kernels/mamba2_fused.py)
            w = self.in_proj.weight  # (width, d_model)
            pad = -w.shape[0] % self.proj_align
            if pad:  # (no copy of the weight when the width is already aligned)
                w = F.pad(w, (0, 0, 0, pad))  # (width + pad, d_model)
            proj = F.linear(u, w)  # (batch, L, width + pad) = [z | x B C | dt | pad]
            y = mamba2_inner(proj, self.conv1d.weight, self.conv1d.bias, A, self.D, self.dt_bias, self.norm.weight,
                             self.dims, self.chunk_size, self.dt_limit, self.norm.eps, self.norm.group_size, seq_idx)
            return self.out_proj(y)  # y (batch, L, d_inner)
        # the plain-PyTorch path (the CPU path and the reference of the tests)
        proj = self.in_proj(u)  # (batch, L, d_inner + conv_dim + H) = [z | x B C | dt]
        z, xBC, dt = torch.split(proj, [self.d_inner, self.conv_dim, self.H], dim=-1)
        xBC = causal_conv1d(xBC, self.conv1d.weight, self.conv1d.bias, activation="silu", seq_idx=seq_idx,
                            impl="torch", channel_last=True)  # (batch, L, conv_dim)
        x, B, C = torch.split(xBC, self.splits[1:4], dim=-1)
        x = x.reshape(batch, L, self.Hx, self.P)  # (batch, L, Hx, P)
        B = B.reshape(batch, L, self.Gb, self.N)  # (batch, L, Gb, N)
        C = C.reshape(batch, L, self.Gc, self.N)  # (batch, L, Gc, N)
        y = ssd_chunked_ref(x, dt, A, B, C, self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
                            dt_limit=self.dt_limit, seq_idx=seq_idx)  # (batch, L, H, P)
        y = gated_rms_norm_ref(y.reshape(batch, L, self.d_inner), z, self.norm.weight, self.norm.eps,
                               self.norm.group_size)  # (batch, L, d_inner)
        return self.out_proj(y)

    # ---- decoding ----------------------------------------------------------------------------
    def allocate_state(self, batch: int, device=None, dtype=torch.float32, ssm_dtype: torch.dtype | None = None):
        """(conv_state (batch, conv_dim, W-1) in dtype, ssm_state (batch, H, P, N) in ssm_dtype:
        None gives float32 (float64 for float64); a half dtype halves the state's memory traffic)."""
        conv_state = torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype)
        ssm_state = torch.zeros(batch, self.H, self.P, self.N, device=device, dtype=ssm_state_dtype(dtype, ssm_dtype))
        return conv_state, ssm_state

    def prefill(self, u: torch.Tensor, state):
        """A prompt u (batch, L, d_model) -> (batch, L, d_model) by the chunked SSD, leaving in a
        fresh (zero) state the conv's last d_conv-1 inputs and SSD's final state: what ``step``
        would leave after the prompt. The Triton path runs conv, SSD and norm as separate
        kernels (the fused Function of forward returns no state); no gradients are needed."""
        conv_state, ssm_state = state
        batch, L, _ = u.shape
        A = -torch.exp(self.A_log.float())  # (H,)
        triton = self._triton(u)
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.conv_dim, self.H], dim=-1)
        store_conv_state(conv_state, xBC)  # the conv's inputs, before it
        xBC = causal_conv1d(xBC, self.conv1d.weight, self.conv1d.bias, activation="silu",
                            impl="auto" if triton else "torch", channel_last=True)  # (batch, L, conv_dim)
        x, B, C = torch.split(xBC, self.splits[1:4], dim=-1)
        x = x.reshape(batch, L, self.Hx, self.P)  # (batch, L, Hx, P)
        B = B.reshape(batch, L, self.Gb, self.N)  # (batch, L, Gb, N)
        C = C.reshape(batch, L, self.Gc, self.N)  # (batch, L, Gc, N)
        ssd = ssd_chunked if triton else ssd_chunked_ref
        if triton:  # slices of the projection: give the kernels dense inputs (a copy, once per prompt)
            x, dt, B, C, z = (t.contiguous() for t in (x, dt, B, C, z))
        y, final = ssd(x, dt, A, B, C, self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
                       dt_limit=self.dt_limit, return_final_states=True)  # (batch, L, H, P), (batch, H, P, N)
        ssm_state.copy_(final)
        y = y.reshape(batch, L, self.d_inner)  # (batch, L, d_inner)
        y = self.norm(y, z) if triton else gated_rms_norm_ref(y, z, self.norm.weight, self.norm.eps,
                                                              self.norm.group_size)
        return self.out_proj(y), state

    def step(self, u: torch.Tensor, state):
        """u (batch, d_model) -> (batch, d_model), advancing (conv_state, ssm_state)."""
        conv_state, ssm_state = state
        batch = u.shape[0]
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.conv_dim, self.H], dim=-1)
        if self._triton(u):  # conv update and SSD step in two kernels (kernels/mamba2_decode.py)
            y = mamba2_decode_step(xBC, dt, conv_state, self.conv1d.weight, self.conv1d.bias, ssm_state, self.A_log,
                                   self.D, self.dt_bias, self.dims, self.dt_limit)  # (batch, d_inner)
            return self.out_proj(self.norm(y, z)), (conv_state, ssm_state)
        xBC = causal_conv1d_update(xBC, conv_state, self.conv1d.weight, self.conv1d.bias, activation="silu")
        x, B, C = torch.split(xBC, self.splits[1:4], dim=-1)
        A = -torch.exp(self.A_log.float())
        y, ssm_state = ssd_step(ssm_state, x.reshape(batch, self.Hx, self.P), dt, A,
                                B.reshape(batch, self.Gb, self.N), C.reshape(batch, self.Gc, self.N),
                                D=self.D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit)
        y = self.norm(y.reshape(batch, self.d_inner), z)
        return self.out_proj(y), (conv_state, ssm_state)

    # ---- accounting ----------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token beyond the projections (which the shell counts).

        With Q = min(chunk, seq_len): (1) the diagonal block, C B^T (2QN) then the masked
        product with x (2QP), counted over the full Q x Q block as dense kernels compute it;
        (2) the chunk state B^T x (2NP); (3) the chunk-state recurrence (2NP / Q); (4) the
        state-to-output product C h (2NP). Steps 1b-4 are per head. C B^T is per distinct
        (B group, C group) pair, H / gcd(H/Gb, H/Gc) of them (1 for Mamba's shared B and C):
        heads that share both read the same C B^T, and the Triton kernels compute it once for
        them (the plain-PyTorch reference recomputes it per head). Plus the depthwise conv
        (2 * width per channel).
        """
        Q = min(self.chunk_size, max(1, seq_len))
        cb_groups = self.H // math.gcd(self.H // self.Gb, self.H // self.Gc)
        per_head = 2 * Q * self.P + 4 * self.N * self.P + 2 * self.N * self.P / Q
        return int(cb_groups * 2 * Q * self.N + self.H * per_head + 2 * self.conv_dim * self.d_conv)

    def state_size(self) -> int:
        """SSM state H * P * N plus the conv buffer (conv_dim * (width - 1))."""
        return self.H * self.P * self.N + self.conv_dim * (self.d_conv - 1)


class Mamba2(LanguageModel):
    arch = "mamba2"

    def __init__(self, vocab_size: int, d_model: int = 768, n_layers: int = 24, d_state: int = 128,
                 headdim: int = 64, expand: int = 2, ngroups: int = 1, head_structure: str = "gva",
                 d_conv: int = 4, chunk_size: int = 256, impl: str = "auto", dt_min: float = 1e-3,
                 dt_max: float = 1e-1, dt_limit: tuple[float, float] = (0.0, float("inf")),
                 norm_eps: float = 1e-5, init_std: float = 0.02, pad_vocab_multiple: int = 16,
                 proj_align: int = 64):
        for field, value in dict(d_model=d_model, n_layers=n_layers, d_state=d_state, headdim=headdim,
                                 expand=expand, ngroups=ngroups, chunk_size=chunk_size,
                                 proj_align=proj_align).items():
            require_positive_int(value, f"model.{field}")
        require(head_structure in HEAD_STRUCTURES, "model.head_structure",
                f"unknown head structure {head_structure!r} (choose from {', '.join(HEAD_STRUCTURES)})")
        d_inner = expand * d_model
        require(d_inner % headdim == 0, "model.headdim",
                f"expand * d_model = {d_inner} is not divisible by headdim={headdim}")
        H = d_inner // headdim
        if head_structure == "gva":
            require(H % ngroups == 0, "model.ngroups", f"the {H} heads are not divisible by ngroups={ngroups}")
        require(chunk_size & (chunk_size - 1) == 0, "model.chunk_size", f"must be a power of two, got {chunk_size}")
        require(2 <= d_conv <= 4, "model.d_conv", f"must be between 2 and 4, got {d_conv}")
        require(impl in ("auto", "triton", "torch"), "model.impl", f"must be auto, triton or torch, got {impl!r}")
        self.head_structure = head_structure
        super().__init__(
            vocab_size, d_model, n_layers,
            make_mixer=lambda i: Mamba2Mixer(d_model, d_state, headdim, expand, ngroups, head_structure,
                                             d_conv, chunk_size, dt_min, dt_max, dt_limit=tuple(dt_limit),
                                             impl=impl, norm_eps=norm_eps, proj_align=proj_align),
            make_mlp=lambda i: None,
            norm_eps=norm_eps, init_std=init_std, pad_vocab_multiple=pad_vocab_multiple,
        )
