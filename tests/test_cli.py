"""The `luvc` command line: exit codes, error text, and what each command shows."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from luvc.cli import app

runner = CliRunner()

BAD = """name: deep
llm:
  - transform: spectrum_prune
    at: 9
    params: {keep: 0.5}
"""


def run(*args: str):
    return runner.invoke(app, list(args))


def test_presets_lists_every_preset():
    result = run("presets")
    assert result.exit_code == 0
    for name in ("identity", "luvc-default", "luvc-mild", "luvc-aggressive"):
        assert name in result.output


def test_plugins_shows_transforms_with_their_plugin():
    result = run("plugins")
    assert result.exit_code == 0
    assert "spectrum_prune" in result.output and "orthogonal_merge" in result.output
    assert "qwen2_vl" in result.output and "luvc (built-in)" in result.output


def test_plugins_lists_each_adapters_stages():
    import re

    output = runner.invoke(app, ["plugins"], env={"COLUMNS": "250"}).output
    assert re.search(r"qwen2_vl\s.*\svision, llm\s", output)
    assert re.search(r"generic \(fallback\)\s.*\sllm\s", output)


def test_validate_ok_and_against_a_model():
    assert run("validate", "luvc-default").exit_code == 0
    result = run("validate", "luvc-default", "--model", "qwen2-vl-tiny")
    assert result.exit_code == 0 and "valid: luvc-default against qwen2-vl-tiny" in result.output


def test_validate_reports_file_line_and_depth(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text(BAD)
    assert run("validate", str(path)).exit_code == 0, "schema alone is fine"
    result = run("validate", str(path), "--model", "qwen2-vl-tiny")
    assert result.exit_code == 1
    assert f"{path}:4: llm[0].at: layer 9 is out of range (this language model has 4 layers)" in result.output


@pytest.mark.parametrize("args,fragment", [
    (("validate", "luvc-defualt"), "did you mean 'luvc-default'"),
    (("validate", "luvc-default", "--model", "gpt-5"), "unknown model 'gpt-5'"),
    (("inspect", "--model", "qwen2-vl-tiny", "--schedule", "nope"), "unknown preset 'nope'"),
    (("validate", "luvc-default", "--model", "qwen2-vl-tyni"), "did you mean 'qwen2-vl-tiny'?"),
    (("inspect", "--model", "qwen2-vl-tiny", "--size", "big"), "--size 'big': write SIDE or HEIGHTxWIDTH"),
])
def test_errors_exit_1_with_the_reason(args, fragment):
    result = run(*args)
    assert result.exit_code == 1 and fragment in result.output


def test_an_internal_error_is_not_reported_as_a_user_mistake(monkeypatch):
    """Only luvc's own errors are the user's to fix; a bug surfaces as itself, with its traceback."""
    import luvc

    def broken(*args, **kwargs):
        raise KeyError("internal")

    monkeypatch.setattr(luvc, "lower", broken)
    result = run("validate", "luvc-default", "--model", "qwen2-vl-tiny")
    assert isinstance(result.exception, KeyError) and "invalid" not in result.output


def test_inspect_shows_graph_and_planned_tokens():
    result = run("inspect", "--model", "qwen2-vl-tiny", "--size", "224")
    assert result.exit_code == 0
    assert "def forward(self, state)" in result.output
    assert "llm.transforms.spectrum_prune_0" in result.output
    lines = [line for line in result.output.splitlines() if "llm.norm" in line and "│" in line]
    assert lines and lines[-1].split("│")[2].strip() == "0"


@pytest.mark.parametrize("command", ["demo", "presets", "plugins", "validate", "inspect"])
def test_every_command_has_useful_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and len(result.output) > 200
