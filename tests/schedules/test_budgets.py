"""Matched-budget presets: generated, loadable, and on budget both statically and at run time."""

from __future__ import annotations

import math

import pytest

import luvc
from luvc.examples import build_model, model_config, sample_image, vlm_inputs
from luvc.registry import get_registry
from luvc.schedules import Schedule, load_schedule, params_of
from luvc.schedules.budgets import (
    BUDGETS,
    LUVC_PRESETS,
    METHODS,
    REFERENCE,
    TUNED,
    InfeasibleBudget,
    luvc_schedule,
    matched_schedule,
    planned_budget,
    planned_counts,
    reference_presets,
)

PRESETS = reference_presets()


def test_shipped_preset_files_are_the_solved_schedules():
    """The YAML files are exactly what the solver produces (regenerate with python -m luvc.schedules.budgets)."""
    for name, schedule in PRESETS.items():
        assert load_schedule(name).to_yaml() == schedule.to_yaml(), name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_matched_preset_is_within_a_token_of_its_budget(name):
    method, budget = name.rsplit("-", 1)
    tokens = math.prod(REFERENCE["grid"])
    planned = planned_budget(load_schedule(name), **REFERENCE)
    if method == "uniform_pool":  # strides reach only some budgets; the nearest is shipped
        assert abs(planned / tokens - BUDGETS[budget]) < 0.05
    else:
        assert abs(planned - BUDGETS[budget] * tokens) <= 1.0


def test_matched_schedules_adapt_to_another_depth():
    for method in ("luvc", "fastv", "tome"):
        schedule = matched_schedule(method, "quarter", llm_depth=8, vision_depth=4, grid=(1, 16, 16))
        assert abs(planned_budget(schedule, 8, 4, (1, 16, 16)) - 64) <= 1.0


def test_a_budget_no_setting_reaches_is_refused_not_mislabelled():
    """FastV at layer 2 of 8 layers keeps 2 full layers: at least 64 tokens per layer, never a ninth (28.4)."""
    with pytest.raises(InfeasibleBudget, match=r"fastv-ninth: fastv reaches 64.0 .* not 28.4, with 8 decoder"):
        matched_schedule("fastv", "ninth", llm_depth=8, vision_depth=4, grid=(1, 16, 16), setting={"layer": 2})


def test_the_fidelity_default_set_leaves_out_and_names_infeasible_budgets():
    from luvc.bench.fidelity import default_schedules
    from luvc.fidelity.model import new_model

    infeasible: list[str] = []
    chosen = default_schedules(new_model(), (224, 224), infeasible)
    names = {schedule.name for _, _, schedule in chosen}
    assert "fastv-ninth" not in names and "luvc-ninth" in names and "fastv-quarter" in names
    assert any(reason.startswith("fastv-ninth:") for reason in infeasible)


@pytest.mark.parametrize("method", METHODS)
def test_run_time_budget_equals_the_plan_at_the_reference_depth(method):
    """On a Qwen2-VL with the reference depths and a 448 px image, the ledger's mean per layer is the planned one."""
    model = build_model("qwen2-vl-tiny", layers=REFERENCE["llm_depth"], vision_layers=REFERENCE["vision_depth"])
    inputs = vlm_inputs([[sample_image("astronaut")]], pixels=448 * 448, config=model_config("qwen2-vl-tiny"))
    luvc.compile(model, f"{method}-quarter")
    model(**inputs)
    layers = [r for r in luvc.ledger(model) if r.site == "llm" and r.node.startswith("llm.layers.")]
    measured = sum(r.visual[0] for r in layers) / len(layers)
    assert measured == pytest.approx(planned_budget(load_schedule(f"{method}-quarter"), **REFERENCE))


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_luvc_matched_presets_are_the_default_with_its_first_keep_solved(budget):
    """A luvc row in a comparison measures luvc-default's own design (its merge, scoring and linear cascade,
    at the tuned cascade positions) with the first step's keep solved for the budget."""
    default = load_schedule("luvc-default").model_dump(mode="json")
    matched = matched_schedule("luvc", budget, llm_depth=8, vision_depth=4, grid=(1, 16, 16)).model_dump(mode="json")
    assert matched["vision"] == default["vision"]
    assert [s["params"].keys() for s in matched["llm"]] == [s["params"].keys() for s in default["llm"]]
    assert matched["llm"][0]["params"]["keep"] > 0 and matched["llm"][-1]["params"]["keep"] == 0.0
    assert [s["at"] for s in matched["llm"][:-1]] == [[at] for at in TUNED[budget]["luvc"]["cascade"]]
    assert [s["params"]["keep"] for s in matched["llm"][1:]] == [s["params"]["keep"] for s in default["llm"][1:]]


@pytest.mark.parametrize("name", sorted(LUVC_PRESETS))
def test_luvc_preset_files_are_their_settings(name):
    """Each luvc-* YAML file (written by hand, with comments) says exactly what its setting in
    ``LUVC_PRESETS`` builds, so the ablation and the budget solver vary the shipped design."""
    built = Schedule.model_validate({"name": name, **luvc_schedule(None, LUVC_PRESETS[name])})
    assert load_schedule(name) == built.model_copy(update={"description": load_schedule(name).description})


def merged_share(schedule, size: int) -> float:
    """Share of a Qwen2-VL-2B image's visual tokens merged away before the projector, by the static plan."""
    from luvc.models.qwen2_vl import Qwen2VLAdapter

    config = model_config("qwen2-vl-2b")
    model = type("M", (), {"config": config})()
    grid, _ = Qwen2VLAdapter().input_grid(model, size, size)
    left = planned_counts(schedule.model_copy(update={"llm": (), "eliminate_visual": False}), 1,
                          config.vision_config.depth, grid)[0]
    return 1 - left / math.prod(grid)


@pytest.mark.parametrize("name", ["luvc-default", "luvc-mild", "luvc-aggressive"])
def test_the_paper_presets_follow_the_paper(name):
    """OIM alternates rows and columns and merges 20-40% before the projector (Qwen2-VL at 448 and 1344 px);
    SPU scores each token's hidden vector by its low-frequency energy, in a cascade that narrows to zero."""
    schedule = load_schedule(name)
    spec = get_registry().transforms["orthogonal_merge"]
    axes = [spec.bind(params_of(step), k).axis for k, step in enumerate(schedule.vision)]
    assert axes[:2] == ["width", "height"] and {s.transform for s in schedule.vision} == {"orthogonal_merge"}
    for size in (448, 1344):
        assert 0.20 <= merged_share(schedule, size) <= 0.40, (name, size)
    assert {s.transform for s in schedule.llm} == {"spectrum_prune"}
    assert all(params_of(s).band == "low" and params_of(s).axis == "hidden" for s in schedule.llm)
    counts = planned_counts(schedule, **REFERENCE)
    assert counts == sorted(counts, reverse=True) and counts[-1] == 0 and counts[-2] > 0
    drops = sorted({a - b for a, b in zip(counts, counts[1:]) if a != b})
    assert max(drops) - min(drops) <= 2, "each later step removes the same count (linear narrowing)"


def test_the_paper_default_merges_on_a_real_qwen2_vl_as_planned():
    """Run time agrees with the plan: the tokens reaching the projector of a 448 px image."""
    model = build_model("qwen2-vl-tiny", vision_layers=8)
    inputs = vlm_inputs([[sample_image("astronaut")]], pixels=448 * 448, config=model_config("qwen2-vl-tiny"))
    luvc.compile(model, "luvc-default")
    model(**inputs)
    rows = {r.node: r.visual[0] for r in luvc.ledger(model) if r.site == "vision"}
    assert 0.20 <= 1 - rows["vision.merger"] / rows["vision.blocks.0"] <= 0.40
