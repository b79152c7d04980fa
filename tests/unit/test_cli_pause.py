"""`e2a sandbox pause | resume | fork`, create's --on-idle and --auto-resume, and how ls and get
show a paused sandbox: the CLI against the fake of test_sdk_pause (through a mock transport)."""

from __future__ import annotations

import json

import httpx
import pytest
from click.testing import CliRunner

from e2a import cli
from e2a.sdk import E2A
from tests.unit.test_sdk_pause import API, KEY, PAUSE_EXPIRES, Fake


@pytest.fixture
def fake(monkeypatch) -> Fake:
    """The CLI's client, talking to a fresh fake through the mock transport."""
    fake = Fake()
    monkeypatch.setenv("E2A_URL", API)
    monkeypatch.setenv("E2A_API_KEY", KEY)
    monkeypatch.setattr(cli, "E2A", lambda url, key: E2A(url, key, transport=httpx.MockTransport(fake)))
    return fake


def run_cli(*args, input=None):
    return CliRunner().invoke(cli.main, list(args), input=input)


# ====================================================================== create


def test_create_sends_on_idle_and_auto_resume_only_when_given(fake):
    r = run_cli("sandbox", "create")
    assert r.exit_code == 0 and r.stdout == "sbx_new\n"
    assert fake.last()["json"] == {"template": "standard"}
    r = run_cli("sandbox", "create", "browser", "--on-idle", "pause", "--auto-resume", "--idle-timeout", "300")
    assert r.exit_code == 0, r.output
    assert fake.last()["json"] == {"template": "browser", "idle_timeout_seconds": 300, "on_idle": "pause",
                                   "auto_resume": True}
    r = run_cli("sandbox", "create", "--on-idle", "destroy", "--json")
    assert r.exit_code == 0 and fake.last()["json"] == {"template": "standard", "on_idle": "destroy"}
    assert json.loads(r.stdout)["on_idle"] == "destroy" and json.loads(r.stdout)["auto_resume"] is False


def test_create_refuses_an_unknown_on_idle_before_any_request(fake):
    r = run_cli("sandbox", "create", "--on-idle", "sleep")
    assert r.exit_code == 2 and "'sleep' is not one of 'destroy', 'pause'" in r.stderr
    assert fake.requests == []


# ====================================================================== pause, resume


def test_pause_prints_what_the_paused_sandbox_holds_and_until_when(fake):
    r = run_cli("sandbox", "pause", "sbx_run")
    assert r.exit_code == 0, r.output
    assert r.stdout == "sbx_run paused, 1.5 GiB on disk until 2026-01-02 00:10:00 UTC\n"
    assert (fake.last()["method"], fake.last()["path"], fake.last()["body"]) == \
        ("POST", "/v1/sandboxes/sbx_run/pause", b"")
    assert fake.boxes["sbx_run"]["state"] == "paused"


def test_pause_json_and_a_server_that_gives_no_pause_details(fake):
    fake.boxes["sbx_ws"]["workspace_id"] = None
    r = run_cli("sandbox", "pause", "sbx_ws", "--json")
    out = json.loads(r.stdout)
    assert r.exit_code == 0 and out["state"] == "paused" and out["pause_expires_at"] == PAUSE_EXPIRES
    # Without disk_bytes nor pause_expires_at, the line is just the state, with no dangling comma.
    original = fake.pause
    fake.pause = lambda sb: httpx.Response(200, json={**original(sb).json(), "disk_bytes": None,
                                                      "pause_expires_at": None})
    assert run_cli("sandbox", "pause", "sbx_full").stdout == "sbx_full paused\n"


def test_resume_prints_the_state(fake):
    r = run_cli("sandbox", "resume", "sbx_paused")
    assert r.exit_code == 0 and r.stdout == "sbx_paused running\n"
    assert (fake.last()["path"], fake.last()["body"]) == ("/v1/sandboxes/sbx_paused/resume", b"")
    r = run_cli("sandbox", "resume", "sbx_flaky", "--json")
    assert r.exit_code == 1 and r.stdout == ""
    r = run_cli("sandbox", "resume", "sbx_flaky", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["state"] == "running"


def test_wrong_states_are_errors_that_name_the_state(fake):
    r = run_cli("sandbox", "pause", "sbx_paused")
    assert r.exit_code == 1 and r.stderr == "error: invalid_state: sandbox sbx_paused is paused, not running\n"
    r = run_cli("sandbox", "resume", "sbx_run")
    assert r.exit_code == 1 and r.stderr == "error: invalid_state: sandbox sbx_run is running, not paused\n"


def test_a_failed_resume_says_the_sandbox_is_still_paused(fake):
    r = run_cli("sandbox", "resume", "sbx_flaky")
    assert r.exit_code == 1
    lines = r.stderr.splitlines()
    assert lines[0].startswith("error: resume_failed: restoring sandbox sbx_flaky failed")
    assert lines[1].startswith("hint: ") and "still paused" in lines[1] and "e2a sandbox resume" in lines[1]
    assert run_cli("sandbox", "resume", "sbx_flaky").stdout == "sbx_flaky running\n"  # the retry works


# ====================================================================== fork


def test_fork_prints_one_id_a_line(fake):
    r = run_cli("sandbox", "fork", "sbx_run", "--count", "3")
    assert r.exit_code == 0 and r.stdout == "sbx_fork1\nsbx_fork2\nsbx_fork3\n"
    assert (fake.last()["path"], fake.last()["json"]) == ("/v1/sandboxes/sbx_run/fork", {"count": 3})
    r = run_cli("sandbox", "fork", "sbx_run")
    assert r.exit_code == 0 and r.stdout == "sbx_fork4\n" and fake.last()["json"] == {"count": 1}
    r = run_cli("sandbox", "fork", "sbx_run", "--count", "2", "--json")
    assert [(b["vm_id"], b["forked_from"]) for b in json.loads(r.stdout)] == \
        [("sbx_fork5", "sbx_run"), ("sbx_fork6", "sbx_run")]


def test_fork_count_and_refusals(fake):
    r = run_cli("sandbox", "fork", "sbx_run", "--count", "0")
    assert r.exit_code == 2 and fake.requests == []
    r = run_cli("sandbox", "fork", "sbx_ws")
    assert r.exit_code == 1 and r.stderr == \
        "error: not_forkable: sandbox sbx_ws has a workspace: it cannot be forked\n"
    r = run_cli("sandbox", "fork", "sbx_broke", "--count", "2")
    assert r.exit_code == 1 and r.stderr.startswith("error: insufficient_credits:") and "hint: " in r.stderr
    r = run_cli("sandbox", "fork", "sbx_limit")
    assert r.exit_code == 1 and r.stderr.startswith("error: sandbox_limit:")


# ====================================================================== ls, get


def test_ls_shows_the_disk_of_paused_sandboxes(fake):
    fake.boxes["sbx_paused"]["metadata"] = {"team": "a"}
    r = run_cli("sandbox", "ls")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["VM", "ID", "STATE", "TEMPLATE", "CREATED", "(UTC)", "METADATA"]
    assert all(len(ln) <= 80 for ln in lines)  # and metadata still has room at 80 columns
    row = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert row["sbx_paused"] == ["sbx_paused", "paused", "1.5G", "standard", "2026-01-01", "00:00:00", "team=a"]
    assert row["sbx_flaky"][1:3] == ["paused", "1.0K"]
    assert row["sbx_run"] == ["sbx_run", "running", "standard", "2026-01-01", "00:00:00"]  # holds no disk
    assert row["sbx_dead"][1:3] == ["destroyed", "standard"]
    r = run_cli("sandbox", "ls", "--json")
    assert {b["vm_id"]: b["disk_bytes"] for b in json.loads(r.stdout)}["sbx_paused"] == 3 << 29


def test_short_sizes_stay_short():
    sizes = {0: "0B", 900: "900B", 1536: "1.5K", 10 << 10: "10K", 512 << 20: "512M", 1023 << 20: "1.0G",
             3 << 29: "1.5G", 12 << 30: "12G", 5 << 40: "5.0T"}
    assert {n: cli._short_size(n) for n in sizes} == sizes
    assert all(len(cli._short_size(n)) <= 5 for n in range(0, 1 << 41, (1 << 41) // 9973))


def test_get_shows_the_pause_fields(fake):
    r = run_cli("sandbox", "get", "sbx_paused")
    assert r.exit_code == 0
    fields = {ln.split(":", 1)[0]: ln.split(":", 1)[1].strip() for ln in r.stdout.splitlines()}
    assert fields["state"] == "paused" and fields["on_idle"] == "pause" and fields["auto_resume"] == "False"
    assert fields["disk_bytes"] == f"{3 << 29} (1.5 GiB)"
    assert fields["pause_expires_at"] == PAUSE_EXPIRES and fields["forked_from"] == "None"
    r = run_cli("sandbox", "get", "sbx_old")  # an old server: the defaults, nothing made up
    fields = {ln.split(":", 1)[0]: ln.split(":", 1)[1].strip() for ln in r.stdout.splitlines()}
    assert (fields["on_idle"], fields["disk_bytes"], fields["paused_at"]) == ("destroy", "None", "None")


def test_the_commands_are_listed():
    r = run_cli("sandbox", "--help")
    listed = [ln.split()[0] for ln in r.stdout.split("Commands:")[1].splitlines() if ln.strip()]
    assert {"pause", "resume", "fork"} <= set(listed)
    help_ = run_cli("sandbox", "create", "--help").stdout
    assert "--on-idle [destroy|pause]" in help_ and "--auto-resume" in help_
