"""Blocking faces of the lease policy: :class:`BlockingLease` runs a
:class:`~mongoengine_lockable._engine.Lease`'s steps with a blocking executor
and keeps the lease alive from a background thread.

The thread holds only a weak reference to its lease, so a forgotten holder can
still be garbage-collected (and its lease then expires); it renews at a third of
the lease's duration, each renewal bounded by the time the lease has left, and
fires ``lock_lost`` when a renewal finds the lease gone or when renewals keep
failing until the local deadline passes. ``release()`` stops and joins it, so no
thread outlives its lease.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping
from typing import Any, Callable

from ._engine import Lease, Result
from ._io import SyncIO, run
from ._rules import View

__all__ = ["BlockingLease", "KeepAlive", "LeaseHandle"]

log = logging.getLogger("mongoengine_lockable.keepalive")


class KeepAlive:
    """Renews ``lease`` from a daemon thread until stopped, lost or released;
    with ``forever=False``, only until a lease handed over for a short term
    is confirmed."""

    def __init__(self, lease: BlockingLease, *, forever: bool = True) -> None:
        self._lease = weakref.ref(lease)
        self._forever = forever
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lockable-keepalive {lease.lease.what}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        delay = LeaseHandle.first_delay(self._lease)
        while delay is not None and not self._stop.wait(delay):
            lease = self._lease()
            if lease is None:
                return
            try:
                delay = lease.kept(run(lease.lease.keep(), lease.io), self._forever)
            except Exception:  # pragma: no cover - keep() handles database errors
                log.exception("keepalive of %s failed", lease.lease.what)
                return
            finally:
                del lease

    def stop(self) -> None:
        """Stop renewing and wait for an in-flight renewal to finish."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()


class LeaseHandle:
    """A :class:`Lease` with an executor: what a blocking or an asyncio
    handle decides alike, without I/O."""

    def __init__(self, lease: Lease, io: Any) -> None:
        self.lease = lease
        self.io = io

    def keep_alive(self, *, forever: bool = True) -> None:
        raise NotImplementedError

    def acquired(self, result: Result | None, keepalive: bool) -> Result | None:
        """After an acquisition that answered ``result``: keep the lease alive
        if asked to (``keepalive``), or until a hand-off is confirmed."""
        held = self.lease.held
        if result is not None and held is not None and (keepalive or held.confirm):
            self.keep_alive(forever=keepalive)
        return result

    def releases_own(self, owner: str | None) -> bool:
        """Does a release by ``owner`` end this handle's own lease (so its
        keeper stops)?"""
        held = self.lease.held
        return owner is None or (held is not None and held.owner == owner)

    def remaining(self) -> float:
        return self.lease.remaining()

    @staticmethod
    def first_delay(ref: Callable[[], LeaseHandle | None]) -> float | None:
        """Seconds until the first keepalive step of the handle ``ref``
        refers to (``None``: nothing to keep)."""
        handle = ref()
        return None if handle is None else handle.lease.keepalive_delay()

    def kept(self, delay: float | None, forever: bool) -> float | None:
        """After a keepalive step that answered ``delay``: seconds until the
        next one, or ``None`` to stop (released, lost, or, unless
        ``forever``, the hand-off it was to confirm confirmed)."""
        held = self.lease.held
        if not forever and held is not None and not held.confirm:
            return None  # confirmed: nothing more to do
        return delay


class BlockingLease(LeaseHandle):
    """A :class:`Lease` with a blocking executor and its keepalive thread: what
    every blocking face (documents, named locks, semaphores) acquires,
    releases and renews through."""

    io: SyncIO

    def __init__(self, lease: Lease, io: SyncIO) -> None:
        super().__init__(lease, io)
        self._keeper: KeepAlive | None = None

    def _stop_keepalive(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.stop()

    def acquire(
        self,
        owner: str,
        ms: int,
        *,
        wait: float | None,
        force: bool = False,
        keepalive: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> Result | None:
        """Acquire (see :meth:`Lease.acquire`); with ``keepalive``, renew from a
        background thread until :meth:`release`."""
        self._stop_keepalive()
        result = run(self.lease.acquire(owner, ms, wait=wait, force=force, extra=extra),
                     self.io, track=wait != 0)
        return self.acquired(result, keepalive)

    def keep_alive(self, *, forever: bool = True) -> None:
        """Start renewing the held lease from a background thread (with
        ``forever=False``: only to confirm a lease handed over for a short
        term)."""
        self._stop_keepalive()
        self._keeper = KeepAlive(self, forever=forever)

    def release(self, owner: str | None = None) -> Result:
        if self.releases_own(owner):
            self._stop_keepalive()
        return run(self.lease.release(owner), self.io)

    def renew(self, ms: int | None = None, owner: str | None = None) -> Result:
        return run(self.lease.renew(ms, owner), self.io)

    def update(self, update: dict[str, Any]) -> Result:
        return run(self.lease.update(update), self.io)

    def owned(self, owner: str | None = None) -> bool:
        return run(self.lease.owned(owner), self.io)

    def look(self) -> View:
        return run(self.lease.look(), self.io)
