"""Per-sandbox network: a network namespace and a veth pair, one /30 link per sandbox.

Host side `<instance>-<slot>` holds the link's first address, the namespace's `eth0` the second;
runsc's netstack takes eth0 over when the sandbox starts (its addresses move into gVisor).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from e2a import proc

NETNS_DIR = "/var/run/netns"


@dataclass(frozen=True)
class Link:
    netns: str
    host_if: str
    host_ip: str
    sandbox_ip: str

    @property
    def netns_path(self) -> str:
        return f"{NETNS_DIR}/{self.netns}"


class Addressing:
    """Maps a slot number to names and addresses, deterministically (needed to adopt after restart)."""

    def __init__(self, instance: str, subnet: str):
        self.instance = instance
        self.net = ipaddress.ip_network(subnet)
        self.slots = self.net.num_addresses // 4

    def link(self, slot: int, sandbox_id: str) -> Link:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} outside {self.net}")
        base = int(self.net.network_address) + slot * 4
        return Link(
            netns=f"{self.instance}-{sandbox_id}",
            host_if=f"{self.instance}-{slot}",
            host_ip=str(ipaddress.ip_address(base + 1)),
            sandbox_ip=str(ipaddress.ip_address(base + 2)),
        )


async def create(link: Link) -> None:
    """Create namespace + veth; raises after undoing what it made."""
    await proc.run(["ip", "netns", "add", link.netns])
    try:
        await proc.run(["ip", "-batch", "-"], stdin=(
            f"link add {link.host_if} type veth peer name eth0 netns {link.netns}\n"
            f"addr add {link.host_ip}/30 dev {link.host_if}\n"
            f"link set {link.host_if} up\n").encode())
        await arm(link)
    except BaseException:
        await destroy(link)
        raise


async def arm(link: Link) -> None:
    """Give the namespace's eth0 the sandbox's address and route. runsc takes them over when
    the sandbox starts (they move into gVisor's netstack and are gone from eth0), so a restore
    (resume, fork) in the same namespace needs them put back: runsc reads them from there.
    Idempotent."""
    await proc.run(["ip", "-n", link.netns, "-batch", "-"], stdin=(
        f"addr replace {link.sandbox_ip}/30 dev eth0\n"
        "link set eth0 up\n"
        "link set lo up\n"
        f"route replace default via {link.host_ip}\n").encode())


async def destroy(link: Link) -> None:
    """Idempotent: deleting the namespace deletes eth0 and with it the host end of the pair."""
    if link.host_if and os.path.exists(f"/sys/class/net/{link.host_if}"):
        await proc.run(["ip", "link", "del", link.host_if], check=False)
    if link.netns and os.path.exists(link.netns_path):
        await proc.run(["ip", "netns", "del", link.netns], check=False)


def exists(link: Link) -> bool:
    return bool((link.host_if and os.path.exists(f"/sys/class/net/{link.host_if}"))
                or (link.netns and os.path.exists(link.netns_path)))


def existing_netns(instance: str) -> list[str]:
    try:
        return [n for n in os.listdir(NETNS_DIR) if n.startswith(instance + "-")]
    except FileNotFoundError:
        return []


def existing_host_ifs(instance: str) -> list[str]:
    return [n for n in os.listdir("/sys/class/net") if n.startswith(instance + "-")]
