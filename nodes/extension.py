"""The V3 extension that hands ComfyUI the pack's node list."""

from comfy_api.latest import ComfyExtension, io

NODE_MODULES: tuple[str, ...] = (
    "dataset_nodes",
    "cache_nodes",
    "network_node",
    "objective_node",
    "run_options_nodes",
    "train_node",
    "train_settings_node",
    "kohya_nodes",
    "memory_plan_node",
)


def register_routes() -> None:
    """GET /sdxl_lora_trainer/stats: real VAE/CLIP encode calls since start (proves the caches work)."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    from ..trainer.cache.stores import ENCODER_CALLS

    @PromptServer.instance.routes.get("/sdxl_lora_trainer/stats")
    async def stats(request: "web.Request") -> "web.Response":
        return web.json_response({"encoder_calls": dict(ENCODER_CALLS)})


class SDXLLoraTrainerExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_routes()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        import importlib

        nodes: list[type[io.ComfyNode]] = []
        for name in NODE_MODULES:
            module = importlib.import_module(f"{__package__}.{name}")
            nodes.extend(module.NODES)
        return nodes
