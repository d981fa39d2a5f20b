"""Where steps land: indices, fractions, ranges and negative indices, checked against the model's depth."""

from __future__ import annotations

import pytest

from luvc import ScheduleError, load_schedule
from luvc.schedules.placement import resolve_positions


def schedule_at(at, stage="llm") -> object:
    if stage == "llm":
        return load_schedule({"name": "p", "llm": [{"transform": "spectrum_prune", "at": at, "params": {"keep": 0.5}}]})
    return load_schedule({"name": "p", "vision": [{"transform": "orthogonal_merge", "at": at}]})


@pytest.mark.parametrize("at,depth,expected", [
    (3, 28, [3]),
    ([0.5, 0.25], 28, [7, 14]),
    ("2:10:4", 28, [2, 6]),
    (":3", 28, [0, 1, 2]),
    (-1, 28, [27]),
    ([0.1, 0.1, 2], 12, [1, 2]),
])
def test_llm_positions(at, depth, expected):
    assert resolve_positions(schedule_at(at), "llm", 0, depth) == expected


def test_vision_may_run_after_the_last_block():
    """Position == depth is 'before the projector' in the vision stage."""
    assert resolve_positions(schedule_at([1.0, -1], "vision"), "vision", 0, 32) == [32]


@pytest.mark.parametrize("at,fragment", [
    (28, "layer 28 is out of range (this language model has 28 layers)"),
    (1.0, "fraction 1.0 resolves to layer 28, which is out of range"),
    ("30:40", "selects no layer"),
    (-29, "layer -29 is out of range"),
])
def test_out_of_range_names_the_depth(at, fragment):
    with pytest.raises(ScheduleError, match="valid positions are 0..27") as info:
        resolve_positions(schedule_at(at), "llm", 0, 28)
    assert fragment in str(info.value)
