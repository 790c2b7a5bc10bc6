"""Which writes wake a waiter: only the one that grants it the lease.

Waiters queue in the leased record and a release hands the lease to the first
of them in the same write, so a waiter's change stream is filtered by the
server down to the write that puts its own ticket on the lease (or deletes the
record): a release wakes one waiter, not all of them.
"""

from __future__ import annotations

import time
from typing import Any

from mongoengine_lockable import NamedLock
from mongoengine_lockable._document import KIND, executor_of
from mongoengine_lockable._engine import Modify
from mongoengine_lockable._rules import Ask, NamedKind, combine

from models import Watched


def stream_for(collection: Any, key: Any, kind: Any, ticket: str) -> Any:
    """The stream a waiter with ``ticket`` blocks on (the engine's own filter)."""
    match = combine({"documentKey._id": key}, kind.granted_event(ticket))
    return collection.watch([{"$match": match}], max_await_time_ms=100)


def heard(stream: Any) -> list[str]:
    """Drain what the stream holds now (each read waits <= 100 ms)."""
    seen = []
    while (event := stream.try_next()) is not None:
        seen.append(event["operationType"])
    return seen


def queue(io: Any, kind: Any, match: dict[str, Any], ticket: str) -> None:
    """Put ``ticket`` in the record's queue, as a waiting attempt does."""
    command = kind.acquire(Ask(f"owner-{ticket}", ticket, 5000), "queue")
    io.do(Modify(combine(match, command.filter), command.update, upsert=command.upsert),
          None, [])


def test_document_waiter_hears_only_its_own_grant(lockable_real_db: Any) -> None:
    doc = Watched().save()
    other = Watched().save()
    io = executor_of(Watched)
    match = {"_id": doc.pk}
    mine = stream_for(Watched._get_collection(), doc.pk, KIND, "me")
    try:
        holder = Watched.objects.get(pk=doc.pk)
        assert holder.lock(5)
        holder.renew(10)
        holder.update_if_held(inc__n=1)
        assert Watched.objects.get(pk=doc.pk).lock(5) is False  # refused: writes nothing
        assert other.lock(5)  # another record
        other.release()
        queue(io, KIND, match, "first")  # another waiter queues first...
        queue(io, KIND, match, "me")  # ...then this one
        queue(io, KIND, match, "first")  # refreshes
        queue(io, KIND, match, "me")
        assert heard(mine) == []
        holder.release()  # hands the lease to "first": not this waiter's grant
        assert heard(mine) == []
        first = Watched.objects.get(pk=doc.pk)
        assert first.locked_by == "owner-first"
        first.release(owner="owner-first")  # hands it to "me"
        assert heard(mine) in (["update"], ["replace"])
        stored = Watched._get_collection().find_one(match)
        assert stored["lock_token"] == "me" and stored["locked_by"] == "owner-me"
        assert "lock_waiters" not in stored  # the queue is gone once empty
        doc.delete()
        assert heard(mine) == ["delete"]
    finally:
        mine.close()


def test_named_lock_waiter_hears_only_its_own_grant(lockable_real_db: Any) -> None:
    lock = NamedLock("watched", 5)
    assert lock.acquire()
    io = lock._blocking().io
    kind = NamedKind()
    mine = stream_for(io.collection, "watched", kind, "me")
    try:
        lock.renew()
        assert NamedLock("watched", 5).acquire() is False  # a held no-op
        queue(io, kind, {"_id": "watched"}, "first")
        queue(io, kind, {"_id": "watched"}, "me")
        lock.release()  # to "first"
        assert heard(mine) == []
        assert NamedLock.owner_of("watched") == "owner-first"
    finally:
        mine.close()


def test_waiter_wakes_when_a_min_hold_ends_not_after_its_own_duration(
    lockable_db: Any,
) -> None:
    """A release under ``min_hold`` keeps the lock until the hold ends; the
    waiter first in the queue must get it then (the server's time left), not
    after a lease of its own length or its whole wait."""
    holder = NamedLock("held-a-while", 30, min_hold=0.6)
    assert holder.acquire()
    holder.release()  # still held until 0.6 s after the grant
    waiter = NamedLock("held-a-while", 30)
    started = time.monotonic()
    assert waiter.acquire(wait=10)
    took = time.monotonic() - started
    assert 0.3 < took < 5, took  # far from the 10 s wait and the 30 s lease
    waiter.release()


def test_a_free_record_shows_no_time_left(lockable_db: Any) -> None:
    doc = Watched().save()
    handle_view = doc.is_locked()
    assert handle_view is False
    assert doc.lock(0.5)
    from mongoengine_lockable._document import document_lease

    view = document_lease(doc).look()
    assert view.held and 0 < view.time_left <= 0.5
    assert view.holder == doc.locked_by
