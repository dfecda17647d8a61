"""Registration, per-bucket batches, step counts and seeded composition against kohya (golden steps.json)."""

from __future__ import annotations

import random

import pytest
from golden_data import load_golden as _load_for_params  # noqa: E402  (collection-time parameters)

from sdxl_lora_trainer.trainer.data.bucket_batches import (
    BucketBatcher,
    TrainItem,
    batches_per_bucket,
    batches_per_epoch,
    bucket_counts,
    max_train_steps_for_epochs,
    num_train_epochs_for_steps,
    steps_per_epoch,
)
from sdxl_lora_trainer.trainer.data.buckets import BucketSelector, BucketSettings
from sdxl_lora_trainer.trainer.data.registration import Subset, register_dreambooth, register_finetuning

_DATA = _load_for_params("steps")
SCENARIOS = [s["id"] for s in _DATA.get("scenarios", [])]
STEP_ENTRIES = [(s["id"], i) for s in _DATA.get("scenarios", []) for i, _ in enumerate(s["steps_per_epoch"])]
MAX_STEP_ENTRIES = [
    (s["id"], i) for s in _DATA.get("scenarios", []) for i, _ in enumerate(s["max_train_steps_for_max_train_epochs"])
]
COMPOSITION_KEYS = [
    "composition_after_make_buckets (dataset.seed=0, epoch 0)",
    "composition_after_set_seed_1234_and_set_current_epoch_1",
]


def _scenario(golden, scenario_id: str) -> dict:
    (entry,) = [s for s in golden("steps")["scenarios"] if s["id"] == scenario_id]
    return entry


def _subsets(dataset_input: dict) -> list[Subset]:
    """The test fixture's folders: images named <dir>/img_<i:03>_<W>x<H>.png, as the golden generator wrote them."""
    subsets = []
    by_dir: dict[str, list] = {}
    finetuning = dataset_input["type"] == "finetuning"
    for sub in dataset_input["subsets"]:
        if sub["sizes"] is None:  # a second subset pointing at the same folder
            images = by_dir[sub["dir"]]
        else:
            images = [(f"{sub['dir']}/img_{i:03d}_{w}x{h}.png", (w, h)) for i, (w, h) in enumerate(sub["sizes"])]
            by_dir[sub["dir"]] = images
        source = f"{sub['dir']}.jsonl" if finetuning else sub["dir"]
        subsets.append(Subset(source, images, sub.get("num_repeats", 1), sub.get("is_reg", False)))
    return subsets


def _build(dataset_input: dict):
    """Register like kohya, select buckets, and return (registration, subsets, items)."""
    subsets = _subsets(dataset_input)
    if dataset_input["type"] == "finetuning":
        reg = register_finetuning(subsets, key=lambda image: image[0].split("/", 1)[1])
    else:
        reg = register_dreambooth(subsets)
    p = dataset_input["dataset_params"]
    settings = BucketSettings(
        resolution=tuple(p["resolution"]),
        min_bucket_reso=p["min_bucket_reso"],
        max_bucket_reso=p["max_bucket_reso"],
        bucket_reso_steps=p["bucket_reso_steps"],
        bucket_no_upscale=p["bucket_no_upscale"],
        enable_bucket=p["enable_bucket"],
    )
    selector = BucketSelector(settings)
    items = [TrainItem(r.image[0], selector.select(r.image[1]).bucket, r.num_repeats) for r in reg.images]
    return reg, subsets, items


def test_golden_file_has_entries(golden):
    data = golden("steps")
    assert [s["id"] for s in data["scenarios"]] == SCENARIOS and SCENARIOS
    for s in data["scenarios"]:
        assert len(s["input"]) == len(s["datasets"])


@pytest.mark.parametrize("scenario_id", SCENARIOS)
def test_registration(golden, scenario_id):
    scenario = _scenario(golden, scenario_id)
    for dataset_input, expected in zip(scenario["input"], scenario["datasets"]):
        reg, subsets, items = _build(dataset_input)
        assert reg.num_train_images == expected["num_train_images"]
        assert reg.num_reg_images == expected["num_reg_images"]
        assert [subsets[i].source for i in reg.subsets_used] == expected["subsets_used"]
        got = [
            {
                "image": r.image[0],
                "image_size": list(r.image[1]),
                "num_repeats": r.num_repeats,
                "is_reg": r.is_reg,
                "bucket": list(item.bucket),
            }
            for r, item in zip(reg.images, items)
        ]
        assert got == expected["images"]


@pytest.mark.parametrize("scenario_id", SCENARIOS)
def test_buckets_and_batches(golden, scenario_id):
    scenario = _scenario(golden, scenario_id)
    total = 0
    for dataset_input, expected in zip(scenario["input"], scenario["datasets"]):
        _, _, items = _build(dataset_input)
        bs = expected["batch_size"]
        assert bs == dataset_input["dataset_params"]["batch_size"]
        counts = bucket_counts(items)
        batches = batches_per_bucket(items, bs)
        got = [
            {"bucket_id": i, "bucket": list(b), "count_with_repeats": counts[b], "batches": batches[b]}
            for i, b in enumerate(counts)
        ]
        assert got == expected["buckets_nonempty"]
        assert len(counts) == expected["n_buckets_including_empty"]
        n = batches_per_epoch(items, bs)
        assert n == expected["len_dataset_batches"]
        assert len(BucketBatcher(items, bs)) == n
        total += n
    assert total == scenario["len_train_dataloader (batches per epoch)"]


@pytest.mark.parametrize("scenario_id,index", STEP_ENTRIES, ids=[f"{s}-{i}" for s, i in STEP_ENTRIES])
def test_steps_per_epoch(golden, scenario_id, index):
    scenario = _scenario(golden, scenario_id)
    entry = scenario["steps_per_epoch"][index]
    n = sum(batches_per_epoch(_build(d)[2], d["dataset_params"]["batch_size"]) for d in scenario["input"])
    assert steps_per_epoch(n, entry["gradient_accumulation_steps"]) == entry["num_update_steps_per_epoch"]


@pytest.mark.parametrize("scenario_id,index", MAX_STEP_ENTRIES, ids=[f"{s}-{i}" for s, i in MAX_STEP_ENTRIES])
def test_max_train_steps(golden, scenario_id, index):
    scenario = _scenario(golden, scenario_id)
    entry = scenario["max_train_steps_for_max_train_epochs"][index]
    n = sum(batches_per_epoch(_build(d)[2], d["dataset_params"]["batch_size"]) for d in scenario["input"])
    got = max_train_steps_for_epochs(
        entry["max_train_epochs"], n, entry["gradient_accumulation_steps"], entry["num_processes"]
    )
    assert got == entry["max_train_steps"]


def _composition(batcher: BucketBatcher) -> list[dict]:
    return [{"bucket": list(b.bucket), "batch_index": b.batch_index, "images": list(b.keys)} for b in batcher.batches()]


@pytest.mark.parametrize("scenario_id", SCENARIOS)
def test_composition_orders(golden, scenario_id):
    scenario = _scenario(golden, scenario_id)
    for dataset_input, expected in zip(scenario["input"], scenario["datasets"]):
        _, _, items = _build(dataset_input)
        global_state = random.getstate()
        batcher = BucketBatcher(items, expected["batch_size"], seed=0)
        assert _composition(batcher) == expected[COMPOSITION_KEYS[0]]
        batcher.set_seed(1234)
        assert _composition(batcher) == expected[COMPOSITION_KEYS[0]]  # set_seed alone does not reshuffle
        batcher.set_current_epoch(1)
        assert _composition(batcher) == expected[COMPOSITION_KEYS[1]]
        assert random.getstate() == global_state, "the global random module must not be used"


# ------------------------------------------------------------------------------------------ semantics beyond golden


def _db(source, n, repeats=1, is_reg=False):
    return Subset(source, [f"{source}/{i}" for i in range(n)], repeats, is_reg)


def test_ignored_subsets():
    subsets = [_db("a", 2, 3), _db("a", 5, 1), _db("b", 1, 0), _db("c", 0, 2), _db("d", 1, 2)]
    reg = register_dreambooth(subsets)
    assert reg.subsets_used == [0, 4]
    assert [r.image for r in reg.images] == ["a/0", "a/1", "d/0"]
    assert reg.num_train_images == 2 * 3 + 1 * 2


def test_reg_images_beyond_need_are_not_registered():
    reg = register_dreambooth([_db("train", 3), _db("reg", 5, is_reg=True)])
    assert reg.num_train_images == 3 and reg.num_reg_images == 5
    assert [(r.image, r.num_repeats, r.is_reg) for r in reg.images if r.is_reg] == [
        ("reg/0", 1, True),
        ("reg/1", 1, True),
        ("reg/2", 1, True),
    ]


def test_reg_repeats_count_towards_need():
    reg = register_dreambooth([_db("train", 3), _db("reg", 5, repeats=2, is_reg=True)])
    assert [(r.image, r.num_repeats) for r in reg.images if r.is_reg] == [("reg/0", 2), ("reg/1", 2)]
    assert reg.num_reg_images == 10


def test_reg_balancing_adds_repeats_in_passes():
    # 2 reg images, 7 train images: first pass 1+1, then +1 each in order until 7: 4 and 3
    reg = register_dreambooth([_db("reg", 2, is_reg=True), _db("train", 7)])
    assert [r.image for r in reg.images][:7] == [f"train/{i}" for i in range(7)]  # reg always after train
    assert [(r.image, r.num_repeats) for r in reg.images if r.is_reg] == [("reg/0", 4), ("reg/1", 3)]


def test_no_train_images_means_no_reg_images():
    reg = register_dreambooth([_db("reg", 2, is_reg=True)])
    assert reg.images == [] and reg.num_reg_images == 2


def test_finetuning_order_is_by_decreasing_key_length():
    sub = Subset("m.jsonl", ["bb", "a", "ccc", "dd", "e"], 2)
    reg = register_finetuning([sub, Subset("m.jsonl", ["zzzz"], 1)])
    assert [r.image for r in reg.images] == ["ccc", "bb", "dd", "a", "e"]
    assert reg.num_train_images == 10 and reg.subsets_used == [0]


def test_buckets_never_mix_and_last_batch_is_short():
    items = [TrainItem("x", (1024, 1024), 5), TrainItem("y", (832, 1216), 1), TrainItem("z", (1024, 1024), 2)]
    assert bucket_counts(items) == {(832, 1216): 1, (1024, 1024): 7}
    assert batches_per_bucket(items, 4) == {(832, 1216): 1, (1024, 1024): 2}
    batcher = BucketBatcher(items, 4)
    sizes = sorted((b.bucket, len(b.keys)) for b in batcher.batches())
    assert sizes == [((832, 1216), 1), ((1024, 1024), 3), ((1024, 1024), 4)]
    for b in batcher.batches():
        assert all({"x": (1024, 1024), "y": (832, 1216), "z": (1024, 1024)}[k] == b.bucket for k in b.keys)
    all_keys = sorted(k for b in batcher.batches() for k in b.keys)
    assert all_keys == sorted(["x"] * 5 + ["y"] + ["z"] * 2)


def test_step_formulas():
    assert steps_per_epoch(25, 2) == 13
    assert max_train_steps_for_epochs(5, 25, 3, 2) == 25  # 5 * ceil(25 / 2 / 3)
    assert num_train_epochs_for_steps(125, 25) == 5 and num_train_epochs_for_steps(126, 25) == 6
    with pytest.raises(ValueError):
        steps_per_epoch(10, 0)
    with pytest.raises(ValueError):
        batches_per_epoch([TrainItem("x", (64, 64))], 0)


def test_epoch_jump_equals_successive_epochs():
    items = [TrainItem(f"k{i}", (1024, 1024) if i % 3 else (768, 1344), 1 + i % 4) for i in range(20)]
    a = BucketBatcher(items, 3, seed=7)
    b = BucketBatcher(items, 3, seed=7)
    a.set_current_epoch(1)
    a.set_current_epoch(2)
    b.set_current_epoch(2)
    assert a.batches() == b.batches()
    before = b.batches()
    b.set_current_epoch(1)  # going back only records the epoch
    assert b.current_epoch == 1 and b.batches() == before
    c = BucketBatcher(items, 3, seed=7)
    c.set_current_epoch(1)
    assert c.batches() != before  # different epochs, different orders


def test_seed_changes_composition():
    items = [TrainItem(f"k{i}", (1024, 1024), 2) for i in range(10)]
    assert BucketBatcher(items, 2, seed=0).batches() != BucketBatcher(items, 2, seed=1).batches()
    assert BucketBatcher(items, 2, seed=5).batches() == BucketBatcher(items, 2, seed=5).batches()
