#!/bin/sh
# Stops the server started by start-server.sh. Sandboxes keep running and are adopted on restart.
set -u
if [ -f /run/e2a-serve.pid ]; then
  kill "$(cat /run/e2a-serve.pid)" 2>/dev/null || true
  rm -f /run/e2a-serve.pid
fi
