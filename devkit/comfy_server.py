"""Start a real headless ComfyUI server with this pack loaded, drive it over HTTP, always stop it.

Used by the server-tier tests and by the demo script. The server gets a throw-away base directory
whose custom_nodes/ links this pack (and, for tests, the test-only tiny-model loader pack), so the
user's own ComfyUI folders are never touched.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from comfy_host import ROOT, comfyui_dir

PACK_NAME = "sdxl_lora_trainer"
TEST_NODES_DIR = ROOT / "tests" / "comfy_test_nodes"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class ComfyServer:
    """One ComfyUI process on a free loopback port, with its own base directory."""

    def __init__(
        self,
        base_dir: Path | None = None,
        with_test_nodes: bool = True,
        python: str | None = None,
        extra_args: list[str] | None = None,
        cpu: bool = True,
    ) -> None:
        self.comfy = comfyui_dir()
        self.python = python or os.environ.get("COMFYUI_PYTHON") or sys.executable
        self._own_base = base_dir is None
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="comfy-base-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.with_test_nodes = with_test_nodes
        self.extra_args = extra_args or []
        self.cpu = cpu  # the tests always run on CPU; the demo may use the GPU for a real checkpoint
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"
        self.client_id = uuid.uuid4().hex
        self.startup_log = ""  # the log up to the moment the server answered (import errors show here)

    # -- lifecycle -------------------------------------------------------------------------
    def _prepare_base(self) -> None:
        nodes = self.base / "custom_nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        for name, target in [(PACK_NAME, ROOT)] + (
            [("sdxl_lora_trainer_testnodes", TEST_NODES_DIR)] if self.with_test_nodes else []
        ):
            link = nodes / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        for sub in ("input", "output", "temp", "user", "models/loras", "models/checkpoints"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 180.0) -> ComfyServer:
        self._prepare_base()
        cmd = [
            self.python,
            "main.py",
            *(["--cpu"] if self.cpu else []),
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base),
            "--disable-auto-launch",
            "--database-url",
            "sqlite:///:memory:",
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open while the server runs, closed by stop()
        self.proc = subprocess.Popen(
            cmd, cwd=self.comfy, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.proc.returncode} during start:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                self.startup_log = self.log()
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- HTTP ------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def post(self, path: str, data: Any, timeout: float = 30) -> Any:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(data).encode(), method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            raise ServerError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from e
        return json.loads(body) if body else None

    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id. Validation errors raise ServerError with the server's reply."""
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Poll /history until the prompt finished; returns its history entry (status + outputs)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise ServerError(f"ComfyUI died while running {prompt_id}:\n{self.log()[-4000:]}")
            hist = self.get(f"/history/{prompt_id}")
            if hist and prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.25)
        raise ServerError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log()[-4000:]}")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def run_successfully(self, prompt: dict, timeout: float = 900) -> dict:
        """``run``, failing with the prompt's error and the tail of the server log when it did not succeed."""
        entry = self.run(prompt, timeout)
        error = execution_error(entry)
        assert error is None, error + "\n" + self.log()[-3000:]
        return entry

    def trained_loras(self, pattern: str) -> list[str]:
        """The LoRA files matching ``pattern`` in the train node's default subfolder of models/loras, sorted."""
        return sorted(glob.glob(str(self.base / "models" / "loras" / "sdxl_lora_trainer" / pattern)))

    def interrupt(self) -> None:
        self.post("/interrupt", {})


def execution_error(entry: dict) -> str | None:
    """The exception message of a failed prompt's history entry, or None when it succeeded."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return None


class WsListener:
    """Collects the server's websocket messages for this client in a background thread.

    ``events`` holds (type, data) of JSON messages; ``binary`` counts binary frames (preview images).
    """

    def __init__(self, server: ComfyServer) -> None:
        import threading

        self.server = server
        self.events: list[tuple[str, Any]] = []
        self.binary = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import asyncio

        import aiohttp

        async def main() -> None:
            url = f"ws://127.0.0.1:{self.server.port}/ws?clientId={self.server.client_id}"
            async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.2)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        self.events.append((data.get("type"), data.get("data")))
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        self.binary += 1
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break

        asyncio.run(main())

    def __enter__(self) -> WsListener:
        self._thread.start()
        if not self._ready.wait(30):
            raise ServerError("websocket did not connect")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def of_type(self, kind: str) -> list[Any]:
        return [d for t, d in list(self.events) if t == kind]

    def wait_for(self, predicate, timeout: float = 300) -> Any:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for t, d in list(self.events):
                if predicate(t, d):
                    return d
            time.sleep(0.1)
        raise ServerError(f"no matching websocket event within {timeout}s")
