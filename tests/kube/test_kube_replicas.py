"""Several e2a replicas on one PostgreSQL and one cluster (docs/kubernetes.md "Replicas"): a
sandbox made through one is used, streamed and ended through another; a replica killed with
-9 mid-stream costs the client only a retry through another; one leader reaps, and another
takes over when it dies, finishing the create the dead one left; the warm pool is filled once
and claimed by every replica without two claiming one pod."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import threading
import time

import httpx
import pytest

from e2a.sdk import E2A, E2AError
from tests.conftest import wait_for
from tests.kube.cluster import NAMESPACE, another_replica, kube_env, replica_of

pytestmark = pytest.mark.kube  # one cluster per machine: run apart from xdist (Makefile)

LEADS = "this replica leads"


def said(srv) -> str:
    """All the server said since its fixture started it (cleanup removed older logs)."""
    return (srv.base / "server.log").read_text(errors="replace")


def pod_name(vm_id: str) -> str:
    return vm_id.replace("_", "-")


@pytest.fixture(scope="module")
def second(kserver):
    """A second replica of the Kubernetes server (kserver leads: it started first)."""
    with another_replica(kserver, "b") as srv:
        yield srv


@pytest.fixture(scope="module")
def clients(kserver, second):
    key = kserver.keys["alice"]
    a, b = E2A(kserver.url, key), E2A(second.url, key)
    yield a, b
    a.close()
    b.close()


def half_claim(database: str, email: str, tag: str, dead: bool) -> str | None:
    """What a claim's UPDATE leaves before the pod is relabelled: a pooled sandbox's row now
    the user's (with metadata {"half": tag}), naming a lock key no replica holds (`dead`: its
    replica died there) or still its live maker's (a claim under way). Its id."""
    meta = '{\\"half\\": \\"%s\\"}' % tag  # for the shell: {"half": "<tag>"}
    sql = (f"UPDATE sandboxes SET {'replica = 4242, ' if dead else ''}metadata = '{meta}', "
           f"user_id = (SELECT id FROM users WHERE email = '{email}') WHERE id = ("
           "SELECT id FROM sandboxes WHERE user_id IS NULL AND state = 'running' "
           "ORDER BY created_at LIMIT 1) RETURNING id")
    out = subprocess.run(["su", "postgres", "-c", f'psql -d {database} -qtAc "{sql}"'],
                         check=True, capture_output=True, text=True).stdout.split()
    return out[0] if out else None


def transitions(client: E2A, vm_id: str) -> list[str]:
    return [e.to_state for e in client.events(vm_id)]


def test_one_leader_and_a_follower_takes_over_a_dead_leaders_work(cluster, kserver, second,
                                                                  clients):
    """First in this module: kserver started before the second replica, so it leads."""
    a, b = clients
    assert LEADS in said(kserver)
    assert LEADS not in said(second)
    # a create cut off by its replica's death: its row is written, the answer never comes
    marker = {"cut": str(time.monotonic_ns())}
    threading.Thread(target=lambda: _create_quietly(a, marker), daemon=True).start()
    wait_for(lambda: b.list_sandboxes(metadata=marker), timeout=30, interval=0.02)
    kserver.kill9()
    try:
        wait_for(lambda: LEADS in said(second), timeout=15)
        # the new leader finishes the dead replica's create: ended, its pod deleted
        cut = wait_for(lambda: b.list_sandboxes(state="destroyed", metadata=marker),
                       timeout=60)[0]
        assert cut.end_reason == "server_restart"
        wait_for(lambda: pod_name(cut.vm_id) not in
                 {p["metadata"]["name"] for p in cluster.pods()}, timeout=30)
        # and it reaps: an idle sandbox made through it ends on time
        idle = b.create_sandbox("standard", idle_timeout_seconds=2)
        wait_for(lambda: idle.vm_id in {s.vm_id for s in b.list_sandboxes(state="destroyed")},
                 timeout=30, interval=0.5)
        assert b.get_sandbox(idle.vm_id).end_reason == "idle_timeout"
    finally:
        kserver.start()


def _create_quietly(client: E2A, metadata: dict) -> None:
    try:
        client.create_sandbox("standard", metadata=metadata, idle_timeout_seconds=600)
    except Exception:
        pass  # its replica is killed mid-create


def test_made_through_one_replica_used_streamed_and_ended_through_the_other(cluster, clients):
    a, b = clients
    sb = a.create_sandbox("standard", idle_timeout_seconds=600)
    assert b.get_sandbox(sb.vm_id).state == "running"
    assert b.run(sb.vm_id, "echo via-b").stdout == "via-b\n"
    b.files.write(sb.vm_id, "/tmp/from-b", "written through b")
    assert a.files.read_text(sb.vm_id, "/tmp/from-b") == "written through b"
    lines = [e.data for e in b.stream(sb.vm_id, "for i in 1 2 3; do echo $i; done")
             if e.type == "stdout"]
    assert "".join(lines) == "1\n2\n3\n"
    b.kill(sb.vm_id)
    for c in (a, b):  # both replicas' answers come from the one database
        got = c.get_sandbox(sb.vm_id)
        assert (got.state, got.end_reason) == ("destroyed", "deleted")
    # one teardown, recorded once: the replica that made it only let go of it
    assert transitions(a, sb.vm_id) == ["creating", "configuring", "booting", "running",
                                        "stopping", "destroyed"]
    with pytest.raises(E2AError) as e:
        a.run(sb.vm_id, "true")
    assert e.value.status in (404, 409)
    assert not [p for p in cluster.pods() if p["metadata"]["name"] == pod_name(sb.vm_id)]


def test_a_replica_killed_mid_stream_costs_only_a_retry_through_another(kserver, clients):
    a, b = clients
    sb = a.create_sandbox("standard", idle_timeout_seconds=600)
    pid = a.run_background(sb.vm_id, "for i in $(seq 1 40); do echo line$i; sleep 0.1; done;"
                                      " exit 3")
    seen, broken = [], threading.Event()

    def follow():
        try:
            for ev in a.reconnect(sb.vm_id, pid):
                if ev.type == "stdout":
                    seen.append(ev.data)
        except Exception:
            broken.set()
    reader = threading.Thread(target=follow)
    reader.start()
    wait_for(lambda: len(seen) >= 3, timeout=30)
    kserver.kill9()  # mid-stream
    reader.join(30)
    try:
        assert broken.is_set() or len("".join(seen).split()) < 40
        res = b.wait(sb.vm_id, pid)  # the client's retry, through the other replica
        assert res.exit_code == 3
        assert res.stdout.split() == [f"line{i}" for i in range(1, 41)]
        assert b.get_sandbox(sb.vm_id).state == "running"  # a replica's death is not its
        assert b.run(sb.vm_id, "echo after").stdout == "after\n"
    finally:
        kserver.start()
    assert a.run(sb.vm_id, "echo back").stdout == "back\n"
    b.kill(sb.vm_id)


def test_idle_timeout_counts_use_through_every_replica(second, clients):
    """After the test above the second replica leads and ends idle sandboxes; use through
    the first alone keeps one alive, however long."""
    a, b = clients
    assert LEADS in said(second)
    sb = b.create_sandbox("standard", idle_timeout_seconds=4)
    for _ in range(8):  # 8 s of use through a alone, twice the timeout
        assert a.run(sb.vm_id, "true").exit_code == 0
        time.sleep(1)
    assert sb.vm_id in {s.vm_id for s in b.list_sandboxes(state="running")}
    # polled by the list of ended ones: a GET would count as use
    wait_for(lambda: sb.vm_id in {s.vm_id for s in b.list_sandboxes(state="destroyed")},
             timeout=30, interval=0.5)
    assert b.get_sandbox(sb.vm_id).end_reason == "idle_timeout"


def test_the_warm_pool_is_filled_once_and_claimed_through_every_replica(cluster, mailbox):
    from tests.conftest import own_server
    env = {**kube_env(cluster, "e2a_kubepool"), "E2A_POOL_SIZES": json.dumps({"standard": 2}),
           "E2A_MAX_SANDBOXES_PER_USER": "3"}
    with own_server("kubepool", **env) as first:
        first.start()
        other = replica_of(first, "b")
        other.cleanup()
        other.start()
        mine = lambda: [p for p in cluster.pods()  # noqa: E731
                        if p["metadata"]["labels"].get("e2a.dev/instance") == first.instance]
        try:
            for srv in (first, other):
                wait_for(lambda: httpx.get(srv.url + "/health").json()["pool"].get(
                    "standard") == 2, timeout=90)
            time.sleep(3)  # a follower that refilled too would have started more by now
            assert len(mine()) == 2
            assert {p["metadata"]["labels"]["e2a.dev/owner"] for p in mine()} == {"pool"}
            key = first.create_user("pool@example.com")
            with E2A(first.url, key) as a, E2A(other.url, key) as b, \
                    concurrent.futures.ThreadPoolExecutor(2) as ex:
                made = list(ex.map(lambda c: c.create_sandbox("standard",
                                                              idle_timeout_seconds=600),
                                   (a, b)))
                assert len({s.vm_id for s in made}) == 2  # no pod handed out twice
                for sb in made:
                    assert "claimed" in [e.reason for e in a.events(sb.vm_id)]
                    assert b.run(sb.vm_id, "echo warm").stdout == "warm\n"
                    name = pod_name(sb.vm_id)
                    owners = {cluster.json("get", kind, name, "-n", NAMESPACE)["metadata"][
                        "labels"]["e2a.dev/owner"] for kind in ("pod", "networkpolicy")}
                    assert len(owners) == 1 and owners != {"pool"}  # the owner's hash
                    # the user asked for the internet (the default); a pooled pod had none
                    egress = cluster.json("get", "networkpolicy", name, "-n", NAMESPACE)[
                        "spec"]["egress"]
                    assert any(r["to"][0]["ipBlock"]["cidr"] == "0.0.0.0/0" for r in egress)
                wait_for(lambda: len(mine()) == 4, timeout=90)  # refilled, once
                closed = a.create_sandbox("standard", internet=False)
                assert "claimed" in [e.reason for e in a.events(closed.vm_id)]
                egress = cluster.json("get", "networkpolicy", pod_name(closed.vm_id), "-n",
                                      NAMESPACE)["spec"]["egress"]
                assert not any(r["to"][0]["ipBlock"]["cidr"] == "0.0.0.0/0" for r in egress)
                for sb in [*made, closed]:
                    a.kill(sb.vm_id)
                # a replica that dies between a claim's UPDATE and the pod's relabelling: its
                # row names the user and that replica, the pod still the pool; beside it, a
                # claim under way (its replica alive) that must be left alone
                dead, alive = (wait_for(lambda: half_claim(  # once a pooled pod runs
                    "e2a_kubepool", "pool@example.com", tag, dead=tag == "dead"), timeout=90)
                    for tag in ("dead", "alive"))
                ended = wait_for(lambda: a.list_sandboxes(state="destroyed",
                                                          metadata={"half": "dead"}),
                                 timeout=60, interval=0.5)[0]
                assert ended.vm_id == dead and ended.end_reason == "server_restart"
                wait_for(lambda: pod_name(dead) not in {p["metadata"]["name"] for p in mine()},
                         timeout=30)
                time.sleep(6)  # one more sweep (every 5 s)
                assert a.get_sandbox(alive).state == "running"
                a.kill(alive)
                # the per-user limit, exact across replicas: five creates at once through
                # both, for a user allowed three, with pooled pods and new ones
                wait_for(lambda: httpx.get(first.url + "/health").json()["pool"].get(
                    "standard") == 2, timeout=90)
                def create(c):
                    try:
                        return c.create_sandbox("standard", idle_timeout_seconds=600)
                    except E2AError as exc:
                        return exc
                with concurrent.futures.ThreadPoolExecutor(5) as ex5:
                    got = list(ex5.map(create, (a, b, a, b, a)))
                made = [g for g in got if not isinstance(g, E2AError)]
                assert len(made) == 3 and all(g.status == 429 for g in got
                                              if isinstance(g, E2AError)), got
                assert len(a.list_sandboxes(state="running")) == 3
                for sb in made:
                    a.kill(sb.vm_id)
        finally:
            other.stop()
            first.stop()
            other.cleanup()
            # pooled pods outlive their e2a on purpose (the next start adopts them)
            cluster.kubectl("delete", "pods,secrets,networkpolicies", "-n", NAMESPACE, "-l",
                            f"e2a.dev/instance={first.instance}", "--wait=true")
    assert not mine()
