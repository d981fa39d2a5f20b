"""Load schedules from presets, YAML files, YAML text or dicts, with YAML-line errors."""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from luvc.errors import ScheduleError
from luvc.registry import get_registry
from luvc.schedules.placement import check_site
from luvc.schedules.schema import Schedule, Step, line_in

ScheduleLike = Schedule | str | Path | dict


def load_schedule(schedule: ScheduleLike) -> Schedule:
    """Return a validated ``Schedule`` from any accepted form.

    Args:
        schedule: a ``Schedule``; a preset name (``luvc-default``); a path to a
            YAML file; YAML text; or a dict with the same keys.

    Raises:
        ScheduleError: naming the source, YAML line, key and fix.
    """
    if isinstance(schedule, Schedule):
        validate_against_registry(schedule)
        return schedule
    if isinstance(schedule, dict):
        return _from_data(schedule, source="<dict>", lines={})
    if isinstance(schedule, Path):
        return _from_file(schedule)
    if not isinstance(schedule, str):
        raise ScheduleError(
            f"cannot load a schedule from {type(schedule).__name__}",
            hint="pass a Schedule, a preset name, a YAML path, YAML text or a dict",
        )
    presets = get_registry().presets
    if schedule in presets:
        return _from_file(presets[schedule], source=f"preset:{schedule}")
    if "\n" in schedule or (":" in schedule and not schedule.endswith((".yaml", ".yml"))):
        return _from_text(schedule, source="<yaml>")
    if schedule.endswith((".yaml", ".yml")) or Path(schedule).is_file():
        return _from_file(Path(schedule))
    close = difflib.get_close_matches(schedule, presets, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ScheduleError(
        f"unknown preset {schedule!r}",
        hint=f"{hint}presets: {', '.join(sorted(presets))}; or pass a path to a YAML file",
    )


def _from_file(path: Path, source: str | None = None) -> Schedule:
    if not path.is_file():
        raise ScheduleError(f"no such file: {path}", hint="check the path, or use a preset name (`luvc presets`)")
    return _from_text(path.read_text(), source=source or str(path))


def _from_text(text: str, source: str) -> Schedule:
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScheduleError(f"malformed YAML: {problem}", source=source, line=line,
                            hint="check indentation and that every key is followed by ': '") from None
    if not isinstance(data, dict):
        raise ScheduleError(
            f"a schedule is a YAML mapping, got {type(data).__name__}", source=source, line=1,
            hint="start with 'name: my-schedule' and add 'vision:' and/or 'llm:' lists",
        )
    lines: dict[tuple, int] = {}
    _index_lines(node, (), lines)
    return _from_data(data, source=source, lines=lines)


def _from_data(data: dict, source: str, lines: dict[tuple, int]) -> Schedule:
    try:
        schedule = Schedule.model_validate(data)
    except ValidationError as exc:
        raise _schema_error(exc, Schedule, (), source, lambda loc: line_in(lines, loc)) from None
    schedule._source = source
    schedule._lines = lines
    validate_against_registry(schedule)
    return schedule


def validate_against_registry(schedule: Schedule) -> None:
    """Check transform names, stages and params against the registered transforms."""
    registry = get_registry()
    source = schedule.source
    for stage in ("vision", "llm"):
        for i, step in enumerate(getattr(schedule, stage)):
            loc = (stage, i)
            spec = registry.transforms.get(step.transform)
            if spec is None:
                close = difflib.get_close_matches(step.transform, registry.transforms, n=1)
                hint = f"(did you mean {close[0]!r}?)" if close else ""
                raise ScheduleError(
                    f"unknown transform {step.transform!r} {hint}".strip(),
                    source=source, line=schedule.line_of(*loc, "transform"), key=_key(loc + ("transform",)),
                    hint=f"installed: {', '.join(sorted(registry.transforms))}; see `luvc plugins`",
                )
            check_site(schedule, stage, i, spec)
            try:
                spec.params.model_validate(step.params)
            except ValidationError as exc:
                raise _schema_error(exc, spec.params, loc + ("params",), source,
                                    lambda where: schedule.line_of(*where)) from None
    if schedule.eliminate_visual and not any(
        registry.transforms[s.transform].eliminates(params_of(s)) for s in schedule.llm
    ):
        raise ScheduleError(
            "claims to eliminate visual tokens, but no llm step removes every remaining visual token",
            source=source, line=schedule.line_of("eliminate_visual"), key="eliminate_visual",
            hint="add a last llm step that keeps none (spectrum_prune with keep: 0.0), or set eliminate_visual: false",
        )


def params_of(step: Step) -> BaseModel:
    """The step's params validated by its transform's params model."""
    return get_registry().transforms[step.transform].params.model_validate(step.params)


def _schema_error(exc: ValidationError, model: type[BaseModel], prefix: tuple, source: str, line_of) -> ScheduleError:
    err = exc.errors()[0]
    loc = prefix + tuple(p for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
    rel = loc[len(prefix):]
    field = _field(model, rel)
    if err["type"] == "extra_forbidden":
        allowed = list(_fields_at(model, rel[:-1]))
        close = difflib.get_close_matches(str(rel[-1]), allowed, n=1)
        problem = f"unknown key {rel[-1]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        hint = f"allowed keys here: {', '.join(allowed)}"
    elif err["type"] == "missing":
        problem = "is required"
        hint = field.description if field is not None and field.description else None
    else:
        problem = f"{_lower(err['msg'])}, got {err.get('input')!r}"
        hint = None
        if field is not None and field.description:
            hint = f"{rel[-1]}: {field.description}"
    return ScheduleError(problem, source=source, line=line_of(loc), key=_key(loc), hint=hint)


_UNION_TAGS = {"int", "float", "str"}


def _lower(msg: str) -> str:
    msg = msg.removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def _fields_at(model: type[BaseModel], rel: tuple) -> dict:
    for part in rel:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part)
        inner = getattr(info, "annotation", None) if info else None
        args = getattr(inner, "__args__", ())
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            model = nested[0]
        elif isinstance(inner, type) and issubclass(inner, BaseModel):
            model = inner
        else:
            return {}
    return model.model_fields


def _field(model: type[BaseModel], rel: tuple):
    names = [p for p in rel if isinstance(p, str)]
    if not names:
        return None
    return _fields_at(model, tuple(rel[:-1])).get(names[-1]) if rel and isinstance(rel[-1], str) else None


def _key(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _index_lines(node: yaml.Node, loc: tuple, lines: dict[tuple, int]) -> None:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = loc + (key.value,)
            lines[sub] = key.start_mark.line + 1
            _index_lines(value, sub, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, loc + (i,), lines)
