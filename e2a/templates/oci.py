"""A template's root filesystem as a container image, for the Kubernetes backend.

The builder makes each template a directory (e2a/templates/builder.py); the embedded backend
runs it as an overlay's lower layer. A cluster runs images, so this writes one: a single layer,
the directory as GNU tar makes it (owners by number, modes, xattrs, device nodes, hard links),
with envd added at the path the embedded backend binds it to, in the docker-archive format that
`ctr images import` and `docker load` read. No registry or image tool is needed to make it; a
production cluster pulls it after it is pushed to the registry the settings name.

Also a command (no import of e2a's own modules, so that scripts run it with any python3):
    python3 oci.py OUT.tar REF ROOTFS_DIR [--add SRC:DST]... -- ENTRYPOINT...
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CHUNK = 1 << 20


def write_archive(out: Path, ref: str, rootfs: Path, entrypoint: list[str],
                  env: dict[str, str] | None = None,
                  add: list[tuple[Path, str]] = (), user: str = "") -> str:
    """Write the image `ref` (name:tag) of `rootfs` plus the files `add` (source, path in the
    image) to `out`; returns its config digest (the image id). `user` (uid:gid) is who the
    entrypoint runs as; empty: root."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        layer = Path(tmp) / "layer.tar"
        diff_id = _layer(rootfs, add, layer, Path(tmp))
        config = json.dumps({
            "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
            "config": {"Env": [f"{k}={v}" for k, v in (env or {}).items()],
                       "Entrypoint": entrypoint, "Cmd": None, "WorkingDir": "/",
                       **({"User": user} if user else {})},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "e2a"}],
        }, sort_keys=True).encode()
        config_digest = hashlib.sha256(config).hexdigest()
        manifest = json.dumps([{"Config": f"{config_digest}.json", "RepoTags": [ref],
                                "Layers": [f"{diff_id}/layer.tar"]}]).encode()
        part = out.with_name(out.name + ".part")
        with tarfile.open(part, "w") as archive:
            _add_bytes(archive, f"{config_digest}.json", config)
            archive.add(layer, f"{diff_id}/layer.tar")
            _add_bytes(archive, "manifest.json", manifest)
        part.rename(out)
    return f"sha256:{config_digest}"


def _layer(rootfs: Path, add: list[tuple[Path, str]], out: Path, tmp: Path) -> str:
    """The layer tar of `rootfs` with `add` on top; returns its sha256 (the diff id)."""
    extra = tmp / "extra"
    for src, dst in add:
        target = extra / dst.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    # --numeric-owner: the image's ids, not this host's names; sorted for the same bytes from
    # the same tree. The added files come after the tree's, so they win on extraction.
    sources = ["-C", str(rootfs), "."] + (["-C", str(extra), "."] if add else [])
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        tar = subprocess.Popen(["tar", "--create", "--numeric-owner", "--xattrs",
                                "--xattrs-include=*", "--sort=name", "--format=posix",
                                "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,"
                                "delete=ctime", *sources], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        while chunk := tar.stdout.read(CHUNK):
            digest.update(chunk)
            f.write(chunk)
        if tar.wait() != 0:
            raise RuntimeError(f"tar of {rootfs} failed ({tar.returncode})")
    return digest.hexdigest()


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    archive.addfile(info, io.BytesIO(data))


def main(argv: list[str]) -> None:
    if "--" not in argv or len(argv) < 3:
        sys.exit(__doc__)
    at = argv.index("--")
    out, ref, rootfs, *rest = argv[:at]
    add = []
    while rest:
        flag, spec, *rest = rest
        if flag != "--add":
            sys.exit(f"unknown argument {flag}")
        src, dst = spec.split(":", 1)
        add.append((Path(src), dst))
    print(write_archive(Path(out), ref, Path(rootfs), argv[at + 1:], add=add))


if __name__ == "__main__":
    main(sys.argv[1:])
