"""Qwen3.5 adapter (and Qwen3.5-MoE): a Qwen3-VL-style vision tower before a hybrid language model.

What differs from Qwen2-VL, and lives here:

* The tower adds a learned position table, bilinearly resampled to each
  image's patch grid, to the patch embeddings before the first block; the
  blocks and the 2x2 merger take Qwen2-VL's arguments, so Qwen2-VL's nodes
  run them (OIM and the rotary from the current grid as there).
* Decoder layers alternate Gated DeltaNet linear attention and full
  attention (``config.layer_types``). A full-attention layer keeps a KV cache
  of the tokens it saw, as every decoder layer in luvc does; its query
  projection also yields an output gate, so its queries are the first half
  of each head's channels. A linear-attention layer keeps a convolution state
  (its last ``kernel`` inputs) and a recurrent state, both over the tokens it
  saw: after a prune it runs its recurrence over the kept tokens only, in
  order. Rows are left-padded; like transformers, padding inputs are zeroed,
  and a zero input leaves a zero recurrent state zero and is what the
  convolution pads with, so padding changes nothing. It has no attention to
  probe: a transform that ranks tokens by attention may not run before it.
* Each temporal patch of a video is its own run of placeholders between vision
  start and end tokens, and ``get_rope_index`` takes one grid per run, so the
  LLM side sees a video as one item per frame.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from transformers import (
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForConditionalGeneration,
)

from luvc import hf
from luvc.errors import CompileError
from luvc.fx.nodes import StackNode
from luvc.models.qwen2_vl import CompiledQwen2VLModel, Qwen2VLAdapter
from luvc.registry import hookimpl
from luvc.runtime.llm import DecoderLayerNode, FinalNormNode
from luvc.state import LLMState


class GatedAttentionLayerNode(DecoderLayerNode):
    """A full-attention decoder layer whose ``q_proj`` gives each head's queries and then its output gate."""

    def queries(self, x: Tensor) -> Tensor:
        attn = self.block.self_attn
        query, _gate = torch.chunk(attn.q_proj(x).view(*x.shape[:2], -1, attn.head_dim * 2), 2, dim=-1)
        return query


class LinearAttentionLayerNode(StackNode):
    """A Gated DeltaNet decoder layer, called on an ``LLMState``: convolution and recurrence over the state's
    tokens in order, its cache state (if any) continued from the tokens it saw before."""

    site = "llm"

    def __init__(self, layer: nn.Module, index: int) -> None:
        super().__init__()
        self.block = layer
        self.index = index

    def forward(self, state: LLMState) -> LLMState:
        if not state.decoding:
            state.log.append(state.ledger_row(f"llm.layers.{self.index}"))
        hidden = self.block(state.hidden, position_embeddings=None, attention_mask=padding_mask(state),
                            **{hf.CACHE_KWARG: state.cache})
        return dataclasses.replace(state, hidden=hidden)


def padding_mask(state: LLMState) -> Tensor | None:
    """The 2-D mask a linear-attention layer zeroes padding inputs with, as transformers builds it: none for a
    single new token (never padding), else which tokens are real (multiplying a real token by 1 is exact, so
    an unpadded batch needs no host-side check)."""
    return None if state.hidden.shape[1] == 1 else state.valid


def per_frame(out: hf.BaseModelOutputWithPooling) -> hf.BaseModelOutputWithPooling:
    """The encoded videos ``out`` as one item per temporal patch, in place: each frame is its own placeholder
    run in a Qwen3.5 prompt and its own grid for ``get_rope_index``."""
    frames = [t for t, _, _ in out.luvc_source_grids]

    def split(values: list) -> list:
        return [part for value, t in zip(values, frames) for part in torch.tensor_split(value, t)]

    def divide(counts: list[int]) -> list[int]:
        return [n // t for n, t in zip(counts, frames) for _ in range(t)]

    def single(grids: list) -> list:
        return [None if g is None else (1, *g[1:]) for g, t in zip(grids, frames) for _ in range(t)]

    out.pooler_output = split(list(out.pooler_output))
    out.luvc_source_counts, out.luvc_counts = divide(out.luvc_source_counts), divide(out.luvc_counts)
    out.luvc_source_grids = single(out.luvc_source_grids)
    out.luvc_cells = split(out.luvc_cells)
    grid = out.luvc_grid_thw.repeat_interleave(torch.tensor(frames, device=out.luvc_grid_thw.device), dim=0)
    out.luvc_grid_thw = torch.cat([torch.ones_like(grid[:, :1]), grid[:, 1:]], dim=1)
    if getattr(out, "luvc_sizes", None) is not None:
        out.luvc_sizes = split(out.luvc_sizes)
    if getattr(out, "luvc_llm_grids", None) is not None:
        out.luvc_llm_grids = single(out.luvc_llm_grids)
    return out


class CompiledQwen3_5Model(CompiledQwen2VLModel):
    """Compiled Qwen3.5 inner model: Qwen2-VL's encoding plus the learned position table; videos per frame."""

    def _luvc_embed(self, pixels: Tensor, grid_thw: Tensor) -> Tensor:
        visual = self.visual
        hidden = visual.patch_embed(pixels.type(visual.dtype))
        index, weight = hf.learned_position_taps(grid_thw, visual)
        return hidden + (visual.pos_embed(index) * weight[:, :, None]).sum(1).to(hidden.dtype)

    def get_video_features(self, pixel_values_videos: Tensor, video_grid_thw: Tensor | None = None, **kwargs):
        return per_frame(self._luvc_encode(pixel_values_videos, video_grid_thw))


class CompiledQwen3_5MoeModel(CompiledQwen3_5Model):
    """Compiled Qwen3.5-MoE inner model: as Qwen3.5's, returning the MoE output class."""

    _luvc_output_class = hf.Qwen3_5MoeBaseModelOutputWithPast
    _luvc_read_kwargs = ("output_router_logits",)

    def _luvc_check_kwargs(self, kwargs: dict) -> None:
        if kwargs.get("output_router_logits"):
            raise CompileError(
                "output_router_logits is not available from a luvc-compiled Qwen3.5-MoE: each layer routes only the "
                "tokens it kept\n  set config.text_config.output_router_logits = False, or luvc.uncompile(model) first")
        super()._luvc_check_kwargs(kwargs)


class Qwen3_5Adapter(Qwen2VLAdapter):
    """Adapter for ``Qwen3_5ForConditionalGeneration``."""

    name = "qwen3_5"
    model_class = Qwen3_5ForConditionalGeneration
    compiled_mixin = CompiledQwen3_5Model
    _vision_out_key = "out_hidden_size"
    examples = {
        # Layers 0-2 Gated DeltaNet, layer 3 full attention (full_attention_interval 4); partial M-RoPE
        # (a quarter of each 32-channel head, interleaved sections 2+1+1).
        "qwen3.5-tiny": dict(
            text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                      linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                      vocab_size=1024, full_attention_interval=4, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                                       "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
            vision=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, num_position_embeddings=64),
        ),
        # transformers' Qwen3_5Config defaults (no released checkpoint's config.json was at hand): 32 layers,
        # every 4th full attention; the tower's output width set to the LLM's, which the merger must match.
        "qwen3.5-defaults": dict(
            text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
                      num_key_value_heads=4, head_dim=256, vocab_size=248320, full_attention_interval=4,
                      rope_parameters={"rope_type": "default", "mrope_section": [11, 11, 10], "mrope_interleaved": True,
                                       "rope_theta": 10000000.0, "partial_rotary_factor": 0.25}),
            vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, num_position_embeddings=2304),
        ),
    }

    def check(self, model: nn.Module) -> None:
        super().check(model)
        types = set(self.language_model(model).config.layer_types)
        if not types <= {"linear_attention", "full_attention"}:
            raise CompileError(f"this Qwen3.5 has layer types {sorted(types)}; luvc runs linear_attention and "
                               "full_attention layers only")

    def install(self, model: nn.Module, graph: nn.Module) -> dict:
        if getattr(graph, "luvc_llm_sizes", False):
            raise CompileError(
                "proportional_llm_attention is not supported on Qwen3.5: its Gated DeltaNet layers have no "
                "softmax over keys for a token's size to weight\n  set proportional_llm_attention: false")
        return super().install(model, graph)

    def llm_nodes(self, model: nn.Module) -> list[tuple[str, StackNode]]:
        lm = self.language_model(model)
        nodes: list[tuple[str, StackNode]] = [
            (f"llm.layers.{i}", LinearAttentionLayerNode(layer, i) if kind == "linear_attention"
             else GatedAttentionLayerNode(layer, i, lm.rotary_emb))
            for i, (layer, kind) in enumerate(zip(lm.layers, lm.config.layer_types))]
        return nodes + [("llm.norm", FinalNormNode(lm.norm))]

    def example_init(self, model: nn.Module) -> None:
        """Slow the random Gated DeltaNet layers' decay (``A_log``, drawn for up to e^-16 per token) so their
        recurrent state remembers the whole prompt: then a token a linear-attention layer wrongly saw (padding,
        a pruned token) shows in its state and outputs, as it would with trained weights."""
        generator = torch.Generator().manual_seed(0)
        for layer in self.language_model(model).layers:
            mixer = getattr(layer, "linear_attn", None)
            if mixer is not None:
                rates = torch.empty(mixer.A_log.shape).uniform_(0.001, 0.01, generator=generator)
                mixer.A_log.data.copy_(rates.log())

    def example_config(self, text: dict, vision: dict, spec: dict):
        vision = dict(vision, rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
        vision.setdefault("patch_size", 16)
        return super().example_config(text, vision, spec)

    def _example_placeholders(self, kind: str, grid: list[int], tokens: list[int]) -> list[int]:
        """Images as Qwen2-VL's; a video as one start-placeholders-end run per temporal patch."""
        run = super()._example_placeholders
        if kind == "image":
            return run(kind, grid, tokens)
        return run(kind, [1, *grid[1:]], tokens) * grid[0]


class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    """Adapter for ``Qwen3_5MoeForConditionalGeneration``: Qwen3.5 with sparse mixture-of-experts MLPs."""

    name = "qwen3_5_moe"
    model_class = Qwen3_5MoeForConditionalGeneration
    compiled_mixin = CompiledQwen3_5MoeModel
    examples = {
        "qwen3.5-moe-tiny": dict(
            text=dict({k: v for k, v in Qwen3_5Adapter.examples["qwen3.5-tiny"]["text"].items()
                       if k != "intermediate_size"}, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
            vision=Qwen3_5Adapter.examples["qwen3.5-tiny"]["vision"],
        ),
    }


@hookimpl
def luvc_model_adapters() -> list:
    return [Qwen3_5Adapter(), Qwen3_5MoeAdapter()]
