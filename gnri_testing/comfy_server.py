"""A real ComfyUI server subprocess and a small HTTP client for it (used by
``scripts/demo.py``, and by the tests through ``tests/conftest.py``, which only swaps
in its own error types). Imports nothing of ComfyUI: it talks to it over HTTP.

    server = ComfyServer.start(comfyui_path, base_dir, custom_nodes={"ComfyUI-GNRI": REPO_ROOT})
    entry = server.run(prompt)          # POST /prompt, poll /history
    data = server.view(filename, subfolder, "output")
    server.stop()

Only the standard library and ``requests`` (a ComfyUI requirement).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import requests


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


class PromptFailed(RuntimeError):
    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class ServerError(RuntimeError):
    """The server process exited or did not come up."""


class ComfyServer:
    CLIENT_PREFIX = "gnri-"

    def __init__(self, process: subprocess.Popen, base_url: str, base_dir: str, log_path: str):
        self.process = process
        self.base_url = base_url
        self.base_dir = base_dir
        self.log_path = log_path
        self.client_id = self.CLIENT_PREFIX + uuid.uuid4().hex[:8]

    @classmethod
    def launch(cls, comfyui_path: str, base_dir: str, custom_nodes: dict[str, str], port: int | None = None,
               extra_args: list[str] | None = None, cpu: bool | None = None,
               preexec_fn=None) -> ComfyServer:
        """Start ``main.py`` on 127.0.0.1 with ``base_dir`` as its base directory and only
        ``custom_nodes`` ({folder name: path}, symlinked into base_dir/custom_nodes) loaded."""
        for sub in ("custom_nodes", "user", "input", "output", "temp", "models"):
            os.makedirs(os.path.join(base_dir, sub), exist_ok=True)
        for name, target in custom_nodes.items():
            link = os.path.join(base_dir, "custom_nodes", name)
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(target), link, target_is_directory=True)
        port = port or free_port()
        log_path = os.path.join(base_dir, "comfyui-server.log")
        cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", base_dir, "--user-directory", os.path.join(base_dir, "user"),
               "--database-url", "sqlite:///" + os.path.join(base_dir, "comfyui.db"),
               "--disable-auto-launch", "--disable-api-nodes",
               "--disable-all-custom-nodes", "--whitelist-custom-nodes", *custom_nodes]
        if cpu if cpu is not None else not cuda_available():
            cmd.insert(2, "--cpu")
        cmd += list(extra_args or [])
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", "1")  # the tiny models gain nothing from threads
        env.pop("PYTHONPATH", None)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=comfyui_path, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, preexec_fn=preexec_fn)
        return cls(proc, f"http://127.0.0.1:{port}", base_dir, log_path)

    @classmethod
    def start(cls, *args, timeout: float = 120.0, **kw) -> ComfyServer:
        server = cls.launch(*args, **kw)
        try:
            server.wait_until_ready(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def wait_until_ready(self, timeout: float = 120.0) -> None:
        """Poll /object_info/KSampler until the server answers (nodes are loaded by then)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.process.returncode} during start-up\n"
                                  f"{self.log_tail()}")
            try:
                if requests.get(self.base_url + "/object_info/KSampler", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"ComfyUI did not answer within {timeout} s\n{self.log_tail()}")
            time.sleep(0.2)

    # -- errors (the tests raise their own types)
    def rejected(self, data: dict) -> Exception:
        """The error for a prompt the server refused (HTTP 400 with error/node_errors)."""
        return PromptFailed(f"prompt rejected: {data}", data)

    def failed(self, event: str, data: dict) -> Exception:
        """The error for a prompt that ran and failed (an execution_error/interrupted message)."""
        return PromptFailed(f"{data.get('node_type')} #{data.get('node_id')}: "
                            f"{data.get('exception_message', event)}", data)

    # -- HTTP
    def get(self, path: str, **kw):
        r = requests.get(self.base_url + path, timeout=kw.pop("timeout", 30), **kw)
        r.raise_for_status()
        return r.json()

    def object_info(self, node_class: str | None = None) -> dict:
        """/object_info (all nodes) or /object_info/<node_class> -> {class: info}."""
        return self.get("/object_info" + (f"/{node_class}" if node_class else ""))

    def history(self, prompt_id: str) -> dict | None:
        return self.get(f"/history/{prompt_id}").get(prompt_id)

    def queue(self, prompt: dict, extra_data: dict | None = None) -> str:
        """POST /prompt; returns the prompt_id (raises ``rejected(...)`` on HTTP 400)."""
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        r = requests.post(self.base_url + "/prompt", json=body, timeout=30)
        if r.status_code == 400:
            raise self.rejected(r.json())
        r.raise_for_status()
        return r.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll /history until ``prompt_id`` is done; returns its history entry
        ({"prompt", "outputs": {node_id: ui}, "status": {"status_str", "completed",
        "messages"}, "meta"}). Does not raise on a failed prompt (see ``run``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry is not None:  # history entries appear when the prompt is done
                return entry
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited ({self.process.returncode}) while running "
                                  f"{prompt_id}\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout} s\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """queue + wait; raises ``failed(...)`` if the prompt failed; returns the history entry."""
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"].get("status_str") != "success":
            for event, data in entry["status"].get("messages", []):
                if event in ("execution_error", "execution_interrupted"):
                    raise self.failed(event, data)
            raise self.failed("execution_error", {"exception_message": f"prompt failed: {entry['status']}"})
        return entry

    def view(self, filename: str, subfolder: str = "", type_: str = "output") -> bytes:
        r = requests.get(self.base_url + "/view", params={"filename": filename, "subfolder": subfolder,
                                                          "type": type_}, timeout=30)
        r.raise_for_status()
        return r.content

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(no server log: {e})"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
