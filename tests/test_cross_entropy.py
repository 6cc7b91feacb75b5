"""Fused head + cross-entropy (kernels/cross_entropy.py) against float64 PyTorch: the loss and
the gradients of x and weight; the kernel's in-place gradient buffer (every element written,
padding and ignored rows exactly 0); the custom operator's contract under torch.compile; the
language model's use of it; fallbacks and input checking."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DEVICE, ON_GPU, poison_fixture, rel_err
from ssdbench.kernels import cross_entropy as ce
from ssdbench.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from ssdbench.models.lm import LanguageModel

# Interpreter blocks are 32 columns: every V below spans several blocks and most end inside one.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}

# Every test launches a Triton kernel (conftest fails one that does not) unless marked no_triton.
pytestmark = [pytest.mark.usefixtures("random_seed"), pytest.mark.triton]


poison = poison_fixture(ce)  # launcher outputs start as NaN


def make_inputs(M, d, V, V_pad, dtype=torch.float32, ignored=0.0, ignore_index=-100, sliced=False,
                label_dtype=torch.int64):
    """x (M, d) (a column slice of an (M, 3d) tensor when sliced), weight (V_pad, d), labels (M,)
    in [0, V) with about a fraction ``ignored`` set to ignore_index. Logits of std about 3."""
    if sliced:
        x = torch.randn(M, 3 * d, device=DEVICE).to(dtype)[:, d:2 * d]  # (M, d), row stride 3d
        assert not x.is_contiguous()
    else:
        x = torch.randn(M, d, device=DEVICE).to(dtype)  # (M, d)
    weight = (3 * torch.randn(V_pad, d, device=DEVICE) / d ** 0.5).to(dtype)  # (V_pad, d)
    labels = torch.randint(0, V, (M,), device=DEVICE)  # (M,)
    labels[torch.rand(M, device=DEVICE) < ignored] = ignore_index
    if ignored:
        labels[0] = ignore_index  # at least one ignored row, whatever the draw
    return x, weight, labels.to(label_dtype)


def reference(x, weight, labels, V, ignore_index):
    """Loss and gradients of x and weight in float64 from the same (rounded) inputs."""
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, weight))
    loss = F.cross_entropy((x64 @ w64.T)[:, :V], labels.long(), ignore_index=ignore_index)
    return (loss, *torch.autograd.grad(loss, [x64, w64]))


def check(M, d, V, V_pad, dtype=torch.float32, ignored=0.0, ignore_index=-100, sliced=False,
          label_dtype=torch.int64):
    x, weight, labels = make_inputs(M, d, V, V_pad, dtype, ignored, ignore_index, sliced, label_dtype)
    ins = [t.detach().requires_grad_(True) for t in (x, weight)]  # detach keeps x's strides
    loss = linear_cross_entropy(*ins, labels, V, ignore_index)
    assert loss.shape == () and loss.dtype == torch.float32
    g = 0.5 + torch.rand((), device=DEVICE)  # upstream gradient other than 1: must scale dx, dweight
    dx, dw = torch.autograd.grad(loss * g, ins)
    ref_loss, ref_dx, ref_dw = reference(x, weight, labels, V, ignore_index)
    tol = TOL[dtype]
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    assert dx.dtype == dtype and dw.dtype == dtype and dx.shape == x.shape and dw.shape == weight.shape
    assert rel_err(dx, g.double() * ref_dx) < tol
    assert rel_err(dw, g.double() * ref_dw) < tol
    assert torch.equal(dw[V:], torch.zeros_like(dw[V:]))  # padding classes learn nothing
    ign = labels == ignore_index
    if ign.any():  # an ignored token's x gets no gradient at all
        assert torch.equal(dx[ign], torch.zeros_like(dx[ign]))


@pytest.mark.parametrize("M,d,V,V_pad", [
    (1, 8, 100, 100),  # one row, V not a multiple of the block, no padding
    (13, 16, 97, 112),  # Mamba-2's padding to a multiple of 16: a block of real and padding columns
    (40, 24, 150, 200),  # whole blocks of padding past V
    (64, 8, 32, 33),  # V a block exactly, then one padding column
])
def test_forward_backward(M, d, V, V_pad, poison):
    check(M, d, V, V_pad)


@pytest.mark.parametrize("ignore_index", [-100, -1, 0, 96])
def test_ignored_labels(ignore_index, poison):
    # custom ignore values, including ones inside [0, V): those tokens are not counted either
    check(24, 16, 97, 112, ignored=0.3, ignore_index=ignore_index)


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
def test_sliced_x(label_dtype, poison):
    check(20, 16, 70, 80, sliced=True, ignored=0.2, label_dtype=label_dtype)


@pytest.mark.skipif(not ON_GPU, reason="half-precision matmuls only on the GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half(dtype):
    check(64, 64, 300, 320, dtype=dtype, ignored=0.2, sliced=True)
    check(33, 32, 97, 112, dtype=dtype)


@pytest.mark.skipif(not ON_GPU, reason="realistic sizes only on the GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_realistic_gpu(dtype):
    check(512, 256, 50280, 50304, dtype=dtype, ignored=0.05)  # GPT-NeoX vocabulary, padded to 16


def test_all_ignored():
    # nothing counts: the loss is nan like F.cross_entropy's (0 / 0), the gradients are zero
    x, weight, labels = make_inputs(6, 8, 50, 64)
    labels.fill_(-100)
    ins = [t.detach().requires_grad_(True) for t in (x, weight)]
    loss = linear_cross_entropy(*ins, labels, 50)
    assert torch.isnan(loss) and torch.isnan(linear_cross_entropy_ref(x, weight, labels, 50))
    for grad in torch.autograd.grad(loss, ins):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_kernel_writes_every_element(poison):
    """The op on a buffer whose padding columns and ignored rows hold NaN: it must overwrite all
    of it, with exactly 0 there and (softmax - onehot) / counted elsewhere, and return each
    row's loss (0 for ignored rows)."""
    M, V, V_pad = 12, 70, 96
    logits = 3 * torch.randn(M, V_pad, device=DEVICE)  # (M, V_pad)
    labels = torch.randint(0, V, (M,), device=DEVICE)
    labels[[1, 4, 5]] = -100
    ref_logits = logits[:, :V].double()  # (M, V), before the kernel overwrites it
    ign = labels == -100
    logits[:, V:] = float("nan")
    logits[ign] = float("nan")
    scale = torch.full((1,), 1.0 / int((~ign).sum()), device=DEVICE)
    rows = ce._launch(logits, labels, scale, V, -100)  # (M,)

    ref_rows = F.cross_entropy(ref_logits, labels, ignore_index=-100, reduction="none")  # (M,)
    assert rel_err(rows, ref_rows) < 1e-5 and torch.equal(rows[ign], torch.zeros_like(rows[ign]))
    onehot = F.one_hot(labels.clamp_min(0), V).double()  # (M, V)
    ref_grad = (ref_logits.softmax(-1) - onehot) * scale.double()  # (M, V)
    ref_grad[ign] = 0.0
    assert rel_err(logits[:, :V], ref_grad) < 1e-5
    assert torch.equal(logits[:, V:], torch.zeros_like(logits[:, V:]))
    assert torch.equal(logits[ign], torch.zeros_like(logits[ign]))


def test_custom_op_contract():
    """The head's matmul and the kernel are one custom operator returning the per-row losses and
    the logits' gradient: its fake function and schema must agree with the real one
    (torch.library.opcheck), and torch.compile traces the
    autograd.Function around it without a graph break, giving the eager loss and gradients."""
    V, V_pad = 50, 64
    x, weight, labels = make_inputs(10, 8, V, V_pad, ignored=0.3)
    labels[0] = 3  # at least one counted label
    scale = torch.full((1,), 0.25, device=DEVICE)
    torch.library.opcheck(ce._head_op, (x, weight, labels, scale, V, -100))

    ins = [t.detach().requires_grad_(True) for t in (x, weight)]
    ins_c = [t.detach().requires_grad_(True) for t in (x, weight)]
    fn = torch.compile(lambda a, b, c: linear_cross_entropy(a, b, c, V), backend="aot_eager", fullgraph=True)
    loss, loss_c = linear_cross_entropy(*ins, labels, V), fn(*ins_c, labels)
    assert torch.allclose(loss, loss_c, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(3 * loss, ins), torch.autograd.grad(3 * loss_c, ins_c)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


class _Mix(nn.Module):
    """A stand-in mixer: the head is what is tested."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x, seq_idx=None):
        return self.proj(x)


@pytest.mark.parametrize("autocast", [False, True])
def test_model_head(autocast, monkeypatch):
    """LanguageModel's fused head (forced on under the interpreter) gives the PyTorch path's loss
    and gradients, in fp32 and under bf16 autocast, and its frame compiles without a break."""
    V = 97
    model = LanguageModel(V, 32, 1, lambda i: _Mix(32), lambda i: None, pad_vocab_multiple=16).to(DEVICE)
    assert model.padded_vocab == 112
    ids = torch.randint(0, V, (2, 9), device=DEVICE)
    labels = torch.randint(0, V, (2, 9), device=DEVICE)
    labels[0, :3] = -100
    dev = "cuda" if ON_GPU else "cpu"

    def loss_and_grads(fn, params):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            loss = fn(ids, labels=labels)
        return loss, torch.autograd.grad(loss, params)

    params = [model.embedding.weight, model.norm_f.weight, model.layers[0].mixer.proj.weight]
    monkeypatch.setattr(ce, "model_head_applies", lambda x: False)
    ref, ref_grads = loss_and_grads(model, params)
    calls, op = [], ce._head_op
    monkeypatch.setattr(ce, "model_head_applies", lambda x: True)
    monkeypatch.setattr(ce, "_head_op", lambda *a: calls.append(a[0].dtype) or op(*a))
    loss, grads = loss_and_grads(model, params)
    assert calls == [torch.bfloat16 if autocast else torch.float32]  # the fused path ran, in autocast's dtype
    tol = 2e-2 if autocast else 1e-5
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) <= tol * ref.item()
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and rel_err(g, r) < tol

    # Dynamo compiles _head as a frame of its own (LanguageModel._head): no graph break in it
    monkeypatch.setattr(ce, "_head_op", op)
    head = torch.compile(model._head, backend="aot_eager", fullgraph=True)
    params = params[:2]  # (the stand-in mixer is not on this path)
    compiled, compiled_grads = loss_and_grads(lambda i, labels: head(model.embedding(i), None, labels, -100), params)
    eager, eager_grads = loss_and_grads(lambda i, labels: model._head(model.embedding(i), None, labels, -100), params)
    assert torch.allclose(compiled, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.no_triton
def test_fallbacks(monkeypatch):
    x, weight, labels = make_inputs(5, 8, 40, 48, ignored=0.3)
    labels[0] = 1

    def no_kernel(*a):
        raise AssertionError("the Triton path ran")

    monkeypatch.setattr(ce, "_head_op", no_kernel)
    x64, w64 = x.double(), weight.double()
    assert torch.equal(linear_cross_entropy(x64, w64, labels, 40), linear_cross_entropy_ref(x64, w64, labels, 40))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter
    xc, wc, lc = x.cpu(), weight.cpu(), labels.cpu().int()  # (int32 labels: the reference takes them too)
    assert torch.equal(linear_cross_entropy(xc, wc, lc, 40), linear_cross_entropy_ref(xc, wc, lc.long(), 40))
    assert not ce.model_head_applies(xc)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not ce.model_head_applies(xc)  # the interpreter must not slow CPU training down


@pytest.mark.no_triton
@pytest.mark.parametrize("fn", [linear_cross_entropy, linear_cross_entropy_ref])
def test_bad_inputs(fn):
    x, w, labels = make_inputs(4, 8, 10, 16)
    cases = [
        (dict(x=x.int(), weight=w, labels=labels, vocab_size=10), "x"),
        (dict(x=x[None], weight=w, labels=labels, vocab_size=10), "x"),
        (dict(x=x, weight=w.double(), labels=labels, vocab_size=10), "weight"),
        (dict(x=x, weight=w[:, :4], labels=labels, vocab_size=10), "weight"),
        (dict(x=x, weight=w, labels=labels.float(), vocab_size=10), "labels"),
        (dict(x=x, weight=w, labels=labels[:3], vocab_size=10), "labels"),
        (dict(x=x, weight=w, labels=labels, vocab_size=17), "vocab_size"),
        (dict(x=x, weight=w, labels=labels, vocab_size=0), "vocab_size"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            fn(**kwargs)


@pytest.mark.parametrize("bad", [-1, 40, 47, 10_000])
def test_label_out_of_range_gives_nan(bad):
    """A label that is neither ignore_index nor a class (below 0, in the padding, past the
    row) makes the loss NaN instead of reading another row's memory or giving a finite loss."""
    x, weight, labels = make_inputs(6, 8, 40, 48)
    labels[2] = bad
    assert torch.isnan(linear_cross_entropy(x, weight, labels, 40))
    labels[2] = 5
    assert torch.isfinite(linear_cross_entropy(x, weight, labels, 40))
