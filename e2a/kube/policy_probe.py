"""Does the cluster enforce NetworkPolicy? Asked once at start, by trying.

A CNI without policies (the bridge plugin, flannel alone) accepts NetworkPolicy objects and
ignores them: every sandbox could reach every other and the cluster. So e2a starts a probe pod
(the standard template's image: envd listens on its port), checks that it reaches it, puts a
policy that denies the pod all ingress, and tries again for a while: still reachable means
not enforced. Both objects are removed whatever the outcome. Replicas starting together each
probe with a pod of their own name.
"""

from __future__ import annotations

import asyncio
import logging
import time

from e2a.kube import manifests
from e2a.kube.cluster import Cluster
from e2a.runtime.runsc import ENVD_PORT

log = logging.getLogger("e2a.kube")

SETTLE = 8.0  # seconds a CNI gets to program a new policy before it counts as not enforced
STALE = 300.0  # seconds after which a probe pod is an abandoned one (a probe takes < 3 min)


def probe_instance(instance: str) -> str:
    """The probes' own instance label: not the sandboxes' (whose sweep deletes pods no row
    claims, and whose watch treats them as sandboxes). Each replica's probe has its own name."""
    return f"{instance}-probe"


async def reachable(ip: str, port: int, timeout: float = 1.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


async def policies_enforced(cluster: Cluster, plan: manifests.PodPlan, namespace: str) -> bool:
    """True if a deny-all-ingress policy stops e2a's connections to a pod."""
    name = plan.name
    pod = manifests.pod(plan, namespace)
    deny = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace, "labels": plan.labels},
            "spec": {"podSelector": {"matchLabels": {manifests.SANDBOX: name}},
                     "policyTypes": ["Ingress"], "ingress": []}}
    await cluster.remove_stale(plan.instance, STALE)  # left by an e2a that died in its probe
    try:
        await cluster.create(manifests.secret(plan))
        await cluster.create(pod)
        ip = await cluster.wait_running(name, 120)
        deadline = time.monotonic() + 30
        while not await reachable(ip, ENVD_PORT):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the policy probe pod {name} never answered at {ip}")
            await asyncio.sleep(0.2)
        await cluster.create(deny)
        deadline = time.monotonic() + SETTLE
        while time.monotonic() < deadline:
            if not await reachable(ip, ENVD_PORT):
                # unreachable because of the policy, not because the pod went away
                if await cluster.pod_ip(name) != ip:
                    raise RuntimeError(f"the policy probe pod {name} stopped during the probe")
                return True
            await asyncio.sleep(0.5)
        return False
    finally:
        await cluster.delete_sandbox(name)
