"""Tests of the chunked SSD scan: Triton kernels (GPU, or the interpreter on a CPU), the
chunked PyTorch reference and the decoding step, all against the sequential recurrence in
float64, forward and every gradient.

Inputs are fresh random draws every test; the seed is printed in every failure message.
"""
import math

import pytest
import torch
from conftest import DEVICE, ON_GPU, rel_err

from ssdbench.kernels import ssd_triton
from ssdbench.kernels.ssd import ssd_chunked, ssd_chunked_ref, ssd_sequential_ref, ssd_step

# Every test launches a Triton kernel (conftest fails one that does not) unless marked no_triton.
pytestmark = pytest.mark.triton


# head structures (Mamba-2 §7): name -> (Hx, Gb, Gc) as functions of H
STRUCTS = {
    "mva": lambda H: (H, 1, 1),  # multi-value / multi-input (Mamba's)
    "mqa": lambda H: (1, 1, H),  # multi-query / multi-contract
    "mka": lambda H: (1, H, 1),  # multi-key / multi-expand
    "mha": lambda H: (H, H, H),  # multi-head
    "gva": lambda H: (H, 2, 2),  # grouped-value, 2 groups
}
NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the kernels must fill starts as NaN, so an unwritten element fails."""
    def nan_empty(*shape, **kw):
        t = torch.empty(*shape, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t
    monkeypatch.setattr(ssd_triton, "_alloc", nan_empty)


# Limits of the interpreted (CPU) tests, per dtype and per output: 5-10x the worst relative error
# the kernels showed over 10 seeds of every test below (issue 24; limits 20-40x the error let a
# 1.002 scaling of dA, dD or ddt_bias through). Worst seen, float32 (10 seeds x 28 tests): y 9e-7,
# final state 1.2e-5, per-token gradients 8e-6 (ddt), dA 3.3e-4, ddt_bias 1.3e-4, dD 4.4e-6;
# float16: y 3e-4, final 2.3e-4, gradients 5.7e-4, dA 1.8e-3, ddt_bias 8e-4, dD 6e-4; bfloat16:
# y 6e-3, final 3.8e-3, gradients 9.8e-3, dA 1.1e-2, dD 1.3e-2, ddt_bias 4.3e-2 (its limits
# stay as they were). "g" is every gradient not named.
# dA, ddt_bias and dD keep compare()'s fallback to 10x PyTorch's chunked fp32 reference.
TOLS = {
    torch.float32: dict(y=5e-6, final=8e-5, g=5e-5, dA=1.5e-3, ddt_bias=1e-3, dD=3e-5),
    torch.float16: dict(y=2e-3, final=2e-3, g=4e-3, dA=1.2e-2, ddt_bias=6e-3, dD=5e-3),
    torch.bfloat16: dict(y=1e-2, final=1e-2, g=2e-2, dA=1e-1, ddt_bias=1e-1, dD=1e-1),
}


def cpu_tols(dtype=torch.float32):
    """TOLS on the interpreter, where they were measured; None (the old 2e-5 / 2e-4 limits of
    the call) on a GPU, whose compiled kernels (other tiles, FMA, TF32) these seeds never ran."""
    return None if ON_GPU else TOLS[dtype]


def fresh_seed():
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    return seed


def make_inputs(batch, L, H, P, N, struct="mva", D="h", z=True, bias=True, init=True,
                seq=True, dtype=torch.float32, device=DEVICE):
    Hx, Gb, Gc = STRUCTS[struct](H)
    t = dict(
        x=torch.randn(batch, L, Hx, P),
        dt=torch.randn(batch, L, H) * 0.5 - 1.0,
        A=-torch.exp(torch.rand(H) * math.log(16.0)),  # A = -U(1, 16) in log space, as in Mamba-2
        B=torch.randn(batch, L, Gb, N),
        C=torch.randn(batch, L, Gc, N),
        D=None if D is None else (torch.randn(H) if D == "h" else torch.randn(H, P)),
        z=torch.randn(batch, L, H, P) if z else None,
        dt_bias=torch.randn(H) * 0.5 if bias else None,
        initial_states=torch.randn(batch, H, P, N) if init else None,
    )
    t = {k: (None if v is None else v.to(device=device, dtype=dtype if k != "A" or dtype == torch.float64 else torch.float32))
         for k, v in t.items()}
    seq_idx = None
    if seq:
        # random non-decreasing ids, at least one boundary per row, not starting at 0
        cuts = torch.rand(batch, L) < 3.0 / L
        cuts[:, L // 2] = True
        cuts[:, 0] = False
        seq_idx = (torch.cumsum(cuts.int(), dim=1) + 3).to(torch.int32).to(device)
    return t, seq_idx


def run_and_grads(fn, t, seq_idx, chunk, softplus=True, limit=(0.0, float("inf")), final=True,
                  grads_out=None):
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in t.items()}
    res = fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk,
             D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"], dt_softplus=softplus,
             dt_limit=limit, initial_states=leaves["initial_states"], seq_idx=seq_idx,
             return_final_states=final)
    y, fs = res if final else (res, None)
    if grads_out is None:
        grads_out = (torch.randn_like(y, dtype=torch.float64),
                     None if fs is None else torch.randn_like(fs, dtype=torch.float64))
    outs, gs = [y], [grads_out[0].to(y.dtype)]
    if fs is not None:
        outs.append(fs)
        gs.append(grads_out[1].to(fs.dtype))
    torch.autograd.backward(outs, gs)
    grads = {k: (None if v is None else v.grad) for k, v in leaves.items()}
    return y, fs, grads, grads_out


def compare(fn, t, seq_idx, chunk, tol_y, tol_g, seed, softplus=True, limit=(0.0, float("inf")),
            final=True, ref_fn=ssd_sequential_ref, tols=None):
    """tol_y (y, final state) and tol_g (gradients) are the limits, or tols a dict of them by
    name ("y", "final", "dA", ... and "g" for every other gradient), which overrides both."""
    y, fs, g, go = run_and_grads(fn, t, seq_idx, chunk, softplus, limit, final)
    t64 = {k: (None if v is None else v.detach().double()) for k, v in t.items()}
    yr, fr, gr, _ = run_and_grads(ref_fn, t64, seq_idx, chunk, softplus, limit, final, go)
    assert y.dtype == t["x"].dtype and y.shape == yr.shape
    errs = {"y": rel_err(y.detach(), yr.detach())}
    if final:
        assert fs.dtype == (torch.float64 if t["x"].dtype == torch.float64 else torch.float32)
        errs["final"] = rel_err(fs.detach(), fr.detach())
    for k in NAMES:
        if t[k] is not None:
            assert g[k] is not None and g[k].shape == t[k].shape and g[k].dtype == t[k].dtype, k
            errs["d" + k] = rel_err(g[k], gr[k])
    # dA, ddt_bias and dD are sums over every token whose terms cancel: a float32 PyTorch
    # reference misses them by as much (seen 1e-5 .. 8e-4), so they get a wider margin; the
    # per-token ddt and dx above check the same terms tightly. (dD in bf16 missed 2e-2 on 3 of
    # 60 seeds, at 2.2-2.7 %, with the kernels of sessions 8 and 9 alike.)
    wide = 20 if t["x"].dtype in (torch.float32, torch.float64) else 5
    tol = {k: (tol_y if k in ("y", "final") else tol_g * (wide if k in ("dA", "ddt_bias", "dD") else 1)) for k in errs}
    if tols is not None:
        tol = {k: tols.get(k, tols["g"]) for k in errs}
    bad = {k: e for k, e in errs.items() if not e <= tol[k]}
    if bad and set(bad) <= {"dA", "ddt_bias", "dD"} and ref_fn is ssd_sequential_ref:
        # On rare inputs these sums cancel to a small fraction of their terms, and the chunked
        # algorithm itself loses digits (seed 1892252500 of test_lengths_and_chunks[130-128]:
        # dA off by 8e-3 in the kernel, 1.6e-3 in PyTorch's chunked float32 reference, 3e-12
        # with the kernel in float64). Then the yardstick is that reference's own error.
        _, _, gc, _ = run_and_grads(ssd_chunked_ref, t, seq_idx, chunk, softplus, limit, final, go)
        floor = {k: 10 * rel_err(gc[k[1:]], gr[k[1:]]) for k in bad}
        bad = {k: e for k, e in bad.items() if not e <= floor[k]}
        errs.update({f"{k} (10x chunked fp32 ref)": v for k, v in floor.items()})
    assert not bad, f"seed={seed} errors={errs}"


# ---------------------------------------------------------------------------------------
# Triton path (interpreter on a CPU) against the float64 sequential recurrence
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("struct", list(STRUCTS))
def test_head_structures(struct):
    seed = fresh_seed()
    t, seq = make_inputs(2, 45, 4, 16, 16, struct=struct)
    compare(ssd_chunked, t, seq, 16, 2e-5, 2e-4, seed, tols=cpu_tols())


@pytest.mark.parametrize("L,chunk", [(1, 16), (16, 16), (33, 16), (100, 32), (70, 64), (130, 128)])
def test_lengths_and_chunks(L, chunk):
    seed = fresh_seed()
    t, seq = make_inputs(1, L, 2, 16, 32, struct="mva", seq=L > 2)
    compare(ssd_chunked, t, seq, chunk, 2e-5, 2e-4, seed, tols=cpu_tols())


@pytest.mark.parametrize("struct,N", [("mva", 256), ("mha", 160), ("gva", 200)])
def test_wide_state(struct, N):
    """N > 128: the forward chunk kernel takes C S^T in 64-wide state slices (N = 160 and 200
    leave the last slices partly or wholly masked), and the state walks may take the whole N
    as one tile."""
    seed = fresh_seed()
    t, seq = make_inputs(1, 40, 4, 16, N, struct=struct, seq=True)
    compare(ssd_chunked, t, seq, 16, 2e-5, 2e-4, seed, tols=cpu_tols())


@pytest.mark.parametrize("opts", [
    dict(D=None, z=False, bias=False, init=False, seq=False),
    dict(D="hp", z=True, bias=False, init=False, seq=True),
    dict(D="h", z=False, bias=True, init=True, seq=False),
    dict(D=None, z=True, bias=True, init=True, seq=True),
])
@pytest.mark.parametrize("softplus,limit", [(True, (0.0, float("inf"))), (True, (0.05, 0.4)), (False, (0.0, float("inf")))])
def test_options(opts, softplus, limit):
    seed = fresh_seed()
    t, seq = make_inputs(2, 40, 2, 16, 16, struct="gva", **opts)
    if not softplus:
        # dt (+ dt_bias) is used as given: keep it positive, or the decay exp(dt A) > 1 makes
        # the state overflow over the sequence and the comparison meaningless
        t["dt"] = t["dt"].abs() * 0.3
        if t.get("dt_bias") is not None:
            t["dt_bias"] = t["dt_bias"].abs() * 0.3
    compare(ssd_chunked, t, seq, 16, 2e-5, 2e-4, seed, softplus=softplus, limit=limit, tols=cpu_tols())


def test_no_final_states_and_odd_sizes():
    """P and N that are not powers of two (masked tiles); no final state returned."""
    seed = fresh_seed()
    t, seq = make_inputs(2, 37, 3, 12, 20, struct="mha")
    compare(ssd_chunked, t, seq, 16, 2e-5, 2e-4, seed, final=False, tols=cpu_tols())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    seed = fresh_seed()
    t, seq = make_inputs(2, 50, 2, 16, 16, struct="mva", dtype=dtype)
    # the reference sees the same rounded inputs, so only the kernel's own error is measured
    compare(ssd_chunked, t, seq, 32, 1e-2, 2e-2, seed, tols=cpu_tols(dtype))


def test_non_contiguous_inputs():
    seed = fresh_seed()
    t, seq = make_inputs(2, 40, 2, 16, 16, struct="mha")
    big = {k: (None if v is None else torch.cat([v, v], dim=-1)) for k, v in t.items() if k in ("x", "B", "C", "z")}
    nc = dict(t)
    for k, v in big.items():
        if v is not None:
            nc[k] = v[..., ::2]  # stride 2 in the last dim
    nc["dt"] = t["dt"].transpose(1, 2).contiguous().transpose(1, 2)  # (batch, L, H) with L fastest
    assert not nc["x"].is_contiguous() and not nc["dt"].is_contiguous()
    compare(ssd_chunked, nc, seq, 16, 2e-5, 2e-4, seed, tols=cpu_tols())


# ---------------------------------------------------------------------------------------
# the PyTorch references and the decoding step
# ---------------------------------------------------------------------------------------
@pytest.mark.no_triton
@pytest.mark.parametrize("struct", ["mva", "mqa", "gva"])
def test_chunked_reference(struct):
    seed = fresh_seed()
    t, seq = make_inputs(2, 29, 4, 5, 6, struct=struct, D="hp", dtype=torch.float64, device="cpu")
    compare(ssd_chunked_ref, t, seq, 8, 1e-10, 1e-10, seed, limit=(0.05, 2.0))


@pytest.mark.no_triton
def test_cpu_dispatch_uses_reference(monkeypatch):
    """Without CUDA and without the interpreter ssd_chunked is the chunked reference."""
    seed = fresh_seed()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    t, seq = make_inputs(1, 20, 2, 4, 4, dtype=torch.float32, device="cpu")
    y = ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, D=t["D"], z=t["z"],
                    dt_bias=t["dt_bias"], dt_softplus=True, initial_states=t["initial_states"], seq_idx=seq)
    yr = ssd_chunked_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, D=t["D"], z=t["z"],
                         dt_bias=t["dt_bias"], dt_softplus=True, initial_states=t["initial_states"], seq_idx=seq)
    assert torch.equal(y, yr), f"seed={seed}"


@pytest.mark.no_triton
def test_step_matches_scan():
    seed = fresh_seed()
    t, _ = make_inputs(2, 12, 4, 8, 8, struct="gva", D="hp", seq=False, dtype=torch.float64, device="cpu")
    y, fs = ssd_sequential_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, D=t["D"], z=t["z"],
                               dt_bias=t["dt_bias"], dt_softplus=True, dt_limit=(0.01, 3.0),
                               initial_states=t["initial_states"], return_final_states=True)
    state = t["initial_states"]
    for i in range(12):
        yi, state = ssd_step(state, t["x"][:, i], t["dt"][:, i], t["A"], t["B"][:, i], t["C"][:, i],
                             D=t["D"], z=t["z"][:, i], dt_bias=t["dt_bias"], dt_softplus=True,
                             dt_limit=(0.01, 3.0))
        assert rel_err(yi, y[:, i]) < 1e-12, f"seed={seed} step {i}"
    assert rel_err(state, fs) < 1e-12, f"seed={seed}"


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------
def _good():
    t, seq = make_inputs(1, 8, 4, 4, 4, struct="mva", device="cpu")
    return dict(x=t["x"], dt=t["dt"], A=t["A"], B=t["B"], C=t["C"], chunk_size=4, D=t["D"],
                z=t["z"], dt_bias=t["dt_bias"], initial_states=t["initial_states"], seq_idx=seq)


@pytest.mark.no_triton
@pytest.mark.parametrize("name,change", [
    ("x", lambda a: a["x"][:, :, :, :, None]),
    ("dt", lambda a: a["dt"][:, :5]),
    ("A", lambda a: a["A"][:3]),
    ("B", lambda a: a["B"][:, :5]),
    ("C", lambda a: a["C"][..., :3]),
    ("C", lambda a: torch.randn(1, 8, 3, 4)),  # 3 groups do not divide 4 heads
    ("x", lambda a: torch.randn(1, 8, 3, 4)),
    ("chunk_size", lambda a: 12),
    ("chunk_size", lambda a: 0),
    ("D", lambda a: torch.randn(4, 5)),
    ("z", lambda a: a["z"][:, :, :2]),
    ("dt_bias", lambda a: torch.randn(5)),
    ("initial_states", lambda a: a["initial_states"][..., :2]),
    ("seq_idx", lambda a: torch.tensor([[0, 0, 1, 1, 0, 2, 2, 2]], dtype=torch.int32)),
    ("seq_idx", lambda a: a["seq_idx"].float()),
    ("x", lambda a: a["x"].int()),
])
def test_bad_input(name, change):
    args = _good()
    args[name] = change(args)
    for fn in (ssd_chunked,):
        with pytest.raises(ValueError, match=name):
            fn(**args)


@pytest.mark.no_triton
def test_prune_tiles():
    """The autotuner's pruning (GPU only, so checked here directly): time tiles within the
    chunk, state tiles within padded N, register caps only at head-dim tiles of at most 64."""
    prune = ssd_triton._prune_tiles
    fwd = ssd_triton._CHUNK_FWD_CONFIGS
    assert any(c.maxnreg for c in fwd)  # what the pruning below must remove at BP = 128
    kept = prune(fwd, {"N": 128}, Q=256, BP=64)
    assert kept == [c for c in fwd if c.kwargs["T"] <= 256]
    kept = prune(fwd, {"N": 128}, Q=64, BP=128)
    assert kept and all(c.maxnreg is None and c.kwargs["T"] <= 64 for c in kept)
    (only,) = prune(fwd, {"N": 128}, Q=32, BP=64)  # no listed T fits: one at the chunk size
    assert only.kwargs["T"] == 32
    state = prune(ssd_triton._STATE_CONFIGS, {"N": 64}, Q=256)
    assert state and all(c.kwargs["BN"] <= 64 for c in state)


# ---------------------------------------------------------------------------------------
# on the GPU: realistic shapes in every dtype
# ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not ON_GPU, reason="realistic shapes and bf16/fp16 tensor-core dots need a GPU")
@pytest.mark.parametrize("dtype,tol_y,tol_g", [(torch.float32, 1e-4, 1e-3), (torch.bfloat16, 1e-2, 2e-2),
                                                (torch.float16, 5e-3, 1e-2)])
@pytest.mark.parametrize("struct,N,L", [("mva", 128, 700), ("gva", 64, 512), ("mqa", 256, 300)])
def test_gpu_realistic(dtype, tol_y, tol_g, struct, N, L):
    seed = fresh_seed()
    t, seq = make_inputs(2, L, 8, 64, N, struct=struct, D="h", dtype=dtype)
    compare(ssd_chunked, t, seq, 256, tol_y, tol_g, seed,
            ref_fn=lambda *a, **k: ssd_chunked_ref(*a, **k))


@pytest.mark.skipif(not ON_GPU, reason="a compiled-kernel fault: only a GPU can show it")
@pytest.mark.parametrize("P,N,chunk", [(32, 64, 64), (16, 64, 64), (64, 64, 32), (32, 128, 64)])
def test_gpu_large_grid(P, N, chunk):
    """Many blocks at once (batch 64 x 256 tokens, H * P = 256), 20 forward+backward passes,
    then one comparison with the reference. Small test shapes cannot show a shared-memory
    overrun: it faults only when a block's shared window sits at the top of an SM, which needs
    many resident blocks. This is the shape of the Mamba-2 runs (d_model 128, headdim 32,
    d_state 64) that hit "an illegal memory access" on the H100 before the P tile was padded to
    64 (kernels/ssd_triton.py `_tiles`, notes/ssd.md)."""
    seed = fresh_seed()
    t, seq = make_inputs(64, 256, 256 // P, P, N, struct="mva", D="h", z=False, init=False, seq=False,
                         dtype=torch.bfloat16)
    for _ in range(20):
        run_and_grads(ssd_chunked, t, seq, chunk)
    torch.cuda.synchronize()
    compare(ssd_chunked, t, seq, chunk, 1e-2, 2e-2, seed,
            ref_fn=lambda *a, **k: ssd_chunked_ref(*a, **k))


@pytest.mark.skipif(not ON_GPU, reason="a compiled-kernel fault: only a GPU can show it")
@pytest.mark.parametrize("N", [16, 32])
def test_gpu_small_state_reference_grid(N):
    """The scan benchmark's SSD shape with a small state (batch 16 x 4096 tokens, H = 32,
    P = 64, chunk 256, autotuned): with N = 16 one autotuned dB config faulted ("an illegal
    memory access", session 5) before the N tile was padded to 64 like the P tile."""
    seed = fresh_seed()
    t, seq = make_inputs(16, 4096, 32, 64, N, struct="mva", D="h", z=False, init=False, seq=False,
                         dtype=torch.bfloat16)
    for _ in range(3):  # the full grid: a fault raises here
        y, _, grads, _ = run_and_grads(ssd_chunked, t, seq, 256)
    torch.cuda.synchronize()
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    # the float64 reference on two rows: on all 16 it took 33 GB and starved the other
    # GPU test workers (out of memory, session 5)
    t2 = {k: (v[:2] if v is not None and v.dim() > 1 and v.shape[0] == 16 else v) for k, v in t.items()}
    compare(ssd_chunked, t2, seq, 256, 1e-2, 2e-2, seed,
            ref_fn=lambda *a, **k: ssd_chunked_ref(*a, **k))
