"""Slotted record classes: what ``@dataclass(frozen=True, slots=True)`` gave the events, without
importing ``dataclasses`` (it imports ``inspect`` and ``ast``: ~12 ms of every ``nbdgw nbd copy``)
or exec'ing generated methods for each class at import (~1 ms a class).

A subclass lists its fields in ``__slots__``, takes each as an ``__init__`` parameter of the same
name (their order is the order of the fields, as in a dataclass), and annotates them ``Final``
so that mypy rejects an assignment anywhere in nbdcore, gateway and nbdgw.
:class:`Record` supplies the dataclass ``__repr__``, ``__eq__``, ``__hash__`` and
``__match_args__``; :class:`Frozen` also makes assignment fail at run time (about 1 us more
to build one with eight fields, against some 90 us of CPU per READ:
bench/results/2026-12-07/copy-startup/README.md).
"""

from __future__ import annotations

from typing import Any, ClassVar


class FrozenInstanceError(AttributeError):
    """Assignment to a field of a frozen record (as ``dataclasses.FrozenInstanceError``)."""


class Record:
    __slots__ = ()
    _field_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:  # a record, not an intermediate base such as Frozen
            code = init.__code__
            cls._field_names = code.co_varnames[1 : code.co_argcount]
            setattr(cls, "__match_args__", cls._field_names)  # noqa: B010 (mypy forbids assigning it)

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._field_names)

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._field_names)
        return f"{type(self).__qualname__}({fields})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Record)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())


class Frozen(Record):
    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        # Write-once: __init__ gives each field its value, so a field that has one is frozen.
        if hasattr(self, name):
            raise FrozenInstanceError(f"cannot assign to field {name!r}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")
