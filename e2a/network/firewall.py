"""nftables rules that keep sandboxes apart and away from the host.

One table per e2a instance. Sandboxes never reach each other, nor the host (input), nor private,
link-local or loopback ranges behind it; with internet on they reach the rest through NAT; with
internet off their interface is in the `noinet` set and nothing they send is forwarded. The host
itself may open connections into a sandbox (envd, port proxy): that is its output path, unfiltered.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from e2a import proc

BLOCKED_V4 = (
    "0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, "
    "192.0.0.0/24, 192.168.0.0/16, 198.18.0.0/15, 224.0.0.0/4, 240.0.0.0/4"
)


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
    def __init__(self, instance: str, subnet: str):
        self.table = f"{instance}"
        self.ifglob = f'"{instance}-*"'
        self.subnet = subnet
        self.dns = host_nameservers()

    def ruleset(self, noinet: list[str]) -> str:
        dns = ", ".join(self.dns)
        noinet_elems = f"elements = {{ {', '.join(noinet)} }}" if noinet else ""
        dns_rules = (
            f"iifname {self.ifglob} ip daddr {{ {dns} }} udp dport 53 accept\n"
            f"iifname {self.ifglob} ip daddr {{ {dns} }} tcp dport 53 accept\n"
        ) if dns else ""
        t = self.table
        return f"""
table inet {t}
delete table inet {t}
table inet {t} {{
  set noinet {{ type ifname; {noinet_elems} }}
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname {self.ifglob} ct state established,related accept
    iifname {self.ifglob} drop
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    oifname {self.ifglob} ct state established,related accept
    oifname {self.ifglob} drop
    iifname @noinet drop
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

    async def install(self, noinet: list[str]) -> None:
        """(Re)create the whole table atomically, with the given interfaces cut off."""
        await proc.run(["nft", "-f", "-"], stdin=self.ruleset(noinet).encode())
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")

    async def set_internet(self, host_if: str, enabled: bool) -> None:
        verb = "delete" if enabled else "add"
        await proc.run(["nft", verb, "element", "inet", self.table, "noinet", f"{{ {host_if} }}"],
                       check=enabled is False)

    async def uninstall(self) -> None:
        await proc.run(["nft", "delete", "table", "inet", self.table], check=False)
