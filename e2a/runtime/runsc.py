"""The isolation driver: one gVisor sandbox (runsc, an OCI bundle) per e2a sandbox.

The root filesystem is the sandbox's own overlay mount (runtime/rootfs.py): the shared template
image below, the sandbox's writes above, on the host disk. The memory limit goes into the OCI spec: runsc puts the sandbox in a host cgroup with that limit
and gVisor sizes its own view of memory from it. The CPU quota is added by e2a after boot
(runtime/cgroups.py).

Memory (docs/runtime.md, "Memory"): gVisor enforces no memory limit of its own; the host cgroup's
OOM killer is what stops a sandbox that takes too much. e2a steers it at the sandbox's own
processes (their systrap stubs) and away from the Sentry, so that such a process is killed inside
the sandbox (exit 137) and the sandbox goes on, and gives the host limit a margin over the size
gVisor reports, for gVisor's own overhead.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from e2a import proc
from e2a.runtime.cgroups import Cgroup

log = logging.getLogger("e2a.runsc")

# envd's TCP port on the sandbox's own address: the one definition, used by the host, the API
# (the port proxy refuses it) and envd's --listen. Below 1024 so that a Linux-like kernel
# reserves it for root; gVisor does not (any user may bind a low port there), so what keeps
# sandbox code off it is envd holding it without SO_REUSEADDR (guest/main.go) and the signed
# requests and answers (docs/protocol.md, "Authentication").
ENVD_PORT = 984
ENVD_PATH = "/.e2a/envd"

# Docker's default set: enough for envd (root in the sandbox) to run commands as other users and
# to chown the files it writes; gVisor, not these bits, is the boundary to the host.
_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]


# Host memory the sandbox needs beyond the size its template gives it (and gVisor reports as
# MemTotal): the Sentry's and gofer's own memory, the stubs' page tables, kernel memory. An idle
# standard sandbox holds 17 MiB (docs/runtime.md, "Memory"); with this margin a process inside can
# use about what MemTotal says (a python got 488 MiB of 512 without it, 520 with it).
MEMORY_OVERHEAD_MIB = 32
# Host memory a restore needs beyond the running sandbox's limit, and only while it restores:
# the Sentry maps the whole saved memory and builds its kernel state on its own heap at once, so
# a sandbox that used all of its memory went past its limit and the restore was OOM-killed. The
# limit goes back to the running one right after (if the kernel can reclaim down to it).
RESTORE_MARGIN_MIB = 64
# oom_score_adj of the systrap stub processes (one per process in the sandbox): the highest, so
# that the host's OOM killer takes one of them, not the Sentry (which would kill the sandbox).
STUB_OOM_SCORE_ADJ = 1000
# RLIMIT_NPROC inside the sandbox, per MiB of its memory. Each process inside costs ~0.5 MiB of
# host memory gVisor does not see (its stub process: page tables, kernel structures; threads cost
# next to nothing), so 512 processes of one user take ~270 MiB of a 512 MiB sandbox, and a fork
# bomb gets EAGAIN before the OOM killer has to act. gVisor counts tasks (threads too) per uid
# and, like Linux, exempts only CAP_SYS_ADMIN/CAP_SYS_RESOURCE, which the sandbox does not have.
TASKS_PER_MIB = 1


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
    memory_overhead_mib: int = MEMORY_OVERHEAD_MIB  # host limit = memory_mib + this
    nproc_limit: int = 0  # RLIMIT_NPROC inside: tasks per user; 0: TASKS_PER_MIB × memory_mib
    env: dict[str, str] = field(default_factory=dict)  # the template's, and envd's settings
    home: Path | None = None  # bound on /home/user: the workspace's mount (else the image's)


def oci_config(spec: SandboxSpec) -> dict:
    nproc = spec.nproc_limit or spec.memory_mib * TASKS_PER_MIB
    return {
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            # Every address: a fork restored from this sandbox's checkpoint has another one
            # (docs/pause.md), and its envd must answer there too. envd holds the port without
            # SO_REUSEADDR, so nothing inside can bind it on any address beside it.
            "args": [ENVD_PATH, "--listen", f"0.0.0.0:{ENVD_PORT}"],
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                f"E2A_ENVD_TOKEN={spec.envd_token}",
                *(f"{k}={v}" for k, v in spec.env.items()),
            ],
            "cwd": "/",
            "capabilities": {k: _CAPS for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 65536, "soft": 65536},
                        {"type": "RLIMIT_NPROC", "hard": nproc, "soft": nproc}],
            "noNewPrivileges": False,
        },
        "root": {"path": str(spec.rootfs), "readonly": False},
        "hostname": "sandbox",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            # gVisor's /dev is a tmpfs in the sandbox's memory with no size limit of its own
            # (half the host's RAM): read-only, root inside cannot fill it (its devices work as
            # before; /dev/shm and /dev/pts are mounts of their own, writable).
            {"destination": "/dev", "type": "tmpfs", "source": "dev",
             "options": ["ro", "nosuid", "mode=755"]},
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
            *([{"destination": "/home/user", "type": "bind", "source": str(spec.home),
                "options": ["rbind", "rw"]}] if spec.home else []),
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


def rebase(config: dict, spec: SandboxSpec) -> dict:
    """Another sandbox's OCI config for the sandbox of `spec` (a fork restored from the other's
    checkpoint): its own root, /tmp, network namespace and cgroup. The process, its environment
    and every mount's destination stay: runsc refuses a restore whose spec differs in those."""
    config = copy.deepcopy(config)
    config["root"]["path"] = str(spec.rootfs)
    for mount in config["mounts"]:
        if mount["destination"] == "/tmp":
            mount["source"] = str(spec.bundle_dir / "tmp")
    for ns in config["linux"]["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = spec.netns_path
    config["linux"]["cgroupsPath"] = spec.cgroup.path
    return config


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
        self._bundle(spec, oci_config(spec))
        await self._launch(spec, ["run", "--detach", "--bundle", str(spec.bundle_dir),
                                  spec.runtime_id])

    async def restore(self, spec: SandboxSpec, image: Path, config: dict | None = None) -> None:
        """Start the sandbox from a checkpoint in `image`: its processes carry on where they
        were saved. `config` (a fork's) replaces the bundle's config.json; without it the
        bundle's own is used (a resume: the spec must match the checkpointed one)."""
        if config is not None:
            self._bundle(spec, config)
        spec.cgroup.prepare_memory(
            (spec.memory_mib + spec.memory_overhead_mib + RESTORE_MARGIN_MIB) << 20)
        await self._launch(spec, ["restore", "--detach", "--bundle", str(spec.bundle_dir),
                                  "--image-path", str(image), spec.runtime_id], restored=True)

    @staticmethod
    def _bundle(spec: SandboxSpec, config: dict) -> None:
        spec.bundle_dir.mkdir(parents=True, exist_ok=True)
        tmp = spec.bundle_dir / "tmp"
        tmp.mkdir(exist_ok=True)
        tmp.chmod(0o1777)
        (spec.bundle_dir / "config.json").write_text(json.dumps(config))

    async def _launch(self, spec: SandboxSpec, command: list[str], restored: bool = False) -> None:
        console = os.open(spec.bundle_dir / "console.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                          0o600)
        try:
            # the rootfs is already an overlay, on the host
            args = self._base(spec.platform) + ["--overlay2", "none", *command]
            # The sandbox inherits the console fd as its stdout/stderr (envd's own log).
            p = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=console, stderr=console)
            code = await asyncio.wait_for(p.wait(), 60)
        finally:
            os.close(console)
        if code != 0:
            tail = (spec.bundle_dir / "console.log").read_text(errors="replace")[-800:]
            raise proc.CommandFailed(args, code, tail)
        self._memory_after_boot(spec, restored)

    async def checkpoint(self, runtime_id: str, image: Path, leave_running: bool = False) -> None:
        """Save the sandbox's memory and kernel state to `image` (a directory). Without
        `leave_running` the sandbox stops once saved (its host processes exit); with it, it
        carries on (a paused one stays paused)."""
        await proc.run(self._base() + ["checkpoint", "--image-path", str(image),
                                       *(["--leave-running"] if leave_running else []),
                                       runtime_id], timeout=300)

    async def freeze(self, runtime_id: str) -> None:
        """Stop every task of the sandbox where it is (`runsc pause`), memory kept."""
        await proc.run(self._base() + ["pause", runtime_id], timeout=30)

    async def thaw(self, runtime_id: str) -> None:
        await proc.run(self._base() + ["resume", runtime_id], timeout=30)

    @staticmethod
    def _memory_after_boot(spec: SandboxSpec, restored: bool = False) -> None:
        """The limit gVisor read at boot (MemTotal) stays; the host's grows by the overhead. And
        the host's OOM killer is pointed at the sandbox's processes, not at the Sentry. Either
        failing leaves a working sandbox with a stricter limit or the old OOM behaviour."""
        try:
            if spec.platform == "systrap":
                stubs_first_for_oom(spec.cgroup, restored)
        except OSError as exc:
            log.warning("%s: could not steer the OOM killer at the stubs: %s", spec.runtime_id, exc)
        if spec.memory_overhead_mib > 0:
            try:
                spec.cgroup.set_memory_limit((spec.memory_mib + spec.memory_overhead_mib) << 20)
            except (OSError, ValueError) as exc:
                log.warning("%s: could not raise the memory limit: %s", spec.runtime_id, exc)

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


def _argv0(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]


def _ppid_and_start(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[19])  # ppid, start time in clock ticks


def stubs_first_for_oom(cgroup: Cgroup, restored: bool = False) -> int:
    """Make the host's OOM killer take a process of the sandbox, not the sandbox.

    When the sandbox's cgroup reaches its limit, the kernel kills the process with the highest
    oom_score: resident memory plus oom_score_adj as a share of the limit. gVisor's memory file
    is charged to the cgroup but is hardly in any process's resident set, so the Sentry (~40 MB
    resident) usually scores highest and the whole sandbox dies. Each process inside runs in a
    host stub process (systrap), and the Sentry turns a stub's death into a SIGKILL of that one
    process. All stubs are forked from one source stub, created at boot, and inherit its
    oom_score_adj: set to 1000 there, it puts every later process of the sandbox ahead of the
    Sentry and the gofer (which stay at the host's value), envd's own stub staying where it was.
    Raising the value needs no privilege (lowering the Sentry's would, CAP_SYS_RESOURCE).

    After a restore (`restored`) the stubs of every restored process exist already, made from
    the source before this runs: each is set too. envd's among them (nothing tells which it
    is): the killer then chooses among stubs by their resident memory, which holds the guest
    memory they map, so it takes the process that used the memory, not envd.

    Returns the source stub's pid; OSError if it is not found."""
    procs = cgroup.procs()
    sentry = next((p for p in procs if _argv0_or_none(p) == b"runsc-sandbox"), None)
    if sentry is None:
        raise OSError("no Sentry process in the sandbox's cgroup")
    info = {}
    for pid in procs:
        try:
            if not _argv0(pid).startswith(b"runsc"):
                info[pid] = _ppid_and_start(pid)
        except (OSError, IndexError, ValueError):
            continue
    parents = {ppid for ppid, _ in info.values()}
    # The source is the Sentry's first stub child, and runs no process: no sysmsg thread child.
    candidates = [p for p, (ppid, _) in info.items() if ppid == sentry and p not in parents]
    if not candidates:
        raise OSError("no systrap source stub in the sandbox's cgroup")
    source = min(candidates, key=lambda p: (info[p][1], p))
    for pid in info if restored else [source]:
        try:
            Path(f"/proc/{pid}/oom_score_adj").write_text(str(STUB_OOM_SCORE_ADJ))
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            if pid == source:
                raise
    return source


def _argv0_or_none(pid: int) -> bytes | None:
    try:
        return _argv0(pid)
    except OSError:
        return None
