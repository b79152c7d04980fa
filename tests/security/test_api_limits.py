"""Attacks on the API's resources, each once a real finding against main: bodies read before
authentication and without a limit, concurrent DELETEs deadlocking the database pool, the port
proxy leaking connections, requests that hang for ever, streams that end without a word,
cookies crossing sandboxes, bad WebSocket parameters answered with a bare 403."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import websockets
import websockets.exceptions

from e2a.runtime.runsc import ENVD_PORT
from e2a.sdk import E2AError
from tests.conftest import wait_for
from tests.security.conftest import raw_request, rss_kib

SILENT_APP = '''
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8100)); s.listen(512)
held = []
while True:
    c, _ = s.accept(); held.append(c)   # accepts, never answers
'''

ODD_APP = '''
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8101)); s.listen(16)
while True:
    c, _ = s.accept(); req = c.recv(65536).decode(errors="replace")
    if "/upgrade" in req.split("\\r\\n")[0]:
        c.sendall(b"HTTP/1.1 101 Switching Protocols\\r\\nConnection: Upgrade\\r\\nUpgrade: x\\r\\n\\r\\n")
    else:
        c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n"
                  b"Set-Cookie: a=1; Domain=127.0.0.1; Path=/\\r\\n"
                  b"Set-Cookie: b=2; Path=/app; HttpOnly\\r\\n\\r\\nok")
    c.close()
'''


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raw_post(server, path: str, headers: dict[str, str], body_chunks) -> tuple[int, bytes]:
    """POST over a plain socket, sending the body as the server lets us; the status and body
    of whatever the server answers (possibly before the body was all sent)."""
    head = f"POST {path} HTTP/1.1\r\nHost: e2a" + "".join(
        f"\r\n{k}: {v}" for k, v in headers.items())
    return raw_request(server, head, body_chunks)


def test_no_body_is_read_before_authentication(server):
    pid = server.proc.pid
    before = rss_kib(pid)
    chunk = b"x" * (1 << 20)
    status, body = raw_post(server, "/v1/sandboxes",
                            {"Content-Type": "application/json", "Content-Length": str(500 << 20)},
                            (chunk for _ in range(200)))
    assert status == 401 and b"unauthorized" in body
    assert rss_kib(pid) - before < 64 * 1024  # KiB: nowhere near the 200 MiB sent


def test_json_bodies_are_limited(server, keys):
    auth = {"Authorization": f"Bearer {keys['alice']}", "Content-Type": "application/json"}
    pid = server.proc.pid
    before = rss_kib(pid)
    status, body = raw_post(server, "/v1/sandboxes", {**auth, "Content-Length": str(500 << 20)},
                            iter([b"{" * 1024]))
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    # chunked, no length announced: refused once the count passes the limit
    chunk = b"[" * (1 << 20)
    chunks = (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(40))
    status, body = raw_post(server, "/v1/sandboxes", {**auth, "Transfer-Encoding": "chunked"},
                            chunks)
    assert status == 413
    assert rss_kib(pid) - before < 96 * 1024


def test_a_command_longer_than_the_kernel_takes_is_a_clear_400(http, sandbox):
    r = http.post(f"/v1/sandboxes/{sandbox.vm_id}/commands", json={"cmd": "echo " + "a" * 1_000_000})
    err = r.json()["error"]
    assert r.status_code == 400 and err["field"] == "cmd" and "131071 bytes" in err["message"]
    r = http.post(f"/v1/sandboxes/{sandbox.vm_id}/commands", json={"cmd": "echo " + "a" * 100_000})
    assert r.status_code == 200 and '"exit_code":0' in r.text.replace(" ", "")


def test_100_concurrent_deletes_and_creates_all_finish(server, keys):
    h = {"Authorization": f"Bearer {keys['alice']}"}
    with httpx.Client(base_url=server.url, headers=h, timeout=180) as c, \
            ThreadPoolExecutor(100) as ex:
        made = list(ex.map(lambda _: c.post("/v1/sandboxes", json={"template": "standard"}),
                           range(50)))
        assert {r.status_code for r in made} == {201}
        old = [r.json()["vm_id"] for r in made]
        jobs = [ex.submit(c.delete, f"/v1/sandboxes/{vm}") for vm in old] + \
               [ex.submit(c.post, "/v1/sandboxes", json={"template": "standard"})
                for _ in range(50)]
        answers = [j.result() for j in jobs]
        assert [a.status_code for a in answers[:50]] == [200] * 50
        assert all(a.json()["state"] == "destroyed" for a in answers[:50])
        assert [a.status_code for a in answers[50:]] == [201] * 50
        new = [a.json()["vm_id"] for a in answers[50:]]
        for vm in new[:5]:
            assert c.post(f"/v1/sandboxes/{vm}/commands", json={"cmd": "true"}).status_code == 200
        assert {c.delete(f"/v1/sandboxes/{vm}").json()["state"] for vm in new} == {"destroyed"}
        assert [sb for sb in c.get("/v1/sandboxes").json() if sb["vm_id"] in old + new] == []


def test_port_proxy_does_not_leak_connections(server, alice, keys):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    pid = server.proc.pid
    try:
        alice.files.write(sb.vm_id, "silent.py", SILENT_APP.encode())
        alice.run_background(sb.vm_id, "python3 silent.py")
        url = f"{server.url}/v1/sandboxes/{sb.vm_id}/ports/8100/"
        h = {"Authorization": f"Bearer {keys['alice']}"}
        wait_for(lambda: "8100" in alice.run(sb.vm_id, "ss -ltn").stdout, timeout=30)
        baseline = fds(pid)

        def hang(_):
            try:
                httpx.get(url, headers=h, timeout=2)
            except httpx.TimeoutException:
                return "timeout"
            return "answered"

        with ThreadPoolExecutor(50) as ex:
            outcomes = list(ex.map(hang, range(150)))
        assert set(outcomes) == {"timeout"}
        # The clients are gone: so are the server's connections for them.
        wait_for(lambda: fds(pid) <= baseline + 10, timeout=30)
    finally:
        alice.kill(sb.vm_id)
    wait_for(lambda: fds(pid) <= baseline + 5, timeout=30)


def test_a_read_that_never_answers_does_not_keep_the_sandbox_alive(http, alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=3)
    alice.run(sb.vm_id, "mkfifo /home/user/pipe")
    with pytest.raises(httpx.TimeoutException):
        http.get(f"/v1/sandboxes/{sb.vm_id}/files", params={"path": "pipe"}, timeout=2)
    # The client left: its request no longer counts as activity, so the idle timeout ends it.
    gone = lambda: next((s for s in http.get("/v1/sandboxes", params={"state": "destroyed"}).json()
                         if s["vm_id"] == sb.vm_id), None)  # noqa: E731
    assert wait_for(gone, timeout=30)["end_reason"] == "idle_timeout"


def test_foreground_commands_end_with_an_error_event_on_delete(http, alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    ends: list[dict] = []

    def follow():
        with http.stream("POST", f"/v1/sandboxes/{sb.vm_id}/commands",
                         json={"cmd": "echo up; sleep 600"}, timeout=60) as r:
            lines = [json.loads(x) for x in r.iter_lines() if x.strip()]
        ends.append(lines[-1])

    threads = [threading.Thread(target=follow) for _ in range(5)]
    for t in threads:
        t.start()
    wait_for(lambda: len(alice.list_commands(sb.vm_id)) == 5)
    assert http.delete(f"/v1/sandboxes/{sb.vm_id}").json()["state"] == "destroyed"
    for t in threads:
        t.join(30)
    assert len(ends) == 5
    assert all(e["type"] == "error" and e["reason"] == "deleted" for e in ends), ends


def test_connections_per_sandbox_are_capped_with_429_not_queued(server, keys, alice):
    from e2a.sandboxes.connections import MAX_CONNECTIONS_PER_SANDBOX as cap
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)

    async def go():
        h = {"Authorization": f"Bearer {keys['alice']}"}
        limits = httpx.Limits(max_connections=cap + 10)
        async with httpx.AsyncClient(base_url=server.url, headers=h, timeout=120,
                                     limits=limits) as c:
            url = f"/v1/sandboxes/{sb.vm_id}/commands"
            streams = []
            for _ in range(cap):
                req = c.build_request("POST", url, json={"cmd": "sleep 600"})
                streams.append(await c.send(req, stream=True))
            assert {r.status_code for r in streams} == {200}
            extra = await c.post(url, json={"cmd": "echo one more"})
            for r in streams:
                await r.aclose()
            return extra

    extra = asyncio.run(go())
    try:
        assert extra.status_code == 429
        assert extra.json()["error"]["code"] == "too_many_connections"
        # once they are closed there is room again
        def room() -> bool:
            try:
                return alice.run(sb.vm_id, "echo room").stdout == "room\n"
            except E2AError as exc:
                assert exc.code == "too_many_connections"
                return False
        wait_for(room, timeout=30)
    finally:
        alice.kill(sb.vm_id)


def test_port_proxy_scopes_cookies_and_refuses_a_stray_101(server, keys, alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    try:
        alice.files.write(sb.vm_id, "odd.py", ODD_APP.encode())
        alice.run_background(sb.vm_id, "python3 odd.py")
        wait_for(lambda: "8101" in alice.run(sb.vm_id, "ss -ltn").stdout, timeout=30)
        base = f"{server.url}/v1/sandboxes/{sb.vm_id}/ports/8101"
        h = {"Authorization": f"Bearer {keys['alice']}"}
        r = httpx.get(base + "/", headers=h, timeout=30)
        cookies = r.headers.get_list("set-cookie")
        assert r.status_code == 200 and len(cookies) == 2, cookies
        prefix = f"/v1/sandboxes/{sb.vm_id}/ports/8101"
        assert cookies[0] == f"a=1; Path={prefix}/"
        assert cookies[1] == f"b=2; HttpOnly; Path={prefix}/app"
        r = httpx.get(base + "/upgrade", headers=h, timeout=30)
        assert r.status_code == 502 and r.json()["error"]["code"] == "port_bad_answer"
    finally:
        alice.kill(sb.vm_id)


def test_websocket_refusals_are_json_errors_before_the_upgrade(server, keys, sandbox):
    ws = server.url.replace("http", "ws") + f"/v1/sandboxes/{sandbox.vm_id}"

    def refused(url: str, key: str | None) -> tuple[int, dict]:
        async def go():
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            with pytest.raises(websockets.exceptions.InvalidStatus) as e:
                async with websockets.connect(url, additional_headers=headers, open_timeout=30):
                    pass
            return e.value.response.status_code, json.loads(e.value.response.body)["error"]
        return asyncio.run(go())

    assert refused(f"{ws}/pty?cols=abc", keys["alice"])[0] == 400
    assert refused(f"{ws}/pty?cols=abc", keys["alice"])[1]["field"] == "cols"
    assert refused(f"{ws}/pty?user=Root;rm", keys["alice"])[1]["code"] == "invalid_user"
    assert refused(f"{ws}/ports/{ENVD_PORT}/x", keys["alice"])[1]["code"] == "invalid_port"
    assert refused(f"{ws}/ports/99999/x", keys["alice"])[0] == 400
    assert refused(f"{ws}/pty", None)[0] == 401
    assert refused(f"{ws}/pty", keys["bob"]) == (404, refused(f"{ws}/pty", keys["bob"])[1])
    assert refused(f"{ws}/pty", keys["bob"])[1]["code"] == "sandbox_not_found"
