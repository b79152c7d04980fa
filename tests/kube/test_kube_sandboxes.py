"""Sandboxes on the Kubernetes backend, through the same API and SDK as the embedded one: a
real cluster, real gVisor pods (tests/kube/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import websockets

from e2a.kube import manifests
from e2a.sdk import E2A, E2AError
from tests.conftest import wait_for
from tests.kube.cluster import NAMESPACE

pytestmark = pytest.mark.kube  # one cluster per machine: run apart from xdist (Makefile)


@pytest.fixture(scope="module")
def alice(kube_clients):
    return kube_clients["alice"]


@pytest.fixture(scope="module")
def bob(kube_clients):
    return kube_clients["bob"]


@pytest.fixture
def sandbox(alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    yield sb
    try:
        alice.kill(sb.vm_id)
    except E2AError:
        pass


def pod_name(vm_id: str) -> str:
    return vm_id.replace("_", "-")


def sandbox_processes(cluster, pod: str) -> list[int]:
    """The host's runsc-sandbox process of a pod: its command line names the pod's sandbox
    container (containerd's id of the pod's pause container)."""
    ids = [c.split()[0] for c in cluster.ctr("containers", "ls").splitlines()[1:]]
    info = {}
    for i in ids:
        try:
            info[i] = cluster.ctr("containers", "info", i)
        except subprocess.CalledProcessError:
            pass  # removed since the list (another pod's)
    mine = [i for i, text in info.items() if f'"io.kubernetes.pod.name": "{pod}"' in text]
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0] == b"runsc-sandbox" and any(i.encode() in b" ".join(argv) for i in mine):
            found.append(int(proc.name))
    return found


def ended(client: E2A, vm_id: str) -> str | None:
    sb = client.get_sandbox(vm_id)
    return sb.end_reason if sb.state == "destroyed" else None


def test_a_sandbox_is_a_gvisor_pod_with_its_own_policy_and_secret(cluster, alice, sandbox):
    pod = cluster.json("get", "pod", pod_name(sandbox.vm_id), "-n", NAMESPACE)
    spec = pod["spec"]
    assert spec["runtimeClassName"] == "gvisor"
    assert spec["automountServiceAccountToken"] is False
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    (c,) = spec["containers"]
    assert c["resources"]["limits"]["memory"] == c["resources"]["requests"]["memory"]
    assert c["securityContext"]["privileged"] is False
    assert "ALL" in c["securityContext"]["capabilities"]["drop"]
    # envd's token is in a Secret, never in the pod's spec
    assert "E2A_ENVD_TOKEN" not in json.dumps(pod)
    labels = pod["metadata"]["labels"]
    assert labels[manifests.SANDBOX] == pod_name(sandbox.vm_id)
    assert labels[manifests.TEMPLATE] == "standard"
    assert labels[manifests.OWNER] not in json.dumps(alice.get_sandbox(sandbox.vm_id).__dict__,
                                                     default=str)
    policy = cluster.json("get", "networkpolicy", pod_name(sandbox.vm_id), "-n", NAMESPACE)
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    # inside: gVisor's kernel, not the host's
    r = alice.run(sandbox.vm_id, "dmesg | head -1; uname -r")
    assert r.ok and "gVisor" in r.stdout, r.stdout


def test_lifecycle_commands_files_and_events(cluster, alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600, metadata={"k": "v"})
    assert sb.state == "running"
    assert [s.vm_id for s in alice.list_sandboxes()] == [sb.vm_id]
    assert alice.get_sandbox(sb.vm_id).metadata == {"k": "v"}
    r = alice.run(sb.vm_id, "echo hi; echo err >&2; exit 3")
    assert (r.stdout, r.stderr, r.exit_code) == ("hi\n", "err\n", 3)
    alice.files.write(sb.vm_id, "/home/user/a.txt", b"on kubernetes\n")
    assert alice.files.read_bytes(sb.vm_id, "/home/user/a.txt") == b"on kubernetes\n"
    assert alice.run(sb.vm_id, "cat /home/user/a.txt").stdout == "on kubernetes\n"
    assert alice.run(sb.vm_id, "whoami").stdout == "user\n"
    # envd's token does not reach commands
    assert "E2A_ENVD_TOKEN" not in alice.run(sb.vm_id, "env").stdout
    alice.kill(sb.vm_id)
    assert alice.get_sandbox(sb.vm_id).state == "destroyed"
    assert ended(alice, sb.vm_id) == "deleted"
    states = [e.to_state for e in alice.events(sb.vm_id)]
    assert states == ["creating", "configuring", "booting", "running", "stopping", "destroyed"]
    assert not [p for p in cluster.pods() if p["metadata"]["name"] == pod_name(sb.vm_id)]
    assert cluster.objects() == {"pods": 0, "secrets": 0, "networkpolicies": 0}


def test_tenants_do_not_see_each_others_sandboxes(alice, bob, sandbox):
    with pytest.raises(E2AError) as e:
        bob.get_sandbox(sandbox.vm_id)
    assert e.value.status == 404
    with pytest.raises(E2AError) as e:
        bob.run(sandbox.vm_id, "true")
    assert e.value.status == 404
    assert bob.list_sandboxes() == []


def test_pty_streams_and_port_proxy(kserver, alice, sandbox):
    async def pty() -> tuple[str, int | None]:
        url = kserver.url.replace("http", "ws") + f"/v1/sandboxes/{sandbox.vm_id}/pty"
        async with websockets.connect(url, additional_headers={
                "Authorization": f"Bearer {kserver.keys['alice']}"}) as ws:
            await ws.send(b"echo pty-$((6*7)); exit 4\n")
            out, code = b"", None
            async for msg in ws:
                if isinstance(msg, bytes):
                    out += msg
                elif json.loads(msg).get("type") == "exit":
                    code = json.loads(msg)["exit_code"]
            return out.decode(errors="replace"), code
    out, code = asyncio.run(asyncio.wait_for(pty(), 60))
    relays = [line for line in kserver.log_tail(20000).splitlines() if " relay " in line]
    assert "pty-42" in out and code == 4, (out, code, relays[-3:])  # how the relay ended

    lines = [e.data for e in alice.stream(sandbox.vm_id, "for i in 1 2 3; do echo $i; sleep 0.2; done")
             if e.type == "stdout"]
    assert "".join(lines) == "1\n2\n3\n"

    alice.run_background(sandbox.vm_id, "cd /tmp && echo served > index.html && "
                                        "python3 -m http.server 8000")
    url = f"{kserver.url}/v1/sandboxes/{sandbox.vm_id}/ports/8000/index.html"
    h = {"Authorization": f"Bearer {kserver.keys['alice']}"}
    wait_for(lambda: httpx.get(url, headers=h, timeout=10).status_code == 200, timeout=30)
    assert httpx.get(url, headers=h, timeout=10).text == "served\n"


def test_a_deleted_pod_is_a_dead_sandbox_within_two_seconds(cluster, alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    t0 = time.monotonic()
    cluster.kubectl("delete", "pod", pod_name(sb.vm_id), "-n", NAMESPACE, "--wait=false",
                    "--grace-period=0", "--force")
    wait_for(lambda: ended(alice, sb.vm_id), timeout=20, interval=0.1)
    took = time.monotonic() - t0
    assert ended(alice, sb.vm_id) == "crashed"
    assert took < 10, took  # the watch's answer (the 2 s figure is bench/kube.py's)
    wait_for(lambda: cluster.objects() == {"pods": 0, "secrets": 0, "networkpolicies": 0},
             timeout=30)


def test_an_oom_killed_pod_ends_out_of_memory(alice):
    # Past the pod's limit at once the node's OOM killer takes the pod's gVisor sandbox (on the
    # embedded backend e2a steers it to the process's stub; docs/kubernetes.md)
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    with pytest.raises(E2AError) as e:
        alice.run(sb.vm_id, "python3 -c 'x = bytearray(2000 << 20); print(len(x))'")
    assert "out_of_memory" in str(e.value)
    wait_for(lambda: ended(alice, sb.vm_id), timeout=30)  # its objects deleted meanwhile
    assert ended(alice, sb.vm_id) == "out_of_memory"
    assert "OOMKilled" in alice.events(sb.vm_id)[-1].detail


def test_a_killed_sandbox_is_a_dead_sandbox_within_two_seconds(cluster, alice):
    """The host kills the pod's gVisor sandbox (as the node's OOM killer would): the watch
    sees its container end and the sandbox is destroyed, `crashed`."""
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    pids = sandbox_processes(cluster, pod_name(sb.vm_id))
    assert pids, "no runsc-sandbox process of the pod"
    t0 = time.monotonic()
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    wait_for(lambda: ended(alice, sb.vm_id), timeout=20, interval=0.1)
    assert time.monotonic() - t0 < 10
    assert ended(alice, sb.vm_id) == "crashed"
    assert "exited" in alice.events(sb.vm_id)[-1].detail or "failed" in \
        alice.events(sb.vm_id)[-1].detail
    wait_for(lambda: cluster.objects() == {"pods": 0, "secrets": 0, "networkpolicies": 0},
             timeout=30)


def test_idle_timeout_destroys_the_pod(cluster, alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=2)
    # polling with GET would count as activity: the list of destroyed ones does not
    wait_for(lambda: sb.vm_id in {s.vm_id for s in alice.list_sandboxes(state="destroyed")},
             timeout=30, interval=0.5)
    assert ended(alice, sb.vm_id) == "idle_timeout"
    wait_for(lambda: not [p for p in cluster.pods()
                          if p["metadata"]["name"] == pod_name(sb.vm_id)], timeout=30)


def test_pause_and_fork_say_they_are_not_on_this_backend(alice, sandbox):
    for call in (alice.pause, alice.fork):
        with pytest.raises(E2AError) as e:
            call(sandbox.vm_id)
        assert e.value.status == 409
        assert "Kubernetes" in str(e.value)


def test_a_restarted_server_adopts_running_pods_and_ends_gone_ones(cluster, kserver, alice):
    keep = alice.create_sandbox("standard", idle_timeout_seconds=600)
    lose = alice.create_sandbox("standard", idle_timeout_seconds=600)
    kserver.kill9()
    cluster.kubectl("delete", "pod", pod_name(lose.vm_id), "-n", NAMESPACE, "--wait=true",
                    "--grace-period=0", "--force")
    kserver.start()
    assert alice.get_sandbox(keep.vm_id).state == "running"
    assert alice.run(keep.vm_id, "echo still").stdout == "still\n"
    assert ended(alice, lose.vm_id) == "server_restart"
    alice.kill(keep.vm_id)
    wait_for(lambda: cluster.objects() == {"pods": 0, "secrets": 0, "networkpolicies": 0},
             timeout=30)
