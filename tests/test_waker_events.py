"""Which writes wake a waiter: only those that can free the lease.

Waking every waiter on every write (grants, renewals, the holder's own
updates) makes contended waits slower than polling, so the change stream is
narrowed to releases, deletes and replaces of the one record.
"""

from __future__ import annotations

import time
from typing import Any

from mongoengine import Document, IntField

from mongoengine_lockable import LockableMixin, NamedLock
from mongoengine_lockable._lease import LeaseOps, lease_ops_for, time_left
from mongoengine_lockable._named import _ops_on
from mongoengine_lockable._waiting import ChangeStreamWaker


class Watched(LockableMixin, Document):
    n = IntField(default=0)
    meta = {"collection": "waker_events"}


def events_seen(waker: Any) -> list[str]:
    """Drain what the waker's stream holds now (each read waits <= 100 ms)."""
    assert isinstance(waker, ChangeStreamWaker)
    seen = []
    while (event := waker._stream.try_next()) is not None:
        seen.append(event["operationType"])
    return seen


def test_document_waiter_hears_only_freeing_writes(lockable_real_db: Any) -> None:
    doc = Watched().save()
    other = Watched().save()
    ops: LeaseOps = lease_ops_for(Watched, Watched._get_collection())
    waker = ops.waker(doc.pk)
    try:
        assert doc.lock(5)
        doc.renew(10)
        doc.update_if_held(inc__n=1)
        Watched.objects.get(pk=doc.pk).lock(5)  # a failed grant writes nothing
        assert other.lock(5)  # another record
        other.release()
        assert events_seen(waker) == []
        doc.release()
        assert events_seen(waker) == ["update"]
        assert doc.lock(5)
        assert Watched.objects.get(pk=doc.pk).lock(5, force=True)  # a takeover frees nothing
        assert events_seen(waker) == []
        doc.delete()
        assert events_seen(waker) == ["delete"]
    finally:
        waker.close()


def test_named_lock_waiter_hears_only_releases(lockable_real_db: Any) -> None:
    lock = NamedLock("watched", 5)
    assert lock.acquire()
    waker = _ops_on("default", lock.collection, None).waker("watched")
    try:
        lock.renew()
        assert NamedLock("watched", 5).acquire() is False  # a held no-op
        assert events_seen(waker) == []
        lock.release()
        assert events_seen(waker) == ["update"]
    finally:
        waker.close()


def test_waiter_wakes_when_a_min_hold_ends_not_after_its_own_duration(
    lockable_real_db: Any,
) -> None:
    """A release under ``min_hold`` wakes the waiter while the lock is still
    held; it must then sleep until the hold ends (the server's time left),
    not for a lease of its own length."""
    holder = NamedLock("held-a-while", 30, min_hold=0.6)
    assert holder.acquire()
    holder.release()  # still held until 0.6 s after the grant
    waiter = NamedLock("held-a-while", 30)
    started = time.monotonic()
    assert waiter.acquire(wait=10)
    took = time.monotonic() - started
    assert 0.3 < took < 5, took  # far from the 10 s wait and the 30 s lease
    waiter.release()


def test_a_free_lease_is_retried_at_once(lockable_real_db: Any) -> None:
    ops = lease_ops_for(Watched, Watched._get_collection())
    doc = Watched().save()
    seen = ops.peek({"_id": doc.pk})
    assert seen is not None and time_left(seen, ops.fields) == 0.0
    assert doc.lock(0.2)
    seen = ops.peek({"_id": doc.pk})
    assert seen is not None and 0 < time_left(seen, ops.fields) <= 0.2
