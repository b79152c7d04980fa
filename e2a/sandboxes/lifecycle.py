"""What both backends do alike around a sandbox's life: the one way its state changes, the
destroy that first stops a create under way, the two ends of a teardown (what is said and cut
when it starts, what is recorded when nothing of it is left), stop listeners, background tasks
and the reaper's loop. The teardown's middle, removing what the sandbox holds, is each
backend's own (`_stop`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from e2a.sandboxes import states
from e2a.sandboxes.host import CreateFailed, DeletedDuringCreate, NoCapacity, Unavailable
from e2a.sandboxes.records import utcnow
from e2a.sandboxes.states import EndReason, State

log = logging.getLogger("e2a.sandboxes")


class Superseded(Exception):
    """The row was no longer in the state this process knew: another replica moved it."""


class Lifecycle:
    """Mixed into a SandboxHost with `records`, `hostlog`, `settings` and `sandboxes` (each with
    `id`, `state`, `lock`, `gone`, `boot_task`, `end_reason`, `upstreams`, `touch()`)."""

    sandboxes: dict[str, Any]
    stuck: set[str]                           # teardown failed: retried by the reaper
    retrying: set[str]                        # of those, the ones being retried now
    retry_at: dict[str, tuple[float, float]]  # id -> (next try, pause), backing off
    # Replicas on one database (the Kubernetes backend): a move happens only from the state
    # this process knows, else Superseded. One process alone (embedded) writes unconditionally.
    conditional_moves = False
    _stop_listeners: list[Callable[[str, EndReason], None]]
    _background: set[asyncio.Task]

    async def _stop(self, sb: Any, reason: EndReason, detail: str | None = None) -> None:
        raise NotImplementedError

    async def _reap_once(self) -> None:
        raise NotImplementedError

    async def _move(self, sb: Any, new: State, reason: str | None = None,
                    detail: str | None = None, **values: Any) -> None:
        """The one way a sandbox changes state: checked, written with its event, then true."""
        states.check(sb.id, sb.state, new)
        if not await self.records.transition(
                sb.id, sb.state, new, reason, detail,
                only_from=sb.state if self.conditional_moves else None, **values):
            raise Superseded(f"sandbox {sb.id} is no longer {sb.state.value}")
        sb.state = new

    async def _boot_and_wait(self, sb: Any, boot) -> None:
        """Run the coroutine `boot` as the sandbox's boot task and wait for it. A destroy
        meanwhile cancels it: DeletedDuringCreate. A failure (the boot has undone itself) is a
        CreateFailed; NoCapacity and Unavailable pass as they are."""
        sb.boot_task = asyncio.create_task(boot, name=f"boot {sb.id}")
        try:
            await asyncio.shield(sb.boot_task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if sb.boot_task.cancelled() and not (me and me.cancelling()):
                raise DeletedDuringCreate(f"sandbox {sb.id} was deleted while it was being "
                                          "created") from None
            raise
        except (NoCapacity, Unavailable):
            raise
        except Exception as exc:
            raise CreateFailed(f"sandbox {sb.id} could not start: {exc}") from exc

    async def destroy(self, sandbox_id: str, reason: EndReason, detail: str | None = None) -> None:
        """Remove a sandbox; returns once it is destroyed (or, if a step failed, left in
        `stopping` for the reaper to finish). Safe to call concurrently and repeatedly."""
        sb = self.sandboxes.get(sandbox_id)
        if sb is None:
            return
        boot = sb.boot_task
        if boot is not None and not boot.done() and boot is not asyncio.current_task():
            if sb.end_reason is None:  # the first to stop a boot cancels it; the others wait
                sb.end_reason = reason
                boot.cancel()  # its own failure path stops the sandbox, holding the lock
            await asyncio.wait([boot])
        async with sb.lock:
            await self._stop(sb, reason, detail)

    async def _stopping(self, sb: Any, reason: EndReason,
                        detail: str | None) -> tuple[EndReason, str] | None:
        """The start of a teardown (the caller holds `sb.lock`): `stopping` recorded once, with
        the first reason given, listeners told, every connection into it cut. None if it is
        destroyed already; else the reason and detail the teardown goes on with."""
        if sb.state is State.DESTROYED:
            return None
        sb.end_reason = sb.end_reason or reason
        reason = sb.end_reason
        detail = detail or reason.value
        if sb.state is not State.STOPPING:
            sb.gone.set()
            try:
                await self._move(sb, State.STOPPING, reason.value, detail,
                                 end_reason=reason.value)
            except Superseded:  # another replica ends it: this one only lets go of it
                await self._let_go(sb, reason)
                return None
            except Exception as exc:
                log.error("recording %s stopping failed: %s", sb.id, exc)
                sb.state = State.STOPPING
            self.hostlog.write(sb.id, f"stopping: {detail}")
            for listener in self._stop_listeners:
                listener(sb.id, reason)
        await asyncio.gather(*(up.abort(reason) for up in list(sb.upstreams)),
                             return_exceptions=True)
        return reason, detail

    async def _let_go(self, sb: Any, reason: EndReason) -> None:
        """Forget a sandbox another replica ends, cutting this process's connections into it;
        the listeners are told too (its agent may run here), with the row's reason."""
        sb.gone.set()
        if self.sandboxes.get(sb.id) is sb:
            del self.sandboxes[sb.id]
        try:
            row = await self.records.get(sb.id)
            reason = EndReason(row.end_reason) if row is not None and row.end_reason else reason
        except Exception as exc:  # the reason this replica saw will do
            log.warning("reading why %s ended: %s", sb.id, exc)
        for listener in self._stop_listeners:
            listener(sb.id, reason)
        await asyncio.gather(*(up.abort(reason) for up in list(sb.upstreams)),
                             return_exceptions=True)

    async def _destroyed(self, sb: Any, reason: EndReason, detail: str) -> None:
        """The end of a teardown: nothing of the sandbox is left."""
        try:
            await self._move(sb, State.DESTROYED, reason.value, detail, destroyed_at=utcnow(),
                             end_reason=reason.value, host_reason=detail[:200])
        except Superseded:  # a replica that took the teardown over recorded it first
            sb.state = State.DESTROYED
        except Exception as exc:  # nothing is left; the row is fixed at the next start
            log.error("recording %s destroyed failed: %s", sb.id, exc)
            sb.state = State.DESTROYED
        self.hostlog.write(sb.id, f"destroyed: {detail}")

    def _retry_if_stuck(self, sb: Any, now: float) -> bool:
        """For the reaper: a sandbox whose teardown failed is tried again in the background
        (one that waits, a workspace that cannot upload yet or an API server that does not
        answer, must not hold up the other sandboxes' timeouts), backing off to a try a minute
        (one that keeps failing costs little). True if it is such a sandbox."""
        if sb.id not in self.stuck:
            return False
        at, pause = self.retry_at.get(sb.id, (0.0, 0.5))
        if sb.id not in self.retrying and now >= at:
            self.retrying.add(sb.id)
            self.retry_at[sb.id] = (now + pause, min(60.0, pause * 2))
            self._in_background(self._retry_stop(sb))
        return True

    async def _retry_stop(self, sb: Any) -> None:
        try:
            await self.destroy(sb.id, sb.end_reason or EndReason.CRASHED)
        finally:
            self.retrying.discard(sb.id)

    def _unstuck(self, sb: Any) -> None:
        """Its teardown went through."""
        self.stuck.discard(sb.id)
        self.retry_at.pop(sb.id, None)

    def on_stop(self, listener: Callable[[str, EndReason], None]) -> None:
        self._stop_listeners.append(listener)

    def touch(self, sandbox_id: str) -> None:
        sb = self.sandboxes.get(sandbox_id)
        if sb is not None:
            sb.touch()

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reaper_interval)
            try:
                await self._reap_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("reaper: %s", exc)
