"""Multi-query associative recall (MQAR), as defined in Zoology (Arora et al. 2023) and used by
the Based paper and the Mamba-2 paper (Figure 8).

An example is ``num_kv_pairs`` key-value pairs, then the keys again as queries, each placed at
a gap drawn from a power law so that most queries come soon after the context and a few far
later. The model must answer every query with the value bound to that key in the context.

- keys are distinct per example, drawn from [1, V/2); values from [V/2, V) (V = vocab_size),
  also distinct per example (as Zoology does);
- token 0 fills the positions between queries, or random tokens from [0, V) with
  ``random_non_queries`` (the harder variant of the Mamba-2 paper);
- labels are -100 (ignored) everywhere except at each query position, where the label is the
  queried key's value: the model is trained and scored only on recall.

Worked example (``mqar_examples(1, 16, 2, 32, random_non_queries=False, seed=3)``: V = 32,
input_seq_len = 16, two pairs)::

    context : k=1 v=21  k=5 v=29              (keys from [1, 16), values from [16, 32))
    inputs  : 1 21 5 29 | 0 0 5 0 1 0 0 0 0 0 0 0   queries "5" and "1" in the query slots
    labels  : . .  . .  | . . 29 . 21 . . . . . . .  (. = -100: at query "5" the target is 29)

Accuracy is the fraction of query positions whose argmax prediction equals the label,
overall and per slice (``T=<input_seq_len>,kv=<num_kv_pairs>``).
"""
from __future__ import annotations

import numpy as np
import torch

from ssdbench.errors import ConfigError, require, require_positive_int
from ssdbench.tasks.base import (IGNORE, Segment, SyntheticDataModule, numpy_int_dtype, rows_per_chunk, smallest_k,
                                  token_dtype)

# The generator's version, part of the cache key: bump it whenever mqar_examples' output
# changes for the same arguments, so that cached files of the old output are not read.
GENERATOR_VERSION = 1


def mqar_examples(
    num_examples: int,
    input_seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.int64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate MQAR examples: inputs (n, T) and labels (n, T) of ``dtype``, deterministic per seed.

    The random stream is drawn in a fixed order (all rows' key draws, then values, then query
    gaps, then filler noise), each in chunks of rows; chunked draws continue one stream, so
    the data are the same for any chunk size, and the same as the unchunked generator made
    (``GENERATOR_VERSION`` 1). ``dtype``: the datamodule asks for the compact ``token_dtype``.
    """
    T, K, V = input_seq_len, num_kv_pairs, vocab_size
    check_mqar_shape(T, K, V)
    out_dtype = numpy_int_dtype(dtype)
    require(np.iinfo(out_dtype).max >= V - 1, "task.vocab_size", f"{V} tokens do not fit in {dtype}")
    rng = np.random.default_rng(seed)
    n = num_examples
    context = 2 * K
    idx_dtype = np.int16 if V // 2 <= np.iinfo(np.int16).max else np.int32

    # Distinct keys and values per row: the first K of a random permutation per row (the K
    # smallest of uniform noise, in order: vectorised sampling without replacement).
    def sample_distinct(pool: np.ndarray) -> np.ndarray:
        out = np.empty((n, K), dtype=idx_dtype)  # (n, K)
        step = rows_per_chunk(pool.size)
        buf = np.empty((min(step, n), pool.size))  # (c, |pool|) reused: no fresh pages per chunk
        for a in range(0, n, step):
            r = buf[:min(step, n - a)]
            rng.random(out=r)
            out[a:a + len(r)] = pool[smallest_k(r, K)]  # (c, K)
        return out

    keys = sample_distinct(np.arange(1, V // 2))  # (n, K) from [1, V/2)
    values = sample_distinct(np.arange(V // 2, V))  # (n, K) from [V/2, V)

    # Query gaps: `space` candidate slots (every second position after the context), chosen
    # without replacement with probability proportional to the power law a * i^(a-1).
    space = (T - context) // 2
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    p /= p.sum()
    log_p = np.log(p)[None, :]  # (1, space)
    # Weighted sampling without replacement, per row: the Gumbel-top-k trick.
    gaps = np.empty((n, K), dtype=np.int32)  # (n, K)
    step = rows_per_chunk(space)
    for a in range(0, n, step):
        gumbel = -np.log(-np.log(rng.random((min(step, n - a), space))))  # (c, space)
        gaps[a:a + len(gumbel)] = np.argsort(-(log_p + gumbel), axis=1)[:, :K]  # (c, K)

    inputs = np.empty((n, T), dtype=out_dtype)  # (n, T)
    labels = np.empty((n, T), dtype=out_dtype)  # (n, T)
    step = rows_per_chunk(T)
    for a in range(0, n, step):
        b = min(n, a + step)
        c = b - a
        rows = np.arange(c)[:, None]
        full = np.zeros((c, T + 1), dtype=np.int64)  # (c, T + 1)
        full[:, 0:context:2], full[:, 1:context:2] = keys[a:b], values[a:b]  # k1 v1 k2 v2 ...
        full[rows, context + 2 * gaps[a:b]] = keys[a:b]  # the queries
        labels_full = np.full_like(full, IGNORE)  # (c, T + 1)
        labels_full[rows, context + 2 * gaps[a:b] + 1] = values[a:b]  # the value follows its query key
        x, y = full[:, :-1], labels_full[:, 1:]  # next-token shift: (c, T) each
        if random_non_queries:
            # Fill the empty slots with random tokens, so the model must find the queries.
            noise = rng.integers(0, V, size=(c, T))  # (c, T)
            filler = np.zeros((c, T), dtype=bool)
            filler[:, context:] = x[:, context:] == 0
            x = np.where(filler, noise, x)
        inputs[a:b], labels[a:b] = x, y
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def check_mqar_shape(input_seq_len: int, num_kv_pairs: int, vocab_size: int, where: str = "task") -> None:
    """The constraints that make an MQAR example possible; ConfigError naming the field."""
    require_positive_int(input_seq_len, f"{where}.input_seq_len")
    require_positive_int(num_kv_pairs, f"{where}.num_kv_pairs")
    require(vocab_size > input_seq_len, "task.vocab_size",
            f"must be larger than the sequence length ({vocab_size} <= input_seq_len={input_seq_len})")
    require(4 * num_kv_pairs <= input_seq_len, f"{where}.num_kv_pairs",
            f"{num_kv_pairs} pairs do not fit in input_seq_len={input_seq_len} "
            f"(need 2 tokens per pair for the context and 2 slots per query: 4 * pairs <= length)")
    require(num_kv_pairs <= vocab_size // 2 - 1, f"{where}.num_kv_pairs",
            f"{num_kv_pairs} distinct keys do not fit in the key range [1, {vocab_size // 2}) of task.vocab_size={vocab_size}")


class MQARDataModule(SyntheticDataModule):
    """MQAR train/test sets made of segments ``{input_seq_len, num_kv_pairs, num_examples}``."""

    generator_version = GENERATOR_VERSION

    def __init__(self, vocab_size: int, train_segments: list, test_segments: list,
                 batch_size: int = 64, power_a: float = 0.01, random_non_queries: bool = True,
                 seed: int = 0, num_workers: int = 0, seq_len: int | None = None,
                 curriculum: bool = False, cache: bool = True):
        """``seq_len`` is the length of segments that give none; a segment may give its pair
        count as ``kv_fraction`` of its length instead of ``num_kv_pairs`` (Figure 8's T/32 ..
        T/4), so one preset serves every T: ``task.seq_len=512`` changes all of them.
        ``curriculum``: train segments in their listed order instead of interleaved.
        ``cache``: read and write the splits in the on-disk cache (``tasks/cache.py``)."""
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers, curriculum=curriculum,
                         cache=cache)
        require_positive_int(vocab_size, "task.vocab_size")
        require_positive_int(batch_size, "task.batch_size")
        require(power_a > 0, "task.power_a", f"must be positive, got {power_a}")
        if seq_len is not None:
            require_positive_int(seq_len, "task.seq_len")
        self.seq_len = seq_len
        self.vocab_size, self.power_a, self.random_non_queries = vocab_size, power_a, random_non_queries
        self.segments = {"train": self._parse(train_segments, "train_segments"),
                         "test": self._parse(test_segments, "test_segments")}

    def _parse(self, segments, field: str) -> list[dict]:
        require(segments is not None and len(segments) > 0, f"task.{field}", "needs at least one segment")
        out = []
        for i, seg in enumerate(segments):
            where = f"task.{field}[{i}]"
            try:
                T = seg.get("input_seq_len") or self.seq_len
                if T is None:
                    raise KeyError("input_seq_len")
                T, n = int(T), int(seg["num_examples"])
                if "num_kv_pairs" in seg:
                    K = int(seg["num_kv_pairs"])
                else:
                    frac = float(seg["kv_fraction"])
                    require(0 < frac <= 0.25, f"{where}.kv_fraction", f"must be in (0, 1/4], got {frac}")
                    K = max(1, int(T * frac))
            except ConfigError:
                raise
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(where, "needs integer num_examples, input_seq_len (or task.seq_len) "
                                         "and num_kv_pairs (or kv_fraction)") from e
            check_mqar_shape(T, K, self.vocab_size, where)
            require_positive_int(n, f"{where}.num_examples")
            out.append(dict(input_seq_len=T, num_kv_pairs=K, num_examples=n))
        return out

    @property
    def max_seq_len(self) -> int:
        return max(s["input_seq_len"] for segs in self.segments.values() for s in segs)

    def data_params(self, split: str) -> dict:
        """The cache key's parameters: the resolved segments (lengths and pair counts after
        ``seq_len`` and ``kv_fraction``), the vocabulary and the query placement."""
        return {"split": split, "segments": self.segments[split], "vocab_size": self.vocab_size,
                "power_a": float(self.power_a), "random_non_queries": bool(self.random_non_queries)}

    def build_split(self, split: str, seed: int) -> list[Segment]:
        out = []
        for i, s in enumerate(self.segments[split]):
            inputs, labels = mqar_examples(
                s["num_examples"], s["input_seq_len"], s["num_kv_pairs"], self.vocab_size,
                self.power_a, self.random_non_queries, seed=seed * 1000 + i,
                dtype=token_dtype(self.vocab_size))  # (n, T) each
            out.append(Segment(f"T={s['input_seq_len']},kv={s['num_kv_pairs']}", inputs, labels))
        return out
