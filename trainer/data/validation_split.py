"""kohya's validation split: which images of a subset are held out for the validation loss.

kohya (``train_util.split_train_val``, called per DreamBooth subset while the dataset is read) shuffles the subset's
images (in its path-sorted order) with ``random.seed(validation_seed)``, then the TRAINING dataset keeps the first
``ceil(n * (1 - split))`` and the VALIDATION dataset the last ``round(n * split)`` (Python's round, half to even).
The two counts are computed separately, so for some sizes an image lands in both (n = 3, split = 0.5: 2 train, 2
validation, one shared); that is kohya's behaviour and is reproduced here, and the report says so.
Regularisation subsets are never split: all of their images train, none validate. Validation images count once
(kohya builds the validation dataset with ``num_repeats = 1``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from .sources import DatasetItem

T = TypeVar("T")


def check_validation_split(split: float, where: str = "") -> None:
    """kohya skips a split outside [0, 1] with a log line; here it is an error naming the value."""
    if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0.0 <= split <= 1.0:
        raise ValueError(
            f"{where}validation_split must be a number from 0 (no validation images) to 1, got {split!r}; "
            "0.1 holds out a tenth of each subset's images."
        )


def split_train_val(items: Sequence[T], split: float, seed: int) -> tuple[list[T], list[T]]:
    """(training, validation) items of one subset, exactly as kohya's split_train_val with a validation_seed."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    n = len(shuffled)
    train_end = math.ceil(n * (1 - split))
    val_start = n - round(n * split)
    return shuffled[:train_end], shuffled[val_start:]


@dataclass
class SplitItems:
    """A dataset's scanned items after the split: what trains, what validates, and what to tell the user."""

    train: list[DatasetItem]
    validation: list[DatasetItem]
    notes: list[str]


def split_dataset_items(items: Sequence[DatasetItem], split: float, seed: int, where: str = "") -> SplitItems:
    """Split every non-reg subset of one dataset (items in scan order, grouped by ``subset_index``)."""
    check_validation_split(split, where)
    if split == 0.0:
        return SplitItems(list(items), [], [])
    by_subset: dict[int, list[DatasetItem]] = {}
    for item in items:
        by_subset.setdefault(item.subset_index, []).append(item)
    train: list[DatasetItem] = []
    validation: list[DatasetItem] = []
    notes: list[str] = []
    for group in by_subset.values():
        if group[0].is_reg:
            train.extend(group)
            continue
        kept, held_out = split_train_val(group, split, seed)
        shared = {id(i) for i in kept} & {id(i) for i in held_out}
        name = group[0].subset or "images"
        if shared:
            notes.append(
                f"{where}subset {name}: {len(shared)} image(s) are both trained on and validated (kohya's split "
                f"rounds the two parts separately for {len(group)} images at validation_split {split})"
            )
        if not kept:
            notes.append(f"{where}subset {name}: validation_split {split} leaves no training image in it")
        train.extend(kept)
        validation.extend(dataclasses.replace(i, num_repeats=1) for i in held_out)
    # keep kohya's registration order (the subsets' order, each subset in its shuffled order)
    return SplitItems(train, validation, notes)
