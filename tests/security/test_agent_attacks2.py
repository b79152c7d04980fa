"""More attacks on the agents (issue 9): a caller's llm.base_url that redirects, the egress proxy
held open by a sandbox's code, CLI flags smuggled in the task, odd create fields."""

from __future__ import annotations

import http.server
import json
import os
import secrets
import socketserver
import threading
import time

import httpx

from tests.conftest import wait_for


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Recorder:
    """A tiny HTTP server on 127.0.0.1 that records every request and answers as told."""

    def __init__(self, answer):
        self.hits: list[dict] = []
        self.port = free_port()
        rec = self

        class H(http.server.BaseHTTPRequestHandler):
            def _any(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                rec.hits.append({"method": self.command, "path": self.path,
                                 "headers": dict(self.headers), "body": body})
                status, headers, out = answer(self)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = _any

            def log_message(self, *a):
                pass

        self.httpd = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), H)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _task_over(http, vm: str, timeout: float = 180) -> dict:
    return wait_for(lambda: (t := http.get(f"/v1/sandboxes/{vm}/task").json())["state"]
                    not in ("starting", "running") and t, timeout=timeout)


# ---- (3) a caller: llm.base_url ----------------------------------------------------------------

def _redirect_attack(http, vendor: str, status: int):
    """llm.base_url is an allowed (in production: public https) host that answers every request
    with a redirect to a host that is NOT allowed (here "localhost": private, not in
    E2A_LLM_PRIVATE_HOSTS). e2a checked only the first host; if the SDK follows the redirect the
    host calls the private one, the request's body (the task) and maybe the key with it."""
    inner = _Recorder(lambda h: (404, {"content-type": "application/json"},
                                 b'{"error": {"message": "INTERNAL-SERVICE-SECRET-42"}}'))
    outer = _Recorder(lambda h: (status, {"location": f"http://localhost:{inner.port}/internal"
                                          f"{h.path}"}, b""))
    key = f"sk-REDIR{secrets.token_hex(12)}"
    try:
        r = http.post("/v1/sandboxes", json={
            "template": "standard", "agent": "e2a", "llm_key": key, "task": "say hi",
            "llm": {"vendor": vendor, "model": "some-model",
                    "base_url": f"http://127.0.0.1:{outer.port}/v1"}})
        assert r.status_code == 201, r.text
        vm = r.json()["vm_id"]
        task = _task_over(http, vm)
        assert outer.hits, "the allowed host was never called"
        names = [sorted(h["headers"]) for h in inner.hits]
        leaked_key = any(key in json.dumps(h["headers"]) for h in inner.hits)
        assert not inner.hits, (
            f"the host followed a {status} redirect from llm.base_url to a private host: "
            f"{len(inner.hits)} request(s) {[(h['method'], h['path']) for h in inner.hits]}, "
            f"key sent along: {leaked_key}, headers: {names}, task error shown to the caller: {task['error']!r}")
    finally:
        inner.close()
        outer.close()


def test_base_url_redirect_to_private_host_openai_compatible(http):
    _redirect_attack(http, "openai", 307)


def test_base_url_redirect_to_private_host_anthropic(http):
    _redirect_attack(http, "anthropic", 302)


def test_base_url_private_forms_refused(http):
    """Private addresses however spelt: decimal, octal-ish, IPv4-mapped IPv6, 0.0.0.0, CGNAT,
    metadata."""
    for url in ("https://2130706433/v1", "https://0x7f000001/v1", "https://0177.0.0.1/v1",
                "https://[::ffff:127.0.0.1]/v1", "https://[::ffff:a9fe:a9fe]/v1",
                "https://0.0.0.0/v1", "https://100.64.0.1/v1", "https://169.254.169.254/v1",
                "https://[fe80::1]/v1", "https://localhost/v1", "https://127.1/v1",
                "https://[::]/v1", "http://8.8.8.8/v1", "ftp://8.8.8.8/", "https://@localhost/v1",
                "https://127.0.0.1.:443/v1", "https://user:pw@localhost/v1"):
        r = http.post("/v1/sandboxes", json={
            "template": "standard", "agent": "e2a", "llm_key": "sk-x", "task": "hi",
            "llm": {"vendor": "openai", "base_url": url}})
        if r.status_code == 201:
            http.delete(f"/v1/sandboxes/{r.json()['vm_id']}")
        assert r.status_code == 400, (url, r.status_code, r.text)
        assert r.json()["error"]["field"] == "llm.base_url", (url, r.text)


def test_key_not_echoed_by_validation_errors(http, server):
    key = f"sk-ant-ECHO{secrets.token_hex(12)}"
    bodies = [
        {"agent": "e2a", "llm_key": key, "task": "hi"},                          # no template
        {"template": "standard", "agent": "nope", "llm_key": key},
        {"template": "standard", "agent": "claude-code", "llm_key": key, "model": "gpt-5"},
        {"template": "standard", "agent": "e2a", "llm_key": key, "llm": {"vendor": "x"}},
        {"template": "standard", "agent": "e2a", "llm_key": key, "llm": {"base_url": "http://x"}},
        {"template": "standard", "agent": "e2a", "llm_key": key, "tools": [{"name": "1"}]},
        {"template": "standard", "agent": "e2a", "llm_key": key, "bogus": 1},
        {"template": "standard", "llm_key": key},
        {"template": "standard", "agent": "e2a", "llm_key": [key]},
        {"template": "standard", "agent": "e2a", "llm_key": key + "x" * 5000},
        {"template": "standard", "agent": "e2a", "llm_key": key, "max_steps": -1},
    ]
    for b in bodies:
        r = http.post("/v1/sandboxes", json=b)
        assert r.status_code >= 400 and key not in r.text, (b, r.text)
    assert key not in server.log_tail(2_000_000)


def test_deep_tool_schema_does_not_crash_the_server(http, server):
    deep = "[" * 200_000 + "]" * 200_000
    body = ('{"template": "standard", "agent": "e2a", "llm_key": "sk-x", "task": "hi", "tools": '
            '[{"name": "t", "command": "cat", "parameters": {"a": ' + deep + '}}]}')
    r = http.post("/v1/sandboxes", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 413, 422), r.status_code
    assert http.get("/health").status_code == 200
    # many tools, each a big schema: bounded
    tools = [{"name": f"t{i}", "command": "cat", "parameters": {"type": "object", "properties": {
        f"p{j}": {"type": "string"} for j in range(3000)}}} for i in range(32)]
    r = http.post("/v1/sandboxes", json={"template": "standard", "agent": "e2a", "llm_key": "sk-x",
                                         "tools": tools})
    assert r.status_code in (201, 400, 413), r.status_code
    if r.status_code == 201:
        http.delete(f"/v1/sandboxes/{r.json()['vm_id']}")
    assert http.get("/health").status_code == 200


# ---- (1) code inside a sandbox: the egress proxy -------------------------------------------------

HOLD = r"""
import socket, sys, time
gw, port, n, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
socks = []
for i in range(n):
    try:
        s = socket.create_connection((gw, port), timeout=5)
        s.sendall(b"POST /google/x HTTP/1.1\r\nHost: x\r\n")   # headers never finished
        socks.append(s)
    except OSError as e:
        print("stopped at", i, e, flush=True)
        break
print("open", len(socks), flush=True)
time.sleep(hold)
alive = 0
for s in socks:
    try:
        s.settimeout(0.01)
        if s.recv(1) == b"":
            continue
        alive += 1
    except socket.timeout:
        alive += 1
    except OSError:
        pass
print("alive", alive, flush=True)
"""


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_sandbox_without_agent_cannot_pile_up_connections_on_the_proxy(alice, server):
    """Any sandbox (no agent needed: the firewall opens the port to all) opens many connections
    to the egress proxy, which runs inside e2a serve, and never finishes the request headers.
    Each is a file descriptor of e2a serve, held forever: enough of them and e2a serve cannot
    accept its API's connections nor open files (its fd limit is shared)."""
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    try:
        gw = alice.run(sb.vm_id, "ip route show default").stdout.split()
        gw = gw[gw.index("via") + 1]
        before = _fds(server.proc.pid)
        n, hold = 3000, 10
        alice.run(sb.vm_id, ["sh", "-c", "cat > /tmp/hold.py"], stdin=HOLD)
        alice.run(sb.vm_id, ["sh", "-c", f"nohup python3 /tmp/hold.py {gw} {server.egress_port} "
                             f"{n} {hold} > /tmp/hold.out 2>&1 &"])
        wait_for(lambda: "open" in alice.run(sb.vm_id, "cat /tmp/hold.out").stdout, timeout=120)
        peak = _fds(server.proc.pid) - before
        time.sleep(hold)
        out = wait_for(lambda: (o := alice.run(sb.vm_id, "cat /tmp/hold.out").stdout)
                       and "alive" in o and o, timeout=60)
        alive = int(out.split("alive")[1].split()[0])
        assert peak < 500 and alive < 500, (
            f"one sandbox without an agent held {peak} fds of e2a serve (limit "
            f"{open(f'/proc/{server.proc.pid}/limits').read().split('Max open files')[1].split()[0]}"
            f") with half-sent requests; {alive} still open after {hold} s; sandbox said {out!r}")
    finally:
        alice.kill(sb.vm_id)


# ---- (3) a caller: the task text as the CLI's flags ----------------------------------------------

def test_gemini_task_starting_with_dash_is_not_a_flag(http, alice, llm_mock):
    """claude-code and codex put the task after `--`; gemini-cli gets `--prompt TASK`, and its
    argument parser takes a TASK that starts with a dash as its own options."""
    key = f"AIzaDASH{secrets.token_hex(16)}"
    llm_mock.scenario(key, final="done")
    task = "--version"
    r = http.post("/v1/sandboxes", json={"template": "standard", "agent": "gemini-cli",
                                         "llm_key": key, "task": task,
                                         "model": "gemini-2.5-pro"})
    assert r.status_code == 201, r.text
    vm = r.json()["vm_id"]
    try:
        t = _task_over(http, vm)
        sent = json.dumps([q.get("body") for q in llm_mock.requests(key)])
        assert task in sent, (f"the task {task!r} never reached the model: the CLI took it as "
                              f"its own flag (task state {t['state']}, result {t['result']!r}, "
                              f"error {t['error']!r})")
    finally:
        alice.kill(vm)


# ---- (1) code inside a sandbox: request smuggling through the proxy ------------------------------

RAW = r"""
import json, socket, sys
gw, port = sys.argv[1], int(sys.argv[2])
out = []
for req in json.load(sys.stdin):
    s = socket.create_connection((gw, port), timeout=10)
    s.sendall(req.encode())
    data = b""
    try:
        while len(data) < 4000:
            c = s.recv(4000)
            if not c:
                break
            data += c
    except socket.timeout:
        pass
    s.close()
    out.append(data.decode(errors="replace"))
print(json.dumps(out))
"""


def test_proxy_smuggling_stays_on_the_vendor_api(http, alice, llm_mock, server):
    """With a live grant, requests shaped to leave the vendor's API: absolute-form URIs and Host
    headers naming e2a's own API, encoded traversal, a second authority in the path. None may
    reach e2a's API (or anything but the vendor's upstream)."""
    key = f"AIzaSMUG{secrets.token_hex(16)}"
    llm_mock.scenario(key, hang=True, hang_seconds=120)
    r = http.post("/v1/sandboxes", json={"template": "standard", "agent": "gemini-cli",
                                         "llm_key": key, "task": "write a poem",
                                         "model": "gemini-2.5-pro", "idle_timeout_seconds": 300})
    assert r.status_code == 201, r.text
    vm = r.json()["vm_id"]
    try:
        wait_for(lambda: llm_mock.requests(key), timeout=180)
        gw = alice.run(vm, "ip route show default").stdout.split()
        gw = gw[gw.index("via") + 1]
        api = f"127.0.0.1:{server.port}"
        reqs = [f"GET http://{api}/health HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n",
                f"GET /google/..%2f..%2fhealth HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n",
                f"GET /google/%2f%2f{api}/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                f"GET /google/@{api}/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                f"GET /google@{api}/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                f"GET /google/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                f"Content-Length: 4\r\nConnection: close\r\n\r\n0\r\n\r\nGET http://{api}/health "
                f"HTTP/1.1\r\nHost: {api}\r\n\r\n"]
        r = alice.run(vm, ["python3", "-c", RAW, gw, str(server.egress_port)],
                      stdin=json.dumps(reqs))
        answers = json.loads(r.stdout)
        health = httpx.get(server.url + "/health").text
        for req, ans in zip(reqs, answers):
            assert ans.startswith("HTTP/1.1 "), (req, ans)   # the probe reached the proxy
            assert '"pool"' not in ans and health not in ans, (req, ans)
        print([a.split("\r\n")[0] for a in answers])
    finally:
        alice.kill(vm)
