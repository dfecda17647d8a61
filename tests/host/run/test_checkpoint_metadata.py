"""The train node names and hashes the checkpoint its MODEL was loaded from (kohya's ss_sd_model_name,
ss_sd_model_hash, ss_new_sd_model_hash), found through the queued prompt with ComfyUI's own folder_paths."""

from __future__ import annotations

import hashlib

import folder_paths

from sdxl_lora_trainer.trainer.run.job import base_checkpoint_metadata


def test_the_checkpoint_behind_a_lora_loader_is_named_and_hashed(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints", ([str(tmp_path)], {".safetensors"}))
    data = bytes(range(256)) * 4500
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "base.safetensors").write_bytes(data)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl/base.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "lora_name": "x.safetensors"}},
        "7": {"class_type": "SDXLLoraTrain", "inputs": {"model": ["2", 0]}},
    }
    assert base_checkpoint_metadata(prompt, "7") == {
        "sd_model_name": "base.safetensors",
        "sd_model_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
        "new_sd_model_hash": hashlib.sha256(data).hexdigest(),
    }


def test_a_model_not_loaded_from_a_file_gets_no_model_keys(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints", ([str(tmp_path)], {".safetensors"}))
    tiny = {"1": {"class_type": "TinySDXLCheckpointLoader", "inputs": {}}, "7": {"inputs": {"model": ["1", 0]}}}
    assert base_checkpoint_metadata(tiny, "7") == {}
    gone = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "gone.safetensors"}}}
    gone["7"] = {"inputs": {"model": ["1", 0]}}
    assert base_checkpoint_metadata(gone, "7") == {}
    assert base_checkpoint_metadata(None, None) == {}
