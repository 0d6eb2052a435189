"""Every nbdcore exception survives pickling (multiprocessing, process pools) as itself: same
type, text and attributes. Those whose __init__ formats its arguments into the text need their
own __reduce__; the others pickle as plain exceptions do."""

from __future__ import annotations

import inspect
import pickle

import pytest

from nbdcore import exceptions
from nbdcore.constants import Opt

SAMPLES: list[BaseException] = [
    exceptions.NBDError("x"),
    exceptions.UsageError("bad call"),
    exceptions.ServerProtocolError("reply for an unknown cookie"),
    exceptions.ClientProtocolError("request past the end"),
    exceptions.HandshakeError("no"),
    exceptions.UnsupportedServerError("oldstyle"),
    exceptions.OptionError(Opt.GO, 0x80000001, "no such export"),
    exceptions.OptionError(Opt.STARTTLS, 0x80000005),
    exceptions.RequestError(28, "disk full", 4096),
    exceptions.RequestError(5),
    exceptions.RequestError(12345, "an errno NBD does not name"),
    exceptions.ConnectionLostError("the server closed the connection"),
    exceptions.NBDTimeoutError("no answer within 30 s"),
    exceptions.URIError("unsupported scheme"),
]


def test_every_exception_class_is_sampled() -> None:
    classes = {
        c
        for _, c in inspect.getmembers(exceptions, inspect.isclass)
        if issubclass(c, BaseException) and c.__module__ == exceptions.__name__
    }
    assert classes - {exceptions.ProtocolError} <= {type(e) for e in SAMPLES}


@pytest.mark.parametrize("exc", SAMPLES, ids=lambda e: type(e).__name__)
def test_pickle_round_trip(exc: BaseException) -> None:
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc) and back.args == exc.args
    assert vars(back) == vars(exc)
