"""trainer/data/images.py: conversions to RGB, EXIF orientation, and bad-file messages (all images made here)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from sdxl_lora_trainer.trainer.data.images import (
    DEFAULT_MAX_PIXELS,
    DatasetError,
    load_image_rgb,
    probe_image_info,
    to_rgb,
    verify_image,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def _half_red_half_blue(w: int = 40, h: int = 20) -> Image.Image:
    """Left half red, right half blue: rotations/flips are visible from a few pixels."""
    im = Image.new("RGB", (w, h), BLUE)
    im.paste(Image.new("RGB", (w // 2, h), RED), (0, 0))
    return im


def _save_with_orientation(im: Image.Image, path: Path, orientation: int) -> Path:
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif)
    return path


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _noise(w: int = 128, h: int = 128) -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype(np.uint8))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A syntactically valid PNG header claiming a size, with no pixel data (no need to allocate it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


# ----------------------------------------------------------------------------------------- good files


def test_rgb_png_is_returned_pixel_exact(tmp_path):
    src = _noise(33, 17)
    src.save(tmp_path / "a.png")
    out = load_image_rgb(tmp_path / "a.png")
    assert out.mode == "RGB" and out.size == (33, 17)
    assert np.array_equal(np.asarray(out), np.asarray(src))


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp"])
def test_exif_orientation_6_is_applied_by_default(tmp_path, ext):
    path = _save_with_orientation(_half_red_half_blue(40, 20), tmp_path / f"o{ext}", 6)
    out = load_image_rgb(path)
    # Orientation 6 = the camera was turned 90 degrees clockwise: displayed upright the image is 20x40
    # with the former left (red) half on top.
    assert out.size == (20, 40)
    top = out.getpixel((10, 3))
    bottom = out.getpixel((10, 36))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    assert probe_image_info(path).size == (20, 40)


def test_exif_orientation_off_keeps_stored_pixels(tmp_path):
    path = _save_with_orientation(_half_red_half_blue(40, 20), tmp_path / "o.png", 6)
    out = load_image_rgb(path, exif_transpose=False)
    assert out.size == (40, 20)
    assert out.getpixel((2, 10)) == RED
    assert out.getpixel((37, 10)) == BLUE
    assert probe_image_info(path, exif_transpose=False).size == (40, 20)


def test_exif_orientation_3_rotates_180(tmp_path):
    path = _save_with_orientation(_half_red_half_blue(40, 20), tmp_path / "o.png", 3)
    out = load_image_rgb(path)
    assert out.size == (40, 20)
    assert out.getpixel((2, 10)) == BLUE and out.getpixel((37, 10)) == RED


def test_rgba_transparency_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (3, 1))
    im.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black: kohya's convert("RGB") would give black
    im.putpixel((1, 0), (255, 0, 0, 255))
    im.putpixel((2, 0), (0, 0, 255, 128))
    im.save(tmp_path / "t.png")
    out = load_image_rgb(tmp_path / "t.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (255, 0, 0)
    r, g, b = out.getpixel((2, 0))
    assert abs(r - 127) <= 1 and abs(g - 127) <= 1 and b == 255


def test_la_and_palette_and_rgb_trns_transparency_on_white(tmp_path):
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    p = Image.new("P", (2, 2), 0)
    p.putpalette([0, 0, 0, 255, 0, 0])
    p.putpixel((1, 1), 1)
    p.save(tmp_path / "p.png", transparency=0)
    Image.new("RGB", (2, 2), (10, 20, 30)).save(tmp_path / "trns.png", transparency=(10, 20, 30))

    assert load_image_rgb(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)
    pal = load_image_rgb(tmp_path / "p.png")
    assert pal.getpixel((0, 0)) == (255, 255, 255)
    assert pal.getpixel((1, 1)) == (255, 0, 0)
    assert load_image_rgb(tmp_path / "trns.png").getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_is_converted_to_rgb(tmp_path):
    im = Image.new("CMYK", (4, 1))
    im.putpixel((0, 0), (255, 0, 0, 0))  # cyan
    im.putpixel((1, 0), (0, 255, 0, 0))  # magenta
    im.putpixel((2, 0), (0, 0, 0, 255))  # black
    im.putpixel((3, 0), (0, 0, 0, 0))  # white
    im.save(tmp_path / "c.tif")  # lossless container for CMYK
    out = load_image_rgb(tmp_path / "c.tif")
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0)) for x in range(4)] == [(0, 255, 255), (255, 0, 255), (0, 0, 0), (255, 255, 255)]


def test_cmyk_jpeg_loads_as_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "c.jpg", quality=100)
    out = load_image_rgb(tmp_path / "c.jpg")
    r, g, b = out.getpixel((8, 8))
    assert out.mode == "RGB" and r < 20 and g > 235 and b > 235


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    out = np.asarray(load_image_rgb(tmp_path / "g16.png"))
    # value / 257, rounded: clipping (Pillow's convert) would give 0, 255, 255, 255
    assert out[0, :, 0].tolist() == [0, 4, 128, 255]
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_32bit_integer_greyscale_is_treated_as_16bit(tmp_path):
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.int32)
    Image.fromarray(values, mode="I").save(tmp_path / "gi.tif")
    assert Image.open(tmp_path / "gi.tif").mode == "I"
    out = np.asarray(load_image_rgb(tmp_path / "gi.tif"))
    assert out[0, :, 1].tolist() == [0, 4, 128, 255]


def test_greyscale_and_bilevel_become_rgb(tmp_path):
    Image.new("L", (2, 2), 77).save(tmp_path / "l.png")
    bw = Image.new("1", (2, 1), 0)
    bw.putpixel((1, 0), 1)
    bw.save(tmp_path / "bw.png")
    assert load_image_rgb(tmp_path / "l.png").getpixel((0, 0)) == (77, 77, 77)
    out = load_image_rgb(tmp_path / "bw.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)


@pytest.mark.parametrize("ext", [".gif", ".webp", ".png"])
def test_animated_image_uses_first_frame_and_warns(tmp_path, ext):
    first = Image.new("RGB", (8, 8), RED)
    second = Image.new("RGB", (8, 8), (0, 255, 0))
    path = tmp_path / f"anim{ext}"
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0, lossless=True)
    notes: list[str] = []
    out = load_image_rgb(path, warnings_out=notes)
    r, g, b = out.getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15
    assert len(notes) == 1 and "anim" + ext in notes[0] and "first frame" in notes[0] and "2 frames" in notes[0]
    assert probe_image_info(path).is_animated


def test_wide_strip_12000x300_is_allowed(tmp_path):
    Image.new("L", (12000, 300), 10).save(tmp_path / "wide.png")
    assert probe_image_info(tmp_path / "wide.png").size == (12000, 300)
    assert load_image_rgb(tmp_path / "wide.png").size == (12000, 300)


def test_to_rgb_returns_rgb_for_every_common_mode():
    for mode in ("RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr", "1", "I", "I;16", "F"):
        assert to_rgb(Image.new(mode, (2, 2))).mode == "RGB", mode


# ------------------------------------------------------------------------------------------ bad files


def test_zero_byte_file_error_names_file_and_fix(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    for fn in (load_image_rgb, probe_image_info, verify_image):
        with pytest.raises(DatasetError) as e:
            fn(path)
        assert "empty.png" in str(e.value) and "0 bytes" in str(e.value) and "re-copy" in str(e.value)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_image_is_detected_on_load(tmp_path, ext):
    path = tmp_path / f"cut{ext}"
    _noise().save(path)
    _truncate(path)
    assert probe_image_info(path).size == (128, 128)  # the header is intact: only a full decode finds it
    for fn in (load_image_rgb, verify_image):
        with pytest.raises(DatasetError) as e:
            fn(path)
        msg = str(e.value)
        assert f"cut{ext}" in msg and "truncated" in msg and "Re-download" in msg


def test_truncation_is_detected_even_if_someone_enabled_load_truncated_images(tmp_path, monkeypatch):
    path = tmp_path / "cut.jpg"
    _noise().save(path)
    _truncate(path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as ComfyUI's helpers may leave it
    with pytest.raises(DatasetError, match="truncated"):
        load_image_rgb(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards


def test_corrupt_pixel_data_is_reported(tmp_path):
    path = tmp_path / "bad.png"
    _noise().save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start : start + 200] = b"\x00" * 200  # garbage inside the compressed stream, length unchanged
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError) as e:
        load_image_rgb(path)
    assert "bad.png" in str(e.value) and ("corrupt" in str(e.value) or "truncated" in str(e.value))


def test_non_image_with_image_extension(tmp_path):
    path = tmp_path / "page.jpg"
    path.write_text("<!DOCTYPE html><html><body>404</body></html>")
    with pytest.raises(DatasetError) as e:
        load_image_rgb(path)
    msg = str(e.value)
    assert "page.jpg" in msg and "not an image" in msg and "HTML" in msg and "move it out" in msg


def test_decompression_bomb_guard_uses_header_only(tmp_path):
    path = _png_header_only(tmp_path / "huge.png", 12000, 12000)  # 144 MP: over our guard, under Pillow's
    assert DEFAULT_MAX_PIXELS < 12000 * 12000
    for fn in (probe_image_info, load_image_rgb):
        with pytest.raises(DatasetError) as e:
            fn(path)
        msg = str(e.value)
        assert "huge.png" in msg and "12000x12000" in msg and "decompression bomb" in msg and "downscale" in msg


def test_pixel_guard_is_configurable(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="megapixels"):
        load_image_rgb(tmp_path / "a.png", max_pixels=5000)
    assert load_image_rgb(tmp_path / "a.png", max_pixels=10000).size == (100, 100)


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_image_rgb(tmp_path / "nope.png")
    assert "nope.png" in str(e.value) and "does not exist" in str(e.value)


def test_dataset_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)
