"""Access tokens for what a browser or a CDP client opens without the API key: the CDP
endpoint of a browser sandbox, the live view of a desktop, the view page of a canvas.

A token names one sandbox and one purpose, may expire, and is signed with a key of this host
(HMAC-SHA256 with a key derived from the host key, `<data_dir>/agent.key`). It travels in the
URL (a WebSocket from a browser or from Playwright carries no header of ours), so it grants
only the one thing it was made for, and the server's log never holds it (`RedactTokens`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import time
from dataclasses import dataclass

from e2a.api.errors import ApiError
from e2a.sandboxes.agent_keys import AgentKeys

VNC_PASSWORD_LENGTH = 8  # the most VNC's authentication uses


@dataclass(frozen=True)
class Grant:
    sandbox_id: str
    purpose: str
    expires: int        # unix seconds; 0: for the sandbox's life
    view_only: bool = True
    issued: float = 0.0  # unix seconds (the owner can end control given before a moment)


class AccessTokens:
    def __init__(self, keys: AgentKeys):
        self._keys = keys
        self._key = keys.token("e2a access tokens").encode()

    def vnc_password(self, sandbox_id: str, mode: str) -> str:
        """The password of a desktop's view or control VNC server (the manager gives the same
        to the sandbox's x11vnc: AgentKeys.secret)."""
        return self._keys.secret(f"vnc_{mode}_password", sandbox_id, VNC_PASSWORD_LENGTH)

    def _mac(self, payload: bytes) -> str:
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest()[:40]

    def issue(self, grant: Grant) -> str:
        payload = base64.urlsafe_b64encode(json.dumps(
            [grant.sandbox_id, grant.purpose, grant.expires, grant.view_only,
             grant.issued or round(time.time(), 3)],
            separators=(",", ":")).encode()).rstrip(b"=")
        return f"{payload.decode()}.{self._mac(payload)}"

    def check(self, token: str | None, purpose: str) -> Grant:
        """The grant a token carries, or 401 (missing, forged, for something else, expired)."""
        if not token or len(token) > 512 or token.count(".") != 1:
            raise ApiError(401, "invalid_token", f"a valid {purpose} access token is required")
        payload, mac = token.split(".")
        if not hmac.compare_digest(self._mac(payload.encode()), mac):
            raise ApiError(401, "invalid_token", f"a valid {purpose} access token is required")
        sid, what, expires, view_only, issued = json.loads(
            base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        if what != purpose:
            raise ApiError(401, "invalid_token", f"this token is not for {purpose}")
        if expires and expires < time.time():
            raise ApiError(401, "token_expired", f"this {purpose} token has expired; ask for a "
                           "new one")
        return Grant(sid, what, expires, view_only, issued)


TOKEN_IN_PATH = re.compile(r"(/v1/(?:browser|desktop|canvas)/)[^/\s\"?]+")


class RedactTokens(logging.Filter):
    """uvicorn logs each WebSocket handshake with its path (`"WebSocket /v1/browser/<token>"
    [accepted]`), even with the access log off: the token is cut from every such line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = TOKEN_IN_PATH.sub(r"\1<token>", message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True
