"""The core install (no ``bench`` extra) compiles and runs a model; the demo and benches say what they need."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

import luvc.cli

# Runs in a fresh interpreter where the bench extra's modules cannot be imported.
CORE_ONLY = textwrap.dedent("""
    import sys
    for name in ("matplotlib", "skimage", "PIL"):
        sys.modules[name] = None  # import fails as if not installed
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    import luvc, luvc.cli

    config = Qwen2VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=600,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4}),
        vision_config=dict(depth=4, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_size=64),
        image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    h = w = 16  # patches; 2x2 merged into 64 image tokens
    ids = torch.tensor([[10, 502] + [500] * (h * w // 4) + [503, 11]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  pixel_values=torch.randn(h * w, 3 * 2 * 14 * 14), image_grid_thw=torch.tensor([[1, h, w]]))
    luvc.compile(model, "luvc-default")
    with torch.no_grad():
        model(**inputs)
    rows = [row for row in luvc.ledger(model) if row.site == "llm"]
    assert rows[-1].visual == [0], rows[-1]
    print("ok")
""")


def test_core_install_compiles_without_the_bench_extra():
    result = subprocess.run([sys.executable, "-c", CORE_ONLY], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_demo_and_bench_name_the_missing_extra(monkeypatch):
    monkeypatch.setattr(luvc.cli, "BENCH_MODULES", ("matplotlib", "luvc_no_such_module"))
    runner = CliRunner()
    for args in (["demo"], ["bench", "speed"]):
        result = runner.invoke(luvc.cli.app, args)
        assert result.exit_code == 1
        assert "needs luvc_no_such_module" in result.output and "pip install 'luvc[bench]'" in result.output


def test_the_wheel_ships_the_fidelity_weights_but_not_their_training_log():
    import fnmatch
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    root = Path(__file__).parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = patterns["luvc.fidelity"]
    folder = root / "luvc" / "fidelity"
    files = [p.relative_to(folder).as_posix() for p in (folder / "checkpoint").iterdir()]
    included = {f for f in files if any(fnmatch.fnmatch(f, pattern) for pattern in shipped)}
    assert "checkpoint/model.safetensors" in included and "checkpoint/config.json" in included
    assert "checkpoint/training_log.jsonl" not in included
