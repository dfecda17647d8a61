"""Check the pack's kohya export against kohya sd-scripts itself (a developer tool; CI cannot fetch sd-scripts).

    python scripts/kohya_reference.py arguments SD_SCRIPTS OUT.json
        dump sdxl_train_network.py's argument list (name, type, default, choices, nargs, action) to OUT.json: the
        table tests/unit/kohya_config/ check exported configs against (tests/data/kohya/).
    python scripts/kohya_reference.py check SD_SCRIPTS EXPORT_FOLDER
        parse EXPORT_FOLDER/config.toml and dataset.toml with kohya's own loaders: setup_parser +
        read_config_from_file + verify_training_args, and config_util's ConfigSanitizer + BlueprintGenerator.
    python scripts/kohya_reference.py roundtrip SD_SCRIPTS WORKDIR [--steps 2] [--memory-gib 19]
        the whole hand-off on the CPU, offline: (1) a random full-size SDXL checkpoint written by ComfyUI's
        save_checkpoint (WORKDIR/random_sdxl_fp16.safetensors, 7 GB, kept for later runs), kohya's two tokenizers
        built from ComfyUI's bundled CLIP tokenizer files (WORKDIR/tokenizers, for --tokenizer_cache_dir), and a
        graph run (2 images 256x256, LoRA dim 4 alpha 2, U-Net only, batch 1) exported by export_kohya_run to
        WORKDIR/kohya_runs/roundtrip*; (2) kohya's sdxl_train_network.py trains it from that folder with the
        exported files plus --tokenizer_cache_dir (run directly, so accelerate uses the CPU); (3) kohya's LoRA is
        continued in the graph: the Network node's execute with start_from = that file, ComfyUI's
        load_checkpoint_guess_config of the same checkpoint, and one step of the engine's train(). It fails unless
        every key of kohya's file is loaded (none missing, none unexpected), the LoRA equals the file at step 0,
        and the step runs. Each part is its own process, stopped past --memory-gib of memory; kohya's log:
        WORKDIR/kohya_train.log; the result: printed and in WORKDIR/continued.json. Needs ~15 GB of free memory
        and ~6 minutes on 2 CPU cores.

SD_SCRIPTS is a kohya-ss/sd-scripts checkout whose imports resolve: `bash bench/setup_kohya.sh` clones it at the
pinned commit and installs its requirements (without torch) into bench/out/kohya/deps; then PYTHONPATH=that folder,
run with the pack's Python ($COMFYUI_PYTHON: torch and ComfyUI); roundtrip keeps PYTHONPATH for kohya only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _parser(sd_scripts: str) -> argparse.ArgumentParser:
    sys.path.insert(0, sd_scripts)
    import sdxl_train_network  # noqa: PLC0415  (kohya's own module, only importable from its checkout)

    return sdxl_train_network.setup_parser()


def sd_scripts_commit(sd_scripts: str) -> str:
    """The commit of a kohya-ss/sd-scripts checkout ("" when it is not a git checkout)."""
    return subprocess.run(
        ["git", "-C", sd_scripts, "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()


def dump_arguments(sd_scripts: str, out_path: str) -> None:
    parser = _parser(sd_scripts)
    commit = sd_scripts_commit(sd_scripts)
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        default = action.default
        rows.append(
            {
                "dest": action.dest,
                "type": "int_or_float"
                if getattr(action.type, "__name__", "") == "int_or_float"
                else getattr(action.type, "__name__", None),
                "default": default if isinstance(default, (int, float, str, bool, type(None), list)) else repr(default),
                "choices": list(action.choices) if action.choices else None,
                "nargs": action.nargs,
                "flag": isinstance(action, argparse._StoreTrueAction),
            }
        )
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({"sd_scripts_commit": commit, "script": "sdxl_train_network.py", "arguments": rows}, f, indent=1)
        f.write("\n")
    print(f"{len(rows)} arguments of sdxl_train_network.py at {commit} -> {out_path}")


def check_export(sd_scripts: str, folder: str) -> None:
    parser = _parser(sd_scripts)
    from library import config_util, sdxl_train_util, train_util  # noqa: PLC0415

    os.chdir(folder)
    # kohya re-parses sys.argv inside read_config_from_file (command-line values override the file's)
    sys.argv = ["sdxl_train_network.py", "--config_file", "config.toml", "--dataset_config", "dataset.toml"]
    args = parser.parse_args(sys.argv[1:])
    args = train_util.read_config_from_file(args, parser)
    train_util.verify_training_args(args)
    sdxl_train_util.verify_sdxl_training_args(args)
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in vars(args) if k not in known)
    if unknown:
        raise SystemExit(f"config.toml keys sdxl_train_network.py does not declare: {unknown}")
    user_config = config_util.load_user_config(args.dataset_config)
    sanitizer = config_util.ConfigSanitizer(True, True, args.masked_loss, True)
    sanitized = sanitizer.sanitize_user_config(user_config)
    blueprint = config_util.BlueprintGenerator(sanitizer).generate(user_config, args)
    n_subsets = sum(len(d.subsets) for d in blueprint.dataset_group.datasets)
    datasets = len(sanitized["datasets"])
    print(f"kohya read {folder}: {len(vars(args))} arguments, {datasets} datasets, {n_subsets} subsets")
    # build kohya's datasets (registration, captions, repeats) and list what kohya will train on
    from library import strategy_base, strategy_sd  # noqa: PLC0415

    strategy_base.LatentsCachingStrategy.set_strategy(  # what sdxl_train_network.get_latents_caching_strategy sets
        strategy_sd.SdSdxlLatentsCachingStrategy(False, args.cache_latents_to_disk, args.vae_batch_size, False)
    )
    train_group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
    rows = []
    for dataset in train_group.datasets:
        for info in dataset.image_data.values():
            rows.append(
                {
                    "image": os.path.relpath(info.absolute_path, folder),
                    "caption": info.caption,
                    "num_repeats": info.num_repeats,
                    "is_reg": info.is_reg,
                }
            )
    print(
        json.dumps(
            {
                "num_train_images": train_group.num_train_images,
                "num_reg_images": train_group.num_reg_images,
                "images": rows,
            },
            indent=1,
        )
    )


# -- the round trip: graph export -> kohya training -> continued in the graph --------------------------------------

ROUNDTRIP_CHECKPOINT = "random_sdxl_fp16.safetensors"
ROUNDTRIP_NAME = "roundtrip"
ROUNDTRIP_DIM, ROUNDTRIP_ALPHA = 4, 2.0
#: kohya's tokenizer ids and where its --tokenizer_cache_dir looks for them (sdxl_train_util.load_tokenizers:
#: ``<dir>/<id with / -> _>``, read by CLIPTokenizer.from_pretrained); CLIP-G pads with "!" (id 0) as open_clip does
KOHYA_TOKENIZERS = {"openai/clip-vit-large-patch14": "<|endoftext|>", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k": "!"}


def _pack_imports() -> None:
    """The pack importable as sdxl_lora_trainer and ComfyUI's comfy.* on the CPU (the host tier's setup)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for sub in ("devkit", "bench"):
        sys.path.insert(0, os.path.join(root, sub))
    import package_path  # noqa: PLC0415
    from comfy_host import import_comfy  # noqa: PLC0415

    package_path.register()
    import_comfy()


def block_pictures(count: int, size: int, seed: int) -> list:
    """``count`` seeded size x size pictures of coarse random blocks (structure for the VAE)."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    blocks = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(count)]
    return [Image.fromarray(b).resize((size, size)) for b in blocks]


def _roundtrip_dataset():
    from sdxl_lora_trainer.trainer.data.assemble import dataset_from_scan  # noqa: PLC0415
    from sdxl_lora_trainer.trainer.data.buckets import BucketSettings  # noqa: PLC0415
    from sdxl_lora_trainer.trainer.data.captions import CaptionOptions  # noqa: PLC0415
    from sdxl_lora_trainer.trainer.data.sources import items_from_images  # noqa: PLC0415

    scan = items_from_images(block_pictures(2, 256, seed=0), ["a red cube", "a blue ball"])
    return dataset_from_scan(scan, BucketSettings((256, 256)), 1, CaptionOptions())


def write_tokenizer_folder(folder: str, bundled: str | None = None) -> None:
    """kohya's two tokenizers from ComfyUI's bundled CLIP tokenizer files (``bundled``: comfy/sd1_tokenizer of the
    imported ComfyUI when not given), so kohya runs offline."""
    import shutil  # noqa: PLC0415

    bundled = bundled or os.path.join(sys.modules["comfy"].__path__[0], "sd1_tokenizer")
    for model_id, pad in KOHYA_TOKENIZERS.items():
        target = os.path.join(folder, model_id.replace("/", "_"))
        os.makedirs(target, exist_ok=True)
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(os.path.join(bundled, name), os.path.join(target, name))
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            with open(os.path.join(bundled, name), encoding="utf-8") as f:
                settings = json.load(f)
            settings.pop("special_tokens_map_file", None)
            settings["pad_token"] = pad
            if name == "tokenizer_config.json":
                settings["model_max_length"] = 77
            with open(os.path.join(target, name), "w", encoding="utf-8") as f:
                json.dump(settings, f, indent=1)


def roundtrip_prepare(workdir: str, steps: int) -> None:
    """The random full-size checkpoint (once), kohya's tokenizer folder, and the graph's run exported for kohya."""
    from pathlib import Path  # noqa: PLC0415

    _pack_imports()
    from gpu_check import write_random_sdxl  # noqa: PLC0415

    from sdxl_lora_trainer.trainer.kohya_config.export_folder import export_kohya_run  # noqa: PLC0415
    from sdxl_lora_trainer.trainer.kohya_config.run import KohyaRun  # noqa: PLC0415
    from sdxl_lora_trainer.trainer.network.config import NetworkConfig  # noqa: PLC0415
    from sdxl_lora_trainer.trainer.run.config import TrainConfig  # noqa: PLC0415

    checkpoint = Path(workdir) / ROUNDTRIP_CHECKPOINT
    if not checkpoint.is_file():
        print(f"writing a random full-size SDXL checkpoint to {checkpoint} ...", flush=True)
        write_random_sdxl(checkpoint)
    write_tokenizer_folder(os.path.join(workdir, "tokenizers"))
    # the Network node's defaults: the U-Net trained, CLIP-L and CLIP-G not
    network = NetworkConfig(network_dim=ROUNDTRIP_DIM, network_alpha=ROUNDTRIP_ALPHA, train_te1=False, train_te2=False)
    run = KohyaRun(
        network, TrainConfig(max_train_steps=steps), output_name=ROUNDTRIP_NAME, checkpoint_path=str(checkpoint)
    )
    export = export_kohya_run(run, _roundtrip_dataset(), workdir, ROUNDTRIP_NAME)
    print(export.report(), flush=True)
    with open(os.path.join(workdir, "export_folder.txt"), "w", encoding="utf-8") as f:
        f.write(str(export.folder))


class _Sources:
    """The latent and text sources the Cache Latents / Cache Text nodes give the train node, held in memory."""

    def __init__(self, dataset, vae, clip) -> None:
        import numpy as np  # noqa: PLC0415
        import torch  # noqa: PLC0415

        from sdxl_lora_trainer.trainer.cache.text import encode_caption  # noqa: PLC0415
        from sdxl_lora_trainer.trainer.comfyui.encoders import encode_pixels  # noqa: PLC0415
        from sdxl_lora_trainer.trainer.data.buckets import resize_and_crop  # noqa: PLC0415
        from sdxl_lora_trainer.trainer.data.token_length import TokenLength  # noqa: PLC0415

        self.token_length = TokenLength()  # kohya's 75 tokens, as the exported run
        self.latents, self.text = {}, {}
        with torch.inference_mode():
            for img in dataset.images:
                pixels = np.asarray(resize_and_crop(img.item.load_rgb(), img.selection), np.float32) / 255.0
                self.latents[img.key] = encode_pixels(vae, torch.from_numpy(pixels)[None])[0].float()
                context, pooled = encode_caption(clip, img.item.caption, self.token_length)
                self.text[img.key] = (context.float(), pooled.float())

    def latent(self, image, flipped: bool):
        assert not flipped, "the round trip has no flip_aug"
        return self.latents[image.key]

    def loss_mask(self, image, flipped: bool):
        return None

    def encoding(self, image):
        return self.text[image.key]


def roundtrip_continue(workdir: str, lora_file: str) -> dict:
    """kohya's LoRA continued in the graph: the Network node's start_from, then one training step on ComfyUI's load
    of the same checkpoint. Returns what was checked."""
    import comfy.sd  # noqa: PLC0415 (after _pack_imports)
    import folder_paths  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    from sdxl_lora_trainer.nodes.network_node import NetworkSettings  # noqa: PLC0415
    from sdxl_lora_trainer.trainer.run.config import TrainConfig  # noqa: PLC0415
    from sdxl_lora_trainer.trainer.run.events import RunEvents  # noqa: PLC0415
    from sdxl_lora_trainer.trainer.run.session import train  # noqa: PLC0415

    folder_paths.add_model_folder_path("loras", os.path.dirname(lora_file))
    setup = NetworkSettings.execute(
        network_dim=ROUNDTRIP_DIM,
        network_alpha=ROUNDTRIP_ALPHA,
        conv_dim=0,
        conv_alpha=1.0,
        train_unet=True,
        train_clip_l=False,
        train_clip_g=False,
        dropout=0.0,
        rank_dropout=0.0,
        module_dropout=0.0,
        block_dims="",
        block_alphas="",
        conv_block_dims="",
        conv_block_alphas="",
        block_lr_weight="",
        start_from=os.path.basename(lora_file),
    ).result[0]
    file_weights = load_file(lora_file)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        os.path.join(workdir, ROUNDTRIP_CHECKPOINT), output_vae=True, output_clip=True
    )
    dataset = _roundtrip_dataset()
    sources = _Sources(dataset, vae, clip)
    found: dict = {"file_keys": len(file_weights)}

    class Check(RunEvents):
        def training_started(self, run) -> None:
            loaded = run.network.state_dict_kohya(torch.float16)  # the LoRA as the graph holds it at step 0
            found["missing"] = sorted(file_weights.keys() - loaded.keys())
            found["unexpected"] = sorted(loaded.keys() - file_weights.keys())
            found["unequal"] = sorted(
                k for k in file_weights.keys() & loaded.keys() if not torch.equal(loaded[k], file_weights[k])
            )

        def step_finished(self, record) -> None:
            found.setdefault("steps", []).append({"step": record.step, "loss": record.loss, "s": record.seconds})

    with torch.inference_mode():
        result = train(
            model,
            clip,
            dataset,
            sources,
            sources,
            setup.config,
            TrainConfig(max_train_steps=1),
            initial_weights=setup.initial_weights,
            events=Check(),
        )
    after = result.network.state_dict_kohya(torch.float16)
    unchanged = sorted(k for k in file_weights if torch.equal(after[k], file_weights[k]))
    found["changed_by_the_step"] = len(file_weights) - len(unchanged)
    found["unchanged_weights"] = [k for k in unchanged if not k.endswith(".alpha")]  # alphas are not trained
    return found


def run_watched(command: list[str], limit_gib: float, **kwargs) -> tuple[int, float]:
    """Run ``command``; kill it when its anonymous memory (RssAnon) passes ``limit_gib`` (the machine is shared).
    Returns (exit status, peak RssAnon GiB). Not RLIMIT_AS: kohya maps the whole checkpoint file and the CPU kernels
    reserve more than they touch, so address space says little about the memory a run takes from others."""
    import time  # noqa: PLC0415

    proc = subprocess.Popen(command, **kwargs)
    peak = 0.0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status", encoding="ascii") as f:
                anon = next((int(line.split()[1]) for line in f if line.startswith("RssAnon:")), 0) / 1024**2
        except OSError:
            anon = 0.0
        peak = max(peak, anon)
        if limit_gib > 0 and anon > limit_gib:
            proc.kill()
            proc.wait()
            raise SystemExit(f"{command[1]} passed {limit_gib} GiB of memory ({anon:.1f} GiB) and was stopped")
        time.sleep(0.5)
    return proc.returncode, peak


def roundtrip(sd_scripts: str, workdir: str, steps: int, memory_gib: float) -> None:
    """Export -> kohya's sdxl_train_network.py on the CPU -> the LoRA continued through start_from. Each part runs in
    its own process: kohya's dependencies (PYTHONPATH) stay out of ComfyUI's, and one full-size model is in memory."""
    import re  # noqa: PLC0415
    import time  # noqa: PLC0415

    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    sd_scripts = os.path.abspath(sd_scripts)
    comfy_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    me = os.path.abspath(__file__)
    rc, _ = run_watched([sys.executable, me, "_roundtrip_prepare", workdir, str(steps)], memory_gib, env=comfy_env)
    if rc != 0:
        raise SystemExit(f"exporting the run failed (exit {rc})")
    with open(os.path.join(workdir, "export_folder.txt"), encoding="utf-8") as f:
        folder = f.read().strip()
    commit = sd_scripts_commit(sd_scripts)
    # the exported files as launch.sh passes them; the one addition: kohya's tokenizers from a local folder (offline)
    command = [
        sys.executable,
        os.path.join(sd_scripts, "sdxl_train_network.py"),
        "--config_file",
        "config.toml",
        "--dataset_config",
        "dataset.toml",
        "--tokenizer_cache_dir",
        os.path.join(workdir, "tokenizers"),
    ]
    print(f"kohya {commit}: (cd {folder} && {' '.join(command)})", flush=True)
    log_path = os.path.join(workdir, "kohya_train.log")
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        returncode, kohya_peak = run_watched(command, memory_gib, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    with open(log_path, encoding="utf-8", errors="replace") as f:
        log_text = f.read()
    if returncode != 0:
        raise SystemExit(f"kohya failed (exit {returncode}); its log: {log_path}\n{log_text[-3000:]}")
    progress = [seg for seg in re.split(r"[\r\n]", log_text) if seg.lstrip().startswith("steps:")]  # kohya's tqdm
    rates = [rate for seg in progress for rate in re.findall(r"(\d+(?:\.\d+)?)s/it", seg)]
    lora_file = os.path.join(folder, "output", f"{ROUNDTRIP_NAME}.safetensors")
    out_json = os.path.join(workdir, "continued.json")
    rc, continue_peak = run_watched(
        [sys.executable, me, "_roundtrip_continue", workdir, lora_file, out_json], memory_gib, env=comfy_env
    )
    if rc != 0:
        raise SystemExit(f"continuing kohya's LoRA in the graph failed (exit {rc})")
    with open(out_json, encoding="utf-8") as f:
        found = json.load(f)
    summary = {
        "sd_scripts_commit": commit,
        "kohya_command": command,
        "kohya_seconds_total": round(seconds, 1),
        "kohya_peak_memory_gib": round(kohya_peak, 2),
        "graph_peak_memory_gib": round(continue_peak, 2),
        "kohya_s_per_step": float(rates[-1]) if rates else None,
        "kohya_lora": lora_file,
        "continued_in_graph": found,
    }
    print(json.dumps(summary, indent=1))
    problems = [k for k in ("missing", "unexpected", "unequal") if found[k]]
    if problems or not found.get("steps"):
        raise SystemExit(f"round trip FAILED: {problems or 'no training step ran'} (see {out_json})")
    print("round trip OK: kohya's LoRA loaded by start_from with every key, equal at step 0, and one step trained")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("arguments")
    a.add_argument("sd_scripts")
    a.add_argument("out")
    c = sub.add_parser("check")
    c.add_argument("sd_scripts")
    c.add_argument("folder")
    r = sub.add_parser("roundtrip")
    r.add_argument("sd_scripts")
    r.add_argument("workdir")
    r.add_argument("--steps", type=int, default=2, help="kohya's max_train_steps")
    r.add_argument("--memory-gib", type=float, default=19, help="stop a part past this much memory; 0: no limit")
    p = sub.add_parser("_roundtrip_prepare")  # the parts roundtrip runs as child processes
    p.add_argument("workdir")
    p.add_argument("steps", type=int)
    k = sub.add_parser("_roundtrip_continue")
    k.add_argument("workdir")
    k.add_argument("lora_file")
    k.add_argument("out_json")
    ns = ap.parse_args()
    if ns.command == "arguments":
        dump_arguments(ns.sd_scripts, ns.out)
    elif ns.command == "check":
        check_export(ns.sd_scripts, ns.folder)
    elif ns.command == "roundtrip":
        roundtrip(ns.sd_scripts, ns.workdir, ns.steps, ns.memory_gib)
    elif ns.command == "_roundtrip_prepare":
        roundtrip_prepare(ns.workdir, ns.steps)
    else:
        _pack_imports()
        found = roundtrip_continue(ns.workdir, ns.lora_file)
        with open(ns.out_json, "w", encoding="utf-8") as f:
            json.dump(found, f, indent=1)


if __name__ == "__main__":
    main()
