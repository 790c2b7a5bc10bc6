"""Blocking faces of the lease policy: :class:`BlockingLease` runs a
:class:`~mongoengine_lockable._engine.Lease`'s steps with a blocking executor,
and :class:`Keeper` keeps leases alive.

One keeper serves every lease of the process: a scheduler thread wakes when
the next renewal is due and hands it to a small pool of renewal threads (a
renewal held up by an unreachable server does not hold up the others'). A
lease is scheduled by a weak reference, so a forgotten holder can still be
garbage-collected (and its lease then expires). Each lease is renewed at a
third of its duration, each renewal bounded by the time the lease has left;
``lock_lost`` fires when a renewal finds it gone, or when renewals keep failing
until the local deadline passes. A lease handed over for a short pickup term
is confirmed the same way. ``release()`` cancels the lease's renewals and waits
for one in flight, so no renewal outlives its release; no thread is started or
stopped per lease.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ._engine import Lease, Result
from ._io import SyncIO, run
from ._rules import View

__all__ = ["BlockingLease", "Keeper", "LeaseHandle", "keeper"]

log = logging.getLogger("mongoengine_lockable.keepalive")

#: Renewal threads of the keeper (renewals of different leases in parallel).
RENEWAL_THREADS = 4


class Keeper:
    """Renews the leases scheduled with it, each when it is due."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, weakref.ref[BlockingLease]]] = []
        self._seq = itertools.count()
        self._pid = -1
        self._pool: ThreadPoolExecutor | None = None

    def _start(self) -> None:
        """Start the threads: on first use, and again in a forked child (the
        parent's threads do not exist there)."""
        with _START_LOCK:
            if self._pid == os.getpid():
                return
            self._cond = threading.Condition()
            self._heap = []
            self._pool = ThreadPoolExecutor(RENEWAL_THREADS,
                                            thread_name_prefix="lockable-keepalive")
            threading.Thread(target=self._schedule_loop, name="lockable-keeper",
                             daemon=True).start()
            self._pid = os.getpid()

    def schedule(self, lease: BlockingLease, delay: float) -> None:
        """Renew ``lease`` in ``delay`` seconds (replacing what was scheduled)."""
        if self._pid != os.getpid():
            self._start()
        with self._cond:
            seq = next(self._seq)
            lease._keep_seq = seq
            heapq.heappush(self._heap, (time.monotonic() + delay, seq, weakref.ref(lease)))
            self._cond.notify()

    def scheduled(self) -> int:
        """How many leases wait for a renewal (for tests and operators)."""
        with self._cond:
            return sum(1 for _, seq, ref in self._heap
                       if (lease := ref()) is not None and lease._keep_seq == seq)

    def _schedule_loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    timeout = None if not self._heap else self._heap[0][0] - time.monotonic()
                    self._cond.wait(timeout)
                _, seq, ref = heapq.heappop(self._heap)
            lease = ref()
            if lease is not None and lease._keep_seq == seq:
                assert self._pool is not None
                self._pool.submit(self._renew, lease, seq)
            del lease

    def _renew(self, lease: BlockingLease, seq: int) -> None:
        with lease._renewing:
            if lease._keep_seq != seq:
                return  # released, or scheduled again, meanwhile
            try:
                delay = lease.kept(run(lease.lease.keep(), lease.io), lease._forever)
            except Exception:  # pragma: no cover - keep() handles database errors
                log.exception("keepalive of %s failed", lease.lease.what)
                delay = None
            if delay is None:
                lease._keep_seq = None
                return
            self.schedule(lease, delay)


_START_LOCK = threading.Lock()
_KEEPER = Keeper()


def keeper() -> Keeper:
    """The keeper of this process."""
    return _KEEPER


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
        """Does a release by ``owner`` end this handle's own lease (so that
        its renewals stop)?"""
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
    """A :class:`Lease` with a blocking executor, kept alive by the process's
    :class:`Keeper`: what every blocking face (documents, named locks,
    semaphores) acquires, releases and renews through."""

    io: SyncIO

    def __init__(self, lease: Lease, io: SyncIO) -> None:
        super().__init__(lease, io)
        #: The sequence number of this lease's scheduled renewal (``None``: none).
        self._keep_seq: int | None = None
        self._forever = False
        #: Held while a renewal of this lease runs: a release waits for it.
        self._renewing = threading.Lock()

    def _stop_keepalive(self) -> None:
        if self._keep_seq is not None:
            with self._renewing:
                self._keep_seq = None

    def acquire(self, owner: str, ms: int, *, wait: float | None, keepalive: bool = False,
                **grant: Any) -> Result | None:
        """Acquire (:meth:`Lease.acquire`, which ``grant`` goes to: ``force``,
        ``extra``); with ``keepalive``, renew it until :meth:`release`. A
        lease handed over for a short term is confirmed in time, with or
        without ``keepalive``."""
        if self._keep_seq is not None:
            self._stop_keepalive()
        result = run(self.lease.acquire(owner, ms, wait=wait, **grant), self.io,
                     track=wait != 0)
        return self.acquired(result, keepalive)

    def keep_alive(self, *, forever: bool = True) -> None:
        """Renew the held lease until it is released (with ``forever=False``:
        only to confirm a lease handed over for a short term)."""
        delay = self.lease.keepalive_delay()
        if delay is None:
            return
        self._forever = forever
        keeper().schedule(self, delay)

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
