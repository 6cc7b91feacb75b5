"""The Triton decode steps of the causal conv (``causal_conv1d_update(impl="triton")``) and of
the selective scan (``selective_state_update(impl="triton")``) against their PyTorch versions in
float64, with the strided and broadcast inputs the Mamba mixers pass; then Mamba-1's mixer step
on those kernels against its PyTorch step. (Mamba-2's decode kernels: test_mamba2_decode.py.)"""

import pytest
import torch

from conftest import DEVICE, ON_GPU, check_mixer_steps, poison_fixture, rel_err
from ssdbench.kernels import causal_conv1d as cc
from ssdbench.kernels.causal_conv1d import causal_conv1d_update
from ssdbench.kernels.selective_scan import selective_state_update
from ssdbench.models.mamba1 import Mamba1Mixer

pytestmark = [pytest.mark.usefixtures("random_seed"), pytest.mark.triton]
poison = poison_fixture(cc, "empty")  # (cc.torch is torch: every launcher's torch.empty gives NaN)

# Output relative-error limits, measured on the interpreter over these cases and 3 steps:
# fp32 up to 2.4e-7 (conv and state update), fp16 up to 3.1e-4 (the output's final rounding,
# 2^-11 relative; bf16's is 8x that). The fp32 state: up to 1.4e-7 in every dtype (inputs
# rounded alike on both sides).
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
STATE_TOL = 1e-6
# (the interpreter rounds fp32 -> bf16 by truncation, not to nearest: bf16 runs on the GPU only)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("bias,act", [(True, "silu"), (False, None)])
def test_conv_update_matches_torch(poison, dtype, W, bias, act, batch=3, dim=300, steps=3):
    """300 channels: two programs of 256, the second partly masked."""
    w = torch.randn(dim, 1, W, device=DEVICE) * 0.5
    b = torch.randn(dim, device=DEVICE) if bias else None
    state = torch.randn(batch, dim, W - 1, device=DEVICE).to(dtype)
    state_ref = state.double()
    for t in range(steps):
        x = torch.randn(batch, 2 * dim + 5, device=DEVICE).to(dtype)[:, dim:2 * dim]  # a strided slice
        out = causal_conv1d_update(x, state, w, b, activation=act, impl="triton")
        ref = causal_conv1d_update(x.double(), state_ref, w.double(), None if b is None else b.double(),
                                   activation=act)
        assert out.dtype == dtype and out.shape == (batch, dim)
        err = rel_err(out, ref)
        assert err < TOL[dtype], f"step {t}: relative error {err:.3g} (limit {TOL[dtype]:.3g})"
        assert torch.equal(state, state_ref.to(dtype)), f"step {t}: the state's inputs differ"


@pytest.mark.no_triton
def test_conv_update_triton_rejects_what_it_cannot_take():
    x, w = torch.randn(2, 8), torch.randn(8, 4)
    with pytest.raises(ValueError, match="conv_state"):  # the (batch, D, W) form is the PyTorch step's
        causal_conv1d_update(x, torch.zeros(2, 8, 4), w, impl="triton")
    with pytest.raises(ValueError, match="impl"):
        causal_conv1d_update(x, torch.zeros(2, 8, 3), w, impl="cuda")


def _state_inputs(dtype, batch, dim, N, groups, width=None):
    """x, dt, z as slices of one projection row; B, C (batch, N), (batch, G, N) or LTI's
    broadcast (batch, N) view with batch stride 0; A (D, N) negative; D, dt_bias (D,)."""
    proj = torch.randn(batch, 3 * dim + 7, device=DEVICE).to(dtype)
    x, dt, z = proj[:, :dim], proj[:, dim:2 * dim], proj[:, 2 * dim:3 * dim]
    Gb, Gc = groups
    def bc(G):
        if G == "lti":
            return torch.randn(N, device=DEVICE).to(dtype).expand(batch, N)
        return torch.randn(batch, N, device=DEVICE).to(dtype) if G is None else \
            torch.randn(batch, G, N, device=DEVICE).to(dtype)
    A = -torch.rand(dim, N, device=DEVICE) - 0.5
    return x, dt, z, A, bc(Gb), bc(Gc), torch.randn(dim, device=DEVICE), torch.rand(dim, device=DEVICE) * 2 - 4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [(None, None), (1, 1), (2, 4), ("lti", "lti")])
@pytest.mark.parametrize("N", [16, 12])
def test_state_update_matches_torch(poison, dtype, groups, N, batch=3, dim=40, steps=3):
    state = torch.randn(batch, dim, N, device=DEVICE)
    state_ref = state.double()
    for t in range(steps):
        x, dt, z, A, B, C, D, bias = _state_inputs(dtype, batch, dim, N, groups)
        y = selective_state_update(state, x, dt, A, B, C, D, z, bias, True, impl="triton")
        yr = selective_state_update(state_ref, *(v.double() for v in (x, dt, A, B, C, D, z, bias)), True)
        assert y.dtype == dtype and y.shape == (batch, dim)
        err = rel_err(y, yr)
        assert err < TOL[dtype], f"step {t}: output relative error {err:.3g} (limit {TOL[dtype]:.3g})"
        err = rel_err(state, state_ref)
        assert err < STATE_TOL, f"step {t}: state relative error {err:.3g} (limit {STATE_TOL:.3g})"


def test_state_update_without_optional_inputs(poison, batch=2, dim=24, N=8):
    """No D, z, dt_bias and no softplus (dt used as given, positive)."""
    state = torch.randn(batch, dim, N, device=DEVICE)
    state_ref = state.double()
    x, _, _, A, B, C, _, _ = _state_inputs(torch.float32, batch, dim, N, (None, None))
    dt = torch.rand(batch, dim, device=DEVICE) * 0.1
    y = selective_state_update(state, x, dt, A, B, C, impl="triton")
    yr = selective_state_update(state_ref, x.double(), dt.double(), A.double(), B.double(), C.double())
    assert rel_err(y, yr) < TOL[torch.float32] and rel_err(state, state_ref) < STATE_TOL


@pytest.mark.no_triton
def test_state_update_triton_rejects_bad_shapes():
    state, x, A = torch.zeros(2, 8, 4), torch.randn(2, 8), -torch.ones(8, 4)
    with pytest.raises(ValueError, match="B"):  # 3 groups do not divide 8 channels
        selective_state_update(state, x, x, A, torch.randn(2, 3, 4), torch.randn(2, 4), impl="triton")
    with pytest.raises(ValueError, match="impl"):
        selective_state_update(state, x, x, A, torch.randn(2, 4), torch.randn(2, 4), impl="cuda")


@pytest.mark.parametrize("selective", [True, False])
def test_mamba1_mixer_triton_step_matches_torch_step(poison, selective, batch=2, steps=4, d_model=16):
    """Mamba-1's step on the two kernels (after a prefill) against its PyTorch step in float64;
    selective=False is the LTI variant (broadcast B and C)."""
    kw = dict(d_state=8, selective=selective)
    mixer = Mamba1Mixer(d_model, impl="triton", **kw).to(DEVICE)
    mixer.init_special()  # (A_log, dt's bias, D: the mixer's own initialisation)
    ref = Mamba1Mixer(d_model, impl="torch", **kw).to(DEVICE).double()
    ref.load_state_dict(mixer.state_dict())
    check_mixer_steps(mixer, ref, d_model, batch, steps)
