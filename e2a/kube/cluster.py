"""The Kubernetes API as the backend uses it: a few verbs on pods, secrets and network policies
in one namespace, and a watch of this instance's pods.

lightkube (with lightkube-models for the API version the test cluster runs): asyncio-native,
typed models of every resource, watches as async iterators, and one small dependency; the
official `kubernetes` client is synchronous, and kubernetes-asyncio is its generated twin,
thousands of modules to import for the four kinds of object used here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import AsyncIterator

import httpx2
from lightkube import AsyncClient, KubeConfig
from lightkube.codecs import from_dict
from lightkube.core.exceptions import ApiError
from lightkube.types import PatchType
from lightkube.resources.core_v1 import Node, Pod, Secret
from lightkube.resources.networking_v1 import NetworkPolicy
from lightkube.resources.node_v1 import RuntimeClass

from e2a.kube.manifests import INSTANCE

log = logging.getLogger("e2a.kube")

KINDS = (Pod, NetworkPolicy, Secret)  # in the order a sandbox's objects are deleted
REQUEST_TIMEOUT = 20.0
# The API server ends each watch request after this (lightkube opens the next at once), inside
# the client's read timeout: a quiet watch is not an error.
WATCH_WINDOW = 15


class PodFailed(Exception):
    """The pod of a sandbox did not come up (image missing, refused by the kubelet...)."""


class Unschedulable(Exception):
    """No node has room for the pod."""


@dataclass
class NodeRoom:
    """A node pods may go to: its name, its address (InternalIP), what it offers pods."""
    name: str
    address: str | None
    cpu: int      # millicores
    memory: int   # MiB
    ready: bool = True     # ready and not cordoned: the scheduler may place pods there
    labels: dict[str, str] = field(default_factory=dict)
    # its taints that keep pods away (NoSchedule, NoExecute): (key, value, effect)
    taints: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class Runtime:
    """Where the sandboxes' RuntimeClass lets its pods go (its `scheduling`: the scheduler adds
    its node selector and tolerations to every pod of it). A cluster may have gVisor on some
    nodes only; the others must not count as room for sandboxes."""
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)
    # its `overhead.podFixed`, which Kubernetes adds to each of its pods' requests: millicores, MiB
    overhead: tuple[int, int] = (0, 0)
    handler: str = "runsc"  # the containerd runtime its pods run in

    def admits(self, node: NodeRoom) -> bool:
        """A sandbox's pod may go to the node: its labels match, each of its taints is
        tolerated (sandbox pods have no tolerations of their own)."""
        return (all(node.labels.get(k) == v for k, v in self.node_selector.items())
                and all(any(_tolerates(t, taint) for t in self.tolerations)
                        for taint in node.taints))


def _tolerates(toleration: dict, taint: tuple[str, str, str]) -> bool:
    """Kubernetes' rule: an empty key with Exists matches every taint; else the keys are
    equal, and the values too unless Exists; an empty effect matches every effect; another
    operator (an alpha gate's) matches nothing here. A NoExecute taint tolerated for some
    seconds only (`tolerationSeconds`) evicts the pod after them: no room for a sandbox."""
    key, value, effect = taint
    if toleration.get("effect") not in (None, "", effect):
        return False
    if effect == "NoExecute" and toleration.get("tolerationSeconds") is not None:
        return False
    operator = toleration.get("operator") or "Equal"
    if operator == "Exists":
        return toleration.get("key") in (None, "", key)
    return operator == "Equal" and toleration.get("key") == key \
        and (toleration.get("value") or "") == value


@dataclass
class PodEnd:
    """How a pod of a sandbox ended, as the cluster tells it."""
    oom: bool
    detail: str


def connect(kubeconfig: str, namespace: str) -> AsyncClient:
    """A client for the namespace: from a kubeconfig file, or the pod's own service account
    when e2a runs in the cluster (no file given)."""
    config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_service_account()
    return AsyncClient(config=config, namespace=namespace, timeout=httpx2.Timeout(REQUEST_TIMEOUT))


SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def own_namespace(kubeconfig: str) -> str | None:
    """The namespace e2a's own pod runs in, when it runs in the cluster (no kubeconfig)."""
    if kubeconfig:
        return None
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
    except OSError:
        return None


class Cluster:
    def __init__(self, client: AsyncClient, namespace: str, instance: str):
        self.client, self.namespace, self.instance = client, namespace, instance

    async def close(self) -> None:
        await self.client.close()

    async def runtime(self, name: str) -> Runtime | None:
        """The RuntimeClass's scheduling, None if the cluster has no RuntimeClass `name`."""
        try:
            rc = await self.client.get(RuntimeClass, name)
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise
        scheduling = rc.scheduling
        fixed = (rc.overhead.podFixed or {}) if rc.overhead else {}
        return Runtime(
            node_selector=dict(scheduling.nodeSelector or {}) if scheduling else {},
            tolerations=[{"key": t.key, "operator": t.operator, "value": t.value,
                          "effect": t.effect, "tolerationSeconds": t.tolerationSeconds}
                         for t in (scheduling.tolerations or [])] if scheduling else [],
            overhead=(_millicores(fixed.get("cpu", "0")), _mib(fixed.get("memory", "0"))),
            handler=rc.handler)

    async def allocatable(self, runtime: Runtime) -> tuple[int, int]:
        """What the ready nodes the RuntimeClass admits offer pods: millicores and MiB."""
        nodes = [n for n in await self.nodes() if n.ready and runtime.admits(n)]
        return sum(n.cpu for n in nodes), sum(n.memory for n in nodes)

    async def nodes(self) -> list[NodeRoom]:
        """Every node, with what it offers pods and whether it takes new ones."""
        found = []
        async for node in self.client.list(Node):
            ready = any(c.type == "Ready" and c.status == "True"
                        for c in (node.status.conditions or []))
            address = next((a.address for a in node.status.addresses or ()
                            if a.type == "InternalIP"), None)
            spec = node.spec
            found.append(NodeRoom(
                node.metadata.name, address, _millicores(node.status.allocatable["cpu"]),
                _mib(node.status.allocatable["memory"]),
                ready=ready and not (spec and spec.unschedulable),
                labels=dict(node.metadata.labels or {}),
                taints=[(t.key, t.value or "", t.effect) for t in (spec.taints or [] if spec
                                                                   else [])
                        if t.effect in ("NoSchedule", "NoExecute")]))
        return found

    async def create(self, manifest: dict) -> None:
        await self.client.create(from_dict(manifest), namespace=self.namespace)

    async def delete_sandbox(self, name: str) -> None:
        """Delete the pod (at once, no grace), its policy and its secret; a missing one is
        fine (a retry, or deleted by someone else)."""
        for kind in KINDS:
            try:
                await self.client.delete(kind, name, namespace=self.namespace,
                                         grace_period=0)
            except ApiError as exc:
                if exc.status.code != 404:
                    raise

    async def claim(self, name: str, labels: dict[str, str], policy: dict) -> None:
        """A warm sandbox handed out: its pod's and policy's labels name the owner now, and
        its policy (a pooled pod has no internet) becomes the one the user asked for. Merge
        patches, both at once. The secret keeps its `pool` label: patching it would need a
        verb that also reads it back (a patch answers with the whole object)."""
        meta = {"metadata": {"labels": labels}}
        await asyncio.gather(
            self.client.patch(Pod, name, meta, namespace=self.namespace,
                              patch_type=PatchType.MERGE),
            self.client.patch(NetworkPolicy, name, {**meta, "spec": policy["spec"]},
                              namespace=self.namespace, patch_type=PatchType.MERGE))

    async def gone(self, name: str) -> bool:
        try:
            await self.client.get(Pod, name, namespace=self.namespace)
            return False
        except ApiError as exc:
            if exc.status.code == 404:
                return True
            raise

    async def remove_stale(self, instance: str, age: float) -> None:
        """Delete the objects of pods labelled with `instance` that are older than `age`
        seconds (abandoned)."""
        now = datetime.now(timezone.utc)
        async for pod in self.client.list(Pod, namespace=self.namespace,
                                          labels={INSTANCE: instance}):
            born = pod.metadata.creationTimestamp
            if born is not None and (now - born).total_seconds() > age:
                await self.delete_sandbox(pod.metadata.name)

    async def pods(self) -> list[Pod]:
        return [p async for p in self.client.list(Pod, namespace=self.namespace,
                                                  labels={INSTANCE: self.instance})]

    async def pod(self, name: str) -> Pod | None:
        try:
            return await self.client.get(Pod, name, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise

    async def pod_ip(self, name: str) -> str | None:
        pod = await self.pod(name)
        return pod.status.podIP if pod and pod.status and pod.status.phase == "Running" else None

    async def wait_running(self, name: str, timeout: float) -> str:
        """Wait until the pod runs; returns its address. Raises Unschedulable or PodFailed
        as soon as the cluster says so."""
        async def watch() -> str:
            pod = await self.client.get(Pod, name, namespace=self.namespace)
            version = pod.metadata.resourceVersion
            while True:
                ip = _running_ip(pod)
                if ip:
                    return ip
                async with contextlib.aclosing(self.client.watch(
                        Pod, namespace=self.namespace, fields={"metadata.name": name},
                        resource_version=version, server_timeout=WATCH_WINDOW)) as changes:
                    async for _, pod in changes:
                        version = pod.metadata.resourceVersion
                        if _running_ip(pod):
                            break
        try:
            return await asyncio.wait_for(watch(), timeout)
        except asyncio.TimeoutError:
            raise PodFailed(f"pod {name} did not run within {timeout:.0f} s") from None

    async def events(self) -> AsyncIterator[tuple[str, Pod]]:
        """This instance's pods as they change (type, pod), from now on, for ever: a watch
        that the API server ends is opened again."""
        version = None
        while True:
            try:
                async for op, pod in self.client.watch(Pod, namespace=self.namespace,
                                                       labels={INSTANCE: self.instance},
                                                       resource_version=version,
                                                       server_timeout=WATCH_WINDOW):
                    version = pod.metadata.resourceVersion
                    yield op, pod
            except ApiError as exc:
                if exc.status.code == 410:  # too old: start again from the current state
                    version = None
                    continue
                log.warning("pod watch: %s", exc)
                await asyncio.sleep(0.5)
            except (httpx2.HTTPError, OSError) as exc:
                log.warning("pod watch: %s", exc)
                await asyncio.sleep(0.5)


def running_ip_or_none(pod: Pod) -> str | None:
    """The pod's address if it runs now, else None."""
    try:
        return _running_ip(pod)
    except (PodFailed, Unschedulable):
        return None


def _running_ip(pod: Pod) -> str | None:
    """The pod's address once it runs; raises if it never will."""
    status = pod.status
    if status is None:
        return None
    for cond in status.conditions or []:
        if cond.type == "PodScheduled" and cond.status == "False" \
                and cond.reason == "Unschedulable":
            raise Unschedulable(cond.message or "no node has room for it")
    end = ended(pod)
    if end is not None:
        raise PodFailed(end.detail)
    # (the init containers' too: a missing image shows there first, the sandbox's container
    # only waits behind them)
    for cs in [*(status.initContainerStatuses or []), *(status.containerStatuses or [])]:
        waiting = cs.state.waiting if cs.state else None
        if waiting and waiting.reason in ("ErrImageNeverPull", "ImagePullBackOff",
                                          "ErrImagePull", "InvalidImageName",
                                          "CreateContainerConfigError",
                                          "CreateContainerError", "RunContainerError"):
            raise PodFailed(f"{waiting.reason}: {waiting.message or ''}".strip())
    if status.phase == "Running" and status.podIP:
        return status.podIP
    return None


def ended(pod: Pod) -> PodEnd | None:
    """How the pod ended, if it did: its container exited, was OOM-killed, or the pod was
    evicted or failed."""
    status = pod.status
    if status is None:
        return None
    if status.phase == "Failed" and status.reason:  # evicted: the pod says why, its
        # container only that it is gone (ContainerStatusUnknown)
        return PodEnd(False, f"its pod failed: {status.reason}"
                             + (f" ({status.message})" if status.message else ""))
    for cs in status.initContainerStatuses or []:  # a seeding copy that failed (its output
        # is its message: FallbackToLogsOnError)
        term = cs.state.terminated if cs.state else None
        if term is not None and term.exitCode:
            oom = term.reason == "OOMKilled"
            return PodEnd(oom, f"its init container {cs.name} failed ({term.reason or 'exit'} "
                               f"{term.exitCode})"
                               + (f": {term.message.strip()[-500:]}" if term.message else ""))
    for cs in status.containerStatuses or []:
        term = cs.state.terminated if cs.state else None
        if term is not None:
            oom = term.reason == "OOMKilled"
            return PodEnd(oom, "the cluster killed the sandbox for memory (OOMKilled)" if oom
                          else f"its container exited ({term.reason or 'exit'} "
                               f"{term.exitCode})")
    if status.phase in ("Failed", "Succeeded"):
        return PodEnd(False, f"its pod {status.phase.lower()}"
                             + (f": {status.reason}" if status.reason else "")
                             + (f" ({status.message})" if status.message else ""))
    return None


def _millicores(q: str) -> int:
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def _mib(q: str) -> int:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024,
             "K": 1000 / 1024 / 1024, "M": 1000 ** 2 / 1024 ** 2, "G": 1000 ** 3 / 1024 ** 2}
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return int(float(q[:-len(suffix)]) * factor)
    return int(q) // (1024 * 1024)
