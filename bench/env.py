"""ComfyUI in-process (tests/comfy_env.py: --cpu unless a GPU run asks otherwise, temp
folders, torch single-threaded unless OMP_NUM_THREADS says otherwise) and the pack
loaded as ComfyUI loads it (``gnri_pack``), so the benchmark drives the same
``gnri_core`` the nodes use."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


def setup():
    """Returns the pack module (``pack.gnri_core``, ``pack.nodes``)."""
    import comfy_env
    comfy_env.setup()
    import gnri_pack_loader
    return gnri_pack_loader.pack_module()


def core():
    return setup().gnri_core
