"""The isolation driver: one gVisor sandbox (runsc, an OCI bundle) per e2a sandbox.

The root filesystem is the sandbox's own overlay mount (runtime/rootfs.py): the shared template
image below, the sandbox's writes above, on the host disk. The memory limit goes into the OCI spec: runsc puts the sandbox in a host cgroup with that limit
and gVisor sizes its own view of memory from it. The CPU quota is added by e2a after boot
(runtime/cgroups.py).
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

from e2a import proc
from e2a.runtime.cgroups import Cgroup

ENVD_PORT = 49983
ENVD_PATH = "/.e2a/envd"

# Docker's default set: enough for envd (root in the sandbox) to run commands as other users and
# to chown the files it writes; gVisor, not these bits, is the boundary to the host.
_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]


@dataclass
class SandboxSpec:
    runtime_id: str         # runsc container id (also the cgroup leaf name)
    bundle_dir: Path        # holds config.json and the console log
    rootfs: Path            # the sandbox's overlay mount
    netns_path: str
    envd_binary: Path
    envd_token: str
    memory_mib: int
    platform: str
    resolv_conf: Path
    cgroup: Cgroup


def oci_config(spec: SandboxSpec) -> dict:
    return {
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": [ENVD_PATH, "--listen", f"0.0.0.0:{ENVD_PORT}"],
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                f"E2A_ENVD_TOKEN={spec.envd_token}",
            ],
            "cwd": "/",
            "capabilities": {k: _CAPS for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 65536, "soft": 65536}],
            "noNewPrivileges": False,
        },
        "root": {"path": str(spec.rootfs), "readonly": False},
        "hostname": "sandbox",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "nodev", "mode=1777", "size=64m"]},
            # On disk, like the rest of the sandbox's writes: without this mount gVisor would put
            # a tmpfs on /tmp, in the sandbox's memory, and a big temp file would exhaust it.
            {"destination": "/tmp", "type": "bind", "source": str(spec.bundle_dir / "tmp"),
             "options": ["rbind", "rw"]},
            {"destination": ENVD_PATH, "type": "bind", "source": str(spec.envd_binary),
             "options": ["bind", "ro"]},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": str(spec.resolv_conf),
             "options": ["bind", "ro"]},
        ],
        "linux": {
            "cgroupsPath": spec.cgroup.path,
            "resources": {"memory": {"limit": spec.memory_mib * 1024 * 1024}},
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": spec.netns_path},
            ],
        },
    }


class RunscError(Exception):
    """runsc failed to answer a question about its containers."""


class Runsc:
    def __init__(self, binary: str, state_root: Path):
        self.binary = binary
        self.root = state_root

    def _base(self, platform: str | None = None) -> list[str]:
        args = [self.binary, "--root", str(self.root)]
        if platform:
            args += ["--platform", platform]
        return args

    async def start(self, spec: SandboxSpec) -> None:
        """Create and start the sandbox; returns once its init (envd) runs."""
        spec.bundle_dir.mkdir(parents=True, exist_ok=True)
        tmp = spec.bundle_dir / "tmp"
        tmp.mkdir(exist_ok=True)
        tmp.chmod(0o1777)
        (spec.bundle_dir / "config.json").write_text(json.dumps(oci_config(spec)))
        console = os.open(spec.bundle_dir / "console.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                          0o600)
        try:
            args = self._base(spec.platform) + [
                "--overlay2", "none",  # the rootfs is already an overlay, on the host
                "run", "--detach", "--bundle", str(spec.bundle_dir), spec.runtime_id,
            ]
            # The sandbox inherits the console fd as its stdout/stderr (envd's own log).
            p = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=console, stderr=console)
            code = await asyncio.wait_for(p.wait(), 60)
        finally:
            os.close(console)
        if code != 0:
            tail = (spec.bundle_dir / "console.log").read_text(errors="replace")[-800:]
            raise proc.CommandFailed(args, code, tail)

    def available(self) -> bool:
        return os.access(self.binary, os.X_OK)

    async def delete(self, runtime_id: str) -> None:
        """Kill every process of the sandbox and remove runsc's state and cgroup for it."""
        if self.available():
            await proc.run(self._base() + ["delete", "--force", runtime_id], check=False,
                           timeout=30)

    async def list(self) -> list[dict]:
        """runsc's containers under this state root. Raises RunscError when runsc cannot say:
        an empty answer must mean "none", because reconcile deletes what is not listed."""
        try:
            out = await proc.run(self._base() + ["list", "--format=json"], timeout=30)
            data = json.loads(out or "null")
        except (proc.CommandFailed, OSError, asyncio.TimeoutError, ValueError) as exc:
            raise RunscError(f"runsc list failed: {exc}") from exc
        if data is not None and not isinstance(data, list):
            raise RunscError(f"runsc list answered something else than a list: {out[:200]!r}")
        return data or []

    async def state(self, runtime_id: str) -> dict | None:
        try:
            return json.loads(await proc.run(self._base() + ["state", runtime_id]))
        except (proc.CommandFailed, json.JSONDecodeError):
            return None
