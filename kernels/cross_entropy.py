"""Fused language-model head and cross-entropy: the loss and the logits' gradient in one kernel.

``linear_cross_entropy(x, weight, labels, vocab_size)`` is ``F.cross_entropy(x @ weight.T,
labels)`` (mean over the labels that are not ``ignore_index``) where ``weight`` may have padded
rows past ``vocab_size`` that never count. Its forward computes the logits with one matmul and
then runs one Triton program per row of logits which

  1. walks the row in blocks of BLOCK_V keeping a running max and sum of exponentials (fp32),
     giving the row's logsumexp and its loss ``logsumexp - logit[label]``, and
  2. walks the row again and overwrites it, in place, with ``(softmax - onehot(label)) * scale``,
     the gradient of the mean loss, where ``scale = 1 / (number of counted labels)``.

Each row is read from DRAM once (the second walk over the same ~100 KB row mostly hits L2) and
the gradient needs no buffer of its own, against a forward reduction plus a backward kernel that
reads the logits again and writes a gradient the size of the logits (inductor's fusion of the
PyTorch form). The backward is then two matmuls; the upstream gradient (a scalar) multiplies
their small (M, d) and (V_pad, d) results, never the (M, V_pad) buffer.

``scale`` is a device tensor (no host synchronisation: a training step may run as a CUDA graph).
Labels must be ``ignore_index`` or lie in [0, vocab_size); any other makes the loss NaN (checked
in the kernel, so no host synchronisation; never read past the row). Rows whose
label is ``ignore_index`` get loss 0 and a zero gradient, and so do the padding columns of
every row. CPU tensors (unless TRITON_INTERPRET=1) and float64 go to ``linear_cross_entropy_ref``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

from .triton_util import interpreting, pow2_factor

_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): e^x = 2^(x log2(e)), and exp2 is one instruction
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2): ln(y) = log2(y) ln(2)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _cross_entropy_fwd_bwd_kernel(logits_ptr, labels_ptr, scale_ptr, loss_ptr, s_row, s_label,
                                  n_classes, n_cols, ignore_index,
                                  BLOCK_V: tl.constexpr, RV: tl.constexpr):
    # the row stride and the widths come divided by RV (pow2_factor): multiplying back lets the
    # compiler see that rows start aligned and that the column masks change only every RV columns
    s_row, n_classes, n_cols = s_row * RV, n_classes * RV, n_cols * RV
    row = tl.program_id(0).to(tl.int64)  # int64: row * s_row may pass 2^31
    row_ptr = logits_ptr + row * s_row
    offs = tl.arange(0, BLOCK_V)  # (BLOCK_V,)
    label = tl.load(labels_ptr + row * s_label)  # int32 or int64
    if label == ignore_index:
        # no loss and no gradient: zero the whole row (padding included) without reading it
        zeros = tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty)  # (BLOCK_V,)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs  # (BLOCK_V,)
            tl.store(row_ptr + cols, zeros, mask=cols < n_cols)
        tl.store(loss_ptr + row, 0.0)
    else:
        # pass 1 over the real classes: running max m and sum s of 2^((x - m) log2 e), both in
        # fp32; rescaling s when the max grows keeps every exponent <= 0 (no overflow)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], dtype=tl.float32)
        for start in range(0, n_classes, BLOCK_V):
            cols = start + offs  # (BLOCK_V,)
            x = tl.load(row_ptr + cols, mask=cols < n_classes, other=float("-inf")).to(tl.float32)  # (BLOCK_V,)
            m_new = tl.maximum(m, tl.max(x, axis=0))  # finite: every block has a real class
            s = s * tl.exp2((m - m_new) * _LOG2E) + tl.sum(tl.exp2((x - m_new) * _LOG2E), axis=0)
            m = m_new
        lse2 = m * _LOG2E + tl.log2(s)  # logsumexp in base 2: softmax = 2^(x log2 e - lse2)
        # a label outside [0, vocab_size) reads column 0 instead (never past the row) and makes
        # the row's loss NaN: the mean loss shows it without a host-side check (a sync)
        bad = (label < 0) | (label >= n_classes)
        col = tl.where(bad, 0, label).to(tl.int32)  # the label's column (labels may come as int64)
        target = tl.load(row_ptr + col).to(tl.float32)  # the label's logit
        tl.store(loss_ptr + row, tl.where(bad, float("nan"), lse2 * _LN2 - target))
        # pass 2 over the whole row, padding included: overwrite the logits with the gradient of
        # the mean loss. Each block is read before it is written, by this program only.
        scale = tl.load(scale_ptr)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs  # (BLOCK_V,)
            real = cols < n_classes  # (BLOCK_V,)
            x = tl.load(row_ptr + cols, mask=real, other=0.0).to(tl.float32)  # (BLOCK_V,)
            p = tl.exp2(x * _LOG2E - lse2)  # (BLOCK_V,) softmax
            grad = tl.where(cols == col, p - 1.0, p) * scale  # (BLOCK_V,)
            grad = tl.where(real, grad, 0.0)  # padding classes: exactly 0, whatever they held
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < n_cols)


def _config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps). One fixed choice, no autotuning (it cannot run without a GPU):
    blocks of 8192 columns over 32 warps (8 values a thread) for a GPT-2-sized vocabulary,
    smaller for small ones; 32 columns under the interpreter so tests cross block edges.

    `scripts/ce_sweep.py` on the H100 (session 9, 16,384 rows of 50,304 bf16 logits): 8192 on 32
    warps 1.49 ms, 8192 on 8-16 warps 1.58-1.60, 4096 on 8 warps 1.66 (the choice before), 1024
    on 32 warps 4.88. Wide programs keep fewer rows in flight, so a row's second read (the
    gradient pass) more often finds it still in L2; one read + one write would take 1.10."""
    if interpreting():
        return 32, 1
    block = min(8192, max(128, triton.next_power_of_2(n_cols)))
    return block, (32 if block >= 8192 else 8 if block >= 2048 else 4)


def _launch(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, vocab_size: int,
            ignore_index: int) -> torch.Tensor:
    """Runs the kernel: per-row losses (M,) fp32 of logits (M, V_pad), which it overwrites with
    the gradient of the mean loss (``scale`` (1,) fp32 = 1 / counted labels)."""
    rows, n_cols = logits.shape
    if logits.stride(1) != 1 and n_cols > 1:
        raise ValueError("logits: columns must be contiguous")
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)  # (M,)
    if rows:
        block, warps = _config(n_cols)
        rv = pow2_factor(logits.stride(0), vocab_size, n_cols)
        _cross_entropy_fwd_bwd_kernel[(rows,)](
            logits, labels, scale, loss, logits.stride(0) // rv, labels.stride(0),
            vocab_size // rv, n_cols // rv, ignore_index, BLOCK_V=block, RV=rv, num_warps=warps)
    return loss


# A custom operator (rather than bare launches) so that torch.compile keeps it in its graph.
@torch.library.custom_op("ssdbench::linear_cross_entropy_fwd", mutates_args=())
def _head_op(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
             vocab_size: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row losses (M,) fp32, dloss/dlogits (M, V_pad)): the head's matmul and the kernel.

    The logits never leave this operator: it returns their buffer, overwritten with the
    gradient, as a new tensor. The first version ran the matmul outside and an operator that
    mutated its output in place; the compiled H100 step then copied the whole logits buffer
    before the kernel (a 1.09 ms clone beside the kernel's 1.90 ms: results/h100/session8)."""
    logits = x @ weight.T  # (M, V_pad)
    return _launch(logits, labels, scale, vocab_size, ignore_index), logits


@_head_op.register_fake
def _(x, weight, labels, scale, vocab_size, ignore_index):
    return x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape[0], weight.shape[0])


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = mean cross-entropy of x @ weight.T; the backward only multiplies the saved
    gradient of the logits (already divided by the label count) by weight and x."""

    @staticmethod
    def forward(ctx, x, weight, labels, vocab_size, ignore_index):
        counted = (labels != ignore_index).sum()  # () int64, stays on the device
        scale = (1.0 / counted.float()).reshape(1)  # (1,) fp32; inf when nothing counts
        # in x's dtype even under autocast: the backward's matmuls must meet the same dtype
        with torch.autocast(x.device.type, enabled=False):
            rows, dlogits = _head_op(x, weight, labels, scale, vocab_size, ignore_index)  # (M,), (M, V_pad)
        ctx.save_for_backward(x, weight, dlogits)
        # every row ignored: 0 * inf = nan, what F.cross_entropy returns (0 / 0)
        return rows.sum() * scale[0]

    @staticmethod
    def backward(ctx, g):
        x, weight, dlogits = ctx.saved_tensors  # dlogits (M, V_pad)
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            dx = (dlogits @ weight) * g  # (M, d)
        if ctx.needs_input_grad[1]:
            dweight = (dlogits.T @ x) * g  # (V_pad, d)
        return dx, dweight, None, None, None


def _check(x, weight, labels, vocab_size):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2:
        raise ValueError(f"x: expected a floating-point (M, d) tensor, got {getattr(x, 'dtype', type(x))}"
                         f" {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dtype != x.dtype or weight.dim() != 2 \
            or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight: expected a (V_pad, {x.shape[1]}) tensor in {x.dtype}, got"
                         f" {getattr(weight, 'dtype', type(weight))} {tuple(getattr(weight, 'shape', ()))}")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64) \
            or labels.shape != (x.shape[0],):
        raise ValueError(f"labels: expected an int32/int64 tensor of shape ({x.shape[0]},), got"
                         f" {getattr(labels, 'dtype', type(labels))} {tuple(getattr(labels, 'shape', ()))}")
    for name, t in (("weight", weight), ("labels", labels)):
        if t.device != x.device:
            raise ValueError(f"{name}: on device {t.device} but x is on {x.device}")
    if not isinstance(vocab_size, int) or not 1 <= vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size: expected an int in [1, {weight.shape[0]}], got {vocab_size!r}")


def fused_applies(x: torch.Tensor) -> bool:
    """Whether ``linear_cross_entropy`` runs the Triton kernel for x (else the PyTorch form)."""
    return x.dtype in _KERNEL_DTYPES and (x.is_cuda or interpreting())


def model_head_applies(x: torch.Tensor) -> bool:
    """Whether ``LanguageModel`` computes its loss with ``linear_cross_entropy``: on a GPU, with
    the kernel compiled. Not under the interpreter, which would slow CPU training down (tests
    patch this to run the model's fused path on the CPU)."""
    return x.is_cuda and not interpreting()


def linear_cross_entropy_ref(x, weight, labels, vocab_size: int, ignore_index: int = -100):
    """Plain PyTorch: the head's logits cut to vocab_size, upcast to fp32 at least, and
    F.cross_entropy (mean over the labels that are not ignore_index)."""
    _check(x, weight, labels, vocab_size)
    logits = F.linear(x, weight)[:, :vocab_size]  # (M, V)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels.long(),
                           ignore_index=ignore_index)


def linear_cross_entropy(x, weight, labels, vocab_size: int, ignore_index: int = -100):
    """Mean cross-entropy of the logits ``x @ weight.T`` over their first ``vocab_size``
    columns, counting the labels that are not ``ignore_index`` (nan when none counts, as
    F.cross_entropy). x (M, d), rows may be strided; weight (V_pad, d) in x's dtype (the caller
    casts both, e.g. to the autocast dtype: the matmuls run in it); labels (M,) int32/int64.
    Returns a 0-dim fp32 tensor (float64 for float64 inputs, which take the PyTorch form)."""
    _check(x, weight, labels, vocab_size)
    if not fused_applies(x):
        return linear_cross_entropy_ref(x, weight, labels, vocab_size, ignore_index)
    return _LinearCrossEntropy.apply(x, weight, labels, vocab_size, ignore_index)
