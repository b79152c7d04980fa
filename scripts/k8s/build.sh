#!/bin/bash
# Builds what the Kubernetes backend's test cluster runs, from the registries (no Kubernetes
# distribution is packaged here): kube-apiserver, kube-controller-manager, kube-scheduler,
# kubelet and kubectl from the Go module k8s.io/kubernetes; containerd 2.x (Debian's 1.6 cannot
# read the current runsc shim's bootstrap reply); gVisor's containerd shim; the pod sandbox
# ("pause") image from Kubernetes' own pause.c. Cached by version under $E2A_CACHE_DIR/k8s:
# only the first run pays (~9 minutes on 2 cores); prints the directory of the binaries.
set -euo pipefail
HERE=$(dirname "$(readlink -f "$0")")
KUBE=v1.37.2            # k8s.io/kubernetes
STAGING=v0.37.2         # its staging modules (k8s.io/api, client-go...), which its zip lacks
CONTAINERD=v2.4.2
GVISOR=v0.0.0-20260905035102-160fafc42237  # the runsc e2a runs (scripts/build-runsc.sh)
CACHE=${E2A_CACHE_DIR:-/var/cache/e2a}
OUT=$CACHE/k8s/$KUBE-containerd-$CONTAINERD-gvisor-${GVISOR##*-}
if [ -x "$OUT/bin/kubelet" ] && [ -f "$OUT/images/pause.tar" ]; then
  echo "$OUT"; exit 0
fi
export PATH=/usr/local/go/bin:$PATH CGO_ENABLED=0 GOFLAGS=-mod=mod
WORK=$(mktemp -d /var/tmp/e2a-k8s-build.XXXXXX)
export GOCACHE=$WORK/gocache  # gigabytes for Kubernetes alone: not kept once built
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/bin" "$WORK/images"
step() { local t=$SECONDS; "$@" >&2; echo "[k8s build] ${*: -1}: $((SECONDS - t)) s" >&2; }

# Kubernetes: drop the module's replace block (it points into ./staging) and pin the staging
# modules to their published versions instead.
go mod download "k8s.io/kubernetes@$KUBE"
cp -r "$(go env GOMODCACHE)/k8s.io/kubernetes@$KUBE" "$WORK/kubernetes"
chmod -R u+w "$WORK/kubernetes"
cd "$WORK/kubernetes"
rm -f go.work go.work.sum
python3 - "$STAGING" <<'PY'
import re, sys
s = open("go.mod").read()
s = re.sub(r"\nreplace \((.|\n)*?\n\)\n", "\n", s)
s = re.sub(r"(\tk8s\.io/[a-z0-9-]+) v0\.0\.0\n", r"\1 " + sys.argv[1] + "\n", s)
open("go.mod", "w").write(s)
PY
LDF="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE -X k8s.io/component-base/version.gitMajor=1
 -X k8s.io/component-base/version.gitMinor=37 -X k8s.io/client-go/pkg/version.gitVersion=$KUBE"
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl; do
  step go build -trimpath -ldflags "$LDF" -o "$WORK/bin/$cmd" "./cmd/$cmd"
done
gcc -Os -static -o "$WORK/images/pause" build/pause/linux/pause.c

# containerd with ctr and the runc shim (the in-cluster e2a API pod runs under runc).
cd "$WORK"
step env GOBIN="$WORK/bin" go install -trimpath \
  -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD" \
  "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD" \
  "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD" \
  "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD"

# gVisor's shim, with one change: it lowers its own oom_score_adj, which needs
# CAP_SYS_RESOURCE that these machines do not give; the shim then refuses to start. It goes on.
go mod download "gvisor.dev/gvisor@$GVISOR"
cp -r "$(go env GOMODCACHE)/gvisor.dev/gvisor@$GVISOR" "$WORK/gvisor"
chmod -R u+w "$WORK/gvisor"
python3 - "$WORK/gvisor/pkg/shim/v1/manager.go" <<'PY'
import sys
p = sys.argv[1]; s = open(p).read()
old = """	if err := sys.SetOOMScore(cmd.Process.Pid, oomScoreMax); err != nil {
		return shim.BootstrapParams{}, fmt.Errorf("failed to set OOM Score on shim: %w", err)
	}"""
assert old in s, "gVisor's shim changed: review the patch"
s = s.replace(old, "\t_ = sys.SetOOMScore(cmd.Process.Pid, oomScoreMax) // e2a: CAP_SYS_RESOURCE may be missing")
open(p, "w").write(s)
PY
mkdir -p "$WORK/shim" && cd "$WORK/shim"
printf 'package main\n\nimport "gvisor.dev/gvisor/shim/v1/cli"\n\nfunc main() { cli.Main() }\n' > main.go
printf 'module e2a.dev/runsc-shim\n\ngo 1.26\n\nrequire gvisor.dev/gvisor %s\n\nreplace gvisor.dev/gvisor => ../gvisor\n' \
  "$GVISOR" > go.mod
cp "$WORK/gvisor/go.sum" .
step go build -trimpath -ldflags '-s -w' -o "$WORK/bin/containerd-shim-runsc-v1" .

# The pause image, as a docker archive for `ctr images import` (no registry is reachable).
mkdir -p "$WORK/pause-root"
python3 "$HERE/../../e2a/templates/oci.py" "$WORK/images/pause.tar" registry.k8s.io/pause:3.10 \
  "$WORK/pause-root" --add "$WORK/images/pause:/pause" -- /pause >/dev/null
rm "$WORK/images/pause"

mkdir -p "$(dirname "$OUT")"
rm -rf "$OUT.tmp" && mkdir "$OUT.tmp"
mv "$WORK/bin" "$WORK/images" "$OUT.tmp/"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "$OUT"
