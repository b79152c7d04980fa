"""Which nodes sandboxes may go to (e2a/kube/cluster.py `Runtime`, node_mounts.place): those
the RuntimeClass's node selector names, whose NoSchedule/NoExecute taints its tolerations
tolerate, by Kubernetes' matching rules. The cluster as the placement reads it is a stand-in
here (nodes and pods as lightkube gives them); on the test cluster it is
tests/kube/test_kube_placement.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from e2a.kube.cluster import NodeRoom, Runtime
from e2a.kube.node_mounts import MountFailed, NodeMounts

GVISOR = ("sandbox.gke.io/runtime", "gvisor", "NoSchedule")


def node(name: str, labels=None, taints=(), memory=8192, ready=True) -> NodeRoom:
    return NodeRoom(name, f"10.0.0.{len(name)}", 4000, memory, ready=ready,
                    labels=dict(labels or {}), taints=list(taints))


@pytest.mark.parametrize("toleration, taint, tolerated", [
    ({"key": "sandbox.gke.io/runtime", "operator": "Equal", "value": "gvisor",
      "effect": "NoSchedule"}, GVISOR, True),
    ({"key": "sandbox.gke.io/runtime", "value": "gvisor"}, GVISOR, True),  # any effect, Equal
    ({"key": "sandbox.gke.io/runtime", "operator": "Equal", "value": "runc"}, GVISOR, False),
    ({"key": "sandbox.gke.io/runtime", "operator": "Exists"}, GVISOR, True),
    ({"operator": "Exists"}, GVISOR, True),                                # every taint
    ({"key": "other", "operator": "Exists"}, GVISOR, False),
    ({"key": "sandbox.gke.io/runtime", "operator": "Exists", "effect": "NoExecute"}, GVISOR,
     False),
    ({"key": "sandbox.gke.io/runtime", "operator": "Gt", "value": "gvisor"}, GVISOR, False),
    ({"key": "k", "operator": "Exists", "tolerationSeconds": 300}, ("k", "", "NoExecute"),
     False),                                             # evicted after 300 s: no room
    ({"key": "k", "operator": "Exists", "tolerationSeconds": 300}, ("k", "", "NoSchedule"),
     True),
])
def test_a_taint_is_tolerated_by_kubernetes_rules(toleration, taint, tolerated):
    assert Runtime(tolerations=[toleration]).admits(node("n", taints=[taint])) is tolerated


def test_a_node_must_match_every_selector_label_and_have_each_taint_tolerated():
    gke = Runtime(node_selector={"sandbox.gke.io/runtime": "gvisor"},
                  tolerations=[{"key": "sandbox.gke.io/runtime", "operator": "Equal",
                                "value": "gvisor", "effect": "NoSchedule"}])
    sandboxes = node("sb", labels={"sandbox.gke.io/runtime": "gvisor", "zone": "a"},
                     taints=[GVISOR])
    assert gke.admits(sandboxes)
    assert not gke.admits(node("plain"))                                    # not selected
    assert not gke.admits(node("sb2", labels={"sandbox.gke.io/runtime": "gvisor"},
                               taints=[GVISOR, ("dedicated", "db", "NoExecute")]))
    assert Runtime().admits(node("plain"))             # no scheduling: every untainted node
    assert not Runtime().admits(node("cp", taints=[("node-role.kubernetes.io/control-plane",
                                                    "", "NoSchedule")]))


class Stand:
    """The cluster as NodeMounts reads it: nodes, and e2a's pods with their requests."""

    def __init__(self, nodes: list[NodeRoom], pods=()):
        self._nodes, self._pods = nodes, list(pods)

    async def nodes(self):
        return self._nodes

    async def pods(self):
        return self._pods


def pod(node_name: str, memory: str, overhead: dict | None = None) -> SimpleNamespace:
    container = SimpleNamespace(resources=SimpleNamespace(requests={"cpu": "100m",
                                                                    "memory": memory}))
    return SimpleNamespace(spec=SimpleNamespace(nodeName=node_name, containers=[container],
                                                overhead=overhead),
                           status=SimpleNamespace(phase="Running"))


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_a_workspace_sandbox_is_placed_on_a_node_the_runtime_class_admits():
    gvisor = Runtime(node_selector={"gvisor": "yes"})
    big_plain = node("big-plain", memory=64000)                      # most room, no gVisor
    small = node("small", labels={"gvisor": "yes"}, memory=4096)
    roomy = node("roomy", labels={"gvisor": "yes"}, memory=8192)
    mounts = NodeMounts(None, Stand([big_plain, small, roomy], [pod("roomy", "6Gi")]), "t", 1)
    assert (await mounts.place("sbx_1", 500, 1024, gvisor)).name == "small"  # roomy is fuller
    mounts.placed("sbx_1")
    with pytest.raises(MountFailed):  # none of the admitted nodes has 5 GiB left
        await mounts.place("sbx_2", 500, 5 * 1024, gvisor)
    assert (await mounts.place("sbx_3", 500, 5 * 1024, Runtime())).name == "big-plain"


@pytest.mark.anyio
async def test_the_runtime_class_overhead_counts_for_the_new_pod_and_those_placed():
    """Kubernetes adds the RuntimeClass's `overhead.podFixed` to each of its pods' requests."""
    heavy = Runtime(overhead=(250, 1024))
    one = node("one", memory=4096)
    mounts = NodeMounts(None, Stand([one], [pod("one", "1Gi", {"cpu": "250m",
                                                               "memory": "1Gi"})]), "t", 1)
    # the pod placed asks 1 GiB and its overhead 1 GiB, of the node's 4
    await mounts.place("sbx_1", 500, 1024, Runtime())   # + 1 GiB: fits
    mounts.placed("sbx_1")
    with pytest.raises(MountFailed):                    # + 2 GiB and 1 of overhead: 5 > 4
        await mounts.place("sbx_2", 500, 2048, heavy)
    await mounts.place("sbx_3", 500, 1024, heavy)       # + 1 GiB and 1 of overhead: 4
