"""The Pillow charts (loss graph, bucket histogram) on degenerate input: never raise, right size, something drawn.

Pillow draws without anti-aliasing, so each series is found by its exact colour inside the plot frame.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageChops

from sdxl_lora_trainer.trainer import report_images as ri
from sdxl_lora_trainer.trainer.report_images import bucket_histogram_image, loss_graph_image, smoothed

NAN = float("nan")
INF = float("inf")
W, H = 800, 400
# loss_graph_image's plot frame at its default size (left, top, right, bottom margins 64, 28, 64, 36).
PLOT = (64, 28, W - 64, H - 36)


def pixels(img: Image.Image, colour: tuple[int, int, int], box: tuple[int, int, int, int] = PLOT) -> np.ndarray:
    """Mask of the pixels of exactly `colour` strictly inside box (the frame line itself excluded)."""
    x0, y0, x1, y1 = box
    a = np.asarray(img.convert("RGB"))[y0 + 1 : y1, x0 + 1 : x1]
    return np.all(a == np.array(colour, dtype=np.uint8), axis=-1)


def non_background(img: Image.Image, box: tuple[int, int, int, int] = PLOT) -> int:
    return int((~pixels(img, ri.BG, box)).sum())


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None


# ---- loss graph ------------------------------------------------------------------------------------------


def test_normal_run_draws_all_three_series():
    steps = list(range(1, 51))
    img = loss_graph_image(steps, [0.2 + 0.1 * math.sin(s / 3) for s in steps], [1e-4 * s / 50 for s in steps])
    assert img.size == (W, H) and img.mode == "RGB"
    for colour in (ri.LOSS, ri.SMOOTH, ri.LR):
        assert pixels(img, colour).sum() > 200, colour


def test_one_step_shows_loss_average_and_lr():
    img = loss_graph_image([1], [0.5], [1e-4])
    assert img.size == (W, H)
    # One point each: concentric dots (lr under loss under average), so every series stays visible.
    for colour in (ri.LOSS, ri.SMOOTH, ri.LR):
        assert pixels(img, colour).sum() > 0, colour
    ys, xs = np.nonzero(pixels(img, ri.SMOOTH))
    plot_w, plot_h = PLOT[2] - PLOT[0], PLOT[3] - PLOT[1]
    assert abs(xs.mean() - plot_w / 2) < 3 and abs(ys.mean() - plot_h / 2) < 3  # mid-plot, not on an edge


def test_one_step_without_lr():
    img = loss_graph_image([7], [0.3])
    assert img.size == (W, H)
    assert pixels(img, ri.LOSS).sum() > 0 and pixels(img, ri.SMOOTH).sum() > 0
    assert pixels(img, ri.LR).sum() == 0


def test_constant_loss_is_a_flat_line_across_the_plot():
    steps = list(range(1, 21))
    img = loss_graph_image(steps, [0.25] * 20, [1e-4] * 20)
    assert img.size == (W, H)
    mask = pixels(img, ri.SMOOTH)
    ys, xs = np.nonzero(mask)
    plot_w, plot_h = PLOT[2] - PLOT[0], PLOT[3] - PLOT[1]
    assert xs.max() - xs.min() >= plot_w - 4  # spans the plot
    assert ys.max() - ys.min() <= 2 and abs(ys.mean() - plot_h / 2) < 3  # one flat line, mid-plot


def test_zero_loss_constant():
    img = loss_graph_image([1, 2, 3], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    assert img.size == (W, H)
    assert pixels(img, ri.SMOOTH).sum() > 100


def test_nan_entries_are_skipped_exactly():
    """NaN / inf / None losses are left out: the very picture of the run without those steps."""
    bad = loss_graph_image([1, 2, 3, 4, 5, 6], [0.5, NAN, 0.4, INF, 0.45, None])
    clean = loss_graph_image([1, 3, 5], [0.5, 0.4, 0.45])
    assert bad.size == (W, H)
    assert pixels(bad, ri.LOSS).sum() > 100 and pixels(bad, ri.SMOOTH).sum() > 100
    assert same(bad, clean)  # the x axis ends at the last finite loss (step 5) in both
    assert not same(bad, loss_graph_image([1, 3, 6], [0.5, 0.4, 0.45]))  # the comparison can tell


def test_nan_lr_entries_are_skipped():
    img = loss_graph_image([1, 2, 3, 4], [0.5, 0.4, 0.45, 0.42], [1e-4, NAN, None, 4e-4])
    ref = loss_graph_image([1, 2, 3, 4], [0.5, 0.4, 0.45, 0.42], [1e-4, 4e-4, 4e-4, 4e-4])
    assert img.size == (W, H)
    assert pixels(img, ri.LR).sum() > 100
    assert not same(img, ref)  # the lr line joins step 1 to step 4 directly


def test_all_nan_says_so_and_draws_no_series():
    img = loss_graph_image([1, 2, 3], [NAN, NAN, INF], [NAN, NAN, NAN])
    assert img.size == (W, H)
    assert non_background(img) > 0  # the "no loss recorded" text
    for colour in (ri.LOSS, ri.SMOOTH, ri.LR):
        assert pixels(img, colour).sum() == 0


@pytest.mark.parametrize("lrs", [[], None])
def test_empty_history(lrs):
    img = loss_graph_image([], [], lrs)
    assert img.size == (W, H)
    assert non_background(img) > 0  # "no loss recorded"
    assert non_background(img, (0, 0, W, 24)) > 0  # the title
    for colour in (ri.LOSS, ri.SMOOTH, ri.LR):
        assert pixels(img, colour).sum() == 0


def test_constant_lr_is_a_flat_line_under_a_moving_loss():
    steps = list(range(1, 31))
    img = loss_graph_image(steps, [1.0 / s for s in steps], [3e-4] * 30)
    mask = pixels(img, ri.LR)
    ys, xs = np.nonzero(mask)
    plot_w, plot_h = PLOT[2] - PLOT[0], PLOT[3] - PLOT[1]
    assert xs.max() - xs.min() >= plot_w - 4
    assert ys.max() - ys.min() <= 1 and abs(ys.mean() - plot_h / 2) < 3
    assert pixels(img, ri.LOSS).sum() > 100 and pixels(img, ri.SMOOTH).sum() > 100


def test_lr_zero_and_mismatched_lengths():
    img = loss_graph_image([1, 2, 3, 4], [1.0, 0.9, 0.8], [0.0])  # fewer losses than steps, one lr
    assert img.size == (W, H)
    assert pixels(img, ri.LOSS).sum() > 100
    assert pixels(img, ri.LR).sum() > 0  # the one lr: a dot


def test_extreme_values():
    img = loss_graph_image([1, 2, 3], [1e308, -1e308, 0.0], [1e-300, 1e-300, 2e-300])
    assert img.size == (W, H)
    assert pixels(img, ri.LOSS).sum() > 100 and pixels(img, ri.LR).sum() > 100


def test_large_step_numbers_label_as_integers():
    img = loss_graph_image([1_000_000, 1_000_001], [0.1, 0.2])
    assert img.size == (W, H)
    assert pixels(img, ri.LOSS).sum() > 100
    assert ri._step_label(1_000_000) == "1000000" and ri._step_label(2.5) == "2.5"


@pytest.mark.parametrize("size", [(1, 1), (10, 10), (100, 50), (129, 65), (320, 200)])
def test_any_size(size):
    img = loss_graph_image([1, 2, 3], [0.3, 0.2, 0.25], [1e-4, 1e-4, 1e-4], width=size[0], height=size[1])
    assert img.size == size
    if size == (320, 200):
        assert pixels(img, ri.SMOOTH, (64, 28, 320 - 64, 200 - 36)).sum() > 50


def test_smoothed_is_a_trailing_window_mean():
    assert smoothed([1.0, 2.0, 3.0, 4.0], window=2) == [1.0, 1.5, 2.5, 3.5]
    assert smoothed([0.25] * 40) == [0.25] * 40
    assert smoothed([]) == []
    assert smoothed([5.0]) == [5.0]


# ---- bucket histogram ---------------------------------------------------------------------------------------

HW, HH = 640, 360
HPLOT = (48, 24, HW - 12, HH - 64)


def test_histogram_empty_says_no_buckets():
    img = bucket_histogram_image([])
    assert img.size == (HW, HH)
    assert non_background(img, HPLOT) > 0
    assert pixels(img, ri.BAR, HPLOT).sum() == 0 and pixels(img, ri.REPEAT_BAR, HPLOT).sum() == 0


def test_histogram_one_bucket():
    img = bucket_histogram_image([((1024, 1024), 3, 30)])
    assert img.size == (HW, HH)
    assert pixels(img, ri.BAR, HPLOT).sum() > 100
    assert pixels(img, ri.REPEAT_BAR, HPLOT).sum() > pixels(img, ri.BAR, HPLOT).sum()  # 30 > 3


def test_histogram_zero_counts():
    img = bucket_histogram_image([((512, 512), 0, 0), ((640, 384), 0, 0)])
    assert img.size == (HW, HH)
    assert non_background(img, (0, HH - 64, HW, HH)) > 0  # the bucket labels


@pytest.mark.parametrize("bad", [-1, NAN, INF, None])
def test_histogram_bad_counts_never_raise(bad):
    img = bucket_histogram_image([((512, 512), bad, 4), ((640, 384), 2, bad)])
    assert img.size == (HW, HH)
    assert pixels(img, ri.REPEAT_BAR, HPLOT).sum() > 0 or pixels(img, ri.BAR, HPLOT).sum() > 0


def test_histogram_many_buckets():
    buckets = [((64 * (i % 16 + 1), 64 * (16 - i % 16)), i % 5 + 1, (i % 5 + 1) * 2) for i in range(300)]
    img = bucket_histogram_image(buckets)
    assert img.size == (HW, HH)
    assert pixels(img, ri.BAR, HPLOT).sum() > 100


@pytest.mark.parametrize("size", [(1, 1), (10, 10), (100, 50)])
def test_histogram_any_size(size):
    assert bucket_histogram_image([((512, 512), 1, 2)], width=size[0], height=size[1]).size == size
