"""Make a real ComfyUI importable in this process (pytest, ``python -m bench``,
``scripts/workflows.py``).

Import this module before anything that imports ``comfy``, ``nodes``,
``execution``, ``folder_paths`` ...  It

* finds ComfyUI through ``GNRI_COMFYUI_PATH`` (default ``<repo>/.comfyui``, what
  ``scripts/setup_env.sh`` builds) and puts it FIRST on ``sys.path``: the repo
  root has a ``nodes/`` package of its own, and the repo root is on ``sys.path``
  (``python -m pytest`` / ``python -m bench`` put the working directory there,
  pytest.ini's ``pythonpath = .`` puts it there for plain ``pytest``; this package
  is imported from there), so without this ``import nodes`` would find the pack's
  folder instead of ComfyUI's ``nodes.py``;
* sets ``sys.argv`` to ``--cpu --base-directory <tmp>`` and enables ComfyUI's
  argument parsing before ``comfy.cli_args`` is imported (it parses ``[]``
  otherwise, and the ComfyUI checkout would be used as base directory); without
  ``--cpu`` when ``GNRI_COMFY_CPU=0`` (``python -m bench gpu`` sets it for a CUDA run);
* runs torch single-threaded (``OMP_NUM_THREADS=1`` unless set; also inherited by
  the server subprocess): the tiny test models gain nothing from threads, and on a
  2-core machine shared with another process OpenMP spin-waiting made the suite
  ~10x slower;
* points all ComfyUI folders (models, input, output, temp, user, custom_nodes)
  at a fresh temporary base directory, removed at exit, so nothing is written
  into the ComfyUI checkout.

Importing it again is a no-op: ``setup()`` is idempotent, also across a second
copy of this module imported under another name (the state is kept on
``folder_paths``).  Attributes: COMFYUI_PATH, BASE_DIR, REPO_ROOT, TESTS_DIR,
TESTING_PACK_DIR.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.join(REPO_ROOT, "tests")
TESTING_PACK_DIR = os.path.join(TESTS_DIR, "testing_pack")

COMFYUI_PATH: str = os.path.abspath(
    os.environ.get("GNRI_COMFYUI_PATH") or os.path.join(REPO_ROOT, ".comfyui")
)
BASE_DIR: str | None = None  # the temporary ComfyUI base directory, once set up

_ready = False


def wants_cpu() -> bool:
    """ComfyUI runs with ``--cpu`` unless ``GNRI_COMFY_CPU=0``."""
    return os.environ.get("GNRI_COMFY_CPU", "1") != "0"


def _check_comfyui(path: str) -> None:
    if not os.path.isfile(os.path.join(path, "main.py")) or not os.path.isdir(
        os.path.join(path, "comfy")
    ):
        raise RuntimeError(
            f"No ComfyUI at {path!r} (GNRI_COMFYUI_PATH). Run `bash scripts/test.sh` "
            "(it builds .venv/ and .comfyui/), or point GNRI_COMFYUI_PATH at a "
            "ComfyUI checkout."
        )


def setup() -> str:
    """Idempotently prepare the process; returns the temporary base directory."""
    global _ready, BASE_DIR
    if _ready:
        return BASE_DIR  # type: ignore[return-value]

    fp = sys.modules.get("folder_paths")
    if fp is not None and getattr(fp, "_gnri_test_base_dir", None):  # set up by another copy
        BASE_DIR, _ready = fp._gnri_test_base_dir, True
        return BASE_DIR

    _check_comfyui(COMFYUI_PATH)
    for name in ("comfy", "folder_paths", "comfy.cli_args"):
        mod = sys.modules.get(name)
        if mod is not None:  # imported before comfy_env: argv was not parsed our way
            where = getattr(mod, "__file__", None) or list(getattr(mod, "__path__", []) or ["?"])[0]
            raise RuntimeError(
                f"ComfyUI's {name!r} was imported (from {where}) before gnri_testing/comfy_env.py; "
                "import gnri_testing.comfy_env first (tests/conftest.py does)")

    # ComfyUI first on sys.path (see module docstring).
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != COMFYUI_PATH]
    sys.path.insert(0, COMFYUI_PATH)
    bad = sys.modules.get("nodes")
    if bad is not None and not os.path.abspath(getattr(bad, "__file__", "")).startswith(COMFYUI_PATH):
        del sys.modules["nodes"]  # the pack's nodes/ was imported as top-level `nodes`

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
    import torch

    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))

    BASE_DIR = tempfile.mkdtemp(prefix="gnri-comfy-")
    for sub in ("models", "input", "output", "temp", "user", "custom_nodes"):
        os.makedirs(os.path.join(BASE_DIR, sub), exist_ok=True)
    atexit.register(shutil.rmtree, BASE_DIR, True)

    # cli_args parses sys.argv at import time, only if parsing was enabled.
    saved_argv = sys.argv
    sys.argv = [os.path.join(COMFYUI_PATH, "main.py"), "--base-directory", BASE_DIR, "--disable-auto-launch"] + (
        ["--cpu"] if wants_cpu() else [])
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses now)
        import folder_paths
        # As main.py does, import ComfyUI's `utils` package BEFORE `nodes`: nodes.py
        # puts <ComfyUI>/comfy first on sys.path, after which `import utils` would
        # find comfy/utils.py ("'utils' is not a package" from server.py).
        import utils.extra_config  # noqa: F401
        import utils.install_util  # noqa: F401
        # Pin ComfyUI's nodes.py as `nodes` now, so a later sys.path change (a test
        # putting the repo root first, plain `pytest` runs) cannot make
        # `import nodes` find the pack's nodes/ package.
        import nodes  # noqa: F401
    finally:
        sys.argv = saved_argv

    if not os.path.abspath(sys.modules["nodes"].__file__).startswith(COMFYUI_PATH):
        raise RuntimeError(f"`nodes` resolved to {sys.modules['nodes'].__file__}, not ComfyUI's nodes.py")

    # Belt and braces: whatever the parsed args, keep every folder in the temp dir.
    folder_paths.set_output_directory(os.path.join(BASE_DIR, "output"))
    folder_paths.set_input_directory(os.path.join(BASE_DIR, "input"))
    folder_paths.set_temp_directory(os.path.join(BASE_DIR, "temp"))
    folder_paths.set_user_directory(os.path.join(BASE_DIR, "user"))
    if not folder_paths.base_path.startswith(BASE_DIR):
        raise RuntimeError(f"ComfyUI base path is {folder_paths.base_path}, expected {BASE_DIR}")

    folder_paths._gnri_test_base_dir = BASE_DIR
    _ready = True
    return BASE_DIR


setup()
