"""ComfyUI in-process (gnri_testing/comfy_env.py: --cpu unless a GPU run asks otherwise,
temp folders, torch single-threaded unless OMP_NUM_THREADS says otherwise) and the pack
loaded as ComfyUI loads it (``gnri_pack``), so the benchmark drives the same
``gnri_core`` the nodes use."""
from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup():
    """Returns the pack module (``pack.gnri_core``, ``pack.nodes``)."""
    from gnri_testing import comfy_env
    comfy_env.setup()
    from gnri_testing import pack_loader
    return pack_loader.pack_module()


def core():
    return setup().gnri_core
