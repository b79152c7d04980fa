"""Fixtures of the Kubernetes backend's tests (tests/kube and tests/security): a real single-node
cluster (scripts/k8s/cluster.sh) with a gVisor RuntimeClass, and a real `e2a serve` with
E2A_BACKEND=kubernetes in front of it.

The cluster is one per machine (a kubelet owns host-wide names), so every test that uses it is
marked `kube` and runs in a pytest of its own after the rest (Makefile); it starts once, on first
use, and is removed with every trace at the end. The root conftest imports these fixtures, so
both suites share them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx

import pytest

from e2a.config import Settings
from e2a.kube import images
from e2a.templates import recipes

ROOT = Path(__file__).resolve().parents[2]
E2A = str(Path(sys.executable).parent / "e2a")
WS_QUOTA_MIB = 64  # the workspace server's quota per user
CLUSTER_DIR = Path("/tmp/e2a-test/k8s")
NAMESPACE = "e2a-sandboxes"
POD_GATEWAY = "10.244.0.1/32"  # the host's address on the pod bridge: where e2a connects from


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.kubeconfig = root / "admin.kubeconfig"
        self.bin = Path(subprocess.run([ROOT / "scripts/k8s/build.sh"], check=True,
                                       capture_output=True, text=True).stdout.split()[-1]) / "bin"

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        return subprocess.run([self.bin / "kubectl", "--kubeconfig", self.kubeconfig, *args],
                              check=check, capture_output=True, text=True, input=input,
                              timeout=60).stdout

    def ctr(self, *args: str) -> str:
        return subprocess.run([self.bin / "ctr", "-a", self.root / "containerd/containerd.sock",
                               "-n", "k8s.io", *args], check=True, capture_output=True,
                              text=True, timeout=60).stdout

    def json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def pods(self) -> list[dict]:
        return self.json("get", "pods", "-n", NAMESPACE)["items"]

    def objects(self) -> dict[str, int]:
        """This namespace's sandbox objects, for leak checks."""
        return {kind: len(self.json("get", kind, "-n", NAMESPACE)["items"])
                for kind in ("pods", "secrets", "networkpolicies")}


@pytest.fixture(scope="session")
def cluster():
    """Started and removed here; with E2A_TEST_K8S_REUSE=1, a cluster already up in
    CLUSTER_DIR is used and left up (for working on the backend: several pytest runs, and
    several people, share one cluster without paying its start each time)."""
    script = ROOT / "scripts/k8s/cluster.sh"
    reuse = os.environ.get("E2A_TEST_K8S_REUSE") == "1"
    if not reuse:
        subprocess.run([script, "down", CLUSTER_DIR], check=False)
        subprocess.run([script, "up", CLUSTER_DIR], check=True)
    c = Cluster(CLUSTER_DIR)
    # PostgreSQL on the pod bridge's address too (for e2a's own pods, test_kube_deploy.py):
    # restarted here, if at all, before any test's e2a holds a connection to it
    subprocess.run([ROOT / "scripts/test-services.sh"], check=True)
    try:
        if NAMESPACE not in c.kubectl("get", "namespaces", "-o", "name"):
            c.kubectl("create", "namespace", NAMESPACE)
        settings = Settings(envd=str(ROOT / "build/envd"))
        images.import_to(settings, recipes.load("standard"), str(c.bin / "ctr"),
                         str(CLUSTER_DIR / "containerd/containerd.sock"))
        yield c
    finally:
        if not reuse:
            subprocess.run([script, "down", CLUSTER_DIR], check=False)


def pg_database(name: str) -> str:
    """A new, empty PostgreSQL database of the tests' role (scripts/test-services.sh starts
    the server); its URL. Replicas of one e2a share one, as in production."""
    for sql in (f"drop database if exists {name} with (force)",
                f"create database {name} owner e2a_test"):
        subprocess.run(["su", "postgres", "-c", f'psql -qc "{sql}"'], check=True,
                       capture_output=True)
    return f"postgresql+asyncpg://e2a_test:e2a_test@127.0.0.1/{name}"


def kube_env(c: Cluster, database: str) -> dict[str, str]:
    from cryptography.fernet import Fernet
    return {"E2A_BACKEND": "kubernetes", "E2A_KUBE_CONFIG": str(c.kubeconfig),
            "E2A_KUBE_NAMESPACE": NAMESPACE, "E2A_KUBE_API_CIDRS": json.dumps([POD_GATEWAY]),
            # the test cluster's bridge CNI enforces no NetworkPolicy (docs/kubernetes.md)
            "E2A_KUBE_ALLOW_UNENFORCED_POLICIES": "true",
            "E2A_ENVD": str(ROOT / "build/envd"),
            # agents: pods reach each replica's egress proxy at the host's bridge address
            "E2A_KUBE_EGRESS_HOST": POD_GATEWAY.removesuffix("/32"),
            # what replicas of one e2a share: the database and the keys
            "E2A_DATABASE_URL": pg_database(database),
            "E2A_AGENT_KEY": secrets.token_hex(32),
            "E2A_SECRETS_KEY": Fernet.generate_key().decode()}


# The opt-out of the restricted pod (docs/kubernetes.md): envd as root in gVisor, the image
# writable, as on the embedded backend.
ROOT_SHAPE = {"E2A_KUBE_NON_ROOT": "false", "E2A_KUBE_READ_ONLY_ROOT": "false"}


def replica_of(srv, tag: str):
    """Another replica of the e2a `srv` runs (same instance, database and keys), not started."""
    from tests.e2e.server import Server
    other = Server(instance=srv.instance, subnet=srv.subnet,
                   base=srv.base.with_name(f"{srv.base.name}-{tag}"))
    other.extra_env = dict(srv.extra_env)
    other.keys = srv.keys
    return other


@contextlib.contextmanager
def another_replica(srv, tag: str, **env: str):
    """Another replica of `srv`, started (with `env` over its settings); stopped and its
    directory gone after."""
    other = replica_of(srv, tag)
    other.extra_env = {**other.extra_env, **env}
    other.cleanup()
    try:
        other.start()
        yield other
    finally:
        other.cleanup()


@contextlib.contextmanager
def replica_user(srv, tag: str, **env: str):
    """Another replica of `srv` with `env` over its settings (another_replica), and a new user
    of it: (an httpx client and an SDK client with that user's key)."""
    import httpx

    from e2a.sdk import E2A
    with another_replica(srv, tag, **env) as other:
        key = other.create_user(f"{tag}@example.com")
        with httpx.Client(base_url=other.url, timeout=120,
                          headers={"Authorization": f"Bearer {key}"}) as http, \
                E2A(other.url, key) as sdk:
            yield http, sdk


@pytest.fixture(scope="session")
def kserver(cluster, mailbox):
    from tests.conftest import new_server  # the root conftest imports this module
    srv = new_server("kube")
    srv.extra_env = kube_env(cluster, "e2a_kube")
    srv.cleanup()
    srv.start()
    srv.keys = {"alice": srv.create_user(f"kalice{os.getpid()}@example.com"),
                "bob": srv.create_user(f"kbob{os.getpid()}@example.com")}
    yield srv
    srv.stop()
    srv.cleanup()


@pytest.fixture(scope="session")
def kube_clients(kserver):
    """SDK clients of the Kubernetes server's two users, by name."""
    from e2a.sdk import E2A
    clients = {name: E2A(kserver.url, key) for name, key in kserver.keys.items()}
    yield clients
    for c in clients.values():
        c.close()


@pytest.fixture(scope="session")
def wserver(cluster):
    """A Kubernetes e2a with workspaces (tests/kube/test_kube_workspaces.py and its attacks in
    tests/security): a real S3 server and the node agent, as a host process of the test
    cluster's one node, started first."""
    from e2a.workspaces.server import EmbeddedS3
    from tests.conftest import own_server
    from tests.e2e.server import free_port
    token = secrets.token_urlsafe(24)
    agent_port = free_port()
    with own_server("kubews") as srv:
        data = srv.base / "data"
        s3 = EmbeddedS3(Settings(data_dir=data, s3_port=srv.s3_port))  # srv.cleanup stops it
        asyncio.run(s3.start())
        ep = s3.endpoint()
        store = {"E2A_S3_ENDPOINT": ep.url, "E2A_S3_ACCESS_KEY": ep.access_key,
                 "E2A_S3_SECRET_KEY": ep.secret_key, "E2A_KUBE_NODE_TOKEN": token,
                 "E2A_KUBE_NODE_PORT": str(agent_port)}
        agent_env = {**os.environ, **store, "E2A_DATA_DIR": str(srv.base / "node"),
                     "E2A_DISK_GIB": "2"}
        log = open(srv.base / "agent.log", "ab")
        agent = subprocess.Popen([E2A, "node-agent", "--port", str(agent_port)], env=agent_env,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_answers(f"http://127.0.0.1:{agent_port}/v1/mounts", agent)
            srv.extra_env = {**kube_env(cluster, "e2a_kubews"), **store,
                             "E2A_WORKSPACE_QUOTA_MIB": str(WS_QUOTA_MIB)}
            srv.start()
            srv.agent_url, srv.agent_token, srv.secret_key = \
                f"http://127.0.0.1:{agent_port}", token, ep.secret_key
            yield srv
            srv.stop()
        finally:
            agent.terminate()
            agent.wait(timeout=30)


def wait_answers(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the node agent exited"
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("the node agent did not answer")


def agent_mounts(srv) -> list[dict]:
    r = httpx.get(f"{srv.agent_url}/v1/mounts",
                  headers={"Authorization": f"Bearer {srv.agent_token}"})
    assert r.status_code == 200, r.text
    return r.json()["mounts"]


def fuse_mounts(srv) -> list[str]:
    return [line.split()[1] for line in open("/proc/mounts")
            if line.split()[2] == "fuse.rclone" and line.split()[1].startswith(str(srv.base))]
