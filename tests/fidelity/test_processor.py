"""The shipped checkpoint's processor builds the benchmark's inputs, and the model answers them alike.

``AutoProcessor`` + ``apply_chat_template`` is how lmms-eval and users feed a
hub model; ``luvc.fidelity.model.encode`` is how ``luvc bench fidelity`` does.
Both must give the model the same tokens and pixels, or an lmms-eval score of
the fidelity model would not be the benchmark's.
"""

from __future__ import annotations

import json

import pytest
import torch

from luvc.fidelity.model import CHECKPOINT, load_model, load_tokenizer
from luvc.fidelity.processor import CHAT_TEMPLATE, processor_config


def test_the_checkpoint_carries_the_processor_the_code_describes():
    assert json.loads((CHECKPOINT / "processor_config.json").read_text()) == processor_config()
    assert (CHECKPOINT / "chat_template.jinja").read_text() == CHAT_TEMPLATE


@pytest.fixture(scope="module")
def processor():
    pytest.importorskip("torchvision", reason="Qwen2-VL's processor always builds a video processor: torchvision")
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(CHECKPOINT)


def _messages(items) -> list[list[dict]]:
    from PIL import Image

    # lmms-eval sends a system turn first; the model has no roles, so the template drops it.
    return [[{"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": [{"type": "image", "image": Image.fromarray(item.image)},
                                          {"type": "text", "text": item.question}]}] for item in items]


def test_processor_inputs_equal_the_benchmarks_and_get_the_same_answers(processor):
    from luvc.bench.fidelity import answer
    from luvc.fidelity.model import encode
    from luvc.fidelity.tasks import items

    batch = items("test", 10, start=500)  # held out, and past the published report's items
    model, tokenizer = load_model(), load_tokenizer()
    built = processor.apply_chat_template(_messages(batch), tokenize=True, return_dict=True, return_tensors="pt",
                                          padding=True, add_generation_prompt=True)
    by_hand = encode(batch, tokenizer, model.config)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(built[key], by_hand[key]), key
    torch.testing.assert_close(built["pixel_values"], by_hand["pixel_values"], rtol=0, atol=1e-6)

    with torch.inference_mode():
        out = model.generate(**built, max_new_tokens=3, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)[:, built["input_ids"].shape[1]:]
        reference = answer(model, tokenizer, batch)
    given = [processor.decode(row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row,
                              skip_special_tokens=True).strip() for row in out.tolist()]
    assert given == reference
