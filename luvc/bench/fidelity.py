"""`luvc bench fidelity`: accuracy kept by each schedule on held-out questions, at its cost.

Every schedule runs on the same items with the same model (compiled, then
uncompiled): greedy answers are scored by exact match, per task and overall;
``retention`` is accuracy divided by ``identity``'s, ``agreement`` the share of
answers equal to ``identity``'s; the cost is the LLM prefill FLOPs ratio
(``torch.utils.flop_counter``) and the measured mean visual tokens per decoder
layer. By default the model is the project's own trained Qwen2-VL and the
items the held-out split of ``luvc.fidelity.tasks``; a user's checkpoint in
the same format and a folder of images with ``items.jsonl`` run the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import luvc
from luvc.fidelity.model import encode
from luvc.fidelity.tasks import Item
from luvc.measure import count_flops
from luvc.schedules import Schedule, load_schedule
from luvc.schedules.budgets import BUDGETS, METHODS, InfeasibleBudget, matched_schedule


@dataclass
class FidelityResult:
    """One schedule's answers, scored."""

    schedule: str
    method: str
    budget: str
    accuracy: dict[str, float]  # per task, and "overall"
    retention: float | None = 1.0  # None where identity scores 0
    agreement: float = 1.0
    llm_flops: int = 0
    llm_flops_ratio: float = 1.0
    mean_visual_tokens: float = 0.0  # per decoder layer, measured from the ledger
    answers: list[str] = field(default_factory=list, repr=False)


def load_items(dataset: Path | None, count: int, split: str = "test") -> list[Item]:
    """The first ``count`` items of the task suite's ``split`` (held-out ``test`` by default;
    ``val`` for tuning a schedule), or the items of a dataset folder.

    A folder holds ``items.jsonl``, one ``{"image": "file.png", "question": ...,
    "answer": ..., "task": ...}`` per line (``task`` optional), with the images
    beside it; each image is resized to the nearest multiple of 14 px.
    """
    if dataset is None:
        from luvc.fidelity.tasks import items

        return items(split, count)
    from PIL import Image

    index = dataset / "items.jsonl"
    if not index.exists():
        raise FileNotFoundError(f"{dataset} has no items.jsonl; each line: "
                                '{"image": "file.png", "question": "...", "answer": "...", "task": "..."}')
    loaded = []
    for number, line in enumerate(index.read_text().splitlines()[:count], start=1):
        try:
            row = json.loads(line)
            image = Image.open(dataset / row["image"]).convert("RGB")
        except (json.JSONDecodeError, KeyError, OSError) as exc:
            raise ValueError(f"{index}:{number}: {exc}; expected keys image, question, answer") from None
        w, h = (max(14, round(s / 14) * 14) for s in image.size)
        pixels = np.asarray(image.resize((w, h)))
        loaded.append(Item(row.get("task", "all"), pixels, row["question"], row["answer"], row["image"]))
    return loaded


def default_schedules(model, image_size: tuple[int, int],
                      infeasible: list[str] | None = None) -> list[tuple[str, str, Schedule]]:
    """``(method, budget, schedule)``: identity, luvc-default, luvc-detail, then every method at every matched budget,
    solved for this model's depths and image grid; a method that cannot reach a budget at these depths
    is left out, and why is appended to ``infeasible``."""
    infeasible = [] if infeasible is None else infeasible
    from luvc.models import find_adapter

    adapter = find_adapter(model)
    vision_depth = sum(1 for name, _ in adapter.stack_nodes(model) if name.startswith("vision.blocks."))
    grid, _ = adapter.input_grid(model, *image_size)
    depth = model.config.text_config.num_hidden_layers
    out = [("identity", "-", load_schedule("identity")), ("luvc", "default", load_schedule("luvc-default")),
           ("luvc", "detail", load_schedule("luvc-detail"))]
    for budget in BUDGETS:
        for method in METHODS:
            try:
                out.append((method, budget, matched_schedule(method, budget, depth, vision_depth, grid)))
            except InfeasibleBudget as exc:
                infeasible.append(str(exc))
    return out


def method_and_budget(name: str) -> tuple[str, str]:
    """``("fastv", "quarter")`` for ``fastv-quarter``; ``(name, "-")`` for a schedule of no matched budget."""
    method, _, budget = name.rpartition("-")
    if method and (budget in BUDGETS or budget in ("default", "detail")):
        return method, budget
    return name, "-"


def answer(model, tokenizer, batch: list[Item]) -> list[str]:
    """Greedy answers (up to 3 tokens, cut at end-of-sequence)."""
    inputs = encode(batch, tokenizer, model.config)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)[:, inputs["input_ids"].shape[1]:]
    texts = []
    for row in out.tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def prefill_cost(model, tokenizer, batch: list[Item]) -> tuple[int, float]:
    """LLM prefill FLOPs of ``batch`` (vision encoded beforehand) and mean visual tokens per decoder layer."""
    inputs = encode(batch, tokenizer, model.config)
    text_kw = {k: inputs[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    encoded = {"image": model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])}
    flops = count_flops(lambda: model(**text_kw, mm_encoder_outputs=encoded, logits_to_keep=1))
    layers = [r for r in luvc.ledger(model) if r.site == "llm" and r.node.startswith("llm.layers.")]
    mean = float(np.mean([sum(r.visual) / len(batch) for r in layers]))
    return flops, mean


def run_fidelity(model, tokenizer, items: list[Item], schedules: list[tuple[str, str, Schedule]],
                 batch_size: int = 50, advance: Callable[[str], None] = lambda name: None) -> list[FidelityResult]:
    """Score every schedule on ``items``; ``identity`` must come first (it is the reference)."""
    if schedules[0][2].name != "identity":
        raise ValueError("the first schedule must be identity: retention and agreement are relative to it")
    results: list[FidelityResult] = []
    probe = items[:min(len(items), 8)]
    with torch.inference_mode():
        for method, budget, schedule in schedules:
            luvc.compile(model, schedule)
            try:
                flops, mean_tokens = prefill_cost(model, tokenizer, probe)
                answers: list[str] = []
                for start in range(0, len(items), batch_size):
                    answers += answer(model, tokenizer, items[start:start + batch_size])
                    advance(schedule.name)
            finally:
                luvc.uncompile(model)
            results.append(FidelityResult(schedule.name, method, budget, _accuracy(items, answers),
                                          llm_flops=flops, mean_visual_tokens=mean_tokens, answers=answers))
    reference = results[0]
    for r in results:
        ref = reference.accuracy["overall"]
        r.retention = r.accuracy["overall"] / ref if ref else None
        r.agreement = float(np.mean([a == b for a, b in zip(r.answers, reference.answers)]))
        r.llm_flops_ratio = r.llm_flops / reference.llm_flops
    return results


def _accuracy(items: list[Item], answers: list[str]) -> dict[str, float]:
    hits: dict[str, list[bool]] = {}
    for item, given in zip(items, answers):
        hits.setdefault(item.task, []).append(given == item.answer)
    out = {task: float(np.mean(h)) for task, h in hits.items()}
    out["overall"] = float(np.mean([given == item.answer for item, given in zip(items, answers)]))
    return out


def to_json(results: list[FidelityResult], settings: dict) -> dict:
    """The report: settings, then every schedule's scores and its answer to every item, in item order
    (so any other agreement or per-item analysis needs no rerun)."""
    return {"settings": settings, "results": [asdict(r) for r in results]}


def markdown(results: list[FidelityResult], title: str, infeasible: tuple[str, ...] = ()) -> str:
    """The full table, then per budget how LUVC ranks among the methods, then what could not run."""
    tasks = [t for t in results[0].accuracy if t != "overall"]
    headers = ["schedule", "visual tokens / layer", "LLM FLOPs", "accuracy", "retention", "agreement", *tasks]
    lines = [f"### {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in results:
        retention = "n/a" if r.retention is None else f"{100 * r.retention:.1f}%"
        lines.append("| " + " | ".join([
            f"`{r.schedule}`", f"{r.mean_visual_tokens:.1f}", f"x{r.llm_flops_ratio:.2f}",
            f"{100 * r.accuracy['overall']:.1f}%", retention, f"{100 * r.agreement:.1f}%",
            *(f"{100 * r.accuracy[t]:.0f}" for t in tasks)]) + " |")
    lines += ["", "At each matched budget, methods by accuracy (best first):", ""]
    for budget in BUDGETS:
        ranked = sorted((r for r in results if r.budget == budget), key=lambda r: -r.accuracy["overall"])
        if ranked:
            lines.append(f"* **{budget}**: " + ", ".join(
                f"{'**' if r.method.startswith('luvc') else ''}{r.method} {100 * r.accuracy['overall']:.1f}%"
                f"{'**' if r.method.startswith('luvc') else ''}" for r in ranked))
    if infeasible:
        lines += ["", "Not scored (no setting reaches the budget at this model's depth):", ""]
        lines += [f"* {reason}" for reason in infeasible]
    return "\n".join(lines) + "\n"


def pareto_plot(results: list[FidelityResult], path: Path, title: str) -> Path:
    """Accuracy against LLM prefill FLOPs ratio, one colour per method, the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    markers = {"third": "o", "quarter": "s", "ninth": "^", "default": "*", "detail": "P", "-": "D"}
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(("identity",) + METHODS)}
    for r in results:
        ax.scatter(r.llm_flops_ratio, 100 * r.accuracy["overall"], color=colors.get(r.method, "k"),
                   marker=markers.get(r.budget, "o"), s=90 if r.budget == "default" else 45,
                   label=r.method if r.budget in ("third", "-") or r.method == "luvc" and r.budget == "default"
                   else None, edgecolors="k", linewidths=0.4)
    front, best = [], -1.0
    for r in sorted(results, key=lambda r: (r.llm_flops_ratio, -r.accuracy["overall"])):
        if r.accuracy["overall"] > best:
            front.append(r)
            best = r.accuracy["overall"]
    ax.plot([r.llm_flops_ratio for r in front], [100 * r.accuracy["overall"] for r in front], "k--", lw=0.8,
            label="Pareto front")
    ax.set(xlabel="LLM prefill FLOPs (x identity)", ylabel="held-out accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize="small", loc="lower right")
    fig.text(0.01, 0.01, "o third  s quarter  ^ ninth  * luvc-default  P luvc-detail", fontsize="x-small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
