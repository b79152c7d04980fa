"""The credential of a request one replica passes to another: a follow-up task for an agent
that another replica holds (api/tasks.py), a session's WebSocket relayed to the replica that
holds the session (api/session_relay.py).

The replica that received the caller's credential (an API key, a session's token) checks it,
then signs what it passes on: who the caller is, the one request (method, path and a digest of
its JSON body, or of a WebSocket's `after`) and the one replica meant (its lock key), for
HOP_TTL seconds; the replica meant takes each token once. The caller's credential never leaves
the replica it was sent to: the address a replica's row names may, after a partition, be a
reused pod address, and what reached it there would be a token good for nothing but that
request, once, on a replica that is gone.

HS256 with a key derived from the host key for this purpose alone (as the session and login
JWTs, whose audiences differ): every replica shares the host key, no other party has it.
"""

from __future__ import annotations

import hashlib
import json
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
HOP_TTL = 30     # seconds: the forward's own timeout (and LEEWAY more at most)
LEEWAY = 5       # seconds of clock difference forgiven at expiry
MAX_LENGTH = 4096
NOT_VALID = "the replica's token is not valid"  # every refusal's one message


class InvalidHop(Exception):
    pass


def is_hop_token(token: str) -> bool:
    """Whether a bearer JWT says it is a hop token (its audience, unverified: only to choose how
    to check it; a login token sent with the header is checked as a login token)."""
    try:
        return jwt.decode(token, options={"verify_signature": False}).get("aud") == AUDIENCE
    except jwt.InvalidTokenError:
        return False


def body_digest(body: dict) -> str:
    """The forwarded JSON body, canonical (the receiver hashes the body it parsed the same way)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


@dataclass(frozen=True)
class HopClaims:
    user_id: str
    key_id: str | None
    body: str  # body_digest of the request's JSON body


class HopTokens:
    def __init__(self, keys: AgentKeys, clock: Callable[[], float] = time.time):
        # derived apart from the sandboxes' envd tokens (AgentKeys.token of an id)
        self._key = keys.secret(PURPOSE, "", 64).encode()
        self._clock = clock
        self._seen: dict[str, float] = {}  # jti -> when it stops being valid: each used once

    def issue(self, user_id: str, key_id: str | None, method: str, path: str, replica: str,
              body: dict) -> str:
        now = int(self._clock())
        return jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": user_id, "kid": key_id,
                           "req": f"{method} {path}", "rep": replica, "bdy": body_digest(body),
                           "iat": now, "exp": now + HOP_TTL, "jti": secrets.token_urlsafe(12)},
                          self._key, algorithm=ALGORITHM)

    def verify(self, token: str, method: str, path: str, replica: str) -> HopClaims:
        """The caller passed on, if the token was signed for this request to this replica (the
        one verifying) and not used before; else InvalidHop. One message for every refusal:
        which check failed is nobody's business."""
        invalid = InvalidHop(NOT_VALID)
        if len(token) > MAX_LENGTH:
            raise invalid
        try:
            claims = jwt.decode(token, self._key, algorithms=[ALGORITHM], audience=AUDIENCE,
                                issuer=ISSUER, leeway=LEEWAY, options={"require": [
                                    "exp", "sub", "aud", "iss", "req", "rep", "bdy", "jti"]})
        except jwt.InvalidTokenError:
            raise invalid from None
        if claims["req"] != f"{method} {path}" or claims["rep"] != replica:
            raise invalid
        now = time.time()
        self._seen = {j: until for j, until in self._seen.items() if until > now}
        if claims["jti"] in self._seen:
            raise invalid
        self._seen[claims["jti"]] = claims["exp"] + LEEWAY
        return HopClaims(user_id=claims["sub"], key_id=claims.get("kid"), body=claims["bdy"])
