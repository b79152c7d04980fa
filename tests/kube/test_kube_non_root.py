"""Sandbox pods as the Pod Security Standard "restricted" wants them, by default
(E2A_KUBE_NON_ROOT): envd and everything in the pod run as `user`, with no capability and no
privilege escalation. What a sandbox offers as `user` works (commands, files, a new workspace
seeded from the image); root answers a clear 400. E2A_KUBE_NON_ROOT=false gives back root in
gVisor, as on the embedded backend."""

from __future__ import annotations

import httpx
import pytest

from e2a.sdk import E2A
from tests.e2e.test_workspaces import scope
from tests.kube.cluster import NAMESPACE, ROOT_SHAPE, replica_user

pytestmark = pytest.mark.kube


def test_pods_run_everything_as_user_and_refuse_root_clearly(cluster, wserver):
    with replica_user(wserver, "nonroot") as (http, sdk):  # the settings' defaults
        _check(cluster, http, sdk)


def test_root_where_the_operator_gives_it_back(cluster, wserver):
    """E2A_KUBE_NON_ROOT=false (and a writable image): envd runs as root in gVisor and
    switches users, so root can install into the image, as on the embedded backend."""
    with replica_user(wserver, "rootpods", **ROOT_SHAPE) as (http, sdk):
        r = http.post("/v1/sandboxes", json={"template": "standard"})
        assert r.status_code == 201, r.text
        vm = r.json()["vm_id"]
        spec = cluster.json("get", "pod", vm.replace("_", "-"), "-n", NAMESPACE)["spec"]
        sc = spec["containers"][0]["securityContext"]
        assert "runAsNonRoot" not in sc and not sc.get("readOnlyRootFilesystem"), sc
        assert "initContainers" not in spec, spec  # nothing to seed
        assert sdk.run(vm, "id -u").stdout == "1000\n"  # commands as `user` by default
        run = sdk.run(vm, "id -u && echo installed > /usr/local/bin/mine && cat "
                          "/usr/local/bin/mine", user="root")
        assert run.stdout == "0\ninstalled\n", run
        r = http.put(f"/v1/sandboxes/{vm}/files", params={"path": "/etc/mine", "user": "root"},
                     content=b"root's\n", timeout=60)
        assert r.status_code in (200, 201), r.text
        assert sdk.run(vm, "stat -c %U /etc/mine").stdout == "root\n"
        assert http.delete(f"/v1/sandboxes/{vm}").status_code == 200


def _check(cluster, http: httpx.Client, sdk: E2A) -> None:
    """A plain sandbox, then one with a new workspace (seeded by an init container)."""
    for body in ({}, {"workspace": scope("knonroot")}):
        r = http.post("/v1/sandboxes", json={"template": "standard", **body})
        assert r.status_code == 201, r.text
        vm = r.json()["vm_id"]
        pod = cluster.json("get", "pod", vm.replace("_", "-"), "-n", NAMESPACE)
        for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
            sc = c["securityContext"]
            assert (sc["runAsNonRoot"], sc["runAsUser"], sc["allowPrivilegeEscalation"]) \
                == (True, 1000, False), sc
            assert sc["capabilities"] == {"drop": ["ALL"]}
        if body:
            assert pod["spec"]["initContainers"], "a new workspace is seeded"
        run = sdk.run(vm, "id -u; grep CapEff /proc/self/status; grep CapEff /proc/1/status;"
                          " echo kept > /home/user/mine && cat /home/user/mine && ls -a ~")
        assert run.exit_code == 0, run
        lines = run.stdout.splitlines()
        assert lines[0] == "1000"                        # commands, and envd itself,
        assert lines[1].split() == ["CapEff:", "0000000000000000"], lines  # with nothing
        assert lines[2].split() == ["CapEff:", "0000000000000000"], lines
        assert lines[3] == "kept" and ".bashrc" in lines  # the image's home, seeded
        as_root = (
            http.post(f"/v1/sandboxes/{vm}/commands", json={"cmd": "id -u", "user": "root"},
                      timeout=60),
            http.put(f"/v1/sandboxes/{vm}/files", params={"path": "/etc/x", "user": "root"},
                     content=b"x", timeout=60))
        for r in as_root:
            assert r.status_code == 400, r.text
            assert r.json()["error"]["field"] == "user" and "root" in r.text, r.text
        r = http.put(f"/v1/sandboxes/{vm}/files", params={"path": "/etc/owned"},
                     content=b"x", timeout=60)
        assert r.status_code == 403, r.text  # as `user`: /etc is neither its nor writable
        r = http.put(f"/v1/sandboxes/{vm}/files", params={"path": "/home/user/up.txt"},
                     content=b"uploaded\n", timeout=60)
        assert r.status_code in (200, 201), r.text
        got = http.get(f"/v1/sandboxes/{vm}/files", params={"path": "/home/user/up.txt"})
        assert got.content == b"uploaded\n"
        assert http.delete(f"/v1/sandboxes/{vm}").status_code == 200
