#!/bin/sh
# System packages e2a needs on a Debian bookworm host (run as root). Idempotent.
# runsc itself is not among them: Debian's builds are too old for this kernel's netstack
# (gVisor issue #10704), so scripts/build-runsc.sh builds it from the gVisor Go module.
# btrfs-progs: mkfs.btrfs for the sandboxes' disk pool (e2a/runtime/quota.py).
# novnc: the live view's client, served by e2a under /v1/novnc/ (e2a/api/desktop.py).
# xvfb, fluxbox, x11-utils: envd's desktop tests run a real X server, a window manager and
#   xev (guest/desktop_test.go). hsetroot: fluxbox's fbsetbg sets the wallpaper with it; without
#   one, fluxbox opens an error window (xmessage) that takes the focus, as in the cua template.
# fuse3: fusermount3, which the workspaces' rclone mounts use (e2a/workspaces/mount.py).
# git: the workspace benchmark clones a repository into a workspace.
# patch: applies e2a's patch to rclone's sources (scripts/build-rclone.sh).
# chromium: the tests open live-view and canvas pages in a real browser, and the benchmark
#   compares page loads inside a sandbox with the same Chromium outside.
set -eu
export DEBIAN_FRONTEND=noninteractive
need=""
for pkg in debootstrap iproute2 nftables curl ca-certificates python3-venv btrfs-progs novnc \
           xvfb fluxbox hsetroot x11-utils chromium fuse3 git patch; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need="$need $pkg"
done
if [ -n "$need" ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $need
fi
# npm: the template builder installs the agent CLIs from the npm registry with the host's npm
# (e2a/templates/builder.py). Machines here come with Node.js and npm; a host without them gets
# Debian's.
if ! command -v npm >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends npm
fi
