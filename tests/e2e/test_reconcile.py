"""After a crash of `e2a serve`, a restart adopts what still runs, cleans up what died, and
removes orphans: nothing is left on the host once the sandboxes are destroyed."""

from __future__ import annotations

import subprocess

import pytest

from e2a.sdk import E2A, E2AError
from tests.e2e.conftest import own_server


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
