#!/bin/sh
# Debian packages the test cluster needs (scripts/k8s/cluster.sh); idempotent, run as root.
# etcd-server: the cluster's store (3.4, which Kubernetes 1.37 still speaks to).
# containernetworking-plugins: the bridge, host-local and portmap CNI plugins (pod network).
# iptables, conntrack: what the bridge plugin's NAT and the kubelet use.
# runc: the runtime of pods that do not ask for gVisor (e2a's own, in the manifests' test).
# openssl: the cluster's certificates. psmisc: fuser, which tells the shim sockets cluster.sh
#   may remove (no process holds them) from another containerd's.
set -eu
export DEBIAN_FRONTEND=noninteractive
need=""
for pkg in etcd-server containernetworking-plugins iptables conntrack runc openssl psmisc; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need="$need $pkg"
done
if [ -n "$need" ]; then
  # the packaged etcd must not start as a service (the cluster runs its own): no service starts
  # during the install, and a policy the machine had stays as it was
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $need
  [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
fi
