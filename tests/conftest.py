"""Shared fixtures: tiny random-weight Qwen2-VL models and processor-style inputs. No hub access."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from luvc.examples import build_model, examples, model_config, sample_image, vlm_inputs
from luvc.registry import TransformSpec, get_registry, hookimpl, register_plugin, unregister_plugin
from luvc.schedules import load_schedule

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


#: Every registered family's tiny example (its adapter's first, or every one it lists as ``test_examples``, as
#: the generic adapter does for each family it runs): model-level tests run on each, so a new adapter joins
#: them through its ``examples`` alone.
FAMILIES = [name for a in get_registry().adapters if getattr(a, "examples", None)
            for name in getattr(a, "test_examples", (next(iter(a.examples)),))]
#: The families whose adapter compiles the vision stage (the others take LLM-only schedules).
VISION_FAMILIES = [name for name in FAMILIES if "vision" in examples()[name][0].stages]
#: The families whose compiled forward takes video.
VIDEO_FAMILIES = {name for name in FAMILIES if "video" in examples()[name][0].compiled_mixin._luvc_placeholders}


class _Specs:
    def __init__(self, specs: tuple[TransformSpec, ...]) -> None:
        self.specs = specs

    @hookimpl
    def luvc_transforms(self):
        return list(self.specs)


@pytest.fixture
def register_transforms():
    """``register_transforms(spec, ...)`` registers extra transforms as one plugin for this test only."""
    plugins = []

    def register(*specs: TransformSpec) -> None:
        plugins.append(_Specs(specs))
        register_plugin(plugins[-1])

    yield register
    for plugin in plugins:
        unregister_plugin(plugin)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(family):
    """A fresh tiny model of each family (4 vision blocks, 4 decoder layers), SDPA attention."""
    return build_model(family)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return sample_image("astronaut")


@pytest.fixture(scope="session")
def coffee() -> np.ndarray:
    return sample_image("coffee")


@pytest.fixture
def single_image_inputs(family, astronaut) -> dict:
    """One sample, one 224x224 image (Qwen: 16x16 patches, 64 LLM tokens; LLaVA: 256 tokens)."""
    return vlm_inputs([[astronaut]], prompts=[(10, 11, 12, 13)], config=model_config(family))


@pytest.fixture
def mixed_batch_inputs(family, astronaut, coffee) -> dict:
    """Three left-padded samples: one image; two images of other sizes; a 4-frame video (or nothing,
    for families without video)."""
    video = np.stack([sample_image("chelsea")[:200, :200]] * 4)
    videos = [[], [], [video]] if family in VIDEO_FAMILIES else []
    return vlm_inputs(
        [[astronaut], [coffee[:150, :300], astronaut[:100, :200]], []],
        prompts=[(10, 11), (12, 13, 14, 15, 16), (20,)],
        videos=videos,
        pixels=160 * 160,
        config=model_config(family),
    )


def schedule_for(family: str, preset: str):
    """``preset`` as the family takes it: unchanged where its adapter compiles the vision stage, else the
    preset's LLM steps alone (named ``<preset>-llm-only``), so LLM-side behaviour is tested on every family."""
    if family in VISION_FAMILIES:
        return preset
    data = load_schedule(preset).model_dump(mode="json", exclude_none=True)
    return {**data, "name": f"{preset}-llm-only", "vision": []}


def greedy_without_cache(model, inputs: dict, steps: int) -> torch.Tensor:
    """Greedy decoding by re-running the whole prompt each step (no KV cache)."""
    inputs = dict(inputs)
    tokens = []
    for _ in range(steps):
        nxt = model(**inputs, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], nxt], 1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(nxt)], 1)
    return torch.cat(tokens, 1)


def generate(model, inputs: dict, steps: int = 4) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=steps, do_sample=False)[:, -steps:]
