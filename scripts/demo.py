"""The README's demo: start a headless ComfyUI with the pack, show what it offers, stop it.

Run through `make demo` (which runs the setup first). Uses the same harness as the server tests,
so what the demo shows is what the tests check.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from comfy_server import PACK_NAME, ComfyServer  # noqa: E402


def main() -> int:
    with ComfyServer(with_test_nodes=False) as server:
        info = server.get("/object_info")
        ours = {k: v for k, v in info.items() if v.get("python_module") == f"custom_nodes.{PACK_NAME}"}
        print(f"ComfyUI at {server.url} loaded the pack with {len(ours)} nodes:")
        for name, d in sorted(ours.items(), key=lambda kv: kv[1]["category"]):
            print(f"  [{d['category']}] {d['display_name']} ({name})")
    print("server stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
