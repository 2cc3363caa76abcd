"""OpenAI error objects: `{"error": {"message", "type", "param", "code"}}` with the status a client expects.

Each failure the frontend decides on is its own exception type, so the HTTP status, the error type
and `Retry-After` are chosen by type, never by reading message text.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status = 500
    type = "InternalServerError"
    retry_after: int | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class BadRequest(ApiError):
    status = 400
    type = "BadRequestError"


class Unauthorized(ApiError):
    status = 401
    type = "AuthenticationError"


class ModelNotFound(ApiError):
    status = 404
    type = "NotFoundError"


class NotFound(ApiError):
    status = 404
    type = "NotFoundError"


class BodyTooLarge(ApiError):
    status = 413
    type = "RequestTooLargeError"


class WorkerFailed(ApiError):
    """The worker reported an error of its own (not a bad request)."""

    status = 500
    type = "InternalServerError"


class NoWorker(ApiError):
    """Nothing serves the model right now (starting, or every instance gone)."""

    status = 503
    type = "ServiceUnavailableError"
    retry_after = 5


class WorkerSilent(ApiError):
    """A worker took the request and went silent past the request timeout."""

    status = 504
    type = "GatewayTimeoutError"


class ModelUnavailable(ApiError):
    """A registered model whose OpenAI layer could not be built (its configuration: the frontend's log)."""

    status = 500
    type = "InternalServerError"
