"""e2a refuses a cluster whose CNI does not enforce NetworkPolicy (the test cluster's bridge
plugin does not), unless a setting accepts the risk: a probe pod under a deny-all policy must
become unreachable (e2a/kube/policy_probe.py)."""

from __future__ import annotations

import pytest

from tests.kube.cluster import NAMESPACE, kube_env

pytestmark = pytest.mark.kube  # one cluster per machine: run apart from xdist (Makefile)


def test_e2a_does_not_start_where_policies_are_not_enforced(cluster, mailbox):
    from tests.conftest import own_server
    env = kube_env(cluster, "e2a_kubeprobe")
    del env["E2A_KUBE_ALLOW_UNENFORCED_POLICIES"]
    with own_server("kubeprobe", **env) as srv:
        with pytest.raises(RuntimeError) as e:
            srv.start()
        assert "does not enforce NetworkPolicy" in str(e.value)
        assert "E2A_KUBE_ALLOW_UNENFORCED_POLICIES" in str(e.value)
    # the probe's pod, secret and policy are gone with it
    assert cluster.objects() == {"pods": 0, "secrets": 0, "networkpolicies": 0}
    assert not cluster.json("get", "pods", "-n", NAMESPACE)["items"]


def test_replicas_starting_together_each_probe_and_each_refuse(cluster, mailbox):
    """Each replica's probe pod is its own (a shared one, deleted by the other's start, read as
    'unreachable, so enforced')."""
    import threading

    from tests.conftest import own_server
    from tests.kube.cluster import replica_of
    env = kube_env(cluster, "e2a_kubeprobe")
    del env["E2A_KUBE_ALLOW_UNENFORCED_POLICIES"]
    with own_server("kubeprobe", **env) as first:
        second = replica_of(first, "b")
        said: dict[str, str] = {}

        def start(name, srv):
            try:
                srv.start()
                said[name] = "started"
            except RuntimeError as exc:
                said[name] = str(exc)
        threads = [threading.Thread(target=start, args=x) for x in
                   (("first", first), ("second", second))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        second.stop()
        second.cleanup()
        assert all("does not enforce NetworkPolicy" in v for v in said.values()), said
    assert cluster.objects() == {"pods": 0, "secrets": 0, "networkpolicies": 0}


def test_a_create_past_the_clusters_room_is_a_409(cluster, mailbox):
    """With a core requested per vCPU, the test node (2 cores) holds 4 standard sandboxes
    (0.5 vCPU each): the fifth is refused, with nothing made for it."""
    from e2a.sdk import E2A, E2AError
    from tests.conftest import own_server
    env = {**kube_env(cluster, "e2a_kubeprobe"), "E2A_KUBE_CPU_REQUEST_RATIO": "1"}
    with own_server("kubeprobe", **env) as srv:
        srv.start()
        with E2A(srv.url, srv.create_user("room@example.com")) as c:
            made = []
            try:  # a failure leaves no pod to weigh on the tests after it
                for _ in range(4):
                    made.append(c.create_sandbox("standard", idle_timeout_seconds=600))
                before = cluster.objects()
                with pytest.raises(E2AError) as e:
                    c.create_sandbox("standard")
                assert (e.value.status, e.value.code) == (409, "no_capacity")
                assert cluster.objects() == before
                c.kill(made.pop(0).vm_id)
                c.kill(c.create_sandbox("standard").vm_id)  # room again
            finally:
                for sb in made:
                    c.kill(sb.vm_id)
        srv.stop()
    assert cluster.objects() == {"pods": 0, "secrets": 0, "networkpolicies": 0}
