"""Sandbox pods with a read-only root (E2A_KUBE_READ_ONLY_ROOT): the image cannot be written,
as root either; the home, /tmp and /var/tmp can, seeded from the image with its owners and
modes. With a workspace, the workspace is the home. With E2A_KUBE_NON_ROOT as well, the same
holds for a pod where nothing runs as root."""

from __future__ import annotations

import httpx
import pytest

from e2a.sdk import E2A
from tests.e2e.test_workspaces import scope
from tests.kube.cluster import NAMESPACE, another_replica

pytestmark = pytest.mark.kube

# What a sandbox shows of its writable paths and its image, as one command.
LOOK = ("stat -c '%n %U %a' /home/user /tmp /var/tmp; ls -a ~ | grep -c bashrc;"
        " for d in /home/user /tmp /var/tmp; do echo x > $d/w && echo wrote $d; done;"
        " awk '$2 == \"/\" {print $4}' /proc/mounts | cut -d, -f1")


def test_a_read_only_root_keeps_the_home_and_tmp_writable_and_nothing_else(cluster, wserver):
    with another_replica(wserver, "readonly", E2A_KUBE_READ_ONLY_ROOT="true") as srv:
        key = srv.create_user("readonly@example.com")
        with httpx.Client(base_url=srv.url, timeout=120,
                          headers={"Authorization": f"Bearer {key}"}) as http, \
                E2A(srv.url, key) as sdk:
            for body in ({}, {"workspace": scope("kreadonly")}):
                vm = _create(cluster, http, body)
                run = sdk.run(vm, LOOK)
                lines = run.stdout.splitlines()
                home = "700" if body else "755"  # the workspace's mount, or the image's
                assert lines[:4] == [f"/home/user user {home}", "/tmp root 1777",
                                     "/var/tmp root 1777", "1"], run  # as in the image
                assert lines[4:7] == ["wrote /home/user", "wrote /tmp", "wrote /var/tmp"], run
                assert lines[7] == "ro", run  # the image, mounted read-only
                # as root too, and through the files API: a clear 403 naming it
                run = sdk.run(vm, "touch /etc/owned; echo $?", user="root")
                assert "Read-only file system" in run.stdout + run.stderr, run
                r = http.put(f"/v1/sandboxes/{vm}/files", content=b"x",
                             params={"path": "/etc/owned", "user": "root"})
                assert r.status_code == 403 and r.json()["error"]["code"] == "read_only", r.text
                r = http.put(f"/v1/sandboxes/{vm}/files", content=b"up\n",
                             params={"path": "/home/user/up.txt"})
                assert r.status_code in (200, 201), r.text
                got = http.get(f"/v1/sandboxes/{vm}/files", params={"path": "/home/user/up.txt"})
                assert got.content == b"up\n"
                assert http.delete(f"/v1/sandboxes/{vm}").status_code == 200


def test_a_read_only_root_without_root_at_all(cluster, wserver):
    with another_replica(wserver, "rononroot", E2A_KUBE_READ_ONLY_ROOT="true",
                         E2A_KUBE_NON_ROOT="true") as srv:
        key = srv.create_user("rononroot@example.com")
        with httpx.Client(base_url=srv.url, timeout=120,
                          headers={"Authorization": f"Bearer {key}"}) as http, \
                E2A(srv.url, key) as sdk:
            vm = _create(cluster, http, {})
            run = sdk.run(vm, "id -u; " + LOOK)
            lines = run.stdout.splitlines()
            assert lines[0] == "1000" and lines[1] == "/home/user user 755", run
            assert lines[4] == "1", run  # the image's dotfiles
            assert lines[5:8] == ["wrote /home/user", "wrote /tmp", "wrote /var/tmp"], run
            assert lines[8] == "ro", run
            assert http.delete(f"/v1/sandboxes/{vm}").status_code == 200


def _create(cluster, http: httpx.Client, body: dict) -> str:
    """A standard sandbox; its pod checked: the image read-only in every container."""
    r = http.post("/v1/sandboxes", json={"template": "standard", **body})
    assert r.status_code == 201, r.text
    vm = r.json()["vm_id"]
    pod = cluster.json("get", "pod", vm.replace("_", "-"), "-n", NAMESPACE)
    spec = pod["spec"]
    assert [i["name"] for i in spec["initContainers"]] == (
        ["seed-writable", "seed-home"] if body else ["seed-writable"])
    for c in spec["containers"] + spec["initContainers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, c
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    assert mounts == {"/tmp": "writable", "/var/tmp": "writable",
                      "/home/user": "home" if body else "writable"}
    return vm
