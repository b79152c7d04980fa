"""The sandbox state machine: the states the hosted API documents, the legal moves between them,
and why a sandbox ended.

creating → configuring → booting → running ↔ paused, and from any live state → stopping
→ destroyed. `stopping` is where host resources are being removed; a sandbox leaves it only when
every one of them is gone.
"""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    CREATING = "creating"
    CONFIGURING = "configuring"
    BOOTING = "booting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    DESTROYED = "destroyed"


class EndReason(str, enum.Enum):
    """Why a sandbox was destroyed (the record's `end_reason`)."""

    DELETED = "deleted"                # DELETE through the API
    IDLE_TIMEOUT = "idle_timeout"
    MAX_LIFETIME = "max_lifetime"
    OUT_OF_MEMORY = "out_of_memory"    # the host killed it for memory (its cgroup's OOM count)
    CRASHED = "crashed"                # one of its host processes died, or runsc failed
    SERVER_RESTART = "server_restart"  # not alive (or not finished booting) when e2a restarted
    CREATE_FAILED = "create_failed"    # a step of its create failed; nothing of it is left
    TASK_FINISHED = "task_finished"    # its agent's task ended (docs/agents.md)
    SESSION_ENDED = "session_ended"    # the agent session it served ended (docs/sessions.md)
    OUT_OF_CREDITS = "out_of_credits"  # its owner's balance ran out (docs/billing.md)
    PAUSED_EXPIRED = "paused_expired"  # it stayed paused longer than E2A_PAUSED_TTL (docs/pause.md)


LIVE = frozenset({State.CREATING, State.CONFIGURING, State.BOOTING, State.RUNNING, State.PAUSED,
                  State.STOPPING})
BOOTING = frozenset({State.CREATING, State.CONFIGURING, State.BOOTING})

_NEXT: dict[State, frozenset[State]] = {
    State.CREATING: frozenset({State.CONFIGURING, State.STOPPING}),
    State.CONFIGURING: frozenset({State.BOOTING, State.STOPPING}),
    State.BOOTING: frozenset({State.RUNNING, State.STOPPING}),
    State.RUNNING: frozenset({State.PAUSED, State.STOPPING}),
    State.PAUSED: frozenset({State.RUNNING, State.STOPPING}),
    State.STOPPING: frozenset({State.DESTROYED}),
    State.DESTROYED: frozenset(),
}


class IllegalTransition(Exception):
    def __init__(self, sandbox_id: str, old: State, new: State):
        super().__init__(f"sandbox {sandbox_id}: {old.value} → {new.value} is not allowed")
        self.old, self.new = old, new


def check(sandbox_id: str, old: State, new: State) -> None:
    """Raises IllegalTransition unless `old → new` is a move the state machine allows."""
    if new not in _NEXT[old]:
        raise IllegalTransition(sandbox_id, old, new)
