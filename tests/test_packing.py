"""Packing without padding: a window of several documents, with the seq_idx that task=pile makes,
gives every document the same losses as running it alone (fp32), for all four architectures.

The window comes from real prepared shards (ssdbench.tasks.pile.Split.window), so this checks
the data side (where segments start: at each end-of-text token) and the models' seq_idx
handling together. Document k alone is [end-of-text, its tokens..., end-of-text]: the model
reads all but the last token and predicts all but the first.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, TRITON_LAUNCHES
from ssdbench.models.based import Based
from ssdbench.models.mamba1 import Mamba1
from ssdbench.models.mamba2 import Mamba2
from ssdbench.models.transformerpp import TransformerPP
from ssdbench.prepare_data import prepare
from ssdbench.tasks.pile import Split

V = 257  # the byte tokenizer's vocabulary
# The tiny configurations of tests/test_models.py (TINY), at the byte vocabulary.
MODELS = {
    "transformerpp": lambda: TransformerPP(V, d_model=32, n_layers=2, n_heads=4),
    "mamba1": lambda: Mamba1(V, d_model=32, n_layers=2, d_state=8, d_conv=3, impl="torch"),
    "mamba2": lambda: Mamba2(V, d_model=32, n_layers=2, d_state=16, headdim=16, chunk_size=8, impl="torch"),
    "based": lambda: Based(V, d_model=32, n_layers=3, n_heads=4, feature_dim=8, window=4,
                           layer_pattern=["linear_attn", "sliding_window", "base_conv"]),
}
DOCS = ["In the beginning", "God created the heaven and the earth.", "Amen.", "And the earth was without form"]


@pytest.fixture(scope="module")
def window(tmp_path_factory):
    """One window from the end-of-text before document 1 to the end of the last document."""
    root = tmp_path_factory.mktemp("packing")
    with open(root / "d.jsonl", "w") as f:
        for d in DOCS:
            f.write(json.dumps({"text": d}) + "\n")
    prepare([root / "d.jsonl"], root / "out", val_fraction=0.0, workers=0, progress=False)
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    split = Split(root / "out", manifest, "train", ["(none)"])
    start = len(DOCS[0].encode())  # the end-of-text of document 0
    seq_len = int(split.sizes[0]) - start - 1
    toks, seq_idx, _ = split.window(0, start, seq_len)
    return torch.from_numpy(toks), torch.from_numpy(seq_idx)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_packed_documents_score_as_if_alone(name, window):
    torch.manual_seed(0)
    model = MODELS[name]().float().eval()
    toks, seq_idx = window  # (L + 1,), (L,)
    assert seq_idx.tolist() == sum(([k] * (len(d.encode()) + 1) for k, d in enumerate(DOCS[1:])), [])
    with torch.no_grad():
        logits = model(toks[None, :-1], seq_idx=seq_idx[None])[0]  # (L, V)
        packed = F.cross_entropy(logits, toks[1:], reduction="none")  # (L,) nats per position
        for k, doc in enumerate(DOCS[1:]):
            alone_toks = torch.tensor([256] + list(doc.encode()) + [256])  # (n + 2,)
            alone = F.cross_entropy(model(alone_toks[None, :-1])[0], alone_toks[1:], reduction="none")
            mine = packed[seq_idx == k]
            torch.testing.assert_close(mine, alone, rtol=1e-5, atol=1e-5)
            assert abs(float(mine.mean()) - float(alone.mean())) < 1e-5


@pytest.mark.parametrize("name", ["transformerpp", "mamba2"])
def test_without_seq_idx_documents_see_each_other(name, window):
    """The control: without seq_idx the later documents' losses do change (context leaks in)."""
    torch.manual_seed(0)
    model = MODELS[name]().float().eval()
    toks, seq_idx = window
    with torch.no_grad():
        a = F.cross_entropy(model(toks[None, :-1], seq_idx=seq_idx[None])[0], toks[1:], reduction="none")
        b = F.cross_entropy(model(toks[None, :-1])[0], toks[1:], reduction="none")
    assert torch.allclose(a[seq_idx == 0], b[seq_idx == 0], atol=1e-5)  # the first is unaffected
    assert not torch.allclose(a[seq_idx == 2], b[seq_idx == 2], atol=1e-4)
    assert np.isfinite(b.numpy()).all()


# The same architectures on the Triton kernels (selective scan, SSD, causal conv, Taylor
# attention), on conftest's DEVICE: compiled on the GPU where there is one (the kernels refuse
# CPU tensors there), else under the interpreter (conftest sets TRITON_INTERPRET=1) on the CPU.
TRITON_MODELS = {
    "mamba2": lambda: Mamba2(V, d_model=32, n_layers=2, d_state=16, headdim=16, chunk_size=8, impl="triton"),
    "based": lambda: Based(V, d_model=32, n_layers=3, n_heads=4, feature_dim=8, window=4, impl="triton",
                           layer_pattern=["linear_attn", "sliding_window", "base_conv"]),
}


def _launches() -> int:
    return TRITON_LAUNCHES[0]


@pytest.mark.parametrize("name", sorted(TRITON_MODELS))
def test_packed_documents_score_as_if_alone_on_triton_kernels(name, window):
    torch.manual_seed(0)
    model = TRITON_MODELS[name]().float().eval().to(DEVICE)
    toks, seq_idx = (t.to(DEVICE) for t in window)  # (L + 1,), (L,)
    before = _launches()
    with torch.no_grad():
        packed = F.cross_entropy(model(toks[None, :-1], seq_idx=seq_idx[None])[0], toks[1:], reduction="none")
        for k, doc in enumerate(DOCS[1:]):
            alone_toks = torch.tensor([256] + list(doc.encode()) + [256], device=DEVICE)
            alone = F.cross_entropy(model(alone_toks[None, :-1])[0], alone_toks[1:], reduction="none")
            torch.testing.assert_close(packed[seq_idx == k], alone, rtol=1e-5, atol=1e-5)
    assert _launches() > before, "the Triton path did not run"


def _embedding_grad(model, toks, seq_idx, k):
    """d(loss on document k's positions) / d(the embedding outputs of every position), (L, d)."""
    grabbed = []

    def hook(module, inputs, out):
        out.retain_grad()
        grabbed.append(out)

    handle = model.embedding.register_forward_hook(hook)
    try:
        logits = model(toks[None, :-1], seq_idx=seq_idx[None])[0]  # (L, V)
    finally:
        handle.remove()
    F.cross_entropy(logits[seq_idx == k], toks[1:][seq_idx == k]).backward()
    return grabbed[0].grad[0]  # (L, d)


@pytest.mark.parametrize("name,triton", [(n, False) for n in sorted(MODELS)] + [(n, True) for n in sorted(TRITON_MODELS)])
def test_document_gradient_does_not_reach_other_documents(name, triton, window):
    """Backward through packing: the loss of document k has exactly zero gradient with respect
    to the (embedded) tokens of every other document, earlier ones included."""
    _check_gradient_isolation(name, triton, window, exact=name != "mamba2")


def _check_gradient_isolation(name, triton, window, exact):
    torch.manual_seed(0)
    device = DEVICE if triton else "cpu"
    model = (TRITON_MODELS if triton else MODELS)[name]().float().to(device)
    toks, seq_idx = (t.to(device) for t in window)  # (L + 1,), (L,)
    before = _launches()
    for k in ((2,) if triton else (1, 2)):  # the interpreter is slow: the last document only
        model.zero_grad()
        g = _embedding_grad(model, toks, seq_idx, k)  # (L, d)
        own = g[seq_idx == k].abs().max()
        assert own > 0  # the document's own tokens do matter
        others = g[seq_idx != k]
        if exact:
            assert torch.equal(others, torch.zeros_like(others)), \
                f"document {k}: gradient {others.abs().max():.3g} leaks to other documents' tokens"
        else:  # Mamba-2's chunked SSD leaks ~1e-11 (see the xfail test below)
            assert others.abs().max() <= 1e-6 * own, f"document {k}: {others.abs().max():.3g} vs {own:.3g}"
    if triton:
        assert _launches() > before, "the Triton path did not run"


@pytest.mark.xfail(strict=True, reason="Mamba-2's chunked SSD (PyTorch and Triton) lets ~1e-11 of gradient "
                                       "through to earlier documents: decays not masked to exact zeros")
def test_mamba2_document_gradient_is_exactly_zero(window):
    _check_gradient_isolation("mamba2", False, window, exact=True)
