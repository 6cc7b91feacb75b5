"""Based (Taylor linear attention) kernels against float64 oracles, forward and gradients.

The oracle is ``taylor_linear_attention_recurrent`` in float64 (explicit phi, one token at a
time), itself checked against the quadratic form. Inputs are fresh random tensors each run;
the seed is printed in every failure message. Under the CPU interpreter the Triton kernels
run with a small chunk (``_FORCE_BLOCKS``) so that short sequences span several chunks and
several value blocks; on a GPU the same tests also run at realistic shapes in bf16/fp16/fp32.
Rows split into segments (state-only and adjoint-only passes plus a combine in torch) are
forced with ``_FORCE_SEGMENTS``; the default rule is checked as a pure function of the SM
count here and end to end on a GPU.
"""
import random

import pytest
import torch

from conftest import DEVICE, rel_err
from ssdbench.kernels import based as mod
from ssdbench.kernels.based import (
    based_state_size,
    feature_count,
    taylor_feature_map,
    taylor_linear_attention,
    taylor_linear_attention_chunked_torch,
    taylor_linear_attention_recurrent,
    taylor_linear_attention_ref,
    taylor_step,
)

# Every test launches a Triton kernel (conftest fails one that does not) unless marked no_triton.
pytestmark = pytest.mark.triton

F64 = torch.float64
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _poison_and_blocks(monkeypatch):
    # NaN-filled outputs catch elements the kernels never write.
    monkeypatch.setattr(mod, "_POISON", True)
    if DEVICE == "cpu":  # chunk 16, value block 16: many chunks and blocks at small L
        monkeypatch.setattr(mod, "_FORCE_BLOCKS", (16, 16))


def _seed():
    s = random.randrange(2 ** 31)
    torch.manual_seed(s)
    return s


def _random_seq_idx(batch, L, device):
    """Non-decreasing document ids with random boundaries (some rows a single document)."""
    rows = []
    for b in range(batch):
        n_docs = 1 if b == 0 else random.randint(1, max(1, L // 6))
        cuts = sorted(random.sample(range(1, L), min(n_docs - 1, L - 1))) if L > 1 else []
        ids = torch.zeros(L, dtype=torch.int32)
        for c in cuts:
            ids[c:] += 1
        rows.append(ids + random.randint(0, 3))  # ids need not start at 0
    return torch.stack(rows).to(device)


def _inputs(batch, L, H, F, P, device, init=False, seq=False):
    q = torch.randn(batch, L, H, F, dtype=F64, device=device) * 0.7  # (batch, L, H, F)
    k = torch.randn(batch, L, H, F, dtype=F64, device=device) * 0.7  # (batch, L, H, F)
    v = torch.randn(batch, L, H, P, dtype=F64, device=device)  # (batch, L, H, P)
    state = None
    if init:
        # a realistic state: what a random 8-token prefix would leave (z0 > 0 like a real one)
        kp = taylor_feature_map(torch.randn(batch, 8, H, F, dtype=F64, device=device) * 0.7)  # (batch, 8, H, D)
        vp = torch.randn(batch, 8, H, P, dtype=F64, device=device)
        state = (torch.einsum("bshd,bshp->bhdp", kp, vp), kp.sum(1))  # (batch,H,D,P), (batch,H,D)
    seq_idx = _random_seq_idx(batch, L, device) if seq else None
    return q, k, v, state, seq_idx


def _run(fn, q, k, v, state, seq_idx, normalize, final, dtype, eps=1e-6):
    """Run fn on leaf copies cast to dtype; returns (outputs, leaves)."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    init = None
    if state is not None:
        sdt = F64 if dtype == F64 else torch.float32
        init = tuple(x.detach().to(sdt).requires_grad_() for x in state)
        leaves += list(init)
    out = fn(*leaves[:3], eps=eps, normalize=normalize, initial_state=init,
             return_final_state=final, seq_idx=seq_idx)
    outs = [out[0], out[1][0], out[1][1]] if final else [out]
    return outs, leaves


def _loss(outs, cot):
    return sum((o.double() * c).sum() for o, c in zip(outs, cot))


def _compare(q, k, v, state, seq_idx, normalize, final, dtype, seed, tol=None, fn=taylor_linear_attention,
             ref=taylor_linear_attention_recurrent):
    """fn against the float64 oracle ref (the recurrence by default; the quadratic form is exact
    and faster on a GPU at long L): outputs, final state and every gradient."""
    tol = tol or TOL[dtype]
    # the oracle sees the same (rounded) inputs as the kernel
    qr, kr, vr = (x.to(dtype).to(F64) for x in (q, k, v))
    ref_outs, ref_leaves = _run(ref, qr, kr, vr, state, seq_idx, normalize, final, F64)
    outs, leaves = _run(fn, q, k, v, state, seq_idx, normalize, final, dtype)
    names = ["y", "S_L", "z_L"]
    for n, o, r in zip(names, outs, ref_outs):
        assert o.shape == r.shape, (n, o.shape, r.shape)
        e = rel_err(o.detach(), r.detach())
        assert e < tol, f"seed={seed} {n}: rel err {e:.2e} >= {tol:.0e}"
    cot = [torch.randn_like(r) for r in ref_outs]
    # allow_unused: without the normaliser and the final state, y does not depend on z0
    gref = torch.autograd.grad(_loss(ref_outs, cot), ref_leaves, allow_unused=True)
    gout = torch.autograd.grad(_loss(outs, cot), leaves, allow_unused=True)
    gnames = ["dq", "dk", "dv", "dS0", "dz0"]
    for n, g, r in zip(gnames, gout, gref):
        if n in ("dq", "dk", "dv"):
            assert g.dtype == dtype, (n, g.dtype)
        if r is None:  # an input the oracle does not use gets a zero gradient
            assert g is None or (g == 0).all(), f"seed={seed} {n}: nonzero gradient of an unused input"
            continue
        e = rel_err(g, r)
        assert e < 2 * tol, f"seed={seed} {n}: rel err {e:.2e} >= {2 * tol:.0e}"


# ----------------------------------------------------------------------------------------
# references agree with each other (float64)
# ----------------------------------------------------------------------------------------
@pytest.mark.no_triton
def test_feature_map_is_taylor_of_exp():
    seed = _seed()
    F = 16
    q, k = torch.randn(2, 5, F, dtype=F64), torch.randn(2, 5, F, dtype=F64)
    s = (q * k).sum(-1) / F ** 0.5
    dot = (taylor_feature_map(q) * taylor_feature_map(k)).sum(-1)
    assert taylor_feature_map(q).shape[-1] == feature_count(F) == 273
    assert torch.allclose(dot, 1 + s + s * s / 2, rtol=1e-12, atol=1e-12), seed


@pytest.mark.no_triton
def test_state_size_formula():
    # Zoology's count: KV state (1+F+F^2) P per head plus the normaliser (1+F+F^2) per head
    assert based_state_size(16, 64, 1) == 273 * 64 + 273
    assert based_state_size(16, 64, 12) == 12 * 273 * 65


@pytest.mark.no_triton
@pytest.mark.parametrize("normalize", [True, False])
def test_recurrent_equals_quadratic_and_chunked(normalize):
    seed = _seed()
    q, k, v, state, seq_idx = _inputs(3, 29, 2, 8, 5, "cpu", init=True, seq=True)
    outs, cot = {}, None
    for name, fn in [("rec", taylor_linear_attention_recurrent), ("quad", taylor_linear_attention_ref),
                     ("chunk", lambda *a, **kw: taylor_linear_attention_chunked_torch(*a, chunk_size=7, **kw))]:
        o, leaves = _run(fn, q, k, v, state, seq_idx, normalize, True, F64)
        cot = cot or [torch.randn_like(x) for x in o]  # one cotangent shared by all three
        outs[name] = o + list(torch.autograd.grad(_loss(o, cot), leaves))
    for name in ("quad", "chunk"):
        for i, (a, b) in enumerate(zip(outs[name], outs["rec"])):
            e = rel_err(a.detach(), b.detach())
            assert e < 1e-10, f"seed={seed} {name} item {i}: {e:.2e}"


@pytest.mark.no_triton
def test_step_matches_prefix_state():
    """Decoding: the final state of a prefix plus taylor_step gives the next token's output."""
    seed = _seed()
    q, k, v, _, _ = _inputs(2, 12, 3, 16, 8, "cpu")
    y, (S, z) = taylor_linear_attention_recurrent(q[:, :11], k[:, :11], v[:, :11], return_final_state=True)
    y_full = taylor_linear_attention_ref(q, k, v)
    y_t, _ = taylor_step(q[:, 11], k[:, 11], v[:, 11], (S, z))
    assert rel_err(y_t, y_full[:, 11]) < 1e-12, seed


# ----------------------------------------------------------------------------------------
# the Triton kernels (interpreter on CPU, compiled on CUDA) against the float64 oracle
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("seq", [False, True])
def test_kernel_options_fp32(normalize, init, seq):
    seed = _seed()
    L = 45  # not a multiple of the chunk (16 here, 32 on the GPU path's default)
    q, k, v, state, seq_idx = _inputs(2, L, 2, 16, 24, DEVICE, init=init, seq=seq)
    _compare(q, k, v, state, seq_idx, normalize, True, torch.float32, seed)


@pytest.mark.parametrize("F,P,L", [(8, 16, 33), (16, 40, 17), (16, 16, 1), (32, 16, 20)])
def test_kernel_shapes_fp32(F, P, L):
    """F below 16 (padded in-kernel), F = 32 (1024 order-2 features), P not a power of two, L = 1."""
    seed = _seed()
    q, k, v, state, seq_idx = _inputs(2, L, 1, F, P, DEVICE, init=True, seq=L > 1)
    _compare(q, k, v, state, seq_idx, True, True, torch.float32, seed)


def test_kernel_without_final_state():
    seed = _seed()
    q, k, v, state, seq_idx = _inputs(1, 50, 2, 16, 16, DEVICE, init=True, seq=True)
    _compare(q, k, v, state, seq_idx, True, False, torch.float32, seed)


def test_kernel_default_blocks(monkeypatch):
    """The block sizes the dispatcher picks by itself (chunk 32 under the interpreter)."""
    monkeypatch.setattr(mod, "_FORCE_BLOCKS", None)
    seed = _seed()
    q, k, v, state, seq_idx = _inputs(1, 70, 2, 16, 32, DEVICE, init=True, seq=True)
    _compare(q, k, v, state, seq_idx, True, True, torch.float32, seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_inputs(dtype):
    seed = _seed()
    q, k, v, state, seq_idx = _inputs(2, 40, 2, 16, 16, DEVICE, init=True, seq=True)
    _compare(q, k, v, state, seq_idx, True, True, dtype, seed)


@pytest.mark.skipif(DEVICE != "cuda", reason="realistic shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", [True, False])
def test_kernel_gpu_realistic(dtype, normalize, monkeypatch):
    monkeypatch.setattr(mod, "_FORCE_BLOCKS", None)
    seed = _seed()
    q, k, v, state, seq_idx = _inputs(2, 1000, 4, 16, 64, DEVICE, init=True, seq=True)
    # the quadratic form in float64 is exact and fast on the GPU at this length
    _compare(q, k, v, state, seq_idx, normalize, True, dtype, seed,
             tol=TOL[dtype] if dtype != torch.float32 else 1e-4, ref=taylor_linear_attention_ref)


# ----------------------------------------------------------------------------------------
# rows split into segments (state-only / adjoint-only passes and a combine in torch)
# ----------------------------------------------------------------------------------------
def _force_segments(monkeypatch, NS):
    monkeypatch.setattr(mod, "_FORCE_SEGMENTS", NS)


def _segment_plan(L, H, batch, F=16, P=24):
    return mod._plan(F, P, batch * H, L, torch.device(DEVICE))


@pytest.mark.parametrize("NS", [2, 3])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("seq", [False, True])
@pytest.mark.parametrize("init,final", [(False, False), (False, True), (True, True), (True, False)])
def test_segments_options_fp32(NS, normalize, seq, init, final, monkeypatch):
    """L = 75: not a multiple of the chunk (16 here, 32 on a GPU) nor of the segment; the last
    segment is shorter (NS = 2: 48 + 27 tokens; NS = 3: 32 + 32 + 11 under the interpreter)."""
    _force_segments(monkeypatch, NS)
    seed = _seed()
    L = 75
    plan = _segment_plan(L, 2, 2)
    assert plan.NS == NS and L % plan.SEG != 0 and L % plan.BQ != 0, plan
    q, k, v, state, seq_idx = _inputs(2, L, 2, 16, 24, DEVICE, init=init, seq=seq)
    _compare(q, k, v, state, seq_idx, normalize, final, torch.float32, seed)


def _seq_from_cuts(rows, L, device):
    """(len(rows), L) int32 document ids; rows[i] lists the tokens where a new document starts."""
    out = torch.zeros(len(rows), L, dtype=torch.int32)
    for i, cuts in enumerate(rows):
        for c in cuts:
            out[i, c:] += 1
        out[i] += random.randint(0, 3)  # ids need not start at 0
    return out.to(device)


@pytest.mark.parametrize("NS", [2, 3])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("init", [False, True])
def test_segments_document_boundaries(NS, normalize, init, monkeypatch):
    """Documents that start exactly at a segment's first token, one token after it, one token
    before it, inside a segment, at a chunk boundary inside a segment, on the last token, and a
    document that spans every segment (the entering state carried through several segments)."""
    _force_segments(monkeypatch, NS)
    seed = _seed()
    L = 75
    plan = _segment_plan(L, 1, 6)
    assert plan.NS == NS, plan
    G, Q = plan.SEG, plan.BQ
    rows = [
        [G] + ([2 * G] if NS > 2 else []),  # exactly on segment boundaries
        [G + 1],  # one token after
        [G - 1, G + 5],  # one token before, and inside the next segment
        [3, Q, L - 1],  # inside segment 0, at a chunk boundary, the last token alone
        [],  # one document across every segment
        [1, G + 2, L - 2],  # several segments each with a boundary inside
    ]
    q, k, v, state, _ = _inputs(len(rows), L, 1, 16, 24, DEVICE, init=init)
    seq_idx = _seq_from_cuts(rows, L, DEVICE)
    _compare(q, k, v, state, seq_idx, normalize, True, torch.float32, seed)


@pytest.mark.parametrize("F,P,L", [(8, 40, 70), (32, 16, 40)])
def test_segments_shapes_fp32(F, P, L, monkeypatch):
    """F below 16 and P not a power of two; F = 32 (1024 order-2 features) with 1-chunk segments."""
    _force_segments(monkeypatch, 3)
    seed = _seed()
    q, k, v, state, seq_idx = _inputs(2, L, 1, F, P, DEVICE, init=True, seq=True)
    _compare(q, k, v, state, seq_idx, True, True, torch.float32, seed)


def test_segments_half_inputs(monkeypatch):
    _force_segments(monkeypatch, 2)
    seed = _seed()
    q, k, v, state, seq_idx = _inputs(2, 40, 2, 16, 16, DEVICE, init=True, seq=True)
    _compare(q, k, v, state, seq_idx, True, True, torch.bfloat16, seed)


@pytest.mark.no_triton
def test_forced_segments_plan(monkeypatch):
    """SEG = ceil(n_chunks / NS) chunks; the effective NS leaves no segment empty."""
    monkeypatch.setattr(mod, "_FORCE_BLOCKS", (16, 16))
    dev = torch.device("cpu")
    for NS, L, want in [(2, 45, (2, 32)), (3, 45, (3, 16)), (5, 45, (3, 16)), (3, 64, (2, 32)),
                        (4, 1, (1, 16)), (1, 1000, (1, 1008))]:
        monkeypatch.setattr(mod, "_FORCE_SEGMENTS", NS)
        p = mod._plan(16, 24, 4, L, dev)
        assert (p.NS, p.SEG) == want, (NS, L, p)
    monkeypatch.setattr(mod, "_FORCE_SEGMENTS", None)
    assert mod._plan(16, 24, 4, 1000, dev).NS == 1  # no segments unless forced (or on a GPU)


@pytest.mark.no_triton
def test_segment_rule_h100():
    """The CUDA rule at 132 SMs: the benchmark's 65,536-token batches (H 16, P 64) get 512
    programs of BV = 64 from L = 2K up; short rows with few heads shrink BV as before."""
    rule = mod._segments_rule
    for L, NS in [(512, 1), (1024, 1), (2048, 1), (4096, 2), (8192, 4), (16384, 8), (65536, 32)]:
        n_bh = max(1, 65536 // L) * 16
        assert rule(n_bh, 64, L, 32, 64, 132, True) == (NS, 64), L
    assert rule(2, 64, 4096, 32, 64, 132, True) == (16, 16)  # the GPU test below
    assert rule(2, 64, 256, 32, 64, 132, True) == (1, 16)  # 8 chunks: one segment
    assert rule(1, 64, 1 << 20, 32, 64, 132, True) == (64, 16)  # at most 64 segments, then BV
    assert rule(1, 16, 4096, 16, 16, 132, False) == (32, 16)  # F = 32: chunk 16, BV 16


@pytest.mark.skipif(DEVICE != "cuda", reason="the default segment rule needs a GPU")
@pytest.mark.parametrize("normalize", [True, False])
def test_segments_gpu_default_rule(normalize, monkeypatch):
    """L = 4096, batch 1, H = 2: the default rule splits rows (NS > 1); bf16 against the
    float64 quadratic form, with an initial state, packed documents and the final state."""
    monkeypatch.setattr(mod, "_FORCE_BLOCKS", None)
    monkeypatch.setattr(mod, "_FORCE_SEGMENTS", None)
    seed = _seed()
    dtype = torch.bfloat16
    L, H = 4096, 2
    plan = mod._plan(16, 64, H, L, torch.device(DEVICE))
    assert plan.NS > 1, plan
    G = plan.SEG
    cuts = sorted({G, 2 * G + 1, 3 * G - 1, *random.sample(range(1, L), 4)})
    q, k, v, state, _ = _inputs(1, L, H, 16, 64, DEVICE, init=True)
    seq_idx = _seq_from_cuts([cuts], L, DEVICE)
    _compare(q, k, v, state, seq_idx, normalize, True, dtype, f"{seed} {plan}", ref=taylor_linear_attention_ref)


@pytest.mark.no_triton
def test_float64_inputs_use_the_torch_path():
    """float64 goes to the chunked PyTorch path (the model's CPU path): all options, autograd."""
    seed = _seed()
    q, k, v, state, seq_idx = _inputs(2, 21, 2, 16, 8, "cpu", init=True, seq=True)
    _compare(q, k, v, state, seq_idx, True, True, F64, seed, tol=1e-10)


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------
def _bad(**over):
    q = torch.randn(1, 8, 2, 16, device=DEVICE)
    args = dict(q=q, k=q.clone(), v=torch.randn(1, 8, 2, 4, device=DEVICE))
    args.update(over)
    return args


@pytest.mark.no_triton
@pytest.mark.parametrize("over,name", [
    (dict(q=torch.randn(1, 8, 2, 33), k=torch.randn(1, 8, 2, 33)), "q"),
    (dict(q=torch.randn(8, 2, 16)), "q"),
    (dict(k=torch.randn(1, 8, 2, 8)), "k"),
    (dict(v=torch.randn(1, 7, 2, 4)), "v"),
    (dict(initial_state=(torch.zeros(1, 2, 273, 5), torch.zeros(1, 2, 273))), "initial_state"),
    (dict(initial_state=(torch.zeros(1, 2, 273, 4), torch.zeros(1, 2, 272))), "initial_state"),
    (dict(seq_idx=torch.zeros(1, 9, dtype=torch.int32)), "seq_idx"),
])
def test_bad_input(over, name):
    args = _bad(**{kk: (vv.to(DEVICE) if torch.is_tensor(vv) else vv) for kk, vv in over.items()})
    with pytest.raises(ValueError, match=name):
        taylor_linear_attention(**args)


@pytest.mark.no_triton
@pytest.mark.parametrize("fn", [taylor_linear_attention, taylor_linear_attention_ref,
                                taylor_linear_attention_recurrent, taylor_linear_attention_chunked_torch])
def test_decreasing_seq_idx_is_rejected(fn):
    """seq_idx must be non-decreasing along each row: checked on the host before any launch."""
    q, k, v = torch.randn(2, 6, 2, 4), torch.randn(2, 6, 2, 4), torch.randn(2, 6, 2, 3)
    seq = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 0, 1, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^seq_idx: must be non-decreasing"):
        fn(q, k, v, seq_idx=seq)


@pytest.mark.no_triton
@pytest.mark.parametrize("bad", ["q_t", "k_t", "v_t", "state S", "state z"])
def test_taylor_step_rejects_wrong_shapes(bad):
    batch, H, F, P = 2, 2, 4, 3
    D = feature_count(F)
    args = dict(q_t=torch.randn(batch, H, F), k_t=torch.randn(batch, H, F), v_t=torch.randn(batch, H, P),
                state=(torch.zeros(batch, H, D, P), torch.zeros(batch, H, D)))
    if bad == "q_t":
        args["q_t"] = torch.randn(batch, H, 1, F)
    elif bad == "k_t":
        args["k_t"] = torch.randn(batch, H, F + 1)
    elif bad == "v_t":
        args["v_t"] = torch.randn(batch, H + 1, P)
    elif bad == "state S":
        args["state"] = (torch.zeros(batch, H, D, P + 1), args["state"][1])
    else:
        args["state"] = (args["state"][0], torch.zeros(batch, H, D - 1))
    with pytest.raises(ValueError, match=rf"^{bad} must"):
        taylor_step(**args)
