"""A tenant cannot fill the host's disk: a sandbox's writes (its rootfs and /tmp together) stop
at its template's `disk_mib` with EDQUOT inside, through the files API too; the sandbox goes on
(deleting frees the space), the host disk does not shrink with it (the pool is preallocated),
and a destroyed sandbox leaves no subvolume, qgroup, mount or loop device behind."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from e2a.runtime import quota
from e2a.sdk import E2A, E2AError
from e2a.templates import recipes
from tests.conftest import own_server, wait_for, worker_index

LIMIT_MIB = recipes.load("standard").disk_mib
MiB = 1024 * 1024
FULL = ("disk quota exceeded", "no space left on device")


def pool(server) -> Path:
    return server.base / "data" / "sandboxes"


def host_free(server) -> int:
    st = os.statvfs(server.base)
    return st.f_bavail * st.f_frsize


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def loop_devices(server) -> list[str]:
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(server.base) in line]


def referenced(volume: Path) -> int:
    """The subvolume's qgroup usage, as btrfs accounts it (after a commit)."""
    subprocess.run(["btrfs", "filesystem", "sync", str(volume)], check=True)
    out = subprocess.run(["btrfs", "qgroup", "show", "-f", "--raw", str(volume)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.splitlines()[-1].split()[1])


def subvolume_id(volume: Path) -> int:
    return int(subprocess.run(["btrfs", "inspect-internal", "rootid", str(volume)],
                              capture_output=True, text=True, check=True).stdout)



def fails_full(r) -> bool:
    return r.exit_code != 0 and any(m in r.stderr.lower() for m in FULL)


@pytest.fixture(scope="module")
def server():
    """This module's own server: its disk pool is filled on purpose, so it is shared with no
    other test (whose sandboxes' writes would count against the same pool)."""
    with own_server("disk") as srv:
        srv.start()
        srv.keys = {"alice": srv.create_user(f"disk{worker_index()}@example.com")}
        yield srv
        srv.stop()
        assert not any(srv.host_objects().values()), srv.host_objects()


@pytest.fixture(scope="module")
def alice(server):
    with E2A(server.url, server.keys["alice"]) as c:
        yield c


@pytest.fixture
def sb(alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    yield sb
    alice.kill(sb.vm_id)


def test_the_pool_is_a_preallocated_btrfs_mount(server, sb):
    image = quota.image_path(pool(server))
    assert quota.is_pool(pool(server))
    assert allocated(image) >= image.stat().st_size  # reserved on the host, not sparse
    assert quota.is_volume(pool(server) / sb.vm_id)
    assert len(loop_devices(server)) == 1


def test_rootfs_and_tmp_writes_stop_at_the_limit(server, alice, sb):
    volume = pool(server) / sb.vm_id
    image = quota.image_path(pool(server))
    image_before, free_before = allocated(image), host_free(server)

    r = alice.run(sb.vm_id, f"dd if=/dev/zero of=/home/user/big bs=1M count={LIMIT_MIB + 256}",
                  timeout=300)
    assert fails_full(r), r
    # /tmp is a bind of a directory in the same subvolume: the limit is shared.
    r = alice.run(sb.vm_id, "dd if=/dev/zero of=/tmp/more bs=1M count=64")
    assert fails_full(r), r

    used = referenced(volume)
    assert LIMIT_MIB * MiB - 64 * MiB <= used <= LIMIT_MIB * MiB, used
    # The sandbox's writes land in the preallocated pool: the image does not grow, and the host
    # disk shrinks by at most the limit (here: by nothing of the sandbox's).
    assert allocated(image) == image_before
    assert free_before - host_free(server) <= LIMIT_MIB * MiB

    # The sandbox still answers, and deleting frees the space for new writes.
    assert alice.run(sb.vm_id, "echo alive").stdout == "alive\n"
    assert alice.run(sb.vm_id, "rm -f /home/user/big /tmp/more").ok
    r = alice.run(sb.vm_id, "dd if=/dev/zero of=/tmp/again bs=1M count=512 && sync && ls -s "
                            "--block-size=1M /tmp/again", timeout=300)
    assert r.ok and r.stdout.split()[0] == "512", r
    # ... up to the limit again, from /tmp this time.
    r = alice.run(sb.vm_id, f"dd if=/dev/zero of=/tmp/big bs=1M count={LIMIT_MIB}", timeout=300)
    assert fails_full(r), r
    assert alice.run(sb.vm_id, "rm -f /tmp/big /tmp/again && echo ok").stdout == "ok\n"


def test_many_small_files_are_limited_too(server, alice, sb):
    """Metadata counts (about 500 bytes a small file): inodes cannot fill the pool either."""
    r = alice.run(sb.vm_id, "mkdir -p /home/user/many && cd /home/user/many && "
                            "dd if=/dev/zero of=f bs=1M count=%d 2>/dev/null; "
                            "for i in $(seq 1 100000); do echo x > s$i || exit 1; done"
                            % (LIMIT_MIB - 8), timeout=300)
    assert fails_full(r), r
    made = int(alice.run(sb.vm_id, "ls /home/user/many | wc -l").stdout)
    assert 1000 < made < 100000
    assert alice.run(sb.vm_id, "rm -rf /home/user/many && echo ok").stdout == "ok\n"


def test_sandboxes_together_stop_below_a_full_pool(server, alice):
    """Limits overcommit the pool; the pool's own qgroup (90% of it) stops them all with EDQUOT
    before btrfs runs out of space, and the pool stays writable."""
    st = os.statvfs(pool(server))
    pool_bytes = st.f_blocks * st.f_frsize
    needed = pool_bytes * 0.9 // (LIMIT_MIB * MiB) + 1
    if needed > 3:
        pytest.skip(f"the pool holds {needed - 1:.0f} full sandboxes: too long a test")
    sbs = [alice.create_sandbox("standard", idle_timeout_seconds=600) for _ in range(int(needed))]
    try:
        results = [alice.run(sb.vm_id, f"dd if=/dev/zero of=/tmp/f bs=1M count={LIMIT_MIB - 16}",
                             timeout=300) for sb in sbs]
        assert all(r.ok for r in results[:-1]), results
        assert fails_full(results[-1]) and "quota" in results[-1].stderr.lower(), results[-1]
        assert "rw" in next(line.split()[3].split(",") for line in open("/proc/mounts")
                            if line.split()[1] == str(pool(server)))
        # One frees its space; the last one writes again.
        assert alice.run(sbs[0].vm_id, "rm /tmp/f && echo ok").stdout == "ok\n"
        r = alice.run(sbs[-1].vm_id, "dd if=/dev/zero of=/tmp/g bs=1M count=256 && echo ok",
                      timeout=300)
        assert r.stdout.endswith("ok\n"), r
    finally:
        for sb in sbs:
            alice.kill(sb.vm_id)


def test_files_api_write_past_the_limit_is_an_error_not_a_hang(server, alice, sb):
    chunk = bytes(MiB)

    def body():
        for _ in range(LIMIT_MIB + 256):
            yield chunk

    with pytest.raises(E2AError) as e:
        alice.files.write(sb.vm_id, "/home/user/upload.bin", body())
    assert (e.value.status, e.value.code) == (507, "no_space"), e.value
    assert any(m in str(e.value).lower() for m in FULL), e.value
    # envd wrote beside the target and removed its partial file: the space is free again.
    assert not alice.files.exists(sb.vm_id, "/home/user/upload.bin")
    alice.files.write(sb.vm_id, "/home/user/small.bin", bytes(64 * MiB))
    assert alice.files.stat(sb.vm_id, "/home/user/small.bin").size == 64 * MiB


def test_nothing_of_the_quota_is_left_after_destroy(server, alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    volume = pool(server) / sb.vm_id
    qgroup = subvolume_id(volume)
    assert qgroup in quota.volume_qgroups(pool(server))
    assert alice.run(sb.vm_id, "dd if=/dev/zero of=/tmp/f bs=1M count=100 && sync").ok
    loops = loop_devices(server)
    alice.kill(sb.vm_id)

    assert not volume.exists()
    assert sb.vm_id not in Path("/proc/mounts").read_text()
    assert loop_devices(server) == loops  # the pool's one, nothing per sandbox
    # The kernel drops the deleted subvolume, and its qgroup, after the commit destroy starts.
    wait_for(lambda: qgroup not in quota.volume_qgroups(pool(server)), timeout=10)
    assert quota.stale_qgroups(pool(server)) == []


# ---- the pool's quota accounting stays consistent ---------------------------------------------
# btrfs stops accounting for good once its quota is marked inconsistent, and then no sandbox's
# limit holds. CI met it: removing the qgroup of a just-dropped subvolume before the commit that
# accounts the drop marked it, and a fork later wrote 1000 MiB past its limit.

@pytest.fixture
def bare_pool(tmp_path):
    """A pool of its own, with no server: these tests break and mend its accounting."""
    import asyncio
    sandboxes = tmp_path / "sandboxes"
    asyncio.run(quota.ensure_pool(sandboxes, 1))
    yield sandboxes
    subprocess.run(["umount", str(sandboxes)], check=True)
    quota.image_path(sandboxes).unlink()  # 1 GiB, preallocated


def writes_until_full(volume: Path, mib: int) -> int:
    """MiB written into `volume`, in 10 MiB files each committed, before EDQUOT (or `mib`)."""
    written = 0
    try:
        while written < mib:
            with open(volume / f"f{written}", "wb") as f:
                f.write(os.urandom(10 * MiB))
                f.flush()
                os.fsync(f.fileno())
            written += 10
            quota.commit_and_wait(volume.parent)
    except OSError as exc:
        assert exc.errno == 122, exc  # EDQUOT
    return written


def dropped_before_its_accounting(pool_dir: Path) -> int:
    """A subvolume with data deleted and dropped by the kernel's cleaner (after one commit),
    the commit that accounts the drop not yet made (nothing else commits here for the
    kernel's 30 s interval): its qgroup id. The root item goes with the drop, so the kernel
    lets the qgroup be removed from then on, though it still counts bytes."""
    volume = pool_dir / "dropped"
    quota.create_volume(volume, 64 * MiB)
    (volume / "f").write_bytes(os.urandom(8192))
    qgroup = subvolume_id(volume)
    subprocess.run(["rm", "-rf", str(volume)], check=True)
    quota.commit_and_wait(pool_dir)
    return qgroup


def test_qgroups_of_dropped_subvolumes_go_only_once_the_drop_is_accounted(bare_pool):
    qgroup = dropped_before_its_accounting(bare_pool)
    deadline = time.monotonic() + 3  # the cleaner drops it within a few ms
    while time.monotonic() < deadline:  # what a destroy's sweep does, as often as it can
        quota.remove_qgroup(bare_pool, qgroup)
        assert not quota.inconsistent(bare_pool)
    quota.commit_and_wait(bare_pool)
    wait_for(lambda: qgroup not in quota.volume_qgroups(bare_pool)
             or qgroup in quota.remove_stale_qgroups(bare_pool), timeout=10)
    assert not quota.inconsistent(bare_pool)
    quota.create_volume(bare_pool / "limited", 100 * MiB)
    assert writes_until_full(bare_pool / "limited", 300) < 100


def test_an_inconsistent_accounting_is_rescanned_and_limits_hold_again(bare_pool):
    # Break it for sure: a snapshot whose qgroup is not made a member of the pool's, as the
    # source's is, leaves the numbers unknown (e2a makes no snapshot; a careless sweep, as
    # above, breaks it only when it wins a race).
    volume = bare_pool / "source"
    quota.create_volume(volume, 64 * MiB)
    (volume / "f").write_bytes(os.urandom(8192))
    subprocess.run(["btrfs", "subvolume", "snapshot", str(volume), str(bare_pool / "snap")],
                   check=True, capture_output=True)
    quota.commit_and_wait(bare_pool)
    assert quota.inconsistent(bare_pool), "the snapshot did not break the accounting"
    quota.create_volume(bare_pool / "broken", 50 * MiB)
    assert writes_until_full(bare_pool / "broken", 150) == 150  # what is at stake
    for v in ("broken", "snap", "source"):
        subprocess.run(["rm", "-rf", str(bare_pool / v)], check=True)

    assert quota.keep_consistent(bare_pool)
    wait_for(lambda: not quota.inconsistent(bare_pool), timeout=30)
    assert not quota.keep_consistent(bare_pool)
    quota.create_volume(bare_pool / "limited", 100 * MiB)
    assert writes_until_full(bare_pool / "limited", 300) < 100


def test_the_pool_accounts_drops_of_any_depth(bare_pool):
    assert quota._qgroups_sysfs(bare_pool, "drop_subtree_threshold").read_text().strip() == \
        str(quota.MAX_LEVEL)
