"""Starts a real `e2a serve` for tests: its own data dir, instance prefix, subnet and port."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from e2a.runtime import quota
from tests.e2e.mailbox import smtp_env
from tests import stripe_mock

ROOT = Path(__file__).resolve().parents[2]
E2A = str(Path(sys.executable).parent / "e2a")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlmMock:
    """The mock LLM provider server (tests/llm_mock), one per test process, started on first use."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.llm_mock", "--port",
                                      str(self.port)], cwd=ROOT)
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.url + "/_mock/requests", timeout=1)
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the LLM mock did not start")
                time.sleep(0.1)

    def scenario(self, key: str, **scenario) -> None:
        httpx.post(self.url + "/_mock/scenarios", json={"key": key, "scenario": scenario},
                   timeout=10).raise_for_status()

    def requests(self, key: str | None = None) -> list[dict]:
        r = httpx.get(self.url + "/_mock/requests", params={"key": key} if key else {},
                      timeout=10)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


_mock: LlmMock | None = None


def llm_mock() -> LlmMock:
    global _mock
    if _mock is None:
        _mock = LlmMock()
        atexit.register(_mock.stop)
    return _mock


def llm_mock_env() -> dict[str, str]:
    url = llm_mock().url
    return {f"E2A_LLM_{vendor}_URL": url for vendor in ("ANTHROPIC", "OPENAI", "GOOGLE", "DEEPSEEK")}


_stripe_url: str | None = None
STRIPE_WEBHOOK_SECRET = stripe_mock.TEST_WEBHOOK_SECRET


def stripe_env() -> dict[str, str]:
    """Stripe for every test server: stripe-mock (one per test process, on the worker's own
    port), a test key, and the webhook secret the tests sign their events with."""
    global _stripe_url
    if _stripe_url is None:
        from tests.conftest import worker_index
        stack = contextlib.ExitStack()
        _stripe_url = stack.enter_context(stripe_mock.running(12111 + worker_index()))
        atexit.register(stack.close)
    return {"E2A_STRIPE_API_BASE": _stripe_url, "E2A_STRIPE_SECRET_KEY": stripe_mock.TEST_SECRET_KEY,
            "E2A_STRIPE_WEBHOOK_SECRET": STRIPE_WEBHOOK_SECRET}


@dataclass
class Server:
    instance: str        # prefix of every host object this server makes
    subnet: str
    base: Path
    port: int = field(default_factory=free_port)
    s3_port: int = field(default_factory=free_port)  # the embedded S3 server's
    egress_port: int = field(default_factory=free_port)  # the LLM egress proxy's
    proc: subprocess.Popen | None = None
    extra_env: dict = field(default_factory=dict)
    keys: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def run_dir(self) -> Path:
        return self.base / "run"

    def env(self) -> dict:
        return {
            **os.environ,
            "E2A_DATA_DIR": str(self.base / "data"),
            "E2A_RUN_DIR": str(self.run_dir),
            "E2A_PORT": str(self.port),
            "E2A_INSTANCE": self.instance,
            "E2A_SUBNET": self.subnet,
            "E2A_REAPER_INTERVAL": "0.2",
            "E2A_POOL_SIZE": "0",  # tests that want a warm pool say so
            "E2A_DISK_GIB": "4",   # each server's disk pool (preallocated): room for one full sandbox
            "E2A_S3_PORT": str(self.s3_port),
            "E2A_EGRESS_PORT": str(self.egress_port),
            # replicas of a test's e2a all run on this host (a follow-up is passed on here)
            "E2A_REPLICA_URL": f"http://127.0.0.1:{self.port}",
            # every provider's API is the tests' mock (tests/llm_mock), started once per worker
            **llm_mock_env(),
            "E2A_LLM_PRIVATE_HOSTS": "127.0.0.1",  # the mock, as a caller's own llm.base_url
            **stripe_env(),
            "E2A_METERING_INTERVAL": "1",  # billing tests wait a tick, not ten seconds
            "E2A_STORAGE_METERING_INTERVAL": "2",  # nor an hour for storage
            **smtp_env(),  # login codes go to the tests' SMTP server (tests/e2e/mailbox.py)
            **self.extra_env,
        }

    def admin(self, *args: str) -> str:
        out = subprocess.run([E2A, "admin", *args], env=self.env(), check=True,
                             capture_output=True, text=True)
        return out.stdout

    def create_user(self, email: str) -> str:
        """Returns a new API key for a new user."""
        return re.search(r"api_key=(\S+)", self.admin("create-user", email)).group(1)

    def start(self, attempts: int = 3) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        log = open(self.base / "server.log", "ab")
        start = log.tell()
        self.proc = subprocess.Popen([E2A, "serve"], env=self.env(), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                said = (self.base / "server.log").read_bytes()[start:]
                if b"Address already in use" in said and attempts > 1:
                    # free_port() gives a port back to the kernel until e2a binds it, and this
                    # machine's many connections can take it as their source port meanwhile:
                    # the inner ports are picked again (clients know only the API port)
                    self.s3_port, self.egress_port = free_port(), free_port()
                    log.close()
                    return self.start(attempts - 1)
                raise RuntimeError("e2a serve exited:\n" + self.log_tail())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("e2a serve did not come up:\n" + self.log_tail())

    def kill9(self) -> None:
        """A crash: the server dies at once, its sandboxes keep running."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return (self.base / "server.log").read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    # ---- host objects, for leak checks -------------------------------------------------------

    def host_objects(self) -> dict[str, int]:
        prefix = self.instance + "-"
        netns = [n for n in os.listdir("/var/run/netns")] if os.path.isdir("/var/run/netns") else []
        # runsc keeps one `null-netns` bind mount in its state root, and e2a one disk pool mount
        # on the sandboxes directory (not per sandbox).
        pool = self.base / "data" / "sandboxes"
        mounts = "\n".join(line for line in Path("/proc/mounts").read_text().splitlines()
                           if "/runsc/null-netns" not in line
                           and line.split()[1:3] != [str(pool), "btrfs"])
        runsc = subprocess.run(["pgrep", "-f", f"root={self.run_dir}/runsc"],
                               capture_output=True, text=True).stdout.split()
        mounts = self.mount_pids()
        cgroups = [p for p in Path("/sys/fs/cgroup").glob(f"*/{self.instance}/*") if p.is_dir()]
        sandboxes = self.base / "data" / "sandboxes"
        return {
            "netns": sum(n.startswith(prefix) for n in netns),
            "veth": sum(n.startswith(prefix) for n in os.listdir("/sys/class/net")),
            "mounts": mounts.count(str(self.base)) + mounts.count(f"/netns/{prefix}"),
            "runsc_processes": len(runsc),
            "rclone_mounts": len(mounts),
            "cgroups": len(cgroups),
            "sandbox_dirs": len(list(sandboxes.iterdir())) if sandboxes.is_dir() else 0,
            "qgroups": len(quota.volume_qgroups(pool)) if quota.is_pool(pool) else 0,
            # not a leak but a broken pool: disk limits stop holding (quota.py says why)
            "quota_inconsistent": int(quota.is_pool(pool) and quota.inconsistent(pool)),
        }

    def mount_pids(self) -> list[int]:
        """This server's workspace mounts (their cache is under its base): one per sandbox."""
        return [int(p) for p in subprocess.run(
            ["pgrep", "-f", f"rclone mount .*{self.base}/"], capture_output=True,
            text=True).stdout.split()]

    def s3_server_pid(self) -> int | None:
        """The embedded S3 server's (one per server, like its disk pool)."""
        try:
            pid = int((self.base / "data" / "s3" / "server.pid").read_text())
            return pid if b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes() else None
        except (OSError, ValueError):
            return None

    def stale_server_pids(self) -> list[int]:
        """e2a servers on this instance's data directory that this process did not start: a
        run interrupted before its teardown left them, and they reap and pool on it still."""
        mine = f"E2A_DATA_DIR={self.base / 'data'}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                serving = b"serve" in (entry / "cmdline").read_bytes().split(b"\0")
                if serving and mine in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours to read
                continue
        return found

    def cleanup(self) -> None:
        """Remove whatever this instance left, even after a failed test (test hygiene only)."""
        self.stop()
        for pid in self.stale_server_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", f"root={self.run_dir}/runsc"], capture_output=True)
        for pid in self.mount_pids() + [self.s3_server_pid() or 0]:
            if not pid:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        prefix = self.instance + "-"
        if os.path.isdir("/var/run/netns"):
            for ns in os.listdir("/var/run/netns"):
                if ns.startswith(prefix):
                    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for ifname in os.listdir("/sys/class/net"):
            if ifname.startswith(prefix):
                subprocess.run(["ip", "link", "del", ifname], capture_output=True)
        time.sleep(0.2)
        for target in reversed([line.split()[1] for line in open("/proc/mounts")
                                if line.split()[1].startswith(str(self.base) + "/")]):
            subprocess.run(["umount", "-l", target], capture_output=True)
        for cg in Path("/sys/fs/cgroup").glob(f"*/{self.instance}/*"):
            try:
                cg.rmdir()
            except OSError:
                pass
        subprocess.run(["nft", "delete", "table", "inet", self.instance], capture_output=True)
        subprocess.run(["umount", "-l", str(self.run_dir / "runsc" / "null-netns")],
                       capture_output=True)
        # rm, not shutil.rmtree: a sandbox may have left a tree too deep for Python's walk.
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.base)], capture_output=True)
