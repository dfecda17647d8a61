"""Per-bucket batches, steps per epoch and kohya's seeded epoch composition.

kohya (BaseDataset.make_buckets / shuffle_buckets, DreamBoothDataset, FineTuningDataset, train_network.py) never mixes
buckets in a batch: every image is put into its bucket ``num_repeats`` times (so one batch can hold duplicates),
each bucket is cut into ``ceil(count / batch_size)`` batches (the last one is short), and the DataLoader iterates
over these pre-made batches (its batch_size is 1). Hence:

* batches per epoch = sum over buckets of ceil(count_with_repeats / batch_size)
* update steps per epoch = ceil(batches / gradient_accumulation_steps)
* max_train_steps for N epochs = N * ceil(batches / num_processes / gradient_accumulation_steps)

The composition of the batches follows Python's ``random``: at each epoch kohya does ``random.seed(seed + epoch)``,
shuffles the list of (bucket, batch index) pairs IN PLACE, then shuffles each bucket's image list IN PLACE, in bucket
order. The state carries over, so epoch 2's order depends on epoch 1's. We do the same with a private
``random.Random`` (never the global one, which other code draws from). In real training the DataLoader additionally
shuffles the batch order with torch's RNG.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .registration import _ceil_div

Size = tuple[int, int]


# ------------------------------------------------------------------------------------------------------------- batches


class BucketedItem(Protocol):
    """Anything with an identity, a bucket (W, H) and a repeat count."""

    @property
    def key(self) -> Hashable: ...

    @property
    def bucket(self) -> Size: ...

    @property
    def num_repeats(self) -> int: ...


@dataclass(frozen=True)
class TrainItem:
    """A registered image with its bucket; ``key`` is what batches list (a path, an index...)."""

    key: Hashable
    bucket: Size
    num_repeats: int = 1


@dataclass(frozen=True)
class Batch:
    bucket: Size
    batch_index: int
    keys: tuple


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def bucket_counts(items: Iterable[BucketedItem]) -> dict[Size, int]:
    """Images per bucket, repeats included, in bucket order (sorted by (W, H), as kohya sorts its buckets)."""
    counts: dict[Size, int] = {}
    for item in items:
        bucket = (int(item.bucket[0]), int(item.bucket[1]))
        counts[bucket] = counts.get(bucket, 0) + int(item.num_repeats)
    return {bucket: counts[bucket] for bucket in sorted(counts) if counts[bucket] > 0}


def batches_per_bucket(items: Iterable[BucketedItem], batch_size: int) -> dict[Size, int]:
    """ceil(count_with_repeats / batch_size) for each non-empty bucket."""
    _check_batch_size(batch_size)
    return {bucket: _ceil_div(count, batch_size) for bucket, count in bucket_counts(items).items()}


def batches_per_epoch(items: Iterable[BucketedItem], batch_size: int) -> int:
    """``len(train_dataloader)`` for one dataset: buckets never mix, each one's last batch may be short."""
    return sum(batches_per_bucket(items, batch_size).values())


def steps_per_epoch(num_batches: int, gradient_accumulation_steps: int = 1) -> int:
    """Optimizer updates per epoch (train_network: ceil(len(train_dataloader) / gradient_accumulation_steps))."""
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    return _ceil_div(num_batches, gradient_accumulation_steps)


def max_train_steps_for_epochs(
    max_train_epochs: int, num_batches: int, gradient_accumulation_steps: int = 1, num_processes: int = 1
) -> int:
    """train_network: epochs * ceil(len(train_dataloader) / num_processes / gradient_accumulation_steps).

    kohya divides in floating point; exact integer ceil-division gives the same result for any realistic size.
    """
    if gradient_accumulation_steps < 1 or num_processes < 1:
        raise ValueError("gradient_accumulation_steps and num_processes must be >= 1")
    return max_train_epochs * _ceil_div(num_batches, num_processes * gradient_accumulation_steps)


def num_train_epochs_for_steps(max_train_steps: int, num_update_steps_per_epoch: int) -> int:
    """train_network: the epoch count shown and looped over, ceil(max_train_steps / steps_per_epoch)."""
    return _ceil_div(max_train_steps, num_update_steps_per_epoch)


@dataclass
class BucketBatcher:
    """kohya's per-dataset batch list with its seeded, stateful shuffling.

    Build it from items in kohya's registration order. Buckets are sorted by (W, H); each holds the item keys,
    every image repeated ``num_repeats`` times consecutively. Construction performs the epoch-0 shuffle with
    ``seed`` (kohya's make_buckets ends with shuffle_buckets() while dataset.seed is still 0, so pass seed=0 to
    reproduce the order right after make_buckets). ``set_seed`` only stores the seed (no reshuffle), exactly like
    kohya; ``set_current_epoch`` reshuffles once per epoch advanced.
    """

    items: Sequence[BucketedItem]
    batch_size: int
    seed: int = 0
    current_epoch: int = 0
    buckets: list[Size] = field(init=False)
    _bucket_keys: list[list] = field(init=False, repr=False)
    _batch_indices: list[tuple[int, int]] = field(init=False, repr=False)
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_batch_size(self.batch_size)
        per_bucket: dict[Size, list] = {}
        for item in self.items:
            bucket = (int(item.bucket[0]), int(item.bucket[1]))
            per_bucket.setdefault(bucket, []).extend([item.key] * int(item.num_repeats))
        self.buckets = sorted(b for b, keys in per_bucket.items() if keys)
        self._bucket_keys = [per_bucket[b] for b in self.buckets]
        self._batch_indices = [
            (bucket_index, batch_index)
            for bucket_index, keys in enumerate(self._bucket_keys)
            for batch_index in range(_ceil_div(len(keys), self.batch_size))
        ]
        self._rng = random.Random()
        self._shuffle()

    def __len__(self) -> int:
        return len(self._batch_indices)

    def _shuffle(self) -> None:
        self._rng.seed(self.seed + self.current_epoch)
        self._rng.shuffle(self._batch_indices)
        for keys in self._bucket_keys:
            self._rng.shuffle(keys)

    def set_seed(self, seed: int) -> None:
        """Store the seed used by later shuffles (kohya's set_seed does not reshuffle)."""
        self.seed = seed

    def set_current_epoch(self, epoch: int) -> None:
        """Advance to ``epoch``: one shuffle per epoch step forward; going back only records the epoch (as kohya)."""
        if epoch > self.current_epoch:
            while self.current_epoch < epoch:
                self.current_epoch += 1
                self._shuffle()
        else:
            self.current_epoch = epoch

    def batch(self, index: int) -> Batch:
        bucket_index, batch_index = self._batch_indices[index]
        keys = self._bucket_keys[bucket_index]
        start = batch_index * self.batch_size
        return Batch(self.buckets[bucket_index], batch_index, tuple(keys[start : start + self.batch_size]))

    def batches(self) -> list[Batch]:
        """The epoch's batches in the current (shuffled) order."""
        return [self.batch(i) for i in range(len(self))]
