"""Server tier: one real ComfyUI server with the pack (and the test-only tiny loader) per session."""

import pytest
from comfy_server import ComfyServer


@pytest.fixture(scope="session")
def server():
    srv = ComfyServer()
    srv.start()
    try:
        yield srv
    finally:
        srv.cleanup()
