"""The OCI config e2a gives runsc (e2a/runtime/runsc.py), and a fork's rebased copy of its
origin's: its own paths, and nothing runsc compares at a restore changed."""

from __future__ import annotations

from pathlib import Path

from e2a.runtime.cgroups import Cgroup
from e2a.runtime.runsc import ENVD_PORT, SandboxSpec, oci_config, rebase


def spec(sid: str, home: bool = False) -> SandboxSpec:
    d = Path(f"/data/sandboxes/{sid}")
    return SandboxSpec(
        runtime_id=f"e2a-{sid}", bundle_dir=d, rootfs=d / "rootfs",
        netns_path=f"/var/run/netns/e2a-{sid}", envd_binary=Path("/e2a/envd"),
        envd_token="t" * 64, memory_mib=512, platform="systrap",
        resolv_conf=Path("/run/e2a/resolv.conf"), cgroup=Cgroup("e2a", f"e2a-{sid}"),
        env={"TZ": "UTC"}, home=d / "home" if home else None)


def test_envd_listens_on_every_address():
    """A fork has another address than its origin; its (restored) envd must answer there."""
    assert oci_config(spec("sbx_a"))["process"]["args"][-1] == f"0.0.0.0:{ENVD_PORT}"


def test_a_fork_gets_its_own_paths_and_keeps_what_a_restore_compares():
    origin = oci_config(spec("sbx_a"))
    fork = rebase(origin, spec("sbx_b"))
    assert fork["root"]["path"] == "/data/sandboxes/sbx_b/rootfs"
    tmp = next(m for m in fork["mounts"] if m["destination"] == "/tmp")
    assert tmp["source"] == "/data/sandboxes/sbx_b/tmp"
    net = next(n for n in fork["linux"]["namespaces"] if n["type"] == "network")
    assert net["path"] == "/var/run/netns/e2a-sbx_b"
    assert fork["linux"]["cgroupsPath"] == Cgroup("e2a", "e2a-sbx_b").path
    # what runsc validates: the process (args, env with the origin's token), every mount's
    # destination and options, the resources
    assert fork["process"] == origin["process"]
    assert [(m["destination"], m.get("options")) for m in fork["mounts"]] == \
        [(m["destination"], m.get("options")) for m in origin["mounts"]]
    assert fork["linux"]["resources"] == origin["linux"]["resources"]
    # and the origin's config is untouched
    assert origin["root"]["path"] == "/data/sandboxes/sbx_a/rootfs"
    assert next(m for m in origin["mounts"] if m["destination"] == "/tmp")["source"] == \
        "/data/sandboxes/sbx_a/tmp"
