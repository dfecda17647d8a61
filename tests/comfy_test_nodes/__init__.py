"""Test-only ComfyUI node pack: loads the tiny SDXL so server tests and the demo need no checkpoint.

Loaded only by the tests and the demo (devkit/comfy_server.py links it into a throw-away base directory).
"""

import os
import sys

_DEVKIT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))), "devkit")
if _DEVKIT not in sys.path:
    sys.path.insert(0, _DEVKIT)

from comfy_api.latest import ComfyExtension, io  # noqa: E402


class TinySDXLCheckpointLoader(io.ComfyNode):
    """Stands in for CheckpointLoaderSimple: MODEL/CLIP/VAE of the tiny SDXL from devkit/tiny_sdxl.py."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TinySDXLCheckpointLoader",
            display_name="Tiny SDXL Checkpoint (tests)",
            category="testing/sdxl_lora_trainer",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the random weights."),
                io.Boolean.Input("v_prediction", default=False, tooltip="Build a v-prediction model."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, seed: int, v_prediction: bool) -> io.NodeOutput:
        import tiny_sdxl

        return io.NodeOutput(*tiny_sdxl.make_all(seed, v_prediction))


class FullDiskFor(io.ComfyNode):
    """Passes the MODEL on and, from then on, makes every write to a path containing ``marker`` fail with a full
    disk (devkit/full_disk.py), so a server test can reproduce a full disk for one run's files only."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TestFullDiskFor",
            display_name="Full Disk For (tests)",
            category="testing/sdxl_lora_trainer",
            inputs=[
                io.Model.Input("model"),
                io.String.Input("marker", tooltip="Writes to paths containing this text fail with ENOSPC."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, marker: str) -> io.NodeOutput:
        import full_disk

        if not marker:
            raise ValueError("marker is empty: every write of the server would fail")
        full_disk.fill_disk_for(marker)
        return io.NodeOutput(model)


class TestNodesExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TinySDXLCheckpointLoader, FullDiskFor]


async def comfy_entrypoint() -> TestNodesExtension:
    return TestNodesExtension()
