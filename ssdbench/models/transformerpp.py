"""Transformer++: causal softmax attention with RoPE, SwiGLU MLP, RMSNorm, no biases.

The "strong Transformer recipe" of the Mamba papers (PaLM/LLaMA style). Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` (FlashAttention on GPUs). Grouped-query
attention: ``n_kv_heads`` key/value heads shared by groups of the ``n_heads`` query heads
(n_kv_heads = 1 is multi-query attention).

Head structures (Mamba-2 paper §7, with its correspondence Q<->C, K<->B, V<->x): which of q, k,
v are per head. ``head_structure`` gives the numbers of distinct (q, k, v) heads:

    mha  multi-head          (H, H, H)
    mqa  multi-query         (H, 1, 1)      queries per head, one shared key/value head
    gva  grouped-query/value (H, G, G)      G = ngroups (or n_kv_heads) key/value heads
    mva  multi-value         (1, 1, H)      shared q and k (one attention pattern), values per head
    mka  multi-key           (1, H, 1)      shared q and v, keys per head
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssdbench.errors import require, require_positive_int
from ssdbench.models.layers import SwiGLU
from ssdbench.models.lm import LanguageModel


class RotaryEmbedding(nn.Module):
    """RoPE: rotate pairs of channels of q and k by position-dependent angles."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (head_dim/2,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, L, heads, head_dim) -> rotated x, same shape."""
        L = x.shape[1]
        t = torch.arange(L, device=x.device, dtype=torch.float32)
        angles = torch.outer(t, self.inv_freq)  # (L, head_dim/2)
        cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)  # (batch, L, heads, head_dim/2) each
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def document_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """Causal mask that also forbids attending across packed documents.

    seq_idx (batch, L) -> bool mask (batch, 1, L, L), True where attention is allowed.
    """
    L = seq_idx.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seq_idx.device).tril()
    same_doc = seq_idx[:, :, None] == seq_idx[:, None, :]  # (batch, L, L)
    return (causal & same_doc)[:, None]


HEAD_STRUCTURES = ("mha", "mqa", "gva", "mva", "mka")


def head_counts(head_structure: str, H: int, n_kv_heads: int | None) -> tuple[int, int, int]:
    """(Hq, Hk, Hv) distinct query, key and value heads."""
    G = n_kv_heads or H
    return {"mha": (H, G, G), "mqa": (H, 1, 1), "gva": (H, G, G), "mva": (1, 1, H),
            "mka": (1, H, 1)}[head_structure]


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None,
                 rope: bool = True, rope_base: float = 10000.0, head_structure: str = "mha"):
        super().__init__()
        self.d_model, self.n_heads = d_model, n_heads
        self.Hq, self.Hk, self.Hv = head_counts(head_structure, n_heads, n_kv_heads)
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, (self.Hq + self.Hk + self.Hv) * self.head_dim, bias=False)
        self.out = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.out._is_residual_out = True
        self.rotary = RotaryEmbedding(self.head_dim, rope_base) if rope else None

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        batch, L, _ = x.shape
        H, Dh = self.n_heads, self.head_dim
        q, k, v = self.qkv(x).split([self.Hq * Dh, self.Hk * Dh, self.Hv * Dh], dim=-1)
        q = q.view(batch, L, self.Hq, Dh)  # (batch, L, Hq, Dh)
        k = k.view(batch, L, self.Hk, Dh)  # (batch, L, Hk, Dh)
        v = v.view(batch, L, self.Hv, Dh)  # (batch, L, Hv, Dh)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        # shared heads serve a group of H / count heads each (expand is a view, no copy)
        q, k, v = (t.unsqueeze(3).expand(batch, L, t.shape[2], H // t.shape[2], Dh).reshape(batch, L, H, Dh)
                   if t.shape[2] != H else t for t in (q, k, v))  # (batch, L, H, Dh)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, H, L, Dh)
        if seq_idx is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(seq_idx))
        y = y.transpose(1, 2).reshape(batch, L, H * Dh)  # (batch, L, d_model)
        return self.out(y)

    def flops_per_token(self, seq_len: int) -> int:
        """QK^T and AV: 2 matmuls x 2 FLOPs x L keys x head_dim x heads (full square, the
        convention of the Chinchilla paper; causal kernels skip about half of it)."""
        return 2 * 2 * seq_len * self.n_heads * self.head_dim

    def state_size(self) -> None:
        return None  # the KV cache grows with the sequence: no fixed recurrent state


class TransformerPP(LanguageModel):
    arch = "transformerpp"

    def __init__(self, vocab_size: int, d_model: int = 768, n_layers: int = 12, n_heads: int = 12,
                 n_kv_heads: int | None = None, head_structure: str = "mha", ngroups: int | None = None,
                 rope: bool = True, rope_base: float = 10000.0,
                 mlp_hidden: int | None = None, mlp_multiple_of: int = 64,
                 norm_eps: float = 1e-5, init_std: float = 0.02, pad_vocab_multiple: int = 8):
        for field, value in dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads).items():
            require_positive_int(value, f"model.{field}")
        require(d_model % n_heads == 0, "model.d_model",
                f"{d_model} is not divisible by model.n_heads={n_heads}")
        require((d_model // n_heads) % 2 == 0 or not rope, "model.n_heads",
                f"RoPE needs an even head dimension; d_model/n_heads = {d_model / n_heads:g}")
        require(head_structure in HEAD_STRUCTURES, "model.head_structure",
                f"unknown head structure {head_structure!r} (choose from {', '.join(HEAD_STRUCTURES)})")
        if head_structure == "gva" and n_kv_heads is None:
            n_kv_heads = ngroups  # heads=gva: key/value groups from the shared `ngroups` knob
            require(n_kv_heads is not None, "model.ngroups", "heads=gva needs model.ngroups (key/value groups)")
        if n_kv_heads is not None:
            field = "model.n_kv_heads" if ngroups is None or head_structure != "gva" else "model.ngroups"
            require_positive_int(n_kv_heads, field)
            require(n_heads % n_kv_heads == 0, field,
                    f"model.n_heads={n_heads} is not divisible by {n_kv_heads} key/value heads")
        super().__init__(
            vocab_size, d_model, n_layers,
            make_mixer=lambda i: Attention(d_model, n_heads, n_kv_heads, rope, rope_base, head_structure),
            make_mlp=lambda i: SwiGLU(d_model, mlp_hidden, mlp_multiple_of),
            norm_eps=norm_eps, init_std=init_std, pad_vocab_multiple=pad_vocab_multiple,
        )
