"""The committed example workflows in the real ComfyUI frontend (headless Chromium against a real server).

Why: devkit/workflow_convert.py reimplements the frontend's widget rules to run the examples in CI; here the
frontend itself loads each file and its own ``graphToPrompt`` must give exactly the prompt our converter gives,
every node type must resolve, and re-serialising must keep every widget value in its slot (a wrong widget count
or order would shift them). Tools come from scripts/setup_browser.sh; skipped only when it recorded that Chromium
cannot be installed here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from comfy_host import ROOT
from comfy_server import ComfyServer
from workflow_convert import workflow_to_prompt

DRIVER = Path(__file__).with_name("example_workflows_driver.cjs")
EXAMPLES = ROOT / "example_workflows"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.json"))  # every committed example, none forgotten
PLAYWRIGHT_CORE = ROOT / ".comfyui" / "node" / "node_modules" / "playwright-core"
UNAVAILABLE = ROOT / ".comfyui" / "browser.unavailable"


def _tools() -> tuple[str, str]:
    chromium = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
    node = shutil.which("node")
    if os.access(chromium, os.X_OK) and node and (PLAYWRIGHT_CORE / "package.json").is_file():
        return chromium, node
    if UNAVAILABLE.is_file():
        pytest.skip(f"browser test skipped: {UNAVAILABLE.read_text().strip()} (from scripts/setup_browser.sh)")
    pytest.fail("browser test tools missing: run `bash scripts/setup_browser.sh` (make test runs it)")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict:
    chromium, node = _tools()
    out = tmp_path_factory.mktemp("examples_browser")
    with ComfyServer() as server:
        server.post("/settings/Comfy.TutorialCompleted", True)  # no template browser over the canvas
        object_info = server.get("/object_info")
        examples = {n: json.loads((EXAMPLES / f"{n}.json").read_text()) for n in NAMES}
        spec = {
            "url": server.url,
            "out_dir": str(out),
            "playwright_core": str(PLAYWRIGHT_CORE),
            "chromium": chromium,
            "examples": examples,
        }
        (out / "spec.json").write_text(json.dumps(spec))
        proc = subprocess.run(
            [node, str(DRIVER), str(out / "spec.json")], capture_output=True, text=True, check=False, timeout=600
        )
        path = out / "report.json"
        assert path.is_file(), f"driver wrote no report (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        report = json.loads(path.read_text())
    assert not report.get("error"), (report.get("stage"), report["error"], report["console"][-20:])
    assert not report["pageerrors"], report["pageerrors"][:5]
    return {"report": report, "object_info": object_info, "examples": examples, "out": out}


@pytest.mark.parametrize("name", NAMES)
def test_frontend_resolves_every_node(loaded, name):
    assert loaded["report"]["examples"][name]["unresolved"] == []


@pytest.mark.parametrize("name", NAMES)
def test_frontend_prompt_equals_the_converter(loaded, name):
    front = loaded["report"]["examples"][name]["prompt"]
    ours = workflow_to_prompt(loaded["examples"][name], loaded["object_info"])

    def strip(p):
        return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}

    assert strip(front) == strip(ours)


@pytest.mark.parametrize("name", NAMES)
def test_widget_values_keep_their_slots(loaded, name):
    """Re-serialised by the frontend, every node has the same widgets_values as the committed file."""
    wf = loaded["examples"][name]
    again = {n["id"]: n for n in loaded["report"]["examples"][name]["serialized"]["nodes"]}
    for node in wf["nodes"]:
        assert again[node["id"]].get("widgets_values", []) == node.get("widgets_values", []), (
            node["type"],
            loaded["report"]["examples"][name]["widgets"][str(node["id"])],
        )
    assert sorted(map(tuple, again_links(loaded, name))) == sorted(map(tuple, wf["links"]))


def again_links(loaded: dict, name: str) -> list:
    links = loaded["report"]["examples"][name]["serialized"]["links"]
    return [
        ln
        if isinstance(ln, list)
        else [ln["id"], ln["origin_id"], ln["origin_slot"], ln["target_id"], ln["target_slot"], ln["type"]]
        for ln in links
    ]
