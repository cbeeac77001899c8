"""The one exception tree of Swarm.

::

    SwarmError
    ├── RetryableError            another server or a later attempt may succeed
    │   ├── ServerUnavailable     a peer did not answer, closed the stream, or is gone
    │   └── ServerBusy            a peer is out of cache or over its queue limits
    └── FatalError                retrying the same request cannot help
        ├── BadRequest            the request broke the protocol (shape, dtype, blocks, lengths)
        │   ├── UnknownSession    a step names a session the server does not hold
        │   └── SessionLengthExceeded
        ├── MissingBlocksError    no online server holds some blocks of the model
        ├── ProtocolVersionError  the peer speaks an incompatible protocol version
        ├── ModelError            a model cannot be loaded or is not supported
        └── ConfigError           a flag or argument has a bad value

Errors cross the wire as ``code + message`` (:func:`to_wire` / :func:`from_wire`) and are raised
on the other side as the same class.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Base class of every error Swarm raises on purpose."""

    code = "swarm_error"


class RetryableError(SwarmError):
    code = "retryable"


class ServerUnavailable(RetryableError):
    code = "server_unavailable"


class ServerBusy(RetryableError):
    code = "server_busy"


class FatalError(SwarmError):
    code = "fatal"


class BadRequest(FatalError):
    code = "bad_request"


class UnknownSession(BadRequest):
    code = "unknown_session"


class SessionLengthExceeded(BadRequest):
    code = "session_length_exceeded"


class MissingBlocksError(FatalError):
    code = "missing_blocks"


class ProtocolVersionError(FatalError):
    code = "protocol_version"


class ModelError(FatalError):
    code = "model_error"


class ConfigError(FatalError):
    code = "config_error"


_BY_CODE: dict[str, type[SwarmError]] = {
    cls.code: cls
    for cls in (
        SwarmError,
        RetryableError,
        ServerUnavailable,
        ServerBusy,
        FatalError,
        BadRequest,
        UnknownSession,
        SessionLengthExceeded,
        MissingBlocksError,
        ProtocolVersionError,
        ModelError,
        ConfigError,
    )
}


def to_wire(error: BaseException) -> tuple[str, str]:
    """Returns ``(code, message)`` for an exception; errors that are not ours become ``swarm_error``."""
    if isinstance(error, SwarmError):
        return error.code, str(error)
    return SwarmError.code, f"{type(error).__name__}: {error}"


def from_wire(code: str, message: str) -> SwarmError:
    """Rebuilds the exception a peer reported; an unknown code becomes a plain :class:`SwarmError`."""
    return _BY_CODE.get(code, SwarmError)(message)
