"""procqueue's small value types, without the dataclasses module.

Importing `dataclasses` imports `inspect` (with ast, dis and tokenize: ~15 ms), and
@dataclass compiles each class's methods from source when its module is imported (~0.5 ms
a class, 25 classes on the pool's import): together more than half of what `from procqueue
import Pool` cost beyond the standard library's own multiprocessing, paid by every script and
every `procqueue` command.  So a record here is a plain class with an __init__ written out
(records are made per task or per batch: a written __init__ is as fast as a generated one) and
its field names in `_fields`; this base gives it the rest from those names, as @dataclass
did: repr, ==, and for a frozen record immutability, a hash and pickling.

    class Point(Record):
        _fields = ("x", "y")
        x: int
        y: int

        def __init__(self, x: int, y: int = 0) -> None:
            self.x = x
            self.y = y

A frozen record (FrozenRecord) sets its fields in __init__ with object.__setattr__, as a frozen
dataclass's generated __init__ does.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

R = TypeVar("R", bound="Record")


class FrozenInstanceError(AttributeError):
    """Assigning to a field of a frozen record (dataclasses.FrozenInstanceError's role)."""


class Record:
    """repr and == from `_fields`; unhashable, as a dataclass with eq and without frozen.
    (A class that matches positionally in a type-checked `case` spells out __match_args__
    too, for the type checker: it cannot see the one __init_subclass__ sets.)"""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, eq: bool = True, **kwargs: Any) -> None:
        """`class Config(FrozenRecord, eq=False)`: compared and hashed by identity, as a
        dataclass(eq=False) (one that holds dicts or contexts nobody compares).  Each class
        decides for itself, as each @dataclass did: a subclass of such a class compares by
        its fields again unless it says eq=False too."""
        super().__init_subclass__(**kwargs)
        setattr(cls, "__match_args__", cls._fields)  # `case Ready(pid):`, as on a dataclass
        if not eq:
            setattr(cls, "__eq__", object.__eq__)
            setattr(cls, "__hash__", object.__hash__)
        elif cls.__eq__ is object.__eq__ and "__eq__" not in cls.__dict__:
            setattr(cls, "__eq__", Record.__eq__)
            setattr(cls, "__hash__", FrozenRecord.__hash__ if issubclass(cls, FrozenRecord)
                    else None)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__qualname__}({shown})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return field_values(self) == field_values(other)

    # (defining __eq__ without __hash__ makes a class unhashable, as a dataclass with eq)


class FrozenRecord(Record):
    """A Record whose fields cannot be assigned after __init__; hashable by its fields."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __hash__(self) -> int:
        return hash(field_values(self))

    def __setstate__(self, state: Any) -> None:
        # pickle sets a slotted object's state with setattr, which __setattr__ refuses
        if isinstance(state, tuple):
            own, slotted = state
            state = {**(own or {}), **(slotted or {})}
        for name, value in state.items():
            object.__setattr__(self, name, value)


def field_values(record: Record) -> tuple[Any, ...]:
    return tuple(getattr(record, name) for name in record._fields)


def as_dict(record: Record) -> dict[str, Any]:
    """The record's fields by name (dataclasses.asdict, one level deep)."""
    return {name: getattr(record, name) for name in record._fields}


def replaced(record: R, **changes: Any) -> R:
    """A copy of the record with some fields changed (dataclasses.replace); goes through the
    record's __init__, so what it checks or derives is checked and derived again."""
    unknown = set(changes) - set(record._fields)
    if unknown:
        raise TypeError(f"{type(record).__qualname__} has no field {sorted(unknown)[0]!r}")
    return type(record)(**{**as_dict(record), **changes})
