"""The entry point of vlmask's first-party plugins (group ``vlmask``, name ``builtin``).

Every built-in factory is registered here, explicitly, through the same hook third-party
plugins implement; nothing registers itself by being imported.
"""

from vlmask import hookimpl
from vlmask.registry import Register
from vlmask_plugins import (
    action_area,
    captioners,
    data,
    encoders,
    evaluation,
    heads,
    loggers,
    maskers,
    targets,
    teachers,
    text,
)


@hookimpl
def vlmask_register_plugins(register: Register) -> None:
    for package in (maskers, encoders, teachers, targets, heads, text, data, action_area, captioners, evaluation, loggers):
        package.register_plugins(register)
