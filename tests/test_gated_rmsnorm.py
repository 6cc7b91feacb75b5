"""Fused gated RMSNorm: Triton kernels vs. the float64 PyTorch reference, forward and gradients
of x, z and weight; the model layer it replaces; fallbacks; input checking."""

import pytest
import torch

from conftest import DEVICE, ON_GPU, poison_fixture, rel_err
from ssdbench.kernels import gated_rmsnorm as gr
from ssdbench.kernels.gated_rmsnorm import gated_rms_norm, gated_rms_norm_ref
from ssdbench.models.layers import GatedRMSNorm

# Interpreter tiles are 2 rows and the backward runs at most 3 programs looping over tiles:
# odd row counts leave a half tile, and 10 rows give a program a tile past the end.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


# Every test launches a Triton kernel (conftest fails one that does not) unless marked no_triton.
pytestmark = [pytest.mark.usefixtures("random_seed"), pytest.mark.triton]


poison = poison_fixture(gr)  # launcher outputs start as NaN


def check(lead, d, g, dtype=torch.float32, sliced=False, z_dtype=None, pad=0):
    """x, z (*lead, d) in dtype (z in z_dtype if given); sliced: both are column slices of one
    wider (*lead, 3d + pad) tensor, rows of stride 3d + pad."""
    z_dtype = z_dtype or dtype
    if sliced:
        wide = torch.randn(*lead, 3 * d + pad, device=DEVICE).to(dtype)  # (*lead, 3d + pad)
        x, z = wide[..., d:2 * d], wide[..., 2 * d:3 * d].to(z_dtype)  # (*lead, d), row stride 3d + pad
        assert x.stride(-2) == 3 * d + pad
    else:
        x = torch.randn(*lead, d, device=DEVICE).to(dtype)  # (*lead, d)
        z = torch.randn(*lead, d, device=DEVICE).to(z_dtype)
    w = 1 + 0.5 * torch.randn(d, device=DEVICE)  # (d,) fp32
    ins = [t.detach().requires_grad_(True) for t in (x, z, w)]  # detach keeps the strides
    refs = [t.detach().double().requires_grad_(True) for t in (x, z, w)]
    y = gated_rms_norm(*ins, eps=1e-5, group_size=g)
    yr = gated_rms_norm_ref(*refs, eps=1e-5, group_size=g)
    assert y.dtype == dtype and y.shape == x.shape
    tol = TOL[dtype]
    assert rel_err(y.detach(), yr.detach()) < tol
    gy = torch.randn_like(yr)
    grads = torch.autograd.grad((y.double() * gy).sum(), ins)
    grads_ref = torch.autograd.grad((yr * gy).sum(), refs)
    for name, t, a, r in zip(("x", "z", "weight"), ins, grads, grads_ref):
        assert a.shape == t.shape and a.dtype == t.dtype, name
        assert rel_err(a, r) < 2 * tol, name


@pytest.mark.parametrize("lead,d,g", [
    ((7,), 48, None),  # d not a power of two, odd row count
    ((2, 5), 200, None),  # leading (batch, L), L odd
    ((3, 3), 96, 32),  # 3 groups: the group axis is masked too
    ((2, 5), 200, 40),  # groups of a width that is not a power of two
])
def test_forward_backward(lead, d, g, poison):
    check(lead, d, g)


@pytest.mark.parametrize("g", [None, 16])
@pytest.mark.parametrize("pad", [0, 1])
def test_sliced_rows(g, pad, poison):
    # row stride 192 (a multiple of 16) or 193 (odd: the kernels get no stride factor)
    check((2, 5), 64, g, sliced=True, pad=pad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half(dtype, poison):
    # under the interpreter fp32 -> bf16 stores truncate instead of rounding: within tolerance
    check((3, 5), 96, 32, dtype=dtype, sliced=True)
    check((7,), 48, None, dtype=dtype)


def test_mixed_gate_dtype(poison):
    check((5,), 48, None, dtype=torch.bfloat16, z_dtype=torch.float32)  # dz comes back in fp32


@pytest.mark.skipif(not ON_GPU, reason="realistic sizes only on the GPU")
@pytest.mark.parametrize("g", [None, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_realistic_gpu(dtype, g):
    check((2, 2048), 1536, g, dtype=dtype, sliced=True)  # 4096 rows of Mamba-2's d_inner


def test_model_layer_wiring():
    # the model's layer passes its weight, eps and group size through: against float64
    d, g = 96, 32
    layer = GatedRMSNorm(d, eps=1e-3, group_size=g).to(DEVICE)
    with torch.no_grad():
        layer.weight.normal_()
    x, z = torch.randn(2, 3, d, device=DEVICE), torch.randn(2, 3, d, device=DEVICE)
    ref = gated_rms_norm_ref(x.double(), z.double(), layer.weight.double(), 1e-3, g)
    assert rel_err(layer(x, z).detach(), ref) < 1e-5


@pytest.mark.no_triton
def test_no_rows():
    x = torch.randn(0, 48, device=DEVICE, requires_grad=True)
    z = torch.randn(0, 48, device=DEVICE, requires_grad=True)
    w = torch.randn(48, device=DEVICE, requires_grad=True)
    y = gated_rms_norm(x, z, w)
    assert y.shape == (0, 48)
    gx, gz, gw = torch.autograd.grad(y.sum(), [x, z, w])
    assert gx.shape == (0, 48) and gz.shape == (0, 48) and torch.equal(gw, torch.zeros_like(w))


@pytest.mark.no_triton
def test_fallbacks(monkeypatch):
    x, z = torch.randn(2, 3, 40, dtype=torch.float64, device=DEVICE)
    w = torch.randn(40, dtype=torch.float64, device=DEVICE)

    def no_kernel(*a):
        raise AssertionError("the Triton path ran")

    monkeypatch.setattr(gr, "_fwd", no_kernel)
    assert torch.equal(gated_rms_norm(x, z, w, 1e-5, 8), gated_rms_norm_ref(x, z, w, 1e-5, 8))  # float64
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter
    xc, zc, wc = x.float().cpu(), z.float().cpu(), w.float().cpu()
    assert torch.equal(gated_rms_norm(xc, zc, wc), gated_rms_norm_ref(xc, zc, wc))


@pytest.mark.no_triton
@pytest.mark.parametrize("fn", [gated_rms_norm, gated_rms_norm_ref])
def test_bad_inputs(fn):
    x, z, w = torch.randn(2, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE), torch.ones(8, device=DEVICE)
    cases = [
        (dict(x=x.int(), z=z, weight=w), "x"),
        (dict(x=x, z=z[:, :4], weight=w), "z"),
        (dict(x=x, z=z.int(), weight=w), "z"),
        (dict(x=x, z=z, weight=torch.ones(4, device=DEVICE)), "weight"),
        (dict(x=x, z=z, weight=w.int()), "weight"),
        (dict(x=x, z=z, weight=w, group_size=3), "group_size"),
        (dict(x=x, z=z, weight=w, group_size=0), "group_size"),
        (dict(x=x, z=z, weight=w, eps=-1.0), "eps"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            fn(**kwargs)


def test_custom_op_contract():
    """The kernels are custom operators: their fake (shape) functions and autograd
    registration must agree with the real ones (torch.library.opcheck), and torch.compile
    traces them without a graph break, giving the eager values and gradients."""
    wide = torch.randn(6, 3 * 40, device=DEVICE)  # rows of stride 120, as the model slices them
    x, z = wide[:, :40], wide[:, 80:]
    w = torch.randn(40, device=DEVICE)
    torch.library.opcheck(gr._fwd_op, (x.detach().requires_grad_(True), z, w, 1e-5, 20))
    torch.library.opcheck(gr._bwd_op, (x, z, w, torch.rand(6, 2, device=DEVICE), torch.randn(6, 40, device=DEVICE), 20))

    ins = [t.detach().requires_grad_(True) for t in (x, z, w)]
    ins_c = [t.detach().requires_grad_(True) for t in (x, z, w)]
    fn = torch.compile(lambda a, b, c: gated_rms_norm(a, b, c, 1e-5, 20), backend="aot_eager", fullgraph=True)
    y, yc = gated_rms_norm(*ins, 1e-5, 20), fn(*ins_c)
    gy = torch.randn_like(y)
    assert torch.allclose(y, yc, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad((y * gy).sum(), ins), torch.autograd.grad((yc * gy).sum(), ins_c)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


# ---- the plain RMSNorm of the decode step (rms_norm_rows, forward only) ------------------------
# Limits from the interpreter (fp32 up to 7.1e-8 here; fp16 the output's rounding, up to
# 2.3e-4) and bf16 8x fp16's.
ROWS_TOL = {torch.float32: 5e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else []))
@pytest.mark.parametrize("d", [64, 100, 768])
def test_rms_norm_rows_matches_the_layer(poison, dtype, d, rows=5):
    """Against models.layers.RMSNorm's forward in float64, rows strided (a slice of a wider row)."""
    from ssdbench.models.layers import RMSNorm
    from ssdbench.kernels.gated_rmsnorm import rms_norm_rows

    layer = RMSNorm(d).to(DEVICE)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    x = (3 * torch.randn(rows, 2 * d + 3, device=DEVICE)).to(dtype)[:, d:2 * d]  # (rows, d), row stride 2d + 3
    y = rms_norm_rows(x, layer.weight, layer.eps)
    ref = layer.double()(x.double())
    assert y.dtype == dtype and y.shape == x.shape
    err = rel_err(y, ref)
    assert err < ROWS_TOL[dtype], f"relative error {err:.3g} (limit {ROWS_TOL[dtype]:.3g})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else []))
@pytest.mark.parametrize("d", [64, 100])
def test_rms_norm_rows_with_residual(poison, dtype, d, rows=5):
    """The decode step's residual add folded into the norm: the sum equals PyTorch's x + r bit
    for bit (one rounding to the dtype), and the norm is the layer's norm of that sum."""
    from ssdbench.models.layers import RMSNorm
    from ssdbench.kernels.gated_rmsnorm import rms_norm_rows

    layer = RMSNorm(d).to(DEVICE)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    x = (3 * torch.randn(rows, 2 * d, device=DEVICE)).to(dtype)[:, :d]  # (rows, d), strided rows
    r = torch.randn(rows, d, device=DEVICE).to(dtype)  # (rows, d)
    y, total = rms_norm_rows(x, layer.weight, layer.eps, residual=r)
    assert torch.equal(total, x + r), "the sum is not PyTorch's x + r"
    err = rel_err(y, layer.double()((x + r).double()))
    assert err < ROWS_TOL[dtype], f"relative error {err:.3g} (limit {ROWS_TOL[dtype]:.3g})"
    layer = layer.float().cpu()  # the layer's step off the GPU (PyTorch): the same pair
    y2, total2 = layer.step(x.cpu(), r.cpu())
    assert torch.equal(total2, (x + r).cpu())
    assert rel_err(y2, y.cpu()) < ROWS_TOL[dtype]


@pytest.mark.no_triton
def test_rms_norm_rows_rejects_bad_shapes():
    from ssdbench.kernels.gated_rmsnorm import rms_norm_rows

    with pytest.raises(ValueError, match="rows"):
        rms_norm_rows(torch.randn(2, 3, 8), torch.ones(8))
    with pytest.raises(ValueError, match="weight"):
        rms_norm_rows(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(ValueError, match="residual"):
        rms_norm_rows(torch.randn(2, 8), torch.ones(8), residual=torch.randn(2, 8, dtype=torch.float64))
