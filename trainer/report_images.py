"""Small charts drawn with Pillow (no matplotlib needed): the bucket histogram and the loss graph.

Both return an RGB ``PIL.Image``; nodes turn it into a ComfyUI IMAGE. They must never fail on
degenerate input (one bucket, one step, constant loss), since a chart error would hide a good run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

BG = (255, 255, 255)
AXIS = (40, 40, 40)
BAR = (66, 133, 244)
REPEAT_BAR = (170, 200, 250)
LOSS = (66, 133, 244)
SMOOTH = (219, 68, 55)
LR = (15, 157, 88)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _num(v: object) -> float | None:
    """v as a finite float, or None (NaN, inf, None, not a number): charts skip what they cannot place."""
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _count(v: object) -> float:
    """A bar value: finite and not negative (a chart must not fail on a bad number)."""
    f = _num(v)
    return f if f is not None and f > 0 else 0.0


def _points(xs: Sequence[object], ys: Sequence[object]) -> list[tuple[float, float]]:
    """The (x, y) pairs where both are finite numbers (zip: the shorter sequence decides)."""
    pairs = ((_num(x), _num(y)) for x, y in zip(xs, ys))
    return [(x, y) for x, y in pairs if x is not None and y is not None]


def _step_label(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def bucket_histogram_image(
    buckets: Sequence[tuple[tuple[int, int], int, int]], width: int = 640, height: int = 360
) -> Image.Image:
    """Bars of images per bucket (dark) and images with repeats (light); buckets as 'WxH' labels."""
    img = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(img)
    font = _font()
    left, right, top, bottom = 48, 12, 24, 64
    draw.text((left, 4), "images per bucket (light: with repeats)", fill=AXIS, font=font)
    if width - right <= left or height - bottom <= top:
        return img  # too small for a plot: title only
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill=AXIS)
    if not buckets:
        draw.text((left + 10, height // 2), "no buckets", fill=AXIS, font=font)
        return img
    peak = max(max(_count(r), _count(n)) for _, n, r in buckets) or 1
    slot = (width - left - right) / len(buckets)
    bar_w = max(1.0, slot * 0.7)
    plot_h = height - top - bottom
    for i, ((w, h), n, r) in enumerate(buckets):
        x0 = left + i * slot + (slot - bar_w) / 2
        for value, colour in ((_count(r), REPEAT_BAR), (_count(n), BAR)):
            y = height - bottom - plot_h * value / peak
            draw.rectangle([x0, y, x0 + bar_w, height - bottom], fill=colour)
        label = f"{w}x{h}"
        draw.text((x0, height - bottom + 4 + (i % 3) * 12), label, fill=AXIS, font=font)
        draw.text((x0, height - bottom - plot_h * _count(r) / peak - 12), str(r), fill=AXIS, font=font)
    draw.text((4, top), f"{peak:g}", fill=AXIS, font=font)
    draw.text((4, height - bottom - 10), "0", fill=AXIS, font=font)
    return img


def smoothed(values: Sequence[float], window: int = 25) -> list[float]:
    """Trailing moving average (kohya's loss/average uses an epoch-wise mean; a window reads better live)."""
    out: list[float] = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _span(lo: float, hi: float, pad_floor: float) -> tuple[float, float]:
    """A non-empty [lo, hi]: a flat series (one step, constant value) is padded by 10% (or pad_floor)."""
    if hi - lo <= abs(hi) * 1e-12:
        pad = abs(lo) * 0.1 or pad_floor
        return lo - pad, hi + pad
    return lo, hi


def _frac(v: float, lo: float, hi: float) -> float:
    """(v - lo) / (hi - lo), also when hi - lo overflows (values near the float limits)."""
    span = hi - lo
    if not math.isfinite(span):
        return (v / 2 - lo / 2) / (hi / 2 - lo / 2)
    return (v - lo) / span


def loss_graph_image(
    steps: Sequence[int],
    losses: Sequence[float],
    lrs: Sequence[float] | None = None,
    width: int = 800,
    height: int = 400,
) -> Image.Image:
    """Raw loss, its moving average and (right axis) the learning rate against the step.

    Non-finite losses / lrs are left out (the lines join their neighbours); one step is drawn as dots
    (lr, loss, average: concentric, so each stays visible); a constant series is a flat line mid-plot.
    """
    img = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(img)
    font = _font()
    left, right, top, bottom = 64, 64, 28, 36
    draw.text((left, 6), "loss (blue), average (red), lr (green, right axis)", fill=AXIS, font=font)
    pw, ph = width - left - right, height - top - bottom
    if pw < 2 or ph < 2:
        return img  # too small for a plot: title only
    draw.rectangle([left, top, width - right, height - bottom], outline=AXIS)
    finite = _points(steps, losses)
    if not finite:
        draw.text((left + 10, height // 2), "no loss recorded", fill=AXIS, font=font)
        return img
    xs = [s for s, _ in finite]
    ys = [loss for _, loss in finite]
    first, last = min(xs), max(xs)
    x_lo, x_hi = (first - 1, last + 1) if last == first else (first, last)
    y_lo, y_hi = _span(min(ys), max(ys), 1.0)

    def pt(x: float, y: float, lo: float, hi: float) -> tuple[float, float]:
        return left + pw * _frac(x, x_lo, x_hi), top + ph * (1 - _frac(y, lo, hi))

    def polyline(points: list[tuple[float, float]], colour: tuple[int, int, int], width_px: int, dot: int) -> None:
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=colour)
        else:
            draw.line(points, fill=colour, width=width_px)

    # lr first, so the loss lines are drawn over it where they cross.
    if lrs:
        lr_pts = _points(steps, lrs)
        if lr_pts:
            lo, hi = _span(min(v for _, v in lr_pts), max(v for _, v in lr_pts), 1e-6)
            polyline([pt(x, v, lo, hi) for x, v in lr_pts], LR, 1, 6)
            draw.text((width - right + 4, top), f"{hi:.2e}", fill=LR, font=font)
            draw.text((width - right + 4, height - bottom - 10), f"{lo:.2e}", fill=LR, font=font)
    polyline([pt(x, y, y_lo, y_hi) for x, y in finite], LOSS, 1, 4)
    polyline([pt(x, y, y_lo, y_hi) for x, y in zip(xs, smoothed(ys))], SMOOTH, 2, 2)
    draw.text((4, top), f"{y_hi:.4g}", fill=AXIS, font=font)
    draw.text((4, height - bottom - 10), f"{y_lo:.4g}", fill=AXIS, font=font)
    draw.text((left, height - bottom + 6), f"step {_step_label(first)}", fill=AXIS, font=font)
    draw.text((width - right - 60, height - bottom + 6), f"step {_step_label(last)}", fill=AXIS, font=font)
    return img
