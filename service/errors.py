"""The service's typed failures, the one function that maps any failure to a gRPC status code and message, and
the one way a user's value is quoted (clipped, escaped) in a message or a log line."""

from __future__ import annotations

import logging
import traceback

import grpc

log = logging.getLogger("gptserve.server")

EXCERPT_CHARACTERS = 32  # of a user's value quoted in a message
# Of a whole status message: far below gRPC's 8 KiB metadata limit, so a message is never itself the error.
MAX_MESSAGE_CHARACTERS = 512


def clip(value: str, limit: int = EXCERPT_CHARACTERS) -> str:
    """`value` as a message quotes it: repr-escaped (no raw newlines or control characters reach a log line) and,
    past `limit` characters, cut short with its length."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


class ServiceError(Exception):
    """A failure the client should see as it is: its message is written for the client."""

    code = grpc.StatusCode.INTERNAL


class InvalidRequest(ServiceError):
    """A request field out of range; the message names the field (its path in the gRPC request, which the HTTP
    API renames to its own) and what it allows."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


class QueueFull(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotServing(ServiceError):
    """The model is still loading, or the server is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class StalledReader(ServiceError):
    """A stream whose client read nothing for --stall-seconds: ended, so its slot and cache are free."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class EngineFailure(ServiceError):
    """The engine raised while running this request; the scheduler went on with the others."""

    code = grpc.StatusCode.INTERNAL


class ConfigError(ValueError):
    """A setting a server (or client) cannot start with. `setting` names it (a ServerConfig field, or a flag);
    the message is one line for a terminal."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting, self.problem = setting, problem


def status_for(error: BaseException, request_id: str | None = None) -> tuple[grpc.StatusCode, str]:
    """The status a failure is reported with. Anything not ours is a bug: logged with its stack, INTERNAL to the
    client, who is told the request id to quote. Every message is cut to MAX_MESSAGE_CHARACTERS, whatever a value
    in it ran to."""
    if isinstance(error, ServiceError):
        return error.code, _shorten(str(error))
    # Its message is clipped, not printed whole: it may quote a user's value.
    log.error("unexpected error while serving a request: %s: %s\n%s", type(error).__name__,
              _shorten(str(error)), "".join(traceback.format_tb(error.__traceback__)).rstrip())
    which = f" (request {request_id})" if request_id else ""
    return grpc.StatusCode.INTERNAL, f"engine failure{which}; the details are in the server log"


def _shorten(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARACTERS:
        return message
    return f"{message[:MAX_MESSAGE_CHARACTERS - 32]}... ({len(message)} characters)"
