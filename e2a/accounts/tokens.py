"""The login JWT: what `POST /v1/auth/verify-otp` hands out, to manage API keys and billing.

HS256 with a key derived from the host key (<data_dir>/agent.key) for this purpose alone, audience
"e2a-account": a session's JWT (audience "e2a-session", another derived key) is never accepted as
a login token, nor a login token as a session's. PyJWT checks the signature (HS256 only: "none"
and every other algorithm are refused), the expiry, the audience and the issuer. Nothing is stored:
a login token lives its E2A_LOGIN_TOKEN_TTL and cannot be revoked before (keep it short).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import jwt

from e2a.sandboxes.agent_keys import AgentKeys

ISSUER = "e2a"
AUDIENCE = "e2a-account"
ALGORITHM = "HS256"
PURPOSE = "e2a account jwt"   # the derivation label of the signing key
LEEWAY = 5                    # seconds of clock difference forgiven at expiry
MAX_LENGTH = 4096


class InvalidToken(Exception):
    pass


@dataclass(frozen=True)
class LoginClaims:
    user_id: str
    email: str
    expires_at: datetime


def looks_like_jwt(token: str) -> bool:
    """Three base64url parts: worth checking as a JWT (an API key has its own prefix)."""
    return token.count(".") == 2 and len(token) <= MAX_LENGTH


class LoginTokens:
    def __init__(self, keys: AgentKeys, ttl: int, clock: Callable[[], float] = time.time):
        self._key = keys.token(PURPOSE).encode()
        self.ttl = ttl
        self._clock = clock

    def issue(self, user_id: str, email: str) -> tuple[str, datetime]:
        """A token for this user, and when it expires."""
        now = int(self._clock())
        exp = now + self.ttl
        token = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": user_id, "email": email,
                            "iat": now, "exp": exp, "jti": secrets.token_urlsafe(12)},
                           self._key, algorithm=ALGORITHM)
        return token, datetime.fromtimestamp(exp, timezone.utc)

    def verify(self, token: str) -> LoginClaims:
        """The token's claims if it is a valid login token; else InvalidToken saying why."""
        if len(token) > MAX_LENGTH:
            raise InvalidToken("the login token is too long")
        try:
            claims = jwt.decode(
                token, self._key, algorithms=[ALGORITHM], audience=AUDIENCE, issuer=ISSUER,
                leeway=LEEWAY, options={"require": ["exp", "iat", "sub", "aud", "iss", "email",
                                                    "jti"], "verify_iat": False})
        except jwt.ExpiredSignatureError:
            raise InvalidToken("the login token has expired: sign in again "
                               "(POST /v1/auth/login, then /v1/auth/verify-otp)") from None
        except jwt.InvalidTokenError:
            raise InvalidToken("the login token is not valid") from None
        if not isinstance(claims["sub"], str) or not claims["sub"].startswith("usr_") \
                or not isinstance(claims["email"], str) or not isinstance(claims["exp"], int):
            raise InvalidToken("the login token is not valid")
        if claims["exp"] + LEEWAY < self._clock():  # PyJWT checked the real clock; this, ours
            raise InvalidToken("the login token has expired: sign in again "
                               "(POST /v1/auth/login, then /v1/auth/verify-otp)")
        return LoginClaims(user_id=claims["sub"], email=claims["email"],
                           expires_at=datetime.fromtimestamp(claims["exp"], timezone.utc))
