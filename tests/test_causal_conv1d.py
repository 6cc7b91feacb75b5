"""Causal depthwise conv1d: Triton kernels (impl="triton") vs. the float64 PyTorch reference,
forward and gradients of x, weight and bias; decoding update; input checking."""

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, ON_GPU, poison_fixture, random_seq_idx, rel_err
from ssdbench.kernels import causal_conv1d as cc
from ssdbench.kernels.causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update

# Interpreter tiles: forward 32 steps, backward 2 x 16; lengths cross and miss those boundaries.
L_TEST = 300 if ON_GPU else 45
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


# Every test launches a Triton kernel (conftest fails one that does not) unless marked no_triton.
pytestmark = [pytest.mark.usefixtures("random_seed"), pytest.mark.triton]


poison = poison_fixture(cc, "empty_like")  # launcher outputs start as NaN


def check(batch, dim, L, W, activation, use_seq, has_bias=True, dtype=torch.float32, channel_last=False):
    if channel_last:
        x = torch.randn(batch, L, dim, device=DEVICE).to(dtype).transpose(1, 2)  # (batch, D, L) view
    else:
        x = torch.randn(batch, dim, L, device=DEVICE).to(dtype)  # (batch, D, L)
    w = torch.randn(dim, W, device=DEVICE) / W  # (D, W)
    bias = torch.randn(dim, device=DEVICE) if has_bias else None  # (D,)
    seq = random_seq_idx(batch, L) if use_seq else None  # (batch, L)
    ins = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, bias)]
    if channel_last:
        ins[0] = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    refs = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, bias)]
    y = causal_conv1d(*ins, activation=activation, seq_idx=seq, impl="triton")
    yr = causal_conv1d_ref(*refs, activation=activation, seq_idx=seq)
    assert y.dtype == dtype and y.shape == x.shape
    if channel_last:
        assert y.stride() == ins[0].stride()  # output keeps the channel-last layout, no copy
    tol = TOL[dtype]
    assert rel_err(y.detach(), yr.detach()) < tol
    gy = torch.randn_like(yr)
    live = [i for i in range(3) if ins[i] is not None]
    g = torch.autograd.grad((y.double() * gy).sum(), [ins[i] for i in live])
    gr = torch.autograd.grad((yr * gy).sum(), [refs[i] for i in live])
    for i, a, r in zip(live, g, gr):
        assert a.shape == ins[i].shape and a.dtype == ins[i].dtype
        assert rel_err(a, r) < tol * 2, ("x", "weight", "bias")[i]


@pytest.mark.parametrize("use_seq", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("W", [2, 3, 4])
def test_conv_forward_backward(W, activation, use_seq, poison):
    check(2, 64 if ON_GPU else 20, L_TEST, W, activation, use_seq)


@pytest.mark.parametrize("use_seq", [False, True])
def test_conv_channel_last_no_bias(use_seq, poison):
    check(2, 24, L_TEST, 4, "silu", use_seq, has_bias=False, channel_last=True)


def test_conv_short_sequence(poison):
    check(1, 5, 2, 4, "silu", False)  # L < W - 1: every output sees the zero padding


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv_half(dtype, poison):
    check(2, 128 if ON_GPU else 16, L_TEST, 4, "silu", True, dtype=dtype)


@pytest.mark.skipif(not ON_GPU, reason="realistic sizes only on the GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_realistic_gpu(dtype):
    check(4, 1536, 2048, 4, "silu", True, dtype=dtype, channel_last=True)


@pytest.mark.no_triton
def test_reference_matches_conv1d_module():
    # The reference is nn.Conv1d(groups=D, padding=W-1) truncated to the first L outputs.
    dim, W, L = 6, 4, 11
    conv = torch.nn.Conv1d(dim, dim, W, groups=dim, padding=W - 1).to(DEVICE)
    x = torch.randn(2, dim, L, device=DEVICE)
    ref = F.silu(conv(x)[..., :L])
    out = causal_conv1d_ref(x, conv.weight, conv.bias, "silu")  # accepts the (D, 1, W) weight too
    assert rel_err(out.detach(), ref.detach()) < 1e-6


def test_seq_idx_equals_separate_sequences():
    dim, W, L1, L2 = 8, 4, 7, 13
    x = torch.randn(1, dim, L1 + L2, device=DEVICE)
    w, b = torch.randn(dim, W, device=DEVICE), torch.randn(dim, device=DEVICE)
    seq = torch.tensor([[0] * L1 + [1] * L2], dtype=torch.int32, device=DEVICE)
    for impl in ("torch", "triton"):
        y = causal_conv1d(x, w, b, "silu", seq, impl=impl)
        parts = torch.cat([causal_conv1d_ref(x[..., :L1], w, b, "silu"),
                           causal_conv1d_ref(x[..., L1:], w, b, "silu")], -1)
        assert rel_err(y, parts) < 1e-5, impl


@pytest.mark.parametrize("impl,pad", [pytest.param("torch", 0, marks=pytest.mark.no_triton),
                                      ("triton", 0), ("triton", 1)])
@pytest.mark.parametrize("use_seq", [False, True])
def test_channel_last_entry(impl, pad, use_seq, poison):
    # channel_last=True takes and returns (batch, L, D): a slice of a wider projection output,
    # as the models pass it; same values and gradients as the (batch, D, L) call, and the
    # gradient of the slice comes back as a contiguous (batch, L, D) tensor (the layout a
    # compiled graph expects, so it adds no copy)
    batch, dim, W = 2, 24, 4
    L = L_TEST
    # row stride 3D = 72 (the kernels are told it is a multiple of 8) or 73 (odd: no factor)
    proj = torch.randn(batch, L, 3 * dim + pad, device=DEVICE, requires_grad=True)  # (batch, L, 3D + pad)
    w, b = torch.randn(dim, W, device=DEVICE) / W, torch.randn(dim, device=DEVICE)
    seq = random_seq_idx(batch, L) if use_seq else None
    x = proj[..., dim:2 * dim]  # (batch, L, D), rows of stride 3D
    y = causal_conv1d(x, w, b, "silu", seq, impl=impl, channel_last=True)  # (batch, L, D)
    assert y.shape == (batch, L, dim)
    if impl == "triton":  # the kernel writes the channel-last layout it was given (F.conv1d does not)
        assert y.is_contiguous()
    xr = proj.detach().double()[..., dim:2 * dim].transpose(1, 2).requires_grad_(True)  # (batch, D, L)
    yr = causal_conv1d_ref(xr, w.double(), b.double(), "silu", seq)  # (batch, D, L)
    assert rel_err(y.detach().transpose(1, 2), yr.detach()) < 1e-5
    gy = torch.randn(batch, L, dim, device=DEVICE, dtype=torch.float64)  # (batch, L, D)
    (gx,) = torch.autograd.grad((y.double() * gy).sum(), [x])
    (gxr,) = torch.autograd.grad((yr * gy.transpose(1, 2)).sum(), [xr])
    assert rel_err(gx.transpose(1, 2), gxr) < 1e-5
    if impl == "triton":
        assert gx.is_contiguous()
    with pytest.raises(ValueError, match="x: expected"):
        causal_conv1d(x[0], w, b, channel_last=True, impl=impl)


@pytest.mark.no_triton
@pytest.mark.parametrize("state_width", ["W-1", "W"])
@pytest.mark.parametrize("W", [2, 4])
def test_update_matches_full_conv(W, state_width):
    batch, dim, L = 2, 5, 9
    x = torch.randn(batch, dim, L, dtype=torch.float64, device=DEVICE)
    w = torch.randn(dim, W, dtype=torch.float64, device=DEVICE)
    b = torch.randn(dim, dtype=torch.float64, device=DEVICE)
    ref = causal_conv1d_ref(x, w, b, "silu")
    width = W - 1 if state_width == "W-1" else W
    state = torch.zeros(batch, dim, width, dtype=torch.float64, device=DEVICE)
    for t in range(L):
        y_t = causal_conv1d_update(x[..., t], state, w, b, "silu")
        assert rel_err(y_t, ref[..., t]) < 1e-12
    # The state now holds the most recent inputs, oldest first.
    assert torch.equal(state, x[..., L - width:])


@pytest.mark.no_triton
def test_auto_dispatch_on_cpu_is_torch():
    if ON_GPU:
        pytest.skip("auto picks AUTO_IMPL on CUDA")
    x, w = torch.randn(1, 3, 8), torch.randn(3, 3)
    assert torch.equal(causal_conv1d(x, w, impl="auto"), causal_conv1d_ref(x, w))


@pytest.mark.no_triton
@pytest.mark.parametrize("fn", [causal_conv1d, causal_conv1d_ref])
def test_bad_inputs(fn):
    x, w = torch.randn(2, 4, 8, device=DEVICE), torch.randn(4, 3, device=DEVICE)
    cases = [
        (dict(x=x[0], weight=w), "x"),
        (dict(x=x.int(), weight=w), "x"),
        (dict(x=x, weight=torch.randn(4, 5, device=DEVICE)), "weight"),
        (dict(x=x, weight=torch.randn(4, 1, device=DEVICE)), "weight"),
        (dict(x=x, weight=torch.randn(3, 3, device=DEVICE)), "weight"),
        (dict(x=x, weight=w, bias=torch.randn(5, device=DEVICE)), "bias"),
        (dict(x=x, weight=w, activation="relu"), "activation"),
        (dict(x=x, weight=w, seq_idx=torch.zeros(2, 8, device=DEVICE)), "seq_idx"),
        (dict(x=x, weight=w, seq_idx=torch.zeros(2, 7, dtype=torch.int32, device=DEVICE)), "seq_idx"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            fn(**kwargs)
    if fn is causal_conv1d:
        with pytest.raises(ValueError, match="^impl:"):
            fn(x, w, impl="cuda")


@pytest.mark.no_triton
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_decreasing_seq_idx_is_rejected(impl):
    """seq_idx must be non-decreasing along each row: checked on the host before any launch."""
    x, w = torch.randn(2, 4, 6), torch.randn(4, 3)
    seq = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 0, 1, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^seq_idx: must be non-decreasing"):
        causal_conv1d(x, w, seq_idx=seq, impl=impl)


@pytest.mark.no_triton
@pytest.mark.parametrize("bad", ["x", "weight", "conv_state"])
def test_update_rejects_wrong_shapes(bad):
    args = dict(x=torch.randn(2, 4), conv_state=torch.zeros(2, 4, 2), weight=torch.randn(4, 3))
    args[bad] = {"x": torch.randn(2, 4, 1), "weight": torch.randn(5, 3),
                 "conv_state": torch.zeros(2, 4, 5)}[bad]
    with pytest.raises(ValueError, match=rf"^{bad}:"):
        causal_conv1d_update(**args)
