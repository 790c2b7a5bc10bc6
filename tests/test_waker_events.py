"""Which writes wake a waiter: only those that can free the lease.

Waking every waiter on every write (grants, renewals, the holder's own
updates) makes contended waits slower than polling, so the change stream is
narrowed to releases, deletes and replaces of the one record.
"""

from __future__ import annotations

from typing import Any

from mongoengine import Document, IntField

from mongoengine_lockable import LockableMixin, NamedLock
from mongoengine_lockable._lease import LeaseOps, lease_ops_for
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
