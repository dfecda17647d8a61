"""kohya's registration of subsets: which images count, and how often.

Which images count is decided at registration: a subset with num_repeats < 1, or a second subset with the same
image_dir / metadata file, is silently dropped; DreamBooth reg images are registered only until their repeats reach
the number of training images (more passes add +1 repeat each, overriding the subset's num_repeats); fine-tuning
metadata is registered in order of DEcreasing key length (a stable sort, so equal lengths keep the file order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Subset(Generic[T]):
    """A group of images sharing repeats. ``source`` identifies it (image_dir or metadata file): duplicates drop."""

    source: str
    images: Sequence[T]
    num_repeats: int = 1
    is_reg: bool = False


@dataclass(frozen=True)
class RegisteredImage(Generic[T]):
    image: T
    num_repeats: int
    is_reg: bool
    subset_index: int


@dataclass(frozen=True)
class Registration(Generic[T]):
    """What a kohya dataset ends up training on, in kohya's registration order.

    ``num_train_images`` / ``num_reg_images`` are kohya's counters (repeats included; num_reg_images counts ALL reg
    images, even those never registered). ``subsets_used`` are indices into the subsets passed in.
    """

    images: list[RegisteredImage[T]]
    num_train_images: int
    num_reg_images: int
    subsets_used: list[int]


def _kept_subsets(subsets: Sequence[Subset[T]]) -> list[int]:
    """Indices kohya keeps: num_repeats >= 1, first of each source, at least one image."""
    kept: list[int] = []
    seen: set[str] = set()
    for index, subset in enumerate(subsets):
        if subset.num_repeats < 1 or subset.source in seen or len(subset.images) < 1:
            continue
        seen.add(subset.source)
        kept.append(index)
    return kept


def register_dreambooth(subsets: Sequence[Subset[T]]) -> Registration[T]:
    """DreamBoothDataset registration: train images in subset order, then balanced reg images.

    Images within a subset must already be in kohya's order (it sorts the globbed paths).
    Reg balancing: reg images are registered one by one while their repeats add up to less than num_train_images;
    if all are registered and more are needed, further passes give each one +1 repeat in order.
    """
    kept = _kept_subsets(subsets)
    images: list[RegisteredImage[T]] = []
    reg_pool: list[list] = []  # [image, repeats, subset_index], repeats rewritten by the balancing passes
    num_train = 0
    num_reg = 0
    for index in kept:
        subset = subsets[index]
        if subset.is_reg:
            num_reg += subset.num_repeats * len(subset.images)
            reg_pool.extend([image, subset.num_repeats, index] for image in subset.images)
        else:
            num_train += subset.num_repeats * len(subset.images)
            images.extend(RegisteredImage(image, subset.num_repeats, False, index) for image in subset.images)

    registered_reg = 0
    if num_reg > 0:
        total = 0
        first_pass = True
        while total < num_train:
            for entry in reg_pool:
                if first_pass:
                    registered_reg += 1
                    total += entry[1]
                else:
                    entry[1] += 1
                    total += 1
                if total >= num_train:
                    break
            first_pass = False
    images.extend(RegisteredImage(image, repeats, True, index) for image, repeats, index in reg_pool[:registered_reg])
    return Registration(images, num_train, num_reg, kept)


def register_finetuning(subsets: Sequence[Subset[T]], key: Callable[[T], str] = str) -> Registration[T]:
    """FineTuningDataset registration: per metadata file, images by decreasing ``len(key(image))`` (stable).

    ``key`` gives the metadata's image key (the path as written in the json/jsonl). is_reg is ignored: fine-tuning
    has no regularisation images.
    """
    kept = _kept_subsets(subsets)
    images: list[RegisteredImage[T]] = []
    num_train = 0
    for index in kept:
        subset = subsets[index]
        ordered = sorted(subset.images, key=lambda image: len(key(image)), reverse=True)
        images.extend(RegisteredImage(image, subset.num_repeats, False, index) for image in ordered)
        num_train += len(subset.images) * subset.num_repeats
    return Registration(images, num_train, 0, kept)
