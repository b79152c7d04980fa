#!/bin/sh
# System packages e2a needs on a Debian bookworm host (run as root). Idempotent.
# runsc itself is not among them: Debian's builds are too old for this kernel's netstack
# (gVisor issue #10704), so scripts/build-runsc.sh builds it from the gVisor Go module.
# btrfs-progs: mkfs.btrfs for the sandboxes' disk pool (e2a/runtime/quota.py).
set -eu
export DEBIAN_FRONTEND=noninteractive
need=""
for pkg in debootstrap iproute2 nftables curl ca-certificates python3-venv btrfs-progs; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need="$need $pkg"
done
if [ -n "$need" ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $need
fi
