"""Mamba-1 model: paper parameter count, decoding equals the forward, init, impls, config errors,
and the LTI (selective=False, S4-like) ablation of the paper's Table 1."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, decode_logits, fresh_seed, rel_err, with_seed
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
    seed, rng = fresh_seed()
    m = tiny(d_conv=rng.choice([2, 3, 4])).double().eval()
    with torch.no_grad():  # non-trivial D and conv bias so every term is exercised
        for layer in m.layers:
            layer.mixer.D.normal_()
            layer.mixer.conv1d.bias.normal_(std=0.5)
    L = rng.randint(5, 12)
    x = torch.randint(0, V, (2, L))
    with torch.no_grad():
        full = m(x)
    torch.testing.assert_close(decode_logits(m, x), full, msg=with_seed(seed))


def mixer_steps(mixer, u):
    """Run a mixer's recurrent step over u (batch, L, d_model) token by token: the outputs
    stacked (batch, L, d_model) and the final (conv, ssm) state."""
    state = mixer.allocate_state(u.shape[0], dtype=u.dtype)
    ys = []
    for t in range(u.shape[1]):
        y, state = mixer.step(u[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


def test_mixer_step_equals_forward_random_input():
    """The same at the mixer level, on random (not embedded) inputs."""
    seed, _ = fresh_seed()
    mixer = tiny().double().layers[0].mixer
    u = torch.randn(3, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(u)
        stepped, state = mixer_steps(mixer, u)
    torch.testing.assert_close(stepped, full, msg=with_seed(seed))
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
@pytest.mark.parametrize("selective", [True, False], ids=["selective", "lti"])
def test_triton_equals_torch_forward_backward(selective):
    """The Triton kernels (interpreted on a CPU) give the reference's outputs and gradients
    (LTI: delta, B and C reach the kernels as stride-0 broadcast views)."""
    seed, rng = fresh_seed()
    big = DEVICE == "cuda"
    kw = dict(d_model=64 if big else 16, n_layers=2, d_state=16 if big else 4, selective=selective)
    ref, tri = tiny(impl="torch", **kw).to(DEVICE), tiny(impl="triton", **kw).to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    L = 300 if big else 11  # not a multiple of any block
    x = torch.randint(0, V, (2, L), device=DEVICE)
    cut = rng.randint(2, L - 2)
    seq_idx = torch.cat([torch.zeros(2, cut), torch.ones(2, L - cut)], 1).to(torch.int32).to(DEVICE)
    outs, grads = [], []
    for m in (ref, tri):
        y = m(x, seq_idx=seq_idx)
        (y.float().pow(2).mean()).backward()
        outs.append(y.detach())
        grads.append({n: p.grad.detach().clone() for n, p in m.named_parameters()})
    # Interpreter limits, 5-10x the worst of 10 seeds (issue 24): y 4.6e-8; gradients 6.9e-6
    # (x_proj, dt_lti), but B_lti and C_lti, one vector summed over every token and channel,
    # 7.4e-5. On the GPU (other sizes, compiled kernels, never measured so) the old 1e-4 / 1e-3.
    tol_y, tol_g, tol_bc = (1e-4, 1e-3, 1e-3) if big else (4e-7, 5e-5, 5e-4)
    assert rel_err(outs[1], outs[0]) < tol_y, f"seed={seed} y: {rel_err(outs[1], outs[0])}"
    for n, g in grads[0].items():
        tol = tol_bc if n.endswith(("B_lti", "C_lti")) else tol_g
        assert rel_err(grads[1][n], g) < tol, f"seed={seed} {n}: {rel_err(grads[1][n], g)}"


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
    (dict(selective="no"), "model.selective"),
    (dict(selective=0), "model.selective"),
    (dict(d_model=0), "model.d_model"),
    (dict(n_layers=-1), "model.n_layers"),
])
def test_bad_config(kwargs, field):
    args = dict(d_model=32, n_layers=1)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=field):
        Mamba1(V, **args)


# ------------------------------------------------------------------ LTI (selective=False) ablation

def _randomize_lti(m):
    """Non-trivial D, conv bias and LTI parameters (dt_lti != 0 so dt_proj.weight matters)."""
    with torch.no_grad():
        for layer in m.layers:
            mx = layer.mixer
            mx.D.normal_()
            mx.conv1d.bias.normal_(std=0.5)
            mx.dt_lti.normal_()
            mx.B_lti.normal_()
            mx.C_lti.normal_()
    return m


def test_lti_step_equals_forward():
    """selective=False: stepping the mixer (and the whole model) token by token gives the forward."""
    seed, rng = fresh_seed()
    m = _randomize_lti(tiny(selective=False, d_conv=rng.choice([2, 3, 4]))).double().eval()
    mixer = m.layers[0].mixer
    u = torch.randn(3, 9, 32, dtype=torch.float64)
    seq_idx = torch.zeros(3, 9, dtype=torch.int32)
    with torch.no_grad():
        full = mixer(u)
        torch.testing.assert_close(mixer(u, seq_idx=seq_idx), full, msg=with_seed(seed))
        stepped, state = mixer_steps(mixer, u)
    torch.testing.assert_close(stepped, full, msg=with_seed(seed))
    assert state[0].shape == (3, 64, m.layers[0].mixer.d_conv - 1) and state[1].shape == (3, 64, 8)
    x = torch.randint(0, V, (2, rng.randint(5, 12)))
    with torch.no_grad():
        torch.testing.assert_close(decode_logits(m, x), m(x), msg=with_seed(seed))


def test_lti_parameters_are_input_independent_and_trained():
    m = tiny(selective=False)
    sel = tiny()
    names = {n for n, _ in m.named_parameters()}
    for i in range(2):
        assert {f"layers.{i}.mixer.{p}" for p in ("dt_lti", "B_lti", "C_lti")} <= names
        assert f"layers.{i}.mixer.x_proj.weight" in {n for n, _ in sel.named_parameters()}
    assert not any("x_proj" in n for n in names) and not any("_lti" in n for n, _ in sel.named_parameters())
    mixer = m.layers[0].mixer
    assert not hasattr(mixer, "x_proj")
    R, N = mixer.R, mixer.N
    assert mixer.dt_lti.shape == (R,) and mixer.B_lti.shape == (N,) and mixer.C_lti.shape == (N,)
    # init: dt_lti = 0 (delta starts at softplus(dt_proj.bias) = dt0, as in the selective
    # model), B = 1, C ~ N(0, 1/N) (S4D)
    assert (mixer.dt_lti == 0).all() and (mixer.B_lti == 1).all()
    assert mixer.C_lti.std() > 0 and mixer.C_lti.abs().max() < 6 * N ** -0.5

    # what reaches the scan: delta, B and C equal for two different inputs, constant over batch and time
    seen = []
    scan = mixer._scan

    def spy(x, delta, A, B, C, **kw):
        seen.append((delta, B, C))
        return scan(x, delta, A, B, C, **kw)

    mixer._scan = spy
    with torch.no_grad():
        mixer(torch.randn(2, 6, 32))
        mixer(3 * torch.randn(2, 6, 32) + 1)
    del mixer._scan
    (d1, B1, C1), (d2, B2, C2) = seen
    assert d1.shape == (2, 64, 6) and B1.shape == C1.shape == (2, 8, 6)  # (batch, D, L), (batch, N, L)
    for a, b in ((d1, d2), (B1, B2), (C1, C2)):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, a[:1, :, :1].expand_as(a))
    torch.testing.assert_close(B1[0, :, 0], mixer.B_lti.detach())
    torch.testing.assert_close(C1[0, :, 0], mixer.C_lti.detach())
    torch.testing.assert_close(d1[0, :, 0], F.linear(mixer.dt_lti, mixer.dt_proj.weight).detach())

    # gradients reach the LTI parameters (and, through dt_lti, dt_proj.weight once dt_lti != 0)
    x = torch.randint(0, V, (2, 10))
    m(x).float().pow(2).mean().backward()
    for layer in m.layers:
        for p in (layer.mixer.B_lti, layer.mixer.C_lti, layer.mixer.dt_lti):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # 1-D: AdamW does not decay them (the shell's rule for vectors)
    skip = m.no_weight_decay_params()
    assert all(id(p) in skip for p in (mixer.dt_lti, mixer.B_lti, mixer.C_lti))


def test_lti_param_count_flops_state_size():
    """Per layer the LTI model lacks x_proj (D (R + 2N) weights) and has R + 2N vectors instead;
    FLOPs drop x_proj's matmul and the per-token dt_proj (applied once per call); state unchanged."""
    kw = dict(d_model=48, n_layers=3, d_state=8, d_conv=3)
    sel, lti = Mamba1(V, **kw), Mamba1(V, selective=False, **kw)
    mixer = sel.layers[0].mixer
    D, R, N = mixer.d_inner, mixer.R, mixer.N
    assert (D, R, N) == (96, 3, 8)
    assert mixer.x_proj.weight.numel() == D * (R + 2 * N)
    per_layer = mixer.x_proj.weight.numel() - (R + 2 * N)
    assert sel.num_params() - lti.num_params() == 3 * per_layer
    assert sel.num_params(non_embedding=True) - lti.num_params(non_embedding=True) == 3 * per_layer
    assert lti.state_size() == sel.state_size() == 3 * (D * N + D * (3 - 1))
    T = 256
    assert sel.flops_per_token(T) - lti.flops_per_token(T) == 3 * (2 * D * (R + 2 * N) + 2 * R * D)


def test_lti_from_config():
    """model=mamba1 model.selective=false composes and builds the LTI model; the default is selective."""
    from hydra import compose, initialize_config_module

    from ssdbench.train import _check_fields, build

    base = ["experiment=selective_copying", "model=mamba1", "model.impl=torch"]
    with initialize_config_module("ssdbench.conf", version_base="1.3"):
        cfg = compose("config", overrides=base)
        assert cfg.model.selective is True
        default = build(cfg.model)
        cfg = compose("config", overrides=[*base, "model.selective=false"])
        _check_fields(cfg.model, "model")
        lti = build(cfg.model)
        bad = compose("config", overrides=[*base, "model.selective=maybe"])
        with pytest.raises(ConfigError, match="model.selective"):
            build(bad)
    assert isinstance(lti, Mamba1) and all(not layer.mixer.selective for layer in lti.layers)
    assert all(layer.mixer.selective and hasattr(layer.mixer, "x_proj") for layer in default.layers)
    assert not any("x_proj" in n for n, _ in lti.named_parameters())
    x = torch.randint(0, cfg.task.vocab_size, (2, 16))
    with torch.no_grad():
        assert lti(x).shape == (2, 16, cfg.task.vocab_size)
