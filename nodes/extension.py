"""The V3 extension that hands ComfyUI the pack's node list."""
from comfy_api.latest import ComfyExtension, io

NODE_MODULES: tuple[str, ...] = ("dataset_nodes",)


class SDXLLoraTrainerExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        import importlib

        nodes: list[type[io.ComfyNode]] = []
        for name in NODE_MODULES:
            module = importlib.import_module(f"{__package__}.{name}")
            nodes.extend(module.NODES)
        return nodes
