"""The committed example workflows (UI format) run end to end in a real ComfyUI, converted like the frontend does.

Each run uses the tiny SDXL in place of CheckpointLoaderSimple, generated data, 8 steps at 64 px. Checked: the
LoRA file (kohya key names derived here from the model's modules with kohya's rules, all loaded by LoraLoader),
the base and LoRA images differ, the stale-cache traps (a retrain must give a new name and a new image, an
unchanged re-queue must not retrain), safe names, never overwriting, and the LORA_MODEL output.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from comfy_server import PACK_NAME, ROOT, ServerError, execution_error
from dataset_factory import kohya_folder
from PIL import Image
from workflow_convert import (
    for_ci,
    is_link,
    nodes_of,
    only_node,
    set_inputs,
    upstream,
    widget_slots,
    widgets_to_inputs,
    workflow_to_prompt,
)

EXAMPLES = ROOT / "example_workflows"
EXAMPLE_NAMES = [
    "train_then_test_sdxl_lora",
    "kohya_toml_dataset",
    "export_kohya_run",
    "masked_training",
    "continue_training",
]
SUBFOLDER = "sdxl_lora_trainer"  # the examples' output_subfolder
NOT_LOADED = "lora key not loaded"


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


@pytest.fixture(scope="module")
def folder_dataset(server) -> str:
    """A small kohya folder in the server's input dir (name relative to it, as users type it)."""
    kohya_folder(server.base / "input" / "ci_folder", {"2_cat": [(64, 64), (64, 48), (48, 64)], "1_dog": [(64, 64)]})
    return "ci_folder"


def example(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def ci_prompt(object_info: dict, name: str, *, prefix: str, **kw) -> dict:
    """The example converted to an API prompt, shrunk for CI; SaveImage prefixes made unique per run."""
    prompt = for_ci(workflow_to_prompt(example(name), object_info), **kw)
    for nid in nodes_of(prompt, "SaveImage"):
        old = prompt[nid]["inputs"]["filename_prefix"]
        prompt[nid]["inputs"]["filename_prefix"] = f"ci/{prefix}_{old.rsplit('/', 1)[-1]}"
    return prompt


def save_node(prompt: dict, kind: str) -> str:
    """The SaveImage node of the base image ("base") or of the LoRA image ("with_lora")."""
    ids = [k for k in nodes_of(prompt, "SaveImage") if prompt[k]["inputs"]["filename_prefix"].endswith("_" + kind)]
    assert len(ids) == 1, (kind, ids)
    return ids[0]


def image_of(server, entry: dict, node: str) -> np.ndarray:
    images = entry["outputs"][node]["images"]
    assert len(images) == 1, images
    im = images[0]
    path = server.base / im["type"] / im["subfolder"] / im["filename"]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def lora_name_of(entry: dict, train_id: str) -> str:
    report = entry["outputs"][train_id]["text"][0]
    line = next(ln for ln in report.splitlines() if ln.startswith("lora_name: "))
    return line[len("lora_name: ") :]


def loras(server, subfolder: str = SUBFOLDER) -> set[str]:
    root = server.base / "models" / "loras" / subfolder
    return {p.name for p in root.glob("*.safetensors")} if root.is_dir() else set()


def run_ok(server, prompt: dict) -> tuple[dict, str]:
    """Run a prompt that must succeed; returns (history entry, the server log written meanwhile)."""
    before = len(server.log())
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    return entry, server.log()[before:]


def cached_nodes(entry: dict) -> set[str]:
    return {n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}


def read_lora(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def kohya_module_names(*, unet: bool = True, conv: bool = False, te1: bool = False, te2: bool = False) -> set[str]:
    """kohya's LoRA module names for the tiny SDXL the server loads, derived from its modules with kohya's rules
    (networks/lora.py create_modules), independently of the trainer's own naming code:

    U-Net: every Linear and 1x1 Conv2d inside a Transformer2DModel (ComfyUI: SpatialTransformer); with conv_dim,
    also every Linear and Conv2d inside ResnetBlock2D / Downsample2D / Upsample2D (ResBlock / Downsample /
    Upsample). Text encoders: every Linear inside CLIPAttention / CLIPMLP. Name = prefix + module path, '.' -> '_'.
    """
    from comfy_host import import_comfy

    import_comfy()
    import tiny_sdxl
    import torch
    from comfy.clip_model import CLIPMLP, CLIPAttention
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

    model, clip, _ = tiny_sdxl.make_all(0)  # the server's TinySDXLCheckpointLoader uses seed 0 (weights do not matter)

    def collect(root: torch.nn.Module, prefix: str, targets: tuple[type, ...], conv3x3: bool) -> set[str]:
        names = set()
        for name, module in root.named_modules():
            if not isinstance(module, targets):
                continue
            for child_name, child in module.named_modules():
                is_linear = isinstance(child, torch.nn.Linear)
                is_conv = isinstance(child, torch.nn.Conv2d)
                if is_linear or (is_conv and (child.kernel_size == (1, 1) or conv3x3)):
                    names.add(f"{prefix}.{name}.{child_name}".replace(".", "_"))
        return names

    names: set[str] = set()
    if unet:
        targets = (SpatialTransformer, ResBlock, Downsample, Upsample) if conv else (SpatialTransformer,)
        names |= collect(model.model.diffusion_model, "lora_unet", targets, conv)
    cm = clip.cond_stage_model
    if te1:
        names |= collect(cm.clip_l.transformer, "lora_te1", (CLIPAttention, CLIPMLP), False)
    if te2:
        names |= collect(cm.clip_g.transformer, "lora_te2", (CLIPAttention, CLIPMLP), False)

    # sanity: ComfyUI's own kohya key map knows every one of these names
    import comfy.lora

    known = set(comfy.lora.model_lora_keys_unet(model.model, {})) | set(comfy.lora.model_lora_keys_clip(cm, {}))
    assert names <= known, sorted(names - known)[:10]
    return names


def assert_kohya_keys(path: Path, modules: set[str]) -> None:
    keys = set(read_lora(path))
    expected = {f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert keys == expected, (f"missing {sorted(expected - keys)[:8]}", f"unexpected {sorted(keys - expected)[:8]}")


def assert_all_keys_loaded(log: str) -> None:
    bad = [ln for ln in log.splitlines() if NOT_LOADED in ln]
    assert not bad, bad[:10]


# ---------------------------------------------------------------------------------------------------------------
# the files themselves
# ---------------------------------------------------------------------------------------------------------------


def _build_module():
    spec = importlib.util.spec_from_file_location(
        "build_example_workflows", ROOT / "scripts" / "build_example_workflows.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_templates_are_listed_and_served(server):
    listed = server.get("/workflow_templates")
    assert sorted(listed.get(PACK_NAME, [])) == sorted(EXAMPLE_NAMES), listed
    for name in EXAMPLE_NAMES:
        served = server.get(f"/api/workflow_templates/{PACK_NAME}/{name}.json")
        assert served == example(name), name


def test_committed_workflows_match_the_node_schemas(object_info):
    """Regenerating from this server's /object_info gives the committed bytes (else: run the build script)."""
    built = _build_module().build_all(object_info)
    assert sorted(built) == sorted(f"{n}.json" for n in EXAMPLE_NAMES)
    for name, text in built.items():
        assert (EXAMPLES / name).read_text() == text, (
            f"example_workflows/{name} is out of date: run scripts/build_example_workflows.py"
        )


def test_every_group_has_a_note_and_links_are_consistent():
    for name in EXAMPLE_NAMES:
        wf = example(name)
        nodes = {n["id"]: n for n in wf["nodes"]}
        notes = [n for n in wf["nodes"] if n["type"] == "MarkdownNote"]
        assert len(wf["groups"]) >= 5
        for g in wf["groups"]:
            x, y, w, h = g["bounding"]
            inside = [n for n in notes if x <= n["pos"][0] <= x + w and y <= n["pos"][1] <= y + h]
            assert len(inside) == 1 and g["title"] in inside[0]["title"], (name, g["title"])
            assert len(inside[0]["widgets_values"][0]) > 80, (name, g["title"])
        for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
            assert link_id in nodes[src]["outputs"][src_slot]["links"], (name, link_id)
            assert nodes[dst]["inputs"][dst_slot]["link"] == link_id, (name, link_id)
            assert nodes[src]["outputs"][src_slot]["type"] == typ
        xs = {n["type"]: n["pos"][0] for n in wf["nodes"] if n["type"] != "MarkdownNote"}
        assert (
            xs["CheckpointLoaderSimple"]
            < xs["SDXLLoraCacheLatents"]
            < xs["SDXLLoraTrain"]
            < xs["LoraLoader"]
            < xs["SaveImage"]
        ), (name, xs)  # left to right
        # tidy: no two nodes (title bar included) overlap, every node sits inside one group, groups are disjoint
        boxes = {
            n["id"]: (n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in wf["nodes"]
        }
        groups = [(x, y, x + w, y + h) for x, y, w, h in (g["bounding"] for g in wf["groups"])]

        def overlap(a, b):
            return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

        ids = sorted(boxes)
        assert not [(a, b) for i, a in enumerate(ids) for b in ids[i + 1 :] if overlap(boxes[a], boxes[b])], name
        for nid, b in boxes.items():
            assert sum(g[0] <= b[0] and b[2] <= g[2] and g[1] <= b[1] and b[3] <= g[3] for g in groups) == 1, (
                name,
                nodes[nid]["type"],
            )
        assert not [
            (i, j) for i in range(len(groups)) for j in range(i + 1, len(groups)) if overlap(groups[i], groups[j])
        ], name


def test_converter_reads_a_workflow_the_frontend_saved(object_info):
    """The widget rules (control_after_generate adds a value, links keep theirs) on a template the frontend wrote."""
    try:
        import comfyui_workflow_templates_json
    except ImportError:  # pragma: no cover - installed with ComfyUI's requirements
        pytest.skip("comfyui_workflow_templates_json is not installed")
    wf = json.loads((Path(comfyui_workflow_templates_json.__file__).parent / "templates" / "default.json").read_text())
    prompt = workflow_to_prompt(wf, object_info)
    assert {v["class_type"] for v in prompt.values()} == {
        "CheckpointLoaderSimple",
        "KSampler",
        "CLIPTextEncode",
        "EmptyLatentImage",
        "VAEDecode",
        "SaveImage",
    }
    ks = prompt[only_node(prompt, "KSampler")]["inputs"]
    ks_spec = object_info["KSampler"]["input"]["required"]
    assert isinstance(ks["seed"], int) and isinstance(ks["steps"], int) and ks["steps"] >= 1, ks
    assert isinstance(ks["cfg"], (int, float)) and 0 <= ks["denoise"] <= 1, ks
    assert ks["sampler_name"] in ks_spec["sampler_name"][0] and ks["scheduler"] in ks_spec["scheduler"][0], ks
    for name in ("model", "positive", "negative", "latent_image"):
        assert is_link(ks[name]), (name, ks)
    latent = prompt[only_node(prompt, "EmptyLatentImage")]["inputs"]
    assert all(isinstance(latent[k], int) for k in ("width", "height", "batch_size")), latent
    texts = [prompt[k]["inputs"]["text"] for k in nodes_of(prompt, "CLIPTextEncode")]
    assert all(isinstance(t, str) and t for t in texts), texts
    # our train node's seed gets a control widget in the frontend, and no random default
    slots = dict(widget_slots(object_info["SDXLLoraTrain"]))
    assert slots["seed"] is True
    assert object_info["SDXLLoraTrain"]["input"]["required"]["seed"][1].get("control_after_generate") == "fixed"


def test_committed_sample_dataset_is_tiny_and_loads(server):
    sample = EXAMPLES / "sample_dataset"
    files = [p for p in sample.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 50_000
    pngs = [p for p in files if p.suffix == ".png"]
    assert len(pngs) >= 4
    for p in pngs:
        with Image.open(p) as im:
            assert im.width <= 64 and im.height <= 64, p
        assert p.with_suffix(".txt").read_text().strip(), p
    shutil.copytree(sample, server.base / "input" / "ci_sample")
    entry = server.run(
        {
            "1": {
                "class_type": "SDXLLoraDatasetFromToml",
                "inputs": {
                    "toml_path": "ci_sample/dataset.toml",
                    "strict_captions": True,
                    "exif_transpose": True,
                    "crop_conditioning": "kohya",
                },
            },
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 2]}},
        }
    )
    assert execution_error(entry) is None, execution_error(entry)
    assert f"{len(pngs)} images ({2 * len(pngs)} with repeats)" in entry["outputs"]["1"]["text"][0]


# ---------------------------------------------------------------------------------------------------------------
# train_then_test_sdxl_lora
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_run(server, object_info, folder_dataset) -> dict:
    """train_then_test with rank 4 / alpha 2 (so continue_training can show the file's dims win)."""
    prompt = ci_prompt(
        object_info, "train_then_test_sdxl_lora", prefix="first", folder=folder_dataset, seed=1, output_name="first"
    )
    prompt = set_inputs(prompt, "SDXLLoraNetwork", network_dim=4, network_alpha=2.0)
    entry, log = run_ok(server, prompt)
    train = only_node(prompt, "SDXLLoraTrain")
    name = lora_name_of(entry, train)
    return {
        "prompt": prompt,
        "entry": entry,
        "log": log,
        "train": train,
        "lora_name": name,
        "path": server.base / "models" / "loras" / name,
    }


def test_train_then_test_runs_end_to_end(server, first_run):
    entry, prompt = first_run["entry"], first_run["prompt"]
    name = first_run["lora_name"]
    assert name.startswith(f"{SUBFOLDER}/first_") and name.endswith(".safetensors"), name
    assert first_run["path"].is_file() and first_run["path"].parent == server.base / "models" / "loras" / SUBFOLDER
    assert name in server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    base = image_of(server, entry, save_node(prompt, "base"))
    lora = image_of(server, entry, save_node(prompt, "with_lora"))
    assert base.shape == lora.shape == (64, 64, 3)
    assert np.abs(base - lora).max() > 0, "the LoRA did not change the sampled image"
    previews = [k for k in nodes_of(prompt, "PreviewImage") if prompt[k]["inputs"]["images"][0] == first_run["train"]]
    assert len(previews) == 1 and entry["outputs"][previews[0]]["images"], "no loss graph"


def test_saved_keys_are_kohya_names_and_all_load(first_run):
    assert_kohya_keys(first_run["path"], kohya_module_names(unet=True))
    assert "LoraLoader" in json.dumps(first_run["prompt"])
    assert_all_keys_loaded(first_run["log"])


def test_lora_model_output_samples_through_load_lora_model(server, first_run):
    """The train node's LORA_MODEL output in the built-in 'Load LoRA Model' node (no file involved)."""
    prompt = json.loads(json.dumps(first_run["prompt"]))
    train, lora_ks = first_run["train"], prompt[save_node(prompt, "with_lora")]["inputs"]["images"][0]
    sampler = prompt[lora_ks]["inputs"]["samples"][0]
    ckpt = prompt[train]["inputs"]["model"][0]
    prompt["900"] = {
        "class_type": "LoraModelLoader",
        "inputs": {"model": [ckpt, 0], "lora": [train, 2], "strength_model": 1.0, "bypass": False},
    }
    prompt["901"] = {"class_type": "KSampler", "inputs": dict(prompt[sampler]["inputs"], model=["900", 0])}
    prompt["902"] = {"class_type": "VAEDecode", "inputs": {"samples": ["901", 0], "vae": [ckpt, 2]}}
    prompt["903"] = {"class_type": "SaveImage", "inputs": {"images": ["902", 0], "filename_prefix": "ci/lora_model"}}
    entry, log = run_ok(server, prompt)
    via_model = image_of(server, entry, "903")
    base = image_of(server, first_run["entry"], save_node(prompt, "base"))
    assert np.abs(via_model - base).max() > 0, "Load LoRA Model did not change the image"
    assert_all_keys_loaded(log)


def test_retrain_with_another_seed_gives_a_new_file_and_a_new_image(server, object_info, folder_dataset, first_run):
    """The stale-cache trap: LoraLoader caches by path, so a retrain must not reuse the path."""
    prompt = json.loads(json.dumps(first_run["prompt"]))
    prompt[first_run["train"]]["inputs"]["seed"] = 2
    for kind in ("base", "with_lora"):
        node = save_node(prompt, kind)
        prompt[node]["inputs"]["filename_prefix"] = f"ci/seed2_{kind}"
    entry, log = run_ok(server, prompt)
    name = lora_name_of(entry, first_run["train"])
    assert name != first_run["lora_name"]
    assert (server.base / "models" / "loras" / name).is_file()
    old = image_of(server, first_run["entry"], save_node(first_run["prompt"], "with_lora"))
    new = image_of(server, entry, save_node(prompt, "with_lora"))
    assert np.abs(old - new).max() > 0, "LoraLoader served the first LoRA again"
    base_old = image_of(server, first_run["entry"], save_node(first_run["prompt"], "base"))
    base_new = image_of(server, entry, save_node(prompt, "base"))
    assert np.array_equal(base_old, base_new), "the base image must not depend on the LoRA"
    assert_all_keys_loaded(log)


def test_requeue_unchanged_does_not_retrain_and_a_changed_input_does(server, object_info, folder_dataset):
    prompt = ci_prompt(
        object_info, "train_then_test_sdxl_lora", prefix="cache", folder=folder_dataset, seed=3, output_name="cache"
    )
    train = only_node(prompt, "SDXLLoraTrain")
    run_ok(server, prompt)
    files = loras(server)
    again, _ = run_ok(server, prompt)
    assert train in cached_nodes(again), cached_nodes(again)
    assert loras(server) == files, "an unchanged re-queue wrote a new LoRA"
    changed = json.loads(json.dumps(prompt))
    changed[train]["inputs"]["max_train_steps"] += 1
    third, _ = run_ok(server, changed)
    assert train not in cached_nodes(third)
    new = loras(server) - files
    assert len(new) == 1 and lora_name_of(third, train) == f"{SUBFOLDER}/{new.pop()}"
    assert "trained 9 steps" in third["outputs"][train]["text"][0]


# ---------------------------------------------------------------------------------------------------------------
# the other two examples
# ---------------------------------------------------------------------------------------------------------------


def test_kohya_toml_workflow_with_conv_and_text_encoders(server, object_info):
    root = server.base / "input" / "ci_toml"
    kohya_folder(root / "imgs", {"a": [(64, 64), (64, 48), (48, 64)]})
    (root / "config.toml").write_text(
        "[general]\nresolution = 64\nenable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 128\n"
        "bucket_reso_steps = 32\ncaption_extension = '.txt'\n"
        "[[datasets]]\nbatch_size = 1\n[[datasets.subsets]]\nimage_dir = 'imgs/a'\nnum_repeats = 2\n"
    )
    prompt = ci_prompt(
        object_info, "kohya_toml_dataset", prefix="toml", toml_path="ci_toml/config.toml", output_name="toml"
    )
    assert not nodes_of(prompt, "SDXLLoraImagesFromFolder")
    prompt = set_inputs(
        prompt,
        "SDXLLoraNetwork",
        network_dim=4,
        network_alpha=4.0,
        conv_dim=2,
        conv_alpha=1.0,
        train_clip_l=True,
        train_clip_g=True,
    )
    entry, log = run_ok(server, prompt)
    train = only_node(prompt, "SDXLLoraTrain")
    name = lora_name_of(entry, train)
    assert name.startswith(f"{SUBFOLDER}/toml_"), name
    path = server.base / "models" / "loras" / name
    assert_kohya_keys(path, kohya_module_names(unet=True, conv=True, te1=True, te2=True))
    assert_all_keys_loaded(log)
    base = image_of(server, entry, save_node(prompt, "base"))
    lora = image_of(server, entry, save_node(prompt, "with_lora"))
    assert np.abs(base - lora).max() > 0


def test_load_image_widgets_are_saved_as_the_frontend_saves_them(object_info):
    """Load Image's upload button adds "image" after the file name in widgets_values (ComfyUI's own templates)."""
    try:
        import comfyui_workflow_templates_json
    except ImportError:  # pragma: no cover - installed with ComfyUI's requirements
        pytest.skip("comfyui_workflow_templates_json is not installed")
    templates = Path(comfyui_workflow_templates_json.__file__).parent / "templates"
    saved = next(
        n["widgets_values"]
        for path in sorted(templates.glob("*.json"))
        for n in json.loads(path.read_text()).get("nodes", [])
        if n.get("type") == "LoadImage" and n.get("widgets_values")
    )
    assert len(saved) == 2 and saved[1] == "image", saved
    ours = next(n for n in example("masked_training")["nodes"] if n["type"] == "LoadImage")
    assert ours["widgets_values"] == ["example.png", "image"]
    assert widgets_to_inputs(object_info["LoadImage"], saved) == {"image": saved[0]}


def test_masked_training_example_trains_with_load_images_mask(server, object_info):
    """The masked_training example: Load Image's MASK (from the alpha channel) into Images from Graph, trained."""
    arr = np.zeros((48, 64, 4), dtype=np.uint8)
    arr[:, :, 0] = 200
    arr[8:40, 16:48, 3] = 255  # an opaque subject on a transparent background
    Image.fromarray(arr, "RGBA").save(server.base / "input" / "example.png")
    prompt = ci_prompt(object_info, "masked_training", prefix="masked", output_name="masked_example")
    load = only_node(prompt, "LoadImage")
    assert prompt[only_node(prompt, "SDXLLoraImagesFromGraph")]["inputs"]["mask"] == [load, 1]
    for nid, kind in (("90", "SDXLLoraBuckets"), ("91", "SDXLLoraCacheLatents")):
        prompt[nid] = {"class_type": "PreviewAny", "inputs": {"source": [only_node(prompt, kind), 1]}}
    entry, _ = run_ok(server, prompt)
    reports = " ".join(str(v) for v in entry["outputs"].values())
    assert "masked loss: 1 of 1 images have a loss mask" in reports and "1 with a loss mask" in reports, reports
    name = lora_name_of(entry, only_node(prompt, "SDXLLoraTrain"))
    assert name.startswith(f"{SUBFOLDER}/masked_example_"), name


def test_continue_training_starts_from_the_file(server, object_info, folder_dataset, first_run):
    prompt = ci_prompt(
        object_info,
        "continue_training",
        prefix="continue",
        folder=folder_dataset,
        output_name="continued",
        learning_rate=1e-4,
    )
    network = only_node(prompt, "SDXLLoraNetwork")
    assert prompt[network]["inputs"]["network_dim"] == 16  # the example's widget; the file's rank 4 must win
    prompt[network]["inputs"]["start_from"] = first_run["lora_name"]
    entry, log = run_ok(server, prompt)
    name = lora_name_of(entry, only_node(prompt, "SDXLLoraTrain"))
    assert name.startswith(f"{SUBFOLDER}/continued_"), name
    start, cont = read_lora(first_run["path"]), read_lora(server.base / "models" / "loras" / name)
    assert set(cont) == set(start)
    for k, v in start.items():
        assert cont[k].shape == v.shape, k
    downs = [k for k in start if k.endswith("lora_down.weight")]
    assert all(start[k].shape[0] == 4 for k in downs)
    ups = [k for k in start if k.endswith("lora_up.weight")]
    assert any(not np.array_equal(cont[k].float().numpy(), start[k].float().numpy()) for k in ups), (
        "continued training did not change the weights"
    )
    # it continued from the file: a fresh start (random down, zero up, another seed) would land about as far from
    # the start file as the file is from zero; continuing at a 10x lower learning rate stays close to it
    for group in (downs, ups):
        drift = sum(float((cont[k].float() - start[k].float()).norm() ** 2) for k in group) ** 0.5
        size = sum(float(start[k].float().norm() ** 2) for k in group) ** 0.5
        assert size > 0 and drift < 0.5 * size, (group[0], drift, size)
    assert_all_keys_loaded(log)
    base = image_of(server, entry, save_node(prompt, "base"))
    lora = image_of(server, entry, save_node(prompt, "with_lora"))
    assert np.abs(base - lora).max() > 0


def test_continue_training_a_lora_with_text_encoders_applies_them_frozen(server, object_info, folder_dataset):
    """kohya's default output holds the U-Net and both text encoders; the shipped continue_training example trains
    the U-Net only. The file decides which parts exist, the toggles which train: the text-encoder modules are
    applied as they are and saved back unchanged (this failed after loading: "264 LoRA modules ... match no
    module")."""
    first = ci_prompt(
        object_info,
        "train_then_test_sdxl_lora",
        prefix="tefirst",
        folder=folder_dataset,
        steps=2,
        seed=2,
        output_name="te_first",
    )
    first = set_inputs(first, "SDXLLoraNetwork", network_dim=4, network_alpha=2.0, train_clip_l=True, train_clip_g=True)
    start_name = lora_name_of(run_ok(server, first)[0], only_node(first, "SDXLLoraTrain"))
    prompt = ci_prompt(
        object_info, "continue_training", prefix="tecont", folder=folder_dataset, steps=2, output_name="te_cont"
    )
    network = only_node(prompt, "SDXLLoraNetwork")
    assert not prompt[network]["inputs"]["train_clip_l"] and not prompt[network]["inputs"]["train_clip_g"]
    prompt[network]["inputs"]["start_from"] = start_name
    entry, log = run_ok(server, prompt)
    loras_dir = server.base / "models" / "loras"
    start = read_lora(loras_dir / start_name)
    cont = read_lora(loras_dir / lora_name_of(entry, only_node(prompt, "SDXLLoraTrain")))
    assert set(cont) == set(start)
    te = [k for k in start if k.startswith(("lora_te1_", "lora_te2_"))]
    assert te and all(np.array_equal(cont[k].float().numpy(), start[k].float().numpy()) for k in te)
    ups = [k for k in start if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
    assert any(not np.array_equal(cont[k].float().numpy(), start[k].float().numpy()) for k in ups)
    assert_all_keys_loaded(log)

    # (a toggle on for a part the file lacks, or another algo: refused at queue time, tests/server/test_network_node.py)


# ---------------------------------------------------------------------------------------------------------------
# names: escapes rejected, never overwrite, overwrite reuses
# ---------------------------------------------------------------------------------------------------------------


def training_only(object_info: dict, folder: str, **train) -> tuple[dict, str]:
    prompt = ci_prompt(object_info, "train_then_test_sdxl_lora", prefix="names", folder=folder, steps=2, **train)
    train_id = only_node(prompt, "SDXLLoraTrain")
    return upstream(prompt, [train_id]), train_id


@pytest.mark.parametrize(
    "field,value,fragments",
    [
        ("output_subfolder", "../x", ["subfolder", "'..'", "inside the loras folder"]),
        ("output_subfolder", "/abs", ["subfolder", "absolute path"]),
        ("output_subfolder", "C:\\x", ["subfolder", "backslash"]),
        ("output_name", "../../x", ["LoRA name", "'..'", "inside the loras folder"]),
        ("output_name", "a/b", ["LoRA name", "contains '/'"]),
    ],
)
def test_path_escapes_are_rejected_before_training(server, object_info, folder_dataset, field, value, fragments):
    """Rejected by POST /prompt (nothing queued, nothing trained), with a message that says what is wrong."""
    prompt, train = training_only(object_info, folder_dataset, output_name="escape")
    prompt[train]["inputs"][field] = value
    files = set((server.base / "models").rglob("*"))
    with pytest.raises(ServerError) as err:
        server.queue(prompt)
    reply = str(err.value)
    assert "-> 400" in reply, reply
    body = json.loads(reply.split(": ", 1)[1])
    errors = body["node_errors"][train]["errors"]
    assert len(errors) == 1, errors  # one message, not one per input the check reads
    for fragment in fragments:
        assert fragment in errors[0]["details"], (fragment, errors)
    assert set((server.base / "models").rglob("*")) == files


def queue_refused(server, prompt: dict) -> dict:
    """POST /prompt must answer 400; returns its node_errors."""
    with pytest.raises(ServerError) as err:
        server.queue(prompt)
    reply = str(err.value)
    assert "-> 400" in reply, reply
    return json.loads(reply.split(": ", 1)[1])["node_errors"]


@pytest.mark.parametrize("through_sampling", [False, True])
def test_every_learning_rate_0_is_refused_at_queue_time(server, object_info, folder_dataset, through_sampling):
    """learning_rate 0 and no per-part rate: POST /prompt says every learning rate is 0 and names the inputs, once,
    on the Train node (also when the Train node is reached through the sampling half of the graph)."""
    prompt = ci_prompt(object_info, "train_then_test_sdxl_lora", prefix="lr0", folder=folder_dataset, steps=2)
    train = only_node(prompt, "SDXLLoraTrain")
    prompt = upstream(prompt, [save_node(prompt, "with_lora") if through_sampling else train])
    prompt[train]["inputs"].update(learning_rate=0.0, unet_lr=0.0, clip_l_lr=0.0, clip_g_lr=0.0)
    node_errors = queue_refused(server, prompt)
    assert list(node_errors) == [train], node_errors
    errors = node_errors[train]["errors"]
    assert len(errors) == 1, errors
    message = errors[0]["details"]
    assert message.startswith("every learning rate is 0 (learning_rate 0, unet_lr 0 (= learning_rate), "), message
    assert "clip_l_lr 0 (= learning_rate), clip_g_lr 0 (= learning_rate)" in message and "e.g. 1e-4" in message
    # ComfyUI skips its own range check for inputs validate_inputs reads: the node keeps it
    prompt[train]["inputs"].update(learning_rate=11.0)
    errors = queue_refused(server, prompt)[train]["errors"]
    assert [e["details"] for e in errors] == ["learning_rate 11.0 is above its maximum 10.0"], errors


def test_train_settings_node_refuses_every_learning_rate_0(server, object_info, folder_dataset):
    prompt, train = training_only(object_info, folder_dataset, output_name="lr0settings")
    settings = {
        k: v
        for k, v in prompt[train]["inputs"].items()
        if k in object_info["SDXLLoraTrainSettings"]["input"]["required"]
    }
    settings.update(learning_rate=0.0, unet_lr=0.0, clip_l_lr=0.0, clip_g_lr=0.0)
    prompt["900"] = {"class_type": "SDXLLoraTrainSettings", "inputs": settings}
    prompt[train]["inputs"]["train_settings"] = ["900", 0]
    node_errors = queue_refused(server, prompt)
    assert list(node_errors) == ["900"], node_errors
    assert node_errors["900"]["errors"][0]["details"].startswith("every learning rate is 0 (learning_rate 0"), (
        node_errors
    )


def test_learning_rate_0_for_every_trained_part_fails_before_training(server, object_info, folder_dataset):
    """clip_l_lr is set but only the U-Net trains: queued (the node cannot know), then refused before training."""
    prompt, train = training_only(object_info, folder_dataset, output_name="lr0unet")
    prompt[train]["inputs"].update(learning_rate=0.0, unet_lr=0.0, clip_l_lr=1e-4, clip_g_lr=0.0)
    network = only_node(prompt, "SDXLLoraNetwork")
    prompt[network]["inputs"].update(train_unet=True, train_clip_l=False, train_clip_g=False)
    before = loras(server)
    entry = server.run(prompt)
    error = execution_error(entry)
    assert error is not None and "every learning rate is 0 (learning_rate 0, unet_lr 0 (= learning_rate))" in error
    assert "no trainable parameters" not in error
    assert loras(server) == before


def test_lycoris_rank_dropout_is_refused_at_queue_time(server, object_info, folder_dataset):
    """LoHa with rank_dropout cannot run on a GPU (LyCORIS draws its masks on the CPU): POST /prompt says so."""
    prompt, _ = training_only(object_info, folder_dataset, output_name="rank")
    prompt = set_inputs(prompt, "SDXLLoraNetwork", algo="loha", rank_dropout=0.1)
    network = only_node(prompt, "SDXLLoraNetwork")
    with pytest.raises(ServerError) as err:
        server.queue(prompt)
    reply = str(err.value)
    assert "-> 400" in reply, reply
    errors = json.loads(reply.split(": ", 1)[1])["node_errors"][network]["errors"]
    messages = " ".join(e["details"] for e in errors)
    assert "rank_dropout is not supported with algo 'loha'" in messages and "Set rank_dropout to 0" in messages
    assert messages.count("rank_dropout is not supported") == 1, messages  # once, not on every input it names


def test_network_inputs_out_of_range_are_refused_at_queue_time(server, object_info, folder_dataset):
    """The Network node's validate_inputs names rank_dropout, dropout and the LoRA+ ratios, so ComfyUI skips their
    min/max check: the node does it, all problems in one message."""
    prompt, _ = training_only(object_info, folder_dataset, output_name="range")
    prompt = set_inputs(prompt, "SDXLLoraNetwork", rank_dropout=1.5, loraplus_lr_ratio=-1.0)
    network = only_node(prompt, "SDXLLoraNetwork")
    with pytest.raises(ServerError) as err:
        server.queue(prompt)
    reply = str(err.value)
    errors = json.loads(reply.split(": ", 1)[1])["node_errors"][network]["errors"]
    messages = " ".join(e["details"] for e in errors)
    assert (
        "rank_dropout 1.5 is above its maximum" in messages
        and "loraplus_lr_ratio -1.0 is below its minimum" in messages
    )


@pytest.mark.parametrize(
    "inputs,fragments",
    [
        (
            {"optimizer": "AdamW", "optimizer_args": "weight_decay=abc"},
            ["optimizer_args", "weight_decay='abc' is text", "expects a number", "e.g. weight_decay=0.01"],
        ),
        (
            {"optimizer": "AdamW", "optimizer_args": "betas=1"},
            ["optimizer_args", "betas=1 is a number", "expects 2 numbers for betas", "e.g. betas=0.9,0.999"],
        ),
        (
            {"optimizer": "CAME", "optimizer_args": "weight_decy=0.1"},
            ["optimizer_args", "has no argument 'weight_decy'", "weight_decay"],
        ),
        (
            {"lr_scheduler": "piecewise_constant", "lr_scheduler_args": ""},
            ["needs lr_scheduler_args step_rules", "step_rules='1:100,0.5:200,0.1'"],
        ),
        ({"lr_scheduler": "cosine", "lr_scheduler_min_lr_ratio": 0.1}, ["lr_scheduler_min_lr_ratio 0.1 is only used"]),
    ],
)
def test_optimizer_and_schedule_settings_are_refused_at_queue_time(
    server, object_info, folder_dataset, inputs, fragments
):
    """Checked against the optimizer's own signature and the schedule when the prompt is queued, not mid-run."""
    prompt, train = training_only(object_info, folder_dataset, output_name="optargs")
    prompt[train]["inputs"].update(inputs)
    errors = queue_refused(server, prompt)[train]["errors"]
    assert len(errors) == 1, errors  # one message on the node
    for fragment in fragments:
        assert fragment in errors[0]["details"], (fragment, errors)


def test_an_existing_file_is_never_overwritten(server, object_info, folder_dataset):
    """Occupy every name the run could pick in the next minutes; the node must take the next free name."""
    folder = server.base / "models" / "loras" / SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    seed, stem = 5, "taken"
    now = time.time()
    markers = {}
    for dt in range(-2, 240):
        tag = time.strftime("%Y%m%d-%H%M%S", time.localtime(now + dt))
        path = folder / f"{stem}_{tag}_s{seed}.safetensors"
        path.write_bytes(f"marker {dt}".encode())
        markers[path] = path.read_bytes()
    prompt, train = training_only(object_info, folder_dataset, output_name=stem, seed=seed)
    entry, _ = run_ok(server, prompt)
    name = lora_name_of(entry, train)
    path = server.base / "models" / "loras" / name
    assert (
        name.endswith("_2.safetensors")
        and path.with_name(path.name[: -len("_2.safetensors")] + ".safetensors") in markers
    ), name
    assert read_lora(path)
    for p, content in markers.items():
        assert p.read_bytes() == content, f"{p} was overwritten"


def test_overwrite_true_reuses_the_exact_name(server, object_info, folder_dataset):
    folder = server.base / "models" / "loras" / SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "fixed.safetensors"
    target.write_bytes(b"old file")
    prompt, train = training_only(object_info, folder_dataset, output_name="fixed", overwrite=True, seed=1)
    entry, _ = run_ok(server, prompt)
    assert lora_name_of(entry, train) == f"{SUBFOLDER}/fixed.safetensors"
    first = read_lora(target)
    prompt[train]["inputs"]["seed"] = 2
    entry, _ = run_ok(server, prompt)
    assert lora_name_of(entry, train) == f"{SUBFOLDER}/fixed.safetensors"
    second = read_lora(target)
    assert set(first) == set(second)
    assert any(not np.array_equal(first[k].float().numpy(), second[k].float().numpy()) for k in first)
    assert not any(p.name.startswith("fixed_") for p in folder.glob("*.safetensors"))


def test_network_settings_out_of_range_are_rejected(server, object_info, folder_dataset):
    """ComfyUI's own min/max checks must still run for the network node (start_from has its own check)."""
    prompt, _ = training_only(object_info, folder_dataset, output_name="range")
    prompt = set_inputs(prompt, "SDXLLoraNetwork", network_dim=0)
    with pytest.raises(ServerError) as err:
        server.queue(prompt)
    assert "network_dim" in str(err.value) and "smaller than min" in str(err.value), str(err.value)
