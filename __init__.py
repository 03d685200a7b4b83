"""ComfyUI-GNRI: fast, exact inversion of real images and text-based editing.

ComfyUI loads this folder as a custom node pack; the nodes live in ``nodes/``, the
frontend extension (reports and warnings drawn on the nodes) in ``web/`` and the
torch-only solver in ``gnri_core/``.
"""
import importlib.util
import logging

MIN_COMFYUI = "0.3.48"  # first release with comfy_api.latest (V3 io.ComfyNode); Flux attention masks need 0.3.60
WEB_DIRECTORY = "./web"

try:  # inside ComfyUI
    from .nodes import comfy_entrypoint  # noqa: F401
except ImportError as exc:  # plain `import gnri_core` users without ComfyUI
    if "comfy" not in str(exc):
        raise
    if importlib.util.find_spec("comfy") is not None:  # a ComfyUI without the V3 node API
        logging.getLogger(__name__).error(
            "ComfyUI-GNRI: no nodes loaded: this ComfyUI lacks comfy_api.latest (%s); the pack needs "
            "ComfyUI %s or newer", exc, MIN_COMFYUI)
