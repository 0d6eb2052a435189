"""The nbdgw client's core without a network: statuses in, exceptions out; stream messages
and failures in, resume decisions out. (The client against a real gateway is tested in
tests/gateway/test_client_*.py.)"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import crc32c
import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

import nbdgw
from nbdgw import _core, errors
from nbdgw.v1 import bitmap_service_pb2 as pb
from tests.unit.test_layout import graph


class FailedCall(grpc.RpcError):
    """What grpc raises for a failed call: a code, a message and trailers (as bytes)."""

    def __init__(self, code: grpc.StatusCode, message: str, *details: Any) -> None:
        self._code, self._message = code, message
        status = status_pb2.Status(code=code.value[0], message=message)
        for d in details:
            packed = any_pb2.Any()
            packed.Pack(d)
            status.details.append(packed)
        self._trailers = (("grpc-status-details-bin", status.SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> Any:
        return self._trailers


def info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain="nbdgw.dev", metadata=metadata)


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    return error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(seconds)))


def test_errors_by_code_and_reason() -> None:
    e = _core.error_from_rpc(
        FailedCall(
            grpc.StatusCode.FAILED_PRECONDITION,
            "cannot clear",
            info("GENERATION_MISMATCH", generation="g0", current_generation="g1"),
            error_details_pb2.PreconditionFailure(
                violations=[{"type": "GENERATION", "subject": "exports/d", "description": "why"}]
            ),
        )
    )
    assert type(e) is errors.GenerationMismatch
    assert (e.generation, e.current_generation) == ("g0", "g1")
    assert e.violations == (errors.PreconditionViolation("GENERATION", "exports/d", "why"),)
    assert str(e) == "FAILED_PRECONDITION: cannot clear [GENERATION_MISMATCH]"
    # A reason of another code does not change the class; an unknown reason keeps the code's.
    other = FailedCall(grpc.StatusCode.INTERNAL, "x", info("GENERATION_MISMATCH"))
    assert type(_core.error_from_rpc(other)) is errors.Internal
    new = FailedCall(grpc.StatusCode.NOT_FOUND, "x", info("NEW"))
    assert type(_core.error_from_rpc(new)) is errors.NotFound
    # No details at all (a proxy, a dead connection): the code alone.
    bare = _core.error_from_rpc(FailedCall(grpc.StatusCode.UNAVAILABLE, "down"))
    assert type(bare) is errors.Unavailable and bare.reason == "" and bare.retry_after is None


def test_every_code_has_a_class() -> None:
    for code in grpc.StatusCode:
        if code is not grpc.StatusCode.OK:
            cls = errors.error_class(code.name)
            assert issubclass(cls, errors.CallError)
            assert code.name in cls.codes, code


def test_every_reason_of_the_api_is_caught_by_its_code() -> None:
    """Every ErrorReason the proto names lands on a class of the code it documents."""
    documented = {
        "EXPORT_NOT_FOUND": errors.ExportNotFound,
        "BITMAP_NOT_FOUND": errors.BitmapNotFound,
        "RANGE_PAST_END": errors.OutOfRange,
        "INVALID_FIELD": errors.InvalidArgument,
        "CLEAR_NOT_SUPPORTED": errors.ClearNotSupported,
        "READ_ONLY": errors.ReadOnly,
        "GENERATION_MISMATCH": errors.GenerationMismatch,
        "GENERATIONS_NOT_SUPPORTED": errors.GenerationsNotSupported,
        "CLEAR_TOKEN_REQUIRED": errors.ClearTokenRequired,
        "CLEAR_TOKEN_INVALID": errors.ClearTokenInvalid,
        "HOST_UNAVAILABLE": errors.Unavailable,
        "UNAUTHENTICATED": errors.Unauthenticated,
        "PERMISSION_DENIED": errors.PermissionDenied,
        "RESOURCE_EXHAUSTED": errors.ResourceExhausted,
    }
    for reason, cls in documented.items():
        assert errors.error_class(cls.codes[0], reason) is cls
    names = {n.removeprefix("ERROR_REASON_") for n in pb.ErrorReason.keys()}  # noqa: SIM118
    assert set(documented) <= names


def test_retry_details() -> None:
    e = _core.error_from_rpc(
        FailedCall(
            grpc.StatusCode.UNAVAILABLE,
            "shutting down",
            info("GATEWAY_SHUTTING_DOWN", resume_offset="4096", resume_token="t4096"),
            retry_info(3),
        )
    )
    assert isinstance(e, errors.Unavailable)
    assert (e.retry_after, e.resume_offset, e.resume_token) == (3.0, 4096, "t4096")
    policy = nbdgw.Retry(attempts=3, backoff=0.5, max_backoff=1.5)
    assert [policy.delay(n, None) for n in (1, 2, 3, 4)] == [0.5, 1.0, 1.5, 1.5]
    assert policy.delay(1, 3.0) == 3.0  # the gateway's RetryInfo wins when longer


def msg(offset: int, next_offset: int, end: int = 100) -> pb.StreamExtentsResponse:
    return pb.StreamExtentsResponse(
        offset=offset, next_offset=next_offset, range_end=end, resume_token=f"t{next_offset}"
    )


def unavailable(**metadata: str) -> FailedCall:
    return FailedCall(grpc.StatusCode.UNAVAILABLE, "gone", info("HOST_UNAVAILABLE", **metadata))


def test_resume_uses_the_last_message_token() -> None:
    req = pb.StreamExtentsRequest(export="d", context="c", offset=10)
    resume = _core.StreamResume("StreamExtents", req, nbdgw.Retry(attempts=2, backoff=0.01))
    resume.accept(msg(10, 20))
    resume.accept(msg(20, 30))
    # The error's own token (say, of a message lost on the way) never replaces ours.
    event = resume.failed(unavailable(resume_offset="50", resume_token="t50"))
    assert (event.attempt, event.position, event.method) == (1, 30, "StreamExtents")
    assert resume.request.resume_token == "t30"
    assert req.resume_token == ""  # the caller's request is left alone
    resume.accept(msg(30, 40))  # progress: the count starts again
    resume.failed(unavailable())
    resume.failed(unavailable())
    with pytest.raises(errors.Unavailable) as exhausted:
        resume.failed(unavailable())
    assert exhausted.value.attempts == 3


def test_resume_before_the_first_message_takes_the_gateway_token() -> None:
    req = pb.StreamExtentsRequest(export="d", context="c", resume_token="mine")
    resume = _core.StreamResume("StreamExtents", req, nbdgw.Retry())
    assert resume.position is None  # a token given: the position is the gateway's to say
    resume.failed(unavailable(resume_offset="64", resume_token="t64"))
    assert (resume.request.resume_token, resume.position) == ("t64", 64)
    with pytest.raises(errors.StreamError, match="gap"):
        resume.accept(msg(80, 90))


def test_a_gap_or_a_repeat_is_refused() -> None:
    req = pb.StreamExtentsRequest(export="d", context="c", resume_offset=40)
    resume = _core.StreamResume("StreamExtents", req, nbdgw.Retry())
    with pytest.raises(errors.StreamError, match="repeat"):
        resume.accept(msg(30, 50))
    resume.accept(msg(40, 50))
    assert resume.request.resume_token == "t50" and not resume.request.HasField("resume_offset")
    with pytest.raises(errors.StreamError, match="without a resume position"):
        resume.accept(pb.StreamExtentsResponse(offset=50, next_offset=60))


def test_fatal_errors_are_not_retried() -> None:
    resume = _core.StreamResume("StreamExtents", pb.StreamExtentsRequest(), nbdgw.Retry())
    with pytest.raises(errors.InvalidArgument) as bad:
        resume.failed(FailedCall(grpc.StatusCode.INVALID_ARGUMENT, "bad", info("INVALID_FIELD")))
    assert bad.value.attempts == 1


def test_batches_rows_and_data() -> None:
    m = pb.StreamExtentsResponse(
        offset=0, next_offset=300, range_end=300, resume_token="t",
        offset_deltas=[0, 50, 0], lengths=[10, 20, 30], flags=[1, 1, 0],
        allocation=[pb.ALLOCATION_DATA, pb.ALLOCATION_ZERO, pb.ALLOCATION_DATA],
        data=b"a" * 10 + b"b" * 30,
    )  # fmt: skip
    batch = _core.batch_from(m)
    assert [(e.offset, e.length, e.flags, e.allocation.name) for e in batch.extents()] == [
        (0, 10, 1, "DATA"), (60, 20, 1, "ZERO"), (80, 30, 0, "DATA"),
    ]  # fmt: skip
    chunks = list(batch.chunks())
    assert [None if c.data is None else bytes(c.data) for c in chunks] == [
        b"a" * 10, None, b"b" * 30,
    ]  # fmt: skip
    assert chunks[0].data is not None and chunks[0].data.readonly
    with pytest.raises(errors.StreamError, match="carries no CRC32C"):
        _core.check_data(batch)
    m.data_crc32c = crc32c.crc32c(m.data)
    _core.check_data(_core.batch_from(m))
    # One byte changed in flight: the range is named, as DataCorrupted (a StreamError).
    m.data = m.data[:5] + b"X" + m.data[6:]
    with pytest.raises(errors.DataCorrupted, match=r"data of \[0, \d+\) is corrupt") as info:
        _core.check_data(_core.batch_from(m))
    assert info.value.offset == 0
    m.data = m.data[:-1]
    with pytest.raises(errors.StreamError, match="39 bytes of data for 40"):
        _core.check_data(_core.batch_from(m))


def test_importing_the_generated_code_stays_cheap() -> None:
    """The server imports nbdgw.v1; that must not load the client (PEP 562 lazy names)."""
    code = (
        "import sys, nbdgw.v1.bitmap_service_pb2, nbdgw;"
        "print(sorted(m for m in sys.modules if m.startswith('nbdgw.') and 'v1' not in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert nbdgw.Client.__module__ == "nbdgw._sync"
    assert set(nbdgw.__all__) <= set(dir(nbdgw))
    with pytest.raises(AttributeError):
        nbdgw.NoSuchThing  # noqa: B018


def test_the_client_stands_alone() -> None:
    """The client library needs nothing of the gateway or nbdcore, and they need nothing of
    it: it can ship alone, and the CLI can be built on it. Both sides share what defines the
    wire: the generated code (nbdgw.v1) and nbdgw.integrity (the stream digest and the
    compression names), a leaf that imports nothing of either."""
    edges = graph()
    wrong = sorted(
        (name, target)
        for name, targets in edges.items()
        for target in targets
        if name.startswith("nbdgw") != target.startswith("nbdgw")
        and not name.startswith("gateway.cli")
        and (name, target) != ("gateway.integrity", "nbdgw.integrity")
    )
    assert wrong == []
    assert edges["nbdgw.integrity"] == set()
    assert "nbdgw.integrity" in edges["gateway.integrity"]


def test_enum_values_newer_than_the_client_still_decode() -> None:
    """A newer gateway may answer with an enum value this client does not know."""
    export = _core.export_from(pb.Export(name="exports/d", state=1, clear_mode=9))
    assert export.clear_mode == 9 and export.clear_mode.name == "UNKNOWN_9"
    assert isinstance(export.clear_mode, nbdgw.ClearMode)
    assert export.state is nbdgw.ExportState.AVAILABLE


def test_limits_are_retried_only_when_they_pass() -> None:
    """RESOURCE_EXHAUSTED with RetryInfo (a rate limit) is waited out; without (the ledger's
    cap on a generation's intervals) it is not."""
    state = _core.RetryState(nbdgw.Retry(), _core.RETRYABLE_UNARY, "ClearRange")
    limited = FailedCall(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", info("RESOURCE_EXHAUSTED"), retry_info(2)
    )
    event = state.next_delay(_core.error_from_rpc(limited))
    assert (event.delay, event.method) == (2.0, "ClearRange")
    assert "ClearRange interrupted (RESOURCE_EXHAUSTED: slow down" in str(event)
    full = FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", info("RESOURCE_EXHAUSTED"))
    with pytest.raises(errors.ResourceExhausted):
        state.next_delay(_core.error_from_rpc(full))


def test_one_line_with_the_first_bad_field() -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[{"field": "length", "description": "must not be 0"}]
    )
    e = _core.error_from_rpc(
        FailedCall(grpc.StatusCode.INVALID_ARGUMENT, "bad\n request", info("INVALID_FIELD"), bad)
    )
    assert str(e) == "INVALID_ARGUMENT: bad request [INVALID_FIELD] (field length)"


def test_targets() -> None:
    """The forms the nbdgw command takes: HOST:PORT, http(s)://HOST:PORT; and unix:PATH."""
    from nbdgw._options import channel_spec, parse_target

    assert parse_target("127.0.0.1:50051") == ("127.0.0.1:50051", False)
    assert parse_target("[::1]:50051") == ("[::1]:50051", False)
    assert parse_target("http://gw:80/") == ("gw:80", False)
    assert parse_target("https://gw.example:443") == ("gw.example:443", True)
    assert parse_target("unix:/run/nbdgw.sock") == ("unix:/run/nbdgw.sock", False)
    for bad in ("gw", "gw:", ":50051", "gw:0", "gw:99999", "gw:x", "ftp://gw:1", "gw:1/x"):
        with pytest.raises(errors.ConfigurationError, match="HOST:PORT"):
            parse_target(bad)
    assert channel_spec("https://gw:443", token=None, tls=None).credentials is not None
    assert channel_spec("gw:443", token="t", tls=None).metadata == (("authorization", "Bearer t"),)


def test_a_stream_that_ends_early_with_ok_is_refused() -> None:
    resume = _core.StreamResume("StreamExtents", pb.StreamExtentsRequest(), nbdgw.Retry())
    resume.ended()  # nothing received: nothing to hold against the gateway
    resume.accept(msg(0, 50))
    with pytest.raises(errors.StreamError, match="ended at 50, before the end"):
        resume.ended()
    resume.accept(msg(50, 100))
    resume.ended()


def test_models_keep_their_message() -> None:
    m = pb.Export(name="exports/d", size_bytes=5, state=1)
    export = _core.export_from(m)
    assert export.raw is m and "raw" not in repr(export)
    assert export == _core.export_from(pb.Export(name="exports/d", size_bytes=5, state=1))


def test_timeouts() -> None:
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(errors.ConfigurationError, match="timeout"):
            nbdgw.Client("127.0.0.1:1", timeout=bad)
    nbdgw.Client("127.0.0.1:1", timeout=None).close()  # no deadline: on purpose


def test_received_data_is_decompressed_and_checked_in_place() -> None:
    """What the clients' StreamExtents deserializer and check do with a message's bytes: the
    data stays a view of them; zstd data is decoded; a bad frame or an unknown compression is
    refused with the range named."""
    import zstandard

    from nbdgw import _wire

    data = bytes(range(256)) * 64
    m = pb.StreamExtentsResponse(
        offset=0, next_offset=len(data), range_end=len(data), resume_token="t",
        offset_deltas=[0], lengths=[len(data)], flags=[0], allocation=[pb.ALLOCATION_DATA],
        data=data, data_crc32c=crc32c.crc32c(data),
    )  # fmt: skip
    raw = m.SerializeToString()
    got = _wire.parse_response(raw)
    checked = _core.message_data(got)
    assert checked.obj is raw and checked.readonly and bytes(checked) == data
    batch = _core.batch_from(got, checked)
    assert [bytes(c.data or b"") for c in batch.chunks()] == [data]

    m.data = zstandard.ZstdCompressor(write_content_size=True).compress(data)
    m.data_compression = "zstd"
    assert bytes(_core.message_data(_wire.parse_response(m.SerializeToString()))) == data
    m.data = m.data[:-3]
    with pytest.raises(errors.DataCorrupted, match=r"data of \[0, 16384\) is corrupt: its zstd"):
        _core.message_data(m)
    m.data_compression = "gzip"
    with pytest.raises(errors.StreamError, match="gzip-compressed"):
        _core.message_data(m)


def test_release_keeps_what_it_released() -> None:
    from nbdgw.v1 import snapshot_service_pb2 as spb

    fork = spb.ForkedBitmap(context="qemu:dirty-bitmap:b", granularity_bytes=4, dirty_bytes=8)
    resp = spb.ReleaseSnapshotResponse(
        merged=[fork],
        released=["exports/d0/snapshots/g", "exports/d1/snapshots/g"],
    )
    release = _core.release_from(resp)
    assert release.released == ("exports/d0/snapshots/g", "exports/d1/snapshots/g")
    assert release.merged == (nbdgw.ForkedBitmap("qemu:dirty-bitmap:b", 4, 8),)
    assert list(release) == list(release.merged) and release[0] == release.merged[0]
    assert release.raw is resp and "raw" not in repr(release)


def _digest_messages(content: bytes, cut: int) -> list[pb.StreamExtentsResponse]:
    """Two data messages over ``content`` at 0, cut at ``cut``, the last with the digest."""
    from nbdgw.integrity import RangeDigest

    size = len(content)
    out = []
    for lo, hi in ((0, cut), (cut, size)):
        m = pb.StreamExtentsResponse(offset=lo, next_offset=hi, range_end=size, resume_token="t")
        m.offset_deltas.append(0)
        m.lengths.append(hi - lo)
        m.allocation.append(pb.ALLOCATION_DATA)
        out.append(m)
    d = RangeDigest("sha256", 0)
    d.update(0, content)
    out[-1].digest = d.finish(size)
    return out


def test_digest_check_compares_at_the_last_message() -> None:
    content = bytes(range(256)) * 9000  # about 2.2 MiB: three digest blocks
    request = pb.StreamExtentsRequest(include_data=True, digest="sha256")
    first, last = _digest_messages(content, 1_000_000)
    check = _core.DigestCheck(request)
    check.add(first, memoryview(content)[:1_000_000])
    check.add(last, memoryview(content)[1_000_000:])  # matches: no error

    altered = bytearray(content)
    altered[1_500_000] ^= 1
    check = _core.DigestCheck(request)
    check.add(first, memoryview(altered)[:1_000_000])
    with pytest.raises(errors.DigestMismatch, match=r"\[0, 2304000\) is corrupt: its sha256") as e:
        check.add(last, memoryview(altered)[1_000_000:])
    assert (e.value.offset, e.value.next_offset) == (0, len(content))
    assert isinstance(e.value, errors.DataCorrupted) and "discard all" in str(e.value)
    check.ended()  # the verdict came (a mismatch)

    last.ClearField("digest")
    check = _core.DigestCheck(request)
    check.add(first, memoryview(content)[:1_000_000])
    with pytest.raises(errors.StreamError, match="ended without the digest it asked for"):
        check.add(last, memoryview(content)[1_000_000:])

    # A stream that ends OK before its last message gives no verdict: that is an error too.
    check = _core.DigestCheck(request)
    with pytest.raises(errors.StreamError, match="ended without its last message"):
        check.ended()
    check.add(first, memoryview(content)[:1_000_000])
    with pytest.raises(errors.StreamError, match="ended without its last message"):
        check.ended()
    # Rows that run past the message's end are a broken promise, not a ValueError.
    long = pb.StreamExtentsResponse()
    long.CopyFrom(first)
    long.lengths[0] += 4096
    with pytest.raises(errors.StreamError, match="past its next_offset"):
        _core.DigestCheck(request).add(long, memoryview(content)[: 1_000_000 + 4096])


def test_digest_check_refuses_what_it_cannot_check() -> None:
    with pytest.raises(errors.ConfigurationError, match="on the data a stream delivers"):
        _core.DigestCheck(pb.StreamExtentsRequest(digest="blake3"))
    with pytest.raises(errors.ConfigurationError, match="unknown digest"):
        _core.DigestCheck(pb.StreamExtentsRequest(include_data=True, digest="crc"))
    resumed = pb.StreamExtentsRequest(include_data=True, digest="blake3", resume_offset=4096)
    with pytest.raises(errors.ConfigurationError, match="earlier run"):
        _core.DigestCheck(resumed)
    with pytest.raises(errors.ConfigurationError, match="check_digest without a digest"):
        _core.DigestCheck(pb.StreamExtentsRequest(include_data=True))
    base: dict[str, Any] = {
        "offset": 0,
        "length": None,
        "filter": nbdgw.ExtentFilter.ALL,
        "merge_allocation": False,
        "include_data": True,
        "max_extents_per_message": 0,
        "resume_token": "",
    }
    with pytest.raises(errors.ConfigurationError, match="compression_level must be 1 to 19"):
        _core.stream_request("d", "c", **base, compression="zstd", compression_level=20)
    ok = _core.stream_request("d", "c", **base, compression="zstd", compression_level=19)
    assert (ok.compression, ok.compression_level) == ("zstd", 19)
