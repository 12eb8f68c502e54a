"""Command-line flags generated from a method's settings dataclass.

Each leaf field of a frozen settings dataclass (nested dataclasses are walked) becomes one
`--flag`: named after the field (`max_steps` → `--max-steps`) or after its
`metadata={"flag": ...}`, typed from its annotation (int, float, bool, str, a `Literal` of
choices, or any of those `| None`), documented by the class's `Attributes:` docstring entry.
A flag not given keeps the dataclass default, so the library's defaults are the CLI's.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from typing import Any, Literal

__all__ = ["add_settings_flags", "settings_from_flags", "settings_leaves"]


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One settable field: its path in the settings tree, flag, parser and help."""

    path: tuple[str, ...]
    flag: str
    kind: Any
    choices: tuple[Any, ...] | None
    help: str
    default: Any


def settings_leaves(settings_type: type, /) -> list[Leaf]:
    """The settable leaves of a settings dataclass, in declaration order.

    Raises:
        TypeError: If two leaves would share a flag, or a field has an unsupported type.
    """
    leaves = list(_walk(settings_type, ()))
    flags = [leaf.flag for leaf in leaves]
    repeated = sorted({flag for flag in flags if flags.count(flag) > 1})
    if repeated:
        raise TypeError(f"{settings_type.__name__}: several fields make the flags {repeated}.")
    return leaves


def add_settings_flags(group, settings_type: type, /) -> list[Leaf]:
    """Adds one flag per leaf of `settings_type` to an argparse parser or group."""
    leaves = settings_leaves(settings_type)
    for leaf in leaves:
        name = "--" + leaf.flag.replace("_", "-")
        default = f" (default: {leaf.default!r})"
        if leaf.kind is bool:
            group.add_argument(
                name,
                dest=_dest(leaf),
                action=argparse.BooleanOptionalAction,
                default=None,
                help=leaf.help + default,
            )
        else:
            group.add_argument(
                name,
                dest=_dest(leaf),
                type=leaf.kind,
                choices=leaf.choices,
                metavar=None if leaf.choices else leaf.flag.upper(),
                default=None,
                help=leaf.help + default,
            )
    return leaves


def settings_from_flags(settings_type: type, options: argparse.Namespace, /) -> Any:
    """The settings with every given flag applied to the dataclass defaults."""
    given: dict[tuple[str, ...], Any] = {}
    for leaf in settings_leaves(settings_type):
        value = getattr(options, _dest(leaf), None)
        if value is not None:
            given[leaf.path] = value
    return _build(settings_type, (), given)


def _dest(leaf: Leaf) -> str:
    return "settings__" + "__".join(leaf.path)


def _build(settings_type: type, prefix: tuple[str, ...], given: dict) -> Any:
    hints = typing.get_type_hints(settings_type)
    values = {}
    for field in dataclasses.fields(settings_type):
        path = (*prefix, field.name)
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            nested_given = {key: value for key, value in given.items() if key[: len(path)] == path}
            if nested_given:
                values[field.name] = _build(kind, path, given)
        elif path in given:
            values[field.name] = given[path]
    return settings_type(**values)


def _walk(settings_type: type, prefix: tuple[str, ...]):
    if not dataclasses.is_dataclass(settings_type):
        raise TypeError(f"{settings_type!r} is not a dataclass.")
    hints = typing.get_type_hints(settings_type)
    docs = _attribute_docs(settings_type)
    defaults = settings_type()
    for field in dataclasses.fields(settings_type):
        if not field.init:
            continue
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            yield from _walk(kind, (*prefix, field.name))
            continue
        parser, choices = _parser_of(kind, settings_type, field.name)
        yield Leaf(
            path=(*prefix, field.name),
            flag=field.metadata.get("flag", field.name),
            kind=parser,
            choices=choices,
            help=docs.get(field.name, ""),
            default=getattr(defaults, field.name),
        )


def _parser_of(kind, owner: type, name: str):
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if len(options) != 1:
            raise TypeError(f"{owner.__name__}.{name}: unsupported type {kind!r}.")
        kind = options[0]
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        return type(choices[0]), choices
    if kind in (int, float, str, bool):
        return kind, None
    raise TypeError(f"{owner.__name__}.{name}: unsupported type {kind!r}.")


def _attribute_docs(settings_type: type) -> dict[str, str]:
    """`name: text` entries of the `Attributes:` section of a Google-style docstring."""
    doc = inspect.getdoc(settings_type) or ""
    section = doc.split("Attributes:", 1)
    if len(section) < 2:
        return {}
    docs: dict[str, str] = {}
    current = None
    for line in section[1].splitlines():
        if line and not line.startswith(" "):
            break  # The next section.
        match = re.match(r"^    (\w+(?:, \w+)*): (.*)$", line)
        if match:
            names = match.group(1).split(", ")
            for entry in names:
                docs[entry] = match.group(2).strip()
            current = names
        elif current and line.strip():
            for entry in current:
                docs[entry] += " " + line.strip()
    # argparse formats help with %; a literal percent sign must be doubled.
    return {key: value.replace("%", "%%") for key, value in docs.items()}
