"""Named model configs with random weights, and inputs built from real images.

No weights are downloaded: every model here is built from its config, which
exercises the real transformers code paths at any size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    SiglipVisionConfig,
)

from luvc.runtime import hf

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 500, 501, 502, 503

CONFIGS: dict[str, dict] = {
    # Small enough for property tests: 4 vision blocks, 4 decoder layers.
    "qwen2-vl-tiny": dict(
        family="qwen2_vl",
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                          "rope_theta": 10000.0}),
        vision=dict(depth=4, embed_dim=32, num_heads=4, mlp_ratio=2),
    ),
    # The demo's model: Qwen2-VL-2B's shape ratios at a size a laptop CPU runs in seconds.
    "qwen2-vl-demo": dict(
        family="qwen2_vl",
        text=dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=6,
                  num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12],
                                                          "rope_theta": 1000000.0}),
        vision=dict(depth=8, embed_dim=256, num_heads=4, mlp_ratio=4),
    ),
    # Real dimensions of Qwen2-VL-2B-Instruct and Qwen2-VL-7B-Instruct (their config.json), for speed runs.
    "qwen2-vl-2b": dict(
        family="qwen2_vl",
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                                          "rope_theta": 1000000.0}, vocab_size=151936,
                  tie_word_embeddings=True),
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
    ),
    "qwen2-vl-7b": dict(
        family="qwen2_vl",
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                                          "rope_theta": 1000000.0}, vocab_size=152064,
                  tie_word_embeddings=False),
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
    ),
    # Qwen2.5-VL: windowed vision attention (window 112 px) with full attention in a few blocks.
    "qwen2.5-vl-tiny": dict(
        family="qwen2_5_vl",
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                          "rope_theta": 10000.0}),
        vision=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, window_size=112,
                    fullatt_block_indexes=[1, 3], tokens_per_second=2),
    ),
    "qwen2.5-vl-7b": dict(
        family="qwen2_5_vl",
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                                          "rope_theta": 1000000.0}, vocab_size=152064,
                  tie_word_embeddings=False),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
    ),
    # LLaVA-1.5: CLIP ViT with a class token (fixed grid), MLP projector, Llama LLM with 1-D rotary.
    "llava-tiny": dict(
        family="llava",
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                    image_size=224, patch_size=14),
    ),
    # InternVL: InternViT with a class token and absolute positions, pixel-shuffle projector, Qwen2 LLM.
    "internvl-tiny": dict(
        family="internvl",
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                    image_size=224, patch_size=14),
    ),
    # Idefics3 / SmolVLM: SigLIP without a class token, pixel-shuffle connector, Llama LLM.
    "idefics3-tiny": dict(
        family="idefics3",
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                    image_size=224, patch_size=14),
    ),
    # Gemma 3: SigLIP patches average-pooled 4 x 4 into soft tokens (as the released models do), a Gemma 3
    # LLM alternating sliding-window and global layers; the window is short enough to cut inside a prompt.
    "gemma3-tiny": dict(
        family="gemma3",
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, sliding_window=48, sliding_window_pattern=2,
                  query_pre_attn_scalar=16),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                    image_size=224, patch_size=7),
        tokens_per_image=64,
    ),
    # LLaVA-OneVision: SigLIP on a base tile plus any-resolution tiles (8 x 8 patches each here), newline
    # tokens after each row of the stitched tiles, video frames pooled 2 x 2; a Qwen2 LLM.
    "llava-onevision-tiny": dict(
        family="llava_onevision",
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                    image_size=112, patch_size=14),
        pinpoints=[[112, 112], [112, 224], [224, 112], [224, 224], [112, 336], [336, 112]],
    ),
    "llava-1.5-7b": dict(
        family="llava",
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14),
    ),
}


def _geometry(name: str, vision: dict, **changes) -> dict:
    """``name``'s tiny config with another vision geometry."""
    spec = CONFIGS[name]
    return {**spec, **changes, "vision": {**spec["vision"], **vision}}


# The released models' vision geometry (visual tokens per image) at the tiny width: what their
# fixed-size towers make of any input, for FLOPs ratios on realistic visual-token counts.
CONFIGS.update({
    "llava-336-tiny": _geometry("llava-tiny", {"image_size": 336}),  # LLaVA-1.5: 576 tokens
    "internvl-448-tiny": _geometry("internvl-tiny", {"image_size": 448}),  # InternVL: 256 per tile
    "idefics3-364-tiny": _geometry("idefics3-tiny", {"image_size": 364}),  # Idefics3-8B: 169 per tile
    "gemma3-896-tiny": _geometry("gemma3-tiny", {"image_size": 896, "patch_size": 14}, tokens_per_image=256),
    "llava-onevision-384-tiny": _geometry(  # SigLIP-384 tiles (729 tokens), the released pinpoints
        "llava-onevision-tiny", {"image_size": 384},
        pinpoints=[[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]),
})

FAMILIES = {
    "llava": (LlavaConfig, LlavaForConditionalGeneration),
    "internvl": (InternVLConfig, InternVLForConditionalGeneration),
    "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration),
    "gemma3": (Gemma3Config, Gemma3ForConditionalGeneration),
    "llava_onevision": (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration),
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
}


def model_config(name: str = "qwen2-vl-tiny", layers: int | None = None, vision_layers: int | None = None):
    """The transformers config of one of ``CONFIGS`` (14 px patches); ``layers`` and
    ``vision_layers`` shrink the depth of the LLM and of the vision encoder."""
    if name not in CONFIGS:
        import difflib

        from luvc.errors import UnknownModelError

        close = difflib.get_close_matches(name, CONFIGS, n=1)
        raise UnknownModelError(f"unknown model config {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                                f"built-in: {', '.join(CONFIGS)}")
    spec = CONFIGS[name]
    text = dict(vocab_size=512, max_position_embeddings=32768, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    text.update(spec["text"])
    if layers is not None:
        text["num_hidden_layers"] = layers
    vision = dict(spec["vision"])
    if vision_layers is not None and spec["family"] not in ("qwen2_vl", "qwen2_5_vl"):
        # LLaVA counts the blocks that run: its feature layer is the second-to-last
        vision["num_hidden_layers"] = vision_layers + 1 if spec["family"] == "llava" else vision_layers
    if spec["family"] == "llava":
        return LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                           image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                           vision_feature_select_strategy="default",
                           image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2)
    if spec["family"] == "idefics3":
        config = Idefics3Config(vision_config=Idefics3VisionConfig(**vision), text_config=LlamaConfig(**text),
                                image_token_id=IMAGE_TOKEN, scale_factor=2, tie_word_embeddings=False)
        config.image_seq_length = (vision["image_size"] // vision["patch_size"] // 2) ** 2
        return config
    if spec["family"] == "gemma3":
        pattern = text.pop("sliding_window_pattern")
        text["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                               for i in range(text["num_hidden_layers"])]
        config = Gemma3Config(text_config=Gemma3TextConfig(**text), vision_config=SiglipVisionConfig(**vision),
                              mm_tokens_per_image=spec["tokens_per_image"], image_token_index=IMAGE_TOKEN,
                              boi_token_index=VISION_START, eoi_token_index=VISION_END)
        config.image_seq_length = spec["tokens_per_image"]
        return config
    if spec["family"] == "llava_onevision":
        return LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**vision), text_config=Qwen2Config(**text),
                                    image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
                                    image_grid_pinpoints=spec["pinpoints"], vision_feature_layer=-1,
                                    vision_feature_select_strategy="full", tie_word_embeddings=False)
    if spec["family"] == "internvl":
        side = vision["image_size"] // vision["patch_size"]
        vision.update(image_size=[vision["image_size"]] * 2, patch_size=[vision["patch_size"]] * 2)
        return InternVLConfig(vision_config=InternVLVisionConfig(**vision), text_config=Qwen2Config(**text),
                              image_token_id=IMAGE_TOKEN, image_seq_length=(side // 2) ** 2)
    vision = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **vision)
    out_key = "out_hidden_size" if spec["family"] == "qwen2_5_vl" else "hidden_size"
    vision[out_key] = text["hidden_size"]
    if vision_layers is not None:
        vision["depth"] = vision_layers
        if "fullatt_block_indexes" in vision:
            vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision_layers] or [
                vision_layers - 1]
    tie = text.pop("tie_word_embeddings", True)
    config_class = FAMILIES[spec["family"]][0]
    return config_class(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                        video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                        vision_end_token_id=VISION_END, tie_word_embeddings=tie)


def build_model(name: str = "qwen2-vl-tiny", attn: str = "sdpa", seed: int = 0,
                dtype: torch.dtype = torch.float32, device: str = "cpu", layers: int | None = None,
                vision_layers: int | None = None):
    """A randomly initialised model of one of ``CONFIGS``, in eval mode; ``device="meta"`` allocates nothing."""
    config = model_config(name, layers, vision_layers)
    for c in (config, config.text_config, config.vision_config):
        hf.set_attn_implementation(c, attn)
    torch.manual_seed(seed)
    with torch.device(device):
        model = FAMILIES[CONFIGS[name]["family"]][1](config).eval().to(dtype)
    if CONFIGS[name]["family"] == "gemma3" and device != "meta":  # its projector starts at zero: images would not count
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.2)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def sample_image(name: str = "astronaut") -> np.ndarray:
    """A real photograph bundled with scikit-image, as an RGB uint8 array."""
    from skimage import data

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3]


def vlm_inputs(images: Sequence[Sequence[np.ndarray]] = (), prompts: Sequence[Sequence[int]] = ((10, 11, 12),),
               pixels: int = 224 * 224, videos: Sequence[Sequence[np.ndarray]] = (),
               config=None) -> dict:
    """Processor-style inputs for a batch: sample ``i`` has ``images[i]`` (a list, maybe
    empty), then ``videos[i]`` (a list of ``[frames, H, W, 3]`` arrays), then ``prompts[i]``.

    Each image or video is wrapped in vision start/end tokens with one
    placeholder per LLM token; rows are left-padded with id 0. Returns
    ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and the pixel
    tensors and grids, as the Qwen2-VL processor would.
    """
    if getattr(config, "model_type", None) == "llava_onevision":
        return _onevision_inputs(images, videos, prompts, config)
    if getattr(config, "model_type", None) in FIXED_GRID:
        if any(videos):
            raise ValueError(f"{config.model_type} takes no video")
        return _fixed_grid_inputs(images, prompts, config)
    image_token, video_token, start, end = IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END
    if config is not None:
        image_token, video_token = config.image_token_id, config.video_token_id
        start, end = config.vision_start_token_id, config.vision_end_token_id
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=pixels)
    out: dict = {}
    rows: list[list[int]] = [[1] for _ in prompts]
    for kind, per_sample, token in (("image", images, image_token), ("video", videos, video_token)):
        items = [(i, item) for i, sample in enumerate(per_sample) for item in sample]
        if not items:
            continue
        if kind == "image":
            feats = processor(images=[item for _, item in items], return_tensors="pt")
            out["pixel_values"], grid = feats["pixel_values"], feats["image_grid_thw"]
            out["image_grid_thw"] = grid
        else:
            frames = [processor(images=list(v), return_tensors="pt") for _, v in items]
            out["pixel_values_videos"] = torch.cat([_as_video(f) for f in frames])
            grid = torch.tensor([[len(v) // 2, *f["image_grid_thw"][0, 1:].tolist()]
                                 for (_, v), f in zip(items, frames)])
            out["video_grid_thw"] = grid
        for (i, _), g in zip(items, grid.tolist()):
            rows[i] += [start] + [token] * (g[0] * g[1] * g[2] // 4) + [end]
    for row, prompt in zip(rows, prompts):
        row += list(prompt)
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    out["input_ids"] = ids
    out["attention_mask"] = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out["mm_token_type_ids"] = (ids == image_token).int() + 2 * (ids == video_token).int()
    return out


#: Families whose tower takes one fixed square size: model type -> (mean, std) of its normalisation.
FIXED_GRID = {
    "llava": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "internvl": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "idefics3": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "gemma3": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _fixed_grid_inputs(images, prompts, config) -> dict:
    """LLaVA-1.5 / InternVL-style inputs (one tile per image): each image resized to the tower's square
    size, normalised, and ``image_seq_length`` placeholders per image before the prompt (Gemma 3: wrapped
    in begin/end-of-image tokens, with ``token_type_ids`` marking the placeholders, as its processor does)."""
    from PIL import Image

    side = config.vision_config.image_size
    side = side[0] if isinstance(side, (list, tuple)) else side
    mean, std = (torch.tensor(v)[:, None, None] for v in FIXED_GRID[config.model_type])
    pixels, rows = [], []
    for sample, prompt in zip(images or [[] for _ in prompts], prompts):
        row = [1]
        for image in sample:
            resized = np.array(Image.fromarray(image).convert("RGB").resize((side, side), Image.BICUBIC))
            pixels.append((torch.from_numpy(resized).permute(2, 0, 1).float() / 255 - mean) / std)
            run = [config.image_token_id] * config.image_seq_length
            row += [config.boi_token_index, *run, config.eoi_token_index] if config.model_type == "gemma3" else run
        rows.append(row + list(prompt))
    width = max(len(r) for r in rows)
    out = {"input_ids": torch.tensor([[0] * (width - len(r)) + r for r in rows]),
           "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])}
    if config.model_type == "gemma3":
        out["token_type_ids"] = (out["input_ids"] == config.image_token_id).long()
    if pixels and config.model_type == "idefics3":  # [batch, tiles, 3, H, W], all-zero padding tiles
        per_row = [len(sample) for sample in images]
        most = max(per_row)
        stacked = torch.zeros(len(per_row), most, *pixels[0].shape)
        masks = torch.zeros(len(per_row), most, side, side, dtype=torch.long)
        it = iter(pixels)
        for b, n in enumerate(per_row):
            for i in range(n):
                stacked[b, i] = next(it)
                masks[b, i] = 1
        out["pixel_values"], out["pixel_attention_mask"] = stacked, masks
    elif pixels:
        out["pixel_values"] = torch.stack(pixels)
    return out


def _onevision_inputs(images, videos, prompts, config) -> dict:
    """LLaVA-OneVision inputs, made by its own image processor: a sample with one image gets the base tile
    plus any-resolution tiles, a sample with several gets base tiles only (``batch_num_images``); videos
    are resized frames. Placeholders per image and video are what the model's packing makes of them."""
    from PIL import Image
    from transformers import LlavaOnevisionImageProcessorPil

    from luvc.models.llava_onevision import packed_length

    side = config.vision_config.image_size
    grid = side // config.vision_config.patch_size
    processor = LlavaOnevisionImageProcessorPil(size={"height": side, "width": side},
                                                image_grid_pinpoints=config.image_grid_pinpoints)
    images = list(images) or [[] for _ in prompts]
    videos = list(videos) or [[] for _ in prompts]
    flat = [image for sample in images for image in sample]
    out: dict = {}
    rows = [[1] for _ in prompts]
    if flat:
        feats = processor(images=[list(sample) for sample in images if sample], return_tensors="pt")
        out.update(pixel_values=feats["pixel_values"], image_sizes=feats["image_sizes"],
                   batch_num_images=feats["batch_num_images"])
        sizes = iter(feats["image_sizes"])
        for row, sample in zip(rows, images):
            for _ in sample:
                size = next(sizes)
                tiles = hf.image_size_to_num_patches(size, config.image_grid_pinpoints, side) if len(sample) == 1 else 1
                row += [config.image_token_id] * packed_length(tiles, grid, size, config)
    clips = [video for sample in videos for video in sample]
    if clips:
        mean, std = (torch.tensor(v)[:, None, None] for v in ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
        frames = [[(torch.from_numpy(np.array(Image.fromarray(f).resize((side, side), Image.BICUBIC)))
                    .permute(2, 0, 1).float() / 255 - mean) / std for f in clip] for clip in clips]
        out["pixel_values_videos"] = torch.stack([torch.stack(f) for f in frames])
        for row, sample in zip(rows, videos):
            for clip in sample:
                row += [config.video_token_id] * (len(clip) * ((grid + 1) // 2) ** 2 + 1)
    for row, prompt in zip(rows, prompts):
        row += list(prompt)
    width = max(len(r) for r in rows)
    out["input_ids"] = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    out["attention_mask"] = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return out


def _as_video(features) -> torch.Tensor:
    """Pair consecutive frames' patches into temporal patches (temporal_patch_size 2)."""
    pv = features["pixel_values"]
    t, h, w = len(features["image_grid_thw"]), *features["image_grid_thw"][0, 1:].tolist()
    per = pv.view(t, h * w, 3, 2, -1)[:, :, :, 0]  # each frame's first temporal copy
    pairs = per.view(t // 2, 2, h * w, 3, -1).permute(0, 2, 3, 1, 4)
    return pairs.reshape((t // 2) * h * w, -1)
