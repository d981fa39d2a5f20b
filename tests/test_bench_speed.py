"""The speed benchmark's harness (not its timings): FLOP counts, ratios from the same run, outputs."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import luvc
from luvc.bench import report
from luvc.bench.speed import RATIO_FIELDS, BenchInput, make_inputs, run_speed, to_json
from luvc.cli import app
from luvc.examples import build_model
from luvc.measure import count_flops


def hand_count_llm_prefill(config, tokens: int) -> int:
    """Matmul FLOPs of a Qwen2 decoder stack on ``tokens`` tokens, plus the LM head on one token."""
    t = config.text_config
    d, heads, kv, inter = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size
    hd = d // heads
    per_token = 2 * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * inter)
    attention = 2 * 2 * heads * tokens * tokens * hd  # QK^T and PV, as flop_counter counts SDPA
    return t.num_hidden_layers * (tokens * per_token + attention) + 2 * d * t.vocab_size


def test_llm_prefill_flops_match_a_hand_count():
    tiny_model = build_model("qwen2-vl-tiny")
    inputs = make_inputs(tiny_model, BenchInput(224))
    luvc.compile(tiny_model, "identity")
    encoded = {"image": tiny_model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])}
    text = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    counted = count_flops(lambda: tiny_model(**text, mm_encoder_outputs=encoded, logits_to_keep=1))
    assert counted == hand_count_llm_prefill(tiny_model.config, inputs["input_ids"].shape[1])


@pytest.fixture(scope="module")
def results():
    model = build_model()
    with torch.no_grad():
        return run_speed(model, ["luvc-default", "luvc-aggressive"], [BenchInput(224), BenchInput(224, frames=4)],
                         repeats=1, warmup=0, new_tokens=2)


def test_identity_is_measured_first_for_every_input(results):
    assert [(m.input, m.schedule) for m in results] == [
        (inp, s) for inp in ("image 224px", "video 4f 224px") for s in ("identity", "luvc-default", "luvc-aggressive")]


def test_ratios_divide_by_identity_of_the_same_input(results):
    for m in results:
        ref = next(r for r in results if r.schedule == "identity" and r.input == m.input)
        for name in RATIO_FIELDS:
            expected = getattr(m, name) / getattr(ref, name) if getattr(ref, name) else None
            if expected is not None:
                assert m.ratios[name] == pytest.approx(expected)
        if m.schedule == "identity":
            assert m.ratios["llm_flops"] == 1.0
        else:
            assert m.ratios["llm_flops"] < 0.7 and m.ratios["mean_llm_visual_tokens"] < 0.5


def test_json_report_has_every_figure_and_the_environment(results, tmp_path):
    data = to_json(results, {"torch": torch.__version__, "device": "cpu"}, "qwen2-vl-tiny", {"repeats": 1})
    paths = report.write(data, results, tmp_path, "test")
    loaded = json.loads((tmp_path / "speed.json").read_text())
    assert loaded["environment"]["torch"] == torch.__version__
    row = loaded["results"][1]
    for key in ("schedule", "input", "vision_flops", "llm_flops", "total_flops", "vision_s", "llm_prefill_s",
                "ttft_s", "decode_tokens_per_s", "peak_memory_bytes", "kv_cache_bytes", "ratios", "spread"):
        assert key in row
    assert set(row["ratios"]) == set(RATIO_FIELDS)
    assert "| image 224px | luvc-default |" in (tmp_path / "speed.md").read_text()
    assert {p.name for p in paths} == {"speed.json", "speed.md", "cost-vs-resolution.png", "speedup-vs-tokens.png"}


def test_kv_cache_shrinks_with_pruning(results):
    default = next(m for m in results if m.schedule == "luvc-default" and m.frames == 0)
    assert default.ratios["kv_cache_bytes"] < 0.8


def test_cli_bench_speed_writes_its_outputs(tmp_path):
    result = CliRunner().invoke(app, ["bench", "speed", "--model", "qwen2-vl-tiny", "--resolution", "112",
                                      "--repeats", "1", "--warmup", "0", "--new-tokens", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "speed.json").is_file() and (tmp_path / "speedup-vs-tokens.png").is_file()


def test_cli_bench_speed_rejects_an_unknown_schedule(tmp_path):
    result = CliRunner().invoke(app, ["bench", "speed", "--model", "qwen2-vl-tiny", "--schedule", "nope",
                                      "--resolution", "112", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "unknown preset 'nope'" in result.output


def test_cpu_attention_flops_are_counted():
    """torch's counter misses the CPU SDPA kernel; luvc registers it, so attention is never silently free."""
    q, v = torch.randn(2, 4, 64, 16), torch.randn(2, 4, 64, 8)
    flops = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, v))
    assert flops == 2 * 2 * 4 * 64 * 64 * (16 + 8)


@pytest.mark.parametrize("family", ["qwen2.5-vl-tiny", "llava-tiny"])
def test_every_family_runs_through_the_harness(family):
    model = build_model(family)
    with torch.no_grad():
        results = run_speed(model, ["luvc-default"], [BenchInput(224)], repeats=1, warmup=0, new_tokens=1)
    assert [m.schedule for m in results] == ["identity", "luvc-default"]
    assert results[1].ratios["llm_flops"] < 0.7 and results[1].ratios["vision_flops"] < 1.0
