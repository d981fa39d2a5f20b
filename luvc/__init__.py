"""luvc: training-free visual-token compression for vision-language models.

    import luvc
    model = luvc.compile(model, "luvc-default")   # OIM + SPU, in place
    model.generate(**inputs)                      # unchanged API
    luvc.uncompile(model)                         # the original back
"""

__version__ = "0.1.0"

from luvc.api import compile, ledger, lower, trace, uncompile  # noqa: E402
from luvc.errors import (  # noqa: E402
    CompileError,
    LuvcError,
    PluginError,
    ScheduleError,
    UnknownModelError,
    UnsupportedModelError,
)
from luvc.schedules import Schedule, Step, load_schedule  # noqa: E402

__all__ = [
    "CompileError", "LuvcError", "PluginError", "Schedule", "ScheduleError", "Step", "UnknownModelError",
    "UnsupportedModelError",
    "__version__", "compile", "ledger", "load_schedule", "lower", "trace", "uncompile",
]
