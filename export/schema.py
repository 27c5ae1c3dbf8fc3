"""Strict JSON <-> frozen dataclasses: every field present and of its declared type, or an error that names it.
The manifest and the graph contract are parsed here once; everything after reads attributes."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class SchemaError(ValueError):
    """A JSON value that does not fit its dataclass; the message starts with the field's path."""


def from_json(cls: type[T], data: Any, where: str = "") -> T:
    """`data` (parsed JSON) as a `cls`: no field missing, none unknown, each of its declared type (lists become
    tuples). A field's default is no excuse to leave it out: what was written is what is read."""
    if not isinstance(data, dict):
        raise SchemaError(f"{where or 'the document'}: expected an object, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    fields = [field for field in dataclasses.fields(cls) if field.init]
    path = lambda name: f"{where}.{name}" if where else name
    for field in fields:
        if field.name not in data:
            raise SchemaError(f"{path(field.name)}: missing")
    unknown = sorted(set(data) - {field.name for field in fields})
    if unknown:
        raise SchemaError(f"{path(unknown[0])}: unknown field")
    values = {field.name: _value(hints[field.name], data[field.name], path(field.name)) for field in fields}
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:  # the dataclass's own checks (__post_init__)
        raise SchemaError(f"{where or 'the document'}: {error}") from error


def to_json(value: Any) -> Any:
    """A dataclass (nested ones too) as plain JSON values, fields in declaration order, tuples as lists."""
    if dataclasses.is_dataclass(value):
        return {field.name: to_json(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    return value


def _value(hint: Any, value: Any, where: str) -> Any:
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        for argument in arguments:
            if argument is not type(None):
                try:
                    return _value(argument, value, where)
                except SchemaError:
                    continue
        raise SchemaError(f"{where}: expected {_name(hint)}, got {_kind(value)}")
    if origin is Literal:
        if value not in arguments or isinstance(value, bool) != any(isinstance(choice, bool) for choice in arguments):
            raise SchemaError(f"{where}: expected one of {', '.join(map(repr, arguments))}, got {value!r}")
        return value
    if origin is tuple:  # tuple[X, ...]
        if not isinstance(value, list):
            raise SchemaError(f"{where}: expected a list, got {_kind(value)}")
        return tuple(_value(arguments[0], item, f"{where}[{index}]") for index, item in enumerate(value))
    if origin is dict:  # dict[str, X]
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: expected an object, got {_kind(value)}")
        return {key: _value(arguments[1], item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a hint is a class, never an instance
        return from_json(hint, value, where)
    # JSON has one number type and bool is an int to Python: true is no count, and 3 is a fine float.
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
        return value
    raise SchemaError(f"{where}: expected {_name(hint)}, got {_kind(value)}")


def _name(hint: Any) -> str:
    arguments = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_name(argument) for argument in arguments)
    if dataclasses.is_dataclass(hint):
        return "an object"
    return {type(None): "null", int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, str(hint))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    kinds: dict[type, str] = {dict: "an object", list: "a list", str: f"the string {value!r}"}
    return kinds.get(type(value), repr(value))
