"""The FX stack graph: blocks as leaves, transforms inserted where the schedule says, claims verified."""

from __future__ import annotations

import pytest
import torch.fx as fx
from pydantic import BaseModel, ConfigDict

import luvc
from luvc import CompileError, ScheduleError, load_schedule
from luvc.examples import build_model, sample_image, vlm_inputs
from luvc.fx.passes import insert_transforms
from luvc.fx.trace import StackGraphModule
from luvc.registry import TransformSpec
from luvc.schedules.plan import Plan


@pytest.fixture
def tiny_model():
    """The graph tests read Qwen2-VL's node names; families are covered in tests/models."""
    return build_model("qwen2-vl-tiny")


def modules(graph: fx.GraphModule) -> list[str]:
    return [n.target for n in graph.graph.nodes if n.op == "call_module"]


def test_trace_has_one_leaf_per_block(tiny_model):
    graph = luvc.trace(tiny_model)
    assert isinstance(graph, StackGraphModule) and isinstance(graph, fx.GraphModule)
    assert modules(graph) == [f"vision.blocks.{i}" for i in range(4)] + ["vision.merger"] + [
        f"llm.layers.{i}" for i in range(4)] + ["llm.norm"]
    assert graph.get_submodule("llm.layers.2").block is tiny_model.model.language_model.layers[2]


def test_transforms_sit_where_the_schedule_says(tiny_model):
    luvc.compile(tiny_model, {
        "name": "placed", "eliminate_visual": True,
        "vision": [{"transform": "orthogonal_merge", "at": [1, 4]}],
        "llm": [{"transform": "spectrum_prune", "at": [0, 2], "params": {"keep": 0.5}},
                {"transform": "spectrum_prune", "at": 3, "params": {"keep": 0.0}}],
    })
    order = modules(tiny_model.luvc_graph)
    assert order.index("vision.transforms.orthogonal_merge_0") == order.index("vision.blocks.1") - 1
    assert order.index("vision.transforms.orthogonal_merge_1") == order.index("vision.merger") - 1
    assert order.index("llm.transforms.spectrum_prune_2") == order.index("llm.layers.3") - 1
    axes = [tiny_model.luvc_graph.get_submodule(f"vision.transforms.orthogonal_merge_{k}").params.axis for k in (0, 1)]
    assert axes == ["width", "height"], "alternate flips the axis at each occurrence"
    assert tiny_model.luvc_graph.get_submodule("vision.blocks.0").capture_keys
    text = str(tiny_model.luvc_graph)
    assert "spectrum_prune(keep=0.0" in text and "def forward(self, state)" in text


def test_a_plan_for_other_stacks_is_not_inserted(tiny_model):
    plan = Plan.of_depths(load_schedule("luvc-default"), vision_depth=8, llm_depth=4)
    with pytest.raises(ValueError, match="placed on other stacks than this graph's"):
        insert_transforms(luvc.trace(tiny_model), plan)


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def test_the_final_layer_refuses_visual_tokens_a_claimed_elimination_kept(tiny_model, register_transforms):
    """A transform whose eliminates() and count rule say it removes every visual token, but whose run keeps
    them, passes the static proof; the final norm catches it at the first prefill."""
    register_transforms(TransformSpec(name="keeps_all", site="llm", params=_NoParams, run=lambda state, p: state,
                                      plan=lambda p, n: 0, eliminates=lambda p: True))
    luvc.compile(tiny_model, {"name": "broken", "eliminate_visual": True,
                              "llm": [{"transform": "keeps_all", "at": 2}]})
    with pytest.raises(CompileError, match=r"claims eliminate_visual, but 64 visual token\(s\) reached the final "
                                           r"layer; llm.transforms.keeps_all_0 should have removed them all"):
        tiny_model(**vlm_inputs([[sample_image("astronaut")]]))
    luvc.uncompile(tiny_model)
    luvc.compile(tiny_model, {"name": "honest", "eliminate_visual": True,
                              "llm": [{"transform": "spectrum_prune", "at": 2, "params": {"keep": 0.0}}]})
    tiny_model.generate(**vlm_inputs([[sample_image("astronaut")]]), max_new_tokens=2, do_sample=False)


def test_a_key_comparing_merge_right_after_another_transform_is_refused():
    """The block's keys describe the tokens before the first transform at a position, not after it: a second,
    key-comparing step there would silently compare hidden states instead, so it is refused at its line."""
    schedule = ("name: t\nvision:\n  - transform: uniform_pool\n    at: 0.5\n    params: {stride: [1, 2]}\n"
                "  - transform: orthogonal_merge\n    at: 0.5\n")
    with pytest.raises(ScheduleError, match=r"^<yaml>:7: vision\[1\]\.at: orthogonal_merge compares tokens by the "
                                            r"attention keys .* uniform_pool runs between them"):
        luvc.compile(build_model("qwen2-vl-tiny"), schedule)
    by_outputs = schedule + "    params: {metric: hidden}\n"  # compares the pooled tokens themselves: allowed
    luvc.compile(build_model("qwen2-vl-tiny"), by_outputs)
