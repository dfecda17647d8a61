"""The memory plan (trainer/run/memory_plan.py): predicted vs measured on the CPU, and the plan of full-size SDXL.

Not a test (CI runs the tiny-model check in tests/host/run/test_memory_plan.py). Two parts:

* ``measure``: for the tiny and mid benchmark models (bench_train.py's builders) at several resolutions, batch sizes
  and checkpointing settings, train 2 steps with ``PeakTensorMemory`` counting every tensor the run allocates
  (LoRA, optimizer states, activations, gradients, batches: the plan's ``besides_weights``), and print it next to
  the plan the run made before its first step.
* ``table``: the plan of full-size SDXL (2.57 B parameters) built on the meta device (no memory, no weights) for the
  settings users ask about (1024², rank 16, bf16, AdamW / AdamW8bit, checkpointing on/off, batch 1/2), with the
  fit on 8 / 12 / 16 / 24 GB GPUs. The U-Net's shapes are SDXL's; the step runs on shape-only tensors.

Usage:
    .venv/bin/python bench/bench_memory_plan.py measure --model tiny      # ~1 min
    .venv/bin/python bench/bench_memory_plan.py measure --model mid       # ~10 min, ~8 GiB
    .venv/bin/python bench/bench_memory_plan.py table                      # ~2 min, < 2 GiB
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_train  # noqa: E402  (its model builders and data)

GIB = 2**30
CASES = {
    "tiny": [(64, 1, True), (128, 1, True), (128, 2, True), (128, 2, False), (256, 1, True)],
    "mid": [(256, 1, True), (256, 2, True), (512, 1, True), (256, 1, False)],
}


class Source:
    """trainer/run/batch_loader's LatentSource and TextSource over dicts."""

    def __init__(self, latents: dict, texts: dict) -> None:
        from sdxl_lora_trainer.trainer.data.token_length import TokenLength

        self.latents, self.texts = latents, texts
        self.token_length = TokenLength()  # kohya's default layout: one 77-token row, as the random encodings are

    def latent(self, image, flipped):
        return self.latents[image.key]

    def loss_mask(self, image, flipped):  # no masks in the benchmark
        return None

    def encoding(self, image):
        return self.texts[image.key]


def measure(kind: str) -> list[dict]:
    import torch
    from PIL import Image

    from sdxl_lora_trainer.trainer.data.assemble import dataset_from_scan
    from sdxl_lora_trainer.trainer.data.buckets import BucketSettings
    from sdxl_lora_trainer.trainer.data.captions import CaptionOptions
    from sdxl_lora_trainer.trainer.data.sources import items_from_images
    from sdxl_lora_trainer.trainer.network.config import NetworkConfig
    from sdxl_lora_trainer.trainer.run.config import TrainConfig
    from sdxl_lora_trainer.trainer.run.session import train
    from sdxl_lora_trainer.trainer.run.tensor_memory import PeakTensorMemory

    model, ctx_dim, pooled_dim = bench_train.build_model(kind, "fp32")
    rows = []
    for res, batch, checkpointing in CASES[kind]:
        latents, texts = bench_train.make_data(2, res, ctx_dim, pooled_dim)
        images = [Image.new("RGB", (res, res), (127, 127, 127)) for _ in range(2)]
        scan = items_from_images(images, ["a", "b"])
        settings = BucketSettings(resolution=(res, res), min_bucket_reso=64, max_bucket_reso=res, bucket_reso_steps=64)
        dataset = dataset_from_scan(scan, settings, batch, CaptionOptions())
        source = Source(
            {img.key: latents[i] for i, img in enumerate(dataset.images)},
            {img.key: texts[i] for i, img in enumerate(dataset.images)},
        )

        network = NetworkConfig(network_dim=8, network_alpha=1.0, train_te1=False, train_te2=False)
        config = TrainConfig(max_train_steps=2, gradient_checkpointing=checkpointing)
        start = time.perf_counter()
        with PeakTensorMemory() as measured, torch.inference_mode():
            result = train(model, None, dataset, source, source, network, config)
        plan = result.memory_plan
        row = {
            "model": kind,
            "res": res,
            "batch": batch,
            "checkpointing": checkpointing,
            "predicted_mib": plan.besides_weights / 2**20,
            "measured_mib": measured.peak / 2**20,
            "error_pct": 100 * (plan.besides_weights / measured.peak - 1),
            "activations_mib": plan.activations / 2**20,
            "seconds": time.perf_counter() - start,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table() -> list[str]:
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    from sdxl_lora_trainer.trainer.comfyui import models as comfy_models
    from sdxl_lora_trainer.trainer.comfyui import training as comfy_training
    from sdxl_lora_trainer.trainer.network import build_network
    from sdxl_lora_trainer.trainer.network.config import NetworkConfig
    from sdxl_lora_trainer.trainer.run.config import TrainConfig
    from sdxl_lora_trainer.trainer.run.memory_plan import CUDA_CONTEXT_BYTES, StepShape
    from sdxl_lora_trainer.trainer.run.optimizers import OptimizerSettings
    from sdxl_lora_trainer.trainer.run.session import plan_memory, training_block

    meta = torch.device("meta")
    with torch.inference_mode():
        cfg = comfy.supported_models.SDXL(dict(bench_train.SDXL_UNET_CONFIG))
        cfg.set_inference_dtype(torch.bfloat16, None)
        model = cfg.get_model({}, "", device=meta)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=meta, offload_device=meta)
    lines = []
    for optimizer, checkpointing, batch in itertools.product(("AdamW", "AdamW8bit"), (True, False), (1, 2)):
        network = NetworkConfig(network_dim=16, network_alpha=8.0, train_te1=False, train_te2=False)
        config = TrainConfig(
            train_dtype="bf16", gradient_checkpointing=checkpointing, optimizer=OptimizerSettings(optimizer)
        )
        with torch.inference_mode(False), comfy_training.training_models(patcher, None, False) as models:
            models.model.load(meta, full_load=True)  # ComfyUI's load puts the weight wrappers in place
            net = build_network(models.model, None, network, config.seed)
            net.to(meta)
            unet = comfy_models.diffusion_model(models.model)
            params = [p for p in net.parameters() if p.requires_grad]
            with training_block(net, unet, [], checkpointing):
                plan = plan_memory(models, params, [unet], StepShape(1024, 1024, batch), network, config, "bf16")
        plan = replace(plan, margin=plan.margin + CUDA_CONTEXT_BYTES)  # planned on meta, for a CUDA GPU
        lines += plan.lines()
        print("\n".join(plan.lines()), flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["measure", "table"])
    ap.add_argument("--model", choices=list(CASES), default="tiny")
    args = ap.parse_args(argv)
    bench_train._setup_imports()
    out = bench_train.OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "measure":
        rows = measure(args.model)
        (out / f"memory_plan_{args.model}.json").write_text(json.dumps(rows, indent=1))
    else:
        (out / "memory_plan_sdxl.txt").write_text("\n".join(table()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
