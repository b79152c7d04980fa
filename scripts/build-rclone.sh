#!/bin/sh
# Builds e2a's rclone (third_party/rclone: upstream rclone, pinned in its go.mod, with the
# patches there applied) into the cache. rclone is both the embedded S3 server and every
# workspace's FUSE mount. Upstream's mount answers a full cache with EIO; the patch gives the
# writer ENOSPC, which is how a workspace's storage quota shows inside a sandbox
# (docs/workspaces.md). Cached by the hash of the sources: rebuilt only when they change.
set -eu
SRC=$(cd "$(dirname "$0")/../third_party/rclone" && pwd)
CACHE=${E2A_CACHE_DIR:-/var/cache/e2a}
HASH=$(cat "$SRC/go.mod" "$SRC/go.sum" "$SRC/main.go" "$SRC"/patches/*.patch | sha256sum | cut -c1-16)
OUT=$CACHE/rclone/$HASH
if [ ! -x "$OUT/rclone" ]; then
  echo "building rclone ($HASH; about a minute, once)"
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  cp "$SRC/go.mod" "$SRC/go.sum" "$SRC/main.go" "$WORK/"
  (cd "$WORK" && go mod vendor)
  for p in "$SRC"/patches/*.patch; do
    patch -s -p1 -d "$WORK/vendor/github.com/rclone/rclone" < "$p"
  done
  mkdir -p "$OUT.tmp"
  (cd "$WORK" && CGO_ENABLED=0 go build -mod=vendor -trimpath -ldflags='-s -w' \
    -o "$OUT.tmp/rclone" .)
  rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
fi
mkdir -p "$CACHE/bin"
ln -sfn "$OUT/rclone" "$CACHE/bin/rclone"
"$CACHE/bin/rclone" version | head -1
