"""The README's demo: run the example workflow train_then_test_sdxl_lora headless and show what it made.

A private ComfyUI (persistent base directory, default .comfyui/demo-base/) gets the committed sample dataset
(example_workflows/sample_dataset) in its input folder, and the committed UI workflow is converted to an API
prompt exactly as the tests do (devkit/workflow_convert.py). By default it trains on the tiny SDXL the tests use
(seconds on a CPU, the images are noise but the plumbing is real); with --checkpoint PATH or SDXL_CHECKPOINT it
trains on a real SDXL checkpoint (linked into the base directory's models/checkpoints; uses the GPU if there is
one). The LoRA, the base/LoRA images and the base directory are printed at the end and kept.

    make demo
    make demo DEMO_ARGS="--checkpoint /models/sd_xl_base_1.0.safetensors --steps 200"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "devkit"))

from comfy_server import PACK_NAME, ComfyServer, execution_error
from example_prompts import add_latent_probes, probe_latent
from workflow_convert import for_ci, nodes_of, only_node, workflow_to_prompt

WORKFLOW = ROOT / "example_workflows" / "train_then_test_sdxl_lora.json"
SAMPLE = ROOT / "example_workflows" / "sample_dataset"
SAMPLE_FOLDER = "sdxl_lora_sample"  # the folder the example workflow reads, inside ComfyUI/input
DEFAULT_BASE = ROOT / ".comfyui" / "demo-base"
PROBES = "sdxl_lora_demo"  # the latent probes' folder inside ComfyUI/output


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--checkpoint",
        type=Path,
        default=os.environ.get("SDXL_CHECKPOINT") or None,
        help="a real SDXL .safetensors (default: $SDXL_CHECKPOINT, else the tiny test model)",
    )
    ap.add_argument("--base-dir", type=Path, default=DEFAULT_BASE, help="ComfyUI base directory (kept)")
    ap.add_argument("--steps", type=int, help="training steps (default 60 tiny / 100 real)")
    ap.add_argument("--resolution", type=int, help="training and sampling size (default 64 tiny / 1024 real)")
    ap.add_argument("--sample-steps", type=int, help="KSampler steps (default 20 tiny / 25 real)")
    ap.add_argument("--seed", type=int, default=42, help="training seed")
    ap.add_argument(
        "--cpu",
        action="store_true",
        help="use the CPU for a real checkpoint even if there is a GPU (the tiny model always runs on the CPU)",
    )
    return ap.parse_args(argv)


def accelerator_available() -> bool:
    """Whether ComfyUI would find a GPU (it crashes at start without --cpu when there is none)."""
    try:
        import torch
    except ImportError:
        return False
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return bool(torch.cuda.is_available() or (mps and mps.is_available()) or (xpu and xpu.is_available()))


def install_checkpoint(base: Path, checkpoint: Path) -> str:
    """Make the checkpoint visible to CheckpointLoaderSimple in the base dir (a link; a copy if links fail)."""
    if not checkpoint.is_file():
        raise SystemExit(f"no checkpoint file at {checkpoint}")
    target = base / "models" / "checkpoints" / checkpoint.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        if target.resolve() == checkpoint.resolve():
            return checkpoint.name
        target.unlink()
    try:
        target.symlink_to(checkpoint.resolve())
    except OSError:
        shutil.copy2(checkpoint, target)
    return checkpoint.name


def install_sample_dataset(base: Path) -> Path:
    dest = base / "input" / SAMPLE_FOLDER
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(SAMPLE, dest)
    return dest


def image_paths(server: ComfyServer, entry: dict, node: str) -> list[Path]:
    return [
        server.base / im["type"] / im["subfolder"] / im["filename"]
        for im in entry["outputs"].get(node, {}).get("images", [])
    ]


def mean_abs_difference(a: Path, b: Path) -> float:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.float32)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.float32)
    return float(np.abs(x - y).mean())


def training_image_for(prompt: Mapping[str, dict], dataset: Path) -> Path | None:
    """The dataset image whose caption is the LoRA KSampler's positive prompt (what an overfit LoRA reproduces)."""
    lora_model = set(nodes_of(prompt, "LoraLoader"))
    for n in nodes_of(prompt, "KSampler"):
        inputs = prompt[n]["inputs"]
        if isinstance(inputs.get("model"), list) and inputs["model"][0] in lora_model:
            text = prompt[inputs["positive"][0]]["inputs"].get("text")
            for caption in sorted(dataset.rglob("*.txt")):
                if caption.read_text(encoding="utf-8").strip() == str(text).strip():
                    image = caption.with_suffix(".png")
                    return image if image.is_file() else None
    return None


def add_demo_probes(prompt: dict, target: Path, base: Path, resolution: int) -> None:
    """The training image at the training size as an input, and latent probes after both KSamplers (as the
    learning-proof test)."""
    from PIL import Image

    name = "sdxl_lora_demo_target.png"
    Image.open(target).convert("RGB").resize((resolution, resolution), Image.BOX).save(base / "input" / name)
    lora_models = set(nodes_of(prompt, "LoraLoader"))
    samplers = {
        "lora" if prompt[n]["inputs"]["model"][0] in lora_models else "base": n for n in nodes_of(prompt, "KSampler")
    }
    vae = next(prompt[n]["inputs"]["vae"] for n in nodes_of(prompt, "VAEDecode"))
    add_latent_probes(prompt, samplers, name, vae, PROBES)


def mse_to(image: Path, target: Path) -> float:
    """Pixel MSE (0..1 scale) of ``image`` to ``target`` resized to its size (the demo trains at that resolution)."""
    import numpy as np
    from PIL import Image

    x = Image.open(image).convert("RGB")
    y = Image.open(target).convert("RGB").resize(x.size, Image.BOX)
    difference = (np.asarray(x, dtype=np.float32) - np.asarray(y, dtype=np.float32)) / 255.0
    return float((difference**2).mean())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    real = args.checkpoint is not None
    steps = args.steps or (100 if real else 60)
    resolution = args.resolution or (1024 if real else 64)
    sample_steps = args.sample_steps or (25 if real else 20)
    base = args.base_dir.resolve()
    base.mkdir(parents=True, exist_ok=True)

    cpu = args.cpu or not real or not accelerator_available()
    server = ComfyServer(base_dir=base, with_test_nodes=True, cpu=cpu)
    ckpt_name = install_checkpoint(base, Path(args.checkpoint)) if real else None
    dataset = install_sample_dataset(base)
    print(f"starting ComfyUI (base directory {base}) ...", flush=True)
    with server:
        info = server.get("/object_info")
        ours = [k for k, v in info.items() if v.get("python_module") == f"custom_nodes.{PACK_NAME}"]
        print(
            f"ComfyUI at {server.url} loaded the pack with {len(ours)} nodes; example workflows: "
            f"{', '.join(sorted(server.get('/workflow_templates').get(PACK_NAME, [])))}"
        )
        prompt = workflow_to_prompt(json.loads(WORKFLOW.read_text()), info)
        if real:
            prompt = for_ci(
                prompt,
                checkpoint=ckpt_name,
                folder=SAMPLE_FOLDER,
                steps=steps,
                resolution=resolution,
                sample_steps=sample_steps,
                learning_rate=1e-4,
                seed=args.seed,
                train_dtype="auto",
            )
        else:
            prompt = for_ci(
                prompt,
                folder=SAMPLE_FOLDER,
                steps=steps,
                resolution=resolution,
                sample_steps=sample_steps,
                learning_rate=1e-2,
                seed=args.seed,
            )
            # the tiny U-Net learns an image through its convolutions much faster than through attention alone, and
            # cfg 1 samples what the LoRA learned without the negative prompt's pull (as the learning-proof test)
            prompt[only_node(prompt, "SDXLLoraNetwork")]["inputs"].update(conv_dim=8, conv_alpha=8.0)
            for n in nodes_of(prompt, "KSampler"):
                prompt[n]["inputs"].update(cfg=1.0)
        target = training_image_for(prompt, dataset)
        if target is not None:
            add_demo_probes(prompt, target, base, resolution)
        model = f"{ckpt_name} ({'CPU' if cpu else 'GPU'})" if real else "the tiny test SDXL"
        print(f"training {steps} steps at {resolution}px on {model} with {dataset} ...", flush=True)
        started = time.time()
        log_start = len(server.log())
        entry = server.run(prompt, timeout=24 * 3600)
        err = execution_error(entry)
        if err:
            print(f"the workflow failed: {err}\n--- server log ---\n{server.log()[-4000:]}")
            return 1
        train = only_node(prompt, "SDXLLoraTrain")
        report = entry["outputs"][train]["text"][0]
        lora_line = next(ln for ln in report.splitlines() if ln.startswith("saved "))
        saves = {
            prompt[n]["inputs"]["filename_prefix"].rsplit("/", 1)[-1]: image_paths(server, entry, n)
            for n in nodes_of(prompt, "SaveImage")
        }
        not_loaded = [ln for ln in server.log()[log_start:].splitlines() if "lora key not loaded" in ln]
        print(f"\ndone in {time.time() - started:.0f}s\n{report}\n")
        print(f"LoRA:            {lora_line[len('saved ') :]}")
        for kind, paths in saves.items():
            for p in paths:
                print(f"{'image ' + kind + ':':17s}{p}")
        if len(saves.get("base", [])) == 1 and len(saves.get("with_lora", [])) == 1:
            diff = mean_abs_difference(saves["base"][0], saves["with_lora"][0])
            print(f"base vs LoRA:    mean absolute pixel difference {diff:.2f} (same seed, prompt and latent)")
            if target is not None:
                without, with_lora = mse_to(saves["base"][0], target), mse_to(saves["with_lora"][0], target)
                print(
                    f"learned (pixels): MSE to the training image with this caption ({target.name}): without "
                    f"LoRA {without:.4f}, with LoRA {with_lora:.4f} ({without / max(with_lora, 1e-12):.2f}x closer)"
                )
                latents = {kind: probe_latent(base / "output", PROBES, kind) for kind in ("base", "lora", "target")}
                if all(v is not None and v.shape == latents["target"].shape for v in latents.values()):
                    l_base = float(((latents["base"] - latents["target"]) ** 2).mean())
                    l_lora = float(((latents["lora"] - latents["target"]) ** 2).mean())
                    print(
                        f"learned (latents): MSE of the sampled latent to the training image's latent: without "
                        f"LoRA {l_base:.4f}, with LoRA {l_lora:.4f} ({l_base / max(l_lora, 1e-12):.2f}x closer)"
                    )
        print(f"server log:      {server.log_path}")
        print(f"base directory:  {base} (kept; open it with ComfyUI's --base-directory to browse)")
        if not_loaded:
            print(f"WARNING: LoraLoader did not load {len(not_loaded)} keys:\n" + "\n".join(not_loaded[:5]))
            return 1
    print("server stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
