"""Server settings (e2a/config.py): E2A_* variables read and validated in one place.

A bad value stops `e2a serve` (and `e2a admin ...`) with one line per problem naming the variable,
exit status 2, no traceback, and nothing created on the host.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest

from e2a.config import Settings, SettingsError

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENTRY = "import sys; sys.argv[0] = 'e2a'; from e2a.cli import main; main()"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.upper().startswith("E2A_"):
            monkeypatch.delenv(key)


def load(monkeypatch, **env: str) -> Settings:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def problems(monkeypatch, **env: str) -> list[str]:
    with pytest.raises(SettingsError) as e:
        load(monkeypatch, **env)
    return e.value.problems


# ---------------------------------------------------------------------- defaults and good values


def test_defaults_are_unchanged():
    s = Settings()
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.data_dir == Path("/var/lib/e2a") and isinstance(s.data_dir, Path)
    assert s.run_dir == Path("/run/e2a") and s.cache_dir == Path("/var/cache/e2a")
    assert s.database_url == "sqlite+aiosqlite:////var/lib/e2a/e2a.db"
    assert s.runsc == "/var/cache/e2a/bin/runsc"
    assert s.envd == str(ROOT / "build" / "envd")
    assert s.subnet == "10.201.0.0/16"
    assert (s.max_sandboxes, s.pool_size, s.pool_sizes, s.platform) == (256, None, {}, "")
    assert s.pool_size_of("browser", 1) == 1  # unset: each recipe's own
    assert s.reaper_interval == 1.0 and s.instance == "e2a"
    assert s.death_check_interval == 0.5 and s.max_body_bytes == 16_777_216


def test_environment_overrides_and_derived_defaults(monkeypatch, tmp_path):
    s = load(monkeypatch, E2A_HOST="0.0.0.0", E2A_PORT="9000", E2A_DATA_DIR=str(tmp_path / "d"),
             E2A_CACHE_DIR=str(tmp_path / "c"), E2A_SUBNET="10.210.16.0/20", E2A_MAX_SANDBOXES="1",
             E2A_POOL_SIZE="0", E2A_PLATFORM="ptrace", E2A_REAPER_INTERVAL="0.2", E2A_INSTANCE="t01",
             E2A_DEATH_CHECK_INTERVAL="2", E2A_MAX_BODY_BYTES="1024")
    assert (s.host, s.port, s.max_sandboxes, s.pool_size, s.platform) == ("0.0.0.0", 9000, 1, 0, "ptrace")
    assert s.data_dir == tmp_path / "d"
    assert s.database_url == f"sqlite+aiosqlite:///{tmp_path / 'd' / 'e2a.db'}"
    assert s.runsc == str(tmp_path / "c" / "bin" / "runsc")
    assert (s.reaper_interval, s.instance, s.subnet) == (0.2, "t01", "10.210.16.0/20")
    assert (s.death_check_interval, s.max_body_bytes) == (2.0, 1024)


def test_explicit_paths_win_over_derived(monkeypatch):
    s = load(monkeypatch, E2A_DATABASE_URL="postgresql+asyncpg://u:p@db/e2a", E2A_RUNSC="/opt/runsc",
             E2A_ENVD="/opt/envd")
    assert (s.database_url, s.runsc, s.envd) == ("postgresql+asyncpg://u:p@db/e2a", "/opt/runsc", "/opt/envd")


def test_empty_variables_count_as_unset_and_unknown_ones_are_ignored(monkeypatch):
    s = load(monkeypatch, E2A_PORT="", E2A_DATABASE_URL="", E2A_API_KEY="secret",
             E2A_URL="http://x", E2A_SOMETHING_ELSE="?")
    assert s.port == 8080 and s.database_url.startswith("sqlite+aiosqlite:///")


def test_attributes_can_be_assigned_and_keywords_given():
    s = Settings(port=9001)
    s.host, s.port = "0.0.0.0", 9002
    assert (s.host, s.port) == ("0.0.0.0", 9002)
    with pytest.raises(SettingsError) as e:
        Settings(pool_size=5, max_sandboxes=3)
    assert e.value.problems == ["e2a: invalid setting E2A_POOL_SIZE='5': must be at most E2A_MAX_SANDBOXES (3)"]


# ---------------------------------------------------------------------- bad values, in process

BAD = [  # (variable, value, words the message must contain)
    ("E2A_PORT", "abc", "must be an integer from 1 to 65535"),
    ("E2A_PORT", "0", "from 1 to 65535"),
    ("E2A_PORT", "65536", "from 1 to 65535"),
    ("E2A_SUBNET", "10.201.0.1/16", "IPv4 network"),
    ("E2A_SUBNET", "nonsense", "IPv4 network"),
    ("E2A_SUBNET", "fd00::/64", "IPv4"),
    ("E2A_SUBNET", "10.201.0.0/31", "/30"),
    ("E2A_MAX_SANDBOXES", "0", "at least 1"),
    ("E2A_MAX_SANDBOXES", "many", "at least 1"),
    ("E2A_POOL_SIZE", "-1", "at least 0"),
    ("E2A_POOL_SIZE", "257", "at most E2A_MAX_SANDBOXES (256)"),
    ("E2A_PLATFORM", "kvm", "systrap, ptrace"),
    ("E2A_REAPER_INTERVAL", "0", "greater than 0"),
    ("E2A_REAPER_INTERVAL", "soon", "greater than 0"),
    ("E2A_REAPER_INTERVAL", "nan", "greater than 0"),
    ("E2A_INSTANCE", "E2A", "lowercase"),
    ("E2A_INSTANCE", "1e2a", "starting with a letter"),
    ("E2A_INSTANCE", "toolongname", "1-8"),
    ("E2A_INSTANCE", "e2a-x", "letters and digits"),
    ("E2A_DATABASE_URL", "sqlite:///x.db", "sqlite+aiosqlite://"),
    ("E2A_DATABASE_URL", "mysql://u@h/db", "postgresql+asyncpg://"),
    ("E2A_DEATH_CHECK_INTERVAL", "0", "greater than 0 and at most 2"),
    ("E2A_DEATH_CHECK_INTERVAL", "2.5", "at most 2"),
    ("E2A_MAX_BODY_BYTES", "1023", "at least 1024"),
    ("E2A_MAX_BODY_BYTES", "1MB", "at least 1024"),
]


@pytest.mark.parametrize("name,value,words", BAD, ids=[f"{n}={v}" for n, v, _ in BAD])
def test_bad_value_is_one_line_naming_the_variable(monkeypatch, name, value, words):
    lines = problems(monkeypatch, **{name: value})
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"e2a: invalid setting {name}={value!r}: "), lines[0]
    assert words in lines[0]


def test_pool_size_above_the_limit_names_both(monkeypatch):
    assert problems(monkeypatch, E2A_MAX_SANDBOXES="1", E2A_POOL_SIZE="2") == [
        "e2a: invalid setting E2A_POOL_SIZE='2': must be at most E2A_MAX_SANDBOXES (1)"]


def test_pool_sizes_per_template(monkeypatch):
    s = load(monkeypatch, E2A_POOL_SIZE="0", E2A_POOL_SIZES='{"browser": 3}')
    assert (s.pool_size_of("browser", 1), s.pool_size_of("cua", 1)) == (3, 0)
    [line] = problems(monkeypatch, E2A_POOL_SIZES='{"nope": 1}')
    assert line.startswith("e2a: invalid setting E2A_POOL_SIZES=") and "'nope'" in line
    [line] = problems(monkeypatch, E2A_POOL_SIZES="[1, 2]")
    assert line.startswith("e2a: invalid setting E2A_POOL_SIZES=") and "JSON object" in line


def test_instance_and_subnet_must_give_short_interface_names(monkeypatch):
    # 8 characters + "-" + slot numbers up to 4194303 (a /8) = 16 > 15 (IFNAMSIZ - 1)
    [line] = problems(monkeypatch, E2A_INSTANCE="abcdefgh", E2A_SUBNET="10.0.0.0/8")
    assert line.startswith("e2a: invalid setting E2A_INSTANCE='abcdefgh':") and "E2A_SUBNET" in line
    assert load(monkeypatch, E2A_INSTANCE="abcdefgh", E2A_SUBNET="10.201.0.0/16").instance == "abcdefgh"


def test_every_problem_is_reported_at_once(monkeypatch):
    lines = problems(monkeypatch, E2A_PORT="abc", E2A_PLATFORM="kvm", E2A_MAX_BODY_BYTES="1")
    assert [line.split("=")[0] for line in lines] == [
        "e2a: invalid setting E2A_PORT", "e2a: invalid setting E2A_PLATFORM", "e2a: invalid setting E2A_MAX_BODY_BYTES"]


# ---------------------------------------------------------------------- bad values, `e2a serve`


def run_e2a(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("E2A_")}
    dirs = {"E2A_DATA_DIR": str(tmp_path / "data"), "E2A_RUN_DIR": str(tmp_path / "run"),
            "E2A_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-c", ENTRY, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**base, "PYTHONPATH": str(ROOT), **dirs, **env}, timeout=60)


# One bad value of each kind (each setting that has a rule), through the real command.
SERVE_BAD = [
    ("E2A_PORT", "abc"), ("E2A_SUBNET", "10.201.0.0/31"), ("E2A_MAX_SANDBOXES", "0"),
    ("E2A_POOL_SIZE", "300"), ("E2A_PLATFORM", "kvm"), ("E2A_REAPER_INTERVAL", "-1"),
    ("E2A_INSTANCE", "E2A_1"), ("E2A_DATABASE_URL", "sqlite:///x.db"),
    ("E2A_DEATH_CHECK_INTERVAL", "5"), ("E2A_MAX_BODY_BYTES", "10"),
]


@pytest.mark.parametrize("name,value", SERVE_BAD, ids=[n for n, _ in SERVE_BAD])
def test_serve_with_a_bad_value_exits_2_before_touching_the_host(tmp_path, name, value):
    r = run_e2a(tmp_path, "serve", **{name: value})
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"e2a: invalid setting {name}={value!r}: "), r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # no data, run or cache directory created


def test_serve_reports_every_bad_value(tmp_path):
    r = run_e2a(tmp_path, "serve", E2A_PORT="abc", E2A_INSTANCE="X", E2A_SUBNET="10.1.2.3/16")
    assert r.returncode == 2
    assert sorted(line.split("=")[0] for line in r.stderr.splitlines()) == [
        "e2a: invalid setting E2A_INSTANCE", "e2a: invalid setting E2A_PORT", "e2a: invalid setting E2A_SUBNET"]
    assert list(tmp_path.iterdir()) == []


def test_serve_ignores_the_client_variables(tmp_path):
    """E2A_URL / E2A_API_KEY are the CLI's own: not an error (shown with a bad port so the server
    never starts: only the port is reported)."""
    r = run_e2a(tmp_path, "serve", E2A_URL="http://x", E2A_API_KEY="k", E2A_PORT="abc")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "e2a: invalid setting E2A_PORT='abc': must be an integer from 1 to 65535"]


def test_admin_commands_check_settings_too(tmp_path):
    r = run_e2a(tmp_path, "admin", "bootstrap", E2A_DATABASE_URL="postgres://h/db")
    assert r.returncode == 2 and r.stderr.startswith("e2a: invalid setting E2A_DATABASE_URL=")
    assert list(tmp_path.iterdir()) == []


def test_the_replica_url_other_replicas_reach_is_said_or_derived(tmp_path):
    from e2a.api.app import replica_url
    assert replica_url(Settings(data_dir=tmp_path, host="10.0.0.7")) == "http://10.0.0.7:8080"
    assert replica_url(Settings(data_dir=tmp_path, host="fd00::7", port=9000)) == \
        "http://[fd00::7]:9000"
    assert replica_url(Settings(data_dir=tmp_path, host="0.0.0.0")) is None  # not an address
    for loopback in ("127.0.0.1", "::1", "localhost"):  # another host's is not this one
        assert replica_url(Settings(data_dir=tmp_path, host=loopback)) is None
    assert replica_url(Settings(data_dir=tmp_path, host="0.0.0.0",
                                replica_url="http://10.1.2.3:8080/")) == "http://10.1.2.3:8080"
