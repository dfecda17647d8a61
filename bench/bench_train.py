"""Benchmark of a LoRA training step: this pack's trainer vs ComfyUI's built-in TrainLoraNode and kohya sd-scripts.

kohya's ``sdxl_train_network.py`` is the third trainer (``--trainers ours,kohya,builtin``): see bench/kohya_trainer.py.

Not a test (CI never runs it). Each trainer runs in its own subprocess whose address space is capped
with RLIMIT_AS (--mem-cap-gib, default 22), so running out of memory is a MemoryError / allocator error
inside that process, never the kernel OOM killer on a shared machine.

Models, both built like ComfyUI's loaders build them (under ``torch.inference_mode()``, so the frozen
weights are inference tensors), wrapped in a ModelPatcher, on the CPU:

* ``--model tiny``: devkit/tiny_sdxl.py (SDXL block layout, tiny widths).
* ``--model mid``: SDXL's widths with 1 / 2 transformer blocks per level instead of 2 / 10 (849 M
  parameters): real layer sizes, and small enough for the built-in node's second copy to fit in memory.
* ``--model full``: a full-size SDXL U-Net (2.57 B parameters) with seeded random weights, built through
  ``comfy.supported_models.SDXL`` with the unet_config that comfy/model_detection.py detects for SDXL.
  No checkpoint is written or read; no CLIP/VAE is built.

Data: N random "images" (unscaled latents [4, H/8, W/8]) with random text encodings (context [77, 2048],
pooled [1280]; the tiny model's widths for --model tiny), fed to our trainer through dict-backed
LatentSource / TextSource objects (trainer/run/batch_loader.py), and to TrainLoraNode as the LATENT and
CONDITIONING it takes from VAEEncode / CLIPTextEncode.

Measured for ours (trainer/run/session.train, network_dim 8, alpha 1, U-Net only, AdamW,
gradient checkpointing on):
* s/step: median of the optimizer steps after the first (timed between on_step calls, so the bare
  passes below are not counted; the first step includes train()'s setup);
* peak RSS: ru_maxrss of the process, plus the peak sampled (psutil, 20 ms) while training, and the
  RSS right before training (i.e. model + data);
* step / fwd+bwd: the median step time over the median time of a bare U-Net forward + backward on a
  batch of the same shape, run inside the same training context (same LoRA hooks, weight functions,
  checkpointing, attention) from ``on_step`` between optimizer steps (interleaved, so both see the same
  machine load; excluded from the step times), with no noise draw, loss weighting, clipping or optimizer.

Measured for the built-in node (TrainLoraNode.execute called directly under inference mode, rank 8,
"LoRA" fp32 adapters, AdamW, MSE, batch 1, gradient checkpointing at its default checkpoint_depth 1 (which
wraps the whole UNetModel in one checkpoint; --builtin-checkpoint-depth 2 = ResBlock / SpatialTransformer
level; ours and kohya checkpoint each ResBlock and transformer block), no offloading):
* s/step: the intervals between its progress-bar updates (one per step), median after the first;
* peak RSS as above, or how it failed (out of memory: where and at what RSS);
* step / fwd+bwd: the step over the time spent in TrainSampler.fwd_bwd (its forward + loss + backward;
  the built-in has no separate "bare" pass, so this is the share of its own step that is U-Net work).

Usage:
    .venv/bin/python bench/bench_train.py --model tiny --steps 20 --res 128 --dtype fp32   # ~30 s
    .venv/bin/python bench/bench_train.py --model mid --steps 3 --res 512 --dtype fp32     # ~5 min, ~17 GiB peak
    .venv/bin/python bench/bench_train.py --model full --steps 3 --res 512 --dtype fp32    # ~11 min, ~17 GiB peak
    .venv/bin/python bench/bench_train.py --model tiny --steps 8 --bare-reps 1 --optimizers AdamW,CAME,ADOPT
Options: --only ours|builtin, --algo lora|loha|lokr|dora or a list such as lora,dora (ours once per algorithm,
side by side), --optimizers A,B,... (ours once per optimizer, side by side), --builtin-checkpoint-depth D,
--images N, --batch N, --bare-reps N, --threads N (default 1), --mem-cap-gib G (default 22), --name NAME.
See bench/README.md for measured figures.
Writes bench/out/<name>.json (default name: train_<model>_<dtype>_<res>).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from heap import describe as describe_heap
from heap import heap_counters
from op_profile import StepProfiler, table_path
from op_profile import compare as compare_profiles

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"
GIB = 1024**3

# comfy/model_detection.py: the unet_config ComfyUI detects for an SDXL base checkpoint (dtype set below)
SDXL_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# --model mid: SDXL's widths, heads and context, with 1/2 transformer blocks per level instead of 2/10
# (849 M parameters, 3.2 GiB in fp32): small enough that the built-in node's second copy fits in memory.
MID_UNET_CONFIG = dict(
    SDXL_UNET_CONFIG,
    transformer_depth=[0, 0, 1, 1, 2, 2],
    transformer_depth_middle=2,
    transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2],
)


# ---------------------------------------------------------------------------------------------------
# worker side (runs in the capped subprocess)
# ---------------------------------------------------------------------------------------------------


def _setup_imports() -> None:
    sys.path.insert(0, str(ROOT / "devkit"))
    import package_path

    package_path.register()
    from comfy_host import import_comfy

    import_comfy()


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def proc_status() -> dict:
    """VmPeak / VmSize (address space, what RLIMIT_AS limits) and VmHWM / VmRSS of this process, in GiB."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmPeak", "VmSize", "VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024 / GIB
    except OSError:
        pass
    return out


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class RssSampler:
    """Peak RSS of this process, sampled every ``interval`` s between start() and stop()."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return self.peak


def fill_weights(module, seed: int) -> None:
    """devkit/tiny_sdxl.init_weights' distributions (Linear/Conv: U(+-1/sqrt(fan_in)), norms 1/0, the rest
    N(0, 0.02)), each parameter written once and generated in float32 whatever its dtype (less work and
    fewer temporaries than init_weights on 2.6 B parameters)."""
    import math

    import torch

    gen = torch.Generator().manual_seed(seed)
    done: set[int] = set()
    with torch.no_grad():
        for m in module.modules():
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                bound = 1.0 / math.sqrt(w[0].numel())
                for p in (w, b):
                    if p is not None:
                        p.copy_(torch.rand(p.shape, generator=gen).mul_(2 * bound).sub_(bound))
                        done.add(id(p))
            elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                for p, v in ((w, 1.0), (b, 0.0)):
                    if p is not None:
                        p.fill_(v)
                        done.add(id(p))
        for p in module.parameters():
            if id(p) not in done:
                p.copy_(torch.randn(p.shape, generator=gen).mul_(0.02))


def build_model(kind: str, dtype_name: str, seed: int = 0):
    """(MODEL, context width, pooled width): a ModelPatcher over model_base.SDXL, built under inference mode."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    with torch.inference_mode():
        if kind == "tiny":
            import tiny_sdxl

            cfg = tiny_sdxl.TinySDXLConfig(dict(tiny_sdxl.UNET_CONFIG))
            ctx_dim, pooled_dim = tiny_sdxl.CONTEXT_DIM, tiny_sdxl.POOLED_DIM
        else:
            cfg = comfy.supported_models.SDXL(dict(SDXL_UNET_CONFIG if kind == "full" else MID_UNET_CONFIG))
            ctx_dim, pooled_dim = 2048, 1280
        cfg.set_inference_dtype(dtype, None)
        model = cfg.get_model({}, "", device=torch.device("cpu"))
        fill_weights(model.diffusion_model, seed)
        model.eval()
        patcher = comfy.model_patcher.ModelPatcher(
            model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
        )
    return patcher, ctx_dim, pooled_dim


def rebuild_model(kind: str, dtype_name: str, seed: int, disable_dynamic: bool = False):
    """cached_patcher_init factory (the signature ComfyUI calls it with): a fresh copy of the same MODEL."""
    return build_model(kind, dtype_name, seed)[0]


def make_data(n: int, res: int, ctx_dim: int, pooled_dim: int, seed: int = 1):
    """N random unscaled latents [4, res/8, res/8] and text encodings ([77, ctx], [pooled]), made under
    inference mode like VAEEncode / CLIPTextEncode outputs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        latents = [torch.randn((4, res // 8, res // 8), generator=gen) / 0.13025 for _ in range(n)]
        texts = [
            (torch.randn((77, ctx_dim), generator=gen), torch.randn((pooled_dim,), generator=gen)) for _ in range(n)
        ]
    return latents, texts


#: optimizers that estimate their step size: run at learning rate 1.0 (what they expect)
LEARNING_RATE_FREE = ("Prodigy", "ProdigyPlusScheduleFree", "DAdaptAdam")


def worker_ours(args, result: dict) -> None:
    import torch
    from PIL import Image

    from sdxl_lora_trainer.trainer.comfyui import models as comfy_models
    from sdxl_lora_trainer.trainer.data.assemble import dataset_from_scan
    from sdxl_lora_trainer.trainer.data.buckets import BucketSettings
    from sdxl_lora_trainer.trainer.data.captions import CaptionOptions
    from sdxl_lora_trainer.trainer.data.sources import items_from_images
    from sdxl_lora_trainer.trainer.data.token_length import TokenLength
    from sdxl_lora_trainer.trainer.network.config import NetworkConfig
    from sdxl_lora_trainer.trainer.run.config import DTYPES, TrainConfig
    from sdxl_lora_trainer.trainer.run.events import RunEvents
    from sdxl_lora_trainer.trainer.run.optimizers import OptimizerSettings
    from sdxl_lora_trainer.trainer.run.session import train

    if args.keep_freed_heap:  # the A/B of trainer/run/host_memory.py: glibc keeps what each step freed
        from sdxl_lora_trainer.trainer.run import session as run_session

        run_session.release_freed_memory = lambda: False
    t0 = time.perf_counter()
    model, ctx_dim, pooled_dim = build_model(args.model, args.dtype)
    result["build_s"] = time.perf_counter() - t0
    result["unet_params"] = sum(p.numel() for p in comfy_models.diffusion_model(model).parameters())
    result["rss_after_build_gib"] = rss_bytes() / GIB
    result["status_after_build"] = proc_status()
    latents, texts = make_data(args.images, args.res, ctx_dim, pooled_dim)

    images = [Image.new("RGB", (args.res, args.res), (127, 127, 127)) for _ in range(args.images)]
    scan = items_from_images(images, [f"image {i}" for i in range(args.images)])
    settings = BucketSettings(
        resolution=(args.res, args.res), min_bucket_reso=64, max_bucket_reso=max(args.res, 256), bucket_reso_steps=64
    )
    dataset = dataset_from_scan(scan, settings, args.batch, CaptionOptions())

    class Latents:  # trainer/run/batch_loader.LatentSource
        def __init__(self) -> None:
            self.table = {img.key: latents[i] for i, img in enumerate(dataset.images)}

        def latent(self, image, flipped):  # image: a BucketedImage (older protocol: its key)
            return self.table[getattr(image, "key", image)]

        def loss_mask(self, image, flipped):  # no masks in the benchmark
            return None

    class Text:  # trainer/run/batch_loader.TextSource
        token_length = TokenLength()  # kohya's default layout: one 77-token row, as the random encodings are

        def __init__(self) -> None:
            self.table = {img.key: texts[i] for i, img in enumerate(dataset.images)}

        def encoding(self, image):
            return self.table[getattr(image, "key", image)]

    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(123)
    b, h = args.batch, args.res // 8
    bare_inputs = (
        torch.randn((b, 4, h, h), generator=gen),
        torch.randint(0, 1000, (b,), generator=gen),
        torch.randn((b, 77, ctx_dim), generator=gen),
        torch.randn((b, pooled_dim + 1536), generator=gen),
    )
    bare: list[float] = []
    optimizer_s: list[float] = []
    marks: list[tuple[float, float]] = []  # (entered, left) on_step: a step is left[i-1] -> entered[i]

    def bare_fwd_bwd(res) -> float:
        """A bare U-Net forward + backward, inside train()'s context (the same LoRA hooks, checkpointing,
        trainable weights, attention): what a step costs without the trainer around it."""
        params = [p for p in res.network.parameters() if p.requires_grad]
        start = time.perf_counter()
        out = comfy_models.unet_forward(res.models.model, *bare_inputs, dtype)
        out.square().mean().backward()
        for p in params:
            p.grad = None  # the loop zeroed them before on_step; leave them as they were
        return time.perf_counter() - start

    class StepTimer(RunEvents):
        """Times each step from the outside and runs the bare pass between steps."""

        def training_started(self, run) -> None:
            self.run = run
            step = run.optimizer.step
            if args.compile_blocks:  # the regional torch.compile trial (bench/README.md): every transformer block
                unet = comfy_models.diffusion_model(run.models.model)
                blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
                for m in blocks:
                    m.compile()
                result["compiled_blocks"] = len(blocks)

            def timed_step(*a, **k):  # the optimizer's own share of a step (optimizers compared side by side)
                start = time.perf_counter()
                out = step(*a, **k)
                optimizer_s.append(time.perf_counter() - start)
                return out

            run.optimizer.step = timed_step

        def step_finished(self, record) -> None:
            on_step(record, self.run.total_steps, self.run)

    profiler = StepProfiler()
    heap: list[dict | None] = []  # malloc's live / kept-free bytes after each step (bench/heap.py)

    def on_step(record, total, res):
        entered = time.perf_counter()
        if profiler.running:
            profiler.stop(profile_path(args, "ours"))
        step_s = entered - (marks[-1][1] if marks else t0)
        heap.append(heap_counters())
        msg = (
            f"  ours step {record.step}/{total}: {step_s:.3f} s, loss {record.loss:.4f}, "
            f"rss {rss_bytes() / GIB:.2f} GiB, {describe_heap(heap[-1])}"
        )
        if record.step < total and len(bare) < args.bare_reps:  # interleaved, so both see the same machine load
            bare.append(bare_fwd_bwd(res))
            msg += f"; bare fwd+bwd {bare[-1]:.3f} s"
        print(msg, flush=True)
        if args.profile_step and record.step + 1 == args.profile_step:
            profiler.start()
        marks.append((entered, time.perf_counter()))

    network = NetworkConfig(
        network_dim=8, network_alpha=1.0, train_unet=True, train_te1=False, train_te2=False, algo=args.algo
    )
    config = TrainConfig(
        max_train_steps=args.steps,
        learning_rate=1.0 if args.optimizer in LEARNING_RATE_FREE else 1e-4,
        optimizer=OptimizerSettings(args.optimizer),
        train_dtype=args.dtype,
        gradient_checkpointing=True,
        seed=42,
    )
    result["optimizer"] = args.optimizer
    result["rss_before_train_gib"] = rss_bytes() / GIB
    sampler = RssSampler().start()
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():  # ComfyUI runs every node under inference mode
            res = train(model, None, dataset, Latents(), Text(), network, config, events=StepTimer())
    finally:
        result["train_peak_rss_gib"] = sampler.stop() / GIB
        result["train_wall_s"] = time.perf_counter() - t0
    # step i = from the end of on_step(i-1) (or train() entry: setup included) to the start of on_step(i)
    result["step_s"] = [e - (marks[i - 1][1] if i else t0) for i, (e, _) in enumerate(marks)]
    result["loop_step_s"] = [r.seconds for r in res.state.history]  # the loop's own (includes on_step time)
    result["lora_params"] = sum(p.numel() for p in res.network.parameters())
    result["lora_modules"] = len(res.network.state_dict_kohya()) // 3
    result["bare_fwd_bwd_s"] = bare
    result["heap_after_step_gib"] = heap
    result["optimizer_step_s"] = optimizer_s
    result["losses"] = [r.loss for r in res.state.history]


def worker_builtin(args, result: dict) -> None:
    import comfy.model_management as mm
    import comfy.utils
    import torch
    from comfy_extras import nodes_train

    t0 = time.perf_counter()
    model, ctx_dim, pooled_dim = build_model(args.model, args.dtype)
    result["build_s"] = time.perf_counter() - t0
    result["unet_params"] = sum(p.numel() for p in model.model.diffusion_model.parameters())
    result["rss_after_build_gib"] = rss_bytes() / GIB
    result["status_after_build"] = proc_status()
    latents, texts = make_data(args.images, args.res, ctx_dim, pooled_dim)
    # This ComfyUI's ModelPatcher.clone(force_deepcopy=True), which TrainLoraNode calls, does not deep-copy: it
    # rebuilds the model with the loader that made it (cached_patcher_init; for CheckpointLoaderSimple that is
    # load_checkpoint_guess_config re-reading the file). Register the builder of this random model as that loader,
    # so the node gets its second, independent copy of the U-Net exactly as it would from a checkpoint.
    model.cached_patcher_init = (rebuild_model, (args.model, args.dtype, 0))
    with torch.inference_mode():
        latent = {"samples": torch.stack(latents)}  # one LATENT batch [N, 4, h, w], as VAEEncode gives
        positive = [[ctx[None], {"pooled_output": pooled[None]}] for ctx, pooled in texts]  # one cond per image

    marks: list[float] = []
    fwd_bwd: list[float] = []

    class TimingBar(nodes_train.ProgressBar):  # TrainSampler.sample updates it once per step
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            marks.append(time.perf_counter())

        def update(self, value):
            marks.append(time.perf_counter())
            print(
                f"  built-in step {len(marks) - 1}: {marks[-1] - marks[-2]:.3f} s, rss {rss_bytes() / GIB:.2f} GiB",
                flush=True,
            )
            super().update(value)

    original_fwd_bwd = nodes_train.TrainSampler.fwd_bwd

    def timed_fwd_bwd(self, *a, **k):
        start = time.perf_counter()
        out = original_fwd_bwd(self, *a, **k)
        fwd_bwd.append(time.perf_counter() - start)
        return out

    comfy.utils.set_progress_bar_enabled(False)  # its tqdm bar; the ComfyUI ProgressBar (timed) stays
    nodes_train.ProgressBar = TimingBar
    nodes_train.TrainSampler.fwd_bwd = timed_fwd_bwd
    inputs = {  # is_input_list=True: every input is a list
        "model": [model],
        "latents": [latent],
        "positive": [positive],
        "batch_size": [args.batch],
        "grad_accumulation_steps": [1],
        "steps": [args.steps],
        "learning_rate": [1e-4],
        "rank": [8],
        "optimizer": ["AdamW"],
        "loss_function": ["MSE"],
        "seed": [0],
        "training_dtype": [args.dtype],
        "lora_dtype": ["fp32"],
        "quantized_backward": [False],
        "algorithm": ["LoRA"],
        "gradient_checkpointing": [True],
        "checkpoint_depth": [args.builtin_checkpoint_depth],
        "offloading": [False],
        "existing_lora": ["[None]"],
        "bucket_mode": [False],
        "bypass_mode": [False],
    }
    result["rss_before_train_gib"] = rss_bytes() / GIB
    sampler = RssSampler().start()
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():  # as ComfyUI's executor calls a node
            out = nodes_train.TrainLoraNode.execute(**inputs)
    finally:
        result["train_peak_rss_gib"] = sampler.stop() / GIB
        result["train_wall_s"] = time.perf_counter() - t0
        result["step_s"] = [b - a for a, b in itertools.pairwise(marks)]
        result["fwd_bwd_s"] = fwd_bwd
        mm.in_training = False
    lora_sd, loss_map, _ = out.result if hasattr(out, "result") else out
    result["lora_params"] = sum(v.numel() for v in lora_sd.values())
    result["lora_tensors"] = len(lora_sd)
    result["losses"] = list(loss_map["loss"])


def profile_path(args, trainer: str) -> Path:
    """Where --profile-step writes a trainer's operator table (bench/op_profile.py)."""
    return table_path(OUT_DIR, args.name, trainer)


def worker_main(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {"trainer": args.worker, "threads": torch.get_num_threads(), "ok": False}
    try:
        _setup_imports()
        (worker_ours if args.worker == "ours" else worker_builtin)(args, result)
        result["ok"] = True
    except BaseException as exc:  # noqa: BLE001  (MemoryError / "can't allocate memory" under RLIMIT_AS included)
        text = f"{type(exc).__name__}: {exc}"
        result["error"] = text[:2000]
        result["oom"] = isinstance(exc, MemoryError) or "allocate" in text.lower() or "out of memory" in text.lower()
        result["traceback"] = traceback.format_exc()[-6000:]
        result["status_at_error"] = proc_status()
        print(result["traceback"], file=sys.stderr, flush=True)
    finally:
        result["maxrss_gib"] = maxrss_bytes() / GIB
        result["proc_status_end"] = proc_status()
        Path(args.result).write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------------


def run_worker(which: str, args, optimizer: str = "AdamW") -> dict:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    result_path = OUT_DIR / f".{args.name}_{which}_{optimizer}.json"
    result_path.unlink(missing_ok=True)
    if which == "kohya":
        from kohya_trainer import run_kohya

        return run_kohya(args, result_path)
    cap = int(args.mem_cap_gib * GIB)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    cmd = [
        sys.executable,
        __file__,
        "--worker",
        which,
        "--result",
        str(result_path),
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--res",
        str(args.res),
        "--dtype",
        args.dtype,
        "--algo",
        args.algo,
        "--images",
        str(args.images),
        "--batch",
        str(args.batch),
        "--bare-reps",
        str(args.bare_reps),
        "--threads",
        str(args.threads),
        "--builtin-checkpoint-depth",
        str(args.builtin_checkpoint_depth),
        "--optimizer",
        optimizer,
        "--name",
        args.name,
        "--profile-step",
        str(args.profile_step),
        *(["--compile-blocks"] if args.compile_blocks else []),
        *(["--keep-freed-heap"] if args.keep_freed_heap else []),
    ]
    print(f"[{which}] {' '.join(cmd[1:])}  (RLIMIT_AS {args.mem_cap_gib} GiB)", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, preexec_fn=limit, cwd=ROOT)
    wall = time.perf_counter() - start
    if result_path.exists():
        result = json.loads(result_path.read_text())
        result_path.unlink()
    else:  # killed before it could write (signal, abort in native code)
        result = {
            "trainer": which,
            "ok": False,
            "error": f"worker exited with {proc.returncode} and no result",
            "maxrss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GIB,
        }
    result["returncode"] = proc.returncode
    result["process_wall_s"] = wall
    return result


def median_after_first(values: list[float]) -> float | None:
    rest = values[1:] if len(values) > 1 else values
    return statistics.median(rest) if rest else None


def summarise(r: dict) -> dict:
    """s/step = median of the steps after the first; fwd+bwd = ours: median bare pass, built-in: median of
    its fwd_bwd calls after the first; step/fb = their ratio. Also the paired ratio (median over steps of
    step / the fwd+bwd measured next to it) and the ratio of the minima (least disturbed by other load)."""
    s: dict = {}
    steps = r.get("step_s") or []
    s["s_per_step"] = median_after_first(steps)
    s["min_step_s"] = min(steps[1:]) if len(steps) > 1 else None
    s["first_step_s"] = steps[0] if steps else None
    if r["trainer"] == "ours":
        inner = r.get("bare_fwd_bwd_s") or []  # bare[i] ran right after step i+1 (0-based step_s[i])
        s["fwd_bwd_s"] = statistics.median(inner) if inner else None
        pairs = [steps[i + 1] / inner[i] for i in range(len(inner)) if i + 1 < len(steps)]
        s["min_fwd_bwd_s"] = min(inner) if inner else None
        s["optimizer_step_s"] = median_after_first(r.get("optimizer_step_s") or [])
    else:
        inner = r.get("fwd_bwd_s") or []  # one fwd_bwd call inside each step (batch 1, no accumulation)
        s["fwd_bwd_s"] = median_after_first(inner)
        pairs = [a / b for a, b in list(zip(steps, inner))[1:]]
        s["min_fwd_bwd_s"] = min(inner[1:]) if len(inner) > 1 else None
    s["step_over_fwd_bwd"] = (s["s_per_step"] / s["fwd_bwd_s"]) if s["s_per_step"] and s["fwd_bwd_s"] else None
    s["step_over_fwd_bwd_paired"] = statistics.median(pairs) if pairs else None
    s["step_over_fwd_bwd_min"] = (
        s["min_step_s"] / s["min_fwd_bwd_s"] if s["min_step_s"] and s["min_fwd_bwd_s"] else None
    )
    return s


def fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def print_table(args, results: dict[str, dict]) -> None:
    print()
    print(
        f"train benchmark: --model {args.model} --dtype {args.dtype} --res {args.res} --steps {args.steps} "
        f"--images {args.images} --batch {args.batch} --threads {args.threads}; CPU, {os.cpu_count()} cores; "
        f"RLIMIT_AS {args.mem_cap_gib} GiB"
    )
    header = (
        f"{'trainer':<30} {'status':<7} {'s/step':>8} {'1st step':>8} {'fwd+bwd':>8} {'step/fb':>7} "
        f"{'paired':>6} {'min':>6} {'opt.step':>8} {'RSS model':>9} {'RSS peak':>8} {'train pk':>8} {'call s':>7} "
        f"{'LoRA params':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        s = r["summary"]
        status = "ok" if r.get("ok") else ("OOM" if r.get("oom") else "FAILED")
        print(
            f"{name:<30} {status:<7} {fmt(s['s_per_step'], '8.3f'):>8} {fmt(s['first_step_s'], '8.3f'):>8} "
            f"{fmt(s['fwd_bwd_s'], '8.3f'):>8} {fmt(s['step_over_fwd_bwd'], '7.3f'):>7} "
            f"{fmt(s['step_over_fwd_bwd_paired'], '6.3f'):>6} {fmt(s['step_over_fwd_bwd_min'], '6.3f'):>6} "
            f"{fmt(s.get('optimizer_step_s'), '8.4f'):>8} "
            f"{fmt(r.get('rss_before_train_gib'), '8.2f'):>8}G {fmt(r.get('maxrss_gib'), '7.2f'):>7}G "
            f"{fmt(r.get('train_peak_rss_gib'), '7.2f'):>7}G {fmt(r.get('train_wall_s'), '7.1f'):>7} "
            f"{fmt(r.get('lora_params'), ',d'):>11}"
        )
        if not r.get("ok"):
            print(f"         error: {r.get('error', '?')[:400]}")
    print(
        "s/step: median after the first step. 1st step: ours includes train()'s setup, the built-in's starts at its "
        "first progress bar.\nfwd+bwd: ours = bare U-Net forward+backward with the same LoRA hooks, between steps "
        "(median); built-in = time inside its TrainSampler.fwd_bwd.\nstep/fb = s/step / fwd+bwd; paired = median of "
        "step / neighbouring fwd+bwd; min = fastest step / fastest fwd+bwd.\nRSS model = before training; RSS peak "
        "= ru_maxrss of the process; train pk = sampled while training; call s = wall time of train() / execute()."
        "\nopt.step = ours: median time inside optimizer.step() (after the first step)."
    )


def print_ratios(results: dict[str, dict], trainers: list[str], rounds: int) -> None:
    """ours' s/step over each other trainer's, round by round (a round's runs saw about the same machine load)."""
    if "ours" not in trainers:
        return
    for other in [t for t in trainers if t != "ours"]:
        ratios = []
        for round_ in range(1, rounds + 1):
            suffix = "" if rounds == 1 else f" #{round_}"
            ours, theirs = results[f"ours{suffix}"]["summary"], results[f"{other}{suffix}"]["summary"]
            if ours["s_per_step"] and theirs["s_per_step"]:
                ratios.append(ours["s_per_step"] / theirs["s_per_step"])
        if ratios:
            listed = ", ".join(f"{r:.3f}" for r in ratios)
            print(f"ours / {other} s/step, round by round: {listed} (median {statistics.median(ratios):.3f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["tiny", "mid", "full"], default="tiny")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: tiny 20, full 3)")
    ap.add_argument("--res", type=int, default=None, help="image side in pixels (default: tiny 128, full 256)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="U-Net weights and training compute")
    ap.add_argument("--images", type=int, default=None, help="dataset size (default: tiny 4, full 2)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument(
        "--bare-reps",
        type=int,
        default=None,
        help="bare fwd+bwd passes, one after each of the first N steps (default: steps - 1)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: torch's default). 1 by default: on the shared 2-core machine the "
        "figures were taken on, 2 OpenMP threads were slower than 1 (they spin against other loads)",
    )
    ap.add_argument("--mem-cap-gib", type=float, default=22.0, help="RLIMIT_AS of each trainer's subprocess")
    ap.add_argument(
        "--builtin-checkpoint-depth",
        type=int,
        default=1,
        help="TrainLoraNode's checkpoint_depth (its default 1 checkpoints the whole UNetModel as one "
        "unit; 2 = ResBlock / SpatialTransformer level; ours checkpoints each ResBlock and transformer block, as "
        "kohya)",
    )
    ap.add_argument("--only", choices=["ours", "builtin"], default=None)
    ap.add_argument(
        "--trainers",
        default=None,
        help="comma-separated trainers run in turn, e.g. ours,kohya,builtin (default: ours,builtin; kohya: "
        "sd-scripts' sdxl_train_network.py, see bench/kohya_trainer.py)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="run the trainers in turn this many times (interleaved)")
    ap.add_argument("--sd-scripts", default=str(ROOT / "bench/out/kohya/sd-scripts"), help="kohya's checkout")
    ap.add_argument("--kohya-deps", default=str(ROOT / "bench/out/kohya/deps"), help="its packages (pip --target)")
    ap.add_argument(
        "--kohya-checkpoint",
        default=str(ROOT / "bench/out/kohya/random_sdxl_fp16.safetensors"),
        help="the random full-size SDXL as a checkpoint for kohya (written there once when missing)",
    )
    ap.add_argument(
        "--optimizers",
        default=None,
        help="comma-separated optimizer names (e.g. AdamW,CAME,ADOPT): ours once per optimizer, side by side "
        "(implies --only ours; the learning-rate-free ones run at learning rate 1.0, the others at 1e-4)",
    )
    ap.add_argument("--optimizer", default="AdamW", help=argparse.SUPPRESS)
    ap.add_argument(
        "--algo",
        default="lora",
        help="our network algorithm (lora, loha, lokr, dora); comma-separated (e.g. lora,dora): ours once per "
        "algorithm, side by side (implies --only ours)",
    )
    ap.add_argument(
        "--compile-blocks",
        action="store_true",
        help="ours: torch.compile each transformer block (Module.compile) when training starts: the regional "
        "compile trial",
    )
    ap.add_argument(
        "--keep-freed-heap",
        action="store_true",
        help="ours: skip handing the C heap's free pages back after each step (trainer/run/host_memory.py), to "
        "measure what that release saves",
    )
    ap.add_argument(
        "--profile-step",
        type=int,
        default=0,
        help="profile optimizer step N (2 or later) of ours and kohya and print where their times differ operator "
        "by operator (bench/op_profile.py)",
    )
    ap.add_argument("--name", default=None)
    ap.add_argument("--worker", choices=["ours", "builtin"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    tiny = args.model == "tiny"
    args.steps = args.steps or (20 if tiny else 3)
    args.res = args.res or (128 if tiny else 256)
    args.images = args.images or (4 if tiny else 2)
    args.bare_reps = args.bare_reps or max(1, args.steps - 1)
    if args.res % 64:
        ap.error("--res must be a multiple of 64")
    args.name = args.name or f"train_{args.model}_{args.dtype}_{args.res}"
    if args.worker:
        return worker_main(args)

    results: dict[str, dict] = {}
    if args.optimizers:
        for optimizer in [o.strip() for o in args.optimizers.split(",") if o.strip()]:
            r = run_worker("ours", args, optimizer)
            r["summary"] = summarise(r)
            name = f"ours {optimizer}"
            results[name if name not in results else f"{name} (again)"] = r  # repeat one to see the load drift
    algos = [a.strip() for a in args.algo.split(",") if a.strip()]
    if len(algos) > 1 and not args.optimizers:
        for algo in algos:
            r = run_worker("ours", argparse.Namespace(**{**vars(args), "algo": algo}))
            r["summary"] = summarise(r)
            results[f"ours {algo}"] = r
    trainers = (
        []
        if args.optimizers or len(algos) > 1
        else [t.strip() for t in args.trainers.split(",") if t.strip()]
        if args.trainers
        else ["ours", "builtin"]
        if args.only is None
        else [args.only]
    )
    for round_ in range(1, args.rounds + 1):
        for which in trainers:
            r = run_worker(which, args)
            r["summary"] = summarise(r)
            results[which if args.rounds == 1 else f"{which} #{round_}"] = r
    print_table(args, results)
    print_ratios(results, trainers, args.rounds)
    if args.profile_step and all(profile_path(args, t).is_file() for t in ("ours", "kohya")):
        compare_profiles(profile_path(args, "ours"), profile_path(args, "kohya"), "ours", "kohya")
    import torch  # only for the version string (after the workers, so the parent stays small while they run)

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "mem_total_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
            "torch": torch.__version__,
            "device": "cpu",
        },
        "env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OMP_", "LD_PRELOAD"))},
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "result")},
        "results": results,
    }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{args.name}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
