"""What the session tests share (tests/e2e/test_sessions.py, tests/security/
test_session_attacks.py): creating bundles and sessions, a WebSocket client of the protocol,
and a listener standing for a private service."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
import uuid

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

MODEL = "claude-sonnet-5-5"


def bundle(http, name: str, values: dict) -> None:
    r = http.post("/v1/tenants/me/secrets", json={"name": name, "values": values})
    assert r.status_code == 201, r.text


def create(http, **body) -> dict:
    """A session (201 asserted): its ticket."""
    body.setdefault("user_id", "end-user-" + uuid.uuid4().hex[:8])
    r = http.post("/v1/sessions", json=body, timeout=180)
    assert r.status_code == 201, r.text
    return r.json()


class Conn:
    """One WebSocket connection to a session, reading JSON messages."""

    def __init__(self, ticket: dict, after: str | int | None = None, token: str | None = None):
        url = ticket["connect_url"] + (f"?after={after}" if after is not None else "")
        self.ws = connect(url, additional_headers={
            "Authorization": f"Bearer {token or ticket['jwt']}"}, open_timeout=30,
            max_size=None)
        self.ready = self.recv()
        assert self.ready["type"] == "ready", self.ready
        self.task_id: str | None = None  # the task this connection sent last

    def recv(self, timeout: float = 60) -> dict:
        return json.loads(self.ws.recv(timeout=timeout))

    def send(self, **msg) -> None:
        self.ws.send(json.dumps(msg))

    def reply(self, kind: str, timeout: float = 60) -> tuple[dict, list[dict]]:
        """The next reply of `kind` (no seq), and the numbered events that came before it."""
        events = []
        while True:
            m = self.recv(timeout)
            if "seq" in m:
                events.append(m)
            elif m["type"] == kind:
                return m, events
            else:
                raise AssertionError(f"expected {kind}, got {m}")

    def until_finished(self, timeout: float = 120) -> list[dict]:
        """Numbered events up to and including the task_finished of the task this connection
        sent (or, if it sent none, the next task_finished): a connection from the start
        replays the earlier tasks' events first."""
        out, deadline = [], time.monotonic() + timeout
        while True:
            m = self.recv(max(1.0, deadline - time.monotonic()))
            if "seq" in m:
                out.append(m)
                if m["type"] == "task_finished" and self.task_id in (None, m["task_id"]):
                    return out

    def task(self, text: str, **extra) -> str:
        """Send a task; its id, once acknowledged."""
        self.send(type="task", text=text, id="t1", **extra)
        ack, _ = self.reply("ack")
        assert ack["op"] == "task" and ack["id"] == "t1"
        self.task_id = ack["task_id"]
        return self.task_id

    def close(self) -> None:
        self.ws.close()


def finished(events: list[dict]) -> dict:
    """The data of the last task_finished among the events."""
    return [e for e in events if e["type"] == "task_finished"][-1]["data"]


def refused(url: str, headers: dict | None = None, subprotocols=None) -> int:
    """The HTTP status of a refused WebSocket handshake (fails if it is accepted)."""
    with pytest.raises(InvalidStatus) as no:
        ws = connect(url, additional_headers=headers or {}, subprotocols=subprotocols,
                     open_timeout=30)
        ws.close()
    return no.value.response.status_code


def signing_key(server) -> bytes:
    """The server's real session-JWT key (derived from its host key, as e2a/sessions/tokens.py
    does), to forge a token with exactly one thing wrong."""
    host_key = (server.base / "data" / "agent.key").read_bytes()
    return hmac.new(host_key, b"e2a session jwt", hashlib.sha256).hexdigest().encode()


class Listener:
    """A TCP listener on the host that counts connections: a private service e2a must never
    reach."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            conn.close()

    def close(self):
        self.sock.close()
