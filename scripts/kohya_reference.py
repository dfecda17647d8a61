"""Check the pack's kohya export against kohya sd-scripts itself (a developer tool; CI cannot fetch sd-scripts).

    python scripts/kohya_reference.py arguments SD_SCRIPTS OUT.json
        dump sdxl_train_network.py's argument list (name, type, default, choices, nargs, action) to OUT.json: the
        table tests/unit/kohya_config/ check exported configs against (tests/data/kohya/).
    python scripts/kohya_reference.py check SD_SCRIPTS EXPORT_FOLDER
        parse EXPORT_FOLDER/config.toml and dataset.toml with kohya's own loaders: setup_parser +
        read_config_from_file + verify_training_args, and config_util's ConfigSanitizer + BlueprintGenerator.

SD_SCRIPTS is a kohya-ss/sd-scripts checkout whose imports resolve (its requirements on PYTHONPATH, e.g.
pip install --target DEPS --no-deps diffusers accelerate voluptuous imagesize opencv-python-headless ftfy rich
transformers==4.54.1 "tokenizers<0.22" huggingface-hub==0.34.3, then PYTHONPATH=DEPS).
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


def dump_arguments(sd_scripts: str, out_path: str) -> None:
    parser = _parser(sd_scripts)
    commit = subprocess.run(
        ["git", "-C", sd_scripts, "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("arguments")
    a.add_argument("sd_scripts")
    a.add_argument("out")
    c = sub.add_parser("check")
    c.add_argument("sd_scripts")
    c.add_argument("folder")
    ns = ap.parse_args()
    if ns.command == "arguments":
        dump_arguments(ns.sd_scripts, ns.out)
    else:
        check_export(ns.sd_scripts, ns.folder)


if __name__ == "__main__":
    main()
