"""Each family's example inputs against the inputs of that family's own transformers processor.

``luvc.examples.vlm_inputs`` makes processor-style inputs by hand for every
family, and every model test runs on them; if they drifted from what the real
processor gives a real model (another placeholder count, a missing begin-image
token, another resize or normalisation), the tests would exercise inputs no user
ever feeds. Here each family's processor class is built offline (its image
processor at the example's sizes, and a word-level tokenizer made locally whose
special tokens carry the example config's ids) and run on the same images and
prompt words. Text tokens may differ (the processor adds its template's
newlines, say); what must agree is the placeholder layout (the runs of image,
video and delimiter tokens in each row, and where the prompt follows them), the
pixel tensors (to resampling tolerance) and the grids.

The processors carry torchvision-backed image or video processors, so these
tests need torchvision (the ``test`` extra) and skip without it.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import groupby

import pytest
import torch
from conftest import FAMILIES

from luvc.examples import model_config, sample_image, vlm_inputs
from luvc.models.example_inputs import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START, example_tokenizer

pytest.importorskip("torchvision", reason="the families' processors need torchvision (the `test` extra)")

#: Every family's tokens that are placeholders or delimiters (the rest is text).
VISION_IDS = {IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END}
PROMPTS = [(10, 11, 12, 13), (14, 15)]


def words(prompt) -> str:
    """A prompt's ids as ``example_tokenizer``'s words."""
    return " ".join(f"w{i}" for i in prompt)


def layout(ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[int | str, int]]:
    """A row's structure: runs of placeholder or delimiter tokens as ``(id, length)``, and each stretch of
    text as one ``("text", 0)`` (its length is the template's business)."""
    row = ids[mask.bool()].tolist()
    return [(token, len(list(run))) if token in VISION_IDS else ("text", 0)
            for token, run in groupby(row, key=lambda t: t if t in VISION_IDS else "text")]


def prompt_tail(ids: torch.Tensor, mask: torch.Tensor, prompt) -> bool:
    """Whether the row ends with the prompt's words: the prompt follows the images."""
    return ids[mask.bool()].tolist()[-len(prompt):] == list(prompt)


# One builder per family: (config, images per sample) -> the real processor's inputs for PROMPTS.

def qwen2_vl(config, images):
    """Qwen2-VL's (and Qwen2.5-VL's) processor: ``<|image_pad|>`` between vision start and end expands to one
    placeholder per LLM token."""
    from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

    return qwen_family(config, images, Qwen2VLProcessor, Qwen2VLVideoProcessor)


def qwen3_5(config, images):
    """Qwen3.5's processor (Qwen3-VL's class), laid out as Qwen2-VL's for images."""
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    return qwen_family(config, images, Qwen3VLProcessor, Qwen3VLVideoProcessor)


def qwen3_vl(config, images):
    """Qwen3-VL's processor: Qwen3-VL's class, its released image settings (64 x 64 pixels at least,
    normalised to [-1, 1])."""
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    return qwen_family(config, images, Qwen3VLProcessor, Qwen3VLVideoProcessor, least=64 * 64,
                       image_mean=[0.5] * 3, image_std=[0.5] * 3)


def qwen_family(config, images, processor_class, video_class, least: int = 56 * 56, **normalise):
    """A Qwen processor with Qwen2-VL's image processor at the example's patch size, 224 x 224 pixels at most."""
    from transformers import Qwen2VLImageProcessor

    specials = {"<|image_pad|>": IMAGE_TOKEN, "<|video_pad|>": VIDEO_TOKEN, "<|vision_start|>": VISION_START,
                "<|vision_end|>": VISION_END}
    tokenizer = example_tokenizer(specials, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                           "vision_start_token": "<|vision_start|>",
                                           "vision_end_token": "<|vision_end|>"})
    size = {"shortest_edge": least, "longest_edge": 224 * 224}
    patch = config.vision_config.patch_size
    processor = processor_class(Qwen2VLImageProcessor(size=size, patch_size=patch, **normalise), tokenizer,
                                video_class(size=size, patch_size=patch))
    return run(processor, images, "<|vision_start|><|image_pad|><|vision_end|>")


def llava(config, images):
    """LLaVA-1.5's processor: CLIP's image processor (shortest edge, centre crop), ``<image>`` expanded."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    side = config.vision_config.image_size
    tokenizer = example_tokenizer({"<image>": IMAGE_TOKEN}, {"image_token": "<image>"})
    processor = LlavaProcessor(CLIPImageProcessor(size={"shortest_edge": side}, crop_size=side), tokenizer,
                               patch_size=config.vision_config.patch_size, num_additional_image_tokens=1,
                               vision_feature_select_strategy=config.vision_feature_select_strategy)
    return run(processor, images, "<image>")


def gemma3(config, images):
    """Gemma 3's processor: a fixed-size SigLIP image processor; ``<start_of_image>`` expands to the begin-image
    token, the soft tokens and the end-image token."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    side = config.vision_config.image_size
    tokenizer = example_tokenizer({"<image_soft_token>": IMAGE_TOKEN, "<start_of_image>": VISION_START,
                                 "<end_of_image>": VISION_END},
                                {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                 "eoi_token": "<end_of_image>"})
    processor = Gemma3Processor(Gemma3ImageProcessor(size={"height": side, "width": side}), tokenizer,
                                image_seq_length=config.mm_tokens_per_image)
    return run(processor, images, "<start_of_image>")


def internvl(config, images):
    """InternVL's processor, one tile per image (``crop_to_patches=False``: the examples model one tile):
    ``<image>`` expands to ``<img>``, the tile's tokens, ``</img>``."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    side = config.vision_config.image_size[0]
    tokenizer = example_tokenizer({"<IMG_CONTEXT>": IMAGE_TOKEN, "<video>": VIDEO_TOKEN, "<img>": VISION_START,
                                 "</img>": VISION_END},
                                {"context_image_token": "<IMG_CONTEXT>", "video_token": "<video>",
                                 "start_image_token": "<img>", "end_image_token": "</img>"})
    image_processor = GotOcr2ImageProcessor(size={"height": side, "width": side},
                                            image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))
    processor = InternVLProcessor(image_processor, tokenizer, InternVLVideoProcessor(),
                                  image_seq_length=config.image_seq_length)
    return run(processor, images, "<IMG_CONTEXT>", crop_to_patches=False)


def run(processor, images, marker: str, **kwargs):
    """``processor`` on ``<bos>``, one ``marker`` per image, then each prompt's words: images before text."""
    text = [f"<bos> {' '.join([marker] * len(sample))} {words(prompt)}" for sample, prompt in zip(images, PROMPTS)]
    return processor(images=images, text=text, padding=True, return_tensors="pt", **kwargs)


PROCESSORS: dict[str, Callable] = {"qwen2-vl-tiny": qwen2_vl, "qwen2.5-vl-tiny": qwen2_vl, "llava-tiny": llava,
                                   "gemma3-tiny": gemma3, "internvl-tiny": internvl, "qwen3.5-tiny": qwen3_5,
                                   "qwen3.5-moe-tiny": qwen3_5, "qwen3-vl-tiny": qwen3_vl,
                                   "qwen3-vl-moe-tiny": qwen3_vl}
#: Why a family's processor is not compared, where it is not.
NOT_COMPARED: dict[str, str] = {
    "idefics3-tiny": "not compared yet: Idefics3Processor builds offline, but its image wrappers "
                     "(<fake_token_around_image>, <global-img>) need ids and a builder here (issue #34)",
    "llava-onevision-tiny": "not compared yet: LlavaOnevisionProcessor builds offline, but its any-resolution tiles "
                            "and newline tokens need their own builder (issue #34)",
    "smolvlm-tiny": "not compared yet: SmolVLMProcessor, like Idefics3's, needs ids for its image wrappers and a "
                    "builder here",
    **dict.fromkeys(("llava-next-tiny", "mistral3-tiny", "aya-vision-tiny"),
                    "its example inputs come from the family's own image processor (luvc/models/generic_examples.py); "
                    "placeholder counts are checked against the model's own features in tests/models/test_generic.py"),
}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    assert request.param in PROCESSORS or request.param in NOT_COMPARED, \
        f"{request.param}: add a processor builder to PROCESSORS, or say in NOT_COMPARED why it is not compared"
    if request.param in NOT_COMPARED:
        pytest.skip(f"{request.param}: {NOT_COMPARED[request.param]}")
    return request.param


def test_example_inputs_match_the_processor(family):
    """Same placeholder runs per row, the prompt after them, same pixels (resampling tolerance) and grids."""
    config = model_config(family)
    images = [[sample_image("astronaut")], [sample_image("coffee")[:150, :300], sample_image("astronaut")[:100]]]
    real = PROCESSORS[family](config, images)
    ours = vlm_inputs(images, prompts=PROMPTS, pixels=224 * 224, config=config)
    for b, prompt in enumerate(PROMPTS):
        assert layout(ours["input_ids"][b], ours["attention_mask"][b]) == \
            layout(real["input_ids"][b], real["attention_mask"][b])
        assert prompt_tail(real["input_ids"][b], real["attention_mask"][b], prompt)
    for key in ("image_grid_thw", "image_sizes", "batch_num_images"):
        if key in real:
            assert torch.equal(ours[key], real[key]), key
    assert ours["pixel_values"].shape == real["pixel_values"].shape
    close = (ours["pixel_values"] - real["pixel_values"]).abs()
    assert close.mean() < 2e-3 and close.max() < 0.1, (close.mean(), close.max())
