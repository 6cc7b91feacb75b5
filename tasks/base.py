"""Pieces shared by the synthetic tasks: segments (sequence length x difficulty) and batching.

A split is a list of *segments*: each a block of examples with one sequence length and one
setting of the task's difficulty knob (e.g. MQAR's number of key-value pairs). Batches never
mix segments, so no padding is needed, and accuracy is reported per segment ("slice").
"""
from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass
class Segment:
    """One block of examples: inputs (n, T) int64, labels (n, T) int64 (-100 = unsupervised)."""

    name: str
    inputs: torch.Tensor
    labels: torch.Tensor


class SegmentDataset(Dataset):
    """The segments of one split back to back; item i -> dict with its slice id."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self.offsets = np.cumsum([0] + [len(s.inputs) for s in segments])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        j = i - int(self.offsets[s])
        seg = self.segments[s]
        return {"input_ids": seg.inputs[j], "labels": seg.labels[j], "slice": torch.tensor(s)}

    def __getitems__(self, indices: list[int]) -> dict:
        """A whole batch at once (the DataLoader's batched fetch): one gather per segment
        instead of a Python call per example. Returns the batch as the default collate would
        stack the items (see collate_batch)."""
        idx = np.asarray(indices, dtype=np.int64)
        seg = np.searchsorted(self.offsets, idx, side="right") - 1  # (b,) segment of each example
        if (seg == seg[0]).all():  # the batch samplers never mix segments: one gather
            s = self.segments[int(seg[0])]
            j = torch.from_numpy(idx - self.offsets[seg[0]])
            return {"input_ids": s.inputs[j], "labels": s.labels[j],
                    "slice": torch.full((len(idx),), int(seg[0]), dtype=torch.long)}
        items = [self[int(i)] for i in idx]
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

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


class SyntheticDataModule(L.LightningDataModule):
    """A datamodule over train/test segment lists built by ``build_split(split, seed)``."""

    vocab_size: int

    def __init__(self, batch_size: int, seed: int, num_workers: int = 0, curriculum: bool = False):
        super().__init__()
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.curriculum = curriculum  # train segments in their listed order (see SegmentBatchSampler)
        self.train_set: SegmentDataset | None = None
        self.test_set: SegmentDataset | None = None

    def build_split(self, split: str, seed: int) -> list[Segment]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            # Train and test come from different seeds, so they never share a random stream.
            self.train_set = SegmentDataset(self.build_split("train", self.seed))
            self.test_set = SegmentDataset(self.build_split("test", self.seed + 1_000_003))

    def _loader(self, ds: SegmentDataset, shuffle: bool) -> DataLoader:
        sampler = SegmentBatchSampler(ds, self.batch_size, shuffle=shuffle, seed=self.seed,
                                      curriculum=self.curriculum and shuffle)
        return DataLoader(ds, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate_batch)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    @property
    def slice_names(self) -> list[str]:
        return self.test_set.slice_names if self.test_set else []
