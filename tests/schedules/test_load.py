"""Loading schedules: presets round-trip, every kind of bad input gets a clear error with its YAML line."""

from __future__ import annotations

import pydantic
import pytest
import yaml

import luvc
from luvc import Schedule, ScheduleError, load_schedule
from luvc.registry import get_registry

PRESETS = sorted(get_registry().presets)


def test_builtin_presets_exist():
    assert {"identity", "luvc-default", "luvc-mild", "luvc-aggressive"} <= set(PRESETS)


def test_the_ablation_presets_are_luvc_default_s_parts():
    default = load_schedule("luvc-default")
    merge, eliminate = load_schedule("luvc-merge-only"), load_schedule("luvc-eliminate-only")
    assert merge.vision == default.vision and not merge.llm and not merge.eliminate_visual
    assert eliminate.llm == default.llm[-1:] and not eliminate.vision and eliminate.eliminate_visual


@pytest.mark.parametrize("name", PRESETS)
def test_presets_round_trip_through_yaml(name):
    """Dumping a preset to YAML and loading it back gives an equal schedule."""
    schedule = load_schedule(name)
    assert schedule.name == name
    assert load_schedule(schedule.to_yaml()) == schedule
    assert Schedule.model_validate(yaml.safe_load(schedule.to_yaml())) == schedule


def test_every_accepted_form_loads_the_same(tmp_path):
    text = load_schedule("luvc-default").to_yaml()
    path = tmp_path / "s.yaml"
    path.write_text(text)
    forms = [text, path, str(path), yaml.safe_load(text), load_schedule("luvc-default")]
    assert len({load_schedule(f) for f in forms}) == 1


GOOD = """\
name: t
eliminate_visual: true
llm:
  - transform: spectrum_prune
    at: [1, 2]
    params: {keep: 0.5}
  - transform: spectrum_prune
    at: 3
    params: {keep: 0.0}
"""

BAD = [
    # (replace this, with this, expected fragment, line)
    ("transform: spectrum_prune\n    at: [1, 2]", "transform: spectrum_prun\n    at: [1, 2]",
     "unknown transform 'spectrum_prun' (did you mean 'spectrum_prune'?)", 4),
    ("{keep: 0.5}", "{keep: 1.5}", "llm[0].params.keep: input should be less than or equal to 1, got 1.5", 6),
    ("{keep: 0.5}", "{keep: 0.5, kep: 1}", "unknown key 'kep' (did you mean 'keep'?)", 6),
    ("{keep: 0.5}", "{}", "llm[0].params.keep: is required", 6),
    ("at: [1, 2]", "at: [1, 1.5]", "fraction 1.5 must be between 0 and 1", 5),
    ("at: [1, 2]", "at: 'a:b'", "is not a range", 5),
    ("at: [1, 2]", "at: []", "needs at least one position", 5),
    ("at: [1, 2]", "at: '1:4:0'", "range '1:4:0' has step 0; write a positive step", 5),
    ("at: [1, 2]", "at: '1:4:00'", "range '1:4:00' has step 0", 5),
    ("    at: 3\n    params: {keep: 0.0}", "    at: 3\n    params: {keep: 0.1}",
     "claims to eliminate visual tokens, but no llm step removes every remaining visual token", 2),
    ("name: t", "name: t\ncolour: red", "unknown key 'colour'", 2),
    ("  - transform: spectrum_prune\n    at: [1, 2]", "  - transform: orthogonal_merge\n    at: [1, 2]",
     "'orthogonal_merge' runs in the vision stage, not in 'llm'", 4),
    ("llm:\n", "llm:\n  - transform: [\n", "malformed YAML", None),
]


@pytest.mark.parametrize("old,new,fragment,line", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_schedules_name_key_line_and_fix(old, new, fragment, line):
    """Each malformed schedule raises ScheduleError with the problem and, from YAML, its line number."""
    assert old in GOOD
    with pytest.raises(ScheduleError) as info:
        load_schedule(GOOD.replace(old, new, 1))
    message = str(info.value)
    assert fragment in message
    if line is not None:
        assert message.startswith(f"<yaml>:{line}:"), message


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(GOOD.replace("{keep: 0.5}", "{keep: -1}"))
    with pytest.raises(ScheduleError, match=rf"^{path}:6: llm\[0\]\.params\.keep"):
        load_schedule(path)


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ScheduleError, match="did you mean 'luvc-default'"):
        load_schedule("luvc-defualt")


def test_missing_file_and_non_mapping():
    with pytest.raises(ScheduleError, match="no such file"):
        load_schedule("nowhere.yaml")
    with pytest.raises(ScheduleError, match="a schedule is a YAML mapping"):
        load_schedule("- a\n- b\n")


def test_loading_never_mutates_a_schedule_object():
    schedule = load_schedule("luvc-default")
    before = schedule.model_dump()
    load_schedule(schedule)
    assert schedule.model_dump() == before
    with pytest.raises(pydantic.ValidationError):
        schedule.name = "other"  # frozen


def test_public_api_exports():
    assert luvc.load_schedule is load_schedule
