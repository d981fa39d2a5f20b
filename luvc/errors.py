"""Exceptions luvc raises for bad input: each says where, what, and the fix."""

from __future__ import annotations


class LuvcError(Exception):
    """Base class of every error luvc raises on purpose."""


class ScheduleError(LuvcError, ValueError):
    """A schedule is malformed or does not fit the model it is applied to.

    The message reads ``source:line: key: problem`` followed by an indented
    hint, so an editor can jump to the offending YAML line.
    """

    def __init__(
        self,
        problem: str,
        *,
        source: str | None = None,
        line: int | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.problem = problem
        self.source = source
        self.line = line
        self.key = key
        self.hint = hint
        where = source or "<schedule>"
        if line is not None:
            where = f"{where}:{line}"
        text = f"{where}: {key}: {problem}" if key else f"{where}: {problem}"
        if hint:
            text += "\n  " + hint
        super().__init__(text)


class UnsupportedModelError(LuvcError, TypeError):
    """No registered model adapter handles the given model."""


class UnknownModelError(LuvcError, ValueError):
    """A model named on the command line or to ``luvc.examples`` is neither a built-in config nor a checkpoint."""


class CompileError(LuvcError, RuntimeError):
    """A model cannot be compiled or uncompiled in its current state."""


class PluginError(LuvcError, RuntimeError):
    """A plugin registered something invalid or clashing; names the plugin."""


class LuvcWarning(UserWarning):
    """Something ran, but not as the schedule reads (e.g. a merge step that found nothing to merge)."""
