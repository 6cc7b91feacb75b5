"""Building blocks shared by the mixers: RMSNorm, gated RMSNorm, SwiGLU MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssdbench.kernels.gated_rmsnorm import gated_rms_norm, rms_norm_rows


def round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def ssm_state_dtype(dtype: torch.dtype, ssm_dtype: torch.dtype | None = None) -> torch.dtype:
    """The recurrent SSM state's dtype for a model in ``dtype``: ``ssm_dtype`` when given, else
    float32 (float64 for a float64 model), the precision the training scan accumulates in."""
    if ssm_dtype is None:
        return torch.float64 if dtype == torch.float64 else torch.float32
    if ssm_dtype not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"ssm_dtype: expected float64/float32/bfloat16/float16, got {ssm_dtype}")
    return ssm_dtype


def store_conv_state(conv_state: torch.Tensor, x: torch.Tensor) -> None:
    """Prefill of a causal conv's decoding state: conv_state (batch, D, W-1) takes the last W-1
    inputs of x (batch, L, D) (channel-last, before the conv), oldest first, and zeros where
    the prompt is shorter than W-1 (the zero history a fresh state starts from): what
    ``causal_conv1d_update`` would leave after stepping through x."""
    keep = conv_state.shape[2]
    n = min(keep, x.shape[1])
    conv_state.zero_()
    if n:
        conv_state[:, :, keep - n:] = x[:, x.shape[1] - n:].transpose(1, 2).to(conv_state.dtype)  # (batch, D, n)


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32 for stability under bf16 autocast."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def step(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The norm in a decoding step, x (batch, d), with the residual stream's pending add:
        returns (norm(s), s) for s = x + residual (s = x when residual is None). On the GPU one
        Triton kernel (kernels/gated_rmsnorm.py's rms_norm_rows) does the add and the norm, where
        forward's fp32 PyTorch is about eight small kernels, each a launch of the step's CUDA
        graph, and the add one more; the same function."""
        if x.is_cuda and x.dtype != torch.float64:
            if residual is None:
                return rms_norm_rows(x, self.weight, self.eps), x
            return rms_norm_rows(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
        return self(x), x


class GatedRMSNorm(RMSNorm):
    """Mamba-2's output norm: norm(y * silu(z)) (gate before the norm), optionally per group.
    The computation is kernels/gated_rmsnorm.py's."""

    def __init__(self, d: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__(d, eps)
        self.group_size = group_size or d

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # The fused Triton kernels on a GPU, eager or compiled (custom operators, so no graph
        # break; in a compiled Mamba-2 step they beat inductor's fusion of the PyTorch form,
        # 70.7 vs 74.6 ms: results/h100/session7). gated_rms_norm takes the PyTorch form on a CPU.
        return gated_rms_norm(x, z, self.weight, self.eps, self.group_size)


class SwiGLU(nn.Module):
    """Transformer++ MLP: down(silu(gate(x)) * up(x)), no biases.

    The hidden size defaults to 8/3 * d_model (the usual choice that keeps the parameter
    count of a 4x GELU MLP), rounded up to ``multiple_of``.
    """

    def __init__(self, d_model: int, hidden: int | None = None, multiple_of: int = 64):
        super().__init__()
        hidden = hidden or round_up(int(8 * d_model / 3), multiple_of)
        self.hidden = hidden
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.down._is_residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (batch, L, hidden) each
        return self.down(F.silu(gate) * up)

    def flops_per_token(self) -> int:
        """Forward multiply-adds x2 of the three projections."""
        return 2 * 3 * self.gate_up.in_features * self.hidden
