#!/bin/sh
# Builds runsc from the Go module gvisor.dev/gvisor (its `go` branch, pinned) into the cache.
# Debian's runsc builds predate the fix for gVisor issue #10704 (netstack refuses to start on
# kernels >= 6.11), so e2a builds a current one. Cached by version: rebuilt only when the pin moves.
set -eu
VERSION=v0.0.0-20260905035102-160fafc42237
CACHE=${E2A_CACHE_DIR:-/var/cache/e2a}
OUT=$CACHE/runsc/$VERSION
if [ ! -x "$OUT/runsc" ]; then
  echo "building runsc $VERSION (a few minutes, once)"
  mkdir -p "$OUT.tmp"
  GOFLAGS=-mod=mod GOBIN="$OUT.tmp" CGO_ENABLED=0 go install -trimpath "gvisor.dev/gvisor/runsc@$VERSION"
  rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
fi
mkdir -p "$CACHE/bin"
ln -sfn "$OUT/runsc" "$CACHE/bin/runsc"
"$CACHE/bin/runsc" --version | head -1
