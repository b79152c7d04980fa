"""Attacks on workspaces: /home/user as an rclone FUSE mount of an S3 prefix w/<id>/ in one
bucket of the embedded S3 server (`rclone serve s3` over a crypt remote on 127.0.0.1).

Three attackers: a tenant with an API key (another tenant's workspace through ids, paths,
presigned URLs, the quota), code inside a sandbox (the S3 server, the host's files through
names and symlinks, destroy), and an unprivileged local user on the host (credentials, the
key, the mounts, the server on loopback).

Each test is one attack and asserts that it fails. Those that found a hole say so ("Was a hole")
and how it was fixed; the one known and documented limitation is an expected failure.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config

from e2a.sdk import E2A
from e2a.workspaces.registry import CACHE_SLACK
from tests.conftest import own_server, wait_for
from tests.security.conftest import NOBODY, as_user

MiB = 1024 * 1024
BUCKET = "e2a-workspaces"


# ---- helpers --------------------------------------------------------------------------------


def api(srv, key: str, timeout: float = 120) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=timeout,
                        headers={"Authorization": f"Bearer {key}"})


def ws_sandbox(c: E2A, app_id: str, **ws) -> tuple[str, str]:
    """(vm_id, workspace_id) of a new standard sandbox with the scope's workspace."""
    sb = c.create_sandbox("standard", idle_timeout_seconds=600,
                          workspace={"app_id": app_id, **ws})
    assert sb.workspace_id, sb
    return sb.vm_id, sb.workspace_id


def presign(h: httpx.Client, wid: str, path: str, method: str, expires_in: int = 900) -> str:
    r = h.post(f"/v1/workspaces/{wid}/files/presign",
               json={"path": path, "method": method, "expires_in": expires_in})
    assert r.status_code == 200, r.text
    return r.json()["url"]


def data_dir(srv) -> Path:
    return srv.base / "data"


def root_s3(srv):
    """The store as e2a itself sees it (root on the host): to check what really is in S3."""
    creds = json.loads((data_dir(srv) / "s3" / "credentials.json").read_text())
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{srv.s3_port}",
                        region_name="us-east-1", aws_access_key_id=creds["access_key"],
                        aws_secret_access_key=creds["secret_key"],
                        config=Config(signature_version="s3v4",
                                      s3={"addressing_style": "path"}))


def keys_of(srv, wid: str) -> dict[str, int]:
    s3 = root_s3(srv)
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                            Prefix=f"w/{wid}/"):
        for o in page.get("Contents", []):
            out[o["Key"][len(f"w/{wid}/"):]] = o["Size"]
    return out


def secrets_of(srv) -> list[str]:
    creds = json.loads((data_dir(srv) / "s3" / "credentials.json").read_text())
    return [creds["secret_key"], (data_dir(srv) / "workspace.key").read_text().strip()]


def state(h: httpx.Client, vm_id: str) -> str:
    return h.get(f"/v1/sandboxes/{vm_id}").json()["state"]


@pytest.fixture(scope="module")
def alice_ws(alice):
    """A workspace of alice's holding a secret, no longer mounted."""
    vm, wid = ws_sandbox(alice, "secrets")
    assert alice.run(vm, "echo alice-secret > /home/user/secret.txt").exit_code == 0
    alice.kill(vm)
    return wid


@pytest.fixture(scope="module")
def bob_ws(bob):
    vm, wid = ws_sandbox(bob, "secrets")
    assert bob.run(vm, "echo bob-secret > /home/user/bob.txt").exit_code == 0
    bob.kill(vm)
    return wid


# ---- (a) a tenant with an API key -----------------------------------------------------------


def test_presigned_put_cannot_copy_another_tenants_file(server, keys, alice_ws, bob_ws):
    """Was a hole (fixed by rclone 1.76's serve s3, which refuses unsigned x-amz-* headers): a
    presigned PUT URL signs only the `host` header; `rclone serve s3` (gofakes3)
    treats a PUT with an unsigned `x-amz-copy-source` header as CopyObject, with the server's
    one key pair, which may read every workspace. Alice presigns a PUT into her own workspace,
    adds `x-amz-copy-source: /e2a-workspaces/w/<bob's id>/bob.txt`, and gets 200: bob's file is
    now in her workspace, readable with a presigned GET. Any file of any tenant whose
    workspace id she learns (ids are not secrets: they appear in sandboxes' records, logs,
    URLs) is hers. Should: a presigned PUT never copies (refuse x-amz-copy-source, or any x-amz-*
    header that is not signed, on presigned requests; or sign with credentials scoped to
    w/<id>/)."""
    h = api(server, keys["alice"])
    url = presign(h, alice_ws, "stolen.txt", "PUT")
    r = httpx.put(url, headers={"x-amz-copy-source": f"/{BUCKET}/w/{bob_ws}/bob.txt"})
    stolen = httpx.get(presign(h, alice_ws, "stolen.txt", "GET")) if r.status_code == 200 \
        else None
    assert r.status_code >= 400 and stolen is None, (
        f"copy through a presigned PUT answered {r.status_code}; alice's workspace now holds "
        f"{stolen.text if stolen is not None else None!r} (bob's file)")


def test_presigned_urls_do_only_what_they_were_signed_for(server, keys, alice_ws, bob_ws):
    """An edited key, another workspace, another method, extra sub-resources, an edited expiry
    or date, a stripped signature: all refused by the S3 server."""
    h = api(server, keys["alice"])
    get = presign(h, alice_ws, "secret.txt", "GET")
    put = presign(h, alice_ws, "upload.txt", "PUT")
    assert httpx.get(get).text == "alice-secret\n"
    bob_file = get.replace(alice_ws, bob_ws).replace("secret.txt", "bob.txt")
    tries = {
        "GET of bob's key": httpx.get(bob_file),
        "PUT into bob's workspace": httpx.put(put.replace(alice_ws, bob_ws), content=b"x"),
        "PUT to another key": httpx.put(put.replace("upload.txt", "other.txt"), content=b"x"),
        "PUT with the GET url": httpx.put(get, content=b"overwritten"),
        "DELETE with the GET url": httpx.delete(get),
        "DELETE with the PUT url": httpx.delete(put),
        "GET with the PUT url": httpx.get(put),
        "POST with the PUT url": httpx.post(put, content=b"x"),
        "multipart part": httpx.put(put + "&partNumber=1&uploadId=x", content=b"x"),
        "list with the signature": httpx.get(
            f"http://127.0.0.1:{server.s3_port}/{BUCKET}?list-type=2&prefix=w/"
            + get.split("?", 1)[1]),
        "longer expiry": httpx.get(re.sub(r"X-Amz-Expires=\d+", "X-Amz-Expires=604800", get)),
        "later date": httpx.get(re.sub(r"X-Amz-Date=\w+", "X-Amz-Date=20991231T000000Z", get)),
        "no signature": httpx.get(re.sub(r"&X-Amz-Signature=\w+", "", get)),
        "anonymous": httpx.get(f"http://127.0.0.1:{server.s3_port}/{BUCKET}/w/{bob_ws}/bob.txt"),
        "anonymous list": httpx.get(f"http://127.0.0.1:{server.s3_port}/{BUCKET}?list-type=2"),
    }
    let_through = {k: (r.status_code, r.text[:80]) for k, r in tries.items()
                   if r.status_code < 400}
    assert not let_through, let_through
    assert httpx.get(get).text == "alice-secret\n"
    assert "upload.txt" not in keys_of(server, alice_ws)


def test_presign_expiry_bounds_and_expired_url(server, keys, alice_ws):
    h = api(server, keys["alice"])
    for bad in (0, -1, 7 * 24 * 3600 + 1, 10 ** 12):
        r = h.post(f"/v1/workspaces/{alice_ws}/files/presign",
                   json={"path": "secret.txt", "method": "GET", "expires_in": bad})
        assert r.status_code in (400, 422), (bad, r.status_code, r.text)
    url = presign(h, alice_ws, "secret.txt", "GET", expires_in=1)
    time.sleep(2.5)
    r = httpx.get(url)
    assert r.status_code >= 400 and "alice-secret" not in r.text


def test_a_url_still_out_when_its_workspace_is_deleted_leaves_nothing_once_expired(
        server, keys, alice):
    """A presigned PUT cannot be revoked: one handed out before its workspace was deleted still
    writes under the deleted prefix until it expires, seen by no listing, quota or bill (free
    storage for as long as the URL lives). Once it has expired, that prefix is emptied again,
    before the next storage charge."""
    h = api(server, keys["alice"])
    vm, wid = ws_sandbox(alice, "lateput")
    alice.kill(vm)
    url = presign(h, wid, "late.bin", "PUT", expires_in=8)
    assert h.delete(f"/v1/workspaces/{wid}").status_code == 204
    assert httpx.put(url, content=b"x" * 4096).status_code == 200  # S3 still takes it
    assert "late.bin" in keys_of(server, wid)
    wait_for(lambda: not keys_of(server, wid), timeout=60)


def test_another_tenants_workspace_is_404_on_every_route(server, keys, alice_ws):
    b = api(server, keys["bob"])
    w = alice_ws
    answers = {
        "get": b.get(f"/v1/workspaces/{w}"),
        "usage": b.get(f"/v1/workspaces/{w}/usage"),
        "files": b.get(f"/v1/workspaces/{w}/files"),
        "presign GET": b.post(f"/v1/workspaces/{w}/files/presign",
                              json={"path": "secret.txt", "method": "GET"}),
        "presign PUT": b.post(f"/v1/workspaces/{w}/files/presign",
                              json={"path": "x", "method": "PUT"}),
        "delete file": b.delete(f"/v1/workspaces/{w}/files", params={"path": "secret.txt"}),
        "delete": b.delete(f"/v1/workspaces/{w}"),
        "id with suffix": b.get(f"/v1/workspaces/{w}%2F..%2F{w}"),
        "upper-case id": b.get(f"/v1/workspaces/{w.upper()}"),
    }
    assert {k: r.status_code for k, r in answers.items()} == {k: 404 for k in answers}, \
        {k: (r.status_code, r.text[:100]) for k, r in answers.items()}
    assert w not in b.get("/v1/workspaces").text
    # and bob's sandbox with the same app id is his own workspace
    a = api(server, keys["alice"])
    assert "secret.txt" in a.get(f"/v1/workspaces/{w}/files").text


def test_crafted_paths_prefixes_and_cursors_stay_in_the_workspace(server, keys, alice_ws,
                                                                  bob_ws):
    h = api(server, keys["alice"])
    up = f"../{bob_ws}/bob.txt"
    bad_paths = ["..", "../x", "a/../../x", f"../{bob_ws}/bob.txt", "/etc/passwd", "a//b",
                 "./x", "a/.", "x/", "", "a\\..\\b", "a\x00b", "é" * 600]
    for p in bad_paths:
        for r in (h.post(f"/v1/workspaces/{alice_ws}/files/presign",
                         json={"path": p, "method": "PUT"}),
                  h.delete(f"/v1/workspaces/{alice_ws}/files", params={"path": p})):
            assert r.status_code in (400, 422), (p, r.status_code, r.text)
    for q in ({"prefix": "../"}, {"prefix": f"../{bob_ws}/"}, {"cursor": up},
              {"prefix": "/"}, {"cursor": "../"}, {"limit": 0}, {"limit": 100000}):
        r = h.get(f"/v1/workspaces/{alice_ws}/files", params=q)
        assert r.status_code in (400, 422), (q, r.status_code, r.text)
    # A cursor or prefix that is merely odd lists nothing of anyone else's.
    for q in ({"cursor": "zzzz"}, {"prefix": "b"}, {"cursor": "\uffff"}, {"prefix": "w"},
              {"limit": 1}):
        r = h.get(f"/v1/workspaces/{alice_ws}/files", params=q)
        assert r.status_code == 200, r.text
        assert "bob" not in r.text, (q, r.text)
    # Paging by one visits exactly the workspace's files.
    seen, cursor = [], None
    while True:
        page = h.get(f"/v1/workspaces/{alice_ws}/files",
                     params={"limit": 1, **({"cursor": cursor} if cursor else {})}).json()
        seen += [f["path"] for f in page["files"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
        assert len(seen) < 100
    assert sorted(seen) == sorted(keys_of(server, alice_ws)), seen


def test_crafted_scope_names_refused(server, keys):
    h = api(server, keys["alice"])
    for field in ("app_id", "capset_id", "end_user_id"):
        for bad in ("..", "../x", "a/b", "a%2Fb", "", "ａpp", "app\u200b", "x" * 65,
                    "x" * 10_000, ".hidden", "-x", "a b", "a\nb", 5, None if field != "end_user_id" else []):
            r = h.post("/v1/sandboxes", json={"template": "standard",
                                              "workspace": {field: bad}})
            assert r.status_code in (400, 422), (field, bad, r.status_code, r.text[:200])
            assert field in r.text, (field, bad, r.text[:300])


# ---- (b) code inside a sandbox --------------------------------------------------------------


def test_sandbox_cannot_reach_the_s3_server(server, alice):
    """Root inside a workspace sandbox reaches neither the S3 server's port on any host
    address nor the host's loopback."""
    vm, _ = ws_sandbox(alice, "net")
    try:
        gw = alice.run(vm, "ip route | awk '/default/ {print $3}'", user="root").stdout.strip()
        addrs = [a.split("/")[0] for a in os.popen(
            "ip -4 -o addr show | awk '{print $4}'").read().split()]
        script = f"""
import socket
for host in {[gw, '127.0.0.1', *addrs]!r}:
    for port in ({server.s3_port}, {server.port}):
        try:
            socket.create_connection((host, port), timeout=2).close(); print("OPEN", host, port)
        except OSError as e:
            pass
"""
        r = alice.run(vm, ["python3", "-c", script], user="root", timeout=180)
        assert "OPEN" not in r.stdout, r.stdout
    finally:
        alice.kill(vm)


def test_symlink_planted_by_presign_does_not_reach_the_host(server, keys, alice):
    """A presigned PUT of `leak.rclonelink` holding a host path becomes a symlink in the
    mount; inside, it resolves in the sandbox's own filesystem, never the host's."""
    h = api(server, keys["alice"])
    target = str(data_dir(server) / "workspace.key")
    vm, wid = ws_sandbox(alice, "links")
    try:
        for name, to in (("leak", target), ("up", "../../../../../../" + target),
                         ("loop", "loop"), ("etc", "/etc")):
            r = httpx.put(presign(h, wid, f"{name}.rclonelink", "PUT"), content=to.encode())
            assert r.status_code == 200
        time.sleep(11)  # the mount's directory cache (mount.DIR_CACHE)
        r = alice.run(vm, "cd /home/user; ls -la; cat leak up; cat etc/shadow; cat loop",
                      user="root")
        for secret in secrets_of(server):
            assert secret not in r.stdout
    finally:
        alice.kill(vm)
    assert not (data_dir(server) / "workspace.key").is_symlink()


def test_unuploadable_name_is_refused_or_destroy_completes(server, keys, alice):
    """Was a hole: a path whose S3 key passes 1024 bytes (six directories of 200 bytes, legal in
    Linux) is written fine inside, but S3 refuses its upload (KeyTooLongError) for ever, and
    each destroy ended in MountError: the sandbox stayed `stopping`, its capacity, mount and
    cache held for ever (a tenant repeating it pins the host). Now a file S3 keeps refusing
    while it answers is given up and named in e2a's log, and the destroy completes
    (docs/workspaces.md, Durability); the rest of the workspace is stored."""
    h = api(server, keys["alice"])
    vm, wid = ws_sandbox(alice, "deep")
    made = alice.run(vm, "cd /home/user && echo kept > kept.txt && "
                         "d=$(printf 'd%.0s' $(seq 200)) && "
                         "mkdir -p $d/$d/$d/$d/$d/$d && echo data > $d/$d/$d/$d/$d/$d/f")
    h.delete(f"/v1/sandboxes/{vm}")
    if made.exit_code != 0:
        return  # refused inside: a defence too
    try:
        wait_for(lambda: state(h, vm) == "destroyed", timeout=90, interval=1)
    except AssertionError:
        raise AssertionError(f"a sandbox with a 1,2 KB path is still {state(h, vm)!r} 90 s "
                             "after DELETE (the upload is refused: KeyTooLongError)") from None
    assert "kept.txt" in keys_of(server, wid), "the storable files were not all uploaded"
    assert re.search(rf"{vm}: S3 refused 1 files of workspace {wid} for good",
                     server.log_tail(200_000)), "the given-up file is not in e2a's log"


def test_truncate_created_file_does_not_wedge_destroy(server, keys, alice):
    """A file made only by truncate (no write) must reach S3 and not hold up the destroy."""
    h = api(server, keys["alice"])
    vm, wid = ws_sandbox(alice, "trunc")
    assert alice.run(vm, "truncate -s 1M /home/user/t.bin && echo x > /home/user/w.txt"
                     ).exit_code == 0
    time.sleep(4)
    h.delete(f"/v1/sandboxes/{vm}")
    try:
        wait_for(lambda: state(h, vm) == "destroyed", timeout=90, interval=1)
    except AssertionError:
        raise AssertionError(f"still {state(h, vm)!r} 90 s after DELETE") from None
    assert keys_of(server, wid).get("t.bin") == MiB, keys_of(server, wid)


def test_odd_names_survive_and_stay_in_the_workspace(server, keys, alice):
    """Newlines, fullwidth dots and slashes (rclone's own escapes), invalid UTF-8, names of 255
    bytes: each stays inside the workspace's prefix and none lands on the host outside
    the S3 objects' directory."""
    vm, wid = ws_sandbox(alice, "names")
    script = r'''
import os
os.chdir("/home/user")
for n in ["nl\nname", "\uff0e\uff0e", "\uff0f" + "a" * 252, "z" * 255, "tab\tx", "\u202e",
          b"bad\xffutf8", "\u2025"]:
    try:
        with open(n, "w") as f: f.write("x")
    except OSError as e: print("refused", repr(n)[:20], e)
'''
    try:
        assert alice.run(vm, ["python3", "-c", script]).exit_code == 0
        time.sleep(4)
    finally:
        alice.kill(vm)
    objects = data_dir(server) / "s3" / "objects"
    for k in keys_of(server, wid):
        assert "/" not in k or k.startswith("."), k
    # nothing of this workspace outside its own directory of objects
    outside = [p for p in objects.rglob("*") if ("\uff0e" in p.name or "nl\n" in p.name)
               and wid not in str(p)]
    assert not outside, outside


# ---- the quota ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quota_server():
    """A server of our own whose users may store 32 MiB."""
    with own_server("ws", E2A_WORKSPACE_QUOTA_MIB="32") as srv:
        srv.start()
        yield srv
        srv.stop()


@pytest.fixture
def small_quota(quota_server, request):
    """(server, client) of a new user of the 32 MiB server: each test its own quota."""
    srv = quota_server
    srv.keys = {"a": srv.create_user(f"{request.node.name[:40]}@example.com")}
    with E2A(srv.url, srv.keys["a"]) as c:
        yield srv, c
        for sb in c.list_sandboxes():
            c.kill(sb.vm_id)


def stored(srv, c: E2A) -> int:
    h = api(srv, srv.keys["a"])
    return sum(h.get(f"/v1/workspaces/{w.workspace_id}/usage").json()["bytes_used"]
               for w in c.workspaces())


def test_quota_sparse_files(small_quota):
    """Was a hole (fixed: e2a's rclone grows cache files without holes): the quota is the mount
    cache's btrfs qgroup, which counts allocated blocks; a sparse
    file (truncate -s, or dd seek) allocates none, so it is written at any size, and rclone
    uploads its full apparent size: 100 MiB stored (encrypted zeros, on the host's own disk in
    <data_dir>/s3/objects, outside the preallocated pool) under a 32 MiB quota; 100 GiB fills
    the host. Should: count files' apparent size (the patched rclone refusing with ENOSPC a
    size past the cache's limit, on truncate and on writes past the end)."""
    srv, c = small_quota
    vm, wid = ws_sandbox(c, "sparse")
    r = c.run(vm, "cd /home/user && truncate -s 100M big && echo end >> big; echo rc=$?",
              timeout=120)
    c.kill(vm)
    total = stored(srv, c)
    assert total <= 32 * MiB + MiB, (f"{total / MiB:.0f} MiB stored under a 32 MiB quota "
                                     f"(inside: {r.stdout.strip()})")


def test_quota_presigned_put(small_quota):
    """Was a hole: a presigned PUT took an object of any size. Now a PUT asked with `size` has
    that Content-Length signed (a bigger body is refused by S3) and is refused (507) when it
    does not fit what is left of the quota; without `size`, a PUT is refused once the quota is
    used up (docs/workspaces.md: an unsized PUT while there is room may be any size)."""
    srv, c = small_quota
    vm, wid = ws_sandbox(c, "put")
    c.kill(vm)
    h = api(srv, srv.keys["a"])
    r = h.post(f"/v1/workspaces/{wid}/files/presign",
               json={"path": "huge.bin", "method": "PUT", "size": 48 * MiB})
    assert r.status_code == 507 and r.json()["error"]["code"] == "quota_exceeded", r.text
    r = h.post(f"/v1/workspaces/{wid}/files/presign",
               json={"path": "small.bin", "method": "PUT", "size": MiB})
    assert r.status_code == 200, r.text
    put = httpx.put(r.json()["url"], content=b"\0" * (48 * MiB), timeout=120)
    assert put.status_code == 403, f"a 48 MiB body on a 1 MiB URL answered {put.status_code}"
    assert "small.bin" not in keys_of(srv, wid)
    # The quota used up through the sandbox: an unsized PUT is refused too.
    vm, _ = ws_sandbox(c, "put")
    c.run(vm, "head -c 40M /dev/urandom > /home/user/fill; true", timeout=120)
    c.kill(vm)
    r = h.post(f"/v1/workspaces/{wid}/files/presign", json={"path": "more.bin", "method": "PUT"})
    assert r.status_code == 507, r.text


def test_quota_many_sandboxes_at_once(small_quota):
    """Was a hole (fixed: the free quota is shared among the user's running mounts): each
    mount's cache may hold what is left of the
    quota when it starts, so two sandboxes on two workspaces at once may each write nearly
    all of it: ~48 MiB stored under 32 MiB. Should: reserve the free quota among live mounts
    (hand each its share, or give back and re-grant), or refuse a second mount while the
    first holds the free part."""
    srv, c = small_quota
    vms = [ws_sandbox(c, f"many{i}")[0] for i in range(2)]
    try:
        outs = [c.run(vm, "head -c 24M /dev/urandom > /home/user/f 2>&1; echo rc=$?",
                      timeout=120).stdout for vm in vms]
    finally:
        for vm in vms:
            c.kill(vm)
    total = stored(srv, c)
    # Each mount's cache has CACHE_SLACK (1 MiB) beyond its share, for directories' blocks.
    assert total <= 32 * MiB + len(vms) * CACHE_SLACK + MiB, \
        f"{total / MiB:.0f} MiB stored under 32 MiB: {outs}"


@pytest.mark.xfail(strict=True, reason="known and documented (docs/workspaces.md, Quota): an "
                   "object costs a block on the store's disk but counts as its size")
def test_quota_counts_what_empty_files_cost(small_quota):
    """HOLE (low, documented, expected to fail): the quota counts bytes, and an empty file or directory costs none, yet each
    file is an object on the host's disk (a 4 KiB block in <data_dir>/s3/objects, outside the
    pool) and a JSON file in the mount's metadata (outside the cache's limit). 600 empty
    files: 0 bytes counted, ~2.4 MiB of host disk; millions fill it. Should: count a per-object
    cost (say 4 KiB) in usage and the quota, or cap the number of files per workspace."""
    srv, c = small_quota
    vm, wid = ws_sandbox(c, "empty")
    try:
        assert c.run(vm, "cd /home/user && for i in $(seq 600); do : > e$i; done",
                     timeout=300).exit_code == 0
    finally:
        c.kill(vm)
    h = api(srv, srv.keys["a"])
    counted = h.get(f"/v1/workspaces/{wid}/usage").json()
    objects = data_dir(srv) / "s3" / "objects" / BUCKET / "w" / wid
    on_disk = sum(p.lstat().st_blocks * 512 for p in objects.rglob("*"))
    assert counted["file_count"] >= 600
    assert on_disk <= counted["bytes_used"] + MiB, (
        f"{counted['bytes_used']} bytes counted, {on_disk} bytes on the host's disk")


# ---- (c) an unprivileged user on the host ---------------------------------------------------


def test_host_user_reaches_no_secret_mount_or_socket(server, keys, alice):
    vm, wid = ws_sandbox(alice, "host")
    try:
        assert alice.run(vm, "echo in-the-mount > /home/user/m.txt").exit_code == 0
        d = data_dir(server)
        sbdir = d / "sandboxes" / vm
        paths = [d / "s3" / "credentials.json", d / "workspace.key", d / "logs" / "s3.log",
                 sbdir / "workspace.log", sbdir / "home" / "m.txt", sbdir / "rclone.conf",
                 d / "s3" / "rclone.conf"]
        for p in paths:
            r = as_user(NOBODY, "cat", str(p))
            assert r.returncode != 0, (p, r.stdout[:100])
        r = as_user(NOBODY, "python3", "-c",
                    f"import socket; s=socket.socket(socket.AF_UNIX); "
                    f"s.connect({str(sbdir / 'workspace.sock')!r}); print('CONNECTED')")
        assert "CONNECTED" not in r.stdout
        pids = server.mount_pids() + [server.s3_server_pid()]
        assert len(pids) >= 2 and all(pids)
        secrets = secrets_of(server)
        for pid in pids:
            r = as_user(NOBODY, "cat", f"/proc/{pid}/environ")
            assert r.returncode != 0 or not any(s in r.stdout for s in secrets), pid
            cmdline = Path(f"/proc/{pid}/cmdline").read_text()
            assert not any(s in cmdline for s in secrets), cmdline
        # the logs hold no secret either (for whoever may read them later)
        for log in [d / "logs" / "s3.log", sbdir / "workspace.log", server.base / "server.log"]:
            text = log.read_text(errors="replace") if log.exists() else ""
            assert not any(s in text for s in secrets), log
        # without credentials the S3 server gives nothing to a local user
        r = as_user(NOBODY, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                    f"http://127.0.0.1:{server.s3_port}/{BUCKET}/w/{wid}/m.txt")
        assert r.stdout.strip() not in ("200", "206"), r.stdout
    finally:
        alice.kill(vm)


def test_objects_are_not_plaintext(server, keys, alice):
    vm, wid = ws_sandbox(alice, "plain")
    marker = "PLAINTEXT-MARKER-" + "q" * 40
    try:
        assert alice.run(vm, f"yes {marker} | head -c 300000 > /home/user/p.txt").exit_code == 0
    finally:
        alice.kill(vm)
    files = [p for p in (data_dir(server) / "s3" / "objects").rglob("*") if p.is_file()
             and wid in str(p)]
    assert files
    for p in files:
        assert marker.encode() not in p.read_bytes(), p


# ---- races ----------------------------------------------------------------------------------


def test_delete_workspace_racing_a_create_that_mounts_it(server, keys, alice):
    """Was a hole (fixed: leases, and a DELETE marks the workspace deleting): DELETE
    /v1/workspaces/{id} checked `workspace_mounted` once, then deletes the objects
    and the row; a create of the same scope that finds the row in between (registry.find_or_make
    runs before manager.mounting is marked, and the DELETE does not re-check before
    registry.delete) mounts it, and the DELETE still answers 204. The sandbox then writes into
    w/<deleted id>/: storage that no listing shows, no usage or quota counts (stored_bytes sums
    rows) and no route can delete (404). Should: one lock (or a DB state 'deleting' on the row)
    that both the DELETE and the create's plan take: mark `mounting` before find_or_make, and
    the DELETE marks the row deleted before it deletes objects, re-checking the mount after."""
    h = api(server, keys["alice"])
    vm, wid = ws_sandbox(alice, "race")
    alice.kill(vm)
    orphans = []
    for attempt in range(8):
        for i in range(100):  # enough objects that the delete takes a while
            httpx.put(presign(h, wid, f"f{i:04}", "PUT"), content=b"x")
        box = {}

        def create():
            box["r"] = h.post("/v1/sandboxes", json={
                "template": "standard", "idle_timeout_seconds": 600,
                "workspace": {"app_id": "race"}})

        t = threading.Thread(target=create)
        t.start()
        time.sleep(0.003 * (attempt % 4))
        d = h.delete(f"/v1/workspaces/{wid}")
        t.join()
        r = box["r"]
        if r.status_code == 201 or r.status_code == 200:
            sb = r.json()
            alive = h.get(f"/v1/workspaces/{sb['workspace_id']}")
            orphan = alive.status_code == 404
            if orphan:
                alice.run(sb["vm_id"], "head -c 1M /dev/urandom > /home/user/o.bin")
            alice.kill(sb["vm_id"])
            if orphan:
                orphans.append((d.status_code, sb["workspace_id"],
                                keys_of(server, sb["workspace_id"]).get("o.bin")))
            if orphans:
                break
            wid = sb["workspace_id"]
        else:  # the create failed: make the scope's workspace again for the next try
            vm, wid = ws_sandbox(alice, "race")
            alice.kill(vm)
    assert not orphans, f"sandboxes mounted deleted workspaces: {orphans}"
