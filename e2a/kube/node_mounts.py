"""The replicas' side of workspaces on Kubernetes: the node agents (kube/node_agent.py) that
mount them, one per node, called on the node's address with the shared token.

A sandbox with a workspace is placed by e2a, not by the scheduler: its mount must be on the
node before its pod starts there (the pod binds it as a hostPath volume), so e2a picks the node
(`place`: the one with most room left by e2a's own pods), asks its agent to mount, then creates
the pod with that `nodeName`. Its teardown asks every node's agent to let go of it, since a pod
already gone no longer says where it ran (an agent that never had it answers at once)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from e2a.kube import manifests
from e2a.kube.cluster import Cluster, NodeRoom, _millicores, _mib

log = logging.getLogger("e2a.kube")

MOUNT_TIMEOUT = 60.0     # a mount answers in well under a second; a slow S3 may take longer
CLOSE_TIMEOUT = 660.0    # the agent waits up to 600 s for uploads (mount.py FLUSH_TIMEOUT)


class MountFailed(Exception):
    """A node agent could not mount, or let go of, a workspace (yet)."""


class NodeMounts:
    def __init__(self, http: aiohttp.ClientSession, cluster: Cluster, token: str, port: int):
        self.http, self.cluster = http, cluster
        self.token, self.port = token, port

    @property
    def enabled(self) -> bool:
        return bool(self.token)

    async def place(self, cpu: int, memory: int) -> NodeRoom:
        """The node with most memory left by e2a's pods that fits one more of this size
        (millicores, MiB requested); MountFailed if none does."""
        nodes = {n.name: n for n in await self.cluster.nodes() if n.address}
        used = {name: [0, 0] for name in nodes}
        for pod in await self.cluster.pods():
            where = pod.spec.nodeName if pod.spec else None
            if where in used and pod.status and pod.status.phase in ("Pending", "Running"):
                for c in pod.spec.containers:
                    asks = (c.resources.requests or {}) if c.resources else {}
                    used[where][0] += _millicores(asks.get("cpu", "0"))
                    used[where][1] += _mib(asks.get("memory", "0"))
        fits = [n for n in nodes.values()
                if n.cpu - used[n.name][0] >= cpu and n.memory - used[n.name][1] >= memory]
        if not fits:
            raise MountFailed("no node has room for another sandbox with a workspace")
        return max(fits, key=lambda n: n.memory - used[n.name][1])

    async def mount(self, node: NodeRoom, sandbox_id: str, workspace_id: str, limit: int) -> str:
        """Mount the workspace on the node for the sandbox; the path to bind into its pod."""
        answer = await self._call(node.address, "PUT", sandbox_id, "",
                                  {"workspace_id": workspace_id, "limit": limit}, MOUNT_TIMEOUT)
        return answer["path"]

    async def release(self, sandbox_id: str) -> None:
        """Every file uploaded and the mount gone, on whichever node had it; MountFailed while
        some agent cannot yet (S3 down: the teardown is retried)."""
        lost = await self._on_every_node("DELETE", sandbox_id, "", None, CLOSE_TIMEOUT)
        for files in lost:
            if files.get("lost"):
                log.error("%s: S3 refused %d files for good: %s", sandbox_id,
                          len(files["lost"]), ", ".join(files["lost"][:20]))

    async def mounted(self) -> dict[str, list[str]]:
        """Each node's mounts: node name -> sandbox ids."""
        found = {}
        for node in await self.cluster.nodes():
            if node.address:
                answer = await self._call(node.address, "GET", "", "", None, MOUNT_TIMEOUT)
                found[node.name] = [m["sandbox_id"] for m in answer["mounts"]]
        return found

    async def _on_every_node(self, method: str, sandbox_id: str, sub: str, body,
                             timeout: float) -> list[dict]:
        nodes = [n for n in await self.cluster.nodes() if n.address]
        answers = await asyncio.gather(
            *(self._call(n.address, method, sandbox_id, sub, body, timeout) for n in nodes),
            return_exceptions=True)
        failed = [a for a in answers if isinstance(a, BaseException)]
        if failed:
            raise MountFailed("; ".join(str(f) for f in failed))
        return answers

    async def _call(self, address: str, method: str, sandbox_id: str, sub: str, body,
                    timeout: float) -> dict:
        host = f"[{address}]" if ":" in address else address
        path = f"/v1/mounts/{sandbox_id}{sub}" if sandbox_id else "/v1/mounts"
        try:
            async with self.http.request(
                    method, f"http://{host}:{self.port}{path}", json=body,
                    headers={"Authorization": f"Bearer {self.token}"},
                    timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                answer = await r.json(content_type=None)
                if r.status != 200:
                    raise MountFailed(f"node agent {address}: {r.status} "
                                      f"{(answer or {}).get('error', '')}")
                return answer
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise MountFailed(f"node agent {address} did not answer: {exc!r}") from exc


class AgentCache:
    """One mount's cache as the workspaces' quota sharing sees it (service.py NodeCache)."""

    def __init__(self, mounts: NodeMounts, node: NodeRoom, sandbox_id: str):
        self.mounts, self.node, self.sandbox_id = mounts, node, sandbox_id

    async def set_limit(self, limit: int) -> None:
        await self.mounts._call(self.node.address, "PUT", self.sandbox_id, "/limit",
                                {"limit": limit}, MOUNT_TIMEOUT)

    async def allocated(self) -> int:
        answer = await self.mounts._call(self.node.address, "GET", self.sandbox_id, "/written",
                                         None, MOUNT_TIMEOUT)
        return int(answer["bytes"])


def pod_requests(plan: manifests.PodPlan) -> tuple[int, int]:
    return manifests.requests(plan.vcpu, plan.cpu_fraction, plan.memory_mib,
                              plan.cpu_request_ratio, plan.memory_request_ratio)
