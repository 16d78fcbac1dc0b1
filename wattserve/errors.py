"""Domain errors shared by every layer.

Workers raise these inside Ray actors; Ray re-raises them in the gateway as instances of the
same class (``RayTaskError.as_instanceof_cause``), and exactly one mapping per transport turns
them into status codes (``runtime/api/interceptors.py``: the gRPC interceptor and the HTTP
error body of the OpenAI-compatible API). Keep constructors to a single message
argument so they pickle across processes.
"""

from __future__ import annotations


class WattserveError(Exception):
    """Base class. ``grpc_code`` names the ``grpc.StatusCode`` member the gRPC API answers with,
    ``http_status`` the status the HTTP API answers with."""

    grpc_code = "INTERNAL"
    http_status = 500

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = dict(details)

    def __reduce__(self):  # keep details across pickling (Ray, multiprocessing)
        return (_rebuild, (type(self), self.message, self.details))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[WattserveError], message: str, details: dict) -> WattserveError:
    return cls(message, **details)


class InvalidRequest(WattserveError):
    """The caller sent something we cannot serve as asked; the message says what to fix."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 400


class UnknownExpert(InvalidRequest):
    """The request named an expert (an OpenAI ``model``) this server does not have."""

    http_status = 404


class RequestTooLarge(InvalidRequest):
    """The request body or message is over this server's size limit (the message names it).
    The caller's error, not a busy server: gRPC answers INVALID_ARGUMENT, not RESOURCE_EXHAUSTED."""

    http_status = 413


class QueueFull(WattserveError):
    """Admission refused because a bounded queue is full; ``details['retry_after_ms']`` hints."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429


class NoHealthyExpert(WattserveError):
    """No replica that could serve the request is healthy right now."""

    grpc_code = "UNAVAILABLE"
    http_status = 503


class ShuttingDown(WattserveError):
    """The server is shutting down: it takes no new request, or cut a stream after its grace period."""

    grpc_code = "UNAVAILABLE"
    http_status = 503


class ExpertUnavailable(WattserveError):
    """An expert died or its engine failed while serving; not the caller's fault."""

    grpc_code = "UNAVAILABLE"
    http_status = 503


class EngineDead(ExpertUnavailable):
    """The engine loop of an expert stopped and cannot take work until the actor restarts."""


class DeadlineExceeded(WattserveError):
    """The request's deadline passed before it finished."""

    grpc_code = "DEADLINE_EXCEEDED"
    http_status = 504


class RequestAborted(WattserveError):
    """The request was cancelled by its caller or an operator."""

    grpc_code = "CANCELLED"
    http_status = 499


class ConfigError(WattserveError):
    """A configuration file or value is invalid; the message names the file and the key."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 400


class ModelSourceError(WattserveError):
    """A model could not be located or prepared (missing path, offline hub, bad package)."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 500


class ClusterUnavailable(WattserveError):
    """Ray could not be started or joined (the address is wrong, or its processes did not come up)."""

    grpc_code = "UNAVAILABLE"
    http_status = 503


class DeviceError(WattserveError):
    """A device backend could not be opened or read (no driver, no permission)."""

    grpc_code = "UNAVAILABLE"
    http_status = 503


class BudgetInfeasible(WattserveError):
    """No expert can serve the request within its energy/latency budget; ``details`` names the
    cheapest budget that would be feasible (``cheapest_energy_j``, ``cheapest_latency_ms``).

    A request the caller must change (a larger budget), never one to retry as is: HTTP 400, which
    OpenAI clients raise as ``BadRequestError`` (a 412 is an untyped ``APIStatusError`` there)."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 400


class BudgetExhausted(WattserveError):
    """A tenant's or the cluster's energy budget for the current window is used up;
    ``details['retry_after_ms']`` says when the window frees enough of it."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429


class ActuationUnavailable(DeviceError):
    """A device cannot be capped: the backend has no clock or power-limit control, the GPU does
    not support it, or the process lacks permission. Permanent for that device until an operator
    acts; the power governor reports it instead of retrying."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 412


class FeatureDisabled(WattserveError):
    """The operator asked for a feature this server runs without (e.g. the power governor)."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 412


class GovernorUnavailable(WattserveError):
    """The power governor actor did not answer (restarting or dead); caps stay where they are."""

    grpc_code = "UNAVAILABLE"
    http_status = 503


class Unauthenticated(WattserveError):
    """No credential, or one this server does not know. The message never says which."""

    grpc_code = "UNAUTHENTICATED"
    http_status = 401


class PermissionDenied(WattserveError):
    """A valid credential that may not do this (a client key on an operator method, or a
    request naming another tenant than its key's)."""

    grpc_code = "PERMISSION_DENIED"
    http_status = 403


class ExitCalibrationError(WattserveError):
    """Early-exit thresholds or adapters are missing, malformed, or were made for another model
    or exit layout; the message says what to recalibrate."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 412


class NotFound(WattserveError):
    """The request names something this server does not know (or no longer remembers), e.g.
    feedback for a request id that never finished here or was forgotten."""

    grpc_code = "NOT_FOUND"
    http_status = 404


class AlreadyRecorded(WattserveError):
    """The request would record something a second time (feedback counts once per request id)."""

    grpc_code = "ALREADY_EXISTS"
    http_status = 409
