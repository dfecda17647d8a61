"""The LoRA file: safe names, one name per run, atomic writes, kohya's metadata and addnet hashes, save dtypes."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from sdxl_lora_trainer.trainer import atomic_files
from sdxl_lora_trainer.trainer.network.file_names import safe_relative_name, unique_lora_path
from sdxl_lora_trainer.trainer.network.metadata import ModelCard, build_metadata, kohya_bucket_info, tag_frequency
from sdxl_lora_trainer.trainer.network.safetensors_file import (
    atomic_write_safetensors,
    read_lora,
    save_lora,
    sshs_hashes,
)

# ---------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------


def _lora_tensors(seed: int = 0, rows: int = 8) -> dict[str, torch.Tensor]:
    """A small kohya-keyed LoRA: fp32 down/up and a 0-dim fp32 alpha buffer per module, as networks.lora saves."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("lora_unet_input_blocks_4_1_proj_in", "lora_te1_text_model_encoder_layers_0_self_attn_k_proj"):
        out[f"{name}.lora_down.weight"] = torch.randn(4, rows, generator=g)
        out[f"{name}.lora_up.weight"] = torch.randn(rows, 4, generator=g)
        out[f"{name}.alpha"] = torch.tensor(2.0)
    return out


def _training(**over):
    d = {
        "learning_rate": 1e-4,
        "unet_lr": 1e-4,
        "text_encoder_lr": None,
        "max_train_steps": 100,
        "num_epochs": 5,
        "num_batches_per_epoch": 20,
        "optimizer": "torch.optim.adamw.AdamW",
        "optimizer_args": {"weight_decay": 0.01, "betas": (0.9, 0.999)},
        "seed": 42,
        "output_name": "my_lora",
        "session_id": 1234,
        "training_started_at": 1_700_000_000.5,
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
    }
    d.update(over)
    return d


def _dataset(**over):
    d = {
        "num_train_images": 40,
        "resolution": 1024,
        "enable_bucket": True,
        "dataset_dirs": {"10_cat": {"n_repeats": 10, "img_count": 4}},
        "tag_frequency": {"10_cat": {"cat": 4, "sitting": 1}},
        "bucket_info": {"buckets": {0: {"resolution": (1024, 1024), "count": 40}}, "mean_img_ar_error": 0.0},
        "flip_aug": 1,  # truthy, kohya writes bool(...)
    }
    d.update(over)
    return d


def _network(**over):
    d = {"dim": 16, "alpha": 8.0, "args": {"conv_dim": "4", "conv_alpha": "2"}}
    d.update(over)
    return d


PROMPT = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}}}
WORKFLOW = {"last_node_id": 1, "nodes": [{"id": 1, "type": "CheckpointLoaderSimple"}], "links": []}


def _metadata(**kw):
    args = {
        "step": 100,
        "epoch": 5,
        "prompt": PROMPT,
        "extra_pnginfo": {"workflow": WORKFLOW},
        "finished_at": 1_700_000_100.25,
    }
    args.update(kw)
    return build_metadata(_training(), _dataset(), _network(), **args)


def _data_section(path: Path) -> bytes:
    """Bytes after the 8-byte little-endian header length and the JSON header (kohya's addnet_hash_safetensors)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw[8 + n :]


# ---------------------------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------------------------

ESCAPING_SUBFOLDERS = [
    "../x",
    "/abs",
    "C:\\x",
    "C:/x",
    "C:",
    "a/../../b",
    "..\\x",
    "a\\..\\..\\b",
    "..",
    "a/..",
    "./x",
    "a//b",
    "~/x",
    "x\x00y",
    "x\ny",
    ".git",
    "a/.hidden",
    "\\\\server\\share",
    "CON",
    "a/b.",
    "a/ b",
    "a?b",
]

BAD_STEMS = [
    "../x",
    "/abs",
    "C:\\x",
    "..\\x",
    "a/b",
    "a/../../b",
    "",
    "   ",
    ".hidden",
    "..",
    "x\x00",
    "nul",
    "x:y",
    ".safetensors",
]


@pytest.mark.parametrize("subfolder", ESCAPING_SUBFOLDERS)
def test_bad_subfolders_rejected(subfolder):
    with pytest.raises(ValueError):
        safe_relative_name(subfolder, "lora")


@pytest.mark.parametrize("stem", BAD_STEMS)
def test_bad_stems_rejected(stem):
    with pytest.raises(ValueError):
        safe_relative_name("", stem)


@pytest.mark.parametrize("subfolder", ["../x", "/abs", "C:\\x", "a/../../b", "..\\x"])
def test_unique_lora_path_rejects_escapes_and_creates_nothing(tmp_path, subfolder):
    root = tmp_path / "loras"
    root.mkdir()
    with pytest.raises(ValueError):
        unique_lora_path(root, subfolder, "lora", "run1")
    with pytest.raises(ValueError):
        unique_lora_path(root, "", subfolder, "run1")
    assert list(tmp_path.rglob("*")) == [root]


@pytest.mark.parametrize("tag", ["../x", "a/b", "C:x", "..", "x\x00"])
def test_bad_run_tag_rejected(tmp_path, tag):
    with pytest.raises(ValueError):
        unique_lora_path(tmp_path, "", "lora", tag)


def test_error_messages_explain_the_rule():
    with pytest.raises(ValueError, match=r"'\.\.'.*must stay inside the loras folder"):
        safe_relative_name("a/../../b", "x")
    with pytest.raises(ValueError, match="absolute"):
        safe_relative_name("/abs", "x")
    with pytest.raises(ValueError, match="backslash"):
        safe_relative_name("..\\x", "x")
    with pytest.raises(ValueError, match="drive"):
        safe_relative_name("C:", "x")
    with pytest.raises(ValueError, match="NUL"):
        safe_relative_name("", "x\x00")
    with pytest.raises(ValueError, match="empty"):
        safe_relative_name("", "")


@pytest.mark.parametrize(
    "subfolder, stem, expected",
    [
        ("", "my lora", "my lora"),
        ("a/b/", "x.safetensors", "a/b/x"),
        ("  sub ", " name ", "sub/name"),
        ("people/cats", "Tabby-v2", "people/cats/Tabby-v2"),
        ("", "ünïcødé_名前", "ünïcødé_名前"),
        ("x..y", "a..b", "x..y/a..b"),  # '..' inside a name is just characters
    ],
)
def test_good_names_pass(subfolder, stem, expected):
    assert safe_relative_name(subfolder, stem) == expected


# ---------------------------------------------------------------------------------------------------------------
# unique names per run
# ---------------------------------------------------------------------------------------------------------------


def test_unique_name_layout_and_nothing_created(tmp_path):
    path, rel = unique_lora_path(tmp_path, "sub/dir", "cat", "20240101-120000")
    assert path == tmp_path / "sub" / "dir" / "cat_20240101-120000.safetensors"
    assert rel == "sub/dir/cat_20240101-120000.safetensors"  # folder_paths' relpath form on POSIX
    assert (tmp_path / rel) == path
    assert not (tmp_path / "sub").exists()


def test_root_level_name_has_no_separator(tmp_path):
    path, rel = unique_lora_path(tmp_path, "", "cat", "r1")
    assert rel == "cat_r1.safetensors" and path == tmp_path / rel


def test_empty_run_tag(tmp_path):
    assert unique_lora_path(tmp_path, "", "cat", "")[1] == "cat.safetensors"


def test_different_runs_get_different_names(tmp_path):
    a = unique_lora_path(tmp_path, "", "cat", "run1")
    b = unique_lora_path(tmp_path, "", "cat", "run2")
    assert a[0] != b[0] and a[1] != b[1]


def test_taken_names_get_numbered_suffixes(tmp_path):
    first, _ = unique_lora_path(tmp_path, "s", "cat", "r")
    first.parent.mkdir(parents=True)
    first.write_bytes(b"old")
    second, rel2 = unique_lora_path(tmp_path, "s", "cat", "r")
    assert second.name == "cat_r_2.safetensors" and rel2 == "s/cat_r_2.safetensors"
    second.write_bytes(b"old2")
    third, _ = unique_lora_path(tmp_path, "s", "cat", "r")
    assert third.name == "cat_r_3.safetensors"
    assert first.read_bytes() == b"old" and second.read_bytes() == b"old2"


def test_dangling_symlink_and_folder_count_as_taken(tmp_path):
    (tmp_path / "cat_r.safetensors").symlink_to(tmp_path / "nowhere")
    (tmp_path / "cat_r_2.safetensors").mkdir()
    assert unique_lora_path(tmp_path, "", "cat", "r")[0].name == "cat_r_3.safetensors"


def test_names_in_other_lora_folders_are_taken(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (b / "s").mkdir(parents=True)
    (b / "s" / "cat_r.safetensors").write_bytes(b"x")
    path, rel = unique_lora_path(a, "s", "cat", "r", also_taken_in=[b])
    assert path == a / "s" / "cat_r_2.safetensors" and rel == "s/cat_r_2.safetensors"


def test_overwrite_true_returns_the_existing_name(tmp_path):
    (tmp_path / "cat_r.safetensors").write_bytes(b"old")
    path, rel = unique_lora_path(tmp_path, "", "cat", "r", overwrite=True)
    assert path == tmp_path / "cat_r.safetensors" and rel == "cat_r.safetensors"


def test_existing_file_untouched_by_default(tmp_path):
    target = tmp_path / "cat_r.safetensors"
    safetensors.torch.save_file({"w": torch.ones(3)}, str(target), metadata={"ss_x": "old"})
    before = target.read_bytes()
    mtime = target.stat().st_mtime_ns
    with pytest.raises(FileExistsError):
        save_lora(_lora_tensors(), target, {"ss_x": "new"})
    with pytest.raises(FileExistsError):
        atomic_write_safetensors(target, {"w": torch.zeros(3)}, {})
    assert target.read_bytes() == before and target.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat_r.safetensors"]


def test_existing_file_refused_before_serializing(tmp_path, monkeypatch):
    """Refuse up front: a large LoRA is not serialized (nor a temp file written) only to be thrown away."""
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"old")
    calls = []
    monkeypatch.setattr(safetensors.torch, "save", lambda *a, **k: calls.append(a))
    with pytest.raises(FileExistsError):
        atomic_write_safetensors(target, {"w": torch.ones(2)}, {})
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_overwrite_true_replaces(tmp_path):
    target = tmp_path / "cat_r.safetensors"
    target.write_bytes(b"old bytes")
    tensors = _lora_tensors(1)
    save_lora(tensors, target, {"ss_x": "new"}, overwrite=True)
    back, meta = read_lora(target)
    assert meta["ss_x"] == "new"
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat_r.safetensors"]


def test_publish_never_clobbers_a_file_that_appeared_meanwhile(tmp_path, monkeypatch):
    """Two runs racing for one name: the check at the start passed, the name is taken before the rename."""
    target = tmp_path / "cat_r.safetensors"
    real_write = atomic_files.write_temp

    def write_then_competitor_writes(tmp, data):
        real_write(tmp, data)
        target.write_bytes(b"competitor")

    monkeypatch.setattr(atomic_files, "write_temp", write_then_competitor_writes)
    with pytest.raises(FileExistsError):
        atomic_write_safetensors(target, {"w": torch.ones(2)}, {})
    assert target.read_bytes() == b"competitor"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat_r.safetensors"]


# ---------------------------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------------------------


def test_failed_write_leaves_no_temp_and_no_partial_file(tmp_path, monkeypatch):
    seen = []

    def partial_then_fail(tmp, data):
        seen.append(Path(tmp))
        Path(tmp).write_bytes(bytes(data[:20]))  # half a file, then the crash
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(atomic_files, "write_temp", partial_then_fail)
    target = tmp_path / "sub" / "cat_r.safetensors"
    with pytest.raises(OSError, match="could not write cat_r.safetensors in .*sub .*Input/output error"):
        save_lora(_lora_tensors(), target, {"ss_x": "1"})
    assert len(seen) == 1 and seen[0].parent == target.parent and seen[0] != target
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_failed_write_keeps_the_old_file_when_overwriting(tmp_path, monkeypatch):
    target = tmp_path / "cat_r.safetensors"
    target.write_bytes(b"previous good file")

    def fail(tmp, data):
        Path(tmp).write_bytes(b"garbage")
        raise OSError(5, "I/O error")

    monkeypatch.setattr(atomic_files, "write_temp", fail)
    with pytest.raises(OSError, match="I/O error"):
        atomic_write_safetensors(target, {"w": torch.ones(2)}, {}, overwrite=True)
    assert target.read_bytes() == b"previous good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat_r.safetensors"]


def test_failed_rename_leaves_no_temp(tmp_path, monkeypatch):
    def broken_publish(tmp, path, overwrite):
        raise PermissionError("denied")

    monkeypatch.setattr(atomic_files, "publish", broken_publish)
    with pytest.raises(OSError, match=r"could not write x.safetensors in .* \(denied;"):
        atomic_write_safetensors(tmp_path / "x.safetensors", {"w": torch.ones(2)}, {})
    assert list(tmp_path.iterdir()) == []


def test_temp_file_is_hidden_in_the_same_folder_and_not_a_lora_extension(tmp_path, monkeypatch):
    real_write = atomic_files.write_temp
    seen = []

    def spy(tmp, data):
        seen.append(Path(tmp))
        real_write(tmp, data)

    monkeypatch.setattr(atomic_files, "write_temp", spy)
    target = tmp_path / "cat_r.safetensors"
    atomic_write_safetensors(target, {"w": torch.ones(2)}, {})
    (tmp,) = seen
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == ".tmp"
    assert atomic_files.TEMP_NAME.match(tmp.name).group("pid") == str(os.getpid())
    assert not tmp.exists() and target.is_file()


def test_longest_allowed_name_can_be_written(tmp_path):
    stem = "名" * 66  # 198 bytes, just under the stem limit
    path, rel = unique_lora_path(tmp_path, "", stem, "20240101-120000")
    save_lora(_lora_tensors(), path, {})
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [rel]
    with pytest.raises(ValueError, match="longer than"):
        unique_lora_path(tmp_path, "", "名" * 67, "r")


def test_non_string_metadata_rejected_before_writing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_safetensors(tmp_path / "x.safetensors", {"w": torch.ones(2)}, {"ss_steps": 3})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_file_gets_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    target = tmp_path / "x.safetensors"
    atomic_write_safetensors(target, {"w": torch.ones(2)}, {})
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_folder_mtime_moves_even_when_the_clock_tick_does_not(tmp_path, monkeypatch):
    """Simulate a coarse-timestamp file system: the rename leaves the folder's mtime where it was.

    ComfyUI's get_filename_list cache would then never see the new file; the writer must move the mtime on.
    """
    real_publish = atomic_files.publish
    recorded = {}

    def coarse_publish(tmp, path, overwrite):
        st = os.stat(path.parent)
        recorded["before"] = st.st_mtime
        real_publish(tmp, path, overwrite)
        os.utime(path.parent, ns=(st.st_atime_ns, st.st_mtime_ns))  # same tick: mtime unchanged

    monkeypatch.setattr(atomic_files, "publish", coarse_publish)
    atomic_write_safetensors(tmp_path / "x.safetensors", {"w": torch.ones(2)}, {})
    assert os.path.getmtime(tmp_path) > recorded["before"]


def test_created_subfolders_move_the_parent_mtime(tmp_path, monkeypatch):
    """A new subfolder is noticed by ComfyUI only through its parent's mtime: freeze it and check it moves."""
    root = tmp_path / "loras"
    root.mkdir()
    frozen = os.stat(root)
    real_mkdir = Path.mkdir

    def coarse_mkdir(self, *a, **k):
        real_mkdir(self, *a, **k)
        if self.parent == root:
            os.utime(root, ns=(frozen.st_atime_ns, frozen.st_mtime_ns))

    monkeypatch.setattr(Path, "mkdir", coarse_mkdir)
    atomic_write_safetensors(root / "new" / "x.safetensors", {"w": torch.ones(2)}, {})
    assert os.path.getmtime(root) > frozen.st_mtime


def test_parent_folders_are_created(tmp_path):
    target = tmp_path / "a" / "b" / "x.safetensors"
    atomic_write_safetensors(target, {"w": torch.ones(2)}, {"k": "v"})
    tensors, meta = read_lora(target)
    assert meta == {"k": "v"} and torch.equal(tensors["w"], torch.ones(2))


def test_read_lora_without_metadata(tmp_path):
    target = tmp_path / "x.safetensors"
    safetensors.torch.save_file({"w": torch.arange(3)}, str(target))
    tensors, meta = read_lora(target)
    assert meta == {} and torch.equal(tensors["w"], torch.arange(3))


# ---------------------------------------------------------------------------------------------------------------
# save dtypes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_save_dtype_casts_every_tensor_like_kohya(tmp_path, dtype):
    """kohya's save_weights casts every tensor of the state dict: also the int64 alpha a module gets when its
    alpha is 0 (= rank)."""
    tensors = _lora_tensors()
    tensors["rank_alpha.alpha"] = torch.tensor(4, dtype=torch.int64)
    originals = {k: v.clone() for k, v in tensors.items()}
    target = tmp_path / "x.safetensors"
    save_lora(tensors, target, {}, dtype)
    back, _ = read_lora(target)
    assert set(back) == set(tensors)
    for k, v in originals.items():
        assert back[k].dtype == dtype, k
        assert torch.equal(back[k], v.to(dtype)), k
    alpha_keys = [k for k in back if k.endswith(".alpha")]
    assert len(alpha_keys) > 1 and all(back[k].shape == () and back[k].dtype == dtype for k in alpha_keys)
    assert back["rank_alpha.alpha"].item() == 4
    # the caller's tensors are not changed
    assert all(tensors[k].dtype == originals[k].dtype and torch.equal(tensors[k], originals[k]) for k in tensors)


def test_save_dtype_none_keeps_dtypes(tmp_path):
    tensors = {"a.lora_down.weight": torch.ones(2, 2, dtype=torch.bfloat16), "a.alpha": torch.tensor(1.0)}
    save_lora(tensors, tmp_path / "x.safetensors", {}, None)
    back, _ = read_lora(tmp_path / "x.safetensors")
    assert back["a.lora_down.weight"].dtype == torch.bfloat16 and back["a.alpha"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8])
def test_unsupported_save_dtype_rejected(tmp_path, dtype):
    with pytest.raises(ValueError):
        save_lora(_lora_tensors(), tmp_path / "x.safetensors", {}, dtype)
    assert list(tmp_path.iterdir()) == []


def test_grad_noncontiguous_and_shared_tensors_save(tmp_path):
    base = torch.randn(4, 6, requires_grad=True)
    tensors = {"a.lora_down.weight": base, "a.lora_up.weight": base.t(), "b.lora_down.weight": base}
    save_lora(tensors, tmp_path / "x.safetensors", {}, torch.float32)
    back, _ = read_lora(tmp_path / "x.safetensors")
    assert torch.equal(back["a.lora_up.weight"], base.detach().t())
    assert torch.equal(back["b.lora_down.weight"], base.detach())


# ---------------------------------------------------------------------------------------------------------------
# addnet hashes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sshs_model_hash_is_sha256_of_the_saved_tensor_bytes(tmp_path, dtype):
    target = tmp_path / "x.safetensors"
    written = save_lora(_lora_tensors(3), target, _metadata(), dtype)
    expected = hashlib.sha256(_data_section(target)).hexdigest()
    _, meta = read_lora(target)
    assert meta["sshs_model_hash"] == expected == written["sshs_model_hash"]
    assert re.fullmatch(r"[0-9a-f]{64}", meta["sshs_model_hash"])


def test_sshs_legacy_hash_for_a_file_over_one_mib(tmp_path):
    """kohya: sha256 of bytes [1 MiB, 1 MiB + 64 KiB) of the file serialized with only the ss_* metadata."""
    tensors = {"a.lora_down.weight": torch.randn(400_000, generator=torch.Generator().manual_seed(5))}
    target = tmp_path / "x.safetensors"
    save_lora(tensors, target, _metadata(), torch.float32)
    back, meta = read_lora(target)
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    assert "sshs_model_hash" not in ss_only and "modelspec.title" not in ss_only and "comfyui.prompt" not in ss_only
    blob = safetensors.torch.save(back, ss_only)
    assert len(blob) > 0x110000
    expected = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    assert meta["sshs_legacy_hash"] == expected
    assert expected != hashlib.sha256(b"").hexdigest()[:8]


def test_sshs_legacy_hash_for_a_small_file_is_sha256_of_nothing(tmp_path):
    target = tmp_path / "x.safetensors"
    save_lora(_lora_tensors(), target, _metadata(), torch.float16)
    assert read_lora(target)[1]["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"


def test_hashes_ignore_non_ss_metadata_but_not_tensors():
    tensors = {"w": torch.randn(300_000, generator=torch.Generator().manual_seed(1))}
    a = sshs_hashes(tensors, {"ss_x": "1", "modelspec.title": "a", "comfyui.prompt": "{}"})
    b = sshs_hashes(tensors, {"ss_x": "1", "modelspec.title": "a much longer title", "sshs_model_hash": "stale"})
    assert a == b
    changed = {"w": tensors["w"].clone()}
    changed["w"][0] += 1
    assert sshs_hashes(changed, {"ss_x": "1"})[0] != a[0]
    # ss_* metadata shifts the bytes the legacy hash reads (it is part of the serialized header)
    assert sshs_hashes(tensors, {"ss_x": "1" * 40})[1] != a[1]


def test_stale_hashes_in_the_given_metadata_are_replaced(tmp_path):
    target = tmp_path / "x.safetensors"
    save_lora(_lora_tensors(), target, {"ss_x": "1", "sshs_model_hash": "stale", "sshs_legacy_hash": "stale"})
    meta = read_lora(target)[1]
    assert meta["sshs_model_hash"] == hashlib.sha256(_data_section(target)).hexdigest()
    assert meta["sshs_legacy_hash"] == "e3b0c442"


# ---------------------------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------------------------

# every ss_* key kohya's train_network.py writes for a single dataset without --dataset_config (plus the per-save ones)
KOHYA_SS_KEYS = {
    "ss_session_id",
    "ss_training_started_at",
    "ss_output_name",
    "ss_learning_rate",
    "ss_text_encoder_lr",
    "ss_unet_lr",
    "ss_num_train_images",
    "ss_num_validation_images",
    "ss_num_reg_images",
    "ss_num_batches_per_epoch",
    "ss_num_epochs",
    "ss_gradient_checkpointing",
    "ss_gradient_accumulation_steps",
    "ss_max_train_steps",
    "ss_lr_warmup_steps",
    "ss_lr_scheduler",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_dropout",
    "ss_mixed_precision",
    "ss_full_fp16",
    "ss_v2",
    "ss_base_model_version",
    "ss_clip_skip",
    "ss_max_token_length",
    "ss_cache_latents",
    "ss_seed",
    "ss_lowram",
    "ss_noise_offset",
    "ss_multires_noise_iterations",
    "ss_multires_noise_discount",
    "ss_adaptive_noise_scale",
    "ss_zero_terminal_snr",
    "ss_training_comment",
    "ss_sd_scripts_commit_hash",
    "ss_optimizer",
    "ss_max_grad_norm",
    "ss_caption_dropout_rate",
    "ss_caption_dropout_every_n_epochs",
    "ss_caption_tag_dropout_rate",
    "ss_face_crop_aug_range",
    "ss_prior_loss_weight",
    "ss_min_snr_gamma",
    "ss_scale_weight_norms",
    "ss_ip_noise_gamma",
    "ss_debiased_estimation",
    "ss_noise_offset_random_strength",
    "ss_ip_noise_gamma_random_strength",
    "ss_loss_type",
    "ss_huber_schedule",
    "ss_huber_scale",
    "ss_huber_c",
    "ss_fp8_base",
    "ss_fp8_base_unet",
    "ss_validation_seed",
    "ss_validation_split",
    "ss_max_validation_steps",
    "ss_validate_every_n_epochs",
    "ss_validate_every_n_steps",
    "ss_resize_interpolation",
    "ss_batch_size_per_device",
    "ss_total_batch_size",
    "ss_resolution",
    "ss_color_aug",
    "ss_flip_aug",
    "ss_random_crop",
    "ss_shuffle_caption",
    "ss_enable_bucket",
    "ss_bucket_no_upscale",
    "ss_min_bucket_reso",
    "ss_max_bucket_reso",
    "ss_keep_tokens",
    "ss_dataset_dirs",
    "ss_reg_dataset_dirs",
    "ss_tag_frequency",
    "ss_bucket_info",
    "ss_network_args",
    "ss_training_finished_at",
    "ss_steps",
    "ss_epoch",
}

MODELSPEC_KEYS = {
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.title",
    "modelspec.resolution",
    "modelspec.date",
    "modelspec.prediction_type",
    "modelspec.implementation_version",
}


def test_all_kohya_keys_present_and_all_values_strings():
    meta = _metadata()
    assert set(meta) >= KOHYA_SS_KEYS, sorted(KOHYA_SS_KEYS - set(meta))
    assert set(meta) >= MODELSPEC_KEYS, sorted(MODELSPEC_KEYS - set(meta))
    assert {"comfyui.prompt", "comfyui.workflow"} <= set(meta)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert not {k for k in meta if k.startswith("sshs_")}  # added at save time


def test_json_values_parse_to_what_was_given():
    meta = _metadata()
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_cat": {"n_repeats": 10, "img_count": 4}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {}
    assert json.loads(meta["ss_tag_frequency"]) == {"10_cat": {"cat": 4, "sitting": 1}}
    assert json.loads(meta["ss_bucket_info"]) == {
        "buckets": {"0": {"resolution": [1024, 1024], "count": 40}},
        "mean_img_ar_error": 0.0,
    }
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2"}
    assert json.loads(meta["comfyui.prompt"]) == PROMPT
    assert json.loads(meta["comfyui.workflow"]) == WORKFLOW


def test_values_are_written_like_kohyas_str():
    meta = _metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "16" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_network_dropout"] == "None"
    assert meta["ss_learning_rate"] == "0.0001" and meta["ss_text_encoder_lr"] == "None"
    assert meta["ss_resolution"] == "(1024, 1024)"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.999))"
    assert meta["ss_gradient_checkpointing"] == "True" and meta["ss_flip_aug"] == "True"
    assert meta["ss_color_aug"] == "False" and meta["ss_cache_latents"] == "False"
    assert meta["ss_mixed_precision"] == "bf16"
    assert meta["ss_session_id"] == "1234" and meta["ss_training_started_at"] == "1700000000.5"
    assert meta["ss_training_finished_at"] == "1700000100.25"
    assert meta["ss_steps"] == "100" and meta["ss_epoch"] == "5"
    assert meta["ss_num_train_images"] == "40" and meta["ss_num_reg_images"] == "0"
    assert meta["ss_total_batch_size"] == "1"
    # kohya's argparse defaults for keys the trainer did not give
    assert meta["ss_lr_scheduler"] == "constant" and meta["ss_max_grad_norm"] == "1.0"
    assert meta["ss_multires_noise_discount"] == "0.3" and meta["ss_loss_type"] == "l2"
    assert meta["ss_min_bucket_reso"] == "256" and meta["ss_max_bucket_reso"] == "1024"


def test_modelspec_for_an_sdxl_lora():
    meta = _metadata()
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.title"] == "my_lora"
    assert meta["modelspec.resolution"] == "1024x1024"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["modelspec.date"])
    assert datetime.datetime.fromisoformat(meta["modelspec.date"]).timestamp() == 1_700_000_100
    assert "modelspec.timestep_range" not in meta and "modelspec.encoder_layer" not in meta
    assert "modelspec.author" not in meta


def test_modelspec_optional_fields():
    meta = build_metadata(
        _training(min_timestep=100, clip_skip=2, v_parameterization=True),
        _dataset(resolution="896,1152"),
        _network(),
        step=1,
        epoch=1,
        card=ModelCard(title="Nice LoRA", author="me", trigger_phrase="tabby cat"),
    )
    assert meta["modelspec.timestep_range"] == "100,1000"
    assert meta["modelspec.encoder_layer"] == "2" and meta["ss_clip_skip"] == "2"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.resolution"] == "896x1152" and meta["ss_resolution"] == "(896, 1152)"
    assert meta["modelspec.title"] == "Nice LoRA" and meta["modelspec.author"] == "me"
    assert meta["modelspec.trigger_phrase"] == "tabby cat"
    assert "comfyui.prompt" not in meta and "comfyui.workflow" not in meta  # not run from a graph


def test_workflow_missing_from_extra_pnginfo_is_left_out():
    meta = _metadata(extra_pnginfo={})
    assert "comfyui.workflow" not in meta and "comfyui.prompt" in meta


def test_network_args_absent_when_empty_like_kohya():
    meta = build_metadata(_training(), _dataset(), _network(args={}), step=1, epoch=1)
    assert "ss_network_args" not in meta


def test_unset_session_and_start_time_are_filled():
    tr = _training()
    del tr["session_id"], tr["training_started_at"]
    meta = build_metadata(tr, _dataset(), _network(), step=1, epoch=1)
    assert 0 <= int(meta["ss_session_id"]) <= 2**32
    assert float(meta["ss_training_started_at"]) > 1_600_000_000


def test_model_names_written_only_when_given():
    meta = build_metadata(_training(), _dataset(), _network(), step=1, epoch=1)
    assert "ss_sd_model_name" not in meta and "ss_vae_name" not in meta
    meta = build_metadata(
        _training(sd_model_name="sd_xl_base_1.0.safetensors", new_sd_model_hash="ab" * 32),
        _dataset(),
        _network(),
        step=1,
        epoch=1,
    )
    assert meta["ss_sd_model_name"] == "sd_xl_base_1.0.safetensors" and meta["ss_new_sd_model_hash"] == "ab" * 32
    assert "ss_sd_model_hash" not in meta


@pytest.mark.parametrize(
    "part, key",
    [
        ("training", "learning_rate"),
        ("training", "seed"),
        ("dataset", "tag_frequency"),
        ("network", "dim"),
        ("network", "alpha"),
    ],
)
def test_missing_required_key_is_an_error(part, key):
    parts = {"training": _training(), "dataset": _dataset(), "network": _network()}
    del parts[part][key]
    with pytest.raises(ValueError, match=key):
        build_metadata(parts["training"], parts["dataset"], parts["network"], step=1, epoch=1)


def test_unknown_key_is_an_error():
    with pytest.raises(ValueError, match="learnig_rate"):
        build_metadata(_training(learnig_rate=1), _dataset(), _network(), step=1, epoch=1)


def test_minimal_metadata_like_kohyas_no_metadata():
    meta = _metadata(minimal=True)
    ss = {k for k in meta if k.startswith("ss_")}
    assert ss == {
        "ss_v2",
        "ss_base_model_version",
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_args",
    }
    assert set(meta) >= MODELSPEC_KEYS
    assert not any(k.startswith("comfyui.") for k in meta)


def test_metadata_survives_the_file_round_trip(tmp_path):
    meta = _metadata()
    target = tmp_path / "x.safetensors"
    written = save_lora(_lora_tensors(), target, meta, torch.float16)
    assert read_lora(target)[1] == written
    assert {k: v for k, v in written.items() if not k.startswith("sshs_")} == meta


def test_tag_frequency_like_kohya():
    freq = tag_frequency({"10_cat": ["Cat, sitting,  ,cat", "cat,Window"], "5_dog": [""]})
    assert freq == {"10_cat": {"cat": 3, "sitting": 1, "window": 1}, "5_dog": {}}


def test_bucket_info_indexes_the_sorted_used_buckets():
    info = kohya_bucket_info({(1024, 1024): 3, (832, 1216): 5, (1216, 832): 0}, 0.0125)
    assert info == {
        "buckets": {0: {"resolution": (832, 1216), "count": 5}, 1: {"resolution": (1024, 1024), "count": 3}},
        "mean_img_ar_error": 0.0125,
    }
    assert json.loads(json.dumps(info))["buckets"]["1"]["resolution"] == [1024, 1024]
