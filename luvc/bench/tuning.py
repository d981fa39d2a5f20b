"""`luvc bench tune` and `luvc bench ablation`: settings chosen on validation items, reported on held-out ones.

A comparison of compression methods is fair only when each gets the same
tuning courtesy. ``tune`` scores every point of each method's grid
(``luvc.schedules.budgets.GRIDS``: FastV's layer, PyramidDrop's stages, DART's
layer and pivots, VisionZip's contextual share, ToMe's start block, LUVC's
cascade), each solved for the same matched budget, on the validation split;
the best point per method and budget is then scored on the held-out split.
A point that degenerates (no visual token from some layer on) is named as
such and never chosen. ``ablation`` changes one factor of ``luvc-default``
at a time and scores each variant on both splits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from luvc.bench.fidelity import FidelityResult, run_fidelity
from luvc.fidelity.tasks import Item
from luvc.schedules import Schedule, load_schedule
from luvc.schedules.budgets import (
    BUDGETS,
    GRIDS,
    PAPER_SETTINGS,
    InfeasibleBudget,
    degenerate,
    luvc_schedule,
    matched_schedule,
    planned_budget,
    solve_knob,
)


@dataclass
class Candidate:
    """One grid point of one method at one budget, and what became of it."""

    method: str
    budget: str
    setting: dict[str, Any]
    schedule: Schedule | None = None
    excluded: str | None = None  # infeasible or degenerate, and why
    val: FidelityResult | None = None
    test: FidelityResult | None = None


@dataclass
class Shape:
    """The model shape schedules are solved for."""

    llm_depth: int
    vision_depth: int
    grid: tuple[int, int, int]

    def solve(self, method: str, budget: str, setting: dict[str, Any]) -> Schedule:
        return matched_schedule(method, budget, self.llm_depth, self.vision_depth, self.grid, setting)

    def degenerate(self, schedule: Schedule) -> str | None:
        return degenerate(schedule, self.llm_depth, self.vision_depth, self.grid)

    def planned(self, schedule: Schedule) -> float:
        return planned_budget(schedule, self.llm_depth, self.vision_depth, self.grid)


def candidates(shape: Shape, methods: tuple[str, ...], budgets: tuple[str, ...]) -> list[Candidate]:
    """Every grid point of ``methods`` at ``budgets``, solved for ``shape``; infeasible and degenerate
    points are kept, marked with the reason, so reports can name them."""
    out = []
    for budget in budgets:
        for method in methods:
            for setting in GRIDS[method]:
                c = Candidate(method, budget, setting)
                try:
                    c.schedule = shape.solve(method, budget, setting)
                    c.excluded = shape.degenerate(c.schedule)
                except InfeasibleBudget as exc:
                    c.excluded = f"infeasible: {str(exc).split(': ', 1)[1]}"
                out.append(c)
    return out


def _score(model, tokenizer, items: list[Item], schedules: list[Schedule], batch_size: int,
           advance: Callable[[str], None]) -> tuple[FidelityResult, list[FidelityResult]]:
    """identity's result (scored first, the reference) and the results for ``schedules``."""
    named = [("identity", "-", load_schedule("identity"))] + [("-", "-", s) for s in schedules]
    reference, *results = run_fidelity(model, tokenizer, items, named, batch_size, advance)
    return reference, results


def chosen(cands: list[Candidate], method: str, budget: str) -> Candidate | None:
    """The best validation accuracy of a method at a budget; ties go to the paper's setting, then to the
    grid's order."""
    pool = [c for c in cands if c.method == method and c.budget == budget and c.excluded is None and c.val]
    if not pool:
        return None
    paper = PAPER_SETTINGS.get(method)
    return max(pool, key=lambda c: (round(c.val.accuracy["overall"], 6), c.setting == paper,
                                    -pool.index(c)))


def tune(model, tokenizer, val_items: list[Item], test_items: list[Item], shape: Shape,
         methods: tuple[str, ...], budgets: tuple[str, ...] = tuple(BUDGETS), batch_size: int = 50,
         advance: Callable[[str], None] = lambda name: None) -> tuple[list[Candidate], dict[str, float]]:
    """Score every grid point on ``val_items``, then each method's choice per budget on ``test_items``.

    Returns every candidate and identity's accuracy on each split.
    """
    cands = candidates(shape, methods, budgets)
    runnable = [c for c in cands if c.excluded is None]
    val_ref, results = _score(model, tokenizer, val_items, [c.schedule for c in runnable], batch_size, advance)
    for c, result in zip(runnable, results):
        c.val = result
    best = [b for b in (chosen(cands, m, budget) for budget in budgets for m in methods) if b is not None]
    test_ref, results = _score(model, tokenizer, test_items, [c.schedule for c in best], batch_size, advance)
    for c, result in zip(best, results):
        c.test = result
    return cands, {"val": val_ref.accuracy["overall"], "test": test_ref.accuracy["overall"]}


def _scores(result: FidelityResult | None) -> dict | None:
    return None if result is None else {"accuracy": result.accuracy, "llm_flops_ratio": result.llm_flops_ratio,
                                        "mean_visual_tokens": result.mean_visual_tokens}


def to_json(cands: list[Candidate]) -> list[dict]:
    """Every candidate: its setting, schedule, exclusion and scores."""
    return [{"method": c.method, "budget": c.budget, "setting": c.setting, "excluded": c.excluded,
             "schedule": c.schedule.model_dump(mode="json") if c.schedule else None,
             "val": _scores(c.val), "test": _scores(c.test)} for c in cands]


def ablation_to_json(rows: list[Variant]) -> list[dict]:
    """Every ablation row: its factor, level, schedule and scores per split."""
    return [{"factor": r.factor, "level": r.level, "schedule": r.schedule.model_dump(mode="json"),
             **{split: _scores(result) for split, result in r.scores.items()}} for r in rows]


@dataclass
class Variant:
    """One row of the ablation: a factor, its level, and the schedule with only that changed."""

    factor: str
    level: str
    schedule: Schedule
    scores: dict[str, FidelityResult] = field(default_factory=dict)  # split -> result


def ablation_variants(shape: Shape) -> list[Variant]:
    """``luvc-default`` and one-factor changes of it: SPU band x axis, OIM amount x placement (the default
    merges late), the final all-drop the paper requires, and the cascade's shape at the default's budget
    (geometric keep solved to match the linear cascade's). The band x axis cell ``high x grid`` changes two
    factors; read it against the two one-factor cells beside it."""
    def variant(factor: str, level: str, **setting: Any) -> Variant:
        data = luvc_schedule(None, setting)
        return Variant(factor, level, Schedule.model_validate({"name": f"{factor}={level}", **data}))

    rows = [variant("none", "luvc-default (the paper's LUVC)")]
    for band, axis in (("high", "hidden"), ("low", "grid"), ("high", "grid")):
        rows.append(variant("spu band x axis", f"{band} x {axis}", band=band, axis=axis))
    rows.append(variant("oim amount", "0%", merge_at=[]))
    for label, ratio in (("~12%", 0.0625), ("~35%", 0.1875)):
        rows.append(variant("oim amount", label, merge_ratio=ratio))
    rows.append(variant("oim placement", "early (1/4, 1/2 of the blocks)", merge_at=[0.25, 0.5]))
    rows.append(variant("oim placement", "middle (1/2, 3/4 of the blocks)", merge_at=[0.5, 0.75]))
    for label, ratio in (("~12%", 0.0625), ("~35%", 0.1875)):
        rows.append(variant("oim amount, placed early", label, merge_at=[0.25, 0.5], merge_ratio=ratio))
    kept_to_the_end = luvc_schedule(None, {})
    kept_to_the_end["llm"] = kept_to_the_end["llm"][:-1]
    kept_to_the_end["eliminate_visual"] = False
    rows.append(Variant("final all-drop", "without (the last layer sees 1/4 of the merged tokens)",
                        Schedule.model_validate({"name": "final all-drop=without", **kept_to_the_end})))
    keep = round(solve_knob(lambda q: shape.planned(Schedule.model_validate(
        {"name": "x", **luvc_schedule(q, {"shape": "geometric"})})), shape.planned(rows[0].schedule), 0.0, 1.0), 4)
    rows.append(Variant("cascade shape", f"geometric (keep {keep} at each step)", Schedule.model_validate(
        {"name": "cascade shape=geometric", **luvc_schedule(keep, {"shape": "geometric"})})))
    return rows


def ablate(model, tokenizer, splits: dict[str, list[Item]], shape: Shape, batch_size: int = 50,
           advance: Callable[[str], None] = lambda name: None) -> tuple[list[Variant], dict[str, float]]:
    """Score every ablation variant on every split; also return identity's accuracy on each split."""
    rows = ablation_variants(shape)
    identity = {}
    for split, items in splits.items():
        reference, results = _score(model, tokenizer, items, [r.schedule for r in rows], batch_size, advance)
        identity[split] = reference.accuracy["overall"]
        for row, result in zip(rows, results):
            row.scores[split] = result
    return rows, identity


def _pct(result: FidelityResult | None, key: str = "overall") -> str:
    digits = 1 if key == "overall" else 0
    return "-" if result is None else f"{100 * result.accuracy[key]:.{digits}f}"


def tune_markdown(cands: list[Candidate], identity: dict[str, float]) -> str:
    """Every grid point with its validation accuracy, the chosen one per method and budget in bold with its
    held-out accuracy and retention; excluded points with the reason."""
    lines = ["| budget | method | setting | planned budget | val accuracy | chosen | held-out accuracy | "
             "held-out kept | LLM FLOPs |", "|---|---|---|---|---|---|---|---|---|"]
    for c in cands:
        setting = ", ".join(f"{k}={v}" for k, v in c.setting.items()) or "(control: no free parameter)"
        if c.excluded:
            lines.append(f"| {c.budget} | {c.method} | {setting} | - | {c.excluded} | | | | |")
            continue
        won = c.test is not None
        kept = f"{100 * c.test.accuracy['overall'] / identity['test']:.1f}%" if won else ""
        flops = f"x{c.test.llm_flops_ratio:.2f}" if won else f"x{c.val.llm_flops_ratio:.2f}"
        lines.append(f"| {c.budget} | {c.method} | {setting} | {c.val.mean_visual_tokens:.1f} | {_pct(c.val)} | "
                     f"{'**yes**' if won else ''} | {_pct(c.test) if won else ''} | {kept} | {flops} |")
    return "\n".join(lines) + "\n"


def ablation_markdown(rows: list[Variant], identity: dict[str, float]) -> str:
    """One row per variant: cost, validation accuracy and held-out accuracy with per-task scores."""
    test = next(iter(r.scores.get("test") for r in rows if r.scores.get("test")), None)
    tasks = [t for t in test.accuracy if t != "overall"] if test else []
    header = "| factor | level | visual tokens / layer | LLM FLOPs | val accuracy | held-out accuracy | held-out kept |"
    lines = [header + "".join(f" {t} |" for t in tasks), "|---|---|---|---|---|---|---|" + "---|" * len(tasks)]
    for r in rows:
        val, held = r.scores.get("val"), r.scores.get("test")
        ref = held or val
        kept = f"{100 * held.accuracy['overall'] / identity['test']:.1f}%" if held else "-"
        lines.append(f"| {r.factor} | {r.level} | {ref.mean_visual_tokens:.1f} | x{ref.llm_flops_ratio:.2f} | "
                     f"{_pct(val)} | {_pct(held)} | {kept} | "
                     + " | ".join(_pct(held, t) for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def chosen_settings(cands: list[Candidate]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{budget: {method: setting}}`` of the choices, for ``luvc.schedules.budgets.TUNED``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for c in cands:
        if c.test is not None:
            out.setdefault(c.budget, {})[c.method] = c.setting
    return out


