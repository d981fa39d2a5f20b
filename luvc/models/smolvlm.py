"""SmolVLM adapter (``SmolVLMForConditionalGeneration``): Idefics3's layout under SmolVLM's own classes.

SmolVLM keeps Idefics3's inner model (``vision_model``, a pixel-shuffle
``connector.modality_projection``, ``text_model``), its tiles and its
placeholders, so Idefics3's adapter runs it; only the classes and the inner
forward's output class differ. Both stages are supported.
"""

from __future__ import annotations

from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMVisionConfig

from luvc.hf import SmolVLMBaseModelOutputWithPast
from luvc.models.example_inputs import IMAGE_TOKEN
from luvc.models.idefics3 import CompiledIdefics3Model, Idefics3Adapter
from luvc.registry import hookimpl


class CompiledSmolVLMModel(CompiledIdefics3Model):
    """Compiled SmolVLM inner model: Idefics3's, returning SmolVLM's output class."""

    _luvc_output_class = SmolVLMBaseModelOutputWithPast


class SmolVLMAdapter(Idefics3Adapter):
    """Adapter for ``SmolVLMForConditionalGeneration``."""

    name = "smolvlm"
    model_class = SmolVLMForConditionalGeneration
    compiled_mixin = CompiledSmolVLMModel
    examples = {
        # SigLIP without a class token, pixel-shuffle connector, Llama LLM (SmolVLM2's layout).
        "smolvlm-tiny": dict(
            text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2),
            vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                        image_size=224, patch_size=14),
        ),
        # SmolVLM's released tile geometry (512 x 512, 16 x 16 patches, scale 4) at the tiny width: 64 per tile.
        "smolvlm-512-tiny": dict(
            text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2),
            vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                        image_size=512, patch_size=16),
            scale_factor=4,
        ),
    }

    def example_config(self, text: dict, vision: dict, spec: dict):
        scale = spec.get("scale_factor", 2)
        config = SmolVLMConfig(vision_config=SmolVLMVisionConfig(**vision), text_config=LlamaConfig(**text),
                               image_token_id=IMAGE_TOKEN, scale_factor=scale, tie_word_embeddings=False)
        config.image_seq_length = (vision["image_size"] // vision["patch_size"] // scale) ** 2
        return config


@hookimpl
def luvc_model_adapters() -> list:
    return [SmolVLMAdapter()]
