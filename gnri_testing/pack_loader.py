"""Imports the pack (the repo root) as the package ``gnri_pack``, as ComfyUI would,
so tests and the benchmark can reach ``gnri_pack.nodes.*`` and the pack's own ``gnri_core`` classes."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from . import comfy_env

comfy_env.setup()
PACKAGE = "gnri_pack"


def pack_module(submodule: str = ""):
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, os.path.join(comfy_env.REPO_ROOT, "__init__.py"),
            submodule_search_locations=[comfy_env.REPO_ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACKAGE}.{submodule}" if submodule else PACKAGE)
