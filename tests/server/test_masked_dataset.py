"""Masked loss and regularization images inside a real ComfyUI: Load Image's MASK into Images from Graph, mask and
reg folders on Images from Folder, and the messages for bad masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from comfy_server import ServerError, execution_error
from dataset_factory import kohya_folder
from example_prompts import train_then_test, training_only
from PIL import Image

MASK_FROM_ALPHA = "1 - mask (opaque pixels train, as kohya alpha_mask)"


def _rgba(path, size=(64, 48)):
    w, h = size
    arr = np.zeros((h, w, 4), dtype=np.uint8)
    arr[:, :, 0] = np.linspace(0, 255, w).astype(np.uint8)[None, :]
    arr[:, :, 1] = 90
    arr[:, :, 3] = 0
    arr[8:40, 16:48, 3] = 255  # an opaque subject on a transparent background
    Image.fromarray(arr, "RGBA").save(path)


def graph_masked_prompt(image_name: str, steps: int = 2) -> dict:
    prompt = training_only(train_then_test("unused", steps=steps, seed=3, resolution=64, output_name="masked"))
    prompt["20"] = {"class_type": "LoadImage", "inputs": {"image": image_name}}
    prompt["2"] = {
        "class_type": "SDXLLoraImagesFromGraph",
        "inputs": {
            "images": ["20", 0],
            "captions": "a cat",
            "name": "cats",
            "repeats": 1,
            "mask": ["20", 1],
            "mask_meaning": MASK_FROM_ALPHA,
        },
    }
    prompt["21"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}}  # the latent cache's report
    prompt["22"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}}  # the buckets report
    return prompt


def texts(entry: dict) -> str:
    return " ".join(str(v) for v in entry["outputs"].values())


def test_load_image_mask_trains_a_masked_lora(server):
    _rgba(server.base / "input" / "masked_cat.png")
    entry = server.run_successfully(graph_masked_prompt("masked_cat.png"))
    report = texts(entry)
    assert "masked loss: 1 of 1 images have a loss mask" in report, report
    assert "1 with a loss mask" in report, report


def test_a_mask_of_another_size_names_the_image(server):
    Image.new("RGB", (64, 48), (10, 200, 30)).save(server.base / "input" / "opaque_cat.png")
    entry = server.run(graph_masked_prompt("opaque_cat.png"), timeout=900)
    err = execution_error(entry)
    # Load Image gives an image without alpha a 64x64 empty mask
    assert err is not None and "image 0: its mask is 64x64 but the image is 64x48" in err, err


def test_mask_folder_and_reg_folder_on_images_from_folder(server):
    root = server.base / "input"
    kohya_folder(root / "ds_masked", {"2_cat": [(64, 64), (64, 48)]})
    kohya_folder(root / "ds_reg", {"1_animal": [(64, 64), (64, 64), (64, 64), (64, 64), (64, 64)]})
    masks = root / "ds_masks" / "2_cat"
    masks.mkdir(parents=True)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(masks / "img_0.png")
    Image.new("RGB", (64, 48), (128, 0, 0)).save(masks / "img_1.png")
    prompt = {
        "1": {
            "class_type": "SDXLLoraImagesFromFolder",
            "inputs": {
                "folder": "ds_masked",
                "layout": "auto",
                "caption_extension": ".txt",
                "default_repeats": 1,
                "recursive": True,
                "strict_captions": False,
                "exif_transpose": True,
                "alpha_mask": False,
                "mask_folder": "ds_masks",
                "reg_folder": "ds_reg",
            },
        },
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}},
        "3": {
            "class_type": "SDXLLoraBuckets",
            "inputs": dict(graph_masked_prompt("x")["3"]["inputs"], images=["1", 0]),
        },
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    }
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    report = texts(entry)
    # kohya: 2 train images x 2 repeats = 4; 5 reg images, 4 of them registered (1 repeat each) to match
    assert "train images: 2 (4 with repeats); reg images: 4 used (4 with repeats" in report, report
    assert "kohya's num_reg_images: 5" in report, report
    assert "masked loss: 2 of 6 images have a loss mask" in report, report
    # both mask sources at once are refused at queue time, naming both inputs
    prompt["1"]["inputs"]["alpha_mask"] = True
    with pytest.raises(ServerError) as err:
        server.queue(prompt)
    reply = str(err.value)
    assert "-> 400" in reply, reply
    messages = " ".join(e["details"] for e in json.loads(reply.split(": ", 1)[1])["node_errors"]["1"]["errors"])
    assert "alpha_mask and mask_folder are both set" in messages, messages
