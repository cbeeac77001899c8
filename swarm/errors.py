"""The one exception tree of Swarm, and whose fault each error is.

::

    SwarmError
    ├── RetryableError            another server or a later attempt may succeed
    │   ├── ServerUnavailable     a peer did not answer, closed the stream, or is gone
    │   │   └── ServerUnreachable a peer cannot be dialed (refused, no route): dead until it announces again
    │   ├── ServerError           a peer failed on a valid request (a bug, out of memory) or answered garbage
    │   │   ├── ServerRefused     a peer answered a request this client checked with a fatal error code
    │   │   └── WrongResult       a peer's outputs disagree with another server's recomputation of them
    │   └── ServerBusy            a peer is out of cache or over its queue limits
    └── FatalError                retrying the same request cannot help
        ├── BadRequest            the request broke the protocol (shape, dtype, blocks, lengths)
        │   ├── UnknownSession    a step names a session the server does not hold
        │   └── SessionLengthExceeded
        ├── MissingBlocksError    no online server holds some blocks of the model
        ├── AccessDenied          a private swarm's server refused a stream without proof of its key
        ├── ProtocolVersionError  the peer speaks an incompatible protocol version
        ├── ModelError            a model cannot be loaded or is not supported
        ├── ConfigError           a flag or argument has a bad value
        └── RetriesExhausted      the client's retry policy gave up (:mod:`swarm.retry`); never on the wire

Three kinds of failure, decided by :func:`is_retryable`:

- the *client's* fault: a :class:`FatalError` raised on this side (a request the client checked
  before sending, a missing model): never retried;
- a *server's* fault: :class:`ServerUnavailable`, :class:`ServerError`, and every error reply. A
  server that answers a request the client checked with a fatal code (``bad_request``,
  ``unknown_session``...) may be broken or hostile: :mod:`swarm.transport` raises its reply as
  :class:`ServerRefused`, and the client bans that server and retries elsewhere; only when no server
  is left that has not refused the request does the client raise the refusal itself
  (:meth:`ServerRefused.refusal`, :mod:`swarm.retry`). An error reply whose code this peer does not
  know (a newer peer's, or an older server's plain ``swarm_error``) is the server's fault too;
- *transient*: :class:`ServerBusy`: retried later or elsewhere.

A server answers an exception it did not anticipate with :class:`ServerError` and logs it at ERROR
(``server/handler.py``); it never passes a bug off as the client's :class:`BadRequest`.

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


class ServerError(RetryableError):
    """A server failed while handling a valid request, or answered with a malformed message: its fault."""

    code = "server_error"


class ServerUnreachable(ServerUnavailable):
    """A peer could not be dialed at all (connection refused, no route): its process is gone. The client
    treats it as dead until it announces itself again in the DHT (a restart does at once)."""

    code = "server_unreachable"


class ServerRefused(ServerError):
    """A peer answered with a fatal error code (``bad_request``, ``unknown_session``, ...) a request that this
    client checked before sending: the peer may be broken or hostile, so it is banned and another server
    tried. :meth:`refusal` is the error the peer sent, raised when every server refuses the request."""

    code = "server_refused"

    def __init__(self, message: str, refusal: SwarmError | None = None):
        super().__init__(message)
        self._refusal = refusal

    def refusal(self) -> SwarmError:
        return self._refusal if self._refusal is not None else FatalError(str(self))


class WrongResult(ServerError):
    """A peer's outputs disagree with another server's recomputation of the same blocks on the same inputs
    beyond the tolerance of their dtypes (:mod:`swarm.verification`)."""

    code = "wrong_result"


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


class AccessDenied(FatalError):
    code = "access_denied"


class ProtocolVersionError(FatalError):
    code = "protocol_version"


class ModelError(FatalError):
    code = "model_error"


class ConfigError(FatalError):
    code = "config_error"


class RetriesExhausted(FatalError):
    """Raised by :class:`swarm.retry.Attempts` when a call's retry budget is spent; its message says
    which blocks were done and where the call failed. ``errors`` holds every failure, oldest first."""

    code = "retries_exhausted"

    def __init__(self, message: str, errors: tuple[str, ...] = ()):
        super().__init__(message)
        self.errors = errors


_BY_CODE: dict[str, type[SwarmError]] = {
    cls.code: cls
    for cls in (
        SwarmError,
        RetryableError,
        ServerUnavailable,
        ServerUnreachable,
        ServerError,
        ServerRefused,
        WrongResult,
        ServerBusy,
        FatalError,
        BadRequest,
        UnknownSession,
        SessionLengthExceeded,
        MissingBlocksError,
        AccessDenied,
        ProtocolVersionError,
        ModelError,
        ConfigError,
        RetriesExhausted,
    )
}


def is_retryable(error: BaseException) -> bool:
    """True if another attempt (on another server, or later) may succeed: the server's fault or a
    transient one. A :class:`SwarmError` that is neither retryable nor fatal came from a peer that
    knows codes this one does not (or an older server's plain ``swarm_error``): the server's fault.
    Anything that is not a :class:`SwarmError` is a bug on this side and is never retried."""
    return isinstance(error, SwarmError) and not isinstance(error, FatalError)


def to_wire(error: BaseException) -> tuple[str, str]:
    """Returns ``(code, message)`` for an exception; errors that are not ours become ``swarm_error``."""
    if isinstance(error, SwarmError):
        return error.code, str(error)
    return SwarmError.code, f"{type(error).__name__}: {error}"


def from_wire(code: str, message: str) -> SwarmError:
    """Rebuilds the exception a peer reported; an unknown code becomes a plain :class:`SwarmError`."""
    return _BY_CODE.get(code, SwarmError)(message)


def server_reply_error(code: str, message: str, peer_id: str) -> SwarmError:
    """The exception to raise on the client for an error reply of server ``peer_id``: the server's fault,
    always. A fatal code becomes :class:`ServerRefused` carrying the server's own error."""
    error = from_wire(code, message)
    if is_retryable(error):
        return error
    return ServerRefused(f"server {peer_id} refused the request ({code}): {message}", refusal=error)
