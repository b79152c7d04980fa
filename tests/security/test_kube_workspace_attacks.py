"""Attacks on workspaces on the Kubernetes backend (docs/kubernetes.md "Workspaces"), on the
real test cluster with the node agent and a real S3 server (tests/kube/cluster.py `wserver`):
as code inside a sandbox pod (the store's keys and the agent's token are nowhere in it; the
agent, which this cluster's CNI lets pods reach, refuses it), as a tenant (another tenant's
scope of the same name is another workspace; the quota holds across replicas, for mounts and
presigned PUTs), and as anyone on the nodes' network (the agent answers only the replicas'
token, and only for sandbox ids)."""

from __future__ import annotations

import contextlib
import secrets
import time

import httpx
import pytest

from tests.e2e.test_workspaces import As, scope
from tests.kube.cluster import WS_QUOTA_MIB as QUOTA_MIB, agent_mounts, another_replica

pytestmark = pytest.mark.kube  # one cluster per machine: run apart from xdist (Makefile)


@pytest.fixture
def alice(wserver):
    user = As(wserver.url, wserver.create_user(f"wsa{secrets.token_hex(4)}@example.com"))
    yield user
    user.close()


@pytest.fixture
def bob(wserver):
    user = As(wserver.url, wserver.create_user(f"wsb{secrets.token_hex(4)}@example.com"))
    yield user
    user.close()


def test_a_pod_holds_no_key_and_the_node_agent_refuses_it(wserver, alice, cluster):
    vm = alice.create(scope("kubeatk"))["vm_id"]
    # the store's keys are the agent's: nowhere in the sandbox's processes or files
    seen = alice.sh(vm, "cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'; env; "
                        "grep -rs . /etc /tmp /home/user 2>/dev/null | head -c 2000000",
                    check=False).stdout
    assert wserver.secret_key not in seen and wserver.agent_token not in seen
    # the agent is on the node's address, which this cluster's CNI lets pods reach: it
    # answers nothing without the replicas' token
    node_ip = next(x["address"] for x in cluster.json("get", "nodes")["items"][0]["status"][
        "addresses"] if x["type"] == "InternalIP")
    port = wserver.agent_url.rsplit(":", 1)[1]
    for method, path in (("GET", "/v1/mounts"), ("GET", f"/v1/mounts/{vm}/written"),
                         ("DELETE", f"/v1/mounts/{vm}")):
        r = alice.sh(vm, f"exec 3<>/dev/tcp/{node_ip}/{port} && printf '{method} {path} "
                         f"HTTP/1.0\\r\\nAuthorization: Bearer guess\\r\\n\\r\\n' >&3 && head -1 <&3",
                     check=False)
        assert r.stdout.startswith(("HTTP/1.0 401 ", "HTTP/1.1 401 ")), (r.stdout, r.stderr)
    assert vm in {m["sandbox_id"] for m in agent_mounts(wserver)}  # its mount untouched
    assert alice.sh(vm, "echo still > mine.txt && cat mine.txt").stdout == "still\n"
    alice.destroy(vm)


def test_another_tenants_scope_of_the_same_name_is_another_workspace(alice, bob):
    ws = scope("kubeshared")
    a = alice.create(ws)
    alice.sh(a["vm_id"], "echo alices > secret.txt")
    alice.destroy(a["vm_id"])
    b = bob.create(ws)
    assert b["workspace_id"] != a["workspace_id"]
    assert bob.sh(b["vm_id"], "cat secret.txt", check=False).exit_code != 0
    assert bob.ws(a["workspace_id"]).status_code == 404  # nor through the API
    bob.destroy(b["vm_id"])


def test_the_node_agent_answers_only_the_replicas_token(wserver):
    url = f"{wserver.agent_url}/v1/mounts"
    for headers in ({}, {"Authorization": "Bearer nope"},
                    {"Authorization": f"Bearer {wserver.agent_token[:-1]}"},
                    {"Authorization": wserver.agent_token}):  # no "Bearer "
        r = httpx.get(url, headers=headers)
        assert r.status_code == 401, r.text
    r = httpx.put(f"{url}/sbx_x", headers={"Authorization": "Bearer nope"},
                  json={"workspace_id": "wsp_x", "limit": 1})
    assert r.status_code == 401
    good = {"Authorization": f"Bearer {wserver.agent_token}"}
    for bad in ("..%2F..%2Fetc", "sbx_UPPER", "sbx_" + "a" * 40, "wsp_abc"):
        r = httpx.put(f"{url}/{bad}", json={"workspace_id": "wsp_x", "limit": 1}, headers=good)
        assert r.status_code in (400, 404), (bad, r.text)
    for body in ({"workspace_id": "../../x", "limit": 1}, {"workspace_id": "wsp_x", "limit": -1},
                 {"workspace_id": "wsp_x", "limit": True}, [], "x"):
        r = httpx.put(f"{url}/sbx_abc", json=body, headers=good)
        assert r.status_code == 400, (body, r.text)
    assert "sbx_abc" not in {m["sandbox_id"] for m in agent_mounts(wserver)}


@contextlib.contextmanager
def through_two_replicas(wserver, tag: str):
    """A new user's clients of `wserver` and of a second replica of it, started for the test
    (stopped and its directory gone after)."""
    with another_replica(wserver, tag) as other:
        key = wserver.create_user(f"{tag}{secrets.token_hex(4)}@example.com")
        one, two = As(wserver.url, key), As(other.url, key)
        try:
            yield one, two
        finally:
            one.close()
            two.close()


def test_a_tenant_does_not_pass_the_quota_through_two_replicas(wserver):
    """The user's quota is shared among the mounts of every replica: a second mount, made
    through another replica, gets only a share of what the first left (before, each replica
    shared the quota among its own mounts, and a tenant whose creates a load balancer spread
    over R replicas could store R times the quota)."""
    with through_two_replicas(wserver, "share") as (one, two):
        first = one.create(scope("kshare1"))["vm_id"]
        one.sh(first, "head -c 40M /dev/urandom > big.bin && sync")
        second = two.create(scope("kshare2"))["vm_id"]
        r = two.sh(second, "head -c 40M /dev/urandom > big.bin", check=False)
        assert r.exit_code != 0, f"80 MiB in all were written under a {QUOTA_MIB} MiB quota"
        assert "No space left on device" in r.stderr or "quota" in r.stderr, r.stderr
        two.sh(second, "rm -f big.bin")
        # the first mount, limited through its node's agent by the other replica, keeps all
        assert one.sh(first, "stat -c %s big.bin").stdout.strip() == str(40 << 20)
        # ended through the replica that did not make it: its lease ends, and the share of
        # the quota it held (24 MiB left once its 40 MiB are counted) goes to the second
        two.destroy(first)
        deadline = time.monotonic() + 60
        while two.sh(second, "head -c 16M /dev/urandom > more.bin || { rm -f more.bin; false; }",
                     check=False).exit_code != 0:
            assert time.monotonic() < deadline, "the ended mount's share was not given back"
            time.sleep(1)
        two.destroy(second)


def test_presigned_puts_asked_for_through_two_replicas_hold_one_quota(wserver):
    """A sized presigned PUT holds its bytes of the quota in a row that every replica reads
    (before, in the memory of the replica that handed it out: 40 MiB through each of two
    replicas were both promised under a 64 MiB quota)."""
    with through_two_replicas(wserver, "presign") as (one, two):
        sb = one.create(scope("kpresign"))
        one.destroy(sb["vm_id"])

        def put(user: As, path: str) -> httpx.Response:
            return user.http.post(f"/v1/workspaces/{sb['workspace_id']}/files/presign", json={
                "path": path, "method": "PUT", "expires_in": 600, "size": 40 << 20})

        assert put(one, "one.bin").status_code == 200
        r = put(two, "two.bin")
        assert r.status_code == 507, f"80 MiB of URLs under a {QUOTA_MIB} MiB quota: {r.text}"
        assert r.json()["error"]["code"] == "quota_exceeded"
