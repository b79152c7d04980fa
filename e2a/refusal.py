"""What a service raises when it refuses a request, in the API's terms, so that the routes map
every refusal the same way (e2a/api/errors.py `refused`)."""

from __future__ import annotations


class Refusal(Exception):
    """A refused request: its HTTP status, error code, message and field, and for a 429 how
    many seconds to wait (Retry-After)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.retry_after = retry_after
