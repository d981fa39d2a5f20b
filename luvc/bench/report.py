"""Benchmark reports: a rich table, markdown, JSON and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.table import Table  # noqa: E402

from luvc.bench.speed import Measurement  # noqa: E402

COLUMNS = (
    # (header, value, ratio field or None)
    ("LLM visual tokens", lambda m: f"{m.llm_visual_tokens} (mean {m.mean_llm_visual_tokens:.0f})",
     "mean_llm_visual_tokens"),
    ("vision GFLOPs", lambda m: f"{m.vision_flops / 1e9:.1f}", "vision_flops"),
    ("LLM prefill GFLOPs", lambda m: f"{m.llm_flops / 1e9:.1f}", "llm_flops"),
    ("total GFLOPs", lambda m: f"{m.total_flops / 1e9:.1f}", "total_flops"),
    ("vision s", lambda m: f"{m.vision_s:.3f}", "vision_s"),
    ("LLM prefill s", lambda m: f"{m.llm_prefill_s:.3f} [{m.spread['llm_prefill_s'][0]:.3f}-"
                                f"{m.spread['llm_prefill_s'][1]:.3f}]", "llm_prefill_s"),
    ("TTFT s", lambda m: f"{m.ttft_s:.3f}", "ttft_s"),
    ("decode tok/s", lambda m: f"{m.decode_tokens_per_s:.1f}", "decode_tokens_per_s"),
    ("peak MiB", lambda m: f"{m.peak_memory_bytes / 2**20:.0f}", "peak_memory_bytes"),
    ("KV MiB", lambda m: f"{m.kv_cache_bytes / 2**20:.1f}", "kv_cache_bytes"),
)


def _cell(m: Measurement, value, ratio: str | None) -> str:
    text = value(m)
    return text if ratio is None or m.schedule == "identity" else f"{text} (x{m.ratios[ratio]:.2f})"


def rich_table(results: list[Measurement], title: str) -> Table:
    """Every figure, with its ratio to identity in parentheses."""
    table = Table(title=title)
    for header in ("input", "schedule") + tuple(c[0] for c in COLUMNS):
        table.add_column(header, justify="left" if header in ("input", "schedule") else "right")
    for m in results:
        table.add_row(m.input, m.schedule, *(_cell(m, v, r) for _, v, r in COLUMNS))
    return table


def markdown(results: list[Measurement], title: str, env: dict) -> str:
    """The same table as markdown, with the environment below it."""
    headers = ["input", "schedule"] + [c[0] for c in COLUMNS]
    lines = [f"### {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for m in results:
        lines.append("| " + " | ".join([m.input, m.schedule] + [_cell(m, v, r) for _, v, r in COLUMNS]) + " |")
    lines += ["", "Ratios (x) are to `identity` on the same input, in the same run. Environment: "
              + ", ".join(f"{k} {v}" for k, v in env.items()) + "."]
    return "\n".join(lines) + "\n"


def plots(results: list[Measurement], out: Path) -> list[Path]:
    """Cost against resolution per schedule, and LLM speedup against visual tokens kept."""
    paths = []
    images = [m for m in results if not m.frames]
    if images:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name in dict.fromkeys(m.schedule for m in images):
            rows = sorted((m for m in images if m.schedule == name), key=lambda m: m.size)
            axes[0].plot([m.size for m in rows], [m.total_flops / 1e12 for m in rows], marker="o", label=name)
            axes[1].plot([m.size for m in rows], [m.ttft_s for m in rows], marker="o", label=name)
        axes[0].set(xlabel="image side (px)", ylabel="prefill TFLOPs (vision + LLM)", title="FLOPs vs resolution")
        axes[1].set(xlabel="image side (px)", ylabel="time to first token (s)", title="TTFT vs resolution")
        paths.append(_save(fig, axes, out / "cost-vs-resolution.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(m.schedule for m in results):
        rows = [m for m in results if m.schedule == name]
        ax.scatter([m.ratios["mean_llm_visual_tokens"] for m in rows], [1 / m.ratios["llm_prefill_s"] for m in rows],
                   label=name)
    ax.set(xlabel="mean visual tokens per LLM layer (fraction of identity)", ylabel="LLM prefill speedup (x)",
           title="Speedup vs visual tokens kept")
    paths.append(_save(fig, [ax], out / "speedup-vs-tokens.png"))
    return paths


def _save(fig, axes, path: Path) -> Path:
    """Grid and legend on every axis, then the figure written to ``path`` and closed."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(report: dict, results: list[Measurement], out: Path, title: str) -> list[Path]:
    """``speed.json``, ``speed.md`` and the plots under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(report, indent=2))
    (out / "speed.md").write_text(markdown(results, title, report["environment"]))
    return [out / "speed.json", out / "speed.md", *plots(results, out)]
