"""nftables rules that keep sandboxes apart and away from the host.

One table per e2a instance. Sandboxes never reach each other, nor the host (input), nor private,
link-local or loopback ranges behind it, but for one port on the host: the LLM egress proxy. Internet access is an allow-list: only a sandbox whose
interface is in the `inet` set has anything forwarded (through NAT); every other one reaches
nothing. An allow-list fails safe: a table installed before the set is filled, or a sandbox
whose entry was never added, has no internet, never the other way round. The host itself may
open connections into a sandbox (envd, port proxy): that is its output path, unfiltered.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from e2a import proc

BLOCKED_V4 = (
    "0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, "
    "192.0.0.0/24, 192.168.0.0/16, 198.18.0.0/15, 224.0.0.0/4, 240.0.0.0/4"
)


EGRESS_CONNECTIONS = 32


def host_nameservers() -> list[str]:
    """The host's resolvers, when a sandbox could reach them (not loopback ones)."""
    servers = []
    try:
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                ip = ipaddress.ip_address(parts[1])
                if ip.version == 4 and not ip.is_loopback:
                    servers.append(str(ip))
    except (OSError, ValueError):
        pass
    return servers


class Firewall:
    def __init__(self, instance: str, subnet: str, egress_port: int | None = None):
        self.table = f"{instance}"
        # The LLM egress proxy (agents/egress.py): the one host port a sandbox may open, and
        # only sandboxes may (not the host's other networks, not local users over loopback).
        self.egress_port = egress_port
        self.ifglob = f'"{instance}-*"'
        self.subnet = subnet
        self.dns = host_nameservers()

    def ruleset(self, internet: list[str]) -> str:
        dns = ", ".join(self.dns)
        elems = f"elements = {{ {', '.join(internet)} }}" if internet else ""
        dns_rules = (
            f"iifname {self.ifglob} ip daddr {{ {dns} }} udp dport 53 accept\n"
            f"iifname {self.ifglob} ip daddr {{ {dns} }} tcp dport 53 accept\n"
        ) if dns else ""
        t = self.table
        # At most EGRESS_CONNECTIONS open connections per sandbox address: the proxy runs in
        # e2a serve, so connections piled up by a sandbox would use up its file descriptors.
        # Others' packets to the port pass only as part of an established connection (not by
        # port alone): the port is free while e2a is stopped, and a host connection that gets
        # it as its source port would otherwise lose every reply (its SYN-ACK has this
        # destination port). New, invalid, untracked and related ones are dropped.
        egress = (f"tcp dport {self.egress_port} iifname {self.ifglob} add @egress_conns "
                  f"{{ ip saddr ct count over {EGRESS_CONNECTIONS} }} drop\n"
                  f"    tcp dport {self.egress_port} iifname {self.ifglob} accept\n"
                  f"    tcp dport {self.egress_port} ct state != established drop\n"
                  ) if self.egress_port else ""
        return f"""
table inet {t}
delete table inet {t}
table inet {t} {{
  set internet {{ type ifname; {elems} }}
  set egress_conns {{ type ipv4_addr; size 65535; flags dynamic; }}
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname {self.ifglob} ct state established,related accept
    {egress}    iifname {self.ifglob} drop
  }}
  chain output {{
    type filter hook output priority -10; policy accept;
    oifname {self.ifglob} ct state established,related accept
    oifname {self.ifglob} meta skuid != 0 drop
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    oifname {self.ifglob} ct state established,related accept
    oifname {self.ifglob} drop
    iifname {self.ifglob} iifname != @internet drop
    {dns_rules}
    iifname {self.ifglob} meta nfproto ipv6 drop
    iifname {self.ifglob} ip daddr {{ {BLOCKED_V4} }} drop
    iifname {self.ifglob} accept
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    ip saddr {self.subnet} oifname != {self.ifglob} masquerade
  }}
}}
"""

    async def install(self, internet: list[str]) -> None:
        """(Re)create the whole table in one nft transaction, with exactly the given interfaces
        allowed out: there is no moment at which the table exists with a wrong set."""
        await proc.run(["nft", "-f", "-"], stdin=self.ruleset(internet).encode())
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")

    async def set_internet(self, host_if: str, enabled: bool) -> None:
        """Allow (or stop) one interface's traffic out. Removing an absent entry is not an error:
        destroy must be repeatable."""
        verb = "add" if enabled else "delete"
        await proc.run(["nft", verb, "element", "inet", self.table, "internet", f"{{ {host_if} }}"],
                       check=enabled)

    async def allowed(self) -> list[str]:
        """The interfaces in the allow set now."""
        out = await proc.run(["nft", "-j", "list", "set", "inet", self.table, "internet"], check=False)
        try:
            for item in json.loads(out).get("nftables", []):
                if "set" in item:
                    return [e for e in item["set"].get("elem", []) if isinstance(e, str)]
        except (ValueError, AttributeError):
            pass
        return []

    async def uninstall(self) -> None:
        await proc.run(["nft", "delete", "table", "inet", self.table], check=False)
