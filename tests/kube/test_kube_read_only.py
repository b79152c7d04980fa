"""Sandbox pods with a read-only root (E2A_KUBE_READ_ONLY_ROOT, the default): the image cannot
be written, as root either (E2A_KUBE_NON_ROOT=false); the home, /tmp and /var/tmp can, seeded
from the image with its owners and modes. With a workspace, the workspace is the home. By
default (non-root as well) the same holds for a pod where nothing runs as root."""

from __future__ import annotations

import json

import httpx
import pytest

from e2a.sdk import E2A
from tests.conftest import own_server, wait_for
from tests.e2e.test_workspaces import scope
from tests.kube.cluster import NAMESPACE, ROOT_SHAPE, kube_env, replica_user

pytestmark = pytest.mark.kube

# What a sandbox shows of its writable paths and its image, as one command.
LOOK = ("stat -c '%n %U %a' /home/user /tmp /var/tmp; ls -a ~ | grep -c bashrc;"
        " for d in /home/user /tmp /var/tmp; do echo x > $d/w && echo wrote $d; done;"
        " awk '$2 == \"/\" {print $4}' /proc/mounts | cut -d, -f1")


def test_a_read_only_root_keeps_the_home_and_tmp_writable_and_nothing_else(cluster, wserver):
    with replica_user(wserver, "readonly", E2A_KUBE_NON_ROOT="false") as (http, sdk):
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
    with replica_user(wserver, "rononroot") as (http, sdk):  # the settings' defaults
        vm = _create(cluster, http, {})
        run = sdk.run(vm, "id -u; " + LOOK)
        lines = run.stdout.splitlines()
        assert lines[0] == "1000" and lines[1] == "/home/user user 755", run
        # copied as `user`: the copies are its own, /tmp without its sticky bit (there is
        # no other user in the pod)
        assert lines[2:4] == ["/tmp user 777", "/var/tmp user 777"], run
        assert lines[4] == "1", run  # the image's dotfiles
        assert lines[5:8] == ["wrote /home/user", "wrote /tmp", "wrote /var/tmp"], run
        assert lines[8] == "ro", run
        assert http.delete(f"/v1/sandboxes/{vm}").status_code == 200


def test_warm_pods_of_another_shape_are_not_handed_out(cluster, mailbox):
    """A pool filled with root pods of writable roots (ROOT_SHAPE); then e2a restarted with
    E2A_KUBE_NON_ROOT back to its default, then E2A_KUBE_READ_ONLY_ROOT too (as an upgrade
    from the defaults before, or a change of the settings, would): each time the pods pooled
    before are ended, not handed out, and pods of the new shape pooled instead."""
    env = {**kube_env(cluster, "e2a_kubero"), "E2A_POOL_SIZES": json.dumps({"standard": 1})}
    with own_server("kubero", **env) as srv:
        def pooled() -> dict[str, dict]:
            return {p["metadata"]["name"]: p for p in cluster.pods()
                    if p["metadata"]["labels"].get("e2a.dev/instance") == srv.instance
                    and p["metadata"]["labels"].get("e2a.dev/owner") == "pool"
                    and p["status"].get("phase") == "Running"
                    and not p["metadata"].get("deletionTimestamp")}

        def shape(pod: dict) -> tuple[bool, bool]:
            sc = pod["spec"]["containers"][0]["securityContext"]
            return sc.get("runAsNonRoot", False), sc.get("readOnlyRootFilesystem", False)

        srv.extra_env = {**env, **ROOT_SHAPE}
        srv.start()
        [before] = wait_for(lambda: list(pooled().values()), timeout=90)
        assert shape(before) == (False, False)
        for settings, now in (({"E2A_KUBE_READ_ONLY_ROOT": "false"}, (True, False)),
                              ({}, (True, True))):
            srv.stop()  # pooled pods outlive their e2a
            srv.extra_env = {**env, **settings}
            srv.start()
            [after] = wait_for(lambda: [p for p in pooled().values() if shape(p) == now],
                               timeout=90)
            assert before["metadata"]["name"] not in pooled()  # ended, not handed out
            before = after
        with E2A(srv.url, srv.create_user("kubero@example.com")) as client:
            sb = client.create_sandbox("standard")
            assert "claimed" in [e.reason for e in client.events(sb.vm_id)]
            assert sb.vm_id.replace("_", "-") == after["metadata"]["name"]
            assert shape(cluster.json("get", "pod", sb.vm_id.replace("_", "-"), "-n",
                                      NAMESPACE)) == (True, True)
            client.kill(sb.vm_id)


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
