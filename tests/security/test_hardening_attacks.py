"""Attacks on the hardening: envd's signed-request scheme and its token, the files API acting
as the named user, the disk limit, and the API's own limits (body guard, proxy caps, cookie
scoping, WebSocket buffering).

Each test is one attack. Two found holes ("Was a HOLE:" in their docstrings), now fixed; all
are regression tests."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import tarfile
import threading
import time
from urllib.parse import urlparse

import pytest
import websockets.exceptions
import websockets.sync.client as ws_client

from e2a.server_cli import WS_MAX_MESSAGE

from tests.conftest import wait_for
from tests.security.conftest import envd_launch, raw_request, rss_kib


@pytest.fixture(scope="module")
def sb(alice):
    s = alice.create_sandbox("standard", idle_timeout_seconds=600)
    yield s
    alice.kill(s.vm_id)


# ---- API guard ------------------------------------------------------------------------------

def test_json_body_limit_holds_for_a_sandbox_id_containing_ports(server, keys):
    """Was a HOLE: the guard decided that a route is streamed (no body limit) by looking for
    "/ports/" anywhere in the path, so POST /v1/sandboxes/ports/commands (vm_id "ports", a JSON
    route) skips the body limit: FastAPI then reads the whole body into memory before it finds
    that there is no such sandbox. Any tenant can make the server buffer as much as it sends.
    Should: 413 body_too_large at once from the Content-Length, as on every other JSON route
    (the streamed test should match the port-proxy route itself, /v1/sandboxes/{id}/ports/...)."""
    pid = server.proc.pid
    before = rss_kib(pid)
    size = 200 << 20
    chunk = b" " * (1 << 20)
    head = (f"POST /v1/sandboxes/ports/commands HTTP/1.1\r\nHost: e2a\r\n"
            f"Authorization: Bearer {keys['alice']}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}")
    peak = [before]

    def body():
        for i in range(size // len(chunk)):
            if i % 20 == 0:
                peak[0] = max(peak[0], rss_kib(pid))
            yield chunk
    status, out = raw_request(server, head, body())
    peak[0] = max(peak[0], rss_kib(pid))
    grown_mib = (peak[0] - before) // 1024
    assert status == 413, (status, out[:200], f"server grew by {grown_mib} MiB")
    assert grown_mib < 64


@pytest.mark.parametrize("path", ["/v1/sandboxes", "/v1/sandboxes/x/commands",
                                  "/v1/sandboxes/x/files/mkdir"])
def test_odd_content_lengths_are_refused_before_the_body(server, keys, path):
    """Duplicate, signed, padded or huge Content-Length headers: never a buffered body."""
    auth = f"Authorization: Bearer {keys['alice']}\r\nContent-Type: application/json"
    for cl in ("Content-Length: 10\r\nContent-Length: 999999999",
               "Content-Length: +999999999", "Content-Length: 1_000_000_000",
               "Content-Length: 99999999999999999999999999",
               "Content-Length: 5\r\nTransfer-Encoding: chunked"):
        try:
            status, _ = raw_request(server, f"POST {path} HTTP/1.1\r\nHost: e2a\r\n{auth}\r\n{cl}",
                                    [b"{" * 4096], read_timeout=20)
        except (ConnectionResetError, IndexError, ValueError):
            continue  # the parser dropped the connection: fine
        assert status in (400, 413, 404, 422), (cl, status)


def test_pipelined_request_after_a_refused_body_is_not_served(server, keys):
    """A 413 closes the connection: a request smuggled in the refused body is never run."""
    smuggled = (f"DELETE /v1/sandboxes/x HTTP/1.1\r\nHost: e2a\r\n"
                f"Authorization: Bearer {keys['alice']}\r\n\r\n").encode()
    big = 64 << 20  # over the default limit (16 MiB)
    head = (f"POST /v1/sandboxes HTTP/1.1\r\nHost: e2a\r\nAuthorization: Bearer {keys['alice']}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {big}")
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=20) as s:
        s.sendall((head + "\r\n\r\n").encode() + smuggled)
        data = b""
        while True:
            try:
                more = s.recv(65536)
            except ConnectionResetError:
                break
            if not more:
                break
            data += more
    assert data.startswith(b"HTTP/1.1 413"), data[:100]
    assert data.count(b"HTTP/1.1 ") == 1, data


# ---- envd's token ---------------------------------------------------------------------------

FIND_TOKEN = r'''
import hashlib, re, sys
want = sys.argv[1]   # sha256 of the token: the token itself never passes through envd here
pid = sys.argv[2]
hexrun = re.compile(rb"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
found = "no"
try:
    maps = open(f"/proc/{pid}/maps").read().splitlines()
    with open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if "r" not in line.split()[1] or hi - lo > (1 << 30):
                continue
            try:
                mem.seek(lo); data = mem.read(hi - lo)
            except OSError:
                continue
            if any(hashlib.sha256(m.group()).hexdigest() == want
                   for m in hexrun.finditer(data)):
                found = "yes"; break
    print("read", found)
except OSError as e:
    print("denied", type(e).__name__, e.errno)
'''


def token_search(alice, server, sb, user: str) -> str:
    _, token = envd_launch(server, sb.vm_id)
    alice.files.write(sb.vm_id, "/tmp/find_token.py", FIND_TOKEN.encode())
    # Only the token's hash is sent, so envd's memory holds the token only if it kept it.
    digest = hashlib.sha256(token.encode()).hexdigest()
    r = alice.run(sb.vm_id, f"python3 /tmp/find_token.py {digest} 1", user=user, timeout=120)
    assert r.exit_code == 0, r
    return r.stdout.strip()


def test_user_cannot_read_envds_memory(alice, server, sb):
    """`user` (uid 1000) gets nothing of envd's memory (different uid: no ptrace access)."""
    out = token_search(alice, server, sb, "user")
    assert out.startswith("denied"), out


def test_root_in_the_sandbox_cannot_read_envds_token_from_its_memory(alice, server, sb):
    """Root inside the sandbox cannot open envd's /proc/1/mem (EACCES): the token in envd's
    heap stays out of reach even though root has envd's uid."""
    out = token_search(alice, server, sb, "root")
    assert out != "read yes", "root inside found envd's token in /proc/1/mem"


def test_root_cannot_ptrace_attach_to_envd(alice, sb):
    """Root inside cannot PTRACE_ATTACH to envd (EPERM), so it cannot stop it, change its
    memory or take its port that way; envd keeps answering."""
    code = r'''
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
r = libc.ptrace(PTRACE_ATTACH, 1, 0, 0)
if r == 0:
    os.waitpid(1, 0x40000000)  # __WALL
    libc.ptrace(PTRACE_DETACH, 1, 0, 0)
    print("attached")
else:
    print("refused", ctypes.get_errno())
'''
    alice.files.write(sb.vm_id, "/tmp/attach.py", code.encode())
    r = alice.run(sb.vm_id, "python3 /tmp/attach.py", user="root", timeout=60)
    assert r.exit_code == 0, r
    assert r.stdout.startswith("refused"), r.stdout
    # envd still answers either way
    assert alice.run(sb.vm_id, "echo ok").stdout == "ok\n"


def test_envd_refuses_unsigned_and_replayed_requests_from_inside(alice, server, sb):
    """From inside the sandbox envd's port answers 401 to unsigned or badly signed requests,
    and gives no proof with a refusal."""
    listen, _ = envd_launch(server, sb.vm_id)
    code = f'''
import http.client, json
out = []
for hdrs in ({{}}, {{"E2A-Timestamp": "1", "E2A-Nonce": "0"*32, "E2A-Body": "framed",
               "E2A-Signature": "00"*32}}):
    c = http.client.HTTPConnection("{listen.split(':')[0]}", {listen.split(':')[1]}, timeout=5)
    c.request("GET", "/files?path=/etc/shadow&user=root", headers=hdrs)
    r = c.getresponse()
    out.append([r.status, r.getheader("E2A-Proof")])
print(json.dumps(out))
'''
    alice.files.write(sb.vm_id, "/tmp/unsigned.py", code.encode())
    for user in ("user", "root"):
        r = alice.run(sb.vm_id, "python3 /tmp/unsigned.py", user=user, timeout=60)
        assert r.exit_code == 0, r
        assert json.loads(r.stdout) == [[401, None], [401, None]], r.stdout


# ---- files API as the named user ------------------------------------------------------------

def tar_of(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            info.size = len(data) if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return buf.getvalue()


def test_hard_link_to_a_root_file_gives_user_nothing(alice, http, sb):
    """A hard link `user` made to a root-owned file (if gVisor lets it): the files API as
    `user` neither reads nor writes through it, by PUT or by a tar entry."""
    alice.run(sb.vm_id, "cp /etc/passwd /root/secret && chmod 600 /root/secret && "
                            "ln /etc/passwd /tmp/pw 2>&1; ln /root/secret /tmp/sec 2>&1; true",
                  user="root")
    alice.run(sb.vm_id, "ln /etc/passwd ~/pw 2>&1; ln /etc/shadow ~/sh 2>&1; true")
    before = alice.run(sb.vm_id, "sha256sum /etc/passwd /etc/shadow", user="root").stdout
    base = f"/v1/sandboxes/{sb.vm_id}/files"
    got = http.get(base, params={"path": "/tmp/sec"})
    assert got.status_code in (403, 404), got.text
    got = http.get(base, params={"path": "~/sh".replace("~", "/home/user")})
    assert got.status_code in (403, 404), got.text
    http.put(base, params={"path": "/tmp/pw"}, content=b"pwned\n")
    http.put(base, params={"path": "/home/user/pw"}, content=b"pwned\n")
    info = tarfile.TarInfo("pw")
    http.put(base + "/tar", params={"path": "/home/user"}, content=tar_of([(info, b"pwned\n")]))
    info = tarfile.TarInfo("pw")
    http.put(base + "/tar", params={"path": "/tmp"}, content=tar_of([(info, b"pwned\n")]))
    lnk = tarfile.TarInfo("hl")
    lnk.type, lnk.linkname = tarfile.LNKTYPE, "/etc/shadow"
    http.put(base + "/tar", params={"path": "/home/user/t"}, content=tar_of([(lnk, b"")]))
    after = alice.run(sb.vm_id, "sha256sum /etc/passwd /etc/shadow", user="root").stdout
    assert before == after
    assert alice.run(sb.vm_id, "test -e /home/user/t/hl && echo there").stdout == ""


def test_symlink_swap_race_during_writes_never_reaches_etc(alice, http, sb):
    """`user` flips ~/race between a directory and a symlink to /etc while the API writes
    ~/race/x.conf and untars into ~/race many times: nothing lands in /etc."""
    flipper = r'''
import os, time
end = time.time() + 25
os.makedirs("/home/user/real", exist_ok=True)
while time.time() < end:
    for tgt in ("/etc", "/home/user/real"):
        try: os.symlink(tgt, "/home/user/race.tmp")
        except FileExistsError: os.unlink("/home/user/race.tmp"); continue
        os.rename("/home/user/race.tmp", "/home/user/race")
'''
    alice.files.write(sb.vm_id, "/tmp/flip.py", flipper.encode())
    alice.run(sb.vm_id, "rm -rf ~/race; nohup python3 /tmp/flip.py >/dev/null 2>&1 &")
    base = f"/v1/sandboxes/{sb.vm_id}/files"
    info = tarfile.TarInfo("sub/pwn.conf")
    tar = tar_of([(info, b"pwned\n")])
    end = time.monotonic() + 15
    n = 0
    while time.monotonic() < end and n < 400:
        http.put(base, params={"path": "/home/user/race/pwn.conf"}, content=b"pwned\n")
        http.put(base + "/tar", params={"path": "/home/user/race"}, content=tar)
        http.post(base + "/mkdir", json={"path": "/home/user/race/pwndir", "parents": True})
        n += 1
    out = alice.run(sb.vm_id, "ls -d /etc/pwn.conf /etc/sub /etc/pwndir /etc/.envd-upload-* "
                              "2>/dev/null; true", user="root").stdout
    assert out == "", out


@pytest.mark.parametrize("path", ["/proc/1/task/1/environ", "/proc/1/task/1/mem",
                                  "/proc/1/cwd/proc/1/environ", "/proc/1/root/proc/1/environ",
                                  "/proc/1/root/proc/self/environ", "/proc/1/task/1/../1/environ",
                                  "/proc/1/fd/0"])
@pytest.mark.parametrize("user", ["user", "root"])
def test_envds_proc_entries_via_odd_paths_are_refused(http, sb, path, user):
    r = http.get(f"/v1/sandboxes/{sb.vm_id}/files", params={"path": path, "user": user})
    assert r.status_code in (400, 403, 404), (r.status_code, r.content[:200])


def test_tar_download_of_proc_via_a_symlink_holds_nothing_of_envd(alice, http, sb, server):
    """A tar of a directory holding a symlink to /proc/1, or of /proc itself as root, carries
    no file of envd's /proc (walk does not follow links; envd's pid dir is skipped)."""
    alice.run(sb.vm_id, "mkdir -p ~/p && ln -sfn /proc/1 ~/p/agent && ln -sfn /proc ~/p/proc")
    _, token = envd_launch(server, sb.vm_id)
    for path, user in (("/home/user/p", "user"), ("/home/user/p", "root"),
                       ("/proc/1/root/proc", "root")):
        with http.stream("GET", f"/v1/sandboxes/{sb.vm_id}/files/tar",
                         params={"path": path, "user": user}) as r:
            data = b""
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > (64 << 20):
                    break
        assert token.encode() not in data, (path, user)


# ---- disk -----------------------------------------------------------------------------------

def test_fallocate_and_sparse_files_stay_inside_the_limit(alice, server, sb):
    """fallocate past the limit fails with EDQUOT; a huge sparse file (gVisor's du inside
    says 8 TiB) costs the host almost nothing: measured on the host, the sandbox's directory
    stays far below its limit."""
    r = alice.run(sb.vm_id, "fallocate -l 64G /tmp/big 2>&1; echo rc=$?; "
                            "truncate -s 8T /tmp/sparse 2>&1; echo rc2=$?; "
                            "dd if=/dev/zero of=/tmp/sparse bs=1M count=1 seek=4000000 "
                            "conv=notrunc 2>&1 | tail -1", timeout=120)
    assert "rc=0" not in r.stdout and "quota" in r.stdout.lower(), r.stdout
    # -x: the sandbox's own subvolume only, not the overlay mounted inside it (whose files
    # come and go while du walks them)
    out = subprocess.run(["du", "-smx", str(server.base / "data" / "sandboxes" / sb.vm_id)],
                         capture_output=True, text=True).stdout
    assert int(out.split()[0]) < 1024, out
    alice.run(sb.vm_id, "rm -f /tmp/big /tmp/sparse")


# ---- port proxy -----------------------------------------------------------------------------

COOKIE_APP = r'''
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8102)); s.listen(16)
cookies = [b"a=1; Path=/../../../../", b"b=2; path =/x; Path", b"__Host-c=3; Secure; Path=/",
           b"d=4; Domain=.evil; PATH=/", b"e=5;Path=%2F..%2F..%2F", b"f=6, g=7; Path=/",
           b"h=8; Path=/;Path=/v1", b"i=9; Path=\t/"]
while True:
    c, _ = s.accept(); c.recv(65536)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" +
              b"".join(b"Set-Cookie: " + k + b"\r\n" for k in cookies) + b"\r\nok")
    c.close()
'''


def test_odd_set_cookie_attributes_stay_under_the_port_prefix(alice, http, sb):
    alice.files.write(sb.vm_id, "/tmp/cookies.py", COOKIE_APP.encode())
    alice.run(sb.vm_id, "nohup python3 /tmp/cookies.py >/dev/null 2>&1 &")
    prefix = f"/v1/sandboxes/{sb.vm_id}/ports/8102"
    r = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(
        http.get(prefix + "/")), timeout=20)
    cookies = r.headers.get_list("set-cookie")
    assert len(cookies) == 8, cookies
    for c in cookies:
        attrs = [a.strip() for a in c.split(";")[1:]]
        paths = [a for a in attrs if a.split("=", 1)[0].strip().lower() == "path"]
        assert len(paths) == 1, c
        value = paths[0].split("=", 1)[1].strip()
        assert value.startswith(prefix + "/"), c
        assert not any(a.lower().startswith("domain") for a in attrs), c


# ---- WebSocket buffering --------------------------------------------------------------------

WS_SINK_APP = r'''
import base64, hashlib, socket, threading, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8103)); s.listen(16)
held = []
while True:
    c, _ = s.accept(); req = b""
    while b"\r\n\r\n" not in req:
        req += c.recv(4096)
    key = [l.split(b":", 1)[1].strip() for l in req.split(b"\r\n")
           if l.lower().startswith(b"sec-websocket-key:")][0]
    acc = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n")
    held.append(c)   # never reads again
'''


def test_websocket_proxy_memory_does_not_grow_with_stalled_connections(alice, server, keys, sb):
    """Was a HOLE: uvicorn ran with ws_max_size=16 MiB; when the app in the sandbox stops reading,
    each proxied WebSocket whose client keeps sending leaves tens of MiB held in the server
    (the message being assembled, its copies, the relay's pending send), and a tenant may hold
    256 such connections (MAX_PROXIED_PER_USER): several GiB of the server's memory from one
    API key. Should: what a stalled connection holds is bounded well below that (a smaller
    max message for the proxy, or a per-user byte budget), here under 32 MiB per connection."""
    alice.files.write(sb.vm_id, "/tmp/wssink.py", WS_SINK_APP.encode())
    alice.run(sb.vm_id, "nohup python3 /tmp/wssink.py >/dev/null 2>&1 &")
    url = server.url.replace("http://", "ws://") + f"/v1/sandboxes/{sb.vm_id}/ports/8103/"
    pid = server.proc.pid
    # The largest message the server accepts (a larger one is refused with 1009 at once).
    msg = b"x" * (WS_MAX_MESSAGE - 64)

    def connect():
        return ws_client.connect(url, additional_headers={"Authorization": f"Bearer {keys['alice']}"},
                                 open_timeout=10, max_size=None, close_timeout=2)
    first = wait_for(lambda: _try(connect), timeout=20)
    conns = [first] + [connect() for _ in range(5)]
    before = rss_kib(pid)

    def flood(conn):
        conn.socket.settimeout(3)
        for _ in range(8):
            try:
                conn.send(msg)
            except (TimeoutError, OSError, websockets.exceptions.ConnectionClosed):
                return
    try:
        threads = [threading.Thread(target=flood, args=(c,), daemon=True) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        time.sleep(3)
        held = (rss_kib(pid) - before) // 1024  # while the connections are still open
    finally:
        for c in conns:
            c.socket.close()
    assert held < 32 * len(conns), f"{len(conns)} stalled WebSockets hold {held} MiB of the server"


def _try(fn):
    try:
        return fn()
    except Exception:
        return None
