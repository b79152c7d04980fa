#!/bin/sh
# Builds stripe-mock (the Go module github.com/stripe/stripe-mock, pinned) into the cache: the
# Stripe API stand-in the billing tests talk to (it checks each request against Stripe's OpenAPI
# spec and answers with fixtures; tests/stripe_mock.py starts it). Cached by version: rebuilt only
# when the pin moves.
set -eu
VERSION=v0.203.0
CACHE=${E2A_CACHE_DIR:-/var/cache/e2a}
OUT=$CACHE/stripe-mock/$VERSION
if [ ! -x "$OUT/stripe-mock" ]; then
  echo "building stripe-mock $VERSION (~15 s, once)"
  mkdir -p "$OUT.tmp"
  # -X main.version: what upstream's release build stamps (else it reports "master")
  GOFLAGS=-mod=mod GOBIN="$OUT.tmp" CGO_ENABLED=0 go install -trimpath \
    -ldflags="-s -w -X main.version=$VERSION" "github.com/stripe/stripe-mock@$VERSION"
  rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
fi
mkdir -p "$CACHE/bin"
ln -sfn "$OUT/stripe-mock" "$CACHE/bin/stripe-mock-$VERSION"
ln -sfn "$CACHE/bin/stripe-mock-$VERSION" "$CACHE/bin/stripe-mock"
"$CACHE/bin/stripe-mock" -version | head -1
