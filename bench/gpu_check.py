"""One command for the day a GPU is available: the real node path on CUDA, in every ComfyUI memory mode.

    .venv/bin/python bench/gpu_check.py                 # all runs below, ~5 min on one modern GPU
    .venv/bin/python bench/gpu_check.py --runs dynamic,legacy --steps 10
    .venv/bin/python bench/gpu_check.py --smoke         # the same plumbing on the CPU with the tiny test model

What runs. Once, a random full-size SDXL checkpoint (U-Net 2.57 B parameters, both CLIPs, VAE; fp16; seeded) is
written with ComfyUI's own ``comfy.sd.save_checkpoint`` (to ``--work-dir``, reused by later calls). Then for each
run a headless ComfyUI server is started with that run's command-line flags, and one graph is queued through
``POST /prompt``: Load Checkpoint -> Images from Folder (4 generated 1024x1024 images) -> Buckets & Captions ->
Cache Latents + Cache Text -> Network (rank 16) -> Sample Previews (every 10 steps) -> Train (20 steps, batch 1,
train_dtype auto = bf16 on Ampere and newer, gradient checkpointing, AdamW).

| run | ComfyUI flags | what it checks |
|---|---|---|
| dynamic | (none: DynamicVRAM, ComfyUI's default on NVIDIA) | training through the non-dynamic delegate |
| legacy | --disable-dynamic-vram | the plain ModelPatcher, ComfyUI decides what fits |
| lowvram_6gb | --disable-dynamic-vram --lowvram --reserve-vram <all but 6 GB> | weights streamed per layer |
| highvram | --highvram | weights stay on the GPU |
| gpu_only | --gpu-only | encoders and their outputs on the GPU too |
| text_encoders | --disable-dynamic-vram, CLIP-L and CLIP-G trained | text-encoder training, live encodes |
| sage | --use-sage-attention (only when sageattention imports) | the attention swap for training |
| adamw8bit | --disable-dynamic-vram, AdamW8bit (only when bitsandbytes imports) | 8-bit optimizer states |

Printed per run: pass/fail, s/it (median of the steps after the first, from the run's CSV log), the peak GPU
memory the train node reports (torch's max allocated / reserved in the server process), the memory plan's predicted
peak from the same report (trainer/run/memory_plan.py; it includes a stated margin for the CUDA context, so it
should sit a little above "allocated") and the error, if any.
Writes ``bench/out/gpu_check.json``. Without CUDA (and without ``--smoke``) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3
RUNS = ("dynamic", "legacy", "lowvram_6gb", "highvram", "gpu_only", "text_encoders", "sage", "adamw8bit")
CHECKPOINT = "random_sdxl_fp16.safetensors"
SDXL_VAE_CONFIG = {
    "params": {
        "embed_dim": 4,
        "ddconfig": {
            "double_z": True,
            "z_channels": 4,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 128,
            "ch_mult": [1, 2, 4, 4],
            "num_res_blocks": 2,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    }
}


def _setup_imports() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT / "devkit"))
    import package_path

    package_path.register()


# -- the random checkpoint --------------------------------------------------------------------------------------


def write_random_sdxl(path: Path, seed: int = 0) -> None:
    """A full-size SDXL checkpoint with seeded random weights, written by ComfyUI's save_checkpoint."""
    import torch
    from comfy_host import import_comfy

    import_comfy()
    import comfy.model_patcher
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base
    from bench_train import SDXL_UNET_CONFIG, fill_weights

    cpu = torch.device("cpu")
    with torch.inference_mode():
        cfg = comfy.supported_models.SDXL(dict(SDXL_UNET_CONFIG))
        cfg.set_inference_dtype(torch.float16, None)
        model = cfg.get_model({}, "", device=cpu)
        fill_weights(model.diffusion_model, seed)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
        clip = comfy.sd.CLIP(
            target,
            model_options={"dtype": torch.float16, "load_device": cpu, "offload_device": cpu, "initial_device": cpu},
        )
        fill_weights(clip.cond_stage_model, seed + 1)
        from comfy.ldm.models.autoencoder import AutoencoderKL

        vae_module = AutoencoderKL(**SDXL_VAE_CONFIG["params"])
        fill_weights(vae_module, seed + 2)
        vae = comfy.sd.VAE(sd=vae_module.state_dict(), config=SDXL_VAE_CONFIG, device=cpu, dtype=torch.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        comfy.sd.save_checkpoint(str(tmp), patcher, clip, vae)
        os.replace(tmp, path)


# -- one run --------------------------------------------------------------------------------------------------


def flags_for(run: str, total_vram_gib: float) -> list[str]:
    return {
        "dynamic": [],
        "legacy": ["--disable-dynamic-vram"],
        "lowvram_6gb": ["--disable-dynamic-vram", "--lowvram", "--reserve-vram", f"{max(0.0, total_vram_gib - 6):.1f}"],
        "highvram": ["--highvram"],
        "gpu_only": ["--gpu-only"],
        "text_encoders": ["--disable-dynamic-vram"],
        "sage": ["--use-sage-attention"],
        "adamw8bit": ["--disable-dynamic-vram"],
    }[run]


def make_images(folder: Path, n: int, size: int) -> None:
    """N seeded noise-block images with captions (a kohya folder with 1 repeat)."""
    import numpy as np
    from PIL import Image

    sub = folder / "1_check"
    sub.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        blocks = rng.integers(0, 256, (size // 64, size // 64, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((size, size), Image.NEAREST).save(sub / f"img{i}.png")
        (sub / f"img{i}.txt").write_text(f"check image {i}, colored blocks")


def prompt_for(run: str, folder: str, steps: int, res: int, smoke: bool) -> dict[str, Any]:
    from example_prompts import train_then_test, training_only, with_run_options

    prompt = train_then_test(
        folder,
        steps=steps,
        seed=1,
        checkpoint=None if smoke else CHECKPOINT,
        resolution=res,
        lr=1e-4,
        output_name=f"gpu_check_{run}",
    )
    prompt = training_only(
        with_run_options(
            prompt,
            previews={
                "every_n_steps": max(1, steps // 2),
                "width": min(res, 512),
                "height": min(res, 512),
                "steps": 4,
                "prompts": "check image 0, colored blocks",
            },
        )
    )
    train = prompt["7"]["inputs"]
    train["train_dtype"] = "fp32" if smoke else "auto"
    prompt["6"]["inputs"].update(network_dim=16, network_alpha=16.0)
    if run == "text_encoders":
        prompt["6"]["inputs"].update(train_clip_l=True, train_clip_g=True)
    if run == "adamw8bit":
        train["optimizer"] = "AdamW8bit"
    prompt["3"]["inputs"].update(min_bucket_reso=min(256, res), max_bucket_reso=2 * res, bucket_reso_steps=64)
    return prompt


def run_one(run: str, args: argparse.Namespace, total_vram_gib: float) -> dict[str, Any]:
    from comfy_server import ComfyServer, execution_error

    out: dict[str, Any] = {"run": run, "flags": [] if args.smoke else flags_for(run, total_vram_gib)}
    base = Path(args.work_dir) / f"base_{run}"
    with ComfyServer(base_dir=base, cpu=args.smoke, with_test_nodes=args.smoke, extra_args=out["flags"]) as server:
        if not args.smoke:
            link = server.base / "models" / "checkpoints" / CHECKPOINT
            if not link.exists():
                link.symlink_to(Path(args.work_dir) / CHECKPOINT)
        make_images(server.base / "input" / "gpu_check", 4, args.res)
        started = time.time()
        entry = server.run(prompt_for(run, "gpu_check", args.steps, args.res, args.smoke), timeout=args.timeout)
        out["wall_s"] = round(time.time() - started, 1)
        error = execution_error(entry)
        if error:
            out.update(ok=False, error=error.strip().splitlines()[-1][:300])
            return out
        report = "\n".join(entry.get("outputs", {}).get("7", {}).get("text", []))
        out.update(ok=True, report=report)
        saved = re.search(r"^saved (.+\.safetensors)$", report, re.M)
        if saved:
            out["s_per_it"] = median_step_seconds(Path(saved.group(1)).with_suffix(".log.csv"))
        peak = re.search(r"peak GPU memory: ([\d.]+) GiB allocated, ([\d.]+) GiB reserved", report)
        if peak:
            out["peak_allocated_gib"], out["peak_reserved_gib"] = float(peak.group(1)), float(peak.group(2))
        planned = re.search(r"memory plan \(.*?\): ([\d.]+) GB peak", report)
        if planned:  # the plan's GB are GiB (2**30), as torch's figures
            out["planned_gib"] = float(planned.group(1))
    return out


def median_step_seconds(csv_path: Path) -> float | None:
    """The median per-step seconds of the run's CSV log, first step left out (it includes the setup)."""
    if not csv_path.is_file():
        return None
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    seconds = [float(r["seconds"]) for r in rows[1:] if r.get("seconds")]
    return round(statistics.median(seconds), 3) if seconds else None


def skip_reason(run: str, smoke: bool) -> str | None:
    if smoke:
        return None if run == "legacy" else "smoke runs one mode"
    if run == "sage":
        try:
            import sageattention  # noqa: F401
        except ImportError:
            return "sageattention is not installed"
    if run == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "bitsandbytes is not installed"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--work-dir", default="/tmp/sdxl_lora_gpu_check", help="checkpoint and server folders")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny test model, one mode: checks the plumbing")
    args = ap.parse_args(argv)
    _setup_imports()
    import torch

    if args.smoke:
        args.steps, args.res = min(args.steps, 2), 64
        total_vram_gib = 0.0
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (run it on a machine with an NVIDIA GPU).")
        return 0
    else:
        total_vram_gib = torch.cuda.get_device_properties(0).total_memory / GIB
        ckpt = Path(args.work_dir) / CHECKPOINT
        if not ckpt.is_file():
            print(f"writing a random full-size SDXL checkpoint to {ckpt} ...", flush=True)
            t0 = time.time()
            write_random_sdxl(ckpt)
            print(f"  done in {time.time() - t0:.0f} s ({ckpt.stat().st_size / GIB:.1f} GiB)", flush=True)
    results = []
    for run in [r.strip() for r in args.runs.split(",") if r.strip()]:
        if run not in RUNS:
            raise SystemExit(f"unknown run {run!r}; choose from {', '.join(RUNS)}")
        reason = skip_reason(run, args.smoke)
        if reason:
            results.append({"run": run, "ok": None, "skipped": reason})
            continue
        print(
            f"{run}: starting ComfyUI {' '.join(flags_for(run, total_vram_gib)) if not args.smoke else '--cpu'} ...",
            flush=True,
        )
        results.append(run_one(run, args, total_vram_gib))
        print(f"  {summary_line(results[-1])}", flush=True)
    print("\n" + table(results))
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / ("gpu_check_smoke.json" if args.smoke else "gpu_check.json")).write_text(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                "steps": args.steps,
                "res": args.res,
                "results": results,
                "date": time.strftime("%Y-%m-%d %H:%M"),
            },
            indent=1,
        )
    )
    return 0 if all(r.get("ok") is not False for r in results) else 1


def summary_line(r: dict[str, Any]) -> str:
    if r.get("skipped"):
        return f"skipped ({r['skipped']})"
    if not r.get("ok"):
        return f"FAIL: {r.get('error')}"
    s = r.get("s_per_it")
    peak = r.get("peak_allocated_gib")
    return (
        f"pass  {s if s is not None else '?'} s/it  peak "
        f"{f'{peak:.2f} GiB' if peak is not None else 'n/a'}  ({r.get('wall_s')} s)"
    )


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| run | result | s/it | peak allocated GiB | peak reserved GiB | memory plan GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        result = (
            "skipped: " + r["skipped"]
            if r.get("skipped")
            else ("pass" if r.get("ok") else "FAIL: " + str(r.get("error")))
        )
        fmt = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)  # noqa: E731
        rows.append(
            f"| {r['run']} | {result} | {fmt(r.get('s_per_it'))} | {fmt(r.get('peak_allocated_gib'))} | "
            f"{fmt(r.get('peak_reserved_gib'))} | {fmt(r.get('planned_gib'))} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
