"""The replicas' side of workspaces on Kubernetes: the node agents (kube/node_agent.py) that
mount them, one per node, called on the node's address with the shared token.

A sandbox with a workspace is placed by e2a, not by the scheduler: its mount must be on the
node before its pod starts there (the pod binds it as a hostPath volume), so e2a picks the node
(`place`: a ready one the sandboxes' RuntimeClass admits, with most room left by e2a's pods and
placements under way),
asks its agent to mount, then creates the pod with that `nodeName`. The node is in the
sandbox's row from before the mount on: its teardown asks that node's agent, and no other, to
upload and unmount, whatever the node's state (cordoned, not ready) or its pod's."""

from __future__ import annotations

import asyncio
import logging
import posixpath

import aiohttp

from e2a.kube import manifests
from e2a.kube.cluster import Cluster, NodeRoom, Runtime, _millicores, _mib

log = logging.getLogger("e2a.kube")

MOUNT_TIMEOUT = 60.0     # a mount answers in well under a second; a slow S3 may take longer
CLOSE_TIMEOUT = 660.0    # the agent waits up to 600 s for uploads (mount.py FLUSH_TIMEOUT)
QUICK_TIMEOUT = 5.0      # a listing, a limit, a count: the agent answers at once or not at all


class MountFailed(Exception):
    """A node agent could not mount, or let go of, a workspace (yet)."""


class NodeMounts:
    def __init__(self, http: aiohttp.ClientSession, cluster: Cluster, token: str, port: int):
        self.http, self.cluster = http, cluster
        self.token, self.port = token, port
        self._placing: dict[str, tuple[str, int, int]] = {}  # sandbox -> node, cpu, memory

    @property
    def enabled(self) -> bool:
        return bool(self.token)

    async def place(self, sandbox_id: str, cpu: int, memory: int, runtime: Runtime) -> NodeRoom:
        """The node for a sandbox of this size (millicores, MiB requested): of the ready ones
        the RuntimeClass admits (its node selector; no taint it does not tolerate), the one
        with most memory left by e2a's pods and this replica's placements under way (held
        until `placed`; the size without the RuntimeClass's overhead, added here). MountFailed
        if none fits."""
        cpu, memory = cpu + runtime.overhead[0], memory + runtime.overhead[1]
        nodes = {n.name: n for n in await self.cluster.nodes()
                 if n.address and n.ready and runtime.admits(n)}
        used = {name: [0, 0] for name in nodes}
        for pod in await self.cluster.pods():
            where = pod.spec.nodeName if pod.spec else None
            if where in used and pod.status and pod.status.phase in ("Pending", "Running"):
                # its containers' requests, and its RuntimeClass's overhead (as the scheduler)
                for asks in [(c.resources.requests or {}) if c.resources else {}
                             for c in pod.spec.containers] + [pod.spec.overhead or {}]:
                    used[where][0] += _millicores(asks.get("cpu", "0"))
                    used[where][1] += _mib(asks.get("memory", "0"))
        for where, c, m in self._placing.values():
            if where in used:
                used[where][0] += c
                used[where][1] += m
        fits = [n for n in nodes.values()
                if n.cpu - used[n.name][0] >= cpu and n.memory - used[n.name][1] >= memory]
        if not fits:
            raise MountFailed("no node has room for another sandbox with a workspace")
        node = max(fits, key=lambda n: n.memory - used[n.name][1])
        self._placing[sandbox_id] = (node.name, cpu, memory)
        return node

    async def address_of(self, node_name: str) -> str | None:
        """The node's address, whatever its state (None: no longer in the cluster)."""
        node = next((n for n in await self.cluster.nodes() if n.name == node_name), None)
        return node.address if node is not None and node.address else None

    def placed(self, sandbox_id: str) -> None:
        """Its pod runs (the pods' list surely counts it now), or its create failed."""
        self._placing.pop(sandbox_id, None)

    async def mount(self, node: NodeRoom, sandbox_id: str, workspace_id: str, limit: int) -> str:
        """Mount the workspace on the node for the sandbox; the path to bind into its pod."""
        answer = await self._call(node.address, "PUT", sandbox_id, "",
                                  {"workspace_id": workspace_id, "limit": limit}, MOUNT_TIMEOUT)
        path = answer.get("path")
        # only ever the agent's own mount for this sandbox (the admission policy checks it too)
        if not (isinstance(path, str) and posixpath.isabs(path)
                and posixpath.normpath(path) == path
                and path.endswith(f"/mounts/{sandbox_id}/home")):
            raise MountFailed(f"node agent {node.address} answered an unexpected path")
        return path

    async def release(self, sandbox_id: str, node_name: str) -> None:
        """Every file uploaded and the mount gone, on the node that has it; MountFailed while
        its agent cannot yet (S3 down, the node unreachable: the teardown is retried). A node
        no longer in the cluster took its disk with it: nothing is left to release."""
        address = await self.address_of(node_name)
        if address is None:
            log.error("%s: node %s is gone from the cluster, and its workspace mount with it "
                      "(files not yet uploaded from it are lost)", sandbox_id, node_name)
            return
        answer = await self._call(address, "DELETE", sandbox_id, "", None, CLOSE_TIMEOUT)
        if answer.get("lost"):
            log.error("%s: S3 refused %d files for good: %s", sandbox_id,
                      len(answer["lost"]), ", ".join(answer["lost"][:20]))

    async def mounted(self) -> dict[str, dict[str, bool]]:
        """Each answering node's mounts: node name -> {sandbox id: whether its rclone runs}
        (a node whose agent does not answer is left out, and logged)."""
        nodes = [n for n in await self.cluster.nodes() if n.address]
        answers = await asyncio.gather(
            *(self._call(n.address, "GET", "", "", None, QUICK_TIMEOUT) for n in nodes),
            return_exceptions=True)
        found = {}
        for node, answer in zip(nodes, answers):
            if isinstance(answer, BaseException):
                log.warning("node agent of %s: %s", node.name, answer)
            else:
                found[node.name] = {m["sandbox_id"]: bool(m.get("alive"))
                                    for m in answer.get("mounts", [])}
        return found

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
                return answer if isinstance(answer, dict) else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise MountFailed(f"node agent {address} did not answer: {exc!r}") from exc


class AgentCache:
    """One mount's cache as the workspaces' quota sharing sees it (service.py NodeCache), any
    replica's: through the agent of the node named in its lease."""

    def __init__(self, mounts: NodeMounts, node_name: str, sandbox_id: str):
        self.mounts, self.node_name, self.sandbox_id = mounts, node_name, sandbox_id
        self._address: str | None = None

    async def _agent(self) -> str:
        if self._address is None:
            self._address = await self.mounts.address_of(self.node_name)
        if self._address is None:
            raise MountFailed(f"node {self.node_name} is gone from the cluster")
        return self._address

    async def set_limit(self, limit: int) -> None:
        await self._call("PUT", "/limit", {"limit": limit})

    async def allocated(self) -> int:
        return int((await self._call("GET", "/written", None))["bytes"])

    async def _call(self, method: str, path: str, body: dict | None) -> dict:
        try:
            return await self.mounts._call(await self._agent(), method, self.sandbox_id, path,
                                           body, QUICK_TIMEOUT)
        except Exception:
            self._address = None  # the node may be back under a new address: looked up again
            raise


def pod_requests(plan: manifests.PodPlan) -> tuple[int, int]:
    return manifests.requests(plan.vcpu, plan.cpu_fraction, plan.memory_mib,
                              plan.cpu_request_ratio, plan.memory_request_ratio)
