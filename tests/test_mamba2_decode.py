"""Mamba-2's two-kernel decoding step (kernels/mamba2_decode.py) against the plain-PyTorch step
it replaces (causal_conv1d_update then ssd_step) in float64: the output and both states, over
head structures, conv widths, state sizes that are not powers of two, strided slices of a
projection and several steps in a row; then the mixer's Triton step against its PyTorch step."""

import pytest
import torch

from conftest import DEVICE, ON_GPU, check_mixer_steps, poison_fixture, rel_err
from ssdbench.kernels import mamba2_decode
from ssdbench.kernels.causal_conv1d import causal_conv1d_update
from ssdbench.kernels.mamba2_decode import mamba2_decode_step
from ssdbench.kernels.mamba2_fused import Dims
from ssdbench.kernels.ssd_reference import ssd_step
from ssdbench.models.mamba2 import Mamba2Mixer

pytestmark = [pytest.mark.usefixtures("random_seed"), pytest.mark.triton]
poison = poison_fixture(mamba2_decode, "empty")  # the launcher's outputs start as NaN

# Relative-error limits (output, ssm state). Measured on the interpreter over 3 steps and every
# case here: fp32 output up to 1.9e-7, state up to 1.8e-7; fp16 output up to 2.7e-4 (its final
# rounding, 2^-11 relative), state the same 1.8e-7 (the reference rounds the conv's output as the
# kernel does, so both update the fp32 state from the same x, B, C). bf16 scales the output's
# rounding by 8 (2^-8); on the GPU the first bf16/fp16 run failed only the state limit, by a
# reference that did not round the conv output (1.2e-5 .. 1.3e-4). The half-precision state
# limits leave room for one conv output that rounds to the neighbouring half value (fp32 in the
# kernel, fp64 in the reference, near a rounding midpoint): one such B value moves P state
# entries by one ulp of the update, about 2.5e-6 relative in fp16 and 2e-5 in bf16 at these
# shapes. A state kept in half precision would be off by 1e-3 or more.
TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-5), torch.bfloat16: (8e-3, 5e-5)}
# (the interpreter rounds fp32 -> bf16 by truncation, not to nearest: bf16 runs on the GPU only)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])

# (Hx, Gb, Gc, H): Mamba-2's shared B/C (one group), multi-value (x per head), grouped B and C
# with different counts, x shared by head pairs, one x head with C per head (mqa)
STRUCTURES = [(4, 1, 1, 4), (4, 2, 1, 4), (4, 4, 4, 4), (2, 2, 2, 4), (1, 1, 4, 4)]


def reference(xBC, dt, conv_state, w, bias, ssm_state, A_log, D, dt_bias, dims, dt_limit):
    """The PyTorch step in float64 (updates its own float64 copies of the states). The conv's
    output is rounded to the inputs' dtype, as the kernel stores it and as the model's PyTorch
    step returns it (without that, bf16's rounding of x and B alone moves the state by 1e-4)."""
    batch = xBC.shape[0]
    xa = causal_conv1d_update(xBC.double(), conv_state, w.double(), bias.double(), activation="silu")
    xa = xa.to(xBC.dtype).double()  # (batch, conv_dim)
    x, B, C = torch.split(xa, [dims.Hx * dims.P, dims.Gb * dims.N, dims.Gc * dims.N], dim=-1)
    y, new = ssd_step(ssm_state, x.reshape(batch, dims.Hx, dims.P), dt.double(), -torch.exp(A_log.double()),
                      B.reshape(batch, dims.Gb, dims.N), C.reshape(batch, dims.Gc, dims.N), D=D.double(),
                      dt_bias=dt_bias.double(), dt_softplus=True, dt_limit=dt_limit)
    ssm_state.copy_(new)
    return y.reshape(batch, -1)  # (batch, H * P)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hs", STRUCTURES)
@pytest.mark.parametrize("W,N,P", [(4, 16, 16), (2, 12, 8), (3, 40, 24)])
def test_decode_step_matches_reference(poison, dtype, hs, W, N, P, steps=3, batch=3):
    Hx, Gb, Gc, H = hs
    dims = Dims(H * P, Hx, P, Gb, Gc, N, H)
    cd = dims.conv_dim
    w = torch.randn(cd, 1, W, device=DEVICE) * 0.5
    bias = torch.randn(cd, device=DEVICE) * 0.1
    A_log = torch.rand(H, device=DEVICE) * 2 - 1
    D = torch.rand(H, device=DEVICE) + 0.5
    dt_bias = torch.rand(H, device=DEVICE) * 3 - 5  # softplus(-5 .. -2): dt of 0.007 .. 0.13
    conv_state = torch.randn(batch, cd, W - 1, device=DEVICE).to(dtype)
    ssm_state = torch.randn(batch, H, P, N, device=DEVICE)
    conv_ref, ssm_ref = conv_state.double(), ssm_state.double()
    tol_y, tol_s = TOL[dtype]
    for t in range(steps):
        # xBC and dt as in the mixer: slices of one projection row [z | xBC | dt | padding]
        proj = torch.randn(batch, dims.width + 3, device=DEVICE).to(dtype)
        xBC, dt = proj[:, dims.d_inner:dims.d_inner + cd], proj[:, dims.d_inner + cd:dims.width]
        y = mamba2_decode_step(xBC, dt, conv_state, w, bias, ssm_state, A_log, D, dt_bias, dims)
        yr = reference(xBC, dt, conv_ref, w, bias, ssm_ref, A_log, D, dt_bias, dims, (0.0, float("inf")))
        assert y.shape == (batch, H * P) and y.dtype == dtype
        err = rel_err(y, yr)
        assert err < tol_y, f"step {t}: output relative error {err:.3g} (limit {tol_y:.3g})"
        err = rel_err(ssm_state, ssm_ref)
        assert err < tol_s, f"step {t}: ssm state relative error {err:.3g} (limit {tol_s:.3g})"
        # the conv state holds the raw inputs: the same values, rounded to its dtype
        assert torch.equal(conv_state, conv_ref.to(dtype)), f"step {t}: conv state differs"


# A state stored in half precision (the bench's --ssm-state weights, mamba_ssm's inference cache):
# the kernel updates it in fp32 and rounds once per step; the float64 reference rounds the same
# update. They may round an entry to neighbouring half values (fp32 against fp64 near a midpoint,
# one ulp: 2^-11 relative in fp16, 2^-8 in bf16), and the next step's output reads that entry.
# Measured over 60 seeds (fp16, interpreter, 3 steps): output up to 2.4e-5, state up to 4.6e-5
# (over their norms). Limits (output, state) about 8x that, far below a half ulp on every entry.
STATE_TOL = {torch.float16: (2e-4, 3e-4), torch.bfloat16: (2e-3, 3e-3)}


@pytest.mark.parametrize("state_dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []))
def test_decode_step_half_precision_state(poison, state_dtype, steps=3, batch=3):
    Hx, Gb, Gc, H, N, P, W = 2, 1, 1, 4, 16, 16, 4
    dims = Dims(H * P, Hx, P, Gb, Gc, N, H)
    cd = dims.conv_dim
    w, bias = torch.randn(cd, 1, W, device=DEVICE) * 0.5, torch.randn(cd, device=DEVICE) * 0.1
    A_log, D = torch.rand(H, device=DEVICE) * 2 - 1, torch.rand(H, device=DEVICE) + 0.5
    dt_bias = torch.rand(H, device=DEVICE) * 3 - 5
    conv_state = torch.randn(batch, cd, W - 1, device=DEVICE)
    ssm_state = torch.randn(batch, H, P, N, device=DEVICE).to(state_dtype)
    conv_ref, ssm_ref = conv_state.double(), ssm_state.double()
    for t in range(steps):
        xBC, dt = torch.randn(batch, cd, device=DEVICE), torch.randn(batch, H, device=DEVICE)
        y = mamba2_decode_step(xBC, dt, conv_state, w, bias, ssm_state, A_log, D, dt_bias, dims)
        yr = reference(xBC, dt, conv_ref, w, bias, ssm_ref, A_log, D, dt_bias, dims, (0.0, float("inf")))
        ssm_ref.copy_(ssm_ref.to(state_dtype))  # the stored state is rounded; y used the unrounded update
        assert ssm_state.dtype == state_dtype
        tol_y, tol_s = STATE_TOL[state_dtype]
        err = rel_err(y, yr)
        assert err < tol_y, f"step {t}: output relative error {err:.3g} (limit {tol_y:.3g})"
        err = rel_err(ssm_state, ssm_ref)
        assert err < tol_s, f"step {t}: ssm state relative error {err:.3g} (limit {tol_s:.3g})"


def test_decode_step_dt_limit_and_no_bias(poison):
    """dt's clamp and a conv without bias, D or dt_bias (optional inputs of the launcher)."""
    dims = Dims(32, 2, 16, 1, 1, 16, 2)
    cd, W, batch = dims.conv_dim, 4, 2
    w = torch.randn(cd, W, device=DEVICE)  # (conv_dim, W): the 2-D weight form
    xBC, dt = torch.randn(batch, cd, device=DEVICE), torch.randn(batch, 2, device=DEVICE) * 3
    conv_state = torch.randn(batch, cd, W - 1, device=DEVICE)
    ssm_state = torch.randn(batch, 2, 16, 16, device=DEVICE)
    A_log = torch.zeros(2, device=DEVICE)
    conv_ref, ssm_ref = conv_state.double(), ssm_state.double()
    limit = (0.05, 0.5)
    y = mamba2_decode_step(xBC, dt, conv_state, w, None, ssm_state, A_log, None, None, dims, limit)
    xa = causal_conv1d_update(xBC.double(), conv_ref, w.double(), None, activation="silu")
    x, B, C = torch.split(xa, [32, 16, 16], dim=-1)
    yr, new = ssd_step(ssm_ref, x.reshape(batch, 2, 16), dt.double(), -torch.ones(2, dtype=torch.float64,
                       device=DEVICE), B.reshape(batch, 1, 16), C.reshape(batch, 1, 16), dt_softplus=True,
                       dt_limit=limit)
    assert rel_err(y, yr.reshape(batch, -1)) < TOL[torch.float32][0]
    assert rel_err(ssm_state, new) < TOL[torch.float32][1]


@pytest.mark.no_triton
def test_decode_step_rejects_bad_shapes():
    dims = Dims(32, 2, 16, 1, 1, 16, 2)
    cd = dims.conv_dim
    ok = dict(xBC=torch.randn(2, cd), dt=torch.randn(2, 2), conv_state=torch.zeros(2, cd, 3),
              conv_weight=torch.randn(cd, 1, 4), conv_bias=None, ssm_state=torch.zeros(2, 2, 16, 16),
              A_log=torch.zeros(2), D=None, dt_bias=None, dims=dims)
    for key, bad, match in [("ssm_state", torch.zeros(2, 2, 16, 16, dtype=torch.float64), "ssm_state"),
                            ("ssm_state", torch.zeros(2, 2, 16, 16)[..., ::2].repeat_interleave(2, -1)
                             .transpose(2, 3), "ssm_state"),
                            ("conv_state", torch.zeros(2, cd, 4), "conv_state"),
                            ("dt", torch.randn(2, 3), "dt"),
                            ("conv_weight", torch.randn(cd, 1, 5), "weight"),
                            ("D", torch.ones(2, 16), "D")]:
        with pytest.raises(ValueError, match=match):
            mamba2_decode_step(**{**ok, key: bad})


@pytest.mark.parametrize("hs", ["gva", "mqa", "mka"])
def test_mixer_triton_step_matches_torch_step(poison, hs, batch=2, steps=4, d_model=32):
    """The mixer's Triton step (after a prefill) against its plain-PyTorch step in float64."""
    kw = dict(d_state=16, headdim=16, ngroups=2, head_structure=hs, chunk_size=16)
    mixer = Mamba2Mixer(d_model, impl="triton", **kw).to(DEVICE)
    mixer.init_special()
    ref = Mamba2Mixer(d_model, impl="torch", **kw).to(DEVICE).double()
    ref.load_state_dict(mixer.state_dict())
    check_mixer_steps(mixer, ref, d_model, batch, steps)
