"""Access tokens for what a browser or a CDP client opens without the API key: the CDP
endpoint of a browser sandbox, the live view of a desktop, the view page of a canvas.

A token names one sandbox and one purpose, may expire, and is signed with a key of this host
(HMAC-SHA256; `<data_dir>/access.key`, 0600, made once). It travels in the URL (a WebSocket
from a browser or from Playwright carries no header of ours), so it grants only the one thing
it was made for, and the server writes no access log that could hold it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

from e2a.api.errors import ApiError
from e2a.sandboxes.agent_keys import AgentKeys

PURPOSES = ("cdp", "desktop", "canvas")


@dataclass(frozen=True)
class Grant:
    sandbox_id: str
    purpose: str
    expires: int        # unix seconds; 0: for the sandbox's life
    view_only: bool = True


class AccessTokens:
    def __init__(self, keys: AgentKeys):
        self._key = keys.token("e2a access tokens").encode()

    def _mac(self, payload: bytes) -> str:
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest()[:40]

    def issue(self, grant: Grant) -> str:
        payload = base64.urlsafe_b64encode(json.dumps(
            [grant.sandbox_id, grant.purpose, grant.expires, grant.view_only],
            separators=(",", ":")).encode()).rstrip(b"=")
        return f"{payload.decode()}.{self._mac(payload)}"

    def check(self, token: str | None, purpose: str) -> Grant:
        """The grant a token carries, or 401 (missing, forged, for something else, expired)."""
        if not token or len(token) > 512 or token.count(".") != 1:
            raise ApiError(401, "invalid_token", f"a valid {purpose} access token is required")
        payload, mac = token.split(".")
        if not hmac.compare_digest(self._mac(payload.encode()), mac):
            raise ApiError(401, "invalid_token", f"a valid {purpose} access token is required")
        sid, what, expires, view_only = json.loads(
            base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        if what != purpose:
            raise ApiError(401, "invalid_token", f"this token is not for {purpose}")
        if expires and expires < time.time():
            raise ApiError(401, "token_expired", f"this {purpose} token has expired; ask for a "
                           "new one")
        return Grant(sid, what, expires, view_only)
