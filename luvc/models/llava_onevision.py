"""LLaVA-OneVision adapter (``LlavaOnevisionForConditionalGeneration``): a SigLIP tower without a
class token run on any-resolution tiles, an MLP projector, and a Qwen2 LLM with 1-D rotary.

What is specific to LLaVA-OneVision, and lives here:

* An image is a base tile (the whole image resized) plus, when it is the only
  image of its sample, a grid of high-resolution tiles; every tile is one item
  of the same square grid, so OIM merges each tile inside the tower (the
  tower never sees tiles together) and all tiles of a call stay one batch.
* Packing, done here on the merged tiles as the model does on full ones: the
  high-resolution tiles are stitched into one grid, the padding the processor
  added is cropped to the image's aspect ratio, the grid is downsampled if
  larger than ``anyres_max_N`` tiles' worth, and a newline token ends every
  row; the base tile's tokens come first. The placeholders the caller's
  input has per image are what the same packing gives on unmerged tiles.
* Video frames are tiles of their own; after the projector each frame is
  pooled to half its (merged) grid, bilinear, as the model does, the frames
  are concatenated in order and one newline ends the video. Merging acts
  within frames (SigLIP sees one frame at a time); frames keep their order,
  numbered 1-D like every token.
* The LLM sees what packing made; shortened placeholder runs are numbered 1-D in order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    Qwen2Config,
    SiglipVisionConfig,
)

from luvc.hf import (
    LlavaOnevisionModelOutputWithPast,
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)
from luvc.models.base import FamilyAdapter
from luvc.models.example_inputs import IMAGE_TOKEN, TINY_TEXT, VIDEO_TOKEN, padded, square_pixels, tiny_tower
from luvc.models.llava import CompiledLlavaModel, LlavaAdapter
from luvc.registry import hookimpl
from luvc.runtime.compiled import vision_output
from luvc.state import VisionState


def pack_image(tiles: Tensor, image_size, config, newline: Tensor | None) -> Tensor:
    """One image's LLM tokens from its tiles ``[tiles, h, w, D]`` (base tile first), the model's
    ``pack_image_features`` for any tile grid ``h x w``."""
    if tiles.shape[0] == 1:
        base = tiles[0].flatten(0, 1)
        return base if newline is None else torch.cat([base, newline[None].to(base)])
    base, high = tiles[0].flatten(0, 1), tiles[1:]
    h, w, dim = high.shape[1:]
    rows, cols = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, config.vision_config.image_size)
    grid = high.view(rows, cols, h, w, dim).permute(4, 0, 2, 1, 3).reshape(dim, rows * h, cols * w)
    grid = unpad_image(grid, image_size)
    most = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    height, width = grid.shape[1:]
    ratio = math.sqrt(height * width / (most * h * w))
    if ratio > 1.1:
        grid = nn.functional.interpolate(grid[None], [int(height // ratio), int(width // ratio)], mode="bilinear")[0]
    if newline is not None:
        grid = torch.cat([grid, newline[:, None, None].expand(dim, grid.shape[1], 1).to(grid)], dim=-1)
    return torch.cat([base, grid.flatten(1, 2).T])


def packed_length(tiles: int, side: int, image_size, config) -> int:
    """How many LLM tokens ``pack_image`` makes of ``tiles`` tiles of ``side x side`` tokens: the
    placeholders the processor writes for an image when ``side`` is the unmerged grid."""
    return len(pack_image(torch.empty(tiles, side, side, 1), image_size, config, torch.empty(1)))


def pool_frame(frame: Tensor) -> Tensor:
    """A video frame's tokens ``[h, w, D]`` pooled bilinearly to ``ceil(h/2) x ceil(w/2)``, flattened."""
    h, w = frame.shape[:2]
    pooled = nn.functional.interpolate(frame.permute(2, 0, 1)[None], [math.ceil(h / 2), math.ceil(w / 2)],
                                       mode="bilinear")
    return pooled[0].flatten(1).T


class CompiledLlavaOnevisionModel(CompiledLlavaModel):
    """Compiled LLaVA-OneVision inner model: SigLIP (per tile and frame) and the LLM run through the luvc graph."""

    _luvc_placeholders = {"image": "image_token_id", "video": "video_token_id"}
    _luvc_pixel_kwargs = {"image": ("pixel_values", "image_sizes", "batch_num_images"),
                          "video": ("pixel_values_videos",)}
    _luvc_output_class = LlavaOnevisionModelOutputWithPast
    _luvc_config_kwargs = ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio")

    def _luvc_tiles(self, pixels: Tensor) -> tuple[VisionState, int]:
        """Run tiles ``[N, 3, H, W]`` through the vision section; return the state and the unmerged side."""
        tower = self.vision_tower
        x = tower.embeddings(pixels.type(tower.dtype))
        tiles, tokens, dim = x.shape
        side = int(round(tokens ** 0.5))
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        positions = torch.stack([rows, cols], -1).reshape(-1, 2).float().repeat(tiles, 1).to(x.device)
        state = VisionState(hidden=x.reshape(-1, dim), sizes=torch.ones(tiles * tokens, device=x.device),
                            positions=positions, grids=((1, side, side),) * tiles, unit=1, log=[])
        return self._luvc_sections[0](state), side

    def get_image_features(self, pixel_values: Tensor, image_sizes: Tensor, batch_num_images=None,
                           vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
        self._luvc_check_features(vision_feature_layer, vision_feature_select_strategy)
        config = self.config
        if batch_num_images is None:
            patched = [True] * len(image_sizes)
        else:
            patched = [n == 1 for n in batch_num_images for _ in range(n)]
        counts = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                  if tile else 1 for size, tile in zip(image_sizes, patched)]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, counts)])
        state, side = self._luvc_tiles(pixel_values)
        (_, h, w), dim = state.grids[0], state.hidden.shape[-1]
        tiles = torch.split(state.hidden.view(-1, h, w, dim), counts)
        features = [pack_image(t, size, config, self.image_newline) for t, size in zip(tiles, image_sizes)]
        full = [packed_length(n, side, size, config) for n, size in zip(counts, image_sizes)]
        return vision_output(state, full, features)

    def get_video_features(self, pixel_values_videos: Tensor, vision_feature_layer=None,
                           vision_feature_select_strategy=None, **kwargs):
        self._luvc_check_features(vision_feature_layer, vision_feature_select_strategy)
        videos, frames = pixel_values_videos.shape[:2]
        state, side = self._luvc_tiles(pixel_values_videos.flatten(0, 1))
        (_, h, w), dim = state.grids[0], state.hidden.shape[-1]
        pooled = torch.stack([pool_frame(f) for f in state.hidden.view(-1, h, w, dim)])
        newline = self.image_newline[None].to(pooled)
        features = [torch.cat([*per_video, newline]) for per_video in pooled.view(videos, frames, -1, dim)]
        full = frames * math.ceil(side / 2) ** 2 + 1
        return vision_output(state, [full] * videos, features)


class LlavaOnevisionAdapter(LlavaAdapter):
    """Adapter for ``LlavaOnevisionForConditionalGeneration`` (SigLIP on anyres tiles, MLP projector, Qwen2 LLM):
    LLaVA's stack (blocks up to the feature layer, projector, decoder) and checks, its own compiled forward."""

    name = "llava_onevision"
    capabilities = frozenset()  # tiles stitched with newline tokens: no image grid in the LLM
    model_class = LlavaOnevisionForConditionalGeneration
    compiled_mixin = CompiledLlavaOnevisionModel
    title = "LLaVA-OneVision"
    strategy = ("full", "SigLIP has no class token")
    examples = {
        # SigLIP on a base tile plus any-resolution tiles (8 x 8 patches each here), newline tokens after each
        # row of the stitched tiles, video frames pooled 2 x 2; a Qwen2 LLM.
        "llava-onevision-tiny": dict(
            text=TINY_TEXT,
            vision=tiny_tower(image_size=112),
            pinpoints=[[112, 112], [112, 224], [224, 112], [224, 224], [112, 336], [336, 112]],
        ),
        # SigLIP-384 tiles (729 tokens) and the released pinpoints, at the tiny width.
        "llava-onevision-384-tiny": dict(
            text=TINY_TEXT,
            vision=tiny_tower(image_size=384),
            pinpoints=[[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
        ),
    }

    shorten_tower = FamilyAdapter.shorten_tower  # it reads the last layer: every block runs

    def example_config(self, text: dict, vision: dict, spec: dict):
        return LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**vision), text_config=Qwen2Config(**text),
                                    image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
                                    image_grid_pinpoints=spec["pinpoints"], vision_feature_layer=-1,
                                    vision_feature_select_strategy="full", tie_word_embeddings=False)

    def example_inputs(self, config, images, videos, prompts, pixels: int) -> dict:
        """What LLaVA-OneVision's own image processor makes: a sample with one image gets the base tile plus
        any-resolution tiles, a sample with several gets base tiles only (``batch_num_images``); videos are
        resized frames. Placeholders per image and video are what the model's packing makes of them."""
        side = config.vision_config.image_size
        grid = side // config.vision_config.patch_size
        processor = LlavaOnevisionImageProcessorPil(size={"height": side, "width": side},
                                                    image_grid_pinpoints=config.image_grid_pinpoints)
        images = list(images) or [[] for _ in prompts]
        videos = list(videos) or [[] for _ in prompts]
        out: dict = {}
        rows = [[1] for _ in prompts]
        if any(images):
            feats = processor(images=[list(sample) for sample in images if sample], return_tensors="pt")
            out.update(pixel_values=feats["pixel_values"], image_sizes=feats["image_sizes"],
                       batch_num_images=feats["batch_num_images"])
            sizes = iter(feats["image_sizes"])
            for row, sample in zip(rows, images):
                for _ in sample:
                    size = next(sizes)
                    tiles = image_size_to_num_patches(size, config.image_grid_pinpoints, side) \
                        if len(sample) == 1 else 1
                    row += [config.image_token_id] * packed_length(tiles, grid, size, config)
        clips = [video for sample in videos for video in sample]
        if clips:
            out["pixel_values_videos"] = torch.stack([
                torch.stack([square_pixels(frame, side, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) for frame in clip])
                for clip in clips])
            for row, sample in zip(rows, videos):
                for clip in sample:
                    row += [config.video_token_id] * (len(clip) * ((grid + 1) // 2) ** 2 + 1)
        out.update(padded([row + list(prompt) for row, prompt in zip(rows, prompts)]))
        return out


@hookimpl
def luvc_model_adapters() -> list:
    return [LlavaOnevisionAdapter()]
