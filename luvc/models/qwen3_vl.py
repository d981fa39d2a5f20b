"""Qwen3-VL and Qwen3-VL-MoE adapters: Qwen2-VL's glue plus learned positions, DeepStack and per-frame video.

What differs from Qwen2-VL, and lives here:

* 16 px patches; the tower adds learned position embeddings (its square
  table resampled to the unmerged grid) to the patch embeddings before the
  first block, so a merge between blocks averages tokens that already carry
  their positions. The 2-D rotary comes from the current unit grid as in
  Qwen2-VL.
* DeepStack: the outputs of blocks ``deepstack_visual_indexes`` go through
  their own mergers and are added to the visual tokens' hidden states after
  the first decoder layers. Each captured output rides in the state's
  ``carried`` features, so every later vision transform merges it exactly as
  it merges the main stream (size-weighted means of the same groups); the
  projector node runs the DeepStack mergers on whole units of the final grid,
  so each DeepStack feature list aligns 1:1 with the final visual tokens. In
  the LLM the features are indexed by each token's caller position
  (``LLMState.deepstack``): a kept token gets its own, a pruned one none.
* Video: the processor puts a timestamp (``<t seconds>``) and vision
  start/end tokens around every temporal patch, so each frame is its own run
  of placeholders and its own item in the encoder output (one grid
  ``(1, h, w)`` per frame, as ``get_rope_index`` splits video grids).
* M-RoPE interleaves its sections (the text rotary embedding does it from
  ``[3, B, S]`` positions); positions come from the merged grids.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
from torch import Tensor, nn
from transformers import (
    Qwen2VLImageProcessorPil,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
)

from luvc import hf
from luvc.errors import CompileError
from luvc.fx.nodes import StackNode
from luvc.models.qwen2_vl import CompiledQwen2VLModel, Qwen2VLAdapter, VisionBlockNode, VisionProjectNode
from luvc.registry import hookimpl
from luvc.runtime.llm import DecoderLayerNode, placeholder_keep
from luvc.state import LLMState, VisionState


class DeepstackVisionBlockNode(VisionBlockNode):
    """A vision block whose output DeepStack also reads: appended to the features the state carries."""

    def forward(self, state: VisionState) -> VisionState:
        state = super().forward(state)
        carried = state.hidden if state.carried is None else torch.cat([state.carried, state.hidden], dim=-1)
        return dataclasses.replace(state, carried=carried)


class DeepstackProjectNode(VisionProjectNode):
    """The 2x2 patch merger, and each DeepStack merger on the block output it carries (same units)."""

    def __init__(self, merger: nn.Module, deepstack: list[nn.Module]) -> None:
        super().__init__(merger)
        self.deepstack = nn.ModuleList(deepstack)

    def forward(self, state: VisionState) -> VisionState:
        out = super().forward(state)
        if state.carried is None:
            return out
        levels = state.carried.split(state.hidden.shape[-1], dim=-1)
        carried = torch.cat([merger(level.contiguous()) for merger, level in zip(self.deepstack, levels)], dim=-1)
        return dataclasses.replace(out, carried=carried)


class DeepstackLayerNode(DecoderLayerNode):
    """A decoder layer after which each visual token gets its own DeepStack feature added (prefill only)."""

    def forward(self, state: LLMState) -> LLMState:
        state = super().forward(state)
        if state.decoding or self.index >= len(state.deepstack):
            return state
        visual = (state.visual & state.valid)[..., None]
        return dataclasses.replace(state, hidden=torch.where(visual, state.hidden + self.features(state),
                                                             state.hidden))

    def features(self, state: LLMState) -> Tensor:
        """[B, S, D] the DeepStack feature of each of ``state``'s tokens at this layer (zeros for text)."""
        table = state.deepstack[self.index]
        index = state.source.clamp(min=0)[..., None].expand(-1, -1, table.shape[-1])
        return table.gather(1, index)


def per_frame(state: VisionState, grids: tuple) -> tuple[VisionState, tuple]:
    """``state`` and the source ``grids`` with every video frame its own item ``(1, h, w)``: each frame is a
    run of placeholders of its own in the prompt. Tokens stay in place (frames are consecutive)."""
    frames = tuple((1, h, w) for t, h, w in state.grids for _ in range(t))
    first = list(itertools.accumulate([t for t, _, _ in state.grids], initial=0))
    rows = frozenset(first[i] + f for i in state.rows for f in range(state.grids[i][0]))
    source = tuple((1, h, w) for t, h, w in grids for _ in range(t))
    return dataclasses.replace(state, grids=frames, rows=rows), source


class CompiledQwen3VLModel(CompiledQwen2VLModel):
    """Compiled Qwen3-VL inner model: learned positions, per-frame items, DeepStack features in the LLM."""

    def _luvc_embed(self, pixels: Tensor, grid_thw: Tensor) -> Tensor:
        hidden = super()._luvc_embed(pixels, grid_thw)
        return hidden + hf.vision_position_embeddings(self.visual, grid_thw).to(hidden.dtype)

    def _luvc_vision_output(self, state: VisionState, grids: tuple) -> hf.BaseModelOutputWithPooling:
        state, grids = per_frame(state, grids)
        out = super()._luvc_vision_output(state, grids)
        if state.carried is not None:
            levels = len(self.visual.deepstack_merger_list)
            out.luvc_deepstack = [f.view(len(f), levels, -1) for f in state.carried.split(out.luvc_counts)]
        return out

    def _luvc_prefill(self, input_ids, inputs_embeds, attention_mask, position_ids, encoded, cache, kwargs):
        state, length = super()._luvc_prefill(input_ids, inputs_embeds, attention_mask, position_ids, encoded,
                                              cache, kwargs)
        if encoded:
            state = state.replace(deepstack=self._luvc_deepstack(input_ids, encoded, state.hidden))
        return state, length

    def _luvc_deepstack(self, ids: Tensor, encoded: dict, like: Tensor) -> tuple[Tensor, ...]:
        """Per DeepStack level, [B, L, D] each kept placeholder's feature at its place in the caller's ``ids``."""
        tables: list[Tensor] = []
        for kind, out in encoded.items():
            features = _deepstack_features(out)
            if features is None:
                continue
            placeholder = ids == getattr(self.config, self._luvc_placeholders[kind])
            counts = [len(f) for f in out.pooler_output]
            kept = placeholder & placeholder_keep(placeholder, getattr(out, "luvc_source_counts", counts), counts)
            features = features.to(like.device, like.dtype)
            if not tables:
                tables = [like.new_zeros(*ids.shape, features.shape[-1]) for _ in range(features.shape[1])]
            tables = [t.masked_scatter(kept[..., None], features[:, i]) for i, t in enumerate(tables)]
        return tuple(tables)


def _deepstack_features(out) -> Tensor | None:
    """[N, levels, D] an encoder output's DeepStack features, items concatenated: luvc's, or transformers'
    (``deepstack_features``, per level a tuple per item) for outputs a caller computed uncompiled."""
    if getattr(out, "luvc_deepstack", None) is not None:
        return torch.cat(list(out.luvc_deepstack))
    if getattr(out, "deepstack_features", None):
        return torch.stack([torch.cat(list(level)) for level in out.deepstack_features], dim=1)
    return None


class CompiledQwen3VLMoeModel(CompiledQwen3VLModel):
    """Compiled Qwen3-VL-MoE inner model: router logits are not collected (each layer sees its own tokens)."""

    _luvc_output_class = hf.Qwen3VLMoeBaseModelOutputWithPast

    def forward(self, *args, output_router_logits: bool | None = None, **kwargs):
        if output_router_logits:
            raise CompileError("output_router_logits is not available from a luvc-compiled model: each layer routes "
                               "its own tokens\n  luvc.uncompile(model) to collect router logits")
        return super().forward(*args, **kwargs)


def _text(hidden: int, intermediate: int, layers: int, heads: int, kv: int, head_dim: int, section: list[int],
          theta: float, **extra) -> dict:
    """Qwen3-VL text config keywords: interleaved M-RoPE with ``section`` (t, h, w) frequency counts."""
    rope = {"rope_type": "default", "mrope_section": section, "mrope_interleaved": True, "rope_theta": theta}
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, rope_parameters=rope, **extra)


#: The tiny vision tower of the examples: 4 blocks, DeepStack from blocks 1 and 2, an 8x8 learned position table.
_TINY_VISION = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, num_position_embeddings=64,
                    deepstack_visual_indexes=[1, 2])


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Adapter for ``Qwen3VLForConditionalGeneration``."""

    name = "qwen3_vl"
    model_class = Qwen3VLForConditionalGeneration
    compiled_mixin = CompiledQwen3VLModel
    _vision_out_key = "out_hidden_size"
    examples = {
        "qwen3-vl-tiny": dict(text=_text(64, 128, 4, 4, 2, 16, [2, 3, 3], 10000.0), vision=_TINY_VISION),
        # Real dimensions of Qwen3-VL-8B-Instruct (its config.json), for speed runs.
        "qwen3-vl-8b": dict(
            text=_text(4096, 12288, 36, 32, 8, 128, [24, 20, 20], 5000000.0, vocab_size=151936,
                       tie_word_embeddings=False),
            vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                        num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
        ),
    }

    def block_node(self, model: nn.Module, index: int) -> StackNode:
        visual = model.model.visual
        if index in visual.deepstack_visual_indexes:
            return DeepstackVisionBlockNode(visual.blocks[index], index, visual)
        return VisionBlockNode(visual.blocks[index], index, visual)

    def projector_node(self, model: nn.Module) -> tuple[str, StackNode]:
        visual = model.model.visual
        order = list(visual.deepstack_visual_indexes)  # captured in block order, each by its own merger
        mergers = [visual.deepstack_merger_list[order.index(i)] for i in sorted(order)]
        return "vision.merger", DeepstackProjectNode(visual.merger, mergers)

    def llm_nodes(self, model: nn.Module) -> list[tuple[str, StackNode]]:
        nodes = super().llm_nodes(model)
        levels = len(model.model.visual.deepstack_visual_indexes)
        for i, (label, node) in enumerate(nodes[:levels]):
            nodes[i] = (label, DeepstackLayerNode(node.block, node.index, node.rotary[0]))
        return nodes

    def input_grid(self, model: nn.Module, height: int, width: int, frames: int = 1,
                   max_pixels: int = 16 * 16 * 4 * 16384) -> tuple[tuple[int, int, int], int]:
        return super().input_grid(model, height, width, frames, max_pixels)

    def shorten_tower(self, vision: dict, layers: int) -> None:
        """As Qwen2-VL's, and only the DeepStack blocks before the cut still feed the LLM."""
        super().shorten_tower(vision, layers)
        vision["deepstack_visual_indexes"] = [i for i in vision["deepstack_visual_indexes"] if i < layers]

    def example_config(self, text: dict, vision: dict, spec: dict):
        return super().example_config(dict(text), {"patch_size": 16, **vision}, spec)

    def _example_processor(self, config, pixels: int):
        return Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=pixels, patch_size=16,
                                        image_mean=[0.5] * 3, image_std=[0.5] * 3)

    def _example_placeholders(self, kind: str, grid: list[int], tokens: list[int]) -> list[int]:
        """An image as Qwen2-VL's; a video as its processor writes it: per temporal patch its timestamp text
        (frames at 24 fps, the processor's default without metadata; the mean of the patch's two frames),
        then that frame's placeholders between vision start and end."""
        frame = super()._example_placeholders(kind, [1, *grid[1:]], tokens)
        if kind == "image":
            return frame
        return [tok for t in range(grid[0]) for tok in (*_text_tokens(f"<{(2 * t + 0.5) / 24:.1f} seconds>"),
                                                        *frame)]


def _text_tokens(text: str) -> list[int]:
    """Stand-in token ids of ``text`` (one per character; the example configs have no tokenizer)."""
    return [ord(c) for c in text]


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Adapter for ``Qwen3VLMoeForConditionalGeneration``: Qwen3-VL with mixture-of-experts MLPs in the LLM."""

    name = "qwen3_vl_moe"
    model_class = Qwen3VLMoeForConditionalGeneration
    compiled_mixin = CompiledQwen3VLMoeModel
    examples = {
        "qwen3-vl-moe-tiny": dict(
            text=_text(64, 128, 4, 4, 2, 16, [2, 3, 3], 10000.0, moe_intermediate_size=32, num_experts=4,
                       num_experts_per_tok=2),
            vision=_TINY_VISION,
        ),
    }


@hookimpl
def luvc_model_adapters() -> list:
    return [Qwen3VLAdapter(), Qwen3VLMoeAdapter()]
