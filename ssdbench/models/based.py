"""Based: Taylor linear attention + sliding-window attention + short gated convolutions
(Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
tradeoff"; the synthetic-task configurations of Zoology).

Every layer is a pre-norm block ``x + mixer(norm(x))`` (then ``x + mlp(norm(x))`` when ``mlp``),
and the mixer of each layer is one of three kinds (or a short chain of them, see below):

    linear_attn     global causal linear attention with the 2nd-order Taylor feature map
                    phi(x) = [1, x / F^(1/4), (x ⊗ x) / sqrt(2F)] on F-dim projections of q, k
                    (F = 16: 273 features); v per head of P = d_model / H channels;
                    y = phi(q) S / (phi(q) z + eps),  S = sum phi(k) v^T,  z = sum phi(k)
                    State per layer: H x (1+F+F^2) x (P+1) numbers, independent of L.
    sliding_window  causal softmax attention over the last ``window`` tokens (the token itself
                    and window-1 before it), RoPE, H heads of P channels.
                    State per layer: the K and V of the last ``window`` tokens.
    base_conv       BaseConv, a short gated convolution: y = out(conv_k(in1(u)) * in2(u)),
                    depthwise causal conv of width k = 3 over d_inner = conv_expand * d_model
                    channels. State per layer: the last k-1 inputs of the conv.

``layer_pattern`` assigns the kinds: a list with one entry per layer, each entry a kind or a
chain ``"base_conv+linear_attn"`` (the sub-mixers run one after the other inside the layer,
with a residual around every one but the last: h = u + conv(u); y = attn(h)), or a preset:

    "lm"    the paper's language models (HazyResearch/based reference configs, e.g. the 360M
            model: 27 layers, linear attention at layers 1, 6, 11, 16, 21, sliding window at
            2, 7, 12, 17, 22, BaseConv elsewhere). Rule used here for any n_layers, counting
            from 0: layer i % 5 == 1 -> linear_attn, i % 5 == 2 -> sliding_window, else
            base_conv (20 % / 20 % / 60 %).
    "mqar"  Zoology's synthetic-task Based (``zoology.mixers.hybrid.Hybrid`` over
            [BaseConv(kernel 3), Based(linear attention)]; Hybrid picks configs[i % 2] for
            layer i, so the layers alternate): layer i -> base_conv if i is even, else
            linear_attn. For the 2-layer MQAR models: [base_conv, linear_attn].

Every mixer takes ``seq_idx`` (batch, L) of packed documents and never mixes them: the linear
attention state resets (the kernel's seq_idx), window attention is masked to one document, and
the conv taps are masked at boundaries (``causal_conv1d``'s seq_idx).

Implementations: ``impl`` (auto|triton|torch) picks the Taylor linear-attention and conv
kernels: auto = the Triton kernels on CUDA tensors and the chunked PyTorch references on a
CPU; ``window_impl`` (auto|sdpa|flex) the window attention: ``sdpa`` =
``F.scaled_dot_product_attention`` with a boolean band mask (any device), ``flex`` =
FlexAttention with a block mask (CUDA only; on a CPU tensor it falls back to sdpa), auto =
sdpa until ``ssdbench/bench_window.py`` has been run on the GPU.

Symbols: H heads, P = d_model / H head dim, F q/k feature dim, D = 1 + F + F^2 features,
W window, k conv width.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ssdbench.errors import require, require_positive_int
from ssdbench.kernels.based import (
    MAX_FEATURE_DIM, based_state_size, feature_count, taylor_linear_attention,
    taylor_linear_attention_chunked_torch, taylor_linear_attention_triton, taylor_step,
)
from ssdbench.kernels.causal_conv1d import causal_conv1d, causal_conv1d_update
from ssdbench.models.layers import SwiGLU, store_conv_state
from ssdbench.models.lm import LanguageModel, mixer_prefill
from ssdbench.models.transformerpp import RotaryEmbedding

MIXER_KINDS = ("linear_attn", "sliding_window", "base_conv")
PRESETS = ("lm", "mqar")
IMPLS = ("auto", "triton", "torch")
WINDOW_IMPLS = ("auto", "sdpa", "flex")
# impl="auto" for the window attention; set to "flex" if bench_window shows it is faster.
AUTO_WINDOW_IMPL = "sdpa"


def layer_kinds(layer_pattern, n_layers: int) -> list[list[str]]:
    """Expand ``layer_pattern`` (a preset name or a list) into one list of mixer kinds per layer."""
    if isinstance(layer_pattern, str) and "+" not in layer_pattern and layer_pattern not in MIXER_KINDS:
        require(layer_pattern in PRESETS, "model.layer_pattern",
                f"unknown preset {layer_pattern!r} (presets: {', '.join(PRESETS)}; or a list of "
                f"mixer kinds per layer from {', '.join(MIXER_KINDS)})")
        if layer_pattern == "lm":
            entries = ["linear_attn" if i % 5 == 1 else "sliding_window" if i % 5 == 2 else "base_conv"
                       for i in range(n_layers)]
        else:  # mqar
            entries = ["base_conv" if i % 2 == 0 else "linear_attn" for i in range(n_layers)]
    elif isinstance(layer_pattern, str):  # one kind (or chain) for every layer
        entries = [layer_pattern] * n_layers
    else:
        entries = list(layer_pattern)
        require(len(entries) == n_layers, "model.layer_pattern",
                f"has {len(entries)} entries but model.n_layers={n_layers}")
    kinds = []
    for entry in entries:
        parts = [p.strip() for p in str(entry).split("+")]
        for p in parts:
            require(p in MIXER_KINDS, "model.layer_pattern",
                    f"unknown mixer kind {p!r} (choose from {', '.join(MIXER_KINDS)}, or chain them "
                    f"with '+', e.g. 'base_conv+linear_attn')")
        kinds.append(parts)
    return kinds


# ---------------------------------------------------------------------------------------------
# 1. Taylor linear attention
# ---------------------------------------------------------------------------------------------
class TaylorLinearAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, feature_dim: int = 16, normalize: bool = True,
                 eps: float = 1e-6, impl: str = "auto"):
        super().__init__()
        self.d_model, self.H, self.F = d_model, n_heads, feature_dim
        self.P = d_model // n_heads
        self.normalize, self.eps, self.impl = normalize, eps, impl
        # q and k live in the small F-dim feature space (H x F each); v keeps H x P = d_model.
        self.qkv = nn.Linear(d_model, 2 * n_heads * feature_dim + d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.out._is_residual_out = True

    def _qkv(self, x):
        H, Fd, P = self.H, self.F, self.P
        q, k, v = self.qkv(x).split([H * Fd, H * Fd, H * P], dim=-1)
        return (q.unflatten(-1, (H, Fd)),  # (..., H, F)
                k.unflatten(-1, (H, Fd)),  # (..., H, F)
                v.unflatten(-1, (H, P)))  # (..., H, P)

    def _kernel(self, x: torch.Tensor):
        if self.impl == "auto":  # the public entry on a GPU; the chunked reference on a CPU
            return taylor_linear_attention if x.is_cuda else taylor_linear_attention_chunked_torch
        return taylor_linear_attention_triton if self.impl == "triton" else taylor_linear_attention_chunked_torch

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._qkv(x)  # (batch, L, H, F), (batch, L, H, F), (batch, L, H, P)
        y = self._kernel(x)(q, k, v, eps=self.eps, normalize=self.normalize, seq_idx=seq_idx)  # (batch, L, H, P)
        return self.out(y.flatten(-2))  # (batch, L, d_model)

    def prefill(self, x: torch.Tensor, state):
        """A prompt x (batch, L, d_model) by the chunked kernel, its final (S, z) into the fresh state."""
        q, k, v = self._qkv(x)  # (batch, L, H, F), (batch, L, H, F), (batch, L, H, P)
        y, (S, z) = self._kernel(x)(q, k, v, eps=self.eps, normalize=self.normalize,
                                    return_final_state=True)  # (batch, L, H, P)
        state[0].copy_(S)  # (batch, H, D, P)
        state[1].copy_(z)  # (batch, H, D)
        return self.out(y.flatten(-2)), state

    def allocate_state(self, batch, device=None, dtype=torch.float32):
        D = feature_count(self.F)
        cdt = torch.float64 if dtype == torch.float64 else torch.float32  # the kernels' state dtype
        return (torch.zeros(batch, self.H, D, self.P, device=device, dtype=cdt),  # S (batch, H, D, P)
                torch.zeros(batch, self.H, D, device=device, dtype=cdt))  # z (batch, H, D)

    def step(self, x_t: torch.Tensor, state):
        q, k, v = self._qkv(x_t)  # (batch, H, F), (batch, H, F), (batch, H, P)
        S, z = state
        y, (S, z) = taylor_step(q.to(S.dtype), k.to(S.dtype), v.to(S.dtype), (S, z), self.eps, self.normalize)
        return self.out(y.to(x_t.dtype).flatten(-2)), (S, z)  # (batch, d_model)

    def state_size(self) -> int:
        return based_state_size(self.F, self.P, self.H)

    def flops_per_token(self, seq_len: int) -> int:
        """Recurrent view, per token: the state update phi(k) [v, 1]^T and the readout
        phi(q) [S, z], each 2 FLOPs x D features x (P + 1) columns x H heads. (The chunked
        kernels trade part of this for Q x Q quadratic blocks; the feature map's own ~H F^2
        multiplies are left out like the norms.)"""
        return 2 * 2 * self.H * feature_count(self.F) * (self.P + 1)


# ---------------------------------------------------------------------------------------------
# 2. sliding-window softmax attention
# ---------------------------------------------------------------------------------------------
def apply_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, heads, head_dim) by absolute positions pos (T,), the convention of
    transformerpp.RotaryEmbedding (halves [x1, x2] rotated by pos * inv_freq). Computed in
    float64 for float64 inputs (RotaryEmbedding always uses float32), so that decoding one
    token at position t reproduces the full forward exactly in the float64 tests."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = pos.to(cdt)[:, None] * inv_freq.to(cdt)[None, :]  # (T, head_dim/2)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]  # (T, 1, head_dim/2)
    x1, x2 = x.to(cdt).chunk(2, dim=-1)  # (..., T, heads, head_dim/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def window_mask(L: int, window: int, seq_idx: torch.Tensor | None, device) -> torch.Tensor:
    """Boolean band mask, True where query i may attend to key j: i - window < j <= i, same
    document. (L, L) without seq_idx, else (batch, 1, L, L)."""
    i = torch.arange(L, device=device)
    d = i[:, None] - i[None, :]  # (L, L): how far back key j is from query i
    band = (d >= 0) & (d < window)  # (L, L)
    if seq_idx is None:
        return band
    same = seq_idx[:, :, None] == seq_idx[:, None, :]  # (batch, L, L)
    return (band & same)[:, None]  # (batch, 1, L, L)


try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    HAS_FLEX = True
except ImportError:  # pragma: no cover
    HAS_FLEX = False

_compiled_flex = None


def _flex(q, k, v, block_mask):
    """FlexAttention is only fast compiled (the eager version materialises the scores)."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


@functools.lru_cache(maxsize=16)
def _band_block_mask(L: int, window: int, device: str):
    """The band's block mask depends only on (L, window): built once, not every forward
    (building it costs milliseconds, as much as the attention itself at L = 2K)."""
    def mask_mod(b, h, qi, kj):
        return (kj <= qi) & (qi - kj < window)
    return create_block_mask(mask_mod, None, None, L, L, device=device)


def flex_window_attention(q, k, v, window: int, seq_idx=None):
    """q, k, v (batch, H, L, P) on CUDA -> (batch, H, L, P), same mask as ``window_mask``."""
    batch, H, L, _ = q.shape
    if seq_idx is None:
        bm = _band_block_mask(L, window, str(q.device))
    else:
        s = seq_idx.to(q.device)

        def mask_mod(b, h, qi, kj):
            return (kj <= qi) & (qi - kj < window) & (s[b, qi] == s[b, kj])
        bm = create_block_mask(mask_mod, batch, None, L, L, device=q.device)
    return _flex(q, k, v, bm)


class SlidingWindowAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, window: int = 64, rope_base: float = 10000.0,
                 window_impl: str = "auto"):
        super().__init__()
        self.d_model, self.H, self.W = d_model, n_heads, window
        self.P = d_model // n_heads
        self.window_impl = window_impl
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.out._is_residual_out = True
        self.rotary = RotaryEmbedding(self.P, rope_base)  # its inv_freq; applied by apply_rope

    def _qkv(self, x: torch.Tensor, pos: torch.Tensor):
        """x (batch, T, d_model) -> q, k, v (batch, T, H, P), q and k rotated at positions pos (T,)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.H, self.P)).unbind(2)  # (batch, T, H, P) each
        return apply_rope(q, pos, self.rotary.inv_freq), apply_rope(k, pos, self.rotary.inv_freq), v

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._qkv(x, torch.arange(x.shape[1], device=x.device))  # (batch, L, H, P) each
        return self._attend(q, k, v, seq_idx)

    def _attend(self, q, k, v, seq_idx=None) -> torch.Tensor:
        """Window attention of q, k, v (batch, L, H, P) and the output projection -> (batch, L, d_model)."""
        batch, L = q.shape[:2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, H, L, P)
        impl = AUTO_WINDOW_IMPL if self.window_impl == "auto" else self.window_impl
        if impl == "flex" and HAS_FLEX and q.is_cuda:
            y = flex_window_attention(q, k, v, self.W, seq_idx)
        else:
            mask = window_mask(L, self.W, seq_idx, q.device)  # (L, L) or (batch, 1, L, L)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch, L, self.H * self.P))  # (batch, L, d_model)

    def allocate_state(self, batch, device=None, dtype=torch.float32):
        # A ring buffer of the last W keys (already rotated at their own positions) and values,
        # and the number of tokens seen so far (the next token's position).
        kbuf = torch.zeros(batch, self.W, self.H, self.P, device=device, dtype=dtype)  # (batch, W, H, P)
        vbuf = torch.zeros(batch, self.W, self.H, self.P, device=device, dtype=dtype)  # (batch, W, H, P)
        t = torch.zeros((), dtype=torch.long, device=device)
        return (kbuf, vbuf, t)

    def prefill(self, x: torch.Tensor, state):
        """A prompt x (batch, L, d_model) by the masked parallel attention; its last min(L, W) keys
        and values go to their ring slots (position p at slot p % W), as stepping would leave them."""
        kbuf, vbuf, t = state
        L = x.shape[1]
        pos = torch.arange(L, device=x.device)  # (L,)
        q, k, v = self._qkv(x, pos)  # (batch, L, H, P) each
        n = min(L, self.W)
        slots = pos[L - n:] % self.W  # (n,)
        kbuf.index_copy_(1, slots, k[:, L - n:].to(kbuf.dtype))
        vbuf.index_copy_(1, slots, v[:, L - n:].to(vbuf.dtype))
        t.fill_(L)
        return self._attend(q, k, v), state

    def step(self, x_t: torch.Tensor, state):
        """x_t (batch, d_model) -> (batch, d_model). Slot and position come from the tensor t, and
        all W slots are read with the unwritten ones masked out, so the step never reads t on
        the host and one CUDA graph of it serves every position."""
        kbuf, vbuf, t = state
        H, P, W = self.H, self.P, self.W
        pos = t.reshape(1)  # (1,)
        q, k, v = self._qkv(x_t[:, None], pos)  # (batch, 1, H, P) each
        slot = pos % W  # (1,)
        kbuf.index_copy_(1, slot, k.to(kbuf.dtype))
        vbuf.index_copy_(1, slot, v.to(vbuf.dtype))
        written = torch.arange(W, device=t.device) <= t  # (W,): slots 0..t, all of them once t >= W - 1
        scores = torch.einsum("bhp,bwhp->bhw", q[:, 0], kbuf.to(q.dtype)) / P ** 0.5  # (batch, H, W)
        scores = scores.masked_fill(~written, float("-inf"))  # order is irrelevant to softmax
        y = torch.einsum("bhw,bwhp->bhp", scores.softmax(-1), vbuf.to(q.dtype))  # (batch, H, P)
        t.add_(1)
        return self.out(y.reshape(-1, H * P)), (kbuf, vbuf, t)

    def state_size(self) -> int:
        return 2 * self.W * self.d_model  # the K and V buffers

    def flops_per_token(self, seq_len: int) -> int:
        """QK^T and AV over at most W keys: 2 matmuls x 2 FLOPs x min(W, L) x H x P."""
        return 4 * min(self.W, seq_len) * self.d_model


# ---------------------------------------------------------------------------------------------
# 3. BaseConv: short gated convolution
# ---------------------------------------------------------------------------------------------
class BaseConv(nn.Module):
    def __init__(self, d_model: int, kernel_size: int = 3, expand: int = 2, impl: str = "auto"):
        super().__init__()
        self.d_model, self.k, self.impl = d_model, kernel_size, impl
        self.d_inner = expand * d_model
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)  # [in1 | in2]
        # nn.Conv1d only holds the depthwise weights (d_inner, 1, k) and bias with PyTorch's
        # default init; the computation goes through causal_conv1d (seq_idx-aware).
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size, groups=self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.out_proj._is_residual_out = True

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None, state=None) -> torch.Tensor:
        u1, u2 = self.in_proj(x).chunk(2, dim=-1)  # (batch, L, d_inner) each
        if state is not None:  # prefill: the conv's last k-1 inputs into the fresh state
            store_conv_state(state, u1)
        if seq_idx is not None:
            seq_idx = seq_idx.to(torch.int32)
        c = causal_conv1d(u1, self.conv1d.weight[:, 0], self.conv1d.bias, seq_idx=seq_idx,
                          impl=self.impl, channel_last=True)  # (batch, L, d_inner)
        return self.out_proj(c * u2)  # (batch, L, d_model)

    def allocate_state(self, batch, device=None, dtype=torch.float32):
        return torch.zeros(batch, self.d_inner, self.k - 1, device=device, dtype=dtype)  # (batch, d_inner, k-1)

    def prefill(self, x: torch.Tensor, state):
        return self.forward(x, state=state), state

    def step(self, x_t: torch.Tensor, state):
        u1, u2 = self.in_proj(x_t).chunk(2, dim=-1)  # (batch, d_inner) each
        c = causal_conv1d_update(u1, state, self.conv1d.weight[:, 0], self.conv1d.bias,
                                 impl="torch" if self.impl == "torch" else "auto")  # (batch, d_inner)
        return self.out_proj(c * u2), state

    def state_size(self) -> int:
        return self.d_inner * (self.k - 1)

    def flops_per_token(self, seq_len: int) -> int:
        return 2 * self.d_inner * self.k  # the depthwise taps (the gate's product is not counted)


# ---------------------------------------------------------------------------------------------
# a layer's mixer: one kind, or a chain
# ---------------------------------------------------------------------------------------------
class MixerChain(nn.Module):
    """Sub-mixers applied in turn inside one layer: h = u + m_1(u); ...; y = m_n(h)
    (a residual around every sub-mixer but the last, whose residual is the block's)."""

    # the residuals inside the chain add to u: the block keeps u in its own dtype (fp32) rather
    # than rounding it to the autocast dtype for a leading projection (lm.Block._normed)
    input_to_autocast = False

    def __init__(self, mixers: list[nn.Module]):
        super().__init__()
        self.mixers = nn.ModuleList(mixers)

    def forward(self, x, seq_idx=None):
        for m in self.mixers[:-1]:
            x = x + m(x, seq_idx=seq_idx)
        return self.mixers[-1](x, seq_idx=seq_idx)

    def allocate_state(self, batch, device=None, dtype=torch.float32):
        return tuple(m.allocate_state(batch, device, dtype) for m in self.mixers)

    def prefill(self, x, state):
        for i, (m, s) in enumerate(zip(self.mixers, state)):
            y, _ = mixer_prefill(m, x, s)  # (batch, L, d_model); s written in place
            x = x + y if i < len(self.mixers) - 1 else y
        return x, state

    def step(self, x_t, state):
        new = []
        for i, (m, s) in enumerate(zip(self.mixers, state)):
            y, s = m.step(x_t, s)
            new.append(s)
            x_t = x_t + y if i < len(self.mixers) - 1 else y
        return x_t, tuple(new)

    def state_size(self) -> int:
        return sum(m.state_size() for m in self.mixers)

    def flops_per_token(self, seq_len: int) -> int:
        return sum(m.flops_per_token(seq_len) for m in self.mixers)


class Based(LanguageModel):
    arch = "based"

    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 1,
                 feature_dim: int = 16, window: int = 64, layer_pattern="mqar", conv_kernel: int = 3,
                 conv_expand: int = 2, normalize: bool = True, eps: float = 1e-6, mlp: bool = True,
                 mlp_hidden: int | None = None, mlp_multiple_of: int = 64, rope_base: float = 10000.0,
                 impl: str = "auto", window_impl: str = "auto", norm_eps: float = 1e-5,
                 init_std: float = 0.02, pad_vocab_multiple: int = 8):
        for field, value in dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, feature_dim=feature_dim,
                                 window=window, conv_kernel=conv_kernel, conv_expand=conv_expand).items():
            require_positive_int(value, f"model.{field}")
        require(d_model % n_heads == 0, "model.d_model",
                f"{d_model} is not divisible by model.n_heads={n_heads}")
        require(feature_dim <= MAX_FEATURE_DIM, "model.feature_dim",
                f"{feature_dim} exceeds the Taylor kernel's maximum {MAX_FEATURE_DIM}")
        require(2 <= conv_kernel <= 4, "model.conv_kernel",
                f"{conv_kernel} is not supported by causal_conv1d (2..4)")
        require(impl in IMPLS, "model.impl", f"{impl!r} is not one of {', '.join(IMPLS)}")
        require(window_impl in WINDOW_IMPLS, "model.window_impl",
                f"{window_impl!r} is not one of {', '.join(WINDOW_IMPLS)}")
        require(window_impl != "flex" or HAS_FLEX, "model.window_impl",
                "flex needs torch >= 2.5 (torch.nn.attention.flex_attention)")
        kinds = layer_kinds(layer_pattern, n_layers)
        if any("sliding_window" in k for k in kinds):
            require((d_model // n_heads) % 2 == 0, "model.n_heads",
                    f"RoPE needs an even head dimension; d_model/n_heads = {d_model / n_heads:g}")
        self.layer_kinds = kinds

        def make_one(kind):
            if kind == "linear_attn":
                return TaylorLinearAttention(d_model, n_heads, feature_dim, normalize, eps, impl)
            if kind == "sliding_window":
                return SlidingWindowAttention(d_model, n_heads, window, rope_base, window_impl)
            return BaseConv(d_model, conv_kernel, conv_expand, impl)

        def make_mixer(i):
            mixers = [make_one(kind) for kind in kinds[i]]
            return mixers[0] if len(mixers) == 1 else MixerChain(mixers)

        super().__init__(
            vocab_size, d_model, n_layers, make_mixer=make_mixer,
            make_mlp=lambda i: SwiGLU(d_model, mlp_hidden, mlp_multiple_of) if mlp else None,
            norm_eps=norm_eps, init_std=init_std, pad_vocab_multiple=pad_vocab_multiple,
        )
