"""A real ComfyUI server subprocess and a small HTTP client for it (used by
``scripts/demo.py``; the tests have their own in ``tests/conftest.py``).

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


class ComfyServer:
    def __init__(self, process: subprocess.Popen, base_url: str, base_dir: str, log_path: str):
        self.process = process
        self.base_url = base_url
        self.base_dir = base_dir
        self.log_path = log_path
        self.client_id = "gnri-" + uuid.uuid4().hex[:8]

    @classmethod
    def launch(cls, comfyui_path: str, base_dir: str, custom_nodes: dict[str, str], port: int | None = None,
               extra_args: list[str] | None = None, cpu: bool | None = None) -> ComfyServer:
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
                                    stdin=subprocess.DEVNULL, env=env)
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
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} during start-up\n{self.log_tail()}")
            try:
                if requests.get(self.base_url + "/object_info/KSampler", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ComfyUI did not answer within {timeout} s\n{self.log_tail()}")
            time.sleep(0.2)

    # -- HTTP
    def queue(self, prompt: dict) -> str:
        r = requests.post(self.base_url + "/prompt", json={"prompt": prompt, "client_id": self.client_id},
                          timeout=30)
        if r.status_code == 400:
            raise PromptFailed(f"prompt rejected: {r.json()}", r.json())
        r.raise_for_status()
        return r.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = requests.get(f"{self.base_url}/history/{prompt_id}", timeout=30).json().get(prompt_id)
            if entry is not None:
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited while running the prompt\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout} s\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"].get("status_str") != "success":
            for event, data in entry["status"].get("messages", []):
                if event in ("execution_error", "execution_interrupted"):
                    raise PromptFailed(f"{data.get('node_type')} #{data.get('node_id')}: "
                                       f"{data.get('exception_message', event)}", data)
            raise PromptFailed(f"prompt failed: {entry['status']}")
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
