"""Example models of every registered family, built from configs with random weights, and their inputs.

No weights are downloaded: every model here is built from its config, which
exercises the real transformers code paths at any size. Each family's adapter
provides its examples (``examples``: named sizes, tiny ones for tests and the
released models' dimensions for speed runs), builds its config from them
(``example_config``) and makes processor-style inputs (``example_inputs``), so
a new family joins the demo, the benchmarks and the family-parametrised tests
through its adapter alone.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from luvc import hf
from luvc.errors import UnknownModelError
from luvc.registry import get_registry

#: Text-model settings every example shares (a small vocabulary; ids 0, 1, 2 are pad, bos, eos).
TEXT_DEFAULTS = dict(vocab_size=512, max_position_embeddings=32768, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def examples() -> dict[str, tuple[Any, dict]]:
    """Every registered adapter's named example sizes: name -> (adapter, sizes)."""
    return {name: (adapter, spec) for adapter in get_registry().adapters
            for name, spec in getattr(adapter, "examples", {}).items()}


def _lookup(name: str) -> tuple[Any, dict]:
    known = examples()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        raise UnknownModelError(f"unknown model config {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                                f"built-in: {', '.join(known)}")
    return known[name]


def model_config(name: str = "qwen2-vl-tiny", layers: int | None = None, vision_layers: int | None = None):
    """The transformers config of example ``name``; ``layers`` and ``vision_layers`` shrink the depth of
    the LLM and of the vision encoder."""
    adapter, spec = _lookup(name)
    text = {**TEXT_DEFAULTS, **spec["text"]}
    if layers is not None:
        text["num_hidden_layers"] = layers
    vision = dict(spec["vision"])
    if vision_layers is not None:
        adapter.shorten_tower(vision, vision_layers)
    return adapter.example_config(text, vision, spec)


def build_model(name: str = "qwen2-vl-tiny", attn: str = "sdpa", seed: int = 0,
                dtype: torch.dtype = torch.float32, device: str = "cpu", layers: int | None = None,
                vision_layers: int | None = None) -> nn.Module:
    """A randomly initialised model of example ``name``, in eval mode; ``device="meta"`` allocates nothing."""
    adapter, spec = _lookup(name)
    config = model_config(name, layers, vision_layers)
    for part in (config, config.text_config, config.vision_config):
        hf.set_attn_implementation(part, attn)
    torch.manual_seed(seed)
    with torch.device(device):
        model = adapter.example_class(spec)(config).eval().to(dtype)
    if device != "meta":
        adapter.example_init(model)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def sample_image(name: str = "astronaut") -> np.ndarray:
    """A real photograph bundled with scikit-image (the ``bench`` extra), as an RGB uint8 array."""
    from skimage import data

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3]


def vlm_inputs(images: Sequence[Sequence[np.ndarray]] = (), prompts: Sequence[Sequence[int]] = ((10, 11, 12),),
               pixels: int = 224 * 224, videos: Sequence[Sequence[np.ndarray]] = (), config=None) -> dict:
    """Processor-style inputs for a batch: sample ``i`` has ``images[i]`` (a list, maybe empty), then
    ``videos[i]`` (a list of ``[frames, H, W, 3]`` arrays), then ``prompts[i]``; rows are left-padded
    with id 0. What the family's processor would give its model (``config``; by default Qwen2-VL's);
    ``pixels`` bounds the area of a resized image where the family resizes to fit."""
    config = config if config is not None else model_config("qwen2-vl-tiny")
    adapter = next((a for a in get_registry().adapters
                    if config.model_type in getattr(a, "example_model_types", (a.name,))), None)
    if adapter is None or not hasattr(adapter, "example_inputs"):
        raise UnknownModelError(f"no adapter makes example inputs for model type {config.model_type!r}")
    return adapter.example_inputs(config, images, videos, prompts, pixels)
