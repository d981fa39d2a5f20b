"""The fidelity model's processor files, so ``AutoProcessor`` builds its inputs as for a hub model.

``luvc.fidelity.model.encode`` builds the model's inputs by hand; a tool that
drives Hugging Face models (lmms-eval, a user's script) instead calls
``AutoProcessor.from_pretrained(folder)`` and ``apply_chat_template``. The
files written here make that path give the same inputs: a ``Qwen2VLProcessor``
whose image processor has ``patchify``'s patch sizes and CLIP normalisation,
and a chat template that renders one user turn as
``<bos> <vision_start> <image> <vision_end> question`` (the processor expands
``<image>`` to one token per patch). The model was trained without roles, so
the template drops system turns and adds no generation prompt.

Plain JSON and Jinja, written without building a processor: building one
needs torchvision (Qwen2-VL's processor always carries a video processor).
"""

from __future__ import annotations

import json
from pathlib import Path

from luvc.fidelity.model import MEAN, MERGE, PATCH, STD, TEMPORAL
from luvc.fidelity.tasks import SIZE

MIN_PIXELS = 56 * 56  # Qwen2-VL's own floor: a 4 x 4 grid of patches
MAX_PIXELS = SIZE * SIZE  # the size the model was trained at: larger images shrink to 256 patches

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}{{ '<vision_start> <image> <vision_end> ' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
)


def processor_config() -> dict:
    """``processor_config.json``: the image (and, required by the processor class, video) settings."""
    vision = {
        "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True,
        "rescale_factor": 1 / 255, "resample": 3,  # bicubic, as Qwen2-VL; images of the suite's size are not resized
        "image_mean": MEAN.tolist(), "image_std": STD.tolist(),  # patchify's float32 values, exactly
        "patch_size": PATCH, "temporal_patch_size": TEMPORAL, "merge_size": MERGE,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    }
    return {
        "processor_class": "Qwen2VLProcessor",
        "image_processor": {**vision, "image_processor_type": "Qwen2VLImageProcessor"},
        "video_processor": {**vision, "video_processor_type": "Qwen2VLVideoProcessor", "do_sample_frames": False},
    }


def save_processor(folder: str | Path) -> list[Path]:
    """Write the processor files beside a checkpoint's tokenizer; returns their paths."""
    folder = Path(folder)
    config = folder / "processor_config.json"
    config.write_text(json.dumps(processor_config(), indent=2) + "\n")
    template = folder / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE)
    return [config, template]
