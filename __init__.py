"""ComfyUI-GNRI: fast, exact inversion of real images and text-based editing.

ComfyUI loads this folder as a custom node pack; the nodes live in ``nodes/`` and
the torch-only solver in ``gnri_core/``.
"""
try:  # inside ComfyUI
    from .nodes import comfy_entrypoint  # noqa: F401
except ImportError as exc:  # plain `import gnri_core` users without ComfyUI
    if "comfy" not in str(exc):
        raise
