"""Pieces shared by the synthetic tasks: segments (sequence length x difficulty), batching,
the on-disk cache in front of the generators, and training data made fresh every step.

A split is a list of *segments*: each a block of examples with one sequence length and one
setting of the task's difficulty knob (e.g. MQAR's number of key-value pairs). Batches never
mix segments, so no padding is needed, and accuracy is reported per segment ("slice").

Batches also carry ``max_labels``, a Python int: the most labelled positions (labels != -100)
in any row of the segment (of the batch, for batches made fresh), counted once outside the
training step. The loss then computes the LM head on that many positions per row instead of
all of them (ssdbench/lit.py, SequenceLM.loss_positions).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ssdbench.errors import require

IGNORE = -100  # the label of a position that is not scored
MAX_LABELS = "max_labels"  # the batch entry with the bound above (see max_labels; read by ssdbench.lit)


def max_labels(labels: torch.Tensor) -> int:
    """The most labelled positions (labels != IGNORE) in any row of labels (n, T), at least 1
    (a head over zero positions is no shape to compile for), counted in chunks of rows so the
    papers' largest sets (10^5 x 4096) need no full-size boolean copy."""
    out = 1
    step = rows_per_chunk(labels.shape[-1])
    for a in range(0, len(labels), step):
        out = max(out, int((labels[a:a + step] != IGNORE).sum(1).max()))
    return out


@dataclass
class Segment:
    """One block of examples: inputs (n, T), labels (n, T) (-100 = unsupervised).

    Integer tensors in the smallest dtype that holds the vocabulary and -100 (``token_dtype``):
    at the papers' sizes int64 would not fit in memory (selective copying, 10^5 x 4096 tokens:
    6.6 GB as int64, 0.8 GB as int8). ``SegmentDataset`` hands batches out as int64.
    """

    name: str
    inputs: torch.Tensor
    labels: torch.Tensor


def token_dtype(vocab_size: int) -> torch.dtype:
    """The smallest signed integer dtype holding token ids 0 .. vocab_size - 1 and -100."""
    for dtype in (torch.int8, torch.int16, torch.int32):
        if vocab_size - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def numpy_int_dtype(dtype: torch.dtype) -> np.dtype:
    """numpy's dtype for a torch integer dtype (the generators work in numpy)."""
    out = {torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64}.get(dtype)
    if out is None:
        raise ValueError(f"token tensors must be int8, int16, int32 or int64, not {dtype}")
    return np.dtype(out)


def rows_per_chunk(width: int, elements: int = 1 << 21) -> int:
    """Rows of ``width`` columns making about ``elements`` numbers (16 MB of float64): the
    generators work through their rows in chunks of this size, so temporaries stay small and
    the allocator reuses them instead of faulting in fresh pages for every full-size array."""
    return max(1, elements // max(1, width))


def smallest_k(r: np.ndarray, k: int) -> np.ndarray:
    """``np.argsort(r, axis=1)[:, :k]`` for ``r`` uniform in [0, 1), without sorting rows.

    Only the entries below a threshold t are sorted, where t is chosen so that a row holds
    at least k of them except with probability below 1e-10 (the count is Binomial(m, t) with
    mean k + 8 sqrt(k) + 16); a row that falls short is sorted in full, so the result is
    argsort's either way (up to the order of equal values, which argsort leaves open too).
    Sampling k of m without replacement this way costs O(m) per row, not O(m log m): MQAR's
    keys and values at vocabulary 8192 are 2 x 4095 numbers per row. Returns (c, k) column
    indices, in ascending order of value.
    """
    c, m = r.shape
    bound = k + 8 * k ** 0.5 + 16
    if 4 * bound >= m:  # the threshold would keep most of each row: sorting is as cheap
        return np.argsort(r, axis=1)[:, :k]
    # 1-D nonzero, fancy indexing and sort: each about half the time of its 2-D, stable form.
    flat = np.flatnonzero(r < bound / m)  # (nnz,) candidates, row-major: columns ascend per row
    rows, cols = np.divmod(flat, m)  # (nnz,) each
    counts = np.bincount(rows, minlength=c)  # (c,)
    w = max(k, int(counts.max(initial=0)))
    slot = rows * w + np.arange(rows.size) - (np.cumsum(counts) - counts)[rows]  # (nnz,) place in (c, w)
    vals = np.full((c, w), np.inf)  # (c, w) candidates, inf-padded
    vals.ravel()[slot] = r.ravel()[flat]
    idx = np.zeros((c, w), dtype=np.int64)  # (c, w) their columns
    idx.ravel()[slot] = cols
    out = np.take_along_axis(idx, np.argsort(vals, axis=1)[:, :k], axis=1)  # (c, k)
    short = counts < k
    if short.any():
        out[short] = np.argsort(r[short], axis=1)[:, :k]
    return out


class SegmentDataset(Dataset):
    """The segments of one split back to back; item i -> dict with its slice id.

    ``max_labels`` (per segment, the most labels in one of its rows) is counted the first time
    a batch of the segment is asked for, or given (a copy on the GPU keeps the host's counts)."""

    def __init__(self, segments: list[Segment], max_labels: list[int | None] | None = None):
        self.segments = segments
        self.offsets = np.cumsum([0] + [len(s.inputs) for s in segments])
        self._max_labels = list(max_labels) if max_labels is not None else [None] * len(segments)

    def max_labels(self, s: int) -> int:
        """The most labelled positions in any row of segment s (cached)."""
        if self._max_labels[s] is None:
            self._max_labels[s] = max_labels(self.segments[s].labels)
        return self._max_labels[s]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        j = i - int(self.offsets[s])
        seg = self.segments[s]
        return {"input_ids": seg.inputs[j].long(), "labels": seg.labels[j].long(),  # (T,) each
                "slice": torch.tensor(s)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for seg in self.segments for t in (seg.inputs, seg.labels))

    def on_device(self, device) -> "SegmentDataset":
        """The same examples held on ``device`` (compact dtype): batches are then gathered
        there, and a training step reads no host memory (the graphed loop, engine.py)."""
        counts = [self.max_labels(s) for s in range(len(self.segments))]  # on the host: no read-back later
        return SegmentDataset([Segment(s.name, s.inputs.to(device), s.labels.to(device)) for s in self.segments],
                              counts)

    def __getitems__(self, indices: list[int]) -> dict:
        """A whole batch at once (the DataLoader's batched fetch): one gather per segment
        instead of a Python call per example, cast from the segments' compact dtype to int64.
        Returns the batch as the default collate would stack the items (see collate_batch),
        plus MAX_LABELS, the bound of its segment(s): the same for every batch of a segment."""
        idx = np.asarray(indices, dtype=np.int64)
        seg = np.searchsorted(self.offsets, idx, side="right") - 1  # (b,) segment of each example
        if (seg == seg[0]).all():  # the batch samplers never mix segments: one gather
            s = self.segments[int(seg[0])]
            j = torch.from_numpy(idx - self.offsets[seg[0]]).to(s.inputs.device)  # (b,)
            # index_select, not s.inputs[j]: advanced indexing of an int16 tensor took 7.6 ms for
            # 64 rows of 256 on this project's 2-core CPU, index_select 0.012 ms
            return {"input_ids": s.inputs.index_select(0, j).long(), "labels": s.labels.index_select(0, j).long(),  # (b, T) each
                    "slice": torch.full((len(idx),), int(seg[0]), dtype=torch.long, device=s.inputs.device),
                    MAX_LABELS: self.max_labels(int(seg[0]))}
        items = [self[int(i)] for i in idx]
        out = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        out[MAX_LABELS] = max(self.max_labels(int(s)) for s in np.unique(seg))
        return out

    @property
    def slice_names(self) -> list[str]:
        return [s.name for s in self.segments]


def collate_batch(batch):
    """collate_fn for datasets whose __getitems__ already returns the stacked batch."""
    return batch


class SegmentBatchSampler(Sampler[list[int]]):
    """Batches drawn within one segment at a time (equal lengths), shuffled per epoch.

    With ``curriculum=True`` the segments come in their listed order (examples shuffled within
    each): e.g. MQAR's pair counts T/32, T/16, T/8, T/4, easiest first, every epoch.
    """

    def __init__(self, dataset: SegmentDataset, batch_size: int, shuffle: bool, seed: int = 0,
                 curriculum: bool = False):
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.curriculum = curriculum
        self.epoch = 0

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        batches = []
        for s in range(len(self.dataset.segments)):
            idx = np.arange(self.dataset.offsets[s], self.dataset.offsets[s + 1])
            if self.shuffle:
                rng.shuffle(idx)
            batches += [idx[i:i + self.batch_size].tolist() for i in range(0, len(idx), self.batch_size)]
        if self.shuffle and not self.curriculum:
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        return batches

    def __iter__(self):
        batches = self._batches()
        self.epoch += 1  # a new shuffle next epoch, reproducible from the seed
        return iter(batches)

    def __len__(self) -> int:
        return sum(-(-int(self.dataset.offsets[s + 1] - self.dataset.offsets[s]) // self.batch_size)
                   for s in range(len(self.dataset.segments)))


class FreshBatchDataset(Dataset):
    """Training examples made on demand, a new batch every step (the Mamba-1 protocol for
    induction heads), deterministic from (seed, batch number) alone.

    Index i is row ``i % batch_size`` of batch number ``g = i // batch_size``; batch g is
    ``make_batch(g)`` (inputs (b, T), labels (b, T)). Batch numbers count from the start of
    training and go on past one epoch, so indices beyond ``len()`` are valid: ``len()`` is
    one epoch's examples. The last batch made is kept, so fetching it row by row (or a rank's
    share of it under DDP) generates it once.
    """

    def __init__(self, make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                 batch_size: int, num_batches: int, name: str):
        self.make_batch, self.batch_size = make_batch, batch_size
        self.num_batches, self.name = num_batches, name
        self._last: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def batch(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number g: inputs (b, T), labels (b, T), int64."""
        if self._last is None or self._last[0] != g:
            x, y = self.make_batch(g)  # (b, T) each
            # counted per batch (on the host, where it is made) and rounded up to a power of
            # two: a graphed run captures one graph per value (Engine._key), so a task whose
            # label counts vary from batch to batch gets a few graphs, not one per count
            k = 1 << (max_labels(y) - 1).bit_length()
            self._last = (g, x.long(), y.long(), k)
        return self._last[1], self._last[2]

    def max_labels(self, g: int) -> int:
        """A bound on the labelled positions in any row of batch g (see batch)."""
        self.batch(g)
        return self._last[3]

    def __getitem__(self, i: int) -> dict:
        x, y = self.batch(i // self.batch_size)  # (b, T) each
        r = i % self.batch_size
        return {"input_ids": x[r], "labels": y[r], "slice": torch.tensor(0)}

    def __getitems__(self, indices: list[int]) -> dict:
        """The batch (or the rows of it asked for), one generation per batch number."""
        idx = np.asarray(indices, dtype=np.int64)
        g = idx // self.batch_size  # (b,) batch number of each index
        if (g == g[0]).all():  # FreshBatchSampler asks for one batch at a time
            x, y = self.batch(int(g[0]))  # (B, T) each
            r = torch.from_numpy(idx % self.batch_size)  # (b,)
            return {"input_ids": x[r], "labels": y[r], "slice": torch.zeros(len(idx), dtype=torch.long),
                    MAX_LABELS: self.max_labels(int(g[0]))}
        items = [self[int(i)] for i in idx]
        out = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        out[MAX_LABELS] = max(self.max_labels(int(b)) for b in np.unique(g))
        return out

    @property
    def slice_names(self) -> list[str]:
        return [self.name]


class FreshBatchSampler(Sampler[list[int]]):
    """Batch numbers in training order: epoch e is batches e * n .. (e + 1) * n - 1.

    ``position()``, when given, says how many batches training has already taken (the
    datamodule reads it from the trainer's step count); an epoch then starts there, not at
    its first batch. A run resumed from a checkpoint in the middle of an epoch therefore gets
    the batches it would have got without the interruption, and Lightning, which expects the
    rest of the epoch, gets exactly that many. Without a trainer, epochs follow each other
    from batch 0.
    """

    def __init__(self, dataset: FreshBatchDataset, position: Callable[[], int | None] | None = None):
        self.dataset, self.position = dataset, position
        self.epoch = 0

    def __iter__(self):
        n, b = self.dataset.num_batches, self.dataset.batch_size
        start = self.position() if self.position is not None else None
        if start is None:
            start = self.epoch * n
        self.epoch = start // n + 1
        end = (start // n + 1) * n  # the end of the epoch that `start` falls in
        return iter([list(range(g * b, (g + 1) * b)) for g in range(start, end)])

    def __len__(self) -> int:
        return self.dataset.num_batches


class SyntheticDataModule(L.LightningDataModule):
    """A datamodule over train/test segment lists built by ``build_split(split, seed)``.

    Splits go through the on-disk cache (``tasks/cache.py``) keyed by ``data_params(split)``,
    the seed and ``generator_version``; ``cache=False`` generates them every time. A subclass
    that sets ``fresh_data`` and implements ``fresh_train_set()`` trains on batches made on
    the fly (``FreshBatchDataset``) instead of a fixed train split.
    """

    vocab_size: int
    # Bump in a task whenever its generator's output changes for the same parameters and
    # seed: the cache key includes it, so files of the old generator are no longer read.
    generator_version: int = 1
    fresh_data: bool = False

    def __init__(self, batch_size: int, seed: int, num_workers: int = 0, curriculum: bool = False,
                 cache: bool = True):
        super().__init__()
        require(isinstance(cache, bool), "task.cache", f"must be true or false, got {cache!r}")
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.curriculum = curriculum  # train segments in their listed order (see SegmentBatchSampler)
        self.cache = cache
        self.train_set: SegmentDataset | FreshBatchDataset | None = None
        self.test_set: SegmentDataset | None = None

    def build_split(self, split: str, seed: int) -> list[Segment]:
        raise NotImplementedError

    def data_params(self, split: str) -> dict:
        """Every parameter that determines ``build_split(split, seed)``'s data besides the
        seed (JSON types only): the cache key. A parameter missing here would let two
        different configs share one cache file, so list all of them."""
        raise NotImplementedError

    def fresh_train_set(self) -> FreshBatchDataset:
        """The training set when ``fresh_data`` is on. Its ``make_batch`` should be picklable
        without the datamodule (a module-level function with its arguments bound), since
        loader workers may be spawned and the datamodule holds the trainer."""
        raise NotImplementedError

    def load_split(self, split: str, seed: int) -> list[Segment]:
        """``build_split(split, seed)``, through the on-disk cache unless it is off."""
        from ssdbench.tasks.cache import cached_segments  # cache.py imports Segment from here

        return cached_segments(type(self).__name__, self.data_params(split), seed, self.generator_version,
                               lambda: self.build_split(split, seed), enabled=self.cache)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            # Train and test come from different seeds, so they never share a random stream.
            if self.fresh_data:
                self.train_set = self.fresh_train_set()
            else:
                self.train_set = SegmentDataset(self.load_split("train", self.seed))
            self.test_set = SegmentDataset(self.load_split("test", self.seed + 1_000_003))

    def _batches_taken(self) -> int | None:
        """Training batches taken so far (optimizer steps x accumulation), from the trainer
        this datamodule is attached to; None outside a trainer."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        return int(trainer.global_step) * int(getattr(trainer, "accumulate_grad_batches", 1) or 1)

    def _loader(self, ds: SegmentDataset, shuffle: bool) -> DataLoader:
        sampler = SegmentBatchSampler(ds, self.batch_size, shuffle=shuffle, seed=self.seed,
                                      curriculum=self.curriculum and shuffle)
        return DataLoader(ds, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate_batch)

    def train_dataloader(self) -> DataLoader:
        if isinstance(self.train_set, FreshBatchDataset):
            sampler = FreshBatchSampler(self.train_set, position=self._batches_taken)
            return DataLoader(self.train_set, batch_sampler=sampler, num_workers=self.num_workers,
                              collate_fn=collate_batch)
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    @property
    def slice_names(self) -> list[str]:
        return self.test_set.slice_names if self.test_set else []
