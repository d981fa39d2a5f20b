"""Baseline methods on every family: attention rows recomputed exactly, budgets met, text kept, generate works."""

from __future__ import annotations

import pytest
import torch
from conftest import VISION_FAMILIES, generate, greedy_without_cache

import luvc
from luvc.examples import build_model, model_config, vlm_inputs
from luvc.models import find_adapter
from luvc.models.llava import CLIPLayerNode
from luvc.registry import get_registry
from luvc.runtime.llm import attention_rows
from luvc.runtime.vision_scores import patch_scores, received_attention
from luvc.state import LLMState, VisionState
from luvc.transforms.dart import duplication_scores
from luvc.transforms.tome import bipartite_pairs
from luvc.transforms.visionzip import zip_frame


def _schedule(site: str, transform: str, at, **params) -> dict:
    return {"name": f"{transform}-test", site: [{"transform": transform, "at": at, "params": params}]}


#: One schedule per method, as a user would write it (4-layer LLM, 4-block vision tower).
METHODS = {
    "fastv": _schedule("llm", "fastv", 2, keep=0.3),
    "pyramid_drop": _schedule("llm", "pyramid_drop", [1, 2, 3], keep=0.5),
    "dart": _schedule("llm", "dart", 2, keep=0.25, pivots=2),
    "random_drop": _schedule("llm", "random_drop", 0, keep=0.4, seed=3),
    "tome": _schedule("vision", "tome", "0:4", ratio=0.2),
    "uniform_pool": _schedule("vision", "uniform_pool", 1.0, stride=[2, 2]),
    "visionzip": _schedule("vision", "visionzip", 1.0, keep=0.3, contextual=0.2),
}
#: Methods whose choice depends on the prompt's last tokens.
QUERY_DEPENDENT = {"fastv", "pyramid_drop", "dart"}


def _rope_positions(model, inputs) -> torch.Tensor:
    if not hasattr(model.model, "get_rope_index"):  # 1-D rotary
        return torch.arange(inputs["input_ids"].shape[1]).expand(1, *inputs["input_ids"].shape)
    return model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                      image_grid_thw=inputs.get("image_grid_thw"),
                                      attention_mask=inputs["attention_mask"])[0]


def _linear_layers(model) -> list[int]:
    """The LLM layers without attention (a hybrid model's linear-attention layers)."""
    kinds = getattr(model.config.get_text_config(), "layer_types", None) or []
    return [i for i, kind in enumerate(kinds) if kind == "linear_attention"]


def _placed(method: str, model) -> dict:
    """``METHODS[method]``, its attention-ranked steps moved to the full-attention layers of a hybrid model
    (luvc refuses them before a linear-attention layer, which has no attention to rank by)."""
    schedule = METHODS[method]
    linear = _linear_layers(model)
    if method not in QUERY_DEPENDENT or not linear:
        return schedule
    full = [i for i in range(model.config.get_text_config().num_hidden_layers) if i not in linear]
    return {**schedule, "llm": [{**step, "at": full} for step in schedule["llm"]]}


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_recomputed_attention_rows_equal_eager_probabilities(family, layer, astronaut, coffee):
    """The last token's head-averaged attention row, recomputed from q/k, equals eager attention's."""
    model = build_model(family, attn="eager")
    if layer in _linear_layers(model):
        pytest.skip(f"layer {layer} of {family} is a linear-attention layer: it has no attention rows")
    inputs = vlm_inputs([[astronaut], [coffee[:150, :300]]], prompts=[(10, 11), (12, 13, 14, 15)],
                        pixels=160 * 160, config=model_config(family))
    node = dict(find_adapter(model).stack_nodes(model))[f"llm.layers.{layer}"]  # its rotary and window
    received = []  # what the layer gets: Qwen3-VL's DeepStack adds to a layer's output after hidden_states saw it
    node.block.register_forward_pre_hook(lambda module, args: received.append(args[0]))
    out = model(**inputs, output_attentions=True)
    valid = inputs["attention_mask"].bool()
    state = LLMState(received[0], valid, torch.zeros_like(valid), _rope_positions(model, inputs),
                     torch.zeros_like(inputs["input_ids"]))
    length = valid.shape[1]
    rows = torch.tensor([[length - 1], [length - 3]])
    recomputed = attention_rows(node, state, rows)
    linear = _linear_layers(model)  # a hybrid model returns attention weights of its attention layers only
    eager = out.attentions[layer - sum(i < layer for i in linear)].mean(dim=1)
    expected = torch.stack([eager[0, length - 1], eager[1, length - 3]])[:, None]
    torch.testing.assert_close(recomputed, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_compiles_meets_its_budget_and_generates(method, family, mixed_batch_inputs):
    """Cached generate equals recomputing the prompt; each step removes exactly its planned count; text is kept.
    A family without the vision stage refuses a vision-side method at compile time instead."""
    model = build_model(family)
    if get_registry().transforms[method].site == "vision" and family not in VISION_FAMILIES:
        with pytest.raises(luvc.ScheduleError, match="runs in the vision stage, which the generic adapter"):
            luvc.compile(model, _placed(method, model))
        return
    luvc.compile(model, _placed(method, model))
    cached = model.generate(**mixed_batch_inputs, max_new_tokens=3, do_sample=False)[:, -3:]
    assert cached.shape == (3, 3)
    if method in QUERY_DEPENDENT:  # ranked by the newest token: re-running a longer prompt prunes differently
        # positions as generate numbers a left-padded prompt (a plain forward would count the padding)
        mask = mixed_batch_inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        first = model(**mixed_batch_inputs, position_ids=positions).logits[:, -1].argmax(-1)
        assert torch.equal(cached[:, 0], first)
    else:
        assert torch.equal(cached, greedy_without_cache(model, mixed_batch_inputs, 3))
    rows = luvc.ledger(model)
    steps = [r for r in rows if r.transform]
    assert steps, "the method ran"
    llm = [r for r in rows if r.site == "llm"]
    assert len({tuple(r.text) for r in llm}) == 1, "text tokens are never dropped"
    spec = get_registry().transforms[method]
    for row in steps:
        params = next(m.params for m in model.luvc_graph.modules() if getattr(m, "label", None) == row.node)
        if spec.site == "llm":
            after = [spec.plan(params, n) for n in row.visual]
            assert [n - a for n, a in zip(row.visual, after)] == row.removed, "budget met exactly"
    if spec.site == "vision":
        assert sum(llm[0].visual) < sum(_uncompressed_visual(family, mixed_batch_inputs))


def _uncompressed_visual(family, inputs) -> list[int]:
    config = model_config(family)
    tokens = [config.image_token_id if hasattr(config, "image_token_id") else config.image_token_index]
    tokens += [getattr(config, "video_token_id", -1)]
    return [int(sum((row == t).sum() for t in tokens)) for row in inputs["input_ids"]]


def test_fastv_keeps_the_tokens_the_last_token_attends_to(tiny_model, single_image_inputs):
    """FastV's kept set is the top-k of the recomputed attention row (checked against a direct ranking)."""
    luvc.compile(tiny_model, _placed("fastv", tiny_model))
    captured = {}
    node = next(m for m in tiny_model.luvc_graph.modules() if getattr(m, "label", "").endswith("fastv_0"))
    node.register_forward_hook(lambda m, args, out: captured.update(before=args[0], after=out))
    tiny_model(**single_image_inputs)
    before, after = captured["before"], captured["after"]
    layer = node.layer[0]
    last = torch.tensor([[before.hidden.shape[1] - 1]])
    scores = attention_rows(layer, before, last)[0, 0].masked_fill(~before.visual[0], float("-inf"))
    k = int(after.visual[0].sum())
    expected = set(before.source[0, scores.topk(k).indices].tolist())
    assert set(after.source[0, after.visual[0]].tolist()) == expected


def test_dart_keeps_pivots_and_exactly_k():
    torch.manual_seed(0)
    hidden, keys = torch.randn(20, 8), torch.randn(20, 8)
    visual = torch.zeros(20, dtype=torch.bool)
    visual[2:14] = True
    text = torch.zeros(20, dtype=torch.bool)
    text[14:] = True
    keys[5] *= 100  # the largest-norm visual key is a pivot
    scores = duplication_scores(hidden, keys, visual, text, k=5, pivots=2)
    assert int((scores > 0).sum()) == 5 and scores[5] == 2.0
    assert not bool((scores[~visual] > 0).any())


def test_random_drop_is_seeded(tiny_model, single_image_inputs):
    luvc.compile(tiny_model, METHODS["random_drop"])
    first = tiny_model(**single_image_inputs).logits
    assert torch.equal(tiny_model(**single_image_inputs).logits, first)


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_visionzip_without_a_block_before_it_is_refused_at_compile_time(family):
    model = build_model(family)
    with pytest.raises(luvc.ScheduleError, match="no block runs right before it"):
        luvc.compile(model, _schedule("vision", "visionzip", 0, keep=0.3))
    assert not hasattr(model, "luvc_graph")


def test_received_attention_is_the_mean_softmax_column_in_chunks():
    torch.manual_seed(0)
    q, k = torch.randn(10, 2, 4), torch.randn(10, 2, 4)
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    got = received_attention(q, k, cu, 0.5, chunk=4)
    for a, b in ((0, 6), (6, 10)):
        probs = (torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * 0.5).softmax(-1)
        torch.testing.assert_close(got[a:b], probs.mean(dim=(0, 1)))
    assert torch.allclose(got[:6].sum(), torch.tensor(1.0))


def test_llava_class_token_attention_equals_eager(astronaut):
    """The class-token row CLIPLayerNode reports equals the eager CLIP layer's attention probabilities."""
    model = build_model("llava-tiny", attn="eager")
    inputs = vlm_inputs([[astronaut]], config=model_config("llava-tiny"))
    out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    layer = 2
    hidden = out.hidden_states[layer]
    node = CLIPLayerNode(model.model.vision_tower.encoder.layers[layer], layer)
    node.capture_keys = node.capture_attention = True
    n = hidden.shape[1] - 1
    state = VisionState(hidden[:, 1:].reshape(-1, hidden.shape[-1]), torch.ones(n), torch.zeros(n, 2),
                        ((1, 16, 16),), 1, prefix=hidden[:, :1])
    received = node(state).attention
    torch.testing.assert_close(received, out.attentions[layer].mean(dim=1)[0, 0, 1:], atol=1e-5, rtol=1e-4)


def test_visionzip_frame_keeps_dominant_units_in_order_then_contextual():
    torch.manual_seed(0)
    x, keys = torch.randn(12, 1, 3), torch.randn(12, 4)
    sizes, positions = torch.ones(12, 1), torch.zeros(12, 1, 2)
    scores = torch.arange(12.0)  # the last units dominate
    out_x, out_s, _ = zip_frame(x, sizes, positions, scores, keys, dominant=4, contextual=2)
    assert out_x.shape[0] == 6
    torch.testing.assert_close(out_x[:4], x[8:12])
    assert float(out_s.sum()) == 12.0, "every unit is kept or merged into a contextual unit"


def test_tome_leaves_a_one_unit_frame_alone():
    """Found by the property tests: a frame pooled down to one unit has nothing to merge."""
    metric = torch.randn(2, 1, 4)
    src, dst = bipartite_pairs(metric, 0)
    assert src.shape == dst.shape == (2, 0)


def test_without_a_class_token_patches_are_ranked_by_attention_received():
    """SigLIP-style towers (Idefics3) have no class token: the score is the mean attention each patch receives."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 8), torch.randn(2, 6, 8)  # 2 images, 6 patches, 2 heads x 4
    keys, received = patch_scores(q, k, images=2, heads=2, head_dim=4, prefix=0, scale=0.5)
    probs = (torch.einsum("bqhd,bkhd->bhqk", q.view(2, 6, 2, 4), k.view(2, 6, 2, 4)) * 0.5).softmax(-1)
    torch.testing.assert_close(received, probs.mean(dim=(1, 2)).reshape(-1))
    assert keys.shape == (12, 4)


@pytest.mark.parametrize("family", ["qwen2-vl-tiny", "qwen2.5-vl-tiny"])
def test_a_row_laid_image_keeps_its_cells_positions(family, mixed_batch_inputs):
    """VisionZip keeping every unit lays each image out as one row; its tokens keep their cells' M-RoPE
    positions and the text after it keeps its own, so logits and generation equal the uncompiled model's."""
    model = build_model(family)
    ref_logits = model(**mixed_batch_inputs).logits
    ref_tokens = generate(model, mixed_batch_inputs)
    luvc.compile(model, _schedule("vision", "visionzip", 1.0, keep=1.0, contextual=0.0))
    encoded = model.model.get_image_features(mixed_batch_inputs["pixel_values"], mixed_batch_inputs["image_grid_thw"])
    assert encoded.luvc_grid_thw[:, 1].tolist() == [model.config.vision_config.spatial_merge_size] * 3
    real = mixed_batch_inputs["attention_mask"].bool()
    torch.testing.assert_close(model(**mixed_batch_inputs).logits[real], ref_logits[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, mixed_batch_inputs), ref_tokens)


@pytest.mark.parametrize("stride", [[0, 2], [-1, 2], [2, 0]])
def test_pool_strides_below_one_are_refused_at_their_line(stride):
    """A stride of 0 would divide by zero and a negative one plan a negative grid: both are schedule errors."""
    from luvc import ScheduleError, load_schedule

    text = f"name: t\nvision:\n  - transform: uniform_pool\n    at: 1.0\n    params: {{stride: {stride}}}\n"
    axis = 0 if stride[0] < 1 else 1
    with pytest.raises(ScheduleError, match=rf"^<yaml>:5: vision\[0\]\.params\.stride\[{axis}\]: input should be "
                                            rf"greater than or equal to 1, got {stride[axis]}"):
        load_schedule(text)
