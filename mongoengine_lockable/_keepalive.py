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
from typing import Any

from ._engine import Lease, Result
from ._io import SyncIO, run
from ._rules import View

__all__ = ["BlockingLease", "KeepAlive"]

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
        lease = self._lease()
        delay = None if lease is None else lease.lease.keepalive_delay()
        del lease
        while delay is not None and not self._stop.wait(delay):
            lease = self._lease()
            if lease is None:
                return
            try:
                delay = run(lease.lease.keep(), lease.io)
                if not self._forever and lease.lease.held is not None and \
                        not lease.lease.held.confirm:
                    return  # confirmed: nothing more to do
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


class BlockingLease:
    """A :class:`Lease` with a blocking executor and its keepalive thread: what
    every blocking face (documents, named locks, semaphores) acquires,
    releases and renews through."""

    def __init__(self, lease: Lease, io: SyncIO) -> None:
        self.lease = lease
        self.io = io
        self._keeper: KeepAlive | None = None

    def _stop_keepalive(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.stop()

    def acquire(self, owner: str, ms: int, *, wait: float | None, keepalive: bool = False,
                **grant: Any) -> Result | None:
        """Acquire (:meth:`Lease.acquire`, which ``grant`` goes to: ``force``,
        ``extra``); with ``keepalive``, renew from a background thread until
        :meth:`release`. A lease handed over for a short term is confirmed
        from that thread at once, with or without ``keepalive``."""
        self._stop_keepalive()
        result = run(self.lease.acquire(owner, ms, wait=wait, **grant), self.io,
                     track=wait != 0)
        held = self.lease.held
        if result is not None and held is not None and (keepalive or held.confirm):
            self.keep_alive(forever=keepalive)
        return result

    def keep_alive(self, *, forever: bool = True) -> None:
        """Start renewing the held lease from a background thread (with
        ``forever=False``: only to confirm a lease handed over for a short
        term)."""
        self._stop_keepalive()
        self._keeper = KeepAlive(self, forever=forever)

    def release(self, owner: str | None = None) -> Result:
        if owner is None or (self.lease.held is not None and self.lease.held.owner == owner):
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

    def remaining(self) -> float:
        return self.lease.remaining()
