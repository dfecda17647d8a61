"""Generate example_workflows/*.json (the ComfyUI frontend's workflow format) from API-format definitions.

Why generated: a hand-edited UI workflow silently breaks when a node gains, loses or reorders an input (the
frontend maps ``widgets_values`` by position). Here each workflow is written as an API prompt (named inputs,
links by output name) plus a layout, and turned into UI JSON with the server's /object_info and the same
widget rules the tests use to convert it back (devkit/workflow_convert.py). Widgets a definition leaves out get
the schema's default, so a new input shows up with its default after a re-run.

    python scripts/build_example_workflows.py            # start a private ComfyUI, write the JSON files
    python scripts/build_example_workflows.py --check    # exit 1 if the committed files are out of date
    python scripts/build_example_workflows.py --object-info info.json   # use a saved /object_info
    python scripts/build_example_workflows.py --sample-dataset           # (re)draw example_workflows/sample_dataset

tests/server/test_example_workflows.py regenerates the files from the running server and compares them.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "devkit"))

from workflow_convert import (
    ConversionError,
    input_specs,
    inputs_to_widgets,
    is_widget,
    socket_inputs,
    spec_options,
    spec_type,
    widget_type_name,
)

OUT_DIR = ROOT / "example_workflows"
SAMPLE_DIR = OUT_DIR / "sample_dataset"
SAMPLE_FOLDER = "sdxl_lora_sample"  # where users (and the demo) put the sample dataset, inside ComfyUI/input
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
SDXL_URL = "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"
FRONTEND_VERSION = "1.47.12"  # the comfyui-frontend-package ComfyUI 0.30.0 pins; only informative
CORE_VERSION = "0.30.0"

# layout (canvas pixels)
COLUMN_GAP = 70
ROW_GAP = 50
GROUP_GAP = 60  # vertical space between two groups stacked in the same columns
TITLE_H = 30  # litegraph draws the title above node.pos
SLOT_H = 20
WIDGET_H = 24
GROUP_PAD = 20
GROUP_TITLE_H = 45
GROUP_COLOR = "#3f789e"
NOTE_COLOR, NOTE_BG = "#432", "#653"
LINKED_WIDGET_VALUE = ""


def ref(node: str, output: str) -> tuple[str, str]:
    """A link in a definition: (node key, output name)."""
    return (node, output)


@dataclass
class Node:
    key: str
    class_type: str
    inputs: dict[str, Any]
    column: int
    title: str | None = None
    width: int = 320
    extra_height: int = 0  # room for an image preview (SaveImage / PreviewImage) or a long text
    text: str | None = None  # MarkdownNote text


@dataclass
class Group:
    title: str
    note: str
    nodes: list[Node] = field(default_factory=list)


@dataclass
class Definition:
    name: str
    groups: list[Group]

    def all_nodes(self) -> list[Node]:
        return [n for g in self.groups for n in g.nodes]


# ---------------------------------------------------------------------------------------------------------------
# the workflows
# ---------------------------------------------------------------------------------------------------------------


NOTE_MODEL = f"""### 1. Model
Pick an **SDXL** checkpoint (`models/checkpoints`). The trainer trains on the MODEL/CLIP/VAE loaded here: no
second copy, and the loaded model is left unchanged for the other nodes.

SDXL base: [sd_xl_base_1.0.safetensors]({SDXL_URL})"""

NOTE_DATASET_FOLDER = f"""### 2. Dataset
**folder**: your images, absolute or relative to `ComfyUI/input`. kohya layout: a subfolder `10_name` is repeated
10 times per epoch; each `img.png` has its caption in `img.txt`.

Try it: copy this pack's `example_workflows/sample_dataset` to `ComfyUI/input/{SAMPLE_FOLDER}`.

**Buckets & Captions**: `resolution` 1024 for SDXL; buckets keep aspect ratios. The report shows steps per
epoch exactly as kohya computes them."""

NOTE_DATASET_TOML = f"""### 2. Dataset (kohya TOML)
**toml_path**: a kohya dataset config (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`), absolute or relative
to `ComfyUI/input`; `image_dir` inside it is relative to the TOML's folder. Unknown keys are listed in the report.

Try it: copy this pack's `example_workflows/sample_dataset` to `ComfyUI/input/{SAMPLE_FOLDER}`; it has a
`dataset.toml`."""

NOTE_DATASET_MASKED = """### 2. Dataset with a loss mask
**Load Image**: an image with a transparent background; its **MASK** (1 - alpha) says which pixels count, as
kohya's `alpha_mask`. Or right-click it, **Open in MaskEditor** and paint: painted pixels are then ignored (set
`mask_meaning` to `mask` to train only the painted ones).

**Images from Graph**: one caption per line; `repeats` as kohya's `N_name` folders. For whole folders use
**Images from Folder** with `alpha_mask` or a `mask_folder` (one mask per image, red channel).

The Buckets and Cache Latents reports count the masked images."""

NOTE_CACHES = """### 3. Caches & network
**Cache Latents / Cache Text** encode every image and caption once (re-queuing reuses them).

**Network**: `network_dim` (rank) 8-32 and `network_alpha` (half the rank is common) for a character or style;
`train_clip_l` / `train_clip_g` also train the text encoders."""

NOTE_CACHES_CONTINUE = """### 3. Caches & network: continue a LoRA
**start_from**: the LoRA file to continue training (from `models/loras`). Its ranks and alphas replace
`network_dim` / `network_alpha`; the rest of the network settings still apply.

**Cache Latents / Cache Text** encode every image and caption once."""

NOTE_TRAIN = """### 4. Train
**max_train_steps** (or `max_train_epochs`), **learning_rate** (1e-4 is kohya's usual for SDXL LoRA),
**seed** (same seed = same LoRA). `train_dtype` auto: bf16 on a recent GPU, fp16 on older ones, fp32 on a CPU.

The LoRA is saved to `models/loras/<output_subfolder>/<output_name>_<date-time>_s<seed>.safetensors`: a new
name every run, so LoraLoader never serves stale weights. Cancel stops within a step and saves."""

NOTE_TEST = """### 5. Test: base vs LoRA
Both KSamplers use the **same seed, prompt and latent**: the only difference is the LoRA. `lora_name` is linked
from the train node, so the LoRA just trained is the one loaded. Put your caption's trigger words in the
prompt."""

NOTE_RESULTS = """### 6. Results
Left: the base model; right: with the LoRA. Both are saved in `ComfyUI/output/sdxl_lora_trainer/`."""


def _model_group() -> Group:
    return Group(
        "1. Model",
        NOTE_MODEL,
        [
            Node("ckpt", "CheckpointLoaderSimple", {"ckpt_name": SDXL_CHECKPOINT}, column=0, title="Load Checkpoint"),
        ],
    )


def _dataset_group(source: str) -> Group:
    if source == "toml":
        return Group(
            "2. Dataset",
            NOTE_DATASET_TOML,
            [
                Node("dataset", "SDXLLoraDatasetFromToml", {"toml_path": f"{SAMPLE_FOLDER}/dataset.toml"}, column=1),
                Node(
                    "histogram",
                    "PreviewImage",
                    {"images": ref("dataset", "bucket_histogram")},
                    column=1,
                    title="Bucket histogram",
                    extra_height=220,
                ),
            ],
        )
    return Group(
        "2. Dataset",
        NOTE_DATASET_FOLDER,
        [
            Node("images", "SDXLLoraImagesFromFolder", {"folder": SAMPLE_FOLDER}, column=1),
            Node(
                "dataset",
                "SDXLLoraBuckets",
                {"images": ref("images", "images"), "resolution_width": 1024, "resolution_height": 1024},
                column=1,
            ),
            Node(
                "histogram",
                "PreviewImage",
                {"images": ref("dataset", "bucket_histogram")},
                column=1,
                title="Bucket histogram",
                extra_height=220,
            ),
        ],
    )


MASKED_IMAGE = "example.png"  # ComfyUI's own input/example.png; load your transparent image here


def _masked_dataset_group() -> Group:
    return Group(
        "2. Dataset",
        NOTE_DATASET_MASKED,
        [
            Node(
                "load",
                "LoadImage",
                {"image": MASKED_IMAGE},
                column=1,
                title="Load Image (alpha = mask)",
                extra_height=260,
            ),
            Node(
                "images",
                "SDXLLoraImagesFromGraph",
                {
                    "images": ref("load", "IMAGE"),
                    "mask": ref("load", "MASK"),
                    "captions": "zkw toy, a toy on a plain background",
                    "name": "masked",
                    "repeats": 10,
                },
                column=1,
            ),
            Node(
                "dataset",
                "SDXLLoraBuckets",
                {"images": ref("images", "images"), "resolution_width": 1024, "resolution_height": 1024},
                column=1,
            ),
        ],
    )


def _cache_group(start_from: str | None) -> Group:
    network = {"network_dim": 16, "network_alpha": 8.0, "start_from": start_from or "none"}
    return Group(
        "3. Caches & network",
        NOTE_CACHES_CONTINUE if start_from else NOTE_CACHES,
        [
            Node(
                "latents",
                "SDXLLoraCacheLatents",
                {"dataset": ref("dataset", "dataset"), "vae": ref("ckpt", "VAE")},
                column=2,
            ),
            Node(
                "text",
                "SDXLLoraCacheText",
                {"dataset": ref("dataset", "dataset"), "clip": ref("ckpt", "CLIP")},
                column=2,
            ),
            Node(
                "network",
                "SDXLLoraNetwork",
                network,
                column=2,
                title="Network (continue from a LoRA)" if start_from else None,
            ),
        ],
    )


NOTE_EXPORT = """### 4a. Scale out: export a kohya run
**Train Settings** holds the training settings once: the Train node and the export both use them.

**Export kohya Run** writes `ComfyUI/output/kohya_runs/<export_name>/`: the dataset (images + captions),
`dataset.toml`, `config.toml`, `launch.sh` and a README. On a multi-GPU machine with kohya sd-scripts:
`SD_SCRIPTS=~/sd-scripts ./launch.sh` (accelerate, `num_processes` GPUs). Settings kohya has no argument for are
listed in its report, never dropped. Bring the result back with the Network node's `start_from`."""


def _export_group(steps: int, lr: float) -> Group:
    return Group(
        "4a. Scale out: export a kohya run",
        NOTE_EXPORT,
        [
            Node(
                "settings",
                "SDXLLoraTrainSettings",
                {"max_train_steps": steps, "learning_rate": lr, "seed": 42, "train_dtype": "auto"},
                column=3,
                width=380,
            ),
            Node(
                "export",
                "SDXLLoraKohyaExport",
                {
                    "dataset": ref("dataset", "dataset"),
                    "network": ref("network", "network"),
                    "train_settings": ref("settings", "train_settings"),
                    "model": ref("ckpt", "MODEL"),
                    "latents": ref("latents", "latents"),
                    "text": ref("text", "text"),
                    "export_name": "my_sdxl_lora_run",
                    "num_processes": 8,
                    "output_name": "my_sdxl_lora",
                },
                column=3,
                width=380,
            ),
        ],
    )


def _train_group(output_name: str, steps: int, lr: float, shared_settings: bool = False) -> Group:
    inputs: dict[str, Any] = {
        "model": ref("ckpt", "MODEL"),
        "clip": ref("ckpt", "CLIP"),
        "dataset": ref("dataset", "dataset"),
        "latents": ref("latents", "latents"),
        "network": ref("network", "network"),
        "text": ref("text", "text"),
        "max_train_steps": steps,
        "learning_rate": lr,
        "seed": 42,
        "train_dtype": "auto",
        "output_name": output_name,
        "output_subfolder": "sdxl_lora_trainer",
        "overwrite": False,
    }
    if shared_settings:
        inputs["train_settings"] = ref("settings", "train_settings")
    return Group(
        "4. Train",
        NOTE_TRAIN,
        [
            Node(
                "train",
                "SDXLLoraTrain",
                inputs,
                column=3,
                width=420,
                extra_height=260,
            ),  # room for the live loss chart drawn by web/loss_chart.js
            Node(
                "loss",
                "PreviewImage",
                {"images": ref("train", "loss_graph")},
                column=3,
                title="Loss graph",
                extra_height=260,
                width=380,
            ),
        ],
    )


def _test_groups(prompt: str) -> list[Group]:
    sampler = {
        "seed": 42,
        "steps": 25,
        "cfg": 7.0,
        "sampler_name": "euler",
        "scheduler": "normal",
        "denoise": 1.0,
        "positive": ref("positive", "CONDITIONING"),
        "negative": ref("negative", "CONDITIONING"),
        "latent_image": ref("latent", "LATENT"),
    }
    test = Group(
        "5. Test: base vs LoRA",
        NOTE_TEST,
        [
            Node(
                "lora_loader",
                "LoraLoader",
                {
                    "model": ref("ckpt", "MODEL"),
                    "clip": ref("ckpt", "CLIP"),
                    "lora_name": ref("train", "lora_name"),
                    "strength_model": 1.0,
                    "strength_clip": 1.0,
                },
                column=4,
                title="Load the trained LoRA",
            ),
            Node(
                "positive",
                "CLIPTextEncode",
                {"text": prompt, "clip": ref("ckpt", "CLIP")},
                column=4,
                title="Prompt",
                extra_height=40,
            ),
            Node(
                "negative",
                "CLIPTextEncode",
                {"text": "blurry, low quality", "clip": ref("ckpt", "CLIP")},
                column=4,
                title="Negative prompt",
                extra_height=20,
            ),
            Node("latent", "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, column=4),
            Node(
                "sample_base",
                "KSampler",
                dict(sampler, model=ref("ckpt", "MODEL")),
                column=5,
                title="KSampler: base model",
            ),
            Node(
                "sample_lora",
                "KSampler",
                dict(sampler, model=ref("lora_loader", "MODEL")),
                column=5,
                title="KSampler: with LoRA (same seed)",
            ),
        ],
    )
    results = Group(
        "6. Results",
        NOTE_RESULTS,
        [
            Node(
                "decode_base",
                "VAEDecode",
                {"samples": ref("sample_base", "LATENT"), "vae": ref("ckpt", "VAE")},
                column=6,
                width=260,
            ),
            Node(
                "decode_lora",
                "VAEDecode",
                {"samples": ref("sample_lora", "LATENT"), "vae": ref("ckpt", "VAE")},
                column=7,
                width=260,
            ),
            Node(
                "save_base",
                "SaveImage",
                {"images": ref("decode_base", "IMAGE"), "filename_prefix": "sdxl_lora_trainer/base"},
                column=6,
                title="Base model",
                width=260,
                extra_height=260,
            ),
            Node(
                "save_lora",
                "SaveImage",
                {"images": ref("decode_lora", "IMAGE"), "filename_prefix": "sdxl_lora_trainer/with_lora"},
                column=7,
                title="With LoRA",
                width=260,
                extra_height=260,
            ),
        ],
    )
    return [test, results]


SAMPLE_PROMPT = "zkw toy, a red circle on a blue background"


def definitions() -> list[Definition]:
    return [
        Definition(
            "train_then_test_sdxl_lora",
            [
                _model_group(),
                _dataset_group("folder"),
                _cache_group(None),
                _train_group("my_sdxl_lora", 400, 1e-4),
                *_test_groups(SAMPLE_PROMPT),
            ],
        ),
        Definition(
            "kohya_toml_dataset",
            [
                _model_group(),
                _dataset_group("toml"),
                _cache_group(None),
                _train_group("my_sdxl_lora", 400, 1e-4),
                *_test_groups(SAMPLE_PROMPT),
            ],
        ),
        Definition(
            "export_kohya_run",
            [
                _model_group(),
                _dataset_group("folder"),
                _cache_group(None),
                _export_group(400, 1e-4),
                _train_group("my_sdxl_lora", 400, 1e-4, shared_settings=True),
                *_test_groups(SAMPLE_PROMPT),
            ],
        ),
        Definition(
            "masked_training",
            [
                _model_group(),
                _masked_dataset_group(),
                _cache_group(None),
                _train_group("my_masked_sdxl_lora", 400, 1e-4),
                *_test_groups(SAMPLE_PROMPT),
            ],
        ),
        Definition(
            "continue_training",
            [
                _model_group(),
                _dataset_group("folder"),
                _cache_group("sdxl_lora_trainer/my_sdxl_lora.safetensors"),
                _train_group("my_sdxl_lora_continued", 200, 5e-5),
                *_test_groups(SAMPLE_PROMPT),
            ],
        ),
    ]


# ---------------------------------------------------------------------------------------------------------------
# API definition -> UI workflow
# ---------------------------------------------------------------------------------------------------------------


def _defaults(info: dict, given: dict[str, Any], label: str) -> dict[str, Any]:
    """Every widget's value: the definition's, else the schema default (first option for a legacy combo)."""
    values = {}
    for name, spec in input_specs(info):
        if not is_widget(spec):
            continue
        if name in given:
            values[name] = given[name]
            continue
        opts = spec_options(spec)
        if "default" in opts:
            values[name] = opts["default"]
        elif isinstance(spec_type(spec), list) and spec_type(spec):
            values[name] = spec_type(spec)[0]
        elif spec_type(spec) == "COMBO" and opts.get("options"):
            values[name] = opts["options"][0]
        else:
            raise ConversionError(f"{label}: widget {name!r} has no default; set it in the definition")
    return values


def _node_height(n_inputs: int, n_outputs: int, n_widgets: int, extra: int) -> int:
    return max(n_inputs, n_outputs) * SLOT_H + n_widgets * WIDGET_H + 16 + extra


def _note_height(text: str, width: int) -> int:
    chars_per_line = max(20, (width - 30) // 7)
    lines = sum(max(1, -(-len(line) // chars_per_line)) for line in text.split("\n"))
    return 30 + lines * 18


def build(definition: Definition, object_info: dict[str, Any]) -> dict[str, Any]:
    """The UI workflow JSON of one definition."""
    nodes = definition.all_nodes()
    keys = [n.key for n in nodes]
    if len(set(keys)) != len(keys):
        raise ConversionError(f"{definition.name}: duplicate node keys")
    ids = {n.key: i + 1 for i, n in enumerate(nodes)}
    next_id = len(nodes) + 1
    for n in nodes:
        if n.class_type not in object_info:
            raise ConversionError(f"{definition.name}: the server has no node {n.class_type!r}")
        for name in n.inputs:
            if name not in dict(input_specs(object_info[n.class_type])):
                raise ConversionError(f"{definition.name}.{n.key}: {n.class_type} has no input {name!r}")

    # links, in definition order
    links: list[list] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    ui_nodes: dict[str, dict] = {}
    for n in nodes:
        info = object_info[n.class_type]
        specs = dict(input_specs(info))
        inputs_ui: list[dict] = []
        for name, typ in socket_inputs(info):
            entry: dict[str, Any] = {"name": name, "type": typ, "link": None}
            if name in info.get("input", {}).get("optional", {}):
                entry["shape"] = 7  # how the frontend draws an optional socket
            inputs_ui.append(entry)
        for name, value in n.inputs.items():
            if isinstance(value, tuple):
                if is_widget(specs[name]):
                    inputs_ui.append(
                        {"name": name, "type": widget_type_name(specs[name]), "widget": {"name": name}, "link": None}
                    )
                src_key, out_name = value
                src = next(x for x in nodes if x.key == src_key)
                src_info = object_info[src.class_type]
                try:
                    slot = src_info["output_name"].index(out_name)
                except ValueError:
                    raise ConversionError(
                        f"{definition.name}.{n.key}.{name}: {src.class_type} has no output "
                        f"{out_name!r} (outputs: {src_info['output_name']})"
                    ) from None
                link_id = len(links) + 1
                target_slot = next(i for i, e in enumerate(inputs_ui) if e["name"] == name)
                inputs_ui[target_slot]["link"] = link_id
                links.append([link_id, ids[src_key], slot, ids[n.key], target_slot, src_info["output"][slot]])
                out_links.setdefault((ids[src_key], slot), []).append(link_id)
        # a linked widget keeps a placeholder value (the frontend saves whatever the widget showed)
        given = {k: (LINKED_WIDGET_VALUE if isinstance(v, tuple) else v) for k, v in n.inputs.items()}
        widget_values = inputs_to_widgets(info, _defaults(info, given, f"{definition.name}.{n.key}"))
        n_widgets = sum(1 for _, spec in input_specs(info) if is_widget(spec))
        n_widgets += len(widget_values) - n_widgets  # control widgets take a row too
        ui_nodes[n.key] = {
            "id": ids[n.key],
            "type": n.class_type,
            "pos": [0, 0],
            "size": [
                n.width,
                _node_height(
                    len(inputs_ui) - sum(1 for e in inputs_ui if "widget" in e),
                    len(info["output"]),
                    n_widgets,
                    n.extra_height,
                ),
            ],
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": inputs_ui,
            "outputs": [],
            "properties": {"Node name for S&R": n.class_type},
            "widgets_values": widget_values,
        }
        if n.title:
            ui_nodes[n.key]["title"] = n.title
        if info.get("python_module") == "nodes" or str(info.get("python_module", "")).startswith("comfy_extras"):
            ui_nodes[n.key]["properties"].update({"cnr_id": "comfy-core", "ver": CORE_VERSION})
        if n.class_type == "CheckpointLoaderSimple":
            ui_nodes[n.key]["properties"]["models"] = [
                {"name": SDXL_CHECKPOINT, "url": SDXL_URL, "directory": "checkpoints"}
            ]
    for n in nodes:
        info = object_info[n.class_type]
        ui_nodes[n.key]["outputs"] = [
            {"name": name, "type": typ, "slot_index": i, "links": out_links.get((ids[n.key], i))}
            for i, (name, typ) in enumerate(zip(info["output_name"], info["output"]))
        ]

    # execution order (the frontend recomputes it; a topological order keeps the file tidy)
    deps = {ids[n.key]: {ln[1] for ln in links if ln[3] == ids[n.key]} for n in nodes}
    order: list[int] = []
    while len(order) < len(deps):
        ready = sorted(i for i, d in deps.items() if i not in order and d <= set(order))
        if not ready:
            raise ConversionError(f"{definition.name}: the graph has a cycle")
        order += ready

    # layout: columns left to right, nodes stacked in each column; every group starts with its note
    columns = sorted({n.column for n in nodes})
    col_width = {c: max(ui_nodes[n.key]["size"][0] for n in nodes if n.column == c) for c in columns}
    col_x: dict[int, int] = {}
    x = 0
    for c in columns:
        col_x[c] = x
        x += col_width[c] + COLUMN_GAP
    notes: list[dict] = []
    groups: list[dict] = []
    first_top = GROUP_TITLE_H + GROUP_PAD
    # a group whose columns an earlier group already uses goes below it, never on top of it
    column_bottom: dict[int, int] = {}
    for gi, g in enumerate(definition.groups):
        gcols = sorted({n.column for n in g.nodes})
        used = [column_bottom[c] for c in gcols if c in column_bottom]
        top = max(used) + GROUP_GAP + GROUP_TITLE_H + GROUP_PAD if used else first_top
        left = col_x[gcols[0]]
        right = col_x[gcols[-1]] + col_width[gcols[-1]]
        note_w = right - left
        note_h = _note_height(g.note, note_w)
        note = {
            "id": next_id,
            "type": "MarkdownNote",
            "pos": [left, top + TITLE_H],
            "size": [note_w, note_h],
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "title": f"Note: {g.title}",
            "properties": {},
            "widgets_values": [g.note],
            "color": NOTE_COLOR,
            "bgcolor": NOTE_BG,
        }
        next_id += 1
        notes.append(note)
        y0 = top + TITLE_H + note_h + ROW_GAP
        bottom = y0
        for c in gcols:
            y = y0
            for n in (n for n in g.nodes if n.column == c):
                ui_nodes[n.key]["pos"] = [col_x[c], y + TITLE_H]
                y += TITLE_H + ui_nodes[n.key]["size"][1] + ROW_GAP
            bottom = max(bottom, y - ROW_GAP)
        for c in gcols:
            column_bottom[c] = bottom + GROUP_PAD
        groups.append(
            {
                "id": gi + 1,
                "title": g.title,
                "bounding": [
                    left - GROUP_PAD,
                    top - GROUP_TITLE_H,
                    note_w + 2 * GROUP_PAD,
                    bottom - top + GROUP_TITLE_H + GROUP_PAD,
                ],
                "color": GROUP_COLOR,
                "font_size": 24,
                "flags": {},
            }
        )
    position = {nid: i for i, nid in enumerate(order)}
    for n in nodes:
        ui_nodes[n.key]["order"] = position[ids[n.key]] + len(notes)
    for i, note in enumerate(notes):
        note["order"] = i

    all_nodes = notes + [ui_nodes[n.key] for n in nodes]
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdxl_lora_trainer/{definition.name}")),
        "revision": 0,
        "last_node_id": max(n["id"] for n in all_nodes),
        "last_link_id": len(links),
        "nodes": all_nodes,
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {"ds": {"scale": 0.6, "offset": [60, 40]}, "frontendVersion": FRONTEND_VERSION},
        "version": 0.4,
    }


def render(workflow: dict[str, Any]) -> str:
    return json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"


def build_all(object_info: dict[str, Any]) -> dict[str, str]:
    """``{file name: JSON text}`` of every example workflow."""
    return {f"{d.name}.json": render(build(d, object_info)) for d in definitions()}


# ---------------------------------------------------------------------------------------------------------------
# the committed sample dataset
# ---------------------------------------------------------------------------------------------------------------

SAMPLE_TOML = """# kohya dataset config for the sample dataset (see the 'kohya_toml_dataset' example workflow)
[general]
resolution = 1024
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 2048
bucket_reso_steps = 64
caption_extension = ".txt"

[[datasets]]
batch_size = 1

  [[datasets.subsets]]
  image_dir = "2_zkw_toy"
  num_repeats = 2
"""

_SHAPES = [
    ("red", "circle", "blue"),
    ("yellow", "square", "green"),
    ("red", "triangle", "white"),
    ("blue", "circle", "yellow"),
    ("green", "square", "purple"),
    ("white", "triangle", "black"),
]
_RGB = {
    "red": (220, 40, 40),
    "blue": (40, 70, 200),
    "yellow": (240, 210, 40),
    "green": (40, 160, 70),
    "white": (245, 245, 245),
    "purple": (130, 60, 170),
    "black": (20, 20, 20),
}
_SIZES = [(64, 64), (64, 64), (64, 48), (48, 64), (64, 64), (64, 64)]


def write_sample_dataset(root: Path = SAMPLE_DIR) -> list[Path]:
    """Six small flat-colour pictures with kohya captions (kohya layout: 2 repeats), plus a dataset.toml."""
    from PIL import Image, ImageDraw

    folder = root / "2_zkw_toy"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, ((fg, shape, bg), size) in enumerate(zip(_SHAPES, _SIZES)):
        w, h = size
        img = Image.new("RGB", size, _RGB[bg])
        d = ImageDraw.Draw(img)
        box = [w // 5, h // 5, w - w // 5, h - h // 5]
        if shape == "circle":
            d.ellipse(box, fill=_RGB[fg])
        elif shape == "square":
            d.rectangle(box, fill=_RGB[fg])
        else:
            d.polygon([(w // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=_RGB[fg])
        path = folder / f"toy_{i}.png"
        img.save(path, optimize=True)
        path.with_suffix(".txt").write_text(f"zkw toy, a {fg} {shape} on a {bg} background\n")
        written += [path, path.with_suffix(".txt")]
    (root / "dataset.toml").write_text(SAMPLE_TOML)
    written.append(root / "dataset.toml")
    return written


# ---------------------------------------------------------------------------------------------------------------


def server_object_info() -> dict[str, Any]:
    """/object_info of a private ComfyUI with this pack (the user's ComfyUI folders are not touched)."""
    from comfy_server import ComfyServer

    with ComfyServer(with_test_nodes=False) as server:
        return server.get("/object_info")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--object-info", type=Path, help="a saved /object_info JSON instead of starting ComfyUI")
    ap.add_argument("--check", action="store_true", help="only compare with the committed files")
    ap.add_argument("--sample-dataset", action="store_true", help="(re)draw example_workflows/sample_dataset")
    args = ap.parse_args(argv)
    if args.sample_dataset:
        files = write_sample_dataset()
        total = sum(p.stat().st_size for p in files)
        print(f"wrote {len(files)} files ({total} bytes) to {SAMPLE_DIR}")
        return 0
    info = json.loads(args.object_info.read_text()) if args.object_info else server_object_info()
    files = build_all(info)
    stale = [
        name for name, text in files.items() if not (OUT_DIR / name).is_file() or (OUT_DIR / name).read_text() != text
    ]
    if args.check:
        for name in stale:
            print(f"out of date: example_workflows/{name} (run scripts/build_example_workflows.py)")
        return 1 if stale else 0
    OUT_DIR.mkdir(exist_ok=True)
    for name, text in files.items():
        (OUT_DIR / name).write_text(text)
        print(f"{'wrote' if name in stale else 'unchanged'} example_workflows/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
