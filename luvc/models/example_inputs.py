"""What the adapters' examples share: tiny sizes, token ids, padding, and a fixed-size tower's pixels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: Placeholder and delimiter ids the example configs use.
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 500, 501, 502, 503
#: The LLM of the tiny examples: 4 decoder layers, width 64 (a family adds its own keys).
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2)


def example_tokenizer(specials: dict[str, int], roles: dict[str, str]):
    """A word-level tokenizer for the examples' vocabulary: ``<pad>``, ``<bos>``, ``<eos>`` (ids 0-2), the words
    ``w3`` .. ``w499`` (prompt id ``i`` is the word ``w{i}``), and ``specials`` (token -> id, e.g. the image
    placeholder at ``IMAGE_TOKEN``) as added special tokens; ``roles`` names them for a processor
    (``image_token``, ``boi_token``, ...). A family's real processor built on it gives the example configs' ids
    without downloading a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, IMAGE_TOKEN)}, **specials}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(list(specials))  # split out wherever they stand, as a real tokenizer's added tokens
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   extra_special_tokens=roles, padding_side="left")


def tiny_tower(**changes) -> dict:
    """A ViT-style tower's config keywords at the tiny width (4 blocks, 224 px, 14 px patches), with ``changes``."""
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=224,
                patch_size=14) | changes


def padded(rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of token rows, left-padded with id 0."""
    width = max(len(r) for r in rows)
    return {"input_ids": torch.tensor([[0] * (width - len(r)) + list(r) for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])}


def square_pixels(image: np.ndarray, side: int, mean: Sequence[float], std: Sequence[float], crop: bool = False,
                  resample: str = "BICUBIC") -> torch.Tensor:
    """An image resized to ``side x side`` and normalised, ``[3, side, side]``: what a fixed-size tower's
    processor makes of it. Squashed to the square by default (SigLIP's, InternVL's processors); with ``crop``,
    resized to ``side`` on its shorter edge and centre-cropped, as CLIP's processor (LLaVA's) does, so a wide
    image keeps its proportions. ``resample`` names a PIL filter (Gemma 3's processor resizes bilinearly)."""
    from PIL import Image

    picture, method = Image.fromarray(image).convert("RGB"), getattr(Image.Resampling, resample)
    if crop:
        w, h = picture.size
        size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
        left, top = (size[0] - side) // 2, (size[1] - side) // 2
        picture = picture.resize(size, method).crop((left, top, left + side, top + side))
    resized = np.array(picture.resize((side, side), method))
    m, s = (torch.tensor(v)[:, None, None] for v in (mean, std))
    return (torch.from_numpy(resized).permute(2, 0, 1).float() / 255 - m) / s


def fixed_grid_inputs(images, prompts, config, mean: Sequence[float], std: Sequence[float],
                      wrap: tuple[list[int], list[int]] = ([], []), **resize) -> dict:
    """Inputs for a tower of one fixed square size (LLaVA-1.5, InternVL, one tile per image): each image
    resized (``square_pixels``, with ``resize``'s keywords) and normalised into ``pixel_values``
    ``[images, 3, side, side]``, and ``image_seq_length`` placeholders per image (between ``wrap``'s tokens)
    before the sample's prompt."""
    side = config.vision_config.image_size
    side = side[0] if isinstance(side, (list, tuple)) else side
    pixels, rows = [], []
    for sample, prompt in zip(images or [[] for _ in prompts], prompts):
        row = [1]
        for image in sample:
            pixels.append(square_pixels(image, side, mean, std, **resize))
            row += [*wrap[0], *[config.image_token_id] * config.image_seq_length, *wrap[1]]
        rows.append(row + list(prompt))
    out = padded(rows)
    if pixels:
        out["pixel_values"] = torch.stack(pixels)
    return out
