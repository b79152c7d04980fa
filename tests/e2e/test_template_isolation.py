"""The core guarantees hold for every template: the memory limit kills inside, the template's
services (Chromium's DevTools, VNC) are reachable neither from the host nor from another
sandbox, and envd's settings are not in any command's environment."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import wait_for

TEMPLATES = {"browser": (1024, [9222]), "cua": (2048, [5900, 5901]), "canvas": (1024, [9222])}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def templated(request, alice):
    sb = alice.create_sandbox(request.param, idle_timeout_seconds=600)
    yield request.param, sb
    alice.kill(sb.vm_id)


def sandbox_ip(alice, vm: str) -> str:
    return alice.run(vm, "hostname -I").stdout.split()[0]


def test_memory_limit_kills_inside(alice, templated):
    name, sb = templated
    limit, _ = TEMPLATES[name]
    r = alice.run(sb.vm_id, f"python3 -c 'b = bytearray({limit + 400} * 1024 * 1024)'",
                  timeout=120)
    assert r.exit_code != 0
    assert alice.get_sandbox(sb.vm_id).state == "running"
    assert alice.run(sb.vm_id, "echo alive").stdout.strip() == "alive"


def test_services_are_loopback_only(alice, templated, sandbox):
    name, sb = templated
    ip = sandbox_ip(alice, sb.vm_id)
    for port in TEMPLATES[name][1]:
        # inside, the service answers on loopback (after the memory test it may have been
        # restarted by envd: a sandbox under memory pressure can lose Chromium too) ...
        assert wait_for(lambda: alice.run(
            sb.vm_id, f"timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' && echo open"
        ).stdout.strip() == "open", timeout=30), (name, port)
        # ... but not on the sandbox's address, from the host or from another sandbox
        with pytest.raises(OSError):
            socket.create_connection((ip, port), timeout=3).close()
        other = alice.run(sandbox.vm_id, f"timeout 3 bash -c 'exec 3<>/dev/tcp/{ip}/{port}'"
                                         " && echo open")
        assert other.stdout.strip() != "open", (name, port)


def test_envd_settings_are_not_in_commands(alice, templated):
    _, sb = templated
    env = alice.run(sb.vm_id, "env").stdout
    assert "E2A_ENVD" not in env
    assert alice.run(sb.vm_id, "cat /proc/1/environ").exit_code != 0  # envd's, root's only
