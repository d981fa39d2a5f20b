"""The plan: one placement of a schedule, read by the lowering, the counts and the verification, which fails
on real mistakes (a claim not reached, tokens added back, a transform in the wrong stage)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict

import luvc
from luvc import ScheduleError, load_schedule
from luvc.examples import build_model
from luvc.registry import TransformSpec
from luvc.schedules import Schedule
from luvc.schedules.plan import Count, Plan
from luvc.schedules.verify import verify


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def keep_all(state, params):
    return state


def test_steps_are_placed_in_running_order_numbered_and_bound():
    schedule = load_schedule({
        "name": "placed", "eliminate_visual": True,
        "vision": [{"transform": "orthogonal_merge", "at": [4, 1]}],
        "llm": [{"transform": "spectrum_prune", "at": 3, "params": {"keep": 0.0}},
                {"transform": "spectrum_prune", "at": [0, 3], "params": {"keep": 0.5}}],
    })
    plan = Plan.of_depths(schedule, vision_depth=4, llm_depth=4)
    assert [(s.label, s.position, s.step_index) for s in plan.steps] == [
        ("vision.transforms.orthogonal_merge_0", 1, 0), ("vision.transforms.orthogonal_merge_1", 4, 0),
        ("llm.transforms.spectrum_prune_0", 0, 1), ("llm.transforms.spectrum_prune_1", 3, 0),
        ("llm.transforms.spectrum_prune_2", 3, 1)]
    assert [s.params.axis for s in plan.steps[:2]] == ["width", "height"], "bound per occurrence"
    assert [s.label for s in plan.eliminating_steps()] == ["llm.transforms.spectrum_prune_1"]


def test_counts_follow_the_nodes_of_the_plan():
    schedule = load_schedule({"name": "c", "vision": [{"transform": "uniform_pool", "at": 1.0}],
                              "llm": [{"transform": "spectrum_prune", "at": 1, "params": {"keep": 0.5}}]})
    plan = Plan.of_depths(schedule, vision_depth=2, llm_depth=2)
    assert plan.counts([(1, 8, 8)], unit=4) == [
        Count("vision.blocks.0", 256), Count("vision.blocks.1", 256), Count("vision.transforms.uniform_pool_0", 256),
        Count("vision.projector", 64), Count("llm.layers.0", 16), Count("llm.transforms.spectrum_prune_0", 16),
        Count("llm.layers.1", 8), Count("llm.norm", 8)]
    assert plan.layer_counts((1, 8, 8)) == [16, 8]
    assert dict(plan.counts([(1, 8, 8)], llm_entry=30))["llm.layers.0"] == 30


def test_the_graph_is_lowered_from_its_plan():
    model = build_model("qwen2-vl-tiny", device="meta")
    _, _, graph = luvc.lower(model, "luvc-default")
    inserted = [n.target for n in graph.graph.nodes if n.meta.get("kind") == "transform"]
    assert inserted == [s.label for s in graph.luvc_plan.steps]
    assert graph.get_submodule("llm.norm").eliminated_by == ("llm.transforms.spectrum_prune_3",)
    assert [row.node for row in graph.luvc_plan.counts([(1, 8, 8)], 4)] == [
        n.target for n in graph.graph.nodes if n.op == "call_module"]


def test_a_claim_no_placed_step_reaches_is_refused():
    """A schedule not loaded through the loader (which checks the claim without a model) meets the plan's proof."""
    schedule = Schedule.model_validate({"name": "partial", "eliminate_visual": True,
                                        "llm": [{"transform": "spectrum_prune", "at": 1, "params": {"keep": 0.5}}]})
    with pytest.raises(ScheduleError, match=r"^<schedule>: eliminate_visual: claims to eliminate visual tokens, but "
                                            r"no step .* before the last of its 4 decoder layers") as caught:
        verify(Plan.of_depths(schedule, 4, 4))
    assert "at a layer <= 3" in caught.value.hint


def test_a_step_that_adds_tokens_back_after_the_elimination_is_refused_at_its_line(register_transforms):
    register_transforms(TransformSpec(name="regrow", site="llm", params=NoParams, run=keep_all,
                                      plan=lambda params, n: n + 4))
    schedule = ("name: regrown\neliminate_visual: true\nllm:\n  - transform: spectrum_prune\n    at: 1\n"
                "    params: {keep: 0.0}\n  - transform: regrow\n    at: 2\n")
    with pytest.raises(ScheduleError, match=r"^<yaml>:7: llm\[1\]\.transform: regrow adds visual tokens back, after "
                                            r"llm.transforms.spectrum_prune_0 removed them all: 0 enter") as caught:
        luvc.lower(build_model("qwen2-vl-tiny", device="meta"), schedule)
    assert caught.value.hint == "move this step before llm.transforms.spectrum_prune_0 or remove it"


@pytest.mark.parametrize("spec, schedule, error", [
    (TransformSpec(name="upsample", site="vision", params=NoParams, run=keep_all,
                   plan=lambda params, grid: (grid[0], grid[1] * 2, grid[2])),
     "name: up\nvision:\n  - transform: upsample\n    at: 1.0\n",
     r"^<yaml>:3: vision\[0\]\.transform: upsample adds visual tokens: 1 enter vision.transforms.upsample_0 and 2 "
     r"leave it"),
    (TransformSpec(name="half_gone", site="llm", params=NoParams, run=keep_all,
                   plan=lambda params, n: n // 2, eliminates=lambda params: True),
     "name: h\neliminate_visual: true\nllm:\n  - transform: half_gone\n    at: 0\n",
     r"^<yaml>:4: llm\[0\]\.transform: half_gone says it eliminates every visual token \(eliminates\), but its "
     r"count rule leaves 7 of 15"),
], ids=["vision-grid-grows", "eliminates-but-counts-leave-tokens"])
def test_a_count_rule_that_contradicts_the_plan_is_refused(register_transforms, spec, schedule, error):
    register_transforms(spec)
    with pytest.raises(ScheduleError, match=error):
        verify(Plan.of_depths(load_schedule(schedule), 4, 4))


def test_a_transform_placed_in_a_stage_it_does_not_run_in_is_refused(register_transforms):
    """The loader refuses it at load time; a plan of a schedule built directly (as the budgets do) is proved too."""
    register_transforms(TransformSpec(name="vision_only", site="vision", params=NoParams, run=keep_all,
                                      plan=lambda params, grid: grid))
    schedule = Schedule.model_validate({"name": "s", "llm": [{"transform": "vision_only", "at": 0}]})
    with pytest.raises(ScheduleError, match=r"llm\[0\]\.transform: 'vision_only' runs in the vision stage, "
                                            r"not in 'llm'") as caught:
        verify(Plan.of_depths(schedule, 4, 4))
    assert caught.value.hint == "move this step under 'vision:'"


def test_the_built_in_transforms_pass_the_proof():
    model = build_model("qwen2-vl-tiny", device="meta")
    for name in ("luvc-default", "luvc-aggressive", "fastv-quarter", "visionzip-third", "uniform_pool-ninth",
                 "pyramid_drop-quarter", "dart-third", "random_drop-ninth"):
        luvc.lower(model, name)
