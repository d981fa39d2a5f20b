"""Example models for the generic adapter: tiny LLaVA-NeXT, Mistral3 and Aya Vision built from configs.

Each family here gives its config, processor-style inputs (placeholders as
many as the model's own ``get_image_features`` returns for those pixels, so
the uncompiled model accepts them) and its per-image feature count, from the
config's geometry. Nothing here is needed to compile a model: only the
examples, tests and benchmarks use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    AyaVisionConfig,
    AyaVisionForConditionalGeneration,
    CLIPVisionConfig,
    CohereConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralImageProcessorPil,
    PixtralVisionConfig,
    SiglipVisionConfig,
)

from luvc.hf import get_anyres_image_grid_shape, unpad_image
from luvc.models.example_inputs import IMAGE_TOKEN, VISION_END, VISION_START, fixed_grid_inputs, padded

#: The tiny LLM every generic example shares.
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2)
#: The tiny vision tower every generic example shares (each family adds its geometry).
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)


@dataclass(frozen=True)
class ExampleFamily:
    """What the examples need of one family: its class, config, inputs and features per image."""

    model_class: type
    config: Callable  # (text keywords, vision keywords) -> config
    inputs: Callable  # (config, images per sample, prompts) -> processor-style inputs
    features: Callable  # (config, height, width) -> LLM tokens the image gives


def _llava_next_config(text: dict, vision: dict):
    side = vision["image_size"]
    pinpoints = [[side * rows, side * cols] for rows, cols in ((1, 1), (1, 2), (2, 1), (2, 2))]
    return LlavaNextConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                           image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", tie_word_embeddings=False,
                           image_grid_pinpoints=pinpoints)


def _llava_next_features(config, height: int, width: int) -> int:
    """The base tile's tokens, then the any-resolution tiles stitched, the processor's padding cropped
    and a newline token ending each row: what ``pack_image_features`` makes."""
    side = config.vision_config.image_size
    grid = side // config.vision_config.patch_size
    rows, cols = get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, side)
    _, h, w = unpad_image(torch.empty(1, rows * grid, cols * grid), torch.tensor([height, width])).shape
    return grid * grid + h * (w + 1)


def _processed_inputs(processor, images, prompts, tokens: Callable[[int, int], list[int]]) -> dict:
    """Inputs from an image processor returning ``pixel_values`` and ``image_sizes``: each image's
    ``tokens(*its image_sizes entry)`` (placeholders and any break tokens), then the sample's prompt."""
    flat = [image for sample in images for image in sample]
    out: dict = {}
    rows = [[1] for _ in prompts]
    if flat:
        feats = processor(images=flat, return_tensors="pt")
        out.update(pixel_values=feats["pixel_values"], image_sizes=feats["image_sizes"])
        sizes = iter(feats["image_sizes"].tolist())
        for row, sample in zip(rows, images):
            for _ in sample:
                row += tokens(*next(sizes))
    return {**out, **padded([row + list(prompt) for row, prompt in zip(rows, prompts)])}


def _llava_next_inputs(config, images, prompts) -> dict:
    """LLaVA-NeXT's processor: base and any-resolution tiles per image, ``image_sizes`` the original sizes."""
    side = config.vision_config.image_size
    processor = LlavaNextImageProcessorPil(size={"height": side, "width": side},
                                           crop_size={"height": side, "width": side},
                                           image_grid_pinpoints=config.image_grid_pinpoints)
    return _processed_inputs(processor, images, prompts,
                             lambda h, w: [config.image_token_id] * _llava_next_features(config, h, w))


def _mistral3_config(text: dict, vision: dict):
    return Mistral3Config(vision_config=PixtralVisionConfig(**vision, head_dim=vision["hidden_size"] // 4),
                          text_config=MistralConfig(**text, sliding_window=None, head_dim=16),
                          image_token_index=IMAGE_TOKEN, spatial_merge_size=2, vision_feature_layer=-1,
                          tie_word_embeddings=False)


def _mistral3_step(config) -> int:
    return config.vision_config.patch_size * config.spatial_merge_size


def _mistral3_features(config, height: int, width: int) -> int:
    """One token per merged ``2 x 2`` block of the image resized (aspect kept) within the tower's size."""
    h, w = _mistral3_size(config, height, width)
    return (h // _mistral3_step(config)) * (w // _mistral3_step(config))


def _mistral3_size(config, height: int, width: int) -> tuple[int, int]:
    """Pixtral's processor sizing: the longest side at most ``image_size``, each side rounded up to whole
    merged blocks."""
    step, longest = _mistral3_step(config), config.vision_config.image_size
    scale = min(1.0, longest / max(height, width))
    return (math.ceil(round(height * scale) / step) * step, math.ceil(round(width * scale) / step) * step)


def _mistral3_inputs(config, images, prompts) -> dict:
    """Pixtral's processor: each image at its own size, padded into one batch, with ``image_sizes``; per row of
    merged blocks its placeholders and a break token, the last row ending with an end token instead."""
    step = _mistral3_step(config)
    processor = PixtralImageProcessorPil(size={"longest_edge": config.vision_config.image_size},
                                         patch_size={"height": step, "width": step},
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)

    def tokens(height: int, width: int) -> list[int]:
        lines = height // step
        return [token for line in range(lines)
                for token in [config.image_token_id] * (width // step) + [VISION_END if line == lines - 1
                                                                           else VISION_START]]

    return _processed_inputs(processor, images, prompts, tokens)


def _aya_config(text: dict, vision: dict):
    config = AyaVisionConfig(vision_config=SiglipVisionConfig(**vision), text_config=CohereConfig(**text),
                             image_token_index=IMAGE_TOKEN, downsample_factor=2, vision_feature_layer=-1,
                             vision_feature_select_strategy="full", alignment_intermediate_size=64,
                             tie_word_embeddings=False)
    config.image_seq_length = (vision["image_size"] // vision["patch_size"] // 2) ** 2
    return config


def _aya_inputs(config, images, prompts) -> dict:
    """One tile per image between image start and end tokens (the processor's thumbnail-only case)."""
    return fixed_grid_inputs(images, prompts, config, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                             wrap=([VISION_START], [VISION_END]))


FAMILIES: dict[str, ExampleFamily] = {
    "llava_next": ExampleFamily(LlavaNextForConditionalGeneration, _llava_next_config, _llava_next_inputs,
                                _llava_next_features),
    "mistral3": ExampleFamily(Mistral3ForConditionalGeneration, _mistral3_config, _mistral3_inputs,
                              _mistral3_features),
    "aya_vision": ExampleFamily(AyaVisionForConditionalGeneration, _aya_config, _aya_inputs,
                                lambda config, h, w: config.image_seq_length),
}

#: Named example sizes (``luvc.examples``), keyed by the family in ``FAMILIES`` that builds them.
EXAMPLES: dict[str, dict] = {
    # CLIP with a class token on a base tile plus any-resolution tiles (8 x 8 patches each), a newline token
    # ending each row of the stitched tiles; a Llama LLM.
    "llava-next-tiny": dict(family="llava_next", text=TINY_TEXT, vision=dict(TINY_VISION, image_size=112,
                                                                              patch_size=14)),
    # Pixtral on each image at its own size (2-D rotary), a 2 x 2 patch merger; a Mistral LLM.
    "mistral3-tiny": dict(family="mistral3", text=TINY_TEXT, vision=dict(TINY_VISION, image_size=112,
                                                                          patch_size=14)),
    # SigLIP tiles, a pixel-shuffle (2 x 2) projector with SwiGLU; a Cohere LLM (parallel attention and MLP,
    # interleaved rotary, scaled logits).
    "aya-vision-tiny": dict(family="aya_vision", text=TINY_TEXT, vision=dict(TINY_VISION, image_size=112,
                                                                              patch_size=14)),
}
#: The tiny examples, one per family: the family-parametrised tests run on each.
TINY = tuple(EXAMPLES)
