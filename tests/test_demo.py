"""The README's two commands: ``scripts/run_comfyui.sh`` (the real ComfyUI with the pack
and its example workflows as templates) and its ``--demo`` (a real edit on the trained
world models through the HTTP API)."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from conftest import PACK_LINK_NAME
from gnri_testing import comfy_env

sys.path.insert(0, os.path.join(comfy_env.REPO_ROOT, "scripts"))
import demo

pytestmark = pytest.mark.server
WORKFLOWS = sorted(f[:-5] for f in os.listdir(os.path.join(comfy_env.REPO_ROOT, "example_workflows"))
                   if f.endswith(".json"))


def test_demo_world_edit_through_the_server(comfy_server, tmp_path):
    """What ``run_comfyui.sh --demo`` queues, on the test server: a real colour edit on
    the world UNet, GNRI beside the native inversion."""
    from PIL import Image

    rows, images, calls = demo.run_edit(comfy_server, "unet", demo.SOURCE, demo.TARGET, 0)
    by = {r["name"]: r for r in rows}
    assert set(by) == {"gnri_edit", "gnri_recon", "native_edit", "native_recon"}
    assert all(by["gnri_edit"]["correct"].values()), demo.table(rows)
    assert all(by["gnri_recon"]["correct"].values()), demo.table(rows)
    assert by["gnri_recon"]["psnr_outside"] > by["native_recon"]["psnr_outside"] + 5, demo.table(rows)
    spent = re.search(r"(\d+) model calls", calls)
    # 20 steps, 3 calls each, up to 8 on a step still unconverged (measured 63)
    assert spent and 20 < int(spent.group(1)) <= 100, calls
    out = tmp_path / "demo.png"
    demo.figure(images, rows, str(out), "test")
    assert Image.open(out).size[0] > 6 * 128


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_comfyui_script_serves_the_pack_and_its_templates(tmp_path):
    port = _free_port()
    user = tmp_path / "user"
    user.mkdir()
    cmd = ["bash", os.path.join(comfy_env.REPO_ROOT, "scripts", "run_comfyui.sh"), "--port", str(port), "--",
           "--user-directory", str(user), "--database-url", f"sqlite:///{tmp_path / 'comfyui.db'}",
           "--output-directory", str(tmp_path / "output"), "--input-directory", str(tmp_path / "input"),
           "--temp-directory", str(tmp_path / "temp"), "--disable-api-nodes"]
    env = dict(os.environ, GNRI_COMFYUI_PATH=comfy_env.COMFYUI_PATH)
    log_path = tmp_path / "run_comfyui.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "is running" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        text = log_path.read_text(errors="replace")
        assert f"http://127.0.0.1:{port}" in text and "models/checkpoints" in text, text[-2000:]
        base = f"http://127.0.0.1:{port}"
        assert "GNRIInvert" in requests.get(base + "/object_info/GNRIInvert", timeout=10).json()
        templates = requests.get(base + "/api/workflow_templates", timeout=10).json()
        assert sorted(templates.get(PACK_LINK_NAME, [])) == WORKFLOWS, templates
        for name in WORKFLOWS:
            r = requests.get(f"{base}/api/workflow_templates/{PACK_LINK_NAME}/{name}.json", timeout=10)
            assert r.status_code == 200 and r.json()["nodes"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)           # the script stops ComfyUI and exits
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    with pytest.raises(requests.ConnectionError):      # ComfyUI stopped with the script
        requests.get(f"http://127.0.0.1:{port}/object_info/KSampler", timeout=5)
