"""Workspaces: /home/user on S3 through a host-side rclone mount, with a real S3 server, real rclone
and real sandboxes. Durable across sandboxes (contents, mtimes, symlinks, directories), scoped by
(user, end user, app, capability set), encrypted at rest, managed over REST; what two sandboxes
on one workspace see of each other; the quota and the crash cases on servers of their own."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from datetime import datetime, timezone

import httpx
import pytest

from e2a.sdk import E2A
from tests.conftest import own_server, wait_for

HOME = "/home/user"


class As:
    """One user on one server: raw HTTP for the workspace calls, the SDK to run commands. Every
    sandbox it makes is destroyed at the end, even when the test failed."""

    def __init__(self, url: str, key: str):
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=600)
        self.sdk = E2A(url, key)
        self.made: list[str] = []

    def create(self, workspace=True, **body) -> dict:
        r = self.http.post("/v1/sandboxes", json={"template": "standard",
                                                   "idle_timeout_seconds": 900,
                                                   "workspace": workspace, **body})
        assert r.status_code == 201, r.text
        sb = r.json()
        self.made.append(sb["vm_id"])
        return sb

    def destroy(self, vm_id: str) -> dict:
        r = self.http.delete(f"/v1/sandboxes/{vm_id}")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "destroyed", r.text
        return r.json()

    def sh(self, vm_id: str, cmd: str, check: bool = True, timeout: float = 300):
        r = self.sdk.run(vm_id, cmd, cwd=HOME, timeout=timeout)
        if check:
            assert r.exit_code == 0, f"{cmd!r} exited {r.exit_code}: {r.stderr[-2000:]}"
        return r

    def ws(self, workspace_id: str, sub: str = "") -> httpx.Response:
        return self.http.get(f"/v1/workspaces/{workspace_id}{sub}")

    def files(self, workspace_id: str, **params) -> list[dict]:
        """Every file of the workspace (or under a prefix), following the pages."""
        seen, cursor = [], None
        while True:
            q = {**params, **({"cursor": cursor} if cursor else {})}
            r = self.http.get(f"/v1/workspaces/{workspace_id}/files", params=q)
            assert r.status_code == 200, r.text
            seen += r.json()["files"]
            cursor = r.json()["next_cursor"]
            if cursor is None:
                return seen

    def presign(self, workspace_id: str, path: str, method: str = "GET",
                expires_in: int = 300) -> httpx.Response:
        return self.http.post(f"/v1/workspaces/{workspace_id}/files/presign",
                              json={"path": path, "method": method, "expires_in": expires_in})

    def close(self) -> None:
        for vm_id in self.made:
            r = self.http.get(f"/v1/sandboxes/{vm_id}")
            if r.status_code == 200 and r.json()["state"] != "destroyed":
                self.http.delete(f"/v1/sandboxes/{vm_id}")
        self.http.close()
        self.sdk.close()


@pytest.fixture
def a(server, keys):
    u = As(server.url, keys["alice"])
    yield u
    u.close()


@pytest.fixture
def b(server, keys):
    u = As(server.url, keys["bob"])
    yield u
    u.close()


def scope(test: str, **kw) -> dict:
    """A scope no other test (or earlier run against a kept server) uses."""
    return {"app_id": f"{test}-{uuid.uuid4().hex[:8]}", **kw}


def curl(*args: str) -> tuple[int, bytes]:
    """Plain curl, no API key: (HTTP status, body)."""
    out = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args],
                         capture_output=True, timeout=120, check=True).stdout
    body, _, status = out.rpartition(b"\n")
    return int(status), body


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


SUMS = "find . -path ./.cache -prune -o -type f ! -name '.*' -print0 | sort -z | xargs -0 sha256sum"


# ---- durability ------------------------------------------------------------------------------

def checksums(out: str) -> dict[str, str]:
    """sha256sum's output as {path: sum}."""
    return {line.split(None, 1)[1].removeprefix("./"): line.split()[0]
            for line in out.splitlines()}


def test_300_small_files_and_200mb_survive_an_immediate_destroy(a, server):
    ws = scope("bulk")
    sb = a.create(ws)
    assert sb["workspace_id"].startswith("wsp_")
    # Checksums taken while writing, so that the destroy follows the last close at once.
    out = a.sh(sb["vm_id"], """python3 - <<'EOF'
import hashlib, os
def put(path, chunks):
    h = hashlib.sha256()
    with open(path, 'wb') as f:
        for c in chunks:
            f.write(c)
            h.update(c)
    print(h.hexdigest(), path)
for i in range(300):
    d = 'small/sub' if i % 3 == 0 else 'small'
    os.makedirs(d, exist_ok=True)
    put(f'{d}/f{i:03}.bin', [os.urandom(1 + i * 37 % 5000)])
with open('/dev/urandom', 'rb') as r:
    put('big.bin', (r.read(1 << 20) for _ in range(200)))
EOF""").stdout
    before = checksums(out)
    assert len(before) == 301
    dirty = dirty_files(server)
    t0 = time.monotonic()
    a.destroy(sb["vm_id"])
    print(f"destroy with {dirty} files (of 301, 200 MiB) not yet uploaded: "
          f"{time.monotonic() - t0:.1f} s")
    assert dirty > 0, "everything was uploaded before the destroy: the test proves nothing"

    again = a.create(ws)
    assert again["workspace_id"] == sb["workspace_id"]
    assert checksums(a.sh(again["vm_id"], SUMS).stdout) == before
    assert a.sh(again["vm_id"], "stat -c %s big.bin").stdout == f"{200 << 20}\n"
    a.destroy(again["vm_id"])
    usage = a.ws(sb["workspace_id"], "/usage").json()
    assert usage["file_count"] >= 301 and usage["bytes_used"] > 200 << 20


def test_mtimes_symlinks_dirs_survive_and_a_new_workspace_has_dotfiles(a):
    ws = scope("meta")
    sb = a.create(ws)
    vm = sb["vm_id"]
    # A new workspace starts with the template's dotfiles.
    dot = a.sh(vm, "ls -A; cat .bashrc | wc -c").stdout.split()
    assert ".bashrc" in dot and ".profile" in dot and int(dot[-1]) > 0
    a.sh(vm, "mkdir -p d1/d2/d3 empty/inner && echo deep > d1/d2/d3/f.txt && echo top > t.txt"
             " && touch -m -d '2020-01-02 03:04:05 UTC' t.txt && ln -s d1/d2/d3/f.txt link"
             " && ln -s /etc/hostname abs && chmod 0444 t.txt")
    stat = "stat -c '%n %Y %s' t.txt d1/d2/d3/f.txt"
    before = a.sh(vm, stat).stdout
    assert "t.txt 1577934245 4" in before
    a.destroy(vm)

    listing = {f["path"]: f for f in a.files(sb["workspace_id"])}
    assert listing["link"]["type"] == "symlink" and listing["t.txt"]["type"] == "file"
    assert {".bashrc", ".profile", "d1/d2/d3/f.txt"} <= set(listing)

    vm = a.create(ws)["vm_id"]
    assert a.sh(vm, stat).stdout == before
    r = a.sh(vm, "cat link; readlink link abs; test -L link && echo is-link")
    assert r.stdout == "deep\nd1/d2/d3/f.txt\n/etc/hostname\nis-link\n"
    # Modes are not stored: every file and directory is 0700 and the user's.
    modes = a.sh(vm, "stat -c '%a %U' t.txt d1 d1/d2/d3 d1/d2/d3/f.txt").stdout.split("\n")[:-1]
    assert modes == ["700 user"] * 4
    # Empty directories are not kept.
    assert a.sh(vm, "ls").stdout.split() == ["abs", "d1", "link", "t.txt"]
    assert a.sh(vm, "test -e empty", check=False).exit_code != 0
    a.destroy(vm)


def test_without_a_workspace_the_home_is_ephemeral(a):
    sb = a.create(None)
    assert sb["workspace_id"] is None
    assert a.http.get(f"/v1/sandboxes/{sb['vm_id']}").json()["workspace_id"] is None
    a.sh(sb["vm_id"], "echo gone > ephemeral.txt")
    a.destroy(sb["vm_id"])
    sb2 = a.create(False)
    assert sb2["workspace_id"] is None
    assert a.sh(sb2["vm_id"], "test -e ephemeral.txt", check=False).exit_code != 0
    a.destroy(sb2["vm_id"])


# ---- presigned URLs ------------------------------------------------------------------------

def test_presigned_put_get_and_expiry(a, tmp_path):
    ws = scope("presign")
    sb = a.create(ws)
    wid = sb["workspace_id"]
    inside = a.sh(sb["vm_id"], "mkdir -p out && head -c 300000 /dev/urandom > out/blob.bin"
                               " && sha256sum < out/blob.bin").stdout.split()[0]
    a.destroy(sb["vm_id"])

    # GET of a file written inside: its bytes, with plain curl.
    r = a.presign(wid, "out/blob.bin", "GET", 600)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["method"] == "GET"
    expires = datetime.fromisoformat(got["expires_at"])
    assert 500 < (expires - datetime.now(timezone.utc)).total_seconds() <= 601
    status, body = curl(got["url"])
    assert status == 200 and len(body) == 300000 and sha256(body) == inside

    # GET of a missing file: 404, no URL.
    r = a.presign(wid, "out/missing.bin", "GET")
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"

    # PUT with plain curl, then there inside a new sandbox.
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(123457))
    r = a.presign(wid, "in/deeper/up.bin", "PUT", 600)
    assert r.status_code == 200, r.text
    status, body = curl("-T", str(src), r.json()["url"])
    assert status == 200, body
    vm = a.create(ws)["vm_id"]
    assert a.sh(vm, "sha256sum < in/deeper/up.bin").stdout.split()[0] == sha256(src.read_bytes())
    a.destroy(vm)

    # Expired: refused by the S3 server, for GET and PUT alike.
    get1 = a.presign(wid, "out/blob.bin", "GET", 1).json()["url"]
    put1 = a.presign(wid, "out/blob.bin", "PUT", 1).json()["url"]
    time.sleep(2)
    status, body = curl(get1)
    assert status in (400, 403) and b"AccessDenied" in body, (status, body[:300])
    status, body = curl("-T", str(src), put1)
    assert status in (400, 403) and b"AccessDenied" in body, (status, body[:300])
    status, body = curl(a.presign(wid, "out/blob.bin").json()["url"])
    assert status == 200 and sha256(body) == inside  # the refused PUT changed nothing

    # A URL is for its one object: a changed key does not pass the signature.
    url = a.presign(wid, "out/blob.bin").json()["url"]
    status, _ = curl(url.replace("out/blob.bin", "in/deeper/up.bin"))
    assert status in (400, 403)

    r = a.presign(wid, "../other/x", "PUT")
    assert r.status_code == 400 and r.json()["error"]["field"] == "path"


# ---- REST ------------------------------------------------------------------------------------

def test_rest_listing_usage_deletes_and_owner_only(a, b):
    ws = scope("rest")
    sb = a.create(ws)
    wid = sb["workspace_id"]
    a.sh(sb["vm_id"], "mkdir -p p/q && for i in 1 2 3 4 5; do printf %0${i}d 0 > p/f$i.txt; done"
                      " && echo xyz > p/q/deep.txt && echo other > other.txt")
    row = a.ws(wid).json()
    assert row["mounted"] is True
    r = a.http.delete(f"/v1/workspaces/{wid}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "workspace_in_use"
    a.destroy(sb["vm_id"])

    # Paged: limit 2, following next_cursor; every file once, in order.
    pages, seen, cursor = 0, [], None
    while True:
        q = {"prefix": "p/", "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = a.http.get(f"/v1/workspaces/{wid}/files", params=q).json()
        pages += 1
        assert len(page["files"]) <= 2
        seen += page["files"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages >= 3
    assert [f["path"] for f in seen] == [f"p/f{i}.txt" for i in range(1, 6)] + ["p/q/deep.txt"]
    assert [f["size"] for f in seen] == [1, 2, 3, 4, 5, 4]
    assert all(f["type"] == "file" for f in seen)

    everything = a.files(wid)
    assert "other.txt" in {f["path"] for f in everything}
    usage = a.ws(wid, "/usage").json()
    assert usage["workspace_id"] == wid
    assert usage["file_count"] == len(everything)
    assert usage["bytes_used"] == sum(f["size"] for f in everything)
    mine = [f for f in everything if not f["path"].startswith(".")]
    assert (len(mine), sum(f["size"] for f in mine)) == (7, 15 + 4 + 6)
    assert usage["user_bytes_used"] >= usage["bytes_used"]
    assert usage["quota_bytes"] == 10240 * 1024 * 1024
    listed = {w["workspace_id"]: w for w in a.http.get("/v1/workspaces").json()["workspaces"]}
    row = listed[wid]
    assert (row["app_id"], row["capset_id"], row["end_user_id"]) == (ws["app_id"], "default", None)
    assert row["mounted"] is False
    assert (row["bytes_used"], row["file_count"]) == (usage["bytes_used"], usage["file_count"])
    assert row["usage_at"] and row["last_used_at"] and row["created_at"]

    # Another user: 404 on every route, and nothing changes.
    for method, sub, kw in [("GET", "", {}), ("GET", "/usage", {}), ("GET", "/files", {}),
                            ("POST", "/files/presign", {"json": {"path": "other.txt",
                                                                 "method": "GET"}}),
                            ("POST", "/files/presign", {"json": {"path": "new.txt",
                                                                 "method": "PUT"}}),
                            ("DELETE", "/files", {"params": {"path": "other.txt"}}),
                            ("DELETE", "", {})]:
        r = b.http.request(method, f"/v1/workspaces/{wid}{sub}", **kw)
        assert r.status_code == 404, (method, sub, r.text)
        assert r.json()["error"]["code"] == "workspace_not_found"
    assert wid not in {w["workspace_id"] for w in b.http.get("/v1/workspaces").json()["workspaces"]}
    assert a.files(wid) == everything

    # Delete one file: gone inside the next sandbox, the rest stays.
    r = a.http.delete(f"/v1/workspaces/{wid}/files", params={"path": "p/f1.txt"})
    assert r.status_code == 204, r.text
    r = a.http.delete(f"/v1/workspaces/{wid}/files", params={"path": "p/f1.txt"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"
    vm = a.create(ws)["vm_id"]
    assert a.sh(vm, "test -e p/f1.txt", check=False).exit_code != 0
    assert a.sh(vm, "cat p/f5.txt p/q/deep.txt").stdout == "00000xyz\n"
    r = a.http.delete(f"/v1/workspaces/{wid}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "workspace_in_use"
    a.destroy(vm)

    r = a.http.delete(f"/v1/workspaces/{wid}")
    assert r.status_code == 204, r.text
    for sub in ("", "/usage", "/files"):
        r = a.ws(wid, sub)
        assert r.status_code == 404 and r.json()["error"]["code"] == "workspace_not_found"
    assert wid not in {w["workspace_id"] for w in a.http.get("/v1/workspaces").json()["workspaces"]}
    # The same scope again: a new, empty workspace (the template's dotfiles only).
    sb = a.create(ws)
    assert sb["workspace_id"] != wid
    assert a.sh(sb["vm_id"], "ls; test -s .bashrc").stdout == ""
    a.destroy(sb["vm_id"])


# ---- scope -----------------------------------------------------------------------------------

def test_scopes_are_separate(a, b):
    app = f"shared-{uuid.uuid4().hex[:8]}"
    base = {"app_id": app, "capset_id": "tools"}
    sa = a.create(base)
    a.sh(sa["vm_id"], "echo alice > owner.txt")
    a.destroy(sa["vm_id"])

    sb = b.create(base)
    assert sb["workspace_id"] != sa["workspace_id"]
    assert b.sh(sb["vm_id"], "test -e owner.txt", check=False).exit_code != 0
    b.sh(sb["vm_id"], "echo bob > owner.txt")
    b.destroy(sb["vm_id"])
    # Bob's write went to his workspace, not alice's.
    status, body = curl(a.presign(sa["workspace_id"], "owner.txt").json()["url"])
    assert (status, body) == (200, b"alice\n")
    status, body = curl(b.presign(sb["workspace_id"], "owner.txt").json()["url"])
    assert (status, body) == (200, b"bob\n")

    others = [a.create({"app_id": app, "capset_id": "other"}),
              a.create({**base, "end_user_id": "customer-1"})]
    ids = {sa["workspace_id"], sb["workspace_id"]} | {s["workspace_id"] for s in others}
    assert len(ids) == 4
    for s in others:
        assert a.sh(s["vm_id"], "test -e owner.txt", check=False).exit_code != 0
        a.destroy(s["vm_id"])
    mine = a.http.get("/v1/workspaces", params={"end_user_id": "customer-1"}).json()["workspaces"]
    assert [(w["workspace_id"], w["end_user_id"], w["app_id"], w["capset_id"]) for w in mine] == \
        [(others[1]["workspace_id"], "customer-1", app, "tools")]


BAD_NAMES = ["..", ".", "a/b", "a%2Fb", "\uff41pp", "app\u200b", "caf\u00e9", "", "x" * 10240,
             "a\x00b", "-lead"]


@pytest.mark.parametrize("field", ["app_id", "capset_id", "end_user_id"])
def test_bad_scope_names_are_refused(a, field):
    for name in BAD_NAMES:
        r = a.http.post("/v1/sandboxes", json={"template": "standard",
                                                "workspace": {field: name}})
        if r.status_code == 201:
            a.made.append(r.json()["vm_id"])
        assert r.status_code == 400, (name[:20], r.text)
        assert r.json()["error"]["field"] == f"workspace.{field}", (name[:20], r.text)
    r = a.http.get("/v1/workspaces", params={"end_user_id": "a/b"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "end_user_id"


@pytest.fixture(scope="module")
def kept_workspace(server, keys):
    """A workspace of alice's holding one file, not mounted."""
    u = As(server.url, keys["alice"])
    sb = u.create(scope("kept"))
    u.sh(sb["vm_id"], "mkdir -p a && echo kept > a/b.txt")
    u.destroy(sb["vm_id"])
    u.close()
    return sb["workspace_id"]


BAD_PATHS = ["../x", "/etc/passwd", "a/../../b", "a//b", ".", "..", "a/./b", "a/", "a\x00b",
             "a\\..\\b", "x" * 2000]


def test_bad_paths_are_refused(a, kept_workspace):
    wid = kept_workspace
    for path in BAD_PATHS:
        for method in ("GET", "PUT"):
            r = a.presign(wid, path, method)
            assert r.status_code == 400, (path[:20], method, r.text)
            assert r.json()["error"]["field"] == "path", (path[:20], r.text)
        r = a.http.delete(f"/v1/workspaces/{wid}/files", params={"path": path})
        assert r.status_code == 400, (path[:20], r.text)
        assert r.json()["error"]["field"] == "path"
        r = a.http.get(f"/v1/workspaces/{wid}/files", params={"cursor": path})
        assert r.status_code == 400 and r.json()["error"]["field"] == "cursor", (path[:20], r.text)
    for prefix in ["../", "..", "/", "/etc", "a/../../", "a//", "./", "a\x00"]:
        r = a.http.get(f"/v1/workspaces/{wid}/files", params={"prefix": prefix})
        assert r.status_code == 400 and r.json()["error"]["field"] == "prefix", (prefix, r.text)
    # What is allowed still works, and nothing was deleted.
    assert [f["path"] for f in a.files(wid, prefix="a/")] == ["a/b.txt"]
    # (a bare ".." is resolved by the client itself: /v1/workspaces/../usage is /v1/usage, the
    # caller's own billing usage, so only forms that reach the server as an id are tried)
    for wid_bad in ["..%2F..", "%2e%2e", "wsp_x%2F..%2F", "..%2Fusage"]:
        r = a.http.get(f"/v1/workspaces/{wid_bad}/usage")
        assert r.status_code == 404, (wid_bad, r.text)


# ---- two sandboxes at once -------------------------------------------------------------------
# Documented: a file written and closed in one sandbox shows in another on the same workspace
# within about 15 s (2 s write-back after close, the upload, 10 s directory cache); polled up to
# 40 s. Every content seen on the way must be one that was written.

def poll_until(a: As, vm: str, cmd: str, want: str, timeout: float = 40) -> tuple[float, set]:
    """Run `cmd` in `vm` until it prints `want`: how long that took, and every output seen."""
    seen, t0 = set(), time.monotonic()

    def check():
        r = a.sh(vm, cmd, check=False)
        seen.add(r.stdout if r.exit_code == 0 else None)
        return r.exit_code == 0 and r.stdout == want
    try:
        wait_for(check, timeout=timeout, interval=0.5)
    except AssertionError:
        raise AssertionError(f"{want!r} not seen in {timeout:.0f} s; seen: {seen}") from None
    return time.monotonic() - t0, seen


@pytest.fixture
def two_on_one(a):
    ws = scope("twice")
    first, second = a.create(ws), a.create(ws)
    assert first["workspace_id"] == second["workspace_id"]
    assert a.ws(first["workspace_id"]).json()["mounted"] is True
    return first["vm_id"], second["vm_id"]


def test_a_file_closed_in_one_sandbox_shows_in_the_other(a, two_on_one):
    va, vb = two_on_one
    assert a.sh(vb, "cat shared.txt", check=False).exit_code != 0
    a.sh(va, "mkdir -p sub && echo one > shared.txt && seq 100000 > sub/numbers.txt")
    took, seen = poll_until(a, vb, "cat shared.txt", "one\n")
    print(f"B saw A's new file after {took:.1f} s")
    assert seen <= {None, "one\n"}
    numbers = "".join(f"{i}\n" for i in range(1, 100001))
    assert a.sh(vb, "cat sub/numbers.txt").stdout == numbers


@pytest.mark.xfail(strict=True, reason="product bug: a sandbox that already has a file never sees "
                   "another sandbox's overwrite of it by open/read/stat (not in 40 s; its rclone "
                   "mount refreshes the file only when the directory is listed)")
def test_an_overwrite_shows_in_the_sandbox_that_had_the_file(a, two_on_one):
    va, vb = two_on_one
    a.sh(va, "echo one > shared.txt")
    poll_until(a, vb, "cat shared.txt", "one\n")
    a.sh(vb, "echo two > shared.txt")  # same size, newer
    took, seen = poll_until(a, va, "cat shared.txt", "two\n")
    print(f"A saw B's overwrite after {took:.1f} s")
    assert seen <= {"one\n", "two\n"}


def test_a_listed_overwrite_shows_in_the_sandbox_that_had_the_file(a, two_on_one):
    """With a listing before each read, another sandbox's overwrite shows within the directory
    cache's time. On the way, a read may also return NUL bytes of the new length (seen now and
    then: docs/workspaces.md says so); that is printed, not asserted, as it does not always
    happen."""
    va, vb = two_on_one
    a.sh(va, "echo one > shared.txt")
    poll_until(a, vb, "cat shared.txt", "one\n")
    a.sh(vb, "echo two > shared.txt")
    took, seen = poll_until(a, va, "ls >/dev/null; cat shared.txt", "two\n")
    print(f"A saw B's overwrite after {took:.1f} s (listing before each read); seen: {seen}")


def test_both_sandboxes_writes_are_kept_after_both_end(a, two_on_one):
    va, vb = two_on_one
    wid = a.http.get(f"/v1/sandboxes/{va}").json()["workspace_id"]
    a.sh(va, "echo from-a > a.txt")
    a.sh(vb, "echo from-b > b.txt")
    a.destroy(va)
    a.destroy(vb)
    assert not a.ws(wid).json()["mounted"]
    vm = a.create({"app_id": a.ws(wid).json()["app_id"]})["vm_id"]
    assert a.sh(vm, "cat a.txt b.txt").stdout == "from-a\nfrom-b\n"


# ---- at rest ---------------------------------------------------------------------------------

def test_objects_are_not_plaintext_at_rest(a, server):
    marker = f"E2A-PLAINTEXT-MARKER-{uuid.uuid4().hex}"
    sb = a.create(True)  # the default scope
    wid = sb["workspace_id"]
    row = a.ws(wid).json()
    assert (row["app_id"], row["capset_id"], row["end_user_id"]) == ("default", "default", None)
    a.sh(sb["vm_id"], f"for i in $(seq 100); do echo {marker}; done > secret-note.txt")
    a.destroy(sb["vm_id"])

    store = server.base / "data" / "s3"
    assert list(store.rglob("secret-note.txt*")), "the object is not where the test looks"
    found = subprocess.run(["grep", "-r", "-a", "-l", marker, str(store)], capture_output=True)
    assert found.returncode == 1, f"plaintext found in {found.stdout.decode()}"
    status, body = curl(a.presign(wid, "secret-note.txt").json()["url"])
    assert status == 200 and body == (marker + "\n").encode() * 100


# ---- own servers: quota and crashes ------------------------------------------------------------

def leaves_nothing(srv, user: As) -> None:
    for vm_id in user.made:
        if user.http.get(f"/v1/sandboxes/{vm_id}").json()["state"] != "destroyed":
            user.destroy(vm_id)
    user.close()
    srv.stop()
    leftovers = srv.host_objects()
    assert not any(leftovers.values()), f"host objects left behind: {leftovers}"


def test_quota_write_past_it_fails_with_enospc_and_keeps_what_is_stored():
    with own_server("ws", E2A_WORKSPACE_QUOTA_MIB="64") as srv:
        srv.start()
        u = As(srv.url, srv.create_user("quota@example.com"))
        ws = scope("quota")
        sb = u.create(ws)
        vm = sb["vm_id"]
        first = u.sh(vm, "head -c 40M /dev/urandom > first.bin && sha256sum < first.bin"
                         ).stdout.split()[0]
        r = u.sh(vm, "head -c 40M /dev/urandom > second.bin", check=False)
        assert r.exit_code != 0, "40 MiB more than a 64 MiB quota was accepted"
        assert "No space left on device" in r.stderr, r.stderr
        assert u.sh(vm, "echo still here").stdout == "still here\n"
        assert u.sh(vm, "sha256sum < first.bin").stdout.split()[0] == first
        assert u.ws(sb["workspace_id"], "/usage").json()["quota_bytes"] == 64 * 1024 * 1024
        u.destroy(vm)

        vm = u.create(ws)["vm_id"]
        assert u.sh(vm, "sha256sum < first.bin").stdout.split()[0] == first
        u.destroy(vm)
        leaves_nothing(srv, u)


def mount_pids(srv) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-f", f"rclone mount .*{srv.base}/"],
                                           capture_output=True, text=True).stdout.split()]


def dirty_files(srv) -> int:
    """Files the server's mounts have written to their cache but not uploaded (rclone's
    metadata, workspaces/mount.py)."""
    n = 0
    for meta in (srv.base / "data" / "sandboxes").glob("*/workspace-meta"):
        for f in meta.rglob("*"):
            try:
                n += bool(f.is_file() and json.loads(f.read_text()).get("Dirty"))
            except ValueError:
                continue
    return n


# Files with contents the host can compute too: the big one first, then 50 small ones, so that
# when the command returns most of them are still in the cache, not yet uploaded.
CRASH_FILES = {"w/big.bin": 20 << 20, **{f"w/x/f{i:02}": i * 997 for i in range(1, 51)}}
WRITE = f"""python3 - <<'EOF'
import hashlib, os
os.makedirs('w/x', exist_ok=True)
for p, n in {CRASH_FILES!r}.items():
    with open(p, 'wb') as f:
        f.write(hashlib.shake_256(p.encode()).digest(n))
EOF"""
EXPECTED = {p: sha256(hashlib.shake_256(p.encode()).digest(n)) for p, n in CRASH_FILES.items()}


def sums(user: As, vm: str) -> dict[str, str]:
    out = user.sh(vm, "sha256sum " + " ".join(CRASH_FILES)).stdout
    return {line.split()[1]: line.split()[0] for line in out.splitlines()}


def test_sigkill_of_server_and_mounts_loses_nothing():
    with own_server("ws") as srv:
        srv.start()
        u = As(srv.url, srv.create_user("crash@example.com"))
        ws = scope("crash")
        sb = u.create(ws)
        u.sh(sb["vm_id"], WRITE)
        mounts = mount_pids(srv)
        srv.kill9()
        for pid in mounts:
            os.kill(pid, signal.SIGKILL)
        assert mounts, "no rclone mount found for the sandbox"
        dirty = dirty_files(srv)
        assert dirty > 0, "everything was uploaded before the kill: the test proves nothing"
        print(f"{dirty} files not uploaded when e2a and the mount were killed")

        srv.start()
        old = wait_for(lambda: (r := u.http.get(f"/v1/sandboxes/{sb['vm_id']}").json())
                       ["state"] == "destroyed" and r, timeout=120)
        assert old["end_reason"] == "server_restart"
        vm = u.create(ws)["vm_id"]
        assert sums(u, vm) == EXPECTED
        u.destroy(vm)
        leaves_nothing(srv, u)


def test_sigkill_of_the_server_alone_keeps_the_sandbox_and_its_home():
    with own_server("ws") as srv:
        srv.start()
        u = As(srv.url, srv.create_user("crash2@example.com"))
        sb = u.create(scope("crash2"))
        vm, wid = sb["vm_id"], sb["workspace_id"]
        u.sh(vm, WRITE)
        mounts = mount_pids(srv)
        srv.kill9()
        assert mounts and mount_pids(srv) == mounts
        srv.start()
        assert u.http.get(f"/v1/sandboxes/{vm}").json()["state"] == "running"
        assert mount_pids(srv) == mounts
        assert sums(u, vm) == EXPECTED
        u.sh(vm, "echo after > after.txt")
        assert u.ws(wid).json()["mounted"] is True
        u.destroy(vm)
        listing = {f["path"]: f["size"] for f in u.files(wid)}
        assert {p: listing.get(p) for p in CRASH_FILES} == CRASH_FILES
        assert listing.get("after.txt") == 6
        status, body = curl(u.presign(wid, "w/big.bin").json()["url"])
        assert status == 200 and sha256(body) == EXPECTED["w/big.bin"]
        leaves_nothing(srv, u)

