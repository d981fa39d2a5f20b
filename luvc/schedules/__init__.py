"""Declarative compression schedules: schema, loading, presets, placement."""

from luvc.schedules.loader import load_schedule, params_of
from luvc.schedules.schema import Schedule, Step

__all__ = ["Schedule", "Step", "load_schedule", "params_of"]
