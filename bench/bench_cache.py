"""Benchmark of the latent / text-encoder caches (trainer/cache/latents.py, trainer/cache/text.py).

Measures, on the tiny SDXL's VAE and CLIP (ComfyUI's own classes) on CPU:
* VAE encode throughput (images/s, bucketing + encode + store) at batch size 1 vs N;
* a re-run served from the memory store (the cost is reading + hashing the image files);
* a "restart": a fresh memory store loading every item from the disk cache (items/s, MB/s);
* text encodes per second and the text disk-load rate;
* weight fingerprint cost: the tiny models, and synthetic tensors the size of SDXL's VAE (84M
  params, fp32) and text encoders (817M params, fp16, with --big), first call vs memoised.

Usage: .venv/bin/python bench/bench_cache.py [--images 32] [--size 256] [--batch 8] [--big]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "devkit"))
import package_path  # noqa: E402

package_path.register()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from comfy_host import import_comfy  # noqa: E402
from PIL import Image  # noqa: E402

import_comfy()

import tiny_sdxl  # noqa: E402

from sdxl_lora_trainer.trainer.cache import fingerprints
from sdxl_lora_trainer.trainer.cache.latents import LatentCache, vae_fingerprint
from sdxl_lora_trainer.trainer.cache.stores import ENCODER_CALLS, MemoryStore
from sdxl_lora_trainer.trainer.cache.text import TextCache, clip_fingerprint
from sdxl_lora_trainer.trainer.data.buckets import BucketSettings
from sdxl_lora_trainer.trainer.data.captions import CaptionOptions
from sdxl_lora_trainer.trainer.data.dataset import bucket_images, training_dataset
from sdxl_lora_trainer.trainer.data.sources import scan_folder


def make_dataset(root: Path, n: int, size: int):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i:04d}.png")
        (root / f"{i:04d}.txt").write_text(f"photo {i}, " + ", ".join(f"tag{j}" for j in range(i % 7 + 3)))
    scan = scan_folder(root)
    settings = BucketSettings(resolution=(size, size), min_bucket_reso=64, max_bucket_reso=max(size, 256))
    part = bucket_images(scan, settings, 1, CaptionOptions())
    return training_dataset([part], [scan])


REPEAT = 1


def timed(fn):
    """(result, best wall time of REPEAT runs): the machine may be shared, the minimum is the least noisy."""
    best = float("inf")
    for _ in range(REPEAT):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def fresh_fingerprint_time(fn) -> float:
    """Best time of a fingerprint computed from scratch (memo cleared before each run)."""
    best = float("inf")
    for _ in range(REPEAT):
        fingerprints.clear_fingerprint_memo()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _time_module_fingerprint(numel: int, dtype: torch.dtype) -> tuple[float, float]:
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.empty(numel, dtype=dtype).uniform_(), requires_grad=False)

    def fingerprint() -> str:
        return fingerprints.module_fingerprint(module, lambda: list(module.state_dict().items()))

    first = fresh_fingerprint_time(fingerprint)
    _, memo = timed(fingerprint)
    return first, memo


def fingerprint_rows(big: bool) -> list[tuple[str, float, float]]:
    rows = []
    for name, numel, dtype in [("synthetic SDXL VAE (84M fp32)", 83_653_863, torch.float32)] + (
        [("synthetic SDXL TEs (817M fp16)", 817_000_000, torch.float16)] if big else []
    ):
        rows.append((name, *_time_module_fingerprint(numel, dtype)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--big", action="store_true", help="also fingerprint an SDXL-text-encoder-sized tensor (1.6 GB)")
    ap.add_argument("--repeat", type=int, default=3, help="report the best of this many runs of each measurement")
    args = ap.parse_args()
    global REPEAT
    REPEAT = max(1, args.repeat)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    clip, vae = tiny_sdxl.make_clip(1), tiny_sdxl.make_vae(2)

    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds = make_dataset(tmp / "data", args.images, args.size)
        n = len(ds.images)
        # warm up (first conv calls allocate)
        LatentCache.build(ds, vae, batch_size=1, store=MemoryStore(64))
        for bs in (1, args.batch):
            calls = ENCODER_CALLS["vae"]
            cache, dt = timed(lambda bs=bs: LatentCache.build(ds, vae, batch_size=bs, store=MemoryStore(1024)))
            per_run = (ENCODER_CALLS["vae"] - calls) // REPEAT
            rows.append(
                (
                    f"VAE encode, batch {bs}",
                    f"{n / dt:8.1f} images/s  ({per_run} calls, {args.size}x{args.size}, {cache.size_mb:.2f} MB)",
                )
            )
        store = MemoryStore(1024)
        LatentCache.build(ds, vae, batch_size=args.batch, store=store)
        calls = ENCODER_CALLS["vae"]
        _, dt = timed(lambda: LatentCache.build(ds, vae, store=store))
        per_run = (ENCODER_CALLS["vae"] - calls) // REPEAT
        rows.append(("latents from memory (re-run)", f"{n / dt:8.1f} images/s  ({per_run} calls)"))

        disk = str(tmp / "latents")
        LatentCache.build(ds, vae, batch_size=args.batch, disk_dir=disk, store=MemoryStore(1024))
        calls = ENCODER_CALLS["vae"]
        cache, dt = timed(lambda: LatentCache.build(ds, vae, disk_dir=disk, store=MemoryStore(1024)))
        mb = cache.disk_size_mb()
        rows.append(
            (
                "latents from disk (restart)",
                f"{n / dt:8.1f} items/s, {mb / dt:6.1f} MB/s  "
                f"({(ENCODER_CALLS['vae'] - calls) // REPEAT} calls, {mb:.2f} MB files)",
            )
        )

        TextCache.build(ds, clip, store=MemoryStore(64))  # warm up
        calls = ENCODER_CALLS["clip"]
        text, dt = timed(lambda: TextCache.build(ds, clip, store=MemoryStore(1024)))
        per_run = (ENCODER_CALLS["clip"] - calls) // REPEAT
        rows.append(("CLIP encode", f"{text.stats.encoded / dt:8.1f} captions/s  ({per_run} calls)"))
        tdisk = str(tmp / "text")
        TextCache.build(ds, clip, disk_dir=tdisk, store=MemoryStore(1024))
        text, dt = timed(lambda: TextCache.build(ds, clip, disk_dir=tdisk, store=MemoryStore(1024)))
        mb = text.disk_size_mb()
        rows.append(("text from disk (restart)", f"{text.stats.from_disk / dt:8.1f} items/s, {mb / dt:6.1f} MB/s"))

    first = fresh_fingerprint_time(lambda: vae_fingerprint(vae))
    _, memo = timed(lambda: vae_fingerprint(vae))
    rows.append(("fingerprint tiny VAE (0.37M)", f"first {first * 1e3:7.1f} ms, memoised {memo * 1e3:6.2f} ms"))
    first = fresh_fingerprint_time(lambda: clip_fingerprint(clip))
    _, memo = timed(lambda: clip_fingerprint(clip))
    rows.append(("fingerprint tiny CLIP", f"first {first * 1e3:7.1f} ms, memoised {memo * 1e3:6.2f} ms"))
    for name, first, memo in fingerprint_rows(args.big):
        rows.append((f"fingerprint {name}", f"first {first * 1e3:7.1f} ms, memoised {memo * 1e3:6.3f} ms"))

    width = max(len(r[0]) for r in rows)
    print(
        f"cache benchmark: {args.images} images, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"hash {fingerprints.HASH_NAME}, CPU"
    )
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
