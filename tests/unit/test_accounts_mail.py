"""Sending login codes (e2a/accounts/mail.py): to the log without an SMTP server; over SMTP with
AUTH; STARTTLS required when asked for (never silently plain); failures a MailError that names
neither the password nor the code, in the error or in the log."""

from __future__ import annotations

import logging
import socket

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from e2a.accounts.mail import MailError, Mailer
from e2a.config import Settings

pytestmark = pytest.mark.anyio

PASSWORD = "hunter2-very-secret"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Keep:
    def __init__(self):
        self.envelopes = []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append((session.authenticated, envelope))
        return "250 OK"


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = auth_data.login == b"e2a" and auth_data.password == PASSWORD.encode()
    return AuthResult(success=ok, handled=False)  # aiosmtpd answers 535 itself


@pytest.fixture
def smtp():
    keep = Keep()
    port = free_port()
    ctl = Controller(keep, hostname="127.0.0.1", port=port, authenticator=authenticator,
                     auth_require_tls=False)
    ctl.start()
    yield port, keep
    ctl.stop()


def settings(tmp_path, **values) -> Settings:
    return Settings(data_dir=tmp_path, **values)


async def test_without_smtp_the_code_is_one_info_line_of_the_log(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="e2a.accounts")
    mailer = Mailer(settings(tmp_path))
    assert mailer.to_log
    await mailer.send_code("ann@example.com", "123456", 600)
    lines = [r.getMessage() for r in caplog.records if "123456" in r.getMessage()]
    assert len(lines) == 1 and "ann@example.com" in lines[0] and "E2A_SMTP_HOST is unset" in lines[0]
    assert [r.levelname for r in caplog.records if "123456" in r.getMessage()] == ["INFO"]


async def test_smtp_with_auth_delivers_the_code(tmp_path, smtp):
    port, keep = smtp
    mailer = Mailer(settings(tmp_path, smtp_host="127.0.0.1", smtp_port=port,
                             smtp_security="none", smtp_username="e2a", smtp_password=PASSWORD,
                             smtp_from="e2a <login@e2a.test>"))
    await mailer.send_code("bob@example.com", "654321", 600)
    ((authed, env),) = keep.envelopes
    assert authed and env.mail_from == "login@e2a.test" and env.rcpt_tos == ["bob@example.com"]
    text = env.content.decode()
    assert "654321" in text and "expires in 10 minutes" in text and PASSWORD not in text


async def test_a_refused_login_names_no_password(tmp_path, smtp, caplog):
    port, keep = smtp
    caplog.set_level(logging.DEBUG)
    mailer = Mailer(settings(tmp_path, smtp_host="127.0.0.1", smtp_port=port,
                             smtp_security="none", smtp_username="e2a",
                             smtp_password=PASSWORD + "-wrong"))
    with pytest.raises(MailError) as e:
        await mailer.send_code("bob@example.com", "111222", 600)
    assert not e.value.refused and "try again later" in str(e.value)
    assert PASSWORD not in str(e.value) and "111222" not in str(e.value)
    assert PASSWORD not in caplog.text and "111222" not in caplog.text
    assert keep.envelopes == []


async def test_starttls_is_required_when_asked_for(tmp_path, smtp):
    port, keep = smtp  # this server offers no STARTTLS: nothing is sent in the clear
    mailer = Mailer(settings(tmp_path, smtp_host="127.0.0.1", smtp_port=port,
                             smtp_security="starttls", smtp_username="e2a",
                             smtp_password=PASSWORD))
    with pytest.raises(MailError):
        await mailer.send_code("bob@example.com", "333444", 600)
    assert keep.envelopes == []


async def test_no_server_is_a_mail_error(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    mailer = Mailer(settings(tmp_path, smtp_host="127.0.0.1", smtp_port=free_port(),
                             smtp_security="tls", smtp_password=PASSWORD, smtp_username="u"))
    with pytest.raises(MailError):
        await mailer.send_code("bob@example.com", "555666", 600)
    assert PASSWORD not in caplog.text and "555666" not in caplog.text
