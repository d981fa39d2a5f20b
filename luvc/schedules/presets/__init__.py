"""Preset schedules shipped with luvc, registered like any plugin's presets."""

from __future__ import annotations

from pathlib import Path

from luvc.registry import hookimpl

HERE = Path(__file__).parent


@hookimpl
def luvc_schedule_presets() -> dict[str, Path]:
    return {path.stem: path for path in sorted(HERE.glob("*.yaml"))}
