"""Commands: streaming, exit codes, stdin, signals, timeouts, background + reconnect, PTY."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import websockets

from e2a.sdk import E2AError


def test_echo_and_exit_codes(alice, sandbox):
    r = alice.run(sandbox.vm_id, "echo hi")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "hi\n", "")
    assert alice.run(sandbox.vm_id, "exit 42").exit_code == 42
    r = alice.run(sandbox.vm_id, argv=["printf", "%s|", "a b", "c"])
    assert r.stdout == "a b|c|"
    r = alice.run(sandbox.vm_id, "id -un; pwd")
    assert r.stdout == "user\n/home/user\n"
    r = alice.run(sandbox.vm_id, "id -u; pwd", user="root", cwd="/tmp")
    assert r.stdout == "0\n/tmp\n"


def test_stdout_stderr_order_is_kept(alice, sandbox):
    events = list(alice.stream(sandbox.vm_id,
                               "for i in 1 2 3; do echo out$i; sleep 0.05; echo err$i >&2; "
                               "sleep 0.05; done"))
    seq = [(e.type, e.data.strip()) for e in events if e.type in ("stdout", "stderr")]
    assert seq == [("stdout", "out1"), ("stderr", "err1"), ("stdout", "out2"),
                   ("stderr", "err2"), ("stdout", "out3"), ("stderr", "err3")]


def test_output_streams_as_it_happens(server, keys, sandbox):
    """The first line arrives while the command still runs, not at its end."""
    h = {"Authorization": f"Bearer {keys['alice']}"}
    with httpx.stream("POST", f"{server.url}/v1/sandboxes/{sandbox.vm_id}/commands", headers=h,
                      json={"cmd": "echo first; sleep 3; echo second"}, timeout=30) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines))["type"] == "start"
        t0 = time.monotonic()
        ev = json.loads(next(lines))
        first_after = time.monotonic() - t0
        assert ev == {"type": "stdout", "data": "first\n"}
        rest = [json.loads(line) for line in lines]
        total = time.monotonic() - t0
    assert rest[-1]["exit_code"] == 0
    assert first_after < total - 1.5  # the first line came well before the 3 s sleep ended


def test_stdin(alice, sandbox):
    r = alice.run(sandbox.vm_id, "tr a-z A-Z", stdin="hello stdin\n")
    assert r.stdout == "HELLO STDIN\n"
    pid = alice.run_background(sandbox.vm_id, "read a; read b; echo got:$a:$b", keep_stdin=True)
    alice.send_stdin(sandbox.vm_id, pid, "one\n")
    alice.send_stdin(sandbox.vm_id, pid, "two\n", eof=True)
    result = alice.wait(sandbox.vm_id, pid)
    assert result.stdout == "got:one:two\n"


def test_kill_with_signal(alice, sandbox):
    pid = alice.run_background(sandbox.vm_id, "trap 'echo got TERM; exit 7' TERM; "
                               "while true; do sleep 0.1; done")
    time.sleep(0.5)
    alice.send_signal(sandbox.vm_id, pid, "SIGTERM")
    assert alice.wait(sandbox.vm_id, pid).exit_code == 7
    pid = alice.run_background(sandbox.vm_id, "sleep 1000")
    alice.send_signal(sandbox.vm_id, pid, "KILL")
    res = alice.wait(sandbox.vm_id, pid)
    assert res.exit_code == 137 and res.signal == "SIGKILL"
    with pytest.raises(E2AError) as e:
        alice.send_signal(sandbox.vm_id, pid, "SIGNOTHING")
    assert e.value.status in (400, 409)


def test_timeout_kills_the_process_group(alice, sandbox):
    t0 = time.monotonic()
    r = alice.run(sandbox.vm_id, "sleep 100 & sleep 100; echo never", timeout=1)
    assert r.timed_out and r.exit_code == 137
    assert time.monotonic() - t0 < 30
    assert "sleep 100" not in alice.run(sandbox.vm_id, "ps -eo args").stdout


def test_background_and_reconnect(alice, sandbox):
    pid = alice.run_background(sandbox.vm_id, "for i in $(seq 1 30); do echo line$i; sleep 0.1; "
                               "done; exit 5")
    assert pid in {c.pid for c in alice.list_commands(sandbox.vm_id)}
    # reconnect mid-way: the replay starts from the first line
    events = alice.reconnect(sandbox.vm_id, pid)
    first = [e for e in events if e.type == "stdout"][:1]
    assert first and first[0].data.startswith("line1\n")
    res = alice.wait(sandbox.vm_id, pid)
    assert res.exit_code == 5
    assert res.stdout.split() == [f"line{i}" for i in range(1, 31)]
    # and again after it ended: everything is still there
    res2 = alice.wait(sandbox.vm_id, pid)
    assert res2.stdout == res.stdout and res2.exit_code == 5
    assert pid not in {c.pid for c in alice.list_commands(sandbox.vm_id)}
    with pytest.raises(E2AError) as e:
        list(alice.reconnect(sandbox.vm_id, 999999))
    assert e.value.status == 404


def test_foreground_command_survives_client_disconnect(server, keys, alice, sandbox):
    h = {"Authorization": f"Bearer {keys['alice']}"}
    with httpx.stream("POST", f"{server.url}/v1/sandboxes/{sandbox.vm_id}/commands", headers=h,
                      json={"cmd": "sleep 1; echo done > /tmp/marker"}, timeout=30) as r:
        pid = json.loads(next(r.iter_lines()))["pid"]
    res = alice.wait(sandbox.vm_id, pid)
    assert res.exit_code == 0
    assert alice.files.read_bytes(sandbox.vm_id, "/tmp/marker") == b"done\n"


def test_pty_interactive_shell(server, keys, sandbox):
    async def session() -> str:
        url = server.url.replace("http", "ws") + f"/v1/sandboxes/{sandbox.vm_id}/pty?cols=100&rows=30"
        async with websockets.connect(
                url, additional_headers={"Authorization": f"Bearer {keys['alice']}"}) as ws:
            out = b""
            await ws.send(json.dumps({"type": "resize", "cols": 123, "rows": 45}))
            await ws.send(b"stty size; echo pty-$((6*7)); tty; exit 9\n")
            exit_code = None
            async for msg in ws:
                if isinstance(msg, bytes):
                    out += msg
                else:
                    ctrl = json.loads(msg)
                    if ctrl.get("type") == "exit":
                        exit_code = ctrl["exit_code"]
            return out.decode(errors="replace"), exit_code

    out, code = asyncio.run(asyncio.wait_for(session(), 60))
    assert "45 123" in out
    assert "pty-42" in out
    assert "/dev/pts/" in out
    assert code == 9


def test_pty_requires_auth(server, bob, sandbox):
    async def attempt(headers):
        url = server.url.replace("http", "ws") + f"/v1/sandboxes/{sandbox.vm_id}/pty"
        async with websockets.connect(url, additional_headers=headers) as ws:
            await ws.recv()

    with pytest.raises(websockets.exceptions.InvalidStatus):
        asyncio.run(attempt({}))
    # bob's key is valid, but the sandbox is alice's: refused like a missing one
    with pytest.raises(websockets.exceptions.InvalidStatus):
        asyncio.run(attempt({"Authorization": f"Bearer {bob.api_key}"}))
