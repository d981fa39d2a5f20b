"""Can the fidelity model's vision tower learn what the answers need? A five-minute check before a full run.

    python -m luvc.fidelity.probe --steps 300 --tasks text --read merger

trains only the vision tower and a linear probe on the items' region maps (no
LLM) and prints, every 100 steps, the probe's accuracy per group of regions on
validation patches. ``--read`` chooses where the probe reads: ``embedding``
(the patch embedding), ``hidden`` (the last block's output), or ``merger``
(the merger's output, RMS-normalised as the LLM's first norm sees it). A
content design whose answer-carrying groups (digit, bar, count, shape,
relation) stay near chance at ``merger`` will not train end to end within the
CPU budget, whatever the LLM does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import typer

from luvc.fidelity.model import PATCH, load_model, new_model, patchify
from luvc.fidelity.tasks import PHOTO, REGION_GROUPS, REGIONS, SIZE, TASKS, items, region_group
from luvc.fidelity.train import patch_regions, region_class_weights

READS = ("embedding", "hidden", "merger")


def probe_accuracy(steps: int = 300, tasks: tuple[str, ...] = TASKS, read: str = "merger", batch: int = 12,
                   lr: float = 2e-3, val_count: int = 100, report_every: int = 100, seed: int = 0,
                   report=print, checkpoint: Path | None = None) -> dict[str, float | None]:
    """Train the tower and probe for ``steps``; return (and ``report`` every ``report_every`` steps) the
    probe's accuracy per region group on ``val_count`` validation images (None: no patch of that group).

    With ``checkpoint``, the trained model's tower is read frozen and only the
    probe trains: what its visual tokens already say, linearly.
    """
    if read not in READS:
        raise ValueError(f"unknown read point {read!r}; one of {', '.join(READS)}")
    model = new_model(seed) if checkpoint is None else load_model(checkpoint)
    visual = model.model.visual
    visual.requires_grad_(checkpoint is None)
    probe = torch.nn.Linear(model.config.vision_config.hidden_size, len(REGIONS))
    trained = list(probe.parameters()) + (list(visual.parameters()) if checkpoint is None else [])
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.05)
    weights = region_class_weights()
    groups = np.array([REGION_GROUPS.index(region_group(name)) for name in REGIONS])
    side = SIZE // PATCH

    def features(chunk) -> torch.Tensor:
        pixels = torch.cat([patchify(item.image) for item in chunk])
        if read == "embedding":
            return visual.patch_embed(pixels)
        out = visual(pixels, grid_thw=torch.tensor([[1, side, side]] * len(chunk)))
        if read == "hidden":
            return out.last_hidden_state
        merged = out.pooler_output
        return merged * torch.rsqrt(merged.pow(2).mean(-1, keepdim=True) + 1e-6)

    val = items("val", val_count, tasks)
    truth = np.concatenate([patch_regions(item) for item in val])
    accuracy: dict[str, float | None] = {}
    for step in range(steps):
        chunk = items("train", batch, tasks, start=step * batch, photo=PHOTO * min(1.0, step / 100))
        target = torch.from_numpy(np.concatenate([patch_regions(item) for item in chunk]))
        with torch.enable_grad():
            loss = torch.nn.functional.cross_entropy(probe(features(chunk)), target, weight=weights)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % report_every == 0 or step + 1 == steps:
            with torch.no_grad():
                predicted = probe(features(val)).argmax(-1).numpy()
            accuracy = {}
            for index, group in enumerate(REGION_GROUPS):
                mask = groups[truth] == index
                accuracy[group] = round(float((predicted[mask] == truth[mask]).mean()), 3) if mask.any() else None
            report(json.dumps({"step": step + 1, "loss": round(loss.item(), 3), "accuracy": accuracy}))
    return accuracy


def main(steps: int = typer.Option(300, help="training steps"),
         tasks: str = typer.Option(",".join(TASKS), help="comma-separated tasks"),
         read: str = typer.Option("merger", help=f"where the probe reads: {', '.join(READS)}"),
         lr: float = typer.Option(2e-3, help="learning rate (AdamW)"),
         threads: int = typer.Option(1, help="CPU threads"),
         checkpoint: Path | None = typer.Option(None, help="read this trained model's tower, frozen (only the "
                                                "probe trains)")) -> None:
    """Train the vision tower and a linear probe on region maps; print per-group validation accuracy."""
    torch.set_num_threads(threads)
    chosen = tuple(t.strip() for t in tasks.split(","))
    unknown = sorted(set(chosen) - set(TASKS))
    if unknown:
        raise typer.BadParameter(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}",
                                 param_hint="--tasks")
    if read not in READS:
        raise typer.BadParameter(f"one of {', '.join(READS)}", param_hint="--read")
    probe_accuracy(steps, chosen, read, lr=lr, checkpoint=checkpoint)


if __name__ == "__main__":
    typer.run(main)
