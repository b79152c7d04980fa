"""The one exception type of the SDK and the mapping from HTTP error responses to it."""

from __future__ import annotations

import httpx


class E2AError(Exception):
    """An error reported by the server (or by the SDK itself, then with ``status == 0``).

    ``code`` is the server's snake_case code (e.g. ``not_found``) and is what callers should match on;
    ``field`` names the offending request field when the server knows it.
    """

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, message={self.message!r}, field={self.field!r})"


class InsufficientCredits(E2AError):
    """402 ``insufficient_credits``: the balance cannot pay a new sandbox's (or session's) first
    minute. The message says the balance and the price; buy credits (``client.billing.checkout``,
    ``e2a credits buy``) or turn on auto top-up. An E2AError like any other: matching on
    ``code`` works as well."""


class ResumeFailed(E2AError):
    """503 ``resume_failed``: restoring a paused sandbox failed. It is still paused (nothing was
    lost), and calling ``resume`` again may work. An E2AError: matching on ``code`` works too."""


# Codes the server answers with that have a class of their own (all E2AErrors).
ERRORS: dict[str, type[E2AError]] = {"insufficient_credits": InsufficientCredits,
                                     "resume_failed": ResumeFailed}


def error_from_response(resp: httpx.Response) -> E2AError:
    """Build an E2AError from a 4xx/5xx response whose body has already been read (of the class
    ``ERRORS`` names for its code, if any).

    Proxies and crashed servers do not always answer with the documented error JSON, so anything
    else is kept as ``http_<status>`` with the start of the body as message.
    """
    try:
        err = resp.json()["error"]
        cls = ERRORS.get(str(err["code"]), E2AError)
        return cls(resp.status_code, str(err["code"]), str(err.get("message", "")), err.get("field"))
    except (ValueError, KeyError, TypeError):
        text = resp.text.strip()[:500] or resp.reason_phrase
        return E2AError(resp.status_code, f"http_{resp.status_code}", text)


def check(resp: httpx.Response) -> httpx.Response:
    """Raise E2AError for an error response (body must be read); return it otherwise."""
    if resp.is_error:
        raise error_from_response(resp)
    return resp


class SessionError(E2AError):
    """An agent session's WebSocket refused something: an ``error`` reply to a message (``code``
    bad_message, task_running, no_task, invalid_attachment, ...; ``status`` 0), or the handshake
    (``status`` 401: the JWT is missing, bad or expired; 404: no such session)."""


class SessionEnded(SessionError):
    """The session is over (close code 4000, a 410 at the handshake, or a ``session_ended``
    reply). ``reason``: ttl_expired, deleted, sandbox_ended, server_restart, or None if the server
    did not say."""

    def __init__(self, status: int, message: str, reason: str | None = None):
        super().__init__(status, "session_ended", message)
        self.reason = reason


class SessionTakenOver(SessionError):
    """A newer connection to the same session took it over (close code 4001): this one is
    closed and is not reconnected, so that two clients do not keep taking it from each other."""

    def __init__(self, message: str = "a newer connection to this session took it over"):
        super().__init__(0, "session_taken_over", message)


class SessionDisconnected(SessionError):
    """The connection was lost and could not be opened again (``code`` connection_lost), or
    was closed by this side (``code`` closed)."""
