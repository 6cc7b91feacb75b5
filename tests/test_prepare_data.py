"""`ssdbench prepare-data`: every input format, manifest counts, token dtypes, restart after a
crash, bad input with and without --skip-bad-lines."""
import json
import random

import numpy as np
import pytest

from ssdbench import cli
from ssdbench import prepare_data as pd
from ssdbench.tokenizer import load_tokenizer, token_dtype

WORDS = "the quick brown fox jumps over a lazy dog while naïve cafés serve crème brûlée".split()


def random_docs(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def write_jsonl(path, docs, subsets=None):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            obj = {"text": d}
            if subsets:
                obj["meta"] = {"pile_set_name": subsets[i % len(subsets)]}
            f.write(json.dumps(obj) + "\n")
    return path


def write_zst(path, docs, subsets=None, frames=2):
    import zstandard

    raw = write_jsonl(path.with_suffix(".tmp"), docs, subsets).read_bytes()
    lines = raw.splitlines(keepends=True)
    cut = len(lines) // frames
    parts = [b"".join(lines[i * cut:(i + 1) * cut if i < frames - 1 else None]) for i in range(frames)]
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(p) for p in parts))  # multi-frame
    return path


def read_split(out, shard, split):
    d = out / "shards" / shard
    entry = json.loads((d / "shard.json").read_text())
    n = entry["splits"][split]["tokens"]
    toks = np.memmap(d / f"{split}.bin", dtype=entry["dtype"], mode="r") if n else np.zeros(0, entry["dtype"])
    return toks, np.load(d / f"{split}.idx.npy"), np.load(d / f"{split}.subset.npy"), entry


def expected_tokens(docs, val_fraction, want_val):
    tok = load_tokenizer("byte")
    out = []
    for d in docs:
        is_val = pd.val_fraction_of(d.encode()) < val_fraction
        if is_val == want_val:
            out += list(d.encode()) + [tok.eot_id]
    return np.array(out, dtype=np.int64)


def test_all_formats_counts_and_contents(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("zstandard")
    docs = {k: random_docs(40, i) for i, k in enumerate(["jsonl", "zst", "txt", "parquet"])}
    write_jsonl(tmp_path / "a.jsonl", docs["jsonl"], ["Pile-CC", "Github"])
    write_zst(tmp_path / "b.jsonl.zst", docs["zst"], ["ArXiv"])
    (tmp_path / "c.txt").write_text(docs["txt"][0], encoding="utf-8")
    pq.write_table(pa.table({"text": docs["parquet"], "pile_set_name": ["Wikipedia (en)"] * 40}),
                   tmp_path / "d.parquet")
    out = tmp_path / "out"
    m = pd.prepare([tmp_path], out, val_fraction=0.2, workers=0, progress=False)

    assert [s.split("-")[0] for s in m["shards"]] == ["a.jsonl", "b.jsonl.zst", "c.txt", "d.parquet"]
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == 257 and m["max_token_id"] == 256
    assert m["subsets"] == ["(none)", "ArXiv", "Github", "Pile-CC", "Wikipedia (en)"]
    all_docs = docs["jsonl"] + docs["zst"] + docs["txt"][:1] + docs["parquet"]
    n_val = sum(pd.val_fraction_of(d.encode()) < 0.2 for d in all_docs)
    assert 0 < n_val < len(all_docs)
    assert m["splits"]["val"]["docs"] == n_val and m["splits"]["train"]["docs"] == len(all_docs) - n_val
    total_bytes = sum(len(d.encode()) for d in all_docs)
    assert m["splits"]["train"]["bytes"] + m["splits"]["val"]["bytes"] == total_bytes
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] == total_bytes + len(all_docs)
    gh = m["splits"]["train"]["by_subset"].get("Github", {"docs": 0})["docs"] + \
        m["splits"]["val"]["by_subset"].get("Github", {"docs": 0})["docs"]
    assert gh == 20

    # shard contents: documents in input order, each + end-of-text; offsets and subset ids agree
    toks, idx, subsets, entry = read_split(out, m["shards"][1], "train")
    np.testing.assert_array_equal(np.asarray(toks, dtype=np.int64), expected_tokens(docs["zst"], 0.2, False))
    assert idx[0] == 0 and idx[-1] == len(toks) and (toks[idx[1:] - 1] == 256).all()
    assert entry["subsets"] == ["ArXiv"] and (subsets == 0).all()
    toks, idx, subsets, entry = read_split(out, m["shards"][0], "val")
    np.testing.assert_array_equal(np.asarray(toks, dtype=np.int64), expected_tokens(docs["jsonl"], 0.2, True))
    # the manifest is what the shards say
    assert json.loads((out / "manifest.json").read_text())["splits"] == m["splits"]


def test_worker_processes_give_the_same_shards(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", random_docs(300, 1), ["x", "y"])
    m0 = pd.prepare([tmp_path / "a.jsonl"], tmp_path / "w0", workers=0, progress=False, batch_bytes=2000)
    m2 = pd.prepare([tmp_path / "a.jsonl"], tmp_path / "w2", workers=2, progress=False, batch_bytes=2000)
    assert m0["splits"] == m2["splits"]
    name = m0["shards"][0]
    for split in ("train", "val"):
        a, b = read_split(tmp_path / "w0", name, split), read_split(tmp_path / "w2", name, split)
        for x, y in zip(a[:3], b[:3]):
            np.testing.assert_array_equal(x, y)


def test_val_files_go_wholly_to_validation(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", random_docs(30, 2))
    write_jsonl(tmp_path / "val.jsonl", random_docs(7, 3))
    m = pd.prepare([tmp_path], tmp_path / "out", val_fraction=0.0, val_files=("val.*",), workers=0, progress=False)
    assert m["splits"]["val"]["docs"] == 7 and m["splits"]["train"]["docs"] == 30


def test_token_dtype():
    assert token_dtype(257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(50277) == np.uint16


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    pytest.importorskip("tokenizers")
    # A byte-level BPE with 70,000 tokens whose end-of-text has id 69,999: ids beyond uint16.
    alphabet = list(__import__("ssdbench.tokenizer", fromlist=["x"])._bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), 69_999)})
    spec = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": 69_999, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                                                  "trim_offsets": True, "use_regex": True},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": False,
                                                "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "vocab": vocab, "merges": []}}
    (tmp_path / "big.json").write_text(json.dumps(spec))
    write_jsonl(tmp_path / "a.jsonl", ["hello", "world"])
    m = pd.prepare([tmp_path / "a.jsonl"], tmp_path / "out", tokenizer=str(tmp_path / "big.json"),
                   val_fraction=0.0, workers=0, progress=False)
    assert m["dtype"] == "uint32" and m["vocab_size"] == 70_000 and m["max_token_id"] == 69_999
    toks, idx, _, _ = read_split(tmp_path / "out", m["shards"][0], "train")
    assert toks.dtype == np.uint32 and toks[idx[1] - 1] == 69_999 and len(toks) == 12


def test_restart_redoes_only_unfinished_shards(tmp_path, monkeypatch):
    for i in range(3):
        write_jsonl(tmp_path / f"s{i}.jsonl", random_docs(50, 10 + i))
    out = tmp_path / "out"
    real_finish = pd.ShardWriter.finish
    calls = []

    def crash_on_second(self, info):
        calls.append(self.final.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if Ctrl-C arrived while the second shard was being written
        return real_finish(self, info)

    monkeypatch.setattr(pd.ShardWriter, "finish", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        pd.prepare([tmp_path], out, workers=0, progress=False)
    monkeypatch.setattr(pd.ShardWriter, "finish", real_finish)

    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert len([s for s in shards if ".tmp-" not in s]) == 1  # only the first shard is complete
    assert any(".tmp-" in s for s in shards)  # the second one was left half-written ...
    assert not (out / "manifest.json").exists()  # ... and nothing claims the job is done
    first = out / "shards" / calls[0] / "train.bin"
    stamp = first.stat().st_mtime_ns

    m = pd.prepare([tmp_path], out, workers=0, progress=False)
    assert m["reused"] == [calls[0]] and len(m["shards"]) == 3
    assert first.stat().st_mtime_ns == stamp  # the finished shard was not rewritten
    assert not any(".tmp-" in p.name for p in (out / "shards").iterdir())
    assert m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"] == 150

    # a changed source file invalidates its shard only
    write_jsonl(tmp_path / "s2.jsonl", random_docs(5, 99))
    m = pd.prepare([tmp_path], out, workers=0, progress=False)
    assert len(m["reused"]) == 2 and m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"] == 105


def test_bad_lines_stop_with_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\nnot json\n{"text": "fine"}\n{"meta": {}}\n[1, 2]\n{"text": 5}\n\n')
    with pytest.raises(pd.DataError, match=r"bad\.jsonl:2: not valid JSON"):
        pd.prepare([p], tmp_path / "out", workers=0, progress=False)
    m = pd.prepare([p], tmp_path / "out", workers=0, progress=False, skip_bad_lines=True)
    assert m["bad_lines"] == 4
    assert m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"] == 2
    entry = json.loads((tmp_path / "out" / "shards" / m["shards"][0] / "shard.json").read_text())
    assert entry["first_bad_lines"][1].endswith(":4: object has no string field 'text'")


def test_missing_empty_and_truncated_inputs(tmp_path):
    pytest.importorskip("zstandard")
    with pytest.raises(pd.DataError, match="nope.jsonl: no such file"):
        pd.prepare([tmp_path / "nope.jsonl"], tmp_path / "out", progress=False)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(pd.DataError, match="empty.jsonl: empty file"):
        pd.prepare([tmp_path / "empty.jsonl"], tmp_path / "out", workers=0, progress=False)
    z = write_zst(tmp_path / "cut.jsonl.zst", random_docs(200, 5), frames=1)
    z.write_bytes(z.read_bytes()[: z.stat().st_size // 2])
    with pytest.raises(pd.DataError, match="cut.jsonl.zst: truncated zstd"):
        pd.prepare([z], tmp_path / "out", workers=0, progress=False, skip_bad_lines=True)
    assert not (tmp_path / "out" / "manifest.json").exists()
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(pd.DataError, match="unsupported file type"):
        pd.prepare([tmp_path / "x.csv"], tmp_path / "out", progress=False)


def test_cli(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", random_docs(20, 7), ["Pile-CC"])
    assert cli.main(["prepare-data", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"),
                     "--workers", "0", "--no-progress", "--val-fraction", "0.25"]) == 0
    assert "manifest" in capsys.readouterr().out
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n{"text": 1}\n')
    assert cli.main(["prepare-data", str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "out2"),
                     "--workers", "0", "--no-progress"]) == 2
    assert "b.jsonl:2: 'text' is int, not a string" in capsys.readouterr().err


def test_another_live_runs_work_in_progress_is_left_alone(tmp_path):
    import os
    import subprocess
    import sys

    write_jsonl(tmp_path / "a.jsonl", random_docs(5, 1))
    shards = tmp_path / "out" / "shards"
    shards.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (shards / f"x.tmp-{int(dead.stdout)}").mkdir()  # an interrupted run's leftover
    (shards / f"y.tmp-{os.getppid()}").mkdir()  # a running process's shard in progress
    pd.prepare([tmp_path / "a.jsonl"], tmp_path / "out", workers=0, progress=False)
    assert not (shards / f"x.tmp-{int(dead.stdout)}").exists()
    assert (shards / f"y.tmp-{os.getppid()}").exists()
