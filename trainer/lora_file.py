"""Writing the trained LoRA as a kohya-format ``.safetensors`` that ComfyUI's LoraLoader lists and loads.

Why each piece exists:

* **Names come from users** (a widget, or an API request to a shared server), so ``safe_relative_name`` only lets
  through plain relative names that cannot leave the loras folder on any OS (no ``..``, no absolute paths, no drive
  letters, no backslashes, no NUL) and that ComfyUI will actually list (no hidden ``.``-components: ComfyUI skips
  ``.git`` folders, and our temp files start with ``.``).
* **One file name per run** (``unique_lora_path``): ComfyUI's LoraLoader keeps the last LoRA it loaded keyed by its
  path (``self.loaded_lora``) and the executor caches node outputs keyed by the ``lora_name`` string, so rewriting
  an existing path would keep serving the old weights. Existing files are never replaced unless asked.
* **The name handed to LoraLoader** is what ``folder_paths.get_filename_list("loras")`` returns: the path relative
  to the loras folder as ``os.path.relpath`` spells it (``sub/x.safetensors`` on Linux and macOS). The prompt
  validator only accepts values from that list.
* **Atomic writes** (``atomic_write_safetensors``): a LoraLoader, a file browser or a crash must never see half a
  file. We write a hidden ``.tmp`` file in the same folder (an extension ComfyUI does not list), fsync it and then
  publish it with one rename (or a hard link when replacing is not allowed, so two runs racing for one name cannot
  clobber each other). ComfyUI's filename-list cache is invalidated only when a folder's ``os.path.getmtime``
  changes; on coarse-timestamp filesystems a rename in the same clock tick as an earlier change leaves it equal, so
  we make sure every folder we changed has a newer mtime afterwards (the file shows up without a restart).
* **kohya's metadata** (``build_metadata``): the ``ss_*`` keys of sd-scripts' ``train_network.py`` (all values
  ``str(value)``, JSON where kohya uses JSON), the ModelSpec ``modelspec.*`` keys kohya writes for an SDXL LoRA
  (``library/sai_model_spec.py``) and the two addnet hashes (``sshs_model_hash``, ``sshs_legacy_hash``) that
  A1111-style UIs use to index LoRAs. Plus ``comfyui.prompt`` / ``comfyui.workflow``: the graph that trained it.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open

LORA_EXTENSION = ".safetensors"
TEMP_SUFFIX = ".tmp"  # not in ComfyUI's supported_pt_extensions, so a temp file is never listed as a LoRA

SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"  # kohya's sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0
KOHYA_LORA_NETWORK_MODULE = "networks.lora"
MODELSPEC_VERSION = "1.0.1"  # sai_model_spec.BASE_METADATA["modelspec.sai_model_spec"]
MODELSPEC_ARCHITECTURE_SDXL_LORA = "stable-diffusion-xl-v1-base/lora"
MODELSPEC_IMPLEMENTATION_SDXL_LORA = "https://github.com/Stability-AI/generative-models"  # kohya: LoRA + SDXL
DEFAULT_IMPLEMENTATION_VERSION = "comfyui-sdxl-lora-trainer"
UNKNOWN_COMMIT = "(unknown)"  # what kohya's get_git_revision_hash writes when it cannot ask git

SAVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# addnet's legacy hash: sha256 of the 64 KiB at offset 1 MiB of the serialized file, first 8 hex digits.
_LEGACY_HASH_OFFSET = 0x100000
_LEGACY_HASH_LENGTH = 0x10000

_MAX_COMPONENT_BYTES = 255  # file-name limit of ext4, NTFS, APFS
_MAX_STEM_BYTES = 200  # leaves room for "_<run tag>_<n>.safetensors"
_MAX_UNIQUE_TRIES = 10_000
_WINDOWS_FORBIDDEN_CHARS = frozenset('<>:"|?*')
_WINDOWS_RESERVED_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"COM{i}" for i in range(1, 10)] + [f"LPT{i}" for i in range(1, 10)]
)


# ---------------------------------------------------------------------------------------------------------------
# names and paths
# ---------------------------------------------------------------------------------------------------------------


def _check_text(value: str, what: str) -> None:
    """Whole-string rules: the characters that let a name mean something else on some OS."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise ValueError(f"{what} {value!r} contains a NUL character, which no file system accepts in a name")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"{what} {value!r} contains a control character; use printable characters only")
    if "\\" in value:
        raise ValueError(
            f"{what} {value!r} contains a backslash: use '/' to separate subfolders (a backslash is a path "
            "separator on Windows and could step outside the loras folder)"
        )
    if ":" in value:
        raise ValueError(
            f"{what} {value!r} contains ':': drive letters (C:) and alternate data streams are not allowed; "
            "give a name relative to the loras folder"
        )


def _check_component(part: str, what: str, max_bytes: int = _MAX_COMPONENT_BYTES) -> None:
    """One folder or file name: must stay a plain, listable, portable name."""
    if part == "":
        raise ValueError(f"{what} has an empty path component ('//' or a leading/trailing '/')")
    if part in (".", ".."):
        raise ValueError(
            f"{what} contains a {part!r} component: '.' and '..' are not allowed, the LoRA must stay inside "
            "the loras folder"
        )
    if part.startswith("."):
        raise ValueError(
            f"{what} component {part!r} starts with '.': hidden names are not allowed (ComfyUI skips '.git' "
            "folders and temporary files start with '.')"
        )
    if part != part.strip():
        raise ValueError(f"{what} component {part!r} starts or ends with whitespace")
    if part.endswith("."):
        raise ValueError(f"{what} component {part!r} ends with '.', which Windows silently drops")
    bad = sorted(set(part) & _WINDOWS_FORBIDDEN_CHARS)
    if bad:
        raise ValueError(f"{what} component {part!r} contains {''.join(bad)!r}, not allowed in Windows file names")
    if part.split(".")[0].upper() in _WINDOWS_RESERVED_NAMES:
        raise ValueError(f"{what} component {part!r} is a reserved device name on Windows")
    if len(part.encode("utf-8")) > max_bytes:
        raise ValueError(f"{what} component {part[:40]!r}... is longer than {max_bytes} bytes")


def _strip_extension(stem: str) -> str:
    """Users often type the extension; "x.safetensors" must not become "x.safetensors_<tag>.safetensors"."""
    if stem.lower().endswith(LORA_EXTENSION):
        return stem[: -len(LORA_EXTENSION)]
    return stem


def safe_relative_name(subfolder: str, stem: str) -> str:
    """Validate a user-given subfolder and LoRA name; return ``"sub/dir/stem"`` (or ``"stem"``), '/'-separated.

    Rules (each violation raises ValueError saying which): no NUL or control characters, no backslash (use '/'),
    no ':' (drive letters), no absolute path, no empty, '.' or '..' components, no hidden ('.'-prefixed)
    components, no Windows-forbidden characters or device names, no leading/trailing whitespace per component.
    ``subfolder`` may be empty (the loras folder itself) and may end with '/'; ``stem`` may not contain '/' and a
    trailing ".safetensors" is dropped. Surrounding whitespace of either string is ignored.
    """
    if not isinstance(subfolder, str) or not isinstance(stem, str):
        raise TypeError("subfolder and LoRA name must be strings")
    sub = subfolder.strip()
    _check_text(sub, "subfolder")
    _check_text(stem.strip(), "LoRA name")
    if sub.startswith(("/", "~")):
        raise ValueError(
            f"subfolder {subfolder!r} is an absolute path; give a folder relative to the loras folder (e.g. 'mine')"
        )
    sub = sub.rstrip("/")
    parts = sub.split("/") if sub else []
    for part in parts:
        _check_component(part, f"subfolder {subfolder!r}")

    name = _strip_extension(stem.strip())
    if name == "":
        raise ValueError("the LoRA name is empty")
    if "/" in name:
        # say the most telling rule first: an escape attempt must read as one, not as a style hint
        if name.startswith("/"):
            raise ValueError(f"LoRA name {stem!r} is an absolute path; give a plain name (folders go in the "
                             "subfolder input)")
        for part in name.split("/"):
            if part in (".", ".."):
                _check_component(part, f"LoRA name {stem!r}")
        raise ValueError(f"LoRA name {stem!r} contains '/': put folders in the subfolder input instead")
    _check_component(name, f"LoRA name {stem!r}", max_bytes=_MAX_STEM_BYTES)
    return "/".join(parts + [name])


def comfy_relative_name(parts: Sequence[str]) -> str:
    """The ``lora_name`` LoraLoader expects: joined like ``os.path.relpath`` in ComfyUI's ``recursive_search``.

    That is '/' on Linux and macOS (and '\\' on Windows, where ComfyUI lists subfolder files with backslashes
    and its prompt validator only accepts names from that list).
    """
    return os.sep.join(parts)


def _taken(path: Path) -> bool:
    return os.path.lexists(path)  # a dangling symlink also occupies the name


def unique_lora_path(
    loras_root: Path | str,
    subfolder: str,
    stem: str,
    run_tag: str,
    overwrite: bool = False,
    also_taken_in: Iterable[Path | str] = (),
) -> tuple[Path, str]:
    """Pick the file for this run: ``<loras_root>/<subfolder>/<stem>_<run_tag>.safetensors``.

    If that name is taken, ``_2``, ``_3``... are appended (never replacing a file: LoraLoader caches by path).
    With ``overwrite=True`` the first name is returned even if it exists (the caller then writes with
    ``overwrite=True``). ``also_taken_in``: the other folders registered for "loras"; ComfyUI resolves a name in
    the first folder holding it, so a name already used in any of them would load someone else's file.
    Returns ``(absolute_path, lora_name)`` where ``lora_name`` is the string LoraLoader's list will contain.
    Nothing is created on disk.
    """
    rel = safe_relative_name(subfolder, stem)
    parts = rel.split("/")
    if not isinstance(run_tag, str):
        raise TypeError(f"run tag must be a string, got {type(run_tag).__name__}")
    tag = run_tag.strip()
    if tag:
        _check_text(tag, "run tag")
        if "/" in tag:
            raise ValueError(f"run tag {run_tag!r} contains '/'")
        _check_component(tag, f"run tag {run_tag!r}", max_bytes=48)
        base = f"{parts[-1]}_{tag}"
    else:
        base = parts[-1]
    root = Path(loras_root)
    roots = [root, *(Path(r) for r in also_taken_in)]
    for n in range(1, _MAX_UNIQUE_TRIES + 1):
        filename = base + ("" if n == 1 else f"_{n}") + LORA_EXTENSION
        _check_component(filename, "file name")
        rel_parts = [*parts[:-1], filename]
        candidate = root.joinpath(*rel_parts)
        if overwrite:
            if candidate.is_dir():
                raise IsADirectoryError(f"{candidate} is a folder; choose another LoRA name")
            return candidate, comfy_relative_name(rel_parts)
        if not any(_taken(r.joinpath(*rel_parts)) for r in roots):
            return candidate, comfy_relative_name(rel_parts)
    raise FileExistsError(f"no free name for {rel!r} with run tag {run_tag!r} after {_MAX_UNIQUE_TRIES} tries")


# ---------------------------------------------------------------------------------------------------------------
# writing and reading
# ---------------------------------------------------------------------------------------------------------------


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime  # the same float os.path.getmtime gives ComfyUI
    except OSError:
        return None


def _make_dirs(directory: Path, touched: dict[Path, float]) -> None:
    """``mkdir -p`` that records, for each folder whose entries it changes, its mtime before the change."""
    missing: list[Path] = []
    d = directory
    while not d.is_dir():
        if os.path.lexists(d):
            raise NotADirectoryError(f"{d} exists and is not a folder")
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for m in reversed(missing):
        before = _mtime(m.parent)
        if before is not None:
            touched.setdefault(m.parent, before)
        m.mkdir(exist_ok=True)


def _advance_mtime(directory: Path, before: float) -> None:
    """Make ``os.path.getmtime(directory)`` differ from ``before`` so ComfyUI's cached file list is rebuilt.

    Needed only when the file system's timestamp did not move (same clock tick, coarse granularity): any listing
    ComfyUI cached earlier saw an mtime <= ``before``, so a strictly newer one always invalidates it.
    """
    now = _mtime(directory)
    if now is None or now > before:
        return
    try:
        atime = os.stat(directory).st_atime
        for step in (1e-3, 1.0, 2.0):  # 2 s covers FAT-like granularity
            os.utime(directory, (atime, before + step))
            after = _mtime(directory)
            if after is not None and after > before:
                return
    except OSError:
        pass  # not ours to change (e.g. read-only mount): the file is still written, a refresh will list it


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask() sets it process-wide)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))  # Windows needs write access to flush
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); folders cannot be opened for fsync on Windows."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished temp file to its name in one step; without ``overwrite`` never replace an existing file."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic and fails if the name exists, even when another run just took it
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass overwrite=True)") from None
    except OSError:
        # file systems without hard links (FAT, some network mounts): check then rename
        if os.path.lexists(path):
            raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass overwrite=True)") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"safetensors metadata must map str to str; {k!r} -> {type(v).__name__}")
        out[k] = v
    return out


def atomic_write_safetensors(
    path: Path | str,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    overwrite: bool = False,
) -> None:
    """Write ``tensors`` + ``metadata`` to ``path`` so that the file appears complete or not at all.

    Missing parent folders are created. On any error the temp file is removed and ``path`` is untouched.
    Without ``overwrite`` an existing ``path`` raises FileExistsError (checked again at publish time).
    """
    path = Path(path)
    meta = _check_metadata(metadata)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder")
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass overwrite=True)")
    directory = path.parent
    touched: dict[Path, float] = {}
    _make_dirs(directory, touched)
    # hidden, not a LoRA extension, unique; the name is cut so that the temp name stays within 255 bytes
    short = path.name.encode("utf-8")[:96].decode("utf-8", errors="ignore")
    tmp = directory / f".{short}.{os.getpid()}.{secrets.token_hex(8)}{TEMP_SUFFIX}"
    before: float | None = None
    try:
        safetensors.torch.save_file(dict(tensors), str(tmp), metadata=meta)
        if os.name == "posix":
            # safetensors creates files 0600; a LoRA is shared like any model file (ComfyUI in another account or
            # container), so give it the mode a plain open() would
            os.chmod(tmp, 0o666 & ~_current_umask())
        _fsync_file(tmp)
        before = _mtime(directory)
        _publish(tmp, path, overwrite)
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
    _fsync_dir(directory)
    if before is not None:
        touched[directory] = before  # compare with the moment just before the rename, not before the temp file
    for d, t in touched.items():
        _advance_mtime(d, t)


def sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` exactly as kohya's ``precalculate_safetensors_hashes``.

    Both hash the in-memory safetensors serialization of ``tensors`` with only the ``ss_*`` metadata (the
    training record, meant to be immutable; other keys may be edited later without changing the hash):
    the model hash is sha256 over everything after the 8-byte length + JSON header (i.e. the tensor bytes, so it
    equals the same hash of the saved file), the legacy hash is the first 8 hex digits of sha256 over the 64 KiB
    at offset 1 MiB (sha256 of nothing, "e3b0c442", for files under 1 MiB - kohya's behaviour too).
    Pass the tensors as they will be saved (after the dtype cast).
    """
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = safetensors.torch.save(dict(tensors), ss_only)
    view = memoryview(blob)
    header_len = int.from_bytes(view[:8], "little")
    model_hash = hashlib.sha256(view[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(view[_LEGACY_HASH_OFFSET : _LEGACY_HASH_OFFSET + _LEGACY_HASH_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


def prepare_tensors(
    tensors: Mapping[str, torch.Tensor], save_dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies, floating ones (``.alpha`` too, as kohya) cast to ``save_dtype``.

    Copies, because safetensors refuses tensors that share storage and training keeps using the originals.
    """
    if save_dtype is not None and save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype must be one of {SAVE_DTYPES} or None, got {save_dtype}")
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{key!r} is a {type(t).__name__}, not a tensor")
        dtype = save_dtype if (save_dtype is not None and t.is_floating_point()) else t.dtype
        out[key] = t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
    return out


def save_lora(
    tensors: Mapping[str, torch.Tensor],
    path: Path | str,
    metadata: Mapping[str, str],
    save_dtype: torch.dtype | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, str]:
    """Save a kohya LoRA state dict: cast, add ``sshs_model_hash``/``sshs_legacy_hash``, write atomically.

    Returns the metadata actually written. ``save_dtype`` None keeps each tensor's dtype (kohya's default
    save_precision). ``overwrite`` as in ``atomic_write_safetensors``.
    """
    prepared = prepare_tensors(tensors, save_dtype)
    meta = {k: v for k, v in _check_metadata(metadata).items() if k not in ("sshs_model_hash", "sshs_legacy_hash")}
    model_hash, legacy_hash = sshs_hashes(prepared, meta)
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    atomic_write_safetensors(path, prepared, meta, overwrite=overwrite)
    return meta


def read_lora(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors on CPU, metadata)`` of a .safetensors file; metadata is {} when the file has none."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, metadata


# ---------------------------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------------------------

_REQUIRED = object()

# Keys are kohya's ss_* names without "ss_"; defaults are kohya's argparse defaults (so a key the trainer leaves
# out records what kohya would have used). _REQUIRED: no honest default, the caller must say.
TRAINING_KEYS: dict[str, Any] = {
    "session_id": None,  # None: random.randint(0, 2**32), as kohya
    "training_started_at": None,  # None: time.time()
    "output_name": None,
    "learning_rate": _REQUIRED,
    "text_encoder_lr": None,
    "unet_lr": None,
    "num_batches_per_epoch": _REQUIRED,
    "num_epochs": _REQUIRED,
    "gradient_checkpointing": False,
    "gradient_accumulation_steps": 1,
    "max_train_steps": _REQUIRED,
    "lr_warmup_steps": 0,
    "lr_scheduler": "constant",
    "mixed_precision": "no",
    "full_fp16": False,
    "clip_skip": None,
    "max_token_length": None,
    "cache_latents": False,
    "seed": _REQUIRED,
    "lowram": False,
    "noise_offset": None,
    "multires_noise_iterations": None,
    "multires_noise_discount": 0.3,
    "adaptive_noise_scale": None,
    "zero_terminal_snr": False,
    "training_comment": None,
    "sd_scripts_commit_hash": UNKNOWN_COMMIT,
    "optimizer": _REQUIRED,  # class path, e.g. "torch.optim.adamw.AdamW"
    "optimizer_args": None,  # mapping -> "name(k=v,k=v)" as kohya, or None
    "max_grad_norm": 1.0,
    "prior_loss_weight": 1.0,
    "min_snr_gamma": None,
    "scale_weight_norms": None,
    "ip_noise_gamma": None,
    "debiased_estimation": False,
    "noise_offset_random_strength": False,
    "ip_noise_gamma_random_strength": False,
    "loss_type": "l2",
    "huber_schedule": "snr",
    "huber_scale": 1.0,
    "huber_c": 0.1,
    "fp8_base": False,
    "fp8_base_unet": False,
    "validation_seed": None,
    "validation_split": 0.0,
    "max_validation_steps": None,
    "validate_every_n_epochs": None,
    "validate_every_n_steps": None,
    "batch_size_per_device": 1,
    "total_batch_size": None,  # None: batch_size_per_device * gradient_accumulation_steps (one process)
    "sd_model_name": None,  # base name of the checkpoint, written only when given (as kohya)
    "sd_model_hash": None,
    "new_sd_model_hash": None,
    "vae_name": None,
    "vae_hash": None,
    "new_vae_hash": None,
    # not ss_* keys, they feed modelspec.*
    "v_parameterization": False,
    "min_timestep": None,
    "max_timestep": None,
}

DATASET_KEYS: dict[str, Any] = {
    "num_train_images": _REQUIRED,  # including repeats
    "num_validation_images": 0,
    "num_reg_images": 0,
    "resolution": _REQUIRED,  # int, (W, H) or "W,H"
    "enable_bucket": False,
    "bucket_no_upscale": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "color_aug": False,
    "flip_aug": False,
    "random_crop": False,
    "shuffle_caption": False,
    "keep_tokens": 0,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0,
    "face_crop_aug_range": None,
    "resize_interpolation": None,
    "dataset_dirs": _REQUIRED,  # {dir basename: {"n_repeats": r, "img_count": n}}
    "reg_dataset_dirs": None,  # same shape; None -> {}
    "tag_frequency": _REQUIRED,  # {dir basename: {tag: count}}, see tag_frequency()
    "bucket_info": None,  # see kohya_bucket_info(); None when buckets are off (kohya writes "null")
}

NETWORK_KEYS: dict[str, Any] = {
    "module": KOHYA_LORA_NETWORK_MODULE,
    "dim": _REQUIRED,
    "alpha": _REQUIRED,
    "dropout": None,
    "args": None,  # mapping of network_args; written as JSON only when non-empty (as kohya)
}

# kohya writes bool(args.x) for these store_true flags
_BOOL_KEYS = frozenset(
    {
        "gradient_checkpointing", "full_fp16", "cache_latents", "lowram", "zero_terminal_snr", "debiased_estimation",
        "noise_offset_random_strength", "ip_noise_gamma_random_strength", "fp8_base", "fp8_base_unet",
        "v_parameterization", "enable_bucket", "bucket_no_upscale", "color_aug", "flip_aug", "random_crop",
        "shuffle_caption",
    }
)

# the keys kohya keeps with --no_metadata (train_util.SS_METADATA_MINIMUM_KEYS)
SS_METADATA_MINIMUM_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)

JSON_SS_KEYS = frozenset(
    {"ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency", "ss_bucket_info", "ss_network_args"}
)


def _resolve(given: Mapping[str, Any], table: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Fill kohya's defaults; unknown keys (typos) and missing required keys are errors, not silent gaps."""
    unknown = sorted(set(given) - set(table))
    if unknown:
        raise ValueError(f"unknown {what} metadata keys {unknown}; known: {sorted(table)}")
    out = {}
    missing = []
    for key, default in table.items():
        if key in given:
            out[key] = given[key]
        elif default is _REQUIRED:
            missing.append(key)
        else:
            out[key] = default
    if missing:
        raise ValueError(f"{what} metadata needs {missing}")
    for key in _BOOL_KEYS:
        if key in out:
            out[key] = bool(out[key])
    return out


def _json_default(value: Any) -> Any:
    """numpy scalars/arrays and tuples reach us from dataset code; json needs plain Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _to_json(value: Any) -> str:
    if isinstance(value, str):
        json.loads(value)  # already JSON: must at least parse
        return value
    return json.dumps(value, default=_json_default)


def _resolution(value: Any) -> tuple[int, int]:
    """kohya's prepare_dataset_args: "W,H" / "S" / S -> (W, H) tuple; stored as str(tuple)."""
    if isinstance(value, str):
        value = tuple(int(r) for r in value.split(","))
    elif isinstance(value, (int, float)):
        value = (int(value),)
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        value = (value[0], value[0])
    if len(value) != 2:
        raise ValueError(f"resolution must be S, (W, H) or 'W,H', got {value}")
    return value  # type: ignore[return-value]


def _optimizer_string(name: str, args: Mapping[str, Any] | None) -> str:
    """kohya: optimizer_name + "(k=v,k=v)" when there are optimizer kwargs."""
    if not args:
        return str(name)
    return f"{name}(" + ",".join(f"{k}={v}" for k, v in args.items()) + ")"


def tag_frequency(captions_by_dir: Mapping[str, Iterable[str]]) -> dict[str, dict[str, int]]:
    """kohya's ``set_tag_frequency``: per image-folder basename, count of each lower-cased ','-separated tag.

    kohya always splits on ',' (not the caption separator), strips each tag and skips empty ones; pass the
    captions as read from the caption files (one per image, without repeats).
    """
    out: dict[str, dict[str, int]] = {}
    for dir_name, captions in captions_by_dir.items():
        freq = out.setdefault(dir_name, {})
        for caption in captions:
            for tag in caption.split(","):
                tag = tag.strip()
                if tag:
                    tag = tag.lower()
                    freq[tag] = freq.get(tag, 0) + 1
    return out


def kohya_bucket_info(bucket_counts: Mapping[Sequence[int], int], mean_img_ar_error: float) -> dict[str, Any]:
    """kohya's ``bucket_info``: ``{"buckets": {i: {"resolution": (W, H), "count": n}}, "mean_img_ar_error": e}``.

    ``bucket_counts``: images per used bucket, repeats included; ``i`` is the index in the sorted list of used
    buckets (kohya's BucketManager only holds buckets that received an image, then sorts them).
    ``mean_img_ar_error``: mean |bucket aspect - image aspect| over images without repeats (0 when none).
    """
    used = sorted(tuple(int(x) for x in reso) for reso, count in bucket_counts.items() if count > 0)
    counts = {tuple(int(x) for x in reso): int(c) for reso, c in bucket_counts.items()}
    return {
        "buckets": {i: {"resolution": reso, "count": counts[reso]} for i, reso in enumerate(used)},
        "mean_img_ar_error": float(mean_img_ar_error),
    }


def build_metadata(
    training: Mapping[str, Any],
    dataset: Mapping[str, Any],
    network: Mapping[str, Any],
    *,
    step: int,
    epoch: int,
    prompt: Mapping[str, Any] | None = None,
    extra_pnginfo: Mapping[str, Any] | None = None,
    title: str | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | None = None,
    trigger_phrase: str | None = None,
    usage_hint: str | None = None,
    implementation_version: str = DEFAULT_IMPLEMENTATION_VERSION,
    finished_at: float | None = None,
    minimal: bool = False,
) -> dict[str, str]:
    """The metadata kohya's ``sdxl_train_network.py`` writes into a LoRA, all values strings.

    ``training`` / ``dataset`` / ``network``: kohya's names without "ss_" (see TRAINING_KEYS, DATASET_KEYS,
    NETWORK_KEYS for the accepted keys, kohya's defaults and the required ones). Values are written as kohya does,
    ``str(value)`` ("True", "None", "(1024, 1024)", "0.0001"), and JSON for ss_dataset_dirs, ss_reg_dataset_dirs,
    ss_tag_frequency, ss_bucket_info and ss_network_args. ``step``/``epoch``: ss_steps / ss_epoch of this save;
    ``finished_at`` (default now) is ss_training_finished_at and the modelspec date.
    ``prompt`` / ``extra_pnginfo``: ComfyUI's hidden PROMPT and EXTRA_PNGINFO inputs, stored as JSON in
    ``comfyui.prompt`` and ``comfyui.workflow`` (extra_pnginfo["workflow"]) when present.
    ``minimal``: like kohya's --no_metadata, keep only SS_METADATA_MINIMUM_KEYS and modelspec.* (no dataset
    folder names, captions' tags or workflow, which may be private).
    The sshs_* hashes are added by ``save_lora``, since they depend on the saved tensors.
    """
    tr = _resolve(training, TRAINING_KEYS, "training")
    ds = _resolve(dataset, DATASET_KEYS, "dataset")
    nw = _resolve(network, NETWORK_KEYS, "network")
    resolution = _resolution(ds["resolution"])
    now = time.time() if finished_at is None else float(finished_at)
    started = time.time() if tr["training_started_at"] is None else tr["training_started_at"]
    session_id = random.randint(0, 2**32) if tr["session_id"] is None else tr["session_id"]
    total_batch_size = tr["total_batch_size"]
    if total_batch_size is None:
        total_batch_size = tr["batch_size_per_device"] * tr["gradient_accumulation_steps"]

    ss: dict[str, Any] = {
        "session_id": session_id,
        "training_started_at": started,
        "output_name": tr["output_name"],
        "learning_rate": tr["learning_rate"],
        "text_encoder_lr": tr["text_encoder_lr"],
        "unet_lr": tr["unet_lr"],
        "num_train_images": ds["num_train_images"],
        "num_validation_images": ds["num_validation_images"],
        "num_reg_images": ds["num_reg_images"],
        "num_batches_per_epoch": tr["num_batches_per_epoch"],
        "num_epochs": tr["num_epochs"],
        "gradient_checkpointing": tr["gradient_checkpointing"],
        "gradient_accumulation_steps": tr["gradient_accumulation_steps"],
        "max_train_steps": tr["max_train_steps"],
        "lr_warmup_steps": tr["lr_warmup_steps"],
        "lr_scheduler": tr["lr_scheduler"],
        "network_module": nw["module"],
        "network_dim": nw["dim"],
        "network_alpha": nw["alpha"],
        "network_dropout": nw["dropout"],
        "mixed_precision": tr["mixed_precision"],
        "full_fp16": tr["full_fp16"],
        "v2": False,
        "base_model_version": SDXL_BASE_MODEL_VERSION,
        "clip_skip": tr["clip_skip"],
        "max_token_length": tr["max_token_length"],
        "cache_latents": tr["cache_latents"],
        "seed": tr["seed"],
        "lowram": tr["lowram"],
        "noise_offset": tr["noise_offset"],
        "multires_noise_iterations": tr["multires_noise_iterations"],
        "multires_noise_discount": tr["multires_noise_discount"],
        "adaptive_noise_scale": tr["adaptive_noise_scale"],
        "zero_terminal_snr": tr["zero_terminal_snr"],
        "training_comment": tr["training_comment"],
        "sd_scripts_commit_hash": tr["sd_scripts_commit_hash"],
        "optimizer": _optimizer_string(tr["optimizer"], tr["optimizer_args"]),
        "max_grad_norm": tr["max_grad_norm"],
        "caption_dropout_rate": ds["caption_dropout_rate"],
        "caption_dropout_every_n_epochs": ds["caption_dropout_every_n_epochs"],
        "caption_tag_dropout_rate": ds["caption_tag_dropout_rate"],
        "face_crop_aug_range": ds["face_crop_aug_range"],
        "prior_loss_weight": tr["prior_loss_weight"],
        "min_snr_gamma": tr["min_snr_gamma"],
        "scale_weight_norms": tr["scale_weight_norms"],
        "ip_noise_gamma": tr["ip_noise_gamma"],
        "debiased_estimation": tr["debiased_estimation"],
        "noise_offset_random_strength": tr["noise_offset_random_strength"],
        "ip_noise_gamma_random_strength": tr["ip_noise_gamma_random_strength"],
        "loss_type": tr["loss_type"],
        "huber_schedule": tr["huber_schedule"],
        "huber_scale": tr["huber_scale"],
        "huber_c": tr["huber_c"],
        "fp8_base": tr["fp8_base"],
        "fp8_base_unet": tr["fp8_base_unet"],
        "validation_seed": tr["validation_seed"],
        "validation_split": tr["validation_split"],
        "max_validation_steps": tr["max_validation_steps"],
        "validate_every_n_epochs": tr["validate_every_n_epochs"],
        "validate_every_n_steps": tr["validate_every_n_steps"],
        "resize_interpolation": ds["resize_interpolation"],
        # single-dataset layout (kohya without --dataset_config)
        "batch_size_per_device": tr["batch_size_per_device"],
        "total_batch_size": total_batch_size,
        "resolution": resolution,
        "color_aug": ds["color_aug"],
        "flip_aug": ds["flip_aug"],
        "random_crop": ds["random_crop"],
        "shuffle_caption": ds["shuffle_caption"],
        "enable_bucket": ds["enable_bucket"],
        "bucket_no_upscale": ds["bucket_no_upscale"],
        "min_bucket_reso": ds["min_bucket_reso"],
        "max_bucket_reso": ds["max_bucket_reso"],
        "keep_tokens": ds["keep_tokens"],
        "dataset_dirs": _to_json(ds["dataset_dirs"]),
        "reg_dataset_dirs": _to_json(ds["reg_dataset_dirs"] if ds["reg_dataset_dirs"] is not None else {}),
        "tag_frequency": _to_json(ds["tag_frequency"]),
        "bucket_info": _to_json(ds["bucket_info"]),
    }
    if nw["args"]:
        ss["network_args"] = _to_json(nw["args"])
    if tr["sd_model_name"] is not None:
        ss["sd_model_name"] = tr["sd_model_name"]
        for key in ("sd_model_hash", "new_sd_model_hash"):
            if tr[key] is not None:
                ss[key] = tr[key]
    if tr["vae_name"] is not None:
        ss["vae_name"] = tr["vae_name"]
        for key in ("vae_hash", "new_vae_hash"):
            if tr[key] is not None:
                ss[key] = tr[key]
    ss["training_finished_at"] = now
    ss["steps"] = int(step)
    ss["epoch"] = int(epoch)

    metadata = {f"ss_{k}": str(v) for k, v in ss.items()}
    if minimal:
        metadata = {k: metadata[k] for k in SS_METADATA_MINIMUM_KEYS if k in metadata}
    else:
        if prompt is not None:
            metadata["comfyui.prompt"] = json.dumps(prompt, default=_json_default)
        if extra_pnginfo is not None and extra_pnginfo.get("workflow") is not None:
            metadata["comfyui.workflow"] = json.dumps(extra_pnginfo["workflow"], default=_json_default)

    metadata.update(
        modelspec_metadata(
            title=title if title is not None else tr["output_name"],
            timestamp=now,
            resolution=resolution,
            v_parameterization=tr["v_parameterization"],
            min_timestep=tr["min_timestep"],
            max_timestep=tr["max_timestep"],
            clip_skip=tr["clip_skip"],
            author=author,
            description=description,
            license=license,
            tags=tags,
            trigger_phrase=trigger_phrase,
            usage_hint=usage_hint,
            implementation_version=implementation_version,
        )
    )
    return metadata


def modelspec_metadata(
    *,
    title: str | None,
    timestamp: float,
    resolution: tuple[int, int],
    v_parameterization: bool = False,
    min_timestep: int | None = None,
    max_timestep: int | None = None,
    clip_skip: int | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | None = None,
    trigger_phrase: str | None = None,
    usage_hint: str | None = None,
    implementation_version: str = DEFAULT_IMPLEMENTATION_VERSION,
) -> dict[str, str]:
    """The modelspec.* keys kohya's sai_model_spec.build_metadata writes for an SDXL LoRA (ModelSpec 1.0.1).

    date: ISO-8601 local time of ``timestamp`` without microseconds; title defaults to "LoRA@<timestamp>";
    timestep_range only when a min or max timestep was set (missing end: 0 / 1000); encoder_layer = clip_skip.
    """
    if title is None:
        title = f"LoRA@{timestamp}"
    spec: dict[str, str | None] = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": MODELSPEC_ARCHITECTURE_SDXL_LORA,
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION_SDXL_LORA,
        "modelspec.title": str(title),
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.description": description,
        "modelspec.author": author,
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.license": license,
        "modelspec.tags": tags,
        "modelspec.trigger_phrase": trigger_phrase,
        "modelspec.usage_hint": usage_hint,
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
        "modelspec.implementation_version": implementation_version,
    }
    if min_timestep is not None or max_timestep is not None:
        lo = 0 if min_timestep is None else min_timestep
        hi = 1000 if max_timestep is None else max_timestep
        spec["modelspec.timestep_range"] = f"{lo},{hi}"
    if clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(clip_skip)
    return {k: v for k, v in spec.items() if v is not None}


__all__ = [
    "DATASET_KEYS",
    "JSON_SS_KEYS",
    "LORA_EXTENSION",
    "MODELSPEC_ARCHITECTURE_SDXL_LORA",
    "NETWORK_KEYS",
    "SAVE_DTYPES",
    "SDXL_BASE_MODEL_VERSION",
    "SS_METADATA_MINIMUM_KEYS",
    "TRAINING_KEYS",
    "atomic_write_safetensors",
    "build_metadata",
    "comfy_relative_name",
    "kohya_bucket_info",
    "modelspec_metadata",
    "prepare_tensors",
    "read_lora",
    "safe_relative_name",
    "save_lora",
    "sshs_hashes",
    "tag_frequency",
    "unique_lora_path",
]
