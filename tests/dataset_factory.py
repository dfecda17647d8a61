"""Generate small training folders (kohya layout, sidecar captions, TOML) for tests and the demo.

Images are drawn with Pillow at test time; no binary is committed.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def draw_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A deterministic picture: a coloured background with a few shapes (different per seed)."""
    w, h = size
    img = Image.new("RGB", size, ((seed * 67) % 256, (seed * 131) % 256, (seed * 29) % 256))
    d = ImageDraw.Draw(img)
    for k in range(3):
        x0, y0 = (seed * 17 + k * 31) % max(1, w // 2), (seed * 23 + k * 19) % max(1, h // 2)
        d.ellipse([x0, y0, x0 + w // 3, y0 + h // 3], fill=((k * 90) % 256, (seed * 50 + k * 40) % 256, 200))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def kohya_folder(root: Path, subsets: dict[str, list[tuple[int, int]]], caption_ext: str = ".txt") -> Path:
    """``{"3_cat": [(128, 96), ...], ...}`` → root/3_cat/img_0.png + img_0.txt ('cat photo 0')."""
    seed = 0
    for name, sizes in subsets.items():
        for i, size in enumerate(sizes):
            img = draw_image(root / name / f"img_{i}.png", size, seed)
            label = name.split("_", 1)[-1]
            img.with_suffix(caption_ext).write_text(f"{label} photo {i}, shape {seed}")
            seed += 1
    return root
