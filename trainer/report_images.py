"""Small charts drawn with Pillow (no matplotlib needed): the bucket histogram and the loss graph.

Both return an RGB ``PIL.Image``; nodes turn it into a ComfyUI IMAGE. They must never fail on
degenerate input (one bucket, one step, constant loss), since a chart error would hide a good run.
"""
from __future__ import annotations

import math
from typing import Sequence

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


def bucket_histogram_image(buckets: Sequence[tuple[tuple[int, int], int, int]], width: int = 640,
                           height: int = 360) -> Image.Image:
    """Bars of images per bucket (dark) and images with repeats (light); buckets as 'WxH' labels."""
    img = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(img)
    font = _font()
    left, right, top, bottom = 48, 12, 24, 64
    draw.text((left, 4), "images per bucket (light: with repeats)", fill=AXIS, font=font)
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill=AXIS)
    if not buckets:
        draw.text((left + 10, height // 2), "no buckets", fill=AXIS, font=font)
        return img
    peak = max(max(r, n) for _, n, r in buckets) or 1
    slot = (width - left - right) / len(buckets)
    bar_w = max(1.0, slot * 0.7)
    plot_h = height - top - bottom
    for i, ((w, h), n, r) in enumerate(buckets):
        x0 = left + i * slot + (slot - bar_w) / 2
        for value, colour in ((r, REPEAT_BAR), (n, BAR)):
            y = height - bottom - plot_h * value / peak
            draw.rectangle([x0, y, x0 + bar_w, height - bottom], fill=colour)
        label = f"{w}x{h}"
        draw.text((x0, height - bottom + 4 + (i % 3) * 12), label, fill=AXIS, font=font)
        draw.text((x0, height - bottom - plot_h * r / peak - 12), str(r), fill=AXIS, font=font)
    draw.text((4, top), str(peak), fill=AXIS, font=font)
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


def loss_graph_image(steps: Sequence[int], losses: Sequence[float], lrs: Sequence[float] | None = None,
                     width: int = 800, height: int = 400) -> Image.Image:
    """Raw loss, its moving average and (right axis) the learning rate against the step."""
    img = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(img)
    font = _font()
    left, right, top, bottom = 64, 64, 28, 36
    draw.text((left, 6), "loss (blue), average (red), lr (green, right axis)", fill=AXIS, font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline=AXIS)
    finite = [(s, l) for s, l in zip(steps, losses) if math.isfinite(l)]
    if not finite:
        draw.text((left + 10, height // 2), "no loss recorded", fill=AXIS, font=font)
        return img
    xs = [s for s, _ in finite]
    ys = [l for _, l in finite]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi == y_lo:
        pad = abs(y_lo) * 0.1 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad
    pw, ph = width - left - right, height - top - bottom

    def pt(x: float, y: float, lo: float, hi: float) -> tuple[float, float]:
        return left + pw * (x - x_lo) / (x_hi - x_lo), top + ph * (1 - (y - lo) / (hi - lo))

    def polyline(points: list[tuple[float, float]], colour: tuple[int, int, int], width_px: int) -> None:
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        else:
            draw.line(points, fill=colour, width=width_px)

    polyline([pt(x, y, y_lo, y_hi) for x, y in finite], LOSS, 1)
    polyline([pt(x, y, y_lo, y_hi) for x, y in zip(xs, smoothed(ys))], SMOOTH, 2)
    if lrs:
        lr_pts = [(s, lr) for s, lr in zip(steps, lrs) if math.isfinite(lr)]
        if lr_pts:
            lo, hi = min(v for _, v in lr_pts), max(v for _, v in lr_pts)
            if hi == lo:
                lo, hi = lo - (abs(lo) * 0.1 or 1e-6), hi + (abs(hi) * 0.1 or 1e-6)
            polyline([pt(x, v, lo, hi) for x, v in lr_pts], LR, 1)
            draw.text((width - right + 4, top), f"{hi:.2e}", fill=LR, font=font)
            draw.text((width - right + 4, height - bottom - 10), f"{lo:.2e}", fill=LR, font=font)
    draw.text((4, top), f"{y_hi:.4g}", fill=AXIS, font=font)
    draw.text((4, height - bottom - 10), f"{y_lo:.4g}", fill=AXIS, font=font)
    draw.text((left, height - bottom + 6), f"step {x_lo}", fill=AXIS, font=font)
    draw.text((width - right - 60, height - bottom + 6), f"step {x_hi}", fill=AXIS, font=font)
    return img
