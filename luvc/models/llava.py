"""LLaVA adapter (``LlavaForConditionalGeneration``): a CLIP tower with a class token, an MLP
projector, and a Llama-style LLM with 1-D rotary positions.

What is specific to LLaVA, and lives here:

* The CLIP tower runs images as a batch ``[images, 1 + n, D]``; the class token
  is a *prefix*: it attends and is attended to, but never merges (and the
  ``default`` feature strategy drops it before the projector). Every image has
  the same fixed grid, so OIM keeps them the same size and the batch rectangular.
* Only the blocks up to ``vision_feature_layer`` run (LLaVA-1.5 reads the
  second-to-last block, so the last block, whose output it never used, is
  skipped: the same features, one block cheaper).
* Units are single patches (no 2x2 merger); the LLM sees one token per
  remaining patch, and shortened placeholder runs are numbered 1-D in order.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from luvc.errors import CompileError
from luvc.fx.nodes import StackNode, captured_output
from luvc.hf import LlavaModelOutputWithPast
from luvc.models.base import FamilyAdapter
from luvc.models.example_inputs import IMAGE_TOKEN, TINY_TEXT, fixed_grid_inputs, tiny_tower
from luvc.registry import hookimpl
from luvc.runtime.compiled import CompiledVLM, SequentialPositions, vision_output
from luvc.runtime.sized_attention import SizedCLIPAttention
from luvc.runtime.vision_scores import patch_scores
from luvc.state import LedgerRow, VisionState


class CLIPLayerNode(StackNode):
    """One CLIP / SigLIP encoder layer on a ``VisionState`` whose images share one grid, a class token (if
    any) as prefix."""

    site = "vision"

    def __init__(self, layer: nn.Module, index: int) -> None:
        super().__init__()
        self.block = layer
        self.index = index
        self.capture_keys = False
        self.capture_attention = False

    def forward(self, state: VisionState) -> VisionState:
        state.log.append(LedgerRow(f"vision.blocks.{self.index}", "vision", state.tokens_per_image()))
        images, dim = len(state.grids), state.hidden.shape[-1]
        prefix_tokens = state.prefix if state.prefix is not None else state.hidden.new_zeros(images, 0, dim)
        prefix = prefix_tokens.shape[1]
        x = torch.cat([prefix_tokens, state.hidden.view(images, -1, dim)], dim=1)
        sizes = None
        if bool((state.sizes != 1).any()):
            sizes = torch.cat([state.sizes.new_ones(images, prefix), state.sizes.view(images, -1)], dim=1)
        attn = self._attention()
        key_point, query_point = self._captured(attn)
        with captured_output(key_point if self.capture_keys else None, lambda k: k) as keys, \
                captured_output(query_point if self.capture_attention else None, lambda q: q) as queries:
            out = self._run(x, sizes)
        patch_keys, received = patch_scores(queries[0] if queries else None, keys[0] if keys else None, images,
                                            attn.num_heads, attn.head_dim, prefix, attn.scale)
        return dataclasses.replace(state, hidden=out[:, prefix:].reshape(-1, out.shape[-1]), prefix=out[:, :prefix],
                                   keys=patch_keys, attention=received)

    def _attention(self) -> nn.Module:
        return self.block.self_attn

    def _captured(self, attn: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The modules whose outputs are the keys and the queries, [images, tokens, H * d]."""
        return attn.k_proj, attn.q_proj

    def _run(self, x: Tensor, sizes: Tensor | None) -> Tensor:
        """The layer on ``[images, prefix + n, D]``; ``sizes`` (same shape, no D) when tokens were merged."""
        return self.block(x, None, **({"luvc_sizes": sizes} if sizes is not None else {}))


class ProjectorNode(StackNode):
    """LLaVA's MLP projector on the patch tokens (the class token is dropped: ``default`` strategy)."""

    site = "vision"
    kind = "io"

    def __init__(self, projector: nn.Module) -> None:
        super().__init__()
        self.block = projector

    def forward(self, state: VisionState) -> VisionState:
        state.log.append(LedgerRow("vision.projector", "vision", state.tokens_per_image()))
        return state.replace(hidden=self.block(state.hidden), prefix=None, keys=None)


class CompiledLlavaModel(SequentialPositions, CompiledVLM):
    """Compiled LLaVA inner model: the CLIP tower and the LLM run through the luvc graph."""

    _luvc_placeholders = {"image": "image_token_id"}
    _luvc_pixel_kwargs = {"image": ("pixel_values",)}
    _luvc_output_class = LlavaModelOutputWithPast
    _luvc_config_kwargs = ("vision_feature_layer", "vision_feature_select_strategy")

    def get_image_features(self, pixel_values: Tensor, vision_feature_layer=None, vision_feature_select_strategy=None,
                           image_sizes=None, **kwargs):
        self._luvc_check_features(vision_feature_layer, vision_feature_select_strategy)
        tower = self.vision_tower
        x = tower.embeddings(pixel_values.type(tower.dtype))
        x = tower.pre_layrnorm(x)
        images, tokens, dim = x.shape
        side = tower.config.image_size // tower.config.patch_size
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        positions = torch.stack([rows, cols], -1).reshape(-1, 2).float().repeat(images, 1).to(x.device)
        state = VisionState(hidden=x[:, 1:].reshape(-1, dim), sizes=torch.ones(images * side * side, device=x.device),
                            positions=positions, grids=((1, side, side),) * images, unit=1,
                            prefix=x[:, :1], log=[])
        state = self._luvc_sections[0](state)
        return vision_output(state, [side * side] * images)

    def _luvc_check_features(self, vision_feature_layer, vision_feature_select_strategy) -> None:
        """Refuse a per-call feature layer or strategy other than the one the graph was compiled for."""
        for name, value in (("vision_feature_layer", vision_feature_layer),
                            ("vision_feature_select_strategy", vision_feature_select_strategy)):
            if value is not None and value != getattr(self.config, name):
                raise CompileError(f"this model was compiled for {name}={getattr(self.config, name)!r}, "
                                   f"got {value!r}; uncompile, set it in the config, and compile again")


class LlavaAdapter(FamilyAdapter):
    """Adapter for ``LlavaForConditionalGeneration`` (CLIP tower, MLP projector, Llama-style LLM)."""

    name = "llava"
    capabilities = frozenset({"llm_grid"})
    model_class = LlavaForConditionalGeneration
    compiled_mixin = CompiledLlavaModel
    sized_attention = SizedCLIPAttention
    title = "LLaVA"
    #: the feature strategy the compiled tower implements, and why
    strategy = ("default", "class token dropped")

    def check(self, model: nn.Module) -> None:
        cfg = model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise CompileError(f"luvc's {self.title} adapter reads one vision_feature_layer; this model "
                               f"concatenates {cfg.vision_feature_layer}")
        if cfg.vision_feature_select_strategy != self.strategy[0]:
            raise CompileError(f"luvc's {self.title} adapter supports vision_feature_select_strategy="
                               f"{self.strategy[0]!r} ({self.strategy[1]}), not {cfg.vision_feature_select_strategy!r}")
        super().check(model)

    def _used_layers(self, model: nn.Module) -> int:
        layers = len(model.model.vision_tower.encoder.layers)
        index = model.config.vision_feature_layer
        return index if index >= 0 else layers + 1 + index

    def vision_blocks(self, model: nn.Module) -> list[nn.Module]:
        return model.model.vision_tower.encoder.layers[: self._used_layers(model)]

    def block_node(self, model: nn.Module, index: int) -> StackNode:
        return CLIPLayerNode(self.vision_blocks(model)[index], index)

    def projector_node(self, model: nn.Module) -> tuple[str, StackNode]:
        return "vision.projector", ProjectorNode(model.model.multi_modal_projector)

    def input_grid(self, model: nn.Module, height: int, width: int, frames: int = 1):
        cfg = model.config.vision_config
        side = cfg.image_size // cfg.patch_size
        return (1, side, side), 1

    examples = {
        # CLIP ViT with a class token (fixed grid), MLP projector, Llama LLM with 1-D rotary.
        "llava-tiny": dict(text=TINY_TEXT, vision=tiny_tower(num_hidden_layers=5)),
        # LLaVA-1.5's geometry at the tiny width: 576 tokens per image.
        "llava-336-tiny": dict(text=TINY_TEXT, vision=tiny_tower(num_hidden_layers=5, image_size=336)),
        "llava-1.5-7b": dict(
            text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32064),
            vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=336, patch_size=14),
        ),
    }
    #: CLIP's normalisation (mean, std)
    normalisation = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

    def shorten_tower(self, vision: dict, layers: int) -> None:
        """``layers`` blocks run: the tower has one more, as LLaVA reads the second-to-last layer."""
        vision["num_hidden_layers"] = layers + 1

    def example_config(self, text: dict, vision: dict, spec: dict):
        return LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                           image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                           vision_feature_select_strategy="default",
                           image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2)

    def example_inputs(self, config, images, videos, prompts, pixels: int) -> dict:
        """What LLaVA-1.5's processor gives: CLIP's image processor (shorter edge to the tower's size, centre
        crop, CLIP normalisation) and one placeholder per patch."""
        if any(videos):
            raise ValueError(f"{config.model_type} takes no video")
        return fixed_grid_inputs(images, prompts, config, *self.normalisation, crop=True)


@hookimpl
def luvc_model_adapters() -> list:
    return [LlavaAdapter()]
