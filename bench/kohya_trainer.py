"""kohya sd-scripts' own ``sdxl_train_network.py`` as the third trainer of bench_train.py, timed from inside.

sd-scripts is never vendored: ``bash bench/setup_kohya.sh`` clones it at ``KOHYA_COMMIT`` into bench/out/kohya/
and installs its requirements there (``pip install --target``, torch excluded: the pack's torch is used), so it
runs with the pack's Python and torch but none of ComfyUI's packages. bench_train.py ``--trainers ours,kohya``
(options ``--sd-scripts``, ``--kohya-deps``, ``--kohya-checkpoint``) calls ``run_kohya`` between the other
trainers, so the machine's load hits all of them alike.

The run: the random full-size SDXL of ``--model full`` written once as a checkpoint by ComfyUI's save_checkpoint
(bench/gpu_check.write_random_sdxl: the same seeded U-Net weights, stored in fp16), N seeded pictures at
``--res``, and kohya's settings matched to ours: LoRA dim 8 alpha 1 on the U-Net only, AdamW at 1e-4, constant
schedule, gradient checkpointing, SDPA attention, max_grad_norm 1, latents and text-encoder outputs cached before
training (ours gets both as cached inputs too), ``mixed_precision`` "no" for fp32 or "bf16" (frozen U-Net in bf16,
LoRA in fp32, as ours). kohya runs ``--steps`` + 1 optimizer steps; the intervals between the starts of
consecutive steps are its step times (the first one includes the first-iteration overhead, as ours does), and the
time inside its ``process_batch`` (encoding lookup, noise, U-Net forward, loss) plus ``accelerator.backward`` is
its fwd+bwd. Peak RSS: ru_maxrss of kohya's process; a watchdog stops it past ``--mem-cap-gib`` of anonymous
memory (not RLIMIT_AS: kohya maps the checkpoint file and would fail an address-space cap long before it used
the memory).
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from heap import describe as describe_heap
from heap import heap_counters
from op_profile import StepProfiler, table_path

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"
KOHYA_HOME = OUT_DIR / "kohya"
#: the sd-scripts commit the figures in bench/README.md were taken with (setup_kohya.sh checks it out)
KOHYA_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"
GIB = 1024**3


def _kohya_reference():
    """scripts/kohya_reference.py: its pictures, tokenizer folder writer, commit lookup and memory watchdog."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import kohya_reference

    return kohya_reference


def ensure_checkpoint(path: Path) -> None:
    """The random full-size SDXL as a checkpoint file (7 GB), written once by ComfyUI's save_checkpoint."""
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"writing the random full-size SDXL checkpoint to {path} (once) ...", flush=True)
    code = (
        "import sys; sys.path[:0] = [sys.argv[1] + '/bench', sys.argv[1] + '/devkit']; "
        "from pathlib import Path; from gpu_check import write_random_sdxl; write_random_sdxl(Path(sys.argv[2]))"
    )
    subprocess.run([sys.executable, "-c", code, str(ROOT), str(path)], check=True, cwd=ROOT)


def write_run_folder(args, folder: Path, tokenizers: Path) -> list[str]:
    """Images, captions, config.toml and dataset.toml for kohya; returns its command-line arguments."""
    images = folder / "images" / "1_bench"
    images.mkdir(parents=True, exist_ok=True)
    for i, picture in enumerate(_kohya_reference().block_pictures(args.images, args.res, seed=1)):
        picture.save(images / f"{i:03d}.png")
        (images / f"{i:03d}.txt").write_text(f"image {i}", encoding="utf-8")
    config = {
        "pretrained_model_name_or_path": str(args.kohya_checkpoint),
        "network_module": "networks.lora",
        "network_dim": 8,
        "network_alpha": 1.0,
        "network_train_unet_only": True,
        "max_train_steps": args.steps + 1,
        "learning_rate": 1e-4,
        "optimizer_type": "AdamW",
        "lr_scheduler": "constant",
        "max_grad_norm": 1.0,
        "seed": 42,
        "mixed_precision": {"fp32": "no", "bf16": "bf16"}[args.dtype],
        "gradient_checkpointing": True,
        "sdpa": True,
        "cache_latents": True,
        "cache_text_encoder_outputs": True,
        "output_dir": "output",
        "output_name": "bench",
        "save_model_as": "safetensors",
        "tokenizer_cache_dir": str(tokenizers),
    }
    dataset = (
        "[[datasets]]\n"
        f"resolution = [{args.res}, {args.res}]\n"
        f"batch_size = {args.batch}\n"
        "enable_bucket = false\n\n"
        "[[datasets.subsets]]\n"
        f'image_dir = "{images}"\n'
        "num_repeats = 1\n"
        'caption_extension = ".txt"\n'
    )
    lines = [
        f"{k} = {json.dumps(v)}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}" for k, v in config.items()
    ]
    (folder / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "dataset.toml").write_text(dataset, encoding="utf-8")
    return ["--config_file", "config.toml", "--dataset_config", "dataset.toml"]


def run_kohya(args, result_path: Path) -> dict:
    """One timed kohya run in its own process (bench_train.py's worker for ``kohya``); returns its result."""
    sd_scripts, deps = Path(args.sd_scripts), Path(args.kohya_deps)
    if not (sd_scripts / "sdxl_train_network.py").is_file() or not deps.is_dir():
        return {
            "trainer": "kohya",
            "ok": False,
            "error": f"no sd-scripts at {sd_scripts} or its packages at {deps}: run bash bench/setup_kohya.sh "
            "(or pass --sd-scripts / --kohya-deps)",
        }
    reference = _kohya_reference()
    ensure_checkpoint(Path(args.kohya_checkpoint))
    tokenizers = KOHYA_HOME / "tokenizers"
    reference.write_tokenizer_folder(str(tokenizers), str(ROOT / ".comfyui" / "ComfyUI" / "comfy" / "sd1_tokenizer"))
    folder = KOHYA_HOME / "runs" / args.name
    kohya_args = write_run_folder(args, folder, tokenizers)
    commit = reference.sd_scripts_commit(str(sd_scripts))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(deps), str(sd_scripts)])
    if args.profile_step:
        env["BENCH_PROFILE_STEP"] = str(args.profile_step)
        env["BENCH_PROFILE_OUT"] = str(table_path(OUT_DIR, args.name, "kohya"))
    command = [sys.executable, __file__, "--timed", str(sd_scripts), str(result_path), str(args.threads), *kohya_args]
    print(f"[kohya] {sd_scripts} at {commit}: (cd {folder} && {' '.join(command[1:])})", flush=True)
    log_path = folder / "kohya.log"
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            returncode, peak_anon = reference.run_watched(
                command, args.mem_cap_gib, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        except SystemExit as stopped:  # the watchdog: past the memory cap
            returncode, peak_anon = -9, args.mem_cap_gib
            log.write(f"\n{stopped}\n")
    wall = time.perf_counter() - start
    result = json.loads(result_path.read_text()) if result_path.exists() else {"trainer": "kohya", "ok": False}
    result_path.unlink(missing_ok=True)
    if not result.get("ok"):
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-1500:]
        result.setdefault("error", f"kohya exited with {returncode}; {log_path}:\n{tail}")
        result["oom"] = returncode == -9
    result.update(
        sd_scripts_commit=commit, returncode=returncode, process_wall_s=wall, peak_anon_gib=peak_anon, log=str(log_path)
    )
    for step, counters in zip(result.get("step_s", []), result.get("heap_after_step_gib", [])):
        print(f"  kohya step: {step:.3f} s, {describe_heap(counters)}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------------
# inside kohya's process (its packages on PYTHONPATH, the pack's torch)
# ---------------------------------------------------------------------------------------------------


def timed_main(sd_scripts: str, result_path: str, threads: int, kohya_args: list[str]) -> int:
    """kohya's own ``__main__`` of sdxl_train_network.py, with the step and fwd+bwd clocks attached."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    sys.path.insert(0, sd_scripts)
    sys.argv = [os.path.join(sd_scripts, "sdxl_train_network.py"), *kohya_args]
    import accelerate
    import sdxl_train_network
    import train_network
    from library import train_util

    starts: list[float] = []
    forward: list[float] = []
    backward: list[float] = []
    trainer_class = train_network.NetworkTrainer
    on_step_start, process_batch = trainer_class.on_step_start, trainer_class.process_batch
    accelerator_backward = accelerate.Accelerator.backward

    profile_step = int(os.environ.get("BENCH_PROFILE_STEP", "0"))  # bench_train.py --profile-step
    profiler = StepProfiler()
    heap: list[dict | None] = []

    def timed_on_step_start(self, *a, **k):
        if k.get("is_train", True):
            if profiler.running:
                profiler.stop(Path(os.environ["BENCH_PROFILE_OUT"]))
            starts.append(time.perf_counter())
            heap.append(heap_counters())  # after the previous step (the first: after kohya's setup)
            if profile_step and len(starts) == profile_step:
                profiler.start()
        return on_step_start(self, *a, **k)

    def timed_process_batch(self, *a, **k):
        begin = time.perf_counter()
        out = process_batch(self, *a, **k)
        if k.get("is_train", True):
            forward.append(time.perf_counter() - begin)
        return out

    def timed_backward(self, loss, **k):
        begin = time.perf_counter()
        out = accelerator_backward(self, loss, **k)
        backward.append(time.perf_counter() - begin)
        return out

    trainer_class.on_step_start = timed_on_step_start
    trainer_class.process_batch = timed_process_batch
    accelerate.Accelerator.backward = timed_backward
    result: dict = {"trainer": "kohya", "threads": torch.get_num_threads(), "ok": False}
    begin = time.perf_counter()
    try:
        parser = sdxl_train_network.setup_parser()
        args = parser.parse_args()
        train_util.verify_command_line_training_args(args)
        args = train_util.read_config_from_file(args, parser)
        sdxl_train_network.SdxlNetworkTrainer().train(args)
        result["ok"] = True
    except BaseException as exc:  # noqa: BLE001  (reported, like ours and the built-in's worker)
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        result["oom"] = isinstance(exc, MemoryError) or "allocate" in str(exc).lower()
    finally:
        result["train_wall_s"] = time.perf_counter() - begin
        result["step_s"] = [b - a for a, b in zip(starts, starts[1:])]
        result["fwd_bwd_s"] = [f + b for f, b in zip(forward, backward)][: len(result["step_s"])]
        result["heap_after_step_gib"] = heap[1:]
        result["maxrss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        lora = Path("output") / "bench.safetensors"
        if lora.is_file():
            from safetensors import safe_open

            with safe_open(str(lora), "pt") as f:
                names = [k for k in f.keys() if not k.endswith(".alpha")]  # noqa: SIM118  (safe_open has keys())
                result["lora_params"] = sum(math.prod(f.get_slice(k).get_shape()) for k in names)
        Path(result_path).write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 4 and sys.argv[1] == "--timed":
        raise SystemExit(timed_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]))
    raise SystemExit(__doc__)
