"""Attacks on a read-only root (E2A_KUBE_READ_ONLY_ROOT, the default), as root inside the
sandbox pod (E2A_KUBE_NON_ROOT=false, the strongest position a tenant's code can have): the
image cannot be written, nor made writable again through a remount (several of these fail for
want of CAP_SYS_ADMIN too: what is asserted is that nothing lands in the image), or reached
through another view of it; and the
writable paths are no way around the sandbox's disk: filling them past it ends the sandbox
(the kubelet evicts its pod), with nothing left behind."""

from __future__ import annotations

import pytest

from e2a.kube.manifests import pod_name
from e2a.sdk import E2A
from tests.conftest import wait_for
from tests.kube.cluster import NAMESPACE, another_replica

pytestmark = pytest.mark.kube


@pytest.fixture(scope="module")
def root_client(cluster, kserver):
    with another_replica(kserver, "roattack", E2A_KUBE_NON_ROOT="false") as srv:
        with E2A(srv.url, srv.create_user("roattack@example.com")) as sdk:
            yield sdk


def test_root_cannot_make_the_image_writable(cluster, root_client):
    sb = root_client.create_sandbox("standard", idle_timeout_seconds=600)
    try:
        # root itself, plainly: the image's mount says no (not the file's mode)
        run = root_client.run(sb.vm_id, "touch /usr/bin/e2a-owned", user="root")
        assert run.exit_code != 0 and "Read-only file system" in run.stderr, run
        tries = {
            "remount": "mount -o remount,rw / && touch /usr/bin/e2a-owned",
            "a remount in a user namespace of its own":
                "unshare -Urm sh -c 'mount -o remount,rw / && touch /usr/bin/e2a-owned'",
            "a new mount over it": "mount -t tmpfs none /usr/bin && touch /usr/bin/e2a-owned",
            "envd's view": "touch /proc/1/root/usr/bin/e2a-owned",
            "a hard link out of /tmp": "ln /usr/bin/env /tmp/env && echo x >> /tmp/env",
            "a bind mount": "mount --bind /tmp /usr/bin && touch /usr/bin/e2a-owned",
        }
        for what, cmd in tries.items():
            run = root_client.run(sb.vm_id, cmd, user="root")
            assert run.exit_code != 0, (what, run)
        run = root_client.run(sb.vm_id, "ls /usr/bin | grep -c e2a-owned", user="root")
        assert run.stdout.strip() == "0", run  # nothing written in the image
        mounts = root_client.run(sb.vm_id, "cat /proc/mounts").stdout
        root = [m for m in mounts.splitlines() if m.split()[1] == "/"]
        assert root and root[0].split()[3].startswith("ro"), mounts
    finally:
        root_client.kill(sb.vm_id)


def test_filling_the_writable_paths_past_the_disk_ends_the_sandbox(cluster, root_client):
    """The writable paths are one emptyDir limited to the template's disk: past it, the
    kubelet evicts the pod, and e2a ends the sandbox saying so, its objects gone."""
    sb = root_client.create_sandbox("standard", idle_timeout_seconds=600)
    root_client.run_background(
        sb.vm_id, "fallocate -l 2200M /tmp/fill || dd if=/dev/zero of=/tmp/fill bs=1M")
    wait_for(lambda: root_client.get_sandbox(sb.vm_id).state == "destroyed", timeout=120,
             interval=1)
    got = root_client.get_sandbox(sb.vm_id)
    assert got.end_reason == "crashed", got
    detail = root_client.events(sb.vm_id)[-1].detail
    assert "Evicted" in detail and "writable" in detail, detail
    name = pod_name(sb.vm_id)  # its pod, secret and policy
    wait_for(lambda: not any(cluster.json("get", kind, "-n", NAMESPACE, "--field-selector",
                                          f"metadata.name={name}")["items"]
                             for kind in ("pods", "secrets", "networkpolicies")), timeout=30)
