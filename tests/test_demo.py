"""The demo's numbers are real measurements of the same run, and the CLI runs it."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from luvc import demo
from luvc.cli import app
from luvc.demo import demo_inputs, run_demo
from luvc.examples import model_config, sample_image, vlm_inputs


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


def test_demo_inputs_come_from_the_qwen2_vl_processor():
    """With torchvision, the real processor and its chat template give exactly ``vlm_inputs``' ids and grid,
    and its pixels to resampling tolerance."""
    pytest.importorskip("torchvision", reason="the Qwen2-VL processor needs torchvision")
    config, image, out = model_config("qwen2-vl-tiny"), sample_image("coffee"), io.StringIO()
    inputs = demo_inputs(config, image, [10, 11, 12], 224 * 224, Console(file=out))
    expected = vlm_inputs([[image]], prompts=[[10, 11, 12]], pixels=224 * 224, config=config)
    assert out.getvalue() == ""
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(inputs[key], expected[key]), key
    assert (inputs["pixel_values"] - expected["pixel_values"]).abs().mean() < 2e-3


def test_demo_inputs_fall_back_to_vlm_inputs(monkeypatch):
    """Where the processor cannot be built, the demo says why in one line and uses ``vlm_inputs``."""
    def missing(config, pixels):
        raise ImportError("no torchvision")

    monkeypatch.setattr(demo, "qwen2_vl_processor", missing)
    config, image, out = model_config("qwen2-vl-tiny"), sample_image("astronaut"), io.StringIO()
    inputs = demo.demo_inputs(config, image, [10, 11], 112 * 112, Console(file=out, width=200))
    assert out.getvalue().count("\n") == 1 and "needs torchvision (no torchvision)" in out.getvalue()
    assert torch.equal(inputs["input_ids"], vlm_inputs([[image]], prompts=[[10, 11]], pixels=112 * 112,
                                                       config=config)["input_ids"])
