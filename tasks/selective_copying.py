"""Selective copying, as in the Mamba-1 paper (Gu & Dao 2023, §4.1 and Table 1).

An example is ``seq_len`` tokens. The first ``seq_len - num_data_tokens`` of them are the
*region*: a run of the noise token with ``num_data_tokens`` data tokens placed at random
(distinct, order-preserving) positions. The last ``num_data_tokens`` tokens are markers. At
the i-th marker the model must output the i-th data token of the region, so it has to skip
the noise selectively, which a time-invariant convolution or recurrence cannot do.

Token ids (``vocab_size = data_vocab + 2``):

- 0 = noise, 1 = marker;
- data values are drawn uniformly (with repetition) from ``2 .. data_vocab + 1``.

Labels follow the next-token convention of ``mqar.py``: the label at position t is the token
the model must emit after reading ``inputs[:t+1]``. They are -100 (ignored) everywhere
except at the marker positions, where they are the data tokens in order, so exactly
``num_data_tokens`` positions per example are supervised and scored.

Worked example (``selective_copying_examples(1, 12, 3, 4, seed=3)``: seq_len 12, three data
tokens from 4 values, ids 2..5)::

    inputs : 2 0 0 0 2 0 0 3 0 | 1 1 1     region of 9 (noise 0, data 2 2 3), then 3 markers
    labels : . . . . . . . . . | 2 2 3     (. = -100: at the markers, the data in order)

The Mamba paper uses seq_len 4096 with 16 data tokens from a vocabulary of 16; the default
config (``conf/task/selective_copying.yaml``) is shorter so that it trains on a CPU.
Accuracy is the fraction of marker positions whose argmax prediction equals the label, per
slice ``T=<seq_len>,k=<num_data_tokens>``.
"""
from __future__ import annotations

import numpy as np
import torch

from ssdbench.errors import require, require_positive_int
from ssdbench.tasks.base import (IGNORE, Segment, SyntheticDataModule, numpy_int_dtype, rows_per_chunk, smallest_k,
                                  token_dtype)

# Part of the cache key: bump it whenever selective_copying_examples' output changes for the
# same arguments, so that cached files of the old output are not read.
GENERATOR_VERSION = 1
NOISE = 0
MARKER = 1
FIRST_DATA = 2


def selective_copying_examples(
    num_examples: int,
    seq_len: int,
    num_data_tokens: int,
    data_vocab: int,
    seed: int = 0,
    dtype: torch.dtype = torch.int64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective-copying examples: inputs (n, seq_len) and labels (n, seq_len) of ``dtype``.

    The positions are drawn in chunks of rows (one random stream, so the data do not depend
    on the chunk size and equal the unchunked generator's, ``GENERATOR_VERSION`` 1), and the
    outputs are written in ``dtype`` directly: at the paper's 10^5 x 4096 the int64 arrays
    and a full-size matrix of noise to sort would take over 13 GB.
    """
    check_selective_copying(seq_len, num_data_tokens, data_vocab)
    require_positive_int(num_examples, "task.num_examples")
    out_dtype = numpy_int_dtype(dtype)
    require(np.iinfo(out_dtype).max >= FIRST_DATA + data_vocab - 1, "task.data_vocab",
            f"{data_vocab} data values do not fit in {dtype}")
    n, T, K = num_examples, seq_len, num_data_tokens
    region = T - K
    rng = np.random.default_rng(seed)
    # K distinct positions per row in the region (a random permutation's first K), sorted so
    # that the data keep their order.
    pos = np.empty((n, K), dtype=np.int64)  # (n, K)
    step = rows_per_chunk(region)
    buf = np.empty((min(step, n), region))  # (c, region) reused across chunks
    for a in range(0, n, step):
        r = buf[:min(step, n - a)]
        rng.random(out=r)
        pos[a:a + len(r)] = np.sort(smallest_k(r, K), axis=1)  # (c, K)
    data = rng.integers(FIRST_DATA, FIRST_DATA + data_vocab, size=(n, K))  # (n, K)
    rows = np.arange(n)[:, None]
    inputs = np.full((n, T), NOISE, dtype=out_dtype)  # (n, T)
    inputs[rows, pos] = data
    inputs[:, region:] = MARKER
    labels = np.full((n, T), IGNORE, dtype=out_dtype)  # (n, T)
    labels[:, region:] = data  # the i-th marker answers the i-th data token
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def check_selective_copying(seq_len: int, num_data_tokens: int, data_vocab: int,
                            where: str = "task") -> None:
    """The constraints that make an example possible; ConfigError naming the field."""
    require_positive_int(seq_len, f"{where}.seq_len")
    require_positive_int(num_data_tokens, f"{where}.num_data_tokens")
    require_positive_int(data_vocab, f"{where}.data_vocab")
    require(data_vocab >= 2, f"{where}.data_vocab",
            f"needs at least 2 data values to make copying non-trivial, got {data_vocab}")
    require(2 * num_data_tokens <= seq_len, f"{where}.num_data_tokens",
            f"{num_data_tokens} data tokens and their {num_data_tokens} markers do not fit in "
            f"seq_len={seq_len} (need 2 * num_data_tokens <= seq_len)")


class SelectiveCopyingDataModule(SyntheticDataModule):
    """One train segment and one test segment of selective-copying examples.

    ``vocab_size`` is derived (``data_vocab + 2``); the config states it too, because the
    model configs read ``${task.vocab_size}``, and it must then agree. ``cache``: read and
    write the splits in the on-disk cache (``tasks/cache.py``).
    """

    generator_version = GENERATOR_VERSION

    def __init__(self, seq_len: int = 256, num_data_tokens: int = 16, data_vocab: int = 16,
                 vocab_size: int | None = None, num_train_examples: int = 10000,
                 num_test_examples: int = 500, batch_size: int = 64, seed: int = 0,
                 num_workers: int = 0, cache: bool = True):
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers, cache=cache)
        check_selective_copying(seq_len, num_data_tokens, data_vocab)
        require_positive_int(num_train_examples, "task.num_train_examples")
        require_positive_int(num_test_examples, "task.num_test_examples")
        require_positive_int(batch_size, "task.batch_size")
        if vocab_size is not None:
            require(vocab_size == data_vocab + 2, "task.vocab_size",
                    f"must be data_vocab + 2 = {data_vocab + 2} (noise, marker, {data_vocab} data "
                    f"values), got {vocab_size}")
        self.seq_len, self.num_data_tokens, self.data_vocab = seq_len, num_data_tokens, data_vocab
        self.vocab_size = data_vocab + 2
        self.num_examples = {"train": num_train_examples, "test": num_test_examples}

    @property
    def max_seq_len(self) -> int:
        return self.seq_len

    def data_params(self, split: str) -> dict:
        """The cache key's parameters (the seed is keyed separately)."""
        return {"split": split, "num_examples": self.num_examples[split], "seq_len": self.seq_len,
                "num_data_tokens": self.num_data_tokens, "data_vocab": self.data_vocab}

    def build_split(self, split: str, seed: int) -> list[Segment]:
        inputs, labels = selective_copying_examples(
            self.num_examples[split], self.seq_len, self.num_data_tokens, self.data_vocab, seed=seed,
            dtype=token_dtype(self.vocab_size))  # (n, T) each
        return [Segment(f"T={self.seq_len},k={self.num_data_tokens}", inputs, labels)]
