"""Sending a login code: by SMTP (E2A_SMTP_*), or to the server's log when no SMTP server is set.

Without E2A_SMTP_HOST (the embedded default, one machine) each code is one INFO line of the
server's log naming the address and the code: whoever reads that log (root, on `make up`) can sign
in as anyone, which is what the operator of a one-machine install is anyway. With an SMTP server,
the code goes out over STARTTLS (default), TLS from the start, or plain SMTP (`none`, for a relay on
the same host), authenticated if a username is set. The password is never logged, nor shown in an
error.
"""

from __future__ import annotations

import asyncio
import logging
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import aiosmtplib

from e2a.config import Settings

log = logging.getLogger("e2a.accounts")

SMTP_TIMEOUT = 20.0  # seconds for the whole conversation with the SMTP server


class MailError(Exception):
    """The code could not be sent. `refused`: the SMTP server refused this recipient."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


class Mailer:
    def __init__(self, settings: Settings):
        self.host = settings.smtp_host
        self.port = settings.smtp_port
        self.security = settings.smtp_security
        self.username = settings.smtp_username
        self._password = settings.smtp_password
        self.sender = settings.smtp_from
        if self.to_log:
            log.info("E2A_SMTP_HOST is unset: login codes are written to this log, not mailed")
        else:
            log.info("login codes are mailed through %s:%s (E2A_SMTP_SECURITY=%s)", self.host,
                     self.port, self.security)

    @property
    def to_log(self) -> bool:
        """True when codes are written to the server's log (no SMTP server is set)."""
        return not self.host

    def message(self, to: str, code: str, ttl: int) -> EmailMessage:
        minutes = max(1, ttl // 60)
        msg = EmailMessage()
        msg["From"] = self.sender
        msg["To"] = to
        msg["Subject"] = f"Your e2a login code: {code}"
        msg["Date"] = formatdate(localtime=False, usegmt=True)
        msg["Message-ID"] = make_msgid(domain="e2a.local")
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(
            f"Your e2a login code is {code}\n\n"
            f"It expires in {minutes} minute{'s' if minutes != 1 else ''} and works once. "
            "If you did not ask to sign in to e2a, ignore this message: nobody can sign in "
            "without the code.\n")
        return msg

    async def send_code(self, to: str, code: str, ttl: int) -> None:
        """Deliver the code to `to`; MailError if the SMTP server could not take it."""
        if self.to_log:
            log.info("login code for %s: %s (E2A_SMTP_HOST is unset, so login codes are written "
                     "to this log instead of being mailed)", to, code)
            return
        try:
            await aiosmtplib.send(
                self.message(to, code, ttl), hostname=self.host, port=self.port,
                username=self.username or None, password=self._password or None,
                use_tls=self.security == "tls", start_tls=self.security == "starttls",
                timeout=SMTP_TIMEOUT)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            log.warning("the SMTP server %s:%s refused the recipient %s: %s", self.host,
                        self.port, to, self._clean(exc))
            raise MailError("the mail server refused to deliver to this address",
                            refused=True) from None
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            log.warning("could not send a login code to %s through the SMTP server %s:%s "
                        "(E2A_SMTP_SECURITY=%s): %s: %s", to, self.host, self.port,
                        self.security, exc.__class__.__name__, self._clean(exc))
            raise MailError("the login code could not be sent: e2a's mail server is not "
                            "answering or refused the message; try again later") from None

    def _clean(self, exc: BaseException) -> str:
        """The exception's text, without the SMTP password should a server echo it."""
        text = str(exc)
        if self._password:
            text = text.replace(self._password, "***")
        return text[:300]
