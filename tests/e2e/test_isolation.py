"""Isolation: files, processes, network between sandboxes and to the host, egress control,
fork bomb; and the port proxy that is the only way in. (Memory: test_memory.py.)"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
import uuid

import httpx
import pytest
import websockets


MY_IP = ("python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
         "s.connect(('192.0.2.1', 9)); print(s.getsockname()[0])\"")


def probe(client, vm_id, host, port, timeout=3) -> bool:
    """Can the sandbox open a TCP connection to host:port?"""
    r = client.run(vm_id, f"timeout {timeout} bash -c 'exec 3<>/dev/tcp/{host}/{port}' "
                          "&& echo OPEN || echo CLOSED")
    return r.stdout.strip() == "OPEN"


def test_internet_true_reaches_outside_and_false_does_not(alice, outside):
    on = alice.create_sandbox("standard")
    off = alice.create_sandbox("standard", internet=False)
    try:
        assert probe(alice, on.vm_id, outside, 80)
        r = alice.run(on.vm_id, f"curl -sS -m 5 http://{outside}/ | head -c 200")
        assert "Directory listing" in r.stdout
        assert not probe(alice, off.vm_id, outside, 80)
        assert alice.get_sandbox(off.vm_id).internet is False
    finally:
        alice.kill(on.vm_id)
        alice.kill(off.vm_id)


def test_no_host_files_or_processes(alice, sandbox):
    marker = f"/tmp/e2a-host-secret-{uuid.uuid4().hex}"
    open(marker, "w").write("secret")
    try:
        r = alice.run(sandbox.vm_id, f"cat {marker}; ls /tmp", user="root")
        assert "secret" not in r.stdout and os.path.basename(marker) not in r.stdout
        procs = alice.run(sandbox.vm_id, "ps -eo pid,args", user="root").stdout
        assert "e2a serve" not in procs and "pytest" not in procs
        assert len(procs.strip().splitlines()) < 10  # envd, bash, ps: not the host's hundreds
        assert alice.run(sandbox.vm_id, "cat /proc/1/cmdline | tr '\\0' ' '").stdout.startswith(
            "/.e2a/envd")
    finally:
        os.unlink(marker)


def test_sandboxes_cannot_see_or_reach_each_other(alice, bob):
    a = alice.create_sandbox("standard")
    b = bob.create_sandbox("standard")
    try:
        alice.run_background(a.vm_id, "python3 -m http.server 8000 --bind 0.0.0.0")
        alice.run_background(a.vm_id, "sleep 777")
        a_ip = alice.run(a.vm_id, MY_IP).stdout.strip()
        assert a_ip.count(".") == 3
        # the listener is up: it answers inside a
        deadline = time.monotonic() + 30
        while not probe(alice, a.vm_id, "127.0.0.1", 8000) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert probe(alice, a.vm_id, a_ip, 8000)
        assert "sleep 777" not in bob.run(b.vm_id, "ps -eo args").stdout
        assert not probe(bob, b.vm_id, a_ip, 8000)
    finally:
        alice.kill(a.vm_id)
        bob.kill(b.vm_id)


@pytest.fixture
def host_listener():
    """A TCP listener on every host address (0.0.0.0): a host-only service."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", 0))
    sock.listen(16)
    accepted = []

    def loop():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            accepted.append(conn)
            conn.close()

    threading.Thread(target=loop, daemon=True).start()
    yield sock.getsockname()[1], accepted
    sock.close()


def test_no_route_to_host_services(alice, sandbox, host_listener, server):
    port, accepted = host_listener
    gateway = alice.run(sandbox.vm_id, "ip route | awk '/default/ {print $3}'").stdout.strip()
    assert gateway.count(".") == 3
    assert not probe(alice, sandbox.vm_id, gateway, port)
    assert not probe(alice, sandbox.vm_id, gateway, server.port)  # the e2a API itself
    host_ip = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    for ip in host_ip[:2]:
        if ":" not in ip:
            assert not probe(alice, sandbox.vm_id, ip, port)
    assert accepted == []
    # positive control: the same listener is reachable from the host itself
    with socket.create_connection(("127.0.0.1", port), timeout=3):
        pass


def test_fork_bomb_is_contained(alice, bob, server):
    sb = alice.create_sandbox("standard")
    other = bob.create_sandbox("standard")
    try:
        alice.run_background(sb.vm_id, "bomb() { bomb | bomb & }; bomb", timeout=20)
        time.sleep(8)
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        assert bob.run(other.vm_id, "echo unaffected").stdout == "unaffected\n"
    finally:
        alice.kill(sb.vm_id)
        bob.kill(other.vm_id)
    assert alice.get_sandbox(sb.vm_id).state == "destroyed"


HEADER_ECHO = r'''
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "headers": dict(self.headers)}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    do_POST = do_GET
http.server.ThreadingHTTPServer(("0.0.0.0", 8001), H).serve_forever()
'''

WS_ECHO = r'''
import base64, hashlib, socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8002)); s.listen(4)
while True:
    c, _ = s.accept(); req = b""
    while b"\r\n\r\n" not in req: req += c.recv(4096)
    key = [l.split(b":", 1)[1].strip() for l in req.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")][0]
    acc = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n")
    hdr = c.recv(2); n = hdr[1] & 127; mask = c.recv(4); data = b""
    while len(data) < n: data += c.recv(n - len(data))
    msg = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    out = b"echo:" + msg
    c.sendall(bytes([0x81, len(out)]) + out); c.close()
'''


def test_port_proxy_http_and_websocket(alice, sandbox, server, keys):
    alice.files.write(sandbox.vm_id, "echo_server.py", HEADER_ECHO.encode())
    alice.files.write(sandbox.vm_id, "ws_server.py", WS_ECHO.encode())
    alice.run_background(sandbox.vm_id, "python3 echo_server.py")
    alice.run_background(sandbox.vm_id, "python3 ws_server.py")
    h = {"Authorization": f"Bearer {keys['alice']}", "X-Probe": "yes", "Cookie": "app=1"}
    url = f"{server.url}/v1/sandboxes/{sandbox.vm_id}/ports/8001/some/path?q=1"
    deadline = time.monotonic() + 60
    while True:
        r = httpx.get(url, headers=h, timeout=10)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    seen = r.json()
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert seen["path"] == "/some/path?q=1"
    assert headers.get("x-probe") == "yes" and headers.get("cookie") == "app=1"
    assert "authorization" not in headers  # the API key never reaches the sandbox
    # without the key: refused
    assert httpx.get(url, timeout=10).status_code == 401
    # a port nothing listens on: a clear 502, not a hang
    r = httpx.get(f"{server.url}/v1/sandboxes/{sandbox.vm_id}/ports/9/", headers=h, timeout=30)
    assert r.status_code == 502 and r.json()["error"]["code"] == "port_unreachable"

    async def ws_roundtrip():
        ws_url = server.url.replace("http", "ws") + f"/v1/sandboxes/{sandbox.vm_id}/ports/8002/ws"
        async with websockets.connect(
                ws_url, additional_headers={"Authorization": f"Bearer {keys['alice']}"}) as ws:
            await ws.send("ping")
            return await ws.recv()

    assert asyncio.run(asyncio.wait_for(ws_roundtrip(), 30)) == "echo:ping"


def test_cpu_quota_is_enforced(alice, sandbox, server):
    """A busy loop gets half a CPU: the host's CFS throttles the sandbox's cgroup."""
    cg = f"/sys/fs/cgroup/cpu/{server.instance}/{server.instance}-{sandbox.vm_id}"
    if not os.path.isdir(cg):  # cgroup v2 host
        cg = f"/sys/fs/cgroup/{server.instance}/{server.instance}-{sandbox.vm_id}"
    stat_file = os.path.join(cg, "cpu.stat")
    before = dict(line.split() for line in open(stat_file).read().splitlines())
    r = alice.run(sandbox.vm_id, "timeout 3 sh -c 'while :; do :; done'; echo done")
    assert r.stdout == "done\n"
    after = dict(line.split() for line in open(stat_file).read().splitlines())
    throttled = int(after.get("nr_throttled", 0)) - int(before.get("nr_throttled", 0))
    assert throttled >= 5, (before, after)


def test_writes_stay_in_the_sandboxs_own_layer(alice, bob, sandbox):
    other = bob.create_sandbox("standard")
    try:
        alice.run(sandbox.vm_id, "echo mine > /usr/local/marker", user="root")
        assert alice.run(sandbox.vm_id, "cat /usr/local/marker").stdout == "mine\n"
        assert bob.run(other.vm_id, "cat /usr/local/marker 2>&1; true").stdout.startswith("cat:")
        images = [p for p in os.listdir("/var/cache/e2a/templates") if p.startswith("standard-")]
        assert images and not any(os.path.exists(f"/var/cache/e2a/templates/{p}/rootfs/usr/local/marker")
                                  for p in images)
    finally:
        bob.kill(other.vm_id)
