#!/bin/bash
# The test cluster's PKI, with openssl: a CA, the apiserver's serving certificate, client
# certificates for the admin, the control plane and the kubelet, the kubelet's serving
# certificate, the service-account signing key, and a kubeconfig per client in $2.
#   NODE=name IP=address certs.sh PKI_DIR KUBECONFIG_DIR
set -euo pipefail
P=$1 KC=$2
mkdir -p "$P"; cd "$P"
openssl genrsa -out ca.key 2048 2>/dev/null
openssl req -x509 -new -nodes -key ca.key -subj "/CN=e2a-test-ca" -days 30 -out ca.crt
cert() { # name, CN, O, [subjectAltName]
  local n=$1 cn=$2 o=$3 san=${4:-}
  openssl genrsa -out "$n.key" 2048 2>/dev/null
  openssl req -new -key "$n.key" -subj "/CN=$cn${o:+/O=$o}" -out "$n.csr"
  if [ -n "$san" ]; then
    openssl x509 -req -in "$n.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
      -extfile <(printf "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s" "$san") \
      -out "$n.crt" 2>/dev/null
  else
    openssl x509 -req -in "$n.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
      -extfile <(printf "extendedKeyUsage=clientAuth") -out "$n.crt" 2>/dev/null
  fi
}
cert apiserver kube-apiserver "" "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:10.96.0.1,IP:$IP"
cert admin kubernetes-admin system:masters
cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
cert controller-manager system:kube-controller-manager ""
cert scheduler system:kube-scheduler ""
cert kubelet-client "system:node:$NODE" system:nodes
cert kubelet-serving "system:node:$NODE" system:nodes "DNS:$NODE,DNS:localhost,IP:127.0.0.1,IP:$IP"
openssl genrsa -out sa.key 2048 2>/dev/null
openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
chmod 600 ./*.key
kubeconfig() { # file, certificate name
  cat > "$KC/$1.kubeconfig" <<KCONF
apiVersion: v1
kind: Config
clusters: [{name: e2a-test, cluster: {server: "https://127.0.0.1:6443", certificate-authority: $P/ca.crt}}]
users: [{name: $2, user: {client-certificate: $P/$2.crt, client-key: $P/$2.key}}]
contexts: [{name: e2a-test, context: {cluster: e2a-test, user: $2}}]
current-context: e2a-test
KCONF
}
kubeconfig admin admin
kubeconfig controller-manager controller-manager
kubeconfig scheduler scheduler
kubeconfig kubelet kubelet-client
