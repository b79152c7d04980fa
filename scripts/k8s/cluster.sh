#!/bin/bash
# A single-node Kubernetes for the Kubernetes backend's tests: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, containerd 2.x with gVisor's shim and a `gvisor`
# RuntimeClass, and a kubelet, all with their state under one directory.
#
#   scripts/k8s/cluster.sh up   DIR   start it (binaries from scripts/k8s/build.sh); DIR gets
#                                     admin.kubeconfig, logs/ and everything else it makes
#   scripts/k8s/cluster.sh down DIR   stop it and remove every trace on the host: processes,
#                                     mounts, the CNI bridge and its iptables chains, cgroups
#
# One per machine: a kubelet owns host-wide names (its cgroups, /var/log/containers) and the
# ports below. The node's address is the host's own (the apiserver reaches the kubelet there).
# Pods get 10.244.0.0/24 on a bridge (the CNI reference plugins), reachable from the host.
set -uo pipefail
HERE=$(dirname "$(readlink -f "$0")")
CMD=${1:?usage: cluster.sh up|down DIR}
R=$(readlink -m "${2:?usage: cluster.sh up|down DIR}")
B=${E2A_K8S_BIN:-$("$HERE/build.sh" | tail -1)/bin}
IMAGES=$(dirname "$B")/images
NODE=e2a-node
POD_CIDR=10.244.0.0/24
BRIDGE=e2ak8s0
export PATH=$B:/usr/sbin:/usr/bin:/sbin:/bin
K="kubectl --kubeconfig $R/admin.kubeconfig --request-timeout=20s"
# The kubelet sets these host-wide (its "kernel tunables"); down puts back what up found.
SYSCTLS="vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
 kernel.keys.root_maxkeys kernel.keys.root_maxbytes"
T0=$SECONDS
say() { echo "[cluster +$((SECONDS - T0))s] $*" >&2; }
wait_for() { # seconds, what, command...
  local n=$(($1 * 5)) what=$2; shift 2
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  say "gave up waiting for $what (logs in $R/logs)"; return 1
}

up() {
  set -e
  IP=$(ip -4 route get 1.1.1.1 | sed -n 's/.* src \([0-9.]*\).*/\1/p')
  mkdir -p "$R"/{logs,etcd,cni/net.d,containerd,kubelet,runsc-root,pod-logs}
  chmod 700 "$R"
  cd "$R"
  [ -f sysctl.saved ] || sysctl -e $SYSCTLS > sysctl.saved
  say "certificates"
  NODE=$NODE IP=$IP "$HERE/certs.sh" "$R/pki" "$R" >/dev/null
  say "etcd"
  nohup etcd --name e2a --data-dir "$R/etcd/data" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster e2a=http://127.0.0.1:2380 \
    > logs/etcd.log 2>&1 & echo $! > etcd.pid
  say "containerd"
  cat > containerd.toml <<EOF
version = 3
root = "$R/containerd/root"
state = "$R/containerd/state"
[grpc]
  address = "$R/containerd/containerd.sock"
[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "registry.k8s.io/pause:3.10"
[plugins."io.containerd.cri.v1.runtime"]
  # the shims run without CAP_SYS_RESOURCE here
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
[plugins."io.containerd.cri.v1.runtime".containerd]
  default_runtime_name = "runc"
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runsc]
  runtime_type = "io.containerd.runsc.v1"
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runsc.options]
  TypeUrl = "io.containerd.runsc.v1.options"
  ConfigPath = "$R/runsc.toml"
[plugins."io.containerd.nri.v1.nri"]
  disable = true
[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["/usr/lib/cni"]
  conf_dir = "$R/cni/net.d"
EOF
  cat > runsc.toml <<EOF
binary_name = "$(readlink -f "${E2A_RUNSC:-/var/cache/e2a/bin/runsc}")"
root = "$R/runsc-root"
[runsc_config]
  platform = "systrap"
EOF
  cat > cni/net.d/10-e2a.conflist <<EOF
{"cniVersion": "1.0.0", "name": "e2a", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$R/cni/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
  # The bridge and the host's address on it from the start (the plugin takes them as they
  # are), so that a host service can listen there before the first pod (the tests' PostgreSQL).
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip addr replace "${POD_CIDR%.0/24}.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  nohup containerd --config containerd.toml > logs/containerd.log 2>&1 & echo $! > containerd.pid
  wait_for 30 etcd curl -sf http://127.0.0.1:2379/health
  say "kube-apiserver"
  nohup kube-apiserver --advertise-address="$IP" --bind-address=0.0.0.0 --secure-port=6443 \
    --etcd-servers=http://127.0.0.1:2379 --service-cluster-ip-range=10.96.0.0/16 \
    --client-ca-file=pki/ca.crt --tls-cert-file=pki/apiserver.crt \
    --tls-private-key-file=pki/apiserver.key \
    --kubelet-client-certificate=pki/apiserver-kubelet-client.crt \
    --kubelet-client-key=pki/apiserver-kubelet-client.key --kubelet-certificate-authority=pki/ca.crt \
    --kubelet-preferred-address-types=InternalIP,Hostname \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file=pki/sa.pub --service-account-signing-key-file=pki/sa.key \
    --authorization-mode=Node,RBAC --allow-privileged=false \
    > logs/kube-apiserver.log 2>&1 & echo $! > kube-apiserver.pid
  wait_for 30 containerd test -S "$R/containerd/containerd.sock"
  say "the pause image"
  ctr -a "$R/containerd/containerd.sock" -n k8s.io images import "$IMAGES/pause.tar" >/dev/null
  wait_for 60 "the apiserver" $K get --raw /readyz
  say "controller-manager, scheduler"
  nohup kube-controller-manager --kubeconfig=controller-manager.kubeconfig \
    --authentication-kubeconfig=controller-manager.kubeconfig \
    --authorization-kubeconfig=controller-manager.kubeconfig --bind-address=127.0.0.1 \
    --leader-elect=false --root-ca-file=pki/ca.crt --service-account-private-key-file=pki/sa.key \
    --use-service-account-credentials=true --cluster-signing-cert-file=pki/ca.crt \
    --cluster-signing-key-file=pki/ca.key --controllers='*' \
    > logs/kube-controller-manager.log 2>&1 & echo $! > kube-controller-manager.pid
  nohup kube-scheduler --kubeconfig=scheduler.kubeconfig \
    --authentication-kubeconfig=scheduler.kubeconfig --authorization-kubeconfig=scheduler.kubeconfig \
    --bind-address=127.0.0.1 --leader-elect=false \
    > logs/kube-scheduler.log 2>&1 & echo $! > kube-scheduler.pid
  say "kubelet"
  cat > kubelet.yaml <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$R/containerd/containerd.sock
failSwapOn: false
authentication: {anonymous: {enabled: false}, webhook: {enabled: true}, x509: {clientCAFile: $R/pki/ca.crt}}
authorization: {mode: Webhook}
tlsCertFile: $R/pki/kubelet-serving.crt
tlsPrivateKeyFile: $R/pki/kubelet-serving.key
clusterDomain: cluster.local
clusterDNS: [10.96.0.10]
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
podLogsDir: $R/pod-logs
maxPods: 250
EOF
  nohup kubelet --config=kubelet.yaml --kubeconfig=kubelet.kubeconfig --hostname-override=$NODE \
    --node-ip="$IP" --root-dir="$R/kubelet" --cert-dir="$R/kubelet/pki" \
    > logs/kubelet.log 2>&1 & echo $! > kubelet.pid
  wait_for 90 "the node" sh -c "$K get node $NODE | grep -qw Ready"
  $K apply -f - >/dev/null <<EOF
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata: {name: gvisor}
handler: runsc
EOF
  wait_for 30 "the default service account" $K get serviceaccount default
  say "up: KUBECONFIG=$R/admin.kubeconfig"
}

stop() { # name: by its recorded pid only
  [ -f "$R/$1.pid" ] || return 0
  local p; p=$(cat "$R/$1.pid")
  kill "$p" 2>/dev/null
  for _ in $(seq 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
  kill -9 "$p" 2>/dev/null
  rm -f "$R/$1.pid"
}

down() {
  [ -d "$R" ] || return 0
  local sock=$R/containerd/containerd.sock
  if [ -f "$R/kube-apiserver.pid" ]; then
    $K delete pods --all --all-namespaces --grace-period=0 --force --wait=false >/dev/null 2>&1
    # the kubelet tears the pods down (CNI DEL) while it still runs
    for _ in $(seq 60); do
      [ "$(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null | wc -l)" = 0 ] && break
      sleep 0.5
    done
  fi
  stop kubelet; stop kube-scheduler; stop kube-controller-manager
  for t in $(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
    ctr -a "$sock" -n k8s.io tasks kill -s SIGKILL "$t" 2>/dev/null
  done
  stop containerd; stop kube-apiserver; stop etcd
  # shims and sandboxes of this cluster (their command lines or binaries name its paths)
  for p in $(pgrep -f "containerd-shim|runsc"); do
    if { tr '\0' ' ' < "/proc/$p/cmdline"; } 2>/dev/null | grep -q -- "$R" \
       || [ "$(readlink "/proc/$p/exe" 2>/dev/null)" = "$B/containerd-shim-runsc-v1" ] \
       || [ "$(readlink "/proc/$p/exe" 2>/dev/null)" = "$B/containerd-shim-runc-v2" ]; then
      kill -9 "$p" 2>/dev/null
    fi
  done
  sleep 0.5
  grep " $R" /proc/mounts | awk '{print $2}' | sort -r | while read -r m; do umount -l "$m"; done
  ip link del "$BRIDGE" 2>/dev/null
  # the bridge plugin's NAT chains (CNI-*) and the kubelet's own (KUBE-*)
  for t in nat filter mangle; do
    iptables -t "$t" -S 2>/dev/null | grep -- "-j CNI-" | sed 's/^-A/-D/' | while read -r rule; do
      eval iptables -t "$t" "$rule"
    done
    for c in $(iptables -t "$t" -S 2>/dev/null | sed -n 's/^-N \(CNI-[^ ]*\)/\1/p'); do
      iptables -t "$t" -F "$c"; iptables -t "$t" -X "$c"
    done
  done
  for ipt in iptables ip6tables; do
    for ch in INPUT OUTPUT; do while $ipt -D "$ch" -j KUBE-FIREWALL 2>/dev/null; do :; done; done
    for t in nat filter mangle; do
      for c in KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT KUBE-FIREWALL; do
        $ipt -t "$t" -F "$c" 2>/dev/null; $ipt -t "$t" -X "$c" 2>/dev/null
      done
    done
  done
  for s in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [ -d "$s" ] && find "$s" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  # paths the kubelet and libcni hard-code: only this cluster's entries
  for l in /var/log/containers/*.log; do
    [ -L "$l" ] && case "$(readlink "$l")" in "$R"/*) rm -f "$l" ;; esac
  done
  rmdir /var/log/containers 2>/dev/null
  rm -f /var/lib/cni/results/e2a-* /var/lib/cni/results/cni-loopback-*
  rmdir /var/lib/cni/results /var/lib/cni 2>/dev/null
  # shim sockets no process holds (without fuser none: another containerd's are there too)
  if command -v fuser >/dev/null; then
    for s in /run/containerd/s/*; do [ -S "$s" ] && ! fuser -s "$s" 2>/dev/null && rm -f "$s"; done
  fi
  rmdir /run/containerd/s /run/containerd/runc/k8s.io /run/containerd/runc /run/containerd 2>/dev/null
  [ -f "$R/sysctl.saved" ] && sysctl -q -p "$R/sysctl.saved"
  rm -rf "$R"
  say "down"
}

case $CMD in
  up) up ;;
  down) down ;;
  *) echo "usage: cluster.sh up|down DIR" >&2; exit 2 ;;
esac
