"""Attacks on the Kubernetes backend, as a tenant and as code inside a sandbox pod, on the real
test cluster (tests/kube/cluster.py). Its bridge CNI enforces no NetworkPolicy, so what is shown
here is what holds without one: envd's signed protocol between pods, no cluster credentials in
a sandbox, the node's APIs refusing it, no token or user id where others can read it."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from e2a.sdk import E2A, E2AError
from tests.conftest import wait_for
from tests.kube.cluster import CLUSTER_DIR, NAMESPACE
from tests.security.conftest import NOBODY, as_user

pytestmark = pytest.mark.kube  # one cluster per machine: run apart from xdist (Makefile)


@pytest.fixture(scope="module")
def alice(kube_clients):
    return kube_clients["alice"]


@pytest.fixture(scope="module")
def bob(kube_clients):
    return kube_clients["bob"]


@pytest.fixture(scope="module")
def pair(alice, bob):
    """A sandbox each, alive for the module."""
    a = alice.create_sandbox("standard", idle_timeout_seconds=600)
    b = bob.create_sandbox("standard", idle_timeout_seconds=600)
    yield a, b
    alice.kill(a.vm_id)
    bob.kill(b.vm_id)


def pod(cluster, vm_id: str) -> dict:
    return cluster.json("get", "pod", vm_id.replace("_", "-"), "-n", NAMESPACE)


def envd_token(kserver, vm_id: str) -> str:
    """What e2a derives for the sandbox (its key is E2A_AGENT_KEY, which replicas share)."""
    key = kserver.extra_env["E2A_AGENT_KEY"].encode()
    return hmac.new(key, vm_id.encode(), hashlib.sha256).hexdigest()


PROBE = """
import json, socket, ssl, sys, urllib.request
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
scheme = "https" if port in (6443, 10250) else "http"
try:
    r = urllib.request.urlopen(f"{scheme}://{host}:{port}{path}", timeout=5, context=ctx)
    print(r.status, r.read(300).decode(errors="replace"))
except urllib.error.HTTPError as e:
    print(e.code, e.read(300).decode(errors="replace"))
except Exception as e:
    print("unreachable", type(e).__name__)
"""


def probe(client: E2A, vm_id: str, host: str, port: int, path: str = "/") -> str:
    client.files.write(vm_id, "/tmp/probe.py", PROBE.encode())
    return client.run(vm_id, f"python3 /tmp/probe.py {host} {port} '{path}'").stdout.strip()


def test_a_tenant_cannot_reach_another_tenants_sandbox(alice, bob, pair):
    a, _ = pair
    for call in (lambda: bob.get_sandbox(a.vm_id), lambda: bob.run(a.vm_id, "true"),
                 lambda: bob.files.read_bytes(a.vm_id, "/etc/hostname"),
                 lambda: bob.kill(a.vm_id), lambda: bob.events(a.vm_id)):
        with pytest.raises(E2AError) as e:
            call()
        assert e.value.status == 404
    assert alice.get_sandbox(a.vm_id).state == "running"


def test_a_sandbox_cannot_command_another_pods_envd(cluster, alice, pair):
    """Pods reach each other on this CNI; envd answers nothing unsigned, and no sandbox knows
    another's token."""
    a, b = pair
    b_ip = pod(cluster, b.vm_id)["status"]["podIP"]
    out = probe(alice, a.vm_id, b_ip, 984, "/health")
    assert out.startswith("401"), out
    out = probe(alice, a.vm_id, b_ip, 984, "/files?path=/etc/hostname")
    assert out.startswith("401"), out


def test_no_cluster_credentials_or_envd_token_inside_a_sandbox(kserver, alice, pair):
    a, _ = pair
    r = alice.run(a.vm_id, "ls /var/run/secrets/kubernetes.io 2>&1; echo; env")
    assert "No such file" in r.stdout, r.stdout
    assert "E2A_ENVD_TOKEN" not in r.stdout
    token = envd_token(kserver, a.vm_id)
    # not even from envd's (pid 1's) environment, as envd's own user: envd scrubs it
    r = alice.run(a.vm_id, "cat /proc/1/environ | tr '\\0' '\\n'")
    assert "PATH=" in r.stdout, r  # read: the pod's one user is envd's
    assert token not in r.stdout and "E2A_ENVD_TOKEN=" not in r.stdout


def test_code_that_kills_envd_ends_its_own_sandbox_and_leaves_nothing(cluster, alice):
    """In a default pod envd and the tenant's code are one user, so code may signal envd: a
    `kill 1` ends it, and with it that sandbox only, as any death does (`crashed`, its pod,
    secret and policy gone). Another sandbox of the same owner runs on."""
    other = alice.create_sandbox("standard", idle_timeout_seconds=600)
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    try:
        alice.run_background(sb.vm_id, "sleep 1; kill -TERM 1")
        wait_for(lambda: alice.get_sandbox(sb.vm_id).state == "destroyed", timeout=30)
        assert alice.get_sandbox(sb.vm_id).end_reason == "crashed"
        name = sb.vm_id.replace("_", "-")
        wait_for(lambda: all(name not in cluster.kubectl("get", kind, "-n", NAMESPACE,
                                                         "-o", "name")
                             for kind in ("pods", "secrets", "networkpolicies")), timeout=30)
        assert alice.run(other.vm_id, "echo on").stdout == "on\n"
    finally:
        alice.kill(other.vm_id)
        if alice.get_sandbox(sb.vm_id).state != "destroyed":
            alice.kill(sb.vm_id)


def test_a_local_host_user_gets_neither_envd_nor_the_clusters_keys(cluster, pair):
    """Pods' addresses are reachable from the host on this CNI (no e2a firewall in front of
    them): a local user's request to envd is refused unsigned, and the cluster's state (its
    admin kubeconfig, keys, containerd's socket) is root's alone."""
    a, _ = pair
    ip = pod(cluster, a.vm_id)["status"]["podIP"]
    r = as_user(NOBODY, "/usr/bin/python3", "-c", PROBE, ip, "984", "/files?path=/etc/hostname")
    assert r.stdout.startswith("401"), r.stdout + r.stderr
    for path in ("admin.kubeconfig", "pki/ca.key", "containerd/containerd.sock"):
        r = as_user(NOBODY, "cat", str(CLUSTER_DIR / path))
        assert r.returncode != 0 and "Permission denied" in r.stderr, path


def test_the_nodes_apis_refuse_a_sandbox(cluster, alice, pair):
    a, _ = pair
    node = cluster.json("get", "nodes")["items"][0]
    ip = next(x["address"] for x in node["status"]["addresses"] if x["type"] == "InternalIP")
    # the kubelet: no anonymous access
    assert probe(alice, a.vm_id, ip, 10250, "/pods").split()[0] in ("401", "unreachable")
    # the API server: anonymous, a sandbox may read nothing of the namespace
    out = probe(alice, a.vm_id, ip, 6443, f"/api/v1/namespaces/{NAMESPACE}/secrets")
    assert out.split()[0] in ("401", "403", "unreachable"), out


def test_no_token_or_user_id_where_others_can_read(cluster, kserver, alice, pair):
    a, _ = pair
    token = envd_token(kserver, a.vm_id)
    spec = json.dumps(pod(cluster, a.vm_id))
    user = alice.get_sandbox(a.vm_id)
    assert token not in spec
    policy = json.dumps(cluster.json("get", "networkpolicy", a.vm_id.replace("_", "-"),
                                     "-n", NAMESPACE))
    assert token not in policy
    log = (kserver.base / "server.log").read_text(errors="replace")
    assert token not in log
    assert token not in json.dumps([e.__dict__ for e in alice.events(a.vm_id)], default=str)
    # the owner label is a hash, not the user's id
    owner = pod(cluster, a.vm_id)["metadata"]["labels"]["e2a.dev/owner"]
    assert owner != getattr(user, "user_id", None) and len(owner) == 16


def test_a_sandbox_without_internet_gets_a_policy_with_dns_and_the_egress_proxy_only(
        cluster, kserver, alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600, internet=False)
    try:
        spec = cluster.json("get", "networkpolicy", sb.vm_id.replace("_", "-"),
                            "-n", NAMESPACE)["spec"]
        assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
        *dns, proxy = spec["egress"]
        for rule in dns:
            assert {p["port"] for p in rule["ports"]} == {53}
        gw = kserver.extra_env["E2A_KUBE_EGRESS_HOST"]  # e2a's one address, its proxy's port
        assert proxy == {"to": [{"ipBlock": {"cidr": f"{gw}/32"}}],
                         "ports": [{"protocol": "TCP", "port": kserver.egress_port}]}
    finally:
        alice.kill(sb.vm_id)


def test_a_sandbox_without_an_agent_gets_nothing_from_the_egress_proxy(kserver, alice):
    """The proxy is open to every pod's policy; it serves only a pod whose task holds a grant
    (by the pod's own address)."""
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    try:
        gw = kserver.extra_env["E2A_KUBE_EGRESS_HOST"]
        r = alice.run(sb.vm_id, f"curl -s -m 10 -w ' %{{http_code}}' "
                                f"http://{gw}:{kserver.egress_port}/google/v1beta/models "
                                "-H 'x-goog-api-key: AIzaSomebodyElsesPlaceholder'")
        assert r.stdout.endswith(" 403") and "holds no agent key" in r.stdout, r.stdout
    finally:
        alice.kill(sb.vm_id)


def test_bad_input_on_this_backend_is_a_clear_error(cluster, alice):
    before = cluster.objects()
    with pytest.raises(E2AError) as e:  # the documented contract: 501, naming the field
        alice.create_sandbox("no-such-template")
    assert (e.value.code, e.value.field) == ("template_not_available", "template")
    with pytest.raises(E2AError) as e:
        alice.create_sandbox("standard", idle_timeout_seconds=-5)
    assert 400 <= e.value.status < 500 and e.value.field
    with pytest.raises(E2AError) as e:
        alice.create_sandbox("standard", agent="claude-code", task="hello")
    assert (e.value.status, e.value.field) == (400, "llm_key")
    assert cluster.objects() == before  # nothing made for any


def refused_everywhere(client: E2A, vm_id: str) -> None:
    """Every way into a sandbox answers 404 to this client, as for one that does not exist."""
    for call in (lambda: client.get_sandbox(vm_id), lambda: client.run(vm_id, "true"),
                 lambda: client.files.read_bytes(vm_id, "/etc/hostname"),
                 lambda: client.kill(vm_id), lambda: client.events(vm_id)):
        with pytest.raises(E2AError) as e:
            call()
        assert e.value.status == 404


def test_tenants_stay_apart_through_every_replica(kserver, alice, pair):
    """A replica that never saw a sandbox learns of it only after the owner check: bob's
    calls through it are refused before it looks the sandbox up."""
    from tests.kube.cluster import replica_of
    a, b = pair
    other = replica_of(kserver, "attack")
    other.cleanup()
    other.start()
    try:
        with E2A(other.url, kserver.keys["bob"]) as bob_there:
            refused_everywhere(bob_there, a.vm_id)
            assert bob_there.run(b.vm_id, "echo own").stdout == "own\n"  # his own: yes
        assert "replica" not in json.dumps(alice.get_sandbox(a.vm_id).__dict__, default=str)
    finally:
        other.stop()
        other.cleanup()
    assert alice.get_sandbox(a.vm_id).state == "running"


def test_a_pooled_sandbox_is_nobodys_until_claimed(cluster, mailbox):
    """A warm pod waits with no owner and no internet; no tenant reaches it by its id; the
    one who claims it gets the policy they asked for, and nobody else sees it."""
    from tests.conftest import own_server, wait_for
    from tests.kube.cluster import kube_env
    env = {**kube_env(cluster, "e2a_kubepoolsec"), "E2A_POOL_SIZES": '{"standard": 1}'}
    with own_server("kubepool", **env) as srv:
        srv.start()
        mine = lambda: [p for p in cluster.pods()  # noqa: E731
                        if p["metadata"]["labels"]["e2a.dev/instance"] == srv.instance]
        try:
            pooled = wait_for(lambda: [p for p in mine() if p["status"].get("phase") ==
                                       "Running"], timeout=90)[0]
            name = pooled["metadata"]["name"]
            vm_id = name.replace("-", "_")
            assert pooled["metadata"]["labels"]["e2a.dev/owner"] == "pool"
            policy = cluster.json("get", "networkpolicy", name, "-n", NAMESPACE)
            assert all("0.0.0.0/0" not in json.dumps(r) for r in policy["spec"]["egress"])
            with E2A(srv.url, srv.create_user("p1@example.com")) as p1, \
                    E2A(srv.url, srv.create_user("p2@example.com")) as p2:
                wait_for(lambda: srv_pool(srv) == 1, timeout=30)
                refused_everywhere(p1, vm_id)
                assert [p["metadata"]["name"] for p in mine()] == [name]  # still waiting
                got = p1.create_sandbox("standard", internet=False)
                assert got.vm_id == vm_id  # the claim
                refused_everywhere(p2, vm_id)
                assert p1.run(vm_id, "echo mine").stdout == "mine\n"
                policy = cluster.json("get", "networkpolicy", name, "-n", NAMESPACE)
                assert all("0.0.0.0/0" not in json.dumps(r) for r in policy["spec"]["egress"])
                p1.kill(vm_id)
        finally:
            srv.stop()
            cluster.kubectl("delete", "pods,secrets,networkpolicies", "-n", NAMESPACE, "-l",
                            f"e2a.dev/instance={srv.instance}", "--wait=true")
    assert not mine()


def srv_pool(srv) -> int:
    import httpx
    return httpx.get(srv.url + "/health").json()["pool"].get("standard", 0)


HOLD = """
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for _ in range(n):
    try:
        socks.append(socket.create_connection((host, port), timeout=5))
    except OSError:
        pass
time.sleep(1)
alive = 0
for s in socks:
    s.setblocking(False)
    try:
        alive += s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        alive += 1
    except OSError:
        pass
print(alive)
"""


def test_a_pod_holds_at_most_its_share_of_the_egress_proxys_connections(kserver, alice):
    """No NetworkPolicy can count connections: the proxy itself closes a pod's connections
    past MAX_CONNECTIONS (idle ones, that never send a byte), so no sandbox can use up the
    file descriptors of the e2a replica it shares with every other."""
    from e2a.agents.egress import MAX_CONNECTIONS
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    try:
        gw = kserver.extra_env["E2A_KUBE_EGRESS_HOST"]
        r = alice.run(sb.vm_id, ["python3", "-c", HOLD, gw, str(kserver.egress_port),
                                 str(MAX_CONNECTIONS + 10)])
        assert r.stdout.split() == [str(MAX_CONNECTIONS)], r.stdout + r.stderr
    finally:
        alice.kill(sb.vm_id)


def test_the_termination_log_does_not_fill_the_nodes_disk(cluster, alice):
    """The kubelet binds a file of the node's disk at /dev/termination-log, outside every
    ephemeral-storage limit (kubernetes/kubernetes#122224): envd keeps it under 64 KiB, so
    1.5 GB written there leaves next to nothing on the node."""
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    try:
        uid = pod(cluster, sb.vm_id)["metadata"]["uid"]
        [host] = (CLUSTER_DIR / "kubelet/pods" / uid / "containers/sandbox").iterdir()
        run = alice.run(sb.vm_id, "dd if=/dev/zero of=/dev/termination-log bs=1M count=1500"
                                  " 2>&1 | tail -1", timeout=300)
        assert "1572864000 bytes" in run.stdout, run  # all of it written
        wait_for(lambda: host.stat().st_blocks * 512 <= 64 << 10, timeout=10)
        assert alice.run(sb.vm_id, "echo alive").stdout == "alive\n"
    finally:
        alice.kill(sb.vm_id)
