"""Properties every architecture in the zoo must have: causality, document isolation,
parameter accounting and weight-decay grouping. New architectures add a constructor to TINY."""

import pytest
import torch
from conftest import fresh_seed, with_seed

from ssdbench.errors import ConfigError
from ssdbench.lit import SequenceLM, warmup_cosine
from ssdbench.models.mamba2 import Mamba2
from ssdbench.models.transformerpp import TransformerPP

V = 97
TINY = {
    "transformerpp": lambda: TransformerPP(V, d_model=32, n_layers=2, n_heads=4),
    "transformerpp-gqa": lambda: TransformerPP(V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2),
    "transformerpp-abs": lambda: TransformerPP(V, d_model=32, n_layers=2, n_heads=4, rope=False, abs_positions=True),
    "transformerpp-nope": lambda: TransformerPP(V, d_model=32, n_layers=2, n_heads=4, rope=False),
    "based": lambda: __import__("ssdbench.models.based", fromlist=["Based"]).Based(V, d_model=32, n_layers=3, n_heads=4, feature_dim=8, window=4, layer_pattern=["linear_attn", "sliding_window", "base_conv"]),
    "based-chain": lambda: __import__("ssdbench.models.based", fromlist=["Based"]).Based(V, d_model=32, n_layers=2, n_heads=2, window=3, mlp=False, layer_pattern=["base_conv+linear_attn", "base_conv+sliding_window"]),
    "mamba2": lambda: Mamba2(V, d_model=32, n_layers=2, d_state=16, headdim=16, chunk_size=8, impl="torch"),
    "mamba2-mqa": lambda: Mamba2(V, d_model=32, n_layers=2, d_state=16, headdim=16, chunk_size=8,
                                 head_structure="mqa", impl="torch"),
    "mamba1": lambda: __import__("ssdbench.models.mamba1", fromlist=["Mamba1"]).Mamba1(V, d_model=32, n_layers=2, d_state=8, d_conv=3, impl="torch"),
}




@pytest.mark.parametrize("name", sorted(TINY))
def test_causal(name):
    """The output at t must not change when inputs after t change."""
    seed, rng = fresh_seed()
    model = TINY[name]().double().eval()
    L = rng.randint(8, 40)
    t = rng.randrange(1, L - 1)
    x = torch.randint(0, V, (2, L))
    x2 = x.clone()
    x2[:, t + 1:] = torch.randint(0, V, (2, L - t - 1))
    with torch.no_grad():
        y, y2 = model(x), model(x2)
    assert y.shape == (2, L, V), f"seed={seed}"
    torch.testing.assert_close(y[:, : t + 1], y2[:, : t + 1], msg=with_seed(seed))
    assert not torch.allclose(y[:, t + 1:], y2[:, t + 1:]), f"seed={seed}"  # the change is visible later


@pytest.mark.parametrize("name", sorted(TINY))
def test_packed_documents_are_isolated(name):
    """With seq_idx, each packed document gives the same logits as when run alone."""
    seed, rng = fresh_seed()
    model = TINY[name]().double().eval()
    lengths = [rng.randint(3, 12) for _ in range(3)]
    docs = [torch.randint(0, V, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)  # (1, sum(lengths))
    seq_idx = torch.cat([torch.full((1, n), i, dtype=torch.int32) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        y = model(packed, seq_idx=seq_idx)
        alone = torch.cat([model(d) for d in docs], dim=1)
    torch.testing.assert_close(y, alone, msg=with_seed(seed))


@pytest.mark.parametrize("name", ["transformerpp", "mamba2"])
def test_forward_with_labels_is_the_mean_cross_entropy(name):
    """forward(..., labels) (the trainer's fused loss) = cross-entropy of forward's logits over
    the labelled tokens, with the same gradients; padded vocabulary rows never count."""
    seed, _ = fresh_seed()
    model = TINY[name]().double()
    x = torch.randint(0, V, (3, 17))
    labels = torch.randint(0, V, (3, 17))
    labels[0, :5] = -100  # ignored (e.g. the prompt of a synthetic task)
    loss = model(x, labels=labels)
    (g,) = torch.autograd.grad(loss, [model.embedding.weight])
    logits = model(x)  # (3, 17, V)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    (gr,) = torch.autograd.grad(ref, [model.embedding.weight])
    assert loss.shape == () and model.padded_vocab >= V
    torch.testing.assert_close(loss, ref, msg=with_seed(seed))
    torch.testing.assert_close(g, gr, msg=with_seed(seed))


@pytest.mark.parametrize("name", sorted(TINY))
def test_norm_output_in_autocast_dtype_changes_nothing(name):
    """Under autocast the blocks hand their mixers and MLPs the normed stream already in the
    autocast dtype (lm.Block._normed; the projection that opens each would cast it anyway):
    the logits are bitwise those of handing it over in fp32, and the modules that opt out
    (a chain of sub-mixers with residuals of their own) receive fp32."""
    model = TINY[name]().eval()
    x = torch.randint(0, V, (2, 19))
    seen = []
    consumers = [m for layer in model.layers for m in (layer.mixer, layer.mlp) if m is not None]
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append((m, a[0].dtype))) for m in consumers]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        for m in consumers:
            m.input_to_autocast = False
        y_fp32_inputs = model(x)
    for h in hooks:
        h.remove()
    n = len(consumers)
    for m, dtype in seen[:n]:
        assert dtype == (torch.bfloat16 if type(m).__dict__.get("input_to_autocast", True) else torch.float32)
    assert all(dtype == torch.float32 for _, dtype in seen[n:])
    torch.testing.assert_close(y, y_fp32_inputs, rtol=0, atol=0)


@pytest.mark.parametrize("kv,structure", [(2, "mha"), (None, "mqa")], ids=["gqa", "mqa"])
def test_shared_kv_heads_equal_mha_with_tiled_weights(kv, structure):
    """Attention with key/value heads shared by groups of query heads (GQA, MQA) equals plain
    multi-head attention whose key and value weights repeat each shared head for its group."""
    from ssdbench.models.transformerpp import Attention
    seed, _ = fresh_seed()
    d, H = 32, 4
    Dh = d // H
    shared = Attention(d, H, kv, head_structure=structure).double()
    G = shared.Hk
    mha = Attention(d, H).double()
    q, k, v = shared.qkv.weight.detach().split([H * Dh, G * Dh, G * Dh])
    tile = lambda w: w.view(G, Dh, d).repeat_interleave(H // G, dim=0).reshape(H * Dh, d)  # head h uses h // (H / G)
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([q, tile(k), tile(v)]))
        mha.out.weight.copy_(shared.out.weight)
    x = torch.randn(2, 11, d, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 5 + [1] * 6] * 2, dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(shared(x), mha(x), msg=with_seed(seed))
        torch.testing.assert_close(shared(x, seq_idx=seq_idx), mha(x, seq_idx=seq_idx), msg=with_seed(seed))


def test_transformerpp_param_count_and_flops():
    m = TransformerPP(50280, d_model=768, n_layers=12, n_heads=12)
    # embedding (tied) + 12 x (attention 4 d^2 + SwiGLU 3 * d * 2048 + 2 norms) + final norm
    d = 768
    expected = 50280 * d + 12 * (4 * d * d + 3 * d * 2048 + 2 * d) + d
    assert m.num_params() == expected
    assert m.num_params(non_embedding=True) == expected - 50280 * d
    T = 2048
    fwd = 2 * (12 * (4 * d * d + 3 * d * 2048)) + 2 * d * 50280 + 12 * 4 * T * d
    assert m.flops_per_token(T) == fwd


def test_no_weight_decay_groups():
    m = TINY["transformerpp"]()
    skip = m.no_weight_decay_params()
    names = {n for n, p in m.named_parameters() if id(p) in skip}
    assert "embedding.weight" in names
    assert all(("norm" in n) or n == "embedding.weight" for n in names)
    decayed = {n for n, p in m.named_parameters() if id(p) not in skip}
    assert decayed and all(p.ndim == 2 for n, p in m.named_parameters() if n in decayed)
    opt = SequenceLM(m).configure_optimizers()["optimizer"]
    wd = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    assert wd[0.0] == sum(p.numel() for n, p in m.named_parameters() if n in names)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100, 0.01) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.01) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, 0.01) == pytest.approx(0.01)
    mid = warmup_cosine(55, 10, 100, 0.01)
    assert 0.01 < mid < 1.0


@pytest.mark.parametrize("kwargs,field", [
    (dict(d_model=30, n_heads=4), "model.d_model"),
    (dict(d_model=32, n_heads=4, n_kv_heads=3), "model.n_kv_heads"),
    (dict(d_model=0, n_heads=4), "model.d_model"),
])
def test_bad_transformer_config(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        TransformerPP(V, n_layers=1, **kwargs)


def test_absolute_positions_by_hand():
    """The sinusoidal encoding at a few positions, written out; positions restart at every
    packed document; and they reach the output: with RoPE off, the same tokens give different
    logits when they sit at other positions only if abs_positions is on."""
    import math

    from ssdbench.models.transformerpp import positions_in_documents, sinusoidal_positions

    pe = sinusoidal_positions(torch.tensor([0, 1, 7]), 6)  # (3, 6)
    for row, p in enumerate((0, 1, 7)):
        want = []
        for i in range(3):
            w = p / 10000 ** (2 * i / 6)
            want += [math.sin(w), math.cos(w)]
        torch.testing.assert_close(pe[row], torch.tensor(want), rtol=1e-6, atol=1e-6)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert positions_in_documents(seq_idx).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]

    x = torch.tensor([[5, 5, 5, 5]])
    for abs_positions, differ in ((False, False), (True, True)):
        torch.manual_seed(0)
        m = TransformerPP(V, d_model=32, n_layers=1, n_heads=4, rope=False, abs_positions=abs_positions).double()
        with torch.no_grad():
            y = m(x)[0]  # (4, V): one token repeated: without positions every position sees the same
        assert (not torch.allclose(y[0], y[3])) == differ, abs_positions
