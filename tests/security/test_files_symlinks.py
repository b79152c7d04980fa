"""The files API acts with the rights of the user a call names (default `user`), so a symlink
that sandbox code planted leads nowhere that user could not go; `user=root` can still do what
root may in the tenant's own sandbox. And envd's own /proc entries are never served (they
answered 502, or worse, the agent's environment).

Each symlink is planted as `user`, as code running in the sandbox would."""

from __future__ import annotations

import concurrent.futures
import io
import tarfile

import pytest

ETC_FILES = ("x", "evil.txt", "newdir", "from-root.txt")


@pytest.fixture(scope="module")
def sb(alice):
    s = alice.create_sandbox("standard", idle_timeout_seconds=600)
    r = alice.run(s.vm_id, "mkdir -p ~/proj && ln -s /etc ~/proj/cfg && "
                           "ln -s /etc/shadow ~/report.txt && ln -s /proc/1 ~/agent && id -u")
    assert r.exit_code == 0 and r.stdout == "1000\n", r
    yield s
    alice.kill(s.vm_id)


@pytest.fixture
def files(http, sb):
    base = f"/v1/sandboxes/{sb.vm_id}/files"

    def call(method: str, route: str = "", **kw):
        return http.request(method, base + route, **kw)
    return call


def root_sees(alice, sb, cmd: str) -> str:
    return alice.run(sb.vm_id, cmd, user="root").stdout


def refused(r) -> bool:
    if r.status_code == 404:
        return True
    return r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"


def tar_of(**members: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def etc_untouched(alice, sb) -> None:
    out = root_sees(alice, sb, "cd /etc && ls -d " + " ".join(ETC_FILES) + " 2>/dev/null; "
                    "test -f /etc/hostname && echo hostname-kept")
    assert out == "hostname-kept\n", out


def test_write_through_a_planted_symlink_is_refused(alice, sb, files):
    r = files("PUT", params={"path": "proj/cfg/x"}, content=b"pwned")
    assert refused(r), r.text
    r = files("POST", "/mkdir", json={"path": "proj/cfg/newdir"})
    assert refused(r), r.text
    r = files("PUT", "/tar", params={"path": "proj/cfg"}, content=tar_of(**{"evil.txt": b"x"}))
    assert refused(r), r.text
    r = files("POST", "/rename", json={"from": "proj/cfg/hostname", "to": "stolen"})
    assert refused(r), r.text
    r = files("DELETE", params={"path": "proj/cfg/hostname"})
    assert refused(r), r.text
    etc_untouched(alice, sb)


def test_read_through_a_planted_symlink_is_refused(files):
    r = files("GET", params={"path": "report.txt"})
    assert refused(r), r.text
    assert b"root:" not in r.content
    # A tar of the linked directory holds what `user` may read, and not /etc/shadow.
    r = files("GET", "/tar", params={"path": "proj/cfg"})
    assert r.status_code == 200
    names = set(tarfile.open(fileobj=io.BytesIO(r.content)).getnames())
    assert "hostname" in names and "shadow" not in names


def test_every_route_takes_the_user(files):
    # /root is root's (0700): listed, stat'ed, read, tarred only with user=root.
    for route, params in (("/list", {"path": "/root"}), ("/stat", {"path": "/root/.bashrc"}),
                          ("", {"path": "/root/.bashrc"}), ("/tar", {"path": "/root"})):
        assert refused(files("GET", route, params=params)), route
        r = files("GET", route, params={**params, "user": "root"})
        assert r.status_code == 200, (route, r.text)
    r = files("POST", "/mkdir", json={"path": "/root/made", "user": "root"})
    assert r.status_code == 200, r.text
    r = files("POST", "/rename", json={"from": "/root/made", "to": "/root/moved", "user": "root"})
    assert r.status_code == 200, r.text
    assert refused(files("DELETE", params={"path": "/root/moved"}))
    assert files("DELETE", params={"path": "/root/moved", "user": "root"}).status_code == 204


def test_concurrent_users_keep_their_own_rights(alice, sb, files):
    # envd switches one thread at a time to the user's ids (gVisor keeps credentials per
    # thread): under concurrency each call still gets exactly its own user's rights...
    def read(i: int) -> tuple[str | None, int]:
        user = "root" if i % 2 else None
        params = {"path": "/etc/shadow", **({"user": user} if user else {})}
        return user, files("GET", params=params).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for user, status in pool.map(read, range(40)):
            assert status == (200 if user == "root" else 403), (user, status)
    # ...and every thread of envd is root again afterwards.
    out = root_sees(alice, sb, "cat /proc/1/task/*/status | grep -E '^(Uid|Gid|Groups):'")
    lines = out.splitlines()
    assert lines and all(line.split()[1:] in (["0"] * 4, ["0"], []) for line in lines), out
    assert sum(line.startswith("Uid:") for line in lines) > 1  # several threads were looked at


def test_root_may_still_follow_the_links(alice, sb, files):
    r = files("GET", params={"path": "/home/user/report.txt", "user": "root"})
    assert r.status_code == 200 and r.content.startswith(b"root:")
    r = files("PUT", params={"path": "/home/user/proj/cfg/from-root.txt", "user": "root"},
              content=b"root may")
    assert r.status_code == 200, r.text
    r = files("PUT", "/tar", params={"path": "/home/user/proj/cfg", "user": "root"},
              content=tar_of(**{"evil.txt": b"root may"}))
    assert r.status_code == 200, r.text
    assert root_sees(alice, sb, "cat /etc/from-root.txt /etc/evil.txt; stat -c %U /etc/evil.txt"
                     ) == "root mayroot mayroot\n"
    alice.run(sb.vm_id, "rm -f /etc/from-root.txt /etc/evil.txt", user="root")
    etc_untouched(alice, sb)


@pytest.mark.parametrize("user", [None, "root"])
@pytest.mark.parametrize("path", ["/proc/1/environ", "/proc/self/environ", "/proc/1/mem",
                                  "/proc/1/task/1/environ", "agent/environ",
                                  "/home/user/agent/environ"])
def test_envds_proc_files_answer_403_not_502(files, path, user):
    params = {"path": path, **({"user": user} if user else {})}
    r = files("GET", params=params)
    if path.startswith("agent") and user == "root":
        assert r.status_code == 404  # relative to /root for root: no such link there
        return
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "permission_denied" and r.json()["error"]["message"]


def test_proc_files_read_like_files(files):
    # They say size 0; announcing Content-Length: 0 broke the connection (502) before.
    r = files("GET", params={"path": "/proc/meminfo"})
    assert r.status_code == 200 and b"MemTotal" in r.content
    r = files("GET", params={"path": "/proc/self/status", "user": "root"})
    assert r.status_code == 403  # envd's own, whoever asks
    r = files("GET", "/tar", params={"path": "/home/user/agent", "user": "root"})
    assert r.status_code == 403, r.text
