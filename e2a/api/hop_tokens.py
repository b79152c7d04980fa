"""The credential of a request one replica passes to another (a follow-up task for an agent
that another replica holds, api/tasks.py).

The replica that received the caller's API key checks it, then signs what it passes on: who
the caller is, the one request (method and path) and the one replica meant (its lock key), for
HOP_TTL seconds. The caller's key never leaves the replica it was sent to: the address a
replica's row names may, after a partition, be a reused pod address, and what reached it there
would be a token good for nothing but that request on a replica that is gone.

HS256 with a key derived from the host key for this purpose alone (as the session and login
JWTs, whose audiences differ): every replica shares the host key, no other party has it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Callable

import jwt

from e2a.sandboxes.agent_keys import AgentKeys

# On a request passed between replicas, naming the lock key of the replica meant: one that is
# not it refuses, and none passes on a request that carries it (a follow-up task, a session's
# WebSocket relayed by api/session_relay.py).
FORWARDED = "x-e2a-forwarded"
ISSUER = "e2a"
AUDIENCE = "e2a-hop"
ALGORITHM = "HS256"
PURPOSE = "e2a replica hop jwt"
HOP_TTL = 30     # seconds: the forward's own timeout
LEEWAY = 5       # seconds of clock difference forgiven at expiry
MAX_LENGTH = 4096


class InvalidHop(Exception):
    pass


@dataclass(frozen=True)
class HopClaims:
    user_id: str
    key_id: str | None


class HopTokens:
    def __init__(self, keys: AgentKeys, clock: Callable[[], float] = time.time):
        self._key = keys.token(PURPOSE).encode()
        self._clock = clock

    def issue(self, user_id: str, key_id: str | None, method: str, path: str,
              replica: str) -> str:
        now = int(self._clock())
        return jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": user_id, "kid": key_id,
                           "req": f"{method} {path}", "rep": replica, "iat": now,
                           "exp": now + HOP_TTL, "jti": secrets.token_urlsafe(12)},
                          self._key, algorithm=ALGORITHM)

    def verify(self, token: str, method: str, path: str, replica: str) -> HopClaims:
        """The caller passed on, if the token was signed for this request to this replica;
        else InvalidHop saying why."""
        if len(token) > MAX_LENGTH:
            raise InvalidHop("the replica's token is too long")
        try:
            claims = jwt.decode(token, self._key, algorithms=[ALGORITHM], audience=AUDIENCE,
                                issuer=ISSUER, leeway=LEEWAY,
                                options={"require": ["exp", "sub", "aud", "iss", "req", "rep"]})
        except jwt.ExpiredSignatureError:
            raise InvalidHop("the replica's token has expired") from None
        except jwt.InvalidTokenError:
            raise InvalidHop("the replica's token is not valid") from None
        if claims["req"] != f"{method} {path}" or claims["rep"] != replica:
            raise InvalidHop("the replica's token is for another request")
        return HopClaims(user_id=claims["sub"], key_id=claims.get("kid"))
