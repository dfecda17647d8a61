"""Safe, unique LoRA file names inside ComfyUI's loras folder.

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
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

LORA_EXTENSION = ".safetensors"

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
            raise ValueError(
                f"LoRA name {stem!r} is an absolute path; give a plain name (folders go in the subfolder input)"
            )
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
