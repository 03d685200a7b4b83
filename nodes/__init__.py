"""ComfyUI nodes of the pack (V3 schema), thin wrappers over ``gnri_core``."""
from typing_extensions import override
from comfy_api.latest import ComfyExtension, io

from .inversion_nodes import GNRIInvert, GuidedNRSampler
from .edit_nodes import PromptSwapEdit
from .attention_nodes import AttentionMaskBlend
from .uses_nodes import GNRIConceptNoise, GNRIInterpolate


class GNRIExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [GNRIInvert, GuidedNRSampler, PromptSwapEdit, AttentionMaskBlend, GNRIInterpolate, GNRIConceptNoise]


async def comfy_entrypoint() -> GNRIExtension:
    return GNRIExtension()
