"""Small Triton helpers shared by the kernels."""
from __future__ import annotations

import inspect
import os

import triton
import triton.language as tl



def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1). Read at call
    time: the launchers choose tile sizes and fallbacks by it, and tests switch it off."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Triton 3.2+ can keep autotuning results on disk (its cache, keyed by the kernel's source, the
# configs and the key's values): a study's hundreds of short runs then tune each kernel once, not
# once per process (every run of `ssdbench run` paid that in its first step before).
_CACHES_TUNING = "cache_results" in inspect.signature(triton.autotune).parameters


def autotune(configs, key, **kwargs):
    """triton.autotune with its results cached on disk where this Triton can."""
    if _CACHES_TUNING:
        kwargs.setdefault("cache_results", True)
    return triton.autotune(configs=configs, key=key, **kwargs)


def check_seq_idx_order(seq_idx) -> None:
    """seq_idx must be non-decreasing along each row (documents packed back to back). Reading
    that back from the GPU is a sync, which a CUDA-graph capture forbids: while capturing the
    check is skipped (the graphed training loop runs each shape's first step eagerly, checked)."""
    import torch

    if seq_idx.shape[-1] > 1 and not (seq_idx.is_cuda and torch.cuda.is_current_stream_capturing()) \
            and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError("seq_idx: must be non-decreasing along each row")


# PTX cannot run under the interpreter. Read at import, as @triton.jit itself reads it.
FAST_EXP = tl.constexpr(not interpreting())


@triton.jit
def exp2_ftz(x):
    """2^x as the bare ex2.approx.ftz instruction on the GPU (tl.exp2 under the interpreter).

    tl.exp2 / tl.exp compile to ex2.approx, whose denormal handling wraps each exp in a compare
    and two predicated multiplies (seen in the SASS of the scan walk: 3 of ~12 instructions per
    state element and step). The kernels' exps are decay factors: results below 2^-126 flushing
    to 0 changes nothing, and exp2(-inf) is still 0."""
    if FAST_EXP:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def exp_ftz(x):
    """e^x through exp2_ftz."""
    return exp2_ftz(x * 1.4426950408889634)


def pow2_factor(*values: int, cap: int = 16) -> int:
    """The largest power of two, at most ``cap``, dividing every value.

    Triton marks an integer argument as a multiple of 16 when it is one, and knows nothing
    of it otherwise. A row stride such as 3352 (Mamba-2's in_proj width at 125M, 8 x 419)
    therefore hides that every row starts 16 bytes apart in bf16, and the loads along the
    row compile to 2-byte scalars (the conv backward's x loads for sm_90a: 64 `ld.global.b16`,
    against 8 16-byte loads with the factor known; scripts/sm90_compile_stats.py conv_g).
    Kernels take ``stride // f`` and a constexpr ``f`` and multiply back, so the compiler sees
    the factor."""
    f = 1
    while f < cap and all(v % (2 * f) == 0 for v in values):
        f *= 2
    return f


@triton.jit
def softplus(x):
    """log(1 + e^x) in float32, as torch's softplus: for x > 20 the correction is below fp32
    resolution (and e^x would overflow), so x itself."""
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
