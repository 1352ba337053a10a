"""Handler arguments back to their annotated types, in the worker.

Arguments travel as JSON, so a handler annotated ``datetime`` would otherwise get the
ISO string the producer's orjson wrote. :func:`converters_for` reads a handler's type
hints once and returns a converter for each parameter whose annotation names a type
JSON cannot carry as itself (see docs/producer.md, "Argument types"); parameters
annotated ``int``, ``str``, ``dict``, ``Any``, ... get none, so a handler without such
annotations pays nothing per call.

A converter returns a value already of its type unchanged (eager and in-memory
paths) and raises (any exception; its message says why) on a value it cannot
convert; the task definition turns that into a TaskArgumentError, which the worker
dead-letters.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import sys
import types
import typing
import uuid
from collections.abc import Callable, Mapping
from datetime import date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any

Converter = Callable[[Any], Any]
#: A parameter's converter and the name of its type (for error messages).
ArgConverter = tuple[Converter, str]

_NONE = type(None)


def converters_for(func: Callable[..., Any], params: typing.Iterable[str],
                   var_positional: str | None = None) -> dict[str, ArgConverter]:
    """Converters (with their type's name) by parameter name for ``func``'s ``params``
    that need one.

    ``var_positional`` names the ``*args`` parameter: its annotation is that of each
    element. Hints that cannot be resolved (a forward reference to a name that does not
    exist at run time, an import under ``TYPE_CHECKING``) mean no conversion at all,
    never an error.
    """
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception:  # whatever resolving someone's annotations raises
        return {}
    out: dict[str, ArgConverter] = {}
    for name in params:
        hint = hints.get(name)
        if hint is None:
            continue
        if name == var_positional:
            hint = list[hint]  # type: ignore[valid-type]
        try:
            conv = converter_for(hint)
        except Exception:  # an annotation too exotic to inspect: leave the value alone
            conv = None
        if conv is not None:
            out[name] = (conv, type_name(hint))
    return out


def converter_for(hint: Any) -> Converter | None:
    """A converter to ``hint`` from its JSON form, or None when none is needed."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return converter_for(typing.get_args(hint)[0])
    if origin is typing.Union or origin is types.UnionType:
        others = [a for a in typing.get_args(hint) if a is not _NONE]
        if len(others) != 1:  # X | Y: which one was meant is a guess, so none is made
            return None
        inner = converter_for(others[0])
        return None if inner is None else _optional(inner)
    if origin is list:
        args = typing.get_args(hint)
        inner = converter_for(args[0]) if args else None
        return None if inner is None else _list(inner)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) != 2 or args[1] is not Ellipsis:
            return None
        # A tuple arrives as a JSON array: make it a tuple again even when its items
        # need nothing, so the annotation holds.
        return _tuple(converter_for(args[0]))
    if origin is dict:
        args = typing.get_args(hint)
        if len(args) != 2 or args[0] is not str:
            return None
        inner = converter_for(args[1])
        return None if inner is None else _dict(inner)
    if not isinstance(hint, type) or origin is not None:
        return None
    if hint is datetime:  # before date: a datetime is a date
        return _iso(datetime)
    if hint is date or hint is time:
        return _iso(hint)
    if hint is uuid.UUID:
        return _uuid
    if hint is Decimal:
        return _decimal
    if issubclass(hint, enum.Enum):
        return _enum(hint)
    if _is_pydantic_model(hint):
        return _pydantic(hint)
    if dataclasses.is_dataclass(hint):
        return _dataclass(hint)
    return None


def type_name(hint: Any) -> str:
    """``hint`` as a reader writes it: ``list[UUID]``, ``datetime | None``."""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__qualname__
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_])", "", repr(hint))


def _is_pydantic_model(cls: type) -> bool:
    # Optional dependency: a BaseModel subclass exists only once pydantic is imported,
    # so looking in sys.modules never imports it (and costs nothing without it).
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and issubclass(cls, pydantic.BaseModel)


def _optional(inner: Converter) -> Converter:
    def convert(value: Any) -> Any:
        return None if value is None else inner(value)
    return convert


def _items(value: Any) -> list[Any] | tuple[Any, ...]:
    if isinstance(value, list | tuple):
        return value
    raise TypeError(f"expected a JSON array, got {type(value).__name__}")


def _at(where: str, inner: Converter, value: Any) -> Any:
    try:
        return inner(value)
    except Exception as exc:  # say where in the value it failed
        raise ValueError(f"{where}: {exc}") from exc


def _list(inner: Converter) -> Converter:
    def convert(value: Any) -> Any:
        return [_at(f"item {i}", inner, v) for i, v in enumerate(_items(value))]
    return convert


def _tuple(inner: Converter | None) -> Converter:
    def convert(value: Any) -> Any:
        items = _items(value)
        if inner is None:
            return items if type(items) is tuple else tuple(items)
        return tuple(_at(f"item {i}", inner, v) for i, v in enumerate(items))
    return convert


def _dict(inner: Converter) -> Converter:
    def convert(value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a JSON object, got {type(value).__name__}")
        return {k: _at(f"key {k!r}", inner, v) for k, v in value.items()}
    return convert


def _iso(cls: type[datetime] | type[date] | type[time]) -> Converter:
    def convert(value: Any) -> Any:
        if isinstance(value, cls):
            return value
        if not isinstance(value, str):
            raise TypeError(f"expected an ISO 8601 string, got {type(value).__name__}")
        # orjson writes an aware datetime with its offset and a naive one without:
        # fromisoformat gives back the same kind.
        return cls.fromisoformat(value)
    return convert


def _uuid(value: Any) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str):
        raise TypeError(f"expected a UUID string, got {type(value).__name__}")
    return uuid.UUID(value)


def _decimal(value: Any) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, str) or (type(value) is int):
        try:
            return Decimal(value)
        except InvalidOperation:
            raise ValueError("not a decimal number") from None
    if type(value) is float:
        return Decimal(str(value))  # the float's shortest repr: 0.1, not 0.1000000000000000055...
    raise TypeError(f"expected a decimal string or a number, got {type(value).__name__}")


def _enum(cls: type[enum.Enum]) -> Converter:
    def convert(value: Any) -> Any:
        if isinstance(value, cls):
            return value
        try:
            return cls(value)  # orjson writes an enum member as its value
        except ValueError:
            if isinstance(value, str) and value in cls.__members__:
                return cls[value]
            raise ValueError(f"not a value or name of {cls.__qualname__}") from None
    return convert


def _pydantic(cls: type) -> Converter:
    def convert(value: Any) -> Any:
        if isinstance(value, cls):
            return value
        try:
            return cls.model_validate(value)  # type: ignore[attr-defined]
        except ValueError as exc:  # pydantic's ValidationError: one line per problem
            raise ValueError("; ".join(str(exc).splitlines())) from None
    return convert


def _dataclass(cls: type) -> Converter:
    # The field converters are made on first use, so a dataclass that refers to itself
    # (a tree of nodes) does not recurse while the converters are built.
    plan: list[tuple[dict[str, Converter], frozenset[str], frozenset[str]]] = []

    def build() -> tuple[dict[str, Converter], frozenset[str], frozenset[str]]:
        fields = dataclasses.fields(cls)
        init = frozenset(f.name for f in fields if f.init)
        computed = frozenset(f.name for f in fields if not f.init)
        convs = {k: conv for k, (conv, _) in converters_for(cls, init).items()}
        plan.append((convs, init, computed))
        return plan[0]

    def convert(value: Any) -> Any:
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a JSON object, got {type(value).__name__}")
        convs, init, computed = plan[0] if plan else build()
        kwargs: dict[str, Any] = {}
        for key, item in value.items():
            if key in init:
                conv = convs.get(key)
                kwargs[key] = item if conv is None else _at(f"field {key!r}", conv, item)
            elif key not in computed:  # a field with init=False is written, not read back
                raise ValueError(f"{cls.__qualname__} has no field {key!r}")
        missing = [f for f in init if f not in kwargs and _required(cls, f)]
        if missing:
            raise ValueError(f"{cls.__qualname__} is missing field(s) {sorted(missing)}")
        return cls(**kwargs)
    return convert


def _required(cls: type, name: str) -> bool:
    f = cls.__dataclass_fields__[name]  # type: ignore[attr-defined]
    return bool(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
