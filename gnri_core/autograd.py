"""Gradients through models whose weights are inference tensors.

Hosts such as ComfyUI load weights under ``torch.inference_mode()``; autograd refuses
to save such tensors for backward. Inside :class:`through_inference_tensors` every
inference tensor an op receives is replaced by a normal copy, so a vector-Jacobian
product through the network works (at the cost of copying the weights each call).
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map


def _normal(value):
    if isinstance(value, torch.Tensor) and value.is_inference():
        return value.clone()
    return value


class through_inference_tensors(TorchFunctionMode):
    """Context manager: autograd on, inference mode off, inference tensors copied."""

    def __enter__(self):
        self._modes = [torch.inference_mode(False), torch.enable_grad()]
        for mode in self._modes:
            mode.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs = tree_map(_normal, (args, kwargs or {}))
        return func(*args, **kwargs)
