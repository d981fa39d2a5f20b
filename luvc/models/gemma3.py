"""Gemma 3 adapter (``Gemma3ForConditionalGeneration``): a SigLIP tower without a class token whose
patches are average-pooled into soft tokens, and a Gemma 3 LLM with interleaved sliding-window and
global layers, each with its own rotary base, where an image's tokens attend to each other both ways.

What is specific to Gemma 3, and lives here:

* The projector average-pools each ``k x k`` block of patches into one soft
  token (``k = patches per side / sqrt(mm_tokens_per_image)``: 4 for the
  released models, 896 px -> 64 x 64 patches -> 256 tokens), so a unit is that
  block: patches are put unit-major on entry, OIM merges whole units, and the
  projector node averages each unit's tokens (what the pooling does on an
  unmerged grid, and a size-weighted pooling of a larger region after a merge).
* SigLIP's attention takes the sizes of merged tokens (``SizedCLIPAttention``).
* In the LLM, sliding-window layers see keys fewer than ``sliding_window``
  positions back, measured in the model's own positions (pruning never widens
  a window); each image's tokens attend to each other both ways when the
  caller passes ``token_type_ids`` (the processor does; so does ``generate``
  at prefill), as the model itself does. Both need an explicit mask, so
  FlashAttention is refused; the KV cache keeps every layer's kept keys in
  full (the window is applied by the mask, not by evicting keys).
* The LLM sees one token per unit left; shortened placeholder runs are
  numbered 1-D in order (the begin/end-of-image tokens are text and stay).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

from luvc import hf
from luvc.errors import CompileError
from luvc.fx.nodes import StackNode
from luvc.models.base import FamilyAdapter
from luvc.models.example_inputs import IMAGE_TOKEN, TINY_TEXT, VISION_END, VISION_START, fixed_grid_inputs, tiny_tower
from luvc.models.internvl import PixelShuffleProjectorNode, unit_major
from luvc.models.llava import CLIPLayerNode, CompiledLlavaModel
from luvc.registry import hookimpl
from luvc.runtime.compiled import vision_output
from luvc.runtime.llm import DecoderLayerNode, FinalNormNode, check_attention
from luvc.runtime.sized_attention import SizedCLIPAttention
from luvc.state import VisionState


class PooledProjectorNode(PixelShuffleProjectorNode):
    """SigLIP's final norm, each unit's tokens averaged (Gemma 3's average pooling), then the soft-token
    norm and projection."""

    def _project(self, hidden: Tensor, images: int, unit: int) -> Tensor:
        pooled = hidden.view(-1, unit, hidden.shape[-1]).mean(dim=1)
        projector = self.block
        normed = projector.mm_soft_emb_norm(pooled)
        with hf.direct_weights(projector):
            return torch.matmul(normed, projector.mm_input_projection_weight).type_as(hidden)


class CompiledGemma3Model(CompiledLlavaModel):
    """Compiled Gemma 3 inner model: the SigLIP tower and the LLM run through the luvc graph."""

    _luvc_output_class = hf.Gemma3ModelOutputWithPast
    _luvc_read_kwargs = ("token_type_ids",)

    def get_image_features(self, pixel_values: Tensor, **kwargs):
        tower = self.vision_tower
        x = tower.embeddings(pixel_values.type(self.vision_tower.dtype))
        images, tokens, _ = x.shape
        side = int(round(tokens ** 0.5))
        block = self.multi_modal_projector.kernel_size
        patches, positions = unit_major(x, side, block)
        n = side // block
        state = VisionState(hidden=patches, sizes=torch.ones(patches.shape[0], device=x.device), positions=positions,
                            grids=((1, n, n),) * images, unit=block * block, log=[])
        state = self._luvc_sections[0](state)
        return vision_output(state, [n * n] * images)

    def _luvc_image_blocks(self, kwargs: dict) -> bool:
        return kwargs.get("token_type_ids") is not None

    def _luvc_prefill(self, input_ids, inputs_embeds, attention_mask, position_ids, encoded, cache, kwargs):
        if cache is not None:  # windows are masked by position; evicting by count would drop kept keys
            hf.full_attention_cache(cache)
        return super()._luvc_prefill(input_ids, inputs_embeds, attention_mask, position_ids, encoded, cache, kwargs)


#: The tiny examples' Gemma 3 LLM: alternating sliding-window and global layers, a window short enough to
#: cut inside a prompt.
_TEXT = TINY_TEXT | dict(head_dim=16, sliding_window=48, sliding_window_pattern=2, query_pre_attn_scalar=16)


class Gemma3Adapter(FamilyAdapter):
    """Adapter for ``Gemma3ForConditionalGeneration`` (SigLIP, pooled soft tokens, Gemma 3 LLM)."""

    name = "gemma3"
    capabilities = frozenset({"llm_grid"})
    model_class = Gemma3ForConditionalGeneration
    compiled_mixin = CompiledGemma3Model
    sized_attention = SizedCLIPAttention

    def check(self, model: nn.Module) -> None:
        text = model.model.language_model.config
        if hf.attn_implementation(text) not in ("eager", "sdpa"):
            raise CompileError(f"luvc's Gemma 3 adapter needs attn_implementation 'sdpa' or 'eager', not "
                               f"{hf.attn_implementation(text)!r}: sliding windows by position and bidirectional "
                               "image blocks need an explicit mask")
        if text.use_bidirectional_attention:
            raise CompileError("luvc's Gemma 3 adapter supports the causal language model "
                               "(use_bidirectional_attention=False)")
        check_attention(model.model.vision_tower.config)

    def vision_blocks(self, model: nn.Module) -> list[nn.Module]:
        return model.model.vision_tower.encoder.layers

    def block_node(self, model: nn.Module, index: int) -> StackNode:
        return CLIPLayerNode(self.vision_blocks(model)[index], index)

    def projector_node(self, model: nn.Module) -> tuple[str, StackNode]:
        norm = model.model.vision_tower.post_layernorm
        return "vision.projector", PooledProjectorNode(norm, model.model.multi_modal_projector)

    def llm_nodes(self, model: nn.Module) -> list[tuple[str, StackNode]]:
        """Sliding-window and global layers, each with its own window and rotary table."""
        lm = model.model.language_model
        nodes = []
        for i, layer in enumerate(lm.layers):
            kind = lm.config.layer_types[i]
            window = lm.config.sliding_window if kind == "sliding_attention" else None
            rotary = functools.partial(lm.rotary_emb, layer_type=kind)
            nodes.append((f"llm.layers.{i}", DecoderLayerNode(layer, i, rotary, window, rope_key=f"rope:{kind}")))
        return nodes + [("llm.norm", FinalNormNode(lm.norm))]


    def input_grid(self, model: nn.Module, height: int, width: int, frames: int = 1):
        n = int(model.config.mm_tokens_per_image ** 0.5)
        block = model.model.multi_modal_projector.kernel_size
        return (1, n, n), block * block

    examples = {
        # SigLIP patches average-pooled 4 x 4 into soft tokens (as the released models do), a Gemma 3 LLM
        # alternating sliding-window and global layers; the window is short enough to cut inside a prompt.
        "gemma3-tiny": dict(
            text=_TEXT,
            vision=tiny_tower(patch_size=7),
            tokens_per_image=64,
        ),
        # The released geometry at the tiny width: 896 px, 64 x 64 patches pooled to 256 soft tokens.
        "gemma3-896-tiny": dict(
            text=_TEXT,
            vision=tiny_tower(image_size=896),
            tokens_per_image=256,
        ),
    }

    def example_config(self, text: dict, vision: dict, spec: dict):
        pattern = text.pop("sliding_window_pattern")
        text["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                               for i in range(text["num_hidden_layers"])]
        config = Gemma3Config(text_config=Gemma3TextConfig(**text), vision_config=SiglipVisionConfig(**vision),
                              mm_tokens_per_image=spec["tokens_per_image"], image_token_index=IMAGE_TOKEN,
                              boi_token_index=VISION_START, eoi_token_index=VISION_END)
        config.image_seq_length = spec["tokens_per_image"]
        return config

    def example_inputs(self, config, images, videos, prompts, pixels: int) -> dict:
        """Each image's soft tokens between begin/end-of-image tokens, and ``token_type_ids`` marking
        them, as the Gemma 3 processor does; its image processor squashes bilinearly to the tower's size."""
        if any(videos):
            raise ValueError(f"{config.model_type} takes no video")
        out = fixed_grid_inputs(images, prompts, config, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                                wrap=([config.boi_token_index], [config.eoi_token_index]), resample="BILINEAR")
        out["token_type_ids"] = (out["input_ids"] == config.image_token_id).long()
        return out

    def example_init(self, model: nn.Module) -> None:
        """The projector starts at zero, so images would not count: random weights instead."""
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.2)


@hookimpl
def luvc_model_adapters() -> list:
    return [Gemma3Adapter()]
