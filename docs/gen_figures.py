"""Regenerate the docs' figures: `python docs/gen_figures.py` (planned counts, no weights needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import luvc
from luvc.examples import build_model
from luvc.plots import tokens_per_block


def main(out: Path = Path(__file__).parent / "img") -> list[Path]:
    model = build_model("qwen2-vl-demo", device="meta")
    series = {}
    for name in ("identity", "luvc-mild", "luvc-default", "luvc-aggressive", "luvc-detail"):
        _, adapter, graph = luvc.lower(model, name)
        grid, unit = adapter.input_grid(model, 448, 448)
        series[name] = graph.luvc_plan.counts([grid], unit)
    return [tokens_per_block(series, out / "tokens-per-layer.png",
                             "Visual tokens per block: qwen2-vl-demo, one 448x448 image")]


if __name__ == "__main__":
    print(*main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "img"), sep="\n")
