"""The vision-only learnability check runs at every read point and groups every region."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from luvc.fidelity.probe import READS, probe_accuracy


@pytest.mark.parametrize("read", READS)
def test_probe_trains_and_reports_per_group_accuracy(read):
    lines: list[str] = []
    accuracy = probe_accuracy(steps=2, tasks=("color", "text"), read=read, batch=2, val_count=2, report_every=1,
                              report=lines.append)
    assert len(lines) == 2
    assert accuracy["background"] is not None and 0 <= accuracy["background"] <= 1
    assert accuracy["count"] is None, "no count item was drawn"


def test_an_unknown_read_point_is_refused():
    import typer

    from luvc.fidelity.probe import main

    app = typer.Typer()
    app.command()(main)
    result = CliRunner().invoke(app, ["--steps", "1", "--read", "logits"])
    assert result.exit_code != 0 and "embedding, hidden, merger" in result.output
    with pytest.raises(ValueError, match="unknown read point"):
        probe_accuracy(steps=1, read="logits")


def test_a_trained_towers_tokens_are_read_frozen():
    from luvc.fidelity.model import CHECKPOINT

    accuracy = probe_accuracy(steps=40, tasks=("color",), batch=4, val_count=4, report_every=40, lr=1e-2,
                              report=lambda line: None, checkpoint=CHECKPOINT)
    assert accuracy["shape"] >= 0.9, "the shipped tower tells a shape's kind and colour on every one of its tokens"
