"""Regenerate the README's node reference from the live schemas (/object_info of a headless ComfyUI).

python scripts/node_reference.py    # rewrites the part of README.md between the <!-- nodes --> markers
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "devkit"))

from comfy_server import PACK_NAME, ComfyServer  # noqa: E402

BEGIN, END = "<!-- nodes -->", "<!-- /nodes -->"


def render(info: dict) -> str:
    ours = {k: v for k, v in info.items() if v.get("python_module") == f"custom_nodes.{PACK_NAME}"}
    out = []
    for name, d in sorted(ours.items(), key=lambda kv: (kv[1]["category"], kv[1]["display_name"])):
        out.append(f"### {d['display_name']} (`{name}`, {d['category']})\n\n{d['description']}\n")
        out.append("| input | type | default | what it does |\n|---|---|---|---|")
        for section in ("required", "optional"):
            for inp, spec in d["input"].get(section, {}).items():
                kind = spec[0] if isinstance(spec[0], str) else "COMBO"
                opts = spec[1] if len(spec) > 1 else {}
                default = opts.get("default", "")
                tip = opts.get("tooltip", "").replace("|", "\\|")
                opt = " (optional)" if section == "optional" else ""
                out.append(f"| `{inp}`{opt} | {kind} | {default} | {tip} |")
        outs = ", ".join(f"`{n}` ({t})" for n, t in zip(d["output_name"], d["output"]))
        out.append(f"\nOutputs: {outs}\n")
    return "\n".join(out)


def main() -> int:
    with ComfyServer(with_test_nodes=False) as server:
        text = render(server.get("/object_info"))
    readme = ROOT / "README.md"
    body = readme.read_text()
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), f"{BEGIN}\n{text}\n{END}", body, flags=re.S)
    if BEGIN not in body:
        raise SystemExit("README.md has no <!-- nodes --> marker")
    readme.write_text(new)
    print(f"README node reference updated ({text.count('### ')} nodes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
