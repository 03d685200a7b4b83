"""Fixtures shared by the tests (``tests/``), the benchmark (``bench/``) and
``scripts/workflows.py``; not part of the node pack.

* ``comfy_env``: a real ComfyUI in this process (import it first: it puts ComfyUI
  ahead of the repo root on ``sys.path`` and parses ComfyUI's arguments our way);
* ``tiny_models``: tiny, randomly initialised EPS, V and flow models and a text
  encoder from ComfyUI's own classes;
* ``pack_loader``: the repo root imported as the package ``gnri_pack``, as ComfyUI
  loads a custom node folder;
* ``diffusers_cases``: tiny diffusers models, diffusers' own loops and the
  comparisons (needs diffusers);
* ``comfy_server``: a real ComfyUI server subprocess and its HTTP client (the tests'
  server fixture and ``scripts/demo.py``).

Import them from the repo root (``python -m pytest``, ``python -m bench``; pytest.ini
has ``pythonpath = .``).  ComfyUI never imports this package: the pack's
``__init__.py`` imports only ``nodes/``, and pyproject.toml installs only
``gnri_core`` and ``gnri_diffusers``.  This file imports nothing, so
``tests/testing_pack`` can load ``tiny_models`` inside a running ComfyUI without
``comfy_env`` (which must never run there).
"""
