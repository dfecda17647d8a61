"""SDXL LoRA Trainer: train kohya-compatible SDXL LoRAs inside a ComfyUI graph.

ComfyUI loads this folder as a custom node pack. Node classes are imported only when ComfyUI asks
for them (``comfy_entrypoint``), so importing the package never pulls in ComfyUI or torch.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """V3 entry point: ComfyUI awaits this and registers the returned extension's nodes."""
    from .nodes.extension import SDXLLoraTrainerExtension

    return SDXLLoraTrainerExtension()
