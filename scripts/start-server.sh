#!/bin/sh
# Starts `e2a serve` in the background (log in /var/log/e2a.log) and waits until it answers.
set -eu
cd "$(dirname "$0")/.."
URL=http://${E2A_HOST:-127.0.0.1}:${E2A_PORT:-8080}
if curl -fsS "$URL/health" >/dev/null 2>&1; then
  echo "e2a is already running on $URL"; exit 0
fi
# The log is root's alone (it names sandboxes and users).
touch /var/log/e2a.log && chmod 600 /var/log/e2a.log
nohup setsid .venv/bin/e2a serve >>/var/log/e2a.log 2>&1 </dev/null &
echo $! > /run/e2a-serve.pid
i=0
until curl -fsS "$URL/health" >/dev/null 2>&1; do
  i=$((i+1)); [ $i -gt 300 ] && { echo "e2a did not start; see /var/log/e2a.log"; tail -20 /var/log/e2a.log; exit 1; }
  sleep 0.1
done
echo "e2a is serving on $URL (log: /var/log/e2a.log, stop: make stop)"
if [ -z "${E2A_SMTP_HOST:-}" ]; then
  # docs/accounts.md: without an SMTP server, sign-in codes go to the server's log.
  echo "E2A_SMTP_HOST is unset: login codes (e2a login, POST /v1/auth/login) are written to the"
  echo "server's log, /var/log/e2a.log (root only): grep 'login code for' /var/log/e2a.log"
fi
