"""Pause tests that need a server of their own: a paused sandbox (and a paused workspace
sandbox) is still paused after a graceful restart and after a crash, and resumes where it was;
E2A_PAUSED_TTL destroys a paused sandbox with end_reason paused_expired, also when the time ran
out while e2a was down; a fork past the per-user limit makes none; a disk pool with no room for
a checkpoint is 503 pause_failed with the sandbox running on. Nothing is left on the host
afterwards."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from datetime import timedelta

import httpx

from e2a.config import Settings
from e2a.sdk import E2A
from tests.conftest import own_server, wait_for
from tests.e2e.test_pause import (COUNTER, alive, at, count, host_processes, keeps_counting,
                                  pause, resume, sandbox_dir, start_counter, transitions,
                                  workspace_mounted)


def clients(srv, key: str):
    return (E2A(srv.url, key),
            httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=120))


def nothing_left(srv) -> None:
    srv.stop()
    leftovers = srv.host_objects()
    assert not any(leftovers.values()), f"host objects left behind: {leftovers}"


def test_paused_sandboxes_stay_paused_across_a_restart_and_a_crash():
    with own_server("pause") as srv:
        srv.start()
        key = srv.create_user(f"restart-{uuid.uuid4().hex[:6]}@example.com")
        c, http = clients(srv, key)
        sb = c.create_sandbox("standard", idle_timeout_seconds=600)
        pid = start_counter(c, sb.vm_id)
        c.files.write(sb.vm_id, "/tmp/state.txt", b"before the restart")
        r = http.post("/v1/sandboxes", json={"template": "standard", "idle_timeout_seconds": 600,
                                             "workspace": {"app_id": "restart"}})
        assert r.status_code == 201, r.text
        ws, wid = r.json()["vm_id"], r.json()["workspace_id"]
        c.run(ws, "echo in-the-workspace > home.txt", cwd="/home/user")
        before = count(c, sb.vm_id)
        paused = pause(http, sb.vm_id)
        pause(http, ws)
        c.close(), http.close()

        srv.stop()  # graceful
        srv.start()
        c, http = clients(srv, key)
        rec = http.get(f"/v1/sandboxes/{sb.vm_id}").json()
        assert rec["state"] == "paused", rec
        assert (rec["paused_at"], rec["disk_bytes"]) == (paused["paused_at"], paused["disk_bytes"])
        assert (sandbox_dir(srv, sb.vm_id) / "checkpoint" / "checkpoint.img").is_file()
        assert http.get(f"/v1/sandboxes/{ws}").json()["state"] == "paused"
        # the workspace is still in S3 while its sandbox is paused
        files = {f["path"] for f in http.get(f"/v1/workspaces/{wid}/files").json()["files"]}
        assert "home.txt" in files, files

        resume(http, sb.vm_id)
        after = count(c, sb.vm_id)
        assert after >= before, (before, after)
        keeps_counting(c, sb.vm_id, after)
        alive(c, sb.vm_id, pid, f"/bin/bash -c {COUNTER}")
        assert c.files.read_bytes(sb.vm_id, "/tmp/state.txt") == b"before the restart"
        resume(http, ws)
        assert workspace_mounted(srv, ws)
        assert c.run(ws, "cat home.txt", cwd="/home/user").stdout == "in-the-workspace\n"

        # paused again, then a crash: still paused, and it resumes
        before = count(c, sb.vm_id)
        pause(http, sb.vm_id)
        c.close(), http.close()
        srv.kill9()
        srv.start()
        c, http = clients(srv, key)
        assert http.get(f"/v1/sandboxes/{sb.vm_id}").json()["state"] == "paused"
        assert transitions(http, sb.vm_id)[-1] == ("running", "paused", "paused")
        resume(http, sb.vm_id)
        keeps_counting(c, sb.vm_id, before)
        alive(c, sb.vm_id, pid, f"/bin/bash -c {COUNTER}")
        assert c.run(ws, "cat home.txt", cwd="/home/user").stdout == "in-the-workspace\n"

        # e2a killed in the middle of a pause, after runsc saved the sandbox (and stopped it)
        # but before the store said paused: it is paused at the next start, not lost
        before = count(c, sb.vm_id)
        c.close(), http.close()
        srv.kill9()
        image = sandbox_dir(srv, sb.vm_id) / "checkpoint"
        image.mkdir()
        subprocess.run([Settings().runsc, "--root", str(srv.run_dir / "runsc"), "checkpoint", "--image-path",
                        str(image), f"{srv.instance}-{sb.vm_id}"], check=True, timeout=60)
        srv.start()
        c, http = clients(srv, key)
        rec = http.get(f"/v1/sandboxes/{sb.vm_id}").json()
        assert rec["state"] == "paused" and rec["disk_bytes"] > 0, rec
        assert transitions(http, sb.vm_id)[-1] == ("running", "paused", "paused")
        assert not host_processes(sb.vm_id)
        resume(http, sb.vm_id)
        keeps_counting(c, sb.vm_id, before)
        alive(c, sb.vm_id, pid, f"/bin/bash -c {COUNTER}")

        for vm in (sb.vm_id, ws):
            assert http.delete(f"/v1/sandboxes/{vm}").json()["state"] == "destroyed"
        c.close(), http.close()
        nothing_left(srv)


def test_paused_ttl_destroys_with_paused_expired():
    with own_server("pause", E2A_PAUSED_TTL="3") as srv:
        srv.start()
        key = srv.create_user(f"ttl-{uuid.uuid4().hex[:6]}@example.com")
        c, http = clients(srv, key)
        sb = c.create_sandbox("standard", idle_timeout_seconds=600)
        t0 = time.monotonic()
        rec = pause(http, sb.vm_id)
        assert at(rec["pause_expires_at"]) - at(rec["paused_at"]) == timedelta(seconds=3), rec
        time.sleep(1.5)
        assert http.get(f"/v1/sandboxes/{sb.vm_id}").json()["state"] == "paused"
        gone = wait_for(lambda: (r := http.get(f"/v1/sandboxes/{sb.vm_id}").json())["state"]
                        == "destroyed" and r, timeout=15, interval=0.2)
        assert gone["end_reason"] == "paused_expired", gone
        assert at(gone["destroyed_at"]) - at(rec["paused_at"]) >= timedelta(seconds=3), gone
        assert time.monotonic() - t0 < 10
        assert not sandbox_dir(srv, sb.vm_id).exists()
        moves = transitions(http, sb.vm_id)
        assert moves[-3:] == [("running", "paused", "paused"),
                              ("paused", "stopping", "paused_expired"),
                              ("stopping", "destroyed", "paused_expired")], moves
        # a resume comes too late
        r = http.post(f"/v1/sandboxes/{sb.vm_id}/resume")
        assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_state", r.text

        # one whose time runs out while e2a is down goes at the next start
        late = c.create_sandbox("standard", idle_timeout_seconds=600)
        pause(http, late.vm_id)
        c.close(), http.close()
        srv.stop()
        time.sleep(3.5)
        srv.start()
        c, http = clients(srv, key)
        gone = wait_for(lambda: (r := http.get(f"/v1/sandboxes/{late.vm_id}").json())["state"]
                        == "destroyed" and r, timeout=15, interval=0.2)
        assert gone["end_reason"] == "paused_expired", gone
        c.close(), http.close()
        nothing_left(srv)


def test_fork_past_the_per_user_limit_makes_none():
    """All or none: a fork that would take the user past E2A_MAX_SANDBOXES_PER_USER is refused
    (429 sandbox_limit) and makes no sandbox at all; one that fits is made."""
    with own_server("pause", E2A_MAX_SANDBOXES_PER_USER="3") as srv:
        srv.start()
        key = srv.create_user(f"limit-{uuid.uuid4().hex[:6]}@example.com")
        c, http = clients(srv, key)
        origin = c.create_sandbox("standard", idle_timeout_seconds=600)
        r = http.post(f"/v1/sandboxes/{origin.vm_id}/fork", json={"count": 3})
        assert r.status_code == 429 and r.json()["error"]["code"] == "sandbox_limit", r.text
        every = http.get("/v1/sandboxes").json() + \
            http.get("/v1/sandboxes", params={"state": "destroyed"}).json()
        assert [s["vm_id"] for s in every] == [origin.vm_id], every
        assert len(list((srv.base / "data" / "sandboxes").iterdir())) == 1
        r = http.post(f"/v1/sandboxes/{origin.vm_id}/fork", json={"count": 2})
        assert r.status_code == 201, r.text
        assert len(r.json()["sandboxes"]) == 2
        for s in http.get("/v1/sandboxes").json():
            http.delete(f"/v1/sandboxes/{s['vm_id']}")
        c.close(), http.close()
        nothing_left(srv)


# ---- no room for a checkpoint ----------------------------------------------------------------

def fill_pool(c, vm_id: str) -> None:
    """Fill the server's 1 GiB disk pool from inside the sandbox (its own quota is 2 GiB)."""
    r = c.run(vm_id, "head -c 1500M /dev/zero > /tmp/fill; echo rc=$?", timeout=120)
    assert "rc=1" in r.stdout and ("quota" in r.stderr or "space" in r.stderr), r


def test_no_room_for_the_checkpoint_is_pause_failed_and_it_runs_on():
    with own_server("pause", E2A_DISK_GIB="1") as srv:
        srv.start()
        key = srv.create_user(f"full-{uuid.uuid4().hex[:6]}@example.com")
        c, http = clients(srv, key)
        sb = c.create_sandbox("standard", idle_timeout_seconds=600)
        pid = start_counter(c, sb.vm_id)
        fill_pool(c, sb.vm_id)
        r = http.post(f"/v1/sandboxes/{sb.vm_id}/pause")
        assert r.status_code == 503 and r.json()["error"]["code"] == "pause_failed", r.text
        assert "runs on" in r.json()["error"]["message"]
        rec = http.get(f"/v1/sandboxes/{sb.vm_id}").json()
        assert rec["state"] == "running" and rec["paused_at"] is None, rec
        assert c.run(sb.vm_id, "echo on").stdout == "on\n"
        alive(c, sb.vm_id, pid, f"/bin/bash -c {COUNTER}")
        assert not [p for p in sandbox_dir(srv, sb.vm_id).iterdir()
                    if p.name.startswith("checkpoint")]
        assert ("running", "paused", "paused") not in transitions(http, sb.vm_id)
        # room again (the kernel frees it at its next commit, within 30 s: made now); the
        # counter, which could not write its file meanwhile, goes on; it pauses and resumes
        c.run(sb.vm_id, "rm /tmp/fill")
        subprocess.run(["btrfs", "filesystem", "sync", str(srv.base / "data" / "sandboxes")],
                       check=True, capture_output=True)
        before = keeps_counting(c, sb.vm_id, 0)
        pause(http, sb.vm_id)
        resume(http, sb.vm_id)
        keeps_counting(c, sb.vm_id, before)
        http.delete(f"/v1/sandboxes/{sb.vm_id}")
        c.close(), http.close()
        nothing_left(srv)


def test_a_failed_pause_leaves_open_streams_alone():
    with own_server("pause", E2A_DISK_GIB="1") as srv:
        srv.start()
        key = srv.create_user(f"stream-{uuid.uuid4().hex[:6]}@example.com")
        c, http = clients(srv, key)
        sb = c.create_sandbox("standard", idle_timeout_seconds=600)
        fill_pool(c, sb.vm_id)
        try:
            with httpx.stream("POST", f"{srv.url}/v1/sandboxes/{sb.vm_id}/commands",
                              headers={"Authorization": f"Bearer {key}"}, timeout=60,
                              json={"cmd": "for i in $(seq 1 40); do echo tick$i; sleep 0.1; "
                                           "done"}) as r:
                lines = r.iter_lines()
                assert json.loads(next(lines))["type"] == "start"
                assert json.loads(next(lines))["data"] == "tick1\n"
                p = http.post(f"/v1/sandboxes/{sb.vm_id}/pause")
                assert p.status_code == 503 and p.json()["error"]["code"] == "pause_failed"
                rest = [json.loads(line) for line in lines]
            assert rest[-1].get("type") == "exit" and rest[-1]["exit_code"] == 0, rest[-2:]
            ticks = "".join(e["data"] for e in rest if e["type"] == "stdout").split()
            assert ticks == [f"tick{i}" for i in range(2, 41)]
        finally:
            http.delete(f"/v1/sandboxes/{sb.vm_id}")
            c.close(), http.close()
            nothing_left(srv)
