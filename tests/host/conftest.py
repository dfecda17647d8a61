"""Host tier: ComfyUI's comfy.* imported in-process on CPU, with the tiny SDXL built once per session."""

import pytest
from comfy_host import import_comfy

import_comfy()


@pytest.fixture(scope="session")
def tiny():
    """(MODEL, CLIP, VAE) of the tiny SDXL; tests must not change them (clone before patching)."""
    import tiny_sdxl

    return tiny_sdxl.make_all(0)
