"""On-disk cache of the synthetic tasks' splits, keyed by everything that determines the data.

Why: the papers' protocols make large sets (MQAR at T=1024 with ~10^5 examples per stage,
selective copying at length 4096 x 10^5), and every job of a sweep (learning rates x widths x
models) uses the same data; generating it once per key and reading it back afterwards saves
that time in every other job.

A split is stored at ``$SSDBENCH_CACHE/synthetic/<datamodule>-<split>-<sha256 prefix>.seg``
(``SSDBENCH_CACHE`` defaults to ``~/.cache/ssdbench``, as for the prepared Pile shards). The
hash is taken over the *key*: the datamodule's class name, its generator version, the seed
and every parameter that determines the data. The file is::

    MAGIC (8 bytes) | header length (8 bytes, little endian) | header (JSON) | arrays

where the header holds the full key, each segment's name, shape and dtype, and a SHA-256 of
the array bytes. A file is trusted only if the magic, the key, the size and the checksum all
agree; otherwise (truncated, corrupt, written for another key) the split is regenerated, with
one warning line on stderr, and the file replaced. Files are written to a temporary name in
the same directory and renamed into place (``os.replace`` is atomic), so concurrent jobs that
miss the same key both write whole files and readers never see a partial one.

Arrays keep the compact integer dtype the generators make (int8 for vocabularies up to 128
tokens, int16 up to 32,768; labels' -100 included), on disk and in memory; the batches handed
to the model are int64 (``SegmentDataset`` casts them).

Switches: ``task.cache=false`` for one run, or ``SSDBENCH_SYNTHETIC_CACHE=0`` in the
environment for every run. A split that took less than ``MIN_GENERATION_S`` to generate is not
written: reading and checking its file would save next to nothing, and small runs and tests
would fill the cache with files. (Time, not size, decides: MQAR at vocabulary 8192 costs
8K random numbers per example whatever its length.) Whether a file exists never changes the
data, only how long ``setup`` takes.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ssdbench.errors import warn
from ssdbench.tasks.base import Segment
from ssdbench.tasks.pile import default_cache_dir

MAGIC = b"SSDBSEG1"  # the last byte is the file format's version
ENV_SWITCH = "SSDBENCH_SYNTHETIC_CACHE"
# Reading and checking a file runs at about 1 GB/s here (0.4 s for Figure 8's T=1024 split
# of 328 MB, which takes 7 s to generate); a split made faster than this is not written.
MIN_GENERATION_S = 0.25
_DTYPES = {"int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64}


class CacheFileError(Exception):
    """A cache file that must not be trusted; the message says why (one line)."""


def cache_enabled(flag: bool = True) -> bool:
    """The datamodule's ``cache`` flag, unless ``SSDBENCH_SYNTHETIC_CACHE`` turns it off."""
    return bool(flag) and os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_key(name: str, params: dict, seed: int, version: int) -> dict:
    """The dict that identifies a split: everything that determines its data."""
    return {"datamodule": name, "generator_version": int(version), "seed": int(seed), "params": params}


def _key_json(key: dict) -> str:
    # Canonical: sorted keys, no spaces; a non-JSON parameter is a bug in data_params.
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def cache_path(key: dict) -> Path:
    """``<cache>/synthetic/<datamodule>-<split>-<first 16 hex digits of sha256(key)>.seg``."""
    digest = hashlib.sha256(_key_json(key).encode()).hexdigest()[:16]
    split = key["params"].get("split", "data")
    return default_cache_dir() / "synthetic" / f"{key['datamodule']}-{split}-{digest}.seg"


def cached_segments(name: str, params: dict, seed: int, version: int,
                    build: Callable[[], list[Segment]], enabled: bool = True) -> list[Segment]:
    """The split for this key: read from its cache file, else ``build()`` and written there.

    ``params`` must hold every parameter that changes the data (JSON types only), ``version``
    is the generator's version (bumped whenever its output changes for the same parameters).
    A file that cannot be trusted is regenerated with one warning line on stderr; a file that
    cannot be written (read-only or full disk) costs a warning, not the run.
    """
    if not cache_enabled(enabled):
        return build()
    key = cache_key(name, params, seed, version)
    path = cache_path(key)
    if path.exists():
        try:
            return read_segments(path, key)
        except (CacheFileError, OSError, ValueError) as e:
            warn(f"synthetic data cache {path} is unusable ({e}); regenerating it")
    t0 = time.perf_counter()
    segments = build()
    if time.perf_counter() - t0 >= MIN_GENERATION_S:
        try:
            write_segments(path, key, segments)
        except OSError as e:
            warn(f"could not write the synthetic data cache {path} ({e}); continuing without it")
    return segments


def _arrays(segments: list[Segment]) -> list[np.ndarray]:
    out = []
    for s in segments:
        for t in (s.inputs, s.labels):
            a = t.numpy()
            if a.dtype.name not in _DTYPES:
                raise TypeError(f"segment {s.name}: cannot cache dtype {a.dtype}")
            out.append(np.ascontiguousarray(a))
    return out


def write_segments(path: Path, key: dict, segments: list[Segment]) -> None:
    """Write a split atomically: a temporary file in the same directory, fsynced, then renamed
    over ``path`` (a crash or a concurrent writer leaves either the old file or a whole new
    one, never a mix)."""
    arrays = _arrays(segments)
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(memoryview(a).cast("B"))
    header = json.dumps({
        "key": key,
        "segments": [{"name": s.name, "shape": list(s.inputs.shape),
                      "inputs": s.inputs.numpy().dtype.name, "labels": s.labels.numpy().dtype.name}
                     for s in segments],
        "sha256": digest.hexdigest(),
    }, sort_keys=True).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for a in arrays:
                f.write(memoryview(a).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_segments(path: Path, key: dict) -> list[Segment]:
    """Read a split written by ``write_segments``; CacheFileError unless the magic, the stored
    key, the file's size and the arrays' SHA-256 all agree with what is expected."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise CacheFileError("not a synthetic data file of this format")
        n = int.from_bytes(f.read(8), "little")
        size = os.fstat(f.fileno()).st_size
        if n <= 0 or len(MAGIC) + 8 + n > size:
            raise CacheFileError("truncated header")
        try:
            header = json.loads(f.read(n))
            stored_key, specs, expected = header["key"], header["segments"], header["sha256"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CacheFileError(f"unreadable header: {e}") from e
        if _key_json(stored_key) != _key_json(key):
            raise CacheFileError("written for another key")
        try:
            layout = [(sp["name"], tuple(int(d) for d in sp["shape"]), _DTYPES[sp["inputs"]],
                       _DTYPES[sp["labels"]]) for sp in specs]
        except (KeyError, TypeError, ValueError) as e:
            raise CacheFileError(f"bad segment table: {e}") from e
        payload = sum(int(np.prod(shape)) * (np.dtype(di).itemsize + np.dtype(dl).itemsize)
                      for _, shape, di, dl in layout)
        if len(MAGIC) + 8 + n + payload != size:
            raise CacheFileError(f"{size} bytes where {len(MAGIC) + 8 + n + payload} were expected "
                                 "(truncated or overwritten)")
        digest = hashlib.sha256()
        segments = []
        for seg_name, shape, di, dl in layout:
            pair = []
            for dtype in (di, dl):
                a = np.empty(shape, dtype=dtype)  # (n, T)
                buf = memoryview(a).cast("B")
                if f.readinto(buf) != len(buf):
                    raise CacheFileError("truncated data")
                digest.update(buf)
                pair.append(torch.from_numpy(a))
            segments.append(Segment(seg_name, pair[0], pair[1]))
        if digest.hexdigest() != expected:
            raise CacheFileError("checksum mismatch (corrupt data)")
    return segments
