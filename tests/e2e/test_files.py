"""Files: streamed binary round trips, directory operations, tar up and down, unsafe paths."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pytest

from e2a.sdk import E2AError


def test_50mb_binary_round_trip(alice, sandbox, tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(50 * 1024 * 1024))
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    alice.files.write(sandbox.vm_id, "data/blob.bin", src)
    inside = alice.run(sandbox.vm_id, "sha256sum data/blob.bin").stdout.split()[0]
    assert inside == want
    dst = tmp_path / "back.bin"
    n = alice.files.read_to(sandbox.vm_id, "/home/user/data/blob.bin", dst)
    assert n == 50 * 1024 * 1024
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == want


def test_write_creates_parents_owned_by_user(alice, sandbox):
    alice.files.write(sandbox.vm_id, "a/b/c/note.txt", b"\x00\x01binary\xff")
    assert alice.files.read_bytes(sandbox.vm_id, "a/b/c/note.txt") == b"\x00\x01binary\xff"
    owners = alice.run(sandbox.vm_id, "stat -c %U a a/b/c a/b/c/note.txt").stdout.split()
    assert owners == ["user", "user", "user"]


def test_list_stat_mkdir_rename_remove(alice, sandbox):
    f = alice.files
    f.mkdir(sandbox.vm_id, "proj/src")
    f.write(sandbox.vm_id, "proj/src/main.py", b"print(1)\n", mode="0755")
    entries = {e.name: e for e in f.list(sandbox.vm_id, "proj")}
    assert entries["src"].type == "dir"
    st = f.stat(sandbox.vm_id, "proj/src/main.py")
    assert (st.type, st.size, st.mode) == ("file", 9, "0755")
    assert st.mtime
    f.rename(sandbox.vm_id, "proj/src/main.py", "proj/app.py")
    assert not f.exists(sandbox.vm_id, "proj/src/main.py")
    assert f.read_bytes(sandbox.vm_id, "proj/app.py") == b"print(1)\n"
    with pytest.raises(E2AError) as e:
        f.remove(sandbox.vm_id, "proj")
    assert e.value.status == 409
    f.remove(sandbox.vm_id, "proj", recursive=True)
    assert not f.exists(sandbox.vm_id, "proj")
    with pytest.raises(E2AError) as e:
        f.read_bytes(sandbox.vm_id, "proj/app.py")
    assert e.value.status == 404
    with pytest.raises(E2AError) as e:
        f.read_bytes(sandbox.vm_id, "/etc")
    assert e.value.status == 400 and e.value.code == "is_directory"


def test_tar_download_and_upload(alice, sandbox, tmp_path):
    alice.run(sandbox.vm_id, "mkdir -p t/sub && echo one > t/one.txt && echo two > t/sub/two.txt "
              "&& ln -s one.txt t/link")
    out = tmp_path / "t.tar"
    alice.files.download_tar(sandbox.vm_id, "t", out)
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        assert {"one.txt", "sub/two.txt", "link"} <= {n.removeprefix("./") for n in names}
    res = alice.files.upload_tar(sandbox.vm_id, out, "copy")
    assert res["files"] >= 2
    r = alice.run(sandbox.vm_id, "cat copy/one.txt copy/sub/two.txt; readlink copy/link")
    assert r.stdout == "one\ntwo\none.txt\n"


def _tar_with(name: str, linkname: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        if linkname is not None:
            info.type, info.linkname = tarfile.SYMTYPE, linkname
            tar.addfile(info)
        else:
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    return buf.getvalue()


@pytest.mark.parametrize("name", ["../escape.txt", "/abs.txt", "ok/../../escape.txt"])
def test_tar_entries_that_escape_are_refused(alice, sandbox, name):
    with pytest.raises(E2AError) as e:
        alice.files.upload_tar(sandbox.vm_id, _tar_with(name), "target")
    assert e.value.status == 400 and e.value.code == "unsafe_path"
    assert not alice.files.exists(sandbox.vm_id, "escape.txt")
    assert not alice.files.exists(sandbox.vm_id, "/abs.txt")


def test_tar_cannot_write_through_a_symlink(alice, sandbox):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "/tmp"
        tar.addfile(link)
        f = tarfile.TarInfo("link/owned.txt")
        f.size = 3
        tar.addfile(f, io.BytesIO(b"bad"))
    with pytest.raises(E2AError) as e:
        alice.files.upload_tar(sandbox.vm_id, buf.getvalue(), "target2")
    assert e.value.status == 400
    assert not alice.files.exists(sandbox.vm_id, "/tmp/owned.txt")


def test_paths_with_nul_are_refused(http, sandbox):
    r = http.get(f"/v1/sandboxes/{sandbox.vm_id}/files", params={"path": "a\x00b"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_path"
    r = http.get(f"/v1/sandboxes/{sandbox.vm_id}/files", params={})
    assert r.status_code == 400 and r.json()["error"]["field"] == "path"


def _rss_peak_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_1gib_streams_through_without_buffering(alice, sandbox, server):
    """1 GiB up and down with checksums; the server's peak memory grows by far less."""
    size, chunk = 1 << 30, os.urandom(1 << 20)
    want = hashlib.sha256()

    def source():
        for _ in range(size // len(chunk)):
            want.update(chunk)
            yield chunk

    peak_before = _rss_peak_kib(server.proc.pid)
    alice.files.write(sandbox.vm_id, "/tmp/big.bin", source())
    got = hashlib.sha256()

    class Sink:
        def write(self, b):
            got.update(b)
            return len(b)

    n = alice.files.read_to(sandbox.vm_id, "/tmp/big.bin", Sink())
    assert n == size
    assert got.hexdigest() == want.hexdigest()
    grown_mib = (_rss_peak_kib(server.proc.pid) - peak_before) / 1024
    assert grown_mib < 128, f"server peak memory grew {grown_mib:.0f} MiB for a 1 GiB transfer"
    alice.files.remove(sandbox.vm_id, "/tmp/big.bin")
