#!/bin/bash
# Compares gVisor platforms on the standard template's work, without e2a in the way:
#   bench/platforms.sh [platform...]   (default: systrap ptrace)
# Each line: the median of 5 runs inside one `runsc do` sandbox (no CPU quota), in ms.
# envd's start is measured inside e2a's own boot (the sandbox log's "envd" step).
set -euo pipefail
RUNSC=${RUNSC:-/var/cache/e2a/bin/runsc}
ROOTFS=${ROOTFS:-$(ls -d /var/cache/e2a/templates/standard-*/rootfs | head -1)}
WORK='
t() { local name=$1; shift; local all=(); for i in 1 2 3 4 5; do
        local s=$EPOCHREALTIME; "$@" >/dev/null 2>&1; local e=$EPOCHREALTIME
        all+=($(( (${e/./} - ${s/./}) / 1000 ))); done
      printf "%-34s %6s ms\n" "$name" "$(printf "%s\n" "${all[@]}" | sort -n | sed -n 3p)"; }
cd /tmp && printf "int main(){return 0;}\n" > h.c && git config --global user.email a@b && git config --global user.name a
t "fork+exec sh -c true"           /bin/sh -c true
t "fork+exec bash -c true"         /bin/bash -c true
t "python3 -c pass"                python3 -c pass
t "python3 -c import json,ssl"     python3 -c "import json, ssl"
t "node -e 0"                      node -e 0
t "gcc hello.c"                    gcc -o h h.c
t "git init + commit"              sh -c "rm -rf r && git init -q r && cd r && echo x > f && git add f && git commit -qm x"
t "find /usr (syscall-heavy)"      find /usr -type f
'
for platform in "${@:-systrap ptrace}"; do
  for p in $platform; do
    echo "== $p"
    start=$(date +%s%N)
    "$RUNSC" --platform="$p" --network=none --overlay2=root:memory do --root "$ROOTFS" true
    echo "sandbox start + stop (runsc do true)  $(( ($(date +%s%N) - start) / 1000000 )) ms"
    "$RUNSC" --platform="$p" --network=none --overlay2=root:memory do --root "$ROOTFS" \
      bash -c "$WORK"
  done
done
