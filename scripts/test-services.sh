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
