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
from ssdbench.tasks.base import Segment, SyntheticDataModule

IGNORE = -100


def mqar_examples(
    num_examples: int,
    input_seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate MQAR examples: inputs (n, T) and labels (n, T), int64, deterministic per seed."""
    T, K, V = input_seq_len, num_kv_pairs, vocab_size
    check_mqar_shape(T, K, V)
    rng = np.random.default_rng(seed)
    n = num_examples
    context = 2 * K

    # Distinct keys and values per row: argsort of uniform noise gives a random permutation
    # per row, of which we keep the first K entries (vectorised sampling without replacement).
    key_pool = np.arange(1, V // 2)
    value_pool = np.arange(V // 2, V)
    keys = key_pool[np.argsort(rng.random((n, key_pool.size)), axis=1)[:, :K]]  # (n, K)
    values = value_pool[np.argsort(rng.random((n, value_pool.size)), axis=1)[:, :K]]  # (n, K)
    kvs = np.empty((n, context), dtype=np.int64)
    kvs[:, 0::2], kvs[:, 1::2] = keys, values  # (n, 2K) k1 v1 k2 v2 ...

    # Query gaps: `space` candidate slots (every second position after the context), chosen
    # without replacement with probability proportional to the power law a * i^(a-1).
    space = (T - context) // 2
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    p /= p.sum()
    # Weighted sampling without replacement, per row: the Gumbel-top-k trick.
    gumbel = -np.log(-np.log(rng.random((n, space))))
    gaps = np.argsort(-(np.log(p)[None, :] + gumbel), axis=1)[:, :K]  # (n, K)

    queries = np.zeros((n, T - context + 1), dtype=np.int64)  # (n, T - 2K + 1)
    rows = np.arange(n)[:, None]
    queries[rows, 2 * gaps] = keys
    full = np.concatenate([kvs, queries], axis=1)  # (n, T + 1)
    labels_full = np.full_like(full, IGNORE)
    labels_full[rows, context + 2 * gaps + 1] = values  # the value follows its query key
    inputs, labels = full[:, :-1], labels_full[:, 1:]  # next-token shift: (n, T) each

    if random_non_queries:
        # Fill the empty slots with random tokens, so the model must find the queries.
        noise = rng.integers(0, V, size=inputs.shape)
        filler = np.zeros_like(inputs, dtype=bool)
        filler[:, context:] = inputs[:, context:] == 0
        inputs = np.where(filler, noise, inputs)
    return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(np.ascontiguousarray(labels))


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

    def __init__(self, vocab_size: int, train_segments: list, test_segments: list,
                 batch_size: int = 64, power_a: float = 0.01, random_non_queries: bool = True,
                 seed: int = 0, num_workers: int = 0, seq_len: int | None = None,
                 curriculum: bool = False):
        """``seq_len`` is the length of segments that give none; a segment may give its pair
        count as ``kv_fraction`` of its length instead of ``num_kv_pairs`` (Figure 8's T/32 ..
        T/4), so one preset serves every T: ``task.seq_len=512`` changes all of them.
        ``curriculum``: train segments in their listed order instead of interleaved."""
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers, curriculum=curriculum)
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

    def build_split(self, split: str, seed: int) -> list[Segment]:
        out = []
        for i, s in enumerate(self.segments[split]):
            inputs, labels = mqar_examples(
                s["num_examples"], s["input_seq_len"], s["num_kv_pairs"], self.vocab_size,
                self.power_a, self.random_non_queries, seed=seed * 1000 + i)
            out.append(Segment(f"T={s['input_seq_len']},kv={s['num_kv_pairs']}", inputs, labels))
        return out
