"""The host starts with the pack loaded, cleanly, and every node is well described."""

import re

from comfy_server import PACK_NAME

CATEGORY_ROOT = "training/sdxl_lora"


def pack_nodes(info: dict) -> dict:
    """Our nodes: python_module is 'custom_nodes.<pack folder>' (the test loader pack has its own name)."""
    return {name: d for name, d in info.items() if d.get("python_module") == f"custom_nodes.{PACK_NAME}"}


def test_no_import_errors(server):
    log = server.startup_log
    assert "Cannot import" not in log, log
    assert re.search(r"IMPORT FAILED.*sdxl_lora_trainer", log) is None, log
    assert "Traceback" not in log, log


def test_every_node_listed_with_category_names_and_tooltips(server):
    info = server.get("/object_info")
    ours = pack_nodes(info)
    assert ours, (
        "no node of the pack in /object_info; python_modules seen: "
        f"{sorted({d.get('python_module') for d in info.values()})[:20]}"
    )
    for name, d in ours.items():
        assert d["category"].startswith(CATEGORY_ROOT), (name, d["category"])
        assert d["display_name"] and d["display_name"] != name, name
        assert d.get("description"), name
        for section in ("required", "optional"):
            for inp, spec in d["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip"), f"{name}.{inp} has no tooltip"


def test_web_extension_is_served(server):
    exts = server.get("/extensions")
    assert any(PACK_NAME in e for e in exts), exts


def test_readme_lists_every_node_and_input(server):
    """The README's node reference is generated from the schemas; it must not fall behind them."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name, d in pack_nodes(server.get("/object_info")).items():
        assert f"`{name}`" in readme, f"README misses node {name}: run scripts/node_reference.py"
        for section in ("required", "optional"):
            for inp in d["input"].get(section, {}):
                assert f"`{inp}`" in readme, f"README misses input {name}.{inp}: run scripts/node_reference.py"
