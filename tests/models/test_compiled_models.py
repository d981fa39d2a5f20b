"""Compiled models of every family against the uncompiled ones: exact identity, KV-cache decoding, batches, undo."""

from __future__ import annotations

import pytest
import torch
from conftest import VISION_FAMILIES, generate, greedy_without_cache, schedule_for

import luvc
from luvc import CompileError, ScheduleError, UnsupportedModelError
from luvc.examples import build_model
from luvc.models import find_adapter


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_identity_reproduces_logits_and_generate(attn, family, mixed_batch_inputs):
    """With no transform, logits (at real tokens) match in fp32 and greedy generation is identical."""
    model = build_model(family, attn=attn)
    ref_logits = model(**mixed_batch_inputs).logits
    ref_tokens = generate(model, mixed_batch_inputs)
    luvc.compile(model, "identity")
    logits = model(**mixed_batch_inputs).logits
    real = mixed_batch_inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[real], ref_logits[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, mixed_batch_inputs), ref_tokens)


def test_identity_in_bf16(family, single_image_inputs):
    model = build_model(family, dtype=torch.bfloat16)
    inputs = dict(single_image_inputs, pixel_values=single_image_inputs["pixel_values"].bfloat16())
    ref = generate(model, inputs)
    luvc.compile(model, "identity")
    assert torch.equal(generate(model, inputs), ref)


@pytest.mark.parametrize("schedule", ["luvc-default", "luvc-mild", "luvc-aggressive"])
def test_cached_generate_matches_recomputing_the_prompt(schedule, family, mixed_batch_inputs, tiny_model):
    """Each layer caches only what it kept: decoding with the cache equals re-running the full prompt."""
    luvc.compile(tiny_model, schedule_for(family, schedule))
    cached = generate(tiny_model, mixed_batch_inputs)
    assert torch.equal(cached, greedy_without_cache(tiny_model, mixed_batch_inputs, 4))


def test_detail_preset_scores_each_image_on_its_own_grid(family, mixed_batch_inputs, tiny_model):
    """luvc-detail (SPU on each image's 2-D grid) generates with the KV cache as recomputation does, and reaches
    zero visual tokens; where the family gives no grid (LLaVA-OneVision's tiles stitched with newline tokens,
    the generic path's opaque features), compile says so, at the step's line, with the fix."""
    adapter = find_adapter(tiny_model)
    if "llm_grid" not in adapter.capabilities:
        source = "preset:luvc-detail" if family in VISION_FAMILIES else "<dict>"
        with pytest.raises(ScheduleError, match=rf"(?s){source}(:\d+)?: llm\[0\].params: spectrum_prune with "
                           rf"these params needs each image's token grid in the LLM.*{adapter.name} adapter does "
                           r"not provide.*use axis: hidden"):
            luvc.compile(tiny_model, schedule_for(family, "luvc-detail"))
        return
    luvc.compile(tiny_model, "luvc-detail")
    cached = generate(tiny_model, mixed_batch_inputs)
    assert torch.equal(cached, greedy_without_cache(tiny_model, mixed_batch_inputs, 4))
    assert luvc.ledger(tiny_model)[-1].visual == [0, 0, 0]


def test_a_grid_score_after_an_image_became_a_row_is_a_clear_error(astronaut):
    """ToMe lays an image out as one row of tokens: SPU's grid axis then has no grid, and says so at run time."""
    from luvc.examples import model_config, vlm_inputs

    model = build_model("qwen2-vl-tiny")
    inputs = vlm_inputs([[astronaut]], prompts=[(10, 11)], config=model_config("qwen2-vl-tiny"))
    luvc.compile(model, {"name": "row-then-grid", "vision": [{"transform": "tome", "at": 1, "params": {"ratio": 0.2}}],
                         "llm": [{"transform": "spectrum_prune", "at": 1, "params": {"keep": 0.5, "axis": "grid"}}]})
    with pytest.raises(CompileError, match="(?s)laid an image out as one row.*use axis: hidden"):
        model(**inputs)


def test_detail_scores_an_image_the_same_whatever_else_is_in_the_batch(astronaut, coffee, monkeypatch):
    """luvc-detail's first SPU step scores an image's tokens the same alone and beside other samples with
    other images (the batch pads it on the left)."""
    from luvc.examples import model_config, vlm_inputs
    from luvc.transforms import spectrum_prune as spu

    seen = []
    original = spu.spu_scores

    def recording(hidden, visual, params, grid=None):
        scores = original(hidden, visual, params, grid)
        seen.append(scores[0][visual[0]])
        return scores

    monkeypatch.setattr(spu, "spu_scores", recording)
    model = build_model("qwen2-vl-tiny")
    luvc.compile(model, "luvc-detail")
    config = model_config("qwen2-vl-tiny")
    firsts = []
    for images in ([[astronaut]], [[astronaut], [coffee[:150, :300], astronaut[:100, :200]]]):
        seen.clear()
        model(**vlm_inputs(images, prompts=[(10, 11)] * len(images), pixels=160 * 160, config=config))
        firsts.append(seen[0])
    torch.testing.assert_close(firsts[1], firsts[0], rtol=1e-4, atol=1e-5)


def test_compressed_generate_in_bf16(family, mixed_batch_inputs):
    model = build_model(family, dtype=torch.bfloat16)
    inputs = {k: (v.bfloat16() if k.startswith("pixel") else v) for k, v in mixed_batch_inputs.items()}
    luvc.compile(model, schedule_for(family, "luvc-default"))
    out = generate(model, inputs)
    assert out.shape == (3, 4)
    assert luvc.ledger(model)[-1].visual == [0, 0, 0]


def test_ledger_accounts_for_every_visual_token(family, mixed_batch_inputs, tiny_model):
    """Per sample, LLM visual tokens at entry = tokens at the final layer + everything the transforms removed."""
    luvc.compile(tiny_model, schedule_for(family, "luvc-default"))
    logits = tiny_model(**mixed_batch_inputs).logits
    rows = [r for r in luvc.ledger(tiny_model) if r.site == "llm"]
    first, last = rows[0].visual, rows[-1].visual
    removed = [sum(r.removed[b] for r in rows if r.transform) for b in range(3)]
    assert [f - rm for f, rm in zip(first, removed)] == last == [0, 0, 0]
    assert len({tuple(r.text) for r in rows}) == 1, "text tokens are never dropped"
    assert logits.shape[:2] == mixed_batch_inputs["input_ids"].shape, "logits keep the caller's layout"
    vision_rows = [r for r in luvc.ledger(tiny_model) if r.site == "vision" and r.node.startswith("vision.blocks")]
    assert all(a >= b for r, s in zip(vision_rows, vision_rows[1:]) for a, b in zip(r.visual, s.visual)
               if len(r.visual) == len(s.visual))


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_merged_grid_reaches_the_llm(single_image_inputs, tiny_model):
    """After OIM, the LLM receives the merged grid's tokens: fewer than the caller's placeholders."""
    luvc.compile(tiny_model, "luvc-default")
    names = tiny_model.model._luvc_pixel_kwargs["image"]
    features = tiny_model.model.get_image_features(*(single_image_inputs[n] for n in names))
    assert features.luvc_counts[0] < features.luvc_source_counts[0]
    assert features.pooler_output[0].shape[0] == features.luvc_counts[0]
    tiny_model(**single_image_inputs)
    assert [r.visual for r in luvc.ledger(tiny_model) if r.site == "llm"][0] == [features.luvc_counts[0]]


def test_uncompile_restores_outputs_and_structure(family, single_image_inputs, tiny_model):
    ref = tiny_model(**single_image_inputs).logits
    keys = list(tiny_model.state_dict())
    classes = {name: type(m) for name, m in tiny_model.named_modules()}
    luvc.compile(tiny_model, schedule_for(family, "luvc-default"))
    assert not torch.allclose(tiny_model(**single_image_inputs).logits[0, -1], ref[0, -1])
    luvc.uncompile(tiny_model)
    assert torch.equal(tiny_model(**single_image_inputs).logits, ref)
    assert list(tiny_model.state_dict()) == keys
    assert {name: type(m) for name, m in tiny_model.named_modules()} == classes
    assert not hasattr(tiny_model, "luvc_graph") and getattr(tiny_model, "_luvc", None) is None


def test_uncompile_says_what_it_could_not_restore(monkeypatch):
    """A class left swapped (the outer class keeps its name, so a name check would miss it) or a module left
    behind is named, not reported as an empty list."""
    model = build_model("qwen2-vl-tiny")
    luvc.compile(model, "luvc-default")
    adapter = model._luvc.adapter
    monkeypatch.setattr(type(adapter), "uninstall", lambda self, m, record: m.add_module("stray", torch.nn.Identity()))
    with pytest.raises(CompileError) as info:
        luvc.uncompile(model)
    message = str(info.value)
    assert "could not restore the model exactly" in message
    assert "<model>: still a subclass of Qwen2VLForConditionalGeneration" in message
    assert "model: still a subclass of Qwen2VLModel (LuvcQwen2VLModel)" in message
    assert "stray: a module compile added" in message


def test_compile_twice_and_uncompile_uncompiled_are_errors(tiny_model):
    luvc.compile(tiny_model, "identity")
    with pytest.raises(CompileError, match=r"luvc.uncompile\(model\) first"):
        luvc.compile(tiny_model, "luvc-llm")
    luvc.uncompile(tiny_model)
    with pytest.raises(CompileError, match="not compiled"):
        luvc.uncompile(tiny_model)


def test_failed_compile_leaves_the_model_untouched(tiny_model):
    classes = {name: type(m) for name, m in tiny_model.named_modules()}
    bad = {"name": "deep", "llm": [{"transform": "spectrum_prune", "at": 9, "params": {"keep": 0.0}}]}
    with pytest.raises(ScheduleError, match="layer 9 is out of range"):
        luvc.compile(tiny_model, bad)
    assert {name: type(m) for name, m in tiny_model.named_modules()} == classes
    assert getattr(tiny_model, "_luvc", None) is None


def test_unsupported_model_lists_supported_families():
    pattern = r"no adapter for Linear[\s\S]*qwen2_vl[\s\S]*qwen2_5_vl[\s\S]*llava[\s\S]*luvc_model_adapters"
    with pytest.raises(UnsupportedModelError, match=pattern):
        luvc.compile(torch.nn.Linear(2, 2), "identity")


def test_unsupported_attention_is_refused(tiny_model):
    tiny_model.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(CompileError, match="flex_attention"):
        luvc.compile(tiny_model, "identity")


def test_text_only_prompt_runs_through_the_compiled_model(family, tiny_model):
    ids = torch.tensor([[1, 5, 6, 7]])
    ref = tiny_model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    luvc.compile(tiny_model, schedule_for(family, "luvc-default"))
    assert torch.equal(tiny_model.generate(input_ids=ids, max_new_tokens=3, do_sample=False), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_gpu_identity_and_compressed_generate(attn, family, mixed_batch_inputs):
    """On CUDA (bf16): identity matches, compressed generation works with FlashAttention too."""
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    model = build_model(family, attn=attn, dtype=torch.bfloat16).cuda()
    inputs = {k: (v.bfloat16() if k.startswith("pixel") else v).cuda() for k, v in mixed_batch_inputs.items()}
    ref = generate(model, inputs)
    luvc.compile(model, "identity")
    assert torch.equal(generate(model, inputs), ref)
    luvc.uncompile(model)
    luvc.compile(model, schedule_for(family, "luvc-default"))
    assert generate(model, inputs).shape == ref.shape
    assert luvc.ledger(model)[-1].visual == [0, 0, 0]


@pytest.mark.parametrize("options", [dict(num_beams=2), dict(num_return_sequences=2, do_sample=True)])
def test_beams_and_multiple_sequences(options, family, mixed_batch_inputs, tiny_model):
    """generate() expands the compressed vision outputs per sample; identity still matches exactly."""
    torch.manual_seed(0)
    ref = tiny_model.generate(**mixed_batch_inputs, max_new_tokens=3, **options)
    luvc.compile(tiny_model, "identity")
    torch.manual_seed(0)
    assert torch.equal(tiny_model.generate(**mixed_batch_inputs, max_new_tokens=3, **options), ref)
    luvc.uncompile(tiny_model)
    luvc.compile(tiny_model, schedule_for(family, "luvc-default"))
    assert tiny_model.generate(**mixed_batch_inputs, max_new_tokens=3, **options).shape == ref.shape


def test_per_layer_outputs_are_refused_not_faked(single_image_inputs, tiny_model):
    luvc.compile(tiny_model, "luvc-llm")
    with pytest.raises(CompileError, match="output_hidden_states is not available"):
        tiny_model(**single_image_inputs, output_hidden_states=True)


def test_an_unknown_forward_keyword_is_refused_not_dropped(single_image_inputs, tiny_model):
    luvc.compile(tiny_model, "luvc-llm")
    with pytest.raises(CompileError, match=r"got 'cu_seq_lens_q', which a luvc-compiled model does not use"):
        tiny_model(**single_image_inputs, cu_seq_lens_q=torch.tensor([0, 4]))


def test_a_per_call_vision_setting_other_than_the_config_is_refused(astronaut):
    from luvc.examples import model_config, vlm_inputs

    model = build_model("llava-tiny")
    inputs = vlm_inputs([[astronaut]], config=model_config("llava-tiny"))
    luvc.compile(model, "luvc-default")
    model(**inputs, vision_feature_layer=model.config.vision_feature_layer)  # the config's own value: fine
    with pytest.raises(CompileError, match=r"vision_feature_layer=-3 differs from the config's -2"):
        model(**inputs, vision_feature_layer=-3)


def test_a_saved_compiled_model_compiles_itself_from_its_config(tmp_path, single_image_inputs, family):
    from transformers import AutoModelForImageTextToText

    model = build_model(family)
    schedule = luvc.load_schedule(schedule_for(family, "luvc-mild"))
    luvc.compile(model, schedule)
    expected = model(**single_image_inputs).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()  # plain transformers loads it
    assert type(loaded) is type(build_model(family))
    assert loaded.config.luvc_schedule["name"] == schedule.name
    luvc.compile(loaded)
    assert loaded._luvc.schedule == schedule
    torch.testing.assert_close(loaded(**single_image_inputs).logits, expected)
    luvc.uncompile(loaded)
    assert loaded.config.luvc_schedule["name"] == schedule.name  # as loaded
    luvc.uncompile(model)
    assert not hasattr(model.config, "luvc_schedule")
    with pytest.raises(CompileError, match="no schedule given, and this .* config has no luvc_schedule"):
        luvc.compile(model)
