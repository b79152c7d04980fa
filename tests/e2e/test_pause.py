"""Pause, resume and fork (runsc checkpoint/restore), end to end: real gVisor sandboxes through
the real HTTP API. What a paused sandbox keeps (processes, memory, open files, listeners,
environment, cwd, its workspace), what it frees (host processes, cgroup, the checkpoint once
resumed), what a fork shares and what it does not, the idle pause and auto_resume, streams cut
by a pause and picked up again by pid, the refusals, a restore that fails and is retried, the
isolation and memory limit of a restored sandbox, and what a pause costs.

A server restart or crash while paused, E2A_PAUSED_TTL, a fork past the per-user limit and a
full disk pool (servers of their own): tests/e2e/test_pause_restart.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import websockets

from e2a.billing.rates import Rates, compute_cost
from e2a.config import Settings
from e2a.runtime.cgroups import Cgroup
from e2a.runtime.runsc import MEMORY_OVERHEAD_MIB
from tests.conftest import wait_for

MIB = 1 << 20
TEMPLATE_MIB = 512  # the standard template's memory_mib

# A background counter: the number it has reached, in a file, ten times a second. A restart of
# it would start again from 1; a process that did not run would not move.
COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done"

MY_IP = "hostname -I | awk '{print $1}'"


# ---- helpers ---------------------------------------------------------------------------------

def count(client, vm_id: str) -> int:
    """The counter's value (read again if the read met the file between truncate and write)."""
    def read():
        out = client.run(vm_id, "cat /tmp/counter 2>/dev/null").stdout.strip()
        return int(out) if out.isdigit() else None
    return wait_for(read, timeout=10, interval=0.05)


def start_counter(client, vm_id: str) -> int:
    pid = client.run_background(vm_id, COUNTER)
    wait_for(lambda: count(client, vm_id) >= 3, timeout=20)
    return pid


def keeps_counting(client, vm_id: str, above: int) -> int:
    """The counter moves past `above` (it runs); its new value."""
    return wait_for(lambda: (n := count(client, vm_id)) > above and n, timeout=20)


def alive(client, vm_id: str, pid: int, args: str) -> None:
    """Process `pid` is the same process that was started (its command line), still running."""
    r = client.run(vm_id, f"tr '\\0' ' ' < /proc/{pid}/cmdline", user="root")
    assert r.exit_code == 0 and r.stdout.strip() == args, (pid, r)


def probe(client, vm_id, host, port, timeout=3) -> bool:
    """Can the sandbox open a TCP connection to host:port? (as test_isolation.py)"""
    r = client.run(vm_id, f"timeout {timeout} bash -c 'exec 3<>/dev/tcp/{host}/{port}' "
                          "&& echo OPEN || echo CLOSED")
    return r.stdout.strip() == "OPEN"


def sandbox_dir(server, vm_id: str) -> Path:
    return server.base / "data" / "sandboxes" / vm_id


def cgroup(server, vm_id: str) -> Cgroup:
    return Cgroup(server.instance, f"{server.instance}-{vm_id}")


def cgroup_dirs(server, vm_id: str) -> list[Path]:
    """The sandbox's host cgroup directories (cgroup v1: one per controller; v2: one)."""
    name = f"{server.instance}/{server.instance}-{vm_id}"
    return [p for p in [*Path("/sys/fs/cgroup").glob(f"*/{name}"), Path("/sys/fs/cgroup") / name]
            if p.is_dir()]


def host_processes(vm_id: str) -> list[str]:
    """Host processes whose command line names the sandbox (its runsc sandbox, gofer, ...)."""
    out = subprocess.run(["pgrep", "-a", "-f", f"runsc.*{vm_id}"], capture_output=True, text=True)
    return out.stdout.splitlines()


def error(r: httpx.Response) -> dict:
    return r.json()["error"]


def events(http, vm_id: str) -> list[dict]:
    r = http.get(f"/v1/sandboxes/{vm_id}/events")
    assert r.status_code == 200, r.text
    return r.json()["events"]


def transitions(http, vm_id: str) -> list[tuple[str | None, str, str | None]]:
    return [(e["from_state"], e["to_state"], e["reason"]) for e in events(http, vm_id)]


def at(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def pause(http, vm_id: str) -> dict:
    r = http.post(f"/v1/sandboxes/{vm_id}/pause")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "paused", r.text
    return r.json()


def resume(http, vm_id: str) -> dict:
    r = http.post(f"/v1/sandboxes/{vm_id}/resume")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "running", r.text
    return r.json()


def state(http, vm_id: str) -> str:
    return http.get(f"/v1/sandboxes/{vm_id}").json()["state"]


def listed(http, vm_id: str) -> dict:
    """The sandbox as the list shows it: unlike a GET of it, a list is no activity (idleness)."""
    for params in ({}, {"state": "destroyed"}):  # the plain list leaves the destroyed out
        for s in http.get("/v1/sandboxes", params=params).json():
            if s["vm_id"] == vm_id:
                return s
    raise AssertionError(f"{vm_id} is not listed")


# ---- 1. processes and memory carry on --------------------------------------------------------

def test_counter_carries_on_across_pause_and_resume(alice, http, kept, server):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    kept.append(sb.vm_id)
    pid = start_counter(alice, sb.vm_id)
    assert host_processes(sb.vm_id) and cgroup_dirs(server, sb.vm_id)  # the probes see it run
    before = count(alice, sb.vm_id)
    t0 = time.monotonic()
    rec = pause(http, sb.vm_id)
    assert rec["paused_at"] and rec["pause_expires_at"] and rec["disk_bytes"] > 0, rec
    # kept 7 days by default (E2A_PAUSED_TTL)
    assert at(rec["pause_expires_at"]) - at(rec["paused_at"]) == timedelta(days=7), rec
    assert state(http, sb.vm_id) == "paused"
    # nothing of it runs on the host: its runsc processes and cgroup are gone
    assert host_processes(sb.vm_id) == []
    assert cgroup_dirs(server, sb.vm_id) == []
    time.sleep(2)  # 20 ticks of the counter, had it run
    rec = resume(http, sb.vm_id)
    paused_for = time.monotonic() - t0
    assert rec["paused_at"] is None and rec["pause_expires_at"] is None
    assert rec["disk_bytes"] is None
    after = count(alice, sb.vm_id)
    # the same loop, from where it stopped: not from 1, and it did not run while paused
    assert before <= after < before + 15, (before, after)
    keeps_counting(alice, sb.vm_id, after)
    alive(alice, sb.vm_id, pid, f"/bin/bash -c {COUNTER}")
    assert pid in {c.pid for c in alice.list_commands(sb.vm_id)}
    # its clock is the host's again, not behind by the pause
    inside = float(alice.run(sb.vm_id, "date +%s.%N").stdout)
    assert abs(inside - time.time()) < 1.5, inside - time.time()
    # max_lifetime counts running time: the end moved out by the pause
    moved = at(rec["expires_at"]) - at(sb.expires_at)
    assert timedelta(seconds=1.5) < moved <= timedelta(seconds=paused_for + 0.5), \
        (moved, paused_for)


def test_max_lifetime_counts_running_time_only(alice, http, kept):
    """A sandbox of 6 s paused for 7 s is still there after 9 s of wall time, and ends
    (max_lifetime) once it has run its 6 s."""
    sb = alice.create_sandbox("standard", max_lifetime_seconds=6)
    kept.append(sb.vm_id)
    t0 = time.monotonic()
    time.sleep(1)
    pause(http, sb.vm_id)
    time.sleep(7)
    assert state(http, sb.vm_id) == "paused"  # past its 6 s of wall time, not ended
    rec = resume(http, sb.vm_id)
    assert alice.run(sb.vm_id, "echo on").stdout == "on\n"
    assert time.monotonic() - t0 > 7
    gone = wait_for(lambda: (r := http.get(f"/v1/sandboxes/{sb.vm_id}").json())["state"]
                    == "destroyed" and r, timeout=15, interval=0.2)
    assert gone["end_reason"] == "max_lifetime"
    ran = at(gone["destroyed_at"]) - at(sb.created_at) - (at(rec["expires_at"]) - at(sb.expires_at))
    assert timedelta(seconds=5.5) < ran < timedelta(seconds=8), ran


def test_idleness_does_not_end_a_paused_sandbox(alice, http, kept):
    """A paused sandbox is not idle, whatever its idle timeout: it is kept, and once resumed its
    idle timeout counts from the resume."""
    sb = alice.create_sandbox("standard", idle_timeout_seconds=2)
    kept.append(sb.vm_id)
    pause(http, sb.vm_id)
    time.sleep(4)  # twice its idle timeout, looked at only through the list (no activity)
    assert listed(http, sb.vm_id)["state"] == "paused"
    resume(http, sb.vm_id)
    assert alice.run(sb.vm_id, "echo awake").stdout == "awake\n"
    gone = wait_for(lambda: (r := listed(http, sb.vm_id))["state"] == "destroyed" and r,
                    timeout=30, interval=0.3)
    assert gone["end_reason"] == "idle_timeout", gone


HOG = r'''
import hashlib, os, time
b = bytearray(380 << 20)
for i in range(0, len(b), 1 << 20):
    b[i:i + (1 << 20)] = os.urandom(1 << 20)
open("/tmp/hog.before", "w").write(hashlib.sha256(b).hexdigest())
while True:  # asked (by a file), it hashes its memory again
    if os.path.exists("/tmp/hog.ask"):
        os.unlink("/tmp/hog.ask")
        open("/tmp/hog.after.new", "w").write(hashlib.sha256(b).hexdigest())
        os.rename("/tmp/hog.after.new", "/tmp/hog.after")
    time.sleep(0.1)
'''


def test_nearly_full_memory_is_kept_byte_for_byte(alice, http, kept):
    """380 MiB of random bytes in a process of a 512 MiB sandbox: the checkpoint holds them,
    the restore (and a fork) gives the very same bytes back."""
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    kept.append(sb.vm_id)
    alice.files.write(sb.vm_id, "/tmp/hog.py", HOG.encode())
    pid = alice.run_background(sb.vm_id, "python3 /tmp/hog.py")
    want = wait_for(lambda: alice.files.exists(sb.vm_id, "/tmp/hog.before")
                    and alice.files.read_text(sb.vm_id, "/tmp/hog.before"),
                    timeout=90, interval=0.5)
    rec = pause(http, sb.vm_id)
    assert rec["disk_bytes"] >= 380 * MIB, rec  # the memory is on disk
    resume(http, sb.vm_id)

    def rehash(vm: str) -> str:
        alice.run(vm, "rm -f /tmp/hog.after; touch /tmp/hog.ask")
        return wait_for(lambda: alice.files.exists(vm, "/tmp/hog.after")
                        and alice.files.read_text(vm, "/tmp/hog.after"), timeout=60, interval=0.3)
    assert rehash(sb.vm_id) == want
    alive(alice, sb.vm_id, pid, "python3 /tmp/hog.py")
    [fork] = alice.fork(sb.vm_id, 1)
    kept.append(fork.vm_id)
    assert rehash(fork.vm_id) == want
    assert rehash(sb.vm_id) == want


# ---- 2. a listener answers through the port proxy after resume -----------------------------

def test_http_server_answers_through_the_port_proxy_after_resume(alice, http, kept, server, keys):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    kept.append(sb.vm_id)
    token = uuid.uuid4().hex
    alice.run(sb.vm_id, f"mkdir -p /tmp/site && echo {token} > /tmp/site/hello.txt")
    pid = alice.run_background(sb.vm_id, "python3 -m http.server 8000 --bind 0.0.0.0",
                               cwd="/tmp/site")
    url = f"/v1/sandboxes/{sb.vm_id}/ports/8000/hello.txt"
    r = wait_for(lambda: (r := http.get(url)).status_code == 200 and r, timeout=30)
    assert r.text == token + "\n"
    pause(http, sb.vm_id)
    r = http.get(url)  # no auto_resume: refused while paused
    assert r.status_code == 409 and error(r)["code"] == "sandbox_not_running", r.text
    resume(http, sb.vm_id)
    # the same server (not started again), answering at once
    r = http.get(url)
    assert r.status_code == 200 and r.text == token + "\n", r.text
    alive(alice, sb.vm_id, pid, "python3 -m http.server 8000 --bind 0.0.0.0")
    # and a new connection from inside to it
    r = alice.run(sb.vm_id, "curl -sS -m 5 http://127.0.0.1:8000/hello.txt")
    assert r.stdout == token + "\n", r


# ---- 3. open files, environment, cwd ---------------------------------------------------------

HOLDER = r'''
import os, sys, time
f = open("held.log", "a", buffering=1)
n = 0
while True:
    n += 1
    f.write(f"{n} {os.environ.get('PAUSE_ENV')} {os.environ.get('PER_CMD')} {os.getcwd()}\n")
    time.sleep(0.1)
'''


def test_open_file_env_and_cwd_of_a_process_carry_on(alice, http, kept):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600,
                              env_vars={"PAUSE_ENV": "set-at-create"})
    kept.append(sb.vm_id)
    alice.run(sb.vm_id, "mkdir -p /tmp/work/deeper")
    alice.files.write(sb.vm_id, "/tmp/holder.py", HOLDER.encode())
    pid = alice.run_background(sb.vm_id, "python3 /tmp/holder.py", cwd="/tmp/work/deeper",
                               env={"PER_CMD": "given-to-the-command"})
    wait_for(lambda: alice.files.exists(sb.vm_id, "/tmp/work/deeper/held.log"), timeout=20)
    # The file is renamed away: only the process's open descriptor still leads to it, so lines
    # that keep arriving in moved.log after the resume come through that very descriptor.
    alice.run(sb.vm_id, "mv /tmp/work/deeper/held.log /tmp/work/deeper/moved.log")
    lines_before = len(alice.files.read_text(sb.vm_id, "/tmp/work/deeper/moved.log").splitlines())
    pause(http, sb.vm_id)
    resume(http, sb.vm_id)

    def lines():
        return alice.files.read_text(sb.vm_id, "/tmp/work/deeper/moved.log").splitlines()
    wait_for(lambda: len(lines()) > lines_before + 5, timeout=20)
    seen = lines()
    assert [int(ln.split()[0]) for ln in seen] == list(range(1, len(seen) + 1))  # no restart
    assert set(ln.split(None, 1)[1] for ln in seen) == {
        "set-at-create given-to-the-command /tmp/work/deeper"}
    assert not alice.files.exists(sb.vm_id, "/tmp/work/deeper/held.log")  # not reopened
    alive(alice, sb.vm_id, pid, "python3 /tmp/holder.py")
    # what the process has, seen from outside it
    r = alice.run(sb.vm_id, f"readlink /proc/{pid}/cwd /proc/{pid}/fd/3; "
                            f"tr '\\0' '\\n' < /proc/{pid}/environ "
                            "| grep -E '^(PAUSE_ENV|PER_CMD)='")
    out = r.stdout.splitlines()
    assert out[:2] == ["/tmp/work/deeper", "/tmp/work/deeper/moved.log"], r
    assert sorted(out[2:]) == ["PAUSE_ENV=set-at-create", "PER_CMD=given-to-the-command"], r
    # and a new command still gets the sandbox's environment
    assert alice.run(sb.vm_id, "echo $PAUSE_ENV").stdout == "set-at-create\n"


# ---- 4. twenty cycles ------------------------------------------------------------------------

def test_twenty_pause_resume_cycles(alice, http, kept, server):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    kept.append(sb.vm_id)
    pid = start_counter(alice, sb.vm_id)
    last = count(alice, sb.vm_id)
    for i in range(20):
        assert pause(http, sb.vm_id)["disk_bytes"] > 0
        assert state(http, sb.vm_id) == "paused", i
        assert resume(http, sb.vm_id)["paused_at"] is None
        assert state(http, sb.vm_id) == "running", i
        if i % 5 == 4:
            now = count(alice, sb.vm_id)
            assert now >= last, (i, last, now)
            last = now
    keeps_counting(alice, sb.vm_id, last)
    alive(alice, sb.vm_id, pid, f"/bin/bash -c {COUNTER}")
    moves = transitions(http, sb.vm_id)
    booted = next(i for i, m in enumerate(moves) if m[1] == "running")
    assert moves[booted + 1:] == [("running", "paused", "paused"),
                                  ("paused", "running", "resumed")] * 20, moves
    # twenty checkpoints made and removed: none of them is left in its directory (their
    # subvolumes' qgroups go at the kernel's next periodic commit, or the next destroy)
    d = sandbox_dir(server, sb.vm_id)
    wait_for(lambda: not [p for p in d.iterdir() if p.name.startswith("checkpoint")], timeout=15)


# ---- 5. fork ---------------------------------------------------------------------------------

def test_fork_into_three(alice, http, kept, server):
    origin = alice.create_sandbox("standard", idle_timeout_seconds=600,
                                  metadata={"role": "origin"})
    kept.append(origin.vm_id)
    pid = start_counter(alice, origin.vm_id)
    alice.run(origin.vm_id, "echo at-fork > /tmp/inherited.txt; echo home > ~/home.txt")
    origin_ip = alice.run(origin.vm_id, MY_IP).stdout.strip()
    at_fork = count(alice, origin.vm_id)

    r = http.post(f"/v1/sandboxes/{origin.vm_id}/fork", json={"count": 3})
    assert r.status_code == 201, r.text
    forks = r.json()["sandboxes"]
    kept.extend(f["vm_id"] for f in forks)
    assert len(forks) == 3
    ids = [f["vm_id"] for f in forks]
    assert len(set(ids)) == 3 and origin.vm_id not in ids
    for f in forks:
        assert f["state"] == "running" and f["forked_from"] == origin.vm_id, f
        assert f["metadata"] == {"role": "origin"} and f["template"] == "standard", f
        assert state(http, f["vm_id"]) == "running"
    alice.run(origin.vm_id, "echo after-fork > /tmp/inherited.txt")  # the forks have their own

    ips = {origin_ip}
    for vm in ids:
        ip = alice.run(vm, MY_IP).stdout.strip()
        assert ip.count(".") == 3 and ip not in ips, (vm, ip, ips)
        ips.add(ip)
        assert alice.files.read_text(vm, "/tmp/inherited.txt") == "at-fork\n"
        assert alice.files.read_text(vm, "/home/user/home.txt") == "home\n"
        # the counter came along: the same process, from where the origin was, counting on
        n = count(alice, vm)
        assert n >= at_fork, (vm, n, at_fork)
        keeps_counting(alice, vm, n)
        alive(alice, vm, pid, f"/bin/bash -c {COUNTER}")
        assert pid in {c.pid for c in alice.list_commands(vm)}
        # its own cgroup, with the template's memory limit
        assert cgroup(server, vm).memory_limit() == (TEMPLATE_MIB + MEMORY_OVERHEAD_MIB) * MIB
    # a file written in one fork is in none of the others, nor in the origin
    alice.run(ids[0], "echo mine > /tmp/only-in-first.txt")
    assert alice.files.exists(ids[0], "/tmp/only-in-first.txt")
    for vm in ids[1:] + [origin.vm_id]:
        assert not alice.files.exists(vm, "/tmp/only-in-first.txt"), vm
    assert alice.files.read_text(origin.vm_id, "/tmp/inherited.txt") == "after-fork\n"
    # the origin ran on through the fork
    assert state(http, origin.vm_id) == "running"
    keeps_counting(alice, origin.vm_id, count(alice, origin.vm_id))
    # a fork can be paused and resumed like any sandbox
    pause(http, ids[1])
    assert state(http, ids[2]) == "running" and state(http, origin.vm_id) == "running"
    resume(http, ids[1])
    keeps_counting(alice, ids[1], count(alice, ids[1]))
    assert (None, "creating", "fork") in transitions(http, ids[0])
    # the forks do not need their origin: it goes, they run on with what they inherited
    assert http.delete(f"/v1/sandboxes/{origin.vm_id}").json()["state"] == "destroyed"
    for vm in ids:
        assert alice.files.read_text(vm, "/tmp/inherited.txt") == "at-fork\n"
        keeps_counting(alice, vm, count(alice, vm))


def test_forks_cannot_reach_each_other_or_the_origin(alice, http, kept):
    origin = alice.create_sandbox("standard", idle_timeout_seconds=600)
    kept.append(origin.vm_id)
    alice.run_background(origin.vm_id, "python3 -m http.server 8000 --bind 0.0.0.0")
    wait_for(lambda: probe(alice, origin.vm_id, "127.0.0.1", 8000), timeout=30)
    forks = [f.vm_id for f in alice.fork(origin.vm_id, 2)]
    kept.extend(forks)
    ip = {vm: alice.run(vm, MY_IP).stdout.strip() for vm in [origin.vm_id, *forks]}
    for vm in forks:  # each fork has the listener, on its own address
        assert probe(alice, vm, ip[vm], 8000), vm
    assert probe(alice, origin.vm_id, ip[origin.vm_id], 8000)
    assert not probe(alice, forks[0], ip[forks[1]], 8000)
    assert not probe(alice, forks[0], ip[origin.vm_id], 8000)
    assert not probe(alice, origin.vm_id, ip[forks[0]], 8000)
    # each fork's listener answers through the port proxy, as the origin's does
    for vm in [origin.vm_id, *forks]:
        r = wait_for(lambda: (r := http.get(f"/v1/sandboxes/{vm}/ports/8000/")).status_code == 200
                     and r, timeout=20)
        assert "Directory listing" in r.text, r.text


def test_fork_into_ten_and_fork_of_a_fork(alice, http, kept):
    origin = alice.create_sandbox("standard", idle_timeout_seconds=600)
    kept.append(origin.vm_id)
    alice.run(origin.vm_id, "echo gen0 > /tmp/lineage")
    forks = alice.fork(origin.vm_id, 10)
    kept.extend(f.vm_id for f in forks)
    assert len({f.vm_id for f in forks}) == 10
    ips = set()
    for f in forks:
        assert f.forked_from == origin.vm_id and f.state == "running"
        assert alice.run(f.vm_id, "cat /tmp/lineage").stdout == "gen0\n"
        ips.add(alice.run(f.vm_id, MY_IP).stdout.strip())
    assert len(ips) == 10
    # a fork of a fork: restored from a restored sandbox, with both generations' files
    alice.run(forks[0].vm_id, "echo gen1 >> /tmp/lineage")
    [grandchild] = alice.fork(forks[0].vm_id, 1)
    kept.append(grandchild.vm_id)
    assert grandchild.forked_from == forks[0].vm_id
    assert alice.run(grandchild.vm_id, "cat /tmp/lineage").stdout == "gen0\ngen1\n"
    pause(http, grandchild.vm_id)
    resume(http, grandchild.vm_id)
    assert alice.run(grandchild.vm_id, "cat /tmp/lineage").stdout == "gen0\ngen1\n"
    assert alice.run(forks[1].vm_id, "cat /tmp/lineage").stdout == "gen0\n"


def test_network_after_resume_and_in_a_fork(alice, http, kept, outside):
    """Egress works from a restored sandbox and from a fork (each through its own link), and a
    sandbox without internet still has none after a restore."""
    on = alice.create_sandbox("standard", idle_timeout_seconds=600)
    off = alice.create_sandbox("standard", idle_timeout_seconds=600, internet=False)
    kept += [on.vm_id, off.vm_id]
    for vm in (on.vm_id, off.vm_id):
        pause(http, vm)
        resume(http, vm)
    fetch = f"curl -sS -m 5 http://{outside}/file.txt"
    assert alice.run(on.vm_id, fetch).stdout == "downloaded from outside\n"
    assert not probe(alice, off.vm_id, outside, 80)
    [fork] = alice.fork(on.vm_id, 1)
    [dark] = alice.fork(off.vm_id, 1)
    kept += [fork.vm_id, dark.vm_id]
    assert (fork.internet, dark.internet) == (True, False)
    assert alice.run(fork.vm_id, fetch).stdout == "downloaded from outside\n"
    assert not probe(alice, dark.vm_id, outside, 80)
    assert alice.run(on.vm_id, fetch).stdout == "downloaded from outside\n"


# ---- 6. idle pause and auto_resume ---------------------------------------------------------

def test_on_idle_pause_and_auto_resume(alice, http, kept):
    woken = alice.create_sandbox("standard", idle_timeout_seconds=2, on_idle="pause",
                                 auto_resume=True)
    asleep = alice.create_sandbox("standard", idle_timeout_seconds=2, on_idle="pause")
    kept += [woken.vm_id, asleep.vm_id]
    assert (woken.on_idle, woken.auto_resume) == ("pause", True)
    assert (asleep.on_idle, asleep.auto_resume) == ("pause", False)
    alice.run(woken.vm_id, "echo kept > /tmp/state")
    alice.run(asleep.vm_id, "echo kept > /tmp/state")
    for vm in (woken.vm_id, asleep.vm_id):
        rec = wait_for(lambda: (r := listed(http, vm))["state"] != "running" and r,
                       timeout=30, interval=0.2)
        assert rec["state"] == "paused" and rec["end_reason"] is None, rec
        assert rec["disk_bytes"] > 0
        assert ("running", "paused", "paused") in transitions(http, vm)

    # auto_resume: an exec wakes it and gets its output
    r = http.post(f"/v1/sandboxes/{woken.vm_id}/commands", json={"cmd": "cat /tmp/state"})
    assert r.status_code == 200, r.text
    out = [json.loads(line) for line in r.text.splitlines()]
    assert {"type": "stdout", "data": "kept\n"} in out and out[-1]["exit_code"] == 0, out
    assert transitions(http, woken.vm_id)[-1] == ("paused", "running", "resumed")
    # idle again: paused again (not destroyed); a files call wakes it too
    wait_for(lambda: listed(http, woken.vm_id)["state"] == "paused", timeout=30)
    r = http.get(f"/v1/sandboxes/{woken.vm_id}/files", params={"path": "/tmp/state"})
    assert r.status_code == 200 and r.content == b"kept\n", r.text
    assert transitions(http, woken.vm_id)[-1] == ("paused", "running", "resumed")
    # and a port call: it wakes, and says nothing listens on that port
    wait_for(lambda: listed(http, woken.vm_id)["state"] == "paused", timeout=30)
    r = http.get(f"/v1/sandboxes/{woken.vm_id}/ports/8000/")
    assert r.status_code == 502 and error(r)["code"] == "port_unreachable", r.text
    moves = transitions(http, woken.vm_id)
    assert moves[-1] == ("paused", "running", "resumed")
    assert moves.count(("paused", "running", "resumed")) == 3
    assert moves.count(("running", "paused", "paused")) == 3
    assert not any(m[1] in ("stopping", "destroyed") for m in moves), moves

    # without auto_resume: every call into it is refused, and it stays paused
    for method, path, kw in [("POST", "/commands", {"json": {"cmd": "cat /tmp/state"}}),
                             ("GET", "/files", {"params": {"path": "/tmp/state"}}),
                             ("GET", "/ports/8000/", {})]:
        r = http.request(method, f"/v1/sandboxes/{asleep.vm_id}{path}", **kw)
        assert r.status_code == 409 and error(r)["code"] == "sandbox_not_running", (path, r.text)
        assert "paused" in error(r)["message"]
    assert state(http, asleep.vm_id) == "paused"
    resume(http, asleep.vm_id)
    assert alice.run(asleep.vm_id, "cat /tmp/state").stdout == "kept\n"


# ---- concurrent calls ----------------------------------------------------------------------

def test_concurrent_calls_are_serialised(alice, http, server, keys, kept):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600, auto_resume=True)
    kept.append(sb.vm_id)
    base = f"/v1/sandboxes/{sb.vm_id}"
    alice.run(sb.vm_id, "echo kept > /tmp/state")

    def post_all(paths: list[tuple[str, dict | None]]) -> list[httpx.Response]:
        def one(item):
            path, body = item
            with httpx.Client(base_url=server.url, timeout=120,
                              headers={"Authorization": f"Bearer {keys['alice']}"}) as c:
                return c.post(base + path, json=body)
        with ThreadPoolExecutor(len(paths)) as pool:
            return list(pool.map(one, paths))

    # two pauses at once: one pauses, the other finds it paused
    codes = sorted(r.status_code for r in post_all([("/pause", None)] * 2))
    assert codes == [200, 409], codes
    # four execs at once into the paused auto_resume sandbox: one resume, every exec answered
    rs = post_all([("/commands", {"cmd": "cat /tmp/state"})] * 4)
    for r in rs:
        assert r.status_code == 200, r.text
        assert json.loads(r.text.splitlines()[-1])["exit_code"] == 0, r.text
        assert {"type": "stdout", "data": "kept\n"} in [json.loads(x) for x in r.text.splitlines()]
    moves = transitions(http, sb.vm_id)
    assert moves.count(("paused", "running", "resumed")) == 1, moves
    # two resumes at once
    pause(http, sb.vm_id)
    codes = sorted(r.status_code for r in post_all([("/resume", None)] * 2))
    assert codes == [200, 409], codes
    # a pause and a fork at once: the fork is of a running sandbox, or refused; never half made
    for _ in range(3):
        rp, rf = post_all([("/pause", None), ("/fork", {"count": 2})])
        assert rp.status_code == 200, rp.text
        assert rf.status_code in (201, 409), rf.text
        if rf.status_code == 201:
            kept.extend(f["vm_id"] for f in rf.json()["sandboxes"])
            assert all(f["auto_resume"] for f in rf.json()["sandboxes"])  # inherited
            for f in rf.json()["sandboxes"]:
                assert alice.run(f["vm_id"], "cat /tmp/state").stdout == "kept\n"
        else:
            assert error(rf)["code"] == "invalid_state", rf.text
        resume(http, sb.vm_id)
    for s in http.get("/v1/sandboxes").json():
        if s["forked_from"] == sb.vm_id:
            assert s["state"] in ("running", "destroyed"), s


# ---- 8 and 14. disk, listing and nothing left ----------------------------------------------

def test_checkpoint_disk_listing_and_nothing_left(alice, http, server):
    baseline = server.host_objects()
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    try:
        d = sandbox_dir(server, sb.vm_id)
        alice.run(sb.vm_id, "head -c 20M /dev/urandom > /tmp/blob")
        rec = pause(http, sb.vm_id)
        image = d / "checkpoint" / "checkpoint.img"
        assert image.is_file() and (d / "checkpoint").is_dir()
        on_disk = int(subprocess.run(["du", "-sb", str(d / "checkpoint")], capture_output=True,
                                     text=True, check=True).stdout.split()[0])
        # its writes (the 20 MiB in /tmp) and its checkpoint
        assert rec["disk_bytes"] >= 20 * MIB + on_disk // 2, (rec["disk_bytes"], on_disk)
        # 14: listed as paused, with its disk; not among the running
        paused = {s["vm_id"]: s
                  for s in http.get("/v1/sandboxes", params={"state": "paused"}).json()}
        assert sb.vm_id in paused and paused[sb.vm_id]["disk_bytes"] == rec["disk_bytes"]
        assert all(s["state"] == "paused" for s in paused.values())
        running = http.get("/v1/sandboxes", params={"state": "running"}).json()
        assert sb.vm_id not in {s["vm_id"] for s in running}
        assert sb.vm_id in {s["vm_id"] for s in http.get("/v1/sandboxes").json()}
        assert sb.vm_id in {s.vm_id for s in alice.list_sandboxes(state="paused")}

        resume(http, sb.vm_id)
        # the checkpoint is gone from the host once resumed (removed in the background)
        wait_for(lambda: not [p for p in d.iterdir() if p.name.startswith("checkpoint")],
                 timeout=15)
        assert alice.run(sb.vm_id, "wc -c < /tmp/blob").stdout == f"{20 * MIB}\n"
        pause(http, sb.vm_id)  # and destroyed while paused, with a checkpoint on disk
    finally:
        r = http.delete(f"/v1/sandboxes/{sb.vm_id}")
    assert r.status_code == 200 and r.json()["state"] == "destroyed", r.text
    assert r.json()["end_reason"] == "deleted"
    assert not d.exists()
    assert host_processes(sb.vm_id) == [] and cgroup_dirs(server, sb.vm_id) == []
    assert not any(sb.vm_id in ns for ns in os.listdir("/var/run/netns"))
    assert sb.vm_id not in Path("/proc/mounts").read_text()
    wait_for(lambda: all(v <= baseline[k] for k, v in server.host_objects().items()), timeout=15)


# ---- 9. isolation and the memory limit after a restore --------------------------------------

def test_restored_sandbox_is_still_isolated_and_memory_bounded(alice, bob, http, kept, server):
    a = alice.create_sandbox("standard", idle_timeout_seconds=600)
    kept.append(a.vm_id)
    b = bob.create_sandbox("standard", idle_timeout_seconds=600)
    try:
        for c, vm in ((alice, a.vm_id), (bob, b.vm_id)):
            c.run_background(vm, "python3 -m http.server 8000 --bind 0.0.0.0")
        sleeper = alice.run_background(a.vm_id, "sleep 1000")
        pause(http, a.vm_id)
        resume(http, a.vm_id)
        a_ip = alice.run(a.vm_id, MY_IP).stdout.strip()
        b_ip = bob.run(b.vm_id, MY_IP).stdout.strip()
        assert a_ip.count(".") == 3 and b_ip.count(".") == 3 and a_ip != b_ip
        # positive controls: each reaches its own listener on its own address
        wait_for(lambda: probe(alice, a.vm_id, a_ip, 8000), timeout=30)
        wait_for(lambda: probe(bob, b.vm_id, b_ip, 8000), timeout=30)
        assert not probe(alice, a.vm_id, b_ip, 8000)
        assert not probe(bob, b.vm_id, a_ip, 8000)
        assert "sleep 1000" not in bob.run(b.vm_id, "ps -eo args").stdout
        gateway = alice.run(a.vm_id, "ip route | awk '/default/ {print $3}'").stdout.strip()
        assert gateway.count(".") == 3 and not probe(alice, a.vm_id, gateway, server.port)

        # its cgroup is back with the same limit, and going past it kills the process inside
        cg = cgroup(server, a.vm_id)
        assert cg.memory_limit() == (TEMPLATE_MIB + MEMORY_OVERHEAD_MIB) * MIB
        before = cg.oom_kills()
        out = alice.run(a.vm_id, "python3 -c 'b=bytearray(700<<20); print(\"got it\")'\n"
                                 "echo rc=$?", timeout=120).stdout
        assert "rc=137" in out and "got it" not in out, out
        assert cg.oom_kills() > before
        assert alice.run(a.vm_id, "echo still here").stdout == "still here\n"
        alive(alice, a.vm_id, sleeper, "sleep 1000")
        assert state(http, a.vm_id) == "running"
        assert bob.run(b.vm_id, "echo fine").stdout == "fine\n"
    finally:
        bob.kill(b.vm_id)


# ---- 10. workspace -------------------------------------------------------------------------

LIVE_WRITER = ("python3 -c 'import time\nf=open(\"live.log\",\"a\",buffering=1)\nn=0\n"
               "while True:\n n+=1; f.write(str(n)+\"\\n\"); time.sleep(0.2)'")


def workspace_mounted(server, vm_id: str) -> bool:
    """The sandbox's workspace FUSE mount (workspaces/mount.py: <sandbox dir>/home) is on the
    host, or its rclone process runs."""
    point = str(sandbox_dir(server, vm_id) / "home")
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    rclone = subprocess.run(["pgrep", "-f", f"rclone mount .* {point}"], capture_output=True,
                            text=True).stdout.split()
    return point in mounts or bool(rclone)


def curl(url: str) -> tuple[int, bytes]:
    out = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", url],
                         capture_output=True, timeout=120, check=True).stdout
    body, _, status = out.rpartition(b"\n")
    return int(status), body


def test_workspace_is_flushed_at_pause_and_remounted_at_resume(alice, http, kept, server):
    r = http.post("/v1/sandboxes", json={"template": "standard", "idle_timeout_seconds": 600,
                                         "workspace": {"app_id": f"pause-{uuid.uuid4().hex[:8]}"}})
    assert r.status_code == 201, r.text
    sb = r.json()
    vm, wid = sb["vm_id"], sb["workspace_id"]
    kept.append(vm)
    assert wid
    assert workspace_mounted(server, vm)  # the probe sees it
    token = uuid.uuid4().hex
    alice.run(vm, f"echo {token} > before.txt", cwd="/home/user")
    # a process with its cwd and an open file in the workspace, writing through the pause
    writer = alice.run_background(vm, LIVE_WRITER, cwd="/home/user")
    wait_for(lambda: alice.files.exists(vm, "/home/user/live.log"), timeout=20)

    r = http.post(f"/v1/sandboxes/{vm}/fork", json={"count": 1})
    assert r.status_code == 409 and error(r)["code"] == "not_forkable", r.text

    pause(http, vm)
    # flushed: the file is in S3, listed and downloadable while the sandbox is paused
    files = {f["path"]: f for f in http.get(f"/v1/workspaces/{wid}/files").json()["files"]}
    assert files.get("before.txt", {}).get("size") == len(token) + 1, files
    url = http.post(f"/v1/workspaces/{wid}/files/presign",
                    json={"path": "before.txt", "method": "GET"}).json()["url"]
    assert curl(url) == (200, (token + "\n").encode())
    # and unmounted: no FUSE mount of it on the host while paused
    assert not workspace_mounted(server, vm)
    held = files["live.log"]["size"]
    assert held > 0

    resume(http, vm)
    assert alice.run(vm, "cat before.txt", cwd="/home/user").stdout == token + "\n"
    after = uuid.uuid4().hex
    alice.run(vm, f"echo {after} > after.txt", cwd="/home/user")
    # the writer goes on in the remounted workspace, through its old descriptor
    n0 = len(alice.files.read_text(vm, "/home/user/live.log").splitlines())
    wait_for(lambda: len(alice.files.read_text(vm, "/home/user/live.log").splitlines()) > n0 + 3,
             timeout=20)
    assert writer in {c.pid for c in alice.list_commands(vm)}
    # a write after the resume lands in the workspace (a second pause flushes it)
    pause(http, vm)
    files = {f["path"]: f for f in http.get(f"/v1/workspaces/{wid}/files").json()["files"]}
    assert "after.txt" in files, files
    url = http.post(f"/v1/workspaces/{wid}/files/presign",
                    json={"path": "after.txt", "method": "GET"}).json()["url"]
    assert curl(url) == (200, (after + "\n").encode())
    assert files["live.log"]["size"] > held  # the writer's lines after the resume, too
    lines = curl(http.post(f"/v1/workspaces/{wid}/files/presign",
                           json={"path": "live.log", "method": "GET"}).json()["url"])[1].split()
    assert [int(x) for x in lines] == list(range(1, len(lines) + 1))  # one writer, no restart
    resume(http, vm)
    assert alice.run(vm, "cat after.txt", cwd="/home/user").stdout == after + "\n"


# ---- 11. streams cut by a pause, picked up by pid -----------------------------------------

def test_stream_ends_with_sandbox_paused_and_reconnects_after_resume(alice, http, kept, server,
                                                                    keys):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    kept.append(sb.vm_id)
    h = {"Authorization": f"Bearer {keys['alice']}"}
    cmd = "for i in $(seq 1 100000); do echo tick$i; sleep 0.1; done"
    with httpx.stream("POST", f"{server.url}/v1/sandboxes/{sb.vm_id}/commands", headers=h,
                      json={"cmd": cmd}, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        start = json.loads(next(lines))
        assert start["type"] == "start"
        pid = start["pid"]
        got = []
        while len(got) < 5:
            ev = json.loads(next(lines))
            assert ev["type"] == "stdout", ev
            got.append(ev["data"])
        pause(http, sb.vm_id)
        rest = [json.loads(line) for line in lines]  # the stream ends by itself
    assert rest, "the stream ended without an event"
    last = rest[-1]
    assert last["type"] == "error" and last["code"] == "sandbox_paused", rest[-3:]
    assert "reconnect" in last["message"]
    assert all(e["type"] == "stdout" for e in rest[:-1]), rest
    before = "".join(got + [e["data"] for e in rest[:-1]]).split()
    assert before == [f"tick{i}" for i in range(1, len(before) + 1)]

    resume(http, sb.vm_id)
    assert pid in {c.pid for c in alice.list_commands(sb.vm_id)}
    seen = []
    with httpx.stream("GET", f"{server.url}/v1/sandboxes/{sb.vm_id}/commands/{pid}", headers=h,
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            ev = json.loads(line)
            assert ev["type"] in ("start", "stdout"), ev
            if ev["type"] == "stdout":
                seen += ev["data"].split()
            if len(seen) >= len(before) + 10:
                break
    # the whole output, replayed from its first line, and new lines after the pause
    assert seen[:len(before)] == before
    assert seen == [f"tick{i}" for i in range(1, len(seen) + 1)], seen
    alice.send_signal(sb.vm_id, pid, "KILL")
    assert alice.wait(sb.vm_id, pid).exit_code == 137


def test_pty_is_told_the_sandbox_paused(alice, http, kept, server, keys):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    kept.append(sb.vm_id)

    async def session():
        url = server.url.replace("http", "ws") + f"/v1/sandboxes/{sb.vm_id}/pty"
        async with websockets.connect(
                url, additional_headers={"Authorization": f"Bearer {keys['alice']}"}) as ws:
            await ws.send(b"echo pty-$((6*7))\n")
            out = b""
            while b"pty-42" not in out:
                msg = await ws.recv()
                out += msg if isinstance(msg, bytes) else b""
            await asyncio.to_thread(pause, http, sb.vm_id)
            texts = []
            try:
                async for msg in ws:
                    if isinstance(msg, str):
                        texts.append(json.loads(msg))
            except websockets.exceptions.ConnectionClosed:
                pass
            return texts, ws.close_code

    texts, code = asyncio.run(asyncio.wait_for(session(), 60))
    assert any(t.get("type") == "error" and t.get("code") == "sandbox_paused" for t in texts), texts
    assert code == 1012, code
    resume(http, sb.vm_id)
    assert alice.run(sb.vm_id, "echo back").stdout == "back\n"


# ---- 12. refusals --------------------------------------------------------------------------

def test_refusals(alice, http, bob_http, kept):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    kept.append(sb.vm_id)
    base = f"/v1/sandboxes/{sb.vm_id}"

    r = http.post(base + "/resume")  # running
    assert r.status_code == 409 and error(r)["code"] == "invalid_state", r.text
    assert "running" in error(r)["message"] and error(r)["field"] == "vm_id"
    for count_ in (0, 11, -1, "three"):
        r = http.post(base + "/fork", json={"count": count_})
        assert r.status_code == 400, (count_, r.text)
        assert (error(r)["code"], error(r)["field"]) == ("invalid_field", "count"), r.text
    r = http.post(base + "/fork", json={"count": 1, "colour": "red"})
    assert r.status_code == 400 and error(r)["field"] == "colour", r.text

    pause(http, sb.vm_id)
    r = http.post(base + "/pause")
    assert r.status_code == 409 and error(r)["code"] == "invalid_state", r.text
    assert "paused" in error(r)["message"]
    r = http.post(base + "/fork", json={"count": 2})
    assert r.status_code == 409 and error(r)["code"] == "invalid_state", r.text
    assert "paused" in error(r)["message"]
    assert [s for s in http.get("/v1/sandboxes").json() if s.get("forked_from") == sb.vm_id] == []

    # another user's sandbox (paused or running) is not found, and is left as it was
    for path in ("/pause", "/resume", "/fork"):
        r = bob_http.post(base + path, json={"count": 1} if path == "/fork" else None)
        assert r.status_code == 404 and error(r)["code"] == "sandbox_not_found", (path, r.text)
    assert state(http, sb.vm_id) == "paused"
    resume(http, sb.vm_id)
    for path in ("/pause", "/resume", "/fork"):
        r = bob_http.post(base + path, json={"count": 1} if path == "/fork" else None)
        assert r.status_code == 404 and error(r)["code"] == "sandbox_not_found", (path, r.text)
    assert state(http, sb.vm_id) == "running"
    for path in ("/pause", "/resume", "/fork"):
        r = http.post(f"/v1/sandboxes/sbx_doesnotexist{path}")
        assert r.status_code == 404, (path, r.text)

    # a destroyed sandbox: nothing to pause, resume or fork
    http.delete(base)
    for path in ("/pause", "/resume", "/fork"):
        r = http.post(base + path)
        assert r.status_code == 409 and error(r)["code"] == "invalid_state", (path, r.text)
        assert "destroyed" in error(r)["message"]

    # with no body, a fork makes one
    other = alice.create_sandbox("standard", idle_timeout_seconds=600)
    kept.append(other.vm_id)
    r = http.post(f"/v1/sandboxes/{other.vm_id}/fork")
    assert r.status_code == 201, r.text
    kept.extend(f["vm_id"] for f in r.json()["sandboxes"])
    assert len(r.json()["sandboxes"]) == 1


# ---- 13. a restore that fails --------------------------------------------------------------

def test_failed_restore_leaves_it_paused_and_a_retry_works(alice, http, kept, server):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    kept.append(sb.vm_id)
    pid = start_counter(alice, sb.vm_id)
    before = count(alice, sb.vm_id)
    rec = pause(http, sb.vm_id)
    image = sandbox_dir(server, sb.vm_id) / "checkpoint" / "checkpoint.img"
    aside = image.with_name("checkpoint.img.aside")
    image.rename(aside)
    try:
        r = http.post(f"/v1/sandboxes/{sb.vm_id}/resume")
        assert r.status_code == 503 and error(r)["code"] == "resume_failed", r.text
        assert "paused" in error(r)["message"]
        now = http.get(f"/v1/sandboxes/{sb.vm_id}").json()
        assert now["state"] == "paused" and now["paused_at"] == rec["paused_at"], now
        assert now["disk_bytes"] == rec["disk_bytes"]
        # nothing of the attempt is left running on the host
        assert host_processes(sb.vm_id) == [] and cgroup_dirs(server, sb.vm_id) == []
        assert any("resume failed" in line.message for line in alice.logs(sb.vm_id))
        assert transitions(http, sb.vm_id)[-1] == ("running", "paused", "paused")
    finally:
        aside.rename(image)
    resume(http, sb.vm_id)
    after = count(alice, sb.vm_id)
    assert after >= before
    keeps_counting(alice, sb.vm_id, after)
    alive(alice, sb.vm_id, pid, f"/bin/bash -c {COUNTER}")


# ---- metering --------------------------------------------------------------------------------

STANDARD = Rates.from_settings(Settings()).rate_num(500, 512)


def usage_charged(http, vm_id: str) -> int:
    r = http.get("/v1/billing/transactions", params={"limit": 1000})
    assert r.status_code == 200, r.text
    return -sum(t["amount_micro"] for t in r.json()["transactions"]
                if t["kind"] == "usage" and t["sandbox_id"] == vm_id)


def running_ms(http, vm_id: str) -> int:
    """The sandbox's running time from its event feed: from its start to a pause, from a resume
    to the next pause or its end (what the compute meter charges)."""
    total, since = 0, None
    for e in events(http, vm_id):
        if e["to_state"] == "running":
            since = at(e["at"])
        elif since is not None and e["to_state"] in ("paused", "destroyed"):
            total += int((at(e["at"]) - since) / timedelta(milliseconds=1))
            since = None
    return total


def test_compute_is_not_charged_while_paused(alice, http, kept):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    kept.append(sb.vm_id)
    wait_for(lambda: usage_charged(http, sb.vm_id) > 0, timeout=10)
    time.sleep(1)
    pause(http, sb.vm_id)
    ran = compute_cost(running_ms(http, sb.vm_id), STANDARD)
    wait_for(lambda: usage_charged(http, sb.vm_id) == ran, timeout=15)
    time.sleep(2.5)  # two metering ticks and more, paused
    assert usage_charged(http, sb.vm_id) == ran
    resume(http, sb.vm_id)
    wait_for(lambda: usage_charged(http, sb.vm_id) > ran, timeout=10)
    time.sleep(1)
    http.delete(f"/v1/sandboxes/{sb.vm_id}")
    total = compute_cost(running_ms(http, sb.vm_id), STANDARD)
    wait_for(lambda: usage_charged(http, sb.vm_id) == total, timeout=15)
