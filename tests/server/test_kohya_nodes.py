"""Scale out and back through a real server: the export example writes a kohya run folder that reads back as the
same run, a kohya config drives the Train node, and a wrong import source is refused when the prompt is queued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from comfy_server import ServerError, execution_error
from dataset_factory import kohya_folder
from safetensors import safe_open
from test_example_workflows import example
from workflow_convert import for_ci, nodes_of, only_node, upstream, workflow_to_prompt

from sdxl_lora_trainer.trainer.data.assemble import dataset_from_toml
from sdxl_lora_trainer.trainer.kohya_config.config_import import read_kohya_config_file


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


@pytest.fixture(scope="module")
def kohya_dataset(server) -> str:
    kohya_folder(server.base / "input" / "kohya_io", {"2_cat": [(64, 64), (64, 48)], "1_dog": [(64, 64)]})
    return "kohya_io"


def run_ok(server, prompt: dict) -> dict:
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    return entry


def test_the_export_example_writes_a_kohya_run_of_the_same_settings(server, object_info, kohya_dataset):
    prompt = for_ci(workflow_to_prompt(example("export_kohya_run"), object_info), folder=kohya_dataset, steps=3)
    train, export = only_node(prompt, "SDXLLoraTrain"), only_node(prompt, "SDXLLoraKohyaExport")
    prompt[export]["inputs"].update(export_name="ci_export", num_processes=4)
    prompt[only_node(prompt, "SDXLLoraCacheText")]["inputs"]["max_token_length"] = "225"
    entry = run_ok(server, upstream(prompt, [train, export]))
    folder = entry["outputs"][export]["text"][0].splitlines()[0].removeprefix("kohya run written to ")
    assert folder.endswith("kohya_runs/ci_export")
    config = read_kohya_config_file(f"{folder}/config.toml")
    settings_node = only_node(prompt, "SDXLLoraTrainSettings")
    widgets = prompt[settings_node]["inputs"]
    assert config["max_train_steps"] == widgets["max_train_steps"] == 3
    assert config["learning_rate"] == widgets["learning_rate"] and config["seed"] == widgets["seed"]
    assert config["network_dim"] == prompt[only_node(prompt, "SDXLLoraNetwork")]["inputs"]["network_dim"]
    assert config["max_token_length"] == 225  # Cache Text's choice
    assert "--num_processes 4 --multi_gpu" in Path(folder, "launch.sh").read_text()
    # the dataset reads back as the dataset the graph trained on
    back, _ = dataset_from_toml(f"{folder}/dataset.toml")
    assert sorted((i.item.caption, i.item.num_repeats) for i in back.images) == [
        ("cat photo 0, shape 0", 2),
        ("cat photo 1, shape 1", 2),
        ("dog photo 0, shape 2", 1),
    ]
    # the tiny CI model is not a checkpoint file: the report says so instead of inventing a path
    assert "TinySDXLCheckpointLoader" in entry["outputs"][export]["text"][0]
    assert "pretrained_model_name_or_path" not in config
    # the Train node trained with the shared settings and says where they came from
    assert "training settings from the 'Train Settings' node" in entry["outputs"][train]["text"][0]


def test_a_kohya_config_drives_the_train_node(server, object_info, kohya_dataset):
    config_path = server.base / "input" / "kohya_io_config.toml"
    config_path.write_text(
        '[network_arguments]\nnetwork_module = "networks.lora"\nnetwork_dim = 6\nnetwork_alpha = 3\n'
        'network_args = ["conv_dim=2", "conv_alpha=1"]\nnetwork_train_unet_only = true\n'
        '[optimizer_arguments]\noptimizer_type = "AdamW"\nlearning_rate = 0.002\nmax_grad_norm = 0.5\n'
        'lr_scheduler = "linear"\n'
        "[training_arguments]\nmax_train_steps = 2\nseed = 9\nmin_snr_gamma = 5.0\nnoise_offset = 0.03\n"
        'xformers = true\noutput_name = "from_kohya"\nmax_token_length = 150\n'
    )
    prompt = for_ci(workflow_to_prompt(example("train_then_test_sdxl_lora"), object_info), folder=kohya_dataset)
    train = only_node(prompt, "SDXLLoraTrain")
    prompt = upstream(prompt, [train])
    prompt["kohya"] = {"class_type": "SDXLLoraKohyaImport", "inputs": {"config_file": "kohya_io_config.toml",
                                                                      "lora_metadata": "none"}}  # fmt: skip
    for slot, name in enumerate(("network", "objective", "train_settings")):  # the import node's first outputs
        prompt[train]["inputs"][name] = ["kohya", slot]
    for nid in nodes_of(prompt, "SDXLLoraNetwork"):
        del prompt[nid]
    prompt[train]["inputs"]["output_name"] = "from_kohya_ci"
    cache_text = only_node(prompt, "SDXLLoraCacheText")
    prompt[cache_text]["inputs"]["max_token_length"] = "150"  # the kohya config's max_token_length
    entry = run_ok(server, prompt)
    report = entry["outputs"][train]["text"][0]
    assert "training settings from" in report and "kohya_io_config.toml" in report
    kohya_report = entry["outputs"]["kohya"]["text"][0]
    assert "xformers: ComfyUI chooses the attention kernel" in kohya_report
    assert "output_name: set output_name on the Train node (kohya's value: 'from_kohya')" in kohya_report
    lora = next(ln for ln in report.splitlines() if ln.startswith("lora_name: "))[len("lora_name: ") :]
    with safe_open(str(server.base / "models" / "loras" / lora), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "6" and meta["ss_network_alpha"] == "3.0"
    assert float(meta["ss_learning_rate"]) == 0.002 and meta["ss_seed"] == "9" and meta["ss_max_train_steps"] == "2"
    assert meta["ss_lr_scheduler"] == "linear" and float(meta["ss_min_snr_gamma"]) == 5.0
    assert meta["ss_max_token_length"] == "150"
    assert json.loads(meta["ss_network_args"])["conv_dim"] in (2, "2")
    with safe_open(str(server.base / "models" / "loras" / lora), framework="pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if k.startswith("lora_te")]  # network_train_unet_only
    # Cache Text at kohya's default 75: the Train node refuses it for the config's 150 run
    prompt[cache_text]["inputs"]["max_token_length"] = "75"
    assert "set max_token_length to 150 on 'Cache Text'" in execution_error(server.run(prompt))


@pytest.mark.parametrize("config_file,lora_metadata", [("", "none"), ("x.toml", "some.safetensors")])
def test_the_import_needs_exactly_one_source(server, config_file, lora_metadata):
    prompt = {
        "kohya": {"class_type": "SDXLLoraKohyaImport", "inputs": {"config_file": config_file,
                                                                "lora_metadata": lora_metadata}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["kohya", 4]}},
    }  # fmt: skip
    with pytest.raises(ServerError) as err:
        server.queue(prompt)
    assert "Give either config_file" in str(err.value)
