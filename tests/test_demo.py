"""The demo's numbers are real measurements of the same run, and the CLI runs it."""

from __future__ import annotations

import io

from rich.console import Console
from typer.testing import CliRunner

from luvc.cli import app
from luvc.demo import run_demo


def test_demo_reports_fewer_tokens_and_flops():
    out = io.StringIO()
    result = run_demo("qwen2-vl-tiny", pixels=224 * 224, new_tokens=2, repeats=1, console=Console(file=out, width=200))
    rows = dict((node, (n, m)) for node, n, m in result.rows)
    assert rows["llm.layers.0"][0] == 64 and rows["llm.norm"] == (64, 0)
    assert result.after.llm_flops < 0.6 * result.before.llm_flops
    assert result.after.vision_flops < result.before.vision_flops
    text = out.getvalue()
    assert "Visual tokens entering each block" in text and "LLM prefill GFLOPs" in text


def test_cli_demo_runs():
    runner = CliRunner()
    result = runner.invoke(app, ["demo", "--model", "qwen2-vl-tiny", "--size", "112", "--new-tokens", "1",
                                 "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "total prefill GFLOPs" in result.output
