"""Based model: decoding equals the full forward for every mixer kind, the window never
reaches further back than `window` tokens nor across documents, accounting, config errors."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, ON_GPU, fresh_seed, with_seed

from ssdbench.errors import ConfigError
from ssdbench.kernels.based import based_state_size
from ssdbench.models.based import HAS_FLEX, Based, flex_window_attention, layer_kinds, window_mask

V = 53




def decode(model, x):
    """Logits from LanguageModel.step, token by token: (batch, L, V)."""
    state = model.allocate_state(x.shape[0], dtype=torch.float64)
    out = []
    for t in range(x.shape[1]):
        logits, state = model.step(x[:, t], state)
        out.append(logits)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("pattern", [
    ["linear_attn"], ["sliding_window"], ["base_conv"],
    ["base_conv+linear_attn", "base_conv+sliding_window"], "lm", "mqar",
])
@pytest.mark.parametrize("normalize", [True, False])
def test_step_equals_forward(pattern, normalize):
    seed, rng = fresh_seed()
    n_layers = 5 if pattern == "lm" else (len(pattern) if isinstance(pattern, list) else 2)
    window = rng.randint(2, 6)
    L = window * 2 + rng.randint(1, 7)  # decoding runs well past the window
    model = Based(V, d_model=16, n_layers=n_layers, n_heads=2, feature_dim=4, window=window,
                  layer_pattern=pattern, normalize=normalize, mlp=rng.random() < 0.5).double().eval()
    x = torch.randint(0, V, (2, L))
    with torch.no_grad():
        full = model(x)
        stepped = decode(model, x)
    torch.testing.assert_close(stepped, full, rtol=1e-9, atol=1e-9, msg=with_seed(seed))


def window_only(window):
    return Based(V, d_model=16, n_layers=1, n_heads=2, window=window, layer_pattern=["sliding_window"]).double().eval()


def test_window_never_reaches_further_back():
    """Changing token p moves the outputs at p .. p+window-1 and no later one."""
    seed, rng = fresh_seed()
    window = rng.randint(2, 8)
    model = window_only(window)
    L = 3 * window + 5
    p = rng.randrange(0, L - window - 1)
    x = torch.randint(0, V, (2, L))
    x2 = x.clone()
    x2[:, p] = (x[:, p] + 1 + torch.randint(0, V - 1, (2,))) % V
    with torch.no_grad():
        y, y2 = model(x), model(x2)
    torch.testing.assert_close(y[:, :p], y2[:, :p], msg=with_seed(seed))
    torch.testing.assert_close(y[:, p + window:], y2[:, p + window:], msg=with_seed(seed))
    diff = (y - y2).abs().amax(dim=(0, 2))  # (L,)
    assert (diff[p:p + window] > 1e-8).all(), f"seed={seed}"  # every position inside the window sees the change


def test_window_mask_band_and_documents():
    L, window = 10, 3
    m = window_mask(L, window, None, "cpu")
    for i in range(L):
        allowed = [j for j in range(L) if m[i, j]]
        assert allowed == list(range(max(0, i - window + 1), i + 1))
    seq = torch.tensor([[0] * 4 + [1] * 6])
    md = window_mask(L, window, seq, "cpu")[0, 0]
    assert not md[4, 3] and md[5, 4] and md[6, 4] and not md[7, 4] and md[3, 2]


def test_window_isolates_documents():
    seed, rng = fresh_seed()
    window = rng.randint(3, 8)
    model = window_only(window)
    lengths = [rng.randint(2, 2 * window) for _ in range(3)]
    docs = [torch.randint(0, V, (1, n)) for n in lengths]
    seq_idx = torch.cat([torch.full((1, n), i, dtype=torch.int32) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        packed = model(torch.cat(docs, dim=1), seq_idx=seq_idx)
        alone = torch.cat([model(d) for d in docs], dim=1)
    torch.testing.assert_close(packed, alone, msg=with_seed(seed))


def test_param_and_state_accounting():
    d, H, Fd, W, k, e = 64, 4, 16, 32, 3, 2
    P = d // H
    m = Based(1000, d_model=d, n_layers=3, n_heads=H, feature_dim=Fd, window=W, conv_kernel=k,
              conv_expand=e, layer_pattern=["linear_attn", "sliding_window", "base_conv"], mlp=False,
              pad_vocab_multiple=8)
    lin = d * (2 * H * Fd + d) + d * d  # qkv (q, k in feature space, v) + out
    swa = d * 3 * d + d * d
    conv = d * 2 * e * d + e * d * k + e * d + e * d * d  # in_proj, conv weight + bias, out_proj
    norms = 3 * d + d  # one norm per block (no MLP) + final norm
    assert m.num_params() == 1000 * d + lin + swa + conv + norms
    assert m.state_size() == based_state_size(Fd, P, H) + 2 * W * d + e * d * (k - 1)
    assert based_state_size(Fd, P, H) == H * 273 * (P + 1)
    T = 256
    linears = 2 * (lin + swa + e * d * 2 * d + e * d * d) + 2 * d * 1000
    extra = 4 * H * 273 * (P + 1) + 4 * W * d + 2 * e * d * k
    assert m.flops_per_token(T) == linears + extra
    assert m.flops_per_token(8) == linears + extra - 4 * (W - 8) * d  # window term capped by L
    # the conv weights keep PyTorch's init; the residual projections are scaled down
    assert m.layers[2].mixer.conv1d.weight.std() > 0.1


def test_presets():
    assert layer_kinds("mqar", 2) == [["base_conv"], ["linear_attn"]]
    lm = [k[0] for k in layer_kinds("lm", 27)]
    assert [i for i, k in enumerate(lm) if k == "linear_attn"] == [1, 6, 11, 16, 21, 26]
    assert [i for i, k in enumerate(lm) if k == "sliding_window"] == [2, 7, 12, 17, 22]
    assert lm.count("base_conv") == 16
    assert layer_kinds("base_conv+linear_attn", 2) == [["base_conv", "linear_attn"]] * 2


@pytest.mark.parametrize("kwargs,field", [
    (dict(feature_dim=33), "model.feature_dim"),
    (dict(feature_dim=0), "model.feature_dim"),
    (dict(window=0), "model.window"),
    (dict(window=-4), "model.window"),
    (dict(d_model=30, n_heads=4), "model.d_model"),
    (dict(layer_pattern=["linear_attn", "mamba"]), "model.layer_pattern"),
    (dict(layer_pattern=["linear_attn"]), "model.layer_pattern"),
    (dict(layer_pattern="transformer"), "model.layer_pattern"),
    (dict(conv_kernel=5), "model.conv_kernel"),
    (dict(impl="cuda"), "model.impl"),
    (dict(window_impl="flash"), "model.window_impl"),
    (dict(d_model=12, n_heads=4, layer_pattern=["sliding_window"] * 2), "model.n_heads"),
])
def test_bad_config(kwargs, field):
    args = dict(d_model=32, n_layers=2, n_heads=4)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=field):
        Based(V, **args)


def test_trains_one_step_float32():
    """A float32 forward/backward through every mixer kind with packed documents."""
    model = Based(V, d_model=16, n_layers=3, n_heads=2, feature_dim=4, window=4,
                  layer_pattern=["linear_attn", "sliding_window", "base_conv"])
    x = torch.randint(0, V, (2, 20))
    seq_idx = torch.cat([torch.zeros(2, 9), torch.ones(2, 11)], dim=1).to(torch.int32)
    loss = torch.nn.functional.cross_entropy(model(x, seq_idx=seq_idx).flatten(0, 1), x.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_cli_run_based(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "ssdbench.cli", "run", "model=based", "experiment=mqar_tiny",
                        "progress_bar=false", f"results_dir={tmp_path}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]


# FlexAttention's window (models.based.flex_window_attention, compiled) against the band mask in
# float64. Limits near the measured error (max |out - ref| / max |ref|): CPU fp32 ~3e-7; on a GPU
# fp32 ~1e-6 (TF32 off in FlexAttention), bf16 ~4e-3, fp16 ~5e-4.
FLEX_TOL = {torch.float32: 5e-6, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def _band_attention64(q, k, v, window, seq_idx):
    """softmax(q k^T / sqrt(P) over the band) v in float64: (batch, H, L, P)."""
    q, k, v = (t.double() for t in (q, k, v))
    L, P = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-1, -2) / P ** 0.5  # (batch, H, L, L)
    allowed = window_mask(L, window, None if seq_idx is None else seq_idx.to(q.device), q.device)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


@pytest.mark.skipif(not HAS_FLEX, reason="FlexAttention needs torch >= 2.5")
@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16, torch.float16] if ON_GPU else []))
@pytest.mark.parametrize("docs", [False, True])
def test_flex_window_attention_equals_the_band_mask(dtype, docs):
    seed = fresh_seed()
    batch, H, L, P, window = 2, 2, 256, 16, 48  # L over FlexAttention's 128-token blocks, the window across them
    q, k, v = (torch.randn(batch, H, L, P, device=DEVICE, dtype=dtype) for _ in range(3))
    seq_idx = None
    if docs:  # documents of random lengths, one boundary inside the window of its next tokens
        cuts = sorted(torch.randint(1, L, (4,)).tolist())
        seq_idx = torch.zeros(batch, L, dtype=torch.int32, device=DEVICE)
        for c in cuts:
            seq_idx[:, c:] += 1
    out = flex_window_attention(q, k, v, window, seq_idx)
    ref = _band_attention64(q, k, v, window, seq_idx)
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < FLEX_TOL[dtype], f"seed={seed}: relative error {err:.3g} (limit {FLEX_TOL[dtype]:.3g})"
