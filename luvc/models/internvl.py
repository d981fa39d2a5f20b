"""InternVL adapter (``InternVLForConditionalGeneration``): an InternViT tower with a class token and
absolute position embeddings, a pixel-shuffle projector, and a Qwen2-style LLM with 1-D rotary.

What is specific to InternVL, and lives here:

* Every image (or tile) has the same fixed grid; the class token is a
  never-merged prefix (the ``default`` strategy drops it before the projector).
  Position embeddings are added once, at the embeddings, so merged tokens
  carry theirs along, size-weighted.
* The pixel shuffle concatenates each 2x2 patch block into one token, so a
  unit is that 2x2 block: patches are put unit-major on entry and OIM merges
  whole units; the projector then always gets whole blocks, whatever the grid
  became (the model's own pixel shuffle needs a square grid; the projector
  node here concatenates each unit's four tokens in the pixel shuffle's order).
* Merged tokens' sizes re-weight attention (log-size bias; values form under
  FlashAttention), computed here because InternViT's layer passes nothing to
  its attention; an unmerged layer runs the model's own code.
* The LLM sees one token per unit left; shortened placeholder runs are
  numbered 1-D in order.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

from luvc import hf
from luvc.errors import CompileError
from luvc.fx.nodes import StackNode
from luvc.hf import InternVLModelOutputWithPast
from luvc.models.base import FamilyAdapter
from luvc.models.example_inputs import IMAGE_TOKEN, TINY_TEXT, VISION_END, VISION_START, fixed_grid_inputs, tiny_tower
from luvc.models.llava import CLIPLayerNode, CompiledLlavaModel
from luvc.registry import hookimpl
from luvc.runtime.compiled import vision_output
from luvc.runtime.sized_attention import batched_sized_attention
from luvc.state import LedgerRow, VisionState

UNIT = 4  # the 2x2 block the pixel shuffle turns into one token


class InternViTLayerNode(CLIPLayerNode):
    """One InternViT layer on a ``VisionState`` whose images share one grid, class token as prefix.

    InternViT's layer passes nothing to its attention, so merged tokens' sizes
    are applied by running the layer's own computation here (``_sized_layer``).
    """

    def _attention(self) -> nn.Module:
        return self.block.attention

    def _captured(self, attn: nn.Module) -> tuple[nn.Module, nn.Module]:
        return attn.k_norm, attn.q_norm

    def _run(self, x: Tensor, sizes: Tensor | None) -> Tensor:
        return self.block(x) if sizes is None else self._sized_layer(x, sizes)

    def _sized_layer(self, x: Tensor, sizes: Tensor) -> Tensor:
        """The layer's own computation, with size-weighted attention."""
        layer, attn = self.block, self.block.attention
        h = layer.layernorm_before(x)
        q, k, v = attn.q_norm(attn.q_proj(h)), attn.k_norm(attn.k_proj(h)), attn.v_proj(h)
        shape = (*x.shape[:2], attn.num_heads, attn.head_dim)
        out = batched_sized_attention(attn, q.view(shape), k.view(shape), v.view(shape), sizes, attn.scale)
        h = attn.projection_layer(out)
        with hf.direct_weights(layer):  # the layer scales are its own parameters
            h = layer.lambda_1 * h + x
            y = layer.mlp(layer.layernorm_after(h))
            if layer.lambda_2 is not None:
                y = layer.lambda_2 * y
        return y + h


class PixelShuffleProjectorNode(StackNode):
    """Final norm, class token dropped, each unit's tokens concatenated in raster order (the pixel
    shuffle of InternVL and Idefics3), then the projector."""

    site = "vision"
    kind = "io"

    def __init__(self, norm: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.block = projector

    def forward(self, state: VisionState) -> VisionState:
        state.log.append(LedgerRow("vision.projector", "vision", state.tokens_per_image()))
        unit = state.unit
        return state.replace(hidden=self._project(self.norm(state.hidden), len(state.grids), unit), prefix=None,
                             unit=1, sizes=state.sizes.view(-1, unit).sum(dim=1),
                             positions=state.positions.view(-1, unit, 2).mean(dim=1))

    def _project(self, hidden: Tensor, images: int, unit: int) -> Tensor:
        """Unit-major tokens ``[images * units * unit, D]`` -> one LLM token per unit."""
        units = hidden.view(images, -1, unit * hidden.shape[-1])  # images share one grid: one batch
        return self.block(units).flatten(0, 1)


class CompiledInternVLModel(CompiledLlavaModel):
    """Compiled InternVL inner model: InternViT and the LLM run through the luvc graph."""

    _luvc_output_class = InternVLModelOutputWithPast

    def get_image_features(self, pixel_values: Tensor, vision_feature_layer=None, vision_feature_select_strategy=None,
                           **kwargs):
        self._luvc_check_features(vision_feature_layer, vision_feature_select_strategy)
        tower = self.vision_tower
        x = tower.embeddings(pixel_values.type(tower.dtype))
        images, tokens, dim = x.shape
        side = int(round((tokens - 1) ** 0.5))
        half = side // 2
        patches, positions = unit_major(x[:, 1:], side, 2)
        state = VisionState(hidden=patches, sizes=torch.ones(patches.shape[0], device=x.device),
                            positions=positions, grids=((1, half, half),) * images, unit=UNIT, prefix=x[:, :1],
                            log=[])
        state = self._luvc_sections[0](state)
        return vision_output(state, [half * half] * images)


def unit_major(patches: Tensor, side: int, block: int) -> tuple[Tensor, Tensor]:
    """Raster patches ``[images, side * side, D]`` -> unit-major ``[images * side^2, D]`` (``block x block``
    units in raster order, sub-tokens in raster order inside each) and their (row, col) positions."""
    images, _, dim = patches.shape
    n = side // block
    hidden = patches.reshape(images, n, block, n, block, dim).permute(0, 1, 3, 2, 4, 5).reshape(-1, dim)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([rows, cols], -1).view(n, block, n, block, 2).permute(0, 2, 1, 3, 4).reshape(-1, 2)
    return hidden, grid.float().repeat(images, 1).to(patches.device)


class InternVLAdapter(FamilyAdapter):
    """Adapter for ``InternVLForConditionalGeneration`` (InternViT, pixel-shuffle MLP projector, Qwen2 LLM)."""

    name = "internvl"
    capabilities = frozenset({"llm_grid"})
    model_class = InternVLForConditionalGeneration
    compiled_mixin = CompiledInternVLModel  # its layer node weighs sizes itself: no attention swapped

    def check(self, model: nn.Module) -> None:
        cfg = model.config
        if cfg.vision_feature_layer != -1 or cfg.vision_feature_select_strategy != "default":
            raise CompileError("luvc's InternVL adapter reads the last vision layer with the class token dropped "
                               f"(vision_feature_layer=-1, strategy 'default'), not {cfg.vision_feature_layer!r}, "
                               f"{cfg.vision_feature_select_strategy!r}")
        if cfg.downsample_ratio != 0.5:
            raise CompileError(f"luvc's InternVL adapter supports downsample_ratio 0.5, not {cfg.downsample_ratio}")
        super().check(model)

    def vision_blocks(self, model: nn.Module) -> list[nn.Module]:
        return model.model.vision_tower.encoder.layer

    def block_node(self, model: nn.Module, index: int) -> StackNode:
        return InternViTLayerNode(self.vision_blocks(model)[index], index)

    def projector_node(self, model: nn.Module) -> tuple[str, StackNode]:
        layernorm = model.model.vision_tower.layernorm
        return "vision.projector", PixelShuffleProjectorNode(layernorm, model.model.multi_modal_projector)

    def input_grid(self, model: nn.Module, height: int, width: int, frames: int = 1):
        cfg = model.config.vision_config
        side = cfg.image_size[0] // cfg.patch_size[0]
        return (1, side // 2, side // 2), UNIT

    examples = {
        # InternViT with a class token and absolute positions, pixel-shuffle projector, Qwen2 LLM.
        "internvl-tiny": dict(text=TINY_TEXT, vision=tiny_tower()),
        # InternVL's tile geometry at the tiny width: 256 tokens per tile.
        "internvl-448-tiny": dict(text=TINY_TEXT, vision=tiny_tower(image_size=448)),
    }

    def example_config(self, text: dict, vision: dict, spec: dict):
        side = vision["image_size"] // vision["patch_size"]
        vision.update(image_size=[vision["image_size"]] * 2, patch_size=[vision["patch_size"]] * 2)
        return InternVLConfig(vision_config=InternVLVisionConfig(**vision), text_config=Qwen2Config(**text),
                              image_token_id=IMAGE_TOKEN, image_seq_length=(side // 2) ** 2)

    def example_inputs(self, config, images, videos, prompts, pixels: int) -> dict:
        """What InternVL's processor gives for one tile per image: the tile squashed to the tower's size with
        ImageNet normalisation, its tokens between ``<img>`` and ``</img>`` (here the vision start and end ids)."""
        if any(videos):
            raise ValueError(f"{config.model_type} takes no video")
        return fixed_grid_inputs(images, prompts, config, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                 wrap=([VISION_START], [VISION_END]))


@hookimpl
def luvc_model_adapters() -> list:
    return [InternVLAdapter()]
