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


class TestNodesExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TinySDXLCheckpointLoader]


async def comfy_entrypoint() -> TestNodesExtension:
    return TestNodesExtension()
