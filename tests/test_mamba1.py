"""Mamba-1 model: paper parameter count, decoding equals the forward, init, impls, config errors."""
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, decode_logits, rel_err
from ssdbench.errors import ConfigError
from ssdbench.models.mamba1 import Mamba1

V = 97


def tiny(**kw):
    args = dict(d_model=32, n_layers=2, d_state=8, impl="torch")
    args.update(kw)
    return Mamba1(V, **args)


def test_param_count_matches_mamba_130m():
    m = Mamba1(50280, d_model=768, n_layers=24, d_state=16, d_conv=4, expand=2)
    d, di, N, W = 768, 1536, 16, 4
    R = math.ceil(d / 16)  # 48
    per_layer = (d * 2 * di          # in_proj
                 + di * (W + 1)      # depthwise conv weight + bias
                 + di * (R + 2 * N)  # x_proj
                 + R * di + di       # dt_proj weight + bias
                 + di * N + di       # A_log, D
                 + di * d            # out_proj
                 + d)                # the block's RMSNorm
    expected = 24 * per_layer + 50280 * d + d  # tied embedding (50280 is a multiple of 8), final norm
    assert expected == 129_135_360
    assert m.num_params() == expected
    assert abs(m.num_params() / 129.1e6 - 1) < 0.002
    assert m.num_params(non_embedding=True) == expected - 50280 * d
    T = 2048
    linear = 24 * (d * 2 * di + di * (R + 2 * N) + R * di + di * d) + d * 50280
    assert m.flops_per_token(T) == 2 * linear + 24 * (9 * di * N + 2 * di * W)
    assert m.state_size() == 24 * (di * N + di * (W - 1))


def test_step_equals_forward():
    """Decoding token by token (conv + SSM state, through LanguageModel.step) gives the forward's logits."""
    m = tiny(d_conv=random.choice([2, 3, 4])).double().eval()
    with torch.no_grad():  # non-trivial D and conv bias so every term is exercised
        for layer in m.layers:
            layer.mixer.D.normal_()
            layer.mixer.conv1d.bias.normal_(std=0.5)
    L = random.randint(5, 12)
    x = torch.randint(0, V, (2, L))
    with torch.no_grad():
        full = m(x)
    torch.testing.assert_close(decode_logits(m, x), full)


def test_mixer_step_equals_forward_random_input():
    """The same at the mixer level, on random (not embedded) inputs."""
    mixer = tiny().double().layers[0].mixer
    u = torch.randn(3, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(u)
        state = mixer.allocate_state(3, dtype=torch.float64)
        ys = []
        for t in range(7):
            y, state = mixer.step(u[:, t], state)
            ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), full)
    assert state[0].shape == (3, 64, 3) and state[1].shape == (3, 64, 8)


def test_init_and_no_weight_decay():
    m = tiny(dt_min=1e-3, dt_max=1e-1)
    mixer = m.layers[0].mixer
    # S4D-real: A[d, n] = -(n + 1) on every channel
    A = -torch.exp(mixer.A_log)
    torch.testing.assert_close(A, -torch.arange(1, 9, dtype=torch.float32).expand(64, 8))
    torch.testing.assert_close(mixer.D, torch.ones(64))
    dt = F.softplus(mixer.dt_proj.bias)
    assert ((dt >= 1e-4 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))).all()
    assert dt.log().std() > 0.5  # spread log-uniformly, not one value
    s = mixer.R ** -0.5
    assert mixer.dt_proj.weight.abs().max() <= s and mixer.dt_proj.weight.abs().max() > 0.5 * s
    skip = m.no_weight_decay_params()
    names = {n for n, p in m.named_parameters() if id(p) in skip}
    for p in (mixer.A_log, mixer.D, mixer.dt_proj.bias, mixer.conv1d.bias, m.embedding.weight,
              m.layers[0].norm1.weight, m.norm_f.weight):
        assert id(p) in skip
    for p in (mixer.in_proj.weight, mixer.x_proj.weight, mixer.dt_proj.weight, mixer.out_proj.weight,
              mixer.conv1d.weight):
        assert id(p) not in skip
    assert all(n.endswith(("A_log", ".D", "bias", "norm1.weight", "norm_f.weight")) or n == "embedding.weight"
               for n in names)
    assert all(m.layers[i].mlp is None for i in range(2))
    # residual output projection scaled down by 1/sqrt(2 n_layers)
    assert mixer.out_proj.weight.std() < 0.02 / math.sqrt(4) * 1.3


def test_auto_equals_torch_on_cpu():
    m = tiny(impl="torch").double()
    m2 = tiny(impl="auto").double()
    m2.load_state_dict(m.state_dict())
    x = torch.randint(0, V, (2, 13))
    seq_idx = torch.tensor([[0] * 6 + [1] * 7, [0] * 13], dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(m2(x, seq_idx=seq_idx), m(x, seq_idx=seq_idx))


@pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
def test_triton_equals_torch_forward_backward():
    """The Triton kernels (interpreted on a CPU) give the reference's outputs and gradients."""
    torch.manual_seed(random.randrange(2**31))
    big = DEVICE == "cuda"
    kw = dict(d_model=64 if big else 16, n_layers=2, d_state=16 if big else 4)
    ref, tri = tiny(impl="torch", **kw).to(DEVICE), tiny(impl="triton", **kw).to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    L = 300 if big else 11  # not a multiple of any block
    x = torch.randint(0, V, (2, L), device=DEVICE)
    cut = random.randint(2, L - 2)
    seq_idx = torch.cat([torch.zeros(2, cut), torch.ones(2, L - cut)], 1).to(torch.int32).to(DEVICE)
    outs, grads = [], []
    for m in (ref, tri):
        y = m(x, seq_idx=seq_idx)
        (y.float().pow(2).mean()).backward()
        outs.append(y.detach())
        grads.append({n: p.grad.detach().clone() for n, p in m.named_parameters()})
    assert rel_err(outs[1], outs[0]) < 1e-4
    for n, g in grads[0].items():
        assert rel_err(grads[1][n], g) < 1e-3, n


@pytest.mark.parametrize("kwargs,field", [
    (dict(d_state=0), "model.d_state"),
    (dict(d_state=257), "model.d_state"),
    (dict(d_conv=5), "model.d_conv"),
    (dict(d_conv=1), "model.d_conv"),
    (dict(expand=0), "model.expand"),
    (dict(expand=1.5), "model.expand"),
    (dict(dt_rank=0), "model.dt_rank"),
    (dict(dt_rank="big"), "model.dt_rank"),
    (dict(dt_min=0.2, dt_max=0.1), "model.dt_min"),
    (dict(dt_init_floor=0.0), "model.dt_init_floor"),
    (dict(impl="cuda"), "model.impl"),
    (dict(d_model=0), "model.d_model"),
    (dict(n_layers=-1), "model.n_layers"),
])
def test_bad_config(kwargs, field):
    args = dict(d_model=32, n_layers=1)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=field):
        Mamba1(V, **args)
