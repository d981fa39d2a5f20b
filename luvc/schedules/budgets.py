"""Matched budgets: every method's schedule solved for the same mean visual tokens per LLM layer.

The budget of a schedule is ``B = (1/L) * sum_l n_l``, the mean number of
visual tokens entering each of the ``L`` decoder layers (the convention of
most comparison tables); a method that compresses before the LLM has
``B`` = the tokens it passes on. ``planned_budget`` computes it from the
transforms' static count rules, with no model, so each method's one knob
(keep fraction, lambda, merge ratio) is solved by bisection to hit a target
fraction of the uncompressed count. Each method's other free parameters (its
*setting*: FastV's layer, DART's pivots, LUVC's cascade positions, ...) come
from ``GRIDS``, scored on validation items by ``luvc bench tune``; the choices
are ``TUNED``, so every method in a comparison gets the same tuning courtesy.

The shipped ``<method>-<third|quarter|ninth>`` presets are solved for the
reference shape of Qwen2-VL-7B at 448 x 448 (28 decoder layers, 32 vision
blocks, 16 x 16 merged tokens) and regenerated with
``python -m luvc.schedules.budgets``; ``matched_schedule`` solves them for
any other depth or grid (the fidelity benchmark does so for its model).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from luvc.schedules.plan import Plan
from luvc.schedules.schema import Schedule

#: Target fractions of the uncompressed visual-token count.
BUDGETS = {"third": 1 / 3, "quarter": 1 / 4, "ninth": 1 / 9}
#: Reference shape the shipped presets are solved for: Qwen2-VL-7B, 448 x 448 image.
REFERENCE = dict(llm_depth=28, vision_depth=32, grid=(1, 16, 16))


def planned_counts(schedule: Schedule, llm_depth: int, vision_depth: int, grid: tuple[int, int, int]) -> list[int]:
    """Visual tokens entering each decoder layer for one image of unit ``grid``, by the static count rules."""
    return Plan.of_depths(schedule, vision_depth, llm_depth).layer_counts(grid)


def planned_budget(schedule: Schedule, llm_depth: int, vision_depth: int, grid: tuple[int, int, int]) -> float:
    """Mean visual tokens entering each decoder layer for one image of unit ``grid``."""
    counts = planned_counts(schedule, llm_depth, vision_depth, grid)
    return sum(counts) / llm_depth


def degenerate(schedule: Schedule, llm_depth: int, vision_depth: int, grid: tuple[int, int, int]) -> str | None:
    """Why ``schedule`` is not its method at this shape, or None: a schedule that leaves no visual
    token from some layer on (before the last layer, or at all where it does not claim to eliminate
    them) is "drop the image there", whatever its method, and two methods can become the same schedule."""
    counts = planned_counts(schedule, llm_depth, vision_depth, grid)
    last = llm_depth - 1 if schedule.eliminate_visual else llm_depth
    empty = [layer for layer, n in enumerate(counts[:last]) if n == 0]
    if empty:
        return f"no visual token from layer {empty[0]} of {llm_depth} on"
    return None


def _step(transform: str, at, **params) -> dict:
    return {"transform": transform, "at": at, "params": params}


#: LUVC as the paper describes it (docs/methods.md): OIM merging whole units along rows, then columns,
#: before the projector; SPU scoring each token's hidden vector by its low-frequency energy, in a cascade
#: whose visual-token count falls linearly to none before the last layer. ``q`` is the share of the
#: merged tokens the first SPU step keeps; each later step removes the same count.
LUVC_DEFAULT: dict[str, Any] = dict(merge_at=[0.75, 1.0], merge_ratio=0.125, merge_metric="keys",
                                    cascade=[0.0, 0.33, 0.67], shape="linear", q=0.75,
                                    band="low", axis="hidden", cutoff=0.25, normalize=True)
#: SPU's own defaults: a schedule spells out only the parameters that differ from them.
_SPU_DEFAULTS = dict(band="low", axis="hidden", cutoff=0.25, normalize=True)


#: The shipped LUVC presets, as changes to ``LUVC_DEFAULT`` (their YAML files are tested equal to these).
#: ``luvc-mild`` and ``luvc-aggressive`` are points on the paper's method's trade-off, not tuned;
#: ``luvc-detail`` departs from the paper in its scoring, merge and cascade (docs/methods.md).
LUVC_PRESETS: dict[str, dict[str, Any]] = {
    "luvc-default": {},
    "luvc-mild": {"cascade": [0.25, 0.5, 0.75]},
    "luvc-llm": {"merge_at": []},  # SPU alone: what models without a vision-stage adapter take
    "luvc-aggressive": {"merge_at": [0.125, 0.375], "merge_ratio": 0.1875, "cascade": [0.0, 0.2, 0.4], "q": 0.6},
    "luvc-detail": {"merge_at": [0.75], "cascade": [0.0, 0.3, 0.55], "shape": "geometric", "q": 0.6,
                    "band": "high", "axis": "grid"},
}


def cascade_keeps(q: float, stages: int, shape: str = "linear") -> list[float]:
    """Keep fractions (of the tokens arriving at each step) of a ``stages``-step SPU cascade whose
    first step keeps ``q`` of its input: ``linear`` removes the same count at each later step,
    ``geometric`` keeps ``q`` at every step."""
    if shape == "geometric":
        return [q] * stages
    return [q] + [(stages - i) / (stages - i + 1) for i in range(1, stages)]


def luvc_schedule(q: float | None = None, setting: dict[str, Any] | None = None) -> dict:
    """LUVC's schedule data: ``LUVC_DEFAULT`` with ``setting``'s values, the first step keeping ``q``."""
    s = {**LUVC_DEFAULT, **(setting or {})}
    q = s["q"] if q is None else q
    metric = {} if s["merge_metric"] == "keys" else {"metric": s["merge_metric"]}
    vision = [_step("orthogonal_merge", at, ratio=s["merge_ratio"], **metric) for at in s["merge_at"]]
    scoring = {k: s[k] for k, v in _SPU_DEFAULTS.items() if s[k] != v}
    if s["shape"] == "geometric":  # one step at every place
        llm = [_step("spectrum_prune", list(s["cascade"]), keep=round(q, 4), **scoring)]
    else:
        keeps = cascade_keeps(q, len(s["cascade"]), s["shape"])
        llm = [_step("spectrum_prune", at, keep=round(keep, 4), **scoring) for at, keep in zip(s["cascade"], keeps)]
    return {"eliminate_visual": True, "vision": vision, "llm": llm + [_step("spectrum_prune", -1, keep=0.0)]}


Template = Callable[[float, dict[str, Any], int], dict]

#: method -> (knob range, schedule data as a function of the knob, the method's setting and the vision depth).
#: The knob is solved for each budget; the setting is each method's other free parameters.
TEMPLATES: dict[str, tuple[tuple[float, float], Template]] = {
    "luvc": ((0.0, 1.0), lambda q, s, vd: luvc_schedule(q, s)),
    "luvc-detail": ((0.0, 1.0), lambda q, s, vd: luvc_schedule(q, {**LUVC_PRESETS["luvc-detail"], **s})),
    "fastv": ((0.0, 1.0), lambda q, s, vd: {"llm": [_step("fastv", s["layer"], keep=round(q, 4))]}),
    "pyramid_drop": ((0.0, 1.0), lambda q, s, vd: {"llm": [_step("pyramid_drop", s["layers"], keep=round(q, 4))]}),
    "dart": ((0.0, 1.0), lambda q, s, vd: {"llm": [_step("dart", s["layer"], keep=round(q, 4), pivots=s["pivots"])]}),
    "random_drop": ((0.0, 1.0), lambda q, s, vd: {"llm": [_step("random_drop", 0, keep=round(q, 4), seed=0)]}),
    "visionzip": ((0.0, 1.0), lambda q, s, vd: {"vision": [_step("visionzip", 1.0, keep=max(round(q, 4), 1e-4),
                                                                  contextual=s["contextual"])]}),
    "tome": ((0.0, 0.5), lambda q, s, vd: {"vision": [_step("tome", f"{math.floor(s['start'] * vd + 0.5)}:",
                                                             ratio=max(round(q, 4), 1e-4))]}),
}
#: Every method with matched presets, LUVC first.
METHODS = ("luvc", "luvc-detail", "fastv", "pyramid_drop", "dart", "visionzip", "tome", "random_drop", "uniform_pool")
#: Pooling cannot be solved continuously: the stride whose result is nearest each budget.
POOL_STRIDES = {"third": (3, 1), "quarter": (2, 2), "ninth": (3, 3)}

#: Each method's free parameters other than its budget knob, as fractions of depth where they are
#: places. Every point is scored on the validation split (``luvc bench tune``); the controls have none.
GRIDS: dict[str, list[dict[str, Any]]] = {
    "luvc": [{"cascade": c} for c in ([0.0, 0.25, 0.5], [0.0, 0.33, 0.67], [0.125, 0.375, 0.625])],
    "luvc-detail": [{"cascade": c} for c in ([0.0, 0.3, 0.55], [0.0, 0.25, 0.5], [0.125, 0.375, 0.625])],
    "fastv": [{"layer": at} for at in (0.0625, 0.25, 0.375)],
    "pyramid_drop": [{"layers": at} for at in ([0.0625, 0.25, 0.5], [0.125, 0.375, 0.625], [0.25, 0.5, 0.75])],
    "dart": [{"layer": at, "pivots": p} for at in (0.0625, 0.25, 0.375) for p in (2, 4, 8)],
    "visionzip": [{"contextual": c} for c in (0.05, 0.16, 0.3)],
    "tome": [{"start": s} for s in (0.0, 0.25, 0.5)],
    "random_drop": [{}],
    "uniform_pool": [{}],
}
#: The paper's (or official code's) setting of each method: where tuning found nothing better, this.
PAPER_SETTINGS: dict[str, dict[str, Any]] = {
    "luvc": {"cascade": LUVC_DEFAULT["cascade"]}, "luvc-detail": {"cascade": [0.0, 0.3, 0.55]},
    "fastv": {"layer": 0.0625},
    "pyramid_drop": {"layers": [0.0625, 0.25, 0.5]}, "dart": {"layer": 0.0625, "pivots": 8},
    "visionzip": {"contextual": 0.16}, "tome": {"start": 0.0}, "random_drop": {}, "uniform_pool": {},
}
#: The settings ``luvc bench tune`` chose on the validation split (500 items, the shipped fidelity model), per
#: budget (docs/benchmarks.md has every grid point's score); where no point of a method could run (infeasible
#: or degenerate at that model's depth), the paper's setting.
TUNED: dict[str, dict[str, dict[str, Any]]] = {
    "third": {
        "luvc": {"cascade": [0.125, 0.375, 0.625]},
        "luvc-detail": {"cascade": [0.0, 0.3, 0.55]},
        "fastv": {"layer": 0.25},
        "pyramid_drop": {"layers": [0.25, 0.5, 0.75]},
        "dart": {"layer": 0.0625, "pivots": 8},
        "visionzip": {"contextual": 0.16},
        "tome": {"start": 0.5},
        "random_drop": {},
        "uniform_pool": {},
    },
    "quarter": {
        "luvc": {"cascade": [0.125, 0.375, 0.625]},
        "luvc-detail": {"cascade": [0.0, 0.3, 0.55]},
        "fastv": {"layer": 0.0625},
        "pyramid_drop": {"layers": [0.0625, 0.25, 0.5]},
        "dart": {"layer": 0.0625, "pivots": 8},
        "visionzip": {"contextual": 0.05},
        "tome": {"start": 0.5},
        "random_drop": {},
        "uniform_pool": {},
    },
    "ninth": {
        "luvc": {"cascade": [0.0, 0.33, 0.67]},
        "luvc-detail": {"cascade": [0.0, 0.3, 0.55]},
        "fastv": PAPER_SETTINGS["fastv"],
        "pyramid_drop": PAPER_SETTINGS["pyramid_drop"],
        "dart": PAPER_SETTINGS["dart"],
        "visionzip": {"contextual": 0.05},
        "tome": {"start": 0.0},
        "random_drop": {},
        "uniform_pool": {},
    },
}


class InfeasibleBudget(ValueError):
    """No setting of a method's knob reaches a budget at this depth (e.g. FastV at layer 2 of an
    8-layer LLM: the two full layers alone exceed a ninth of the tokens per layer)."""


def solve_knob(planned_at: Callable[[float], float], target: float, lo: float, hi: float) -> float:
    """The knob in ``[lo, hi]`` whose planned budget ``planned_at(knob)`` is nearest ``target``, by bisection
    (the budget is monotone in the knob, either way)."""
    increasing = planned_at(hi) >= planned_at(lo)
    for _ in range(40):
        mid = (lo + hi) / 2
        if (planned_at(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda q: abs(planned_at(q) - target))


def matched_schedule(method: str, budget: str, llm_depth: int, vision_depth: int,
                     grid: tuple[int, int, int], setting: dict[str, Any] | None = None) -> Schedule:
    """``method``'s schedule whose planned budget is nearest ``BUDGETS[budget]`` of the uncompressed count,
    with ``setting`` (by default the tuned one, ``TUNED``) for its other free parameters.

    Raises ``InfeasibleBudget`` when even the nearest misses the target by more than a token and
    5%: a row labelled with a budget it does not have would compare methods unequally.
    """
    target = BUDGETS[budget] * math.prod(grid)
    name = f"{method}-{budget}"
    setting = TUNED[budget][method] if setting is None else setting
    if method == "uniform_pool":
        data = {"vision": [_step("uniform_pool", 1.0, stride=list(POOL_STRIDES[budget]))]}
        return _finish(name, method, budget, data)
    (lo, hi), template = TEMPLATES[method]

    def build(q: float) -> Schedule:
        return _finish(name, method, budget, template(q, setting, vision_depth))

    def planned(schedule: Schedule) -> float:
        return planned_budget(schedule, llm_depth, vision_depth, grid)

    best = build(solve_knob(lambda q: planned(build(q)), target, lo, hi))
    reached = planned(best)
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
