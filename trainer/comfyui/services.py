"""Host services of ComfyUI the engine uses: progress, cancel, websocket events, folders and files."""

from __future__ import annotations

from typing import Any

import torch

# -- host services: progress, cancel, events, folders -------------------------------------------

_cancel_seen = False


def interrupted() -> bool:
    """True once the user pressed Cancel (POST /interrupt) during this run.

    ComfyUI clears its flag when one of its own progress hooks raises; ``note_interrupt`` keeps the
    request visible so the loop can still stop at the step boundary and save.
    """
    import comfy.model_management as mm

    return _cancel_seen or bool(mm.processing_interrupted())


def note_interrupt() -> None:
    global _cancel_seen
    _cancel_seen = True


def reset_interrupt_note() -> None:
    global _cancel_seen
    _cancel_seen = False


def is_interrupt(exc: BaseException) -> bool:
    import comfy.model_management as mm

    return isinstance(exc, mm.InterruptProcessingException)


def raise_interrupt() -> None:
    import comfy.model_management as mm

    reset_interrupt_note()
    mm.throw_exception_if_processing_interrupted()
    raise mm.InterruptProcessingException()


class Progress:
    """ComfyUI's progress bar for one node, plus text under the node and custom websocket events."""

    def __init__(self, total: int, node_id: str | None) -> None:
        import comfy.utils

        self.node_id = node_id
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def update(self, step: int, total: int, text: str | None = None, preview: Any = None) -> None:
        if interrupted():
            return  # ComfyUI's hook would raise here; the loop stops at the step boundary and saves
        self.bar.update_absolute(step, total, preview)
        if text is not None and self.node_id is not None:
            server = _server()
            if server is not None:
                server.send_progress_text(text, self.node_id)

    def event(self, name: str, data: dict) -> None:
        server = _server()
        if server is not None:
            server.send_sync(name, data, server.client_id)


def _server() -> Any:
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def input_directory() -> str:
    import folder_paths

    return folder_paths.get_input_directory()


def loras_directory() -> str:
    import folder_paths

    return folder_paths.get_folder_paths("loras")[0]


def lora_file_names() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list("loras")


def lora_file_path(name: str) -> str:
    import folder_paths

    return folder_paths.get_full_path_or_raise("loras", name)


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    import comfy.utils

    return comfy.utils.load_torch_file(path, safe_load=True)


def output_directory() -> str:
    import folder_paths

    return folder_paths.get_output_directory()
