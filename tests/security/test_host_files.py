"""A local host user learns nothing from e2a's files and cannot use a sandbox's files:
the data and run directories are root's alone (0700, files 0600), a setuid program made as root
inside a sandbox is neither reachable nor setuid on the host, and the database holds no agent
token."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

from tests.security.conftest import NOBODY, as_user


def test_unprivileged_host_user_reads_nothing_of_e2a(server, alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    try:
        alice.files.write(sb.vm_id, "secret.txt", b"tenant data")
        data, run = server.base / "data", server.run_dir
        for d in (data, run, run / "runsc", data / "sandboxes", data / "sandboxes" / sb.vm_id,
                  data / "logs"):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        for f in (data / "agent.key", data / "e2a.db"):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        # What a host user actually gets:
        for target in (data / "e2a.db", data / "agent.key", data / "logs",
                       data / "sandboxes" / sb.vm_id / "config.json",
                       data / "sandboxes" / sb.vm_id / "upper" / "home" / "user" / "secret.txt",
                       run / "runsc"):
            r = as_user(NOBODY, "cat", str(target))
            assert r.returncode != 0 and "Permission denied" in r.stderr, (target, r)
        r = as_user(NOBODY, "ls", str(data / "sandboxes"))
        assert r.returncode != 0
    finally:
        alice.kill(sb.vm_id)


def test_setuid_file_made_in_a_sandbox_is_useless_on_the_host(server, alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    try:
        r = alice.run(sb.vm_id, "cp /usr/bin/id /tmp/rootid && chmod 4755 /tmp/rootid && "
                                "cp /usr/bin/id /home/user/rootid2 && chmod 4755 /home/user/rootid2",
                      user="root")
        assert r.exit_code == 0, r.stderr
        sdir = server.base / "data" / "sandboxes" / sb.vm_id
        for planted in (sdir / "tmp" / "rootid", sdir / "rootfs" / "home" / "user" / "rootid2"):
            assert planted.exists()
            out = as_user(NOBODY, str(planted))
            assert out.returncode != 0 and "euid=0" not in out.stdout, out
        # The overlay is mounted nosuid,nodev: even a path that root hands out runs unprivileged.
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
        opts = next(m[3] for m in mounts if m[1] == str(sdir / "rootfs"))
        assert "nosuid" in opts.split(",") and "nodev" in opts.split(",")
    finally:
        alice.kill(sb.vm_id)


def test_database_holds_no_agent_token(server, alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    try:
        db = sqlite3.connect(server.base / "data" / "e2a.db")
        token = db.execute("select envd_token from sandboxes where id = ?",
                           (sb.vm_id,)).fetchone()[0]
        db.close()
        assert token == ""
        assert alice.run(sb.vm_id, "echo works").stdout == "works\n"
    finally:
        alice.kill(sb.vm_id)
