"""task=pile: windows, determinism, seq_idx, slices, the vocabulary check, the embedded corpus,
tokenizers and the language-modelling metrics (ppl, bits per byte)."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ssdbench.errors import ConfigError
from ssdbench.lit import SequenceLM, lm_metrics
from ssdbench.models.transformerpp import TransformerPP
from ssdbench.prepare_data import prepare
from ssdbench.tasks import pile
from ssdbench.tasks.pile import PileDataModule, TrainWindows
from ssdbench.tokenizer import TokenizerNotFound, load_tokenizer

EOT = 256


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Documents of 'a's (subset A) and of 'b's (subset B), so a token tells its subset."""
    root = tmp_path_factory.mktemp("pile")
    rng = np.random.default_rng(0)
    with open(root / "docs.jsonl", "w") as f:
        for i in range(400):
            name = "AB"[i % 2]
            f.write(json.dumps({"text": name.lower() * int(rng.integers(1, 40)), "meta": {"pile_set_name": name}}) + "\n")
    prepare([root / "docs.jsonl"], root / "out", val_fraction=0.3, workers=0, progress=False)
    return root / "out"


def dm_for(data_dir, **kw):
    args = dict(data_dir=str(data_dir), seq_len=32, batch_size=4, val_windows=16, seed=0)
    args.update(kw)
    dm = PileDataModule(**args)
    dm.setup("fit")
    return dm


def batches(dm, n):
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def test_windows_and_determinism(data_dir):
    dm = dm_for(data_dir)
    assert dm.vocab_size == 257 and dm.max_seq_len == 32 and dm.slice_names == ["A", "B"]
    b = batches(dm, 3)
    assert b[0]["input_ids"].shape == b[0]["labels"].shape == (4, 32) and "seq_idx" not in b[0]
    # labels are the inputs shifted by one: windows of seq_len + 1 tokens
    assert torch.equal(b[0]["input_ids"][:, 1:], b[0]["labels"][:, :-1])
    same = batches(dm_for(data_dir), 3)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(b, same))
    other = batches(dm_for(data_dir, seed=1), 1)
    assert not torch.equal(b[0]["input_ids"], other[0]["input_ids"])
    # a resumed run continues the stream: after 2 optimizer steps the next batch is the third
    resumed = dm_for(data_dir)
    resumed.trainer = SimpleNamespace(global_step=2, accumulate_grad_batches=1, max_steps=5)
    loader = resumed.train_dataloader()
    assert len(loader) == 3 and torch.equal(next(iter(loader))["input_ids"], b[2]["input_ids"])
    # examples do not depend on the batch size: one batch of 8 is two batches of 4
    big = batches(dm_for(data_dir, batch_size=8), 1)[0]
    assert torch.equal(big["input_ids"], torch.cat([b[0]["input_ids"], b[1]["input_ids"]]))
    assert len(TrainWindows(dm.train_split, 32, 0, False)) > 10**12


def test_loader_workers_do_not_change_the_stream(data_dir):
    b0 = batches(dm_for(data_dir), 4)
    b2 = batches(dm_for(data_dir, num_workers=2), 4)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(b0, b2))


def test_seq_idx_marks_documents(data_dir):
    dm = dm_for(data_dir, packing=True, batch_size=16)
    for b in batches(dm, 3) + list(dm.val_dataloader()):
        seq_idx, x = b["seq_idx"], b["input_ids"]
        assert seq_idx.dtype == torch.int32 and seq_idx.shape == x.shape
        assert (seq_idx[:, 0] == 0).all()
        step = seq_idx[:, 1:] - seq_idx[:, :-1]  # (batch, L - 1)
        # non-decreasing, +1 exactly where an end-of-text token opens the next document
        assert torch.equal(step, (x[:, 1:] == EOT).int())


def test_validation_set_is_fixed_and_sliced(data_dir):
    dm, dm2 = dm_for(data_dir, packing=True), dm_for(data_dir, seed=5, packing=True)
    assert len(dm.val_set) == 16 and dm.val_set.items == dm2.val_set.items  # independent of the seed
    starts = [s for _, s in dm.val_set.items]
    assert all(b - a >= 33 for a, b in zip(starts, starts[1:]))  # non-overlapping windows
    for b in dm.val_dataloader():
        lab, sl = b["labels"], b["slice"]
        assert sl.shape == lab.shape and (b["label_bytes"] == 1).all()  # bytes: one per token
        # a label's slice is its document's subset: 'a' tokens are in A (0), 'b' in B (1)
        assert (sl[lab == ord("a")] == 0).all() and (sl[lab == ord("b")] == 1).all()
    assert dm.bytes_per_token == 1.0


def test_vocab_checks(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="task.vocab_size"):
        PileDataModule(data_dir=str(data_dir), vocab_size=100)
    assert PileDataModule(data_dir=str(data_dir), vocab_size=512).vocab_size == 512
    with pytest.raises(ConfigError, match="task.data_dir: .* no manifest.json"):
        PileDataModule(data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="task.seq_len"):
        dm_for(data_dir, seq_len=100_000)
    with pytest.raises(ConfigError, match="task.tokenizer"):
        PileDataModule(tokenizer="no-such-tokenizer")


def test_config_ties_model_vocab_to_the_tokenizer(tmp_path):
    from hydra import compose, initialize_config_module

    from ssdbench.train import _build

    with initialize_config_module("ssdbench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["task=pile", "model=transformerpp"])
        assert cfg.model.vocab_size == cfg.task.vocab_size == 257
        dm, model = _build(cfg)
        assert model.vocab_size == dm.vocab_size == 257
        bad = compose("config", overrides=["task=pile", "model=transformerpp", "model.vocab_size=200"])
        with pytest.raises(ConfigError, match="model.vocab_size"):
            _build(bad)


def test_embedded_corpus():
    docs = pile.embedded_documents()
    n_bytes = sum(len(t.encode()) for t, _ in docs)
    assert n_bytes >= 1_000_000 and len(docs) == 1189
    assert docs[0][0].startswith("Genesis 1\n\nIn the beginning God created the heavens and the earth.")
    assert {s for _, s in docs} == {"Old Testament", "New Testament"}


def test_embedded_corpus_prepares_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SSDBENCH_CACHE", str(tmp_path))
    dm = PileDataModule(seq_len=64, batch_size=2, val_windows=4)
    dm.setup("fit")
    m = json.loads((dm.data_dir / "manifest.json").read_text())
    assert m["splits"]["train"]["bytes"] + m["splits"]["val"]["bytes"] >= 1_000_000
    assert 0.02 < m["splits"]["val"]["docs"] / 1189 < 0.09 and dm.slice_names == ["New Testament", "Old Testament"]
    stamp = (dm.data_dir / "manifest.json").stat().st_mtime_ns
    assert pile.prepare_embedded("byte") == dm.data_dir  # cached: not prepared again
    assert (dm.data_dir / "manifest.json").stat().st_mtime_ns == stamp


def test_lm_metrics_formulas():
    m = lm_metrics(nats=12.0, tokens=10, n_bytes=40)
    assert m["loss"] == pytest.approx(1.2) and m["ppl"] == pytest.approx(math.exp(1.2))
    assert m["bpb"] == pytest.approx(12.0 / (math.log(2) * 40))
    assert "bpb" not in lm_metrics(1.0, 1)


def test_validation_metrics_end_to_end(data_dir):
    import lightning as L

    dm = dm_for(data_dir, packing=True)
    torch.manual_seed(0)
    lit = SequenceLM(TransformerPP(257, d_model=32, n_layers=1, n_heads=2), slice_names=dm.slice_names)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    r = trainer.validate(lit, datamodule=dm, verbose=False)[0]
    assert r["val/ppl"] == pytest.approx(math.exp(r["val/loss"]), rel=1e-5)
    assert r["val/bpb"] == pytest.approx(r["val/loss"] / math.log(2), rel=1e-5)  # bytes: 1 per token
    for s in ("A", "B"):
        assert r[f"val/ppl/{s}"] == pytest.approx(math.exp(r[f"val/loss/{s}"]), rel=1e-5)
    # the overall loss is the token-weighted mean of the slices' losses, and equals a direct sum
    nats, n = 0.0, 0
    with torch.no_grad():
        for b in dm.val_dataloader():
            logits = lit.model(b["input_ids"], seq_idx=b["seq_idx"])
            nats += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(),
                                                            reduction="sum"))
            n += b["labels"].numel()
    assert r["val/loss"] == pytest.approx(nats / n, rel=1e-5)


# ---- tokenizers ---------------------------------------------------------------------------
def test_byte_tokenizer():
    tok = load_tokenizer("byte")
    ids = tok.encode("naïve")
    assert tok.vocab_size == 257 and tok.eot_id == 256 and len(ids) == 6 and tok.decode(ids) == "naïve"


@pytest.fixture
def bpe_files(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [d for d, _ in pile.embedded_documents()[:40]]
    tok.train_from_iterator(text, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    tok.model.save(str(tmp_path))  # vocab.json + merges.txt
    load_tokenizer.cache_clear()
    return tmp_path


def test_bpe_from_tokenizer_json_and_vocab_merges(bpe_files):
    a = load_tokenizer(str(bpe_files / "tokenizer.json"))
    (bpe_files / "vm").mkdir()
    for f in ("vocab.json", "merges.txt"):
        (bpe_files / "vm" / f).write_bytes((bpe_files / f).read_bytes())
    b = load_tokenizer(str(bpe_files / "vm"))
    text = "And God said, Let there be light: naïve café."
    assert a.vocab_size == b.vocab_size and a.eot_id == b.eot_id
    assert a.encode(text).tolist() == b.encode(text).tolist() and a.decode(a.encode(text)) == text
    # bytes per token are exact for a byte-level BPE: they add up to the text's UTF-8 length
    assert int(a.token_bytes()[a.encode(text)].sum()) == len(text.encode())


def test_named_tokenizers_are_found_offline_or_explained(bpe_files, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("SSDBENCH_TOKENIZERS", raising=False)
    load_tokenizer.cache_clear()
    with pytest.raises(TokenizerNotFound, match=r"not available offline.*tokenizer.json"):
        load_tokenizer("gpt-neox-20b")
    # a snapshot in the Hugging Face hub cache is found
    snap = tmp_path / "hf" / "hub" / "models--EleutherAI--gpt-neox-20b" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "tokenizer.json").write_bytes((bpe_files / "tokenizer.json").read_bytes())
    assert load_tokenizer("neox").vocab_size == load_tokenizer(str(bpe_files / "tokenizer.json")).vocab_size
    load_tokenizer.cache_clear()


def test_prepared_with_another_tokenizer_is_refused(bpe_files, data_dir):
    with pytest.raises(ConfigError, match="task.tokenizer: .* is not the tokenizer"):
        PileDataModule(data_dir=str(data_dir), tokenizer=str(bpe_files / "tokenizer.json"))
