"""After a crash of `e2a serve`, a restart adopts what still runs, cleans up what died, and
removes orphans: nothing is left on the host once the sandboxes are destroyed."""

from __future__ import annotations

import subprocess

import pytest

from e2a.sdk import E2A, E2AError
from tests.conftest import own_server, wait_for


@pytest.fixture
def restart_server():
    with own_server("restart") as srv:
        yield srv


def test_crash_restart_adopts_and_cleans(restart_server):
    srv = restart_server
    srv.start()
    baseline = srv.host_objects()
    assert not any(baseline.values()), baseline
    key = srv.create_user("crash@example.com")
    with E2A(srv.url, key) as c:
        keep = c.create_sandbox("standard", idle_timeout_seconds=600)
        dies = c.create_sandbox("standard", idle_timeout_seconds=600)
        pid = c.run_background(keep.vm_id, "sleep 300")
        c.files.write(keep.vm_id, "state.txt", b"before the crash")
        during = srv.host_objects()
        assert during["netns"] == 2 and during["veth"] == 2 and during["sandbox_dirs"] == 2
        assert during["runsc_processes"] >= 2

    srv.kill9()
    # While e2a is down, one sandbox dies on its own, and a stray netns appears.
    subprocess.run(["/var/cache/e2a/bin/runsc", "--root",
                    f"{srv.run_dir}/runsc", "delete", "--force", f"{srv.instance}-{dies.vm_id}"],
                   check=True, capture_output=True)
    subprocess.run(["ip", "netns", "add", f"{srv.instance}-sbx_orphan"], check=True)

    srv.start()
    with E2A(srv.url, key) as c:
        assert c.get_sandbox(keep.vm_id).state == "running"
        assert c.get_sandbox(dies.vm_id).state == "destroyed"
        assert c.files.read_bytes(keep.vm_id, "state.txt") == b"before the crash"
        assert pid in {cmd.pid for cmd in c.list_commands(keep.vm_id)}
        assert c.run(keep.vm_id, "echo adopted").stdout == "adopted\n"
        after = srv.host_objects()
        assert after["netns"] == 1 and after["veth"] == 1 and after["sandbox_dirs"] == 1
        c.kill(keep.vm_id)
        with pytest.raises(E2AError):
            c.run(keep.vm_id, "true")
    srv.stop()
    assert srv.host_objects() == baseline


def test_graceful_restart_keeps_sandboxes(restart_server):
    srv = restart_server
    srv.start()
    key = srv.create_user("graceful@example.com")
    with E2A(srv.url, key) as c:
        sb = c.create_sandbox("standard", idle_timeout_seconds=600)
    srv.stop()
    srv.start()
    with E2A(srv.url, key) as c:
        assert c.run(sb.vm_id, "echo back").stdout == "back\n"
        c.kill(sb.vm_id)
    srv.stop()
    assert not any(srv.host_objects().values())


def test_capacity_and_runtime_errors(restart_server):
    """409 when this host is full, 503 when it cannot start sandboxes at all."""
    srv = restart_server
    srv.extra_env = {"E2A_MAX_SANDBOXES": "1"}
    srv.start()
    key = srv.create_user("full@example.com")
    with E2A(srv.url, key) as c:
        first = c.create_sandbox("standard")
        with pytest.raises(E2AError) as e:
            c.create_sandbox("standard")
        assert (e.value.status, e.value.code) == (409, "no_capacity")
        c.kill(first.vm_id)
        c.kill(c.create_sandbox("standard").vm_id)  # room again
    srv.stop()
    srv.extra_env = {"E2A_RUNSC": "/nonexistent/runsc"}
    srv.start()
    with E2A(srv.url, key) as c:
        with pytest.raises(E2AError) as e:
            c.create_sandbox("standard")
        assert (e.value.status, e.value.code) == (503, "runtime_unavailable")
    srv.stop()
    assert not any(srv.host_objects().values())


def test_reconcile_fails_safe_when_runsc_list_fails(restart_server, tmp_path):
    """A runsc that cannot list its sandboxes at start: e2a retries, then refuses to start with
    a clear message, and every sandbox is still alive afterwards (none was torn down)."""
    srv = restart_server
    srv.start()
    key = srv.create_user("failsafe@example.com")
    with E2A(srv.url, key) as c:
        sb = c.create_sandbox("standard", idle_timeout_seconds=600)
        c.files.write(sb.vm_id, "kept.txt", b"still here")
    srv.kill9()
    wrapper = tmp_path / "runsc"
    wrapper.write_text("#!/bin/sh\n"
                       'for a in "$@"; do [ "$a" = list ] && { echo "injected failure" >&2; '
                       "exit 1; }; done\n"
                       'exec /var/cache/e2a/bin/runsc "$@"\n')
    wrapper.chmod(0o755)
    srv.extra_env = {"E2A_RUNSC": str(wrapper)}
    with pytest.raises(RuntimeError) as refused:
        srv.start()
    assert "list runsc's sandboxes" in str(refused.value)
    assert "injected failure" in str(refused.value)
    during = srv.host_objects()
    assert during["netns"] == 1 and during["runsc_processes"] >= 2 and during["sandbox_dirs"] == 1

    srv.extra_env = {}
    srv.start()
    with E2A(srv.url, key) as c:
        assert c.get_sandbox(sb.vm_id).state == "running"
        assert c.files.read_bytes(sb.vm_id, "kept.txt") == b"still here"
        c.kill(sb.vm_id)
    srv.stop()
    assert not any(srv.host_objects().values())


def probes(c, vm_id: str) -> int:
    return int(c.run(vm_id, "cat /tmp/probes 2>/dev/null | wc -l").stdout)


def test_internet_false_never_gets_out_across_a_restart(restart_server, outside):
    """A sandbox with internet: false probes the 'internet' host in a loop while e2a restarts
    (crash and graceful): not one probe gets through. A sandbox with internet: true doing the
    same is the positive control."""
    srv = restart_server
    srv.start()
    key = srv.create_user("noinet@example.com")
    probe = (f"while true; do timeout 0.3 bash -c 'exec 3<>/dev/tcp/{outside}/80' "
             "&& echo OPEN >> /tmp/probes || echo CLOSED >> /tmp/probes; sleep 0.05; done")
    with E2A(srv.url, key) as c:
        off = c.create_sandbox("standard", internet=False, idle_timeout_seconds=600)
        on = c.create_sandbox("standard", internet=True, idle_timeout_seconds=600)
        for sb in (off, on):
            c.run_background(sb.vm_id, probe)
        wait_for(lambda: probes(c, off.vm_id) >= 3 and probes(c, on.vm_id) >= 3)
    for restart in (srv.kill9, srv.stop):
        restart()
        srv.start()
    with E2A(srv.url, key) as c:
        before = probes(c, off.vm_id)
        wait_for(lambda: probes(c, off.vm_id) >= before + 5)  # probing on across the restarts
        off_log = c.files.read_text(off.vm_id, "/tmp/probes").split()
        on_log = c.files.read_text(on.vm_id, "/tmp/probes").split()
        assert len(off_log) > 5 and set(off_log) == {"CLOSED"}, off_log
        assert "OPEN" in on_log
        c.kill(off.vm_id)
        c.kill(on.vm_id)
    srv.stop()


def test_a_database_that_cannot_be_reached_stops_the_start_not_the_sandboxes(restart_server):
    srv = restart_server
    srv.start()
    key = srv.create_user("nodb@example.com")
    with E2A(srv.url, key) as c:
        sb = c.create_sandbox("standard", idle_timeout_seconds=600)
    srv.stop()
    srv.extra_env = {"E2A_DATABASE_URL": "postgresql+asyncpg://nobody:x@127.0.0.1:9/e2a"}
    with pytest.raises(RuntimeError) as refused:
        srv.start()
    assert "cannot reach the database" in str(refused.value)
    assert srv.host_objects()["netns"] == 1  # the sandbox was not touched
    srv.extra_env = {}
    srv.start()
    with E2A(srv.url, key) as c:
        assert c.run(sb.vm_id, "echo alive").stdout == "alive\n"
        c.kill(sb.vm_id)
    srv.stop()


def test_a_restart_ends_a_running_agent_task(restart_server, llm_mock):
    """The key was held in memory only: after a crash the task cannot go on, so it is marked
    failed and its sandbox destroyed; the CLI still running inside gets no key any more."""
    srv = restart_server
    srv.start()
    key = "AIzaRestart" + srv.instance
    llm_mock.scenario(key, hang=True, hang_seconds=120)
    with E2A(srv.url, srv.create_user("agent-restart@example.com")) as c:
        vm = c.create_sandbox("standard", agent="gemini-cli", llm_key=key, task="wait",
                              idle_timeout_seconds=600).vm_id
        wait_for(lambda: llm_mock.requests(key), timeout=120)
        srv.kill9()
        srv.start()
        task = c.task(vm)
        assert task.state == "failed" and "restarted" in task.error
        wait_for(lambda: c.get_sandbox(vm).state == "destroyed", timeout=60)
        assert c.get_sandbox(vm).end_reason == "server_restart"
        events, _, done = c.task_events(vm)
        assert done and events[-1].type == "task_finished"  # followers see the end too
        assert events[-1].data["state"] == "failed"


def test_a_restart_ends_active_sessions(restart_server, llm_mock):
    """A session's inline key and its conversation were in memory: a restart ends it
    (server_restart), closes its WebSocket (1012, service restart), destroys its sandbox, and
    its JWT opens nothing any more (410)."""
    import json

    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    srv = restart_server
    srv.start()
    key = "sk-ant-restart-" + srv.instance
    llm_mock.scenario(key, final="ok")
    with E2A(srv.url, srv.create_user("session-restart@example.com")) as c:
        r = c._http.post("/v1/sessions", json={"user_id": "u1", "llm": {
            "api_key": key, "model": "claude-sonnet-5-5"}}, timeout=120)
        assert r.status_code == 201, r.text
        ticket = r.json()
        ws = connect(ticket["connect_url"], open_timeout=30,
                     additional_headers={"Authorization": f"Bearer {ticket['jwt']}"})
        assert json.loads(ws.recv(30))["type"] == "ready"
        vm = c._http.get(f"/v1/sessions/{ticket['chat_session_id']}").json()["vm_id"]
        srv.stop()
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(30)
        assert closed.value.rcvd.code == 1012
        srv.start()
        got = c._http.get(f"/v1/sessions/{ticket['chat_session_id']}").json()
        assert got["state"] == "ended" and got["end_reason"] == "server_restart"
        wait_for(lambda: c.get_sandbox(vm).state == "destroyed", timeout=60)
        assert c.get_sandbox(vm).end_reason == "server_restart"
        with pytest.raises(InvalidStatus) as refused:
            connect(ticket["connect_url"], open_timeout=30,
                    additional_headers={"Authorization": f"Bearer {ticket['jwt']}"})
        assert refused.value.response.status_code == 410
    srv.stop()
