"""The dataset nodes inside a real ComfyUI: folder (kohya layout, repeats, sidecars) and kohya TOML."""

from comfy_server import execution_error
from dataset_factory import kohya_folder


def dataset_prompt(folder: str) -> dict:
    return {
        "1": {
            "class_type": "SDXLLoraImagesFromFolder",
            "inputs": {
                "folder": folder,
                "layout": "auto",
                "caption_extension": ".txt",
                "default_repeats": 1,
                "recursive": True,
                "strict_captions": False,
                "exif_transpose": True,
            },
        },
        "2": {
            "class_type": "SDXLLoraBuckets",
            "inputs": {
                "images": ["1", 0],
                "resolution_width": 128,
                "resolution_height": 128,
                "enable_bucket": True,
                "min_bucket_reso": 64,
                "max_bucket_reso": 256,
                "bucket_reso_steps": 32,
                "bucket_no_upscale": False,
                "batch_size": 2,
                "flip_aug": False,
                "crop_conditioning": "kohya",
                "shuffle_caption": False,
                "keep_tokens": 0,
                "keep_tokens_separator": "",
                "caption_dropout_rate": 0.0,
                "caption_tag_dropout_rate": 0.0,
                "caption_prefix": "",
                "caption_suffix": "",
            },
        },
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 2]}},
    }


def test_folder_with_repeats_through_the_server(server):
    root = server.base / "input" / "ds_repeats"
    kohya_folder(root, {"3_cat": [(128, 96), (128, 96), (96, 128)], "1_dog": [(128, 128)]})
    (root / "1_dog" / "broken.png").write_bytes(b"")  # zero-byte file: skipped with a reason
    entry = server.run(dataset_prompt("ds_repeats"))  # relative: resolved against ComfyUI's input dir
    assert execution_error(entry) is None, execution_error(entry)
    report = entry["outputs"]["2"]["text"][0]
    assert "4 images (10 with repeats)" in report, report
    # buckets: 128x96 x2 x3 repeats = 6 -> 3 batches; 96x128 x3 = 3 -> 2 batches; 128x128 x1 -> 1 batch
    assert "6 batches per epoch" in report, report
    assert "broken.png" in report and "skipped 1" in report, report
    assert entry["outputs"]["3"]["images"], "the bucket histogram was not rendered"


def test_kohya_toml_through_the_server(server):
    root = server.base / "input" / "ds_toml"
    kohya_folder(root / "imgs", {"a": [(128, 128), (128, 64)]})
    (root / "config.toml").write_text(
        "[general]\nresolution = 128\nenable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 256\n"
        "bucket_reso_steps = 32\ncaption_extension = '.txt'\nbogus_key = 1\n"
        "[[datasets]]\nbatch_size = 1\n[[datasets.subsets]]\nimage_dir = 'imgs/a'\nnum_repeats = 2\n"
    )
    prompt = {
        "1": {
            "class_type": "SDXLLoraDatasetFromToml",
            "inputs": {
                "toml_path": "ds_toml/config.toml",
                "strict_captions": False,
                "exif_transpose": True,
                "crop_conditioning": "kohya",
            },
        },
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 2]}},
    }
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    report = entry["outputs"]["1"]["text"][0]
    assert "2 images (4 with repeats)" in report, report
    assert "4 batches per epoch" in report, report
    assert "bogus_key" in report, report  # unknown keys are reported


def test_missing_folder_error_names_the_resolved_path(server):
    entry = server.run(dataset_prompt("does_not_exist_here"))
    err = execution_error(entry)
    assert err is not None
    assert str(server.base / "input" / "does_not_exist_here") in err and "input directory" in err, err
