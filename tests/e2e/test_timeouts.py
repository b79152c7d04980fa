"""Idle timeout and max lifetime destroy sandboxes; keepalive and running commands defer idling."""

from __future__ import annotations

import time

from tests.conftest import wait_for


def state(client, vm_id):
    return client.get_sandbox(vm_id).state


def test_idle_sandbox_is_destroyed(server, alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=2)
    # polling with GET would count as activity, so look at the list of destroyed ones instead
    wait_for(lambda: sb.vm_id in {s.vm_id for s in alice.list_sandboxes(state="destroyed")},
             timeout=30, interval=0.5)
    assert state(alice, sb.vm_id) == "destroyed"
    assert any("idle" in line.message for line in alice.logs(sb.vm_id))


def test_keepalive_defers_idle_destroy(alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=3)
    try:
        for _ in range(6):  # 6 s of keepalives, twice the idle timeout
            time.sleep(1)
            assert alice.keepalive(sb.vm_id).state == "running"
        assert state(alice, sb.vm_id) == "running"
    finally:
        alice.kill(sb.vm_id)


def test_running_command_defers_idle_destroy(alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=2)
    try:
        pid = alice.run_background(sb.vm_id, "sleep 6")
        time.sleep(4.5)
        assert sb.vm_id in {s.vm_id for s in alice.list_sandboxes(state="running")}
        alice.wait(sb.vm_id, pid)
        wait_for(lambda: sb.vm_id in {s.vm_id for s in alice.list_sandboxes(state="destroyed")},
                 timeout=30, interval=0.5)
    finally:
        alice.kill(sb.vm_id)


def test_max_lifetime_destroys_even_when_busy(alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=3, max_lifetime_seconds=3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if state(alice, sb.vm_id) == "destroyed":
            break
        time.sleep(0.3)
    assert state(alice, sb.vm_id) == "destroyed"
    assert any("max_lifetime" in line.message for line in alice.logs(sb.vm_id))
