"""The JWT that opens a session's WebSocket.

A tenant hands it to a browser, so it grants that one session's WebSocket and nothing else (not
the API key's powers), until the session's expiry. HS256 with a key derived from the host key
(<data_dir>/agent.key, as for the other access tokens): nothing to configure, nothing stored.
PyJWT checks the signature, the expiry, the audience and the issuer; the caller checks that the
session named is still active.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

import jwt

from e2a.sandboxes.agent_keys import AgentKeys

ISSUER = "e2a"
AUDIENCE = "e2a-session"
ALGORITHM = "HS256"
LEEWAY = 5  # seconds of clock difference forgiven at expiry


class InvalidToken(Exception):
    pass


@dataclass(frozen=True)
class Claims:
    session_id: str
    user_id: str


class SessionTokens:
    def __init__(self, keys: AgentKeys):
        self._key = keys.token("e2a session jwt").encode()

    def issue(self, session_id: str, user_id: str, expires_at: datetime) -> str:
        now = datetime.now(expires_at.tzinfo)
        return jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": session_id, "ten": user_id,
                           "iat": int(now.timestamp()), "exp": int(expires_at.timestamp()),
                           "jti": secrets.token_urlsafe(12)}, self._key, algorithm=ALGORITHM)

    def verify(self, token: str, session_id: str) -> Claims:
        """The token's claims if it is valid for this session; else InvalidToken saying why."""
        if len(token) > 4096:
            raise InvalidToken("the token is too long")
        try:
            claims = jwt.decode(token, self._key, algorithms=[ALGORITHM], audience=AUDIENCE,
                                issuer=ISSUER, leeway=LEEWAY,
                                options={"require": ["exp", "sub", "aud", "iss", "ten"]})
        except jwt.ExpiredSignatureError:
            raise InvalidToken("the session's token has expired") from None
        except jwt.InvalidTokenError:
            raise InvalidToken("the session's token is not valid") from None
        if claims["sub"] != session_id:
            raise InvalidToken("the token is for another session")
        return Claims(session_id=claims["sub"], user_id=claims["ten"])
