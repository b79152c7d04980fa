"""Every host object a sandbox owns, as one small unit each.

A unit knows how to create itself, how to destroy itself (idempotent: destroying what is
half-made or already gone is fine), and how to find the objects of its kind that this e2a
instance left on the host for sandboxes it no longer keeps (its orphans). A sandbox is its list
of units in creation order; failed create, destroy, death and reconcile all remove them through
`teardown`, in reverse order. Adding a kind of host resource is adding one unit here and one
line in `units_for`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from e2a import proc
from e2a.network import links
from e2a.network.firewall import Firewall
from e2a.runtime import cgroups, quota, rootfs
from e2a.runtime.runsc import Runsc, SandboxSpec
from e2a.templates.recipes import DEFAULT_DISK_MIB
from e2a.workspaces.mount import Mount
from e2a.workspaces.service import MountPlan

log = logging.getLogger("e2a.resources")


@dataclass
class HostEnv:
    """What the units of one e2a instance share."""

    instance: str
    sandboxes_dir: Path      # one directory per sandbox: bundle, writable layer, /tmp
    runsc: Runsc
    firewall: Firewall
    addressing: links.Addressing
    envd_binary: Path
    resolv_conf: Path
    rclone: str = ""
    workspaces: object = None  # workspaces.service.Workspaces: the S3 store's mount settings

    def runtime_id(self, sandbox_id: str) -> str:
        return f"{self.instance}-{sandbox_id}"


@dataclass
class Plan:
    """One sandbox's host-side facts, enough to create or destroy every unit of it."""

    id: str
    slot: int
    internet: bool
    token: str
    image: Path | None       # the template's rootfs (only needed to create)
    memory_mib: int
    platform: str
    disk_mib: int = DEFAULT_DISK_MIB  # the sandbox's writes (rootfs and /tmp) together
    env: dict[str, str] = field(default_factory=dict)  # every process's, and envd's settings
    workspace: MountPlan | None = None  # mounted on /home/user
    # A fork (docs/pause.md): its writable layer and /tmp start as copies of `seed`'s, and it
    # starts from the checkpoint in `restore_image` with `restore_config` (its origin's OCI
    # config, rebased on this sandbox's paths) instead of booting.
    seed: Path | None = None
    restore_image: Path | None = None
    restore_config: dict | None = None
    link: links.Link = field(init=False)
    dir: Path = field(init=False)
    runtime_id: str = field(init=False)

    def bind(self, env: HostEnv) -> "Plan":
        self.link = env.addressing.link(self.slot, self.id)
        self.dir = env.sandboxes_dir / self.id
        self.runtime_id = env.runtime_id(self.id)
        return self


@dataclass
class Keep:
    """What reconcile keeps: orphans are everything of this instance that is not in here."""

    ids: set[str]
    links: set[links.Link]

    @property
    def runtime_ids(self) -> set[str]:
        return {link.netns for link in self.links}  # netns and runsc id share the name

    @property
    def host_ifs(self) -> set[str]:
        return {link.host_if for link in self.links}


class Resource(ABC):
    kind = "resource"

    def __init__(self, env: HostEnv, plan: Plan):
        self.env, self.plan = env, plan

    @abstractmethod
    async def create(self) -> None: ...

    @abstractmethod
    async def destroy(self) -> None: ...

    @classmethod
    @abstractmethod
    async def orphans(cls, env: HostEnv, keep: Keep) -> list["Orphan"]: ...

    @classmethod
    async def prepare(cls, env: HostEnv, settings) -> None:
        """What every unit of this kind needs on the host before the first one is made, set up
        once at start (idempotent: the server may restart with sandboxes running)."""

    def __repr__(self) -> str:
        return f"{self.kind}({self.plan.id})"


@dataclass
class Orphan:
    """A host object of this instance that no kept sandbox owns; `destroy` removes it."""

    kind: str
    name: str
    destroy: object  # () -> Awaitable[None]


class DiskQuota(Resource):
    """The sandbox's directory as a btrfs subvolume of the disk pool, with a limit of
    `disk_mib` on everything written in it: the rootfs overlay's upper layer and /tmp.

    First in creation order: SandboxDir only sets the mode of the directory made here. Its
    teardown removes the directory (which deletes the subvolume, after the overlay is unmounted);
    this unit's destroy, last, checks that and removes the qgroups of deleted subvolumes."""

    kind = "disk quota"

    @classmethod
    async def prepare(cls, env: HostEnv, settings) -> None:
        await quota.ensure_pool(env.sandboxes_dir, settings.disk_gib)

    async def create(self) -> None:
        await asyncio.to_thread(quota.create_volume, self.plan.dir,
                                self.plan.disk_mib * quota.MiB)

    async def destroy(self) -> None:
        if quota.is_volume(self.plan.dir):
            raise RuntimeError(f"subvolume {self.plan.dir} is still there")
        if quota.is_pool(self.env.sandboxes_dir):
            await _drop_deleted(self.env.sandboxes_dir)
            try:  # a guard of every sandbox's limit: it never fails this destroy
                await asyncio.to_thread(quota.keep_consistent, self.env.sandboxes_dir)
            except OSError as exc:
                log.error("checking the disk pool's quota accounting: %s", exc)

    @classmethod
    async def orphans(cls, env: HostEnv, keep: Keep) -> list[Orphan]:
        # Subvolumes of sandboxes not kept go with their directories (SandboxDir's orphans,
        # removed before these); what may be left is the qgroup of a deleted subvolume.
        pool = env.sandboxes_dir
        if not quota.is_pool(pool):
            return []
        # A subvolume the kernel is still dropping keeps its qgroup a moment (remove_qgroup then
        # leaves it to the kernel, or to the next sweep).
        await asyncio.to_thread(quota.commit, pool)
        return [Orphan("qgroup", f"0/{q}", lambda q=q: asyncio.to_thread(quota.remove_qgroup,
                                                                         pool, q))
                for q in await asyncio.to_thread(quota.stale_qgroups, pool)]


DROP_WAIT = 5.0  # seconds a destroy waits for the kernel to drop deleted subvolumes


async def _drop_deleted(pool: Path) -> None:
    """Wait (bounded) until the qgroups of deleted subvolumes are gone. The kernel drops a
    subvolume in its cleaner thread after a commit, and its qgroup with it (Linux 6.8 on; what
    an older kernel leaves is removed here). Under load that takes a moment, and a destroy that
    returned before it would leave the qgroup to the next sweep."""
    deadline = asyncio.get_running_loop().time() + DROP_WAIT
    while True:
        await asyncio.to_thread(quota.commit, pool)
        await asyncio.to_thread(quota.remove_stale_qgroups, pool)
        if (not await asyncio.to_thread(quota.stale_qgroups, pool)
                or asyncio.get_running_loop().time() > deadline):
            return
        await asyncio.sleep(0.05)


class SandboxDir(Resource):
    """The sandbox's directory: OCI bundle, writable layer, /tmp. Only root may enter it."""

    kind = "directory"

    async def create(self) -> None:
        self.plan.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.plan.dir, 0o700)

    async def destroy(self) -> None:
        await remove_dir(self.plan.dir)

    @classmethod
    async def orphans(cls, env: HostEnv, keep: Keep) -> list[Orphan]:
        if not env.sandboxes_dir.is_dir():
            return []
        return [Orphan(cls.kind, d.name, lambda d=d: remove_dir(d))
                for d in env.sandboxes_dir.iterdir() if d.name not in keep.ids]


async def remove_dir(path: Path) -> None:
    """Delete a sandbox directory, never through a mount that is still on it. `rm -rf`, not
    shutil.rmtree: the tree is the sandbox's own making, and Python's recursive walk fails on a
    directory a few thousand levels deep (RecursionError), where rm's walk does not."""
    merged = path / "rootfs"
    if rootfs.is_mounted(merged):
        await rootfs.Layer(path).unmount()
        if rootfs.is_mounted(merged):
            raise RuntimeError(f"{merged} is still mounted; its directory stays")
    for child in list(path.iterdir()) if path.is_dir() else []:
        try:  # a subvolume of its own (a workspace's cache): --one-file-system would skip it
            nested = quota.is_volume(child)
        except OSError:  # e.g. a dead FUSE mount point: rm below leaves it, and says so
            continue
        if nested:
            await remove_dir(child)
    await proc.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=False,
                   timeout=600)
    if path.exists():
        raise RuntimeError(f"could not remove {path}")


class NetworkLink(Resource):
    """Network namespace + veth pair (the sandbox's /30 link)."""

    kind = "network link"

    async def create(self) -> None:
        await links.create(self.plan.link)

    async def destroy(self) -> None:
        await links.destroy(self.plan.link)
        if links.exists(self.plan.link):
            raise RuntimeError(f"network link {self.plan.link.host_if} is still there")

    @classmethod
    async def orphans(cls, env: HostEnv, keep: Keep) -> list[Orphan]:
        found = []
        for ns in links.existing_netns(env.instance):
            if ns not in keep.runtime_ids:
                found.append(Orphan("netns", ns, lambda ns=ns: links.destroy(
                    links.Link(ns, "", "", ""))))
        for ifname in links.existing_host_ifs(env.instance):
            if ifname not in keep.host_ifs:
                found.append(Orphan("veth", ifname, lambda i=ifname: links.destroy(
                    links.Link("", i, "", ""))))
        return found


class InternetAccess(Resource):
    """The sandbox's entry in the firewall's internet allow-list (only if it may go out)."""

    kind = "internet access"

    async def create(self) -> None:
        if self.plan.internet:
            await self.env.firewall.set_internet(self.plan.link.host_if, True)

    async def destroy(self) -> None:
        await self.env.firewall.set_internet(self.plan.link.host_if, False)

    @classmethod
    async def orphans(cls, env: HostEnv, keep: Keep) -> list[Orphan]:
        return [Orphan(cls.kind, i, lambda i=i: env.firewall.set_internet(i, False))
                for i in await env.firewall.allowed() if i not in keep.host_ifs]


class RootfsLayer(Resource):
    """The overlay mount: template image below, the sandbox's writes above."""

    kind = "rootfs overlay"

    async def create(self) -> None:
        layer = rootfs.Layer(self.plan.dir)
        if self.plan.seed is not None:
            await copy_tree(self.plan.seed / "upper", layer.upper)
            await copy_tree(self.plan.seed / "tmp", self.plan.dir / "tmp")
            if quota.is_pool(self.env.sandboxes_dir):  # the copy counts against its limit now
                await asyncio.to_thread(quota.commit_and_wait, self.env.sandboxes_dir)
        await layer.mount(self.plan.image)

    async def destroy(self) -> None:
        layer = rootfs.Layer(self.plan.dir)
        await layer.unmount()
        if rootfs.is_mounted(layer.merged):
            raise RuntimeError(f"{layer.merged} is still mounted")

    @classmethod
    async def orphans(cls, env: HostEnv, keep: Keep) -> list[Orphan]:
        found = []
        for target in rootfs.mounts_under(env.sandboxes_dir):
            sid = Path(target).relative_to(env.sandboxes_dir).parts[0]
            if sid not in keep.ids:
                found.append(Orphan(cls.kind, target, lambda t=target: rootfs.Layer(
                    Path(t).parent).unmount()))
        return found


async def copy_tree(source: Path, target: Path) -> None:
    """`source`'s tree into `target` (made if missing): owners, modes, xattrs (overlayfs keeps
    its opaque-directory marks in them) and whiteouts (device nodes) kept; the data shared
    with the source, not copied, where the filesystem can (btrfs: a reflink per file)."""
    target.mkdir(parents=True, exist_ok=True)
    await proc.run(["cp", "-a", "--reflink=auto", f"{source}/.", str(target)], timeout=600)


class WorkspaceMount(Resource):
    """The workspace on /home/user: an rclone FUSE mount on the host (workspaces/mount.py), its
    cache a subvolume whose limit is the user's storage quota. Its destroy returns only once
    every file written inside is in S3; until then the sandbox stays `stopping` and the reaper
    retries (nothing acknowledged is dropped with the cache)."""

    kind = "workspace mount"
    CACHE = "workspace-cache"
    ID_FILE = "workspace.id"  # which workspace, for a mount found without its sandbox

    @staticmethod
    def mount(env: HostEnv, sandbox_dir: Path, workspace_id: str, size: int = 0) -> Mount:
        return Mount(sandbox_dir, env.rclone, env.workspaces.mount_env(),
                     env.workspaces.remote(workspace_id), size)

    async def create(self) -> None:
        ws = self.plan.workspace
        if ws is None:
            return
        (self.plan.dir / self.ID_FILE).write_text(ws.workspace_id)
        limit = ws.limit()
        await asyncio.to_thread(quota.create_volume, self.plan.dir / self.CACHE, limit)
        ws.cache = self.plan.dir / self.CACHE  # from now on its limit follows the user's share
        m = self.mount(self.env, self.plan.dir, ws.workspace_id, limit)
        await m.start()
        if ws.fresh and self.plan.image is not None:  # a new workspace: the template's dotfiles
            skel = self.plan.image / "home" / "user"
            if skel.is_dir() and any(skel.iterdir()):
                await proc.run(["cp", "-a", "--no-preserve=ownership", f"{skel}/.",
                                str(m.point)], timeout=60)

    async def destroy(self) -> None:
        ws = self.plan.workspace
        if ws is not None:
            await self.close(self.env, self.plan.dir, ws.workspace_id)

    @classmethod
    async def close(cls, env: HostEnv, sandbox_dir: Path, workspace_id: str) -> None:
        if (sandbox_dir / cls.ID_FILE).exists():
            lost = await cls.mount(env, sandbox_dir, workspace_id).close(env.workspaces.answers)
            if lost:  # S3 keeps refusing them while it answers: they can never be stored
                log.error("%s: S3 refused %d files of workspace %s for good, given up: %s",
                          sandbox_dir.name, len(lost), workspace_id, ", ".join(lost[:20]))
        cache = sandbox_dir / cls.CACHE
        if cache.exists():
            await remove_dir(cache)
        (sandbox_dir / cls.ID_FILE).unlink(missing_ok=True)

    @classmethod
    async def orphans(cls, env: HostEnv, keep: Keep) -> list[Orphan]:
        if not env.sandboxes_dir.is_dir() or env.workspaces is None:
            return []
        found = []
        for d in env.sandboxes_dir.iterdir():
            idf = d / cls.ID_FILE
            if d.name not in keep.ids and idf.exists():
                wid = idf.read_text().strip()
                found.append(Orphan(cls.kind, f"{d.name} ({wid})",
                                    lambda d=d, wid=wid: cls.close(env, d, wid)))
        return found


class SandboxCgroup(Resource):
    """The host cgroup runsc puts the sandbox in (runsc makes it; a crash can leave it)."""

    kind = "cgroup"

    @property
    def cgroup(self) -> cgroups.Cgroup:
        return cgroups.Cgroup(self.env.instance, self.plan.runtime_id)

    async def create(self) -> None:
        pass  # runsc creates it from the OCI spec's cgroupsPath

    async def destroy(self) -> None:
        await empty_and_remove(self.cgroup)

    @classmethod
    async def orphans(cls, env: HostEnv, keep: Keep) -> list[Orphan]:
        async def rm(leaf: str) -> None:
            await empty_and_remove(cgroups.Cgroup(env.instance, leaf))
        return [Orphan(cls.kind, leaf, lambda leaf=leaf: rm(leaf))
                for leaf in cgroups.leaves(env.instance) - keep.runtime_ids]


async def empty_and_remove(cgroup: cgroups.Cgroup) -> None:
    """Remove the cgroup, first killing any process still in it: whatever runsc left running
    (a container it never recorded, say) is the sandbox's, and must not outlive it."""
    for _ in range(50):
        pids = cgroup.procs()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        await asyncio.sleep(0.02)
    cgroup.remove()
    if cgroup.exists():
        raise RuntimeError(f"cgroup {cgroup.path} is still there (processes: {cgroup.procs()})")


class RunscContainer(Resource):
    """The gVisor sandbox itself: runsc's Sentry and gofer processes, envd as its init."""

    kind = "runsc container"

    async def create(self) -> None:
        # Not interruptible: `runsc run` cancelled halfway would leave a Sentry and gofer that
        # runsc never recorded, so `runsc delete` could not find them. A cancelled create
        # waits for runsc (~150 ms) and then unwinds, and teardown deletes a known container.
        await uninterrupted(self._start())

    async def _start(self) -> None:
        spec = self.spec(self.env, self.plan)
        if self.plan.restore_image is not None:
            await self.env.runsc.restore(spec, self.plan.restore_image, self.plan.restore_config)
        else:
            await self.env.runsc.start(spec)

    @staticmethod
    def spec(env: HostEnv, p: Plan) -> SandboxSpec:
        return SandboxSpec(
            runtime_id=p.runtime_id, bundle_dir=p.dir, rootfs=rootfs.Layer(p.dir).merged,
            netns_path=p.link.netns_path, envd_binary=env.envd_binary, envd_token=p.token,
            memory_mib=p.memory_mib, platform=p.platform, resolv_conf=env.resolv_conf,
            cgroup=cgroups.Cgroup(env.instance, p.runtime_id), env=p.env,
            home=p.dir / "home" if p.workspace else None)

    async def destroy(self) -> None:
        await self.env.runsc.delete(self.plan.runtime_id)

    @classmethod
    async def orphans(cls, env: HostEnv, keep: Keep) -> list[Orphan]:
        if not env.runsc.available():
            return []  # nothing can have been started without it
        prefix = env.instance + "-"
        return [Orphan(cls.kind, cid, lambda cid=cid: env.runsc.delete(cid))
                for cid in {c.get("id") for c in await env.runsc.list()}
                if cid and cid.startswith(prefix) and cid not in keep.runtime_ids]


async def uninterrupted(coro) -> None:
    """Run `coro` to its end even if the caller is cancelled meanwhile; then re-raise the
    cancellation (its outcome, success or not, is then undone by teardown)."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                continue
            except Exception:
                break
        raise


# Creation order; teardown runs it backwards.
KINDS: tuple[type[Resource], ...] = (DiskQuota, SandboxDir, NetworkLink, InternetAccess,
                                     RootfsLayer, WorkspaceMount, SandboxCgroup,
                                     RunscContainer)


async def prepare(env: HostEnv, kinds: tuple[type[Resource], ...], settings) -> None:
    """Set up what the units of `kinds` share on the host (the disk pool); once at start,
    before reconcile."""
    for kind in kinds:
        await kind.prepare(env, settings)


def units_for(env: HostEnv, plan: Plan,
              kinds: tuple[type[Resource], ...] = KINDS) -> list[Resource]:
    return [kind(env, plan) for kind in kinds]


async def teardown(units: list[Resource]) -> list[str]:
    """Destroy `units` in reverse order, carrying on past failures; returns what failed."""
    failed = []
    for unit in reversed(units):
        try:
            await unit.destroy()
        except Exception as exc:
            log.error("destroying %r failed: %s", unit, exc)
            failed.append(f"{unit.kind}: {exc}")
    return failed


async def sweep_orphans(env: HostEnv, keep: Keep) -> list[str]:
    """Remove every host object of this instance that `keep` does not own, kinds in reverse
    creation order (the container before its cgroup and mount, the mount before its directory).
    Returns the names removed."""
    removed = []
    for kind in reversed(KINDS):
        for orphan in await kind.orphans(env, keep):
            try:
                await orphan.destroy()
                removed.append(f"{orphan.kind} {orphan.name}")
            except Exception as exc:
                log.error("removing orphan %s %s failed: %s", orphan.kind, orphan.name, exc)
    return removed
