"""Figures: visual tokens per block, as planned for one input."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def tokens_per_block(series: dict[str, list[tuple[str, int]]], path: Path, title: str) -> Path:
    """Step plot of visual tokens entering each block, one line per schedule.

    Args:
        series: schedule name -> ``Plan.counts`` rows (node, tokens) of the same model.
        path: where to write the PNG.
        title: figure title.
    """
    fig, (vision_ax, llm_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, rows in series.items():
        for ax, prefix in ((vision_ax, "vision.blocks."), (llm_ax, "llm.layers.")):
            points = [(int(node.rsplit(".", 1)[1]), n) for node, n in rows if node.startswith(prefix)]
            ax.step([i for i, _ in points], [n for _, n in points], where="post", label=name, marker=".")
    vision_ax.set(title="vision encoder (patch tokens)", xlabel="block", ylabel="visual tokens entering")
    llm_ax.set(title="language model (visual tokens)", xlabel="decoder layer")
    for ax in (vision_ax, llm_ax):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    llm_ax.legend(loc="upper right", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
