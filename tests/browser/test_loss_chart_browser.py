"""The live loss chart in the real ComfyUI frontend, in headless Chromium, against a real ComfyUI server.

One scenario (tests/browser/loss_chart_driver.cjs, driven with playwright-core and Debian's Chromium):
open the frontend of a test server (this pack + the tiny-model loader pack), load
example_workflows/train_then_test_sdxl_lora.json (or, while it does not exist, build the same graph from
devkit/example_prompts.train_then_test with the frontend's own createNode/connect), swap CheckpointLoaderSimple for
TinySDXLCheckpointLoader in the page, shrink the run (8 steps at 64 px), check that every node type resolves and
every link is valid (the "*" lora_name output into LoraLoader's COMBO input included), queue it from the
page, wait for the progress events, then read the chart back (canvas pixels and screenshots) and feed it
synthetic events (other node, new run, constant loss, null loss / lr, the cancel notice).

Tools come from scripts/setup_browser.sh (make test runs it); this file installs nothing. Skipped only when
that script recorded that Chromium cannot be installed on this machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
from comfy_host import ROOT
from comfy_server import ComfyServer
from dataset_factory import kohya_folder
from example_prompts import train_then_test
from PIL import Image

DRIVER = Path(__file__).with_name("loss_chart_driver.cjs")
EXAMPLE = ROOT / "example_workflows" / "train_then_test_sdxl_lora.json"
PLAYWRIGHT_CORE = ROOT / ".comfyui" / "node" / "node_modules" / "playwright-core"
UNAVAILABLE = ROOT / ".comfyui" / "browser.unavailable"
TRAIN = "SDXLLoraTrain"
STEPS = 8
RES = 64
# Least pixels of each series colour inside the plot area (the plot is ~300 x 140 px; a line across it has
# far more than this, an empty or blank chart has none).
MIN_LINE_PIXELS = 100


def _tools() -> tuple[str, str]:
    chromium = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
    node = shutil.which("node")
    have = os.access(chromium, os.X_OK) and node and (PLAYWRIGHT_CORE / "package.json").is_file()
    if have:
        return chromium, node
    if UNAVAILABLE.is_file():
        pytest.skip(f"browser test skipped: {UNAVAILABLE.read_text().strip()} (from scripts/setup_browser.sh)")
    missing = [
        what
        for what, ok in [
            (chromium, os.access(chromium, os.X_OK)),
            ("node", bool(node)),
            (str(PLAYWRIGHT_CORE), (PLAYWRIGHT_CORE / "package.json").is_file()),
        ]
        if not ok
    ]
    pytest.fail(
        f"browser test tools missing: {missing}. Run `bash scripts/setup_browser.sh` (make test runs it); "
        "the test is skipped only when that script finds Chromium cannot be installed."
    )


def _overrides(prompt: dict) -> dict[str, dict]:
    """Literal inputs of the API prompt per class type (kept only where every node of the class agrees)."""
    by_class: dict[str, dict] = {}
    for node in prompt.values():
        lits = {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
        if node["class_type"] not in by_class:
            by_class[node["class_type"]] = lits
        else:
            seen = by_class[node["class_type"]]
            by_class[node["class_type"]] = {k: v for k, v in seen.items() if lits.get(k, object()) == v}
    return by_class


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    chromium, node = _tools()
    out = tmp_path_factory.mktemp("loss_chart_browser")
    with ComfyServer() as server:
        kohya_folder(server.base / "input" / "ds_browser", {"1_cat": [(64, 64), (64, 48)]})
        # A returning user: no template browser over the canvas on first load.
        server.post("/settings/Comfy.TutorialCompleted", True)
        # A unique output name: the prompt can never be served from ComfyUI's cache of an earlier run.
        prompt = train_then_test(
            "ds_browser",
            steps=STEPS,
            seed=3,
            resolution=RES,
            sample_steps=2,
            output_name=f"browser_{uuid.uuid4().hex[:8]}",
        )
        spec = {
            "url": server.url,
            "out_dir": str(out),
            "playwright_core": str(PLAYWRIGHT_CORE),
            "chromium": chromium,
            "prompt": prompt,
            "example": json.loads(EXAMPLE.read_text()) if EXAMPLE.is_file() else None,
            "overrides": _overrides(prompt),
            "train_class": TRAIN,
            "steps": STEPS,
            "timeout_ms": 600_000,
        }
        (out / "spec.json").write_text(json.dumps(spec))
        proc = subprocess.run(
            [node, str(DRIVER), str(out / "spec.json")], capture_output=True, text=True, check=False, timeout=840
        )
        report_path = out / "report.json"
        assert report_path.is_file(), f"driver wrote no report (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        report = json.loads(report_path.read_text())
        report["_out"] = str(out)
        report["_log"] = server.log()[-4000:]
        report["_driver"] = (proc.stdout + proc.stderr)[-3000:]
    return report


def _ok(report: dict) -> None:
    """Fail with everything useful when the driver itself stopped early."""
    assert report.get("error") is None, (
        f"browser scenario failed at stage {report.get('stage')!r}: {report.get('error')}\n"
        f"page errors: {report.get('pageerrors')}\nconsole: {report.get('console', [])[-20:]}\n"
        f"driver: {report['_driver']}\nserver log: {report['_log']}\nscreenshots in {report['_out']}"
    )


def _chart_ok(report: dict) -> None:
    _ok(report)
    assert report.get("chart_error") is None, (
        f"chart checks failed: {report['chart_error']}\nchart widgets: {report['validate']['chart_widgets']}\n"
        f"console: {report.get('console', [])[-20:]}\nscreenshots in {report['_out']}"
    )
    assert "error" not in report["chart"], report["chart"]


def _coverage(rgb: np.ndarray, colour: str, bg: str) -> np.ndarray:
    """Pixels lying on the line from bg to colour at >= 35% coverage (anti-aliased edges count)."""
    c = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], float)
    b = np.array([int(bg[i : i + 2], 16) for i in (1, 3, 5)], float)
    d = c - b
    p = rgb.astype(float) - b
    a = (p @ d) / (d @ d)
    res = np.linalg.norm(p - a[..., None] * d, axis=-1)
    return (a >= 0.35) & (a <= 1.15) & (res <= 40)


def _plot_pixels(png: Path, chart: dict) -> dict[str, int]:
    """Series-colour pixel counts inside the plot area of a chart screenshot (taken at device scale 1)."""
    img = np.asarray(Image.open(png).convert("RGB"))
    scale = img.shape[1] / chart["canvas"][0]  # screenshot px per canvas px
    p = chart["plot"]
    x0, y0 = math.ceil(p["x"] * scale) + 2, math.ceil(p["y"] * scale) + 2
    x1, y1 = math.floor((p["x"] + p["w"]) * scale) - 2, math.floor((p["y"] + p["h"]) * scale) - 2
    area = img[y0:y1, x0:x1]
    colours = chart["colors"]
    return {k: int(_coverage(area, colours[k], colours["bg"]).sum()) for k in ("loss", "smooth", "lr")}


def test_frontend_loads_the_extension_once(run):
    _ok(run)
    assert run["extension_responses"], "the frontend never requested web/loss_chart.js"
    assert all(status == 200 for _, status in run["extension_responses"]), run["extension_responses"]
    assert run["validate"]["extension_registrations"] == 1
    ours = [
        e
        for e in run["pageerrors"] + [c for c in run["console"] if c.startswith("[error]")]
        if "loss_chart" in e or "sdxl_lora" in e
    ]
    assert not ours, ours
    assert not run["pageerrors"], run["pageerrors"]  # no uncaught exception in the page during the scenario


def test_workflow_nodes_resolve_and_links_are_valid(run):
    _ok(run)
    build, val = run["build"], run["validate"]
    assert build["source"] == ("example" if EXAMPLE.is_file() else "prompt")
    assert build["missing_create"] == [], build["missing_create"]
    assert val["unknown_types"] == [], val["unknown_types"]
    assert val["bad_links"] == [], val["bad_links"]
    assert val["link_count"] >= 20, val
    assert all(c["ok"] for c in build["connects"]), [c for c in build["connects"] if not c["ok"]]
    if build["source"] == "example":
        assert "CheckpointLoaderSimple" not in val["nodes"] and "TinySDXLCheckpointLoader" in val["nodes"]
        assert {s["type"] for s in build["swapped"]} == {"MODEL", "CLIP", "VAE"}, build["swapped"]
        assert all(s["ok"] for s in build["swapped"]), build["swapped"]
        for needed in ("SDXLLoraImagesFromFolder.folder", f"{TRAIN}.max_train_steps", "EmptyLatentImage.width"):
            assert needed in build["applied"], (needed, build["applied"])
    # The trained file's name feeds LoraLoader: a "*" output accepted by a COMBO input, even re-linked.
    assert val["lora_input"] == {"type": "COMBO", "widget": True, "linked": True}, val["lora_input"]
    assert val["lora_link"] == {"from": TRAIN, "output": "lora_name", "out_type": "*"}, val["lora_link"]
    assert val["lora_relink_ok"] is True
    # The chart is a non-serialised DOM widget: in neither the prompt nor the saved workflow.
    assert val["chart_widgets"] == [{"type": "sdxl_lora_loss_chart", "has_chart": True, "serialize": False}]
    prompt = run["prompt"]
    train_id = run["train_node_id"]
    assert prompt[train_id]["class_type"] == TRAIN
    assert "loss_chart" not in prompt[train_id]["inputs"]
    assert prompt[train_id]["inputs"]["max_train_steps"] == STEPS
    loader = next(v for v in prompt.values() if v["class_type"] == "LoraLoader")
    assert loader["inputs"]["lora_name"][0] == train_id, loader
    saved = run["workflow_after"]  # the train node's serialize(): the chart widget leaves a hole (null) or nothing
    idx = saved["widget_names"].index("loss_chart")
    assert idx >= len(saved["widgets_values"]) or saved["widgets_values"][idx] is None, saved


def test_queued_run_sends_progress_for_the_train_node(run):
    _ok(run)
    assert run["queue"]["status"] == 200 and not run["queue"]["body"].get("node_errors"), run["queue"]
    pid = run["queue"]["body"]["prompt_id"]
    done = [s["type"] for s in run["events"]["status"] if s["detail"].get("prompt_id") == pid]
    assert "execution_success" in done, (done, run["_log"])
    progress = run["events"]["progress"]
    assert [p["step"] for p in progress] == list(range(1, STEPS + 1)), progress
    assert {str(p["node"]) for p in progress} == {run["train_node_id"]}
    assert all(p["total"] == STEPS and math.isfinite(p["loss"]) and p["lr"] > 0 for p in progress), progress


def test_chart_is_drawn_in_the_node_after_the_run(run):
    _chart_ok(run)
    before, chart = run["chart_before"], run["chart"]
    # Before the run: an empty chart, no series pixels (so the counts below are what the run drew).
    assert before["points"] == 0 and before["status"].startswith("waiting")
    assert before["counts"]["loss"] == before["counts"]["smooth"] == before["counts"]["lr"] == 0, before["counts"]
    progress = run["events"]["progress"]
    assert chart["steps"] == [p["step"] for p in progress]
    assert chart["losses"] == pytest.approx([p["loss"] for p in progress])
    status = chart["status"]
    assert status.startswith(f"step {STEPS}/{STEPS}, ") and "it/s" in status and "ETA" in status, status
    for series in ("loss", "smooth", "lr"):
        assert chart["counts"][series] >= MIN_LINE_PIXELS, (series, chart["counts"])

    # On screen: the chart's box is inside the node's box, and the screenshots show the lines.
    focus = run["focus"]
    assert focus["chart_visible"], focus
    n, c = focus["node"], focus["chart"]
    assert n["x"] - 1 <= c["x"] and c["x"] + c["width"] <= n["x"] + n["width"] + 1, focus
    assert n["y"] - 1 <= c["y"] and c["y"] + c["height"] <= n["y"] + n["height"] + 1, focus
    assert c["height"] >= 150, focus
    out = Path(run["_out"])
    shot = _plot_pixels(out / "chart.png", chart)
    for series in ("loss", "smooth", "lr"):
        assert shot[series] >= MIN_LINE_PIXELS, (series, shot, out / "chart.png")
    node_png = Image.open(out / "node.png")
    assert abs(node_png.width - n["width"]) <= 2 and abs(node_png.height - n["height"]) <= 2
    smooth_in_node = _coverage(np.asarray(node_png.convert("RGB")), chart["colors"]["smooth"], chart["colors"]["bg"])
    assert smooth_in_node.sum() >= MIN_LINE_PIXELS, out / "node.png"


def test_no_node_lies_under_the_train_node_with_its_chart(run):
    """The chart makes the train node taller: the workflow must leave room below it (else a node hides)."""
    _chart_ok(run)
    focus = run["focus"]
    assert focus["overlapping"] == [], (
        f"nodes overlap the {TRAIN} node (size with chart {focus['size']}): {focus['overlapping']}; "
        f"move them below it in {EXAMPLE.name if run['build']['source'] == 'example' else 'the built graph'}"
    )


def test_validation_events_draw_a_second_series_without_resetting_the_chart(run):
    val = run["after_validation"]
    assert val["val_steps"] == [2, 4] and val["val_losses"] == [0.4, 0.1]
    assert val["steps"] == [1, 2, 3, 4]  # the training series is kept
    assert val["counts"]["val"] >= 20, val["counts"]  # a line from step 2 to 4 and two dots
    assert run["after_degenerate"]["counts"]["val"] == 0, run["after_degenerate"]["counts"]


def test_chart_ignores_other_nodes_resets_on_a_new_run_survives_degenerate_data_and_cancel(run):
    _chart_ok(run)
    steps = [p["step"] for p in run["events"]["progress"]]
    other = run["after_other_node"]
    assert other["steps"] == steps, "an event for another node changed this node's chart"
    reset = run["after_reset"]
    assert reset["steps"] == [1] and reset["losses"] == [0.25], reset
    assert reset["status"].startswith("step 1/4, ")
    assert reset["counts"]["smooth"] >= 5, reset["counts"]  # one step: a dot, not an invisible line
    assert _plot_pixels(Path(run["_out"]) / "chart_reset.png", reset)["smooth"] >= 5
    flat = run["after_degenerate"]
    assert flat["steps"] == [1, 2, 3, 4] and flat["losses"] == [0.25, 0.25, 0.25, None], flat
    assert flat["status"].startswith("step 4/4, ")
    assert flat["counts"]["smooth"] >= MIN_LINE_PIXELS, flat["counts"]  # constant loss: a flat line
    assert _plot_pixels(Path(run["_out"]) / "chart_degenerate.png", flat)["smooth"] >= MIN_LINE_PIXELS
    cancelled = run["after_cancel"]
    assert cancelled["steps"] == [1, 2, 3, 4] and cancelled["status"] == "step 4/4, cancelled", cancelled
    assert cancelled["counts"]["smooth"] >= MIN_LINE_PIXELS
