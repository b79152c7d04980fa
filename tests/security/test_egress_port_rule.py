"""The egress proxy's port rule, installed for real (nftables, loopback): it keeps the host's own
users from opening connections to the port, and nothing else.

Found by a CI run: the rule dropped every packet to the port, so while e2a was stopped (its table
stays, for the sandboxes that outlive it) a host connection that the kernel gave that port as its
source lost its SYN-ACK and hung until its timeout."""

from __future__ import annotations

import contextlib
import socket
import subprocess

import pytest

from e2a.network.firewall import Firewall

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def installed(fw: Firewall):
    subprocess.run(["nft", "-f", "-"], input=fw.ruleset([]).encode(), check=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "inet", fw.table], check=True)


def listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def connects(port: int, source_port: int = 0) -> bool:
    with socket.socket() as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        c.bind(("127.0.0.1", source_port))
        c.settimeout(2)
        try:
            c.connect(("127.0.0.1", port))
            return True
        except TimeoutError:
            return False


def test_a_host_connection_from_the_egress_port_gets_its_replies():
    with listener() as server, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        egress_port = probe.getsockname()[1]   # a port nothing listens on, as while e2a is down
        probe.close()
        with installed(Firewall("tfwx", "10.254.240.0/20", egress_port=egress_port)):
            assert connects(server.getsockname()[1], source_port=egress_port)


def test_the_host_still_cannot_open_a_connection_to_the_egress_port():
    with listener() as proxy:
        port = proxy.getsockname()[1]
        assert connects(port)                  # without e2a's table: open
        with installed(Firewall("tfwy", "10.254.224.0/20", egress_port=port)):
            assert not connects(port)          # the SYN is dropped
