"""Induction heads, as in the Mamba-1 paper (Gu & Dao 2023, §4.1 and Table 11), following the
synthetic of H3 (Fu et al. 2023) after Olsson et al. (2022).

An example of length T is random ordinary tokens, with a special token placed once at a
random position p (0 <= p <= T - 3) and followed by a target token, and the special token
again at the last position. At the end the model must recall the token that followed the
special token the first time: "... S t ... S -> t".

- vocabulary of ``vocab_size`` V tokens: the special token is V - 1, ordinary tokens (the
  fill and the target) are drawn uniformly from 0 .. V - 2, so the special token occurs
  exactly twice;
- labels follow the next-token convention of ``mqar.py`` (inputs = full[:-1], labels =
  full[1:], where full ends with the target): -100 everywhere except at the last position,
  whose label is the target. One supervised position per example.

Models are trained at one length (256 in the paper) and tested at several: each test length
is one slice ``T=<len>``, so the table shows length extrapolation. The paper tests up to
2^20; the default config stops at 1024 so that evaluation is quick on a CPU.

Lengths far beyond training (``eval_lengths``, up to 2^20) are scored once after training by
``evaluate_model``: no gradients, batches sized to a token budget, each sequence in one pass
through the model's chunked/scan kernels, whose memory is linear in the length for the SSMs.
Attention that runs out of memory is reported as such (accuracy NaN, ``extrapolation/oom_from``
= the first length that did not fit) instead of crashing the run; longer lengths are skipped.
A time limit (``eval_time_limit_s``) likewise ends the evaluation with NaN for the lengths left.

Worked example (``induction_heads_examples(1, 12, 16, seed=3)``: V = 16, special token 15)::

    inputs : 12 1 2 3 15 12 13 8 0 1 4 15    special at p = 4, target 12, special again at the end
    labels :  . . . .  .  .  . . . . .  12   (. = -100: only the last position is scored)
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from ssdbench.errors import ConfigError, require, require_positive_int, warn
from ssdbench.tasks.base import (IGNORE, FreshBatchDataset, Segment, SyntheticDataModule, numpy_int_dtype,
                                  rows_per_chunk, token_dtype)

# Part of the cache key: bump it whenever induction_heads_examples' output changes for the
# same arguments, so that cached files of the old output are not read.
GENERATOR_VERSION = 1
# First word of the seed of fresh training batches, (FRESH_STREAM, seed, batch number): a
# stream of its own, apart from the fixed sets' integer seeds.
FRESH_STREAM = 0x1D0C7


def induction_heads_examples(
    num_examples: int,
    seq_len: int,
    vocab_size: int = 16,
    seed: int | Sequence[int] = 0,
    dtype: torch.dtype = torch.int64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Induction-head examples: inputs (n, seq_len) and labels (n, seq_len) of ``dtype``.

    ``seed`` is anything ``np.random.default_rng`` takes (fresh training batches use
    ``(FRESH_STREAM, seed, batch number)``). The tokens are drawn in chunks of rows (one
    random stream: the data equal the unchunked generator's, ``GENERATOR_VERSION`` 1) and
    written in ``dtype`` directly, so no full-size int64 matrix is made.
    """
    check_induction_heads(seq_len, vocab_size)
    require_positive_int(num_examples, "task.num_examples")
    out_dtype = numpy_int_dtype(dtype)
    require(np.iinfo(out_dtype).max >= vocab_size - 1, "task.vocab_size",
            f"{vocab_size} tokens do not fit in {dtype}")
    n, T, V = num_examples, seq_len, vocab_size
    special = V - 1
    rng = np.random.default_rng(seed)
    inputs = np.empty((n, T), dtype=out_dtype)  # (n, T)
    step = rows_per_chunk(T + 1)
    for a in range(0, n, step):
        # Ordinary tokens; the generator draws T + 1 per row, the last one a placeholder for
        # the target (overwritten below), so the stream is the same as it always was.
        inputs[a:a + step] = rng.integers(0, special, size=(min(step, n - a), T + 1))[:, :T]  # (c, T)
    p = rng.integers(0, T - 2, size=n)  # (n,) first special at p, its target at p + 1 <= T - 2
    rows = np.arange(n)
    inputs[rows, p] = special
    inputs[:, T - 1] = special
    labels = np.full((n, T), IGNORE, dtype=out_dtype)  # (n, T)
    # The answer: the token that followed the first special, as the label of the last position
    # (the next-token convention: inputs = full[:-1], labels = full[1:], full ending in it).
    labels[:, T - 1] = inputs[rows, p + 1]
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def check_induction_heads(seq_len: int, vocab_size: int, where: str = "task",
                          len_field: str = "seq_len") -> None:
    """The constraints that make an example possible; ConfigError naming the field."""
    require_positive_int(seq_len, f"{where}.{len_field}")
    require_positive_int(vocab_size, "task.vocab_size")
    require(seq_len >= 3, f"{where}.{len_field}",
            f"needs at least 3 tokens (special, target, special), got {seq_len}")
    require(vocab_size >= 3, "task.vocab_size",
            f"needs a special token and at least 2 ordinary tokens, got {vocab_size}")


def _next_time(times: list[tuple[int, float]], T: int) -> float:
    """Expected seconds to score length T, from the lengths scored so far: the growth of the
    last two (time ~ length^k, k between 1 for the SSMs' linear scans and 2 for attention)
    carried on to T; 0 before two lengths have run (short lengths cost little)."""
    if len(times) < 2:
        return 0.0
    (T1, s1), (T2, s2) = times[-2], times[-1]
    if s1 <= 0 or s2 <= 0 or T2 <= T1:
        return s2
    k = min(max(math.log(s2 / s1) / math.log(T2 / T1), 1.0), 2.0)
    return s2 * (T / T2) ** k


class InductionHeadsDataModule(SyntheticDataModule):
    """Train at one length; test one segment per length in ``test_lengths``.

    ``fresh_data``: train on new sequences every step, as the Mamba-1 paper does, instead of
    passes over ``num_train_examples`` fixed ones. Batch g of training is generated from
    (seed, g) alone, so a resumed run sees the batches it would have seen; an "epoch" is
    ``num_train_examples // batch_size`` batches (for the trainer's epoch-based bookkeeping),
    and the test sets stay fixed. ``cache``: read and write the fixed splits in the on-disk
    cache (``tasks/cache.py``).
    """

    generator_version = GENERATOR_VERSION

    def __init__(self, vocab_size: int = 16, train_seq_len: int = 256,
                 test_lengths: list | None = None, num_train_examples: int = 10000,
                 num_test_examples: int = 256, batch_size: int = 64, seed: int = 0,
                 num_workers: int = 0, eval_lengths: list | None = None, eval_examples: int = 32,
                 eval_tokens_per_batch: int = 2**20, eval_time_limit_s: float = 1800.0,
                 fresh_data: bool = False, cache: bool = True):
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers, cache=cache)
        require(isinstance(fresh_data, bool), "task.fresh_data", f"must be true or false, got {fresh_data!r}")
        self.fresh_data = fresh_data
        check_induction_heads(train_seq_len, vocab_size, len_field="train_seq_len")
        self.vocab_size = vocab_size
        self.eval_lengths = [self._length(T, i, "eval_lengths") for i, T in enumerate(eval_lengths or [])]
        require_positive_int(eval_examples, "task.eval_examples")
        require_positive_int(eval_tokens_per_batch, "task.eval_tokens_per_batch")
        self.eval_examples, self.eval_tokens_per_batch = eval_examples, eval_tokens_per_batch
        require(eval_time_limit_s > 0, "task.eval_time_limit_s", f"must be positive, got {eval_time_limit_s}")
        self.eval_time_limit_s = float(eval_time_limit_s)
        require(test_lengths is not None and len(test_lengths) > 0, "task.test_lengths",
                "needs at least one test length")
        lengths = [self._length(T, i, "test_lengths") for i, T in enumerate(test_lengths)]
        require(len(set(lengths)) == len(lengths), "task.test_lengths",
                f"lengths must be distinct (one slice each), got {lengths}")
        require_positive_int(num_train_examples, "task.num_train_examples")
        require_positive_int(num_test_examples, "task.num_test_examples")
        require_positive_int(batch_size, "task.batch_size")
        if train_seq_len not in lengths:  # e.g. a run at T=64 with the preset's [256, 1024]
            warn(f"task.test_lengths {lengths} leave out task.train_seq_len {train_seq_len}: val/acc "
                 "measures extrapolation only, not how well the task was learned")
        self.vocab_size, self.train_seq_len, self.test_lengths = vocab_size, train_seq_len, lengths
        self.num_train_examples, self.num_test_examples = num_train_examples, num_test_examples

    def _length(self, T, i: int, field: str) -> int:
        try:
            T = int(T)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"task.{field}[{i}]", f"must be an integer, got {T!r}") from e
        check_induction_heads(T, self.vocab_size, len_field=f"{field}[{i}]")
        return T

    def evaluate_model(self, model: torch.nn.Module) -> dict[str, float]:
        """Accuracy at each of ``eval_lengths`` (``extrapolation/acc/T=<len>``), one pass per
        sequence without gradients; bf16 autocast on CUDA as in training. Out of memory at a
        length gives NaN there and at every longer length, and ``extrapolation/oom_from``."""
        if not self.eval_lengths:
            return {}
        device = next(model.parameters()).device
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else contextlib.nullcontext())
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        oom_from = None
        t_start = time.time()
        times: list[tuple[int, float]] = []  # (length, seconds) of the lengths scored
        for i, T in enumerate(self.eval_lengths):
            key = f"extrapolation/acc/T={T}"
            if oom_from is not None and T >= oom_from:
                out[key] = math.nan
                continue
            # Stop before a length that would end past the limit, not only after the limit has
            # passed: lengths double, and attention's time grows up to 4x per step, so one
            # length too many can take longer than all before it (the record must be written
            # before a scheduler's timeout).
            expected = _next_time(times, T)
            if i > 0 and time.time() - t_start + expected > self.eval_time_limit_s:
                print(f"induction heads: eval_time_limit_s={self.eval_time_limit_s:g} would be passed at "
                      f"T={T} (about {expected:.0f} s more); the remaining lengths are NaN", flush=True)
                out.setdefault("extrapolation/time_limit_from", float(T))
                out[key] = math.nan
                continue
            t0 = time.time()
            x, y = induction_heads_examples(self.eval_examples, T, self.vocab_size,
                                            seed=self.seed * 1000 + 7919 + i)  # (n, T) each
            per_batch = max(1, self.eval_tokens_per_batch // T)
            correct = 0
            try:
                for s in range(0, len(x), per_batch):
                    with torch.no_grad(), autocast:
                        logits = model(x[s:s + per_batch].to(device))  # (b, T, V)
                    pred = logits[:, -1].argmax(-1).cpu()  # (b,) only the last position is scored
                    correct += int((pred == y[s:s + per_batch, -1]).sum())
                out[key] = correct / len(x)
                times.append((T, time.time() - t0))
                print(f"induction heads: T={T} accuracy {out[key]:.3f} ({time.time() - t0:.1f} s)", flush=True)
            except (torch.cuda.OutOfMemoryError, RuntimeError, MemoryError) as e:
                if not _is_oom(e):
                    raise
                print(f"induction heads: out of memory at T={T} ({type(e).__name__}); "
                      f"longer lengths skipped")
                oom_from = T
                out[key] = math.nan
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if oom_from is not None:
            out["extrapolation/oom_from"] = float(oom_from)
        model.train(was_training)
        return out

    @property
    def max_seq_len(self) -> int:
        return max([self.train_seq_len, *self.test_lengths])

    def data_params(self, split: str) -> dict:
        """The cache key's parameters (the seed is keyed separately)."""
        if split == "train":
            return {"split": split, "vocab_size": self.vocab_size, "seq_len": self.train_seq_len,
                    "num_examples": self.num_train_examples}
        return {"split": split, "vocab_size": self.vocab_size, "lengths": self.test_lengths,
                "num_examples": self.num_test_examples}

    def build_split(self, split: str, seed: int) -> list[Segment]:
        dtype = token_dtype(self.vocab_size)
        if split == "train":
            x, y = induction_heads_examples(self.num_train_examples, self.train_seq_len,
                                            self.vocab_size, seed=seed * 1000, dtype=dtype)  # (n, T) each
            return [Segment(f"T={self.train_seq_len}", x, y)]
        out = []
        for i, T in enumerate(self.test_lengths):
            x, y = induction_heads_examples(self.num_test_examples, T, self.vocab_size,
                                            seed=seed * 1000 + i, dtype=dtype)  # (n, T) each
            out.append(Segment(f"T={T}", x, y))
        return out

    def fresh_train_set(self) -> FreshBatchDataset:
        """With ``fresh_data``: num_train_examples // batch_size batches an epoch, batch g made
        by ``fresh_training_batch`` (a new one every step, epoch after epoch)."""
        make = functools.partial(fresh_training_batch, self.batch_size, self.train_seq_len, self.vocab_size,
                                 self.seed)
        return FreshBatchDataset(make, self.batch_size, max(1, self.num_train_examples // self.batch_size),
                                 f"T={self.train_seq_len}")

    def fresh_batch(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch number g with ``fresh_data``: inputs (b, T), labels (b, T)."""
        return fresh_training_batch(self.batch_size, self.train_seq_len, self.vocab_size, self.seed, g)


def fresh_training_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int,
                         g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch number g (counted from the start of training) of a ``fresh_data`` run: the fixed
    sets' generator seeded by (FRESH_STREAM, seed, g), so any batch can be remade from those
    numbers alone (a resumed run, a loader worker). inputs (b, T), labels (b, T), compact."""
    return induction_heads_examples(batch_size, seq_len, vocab_size, seed=(FRESH_STREAM, seed, g),
                                    dtype=token_dtype(vocab_size))


def _is_oom(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError by message)."""
    if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
