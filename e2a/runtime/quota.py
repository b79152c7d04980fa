"""Each sandbox's disk limit: its directory is a btrfs subvolume with a qgroup limit.

Every sandbox's host files (OCI bundle, the overlay's upper and work directories, /tmp) live in
one directory, <data_dir>/sandboxes/<id>. That directory is a subvolume of one btrfs filesystem,
the disk pool, mounted on <data_dir>/sandboxes from a preallocated image file beside it,
<data_dir>/sandboxes.img, through a loop device (direct I/O: pages are not cached twice).
The subvolume's qgroup has a limit on referenced bytes (the template's `disk_mib`): a write
past it fails with EDQUOT inside the sandbox, whether it goes through the overlay (rootfs) or
the /tmp bind, and whoever writes (gVisor, envd's files API): btrfs has no root bypass. Data
and metadata (inodes, directories) both count, so a flood of empty files is limited too.
Every sandbox's qgroup is also a member of the pool's qgroup, limited to 90% of the pool, so
that overcommitted sandboxes together get EDQUOT too, before btrfs itself runs out of space.

Why btrfs (docs/runtime.md, "Disk", has the measurements): this kernel has neither XFS quotas
(CONFIG_XFS_QUOTA) nor the ext4 quota format (CONFIG_QFMT_V2); a subvolume with its limit is
one ioctl, well under a millisecond, where a loop-mounted ext4 image per sandbox costs ~13 ms.

The image is preallocated, never sparse: a sparse image on a full host disk turns the pool's
writes into I/O errors and btrfs forces itself read-only (seen here), breaking every sandbox.
Its size is fixed when it is made (E2A_DISK_GIB, default half the free space of the data
directory's filesystem, at most 64 GiB); it is the most all sandboxes of the host can write
together.

Deleting a subvolume is removing its directory (SandboxDir does it, after the overlay is
unmounted); the kernel drops the subvolume at the next transaction commit, which destroy starts,
and (this kernel, 6.18) its qgroup with it. The qgroups of dropped subvolumes that older kernels
leave are removed here (`remove_stale_qgroups`), after each destroy and at start, but only once
the drop is accounted (their numbers are zero).

The limits hold only while btrfs's quota accounting is consistent. Removing a qgroup whose
numbers are not zero yet, or dropping a subvolume whose tree is deeper than the kernel's
`drop_subtree_threshold`, marks it inconsistent, and from then on this kernel stops accounting
(BTRFS_QGROUP_RUNTIME_FLAG_NO_ACCOUNTING): every sandbox could write past its limit, measured
here (300 MiB written into a 100 MiB volume). So the pool traces every drop (threshold at its
maximum), removes only zeroed qgroups, and `keep_consistent` rescans if the flag is ever set.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

from e2a import proc

log = logging.getLogger("e2a.quota")

MiB = 1024 * 1024
GiB = 1024 * MiB
IMAGE_SUFFIX = ".img"
LABEL = "e2a-sandboxes"
DEFAULT_MAX_GIB = 64  # the default pool: half the free space, but no more than this

# ioctl numbers from linux/btrfs.h: _IOC(direction, 0x94, nr, size).
_W, _R, _RW = 1, 2, 3


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0x94 << 8) | nr


SUBVOL_CREATE_V2 = _ioc(_W, 24, 4096)  # struct btrfs_ioctl_vol_args_v2
TREE_SEARCH = _ioc(_RW, 17, 4096)
START_SYNC = _ioc(_R, 24, 8)
WAIT_SYNC = _ioc(_W, 22, 8)
QUOTA_CTL = _ioc(_RW, 40, 16)
QGROUP_CREATE = _ioc(_W, 42, 16)
QGROUP_LIMIT = _ioc(_R, 43, 48)  # declared _IOR in the kernel header, though it writes
QUOTA_RESCAN = _ioc(_W, 44, 64)  # struct btrfs_ioctl_quota_rescan_args
QUOTA_RESCAN_WAIT = _ioc(0, 46, 0)
FS_INFO = _ioc(_R, 31, 1024)  # struct btrfs_ioctl_fs_info_args: max_id, num_devices, fsid...

QUOTA_CTL_ENABLE = 1
QGROUP_LIMIT_MAX_RFER = 1
SUBVOL_QGROUP_INHERIT = 1 << 2
QGROUP_INHERIT_SET_LIMITS = 1 << 0
# Every sandbox's qgroup is a member of this one (level 1), whose limit keeps the pool's own
# filesystem from filling up: the sandboxes together get EDQUOT while btrfs still has room for
# its metadata, rather than btrfs's ENOSPC (with its odd edges: EIO on some small writes, space
# held by emptied data chunks) when the pool is overcommitted.
POOL_QGROUP = (1 << 48) | 1
POOL_HEADROOM = 0.10  # of the pool, at least 256 MiB
ROOT_TREE, QUOTA_TREE = 1, 8
ROOT_BACKREF_KEY, QGROUP_STATUS_KEY, QGROUP_INFO_KEY = 144, 240, 242
STATUS_INCONSISTENT = 1 << 2  # BTRFS_QGROUP_STATUS_FLAG_INCONSISTENT
_QGROUP_INFO = struct.Struct("=5Q")  # generation, rfer, rfer_cmpr, excl, excl_cmpr
MAX_LEVEL = 8  # BTRFS_MAX_LEVEL: a drop_subtree_threshold no tree reaches
FIRST_FREE_OBJECTID = 256  # inode number of a subvolume's root; lowest subvolume id
_SEARCH_KEY = struct.Struct("=7Q4I4Q")    # struct btrfs_ioctl_search_key (104 bytes)
_SEARCH_HEADER = struct.Struct("=3Q2I")   # struct btrfs_ioctl_search_header (32 bytes)


class PoolError(Exception):
    """The disk pool cannot be set up; e2a does not start without per-sandbox disk limits."""


# ---- the pool: one btrfs filesystem for every sandbox of this e2a instance ------------------

def image_path(sandboxes_dir: Path) -> Path:
    return sandboxes_dir.with_name(sandboxes_dir.name + IMAGE_SUFFIX)


def mount_fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly on `path` (the last mount there), or None."""
    return mount_table().get(str(path))


def mount_table() -> dict[str, str]:
    """Every mount point and the filesystem type mounted there last. One read for many
    questions: the table grows with every sandbox (a workspace's FUSE mount, its overlay), so
    reading it once per sandbox made a sweep of 200 sandboxes cost half a core."""
    table = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2:
                table[_unescape(parts[1])] = parts[2]
    return table


def _unescape(field: str) -> str:
    """A path as the kernel writes it in the mount table: space, tab, newline, backslash as
    octal escapes (\\040...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def is_pool(sandboxes_dir: Path) -> bool:
    return mount_fstype(sandboxes_dir) == "btrfs"


async def ensure_pool(sandboxes_dir: Path, size_gib: int = 0) -> None:
    """Mount the disk pool on `sandboxes_dir`, making its image first if there is none.
    Idempotent: a pool already mounted is kept as it is (sandboxes live in it)."""
    sandboxes_dir.mkdir(parents=True, exist_ok=True)
    fstype = mount_fstype(sandboxes_dir)
    if fstype is None:
        image = image_path(sandboxes_dir)
        if not image.exists():
            await _make_image(image, size_gib)
        elif size_gib and image.stat().st_size != size_gib * GiB:
            log.warning("disk pool %s is %d GiB, not E2A_DISK_GIB=%d: it keeps its size (make "
                        "a new one with no sandbox running: stop e2a, unmount %s, delete it)",
                        image, image.stat().st_size // GiB, size_gib, sandboxes_dir)
        _clear_leftovers(sandboxes_dir)
        await _mount(image, sandboxes_dir)
    elif fstype != "btrfs":
        raise PoolError(f"{sandboxes_dir} is a {fstype} mount, not e2a's btrfs disk pool")
    with _opendir(sandboxes_dir) as fd:
        fcntl.ioctl(fd, QUOTA_CTL, bytearray(struct.pack("=QQ", QUOTA_CTL_ENABLE, 0)))
        fcntl.ioctl(fd, QUOTA_RESCAN_WAIT)  # the first scan, which enabling starts
        try:
            fcntl.ioctl(fd, QGROUP_CREATE, bytearray(struct.pack("=QQ", 1, POOL_QGROUP)))
        except FileExistsError:
            pass
        st = os.fstatvfs(fd)
        size = st.f_blocks * st.f_frsize
        _limit(fd, POOL_QGROUP, size - max(int(size * POOL_HEADROOM), 256 * MiB))
    # Account every dropped subvolume however deep its tree (slower drops, in the kernel's
    # cleaner thread) rather than give up and mark the quota inconsistent.
    threshold = _qgroups_sysfs(sandboxes_dir, "drop_subtree_threshold")
    if threshold.exists():  # Linux 6.2 on; older kernels always account drops
        threshold.write_text(str(MAX_LEVEL))
    keep_consistent(sandboxes_dir)
    os.chmod(sandboxes_dir, 0o700)


async def _make_image(image: Path, size_gib: int) -> None:
    if not size_gib:  # half of what is free now, at most 64 GiB: the rest stays for the host
        st = os.statvfs(image.parent)
        size_gib = min(st.f_bavail * st.f_frsize // 2 // GiB, DEFAULT_MAX_GIB)
        if size_gib < 1:
            raise PoolError(f"no room for a disk pool beside {image}: less than 2 GiB free")
    part = image.with_name(image.name + ".part")
    part.unlink(missing_ok=True)
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size_gib * GiB)  # reserved now: the host cannot run it dry
    except OSError as exc:
        os.close(fd)
        part.unlink(missing_ok=True)
        raise PoolError(f"cannot reserve {size_gib} GiB for the disk pool {image}: "
                        f"{exc.strerror} (set E2A_DISK_GIB lower)") from exc
    os.close(fd)
    # -K: no discard, which would punch the reservation out of the file again.
    await proc.run(["mkfs.btrfs", "-q", "-f", "-K", "-m", "single", "-L", LABEL, str(part)])
    part.rename(image)
    log.info("made the disk pool %s (%d GiB, preallocated)", image, size_gib)


def _clear_leftovers(sandboxes_dir: Path) -> None:
    """What is in the directory under the pool's mount point would be hidden by the mount. No
    sandbox can run from it without its overlay mounted; with one mounted, refuse."""
    sandboxes_dir.mkdir(parents=True, exist_ok=True)
    prefix = str(sandboxes_dir).rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        busy = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
    if busy:
        raise PoolError(f"sandboxes made without a disk pool are still mounted under "
                        f"{sandboxes_dir} ({busy[0]}); destroy them before starting this e2a")
    for entry in sandboxes_dir.iterdir():
        log.warning("removing %s: a leftover from before the disk pool", entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


async def _mount(image: Path, target: Path) -> None:
    # Direct I/O in 4 KiB blocks: the pool's pages are not cached a second time for the image.
    out = await proc.run(["losetup", "--find", "--show", "--direct-io=on", "--sector-size",
                          "4096", str(image)])
    dev = next(line for line in out.split() if line.startswith("/dev/"))  # past any warning
    try:
        # nodiscard: keep the preallocated blocks; noatime: reads write no metadata.
        await proc.run(["mount", "-t", "btrfs", "-o", "nodiscard,noatime", dev, str(target)])
    finally:
        # Detaching a mounted loop device marks it autoclear: it goes with the last unmount.
        await proc.run(["losetup", "-d", dev], check=False)


# ---- per sandbox: a subvolume with a limit ---------------------------------------------------

def create_volume(path: Path, limit_bytes: int) -> None:
    """Make `path` a subvolume whose writes are limited to `limit_bytes`, its qgroup a member of
    the pool's (one ioctl). Idempotent: an existing subvolume gets the limit."""
    # struct btrfs_qgroup_inherit: flags, num_qgroups, num_ref_copies, num_excl_copies, the
    # limit (flags, max_rfer, max_excl, rsv_rfer, rsv_excl), then the qgroups to join.
    packed = struct.pack("=10Q", QGROUP_INHERIT_SET_LIMITS, 1, 0, 0,
                         QGROUP_LIMIT_MAX_RFER, limit_bytes, 0, 0, 0, POOL_QGROUP)
    inherit = ctypes.create_string_buffer(packed, len(packed))  # the kernel checks the size
    # struct btrfs_ioctl_vol_args_v2: fd, transid, flags, {size, qgroup_inherit*}, 2 unused
    # words, name[4040].
    args = bytearray(struct.pack("=qQQQQQQ4040s", 0, 0, SUBVOL_QGROUP_INHERIT,
                                 ctypes.sizeof(inherit), ctypes.addressof(inherit), 0, 0,
                                 path.name.encode()))
    with _opendir(path.parent) as parent:
        try:
            fcntl.ioctl(parent, SUBVOL_CREATE_V2, args)
            return
        except FileExistsError:
            if not is_volume(path):
                raise RuntimeError(f"{path} exists and is not a subvolume") from None
    with _opendir(path) as fd:  # qgroup id 0: the subvolume of this descriptor
        _limit(fd, 0, limit_bytes)


def set_limit(path: Path, limit_bytes: int) -> None:
    """Change the limit of the subvolume at `path` (a lower one than it holds: writes fail)."""
    with _opendir(path) as fd:
        _limit(fd, 0, limit_bytes)


def allocated(path: Path) -> int:
    """Bytes allocated to the files under `path` (what its qgroup counts, less metadata)."""
    total, stack = 0, [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue
    return total


def is_volume(path: Path) -> bool:
    try:
        return path.stat().st_ino == FIRST_FREE_OBJECTID and path.is_dir()
    except FileNotFoundError:
        return False


def commit(pool: Path) -> None:
    """Start a transaction commit (not waited for): the kernel then drops deleted subvolumes."""
    with _opendir(pool) as fd:
        fcntl.ioctl(fd, START_SYNC, bytearray(8))


def commit_and_wait(pool: Path) -> None:
    """Commit the running transaction and wait for it. Quota accounting of shared extents
    (reflinks) happens at the commit: until then a subvolume's count leaves them out, and
    writes into it pass its limit by as much."""
    with _opendir(pool) as fd:
        transid = bytearray(8)
        fcntl.ioctl(fd, START_SYNC, transid)
        fcntl.ioctl(fd, WAIT_SYNC, transid)


def volume_qgroups(pool: Path) -> list[int]:
    """The ids of the pool's subvolume qgroups (level 0, not the top level's)."""
    with _opendir(pool) as fd:
        return [q for _, q in _search(fd, QUOTA_TREE, 0, 0, QGROUP_INFO_KEY)
                if q >> 48 == 0 and q >= FIRST_FREE_OBJECTID]


def stale_qgroups(pool: Path) -> list[int]:
    """Subvolume qgroups whose subvolume is deleted (no longer linked in any directory)."""
    ids = volume_qgroups(pool)
    with _opendir(pool) as fd:
        return [q for q in ids if not _search(fd, ROOT_TREE, q, q, ROOT_BACKREF_KEY)]


def remove_qgroup(pool: Path, qgroup: int) -> bool:
    """Remove a deleted subvolume's qgroup. False while the kernel still drops the subvolume
    (EBUSY from Linux 6.8 on; the kernel then removes the qgroup itself, or the next sweep), or
    has dropped it but not yet committed the accounting of that: the kernel then still counts
    bytes in the qgroup, and removing it would mark the whole quota inconsistent."""
    with _opendir(pool) as fd:
        if _qgroup_numbers(fd, qgroup) not in (None, (0, 0)):
            return False
        try:
            fcntl.ioctl(fd, QGROUP_CREATE, bytearray(struct.pack("=QQ", 0, qgroup)))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return True  # already gone
            if exc.errno == errno.EBUSY:
                return False
            raise
    return True


def remove_stale_qgroups(pool: Path) -> list[int]:
    """Remove what qgroups of deleted subvolumes can be removed now; returns their ids."""
    return [q for q in stale_qgroups(pool) if remove_qgroup(pool, q)]


def inconsistent(pool: Path) -> bool:
    """Whether btrfs's quota accounting is marked inconsistent (limits no longer hold): the
    kernel's own flag in sysfs, or where a kernel has none there, the status item on disk (as
    of the last commit)."""
    try:
        return _qgroups_sysfs(pool, "inconsistent").read_text().strip() == "1"
    except FileNotFoundError:
        with _opendir(pool) as fd:
            for _, _, data in _items(fd, QUOTA_TREE, 0, 0, QGROUP_STATUS_KEY):
                return bool(struct.unpack_from("=4Q", data)[2] & STATUS_INCONSISTENT)
        return False


def keep_consistent(pool: Path) -> bool:
    """If the quota accounting is inconsistent, start a rescan that makes it whole again (the
    kernel clears the mark when it ends). True if one was started."""
    if not inconsistent(pool):
        return False
    log.warning("the disk pool's quota accounting is inconsistent (sandboxes could write past "
                "their limits): rescanning it")
    with _opendir(pool) as fd:
        try:
            fcntl.ioctl(fd, QUOTA_RESCAN, bytearray(64))
        except OSError as exc:
            if exc.errno != errno.EINPROGRESS:
                raise
    return True


# ---- ioctl helpers ---------------------------------------------------------------------------

def _limit(fd: int, qgroup: int, max_rfer: int) -> None:
    fcntl.ioctl(fd, QGROUP_LIMIT, bytearray(struct.pack(
        "=6Q", qgroup, QGROUP_LIMIT_MAX_RFER, max_rfer, 0, 0, 0)))


def _qgroup_numbers(fd: int, qgroup: int) -> tuple[int, int] | None:
    """A qgroup's referenced and exclusive bytes as of the last commit; None if it has none."""
    for _, _, data in _items(fd, QUOTA_TREE, 0, 0, QGROUP_INFO_KEY, qgroup, qgroup):
        _, rfer, _, excl, _ = _QGROUP_INFO.unpack_from(data)
        return rfer, excl
    return None


def _qgroups_sysfs(pool: Path, name: str) -> Path:
    """A file of the pool's /sys/fs/btrfs/<fsid>/qgroups."""
    with _opendir(pool) as fd:
        buf = bytearray(1024)
        fcntl.ioctl(fd, FS_INFO, buf)
    fsid = buf[16:32].hex()
    uuid = f"{fsid[:8]}-{fsid[8:12]}-{fsid[12:16]}-{fsid[16:20]}-{fsid[20:]}"
    return Path("/sys/fs/btrfs") / uuid / "qgroups" / name


@contextmanager
def _opendir(path: Path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _search(fd: int, tree: int, min_obj: int, max_obj: int, key_type: int,
            min_off: int = 0, max_off: int = 2**64 - 1) -> list[tuple[int, int]]:
    """Keys (objectid, offset) of one item type in a btrfs tree (BTRFS_IOC_TREE_SEARCH)."""
    return [(o, off) for o, off, _ in _items(fd, tree, min_obj, max_obj, key_type, min_off,
                                             max_off)]


def _items(fd: int, tree: int, min_obj: int, max_obj: int, key_type: int,
           min_off: int = 0, max_off: int = 2**64 - 1) -> list[tuple[int, int, bytes]]:
    """Items (objectid, offset, data) of one item type in a btrfs tree."""
    found = []
    while True:
        buf = bytearray(4096)
        _SEARCH_KEY.pack_into(buf, 0, tree, min_obj, max_obj, min_off, max_off, 0, 2**64 - 1,
                              key_type, key_type, 512, 0, 0, 0, 0, 0)
        fcntl.ioctl(fd, TREE_SEARCH, buf)
        nr = _SEARCH_KEY.unpack_from(buf, 0)[9]
        if nr == 0:
            return found
        pos, last = _SEARCH_KEY.size, None
        for _ in range(nr):
            _, objectid, offset, typ, length = _SEARCH_HEADER.unpack_from(buf, pos)
            pos += _SEARCH_HEADER.size
            if typ == key_type:
                found.append((objectid, offset, bytes(buf[pos:pos + length])))
            pos += length
            last = (objectid, offset)
        # Next batch: after the last key seen (objectid, then offset, within the one type).
        objectid, offset = last
        if offset < max_off:
            min_obj, min_off = objectid, offset + 1
        elif objectid < max_obj:
            min_obj, min_off = objectid + 1, 0
        else:
            return found

