"""What the Kubernetes backend asks the cluster for, per sandbox: a Secret (envd's token and the
sandbox's environment), a NetworkPolicy, and the Pod. Plain dicts in the API's own shape, so
that they read like the YAML an operator knows and the tests can check them field by field.

Every object carries the same labels: which e2a instance made it (several may share a cluster,
each reconciles only its own), the sandbox, its template, and its owner as a hash (labels are
readable by anyone who may list pods; a user id is not theirs to read).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from e2a.network.firewall import BLOCKED_V4
from e2a.runtime.runsc import ENVD_PATH, ENVD_PORT, MEMORY_OVERHEAD_MIB
from e2a.templates.builder import SANDBOX_UID
from e2a.templates.recipes import HOME  # the sandbox user's home: a workspace is mounted there

GROUP = "e2a.dev"
INSTANCE, SANDBOX, TEMPLATE, OWNER = (f"{GROUP}/{k}" for k in
                                      ("instance", "sandbox", "template", "owner"))
POOL_OWNER = "pool"  # the owner label of a warm pod nobody has claimed
API = f"{GROUP}/api"  # on e2a's own pods (deploy/): value the instance; the policies let them in
# Docker's default capabilities, as the embedded backend gives envd (root in the sandbox, so
# that it can run commands as `user` or `root`): gVisor, not these bits, is the boundary.
CAPABILITIES = ["CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID",
                "SETUID", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL",
                "AUDIT_WRITE"]
# Where a sandbox may never connect, whatever its `internet`: the cluster (pods, services,
# nodes) and every private, local or reserved range, the embedded firewall's own list.
PRIVATE_RANGES = [r.strip() for r in BLOCKED_V4.split(",")]


def pod_name(sandbox_id: str) -> str:
    """A sandbox's pod's, secret's and policy's name: its id, DNS-label safe."""
    return sandbox_id.replace("_", "-")


def sandbox_of(pod_name: str) -> str:
    return pod_name.replace("-", "_")


@dataclass
class PodPlan:
    """One sandbox as the cluster runs it."""
    sandbox_id: str
    instance: str
    template: str
    user_id: str | None
    image: str                     # name:tag the cluster knows (imported or in a registry)
    vcpu: int
    cpu_fraction: float
    memory_mib: int
    disk_mib: int
    internet: bool
    envd_token: str
    env: dict[str, str] = field(default_factory=dict)
    runtime_class: str = "gvisor"
    cpu_request_ratio: float = 0.1  # of the CPU limit, what the pod asks the scheduler for
    memory_request_ratio: float = 1.0  # of the memory limit, likewise
    nameservers: list[str] = field(default_factory=list)
    api_cidrs: list[str] = field(default_factory=list)  # where e2a connects from (ingress)
    api_namespace: str | None = None  # e2a's own, when it runs in the cluster: its pods too
    egress_port: int | None = None  # e2a's LLM egress proxy (agents) ...
    egress_host: str | None = None  # ... at this address, outside the cluster
    node: str | None = None  # placed by e2a (a workspace is mounted there first), not scheduled
    home: str | None = None  # the workspace's mount on that node, bound as /home/user
    seed_home: bool = False  # a new workspace: the image's /home/user copied in first
    non_root: bool = False  # E2A_KUBE_NON_ROOT: envd (and all in the pod) runs as `user`
    # E2A_KUBE_READ_ONLY_ROOT, for a template that allows it: the image read-only, these
    # paths (and the home, when no workspace is) writable, copied from the image at start
    writable: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return pod_name(self.sandbox_id)

    @property
    def labels(self) -> dict[str, str]:
        owner = hashlib.sha256((self.user_id or "").encode()).hexdigest()[:16] \
            if self.user_id else POOL_OWNER
        return {INSTANCE: self.instance, SANDBOX: self.name, TEMPLATE: self.template,
                OWNER: owner}


def secret(plan: PodPlan) -> dict:
    """envd's token and the sandbox's environment, out of the pod's spec (which anyone who may
    read pods sees)."""
    return {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": plan.name, "labels": plan.labels},
        "type": "Opaque",
        "stringData": {"E2A_ENVD_TOKEN": plan.envd_token, **plan.env},
    }


def pod(plan: PodPlan, namespace: str) -> dict:
    memory = f"{plan.memory_mib + MEMORY_OVERHEAD_MIB}Mi"
    cpu = f"{cpu_limit(plan.vcpu, plan.cpu_fraction)}m"
    cpu_request, memory_request = requests(plan.vcpu, plan.cpu_fraction, plan.memory_mib,
                                           plan.cpu_request_ratio, plan.memory_request_ratio)
    security = {
        "privileged": False,
        "capabilities": {"drop": ["ALL"], "add": CAPABILITIES},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if plan.non_root:  # the Pod Security Standard "restricted": no root, no capability at all
        security = {
            "privileged": False, "runAsNonRoot": True, "runAsUser": SANDBOX_UID,
            "runAsGroup": SANDBOX_UID, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
        }
    if plan.writable is not None:
        security["readOnlyRootFilesystem"] = True
    manifest = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": plan.name, "namespace": namespace, "labels": plan.labels},
        "spec": {
            "runtimeClassName": plan.runtime_class,
            "restartPolicy": "Never",  # a sandbox that dies is destroyed, never restarted
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,  # no cluster addresses in its environment
            "hostNetwork": False, "hostPID": False, "hostIPC": False,
            "hostname": "sandbox",
            "terminationGracePeriodSeconds": 0,
            "dnsPolicy": "None",
            "dnsConfig": {"nameservers": plan.nameservers or ["1.1.1.1"]},
            "containers": [{
                "name": "sandbox",
                "image": plan.image,
                "imagePullPolicy": "IfNotPresent",
                "command": [ENVD_PATH, "--listen", f"0.0.0.0:{ENVD_PORT}"],
                "envFrom": [{"secretRef": {"name": plan.name}}],
                "ports": [{"name": "envd", "containerPort": ENVD_PORT}],
                "resources": {
                    # CPU is shared as on one host: the limit is the template's quota, the
                    # request a part of it (E2A_KUBE_CPU_REQUEST_RATIO), so idle sandboxes do
                    # not hold cores. Memory is asked for whole (it cannot be taken back),
                    # unless E2A_KUBE_MEMORY_REQUEST_RATIO overcommits it.
                    "requests": {"cpu": f"{cpu_request}m", "memory": f"{memory_request}Mi",
                                 "ephemeral-storage": f"{plan.disk_mib}Mi"},
                    "limits": {"cpu": cpu, "memory": memory,
                               "ephemeral-storage": f"{plan.disk_mib}Mi"},
                },
                "securityContext": security,
            }],
        },
    }
    spec = manifest["spec"]
    container = spec["containers"][0]
    volumes, mounts, inits = [], [], []

    def init(name: str, command: list[str], volume: str) -> dict:
        """A copy from the image made before envd starts, in the pod's own gVisor sandbox."""
        return {"name": name, "image": plan.image, "imagePullPolicy": "IfNotPresent",
                "command": command, "volumeMounts": [{"name": volume, "mountPath": "/seed"}],
                "terminationMessagePolicy": "FallbackToLogsOnError",  # cp's error, if any
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                              "limits": {"cpu": cpu, "memory": memory}},
                "securityContext": security}

    if plan.writable is not None:
        paths = writable_paths(plan.writable, plan.home is not None)
        # One emptyDir (on the node's disk, within the pod's ephemeral-storage limit) holds
        # every writable path, each a copy of the image's with its owner and mode (/tmp 1777,
        # the home the user's), mounted where it was.
        volumes.append({"name": "writable", "emptyDir": {"sizeLimit": f"{plan.disk_mib}Mi"}})
        mounts += [{"name": "writable", "mountPath": p, "subPath": p.lstrip("/")}
                   for p in paths]
        inits.append(init("seed-writable", ["/bin/cp", "-a", "--parents", *paths, "/seed/"],
                          "writable"))
    if plan.home:
        spec["nodeName"] = plan.node
        volumes.append({"name": "home", "hostPath": {"path": plan.home, "type": "Directory"}})
        mounts.append({"name": "home", "mountPath": HOME})
        if plan.seed_home:  # a new workspace gets the image's dotfiles
            inits.append(init("seed-home", ["/bin/cp", "-a", "--no-preserve=ownership",
                                            f"{HOME}/.", "/seed/"], "home"))
    if volumes:
        spec["volumes"] = volumes
        container["volumeMounts"] = mounts
    if inits:
        spec["initContainers"] = inits
    return manifest


def writable_paths(writable: tuple[str, ...], workspace: bool) -> list[str]:
    """What a read-only root's emptyDir holds: the template's writable paths, and the home
    unless a workspace is mounted there."""
    return [*writable, *([] if workspace else [HOME])]


def cpu_limit(vcpu: int, cpu_fraction: float) -> int:
    """Millicores: the template's CPU quota."""
    return int(vcpu * cpu_fraction * 1000)


def requests(vcpu: int, cpu_fraction: float, memory_mib: int, cpu_ratio: float,
             memory_ratio: float) -> tuple[int, int]:
    """What a pod of this size asks the scheduler for, millicores and MiB: parts of its limits
    (memory whole unless the settings overcommit it). The capacity check counts the same."""
    return (max(1, int(cpu_limit(vcpu, cpu_fraction) * cpu_ratio)),
            max(1, int((memory_mib + MEMORY_OVERHEAD_MIB) * memory_ratio)))


def network_policy(plan: PodPlan, namespace: str) -> dict:
    """Ingress only from e2a; egress only to the internet (if allowed), DNS and e2a's LLM
    egress proxy (when agents are on), never to the rest of the cluster, its nodes or a private
    range. Enforced only by a CNI that implements policies (docs/kubernetes.md)."""
    egress = []
    if plan.internet:
        egress.append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": PRIVATE_RANGES}}]})
    egress += [{"to": [{"ipBlock": {"cidr": f"{ns}/32"}}],
                "ports": [{"protocol": p, "port": 53} for p in ("UDP", "TCP")]}
               for ns in plan.nameservers]
    peers: list[dict] = [{"ipBlock": {"cidr": c}} for c in plan.api_cidrs]
    if plan.api_namespace:  # e2a's pods, in its namespace only
        peers.append({"namespaceSelector": {"matchLabels": {
                          "kubernetes.io/metadata.name": plan.api_namespace}},
                      "podSelector": {"matchLabels": {API: plan.instance}}})
    if plan.egress_port:  # the proxy alone (a sandbox without a task gets a 403 there): e2a's
        # pods by their label in the cluster, else the one address; never the ingress ranges,
        # which may be wide enough to hold other sandboxes
        proxy = ([p for p in peers if "podSelector" in p] if plan.api_namespace else
                 [{"ipBlock": {"cidr": f"{plan.egress_host}/32"}}] if plan.egress_host else [])
        if proxy:
            egress.append({"to": proxy, "ports": [{"protocol": "TCP",
                                                   "port": plan.egress_port}]})
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": plan.name, "namespace": namespace, "labels": plan.labels},
        "spec": {
            "podSelector": {"matchLabels": {SANDBOX: plan.name, INSTANCE: plan.instance}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": peers}] if peers else [],
            "egress": egress,
        },
    }
