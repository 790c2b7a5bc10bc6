"""``NamedLock``: advisory locks by name, on mongomock and a real ``mongod``.

Every behaviour test takes ``lockable_db`` and so runs on both backends; the
few that need the real server by nature (its TTL index, a duplicate-key race
between concurrent upserts) take ``lockable_real_db``. The lock records are
looked at through the raw collection, behind the library's back.

No test asserts an upper bound on a duration; leases are short (0.2-1 s) and
the only waits are the few tenths of a second a lease needs to run out.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from pymongo.write_concern import WriteConcern

from mongoengine_lockable import (
    LockError,
    LockNotOwnedError,
    LockUnavailableError,
    NamedLock,
    signals,
)
from mongoengine_lockable._named import DEFAULT_COLLECTION

#: Generous limit for something that should happen within a few tenths of a second.
PATIENCE = 10.0


def records(db: Any, collection: str = DEFAULT_COLLECTION) -> Any:
    """The raw collection of lock records."""
    return db.database[collection]


def record(db: Any, name: str, collection: str = DEFAULT_COLLECTION) -> dict[str, Any] | None:
    found: dict[str, Any] | None = records(db, collection).find_one({"_id": name})
    return found


def utcnow() -> datetime:
    """The client's UTC time, naive as MongoDB dates read back (the server
    runs on this host, so its clock is this one)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


# -- acquire / release / renew ---------------------------------------------------


def test_acquire_release_renew(lockable_db: Any) -> None:
    lock = NamedLock("nightly-report", duration=5)
    assert lock.name == "nightly-report"
    assert lock.duration == 5
    assert NamedLock.is_free("nightly-report")
    assert lock.acquire() is True
    assert NamedLock.owner_of("nightly-report") == lock.owner
    assert not NamedLock.is_free("nightly-report")
    until = record(lockable_db, "nightly-report")["locked_until"]

    time.sleep(0.05)
    lock.renew()
    renewed = record(lockable_db, "nightly-report")["locked_until"]
    assert renewed > until
    # A shorter renewal is taken as given: now + 1 s, before the 5 s end.
    lock.renew(1)
    assert record(lockable_db, "nightly-report")["locked_until"] < renewed
    assert NamedLock.owner_of("nightly-report") == lock.owner

    lock.release()
    assert NamedLock.is_free("nightly-report")
    assert NamedLock.owner_of("nightly-report") is None
    # Free again: anyone, this instance included, can take it.
    assert lock.acquire() is True
    lock.release()


def test_with_block_acquires_and_releases(lockable_db: Any) -> None:
    lock = NamedLock("with-block", duration=5)
    with lock as entered:
        assert entered is lock
        assert NamedLock.owner_of("with-block") == lock.owner
    assert NamedLock.is_free("with-block")


def test_with_block_releases_when_the_body_raises(lockable_db: Any) -> None:
    lock = NamedLock("with-raise", duration=5)
    with pytest.raises(KeyError):
        with lock:
            raise KeyError("boom")
    assert NamedLock.is_free("with-raise")


def test_with_block_raises_when_held_elsewhere(lockable_db: Any) -> None:
    holder = NamedLock("with-held", duration=5)
    assert holder.acquire()
    other = NamedLock("with-held", duration=5)
    body_ran = False
    with pytest.raises(LockUnavailableError) as caught:
        with other:
            body_ran = True
    assert not body_ran
    assert isinstance(caught.value, LockError)
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.target == "with-held"
    assert caught.value.owner == holder.owner
    # The failed entry did not disturb the holder.
    assert NamedLock.owner_of("with-held") == holder.owner
    holder.release()


def test_not_reentrant_for_the_same_instance(lockable_db: Any) -> None:
    lock = NamedLock("no-reentry", duration=5)
    assert lock.acquire()
    fence = lock.fence
    assert lock.acquire() is False
    assert lock.fence == fence
    with pytest.raises(LockUnavailableError):
        with lock:
            pass
    # Still held, and still releasable, by the first acquisition.
    assert NamedLock.owner_of("no-reentry") == lock.owner
    lock.release()
    assert NamedLock.is_free("no-reentry")


def test_not_reentrant_for_another_instance_with_the_same_owner(lockable_db: Any) -> None:
    first = NamedLock("same-owner", duration=5, owner="worker-7")
    second = NamedLock("same-owner", duration=5, owner="worker-7")
    assert first.owner == second.owner == "worker-7"
    assert first.acquire()
    assert second.acquire() is False
    assert second.fence is None
    first.release()


def test_owner_of_and_is_free(lockable_db: Any) -> None:
    assert NamedLock.owner_of("never-used") is None
    assert NamedLock.is_free("never-used")
    lock = NamedLock("ownership", duration=5, owner="$looks-like-a-field-path")
    assert lock.acquire()
    # $literal keeps an owner starting with "$" from being read as a path.
    assert NamedLock.owner_of("ownership") == "$looks-like-a-field-path"
    assert record(lockable_db, "ownership")["owner"] == "$looks-like-a-field-path"
    assert NamedLock.is_free("ownership") is False
    lock.release()
    assert NamedLock.is_free("ownership") is True


def test_default_owner_names_host_and_pid(lockable_db: Any) -> None:
    a, b = NamedLock("owners"), NamedLock("owners")
    assert a.owner != b.owner
    assert a.owner.startswith(f"{socket.gethostname()}:{os.getpid()}:")


# -- fences -----------------------------------------------------------------------


def test_fence_is_none_before_the_first_acquisition(lockable_db: Any) -> None:
    lock = NamedLock("fence-none", duration=5)
    assert lock.fence is None
    holder = NamedLock("fence-none", duration=5)
    assert holder.acquire()
    assert lock.acquire() is False
    assert lock.fence is None
    assert isinstance(holder.fence, int)
    holder.release()


def test_fence_strictly_increases_across_instances(lockable_db: Any) -> None:
    fences = []
    for _ in range(6):
        lock = NamedLock("fenced", duration=5)
        assert lock.acquire()
        assert lock.fence == record(lockable_db, "fenced")["fence"]
        fences.append(lock.fence)
        lock.release()
        # Release keeps the fence: the next grant counts from it.
        assert record(lockable_db, "fenced")["fence"] == fences[-1]
    assert all(later > earlier for earlier, later in zip(fences, fences[1:])), fences


def test_fence_keeps_increasing_after_the_record_is_removed(lockable_db: Any) -> None:
    """The TTL index removes expired records; the fence must not start over."""
    first = NamedLock("ttl-removed", duration=5)
    assert first.acquire()
    first.release()
    # What the TTL monitor does to an expired record, an hour later.
    assert records(lockable_db).delete_one({"_id": "ttl-removed"}).deleted_count == 1
    # The removal comes long after the last grant; a new record's fence is
    # seeded from the clock, so let it move on past that grant's millisecond.
    time.sleep(0.005)
    second = NamedLock("ttl-removed", duration=5)
    assert second.acquire()
    assert second.fence > first.fence, (first.fence, second.fence)
    second.release()


def test_ttl_index_on_locked_until_after_first_acquire(lockable_real_db: Any) -> None:
    coll = records(lockable_real_db)
    lock = NamedLock("ttl-index", duration=5)
    assert DEFAULT_COLLECTION not in lockable_real_db.database.list_collection_names()
    assert lock.acquire()
    ttl = [
        spec
        for spec in coll.index_information().values()
        if spec["key"] == [("locked_until", 1)] and "expireAfterSeconds" in spec
    ]
    assert len(ttl) == 1, coll.index_information()
    assert ttl[0]["expireAfterSeconds"] > 0
    lock.release()


# -- the record ---------------------------------------------------------------------


def test_record_keeps_holder_and_time(lockable_db: Any) -> None:
    before = utcnow() - timedelta(seconds=1)
    lock = NamedLock("for-operators", duration=5)
    assert lock.acquire()
    after = utcnow() + timedelta(seconds=1)
    rec = record(lockable_db, "for-operators")
    assert rec["owner"] == lock.owner
    assert rec["host"] == socket.gethostname()
    assert rec["pid"] == os.getpid()
    assert isinstance(rec["acquired_at"], datetime)
    assert before <= rec["acquired_at"] <= after
    # One clock reading on the server; two on mongomock, which may cross a ms.
    lease = rec["locked_until"] - rec["acquired_at"]
    assert timedelta(seconds=5) <= lease <= timedelta(seconds=5, milliseconds=2)
    lock.release()


def test_released_record_is_expired_not_deleted(lockable_db: Any) -> None:
    lock = NamedLock("released", duration=30)
    assert lock.acquire()
    lock.release()
    now = utcnow()
    rec = record(lockable_db, "released")
    assert rec is not None
    # An expired date (for the TTL index), not None, and not in the future.
    assert isinstance(rec["locked_until"], datetime)
    assert rec["locked_until"] <= now
    assert rec["owner"] == lock.owner
    assert rec["fence"] == lock.fence


# -- min_hold ------------------------------------------------------------------------


def test_min_hold_keeps_a_released_lock_until_it_has_passed(lockable_db: Any) -> None:
    lock = NamedLock("min-hold", duration=5, min_hold=0.4)
    started = time.monotonic()
    assert lock.acquire()
    lock.release()  # at once: the hold has not passed
    rec = record(lockable_db, "min-hold")
    assert rec["locked_until"] == rec["acquired_at"] + timedelta(seconds=0.4)
    assert not NamedLock.is_free("min-hold")
    late_host = NamedLock("min-hold", duration=5)
    assert late_host.acquire() is False
    # A second release is refused: the lease is no longer this caller's to end.
    with pytest.raises(LockNotOwnedError):
        lock.release()

    while not NamedLock.is_free("min-hold"):
        assert time.monotonic() - started < PATIENCE, "min_hold outlived its 0.4 s"
        time.sleep(0.02)
    freed_after = time.monotonic() - started
    # Free once min_hold has passed since the grant (not the 5 s duration).
    assert freed_after >= 0.4 - 0.02, freed_after
    assert late_host.acquire() is True
    assert late_host.fence > lock.fence
    late_host.release()


def test_min_hold_already_passed_releases_at_once(lockable_db: Any) -> None:
    lock = NamedLock("hold-passed", duration=5, min_hold=0.1)
    assert lock.acquire()
    time.sleep(0.15)
    lock.release()
    assert NamedLock.is_free("hold-passed")


def test_min_hold_greater_than_duration_is_refused(lockable_db: Any) -> None:
    with pytest.raises(ValueError):
        NamedLock("too-long", duration=1, min_hold=2)
    with pytest.raises(ValueError):
        NamedLock("too-long", duration=timedelta(seconds=1), min_hold=timedelta(seconds=1.5))
    NamedLock("too-long", duration=1, min_hold=1)  # equal is fine
    assert DEFAULT_COLLECTION not in lockable_db.database.list_collection_names()


# -- collections ---------------------------------------------------------------------


def test_same_name_in_two_collections_is_two_locks(lockable_db: Any) -> None:
    a = NamedLock("shared-name", duration=5, collection="locks_a")
    b = NamedLock("shared-name", duration=5, collection="locks_b")
    assert a.acquire() is True
    assert b.acquire() is True
    assert NamedLock.owner_of("shared-name", collection="locks_a") == a.owner
    assert NamedLock.owner_of("shared-name", collection="locks_b") == b.owner
    assert NamedLock.is_free("shared-name")  # the default collection
    assert record(lockable_db, "shared-name", "locks_a")["owner"] == a.owner
    assert record(lockable_db, "shared-name", "locks_b")["owner"] == b.owner
    a.release()
    assert NamedLock.is_free("shared-name", collection="locks_a")
    assert NamedLock.owner_of("shared-name", collection="locks_b") == b.owner
    b.release()


# -- a race to create the record ----------------------------------------------------------


def test_racing_first_acquisitions_are_held_not_errors(lockable_real_db: Any) -> None:
    """Eight threads acquire the same brand-new name at once, twenty times: the
    losing upserts (duplicate key on ``_id``) must count as "held"."""
    threads_per_name, names = 8, 20
    for n in range(names):
        name = f"race-{n}"
        barrier = threading.Barrier(threads_per_name)
        results: list[Any] = [None] * threads_per_name

        def contend(
            i: int,
            name: str = name,
            barrier: threading.Barrier = barrier,
            results: list[Any] = results,
        ) -> None:
            lock = NamedLock(name, duration=30)
            barrier.wait(timeout=PATIENCE)
            try:
                results[i] = lock.acquire()
            except BaseException as exc:  # reported below
                results[i] = exc

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(threads_per_name)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        errors = [r for r in results if not isinstance(r, bool)]
        assert not errors, f"{name}: {errors}"
        assert results.count(True) == 1, f"{name}: {results}"


# -- argument checks -------------------------------------------------------------------


@pytest.mark.parametrize("name", [None, 5, b"bytes", ["list"]])
def test_name_must_be_a_str(lockable_db: Any, name: Any) -> None:
    with pytest.raises(TypeError):
        NamedLock(name)
    with pytest.raises(TypeError):
        NamedLock.owner_of(name)
    assert DEFAULT_COLLECTION not in lockable_db.database.list_collection_names()


@pytest.mark.parametrize("name", ["", "x" * 1001])
def test_name_must_be_1_to_1000_characters(lockable_db: Any, name: str) -> None:
    with pytest.raises(ValueError):
        NamedLock(name)
    with pytest.raises(ValueError):
        NamedLock.is_free(name)
    assert DEFAULT_COLLECTION not in lockable_db.database.list_collection_names()


def test_a_name_of_1000_characters_is_accepted(lockable_db: Any) -> None:
    name = "n" * 1000
    lock = NamedLock(name, duration=5)
    assert lock.acquire()
    assert NamedLock.owner_of(name) == lock.owner
    lock.release()
    assert NamedLock.is_free(name)


BAD_ARGUMENTS = [
    # (keyword arguments, expected error)
    ({"duration": None}, TypeError),
    ({"duration": "60"}, TypeError),
    ({"duration": True}, TypeError),
    ({"duration": 0}, ValueError),
    ({"duration": -1}, ValueError),
    ({"duration": math.nan}, ValueError),
    ({"duration": math.inf}, ValueError),
    ({"duration": 1e300}, ValueError),
    ({"duration": timedelta(0)}, ValueError),
    ({"duration": timedelta.max}, ValueError),
    ({"wait": "1"}, TypeError),
    ({"wait": True}, TypeError),
    ({"wait": -0.5}, ValueError),
    ({"wait": math.nan}, ValueError),
    ({"min_hold": None}, TypeError),
    ({"min_hold": "1"}, TypeError),
    ({"min_hold": -1}, ValueError),
    ({"min_hold": math.inf}, ValueError),
    ({"owner": 42}, TypeError),
    ({"owner": b"me"}, TypeError),
    ({"owner": ""}, ValueError),
    ({"alias": None}, TypeError),
    ({"alias": 1}, TypeError),
    ({"alias": ""}, ValueError),
    ({"collection": None}, TypeError),
    ({"collection": 7}, TypeError),
    ({"collection": ""}, ValueError),
    ({"collection": "a$b"}, ValueError),
    ({"collection": "system.locks"}, ValueError),
    ({"keepalive": 1}, TypeError),
    ({"keepalive": "yes"}, TypeError),
    ({"keepalive": None}, TypeError),
    ({"write_concern": "majority"}, TypeError),
    ({"write_concern": {"w": 1}}, TypeError),
    ({"duration": 1, "min_hold": 1.5}, ValueError),
]


def _refused(kwargs: dict[str, Any], error: type[Exception]) -> str | None:
    """Construct with ``kwargs``; what went wrong, if ``error`` was not raised."""
    try:
        NamedLock("bad-args", **kwargs)
    except error:
        return None
    except Exception as exc:
        return f"{kwargs}: {type(exc).__name__} instead of {error.__name__}"
    return f"{kwargs}: accepted, expected {error.__name__}"


def test_bad_arguments_are_refused_before_any_io(lockable_db: Any) -> None:
    # One test for the whole table: a fresh database per case costs seconds.
    problems = [p for p in (_refused(k, e) for k, e in BAD_ARGUMENTS) if p]
    assert not problems, problems
    assert DEFAULT_COLLECTION not in lockable_db.database.list_collection_names()

    # And with a record in place: it is left as it was.
    holder = NamedLock("bad-args", duration=5)
    assert holder.acquire()
    before = list(records(lockable_db).find())
    problems = [p for p in (_refused(k, e) for k, e in BAD_ARGUMENTS) if p]
    assert not problems, problems
    assert list(records(lockable_db).find()) == before
    holder.release()


def test_bad_wait_on_acquire_is_refused_before_any_io(lockable_db: Any) -> None:
    lock = NamedLock("bad-wait", duration=5)
    with pytest.raises(TypeError):
        lock.acquire(wait="soon")
    with pytest.raises(ValueError):
        lock.acquire(wait=-1)
    with pytest.raises(TypeError):
        lock.renew("1")
    assert DEFAULT_COLLECTION not in lockable_db.database.list_collection_names()
    assert lock.fence is None


def test_valid_construction_does_no_io(lockable_db: Any) -> None:
    NamedLock(
        "quiet",
        duration=timedelta(seconds=2),
        owner="me",
        wait=None,
        keepalive=True,
        min_hold=1,
        collection="quiet_locks",
        write_concern=WriteConcern(w=1),
    )
    names = lockable_db.database.list_collection_names()
    assert "quiet_locks" not in names
    assert DEFAULT_COLLECTION not in names


# -- signals ---------------------------------------------------------------------


def test_signals_name_the_lock_owner_and_fence(lockable_db: Any) -> None:
    seen: list[tuple[str, Any, dict[str, Any]]] = []

    def receiver(kind: str) -> Any:
        def receive(sender: Any, **kwargs: Any) -> None:
            seen.append((kind, sender, kwargs))

        return receive

    acquired, renewed, released = receiver("acquired"), receiver("renewed"), receiver("released")
    lock = NamedLock("signalled", duration=5)
    with signals.lock_acquired.connected_to(acquired), signals.lock_renewed.connected_to(
        renewed
    ), signals.lock_released.connected_to(released):
        assert lock.acquire()
        lock.renew()
        lock.release()
        # A refused acquisition sends nothing.
        holder = NamedLock("signalled", duration=5)
        assert holder.acquire()
        seen_before = len(seen)
        assert lock.acquire() is False
        assert len(seen) == seen_before
        holder.release()

    assert [kind for kind, _, _ in seen] == [
        "acquired", "renewed", "released", "acquired", "released"
    ]
    for _, sender, kwargs in seen[:3]:
        assert sender is lock
        assert (kwargs["name"], kwargs["owner"], kwargs["fence"]) == (
            "signalled", lock.owner, lock.fence
        )
    for _, sender, kwargs in seen[3:]:
        assert sender is holder
        assert (kwargs["name"], kwargs["owner"], kwargs["fence"]) == (
            "signalled", holder.owner, holder.fence
        )
    assert holder.fence > lock.fence


# -- expiry and not-owned errors ---------------------------------------------------


def test_an_expired_lock_is_acquired_by_another(lockable_db: Any) -> None:
    first = NamedLock("expiring", duration=0.2)
    assert first.acquire()
    time.sleep(0.35)
    assert NamedLock.is_free("expiring")
    second = NamedLock("expiring", duration=5)
    assert second.acquire() is True
    assert second.fence > first.fence
    assert NamedLock.owner_of("expiring") == second.owner
    # The first holder can no longer end or extend what is now another's.
    with pytest.raises(LockNotOwnedError):
        first.release()
    with pytest.raises(LockNotOwnedError):
        first.renew()
    assert NamedLock.owner_of("expiring") == second.owner
    second.release()


def test_renewing_an_expired_lock_raises(lockable_db: Any) -> None:
    lock = NamedLock("renew-expired", duration=0.2)
    assert lock.acquire()
    time.sleep(0.35)
    with pytest.raises(LockNotOwnedError) as caught:
        lock.renew()
    assert caught.value.target == "renew-expired"
    assert caught.value.owner == lock.owner
    # Not revived.
    assert NamedLock.is_free("renew-expired")


def test_releasing_twice_raises(lockable_db: Any) -> None:
    lock = NamedLock("twice", duration=5)
    with pytest.raises(LockNotOwnedError):
        lock.release()  # never acquired
    assert lock.acquire()
    lock.release()
    with pytest.raises(LockNotOwnedError):
        lock.release()
    with pytest.raises(LockNotOwnedError):
        lock.renew()
    assert NamedLock.is_free("twice")
