"""Forward FLOPs per token (LanguageModel.flops_per_token) against torch's FlopCounterMode and
against hand counts on tiny configurations.

FlopCounterMode counts matmuls (mm, bmm, addmm), convolutions and attention kernels; it does
not count elementwise work, which the models' accounting leaves out too. Where a model's
CPU path computes something differently from what its count describes (Mamba-2's reference
recomputes the shared C B^T per head, Based's chunked linear attention is not the recurrent
form that is counted), only the parts that both describe are compared.
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ssdbench.models.based import Based
from ssdbench.models.mamba1 import Mamba1
from ssdbench.models.mamba2 import Mamba2
from ssdbench.models.transformerpp import TransformerPP

B, L = 2, 32


def counted(model, seq_len=L) -> dict[str, float]:
    """FLOPs per token by op name (mm, bmm, convolution, ...) of one forward pass."""
    torch.manual_seed(0)
    x = torch.randint(0, model.vocab_size, (B, seq_len))
    # the math backend decomposes attention into two bmm (the CPU's fused kernel is not counted)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return {str(k).removeprefix("aten."): v / (B * seq_len) for k, v in fc.get_flop_counts()["Global"].items()}


def linear_flops(model) -> int:
    """2 x every matmul weight the shell counts (nn.Linear modules and the tied head)."""
    return model.flops_per_token(L) - sum(layer.mixer.flops_per_token(L) for layer in model.layers)


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=2), dict(head_structure="mqa")],
                         ids=["mha", "gqa", "mqa"])
def test_transformerpp_matches_flop_counter_exactly(kw):
    m = TransformerPP(vocab_size=100, d_model=64, n_layers=2, n_heads=4, **kw)
    ops = counted(m)
    assert set(ops) == {"mm", "bmm"}
    assert ops["mm"] + ops["bmm"] == m.flops_per_token(L)
    assert ops["bmm"] == 2 * 4 * L * 64  # QK^T and AV over the full L x L square, 2 layers


def test_mamba1_projections_and_conv_match_flop_counter():
    m = Mamba1(vocab_size=100, d_model=32, n_layers=2, impl="torch")
    ops = counted(m)
    assert ops["mm"] == linear_flops(m)  # in/x/dt/out projections and the head
    mixer = m.layers[0].mixer
    assert ops["convolution"] == 2 * 2 * mixer.d_inner * mixer.d_conv
    # the scan (9 D N per token, elementwise in the reference) is not a matmul: not counted
    assert m.flops_per_token(L) - ops["mm"] - ops["convolution"] == 2 * 9 * mixer.d_inner * mixer.N


@pytest.mark.parametrize("head_structure", ["gva", "mha"])
def test_mamba2_matches_flop_counter_up_to_shared_cb(head_structure):
    m = Mamba2(vocab_size=100, d_model=64, n_layers=2, d_state=16, headdim=16, chunk_size=16,
               head_structure=head_structure, impl="torch")
    mixer = m.layers[0].mixer
    H, P, N, Q = mixer.H, mixer.P, mixer.N, 16
    ops = counted(m)
    assert ops["mm"] == linear_flops(m)
    assert ops["convolution"] == 2 * 2 * mixer.conv_dim * 4
    # The reference's bmm: C B^T per head (2QN), masked product with x (2QP), chunk states
    # (2NP), state to output (2NP); the chunk recurrence (2NP/Q) is elementwise.
    assert ops["bmm"] == 2 * H * (2 * Q * N + 2 * Q * P + 4 * N * P)
    cb_groups = {"gva": 1, "mha": H}[head_structure]  # distinct (B, C) pairs the kernels compute C B^T for
    ssd = cb_groups * 2 * Q * N + H * (2 * Q * P + 4 * N * P + 2 * N * P / Q)
    assert mixer.flops_per_token(L) == int(ssd + 2 * mixer.conv_dim * 4)


def test_based_projections_and_conv_match_flop_counter():
    m = Based(vocab_size=100, d_model=32, n_layers=3, n_heads=2, layer_pattern="lm", window=8, impl="torch")
    kinds = [k[0] for k in m.layer_kinds]
    assert kinds == ["base_conv", "linear_attn", "sliding_window"]
    ops = counted(m)
    assert ops["mm"] == linear_flops(m)
    assert ops["convolution"] == 2 * 64 * 3  # BaseConv: d_inner = 64 channels, kernel 3
    # sliding window: the count is over min(W, L) keys per query (4 W d per token)
    assert m.layers[2].mixer.flops_per_token(L) == 4 * 8 * 32
    # linear attention, recurrent form: update and readout, 2 x 2 x H x 273 features x (P + 1)
    assert m.layers[1].mixer.flops_per_token(L) == 4 * 2 * 273 * 17


# --------------------------------------------------------------------------- hand counts

def test_hand_count_transformerpp():
    m = TransformerPP(vocab_size=16, d_model=8, n_layers=1, n_heads=2)  # SwiGLU hidden 64
    seq = 4
    head = 2 * 8 * 16
    qkv, out = 2 * 8 * 24, 2 * 8 * 8
    mlp = 2 * 3 * 8 * 64
    attn = 2 * 2 * seq * 8  # QK^T and AV: L keys x d_model per query
    assert m.flops_per_token(seq) == head + qkv + out + mlp + attn == 3968


def test_hand_count_mamba1():
    m = Mamba1(vocab_size=8, d_model=4, n_layers=1, d_state=2)  # D = 8, R = 1, W = 4
    head, in_proj, x_proj, dt_proj, out_proj = 2 * 4 * 8, 2 * 4 * 16, 2 * 8 * (1 + 4), 2 * 1 * 8, 2 * 8 * 4
    scan, conv = 9 * 8 * 2, 2 * 8 * 4
    assert m.flops_per_token(100) == head + in_proj + x_proj + dt_proj + out_proj + scan + conv == 560


def test_hand_count_mamba2():
    # d_inner 16, P 8 -> H 2, N 4, one B/C group; Q = min(chunk 4, L); in_proj -> z16 x16 B4 C4 dt2
    m = Mamba2(vocab_size=16, d_model=8, n_layers=1, d_state=4, headdim=8, chunk_size=4)
    head, in_proj, out_proj, conv = 2 * 8 * 16, 2 * 8 * 42, 2 * 16 * 8, 2 * 24 * 4
    cb = 2 * 4 * 4  # C B^T once for both heads
    per_head = 2 * 4 * 8 + 4 * 4 * 8 + 2 * 4 * 8 / 4  # masked x, chunk state, state output, recurrence
    assert m.flops_per_token(8) == head + in_proj + out_proj + conv + cb + 2 * per_head == 1824
    # L = 2 < chunk: Q = 2, so C B^T 2*2*4 and per head 2*2*8 + 128 + 2*4*8/2
    assert m.flops_per_token(2) == head + in_proj + out_proj + conv + 16 + 2 * (32 + 128 + 32) == 1776


def test_hand_count_based():
    # d_model 8, H 2 heads -> P 4, feature dim F 2, window 4, BaseConv expand 2 (d_inner 16) and
    # kernel 3, no MLP, vocabulary 16 (a multiple of 8: no padding)
    m = Based(vocab_size=16, d_model=8, n_layers=3, n_heads=2, feature_dim=2, window=4, conv_kernel=3,
              conv_expand=2, layer_pattern=["linear_attn", "sliding_window", "base_conv"], mlp=False)
    head = 2 * 8 * 16  # 256
    # linear attention: projection to q, k (2 heads x F 2 each) and v (8): 2 * 8 * 16; out 2 * 8 * 8;
    # Taylor features 1 + 2 + 2^2 = 7; update phi(k) [v, 1]^T and readout phi(q) [S, z]:
    # 2 x 2 FLOPs x 7 x (P 4 + 1) x 2 heads = 280
    linear = 2 * 8 * 16 + 2 * 8 * 8 + 2 * 2 * 7 * 5 * 2  # 256 + 128 + 280 = 664
    # sliding window: q, k, v 2 * 8 * 24, out 2 * 8 * 8; scores and AV over 4 keys x 8 = 2 * 2 * 4 * 8
    window = 2 * 8 * 24 + 2 * 8 * 8 + 2 * 2 * 4 * 8  # 384 + 128 + 128 = 640
    # BaseConv: in_proj 8 -> 2 x 16, out_proj 16 -> 8, depthwise taps 2 * 16 channels * 3
    conv = 2 * 8 * 32 + 2 * 16 * 8 + 2 * 16 * 3  # 512 + 256 + 96 = 864
    assert m.flops_per_token(16) == head + linear + window + conv == 2424
    # L = 2 < window: 2 keys a query, the window's sequence term 2 * 2 * 2 * 8 = 64 instead of 128
    assert m.flops_per_token(2) == 2424 - 64 == 2360
