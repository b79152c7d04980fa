#!/bin/sh
# Starts what the test suite needs beyond e2a itself: a PostgreSQL server (the store's
# PostgreSQL path is tested against the real thing). Idempotent; prints nothing on success.
set -eu
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
VER=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | grep -q "^$VER main"; then
  pg_createcluster "$VER" main >/dev/null
fi
pg_ctlcluster "$VER" main start 2>/dev/null || true
for i in $(seq 50); do
  su postgres -c "psql -qtAc 'select 1'" >/dev/null 2>&1 && break
  sleep 0.2
done
su postgres -c "psql -qtAc \"select 1 from pg_roles where rolname='e2a_test'\"" | grep -q 1 ||
  su postgres -c "psql -qc \"create role e2a_test login password 'e2a_test'\""
su postgres -c "psql -qtAc \"select 1 from pg_database where datname='e2a_test'\"" | grep -q 1 ||
  su postgres -c "psql -qc 'create database e2a_test owner e2a_test'"
# The Kubernetes deploy test (tests/kube/test_kube_deploy.py): e2a's pods in the test cluster
# reach this server at the host's address on the pod bridge, for their database only. Listen
# on loopback and that address alone; it exists only while the cluster has pods, and
# listen_addresses is read at start, so restart once the address is there and not yet served
# (without it, the server warns and serves loopback).
BRIDGE_IP=10.244.0.1
POD_CIDR=10.244.0.0/24
CONF=/etc/postgresql/$VER/main
echo "listen_addresses = 'localhost,$BRIDGE_IP'" > "$CONF/conf.d/e2a-test.conf"
HBA="host e2a_deploy e2a_test $POD_CIDR scram-sha-256"
grep -qxF "$HBA" "$CONF/pg_hba.conf" || { echo "$HBA" >> "$CONF/pg_hba.conf"; pg_ctlcluster "$VER" main reload; }
su postgres -c "psql -qtAc \"select 1 from pg_database where datname='e2a_deploy'\"" | grep -q 1 ||
  su postgres -c "psql -qc 'create database e2a_deploy owner e2a_test'"
if ip -4 -o addr show | grep -q " inet $BRIDGE_IP/" &&
   ! ss -Hltn "sport = :5432" | grep -q "$BRIDGE_IP:5432"; then
  pg_ctlcluster "$VER" main restart
  for i in $(seq 50); do
    su postgres -c "psql -qtAc 'select 1'" >/dev/null 2>&1 && break
    sleep 0.2
  done
fi
