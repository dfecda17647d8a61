"""trainer/data/sources.py: kohya folder layout, captions, metadata.jsonl, in-graph images, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_lora_trainer.trainer.data.sources import (
    DatasetError,
    DatasetItem,
    ScanOptions,
    ScanResult,
    items_from_images,
    parse_repeats_folder_name,
    read_caption_file,
    resolve_dataset_path,
    scan_folder,
    scan_image_dir,
    scan_metadata_jsonl,
)


def img(path: Path, size=(64, 48), color=(200, 10, 10), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def cap(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def names(result: ScanResult) -> list[str]:
    return [Path(i.image_path).name for i in result.items]


def skipped_reason(result: ScanResult, name: str) -> str:
    hits = [reason for path, reason in result.skipped if Path(path).name == name]
    assert hits, f"{name} not in skipped: {result.skipped}"
    return hits[0]


# ---------------------------------------------------------------------------------------------- plain


def test_plain_folder_sorted_with_captions_and_sizes(tmp_path):
    img(tmp_path / "b.png", (30, 20))
    img(tmp_path / "a.jpg", (10, 40))
    img(tmp_path / "c.webp", (16, 16))
    img(tmp_path / "d.bmp", (8, 8))
    cap(tmp_path / "a.txt", "a cat")
    cap(tmp_path / "b.txt", "a dog")
    cap(tmp_path / "c.txt", "a bird")
    cap(tmp_path / "d.txt", "a fish")
    r = scan_folder(tmp_path)
    assert names(r) == ["a.jpg", "b.png", "c.webp", "d.bmp"]
    assert [i.caption for i in r.items] == ["a cat", "a dog", "a bird", "a fish"]
    assert [i.image_size for i in r.items] == [(10, 40), (30, 20), (16, 16), (8, 8)]
    assert all(i.num_repeats == 1 and not i.is_reg and i.caption_source == "file" for i in r.items)
    assert r.skipped == [] and r.warnings == []


def test_default_repeats_and_is_reg(tmp_path):
    img(tmp_path / "a.png")
    cap(tmp_path / "a.txt", "x")
    r = scan_folder(tmp_path, default_repeats=4, is_reg=True)
    assert r.items[0].num_repeats == 4 and r.items[0].is_reg
    assert r.num_images_with_repeats == 4


def test_extensions_are_case_insensitive(tmp_path):
    img(tmp_path / "A.PNG")
    img(tmp_path / "b.JpEg")
    cap(tmp_path / "notes.md", "not an image")
    r = scan_folder(tmp_path)
    assert names(r) == ["A.PNG", "b.JpEg"]


def test_caption_extension_option(tmp_path):
    img(tmp_path / "a.png")
    cap(tmp_path / "a.txt", "from txt")
    cap(tmp_path / "a.caption", "from caption")
    assert scan_folder(tmp_path).items[0].caption == "from txt"
    dotted = scan_folder(tmp_path, options=ScanOptions(caption_extension=".caption"))
    undotted = scan_folder(tmp_path, options=ScanOptions(caption_extension="caption"))
    assert dotted.items[0].caption == "from caption"
    assert undotted.items[0].caption == "from caption"  # dot added


def test_recursive_scan_of_plain_folder(tmp_path):
    img(tmp_path / "m.png")
    img(tmp_path / "a" / "z.png")
    img(tmp_path / "z" / "deep" / "a.png")
    # full path strings sorted, as kohya sorts its globbed paths (not by file name)
    assert names(scan_folder(tmp_path)) == ["z.png", "m.png", "a.png"]
    assert names(scan_folder(tmp_path, options=ScanOptions(recursive=False))) == ["m.png"]


def test_first_caption_line_only_and_wildcard(tmp_path):
    img(tmp_path / "a.png")
    cap(tmp_path / "a.txt", "  line one  \r\nline two\n\nline three\n")
    r = scan_folder(tmp_path)
    assert r.items[0].caption == "line one"
    assert any("a.txt" in w and "first line" in w for w in r.warnings)
    r2 = scan_folder(tmp_path, options=ScanOptions(enable_wildcard=True))
    assert r2.items[0].caption == "line one\nline two\nline three"


def test_caption_with_utf8_bom_is_stripped(tmp_path):
    img(tmp_path / "a.png")
    cap(tmp_path / "a.txt", "\ufeff1girl, solo".encode("utf-8"))
    r = scan_folder(tmp_path)
    assert r.items[0].caption == "1girl, solo"
    assert r.items[0].caption_path == str(tmp_path / "a.txt")


def test_duplicate_stems_are_both_kept_with_warning(tmp_path):
    img(tmp_path / "a.png")
    img(tmp_path / "a.jpg")
    cap(tmp_path / "a.txt", "shared")
    r = scan_folder(tmp_path)
    assert names(r) == ["a.jpg", "a.png"]
    assert [i.caption for i in r.items] == ["shared", "shared"]
    dup = [w for w in r.warnings if "same name" in w]
    assert len(dup) == 1 and "a.jpg" in dup[0] and "a.png" in dup[0] and "a.txt" in dup[0]


def test_face_crop_name_falls_back_to_base_caption(tmp_path):
    img(tmp_path / "photo_10_20_30_40.png")
    cap(tmp_path / "photo.txt", "base caption")
    r = scan_folder(tmp_path)
    assert r.items[0].caption == "base caption"
    assert r.items[0].caption_path == str(tmp_path / "photo.txt")


def test_relative_path_resolves_against_input_dir(tmp_path):
    input_dir = tmp_path / "input"
    img(input_dir / "my set" / "a.png")
    r = scan_folder("my set", input_dir=input_dir)
    assert r.items[0].image_path == str(input_dir / "my set" / "a.png")
    r2 = scan_folder(f'"{input_dir / "my set"}"', input_dir=tmp_path / "elsewhere")  # quoted absolute path
    assert names(r2) == ["a.png"]
    p, how = resolve_dataset_path("x", input_dir)
    assert p == input_dir / "x" and "ComfyUI's input directory" in how


def test_images_smaller_than_anything_are_kept_with_their_size(tmp_path):
    img(tmp_path / "tiny.png", (3, 2))
    assert scan_folder(tmp_path).items[0].image_size == (3, 2)


def test_image_size_accounts_for_exif_orientation(tmp_path):
    im = Image.new("RGB", (40, 20))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert scan_folder(tmp_path).items[0].image_size == (20, 40)
    item = scan_folder(tmp_path, options=ScanOptions(exif_transpose=False)).items[0]
    assert item.image_size == (40, 20) and item.exif_transpose is False
    assert item.load_rgb().size == (40, 20)


def test_folder_named_like_kohya_subset_warns_when_chosen_directly(tmp_path):
    img(tmp_path / "5_mychar" / "a.png")
    r = scan_folder(tmp_path / "5_mychar")
    assert r.items[0].num_repeats == 1
    assert any("5_mychar" in w and "parent folder" in w for w in r.warnings)


def test_metadata_jsonl_in_folder_is_mentioned(tmp_path):
    img(tmp_path / "a.png")
    cap(tmp_path / "metadata.jsonl", '{"file_name": "a.png", "text": "x"}\n')
    r = scan_folder(tmp_path)
    assert any("metadata.jsonl" in w for w in r.warnings)


# ---------------------------------------------------------------------------------------- kohya layout


def test_parse_repeats_folder_name_follows_kohya():
    assert parse_repeats_folder_name("10_sks dog") == (10, "sks dog")
    assert parse_repeats_folder_name("3_a_b") == (3, "a_b")
    assert parse_repeats_folder_name("7") == (7, "")
    assert parse_repeats_folder_name("0_x") == (0, "x")
    assert parse_repeats_folder_name("-2_x") == (-2, "x")
    assert parse_repeats_folder_name("sks_10") is None
    assert parse_repeats_folder_name("1e3_x") is None
    assert parse_repeats_folder_name("_x") is None


def test_repeats_from_kohya_folder_names(tmp_path):
    img(tmp_path / "10_sks dog" / "a.png")
    cap(tmp_path / "10_sks dog" / "a.txt", "sks dog on grass")
    img(tmp_path / "10_sks dog" / "b.png")  # no caption: class tokens from the folder name
    img(tmp_path / "2_style_x" / "c.png")
    cap(tmp_path / "2_style_x" / "c.txt", "style")
    r = scan_folder(tmp_path)
    assert names(r) == ["a.png", "b.png", "c.png"]
    assert [i.num_repeats for i in r.items] == [10, 10, 2]
    assert [i.subset for i in r.items] == ["10_sks dog", "10_sks dog", "2_style_x"]
    assert [i.subset_index for i in r.items] == [0, 0, 1]
    b = r.items[1]
    assert b.caption == "sks dog" and b.caption_source == "class_tokens" and b.class_tokens == "sks dog"
    assert r.items[2].class_tokens == "style_x"
    assert r.num_images_with_repeats == 22
    assert any("b.png" in w and "class tokens 'sks dog'" in w for w in r.warnings)


def test_kohya_layout_ignores_root_images_and_unnamed_folders_with_report(tmp_path):
    img(tmp_path / "5_char" / "a.png")
    img(tmp_path / "loose.png")
    img(tmp_path / "extra" / "e.png")
    (tmp_path / "logs").mkdir()  # no images: not worth a report
    r = scan_folder(tmp_path)
    assert names(r) == ["a.png"]
    assert "move it into a '<repeats>_<name>' subfolder" in skipped_reason(r, "loose.png")
    assert "rename it like '1_extra'" in skipped_reason(r, "extra")
    assert not any(Path(p).name == "logs" for p, _ in r.skipped)
    assert any("extra" in w and "ignored" in w for w in r.warnings)


def test_kohya_folder_with_repeats_below_one_is_reported(tmp_path):
    img(tmp_path / "0_off" / "a.png")
    img(tmp_path / "1_on" / "b.png")
    r = scan_folder(tmp_path)
    assert names(r) == ["b.png"]
    assert "repeats 0 < 1" in skipped_reason(r, "0_off")
    assert any("0_off" in w and "less than 1" in w for w in r.warnings)


def test_recursive_inside_kohya_subset(tmp_path):
    img(tmp_path / "3_char" / "a.png")
    img(tmp_path / "3_char" / "nested" / "n.png")
    assert [i.num_repeats for i in scan_folder(tmp_path).items] == [3, 3]
    assert names(scan_folder(tmp_path, options=ScanOptions(recursive=False))) == ["a.png"]  # kohya's behaviour


def test_kohya_subfolders_are_sorted_by_name(tmp_path):
    for name in ("2_b", "10_a", "1_c"):
        img(tmp_path / name / "x.png")
    assert [i.subset for i in scan_folder(tmp_path).items] == ["10_a", "1_c", "2_b"]


# ----------------------------------------------------------------------------------------- bad input


def test_folder_does_not_exist_names_resolved_path(tmp_path):
    with pytest.raises(DatasetError) as e:
        scan_folder("no_such_set", input_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "no_such_set") in msg
    assert f"resolved against ComfyUI's input directory {tmp_path}" in msg
    assert "does not exist" in msg and "absolute path" in msg


def test_path_is_a_file(tmp_path):
    f = img(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        scan_folder(f)


def test_empty_folder_lists_accepted_extensions(tmp_path):
    cap(tmp_path / "readme.txt", "nothing here")
    with pytest.raises(DatasetError) as e:
        scan_folder(tmp_path)
    msg = str(e.value)
    assert "no images found" in msg and str(tmp_path) in msg
    for ext in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        assert ext in msg


def test_empty_folder_non_recursive_hint(tmp_path):
    img(tmp_path / "sub" / "a.png")
    with pytest.raises(DatasetError, match="recursive"):
        scan_folder(tmp_path, options=ScanOptions(recursive=False))


def test_zero_byte_image_is_skipped_with_reason(tmp_path):
    img(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    r = scan_folder(tmp_path)
    assert names(r) == ["good.png"]
    reason = skipped_reason(r, "empty.png")
    assert "empty.png" in reason and "0 bytes" in reason and "re-copy" in reason
    with pytest.raises(DatasetError, match="0 bytes"):
        scan_folder(tmp_path, options=ScanOptions(strict_images=True))


def test_truncated_image_is_skipped_with_reason(tmp_path):
    img(tmp_path / "good.png")
    arr = (np.random.RandomState(1).rand(96, 96, 3) * 255).astype(np.uint8)
    bad = tmp_path / "cut.jpg"
    Image.fromarray(arr).save(bad, quality=95)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    r = scan_folder(tmp_path)
    assert names(r) == ["good.png"]
    reason = skipped_reason(r, "cut.jpg")
    assert "truncated" in reason and "Re-download" in reason
    # header-only scanning cannot see it (documented trade-off of verify=False)
    assert names(scan_folder(tmp_path, options=ScanOptions(verify=False))) == ["cut.jpg", "good.png"]


def test_non_image_with_image_extension_is_skipped(tmp_path):
    img(tmp_path / "good.png")
    cap(tmp_path / "fake.png", "I am text")
    r = scan_folder(tmp_path)
    reason = skipped_reason(r, "fake.png")
    assert "not an image" in reason and "plain text" in reason and "move it out" in reason


def test_only_bad_images_is_an_error_with_reasons(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DatasetError) as e:
        scan_folder(tmp_path)
    assert "no usable images" in str(e.value) and "empty.png" in str(e.value) and "0 bytes" in str(e.value)


def test_animated_webp_first_frame_with_warning(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    r = scan_folder(tmp_path)
    item = r.items[0]
    assert any("anim.webp" in w and "first frame" in w for w in item.warnings)
    assert any("anim.webp" in w and "first frame" in w for w in r.warnings)
    px = item.load_rgb().getpixel((4, 4))
    assert px[0] > 240 and px[1] < 15


def test_unsupported_and_hidden_files_are_listed_as_skipped(tmp_path):
    img(tmp_path / "good.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "pic.tiff")
    (tmp_path / "._good.png").write_bytes(b"\x00\x05\x16\x07 not an image")
    r = scan_folder(tmp_path)
    assert names(r) == ["good.png"]
    assert "convert it to PNG" in skipped_reason(r, "pic.tiff")
    assert "hidden file" in skipped_reason(r, "._good.png")


@pytest.mark.parametrize("ext", [".gif", ".GIF", ".apng"])
def test_animated_gif_and_apng_train_on_their_first_frame_with_one_warning(tmp_path, ext):
    """The README promises animated images train on their first frame with a warning; a GIF is no exception."""
    frames = [Image.new("RGB", (16, 8), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    path = tmp_path / f"anim{ext}"
    frames[0].save(path, format="GIF" if ext.lower() == ".gif" else "PNG", save_all=True, append_images=frames[1:])
    Image.new("RGB", (4, 4)).save(tmp_path / "still.gif")  # one frame: trained, nothing to warn about
    r = scan_folder(tmp_path)
    assert names(r) == [f"anim{ext}", "still.gif"] and not r.skipped
    warned = [w for w in r.warnings if "frames" in w]
    assert len(warned) == 1 and f"anim{ext}" in warned[0] and "3 frames; only the first frame is used" in warned[0]
    item = r.items[0]
    assert item.image_size == (16, 8)
    red = item.load_rgb().getpixel((3, 3))
    assert red[0] > 200 and red[1] < 40 and red[2] < 40


def test_skip_lines_name_the_path_once(tmp_path):
    """'/x/zero.png: /x/zero.png: file is empty' read as a glitch: the report names each skipped file once."""
    img(tmp_path / "good.png")
    (tmp_path / "zero.png").write_bytes(b"")
    r = scan_folder(tmp_path)
    zero = str(tmp_path / "zero.png")
    line = next(line for line in r.report_text().splitlines() if "zero.png" in line)
    assert line.count(zero) == 1 and "0 bytes" in line, line


def test_missing_caption_gives_empty_caption_and_warning(tmp_path):
    img(tmp_path / "a.png")
    img(tmp_path / "b.png")
    cap(tmp_path / "b.txt", "b caption")
    r = scan_folder(tmp_path)
    a = r.items[0]
    assert a.caption == "" and a.caption_source == "missing" and a.caption_path is None
    assert any("a.txt" in w for w in a.warnings)
    summary = [w for w in r.warnings if "no caption file" in w]
    assert len(summary) == 1 and "a.png" in summary[0] and "b.png" not in summary[0]


def test_missing_caption_strict_is_an_error(tmp_path):
    img(tmp_path / "a.png")
    with pytest.raises(DatasetError) as e:
        scan_folder(tmp_path, options=ScanOptions(strict_captions=True))
    msg = str(e.value)
    assert "a.png" in msg and "a.txt" in msg and "create it" in msg


def test_missing_caption_suggests_the_extension_that_exists(tmp_path):
    img(tmp_path / "a.png")
    cap(tmp_path / "a.caption", "x")
    r = scan_folder(tmp_path)
    assert any("caption_extension to '.caption'" in w for w in r.items[0].warnings)
    with pytest.raises(DatasetError, match=r"set caption_extension to '\.caption'"):
        scan_folder(tmp_path, options=ScanOptions(strict_captions=True))


def test_invalid_utf8_caption_skips_image_with_reason(tmp_path):
    img(tmp_path / "a.png")
    img(tmp_path / "b.png")
    cap(tmp_path / "a.txt", b"caf\xe9 latte")  # latin-1
    cap(tmp_path / "b.txt", "ok")
    r = scan_folder(tmp_path)
    assert names(r) == ["b.png"]
    reason = skipped_reason(r, "a.png")
    assert "a.txt" in reason and "not valid UTF-8" in reason and "0xe9" in reason and "re-save" in reason
    with pytest.raises(DatasetError) as e:
        scan_folder(tmp_path, options=ScanOptions(strict_captions=True))
    assert "a.txt" in str(e.value) and "UTF-8" in str(e.value)


def test_utf16_caption_is_explained(tmp_path):
    p = cap(tmp_path / "a.txt", "hello".encode("utf-16"))
    with pytest.raises(DatasetError, match="UTF-16"):
        read_caption_file(p)


def test_empty_caption_file(tmp_path):
    img(tmp_path / "a.png")
    cap(tmp_path / "a.txt", "")
    r = scan_folder(tmp_path)
    assert r.items[0].caption == "" and r.items[0].caption_source == "file"
    assert any("a.txt" in w and "empty" in w for w in r.warnings)
    with pytest.raises(DatasetError, match="a.txt"):
        scan_folder(tmp_path, options=ScanOptions(strict_captions=True))


def test_bad_default_repeats(tmp_path):
    img(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="default_repeats"):
        scan_folder(tmp_path, default_repeats=0)


def test_empty_caption_extension_is_rejected(tmp_path):
    img(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="caption_extension"):
        scan_folder(tmp_path, options=ScanOptions(caption_extension=""))


def test_scan_image_dir_uses_class_tokens_and_given_repeats(tmp_path):
    img(tmp_path / "x.png")
    r = scan_image_dir(tmp_path, ScanOptions(caption_extension=".caption"), num_repeats=7, class_tokens="ohwx")
    assert r.items[0].num_repeats == 7 and r.items[0].caption == "ohwx"


# -------------------------------------------------------------------------------------- metadata.jsonl


def test_metadata_jsonl(tmp_path):
    img(tmp_path / "b.png", (20, 10))
    img(tmp_path / "a.png", (10, 20))
    img(tmp_path / "sub" / "c.png")
    img(tmp_path / "unlisted.png")
    rows = [
        {"file_name": "b.png", "text": "  second  "},
        {"file_name": "a.png", "text": "first"},
        {"file_name": "sub/c.png", "text": "nested"},
    ]
    cap(tmp_path / "metadata.jsonl", "\ufeff" + "\n".join(json.dumps(r) for r in rows) + "\n\n")
    r = scan_metadata_jsonl(tmp_path)
    assert names(r) == ["b.png", "a.png", "c.png"]  # file order
    assert [i.caption for i in r.items] == ["second", "first", "nested"]
    assert r.items[0].image_size == (20, 10) and r.items[0].caption_source == "metadata"
    assert any("unlisted.png" in w and "not listed" in w for w in r.warnings)
    # the .jsonl path itself works too, and relative paths use the input directory
    r2 = scan_metadata_jsonl("metadata.jsonl", input_dir=tmp_path)
    assert names(r2) == names(r)


def test_metadata_jsonl_bad_json_line_names_line(tmp_path):
    img(tmp_path / "a.png")
    cap(tmp_path / "metadata.jsonl", '{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", text: oops}\n')
    with pytest.raises(DatasetError) as e:
        scan_metadata_jsonl(tmp_path)
    assert "metadata.jsonl:2" in str(e.value) and "not valid JSON" in str(e.value)


def test_metadata_jsonl_missing_file_name_and_missing_image(tmp_path):
    img(tmp_path / "a.png")
    cap(tmp_path / "metadata.jsonl", '{"text": "no name"}\n')
    with pytest.raises(DatasetError, match='metadata.jsonl:1: missing "file_name"'):
        scan_metadata_jsonl(tmp_path)
    cap(tmp_path / "metadata.jsonl", '{"file_name": "gone.png", "text": "x"}\n{"file_name": "a.png", "text": "y"}\n')
    r = scan_metadata_jsonl(tmp_path)
    assert names(r) == ["a.png"]
    assert "does not exist" in skipped_reason(r, "gone.png")


def test_metadata_jsonl_missing_text_and_duplicates(tmp_path):
    img(tmp_path / "a.png")
    img(tmp_path / "b.png")
    cap(
        tmp_path / "metadata.jsonl",
        '{"file_name": "a.png"}\n{"file_name": "b.png", "text": "b"}\n{"file_name": "b.png", "text": "again"}\n',
    )
    r = scan_metadata_jsonl(tmp_path)
    assert [i.caption for i in r.items] == ["", "b"]
    assert any("a.png" in w and '"text"' in w for w in r.warnings)
    assert "listed again" in skipped_reason(r, "b.png")
    with pytest.raises(DatasetError, match="a.png"):
        scan_metadata_jsonl(tmp_path, options=ScanOptions(strict_captions=True))


def test_metadata_jsonl_reports_every_bad_line_at_once(tmp_path):
    """Five problems, one queue: every bad line with its number and reason, and the rows that would be skipped."""
    img(tmp_path / "a.png")
    lines = [
        '{"file_name": "a.png", "text": "ok"}',  # 1 fine
        '{"file_name": "b.png", text: oops}',  # 2 not JSON
        '["a.png", "list"]',  # 3 not an object
        '{"text": "no name"}',  # 4 no file_name
        '{"file_name": "a.png", "text": 5}',  # 5 caption not a string
        '{"file_name": "gone.png", "text": "x"}',  # 6 missing image
        '{"file_name": "a.png", "text": "again"}',  # 7 duplicate of line 1
    ]
    cap(tmp_path / "metadata.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as e:
        scan_metadata_jsonl(tmp_path)
    message = str(e.value)
    meta = str(tmp_path / "metadata.jsonl")
    assert "4 line(s) cannot be used" in message
    for line_no, reason in [
        (2, "not valid JSON"),
        (3, "expected a JSON object, got list"),
        (4, 'missing "file_name"'),
        (5, '"text" must be a string, got int'),
    ]:
        assert f"{meta}:{line_no}: {reason}" in message, (line_no, message)
    assert "gone.png" in message and "line 6" in message
    assert f"{meta}:7: {tmp_path / 'a.png'} is listed again (first on line 1)" in message
    assert message.count(str(tmp_path / "gone.png")) == 1


def test_metadata_jsonl_absent(tmp_path):
    img(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="metadata.jsonl does not exist"):
        scan_metadata_jsonl(tmp_path)


def test_folder_and_metadata_jsonl_treat_a_bad_or_animated_image_alike(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    (tmp_path / "empty.png").write_bytes(b"")
    rows = [{"file_name": "anim.webp", "text": "a"}, {"file_name": "empty.png", "text": "b"}]
    cap(tmp_path / "metadata.jsonl", "\n".join(json.dumps(r) for r in rows))
    folder, jsonl = scan_folder(tmp_path), scan_metadata_jsonl(tmp_path)
    animated = [[w for w in r.warnings if "anim.webp" in w and "animated" in w] for r in (folder, jsonl)]
    assert len(animated[0]) == 1 and animated[0] == animated[1]
    assert [i.warnings for i in jsonl.items] == [animated[1]]
    listed = skipped_reason(jsonl, "empty.png")
    assert "0 bytes" in listed and listed == skipped_reason(folder, "empty.png") + " (listed in metadata.jsonl line 2)"
    for scan in (scan_folder, scan_metadata_jsonl):
        with pytest.raises(DatasetError, match="0 bytes"):
            scan(tmp_path, options=ScanOptions(strict_images=True))


# ------------------------------------------------------------------------------------ in-graph images


def test_items_from_pil_images_with_captions():
    ims = [Image.new("RGB", (8, 4), (1, 2, 3)), Image.new("L", (5, 5), 9)]
    r = items_from_images(ims, ["one", "two"])
    assert [i.caption for i in r.items] == ["one", "two"]
    assert [i.image_size for i in r.items] == [(8, 4), (5, 5)]
    assert all(i.image_path is None and i.image.mode == "RGB" and i.caption_source == "input" for i in r.items)
    assert r.items[1].load_rgb().getpixel((0, 0)) == (9, 9, 9)
    assert r.items[0].key != r.items[1].key


def test_items_from_comfy_batch_and_single_caption():
    batch = np.zeros((3, 4, 6, 3), dtype=np.float32)  # ComfyUI IMAGE [B,H,W,C]
    batch[1] = 1.0
    batch[2, :, :, 0] = 0.5
    r = items_from_images(batch, "same caption")
    assert len(r.items) == 3 and all(i.caption == "same caption" for i in r.items)
    assert r.items[0].image_size == (6, 4)
    assert r.items[1].image.getpixel((0, 0)) == (255, 255, 255)
    assert r.items[2].image.getpixel((0, 0)) == (128, 0, 0)  # 0.5 * 255 rounded half up
    assert len(items_from_images(list(batch), ["one for all"]).items) == 3


def test_items_from_rgba_array_is_composited_on_white():
    arr = np.zeros((2, 2, 4), dtype=np.float32)  # transparent black
    r = items_from_images([arr], "x")
    assert r.items[0].image.getpixel((0, 0)) == (255, 255, 255)


def test_items_from_images_count_mismatch():
    ims = [Image.new("RGB", (4, 4))] * 3
    with pytest.raises(DatasetError) as e:
        items_from_images(ims, ["a", "b"])
    assert "3 image(s) but 2 caption(s)" in str(e.value) and "one caption per image" in str(e.value)


def test_items_from_images_rejects_0_255_floats_and_empty():
    with pytest.raises(DatasetError, match="divide by 255"):
        items_from_images([np.full((2, 2, 3), 200.0)], "x")
    with pytest.raises(DatasetError, match="no images"):
        items_from_images([], "x")
    with pytest.raises(DatasetError, match="channels"):
        items_from_images([np.zeros((2, 2, 5))], "x")


def test_dataset_item_needs_exactly_one_source():
    with pytest.raises(ValueError):
        DatasetItem(image_path=None, caption="x")
    with pytest.raises(ValueError):
        DatasetItem(image_path="a.png", caption="x", image=Image.new("RGB", (1, 1)))


def test_items_from_torch_image_batch():
    torch = pytest.importorskip("torch")
    batch = torch.zeros((2, 3, 5, 3), dtype=torch.bfloat16)
    batch[1, :, :, 2] = 1.0
    r = items_from_images(batch, ["a", "b"])
    assert [i.image_size for i in r.items] == [(5, 3), (5, 3)]
    assert r.items[1].image.getpixel((0, 0)) == (0, 0, 255)


def test_choosing_a_config_file_as_folder_points_to_the_right_source(tmp_path):
    cfg = tmp_path / "ds.toml"
    cfg.write_text("[general]\n")
    with pytest.raises(DatasetError, match="dataset TOML source"):
        scan_folder(cfg)
    meta = tmp_path / "metadata.jsonl"
    meta.write_text("")
    with pytest.raises(DatasetError, match="metadata.jsonl source"):
        scan_folder(meta)
