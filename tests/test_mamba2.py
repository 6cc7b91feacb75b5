"""Mamba-2 model: paper parameter count, head structures, decoding, init, config errors."""
import math
import random

import pytest
import torch

from conftest import decode_logits
from ssdbench.errors import ConfigError
from ssdbench.models.mamba2 import HEAD_STRUCTURES, Mamba2, head_counts
from ssdbench.models.transformerpp import TransformerPP

V = 97


def tiny(**kw):
    args = dict(d_model=32, n_layers=2, d_state=16, headdim=16, chunk_size=8, impl="torch")
    args.update(kw)
    return Mamba2(V, **args)


def test_param_count_matches_mamba2_130m():
    m = Mamba2(50280, d_model=768, n_layers=24, d_state=128, headdim=64, expand=2, ngroups=1)
    d, di, N, H, W = 768, 1536, 128, 24, 4
    conv_dim = di + 2 * N
    per_layer = d * (2 * di + 2 * N + H) + conv_dim * (W + 1) + 3 * H + di + di * d + d
    assert m.num_params() == 24 * per_layer + 50288 * d + d  # vocab padded to a multiple of 16
    assert abs(m.num_params() / 1e6 - 129.0) < 0.05  # the paper's 130M-class size


@pytest.mark.parametrize("hs", HEAD_STRUCTURES)
def test_step_equals_forward(hs):
    """Decoding token by token (conv + SSM state) gives the chunked forward's logits."""
    m = tiny(head_structure=hs, ngroups=2).double().eval()
    L = random.randint(9, 30)  # crosses several chunks of 8, not a multiple
    x = torch.randint(0, V, (2, L))
    with torch.no_grad():
        full = m(x)
    torch.testing.assert_close(decode_logits(m, x), full)


@pytest.mark.parametrize("hs", HEAD_STRUCTURES)
def test_head_structures_share_without_copies(hs):
    m = tiny(head_structure=hs, ngroups=2)
    mixer = m.layers[0].mixer
    H = mixer.H
    Hx, Gb, Gc = head_counts(hs, H, 2)
    assert (mixer.Hx, mixer.Gb, mixer.Gc) == (Hx, Gb, Gc)
    # the projection produces exactly the distinct heads: sharing saves parameters
    assert mixer.in_proj.out_features == mixer.d_inner + Hx * 16 + (Gb + Gc) * 16 + H


def test_chunk_size_does_not_change_the_function():
    m = tiny(chunk_size=4).double().eval()
    x = torch.randint(0, V, (2, 21))
    with torch.no_grad():
        a = m(x)
        for layer in m.layers:
            layer.mixer.chunk_size = 16
        b = m(x)
    torch.testing.assert_close(a, b)


def test_init_and_no_weight_decay():
    m = tiny()
    mixer = m.layers[0].mixer
    A = -torch.exp(mixer.A_log)
    assert ((A <= -1) & (A >= -16)).all()
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert ((dt >= 1e-4 - 1e-9) & (dt <= 0.1 + 1e-6)).all()
    skip = m.no_weight_decay_params()
    for p in (mixer.A_log, mixer.dt_bias, mixer.D, mixer.conv1d.bias):
        assert id(p) in skip
    assert id(mixer.in_proj.weight) not in skip and id(mixer.conv1d.weight) not in skip


def test_flops_count_chunk_terms():
    m = tiny()
    mixer = m.layers[0].mixer
    H, P, N, Q = mixer.H, mixer.P, mixer.N, 8
    # C B^T once per distinct (B group, C group) pair (the kernels share it across heads),
    # then per head: (C B^T o L) X, chunk states, state -> output, the chunk-state recurrence
    cb_pairs = H // math.gcd(H // mixer.Gb, H // mixer.Gc)
    expected = 2 * Q * N * cb_pairs + H * (2 * Q * P + 4 * N * P + 2 * N * P / Q) + 2 * mixer.conv_dim * 4
    assert mixer.flops_per_token(1000) == int(expected)
    assert mixer.flops_per_token(4) < mixer.flops_per_token(1000)  # short sequences: Q = L


@pytest.mark.parametrize("kwargs,field", [
    (dict(headdim=24), "model.headdim"),
    (dict(ngroups=3, head_structure="gva"), "model.ngroups"),
    (dict(chunk_size=12), "model.chunk_size"),
    (dict(head_structure="xyz"), "model.head_structure"),
    (dict(d_conv=5), "model.d_conv"),
    (dict(proj_align=0), "model.proj_align"),
])
def test_bad_config(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        tiny(**kwargs)


@pytest.mark.parametrize("hs", ["mha", "mqa", "gva", "mva", "mka"])
def test_transformer_head_structures(hs):
    m = TransformerPP(V, d_model=32, n_layers=1, n_heads=4, head_structure=hs, ngroups=2).double().eval()
    attn = m.layers[0].mixer
    dh = 8
    assert attn.qkv.out_features == (attn.Hq + attn.Hk + attn.Hv) * dh
    x = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        y = m(x)
    assert y.shape == (1, 10, V) and torch.isfinite(y).all()
