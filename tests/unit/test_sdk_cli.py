"""SDK and CLI against a small fake e2a server (Starlette + uvicorn on a random local port).

The fake server records what it receives so tests can check request shapes, and answers with the
documented shapes (docs/protocol.md), including NDJSON split across chunk boundaries.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import pathlib
import threading
import time

import httpx
import pytest
import uvicorn
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from e2a.cli import main
from e2a.sdk import E2A, AsyncE2A, CommandEvent, E2AError, Sandbox
from e2a.sdk import _core

KEY = "test-key"
SB = {"vm_id": "sb1", "state": "running", "template": "standard", "vcpu": 1, "cpu_fraction": 0.5,
      "memory_mib": 512, "metadata": {"team": "a"}, "internet": True, "idle_timeout_seconds": 300,
      "max_lifetime_seconds": 3600, "created_at": "2025-01-01T00:00:00Z", "expires_at": "2025-01-01T01:00:00Z",
      "field_from_the_future": 1}
FILE = b"0123456789" * 1000


def err(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status_code=status)


class FakeServer:
    def __init__(self):
        self.requests: list[dict] = []  # method, path, query, json, headers
        self.uploads: list[dict] = []
        self.stdin: dict[int, asyncio.Queue] = {}

    async def record(self, request: Request, body: bool = True) -> dict:
        rec = {"method": request.method, "path": request.url.path, "query": dict(request.query_params),
               "headers": dict(request.headers), "json": None}
        if body:
            raw = await request.body()
            rec["json"] = json.loads(raw) if raw else None
        self.requests.append(rec)
        return rec

    def last(self, path_suffix: str = "") -> dict:
        return [r for r in self.requests if r["path"].endswith(path_suffix)][-1]

    # ------------------------------------------------------------ routes

    async def sandboxes(self, request: Request):
        rec = await self.record(request)
        if request.method == "POST":
            return JSONResponse({**SB, "template": rec["json"]["template"]}, status_code=201)
        return JSONResponse([SB, {**SB, "vm_id": "sb2"}])

    async def sandbox(self, request: Request):
        await self.record(request)
        vm_id = request.path_params["id"]
        if vm_id == "missing":
            return err(404, "not_found", "no such sandbox")
        if vm_id == "proxy":
            return PlainTextResponse("bad gateway", status_code=502)
        state = "destroyed" if request.method == "DELETE" else "running"
        return JSONResponse({**SB, "vm_id": vm_id, "state": state})

    async def keepalive(self, request: Request):
        await self.record(request)
        return JSONResponse(SB)

    async def commands(self, request: Request):
        rec = await self.record(request)
        if request.method == "GET":
            return JSONResponse({"commands": [{"pid": 7, "cmd": "sleep 9", "argv": None, "user": "user",
                                               "cwd": "/home/user", "background": True, "started_at": "t"}]})
        body = rec["json"]
        if body.get("cwd") == "/nope":
            return err(400, "invalid_cwd", "no such directory", "cwd")
        if body.get("background"):
            return JSONResponse({"pid": 7})
        pid = 42
        if body.get("keep_stdin"):
            self.stdin[pid] = asyncio.Queue()

        async def gen():
            yield b'{"type": "start", "pid": 42}\n'
            # A line split across two chunks, and a blank line: the client must reassemble/skip.
            yield b'{"type": "stdout", "da'
            await asyncio.sleep(0.01)
            yield b'ta": "hi\\n"}\n\n{"type": "stderr", "data": "oops\\n"}\n'
            if pid in self.stdin:
                while True:
                    msg = await self.stdin[pid].get()
                    if msg["data"]:
                        yield (json.dumps({"type": "stdout", "data": "in:" + msg["data"]}) + "\n").encode()
                    if msg["eof"]:
                        break
            yield b'{"type": "exit", "exit_code": 3, "signal": null, "timed_out": false}\n'

        return StreamingResponse(gen(), media_type="application/x-ndjson")

    async def command(self, request: Request):
        await self.record(request)
        lines = [{"type": "dropped", "bytes": 10}, {"type": "start", "pid": 7}, {"type": "stdout", "data": "late"},
                 {"type": "exit", "exit_code": 137, "signal": "SIGKILL", "timed_out": True}]
        return Response("".join(json.dumps(x) + "\n" for x in lines), media_type="application/x-ndjson")

    async def command_stdin(self, request: Request):
        rec = await self.record(request)
        pid = int(request.path_params["pid"])
        if pid in self.stdin:
            await self.stdin[pid].put(rec["json"])
        return Response(status_code=204)

    async def command_signal(self, request: Request):
        await self.record(request)
        return Response(status_code=204)

    async def files(self, request: Request):
        if request.method == "PUT":
            return await self._upload(request)
        rec = await self.record(request)
        if request.method == "DELETE":
            return Response(status_code=204)
        if rec["query"]["path"] == "missing":
            return err(404, "not_found", "no such file", "path")

        async def gen():
            for i in range(0, len(FILE), 3000):
                yield FILE[i:i + 3000]

        return StreamingResponse(gen(), media_type="application/octet-stream")

    async def _upload(self, request: Request):
        rec = await self.record(request, body=False)
        h, size, chunks = hashlib.sha256(), 0, 0
        async for piece in request.stream():
            if piece:
                h.update(piece)
                size += len(piece)
                chunks += 1
        rec.update(sha=h.hexdigest(), size=size, chunks=chunks)
        self.uploads.append(rec)
        if request.url.path.endswith("/tar"):
            return JSONResponse({"files": 1, "bytes": size})
        return JSONResponse({"path": "/home/user/" + rec["query"]["path"], "size": size})

    async def files_list(self, request: Request):
        await self.record(request)
        return JSONResponse({"entries": [
            {"name": "a.txt", "path": "/home/user/a.txt", "type": "file", "size": 3, "mode": "0644", "mtime": "t"},
            {"name": "d", "path": "/home/user/d", "type": "dir", "size": 0, "mode": "0755", "mtime": "t"}]})

    async def files_entry(self, request: Request):
        rec = await self.record(request)
        path = (rec["json"] or {}).get("to") or (rec["json"] or {}).get("path") or rec["query"].get("path")
        return JSONResponse({"name": path.rsplit("/", 1)[-1], "path": path, "type": "file", "size": 1,
                             "mode": "0644", "mtime": "t"})

    async def logs(self, request: Request):
        await self.record(request)
        return JSONResponse({"lines": [{"ts": "t1", "source": "host", "message": "created"},
                                       {"ts": "t2", "source": "envd", "message": "started"}]})

    async def pty(self, ws: WebSocket):
        if ws.headers.get("authorization") != f"Bearer {KEY}":
            await ws.close(code=1008)
            return
        await ws.accept()
        await ws.send_bytes(f"cols={ws.query_params['cols']} rows={ws.query_params['rows']}\r\n".encode())
        while True:
            msg = await ws.receive()
            if msg.get("text"):
                await ws.send_bytes(("ctl:" + msg["text"]).encode())
            elif msg.get("bytes") == b"exit\r":
                await ws.send_text(json.dumps({"type": "exit", "exit_code": 5}))
                await ws.close()
                return
            elif msg.get("bytes"):
                await ws.send_bytes(b"echo:" + msg["bytes"])

    def app(self) -> Starlette:
        base = "/v1/sandboxes/{id}"

        async def auth(scope, receive, send):
            if scope["type"] == "http":
                headers = dict(scope["headers"])
                if headers.get(b"authorization") != f"Bearer {KEY}".encode():
                    return await err(401, "unauthorized", "bad api key")(scope, receive, send)
            await inner(scope, receive, send)

        inner = Starlette(routes=[
            Route("/v1/sandboxes", self.sandboxes, methods=["GET", "POST"]),
            Route(base, self.sandbox, methods=["GET", "DELETE"]),
            Route(base + "/keepalive", self.keepalive, methods=["POST"]),
            Route(base + "/commands", self.commands, methods=["GET", "POST"]),
            Route(base + "/commands/{pid}", self.command, methods=["GET"]),
            Route(base + "/commands/{pid}/stdin", self.command_stdin, methods=["POST"]),
            Route(base + "/commands/{pid}/signal", self.command_signal, methods=["POST"]),
            Route(base + "/files", self.files, methods=["GET", "PUT", "DELETE"]),
            Route(base + "/files/list", self.files_list, methods=["GET"]),
            Route(base + "/files/stat", self.files_entry, methods=["GET"]),
            Route(base + "/files/mkdir", self.files_entry, methods=["POST"]),
            Route(base + "/files/rename", self.files_entry, methods=["POST"]),
            Route(base + "/files/tar", self.files, methods=["GET", "PUT"]),
            Route(base + "/logs", self.logs, methods=["GET"]),
            WebSocketRoute(base + "/pty", self.pty),
        ])
        return auth


@pytest.fixture(scope="module")
def server():
    fake = FakeServer()
    srv = uvicorn.Server(uvicorn.Config(fake.app(), host="127.0.0.1", port=0, log_level="warning",
                                        ws="websockets-sansio"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not srv.started:
        assert time.time() < deadline, "fake server did not start"
        time.sleep(0.01)
    fake.url = "http://127.0.0.1:%d" % srv.servers[0].sockets[0].getsockname()[1]
    yield fake
    srv.should_exit = True
    thread.join(5)


@pytest.fixture
def client(server):
    with E2A(server.url, KEY) as c:
        yield c


@pytest.fixture
def cli_env(server, monkeypatch):
    monkeypatch.setenv("E2A_URL", server.url)
    monkeypatch.setenv("E2A_API_KEY", KEY)
    return server


# ====================================================================== SDK: sandboxes and errors


def test_create_sends_only_given_fields_and_auth(client, server):
    sb = client.create_sandbox("python", env_vars={"A": "1"}, internet=False, idle_timeout_seconds=60)
    req = server.last("/v1/sandboxes")
    assert req["json"] == {"template": "python", "env_vars": {"A": "1"}, "internet": False,
                           "idle_timeout_seconds": 60}
    assert req["headers"]["authorization"] == f"Bearer {KEY}"
    assert isinstance(sb, Sandbox) and sb.vm_id == "sb1" and sb.template == "python"
    assert sb.cpu_fraction == 0.5 and sb.metadata == {"team": "a"}  # unknown server fields are ignored


def test_list_filters_by_state_and_metadata(client, server):
    boxes = client.list_sandboxes(state="running", metadata={"team": "a"})
    assert [b.vm_id for b in boxes] == ["sb1", "sb2"]
    assert server.last("/v1/sandboxes")["query"] == {"state": "running", "metadata.team": "a"}


def test_kill_keepalive_and_bound_sandbox(client, server):
    sb = client.get_sandbox("sb9")
    assert sb.kill().state == "destroyed"
    assert server.last("/sb9")["method"] == "DELETE"
    client.keepalive(sb)  # a Sandbox works wherever an id does
    assert server.last()["path"] == "/v1/sandboxes/sb9/keepalive"


def test_error_json_is_mapped(client):
    with pytest.raises(E2AError) as e:
        client.get_sandbox("missing")
    assert (e.value.status, e.value.code, e.value.message) == (404, "not_found", "no such sandbox")


def test_non_json_error_and_bad_key(server, client):
    with pytest.raises(E2AError) as e:
        client.get_sandbox("proxy")
    assert e.value.code == "http_502" and "bad gateway" in e.value.message
    with E2A(server.url, "wrong") as bad, pytest.raises(E2AError) as e:
        bad.list_sandboxes()
    assert (e.value.status, e.value.code) == (401, "unauthorized")


def test_missing_api_key(monkeypatch):
    monkeypatch.delenv("E2A_API_KEY", raising=False)
    with pytest.raises(E2AError) as e:
        E2A("http://127.0.0.1:1")
    assert e.value.code == "missing_api_key"


def test_error_mapping_with_mock_transport():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"code": "invalid_user", "message": "no user x", "field": "user"}})

    with E2A("http://e2a.test", KEY, transport=httpx.MockTransport(handler)) as c, pytest.raises(E2AError) as e:
        c.run("sb1", "id", user="x")
    assert (e.value.code, e.value.field) == ("invalid_user", "user")


# ====================================================================== SDK: commands


def test_run_collects_stream_and_calls_callbacks(client, server):
    seen = []
    res = client.run("sb1", "echo hi", env={"X": "1"}, cwd="/tmp", timeout=5, on_stdout=seen.append)
    assert server.last("/commands")["json"] == {"cmd": "echo hi", "env": {"X": "1"}, "cwd": "/tmp", "timeout": 5}
    assert (res.exit_code, res.stdout, res.stderr, res.pid, res.timed_out) == (3, "hi\n", "oops\n", 42, False)
    assert seen == ["hi\n"]


def test_stream_yields_events_and_argv_list(client, server):
    events = list(client.stream("sb1", ["ls", "-l"]))
    assert server.last("/commands")["json"] == {"argv": ["ls", "-l"]}
    assert [e.type for e in events] == ["start", "stdout", "stderr", "exit"]
    assert events[-1] == CommandEvent("exit", exit_code=3, signal=None, timed_out=False)


def test_command_needs_exactly_one_of_cmd_argv(client):
    with pytest.raises(E2AError) as e:
        client.run("sb1")
    assert e.value.code == "invalid_command"


def test_start_failure_is_an_error_before_streaming(client):
    with pytest.raises(E2AError) as e:
        client.run("sb1", "ls", cwd="/nope")
    assert (e.value.code, e.value.field) == ("invalid_cwd", "cwd")


def test_background_reconnect_stdin_signal(client, server):
    assert client.run_background("sb1", "sleep 9") == 7
    assert server.last("/commands")["json"] == {"cmd": "sleep 9", "background": True}
    assert client.list_commands("sb1")[0].cmd == "sleep 9"
    events = list(client.reconnect("sb1", 7))
    assert events[0] == CommandEvent("dropped", bytes=10)
    res = client.wait("sb1", 7)
    assert (res.exit_code, res.signal, res.timed_out, res.stdout) == (137, "SIGKILL", True, "late")
    client.send_stdin("sb1", 7, b"abc", eof=True)
    assert server.last("/stdin")["json"] == {"data": "abc", "eof": True}
    client.send_signal("sb1", 7, "SIGINT")
    assert server.last("/signal")["json"] == {"signal": "SIGINT"}


def test_command_stream_has_no_read_timeout():
    assert _core.command("sb1", "x").timeout.read is None
    assert _core.reconnect("sb1", 1).timeout.read is None
    assert _core.get_sandbox("sb1").timeout.read is not None


# ====================================================================== SDK: files


class CountingReader(io.RawIOBase):
    """A big "file" that is never in memory at once and remembers the largest read asked of it."""

    def __init__(self, total: int):
        self.left, self.max_read = total, 0

    def readable(self):
        return True

    def read(self, n=-1):
        assert n > 0, "the SDK must read in pieces, never read()"
        self.max_read = max(self.max_read, n)
        n = min(n, self.left)
        self.left -= n
        return b"x" * n


def test_write_file_object_streams_chunked(client, server):
    src = CountingReader(5 * _core.CHUNK + 7)
    res = client.files.write("sb1", "big.bin", src, mode=0o600)
    up = server.uploads[-1]
    assert up["headers"].get("transfer-encoding") == "chunked" and "content-length" not in up["headers"]
    assert up["size"] == 5 * _core.CHUNK + 7 == res["size"] and up["chunks"] > 1
    assert up["query"] == {"path": "big.bin", "mode": "0600"}
    assert src.max_read == _core.CHUNK


def test_write_path_sends_content_length(client, server, tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(FILE)
    client.files.write("sb1", "/tmp/f.bin", p, user="root")
    up = server.uploads[-1]
    assert up["headers"]["content-length"] == str(len(FILE))
    assert up["sha"] == hashlib.sha256(FILE).hexdigest() and up["query"]["user"] == "root"
    client.files.write("sb1", "t.txt", "text")  # str is content, not a path
    assert server.uploads[-1]["size"] == 4


def test_read_and_download(client, server, tmp_path):
    assert client.files.read_bytes("sb1", "f") == FILE
    dest = tmp_path / "out.bin"
    assert client.files.read_to("sb1", "f", dest) == len(FILE) and dest.read_bytes() == FILE
    buf = io.BytesIO()
    client.files.download_tar("sb1", "/data", buf)
    assert buf.getvalue() == FILE and server.last("/files/tar")["query"] == {"path": "/data"}
    with pytest.raises(E2AError) as e:
        client.files.read_to("sb1", "missing", tmp_path / "never")
    assert e.value.code == "not_found" and not (tmp_path / "never").exists()


def test_file_management_calls(client, server):
    assert [e.name for e in client.files.list("sb1", "/home/user")] == ["a.txt", "d"]
    assert client.files.stat("sb1", "x/y").name == "y"
    client.files.remove("sb1", "d", recursive=True)
    assert server.last("/files")["query"] == {"path": "d", "recursive": "true"}
    client.files.mkdir("sb1", "a/b")
    assert server.last("/mkdir")["json"] == {"path": "a/b", "parents": True}
    assert client.files.rename("sb1", "a", "b").path == "b"
    assert server.last("/rename")["json"] == {"from": "a", "to": "b"}
    res = client.files.upload_tar("sb1", io.BytesIO(b"tar!"), "/dst")
    assert res == {"files": 1, "bytes": 4} and server.uploads[-1]["query"] == {"path": "/dst"}
    sb = client.get_sandbox("sb1")
    assert sb.files.read_bytes("f") == FILE  # bound view
    assert [ln.source for ln in client.logs("sb1")] == ["host", "envd"]


# ====================================================================== SDK: async


def test_async_client(server, tmp_path):
    async def go():
        async with AsyncE2A(server.url, KEY) as c:
            sb = await c.create_sandbox(metadata={"k": "v"})
            out = []

            async def on_out(data):
                out.append(data)

            res = await sb.run("echo hi", on_stdout=on_out)
            assert (res.exit_code, res.stdout, out) == (3, "hi\n", ["hi\n"])
            assert [e.type async for e in c.stream("sb1", "x")] == ["start", "stdout", "stderr", "exit"]
            await c.files.write("sb1", "big", CountingReader(3 * _core.CHUNK))
            assert server.uploads[-1]["size"] == 3 * _core.CHUNK
            assert server.uploads[-1]["headers"].get("transfer-encoding") == "chunked"
            assert await c.files.read_to("sb1", "f", tmp_path / "a") == len(FILE)
            with pytest.raises(E2AError):
                await c.get_sandbox("missing")
            async with c.pty("sb1", cols=100, rows=30) as ws:
                assert await ws.recv() == b"cols=100 rows=30\r\n"
                await ws.send(json.dumps({"type": "resize", "cols": 1, "rows": 2}))
                assert (await ws.recv()).startswith(b"ctl:")
                await ws.send(b"exit\r")
                assert json.loads(await ws.recv()) == {"type": "exit", "exit_code": 5}

    asyncio.run(go())


# ====================================================================== CLI


def run_cli(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


def test_cli_create_prints_id_and_sends_options(cli_env):
    r = run_cli("sandbox", "create", "python", "--env", "A=1", "--metadata", "team=x", "--idle-timeout", "60",
                "--no-internet")
    assert r.exit_code == 0 and r.stdout == "sb1\n"
    assert cli_env.last("/v1/sandboxes")["json"] == {"template": "python", "env_vars": {"A": "1"},
                                                     "metadata": {"team": "x"}, "idle_timeout_seconds": 60,
                                                     "internet": False}
    r = run_cli("sandbox", "create", "--json")
    assert json.loads(r.stdout)["vm_id"] == "sb1"


def test_cli_bad_key_value(cli_env):
    r = run_cli("sandbox", "create", "--env", "NOEQUALS")
    assert r.exit_code == 2 and "KEY=VALUE" in r.stderr


def test_cli_ls_get_kill_logs(cli_env):
    r = run_cli("sandbox", "ls", "--state", "running")
    assert r.exit_code == 0 and "sb1" in r.stdout and "sb2" in r.stdout and "team=a" in r.stdout
    assert json.loads(run_cli("sandbox", "ls", "--json").stdout)[1]["vm_id"] == "sb2"
    assert "memory_mib:" in run_cli("sandbox", "get", "sb1").stdout
    assert run_cli("sandbox", "kill", "sb1").stdout == "sb1 destroyed\n"
    assert "expires_at=" in run_cli("sandbox", "keepalive", "sb1").stdout
    assert "host  created" in run_cli("sandbox", "logs", "sb1").stdout


def test_cli_errors(cli_env, monkeypatch):
    r = run_cli("sandbox", "get", "missing")
    assert r.exit_code == 1 and r.stderr == "error: not_found: no such sandbox\n"
    monkeypatch.delenv("E2A_API_KEY")
    r = run_cli("sandbox", "ls")
    assert r.exit_code == 1 and r.stderr.startswith("error: missing_api_key:") and "E2A_API_KEY" in r.stderr


def test_cli_connection_error(monkeypatch):
    monkeypatch.setenv("E2A_API_KEY", KEY)
    r = run_cli("--url", "http://127.0.0.1:1", "sandbox", "ls")
    assert r.exit_code == 1 and r.stderr.startswith("error: connection_error:")


def test_cli_exec_streams_and_propagates_exit_code(cli_env):
    r = run_cli("sandbox", "exec", "sb1", "--cwd", "/tmp", "--env", "A=1", "--", "ls", "-l", input="")
    assert r.exit_code == 3
    assert r.stdout == "hi\n" and r.stderr == "oops\n"
    body = cli_env.last("/commands")["json"]
    assert body["argv"] == ["ls", "-l"] and body["cwd"] == "/tmp" and body["env"] == {"A": "1"}


def test_cli_exec_forwards_stdin(cli_env):
    r = run_cli("sandbox", "exec", "sb1", "--", "cat | wc -c", input="héllo\n")
    assert r.exit_code == 3 and "in:héllo\n" in r.stdout
    body = cli_env.last("/commands")["json"]
    assert body["cmd"] == "cat | wc -c" and body["keep_stdin"] is True
    assert cli_env.last("/stdin")["json"]["eof"] is True


def test_cli_exec_start_error(cli_env):
    r = run_cli("sandbox", "exec", "sb1", "--cwd", "/nope", "--", "ls", input="")
    assert r.exit_code == 1 and r.stderr == "error: invalid_cwd: no such directory\n"


def test_cli_files(cli_env, tmp_path):
    local = tmp_path / "in.bin"
    local.write_bytes(FILE)
    r = run_cli("files", "put", "sb1", str(local), "dst.bin")
    assert r.exit_code == 0 and f"({len(FILE)} bytes)" in r.stdout
    assert cli_env.uploads[-1]["sha"] == hashlib.sha256(FILE).hexdigest()

    out = tmp_path / "out.bin"
    assert run_cli("files", "get", "sb1", "f", str(out)).exit_code == 0 and out.read_bytes() == FILE
    r = run_cli("files", "get", "sb1", "f", "-")
    assert r.stdout_bytes == FILE
    r = run_cli("files", "ls", "sb1")
    assert "a.txt" in r.stdout and "d/" in r.stdout
    assert run_cli("files", "rm", "sb1", "-r", "d").exit_code == 0
    assert cli_env.last("/files")["query"] == {"path": "d", "recursive": "true"}
    assert run_cli("files", "mkdir", "sb1", "x/y").stdout == "x/y\n"
    assert run_cli("files", "mv", "sb1", "a", "b").stdout == "b\n"
    r = run_cli("files", "get", "sb1", "missing", str(tmp_path / "m"))
    assert r.exit_code == 1 and r.stderr == "error: not_found: no such file\n"


def test_cli_has_attachable_groups():
    import click

    ctx = click.Context(main)
    assert {"sandbox", "files", "admin", "serve"} <= set(main.list_commands(ctx))
    admin = main.get_command(ctx, "admin")  # loaded on demand from e2a.server_cli

    @click.command("ping")
    def ping():
        click.echo("pong")

    admin.add_command(ping)
    try:
        assert run_cli("admin", "ping").stdout == "pong\n"
    finally:
        del admin.commands["ping"]


def test_cli_files_put_from_stdin(cli_env):
    r = run_cli("files", "put", "sb1", "-", "piped.txt", input="from stdin")
    assert r.exit_code == 0 and cli_env.uploads[-1]["size"] == len("from stdin")


def test_pty_refused_upgrade_is_an_error(server):
    async def go():
        async with AsyncE2A(server.url, "wrong") as c:
            async with c.pty("sb1"):
                pass

    with pytest.raises(E2AError) as e:
        asyncio.run(go())
    assert e.value.status == 403


def test_cli_shell_over_pipe_forwards_resize_and_exit_code(cli_env):
    """The whole shell loop in a real process (stdin is a pipe, so no raw mode): output, SIGWINCH
    -> resize message, the shell's exit code as ours."""
    import os
    import signal
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "E2A_URL": cli_env.url, "E2A_API_KEY": KEY, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "e2a.cli", "sandbox", "shell", "sb1"], cwd=root, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().startswith(b"cols=")  # connected, handlers installed
        proc.send_signal(signal.SIGWINCH)
        time.sleep(0.3)
        proc.stdin.write(b"exit\r")
        proc.stdin.close()
        out = proc.stdout.read()
        assert proc.wait(10) == 5, proc.stderr.read()
        assert b'ctl:{"type": "resize"' in out
    finally:
        proc.kill()


def test_upload_tar_from_local_path_string(client, server, tmp_path):
    tar = tmp_path / "a.tar"
    tar.write_bytes(b"t" * 1000)
    client.files.upload_tar("sb1", str(tar), "/dst")
    assert server.uploads[-1]["size"] == 1000 and server.uploads[-1]["headers"]["content-length"] == "1000"
