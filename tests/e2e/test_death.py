"""A sandbox's death is noticed: whatever kills one of its host processes, its record says
`destroyed` with the reason, its open streams end with an error event, and nothing of it is
left on the host."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import wait_for


def host_processes(server, vm_id: str) -> dict[str, list[int]]:
    """The sandbox's host processes by kind: runsc-sandbox (Sentry), runsc-gofer, stub."""
    procs = Path(f"/sys/fs/cgroup/memory/{server.instance}/{server.instance}-{vm_id}/cgroup.procs")
    kinds: dict[str, list[int]] = {}
    for pid in map(int, procs.read_text().split()):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        kinds.setdefault(argv0 or "stub", []).append(pid)
    return kinds


def destroyed(http, vm_id: str) -> dict | None:
    """The sandbox's record once it is destroyed. Read from the list, since a GET of the
    sandbox itself counts as activity against its idle timeout."""
    gone = http.get("/v1/sandboxes", params={"state": "destroyed"}).json()
    return next((sb for sb in gone if sb["vm_id"] == vm_id), None)


def nothing_left(server, vm_id: str) -> None:
    assert not Path(f"/var/run/netns/{server.instance}-{vm_id}").exists()
    assert not (server.base / "data" / "sandboxes" / vm_id).exists()
    assert not Path(f"/sys/fs/cgroup/memory/{server.instance}/{server.instance}-{vm_id}").exists()
    assert vm_id not in Path("/proc/mounts").read_text()


@pytest.mark.parametrize("kind", ["runsc-sandbox", "runsc-gofer"])
def test_kill9_of_a_runsc_process_is_noticed_and_ends_streams(server, http, kind):
    vm_id = http.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
    lines: list[dict] = []

    def follow() -> None:
        with http.stream("POST", f"/v1/sandboxes/{vm_id}/commands",
                         json={"cmd": "echo started; sleep 600"}) as r:
            for line in r.iter_lines():
                if line.strip():
                    lines.append(json.loads(line))

    reader = threading.Thread(target=follow)
    reader.start()
    wait_for(lambda: any(e.get("data") == "started\n" for e in lines))
    victim = host_processes(server, vm_id)[kind][0]
    os.kill(victim, signal.SIGKILL)

    body = wait_for(lambda: destroyed(http, vm_id), timeout=15, interval=0.05)
    assert body["end_reason"] == "crashed"
    reader.join(15)
    assert not reader.is_alive(), "the command stream stayed open after the sandbox died"
    assert lines[-1]["type"] == "error" and lines[-1]["code"] == "sandbox_ended"
    assert lines[-1]["reason"] == "crashed"
    r = http.post(f"/v1/sandboxes/{vm_id}/commands", json={"cmd": "true"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "sandbox_not_running"
    nothing_left(server, vm_id)
    events = http.get(f"/v1/sandboxes/{vm_id}/events").json()["events"]
    assert [(e["from_state"], e["to_state"]) for e in events][-2:] == [
        ("running", "stopping"), ("stopping", "destroyed")]
    assert events[-1]["reason"] == "crashed" and str(victim) in events[-1]["detail"]


def test_kill9_of_the_stub_processes_is_noticed(server, http):
    """systrap's stub processes carry the sandbox's address spaces. With all of them killed
    (envd's among them) the Sentry gives up, and e2a reports the sandbox crashed, never
    `running` while it cannot answer."""
    vm_id = http.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
    stubs = host_processes(server, vm_id)["stub"]
    assert stubs
    for pid in stubs:
        os.kill(pid, signal.SIGKILL)
    body = wait_for(lambda: destroyed(http, vm_id), timeout=15, interval=0.05)
    assert body["end_reason"] == "crashed"
    wait_for(lambda: not Path(f"/var/run/netns/{server.instance}-{vm_id}").exists())
    nothing_left(server, vm_id)


def test_pty_ends_with_an_error_when_the_sandbox_dies(server, http, keys):
    vm_id = http.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
    url = server.url.replace("http", "ws") + f"/v1/sandboxes/{vm_id}/pty"
    with connect(url, additional_headers={"Authorization": f"Bearer {keys['alice']}"},
                 open_timeout=10) as ws:
        ws.send(b"echo ready\n")
        seen = b""
        while b"ready" not in seen:
            msg = ws.recv(timeout=10)
            seen += msg if isinstance(msg, bytes) else b""
        os.kill(host_processes(server, vm_id)["runsc-sandbox"][0], signal.SIGKILL)
        texts = []
        with pytest.raises(Exception):
            while True:
                msg = ws.recv(timeout=15)
                if isinstance(msg, str):
                    texts.append(json.loads(msg))
        assert ws.close_code == 1011 and "crashed" in (ws.close_reason or "")
    assert texts and texts[-1]["code"] == "sandbox_ended" and texts[-1]["reason"] == "crashed"
    assert wait_for(lambda: destroyed(http, vm_id))["end_reason"] == "crashed"


def test_events_feed_and_end_reasons(server, http):
    vm_id = http.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
    assert http.delete(f"/v1/sandboxes/{vm_id}").json()["end_reason"] == "deleted"
    events = http.get(f"/v1/sandboxes/{vm_id}/events").json()["events"]
    assert [(e["from_state"], e["to_state"]) for e in events] == [
        (None, "creating"), ("creating", "configuring"), ("configuring", "booting"),
        ("booting", "running"), ("running", "stopping"), ("stopping", "destroyed")]
    assert events[0]["reason"] == "create" and events[3]["reason"] == "booted"
    assert events[-1]["reason"] == "deleted"
    stamps = [e["at"] for e in events]
    assert stamps == sorted(stamps)

    # idle timeout and max lifetime, each named as the reason
    idle = http.post("/v1/sandboxes", json={"template": "standard",
                                            "idle_timeout_seconds": 1}).json()["vm_id"]
    short = http.post("/v1/sandboxes", json={"template": "standard", "max_lifetime_seconds": 2,
                                             }).json()
    assert short["idle_timeout_seconds"] == 2  # omitted: min(60, max_lifetime_seconds)
    for vm, reason in ((idle, "idle_timeout"), (short["vm_id"], "max_lifetime")):
        if reason == "max_lifetime":
            for _ in range(8):  # keep it busy, so only its lifetime can end it
                http.post(f"/v1/sandboxes/{vm}/keepalive")
                if destroyed(http, vm):
                    break
                threading.Event().wait(0.5)
        assert wait_for(lambda: destroyed(http, vm), timeout=20)["end_reason"] == reason
    # someone else's events are not there
    other = httpx.get(f"{server.url}/v1/sandboxes/{vm_id}/events",
                      headers={"Authorization": "Bearer " + server.keys["bob"]})
    assert other.status_code == 404


def test_idle_timeout_default_and_validation(http):
    r = http.post("/v1/sandboxes", json={"template": "standard", "max_lifetime_seconds": 30,
                                         "idle_timeout_seconds": 100})
    assert r.status_code == 400 and r.json()["error"]["field"] == "idle_timeout_seconds"
    r = http.post("/v1/sandboxes", json={"template": "standard"})
    assert r.status_code == 201 and r.json()["idle_timeout_seconds"] == 60
    http.delete(f"/v1/sandboxes/{r.json()['vm_id']}")


def test_a_host_oom_kill_of_the_sandbox_is_reported_out_of_memory(http, alice):
    """The one pattern measured to still end the whole sandbox (docs/runtime.md, "Memory"):
    write() of more than the sandbox's memory into a memfd, whose pages the Sentry itself holds,
    so the host's OOM killer takes the Sentry. Its record must say why."""
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    fill = ("import os\nfd = os.memfd_create('x')\nblock = b'x' * (1 << 20)\n"
            "for _ in range(900):\n    os.write(fd, block)\n")
    alice.files.write(sb.vm_id, "fill.py", fill.encode())
    alice.run_background(sb.vm_id, "python3 fill.py")
    body = wait_for(lambda: destroyed(http, sb.vm_id), timeout=60, interval=0.1)
    assert body["end_reason"] == "out_of_memory"
    events = http.get(f"/v1/sandboxes/{sb.vm_id}/events").json()["events"]
    assert events[-1]["reason"] == "out_of_memory" and "memory" in events[-1]["detail"]
