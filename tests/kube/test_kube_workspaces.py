"""Workspaces on the Kubernetes backend: the node agent (`e2a node-agent`, here a host process
of the test cluster's one node, as a node's service would be) mounts the workspace with rclone
from a real S3 server, the pod binds it as /home/user, and its teardown uploads every file
before the sandbox is destroyed. The same contract as the embedded backend's
(tests/e2e/test_workspaces.py): durable across sandboxes, seeded with the template's dotfiles,
limited by the quota, and the S3 keys never in the sandbox."""

from __future__ import annotations

import os
import secrets
import subprocess
import time

import httpx
import pytest

from e2a.ids import new_id
from tests.e2e.test_workspaces import As, scope
from tests.kube.cluster import WS_QUOTA_MIB as QUOTA_MIB, agent_mounts, fuse_mounts

pytestmark = pytest.mark.kube



@pytest.fixture
def a(wserver):
    user = As(wserver.url, wserver.create_user(f"ws{secrets.token_hex(4)}@example.com"))
    yield user
    user.close()


def test_a_workspace_outlives_its_pod_and_is_mounted_again(wserver, a, cluster):
    ws = scope("kube")
    sb = a.create(ws)
    vm, wid = sb["vm_id"], sb["workspace_id"]
    assert wid.startswith("wsp_")
    pod = cluster.json("get", "pod", "-n", "e2a-sandboxes", vm.replace("_", "-"))
    home = next(v for v in pod["spec"]["volumes"] if v["name"] == "home")
    assert home["hostPath"]["path"].startswith(str(wserver.base / "node")), home
    # a new workspace starts with the template's dotfiles (the pod's seeding step)
    dot = a.sh(vm, "ls -A; cat .bashrc | wc -c").stdout.split()
    assert ".bashrc" in dot and ".profile" in dot and int(dot[-1]) > 0
    a.sh(vm, "mkdir -p d1/d2 && echo deep > d1/d2/f.txt && echo top > t.txt"
             " && touch -m -d '2020-01-02 03:04:05 UTC' t.txt && ln -s d1/d2/f.txt link")
    before = a.sh(vm, "stat -c '%n %Y %s' t.txt d1/d2/f.txt").stdout
    assert "t.txt 1577934245 4" in before
    assert [m["sandbox_id"] for m in agent_mounts(wserver)] == [vm]
    a.destroy(vm)

    # destroyed only once every file is in S3; the node keeps nothing of it
    listing = {f["path"]: f for f in a.files(wid)}
    assert {".bashrc", "t.txt", "d1/d2/f.txt"} <= set(listing)
    assert listing["link"]["type"] == "symlink"
    assert agent_mounts(wserver) == [] and fuse_mounts(wserver) == []
    assert not any((wserver.base / "node" / "mounts").glob("sbx_*"))

    vm = a.create(ws)["vm_id"]
    assert a.sh(vm, "stat -c '%n %Y %s' t.txt d1/d2/f.txt").stdout == before
    assert a.sh(vm, "cat link").stdout == "deep\n"
    # a workspace in use is not deleted
    r = a.http.delete(f"/v1/workspaces/{wid}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "workspace_in_use", r.text
    a.destroy(vm)
    assert a.http.delete(f"/v1/workspaces/{wid}").status_code == 204
    assert cluster.objects() == {"pods": 0, "secrets": 0, "networkpolicies": 0}


def test_writes_past_the_quota_fail_and_what_is_stored_stays(wserver, a):
    ws = scope("kubequota")
    sb = a.create(ws)
    vm = sb["vm_id"]
    first = a.sh(vm, "head -c 40M /dev/urandom > first.bin && sha256sum < first.bin"
                 ).stdout.split()[0]
    r = a.sh(vm, "head -c 40M /dev/urandom > second.bin", check=False)
    assert r.exit_code != 0, f"40 MiB more than a {QUOTA_MIB} MiB quota was accepted"
    assert "No space left on device" in r.stderr or "quota" in r.stderr, r.stderr
    assert a.sh(vm, "sha256sum < first.bin").stdout.split()[0] == first
    a.destroy(vm)
    vm = a.create(ws)["vm_id"]
    assert a.sh(vm, "sha256sum < first.bin").stdout.split()[0] == first
    a.destroy(vm)


def test_without_node_agents_a_workspace_is_refused_saying_why(kserver):
    r = httpx.post(f"{kserver.url}/v1/sandboxes", json={"template": "standard", "workspace": True},
                   headers={"Authorization": f"Bearer {kserver.keys['alice']}"}, timeout=60)
    assert r.status_code == 503, r.text
    assert "E2A_KUBE_NODE_TOKEN" in r.json()["error"]["message"]


def test_a_session_on_the_cluster_keeps_its_end_users_files(wserver, llm_mock):
    """A session (docs/sessions.md) is a sandbox with its end user's workspace and e2a's own
    agent: two tasks that depend on each other, then the file is in the workspace."""
    from tests.e2e.sessions import MODEL, Conn, bundle, create, finished
    with httpx.Client(base_url=wserver.url, timeout=180, headers={
            "Authorization": f"Bearer {wserver.create_user('kses@example.com')}"}) as http:
        key = "sk-ant-" + secrets.token_hex(16)
        bundle(http, "kube-llm", {"LLM_API_KEY": key, "LLM_MODEL": MODEL})
        llm_mock.scenario(key, tasks=[
            {"steps": [{"tool": "write", "args": {"path": "notes.txt", "text": "alpha\n"}}],
             "final": "wrote notes.txt"},
            {"steps": [{"tool": "read_file", "args": {"path": "notes.txt"}}],
             "final": "It says: {last}"},
        ])
        ticket = create(http, secrets=["kube-llm"], user_id="eu-kube", app={"id": "notes"})
        c = Conn(ticket)
        c.task("Write alpha to notes.txt")
        assert finished(c.until_finished())["state"] == "succeeded"
        c.task("What does the file say?")
        done = finished(c.until_finished())
        assert done["state"] == "succeeded" and "alpha" in done["result"], done
        c.close()
        sid = ticket["chat_session_id"]
        assert http.delete(f"/v1/sessions/{sid}").status_code == 200
        wid = wait_for_workspace(http, "eu-kube")
        files = http.get(f"/v1/workspaces/{wid}/files").json()["files"]
        assert "notes.txt" in {f["path"] for f in files}
        assert agent_mounts(wserver) == []


def wait_for_workspace(http, end_user: str) -> str:
    """The end user's workspace once no sandbox has it mounted (the session's is destroyed)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = http.get("/v1/workspaces", params={"end_user_id": end_user}).json()["workspaces"]
        if found and not found[0]["mounted"]:
            return found[0]["workspace_id"]
        time.sleep(0.5)
    raise AssertionError(f"the workspace of {end_user} is still mounted")


def test_a_mount_no_sandbox_owns_is_released_by_the_sweep(wserver):
    """An e2a killed between a mount and its sandbox's end leaves the mount: the leader's sweep
    uploads and removes it."""
    headers = {"Authorization": f"Bearer {wserver.agent_token}"}
    sid = new_id("sbx")  # no row has it
    r = httpx.put(f"{wserver.agent_url}/v1/mounts/{sid}", headers=headers, timeout=60,
                  json={"workspace_id": "wsp_leftover", "limit": 1 << 20})
    assert r.status_code == 200, r.text
    assert sid in {m["sandbox_id"] for m in agent_mounts(wserver)}
    deadline = time.monotonic() + 60
    while sid in {m["sandbox_id"] for m in agent_mounts(wserver)}:
        assert time.monotonic() < deadline, "the leftover mount was not released"
        time.sleep(0.5)
    assert not (wserver.base / "node" / "mounts" / sid).exists()


def test_a_sandbox_whose_mount_dies_ends_crashed_and_keeps_its_files(wserver, a):
    ws = scope("kubedead")
    sb = a.create(ws)
    vm = sb["vm_id"]
    a.sh(vm, "echo kept > kept.txt && sync")
    time.sleep(3)  # past rclone's write-back: the file is uploaded or queued in the cache
    pids = subprocess.run(["pgrep", "-f", f"rclone mount .*/mounts/{vm}/home"],
                          capture_output=True, text=True).stdout.split()
    assert len(pids) == 1, pids
    os.kill(int(pids[0]), 9)
    deadline = time.monotonic() + 90
    while (got := a.http.get(f"/v1/sandboxes/{vm}").json())["state"] != "destroyed":
        assert time.monotonic() < deadline, got
        time.sleep(0.5)
    assert got["end_reason"] == "crashed", got
    assert "kept.txt" in {f["path"] for f in a.files(sb["workspace_id"])}
    assert agent_mounts(wserver) == [] and fuse_mounts(wserver) == []
