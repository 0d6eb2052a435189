"""Gateway errors in the CLI's words: a request field becomes the flag (or argument) of the
command that set it, an RPC the command that calls it; one line with its [REASON]."""

from __future__ import annotations

from google.rpc import error_details_pb2

from gateway.cli.common import cli_words, describe_call_error
from nbdgw import errors


def bad_request(message: str, *fields: str, reason: str = "INVALID_FIELD") -> errors.CallError:
    detail = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description="bad") for f in fields
        ]
    )
    return errors.InvalidArgument(
        message, code="INVALID_ARGUMENT", reason=reason, details=(detail,)
    )


def test_fields_become_the_commands_flags() -> None:
    exc = bad_request("invalid request: offset: bad; length: bad", "offset", "length")
    assert describe_call_error(exc, "nbdgw bitmap map") == (
        "INVALID_ARGUMENT: invalid request: --offset: bad; --length: bad [INVALID_FIELD]"
    )


def test_a_field_a_command_sets_otherwise_names_its_argument() -> None:
    exc = bad_request("invalid request: generation: longer than 256 bytes", "generation")
    assert describe_call_error(exc, "nbdgw export generation") == (
        "INVALID_ARGUMENT: invalid request: NAME: longer than 256 bytes [INVALID_FIELD]"
    )
    assert describe_call_error(exc, "nbdgw bitmap clear") == (
        "INVALID_ARGUMENT: invalid request: --generation: longer than 256 bytes [INVALID_FIELD]"
    )


def test_a_field_the_message_does_not_name_is_added_once() -> None:
    exc = bad_request("the range is empty", "length")
    assert describe_call_error(exc, "nbdgw bitmap clear") == (
        "INVALID_ARGUMENT: the range is empty [INVALID_FIELD] (--length)"
    )


def test_rpcs_and_quoted_fields_in_messages() -> None:
    text = (
        "name the generation the range was copied from in 'generation'; set 'generation' in"
        " the configuration or call SetExportGeneration; see 'g1'"
    )
    assert cli_words(text, "nbdgw bitmap clear") == (
        "name the generation the range was copied from in --generation; set"
        " 'generation = NAME' in its [[exports]] table or call 'nbdgw export generation';"
        " see 'g1'"
    )


def test_one_line_whatever_the_message() -> None:
    exc = errors.FailedPrecondition(
        "first\nsecond  line", code="FAILED_PRECONDITION", reason="CLEAR_NOT_SUPPORTED"
    )
    assert describe_call_error(exc, "nbdgw bitmap clear") == (
        "FAILED_PRECONDITION: first second line [CLEAR_NOT_SUPPORTED]"
    )


def test_what_to_do_next_comes_before_the_reason() -> None:
    exc = errors.NotFound("export 'nosuch' not found", code="NOT_FOUND", reason="EXPORT_NOT_FOUND")
    assert describe_call_error(exc, "nbdgw bitmap list") == (
        "NOT_FOUND: export 'nosuch' not found ('nbdgw export list' lists the exports)"
        " [EXPORT_NOT_FOUND]"
    )
    assert cli_words(
        "no token: send the metadata 'authorization: Bearer TOKEN'", "nbdgw export list"
    ) == ("no token: give --token TOKEN (or $NBDGW_TOKEN)")
