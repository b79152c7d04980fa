"""Which key the CLI uses (e2a/cli.py): --api-key / E2A_API_KEY win; without one, the key saved
by `e2a login`, but only for the server it was made on (a stored key is never sent elsewhere);
the file is written 0600 in a 0700 directory."""

from __future__ import annotations

import json
import stat

import pytest

from e2a import cli


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("E2A_API_KEY", raising=False)
    monkeypatch.delenv("E2A_URL", raising=False)
    return tmp_path / "cfg" / "e2a"


SAVED = {"url": "http://10.0.0.5:8080", "api_key": "e2a_live_saved", "key_id": "key_a",
         "email": "a@example.com", "user_id": "usr_a"}


def test_saved_key_for_its_server_only(config):
    assert cli._State(None, None)._config() == (None, None)
    path = cli._save_credentials(SAVED)
    assert path == config / "credentials"
    assert stat.S_IMODE(config.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == SAVED
    assert cli._State(None, None)._config() == ("http://10.0.0.5:8080", "e2a_live_saved")
    assert cli._State("http://10.0.0.5:8080/", None)._config() == ("http://10.0.0.5:8080",
                                                                  "e2a_live_saved")
    # another server: the saved key is not sent there
    assert cli._State("http://evil.example:8080", None)._config() == ("http://evil.example:8080",
                                                                     None)
    # an explicit key wins
    assert cli._State(None, "e2a_live_env")._config() == (None, "e2a_live_env")


def test_a_damaged_file_is_ignored(config, capsys):
    config.mkdir(parents=True)
    (config / "credentials").write_text("{not json")
    assert cli._State(None, None)._config() == (None, None)
    (config / "credentials").write_text(json.dumps({"url": "http://x"}))
    assert cli._State(None, None)._config() == (None, None)
    assert "ignoring" in capsys.readouterr().err


def test_default_location(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cli._credentials_path() == tmp_path / ".config" / "e2a" / "credentials"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # not absolute: ignored (XDG spec)
    assert cli._credentials_path() == tmp_path / ".config" / "e2a" / "credentials"


def test_an_existing_directory_is_made_private(config):
    config.mkdir(parents=True, mode=0o755)
    config.chmod(0o755)
    cli._save_credentials(SAVED)
    assert stat.S_IMODE(config.stat().st_mode) == 0o700
