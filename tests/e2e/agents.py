"""What the agent tests share: starting an agent on a task, waiting for its end, reading its
events, and searching a sandbox for a secret."""

from __future__ import annotations

from tests.conftest import wait_for

LIVE = ("starting", "running")

# How many processes' environ or cmdline, and how many files, hold the text on stdin (not in a
# command line, where the search would find itself).
SEARCH = """
import glob, os, sys
needle = sys.stdin.buffer.read()
def has(path):
    try:
        with open(path, "rb") as f:
            return needle in f.read()
    except OSError:
        return False
procs = glob.glob("/proc/[0-9]*/environ") + glob.glob("/proc/[0-9]*/cmdline")
files = [os.path.join(d, f) for top in ("/home", "/tmp", "/root", "/etc", "/var", "/run")
         for d, _, names in os.walk(top) for f in names]
print(sum(map(has, procs)), sum(has(f) for f in files if os.path.isfile(f)))
"""


def search(alice, vm: str, needle: str, root: bool = True) -> tuple[int, int, int]:
    """Where the needle is: (processes as `user` sees them, as root does, files). Root in the
    sandbox may not read another user's environ (no CAP_SYS_PTRACE), so both look. In a pod
    with no root (Kubernetes' default) every process is `user`'s: `root=False` looks as `user`
    for both figures."""
    as_user = alice.run(vm, ["python3", "-c", SEARCH], stdin=needle).stdout.split()
    as_root = alice.run(vm, ["python3", "-c", SEARCH], user="root" if root else None,
                        stdin=needle).stdout.split()
    return int(as_user[0]), int(as_root[0]), int(as_root[1])


def start(http, agent: str, key: str, task: str = "write the file", *,
          template: str = "standard", own_model: str | None = None, **fields) -> str:
    """Create a sandbox with the agent on the task; its vm_id. `own_model` is the model given
    to e2a's own agent when the test names none."""
    if agent == "e2a" and own_model:
        fields.setdefault("model", own_model)
    r = http.post("/v1/sandboxes", json={"template": template, "agent": agent, "llm_key": key,
                                         "task": task, "idle_timeout_seconds": 600, **fields},
                  timeout=180)
    assert r.status_code == 201, r.text
    return r.json()["vm_id"]


def finished(http, vm: str, timeout: float = 180) -> dict:
    """The sandbox's task once it has ended."""
    def done():
        t = http.get(f"/v1/sandboxes/{vm}/task").json()
        return t if t["state"] not in LIVE else None
    return wait_for(done, timeout=timeout, interval=0.3)


def events(http, vm: str) -> list[dict]:
    r = http.get(f"/v1/sandboxes/{vm}/task/events", params={"limit": 5000})
    assert r.status_code == 200
    return r.json()["events"]


def of(evs: list[dict], kind: str) -> list[dict]:
    """The data of the events of one type."""
    return [e["data"] for e in evs if e["type"] == kind]


def gateway(alice, vm: str) -> str:
    """The host side of the sandbox's link, as the sandbox sees it."""
    out = alice.run(vm, "ip route show default").stdout.split()
    return out[out.index("via") + 1]
