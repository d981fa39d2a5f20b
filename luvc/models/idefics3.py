"""Idefics3 adapter (``Idefics3ForConditionalGeneration``, also the class of the first SmolVLM checkpoints):
a SigLIP tower without a class token, a pixel-shuffle connector, and a Llama-style LLM with 1-D rotary.

What is specific to Idefics3, and lives here:

* Images arrive split into tiles, ``pixel_values [batch, tiles, 3, H, W]``
  with all-zero padding tiles; every real tile is one item of the same grid
  (the processor's image splitting makes full tiles). Tiles with padded
  pixels (``pixel_attention_mask`` not all ones) are refused rather than
  approximated.
* The connector's pixel shuffle concatenates each ``s x s`` block of patches
  (``s = scale_factor``) into one token, so a unit is that block: patches are
  put unit-major on entry, OIM merges whole units, and the projector node
  concatenates each unit's tokens in the pixel shuffle's order.
* SigLIP's attention takes the sizes of merged tokens (``SizedCLIPAttention``).
* The LLM sees one token per unit left; shortened placeholder runs are
  numbered 1-D in order (the row/column marker tokens are text and stay).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig, LlamaConfig

from luvc.errors import CompileError
from luvc.fx.nodes import StackNode
from luvc.hf import Idefics3BaseModelOutputWithPast
from luvc.models.base import FamilyAdapter
from luvc.models.example_inputs import IMAGE_TOKEN, TINY_TEXT, fixed_grid_inputs, tiny_tower
from luvc.models.internvl import PixelShuffleProjectorNode, unit_major
from luvc.models.llava import CLIPLayerNode, CompiledLlavaModel
from luvc.registry import hookimpl
from luvc.runtime.compiled import vision_output
from luvc.runtime.sized_attention import SizedCLIPAttention
from luvc.state import VisionState


class CompiledIdefics3Model(CompiledLlavaModel):
    """Compiled Idefics3 inner model: the SigLIP tower and the LLM run through the luvc graph."""

    _luvc_pixel_kwargs = {"image": ("pixel_values", "pixel_attention_mask")}
    _luvc_output_class = Idefics3BaseModelOutputWithPast

    def get_image_features(self, pixel_values: Tensor, pixel_attention_mask: Tensor | None = None, **kwargs):
        tiles = pixel_values.flatten(0, 1) if pixel_values.dim() == 5 else pixel_values
        real = (tiles != 0).flatten(1).any(dim=1)
        if pixel_attention_mask is not None:
            masks = pixel_attention_mask.flatten(0, 1) if pixel_attention_mask.dim() == 4 else pixel_attention_mask
            if not bool(masks[real].all()):
                raise CompileError("a luvc-compiled Idefics3 needs full tiles: pixel_attention_mask marks padded "
                                   "pixels; resize images to whole tiles (the processor's image splitting does)")
        tiles = tiles[real].type(self.vision_model.dtype)
        tower = self.vision_model
        side = tiles.shape[-1] // tower.patch_size
        full = torch.ones(tiles.shape[0], side, side, dtype=torch.bool, device=tiles.device)
        x = tower.embeddings(pixel_values=tiles, patch_attention_mask=full)
        block = self.config.scale_factor
        patches, positions = unit_major(x, side, block)
        n = side // block
        state = VisionState(hidden=patches, sizes=torch.ones(patches.shape[0], device=x.device), positions=positions,
                            grids=((1, n, n),) * tiles.shape[0], unit=block * block, log=[])
        state = self._luvc_sections[0](state)
        return vision_output(state, [n * n] * tiles.shape[0])


class Idefics3Adapter(FamilyAdapter):
    """Adapter for ``Idefics3ForConditionalGeneration``."""

    name = "idefics3"
    capabilities = frozenset({"llm_grid"})
    model_class = Idefics3ForConditionalGeneration
    compiled_mixin = CompiledIdefics3Model
    sized_attention = SizedCLIPAttention

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.text_model

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.model.vision_model

    def vision_blocks(self, model: nn.Module) -> list[nn.Module]:
        return model.model.vision_model.encoder.layers

    def block_node(self, model: nn.Module, index: int) -> StackNode:
        return CLIPLayerNode(self.vision_blocks(model)[index], index)

    def projector_node(self, model: nn.Module) -> tuple[str, StackNode]:
        norm, projection = model.model.vision_model.post_layernorm, model.model.connector.modality_projection
        return "vision.projector", PixelShuffleProjectorNode(norm, projection)

    def input_grid(self, model: nn.Module, height: int, width: int, frames: int = 1):
        cfg = model.config
        n = cfg.vision_config.image_size // cfg.vision_config.patch_size // cfg.scale_factor
        return (1, n, n), cfg.scale_factor ** 2

    examples = {
        # SigLIP without a class token, pixel-shuffle connector, Llama LLM.
        "idefics3-tiny": dict(text=TINY_TEXT, vision=tiny_tower()),
        # Idefics3-8B's tile geometry at the tiny width: 169 tokens per tile.
        "idefics3-364-tiny": dict(text=TINY_TEXT, vision=tiny_tower(image_size=364)),
    }

    def example_config(self, text: dict, vision: dict, spec: dict):
        config = Idefics3Config(vision_config=Idefics3VisionConfig(**vision), text_config=LlamaConfig(**text),
                                image_token_id=IMAGE_TOKEN, scale_factor=2, tie_word_embeddings=False)
        config.image_seq_length = (vision["image_size"] // vision["patch_size"] // 2) ** 2
        return config

    def example_inputs(self, config, images, videos, prompts, pixels: int) -> dict:
        """One tile per image, packed ``[batch, tiles, 3, H, W]`` with all-zero padding tiles and a
        ``pixel_attention_mask``, as the Idefics3 processor packs them."""
        if any(videos):
            raise ValueError(f"{config.model_type} takes no video")
        out = fixed_grid_inputs(images, prompts, config, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        if "pixel_values" in out:
            flat, per_row = out["pixel_values"], [len(sample) for sample in images]
            side = flat.shape[-1]
            stacked = torch.zeros(len(per_row), max(per_row), *flat.shape[1:])
            masks = torch.zeros(len(per_row), max(per_row), side, side, dtype=torch.long)
            starts = [sum(per_row[:b]) for b in range(len(per_row))]
            for b, (start, n) in enumerate(zip(starts, per_row)):
                stacked[b, :n], masks[b, :n] = flat[start:start + n], 1
            out["pixel_values"], out["pixel_attention_mask"] = stacked, masks
        return out


@hookimpl
def luvc_model_adapters() -> list:
    return [Idefics3Adapter()]
