"""What running costs, in integer micro-credits (1 credit = 1 US cent = 1,000,000 micro).

A sandbox's cost for `ms` milliseconds of running is `ms * rate_num // DENOMINATOR`, where
`rate_num` folds its size and the rates into one integer (fixed when it starts, so a change of
rates applies to sandboxes started after it). Computing the cost of the whole time so far, never
adding up per-tick costs, keeps rounding from drifting: a sandbox's charges always add up to the
cost of its running time rounded down once.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

MICRO = 1_000_000
DENOMINATOR = 1000 * 1000 * 1024  # ms → s; milli-vCPU → vCPU; MiB → GiB
GIB = 1024 ** 3


def to_micro(credits: Decimal | int | float | str) -> int:
    return int(Decimal(str(credits)) * MICRO)


def to_credits(micro: int) -> float:
    """Credits for an API answer: exact to the micro-credit."""
    return round(micro / MICRO, 6)


def show(micro: int) -> str:
    """Credits for a message: exact, without trailing zeros (0, 0.0555, 99.999075)."""
    text = f"{Decimal(micro) / MICRO:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


@dataclass(frozen=True)
class Rates:
    vcpu_second: int          # micro-credits per vCPU-second
    gib_second: int           # per GiB of memory per second
    workspace_gib_hour: int   # per GiB stored per hour

    @classmethod
    def from_settings(cls, settings) -> Rates:
        return cls(to_micro(settings.rate_vcpu_second), to_micro(settings.rate_gib_second),
                   to_micro(settings.rate_workspace_gib_hour))

    def rate_num(self, vcpu_milli: int, memory_mib: int) -> int:
        """A size's cost in micro-credits per ms, times DENOMINATOR (an integer)."""
        return vcpu_milli * self.vcpu_second * 1024 + memory_mib * self.gib_second * 1000

    def per_second(self, vcpu_milli: int, memory_mib: int) -> int:
        return compute_cost(1000, self.rate_num(vcpu_milli, memory_mib))

    def storage_cost(self, byte_seconds: int) -> int:
        return byte_seconds * self.workspace_gib_hour // (GIB * 3600)


def compute_cost(ms: int, rate_num: int) -> int:
    return ms * rate_num // DENOMINATOR


def vcpu_milli(vcpu: int, cpu_fraction: float) -> int:
    return round(vcpu * cpu_fraction * 1000)
