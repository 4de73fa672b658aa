"""Typed config base: every config section is a dataclass deriving from `ConfigBase`.

`ConfigBase.__post_init__` checks each field's value against its annotation (so a YAML typo like
`num_layers: "30"` fails with the field name and the fix) and then calls `validate()`, where each
section checks its own cross-field rules. Errors are `ValueError`s naming `section.field` and a fix.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A user-facing configuration error: names the field and how to fix it."""


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _matches(value: Any, tp: Any) -> bool:
    """True when `value` is an instance of annotation `tp` (the subset of typing our configs use)."""
    if tp is Any:
        return True
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in get_args(tp))
    if origin is typing.Literal:
        return value in get_args(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        elem = args[0] if args else Any
        return all(_matches(v, elem) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            return False
        kt, vt = get_args(tp) or (Any, Any)
        return all(_matches(k, kt) and _matches(v, vt) for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"a list of {_describe(args[0])}" if args else "a list"
    return _type_name(tp)


@dataclasses.dataclass
class ConfigBase:
    """Base for config sections. Subclasses override `validate()` for cross-field rules."""

    # The section's name in error messages ("model", "train", ...); set by subclasses.
    _section: typing.ClassVar[str] = "config"

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp = hints[f.name]
            if dataclasses.is_dataclass(value):
                continue  # nested sections validate themselves
            # YAML gives lists where the annotation says tuple: normalise.
            if get_origin(tp) is tuple and isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            if isinstance(value, int) and not isinstance(value, bool) and tp is float:
                object.__setattr__(self, f.name, float(value))
                continue
            if not _matches(value, tp):
                raise ConfigError(
                    f"{self._section}.{f.name}: expected {_describe(tp)}, got "
                    f"{type(value).__name__} {value!r}. Fix: set {self._section}.{f.name} to {_describe(tp)}."
                )
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise `ConfigError` naming the field and the fix."""

    def error(self, field: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(f"{self._section}.{field}: {problem}. Fix: {fix}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
