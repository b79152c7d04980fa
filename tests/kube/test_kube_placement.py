"""Sandboxes go only where their RuntimeClass lets them (docs/kubernetes.md "Lifecycle"): a
cluster may run gVisor on some nodes only, named by the RuntimeClass's node selector (and
tolerations of those nodes' taints). Only those nodes are room for sandboxes: a create the
selector leaves no node for is refused at once (409) before anything is made or mounted, a
workspace's mount is placed on a node it selects, and the RuntimeClass is read again as it
changes."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import wait_for
from tests.e2e.test_workspaces import scope
from tests.kube.cluster import agent_mounts, another_replica, replica_of

pytestmark = pytest.mark.kube

RUNTIME = "gvisor-placed"


def runtime_class(cluster, selector: dict[str, str], handler: str = "runsc") -> None:
    """The RuntimeClass RUNTIME made again (its handler cannot change in place)."""
    cluster.kubectl("delete", "runtimeclass", RUNTIME, "--ignore-not-found", "--wait=true")
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": RUNTIME},
        "handler": handler, "scheduling": {"nodeSelector": selector}}))


def test_only_the_nodes_the_runtime_class_selects_are_room_for_sandboxes(cluster, wserver):
    """Through a replica of the workspace server whose RuntimeClass is `gvisor-placed`. Before,
    a create with a workspace (placed by e2a) was mounted on a node the RuntimeClass does not
    select, its pod refused there by the kubelet, and answered 503 after all that."""
    node = cluster.json("get", "nodes")["items"][0]["metadata"]["name"]
    runtime_class(cluster, {"e2a.dev/gvisor": "elsewhere"})  # gVisor on no node of this one
    try:
        with another_replica(wserver, "place", E2A_KUBE_RUNTIME_CLASS=RUNTIME) as srv, \
                httpx.Client(base_url=srv.url, timeout=120, headers={
                    "Authorization": f"Bearer {srv.create_user('place@example.com')}"}) as http:
            for body in ({}, {"workspace": scope("kplace")}):
                t0 = time.monotonic()
                r = http.post("/v1/sandboxes", json={"template": "standard", **body})
                assert r.status_code == 409, r.text
                assert r.json()["error"]["code"] == "no_capacity"
                assert time.monotonic() - t0 < 10  # at once, not a start that timed out
            assert agent_mounts(wserver) == []     # nothing was mounted for it
            # gVisor on this node now: read again within ALLOCATABLE_TTL (10 s)
            runtime_class(cluster, {"kubernetes.io/hostname": node})
            made = wait_for(lambda: _created(http, {"workspace": scope("kplace")}),
                            timeout=40, interval=1)
            run = http.post(f"/v1/sandboxes/{made}/commands",
                            json={"cmd": "echo placed > /home/user/where && cat /home/user/where"},
                            timeout=60)
            assert "placed" in run.text, run.text
            assert http.delete(f"/v1/sandboxes/{made}").status_code == 200
            # made again under its name with runc: once read again (10 s), no create starts
            runtime_class(cluster, {"kubernetes.io/hostname": node}, handler="runc")
            r = wait_for(lambda: _refused(http, "runtime_unavailable"), timeout=30, interval=1)
            assert "'runc', which is not gVisor" in r.json()["error"]["message"], r.text
            # the RuntimeClass deleted: every pod of it is refused (503 create_failed, by the
            # API server), and once read again (10 s) no create starts (runtime_unavailable)
            cluster.kubectl("delete", "runtimeclass", RUNTIME, "--wait=true")
            r = wait_for(lambda: _refused(http, "runtime_unavailable", "any more"), timeout=30,
                         interval=1)
            assert r.status_code == 503 and RUNTIME in r.json()["error"]["message"], r.text
    finally:
        cluster.kubectl("delete", "runtimeclass", RUNTIME, "--ignore-not-found")


def test_e2a_does_not_start_on_a_runtime_class_that_is_not_gvisor(cluster, kserver):
    """A RuntimeClass of the configured name whose handler is runc (made again under that name)
    would run every sandbox on the node's kernel: e2a refuses to start, naming it."""
    runtime_class(cluster, {}, handler="runc")
    other = replica_of(kserver, "runc")
    other.extra_env = {**other.extra_env, "E2A_KUBE_RUNTIME_CLASS": RUNTIME}
    other.cleanup()
    try:
        with pytest.raises(RuntimeError) as e:
            other.start()
        assert f"RuntimeClass '{RUNTIME}' runs the handler 'runc', which is not gVisor" \
            in str(e.value), str(e.value)
        assert "E2A_KUBE_RUNTIME_HANDLERS" in str(e.value)
    finally:
        other.stop()
        other.cleanup()
        cluster.kubectl("delete", "runtimeclass", RUNTIME, "--ignore-not-found")


def _refused(http, code: str, saying: str = ""):
    r = http.post("/v1/sandboxes", json={"template": "standard"})
    assert r.status_code in (201, 503), r.text
    if r.status_code == 201:
        assert http.delete(f"/v1/sandboxes/{r.json()['vm_id']}").status_code == 200
        return None
    error = r.json()["error"]
    return r if error["code"] == code and saying in error["message"] else None


def _created(http, body: dict) -> str | None:
    r = http.post("/v1/sandboxes", json={"template": "standard", **body})
    if r.status_code == 409:
        return None
    assert r.status_code == 201, r.text
    return r.json()["vm_id"]
