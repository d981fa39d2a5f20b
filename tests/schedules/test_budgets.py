"""Matched-budget presets: generated, loadable, and on budget both statically and at run time."""

from __future__ import annotations

import math

import pytest

import luvc
from luvc.schedules import load_schedule
from luvc.schedules.budgets import (
    BUDGETS,
    METHODS,
    REFERENCE,
    InfeasibleBudget,
    matched_schedule,
    planned_budget,
    reference_presets,
)
from luvc.zoo import build_model, model_config, sample_image, vlm_inputs

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
        matched_schedule("fastv", "ninth", llm_depth=8, vision_depth=4, grid=(1, 16, 16))


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
def test_luvc_matched_presets_are_the_default_with_its_keep_solved(budget):
    """A luvc row in a comparison measures luvc-default's own design at another keep fraction."""
    default = load_schedule("luvc-default").model_dump(mode="json")
    matched = matched_schedule("luvc", budget, llm_depth=8, vision_depth=4, grid=(1, 16, 16)).model_dump(mode="json")
    assert matched["vision"] == default["vision"] and matched["llm"][1:] == default["llm"][1:]
    (got, want) = (matched["llm"][0], default["llm"][0])
    assert got["at"] == want["at"] and got["params"]["keep"] > 0
    assert {k: v for k, v in got["params"].items() if k != "keep"} == \
        {k: v for k, v in want["params"].items() if k != "keep"}
