"""`luvc bench fidelity` end to end: scoring, ratios to identity, reports, user datasets, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from luvc.bench.fidelity import load_items, method_and_budget, run_fidelity
from luvc.cli import app
from luvc.fidelity.model import build_tokenizer, load_model, load_tokenizer, new_model
from luvc.schedules import load_schedule


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint in the fidelity format with untrained weights: the machinery, not the accuracy."""
    path = tmp_path_factory.mktemp("checkpoint")
    new_model(seed=1).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def test_retention_and_agreement_are_relative_to_identity(untrained_checkpoint):
    model, tokenizer = load_model(untrained_checkpoint), load_tokenizer(untrained_checkpoint)
    items = load_items(None, 20)
    schedules = [("identity", "-", load_schedule("identity")), ("luvc", "default", load_schedule("luvc-default"))]
    identity, default = run_fidelity(model, tokenizer, items, schedules, batch_size=10)
    assert identity.retention in (1.0, None) and identity.agreement == 1.0 and identity.llm_flops_ratio == 1.0
    assert default.llm_flops_ratio < 0.5 and default.mean_visual_tokens < identity.mean_visual_tokens
    if identity.accuracy["overall"]:
        assert default.retention == pytest.approx(default.accuracy["overall"] / identity.accuracy["overall"])
    with pytest.raises(ValueError, match="identity"):
        run_fidelity(model, tokenizer, items, schedules[1:])


def test_method_and_budget_read_preset_names():
    assert method_and_budget("pyramid_drop-quarter") == ("pyramid_drop", "quarter")
    assert method_and_budget("luvc-default") == ("luvc", "default")
    assert method_and_budget("my-schedule") == ("my-schedule", "-")


def test_cli_writes_json_markdown_and_plot(tmp_path, untrained_checkpoint):
    result = CliRunner().invoke(app, ["bench", "fidelity", "--checkpoint", str(untrained_checkpoint),
                                      "--count", "10", "--batch-size", "10",
                                      "--schedule", "fastv-quarter", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "fidelity.json").read_text())
    assert [r["schedule"] for r in report["results"]] == ["identity", "fastv-quarter"]
    assert (tmp_path / "fidelity.png").stat().st_size > 0 and "fastv-quarter" in (tmp_path / "fidelity.md").read_text()


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["bench", "fidelity", "--checkpoint", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "no checkpoint" in result.output


def test_cli_reads_a_dataset_folder_and_reports_its_errors(tmp_path, untrained_checkpoint):
    from PIL import Image

    for i, item in enumerate(load_items(None, 4)):
        Image.fromarray(item.image).save(tmp_path / f"{i}.png")
    lines = [json.dumps({"image": f"{i}.png", "question": it.question, "answer": it.answer, "task": it.task})
             for i, it in enumerate(load_items(None, 4))]
    (tmp_path / "items.jsonl").write_text("\n".join(lines))
    ok = CliRunner().invoke(app, ["bench", "fidelity", "--checkpoint", str(untrained_checkpoint),
                                  "--dataset", str(tmp_path), "--schedule", "identity",
                                  "--out", str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output
    (tmp_path / "items.jsonl").write_text('{"image": "missing.png", "question": "q", "answer": "a"}')
    bad = CliRunner().invoke(app, ["bench", "fidelity", "--checkpoint", str(untrained_checkpoint),
                                   "--dataset", str(tmp_path), "--out", str(tmp_path / "o")])
    assert bad.exit_code == 1 and "items.jsonl:1" in bad.output


def test_the_validation_split_is_for_tuning_and_train_is_refused(tmp_path, untrained_checkpoint):
    base = ["bench", "fidelity", "--checkpoint", str(untrained_checkpoint), "--count", "5", "--batch-size", "5",
            "--schedule", "identity", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, base + ["--split", "val"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "fidelity.json").read_text())["settings"]["dataset"] == "luvc task suite, val split"
    assert [i.key for i in load_items(None, 5, "val")] != [i.key for i in load_items(None, 5)]
    refused = CliRunner().invoke(app, base + ["--split", "train"])
    assert refused.exit_code == 1 and "what the model learned from" in refused.output
