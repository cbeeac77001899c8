"""Errors at the HTTP edge: OpenAI's error shape, and the one place Swarm's exceptions get a status.

An :class:`ApiError` carries the HTTP status, OpenAI's ``type`` and ``code``, the message and the
request field it is about (``param``). :func:`from_exception` decides the status of anything else
raised while serving a request; nothing below the edge knows about HTTP.
"""

from __future__ import annotations

import logging
from typing import Any

from swarm.errors import (BadRequest, MissingBlocksError, RetriesExhausted, RetryableError, SessionLengthExceeded,
                          SwarmError)

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 422: "invalid_request_error", 503: "service_unavailable_error"}


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def invalid(param: str, message: str, status: int = 400) -> ApiError:
    """A bad request field: 400 (or 422 for a value of the wrong type), naming the field."""
    return ApiError(status, f"{param}: {message}", param=param,
                    code="invalid_type" if status == 422 else "invalid_value")


def from_exception(error: BaseException) -> ApiError:
    """The status of an exception raised while serving: the client's fault, the swarm's, or a bug here."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, MissingBlocksError):
        return ApiError(503, str(error), code="missing_blocks")
    if isinstance(error, (RetryableError, RetriesExhausted)):
        return ApiError(503, f"the swarm could not serve this request: {error}", code="swarm_unavailable")
    if isinstance(error, SessionLengthExceeded):
        return ApiError(400, str(error), param="max_tokens", code="context_length_exceeded")
    if isinstance(error, BadRequest):  # a request this API built and a server refused: a bug here, or a peer's
        logger.error("A server refused a request of this API: %s", error)
        return ApiError(500, f"a server refused this API's request: {error}", code="swarm_error")
    if isinstance(error, SwarmError):
        logger.error("Serving a request failed: %s", error)
        return ApiError(500, str(error), code="swarm_error")
    logger.error("Serving a request failed", exc_info=error)
    return ApiError(500, f"internal error ({type(error).__name__}); the API's log has the details",
                    code="internal_error")
