"""An agent session's WebSocket: what the sync and async connections share (the frames, where the
stream is, which replies answer which requests, what a close or a refused handshake means, when
to reconnect). The connections (``session.py``) only add the I/O.

The protocol (docs/sessions.md): the server sends ``ready`` first, then numbered events
(``seq``), and replies (``ack``, ``pong``, ``error``) to the client's ``task``, ``cancel`` and
``ping`` messages, matched by the ``id`` the client gave. Reconnecting with ``?after=<last seq>``
gets every later event exactly once; this side also drops any event it has had already.
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import re
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from . import _core
from .errors import E2AError, SessionDisconnected, SessionEnded, SessionError, SessionTakenOver
from .models import SessionEvent, SessionReady

CLOSE_ENDED = 4000        # the session ended; the close reason says why
CLOSE_TAKEN_OVER = 4001   # a newer connection to the session took it over
CLOSE_TOO_BIG = 1009      # a frame over the server's limit
MAX_FRAME = 4 << 20       # the server's limit on a client frame
ATTACHMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REPLY_TIMEOUT = 30.0      # for an ack or a pong
OPEN_TIMEOUT = 30.0       # the handshake and the ready message
STABLE = 10.0             # a connection that lived this long resets the count of failures in a row
RETRY_STATUSES = (502, 503, 504)  # a proxy in front of e2a, or e2a restarting
# Frames the server may send before we read them (backpressure past this: events are small).
MAX_QUEUE = 1024


class ReplyLost(Exception):
    """The connection was lost (and opened again) after a request was sent and before its reply
    came: the server may or may not have acted on it."""


class Closed(Exception):
    """This side closed the connection."""


def with_after(url: str, after: int) -> str:
    """``connect_url`` with ``after`` set (any other query parameter kept)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "after"]
    query.append(("after", str(int(after))))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def attachment_list(attachments: dict[str, bytes] | None) -> list[dict[str, str]] | None:
    if not attachments:
        return None
    out = []
    for name, content in attachments.items():
        if not isinstance(name, str) or not ATTACHMENT_NAME.match(name):
            raise E2AError(0, "invalid_attachment", f"attachment name {name!r}: a file name of letters, "
                           "digits, '.', '_' and '-', starting with a letter or digit, at most 128 "
                           "characters", "attachments")
        if isinstance(content, str):
            content = content.encode()
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise E2AError(0, "invalid_attachment", f"attachment {name!r}: bytes or str, not "
                           f"{type(content).__name__}", "attachments")
        out.append({"name": name, "content_base64": base64.b64encode(bytes(content)).decode()})
    return out


def error_reply(msg: dict[str, Any]) -> SessionError:
    code, message = str(msg.get("code") or "error"), str(msg.get("message") or "")
    if code == "session_ended":
        return SessionEnded(0, message or "the session has ended")
    return SessionError(0, code, message)


def handshake_error(status: int, body: bytes | None, session: str) -> SessionError:
    """The server refused the WebSocket with an HTTP answer (its usual error JSON, if any)."""
    code, message = None, None
    try:
        err = json.loads(body or b"")["error"]
        code, message = str(err["code"]), str(err.get("message", ""))
    except (ValueError, KeyError, TypeError):
        pass
    if status == 410:
        return SessionEnded(410, message or f"session {session} has ended")
    if status == 401:
        return SessionError(401, code or "unauthorized",
                            (message or "the session's JWT was refused") + " (a fresh JWT: "
                            "session_token(), POST /v1/sessions/{id}/token)")
    if status == 404:
        return SessionError(404, code or "not_found", message or f"no session {session}")
    text = (body or b"").decode(errors="replace").strip()[:500]
    return SessionError(status, code or f"http_{status}", message or text or f"HTTP {status}")


class SessionCore:
    """Where one session connection stands, whatever the I/O: the events taken in and not yet
    handed out, the replies waiting for their request, the terminal error once there is one."""

    def __init__(self, url: str, jwt: str, after: int = 0, session: str = ""):
        self.url = url
        self.jwt = jwt
        self.session = session or _session_from_url(url)
        self.received = int(after)   # the highest seq taken in: the next connection's ``after``
        self.last_seq = int(after)   # the highest seq handed out
        self.events: collections.deque[SessionEvent] = collections.deque()
        self.replies: dict[str | None, dict[str, Any]] = {}
        self.ready: SessionReady | None = None
        self.generation = 0          # connections opened so far
        self.failures = 0            # reconnects in a row that did not last
        self.opened_at = 0.0
        self.terminal: BaseException | None = None  # raised by every later call
        self.closing = False
        self._ids = itertools.count(1)

    def __repr__(self) -> str:  # never the JWT
        return f"SessionCore({self.session}, last_seq={self.last_seq})"

    # ---- connecting

    def connect_target(self) -> str:
        return with_after(self.url, self.received)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.jwt}", "User-Agent": "e2a-python-sdk"}

    def take_ready(self, raw: Any) -> None:
        """The first message of a new connection, which must be ``ready``."""
        msg = _parse(raw)
        if msg.get("type") != "ready":
            raise SessionError(0, "bad_message", f"the server's first message is not ready: {str(raw)[:200]!r}")
        self.ready = SessionReady.from_dict(msg)
        self.generation += 1
        self.opened_at = time.monotonic()

    # ---- requests

    def next_id(self) -> str:
        return f"c{next(self._ids)}"

    def task_frame(self, rid: str, text: str, attachments: dict[str, bytes] | None) -> str:
        frame = {"type": "task", "text": text, "id": rid}
        listed = attachment_list(attachments)
        if listed is not None:
            frame["attachments"] = listed
        out = json.dumps(frame)
        if len(out.encode()) > MAX_FRAME:
            raise E2AError(0, "frame_too_big", f"the task and its attachments make {len(out.encode())} "
                           f"bytes once encoded; a message is at most {MAX_FRAME} bytes (4 MiB)", "attachments")
        return out

    @staticmethod
    def frame(kind: str, rid: str) -> str:
        return json.dumps({"type": kind, "id": rid})

    def reply(self, rid: str, generation: int) -> dict[str, Any] | None:
        """The reply to request ``rid`` if it came (raising the error it carries), None while it
        may still come; ReplyLost if the connection it was sent on is gone."""
        msg = self.replies.pop(rid, None)
        if msg is None and self.replies.get(None) is not None:
            msg = self.replies.pop(None)  # the server could not read our id: ours is the one waiting
        if msg is not None:
            if msg.get("type") == "error":
                raise error_reply(msg)
            return msg
        if self.terminal is not None:
            raise self.terminal
        if self.generation != generation:
            raise ReplyLost()
        return None

    # ---- reading

    def take(self, raw: Any) -> None:
        """One message from the server: a numbered event (kept unless seen before), a reply (kept
        for its request) or a ready (after a reconnect, handled by the connection)."""
        msg = _parse(raw)
        if "seq" in msg and msg.get("seq") is not None:
            ev = SessionEvent.from_dict(msg)
            ev.seq = int(ev.seq)
            if ev.seq > self.received:
                self.received = ev.seq
                self.events.append(ev)
                self.failures = 0
            return
        kind = msg.get("type")
        if kind in ("ack", "pong", "error"):
            self.replies[msg.get("id")] = msg
            self.failures = 0
        elif kind == "ready":
            self.ready = SessionReady.from_dict(msg)
        # anything else is from a newer server: ignored

    def next_event(self) -> SessionEvent | None:
        """The next event taken in, if any; else the error that ended the connection, if any."""
        if (ev := self.pop_event()) is not None:
            return ev
        if self.terminal is not None:
            raise self.terminal
        return None

    def check_open(self) -> None:
        """Raise what ended the connection, if anything did."""
        if self.terminal is not None:
            raise self.terminal
        if self.closing:
            raise Closed()

    def pop_event(self) -> SessionEvent | None:
        if not self.events:
            return None
        ev = self.events.popleft()
        self.last_seq = ev.seq
        return ev

    # ---- closes and failures

    def on_close(self, exc: BaseException) -> BaseException | None:
        """The error that ends this connection for good after ``exc`` (a ConnectionClosed), or
        None if it is a drop worth reconnecting after. Stored: every later call raises it."""
        if self.closing:
            return Closed()
        rcvd = getattr(exc, "rcvd", None)
        sent = getattr(exc, "sent", None)
        code = rcvd.code if rcvd is not None else None
        reason = (rcvd.reason if rcvd is not None else "") or None
        err: BaseException | None = None
        if code == CLOSE_ENDED:
            err = SessionEnded(0, f"session {self.session} has ended" + (f" ({reason})" if reason else ""), reason)
        elif code == CLOSE_TAKEN_OVER:
            err = SessionTakenOver()
        elif CLOSE_TOO_BIG in (code, sent.code if sent is not None else None):
            err = SessionError(0, "frame_too_big", "a message was over the limit (4 MiB); the server "
                               "closed the connection")
        if err is not None:
            self.terminal = err
        return err

    def retry_pause(self, exc: BaseException) -> float:
        """The pause before reconnecting after ``exc``; raises the error to give up with when
        breaks keep coming."""
        if self.opened_at and time.monotonic() - self.opened_at > STABLE:
            self.failures = 0  # the last connection lived: this is a new run of failures
        self.opened_at = 0.0
        self.failures += 1
        if self.failures > _core.MAX_RECONNECTS:
            err = SessionDisconnected(0, "connection_lost", f"the connection to session {self.session} "
                                      f"was lost and {_core.MAX_RECONNECTS} reconnects failed: {exc}")
            self.terminal = err
            raise err from exc
        return min(_core.RETRY_PAUSE * 2 ** (self.failures - 1), 5.0)

    def refused(self, status: int, body: bytes | None) -> SessionError:
        err = handshake_error(status, body, self.session)
        self.terminal = err
        return err

    def closed_error(self) -> SessionDisconnected:
        return SessionDisconnected(0, "closed", f"the connection to session {self.session} is closed")


def retryable_status(status: int) -> bool:
    return status in RETRY_STATUSES


def deadline_left(deadline: float | None) -> float | None:
    """Seconds to ``deadline`` (None: no deadline); TimeoutError once it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError()
    return left


def wait_timeout(session: str, task_id: str, timeout: float) -> SessionError:
    return SessionError(0, "wait_timeout", f"task {task_id} of session {session} is still going after "
                        f"{timeout:g} s; it goes on: wait again, or cancel it")


def reply_timeout(session: str, kind: str) -> SessionError:
    return SessionError(0, "reply_timeout", f"session {session}: no answer to {kind} within {REPLY_TIMEOUT:g} s")


class TaskWatch:
    """run_task's reasoning, shared by both connections: which events are the task's (history of
    earlier tasks skipped), and when it is over."""

    def __init__(self, task_id: str, floor: int):
        self.task_id = task_id
        self.floor = floor  # events up to this seq came before the task was sent

    def wanted(self, ev: SessionEvent) -> bool:
        return ev.seq > self.floor and ev.task_id in (self.task_id, None)

    def finished(self, ev: SessionEvent) -> bool:
        return ev.type == "task_finished" and (
            ev.task_id == self.task_id or (ev.data or {}).get("task_id") == self.task_id)


def sent_task(before: dict | None, ready: SessionReady | None) -> str | None:
    """After a connection lost between sending a task and its ack: the task's id if the new
    connection's ``ready`` shows a task that was not there before (the server took ours), else
    None (send it again)."""
    now = ready.task if ready is not None else None
    if now and now.get("task_id") and now.get("task_id") != (before or {}).get("task_id"):
        return str(now["task_id"])
    return None


def _parse(raw: Any) -> dict[str, Any]:
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).decode()
    try:
        msg = json.loads(raw)
    except ValueError:
        raise SessionError(0, "bad_message", f"the server sent something that is not JSON: {raw[:200]!r}") from None
    if not isinstance(msg, dict):
        raise SessionError(0, "bad_message", f"the server sent a JSON {type(msg).__name__}, not an object")
    return msg


def _session_from_url(url: str) -> str:
    """ses_… from ws://host/v1/sessions/ses_…/ws (for messages only)."""
    parts = [p for p in urlsplit(url).path.split("/") if p]
    return parts[-2] if len(parts) >= 2 and parts[-1] == "ws" else url
