"""Mamba-1: the selective SSM (S6) inside the Mamba block (Gu & Dao 2023, §3.4, Fig. 3).

    u (batch, L, d_model)
      -> in_proj -> [x | z]                        two branches of d_inner = expand * d_model
      x -> causal depthwise conv (width d_conv) + SiLU   (seq_idx-aware)
        -> x_proj -> [dt (rank R) | B (N) | C (N)]       input-dependent (selective) parameters
        -> delta = softplus(dt_proj(dt)),  R -> d_inner  low-rank, bias added inside the kernel
        -> selective scan per channel d, state n:
              h_t = exp(delta_t A[d, n]) h_{t-1} + delta_t B_t[n] x_t
              y_t = sum_n C_t[n] h_t[n] + D[d] x_t,   y_t * silu(z_t)
      -> out_proj

Symbols: D channels = d_inner, N = d_state, R = dt_rank (ceil(d_model / 16) for "auto"),
W = d_conv. A is real and diagonal, S4D-real initialised: A[d, n] = -(n + 1). B and C are
shared by all channels (one group): Mamba's multi-input (MVA) head structure.

The kernels read channel-first (batch, D, L) tensors; the block keeps its activations in
(batch, L, D) from the projections and hands the kernels transposed views (no copies on the
Triton path).

LTI ablation (``selective=False``, the S4-like layer of the paper's Table 1, which fails
selective copying): there is no x_proj; dt, B and C are learned parameters dt_lti (R,),
B_lti (N,), C_lti (N,), the same for every token and sequence, so delta = softplus(dt_proj(
dt_lti) + bias) is constant in time and the SSM is a linear time-invariant convolution
(the depthwise conv before it and the SiLU gate z after it are unchanged). Same code path and
kernels: the constants enter as stride-0 broadcast views of the shapes x_proj would produce.
dt_lti = 0 starts delta at the selective model's dt0; B_lti = 1 and C_lti ~ N(0, 1/N) as in
S4D's initialisation (C scaled so the readout's variance does not grow with N).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssdbench.errors import require, require_positive_int
from ssdbench.kernels.causal_conv1d import causal_conv1d, causal_conv1d_update
from ssdbench.kernels.selective_scan import MAX_N, selective_scan, selective_scan_ref, selective_state_update
from ssdbench.models.layers import ssm_state_dtype, store_conv_state
from ssdbench.models.lm import LanguageModel

IMPLS = ("auto", "triton", "torch")


def resolve_dt_rank(dt_rank, d_model: int) -> int:
    """R: ceil(d_model / 16) for "auto" (the paper's choice), else the given integer."""
    return math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank


class Mamba1Mixer(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4, dt_scale: float = 1.0, impl: str = "auto",
                 selective: bool = True):
        super().__init__()
        self.d_model, self.N, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.R = resolve_dt_rank(dt_rank, d_model)
        self.dt_min, self.dt_max, self.dt_init_floor, self.dt_scale = dt_min, dt_max, dt_init_floor, dt_scale
        self.impl = impl
        self.selective = selective

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)  # -> [x | z]
        # Depthwise conv parameters live in an nn.Conv1d for PyTorch's default init (the shell
        # does not touch convolutions); the computation goes through causal_conv1d.
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, bias=True)
        if selective:
            self.x_proj = nn.Linear(self.d_inner, self.R + 2 * self.N, bias=False)  # -> [dt | B | C]
        else:  # LTI: the same three quantities as input-independent parameters (set in init_special)
            self.dt_lti = nn.Parameter(torch.zeros(self.R))  # (R,)
            self.B_lti = nn.Parameter(torch.ones(self.N))  # (N,)
            self.C_lti = nn.Parameter(torch.empty(self.N))  # (N,)
        self.dt_proj = nn.Linear(self.R, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.N))  # A = -exp(A_log), (D, N)
        self.D = nn.Parameter(torch.ones(self.d_inner))  # skip connection, (D,)
        for p in (self.A_log, self.D):
            p._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.out_proj._is_residual_out = True

    @torch.no_grad()
    def init_special(self) -> None:
        """The paper's init (runs after the shell's normal(0.02) / zero-bias init).

        dt_proj.weight ~ U(-s, s), s = dt_scale / sqrt(R), so delta's spread does not depend on
        the rank; dt_proj.bias = softplus^-1(dt0), dt0 log-uniform in [dt_min, dt_max] floored
        at dt_init_floor, so softplus(0 + bias) starts every channel at its own time scale;
        A_log = log(1..N) per channel (S4D-real); D = 1. LTI: dt_lti = 0 (delta = dt0 as in the
        selective model at init), B_lti = 1, C_lti ~ N(0, 1/N) (S4D).
        """
        s = self.dt_scale * self.R ** -0.5
        self.dt_proj.weight.uniform_(-s, s)
        lo, hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(self.d_inner) * (hi - lo) + lo).clamp(min=self.dt_init_floor)  # (D,)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt) = dt + log(1 - e^-dt)
        n = torch.arange(1, self.N + 1, dtype=torch.float32)  # (N,)
        self.A_log.copy_(torch.log(n).expand(self.d_inner, self.N))
        self.D.fill_(1.0)
        if not self.selective:
            self.dt_lti.zero_()
            self.B_lti.fill_(1.0)
            self.C_lti.normal_(std=self.N ** -0.5)

    def _A(self) -> torch.Tensor:
        """A = -exp(A_log) (D, N), in fp32 at least (A_log may be fp64 in tests, never below fp32)."""
        return -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

    # ---- kernels by impl ---------------------------------------------------------------------
    def _conv(self, x, seq_idx):
        """x (batch, L, D) -> silu(conv(x)) (batch, L, D)."""
        # the conv's own auto already means: Triton (AUTO_IMPL) on CUDA, F.conv1d elsewhere;
        # channel_last: no transposed view at a torch.compile graph edge (see causal_conv1d)
        return causal_conv1d(x, self.conv1d.weight, self.conv1d.bias, activation="silu",
                             seq_idx=seq_idx, impl=self.impl, channel_last=True)

    def _triton(self, x) -> bool:
        """auto: the Triton kernels on CUDA, the references elsewhere (the interpreter is far
        slower than the sequential reference on a CPU); triton: the kernels (CUDA or
        TRITON_INTERPRET=1; the conv already refused anything else); torch: the references."""
        return not (self.impl == "torch" or (self.impl == "auto" and not x.is_cuda))

    def _scan(self, x, *args, **kwargs):
        return selective_scan(x, *args, **kwargs) if self._triton(x) else selective_scan_ref(x, *args, **kwargs)

    def _lti_params(self, *lead):
        """LTI: delta without its bias (*lead, D) and B, C (*lead, N) as stride-0 broadcast views
        of one (D,) / (N,) vector each: dt_proj runs once per call, not once per token."""
        delta = F.linear(self.dt_lti, self.dt_proj.weight)  # (D,)
        return (delta.expand(*lead, self.d_inner), self.B_lti.expand(*lead, self.N),
                self.C_lti.expand(*lead, self.N))

    def forward(self, u: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        return self._mix(u, seq_idx)

    def _mix(self, u: torch.Tensor, seq_idx: torch.Tensor | None = None, state=None) -> torch.Tensor:
        """The block on u (batch, L, d_model); with a (fresh) decoding state, also leaves in it
        the conv's last inputs and the scan's final state (prefill)."""
        batch, L, _ = u.shape
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (batch, L, D) each
        if state is not None:
            store_conv_state(state[0], x)  # the conv's inputs, before it
        x = self._conv(x, seq_idx)  # (batch, L, D)
        if self.selective:
            dt, B, C = torch.split(self.x_proj(x), [self.R, self.N, self.N], dim=-1)
            # delta without its bias: the kernel adds dt_proj.bias and applies softplus in fp32
            delta = F.linear(dt, self.dt_proj.weight)  # (batch, L, D)
        else:  # the same shapes, constant over batch and time (the kernels take any strides)
            delta, B, C = self._lti_params(batch, L)  # (batch, L, D), (batch, L, N) x2
        A = self._A()  # (D, N)
        y = self._scan(x.transpose(1, 2), delta.transpose(1, 2), A,
                       B.transpose(1, 2), C.transpose(1, 2),  # (batch, N, L) each
                       D=self.D, z=z.transpose(1, 2), delta_bias=self.dt_proj.bias,
                       delta_softplus=True, seq_idx=seq_idx,
                       return_last_state=state is not None)  # (batch, D, L)
        if state is not None:
            y, last = y  # last (batch, D, N) fp32
            state[1].copy_(last)
        return self.out_proj(y.transpose(1, 2))  # (batch, L, d_model)

    # ---- decoding ----------------------------------------------------------------------------
    def allocate_state(self, batch: int, device=None, dtype=torch.float32, ssm_dtype: torch.dtype | None = None):
        """(conv_state (batch, D, W-1) in dtype, ssm_state (batch, D, N) in ssm_dtype: None gives
        fp32, fp64 for fp64)."""
        conv_state = torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=dtype)
        ssm_state = torch.zeros(batch, self.d_inner, self.N, device=device, dtype=ssm_state_dtype(dtype, ssm_dtype))
        return conv_state, ssm_state

    def prefill(self, u: torch.Tensor, state):
        """A prompt u (batch, L, d_model) -> (batch, L, d_model) by the parallel scan, leaving in
        the fresh (zero) state what ``step`` would leave after it (see ``_mix``)."""
        return self._mix(u, None, state), state

    def step(self, u: torch.Tensor, state):
        """u (batch, d_model) -> (batch, d_model); advances (conv_state, ssm_state) in place."""
        conv_state, ssm_state = state
        impl = "triton" if self._triton(u) else "torch"  # on the GPU: one kernel each for the conv and the scan
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (batch, D) each
        x = causal_conv1d_update(x, conv_state, self.conv1d.weight, self.conv1d.bias, activation="silu", impl=impl)
        if self.selective:
            dt, B, C = torch.split(self.x_proj(x), [self.R, self.N, self.N], dim=-1)  # (batch, R), (batch, N) x2
            delta = F.linear(dt, self.dt_proj.weight)  # (batch, D)
        else:
            delta, B, C = self._lti_params(u.shape[0])  # (batch, D), (batch, N) x2
        A = self._A()  # (D, N)
        y = selective_state_update(ssm_state, x, delta, A, B, C, D=self.D, z=z, dt_bias=self.dt_proj.bias,
                                   dt_softplus=True, impl=impl)  # (batch, D)
        return self.out_proj(y), (conv_state, ssm_state)

    # ---- accounting ----------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token beyond the projections (the shell counts every nn.Linear).

        Scan: 9 per (channel, state), the count of mamba_ssm's selective-scan FLOP model:
        delta * A and its exp (decay, counted as 3), the decay times h (1), delta * x times B
        (2) and the add (1), then C * h and its sum over n (2). Conv: 2 * W per channel.
        Per-channel elementwise work (softplus, D skip, SiLU gate) is not counted, as norms and
        activations are not counted elsewhere. Independent of seq_len (a recurrence).

        The x_proj matmul is in the shell's count of nn.Linear modules, so the LTI variant
        (no x_proj) drops it there; the shell also counts dt_proj per token (2 R D), which the
        LTI variant applies once per call to a constant vector, so that term is taken off here.
        """
        flops = 9 * self.d_inner * self.N + 2 * self.d_inner * self.d_conv
        if not self.selective:
            flops -= 2 * self.R * self.d_inner
        return flops

    def state_size(self) -> int:
        """Recurrent state per sequence: SSM state D * N plus the conv buffer D * (W - 1)
        (counted, as for Mamba-2: decoding must carry it)."""
        return self.d_inner * self.N + self.d_inner * (self.d_conv - 1)


class Mamba1(LanguageModel):
    """Mamba (Gu & Dao 2023): Mamba blocks only, no MLP; 130M = 24 x 768, d_state 16.

    ``selective=False``: the LTI (S4-like) ablation of Table 1 (see the module docstring)."""

    arch = "mamba1"

    def __init__(self, vocab_size: int, d_model: int = 768, n_layers: int = 24, d_state: int = 16,
                 d_conv: int = 4, expand: int = 2, dt_rank: int | str = "auto", dt_min: float = 1e-3,
                 dt_max: float = 1e-1, dt_init_floor: float = 1e-4, impl: str = "auto",
                 norm_eps: float = 1e-5, init_std: float = 0.02, pad_vocab_multiple: int = 8,
                 selective: bool = True):
        for field, value in dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                                 d_state=d_state, d_conv=d_conv, expand=expand,
                                 pad_vocab_multiple=pad_vocab_multiple).items():
            require_positive_int(value, f"model.{field}")
        require(d_state <= MAX_N, "model.d_state", f"must be at most {MAX_N}, got {d_state}")
        require(2 <= d_conv <= 4, "model.d_conv", f"must be between 2 and 4, got {d_conv}")
        if dt_rank != "auto":
            require_positive_int(dt_rank, "model.dt_rank")
        for field, value in dict(dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor).items():
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                    f"model.{field}", f"must be a positive number, got {value!r}")
        require(dt_min <= dt_max, "model.dt_min", f"must not exceed model.dt_max={dt_max}, got {dt_min}")
        require(impl in IMPLS, "model.impl", f"must be auto, triton or torch, got {impl!r}")
        require(isinstance(selective, bool), "model.selective", f"must be true or false, got {selective!r}")
        super().__init__(
            vocab_size, d_model, n_layers,
            make_mixer=lambda i: Mamba1Mixer(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max,
                                             dt_init_floor, impl=impl, selective=selective),
            make_mlp=lambda i: None,
            norm_eps=norm_eps, init_std=init_std, pad_vocab_multiple=pad_vocab_multiple,
        )
