"""`ssdbench prepare-data`: tokenize text corpora into memory-mapped token shards.

Inputs (files, or folders searched recursively for these):

- Pile-format JSON lines, ``*.jsonl``, ``*.jsonl.zst`` or ``*.jsonl.gz``: one object per line
  with ``text`` and optionally ``meta.pile_set_name`` (the document's Pile subset);
- plain text, ``*.txt``: the whole file is one document;
- Parquet, ``*.parquet``: a ``text`` column, optionally ``pile_set_name`` or ``meta`` (a struct
  or JSON string with ``pile_set_name``).

Output (one shard folder per input file, written by worker processes in parallel)::

    OUT/manifest.json                      tokenizer, sources, token/byte/document counts per
                                           split and per subset
    OUT/shards/<file>-<hash>/shard.json    the shard's own manifest entry (also its done-marker)
    OUT/shards/<file>-<hash>/train.bin     tokens, raw uint16 (vocab <= 65,536) or uint32:
                                           np.memmap(path, dtype, mode="r")
    OUT/shards/<file>-<hash>/train.idx.npy document offsets, int64 (n_docs + 1,): document k
                                           is tokens[idx[k]:idx[k+1]], ending in end-of-text
    OUT/shards/<file>-<hash>/train.subset.npy  uint16 subset id per document (names in shard.json)
    ... and the same three files for ``val``.

Worked example (byte tokenizer, vocabulary 257, end-of-text 256)::

    in.jsonl:  {"text": "hi", "meta": {"pile_set_name": "Pile-CC"}}
               {"text": "yo"}
    train.bin: 104 105 256 121 111 256      train.idx.npy: [0 3 6]
    train.subset.npy: [0 1]                 subsets: ["Pile-CC", "(none)"]

**Train/validation split.** Files matching ``--val-files`` (glob patterns on the file name, e.g.
the Pile's ``val.jsonl.zst``) go wholly to validation. Every other document goes to validation
when the first 8 bytes of blake2b(its UTF-8 text), read as a fraction of 2^64, fall below
``--val-fraction``: the split depends only on the text, so it is the same on every run, machine
and worker count, and exact duplicates never straddle the split.

**Restartable.** Each shard is written into ``shards/<name>.tmp-<pid>`` and renamed to its final
name only after every file in it, ``shard.json`` last, is complete. A rerun keeps finished shards
whose source file (size, mtime) and tokenizer are unchanged and redoes only the others; leftover
temporary folders of an interrupted run are removed. ``manifest.json`` is written (atomically)
only when every shard is done.

**Bad input** stops with ``FILE:LINE: reason`` (missing path, empty file, truncated .zst/.gz,
a line that is not JSON, not an object or has no string ``text``). ``--skip-bad-lines`` skips
and counts bad lines instead (reported per file and in the manifest); a truncated or empty file
is always an error.
"""
from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ssdbench.tokenizer import load_tokenizer, token_dtype

MANIFEST_VERSION = 1
SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".txt", ".parquet")
NO_SUBSET = "(none)"
SPLITS = ("train", "val")


class DataError(ValueError):
    """Bad input, with the file and (where there is one) the 1-based line number."""

    def __init__(self, path, line: int | None, message: str):
        self.path, self.line = str(path), line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


# ---- reading ------------------------------------------------------------------------------
def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def find_inputs(paths: list[str]) -> list[Path]:
    """Input files from files and folders (searched recursively), sorted within each folder."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(p, None, "no such file or folder")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f))
            if not found:
                raise DataError(p, None, f"folder has no input files ({', '.join('*' + s for s in SUFFIXES)})")
            out += found
        elif _kind(p) is None:
            raise DataError(p, None, f"unsupported file type (expected {', '.join('*' + s for s in SUFFIXES)})")
        else:
            out.append(p)
    seen, unique = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def _zstd_chunks(fh, path: Path) -> Iterator[bytes]:
    """Decompressed bytes of a (multi-frame) .zst file; DataError if the last frame is cut off
    (zstandard's stream reader silently stops at a truncated frame, so frames are tracked here)."""
    import zstandard

    new = zstandard.ZstdDecompressor().decompressobj
    dobj, in_frame = new(), False
    while chunk := fh.read(1 << 20):
        while chunk:
            try:
                out = dobj.decompress(chunk)
            except zstandard.ZstdError as e:
                raise DataError(path, None, f"corrupt zstd data ({e})") from None
            in_frame = True
            if out:
                yield out
            if dobj.eof:  # a frame ended; the rest of this chunk starts the next one
                chunk, dobj, in_frame = dobj.unused_data, new(), False
            else:
                chunk = b""
    if in_frame:
        raise DataError(path, None, "truncated zstd file (the last frame is incomplete); download it again")


def _byte_chunks(path: Path, fh) -> Iterator[bytes]:
    kind = _kind(path)
    if kind == ".jsonl.zst":
        yield from _zstd_chunks(fh, path)
    elif kind == ".jsonl.gz":
        try:
            with gzip.GzipFile(fileobj=fh) as gz:
                while chunk := gz.read(1 << 20):
                    yield chunk
        except (EOFError, gzip.BadGzipFile, OSError) as e:
            raise DataError(path, None, f"truncated or corrupt gzip file ({e})") from None
    else:
        while chunk := fh.read(1 << 20):
            yield chunk


def _lines(chunks: Iterator[bytes]) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without the newline) over a stream of byte chunks."""
    buf, n = b"", 0
    for chunk in chunks:
        buf += chunk
        *complete, buf = buf.split(b"\n")
        for line in complete:
            n += 1
            yield n, line
    if buf:
        yield n + 1, buf


def _subset_of(meta) -> str:
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            return NO_SUBSET
    if isinstance(meta, dict) and isinstance(meta.get("pile_set_name"), str):
        return meta["pile_set_name"]
    return NO_SUBSET


@dataclass
class Reader:
    """Documents of one input file as (text, subset); counts bad lines it was allowed to skip.

    ``position`` is how far into the file (in its on-disk bytes) reading has got, for progress.
    """

    path: Path
    skip_bad_lines: bool = False
    bad_lines: int = 0
    first_bad: list[str] = field(default_factory=list)
    position: int = 0

    def _bad(self, line: int, message: str):
        if not self.skip_bad_lines:
            raise DataError(self.path, line, message + " (use --skip-bad-lines to skip such lines)")
        self.bad_lines += 1
        if len(self.first_bad) < 5:
            self.first_bad.append(f"{self.path}:{line}: {message}")

    def __iter__(self) -> Iterator[tuple[str, str]]:
        if not self.path.is_file():
            raise DataError(self.path, None, "no such file")
        if self.path.stat().st_size == 0:
            raise DataError(self.path, None, "empty file")
        kind = _kind(self.path)
        if kind == ".txt":
            yield from self._txt()
        elif kind == ".parquet":
            yield from self._parquet()
        else:
            yield from self._jsonl()

    def _txt(self):
        raw = self.path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataError(self.path, line, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
        self.position = len(raw)
        yield text, NO_SUBSET

    def _parquet(self):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise DataError(self.path, None, f"not a readable Parquet file ({e})") from None
        names = pf.schema_arrow.names
        if "text" not in names:
            raise DataError(self.path, None, f"Parquet file has no 'text' column (columns: {', '.join(names)})")
        meta_col = next((c for c in ("pile_set_name", "meta") if c in names), None)
        row, total = 0, max(1, pf.metadata.num_rows)
        for batch in pf.iter_batches(columns=["text"] + ([meta_col] if meta_col else []), batch_size=4096):
            texts = batch.column("text").to_pylist()
            metas = batch.column(meta_col).to_pylist() if meta_col else [None] * len(texts)
            for text, meta in zip(texts, metas):
                row += 1
                if not isinstance(text, str):
                    self._bad(row, "row has no string 'text'")
                    continue
                subset = meta if meta_col == "pile_set_name" and isinstance(meta, str) else _subset_of(meta)
                yield text, subset
            self.position = int(self.path.stat().st_size * row / total)

    def _jsonl(self):
        with open(self.path, "rb") as fh:
            last_line = 0
            for n, line in _lines(_byte_chunks(self.path, fh)):
                last_line = n
                self.position = fh.tell()
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    self._bad(n, f"not valid JSON ({e})")
                    continue
                if not isinstance(obj, dict):
                    self._bad(n, f"expected a JSON object, got {type(obj).__name__}")
                    continue
                text = obj.get("text")
                if not isinstance(text, str):
                    self._bad(n, "object has no string field 'text'" if text is None else
                              f"'text' is {type(text).__name__}, not a string")
                    continue
                yield text, _subset_of(obj.get("meta"))
            if last_line == 0:
                raise DataError(self.path, None, "empty file (no lines after decompression)")


# ---- tokenizing (in worker processes) ------------------------------------------------------
_WORKER_TOKENIZER = None


def _init_worker(spec: str) -> None:
    global _WORKER_TOKENIZER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processes are the parallelism
    _WORKER_TOKENIZER = load_tokenizer(spec)


def val_fraction_of(data: bytes) -> float:
    """The document's position in [0, 1) for the hash split: blake2b's first 8 bytes / 2^64."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") / 2.0**64


def tokenize_batch(texts: list[str], dtype: str, tok=None):
    """Tokens of a batch of documents, each followed by end-of-text.

    Returns tokens (sum(lengths),) in ``dtype``, lengths (n,) int64, UTF-8 bytes (n,) int64 and
    the hash-split position (n,) float64 of each document.
    """
    tok = tok or _WORKER_TOKENIZER
    encoded = tok.encode_batch(texts)
    raw = [t.encode("utf-8", errors="replace") for t in texts]
    eot = np.array([tok.eot_id], dtype=np.int64)
    tokens = np.concatenate([x for ids in encoded for x in (ids, eot)]) if texts else np.zeros(0, np.int64)
    lengths = np.array([len(ids) + 1 for ids in encoded], dtype=np.int64)
    nbytes = np.array([len(r) for r in raw], dtype=np.int64)
    frac = np.array([val_fraction_of(r) for r in raw], dtype=np.float64)
    return tokens.astype(dtype), lengths, nbytes, frac


# ---- writing ------------------------------------------------------------------------------
def shard_name(path: Path) -> str:
    """Stable folder name of a source file's shard: its name plus a hash of its absolute path."""
    h = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.name)[:80]
    return f"{safe}-{h}"


def _source_id(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class ShardWriter:
    """Appends tokens of one source to train/val files in a temporary folder; ``finish`` writes
    the indexes and shard.json and renames the folder to its final name."""

    def __init__(self, final: Path, dtype: np.dtype):
        self.final, self.dtype = final, dtype
        self.tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.files = {s: open(self.tmp / f"{s}.bin", "wb") for s in SPLITS}
        self.lengths = {s: [] for s in SPLITS}
        self.subsets = {s: [] for s in SPLITS}
        self.subset_names: list[str] = []
        self.stats = {s: {"docs": 0, "tokens": 0, "bytes": 0, "by_subset": {}} for s in SPLITS}
        self.max_id = -1

    def subset_id(self, name: str) -> int:
        if name not in self.subset_names:
            self.subset_names.append(name)
        return self.subset_names.index(name)

    def add(self, tokens, lengths, nbytes, subset_ids, is_val) -> None:
        """A tokenized batch: tokens (sum(lengths),), per document lengths, bytes, subset ids
        (n,) and validation flags (n,) bool."""
        if len(lengths) == 0:
            return
        self.max_id = max(self.max_id, int(tokens.max()))
        tok_val = np.repeat(is_val, lengths)  # (sum(lengths),) which split each token goes to
        for split, docs, toks in (("train", ~is_val, ~tok_val), ("val", is_val, tok_val)):
            if not docs.any():
                continue
            tokens[toks].tofile(self.files[split])
            self.lengths[split].append(lengths[docs])
            self.subsets[split].append(subset_ids[docs])
            st = self.stats[split]
            st["docs"] += int(docs.sum())
            st["tokens"] += int(lengths[docs].sum())
            st["bytes"] += int(nbytes[docs].sum())
            sid = subset_ids[docs]
            k = len(self.subset_names)
            per = {"docs": np.bincount(sid, minlength=k), "tokens": np.bincount(sid, lengths[docs], k),
                   "bytes": np.bincount(sid, nbytes[docs], k)}  # (k,) each: per-subset sums of this batch
            for j in np.unique(sid):
                d = st["by_subset"].setdefault(self.subset_names[j], {"docs": 0, "tokens": 0, "bytes": 0})
                for key in d:
                    d[key] += int(per[key][j])

    def finish(self, info: dict) -> dict:
        for split in SPLITS:
            self.files[split].close()
            lengths = np.concatenate(self.lengths[split]) if self.lengths[split] else np.zeros(0, np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (n_docs + 1,)
            subsets = (np.concatenate(self.subsets[split]) if self.subsets[split]
                       else np.zeros(0, np.int64)).astype(np.uint16)
            np.save(self.tmp / f"{split}.idx.npy", offsets)
            np.save(self.tmp / f"{split}.subset.npy", subsets)
        entry = dict(info, name=self.final.name, dtype=self.dtype.name, subsets=self.subset_names,
                     max_token_id=self.max_id, splits=self.stats, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        # shard.json last: a folder with it under the final name is complete by construction.
        _write_json(self.tmp / "shard.json", entry)
        if self.final.exists():  # a stale shard (changed source or tokenizer)
            shutil.rmtree(self.final, ignore_errors=True)
        try:
            os.replace(self.tmp, self.final)
        except OSError:
            # Another process (e.g. a parallel sweep preparing the same cache) renamed its copy
            # first: keep that one if it is complete.
            if not (self.final / "shard.json").is_file():
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
            return json.loads((self.final / "shard.json").read_text())
        return entry

    def abort(self) -> None:
        for f in self.files.values():
            f.close()


def _writer_alive(tmp: Path) -> bool:
    """Whether the process named in a temporary shard folder (``<name>.tmp-<pid>``) still runs
    (on this machine): its folder is then another run's work in progress, not a leftover."""
    try:
        pid = int(tmp.name.rsplit(".tmp-", 1)[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _done_entry(final: Path, source: dict, tok_info: dict) -> dict | None:
    """The finished shard's shard.json if it matches this source file and tokenizer, else None."""
    try:
        entry = json.loads((final / "shard.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = entry.get("source") == source and entry.get("tokenizer") == tok_info
    files = all((final / f"{s}{ext}").is_file() for s in SPLITS for ext in (".bin", ".idx.npy", ".subset.npy"))
    return entry if same and files else None


# ---- the whole job ------------------------------------------------------------------------
def prepare(inputs: list[str | Path], out_dir: str | Path, tokenizer: str = "byte", workers: int | None = None,
            val_fraction: float = 0.01, val_files: tuple[str, ...] = (), skip_bad_lines: bool = False,
            progress: bool = True, batch_bytes: int = 1 << 20, console=None) -> dict:
    """Tokenize ``inputs`` into shards under ``out_dir`` and write manifest.json; returns it.

    ``workers``: tokenizer processes (None: one per CPU, at most 8; 0: tokenize in this process).
    The returned manifest also lists which shards were ``reused`` from an earlier run.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    files = find_inputs([str(p) for p in inputs])
    tok = load_tokenizer(tokenizer)
    tok_info = tok.describe()
    dtype = token_dtype(tok.vocab_size)
    out = Path(out_dir)
    shards_dir = out / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    for leftover in shards_dir.glob("*.tmp-*"):  # an interrupted run's half-written shards
        if not _writer_alive(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    if workers is None:
        workers = min(8, os.cpu_count() or 1)

    entries, reused, todo = [], [], []
    for path in files:
        final = shards_dir / shard_name(path)
        done = _done_entry(final, _source_id(path), tok_info)
        if done is not None:
            entries.append(done)
            reused.append(done["name"])
        else:
            todo.append(path)
            entries.append(None)

    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tokenizer,)) if workers > 0 and todo else None
    bar = _progress(console) if progress else None
    try:
        total_bytes = sum(p.stat().st_size for p in todo)
        task = bar.add_task("tokenizing", total=total_bytes, tokens=0) if bar else None
        if bar:
            bar.start()
        base, tokens_done = 0, 0
        for i, path in enumerate(files):
            if entries[i] is not None:
                continue
            is_val_file = any(fnmatch.fnmatch(path.name, pat) or fnmatch.fnmatch(str(path), pat) for pat in val_files)

            def tick(reader, n_tokens):
                nonlocal tokens_done
                tokens_done += n_tokens
                if bar:
                    bar.update(task, completed=base + reader.position, tokens=tokens_done,
                               description=f"tokenizing {path.name}")

            entries[i] = _prepare_one(path, shards_dir / shard_name(path), tok, tok_info, dtype, pool,
                                      workers, val_fraction, is_val_file, skip_bad_lines, batch_bytes, tick)
            base += path.stat().st_size
        if bar:
            bar.update(task, completed=total_bytes, description="tokenized")
    finally:
        if bar:
            bar.stop()
        if pool:
            pool.shutdown(cancel_futures=True)

    manifest = _manifest(files, entries, tok_info, dtype, val_fraction, val_files)
    _write_json(out / "manifest.json", manifest)
    manifest["reused"] = reused
    return manifest


def _progress(console):
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TextColumn("{task.fields[tokens]:,} tokens"), TimeRemainingColumn(), console=console,
                    transient=False)


def _prepare_one(path, final, tok, tok_info, dtype, pool, workers, val_fraction, is_val_file,
                 skip_bad_lines, batch_bytes, tick) -> dict:
    reader = Reader(path, skip_bad_lines=skip_bad_lines)
    writer = ShardWriter(final, dtype)
    inflight: deque = deque()  # (future or result, subset ids) in input order

    def drain(limit: int):
        while len(inflight) > limit:
            fut, sids = inflight.popleft()
            tokens, lengths, nbytes, frac = fut.result() if pool else fut
            is_val = np.full(len(lengths), True) if is_val_file else frac < val_fraction
            writer.add(tokens, lengths, nbytes, sids, is_val)
            tick(reader, int(lengths.sum()))

    try:
        texts, sids, size = [], [], 0
        for text, subset in reader:
            texts.append(text)
            sids.append(writer.subset_id(subset))
            size += len(text)
            if size >= batch_bytes:
                _submit(inflight, pool, texts, sids, dtype, tok)
                texts, sids, size = [], [], 0
                # At most two batches per worker in flight: memory stays bounded on huge files.
                drain(2 * max(1, workers))
        if texts:
            _submit(inflight, pool, texts, sids, dtype, tok)
        drain(0)
    except BaseException:
        writer.abort()
        raise
    info = {"source": _source_id(path), "tokenizer": tok_info, "val_file": is_val_file,
            "bad_lines": reader.bad_lines, "first_bad_lines": reader.first_bad}
    return writer.finish(info)


def _submit(inflight, pool, texts, sids, dtype, tok):
    sids = np.asarray(sids, dtype=np.int64)
    if pool:
        inflight.append((pool.submit(tokenize_batch, texts, dtype.name), sids))
    else:
        inflight.append((tokenize_batch(texts, dtype.name, tok), sids))


def _manifest(files, entries, tok_info, dtype, val_fraction, val_files) -> dict:
    totals = {s: {"docs": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    by_subset = {s: {} for s in SPLITS}
    for e in entries:
        for s in SPLITS:
            for k in ("docs", "tokens", "bytes"):
                totals[s][k] += e["splits"][s][k]
            for name, d in e["splits"][s]["by_subset"].items():
                acc = by_subset[s].setdefault(name, {"docs": 0, "tokens": 0, "bytes": 0})
                for k in acc:
                    acc[k] += d[k]
    return {
        "version": MANIFEST_VERSION,
        "tokenizer": tok_info,
        "dtype": dtype.name,
        "eot_id": tok_info["eot_id"],
        "vocab_size": tok_info["vocab_size"],
        "max_token_id": max((e["max_token_id"] for e in entries), default=-1),
        "split_rule": {"val_fraction": val_fraction, "val_files": list(val_files),
                       "hash": "blake2b-64 of UTF-8 text / 2^64 < val_fraction"},
        "sources": [str(p.resolve()) for p in files],
        "shards": [e["name"] for e in entries],
        "subsets": sorted({n for s in SPLITS for n in by_subset[s]}),
        "splits": {s: dict(totals[s], by_subset=dict(sorted(by_subset[s].items()))) for s in SPLITS},
        "bad_lines": sum(e["bad_lines"] for e in entries),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---- CLI ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("examples:\n"
                     "  ssdbench prepare-data pile/train/ pile/val.jsonl.zst --val-files 'val.*' --val-fraction 0 \\\n"
                     "      --tokenizer /data/gpt-neox-20b/tokenizer.json --out data/pile-neox\n"
                     "  ssdbench prepare-data books/*.txt --out data/books      (byte tokenizer, 1% validation)\n"
                     "  ssdbench run task=pile task.data_dir=data/pile-neox task.tokenizer=/data/gpt-neox-20b/tokenizer.json")
    parser.add_argument("inputs", nargs="+", help="files or folders: *.jsonl, *.jsonl.zst, *.jsonl.gz, *.txt, *.parquet")
    parser.add_argument("--out", "-o", required=True, help="output folder (shards/ and manifest.json)")
    parser.add_argument("--tokenizer", default="byte",
                        help="byte (default), gpt2, gpt-neox-20b, or a tokenizer.json / folder path")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPUs, at most 8; 0: none)")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="fraction of documents (by text hash) for validation (default 0.01)")
    parser.add_argument("--val-files", nargs="*", default=[], metavar="PATTERN",
                        help="glob patterns of input files that go wholly to validation (e.g. 'val.*')")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip and count lines that are not JSON objects with a string 'text'")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    t0 = time.time()
    try:
        m = prepare(args.inputs, args.out, tokenizer=args.tokenizer, workers=args.workers,
                    val_fraction=args.val_fraction, val_files=tuple(args.val_files),
                    skip_bad_lines=args.skip_bad_lines, progress=not args.no_progress, console=console)
    except (DataError, FileNotFoundError, ImportError, ValueError) as e:
        print(f"ssdbench prepare-data: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssdbench prepare-data: interrupted; finished shards are kept, rerun to continue", file=sys.stderr)
        return 130
    table = Table(title=f"{len(m['shards'])} shard(s), tokenizer {m['tokenizer']['name']} ({m['dtype']}), "
                        f"{time.time() - t0:.1f} s")
    for col in ("split", "subset", "documents", "tokens", "bytes/token"):
        table.add_column(col, justify="left" if col in ("split", "subset") else "right")
    for split in SPLITS:
        s = m["splits"][split]
        rows = [("all", s)] + (list(s["by_subset"].items()) if len(s["by_subset"]) > 1 else [])
        for name, d in rows:
            table.add_row(split, name, f"{d['docs']:,}", f"{d['tokens']:,}",
                          f"{d['bytes'] / d['tokens']:.3f}" if d["tokens"] else "-")
    Console().print(table)
    if m["reused"]:
        print(f"reused {len(m['reused'])} finished shard(s) from an earlier run")
    if m["bad_lines"]:
        print(f"skipped {m['bad_lines']:,} bad line(s); the first ones are listed in the shards' shard.json",
              file=sys.stderr)
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0
