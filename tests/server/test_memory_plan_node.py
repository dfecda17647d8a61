"""The memory plan where users meet it: the Memory Plan node's table and the Train node's report (POST /prompt)."""

from __future__ import annotations

import re

import pytest
from comfy_server import execution_error
from dataset_factory import kohya_folder
from test_example_workflows import example
from workflow_convert import for_ci, only_node, upstream, workflow_to_prompt


@pytest.fixture(scope="module")
def prompt(server) -> dict:
    kohya_folder(server.base / "input" / "plan_io", {"1_cat": [(64, 64), (64, 64)]})
    info = server.get("/object_info")
    return for_ci(workflow_to_prompt(example("train_then_test_sdxl_lora"), info), folder="plan_io", steps=1)


def _plan_gb(text: str) -> float:
    return float(re.search(r"memory plan \(.*?\): ([0-9.]+) (GB|MB) peak", text).group(1))


def test_the_memory_plan_node_shows_the_table_without_training(server, prompt):
    network = only_node(prompt, "SDXLLoraNetwork")
    loader = only_node(prompt, "TinySDXLCheckpointLoader")
    base = upstream(prompt, [network, loader])

    def plan(**widgets) -> str:
        graph = dict(base)
        graph["plan"] = {
            "class_type": "SDXLLoraMemoryPlan",
            "inputs": {
                "model": [loader, 0],
                "network": [network, 0],
                "width": 128,
                "height": 128,
                "batch_size": 1,
                "train_dtype": "fp32",
                "gradient_checkpointing": True,
                "optimizer": "AdamW",
                "memory_mode": "auto",
                **widgets,
            },
        }
        entry = server.run(graph)
        assert execution_error(entry) is None, execution_error(entry)
        return entry["outputs"]["plan"]["text"][0]

    text = plan()
    assert text.startswith("memory plan (128x128 batch 1, rank ")
    for size in (8, 12, 16, 24):
        assert f"  {size} GB GPU: fits with every weight resident" in text  # the tiny model fits everywhere
    assert "(settings from this node's widgets)" in text
    bigger = plan(batch_size=4, gradient_checkpointing=False)
    assert "128x128 batch 4" in bigger and "no gradient checkpointing" in bigger
    assert re.search(r"activations and gradients ([0-9.]+)", bigger).group(1) != re.search(
        r"activations and gradients ([0-9.]+)", text
    ).group(1)


def test_the_train_node_reports_its_plan_in_every_memory_mode(server, prompt):
    train = only_node(prompt, "SDXLLoraTrain")
    reports = {}
    for mode in ("auto", "stream"):
        graph = upstream(prompt, [train])
        graph[train]["inputs"].update(memory_mode=mode, output_name=f"plan_{mode}")
        entry = server.run(graph)
        assert execution_error(entry) is None, execution_error(entry)
        reports[mode] = entry["outputs"][train]["text"][0]
    for report in reports.values():
        assert "memory plan (" in report and "24 GB GPU:" in report
    assert _plan_gb(reports["auto"]) == _plan_gb(reports["stream"])  # the mode places weights; the plan is the run's
