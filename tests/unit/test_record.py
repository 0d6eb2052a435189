"""The records that replaced the frozen dataclasses (nbdcore/_record.py) behave as the dataclasses
did: same constructor, repr, equality, hash and match arguments; assignment fails on every event
(and mypy rejects it: the fields are Final); and the sans-I/O core no longer imports dataclasses
(with inspect and ast)."""

from __future__ import annotations

import copy as copy_module
import dataclasses
import inspect
import pickle
import subprocess
import sys
from array import array
from typing import Any

import pytest

from nbdcore import clear_ext, client, session, tls, uri, wire
from nbdcore._record import Frozen, FrozenInstanceError, Record
from nbdcore.constants import Cmd, HandshakeFlag, TransmissionFlag
from nbdcore.exceptions import RequestError
from nbdcore.sync import copy

BS = wire.BlockSize(1, 4096, 1 << 25)
SAMPLES: list[tuple[type[Record], tuple[Any, ...], dict[str, Any]]] = [
    (client.Greeting, (HandshakeFlag.FIXED_NEWSTYLE,), {}),
    (client.OptionAcked, (9,), {}),
    (client.SnapshotResult, (10, b"{}"), {}),
    (client.OptionFailed, (7, 2**31 + 1, "no such export"), {}),
    (client.ExportsListed, ((("a", "A disk"), ("b", "")),), {}),
    (client.MetaContextsListed, (10, (("base:allocation", 1),)), {}),
    (client.InfoReceived, (6, "a", None, 1 << 20, TransmissionFlag.HAS_FLAGS, BS), {}),
    (client.ExportReady, (7, None, "d", 1 << 30, TransmissionFlag.READ_ONLY, None), {}),
    (client.BlockStatusResult, (1, array("Q", [4096]), array("L", [3])), {}),
    (client.Reply, (5, Cmd.READ), {"data": memoryview(b"x")}),
    (client.Reply, (6, Cmd.READ, RequestError(5)), {}),
    (client.ConnectionClosed, (False,), {}),
    (wire.BlockSize, (512, 4096, 1 << 25), {}),
    (clear_ext.Position, (1, 77, 3), {}),
    (clear_ext.ClearRequest, (65536, 1), {"since": (77, 3)}),
    (clear_ext.Cleared, (1, 65536, ((0, 65536),)), {}),
    (session.StatusRequest, (int, len), {}),
    (tls.TLSConfig, (), {"ca_file": "/ca.pem", "verify_peer": False}),
    (copy.CopyResult, (1 << 30, 1 << 20, 2, 0.5), {}),
    (uri.NBDURI, ("nbds", "h", None, None, "e"), {"tls_options": {"tls-username": "u"}}),
]


def every_record() -> set[type[Record]]:
    found: set[type[Record]] = set()
    todo = list(Record.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if "__init__" in cls.__dict__:
            found.add(cls)
    return found


def as_dataclass(cls: type[Record]) -> Any:
    """The frozen, slotted dataclass this record used to be (same fields, same defaults)."""
    params = list(inspect.signature(cls).parameters.values())
    fields = [
        (p.name, object, dataclasses.field(default=p.default))
        if p.default is not p.empty
        else (p.name, object)
        for p in params
    ]
    dc = dataclasses.make_dataclass(cls.__name__, fields, frozen=True, slots=True)
    dc.__qualname__ = cls.__qualname__
    return dc


def test_the_samples_cover_every_record() -> None:
    assert every_record() == {cls for cls, _, _ in SAMPLES}


@pytest.mark.parametrize(
    ("cls", "args", "kwargs"), SAMPLES, ids=lambda v: getattr(v, "__name__", "")
)
def test_a_record_behaves_as_the_dataclass_did(
    cls: type[Record], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    rec, twin = cls(*args, **kwargs), cls(*args, **kwargs)
    old = as_dataclass(cls)(*args, **kwargs)
    assert repr(rec) == repr(old)
    assert rec == twin and rec is not twin
    assert rec != old and rec != tuple(rec.__match_args__)
    assert cls.__match_args__ == old.__match_args__
    assert set(cls.__slots__) == set(cls.__match_args__)  # every field is an __init__ argument
    try:
        assert hash(rec) == hash(twin) == hash(old)
    except TypeError:  # an unhashable field (a dict, a memoryview of bytes is fine): as before
        with pytest.raises(TypeError):
            hash(old)
    match rec:
        case cls(first):
            assert first is getattr(rec, cls.__match_args__[0])
        case _:
            pytest.fail("positional match")


@pytest.mark.parametrize(
    ("cls", "args", "kwargs"), SAMPLES, ids=lambda v: getattr(v, "__name__", "")
)
def test_fields_are_final_and_events_are_frozen(
    cls: type[Record], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    for name in cls.__match_args__:
        assert str(cls.__annotations__[name]).startswith("Final["), (cls, name)
    rec = cls(*args, **kwargs)
    with pytest.raises(AttributeError):
        rec.not_a_field = 1  # type: ignore[attr-defined]
    assert issubclass(cls, Frozen)
    for name in cls.__match_args__:
        with pytest.raises(FrozenInstanceError, match=name):
            setattr(rec, name, None)
        with pytest.raises(FrozenInstanceError):
            delattr(rec, name)
    assert rec == cls(*args, **kwargs)


def outcome(f: Any, obj: object) -> str:
    try:
        return repr(f(obj))
    except Exception as exc:
        return type(exc).__name__


@pytest.mark.parametrize(
    ("cls", "args", "kwargs"), SAMPLES, ids=lambda v: getattr(v, "__name__", "")
)
def test_records_copy_and_pickle_as_the_dataclasses_did(
    cls: type[Record], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    rec, old = cls(*args, **kwargs), as_dataclass(cls)(*args, **kwargs)
    assert copy_module.copy(rec) == rec
    assert outcome(copy_module.deepcopy, rec) == outcome(copy_module.deepcopy, old)
    if outcome(pickle.dumps, (args, kwargs)) not in ("TypeError", "PicklingError"):
        # As its fields pickle (RequestError's errno does not survive, record or not).
        a, kw = pickle.loads(pickle.dumps((args, kwargs)))
        assert outcome(lambda r: pickle.loads(pickle.dumps(r)), rec) == repr(cls(*a, **kw))


def test_the_core_does_not_import_dataclasses() -> None:
    code = (
        "import sys\n"
        "import nbdcore.client, nbdcore.session, nbdcore.negotiate, nbdcore.sync.copy\n"
        "print(sorted(m for m in ('dataclasses', 'inspect', 'ast') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
