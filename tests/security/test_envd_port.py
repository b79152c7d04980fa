"""Sandbox code cannot take envd's place, and sees no credential of e2a's.

The hole this closes: as `user` (uid 1000) a process bound (sandbox_ip, envd's port) with
SO_REUSEADDR beside envd's 0.0.0.0 listener (gVisor allowed it); once the host's keep-alive
connections expired, the host's next call reached that process, carrying the bearer token that
then ran commands as root. Now envd holds the port (on every address: a fork has another
address than its origin) without SO_REUSEADDR, so no bind of that port succeeds beside it,
requests are signed per request (no replayable secret on the wire) and the host believes only
answers that prove the token (docs/protocol.md).

Keep-alive connections expire after 60 s; instead of waiting for that, the test makes the host
open new connections (concurrent commands beyond its idle pool, a PTY WebSocket: always a new
connection) after the attacker tried everything, and checks that each reached envd."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest
import websockets.sync.client as ws_client

from e2a.runtime.runsc import ENVD_PORT
from tests.conftest import wait_for
from tests.security.conftest import envd_launch

OTHER_PORTS = (49983, 8000)  # e2a's old envd port, and any port an app would use

# Run as `user` in the sandbox: try every way to bind envd's port, hold whatever could be
# bound, and record every byte anything sends to it.
ATTACKER = r"""
import errno, json, os, socket, sys, threading
envd_port, log = int(sys.argv[1]), sys.argv[2]
other_ports = [int(p) for p in sys.argv[3].split(",")]
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.connect(("10.0.0.1", 9))  # no packet: only picks the source address (the sandbox's)
ip = probe.getsockname()[0]
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
attempts, held = {}, []
for fam, addr in [(socket.AF_INET, ip), (socket.AF_INET, "0.0.0.0"),
                  (socket.AF_INET6, "::ffff:" + ip), (socket.AF_INET6, "::")]:
    for opts in [(), ("SO_REUSEADDR",), ("SO_REUSEPORT",), ("SO_REUSEADDR", "SO_REUSEPORT"),
                 ("SO_REUSEADDR", "SO_BINDTODEVICE")]:
        s = socket.socket(fam, socket.SOCK_STREAM)
        key = f"{addr}:{envd_port} {'+'.join(opts) or 'plain'}"
        try:
            for o in opts:
                if o == "SO_BINDTODEVICE":
                    s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, b"eth0")
                else:
                    s.setsockopt(socket.SOL_SOCKET, getattr(socket, o), 1)
            s.bind((addr, envd_port))
            s.listen(16)
            held.append(s)
            attempts[key] = "bound"
        except OSError as e:
            attempts[key] = errno.errorcode.get(e.errno, str(e.errno))
            s.close()
others = {}
for port in other_ports:
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", port)); s.listen(16); held.append(s); others[port] = "bound"
    except OSError as e:
        others[port] = errno.errorcode.get(e.errno, str(e.errno)); s.close()
try:
    socket.create_connection(("127.0.0.1", envd_port), timeout=2).close()
    loopback = "connected"
except OSError as e:
    loopback = errno.errorcode.get(e.errno, str(e.errno))
lock = threading.Lock()

def serve(s):
    while True:
        c, peer = s.accept()
        c.settimeout(2)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                d = c.recv(65536)
                if not d:
                    break
                data += d
        except OSError:
            pass
        with lock, open(log, "a") as f:
            f.write(json.dumps({"port": s.getsockname()[1], "peer": peer[0],
                                "data": data.decode("latin-1")}) + "\n")
        try:  # answer like envd would, minus the proof it cannot make
            c.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n'
                      b'Content-Length: 15\r\n\r\n{"status":"ok"}')
        except OSError:
            pass
        c.close()

for s in held:
    threading.Thread(target=serve, args=(s,), daemon=True).start()
with open(log + ".ready", "w") as f:
    json.dump({"uid": os.getuid(), "ip": ip, "attempts": attempts, "others": others,
               "loopback": loopback}, f)
threading.Event().wait(600)
"""


@pytest.fixture(scope="module")
def victim(alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    yield sb
    alice.kill(sb.vm_id)


@pytest.fixture(scope="module")
def attacker(alice, victim):
    """The attacker, started as `user`; its bind results."""
    alice.files.write(victim.vm_id, "/tmp/attacker.py", ATTACKER.encode())
    r = alice.run(victim.vm_id, f"nohup python3 /tmp/attacker.py {ENVD_PORT} /tmp/attacker.log "
                                f"{','.join(map(str, OTHER_PORTS))} >/tmp/attacker.out 2>&1 & "
                                "echo started")
    assert r.exit_code == 0, r
    out = wait_for(lambda: alice.run(victim.vm_id, "cat /tmp/attacker.log.ready 2>/dev/null; "
                                                   "cat /tmp/attacker.out").stdout.strip(),
                   timeout=20)
    return json.loads(out.splitlines()[0])


def captured(alice, victim) -> list[dict]:
    out = alice.run(victim.vm_id, "cat /tmp/attacker.log 2>/dev/null || true", user="root").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_user_cannot_bind_envds_address_or_port(attacker, server, victim):
    assert attacker["uid"] == 1000
    listen, _ = envd_launch(server, victim.vm_id)
    # envd holds the port on every address (a fork answers on an address of its own,
    # docs/pause.md), loopback included: a connection there reaches envd, which believes
    # only signed requests
    assert listen == f"0.0.0.0:{ENVD_PORT}"
    assert attacker["loopback"] == "connected"
    bound = {k: v for k, v in attacker["attempts"].items() if v == "bound"}
    assert not bound, f"sandbox code bound envd's port: {bound}"
    assert len(attacker["attempts"]) == 20
    assert set(attacker["attempts"].values()) <= {"EADDRINUSE", "EACCES", "EPERM"}
    # Not a vacuous refusal: the same process can listen on ports of its own.
    assert attacker["others"] == {str(p): "bound" for p in OTHER_PORTS}


def test_fresh_connections_after_the_attack_still_reach_envd(attacker, alice, server, keys,
                                                             victim):
    vm = victim.vm_id
    base = f"/v1/sandboxes/{vm}"
    auth = {"Authorization": f"Bearer {keys['alice']}"}

    def run(i: int) -> tuple[int, list[dict]]:
        # A client of its own each: the host needs as many connections to envd at once, more
        # than it keeps idle, so most of these open new ones.
        with httpx.Client(base_url=server.url, headers=auth, timeout=60) as c:
            r = c.post(base + "/commands", json={"cmd": f"sleep 0.5; echo run-{i} $(id -u)"})
            return r.status_code, [json.loads(line) for line in r.text.splitlines() if line]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(run, range(16)))
    for i, (status, events) in enumerate(answers):
        assert status == 200, events
        assert {"type": "stdout", "data": f"run-{i} 1000\n"} in events, events
        assert events[-1]["type"] == "exit" and events[-1]["exit_code"] == 0, events

    # A PTY is always a new connection (a WebSocket of its own).
    url = server.url.replace("http://", "ws://") + base + "/pty"
    with ws_client.connect(url, additional_headers=auth, open_timeout=15) as ws:
        ws.send(b"echo pty-$((40+2)) $(id -u)\n")
        screen, end = "", time.monotonic() + 15
        while "pty-42 1000" not in screen and time.monotonic() < end:
            msg = ws.recv(timeout=15)
            screen += msg.decode(errors="replace") if isinstance(msg, bytes) else ""
        assert "pty-42 1000" in screen

    # Files and the host's own calls (logs) on new connections too.
    with httpx.Client(base_url=server.url, headers=auth, timeout=60) as c:
        assert c.get(base + "/files", params={"path": "/etc/hostname"}).text == "sandbox\n"
        assert c.get(base + "/logs").status_code == 200
    assert captured(alice, victim) == [], "the host talked to the attacker"


def test_other_ports_see_no_e2a_credential(attacker, alice, server, keys, victim):
    vm = victim.vm_id
    _, token = envd_launch(server, vm)
    with httpx.Client(base_url=server.url, timeout=60,
                      headers={"Authorization": f"Bearer {keys['alice']}"}) as c:
        r = c.get(f"/v1/sandboxes/{vm}/files", params={"path": "/etc/hostname"})
        assert r.status_code == 200
        r = c.get(f"/v1/sandboxes/{vm}/ports/8000/probe", params={"q": "1"})
        assert r.status_code == 200  # the attacker's own listener answered the port proxy
    seen = captured(alice, victim)
    assert [s["port"] for s in seen] == [8000], seen  # only what the owner sent to that port
    data = seen[0]["data"]
    assert data.startswith("GET /probe?q=1 ")
    lowered = data.lower()
    assert "authorization" not in lowered and "e2a-" not in lowered
    assert token not in data and keys["alice"] not in data
