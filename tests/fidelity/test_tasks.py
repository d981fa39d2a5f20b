"""The fidelity task suite: deterministic, splits disjoint, images and inputs in the model's layout."""

from __future__ import annotations

import numpy as np
import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from luvc.fidelity.model import MERGE, PATCH, build_tokenizer, encode, fidelity_config, patchify
from luvc.fidelity.tasks import (
    CELL,
    PHOTOS,
    REGION_GROUPS,
    REGIONS,
    SIZE,
    TASKS,
    items,
    make_item,
    region_group,
    vocabulary,
)


def test_items_are_a_pure_function_of_split_and_index():
    a, b = make_item("test", 7), make_item("test", 7)
    assert a.question == b.question and a.answer == b.answer and np.array_equal(a.image, b.image)
    assert not np.array_equal(make_item("test", 8).image, a.image)


def test_splits_share_no_photograph_or_overlay():
    """By pixels, not names: scikit-image serves one photograph under two names (cat, chelsea)."""
    from luvc.fidelity.tasks import _photo

    pixels = {split: {_photo(name).tobytes() for name in names} for split, names in PHOTOS.items()}
    assert not pixels["train"] & pixels["val"] and not pixels["train"] & pixels["test"]
    assert not pixels["val"] & pixels["test"]
    keys = {split: {item.key for item in items(split, 250 if split != "train" else 1000)}
            for split in ("train", "val", "test")}
    assert not keys["train"] & keys["test"] and not keys["val"] & keys["test"] and not keys["train"] & keys["val"]


@pytest.mark.parametrize("task", TASKS)
def test_every_task_renders_a_full_size_image_with_a_one_word_answer(task):
    vocab = set(vocabulary())
    for item in items("val", 20, (task,)):
        assert item.image.shape == (SIZE, SIZE, 3) and item.image.dtype == np.uint8
        assert item.answer in vocab and set(item.question.split()) <= vocab


def test_answers_are_balanced_enough_that_a_prior_cannot_pass():
    answers = [item.answer for item in items("test", 500)]
    most = max(answers.count(a) for a in set(answers))
    assert most / len(answers) < 0.2


def test_patchify_matches_the_qwen2_vl_processor():
    item = make_item("test", 0)
    processor = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, min_pixels=SIZE * SIZE,
                                         max_pixels=SIZE * SIZE)
    reference = processor(images=[item.image], return_tensors="pt")["pixel_values"]
    assert (patchify(item.image) - reference).abs().max() < 1e-5


def test_encoded_inputs_have_256_visual_tokens_and_answer_labels():
    config, tokenizer = fidelity_config(), build_tokenizer()
    batch = items("test", 5)
    inputs = encode(batch, tokenizer, config, with_answers=True)
    assert ((inputs["input_ids"] == config.image_token_id).sum(1) == 256).all()
    for row, item in zip(inputs["labels"], batch):
        target = [t for t in row.tolist() if t != -100]
        answers = tokenizer.decode(target).split(tokenizer.eos_token)
        assert [a.strip() for a in answers[:-1]] == [item.answer] + [a for _, a in item.more]
    prompt = encode(batch, tokenizer, config)
    assert "labels" not in prompt
    assert tokenizer.decode(prompt["input_ids"][0, -len(batch[0].question.split()):]) == batch[0].question


def test_the_small_image_curriculum_gives_fewer_visual_tokens():
    from luvc.fidelity.train import shrink

    item = shrink(make_item("train", 0), 112)
    inputs = encode([item], build_tokenizer(), fidelity_config(), with_answers=True)
    assert item.image.shape == (112, 112, 3)
    assert int((inputs["input_ids"] == fidelity_config().image_token_id).sum()) == 64


def test_region_maps_name_what_answers_each_question():
    """Every item's region map marks the pixels its answer is read from, in the answer's own words."""
    from luvc.fidelity.tasks import REGIONS
    from luvc.fidelity.train import patch_regions

    for index in range(25):
        item = make_item("val", index)
        assert item.regions.shape == item.image.shape[:2]
        names = {REGIONS[i] for i in np.unique(item.regions)} - {"background"}
        assert any(item.answer in name.split() for name in names), (item.task, item.answer, names)
        patches = patch_regions(item)
        assert len(patches) == (SIZE // 14) ** 2 and patches.max() > 0, "some patch is labelled"


def test_every_group_has_regions_and_every_region_a_group():
    assert {region_group(name) for name in REGIONS} == set(REGION_GROUPS)
    assert region_group("digit 7") == "digit" and region_group("red circle left") == "relation"
    assert region_group("red circle") == "shape" and region_group("bar red 3") == "bar"


def test_a_text_label_is_one_patch_and_the_curriculum_tiles_it():
    """The digit fills one patch-aligned cell (one visual token); training's early items repeat it over
    a block of cells, the block's region marked with the digit."""
    from luvc.fidelity.tasks import REGIONS

    for tiles in (1, 4):
        item = make_item("train", 3, "text", tiles=tiles)
        ys, xs = np.nonzero(item.regions)
        assert ys.min() % CELL == 0 and xs.min() % CELL == 0
        assert ys.max() - ys.min() + 1 == xs.max() - xs.min() + 1 == tiles * CELL
        assert REGIONS[item.regions[ys[0], xs[0]]] == f"digit {item.answer}"
        cell = item.image[ys.min():ys.min() + CELL, xs.min():xs.min() + CELL]
        assert cell.min() < 60 and np.median(cell) > 100, "dark ink on a grey label"
        block = item.image[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert np.array_equal(block, np.tile(cell, (tiles, tiles, 1)))


@pytest.mark.parametrize("task", ["count", "color", "spatial"])
def test_shapes_fill_patch_aligned_two_by_two_boxes(task):
    """Each shape covers exactly a 2 x 2 block of patches, so every one of its tokens shows part of its outline."""
    for item in items("val", 10, (task,)):
        for region in set(np.unique(item.regions)) - {0}:
            ys, xs = np.nonzero(item.regions == region)
            rows, cols = set(ys // CELL), set(xs // CELL)
            assert len(rows) == 2 and len(cols) == 2 or task == "count", (task, rows, cols)
            assert (item.image[ys, xs] == 0).all(axis=-1).any(), "a dark outline"


def test_a_chart_data_label_shows_its_value_and_its_bar_colour_in_one_patch():
    from luvc.fidelity.tasks import COLORS, REGIONS

    item = make_item("val", 1, "chart")
    for region in set(np.unique(item.regions)) - {0}:
        _, color, value = REGIONS[region].split()
        ys, xs = np.nonzero(item.regions == region)
        assert (ys.max() + 1 - ys.min()) // CELL == int(value) + 1 and len(set(xs // CELL)) == 1
        label = item.image[ys.min():ys.min() + CELL, xs.min():xs.min() + CELL]
        assert (label.mean(-1) < 60).sum() > 5, "the value is printed in the label's patch"
        assert (label == COLORS[color]).all(axis=-1).sum() >= CELL, "the bar's colour reaches into it"
