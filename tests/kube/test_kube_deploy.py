"""e2a itself on the cluster: its image (e2a/deploy/image.py) and its manifests
(deploy/kubernetes/) applied to the test cluster bring up an in-cluster e2a, two replicas,
that makes sandboxes with its own service account; its RBAC allows what it calls and no more.

Real throughout: the image built (cached) and imported into the cluster's containerd, the
kustomize overlay applied with kubectl, PostgreSQL on the host (scripts/test-services.sh: it
listens on the pod bridge's gateway for the `e2a_deploy` database only), the API reached at
the pods' addresses. Everything applied is deleted at the end, namespaces too, and the
database's schema dropped."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet

from e2a.deploy import image
from e2a.kube import manifests
from e2a.network.firewall import host_nameservers
from e2a.sdk import E2A, E2AError
from tests.conftest import wait_for
from tests.kube.cluster import CLUSTER_DIR, ROOT, Cluster

pytestmark = pytest.mark.kube  # one cluster per machine: run apart from xdist (Makefile)

NS = "e2a-deploy-test"
SANDBOX_NS = "e2a-deploy-sandboxes"
BRIDGE_IP = "10.244.0.1"  # the host on the pod bridge: PostgreSQL listens there too
DB_URL = f"postgresql+asyncpg://e2a_test:e2a_test@{BRIDGE_IP}/e2a_deploy"
SA = f"system:serviceaccount:{NS}:e2a"
KINDS = ("pods", "secrets", "networkpolicies")


def overlay(dir: Path, image_ref: str, instance: str, apiserver: str) -> Path:
    """The test's overlay of deploy/kubernetes: its image, namespaces, instance, database and
    keys; and the API server's address, as the test cluster runs no kube-proxy (the service
    address in KUBERNETES_SERVICE_HOST leads nowhere there)."""
    name, tag = image_ref.rsplit(":", 1)
    kube = os.path.relpath(ROOT / "deploy/kubernetes", dir)
    patch = {"apiVersion": "apps/v1", "kind": "Deployment",
             "metadata": {"name": "e2a", "namespace": NS},  # patches come after the wiring
             "spec": {"template": {"spec": {"containers": [{"name": "e2a", "env": [
                 {"name": "KUBERNETES_SERVICE_HOST", "value": apiserver},
                 {"name": "KUBERNETES_SERVICE_PORT", "value": "6443"}]}]}}}}
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"{kube}/base"],
        "components": [f"{kube}/components/wiring"],
        "images": [{"name": "e2a.local/e2a", "newName": name, "newTag": tag}],
        "configMapGenerator": [
            {"name": "e2a-deploy", "namespace": "e2a-system", "behavior": "merge",
             "literals": [f"namespace={NS}"]},
            {"name": "e2a-settings", "namespace": "e2a-system", "behavior": "merge",
             "literals": [f"E2A_KUBE_NAMESPACE={SANDBOX_NS}", f"E2A_INSTANCE={instance}",
                          # the test cluster's bridge CNI enforces no NetworkPolicy
                          "E2A_KUBE_ALLOW_UNENFORCED_POLICIES=true",
                          # a warm pod: its claim exercises the patch verbs of the RBAC
                          'E2A_POOL_SIZES={"standard": 1}',
                          # resolvers outside the cluster (e2a refuses to start without):
                          # the host's, as the tests' other sandboxes have
                          f"E2A_KUBE_NAMESERVERS={json.dumps(host_nameservers())}"]}],
        "secretGenerator": [
            {"name": "e2a", "namespace": "e2a-system", "literals": [
                f"E2A_DATABASE_URL={DB_URL}", f"E2A_AGENT_KEY={secrets.token_hex(32)}",
                f"E2A_SECRETS_KEY={Fernet.generate_key().decode()}"]}],
        "patches": [{"patch": json.dumps(patch)}],
    }
    (dir / "kustomization.yaml").write_text(json.dumps(kustomization, indent=1))
    return dir


def import_image(c: Cluster) -> str:
    cache = Path(os.environ.get("E2A_CACHE_DIR", "/var/cache/e2a"))
    (cache / "images").mkdir(parents=True, exist_ok=True)
    with open(cache / "images/build.log", "a") as log:
        archive, ref = image.build(cache, ROOT / "build/envd", log=log, progress=print)
    if ref not in c.ctr("images", "ls", "-q").split():
        subprocess.run([c.bin / "ctr", "-a", CLUSTER_DIR / "containerd/containerd.sock",
                        "-n", "k8s.io", "images", "import", archive], check=True, timeout=600)
    return ref


def reset_database() -> None:
    """Drop what an earlier run left in the test's database (its own, e2a_deploy)."""
    subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1",
                    "postgresql://e2a_test:e2a_test@127.0.0.1/e2a_deploy", "-c",
                    "drop schema public cascade; create schema public"], check=True,
                   capture_output=True, timeout=60)


def kubectl(c: Cluster, *args: str, timeout: float = 60) -> str:
    """kubectl whose failure says why (its stderr)."""
    r = subprocess.run([c.bin / "kubectl", "--kubeconfig", c.kubeconfig, *args],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"kubectl {' '.join(args)}: {r.stderr.strip()[-2000:]}"
    return r.stdout


def e2a_pods(c: Cluster) -> list[dict]:
    return c.json("get", "pods", "-n", NS, "-l", "app.kubernetes.io/name=e2a")["items"]


def warm_pods(ip: str) -> int | None:
    """The warm pool's standard pods, as a replica's /health counts them (None: no answer)."""
    try:
        return httpx.get(f"http://{ip}:8080/health", timeout=10).json()["pool"].get("standard")
    except httpx.HTTPError:
        return None


def e2a_logs(c: Cluster) -> str:
    """What e2a's pods said, and how they are (for a failure's message)."""
    return "\n".join([c.kubectl("get", "pods", "-o", "wide", "-n", NS, check=False),
                      json.dumps([p["status"].get("containerStatuses") for p in e2a_pods(c)]),
                      c.kubectl("get", "events", "-n", NS, check=False)[-3000:]]
                     + [c.kubectl("logs", "-n", NS, p["metadata"]["name"], check=False)[-4000:]
                        for p in e2a_pods(c)])


def leftovers(c: Cluster) -> dict[str, int]:
    """The sandboxes' objects, but the warm pool's."""
    return {kind: len(c.json("get", kind, "-n", SANDBOX_NS, "-l", "e2a.dev/owner!=pool")[
        "items"]) for kind in KINDS}


@pytest.fixture(scope="module")
def deployed(cluster):
    """e2a applied from the manifests and rolled out: (cluster, API key, the ready pods' IPs)."""
    subprocess.run([ROOT / "scripts/test-services.sh"], check=True)
    reset_database()
    ref = import_image(cluster)
    node = cluster.json("get", "nodes")["items"][0]
    apiserver = next(a["address"] for a in node["status"]["addresses"]
                     if a["type"] == "InternalIP")
    instance = "dp" + secrets.token_hex(3)
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="e2a-deploy-") as tmp:
        kdir = overlay(Path(tmp), ref, instance, apiserver)
        try:
            started = time.monotonic()
            kubectl(cluster, "apply", "-k", str(kdir))
            # The bridge's gateway address, where the pods reach PostgreSQL, exists once the
            # cluster runs a pod: serve it from then on (the pods' first tries may fail and
            # be restarted by the kubelet, as any pod whose database is late).
            wait_for(lambda: any(p["status"].get("podIP") for p in e2a_pods(cluster)), 120)
            subprocess.run([ROOT / "scripts/test-services.sh"], check=True)
            kubectl(cluster, "-n", NS, "rollout", "status", "deploy/e2a", "--timeout=600s",
                    timeout=660)
            print(f"apply to rollout: {time.monotonic() - started:.1f} s")

            def ready() -> list[dict]:
                return [p for p in e2a_pods(cluster)
                        if not p["metadata"].get("deletionTimestamp")
                        and any(c["type"] == "Ready" and c["status"] == "True"
                                for c in p["status"].get("conditions", []))]
            # both replicas (rollout status may answer while one is still being replaced)
            pods = wait_for(lambda: len(ready()) == 2 and ready(), 120)
            ips = [p["status"]["podIP"] for p in pods]
            try:  # in a ready pod (`deploy/e2a` may pick one that is not, and is restarted)
                # (a Python CLI in a pod of 2 cores' node just after the image's import and
                # both replicas' start: it once took over 60 s there)
                out = kubectl(cluster, "exec", "-n", NS, pods[0]["metadata"]["name"], "--",
                              "e2a", "admin", "create-user", f"deploy{instance}@example.com",
                              timeout=180)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{e2a_logs(cluster)}") from None
            key = next(line.split("=", 1)[1] for line in out.splitlines()
                       if line.startswith("api_key="))
            yield cluster, key, ips, started
        finally:
            for pod in e2a_pods(cluster):  # for the record when something failed
                print(cluster.kubectl("logs", "-n", NS, pod["metadata"]["name"], "--tail=30",
                                      check=False))
            cluster.kubectl("delete", "-k", str(kdir), "--ignore-not-found", "--wait=true",
                            "--timeout=180s", check=False)
            reset_database()


def test_in_cluster_e2a_runs_a_sandbox(deployed):
    c, key, ips, started = deployed
    assert len(ips) == 2, ips
    assert httpx.get(f"http://{ips[0]}:8080/health", timeout=10).json()["status"] == "ok"
    with E2A(f"http://{ips[0]}:8080", key) as api:
        sb = api.create_sandbox("standard", idle_timeout_seconds=300)
        print(f"apply to a running sandbox: {time.monotonic() - started:.1f} s")
        try:
            pod = c.json("get", "pod", "-n", SANDBOX_NS, sb.vm_id.replace("_", "-"))
            assert pod["spec"]["runtimeClassName"] == "gvisor"
            r = api.run(sb.vm_id, "echo in-cluster $((6 * 7)); whoami")
            assert (r.exit_code, r.stdout) == (0, "in-cluster 42\nuser\n")
        finally:
            try:
                api.kill(sb.vm_id)
            except httpx.HTTPError as exc:
                raise AssertionError(f"delete: {exc!r}\n{e2a_logs(c)}") from None
    # The pod is gone before the sandbox is reported destroyed; the rest with it.
    assert wait_for(lambda: leftovers(c) == dict.fromkeys(KINDS, 0), 60)


def test_replicas_share_sandboxes(deployed):
    """One replica makes the sandbox, the other runs in it and deletes it."""
    c, key, ips, _ = deployed
    a, b = (E2A(f"http://{ip}:8080", key) for ip in ips)
    with a, b:
        try:
            wait_for(lambda: warm_pods(ips[0]) == 1, 120)
        except AssertionError:
            raise AssertionError(f"no warm pod: {e2a_logs(c)}") from None
        sb = a.create_sandbox("standard", idle_timeout_seconds=300)
        try:  # from the warm pool: in the cluster, with e2a's own service account
            try:
                events = b.events(sb.vm_id)
            except httpx.HTTPError as exc:
                raise AssertionError(f"the other replica: {exc!r}\n{e2a_logs(c)}") from None
            assert "claimed" in [e.reason for e in events], e2a_logs(c)
            r = b.run(sb.vm_id, "echo from the other replica")
            assert r.stdout == "from the other replica\n"
            b.kill(sb.vm_id)
            assert a.get_sandbox(sb.vm_id).state == "destroyed"
        finally:
            try:
                a.kill(sb.vm_id)
            except E2AError:
                pass
    assert wait_for(lambda: leftovers(c) == dict.fromkeys(KINDS, 0), 60)


def can(c: Cluster, *args: str) -> bool:
    return c.kubectl("auth", "can-i", f"--as={SA}", *args, check=False).strip() == "yes"


def test_rbac_allows_what_e2a_calls_and_nothing_else(deployed):
    c = deployed[0]
    needed = {"pods": ["create", "get", "list", "watch", "delete", "patch"],
              "secrets": ["create", "delete"],
              "networkpolicies.networking.k8s.io": ["create", "delete", "patch"]}
    for resource, verbs in needed.items():
        for verb in verbs:
            assert can(c, verb, resource, "-n", SANDBOX_NS), (verb, resource)
    assert can(c, "get", "runtimeclasses.node.k8s.io/gvisor")
    assert can(c, "list", "nodes")
    refused = [
        ("get", "secrets", "-n", SANDBOX_NS),        # made and deleted, never read back
        ("list", "secrets", "-n", SANDBOX_NS),
        ("get", "secrets", "-n", "kube-system"),
        ("create", "pods", "-n", "kube-system"),
        ("create", "pods", "-n", NS),                # not even in its own namespace
        ("list", "pods", "--all-namespaces"),        # cluster-wide
        ("create", "pods", "--subresource=exec", "-n", SANDBOX_NS),  # no shell in a pod
        ("get", "pods", "--subresource=log", "-n", SANDBOX_NS),
        ("update", "pods", "-n", SANDBOX_NS),
        ("get", "nodes"),
        ("get", "runtimeclasses.node.k8s.io/runc"),
        ("create", "rolebindings.rbac.authorization.k8s.io", "-n", SANDBOX_NS),
        ("delete", "namespaces"),
    ]
    for args in refused:
        assert not can(c, *args), args
    assert not can(c, "patch", "secrets", "-n", SANDBOX_NS)  # a patch answers with the secret


def test_the_sandbox_namespace_admits_only_sandbox_shaped_pods(deployed):
    """With e2a's own service account (as a stolen token would be used), a pod outside the
    shape of a sandbox is refused by the admission policy (deploy/kubernetes/base)."""
    c = deployed[0]
    user = {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}}  # what the policy asks of every container
    sandboxish = {"runtimeClassName": "gvisor", "automountServiceAccountToken": False,
                  "containers": [{"name": "x", "image": "e2a.local/none:0",
                                  "securityContext": user}]}

    def container(**context) -> dict:
        return {**sandboxish, "containers": [{
            "name": "x", "image": "e2a.local/none:0", "securityContext": context}]}
    bad = {
        "no gVisor": {**sandboxish, "runtimeClassName": None},
        "the node's files": {**sandboxish, "volumes": [{"name": "h", "hostPath": {"path": "/"}}]},
        "the node's network": {**sandboxish, "hostNetwork": True},
        "a token": {**sandboxish, "automountServiceAccountToken": True},
        "privileged": {**sandboxish, "containers": [{
            "name": "x", "image": "e2a.local/none:0", "securityContext": {"privileged": True}}]},
        "a second container": {**sandboxish, "containers": [
            *sandboxish["containers"], {"name": "y", "image": "e2a.local/none:0"}]},
        "an NFS volume": {**sandboxish, "volumes": [{"name": "n", "nfs": {
            "server": "10.0.0.1", "path": "/"}}]},
        "SYS_ADMIN": container(**{**user, "capabilities": {"drop": ["ALL"],
                                                           "add": ["SYS_ADMIN"]}}),
        "root": container(**{**user, "runAsNonRoot": False, "runAsUser": 0}),
        "root, by the image's user": container(
            **{k: v for k, v in user.items() if k not in ("runAsNonRoot", "runAsUser")}),
        "uid 0, said non-root": container(**{**user, "runAsUser": 0}),
        "a privilege escalation": container(**{**user, "allowPrivilegeEscalation": True}),
        "Docker's default capabilities": container(**{**user, "capabilities": {}}),
        "NET_RAW back": container(**{**user, "capabilities": {"drop": ["ALL"],
                                                              "add": ["NET_RAW"]}}),
        "no security context": {**sandboxish, "containers": [
            {"name": "x", "image": "e2a.local/none:0"}]},
    }
    # a workspace's mount is allowed, only the agent's for the pod's own sandbox, and only the
    # seeding copy as an init container (dry runs: admission is checked, nothing starts)
    home = "/var/lib/e2a-node/mounts/sbx_attack/home"
    seed = {"name": "seed-home", "image": "e2a.local/none:0",
            "command": ["/bin/cp", "-a", "--no-preserve=ownership", "/home/user/.", "/seed/"],
            "volumeMounts": [{"name": "home", "mountPath": "/seed"}],
            "securityContext": user}
    copy = {**seed, "name": "seed-writable", "command": [
        "/bin/cp", "-a", "--parents", "/tmp", "/home/user", "/seed/"],
        "volumeMounts": [{"name": "writable", "mountPath": "/seed"}]}
    workspace = {**sandboxish, "volumes": [
        {"name": "home", "hostPath": {"path": home, "type": "Directory"}}]}
    both = {**sandboxish, "volumes": [*workspace["volumes"],
                                      {"name": "writable", "emptyDir": {}}]}
    bad |= {
        "another sandbox's workspace": {**sandboxish, "volumes": [{"name": "home", "hostPath": {
            "path": "/var/lib/e2a-node/mounts/sbx_victim/home", "type": "Directory"}}]},
        "its mount's directory (the cache, rclone's socket)": {**sandboxish, "volumes": [{
            "name": "home", "hostPath": {"path": home.removesuffix("/home"),
                                         "type": "Directory"}}]},
        "its workspace, any type": {**sandboxish, "volumes": [{"name": "home", "hostPath": {
            "path": home}}]},
        "an init container of its own": {**workspace, "initContainers": [
            {**seed, "command": ["/bin/sh", "-c", "cat /seed/x"]}]},
        "the seeding copy with SYS_ADMIN": {**workspace, "initContainers": [
            {**seed, "securityContext": {**user, "capabilities": {"drop": ["ALL"],
                                                                  "add": ["SYS_ADMIN"]}}}]},
        "the seeding copy as root": {**workspace, "initContainers": [
            {**seed, "securityContext": {**user, "runAsNonRoot": False, "runAsUser": 0}}]},
        "the seeding copy keeping its capabilities": {**workspace, "initContainers": [
            {**seed, "securityContext": {}}]},
        "a writable path's copy doing more": {**both, "initContainers": [
            {**copy, "command": ["/bin/cp", "-a", "--parents", "/tmp", "-t", "/x", "/seed/"]}]},
        "a writable path's copy into another volume": {**both, "initContainers": [
            {**copy, "volumeMounts": [{"name": "home", "mountPath": "/seed"}]}]},
        "a third init container": {**both, "initContainers": [
            seed, copy, {**copy, "name": "seed-more"}]},
    }
    good = {"a workspace, seeded": {**workspace, "initContainers": [seed]},
            "a read-only root's copies, and a workspace": {**both, "initContainers": [
                copy, seed]}}
    for what, spec in [*bad.items(), *good.items()]:
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "sbx-attack", "namespace": SANDBOX_NS},
               "spec": {k: v for k, v in spec.items() if v is not None}}
        r = dry_run(c, pod)
        if what in good:
            assert r.returncode == 0, (what, r.stderr)
            continue
        # (the test cluster's API server refuses privileged containers itself, before
        # admission: --allow-privileged=false)
        assert r.returncode != 0 and ("ValidatingAdmissionPolicy" in r.stderr or (
            what == "privileged" and "disallowed by cluster policy" in r.stderr)), \
            (what, r.stderr)
    assert not c.json("get", "pods", "-n", SANDBOX_NS, "--field-selector",
                      "metadata.name=sbx-attack")["items"]
    # and the pods e2a itself makes (E2A_KUBE_NON_ROOT, the default) for a new workspace,
    # with a read-only root or not, and for no workspace with a read-only root, are admitted;
    # its root pods (E2A_KUBE_NON_ROOT=false) only where the namespace says root is wanted
    # (components/root-sandboxes), which e2a's own account cannot say
    def e2a_pod(non_root: bool, writable: tuple[str, ...] | None = None, **place) -> dict:
        return manifests.pod(manifests.PodPlan(
            sandbox_id="sbx_attack", instance="x", template="standard", user_id="usr_x",
            image="e2a.local/none:0", vcpu=1, cpu_fraction=0.5, memory_mib=256, disk_mib=512,
            internet=False, envd_token="t", writable=writable, non_root=non_root, **place),
            SANDBOX_NS)

    for non_root in (True, False):
        for place, writable in (({"node": "somewhere", "home": home, "seed_home": True}, None),
                                ({"node": "somewhere", "home": home, "seed_home": True},
                                 ("/tmp", "/var/tmp")),
                                ({}, ("/tmp",)), ({}, None)):
            r = dry_run(c, e2a_pod(non_root, writable, **place))
            assert (r.returncode == 0) == non_root, (non_root, place, writable, r.stderr)
    label = ["label", "namespace", SANDBOX_NS]
    r = as_e2a(c, *label, "e2a.dev/root-sandboxes=true")
    assert r.returncode != 0 and "forbidden" in r.stderr, r.stderr
    c.kubectl(*label, "e2a.dev/root-sandboxes=true")  # as the cluster's admin
    try:
        for non_root in (True, False):
            r = dry_run(c, e2a_pod(non_root))
            assert r.returncode == 0, (non_root, r.stderr)
        assert dry_run(c, {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": "sbx-attack", "namespace": SANDBOX_NS}, "spec": bad["SYS_ADMIN"]}
                       ).returncode != 0  # the rest holds there too
    finally:
        c.kubectl(*label, "e2a.dev/root-sandboxes-")


def as_e2a(c: Cluster, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """kubectl as e2a's service account (as a stolen token would be used)."""
    return subprocess.run([c.bin / "kubectl", "--kubeconfig", c.kubeconfig, *args, f"--as={SA}"],
                          input=input, capture_output=True, text=True, timeout=60)


def dry_run(c: Cluster, pod: dict) -> subprocess.CompletedProcess:
    """A create of `pod` by e2a's service account, checked by the API server's admission,
    nothing started."""
    return as_e2a(c, "create", "-f", "-", "--dry-run=server", input=json.dumps(pod))
