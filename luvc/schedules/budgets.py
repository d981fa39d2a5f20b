"""Matched budgets: every method's schedule solved for the same mean visual tokens per LLM layer.

The budget of a schedule is ``B = (1/L) * sum_l n_l``, the mean number of
visual tokens entering each of the ``L`` decoder layers (the convention of
most comparison tables); a method that compresses before the LLM has
``B`` = the tokens it passes on. ``planned_budget`` computes it from the
transforms' static count rules, with no model, so each method's one knob
(keep fraction, lambda, merge ratio) is solved by bisection to hit a target
fraction of the uncompressed count.

The shipped ``<method>-<third|quarter|ninth>`` presets are solved for the
reference shape of Qwen2-VL-7B at 448 x 448 (28 decoder layers, 32 vision
blocks, 16 x 16 merged tokens) and regenerated with
``python -m luvc.schedules.budgets``; ``matched_schedule`` solves them for
any other depth or grid (the fidelity benchmark does so for its model).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

from luvc.registry import get_registry
from luvc.schedules.loader import load_schedule, params_of
from luvc.schedules.placement import resolve_positions
from luvc.schedules.schema import Schedule

#: Target fractions of the uncompressed visual-token count.
BUDGETS = {"third": 1 / 3, "quarter": 1 / 4, "ninth": 1 / 9}
#: Reference shape the shipped presets are solved for: Qwen2-VL-7B, 448 x 448 image.
REFERENCE = dict(llm_depth=28, vision_depth=32, grid=(1, 16, 16))


def planned_budget(schedule: Schedule, llm_depth: int, vision_depth: int, grid: tuple[int, int, int]) -> float:
    """Mean visual tokens entering each decoder layer for one image of unit ``grid``."""
    registry = get_registry()
    for stage, depth in (("vision", vision_depth), ("llm", llm_depth)):
        plan = sorted((pos, i) for i in range(len(getattr(schedule, stage)))
                      for pos in resolve_positions(schedule, stage, i, depth))
        occurrences: dict[str, int] = {}
        steps = []
        for pos, i in plan:
            step = getattr(schedule, stage)[i]
            spec = registry.transforms[step.transform]
            k = occurrences.get(step.transform, 0)
            occurrences[step.transform] = k + 1
            steps.append((pos, spec, spec.bind(params_of(step), k)))
        if stage == "vision":
            for _, spec, params in steps:
                grid = spec.plan(params, grid)
            tokens = math.prod(grid)
            continue
        total = 0
        for layer in range(llm_depth):
            for _, spec, params in (s for s in steps if s[0] == layer):
                tokens = spec.plan(params, tokens)
            total += tokens
    return total / llm_depth


def _step(transform: str, at, **params) -> dict:
    return {"transform": transform, "at": at, "params": params}


@functools.cache
def _luvc_default_parts() -> tuple[list[dict], dict, list]:
    """``luvc-default``'s vision steps, its SPU scoring (everything but ``keep``) and its cascade's
    positions, read once."""
    default = load_schedule("luvc-default").model_dump(mode="json")
    cascade = default["llm"][0]
    scoring = {k: v for k, v in cascade["params"].items() if k != "keep"}
    return default["vision"], scoring, cascade["at"]


def _luvc_template(q: float) -> dict:
    """``luvc-default`` with its cascade's keep fraction as the knob (its merge, its scoring, its
    positions, none at the last layer): the cascade starts before the first layer, so one keep
    fraction reaches every budget down to a ninth at any depth."""
    vision, scoring, at = _luvc_default_parts()
    return {"eliminate_visual": True, "vision": vision,
            "llm": [_step("spectrum_prune", at, keep=round(q, 4), **scoring),
                    _step("spectrum_prune", -1, keep=0.0)]}


#: method -> (knob range, schedule as a function of the knob). Defaults follow each method's paper.
TEMPLATES: dict[str, tuple[tuple[float, float], Callable[[float], dict]]] = {
    "luvc": ((0.0, 1.0), _luvc_template),
    "fastv": ((0.0, 1.0), lambda q: {"llm": [_step("fastv", 2, keep=round(q, 4))]}),
    "pyramid_drop": ((0.0, 1.0), lambda q: {"llm": [_step("pyramid_drop", [0.0625, 0.25, 0.5], keep=round(q, 4))]}),
    "dart": ((0.0, 1.0), lambda q: {"llm": [_step("dart", 2, keep=round(q, 4), pivots=4)]}),
    "random_drop": ((0.0, 1.0), lambda q: {"llm": [_step("random_drop", 0, keep=round(q, 4), seed=0)]}),
    "visionzip": ((0.0, 1.0), lambda q: {"vision": [_step("visionzip", 1.0, keep=max(round(q, 4), 1e-4),
                                                         contextual=0.16)]}),
    "tome": ((0.0, 0.5), lambda q: {"vision": [_step("tome", "0:", ratio=max(round(q, 4), 1e-4))]}),
}
#: Every method with matched presets, LUVC first.
METHODS = ("luvc", "fastv", "pyramid_drop", "dart", "visionzip", "tome", "random_drop", "uniform_pool")
#: Pooling cannot be solved continuously: the stride whose result is nearest each budget.
POOL_STRIDES = {"third": (3, 1), "quarter": (2, 2), "ninth": (3, 3)}


class InfeasibleBudget(ValueError):
    """No setting of a method's knob reaches a budget at this depth (e.g. FastV at layer 2 of an
    8-layer LLM: the two full layers alone exceed a ninth of the tokens per layer)."""


def matched_schedule(method: str, budget: str, llm_depth: int, vision_depth: int,
                     grid: tuple[int, int, int]) -> Schedule:
    """``method``'s schedule whose planned budget is nearest ``BUDGETS[budget]`` of the uncompressed count.

    Raises ``InfeasibleBudget`` when even the nearest misses the target by more than a token and
    5%: a row labelled with a budget it does not have would compare methods unequally.
    """
    target = BUDGETS[budget] * math.prod(grid)
    name = f"{method}-{budget}"
    if method == "uniform_pool":
        data = {"vision": [_step("uniform_pool", 1.0, stride=list(POOL_STRIDES[budget]))]}
        return _finish(name, method, budget, data)
    (lo, hi), template = TEMPLATES[method]
    increasing = planned_budget(_finish(name, method, budget, template(hi)), llm_depth, vision_depth, grid) >= \
        planned_budget(_finish(name, method, budget, template(lo)), llm_depth, vision_depth, grid)
    for _ in range(40):
        mid = (lo + hi) / 2
        value = planned_budget(_finish(name, method, budget, template(mid)), llm_depth, vision_depth, grid)
        if (value < target) == increasing:
            lo = mid
        else:
            hi = mid
    candidates = [_finish(name, method, budget, template(x)) for x in (lo, hi)]
    reached, best = min(((planned_budget(s, llm_depth, vision_depth, grid), s) for s in candidates),
                        key=lambda pair: abs(pair[0] - target))
    if abs(reached - target) > max(1.0, 0.05 * target):
        raise InfeasibleBudget(f"{name}: {method} reaches {reached:.1f} visual tokens per layer at best, not "
                               f"{target:.1f}, with {llm_depth} decoder layers and {vision_depth} vision blocks")
    return best


def _finish(name: str, method: str, budget: str, data: dict) -> Schedule:
    fraction = {"third": "1/3", "quarter": "1/4", "ninth": "1/9"}[budget]
    description = f"{method}, {fraction} of the visual tokens per LLM layer on average (matched budget)"
    return Schedule.model_validate({"name": name, "description": description, **data})


def reference_presets() -> dict[str, Schedule]:
    """Every method at every budget, solved for the reference shape."""
    return {f"{m}-{b}": matched_schedule(m, b, **REFERENCE) for m in METHODS for b in BUDGETS}


def write_presets(folder: Path) -> list[Path]:
    """Write the matched presets as YAML files into ``folder``."""
    paths = []
    for name, schedule in reference_presets().items():
        path = folder / f"{name}.yaml"
        path.write_text(schedule.to_yaml())
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_presets(Path(__file__).parent / "presets"):
        print(written)
