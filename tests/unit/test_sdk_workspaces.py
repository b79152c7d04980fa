"""Workspaces in the SDK (sync and async) and the CLI, against a fake e2a API and a fake S3 store
behind one httpx.MockTransport.

The fake answers with the shapes of e2a/api/workspaces.py (field for field) and records every
request, so tests check paths, queries and bodies, and that presigned URLs are fetched without
the API key.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import pathlib
import subprocess
import sys
from urllib.parse import parse_qsl, unquote

import httpx
import pytest
from click.testing import CliRunner

from e2a import cli
from e2a.sdk import (E2A, AsyncE2A, E2AError, PresignedUrl, Sandbox, Workspace, WorkspaceFile,
                     WorkspaceUsage)
from e2a.sdk import _core

KEY = "test-key"
API = "http://e2a.test"
S3 = "http://s3.test"

SB = {"vm_id": "sb1", "state": "running", "template": "standard", "vcpu": 1, "cpu_fraction": 0.5,
      "memory_mib": 512, "internet": True, "metadata": {}, "idle_timeout_seconds": 60,
      "max_lifetime_seconds": 7200, "created_at": "2026-01-01T00:00:00Z",
      "expires_at": "2026-01-01T01:00:00Z", "destroyed_at": None, "end_reason": None,
      "workspace_id": None, "on_idle": "destroy", "auto_resume": False, "paused_at": None,
      "pause_expires_at": None, "disk_bytes": None, "forked_from": None}


def ws_out(workspace_id: str, **kw) -> dict:
    """A WorkspaceOut as the route gives it (plus a field from a newer server)."""
    return {"workspace_id": workspace_id, "app_id": "default", "capset_id": "default",
            "end_user_id": None, "bytes_used": 1536, "file_count": 7,
            "usage_at": "2026-01-02T00:00:00Z", "created_at": "2026-01-01T00:00:00Z",
            "last_used_at": "2026-01-03T04:05:06.123456Z", "mounted": False,
            "field_from_the_future": 1, **kw}


WORKSPACES = [ws_out("ws1", mounted=True), ws_out("ws2", app_id="app", capset_id="ro", end_user_id="u1"),
              ws_out("wsbusy", mounted=True), ws_out("wsloop"), ws_out("a/b")]
FILES = [f"docs/f{i}.md" for i in range(4)] + ["src/main.py", "src/util.py", "link"]


def err(status: int, code: str, message: str, field: str | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message, "field": field}})


def s3_err(status: int, code: str, message: str) -> httpx.Response:
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
    return httpx.Response(status, content=body.encode(), headers={"Content-Type": "application/xml"})


class Fake:
    """httpx handler for both hosts: the e2a API and the S3 store its presigned URLs point at."""

    def __init__(self):
        self.requests: list[dict] = []
        self.objects: dict[tuple[str, str], bytes] = {("ws1", p): f"content of {p}".encode() for p in FILES}
        self.expired: set[str] = {"old.txt"}

    def api(self, method: str | None = None, suffix: str = "") -> list[dict]:
        return [r for r in self.requests if r["host"] == "e2a.test" and (method is None or r["method"] == method)
                and r["path"].endswith(suffix)]

    def s3(self) -> list[dict]:
        return [r for r in self.requests if r["host"] == "s3.test"]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        raw = request.url.raw_path.decode().split("?")[0]
        body = request.read()
        rec = {"host": request.url.host, "method": request.method, "path": raw,
               "segments": [unquote(s) for s in raw.strip("/").split("/")],
               "query": dict(parse_qsl(request.url.query.decode())), "headers": dict(request.headers),
               "body": body}
        self.requests.append(rec)
        if request.url.host == "s3.test":
            return self.store(rec)
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return err(401, "unauthorized", "bad api key")
        rec["json"] = json.loads(body) if body else None
        seg = rec["segments"]
        if seg[:2] == ["v1", "sandboxes"]:
            ws = rec["json"].get("workspace")
            return httpx.Response(201, json={**SB, "workspace_id": "ws1" if ws else None})
        if seg == ["v1", "workspaces"]:
            eu = rec["query"].get("end_user_id")
            return httpx.Response(200, json={"workspaces": [w for w in WORKSPACES
                                                            if eu is None or w["end_user_id"] == eu]})
        wid, rest = seg[2], seg[3:]
        row = next((w for w in WORKSPACES if w["workspace_id"] == wid), None)
        if row is None:
            return err(404, "workspace_not_found", f"no workspace {wid!r}", "workspace_id")
        if rest == [] and request.method == "GET":
            return httpx.Response(200, json=row)
        if rest == [] and request.method == "DELETE":
            if row["mounted"]:
                return err(409, "workspace_in_use", f"workspace {wid} is mounted by a sandbox: "
                                                    "delete the sandbox first", "workspace_id")
            return httpx.Response(204)
        if rest == ["usage"]:
            return httpx.Response(200, json={"workspace_id": wid, "bytes_used": 2048, "file_count": 7,
                                             "user_bytes_used": 3 << 20, "quota_bytes": 10 << 30})
        if rest == ["files"] and request.method == "GET":
            return self.page(wid, rec["query"])
        if rest == ["files"] and request.method == "DELETE":
            path = rec["query"]["path"]
            if (wid, path) not in self.objects:
                return err(404, "file_not_found", f"no file {path!r} in workspace {wid}", "path")
            del self.objects[(wid, path)]
            return httpx.Response(204)
        if rest == ["files", "presign"]:
            req = rec["json"]
            if req["method"] == "GET" and (wid, req["path"]) not in self.objects | {(wid, p): b"" for p in self.expired}:
                return err(404, "file_not_found", f"no file {req['path']!r} in workspace {wid}", "path")
            url = f"{S3}/bucket/w/{wid}/{req['path']}?X-Amz-Expires={req['expires_in']}&X-Amz-Signature=sig"
            return httpx.Response(200, json={"url": url, "method": req["method"],
                                             "expires_at": "2026-01-01T00:15:00Z"})
        return err(404, "not_found", f"no route {request.method} {raw}")

    def page(self, wid: str, query: dict) -> httpx.Response:
        limit, prefix, cursor = int(query.get("limit", 100)), query.get("prefix", ""), query.get("cursor")
        if wid == "wsloop":  # a broken server: the same cursor, again and again
            return httpx.Response(200, json={"files": [], "next_cursor": "same"})
        paths = sorted(p for (w, p) in self.objects if w == wid and p.startswith(prefix) and
                       (cursor is None or p > cursor))
        files = [{"path": p, "size": len(self.objects[(wid, p)]), "modified": "2026-01-01T00:00:00Z",
                  "type": "symlink" if p == "link" else "file"} for p in paths[:limit]]
        nxt = files[-1]["path"] if len(paths) > limit else None
        return httpx.Response(200, json={"files": files, "next_cursor": nxt})

    def store(self, rec: dict) -> httpx.Response:
        if "X-Amz-Signature" not in rec["query"]:
            return s3_err(403, "AccessDenied", "Query-string authentication requires the signature")
        wid, path = rec["segments"][2], "/".join(rec["segments"][3:])
        if path in self.expired:
            return s3_err(403, "AccessDenied", "Request has expired")
        if rec["method"] == "PUT":
            if "content-length" not in rec["headers"]:
                return s3_err(411, "MissingContentLength", "You must provide the Content-Length HTTP header.")
            self.objects[(wid, path)] = rec["body"]
            return httpx.Response(200, headers={"ETag": '"etag"'})
        if (wid, path) not in self.objects:
            return s3_err(404, "NoSuchKey", "The specified key does not exist.")
        return httpx.Response(200, content=self.objects[(wid, path)])


@pytest.fixture
def fake() -> Fake:
    return Fake()


@pytest.fixture
def client(fake):
    with E2A(API, KEY, transport=httpx.MockTransport(fake)) as c:
        yield c


def aclient(fake) -> AsyncE2A:
    return AsyncE2A(API, KEY, transport=httpx.MockTransport(fake))


# ====================================================================== SDK: create with a workspace


def test_create_sends_workspace_only_when_given(client, fake):
    sb = client.create_sandbox("standard")
    assert "workspace" not in fake.api("POST")[-1]["json"] and sb.workspace_id is None
    sb = client.create_sandbox("standard", workspace=True)
    assert fake.api("POST")[-1]["json"] == {"template": "standard", "workspace": True}
    assert isinstance(sb, Sandbox) and sb.workspace_id == "ws1" and sb.to_dict()["workspace_id"] == "ws1"
    client.create_sandbox("browser", internet=False,
                          workspace={"app_id": "app", "capset_id": "ro", "end_user_id": None})
    assert fake.api("POST")[-1]["json"] == {"template": "browser", "internet": False,
                                            "workspace": {"app_id": "app", "capset_id": "ro"}}
    client.create_sandbox(workspace={"end_user_id": "u1"})
    assert fake.api("POST")[-1]["json"]["workspace"] == {"end_user_id": "u1"}


# ====================================================================== SDK: reads


def test_list_and_get_parse_every_field(client, fake):
    rows = client.workspaces()
    assert fake.api()[-1]["path"] == "/v1/workspaces" and fake.api()[-1]["query"] == {}
    assert [w.workspace_id for w in rows] == ["ws1", "ws2", "wsbusy", "wsloop", "a/b"]
    assert rows[0] == Workspace(workspace_id="ws1", app_id="default", capset_id="default", end_user_id=None,
                                bytes_used=1536, file_count=7, usage_at="2026-01-02T00:00:00Z",
                                created_at="2026-01-01T00:00:00Z",
                                last_used_at="2026-01-03T04:05:06.123456Z", mounted=True)
    only = client.workspaces(end_user_id="u1")
    assert fake.api()[-1]["query"] == {"end_user_id": "u1"}
    assert [(w.workspace_id, w.app_id, w.capset_id, w.end_user_id) for w in only] == [("ws2", "app", "ro", "u1")]
    assert client.workspace("ws2").end_user_id == "u1"
    assert client.workspace(rows[0]).mounted is True  # a Workspace works wherever an id does
    assert fake.api()[-1]["path"] == "/v1/workspaces/ws1"
    assert client.workspace("a/b").workspace_id == "a/b"  # an id is one path segment, quoted
    assert fake.api()[-1]["path"] == "/v1/workspaces/a%2Fb"


def test_usage(client, fake):
    u = client.workspace_usage("ws1")
    assert fake.api()[-1]["path"] == "/v1/workspaces/ws1/usage"
    assert u == WorkspaceUsage(workspace_id="ws1", bytes_used=2048, file_count=7,
                               user_bytes_used=3 << 20, quota_bytes=10 << 30)


def test_one_page_of_files(client, fake):
    files, nxt = client.workspace_files("ws1", limit=3)
    req = fake.api()[-1]
    assert req["path"] == "/v1/workspaces/ws1/files" and req["query"] == {"limit": "3"}
    assert files[0] == WorkspaceFile(path="docs/f0.md", size=len(b"content of docs/f0.md"),
                                     modified="2026-01-01T00:00:00Z", type="file")
    assert [f.path for f in files] == ["docs/f0.md", "docs/f1.md", "docs/f2.md"] and nxt == "docs/f2.md"
    files, nxt = client.workspace_files("ws1", prefix="src/", cursor="src/main.py")
    assert fake.api()[-1]["query"] == {"prefix": "src/", "cursor": "src/main.py", "limit": "100"}
    assert [f.path for f in files] == ["src/util.py"] and nxt is None


def test_iterator_follows_next_cursor(client, fake):
    before = len(fake.api())
    paths = [f.path for f in client.iter_workspace_files("ws1", limit=3)]
    assert paths == sorted(FILES)
    pages = fake.api()[before:]
    assert [r["query"].get("cursor") for r in pages] == [None, "docs/f2.md", "src/main.py"]
    assert all(r["query"]["limit"] == "3" for r in pages)
    files = list(client.iter_workspace_files("ws1", prefix="docs/", limit=2))
    assert [f.path for f in files] == [f"docs/f{i}.md" for i in range(4)]
    assert {r["query"]["prefix"] for r in fake.api()[-2:]} == {"docs/"}
    assert [f.type for f in client.iter_workspace_files("ws1") if f.path == "link"] == ["symlink"]
    it = client.iter_workspace_files("ws1")  # lazy: nothing is sent before iteration
    n = len(fake.requests)
    assert len(fake.requests) == n and next(it).path == "docs/f0.md"


def test_iterator_stops_on_a_repeated_cursor(client):
    with pytest.raises(E2AError) as e:
        list(client.iter_workspace_files("wsloop"))
    assert (e.value.status, e.value.code) == (0, "cursor_loop")


def test_presign_request_and_response(client, fake):
    p = client.presign_workspace_file("ws1", "docs/f0.md")
    req = fake.api()[-1]
    assert req["method"] == "POST" and req["path"] == "/v1/workspaces/ws1/files/presign"
    assert req["json"] == {"path": "docs/f0.md", "method": "GET", "expires_in": 900}
    assert isinstance(p, PresignedUrl) and p.method == "GET" and p.expires_at == "2026-01-01T00:15:00Z"
    assert p.url.startswith(f"{S3}/bucket/w/ws1/docs/f0.md?")
    p = client.presign_workspace_file("ws1", "new.txt", method="put", expires_in=60)
    assert fake.api()[-1]["json"] == {"path": "new.txt", "method": "PUT", "expires_in": 60}
    assert p.method == "PUT"


# ====================================================================== SDK: errors and deletes


def test_errors_map_to_e2a_error(client, fake):
    with pytest.raises(E2AError) as e:
        client.workspace("nope")
    assert (e.value.status, e.value.code, e.value.field) == (404, "workspace_not_found", "workspace_id")
    with pytest.raises(E2AError) as e:
        client.presign_workspace_file("ws1", "missing.txt")
    assert (e.value.status, e.value.code, e.value.field) == (404, "file_not_found", "path")
    with pytest.raises(E2AError) as e:
        client.delete_workspace("wsbusy")
    assert (e.value.status, e.value.code) == (409, "workspace_in_use") and "delete the sandbox" in e.value.message
    with E2A(API, "wrong", transport=httpx.MockTransport(fake)) as bad, pytest.raises(E2AError) as e:
        bad.workspaces()
    assert (e.value.status, e.value.code) == (401, "unauthorized")


def test_deletes(client, fake):
    assert client.delete_workspace_file("ws1", "docs/f1.md") is None
    req = fake.api("DELETE")[-1]
    assert req["path"] == "/v1/workspaces/ws1/files" and req["query"] == {"path": "docs/f1.md"}
    assert ("ws1", "docs/f1.md") not in fake.objects
    with pytest.raises(E2AError) as e:
        client.delete_workspace_file("ws1", "docs/f1.md")
    assert (e.value.status, e.value.code) == (404, "file_not_found")
    assert client.delete_workspace("ws2") is None
    assert fake.api("DELETE")[-1]["path"] == "/v1/workspaces/ws2"


# ====================================================================== SDK: transfers over presigned URLs


def test_upload_uses_a_presigned_put_without_the_api_key(client, fake, tmp_path):
    assert client.upload_workspace_file("ws1", "notes/a.txt", b"hello") == 5
    presign, put = fake.requests[-2:]
    assert presign["host"] == "e2a.test" and json.loads(presign["body"]) == {
        "path": "notes/a.txt", "method": "PUT", "expires_in": 900, "size": 5}
    assert put["host"] == "s3.test" and put["method"] == "PUT" and put["path"] == "/bucket/w/ws1/notes/a.txt"
    assert "authorization" not in put["headers"] and KEY not in json.dumps(put["headers"])
    assert put["headers"]["content-length"] == "5" and put["body"] == b"hello"
    assert fake.objects[("ws1", "notes/a.txt")] == b"hello"

    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(3 * _core.CHUNK + 5))
    assert client.upload_workspace_file("ws1", "big.bin", local) == 3 * _core.CHUNK + 5
    put = fake.s3()[-1]
    assert put["headers"]["content-length"] == str(3 * _core.CHUNK + 5)
    assert "transfer-encoding" not in put["headers"] and put["body"] == local.read_bytes()
    client.upload_workspace_file("ws1", "t.txt", "héllo")  # str is text, not a path
    assert fake.objects[("ws1", "t.txt")] == "héllo".encode()


def test_upload_of_unknown_length_is_refused_before_any_request(client, fake):
    n = len(fake.requests)
    with pytest.raises(E2AError) as e:
        client.upload_workspace_file("ws1", "x", io.BytesIO(b"abc"))
    assert (e.value.code, e.value.field) == ("invalid_body", "data") and len(fake.requests) == n


def test_download_uses_a_presigned_get(client, fake, tmp_path):
    assert client.download_workspace_file("ws1", "src/main.py") == b"content of src/main.py"
    presign, get = fake.requests[-2:]
    assert json.loads(presign["body"])["method"] == "GET"
    assert get["host"] == "s3.test" and get["method"] == "GET" and "authorization" not in get["headers"]
    dest = tmp_path / "main.py"
    assert client.download_workspace_file_to("ws1", "src/main.py", dest) == len(b"content of src/main.py")
    assert dest.read_bytes() == b"content of src/main.py"


def test_download_errors(client, fake, tmp_path):
    n = len(fake.s3())
    with pytest.raises(E2AError) as e:  # refused by the API: the store is never asked
        client.download_workspace_file("ws1", "missing.txt")
    assert (e.value.status, e.value.code) == (404, "file_not_found") and len(fake.s3()) == n
    dest = tmp_path / "never"
    with pytest.raises(E2AError) as e:  # refused by the store (S3's XML error)
        client.download_workspace_file_to("ws1", "old.txt", dest)
    assert (e.value.status, e.value.code, e.value.message) == (403, "http_403", "AccessDenied: Request has expired")
    assert not dest.exists()
    with pytest.raises(E2AError) as e:
        client.upload_workspace_file("ws1", "old.txt", b"x")
    assert e.value.status == 403 and "Request has expired" in e.value.message


def test_presigned_target_and_error_helpers():
    assert _core.presigned_target(API, f"{S3}/b/k?sig=1") == f"{S3}/b/k?sig=1"
    assert _core.presigned_target(API + "/base", "/s3/b/k?sig=1") == f"{API}/s3/b/k?sig=1"
    e = _core.presigned_error(httpx.Response(502, text="bad gateway"))
    assert (e.status, e.code, e.message) == (502, "http_502", "bad gateway")


# ====================================================================== SDK: async, same shapes


def test_async_client_mirrors_the_sync_one(fake, tmp_path):
    async def go():
        async with aclient(fake) as c:
            sb = await c.create_sandbox(workspace={"app_id": "app"})
            assert sb.workspace_id == "ws1"
            assert fake.api("POST")[-1]["json"] == {"template": "standard", "workspace": {"app_id": "app"}}
            assert [w.workspace_id for w in await c.workspaces(end_user_id="u1")] == ["ws2"]
            assert (await c.workspace("ws1")).last_used_at == "2026-01-03T04:05:06.123456Z"
            assert (await c.workspace_usage("ws1")).quota_bytes == 10 << 30
            files, nxt = await c.workspace_files("ws1", limit=2)
            assert len(files) == 2 and nxt == "docs/f1.md"
            assert [f.path async for f in c.iter_workspace_files("ws1", limit=3)] == sorted(FILES)
            with pytest.raises(E2AError):
                [f async for f in c.iter_workspace_files("wsloop")]
            assert (await c.presign_workspace_file("ws1", "a", "PUT", 5)).method == "PUT"
            assert await c.upload_workspace_file("ws1", "up.bin", b"\x00\x01") == 2
            assert "authorization" not in fake.s3()[-1]["headers"]
            assert await c.download_workspace_file("ws1", "up.bin") == b"\x00\x01"
            assert await c.download_workspace_file_to("ws1", "up.bin", tmp_path / "x") == 2
            local = tmp_path / "local.bin"
            local.write_bytes(b"z" * 1000)
            assert await c.upload_workspace_file("ws1", "local.bin", local) == 1000
            assert fake.s3()[-1]["headers"]["content-length"] == "1000"
            await c.delete_workspace_file("ws1", "up.bin")
            assert fake.api("DELETE")[-1]["query"] == {"path": "up.bin"}
            with pytest.raises(E2AError) as e:
                await c.delete_workspace("wsbusy")
            assert (e.value.status, e.value.code) == (409, "workspace_in_use")
            with pytest.raises(E2AError) as e:
                await c.download_workspace_file("ws1", "old.txt")
            assert e.value.status == 403
            await c.delete_workspace("ws2")

    asyncio.run(go())


def test_sync_and_async_offer_the_same_workspace_methods():
    import inspect

    names = ["workspaces", "workspace", "workspace_usage", "workspace_files", "iter_workspace_files",
             "presign_workspace_file", "delete_workspace_file", "delete_workspace", "upload_workspace_file",
             "download_workspace_file", "download_workspace_file_to"]
    for name in names:
        sync, async_ = (inspect.signature(getattr(cls, name)).parameters for cls in (E2A, AsyncE2A))
        assert list(sync.values()) == list(async_.values()), name
    assert "workspace" in inspect.signature(E2A.create_sandbox).parameters
    assert "workspace" in inspect.signature(AsyncE2A.create_sandbox).parameters


# ====================================================================== CLI


@pytest.fixture
def cli_fake(fake, monkeypatch):
    """The CLI's client, talking to the fake through the mock transport."""
    monkeypatch.setenv("E2A_URL", API)
    monkeypatch.setenv("E2A_API_KEY", KEY)
    monkeypatch.setattr(cli, "E2A", lambda url, key: E2A(url, key, transport=httpx.MockTransport(fake)))
    return fake


def run_cli(*args, input=None):
    return CliRunner().invoke(cli.main, list(args), input=input)


def test_cli_create_with_a_workspace(cli_fake):
    r = run_cli("sandbox", "create")
    assert r.exit_code == 0 and "workspace" not in cli_fake.api("POST")[-1]["json"]
    r = run_cli("sandbox", "create", "--workspace")
    assert r.exit_code == 0 and r.stdout == "sb1\n"
    assert cli_fake.api("POST")[-1]["json"] == {"template": "standard", "workspace": True}
    r = run_cli("sandbox", "create", "browser", "--app-id", "app", "--end-user-id", "u1", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["workspace_id"] == "ws1"
    assert cli_fake.api("POST")[-1]["json"] == {"template": "browser",
                                                "workspace": {"app_id": "app", "end_user_id": "u1"}}
    run_cli("sandbox", "create", "--workspace", "--capset-id", "ro")
    assert cli_fake.api("POST")[-1]["json"]["workspace"] == {"capset_id": "ro"}


def test_cli_ls_show_usage(cli_fake):
    r = run_cli("workspaces", "ls")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["WORKSPACE", "ID", "SCOPE", "SIZE", "MOUNTED", "LAST", "USED", "(UTC)"]
    assert all(len(ln) <= 80 for ln in lines)
    ws1 = next(ln for ln in lines if ln.split()[0] == "ws1")
    assert ws1.split() == ["ws1", "default/default", "1.5", "KiB", "yes", "2026-01-03", "04:05"]
    assert next(ln for ln in lines if ln.split()[0] == "ws2").split()[:2] == ["ws2", "app/ro/u1"]
    r = run_cli("workspaces", "ls", "--end-user-id", "u1", "--json")
    assert [w["workspace_id"] for w in json.loads(r.stdout)] == ["ws2"]
    assert cli_fake.api()[-1]["query"] == {"end_user_id": "u1"}
    r = run_cli("workspaces", "show", "ws2")
    assert r.exit_code == 0 and "end_user_id:" in r.stdout and "u1" in r.stdout
    assert json.loads(run_cli("workspaces", "show", "ws2", "--json").stdout)["app_id"] == "app"
    r = run_cli("workspaces", "usage", "ws1")
    assert r.exit_code == 0 and "bytes_used:" in r.stdout and "2048 (2.0 KiB)" in r.stdout
    assert "quota_bytes:" in r.stdout and "(10.0 GiB)" in r.stdout
    assert json.loads(run_cli("workspaces", "usage", "ws1", "--json").stdout)["file_count"] == 7


def test_cli_files_follows_every_page(cli_fake, monkeypatch):
    monkeypatch.setattr(cli_fake, "page", _small_pages(cli_fake.page))
    before = len(cli_fake.api())
    r = run_cli("workspaces", "files", "ws1")
    assert r.exit_code == 0, r.output
    assert [ln.split()[-1] for ln in r.stdout.splitlines()] == [p + "@" if p == "link" else p
                                                                for p in sorted(FILES)]
    assert len(cli_fake.api()[before:]) == 3  # three pages of (at most) three
    r = run_cli("workspaces", "files", "ws1", "--prefix", "src/", "--json")
    assert [json.loads(ln)["path"] for ln in r.stdout.splitlines()] == ["src/main.py", "src/util.py"]
    assert cli_fake.api()[-1]["query"]["prefix"] == "src/"


def _small_pages(page):
    # The CLI asks for big pages; cap them at 3 so that it has to follow the cursor.
    return lambda wid, query: page(wid, {**query, "limit": str(min(3, int(query["limit"])))})


def test_cli_presign(cli_fake):
    r = run_cli("workspaces", "presign", "ws1", "docs/f0.md")
    assert r.exit_code == 0 and r.stdout.startswith(f"{S3}/bucket/w/ws1/docs/f0.md?") and r.stdout.count("\n") == 1
    assert "GET, expires 2026-01-01 00:15:00 UTC" in r.stderr
    assert cli_fake.api()[-1]["json"] == {"path": "docs/f0.md", "method": "GET", "expires_in": 900}
    r = run_cli("workspaces", "presign", "ws1", "new.txt", "--put", "--expires-in", "60")
    assert r.exit_code == 0 and cli_fake.api()[-1]["json"] == {"path": "new.txt", "method": "PUT", "expires_in": 60}
    assert run_cli("workspaces", "presign", "ws1", "x", "--expires-in", "0").exit_code == 2
    r = run_cli("workspaces", "presign", "ws1", "missing.txt")
    assert r.exit_code == 1 and r.stderr.startswith("error: file_not_found: no file 'missing.txt'")


def test_cli_rm_and_delete(cli_fake):
    r = run_cli("workspaces", "rm", "ws1", "docs/f0.md")
    assert r.exit_code == 0 and cli_fake.api("DELETE")[-1]["query"] == {"path": "docs/f0.md"}
    r = run_cli("workspaces", "delete", "ws2", input="n\n")
    assert r.exit_code == 1 and "Delete workspace ws2" in r.stderr
    assert not [q for q in cli_fake.api("DELETE") if q["path"] == "/v1/workspaces/ws2"]
    r = run_cli("workspaces", "delete", "ws2", input="y\n")
    assert r.exit_code == 0 and r.stdout == "ws2 deleted\n"
    r = run_cli("workspaces", "delete", "ws2", "--yes")
    assert r.exit_code == 0 and "Delete workspace" not in r.output
    r = run_cli("workspaces", "delete", "wsbusy", "-y")
    assert r.exit_code == 1 and r.stderr.startswith("error: workspace_in_use: workspace wsbusy is mounted")
    r = run_cli("workspaces", "rm", "nope", "x")
    assert r.exit_code == 1 and r.stderr == "error: workspace_not_found: no workspace 'nope'\n"


def test_cli_put_and_get(cli_fake, tmp_path, monkeypatch):
    local = tmp_path / "in.bin"
    local.write_bytes(b"0123456789" * 100)
    r = run_cli("workspaces", "put", "ws1", "data/in.bin", str(local))
    assert r.exit_code == 0 and r.stdout == "data/in.bin (1000 bytes)\n"
    assert cli_fake.objects[("ws1", "data/in.bin")] == local.read_bytes()
    assert "authorization" not in cli_fake.s3()[-1]["headers"]
    r = run_cli("workspaces", "put", "ws1", "piped.txt", "-", input="from stdin")
    assert r.exit_code == 0 and cli_fake.objects[("ws1", "piped.txt")] == b"from stdin"
    assert run_cli("workspaces", "put", "ws1", "x", str(tmp_path / "absent")).exit_code == 2

    out = tmp_path / "out.bin"
    r = run_cli("workspaces", "get", "ws1", "data/in.bin", str(out))
    assert r.exit_code == 0 and out.read_bytes() == local.read_bytes() and "(1000 bytes)" in r.stderr
    r = run_cli("workspaces", "get", "ws1", "piped.txt", "-")
    assert r.exit_code == 0 and r.stdout_bytes == b"from stdin"
    monkeypatch.chdir(tmp_path)
    r = run_cli("workspaces", "get", "ws1", "src/main.py")
    assert r.exit_code == 0 and (tmp_path / "main.py").read_bytes() == b"content of src/main.py"
    r = run_cli("workspaces", "get", "ws1", "old.txt", str(tmp_path / "never"))
    assert r.exit_code == 1 and r.stderr == "error: http_403: AccessDenied: Request has expired\n"
    assert not (tmp_path / "never").exists()


def test_workspaces_help_loads_no_server_module():
    """`e2a workspaces ...` stays a client command: neither the server nor e2a.workspaces (boto3)."""
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2A_")}
    env["PYTHONPATH"] = str(root)
    entry = "import sys; sys.argv[0] = 'e2a'; from e2a.cli import main; main()"
    for args in (["workspaces", "--help"], ["workspaces", "files", "--help"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-c", entry, *args], cwd=root, env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "e2a.cli" in imported
        assert not {n for n in imported if n.split(".")[0] in ("boto3", "botocore", "fastapi", "sqlalchemy")
                    or n.startswith(("e2a.workspaces", "e2a.api", "e2a.store", "e2a.server_cli"))}


def test_models_and_fake_match_the_routes():
    """The SDK's models hold exactly the routes' response fields, and so does the fake above."""
    from dataclasses import fields

    from e2a.api import workspaces as routes
    from e2a.api.schemas import SandboxOut

    pairs = [(Workspace, routes.WorkspaceOut), (WorkspaceUsage, routes.UsageOut),
             (WorkspaceFile, routes.FileOut), (PresignedUrl, routes.PresignOut)]
    for model, out in pairs:
        assert [f.name for f in fields(model)] == list(out.model_fields), model
    assert {f.name for f in fields(Sandbox) if not f.name.startswith("_")} == set(SandboxOut.model_fields)
    assert set(ws_out("x")) - {"field_from_the_future"} == set(routes.WorkspaceOut.model_fields)
    assert set(SB) == set(SandboxOut.model_fields)
    assert set(routes.PresignIn.model_fields) == {"path", "method", "expires_in", "size"}
    assert routes.PresignIn.model_fields["expires_in"].default == 900
