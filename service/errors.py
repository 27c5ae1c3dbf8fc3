"""The service's typed failures, and the one function that maps any failure to a gRPC status code and message."""

from __future__ import annotations

import logging

import grpc

log = logging.getLogger("gptserve.server")


class ServiceError(Exception):
    """A failure the client should see as it is: its message is written for the client."""

    code = grpc.StatusCode.INTERNAL


class InvalidRequest(ServiceError):
    """A request field out of range; the message names the field and what it allows."""

    code = grpc.StatusCode.INVALID_ARGUMENT


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


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a failure is reported with. Anything not ours is a bug: logged in full, INTERNAL to the client."""
    if isinstance(error, ServiceError):
        return error.code, str(error)
    log.error("unexpected error while serving a request", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the server log"
