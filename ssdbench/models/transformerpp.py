"""Transformer++: causal softmax attention with RoPE, SwiGLU MLP, RMSNorm, no biases.

``abs_positions=true`` adds fixed sinusoidal absolute positions to the token embedding (with
``rope=false``: the absolute-position attention of the Mamba paper's induction-heads table).

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

import math

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

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (batch, L, heads, head_dim) -> rotated x, same shape; pos (L,) the tokens' positions
        (0..L-1 by default; a decode step passes its own, a tensor so that a CUDA graph of the
        step serves every position). Angles in fp32 either way, so a step rotates exactly as
        the full forward does."""
        L = x.shape[1]
        t = torch.arange(L, device=x.device, dtype=torch.float32) if pos is None else pos.to(torch.float32)
        angles = torch.outer(t, self.inv_freq)  # (L, head_dim/2)
        cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)  # (batch, L, heads, head_dim/2) each
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def sinusoidal_positions(pos: torch.Tensor, d_model: int) -> torch.Tensor:
    """The fixed absolute position encoding of Vaswani et al. (2017): pos (...) integer
    positions -> (..., d_model) fp32, channel 2i = sin(pos / 10000^(2i/d)), 2i+1 = cos(same)."""
    freq = torch.exp(torch.arange(0, d_model, 2, device=pos.device, dtype=torch.float32)
                     * (-math.log(10000.0) / d_model))  # (ceil(d/2),)
    angles = pos.to(torch.float32)[..., None] * freq  # (..., ceil(d/2))
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)[..., :d_model]  # (..., d_model)


def positions_in_documents(seq_idx: torch.Tensor) -> torch.Tensor:
    """seq_idx (batch, L) -> each token's position within its document (batch, L), 0 at every
    document's first token."""
    L = seq_idx.shape[1]
    idx = torch.arange(L, device=seq_idx.device).expand_as(seq_idx)  # (batch, L)
    starts = torch.ones_like(seq_idx, dtype=torch.bool)  # (batch, L): True at a document's first token
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (batch, L)
    return idx - first


def document_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """Causal mask that also forbids attending across packed documents.

    seq_idx (batch, L) -> bool mask (batch, 1, L, L), True where attention is allowed.
    """
    L = seq_idx.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seq_idx.device).tril()
    same_doc = seq_idx[:, :, None] == seq_idx[:, None, :]  # (batch, L, L)
    return (causal & same_doc)[:, None]


HEAD_STRUCTURES = ("mha", "mqa", "gva", "mva", "mka")
DEFAULT_CACHE_LEN = 2048  # KV cache capacity when allocate_state is given no max_seqlen


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

    def _qkv(self, x: torch.Tensor, pos: torch.Tensor | None = None):
        """x (batch, L, d_model) -> q (batch, L, Hq, Dh), k (batch, L, Hk, Dh), v (batch, L, Hv, Dh),
        q and k rotated at positions pos (default 0..L-1)."""
        batch, L, _ = x.shape
        Dh = self.head_dim
        q, k, v = self.qkv(x).split([self.Hq * Dh, self.Hk * Dh, self.Hv * Dh], dim=-1)
        q = q.view(batch, L, self.Hq, Dh)  # (batch, L, Hq, Dh)
        k = k.view(batch, L, self.Hk, Dh)  # (batch, L, Hk, Dh)
        v = v.view(batch, L, self.Hv, Dh)  # (batch, L, Hv, Dh)
        if self.rotary is not None:
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        return q, k, v

    def _expand_heads(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Shared heads serve a group of H / count heads each: t with its heads (axis ``dim``)
        repeated to H (a copy unless t already has H heads)."""
        count, H = t.shape[dim], self.n_heads
        if count == H:
            return t
        return t.repeat_interleave(H // count, dim=dim)

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._qkv(x)  # (batch, L, H*, Dh)
        return self._attend(q, k, v, seq_idx)

    def _attend(self, q, k, v, seq_idx=None) -> torch.Tensor:
        """Causal attention of q, k, v (batch, L, H*, Dh) and the output projection -> (batch, L, d_model)."""
        batch, L = q.shape[:2]
        H, Dh = self.n_heads, self.head_dim
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

    # ---- decoding: a KV cache of fixed capacity ----------------------------------------------
    def allocate_state(self, batch: int, device=None, dtype=torch.float32, max_seqlen: int | None = None):
        """(k_cache (batch, Hk, T, Dh), v_cache (batch, Hv, T, Dh), t) with T = max_seqlen (default
        DEFAULT_CACHE_LEN) and t the number of tokens cached (a 0-dim long tensor: the next
        token's position). The whole capacity is allocated up front: a decode step then has the
        same shapes at every position and can be replayed from one CUDA graph. Only the distinct
        key/value heads are cached (grouped-query attention's memory saving)."""
        T = DEFAULT_CACHE_LEN if max_seqlen is None else max_seqlen
        require_positive_int(T, "max_seqlen")
        k_cache = torch.zeros(batch, self.Hk, T, self.head_dim, device=device, dtype=dtype)  # (batch, Hk, T, Dh)
        v_cache = torch.zeros(batch, self.Hv, T, self.head_dim, device=device, dtype=dtype)  # (batch, Hv, T, Dh)
        return k_cache, v_cache, torch.zeros((), dtype=torch.long, device=device)

    def prefill(self, x: torch.Tensor, state):
        """The prompt x (batch, L, d_model) through the parallel forward; its keys and values
        (rotated at positions 0..L-1) fill the first L slots of the cache."""
        k_cache, v_cache, t = state
        L = x.shape[1]
        if L > k_cache.shape[2]:
            raise ValueError(f"prompt of {L} tokens exceeds the KV cache's capacity {k_cache.shape[2]} (max_seqlen)")
        q, k, v = self._qkv(x)  # (batch, L, H*, Dh)
        k_cache[:, :, :L] = k.transpose(1, 2).to(k_cache.dtype)  # (batch, Hk, L, Dh)
        v_cache[:, :, :L] = v.transpose(1, 2).to(v_cache.dtype)  # (batch, Hv, L, Dh)
        t.fill_(L)
        return self._attend(q, k, v), state

    def step(self, x_t: torch.Tensor, state):
        """x_t (batch, d_model) -> (batch, d_model): the token's key and value go to slot t of the
        cache, its query attends to slots 0..t (the rest of the capacity is masked out)."""
        k_cache, v_cache, t = state
        batch, T = x_t.shape[0], k_cache.shape[2]
        H, Dh = self.n_heads, self.head_dim
        if t.device.type == "cpu" and int(t) >= T:  # (on a GPU this check would sync every step)
            raise ValueError(f"the KV cache is full ({T} tokens, max_seqlen)")
        pos = t.reshape(1)  # (1,)
        q, k, v = self._qkv(x_t[:, None], pos)  # (batch, 1, H*, Dh)
        k_cache.index_copy_(2, pos, k.transpose(1, 2).to(k_cache.dtype))
        v_cache.index_copy_(2, pos, v.transpose(1, 2).to(v_cache.dtype))
        valid = (torch.arange(T, device=t.device) <= t)[None, None, None, :]  # (1, 1, 1, T)
        q = self._expand_heads(q.transpose(1, 2), 1)  # (batch, H, 1, Dh)
        kc, vc = k_cache.to(q.dtype), v_cache.to(q.dtype)  # (batch, Hk, T, Dh), (batch, Hv, T, Dh)
        if self.Hk == self.Hv:  # SDPA's grouped-query mode reads the shared heads without copying
            y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=valid, enable_gqa=self.Hk != H)
        else:  # mka (Hk = H, Hv = 1): copy the shared value head out to every head
            y = F.scaled_dot_product_attention(q, self._expand_heads(kc, 1), self._expand_heads(vc, 1),
                                               attn_mask=valid)
        t.add_(1)
        return self.out(y.reshape(batch, H * Dh)), state  # y (batch, H, 1, Dh)

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
                 rope: bool = True, rope_base: float = 10000.0, abs_positions: bool = False,
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
        require(isinstance(abs_positions, bool), "model.abs_positions", f"must be true or false, got {abs_positions!r}")
        self.abs_positions = abs_positions
        # the encoding's RMS is 1/sqrt(2): scaled to the embedding's initial std, so that at
        # initialisation neither the token nor its position drowns the other
        self.pos_scale = init_std * math.sqrt(2.0)

    def embed(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Token embedding, plus with ``abs_positions`` the sinusoidal encoding of each token's
        position in its document (the Mamba paper's "MHA-Absolute" on induction heads;
        ``rope=false abs_positions=true`` is that model, RoPE is the default)."""
        x = self.embedding(input_ids)  # (batch, L, d_model)
        if not self.abs_positions:
            return x
        L = input_ids.shape[1]
        pos = torch.arange(L, device=input_ids.device) if seq_idx is None else positions_in_documents(seq_idx)
        return x + (self.pos_scale * sinusoidal_positions(pos, self.d_model)).to(x.dtype)  # (batch, L, d_model)

    def embed_step(self, input_ids: torch.Tensor, state: list) -> torch.Tensor:
        """One decoding step: the position is the KV cache's count of tokens (layer 0's, before
        this step adds one)."""
        x = self.embedding(input_ids)  # (batch, d_model)
        if not self.abs_positions:
            return x
        t = state[0][2]  # () long: tokens cached so far = this token's position
        return x + (self.pos_scale * sinusoidal_positions(t, self.d_model)).to(x.dtype)  # (batch, d_model)
