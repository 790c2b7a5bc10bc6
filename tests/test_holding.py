"""Holding a lease: ownership and the local deadline (``owns_lock``,
``lease_remaining``, ``NamedLock.locked/owned/remaining``), and leases that
must work whatever the client's settings or the document's shape (a
timezone-aware client, a shard key that includes the primary key, a keepalive
on a duration of years). Both backends."""

from __future__ import annotations

import sys
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import mongoengine
import pytest

from mongoengine_lockable import (
    LockNotOwnedError,
    LockUnavailableError,
    NamedLock,
    exclusive,
    signals,
)
from mongoengine_lockable._keepalive import keeper

from models import HoldJob, ShardedByIdJob, ShardedOnIdJob

# -- ownership and time left ---------------------------------------------------------------


@pytest.mark.usefixtures("lockable_db")
def test_owns_lock_and_lease_remaining() -> None:
    job = HoldJob(payload="x").save()
    other = HoldJob.objects.get(pk=job.pk)
    assert job.owns_lock() is False and job.lease_remaining() == 0.0
    started = time.monotonic()
    assert job.lock(30, owner="me")
    assert job.owns_lock() is True and job.is_locked() is True
    assert other.owns_lock() is False and other.is_locked() is True
    assert other.owns_lock(owner="me") is True and other.owns_lock(owner="you") is False
    left = job.lease_remaining()
    assert 30 - (time.monotonic() - started) - 0.001 <= left <= 30
    job.renew(60)
    assert 59 < job.lease_remaining() <= 60
    job.release()
    assert job.owns_lock() is False and job.lease_remaining() == 0.0


@pytest.mark.usefixtures("lockable_db")
def test_remaining_is_zero_after_expiry_a_failed_renewal_or_a_takeover() -> None:
    job = HoldJob(payload="x").save()
    assert job.lock(0.2)
    time.sleep(0.3)
    assert job.lease_remaining() == 0.0
    with pytest.raises(LockNotOwnedError):
        job.renew()
    assert job.lease_remaining() == 0.0
    assert job.lock(30)
    assert HoldJob.objects.get(pk=job.pk).lock(30, force=True)
    assert job.owns_lock() is False
    with pytest.raises(LockNotOwnedError):
        job.update_if_held(set__payload="late")
    assert job.lease_remaining() == 0.0


@pytest.mark.usefixtures("lockable_db")
def test_a_second_release_says_the_lease_was_released_already() -> None:
    job = HoldJob(payload="x").save()
    with pytest.raises(LockNotOwnedError, match="has not acquired a lease"):
        job.release()
    assert job.lock(30)
    job.release()
    with pytest.raises(LockNotOwnedError, match="already released"):
        job.release()


@pytest.mark.usefixtures("lockable_db")
def test_named_lock_locked_owned_remaining() -> None:
    lock = NamedLock("holding", 30)
    rival = NamedLock("holding", 30)
    assert (lock.locked(), lock.owned(), lock.remaining()) == (False, False, 0.0)
    assert lock.acquire()
    assert lock.locked() and lock.owned() and 29 < lock.remaining() <= 30
    assert rival.locked() and not rival.owned() and rival.remaining() == 0.0
    lock.release()
    assert not lock.locked() and not lock.owned() and lock.remaining() == 0.0
    # With min_hold, the lock stays locked after release, but nobody owns it.
    kept = NamedLock("holding-kept", 30, min_hold=20)
    assert kept.acquire()
    kept.release()
    assert kept.locked() is True and kept.owned() is False and kept.remaining() == 0.0


# -- signals -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("lockable_db")
def test_waited_held_for_and_one_unavailable_per_refusal() -> None:
    events: list[tuple[str, dict[str, Any]]] = []

    def record(name: str) -> Any:
        def receiver(sender: Any, **kwargs: Any) -> None:
            events.append((name, kwargs))
        return receiver

    receivers = {name: record(name) for name in ("lock_acquired", "lock_released",
                                                 "lock_unavailable")}
    for name, receiver in receivers.items():
        getattr(signals, name).connect(receiver)
    try:
        job = HoldJob(payload="x").save()
        holder = HoldJob.objects.get(pk=job.pk)
        assert holder.lock(30, owner="holder")
        assert job.lock(30) is False                      # a refusal
        with pytest.raises(LockUnavailableError), job.locked(30):  # a refusal
            pass  # pragma: no cover
        assert job.lock(30, wait=0.2) is False            # a refusal after a wait
        threading.Timer(0.3, holder.release).start()
        assert job.lock(30, wait=10) is True              # a success after a wait
        time.sleep(0.05)
        job.release()
    finally:
        for name, receiver in receivers.items():
            getattr(signals, name).disconnect(receiver)
    unavailable = [kw for name, kw in events if name == "lock_unavailable"]
    assert len(unavailable) == 3
    assert all(kw["holder"] == "holder" for kw in unavailable)
    assert unavailable[2]["waited"] >= 0.2 > unavailable[0]["waited"]
    acquired = [kw for name, kw in events if name == "lock_acquired"]
    assert acquired[0]["waited"] < 0.2 and acquired[-1]["waited"] >= 0.25
    released = [kw for name, kw in events if name == "lock_released"]
    assert released[-1]["held_for"] >= 0.05


@pytest.mark.usefixtures("lockable_db")
def test_a_skipped_exclusive_call_sends_lock_unavailable() -> None:
    seen: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        seen.append(kwargs)

    @exclusive("report:{day}", 60)
    def report(day: str) -> str:
        return day

    holder = NamedLock("report:mon", 60)
    assert holder.acquire()
    with signals.lock_unavailable.connected_to(receiver):
        assert report("mon") is None
        assert report("tue") == "tue"
    assert [(kw["name"], kw["holder"]) for kw in seen] == [("report:mon", holder.owner)]


# -- settings and shapes that must not break leases -------------------------------------------


@pytest.fixture
def tz_aware(lockable_db: Any) -> Any:
    """The default alias reconnected to the same database with ``tz_aware=True``:
    dates come back timezone-aware."""
    settings: dict[str, Any] = {"db": lockable_db.db_name, "uuidRepresentation": "standard",
                                "tz_aware": True}
    if lockable_db.backend == "mongomock":
        import mongomock

        settings.update(host="mongodb://localhost", mongo_client_class=mongomock.MongoClient)
    else:
        settings["host"] = lockable_db.uri
    mongoengine.disconnect()
    mongoengine.connect(**settings)
    yield lockable_db
    mongoengine.disconnect()
    mongoengine.connect(**{**settings, "tz_aware": False})


@pytest.mark.timeout(60)
def test_contested_leases_on_a_timezone_aware_client(tz_aware: Any) -> None:
    job = HoldJob(payload="x").save()
    holder = HoldJob.objects.get(pk=job.pk)
    assert holder.lock(0.3)
    assert isinstance(holder.locked_until, datetime)
    assert job.lock(5, wait=5) is True        # waits out the holder's lease
    assert job.lease_remaining() > 0
    job.renew()
    assert HoldJob.objects.claim(5) is None
    job.release()
    lock = NamedLock("tz", 0.3)
    assert lock.acquire()
    with NamedLock("tz", 5, wait=5) as waiter:   # contested: waits for the expiry
        assert waiter.owned()
    assert NamedLock.is_free("tz")

    @exclusive("tz-job", 5)
    def run() -> str:
        return "ran"

    assert run() == "ran"
    assert NamedLock.is_free("tz-job")


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("lockable_db")
@pytest.mark.parametrize("model", [ShardedByIdJob, ShardedOnIdJob], ids=["tenant-id", "id"])
def test_waiting_on_a_document_whose_shard_key_includes_the_primary_key(model: Any) -> None:
    job = model(tenant="t1").save()
    holder = model.objects.get(pk=job.pk)
    assert holder.lock(30)
    threading.Timer(0.3, holder.release).start()
    assert job.lock(5, wait=10) is True
    job.release()


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("lockable_db")
def test_keepalive_on_a_lease_of_years_keeps_running() -> None:
    before = keeper().scheduled()
    job = HoldJob(payload="x").save()
    years = timedelta(days=365 * 30)
    assert job.lock(years, keepalive=True)
    assert keeper().scheduled() == before + 1
    # A short lease taken after it is still renewed on time: the keeper does
    # not sleep through the far renewal of the long one.
    short = HoldJob(payload="y").save()
    assert short.lock(0.3, keepalive=True)
    time.sleep(1.0)
    assert short.is_locked() and short.owns_lock()
    assert [t for t in threading.enumerate() if t.name == "lockable-keeper"]
    assert job.lease_remaining() > years.total_seconds() - 5
    job.release()
    short.release()
    assert keeper().scheduled() == before


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("lockable_db")
def test_a_handed_over_lease_is_confirmed_to_its_full_duration() -> None:
    """A release hands the lease to the waiter for a short pickup term; the
    new holder confirms it to the duration it asked for at once."""
    from mongoengine_lockable._rules import PICKUP_MS

    job = HoldJob(payload="x").save()
    holder = HoldJob.objects.get(pk=job.pk)
    assert holder.lock(30)
    threading.Timer(0.5, holder.release).start()
    assert job.lock(30, wait=10) is True
    deadline = time.monotonic() + 10
    while job.lease_remaining() < 25:  # confirmed by a renewal from a thread
        assert time.monotonic() < deadline, job.lease_remaining()
        time.sleep(0.01)
    stored = HoldJob._get_collection().find_one({"_id": job.pk})
    assert stored["lock_token"] == job.lock_token
    time.sleep(PICKUP_MS / 1000 + 0.3)  # past the pickup term: still ours
    assert job.owns_lock() is True
    job.update_if_held(set__payload="done")
    job.release()


def test_raw_reads_in_other_threads_survive_queue_writes_on_mongomock(
    lockable_mongomock_db: Any,
) -> None:
    """mongomock edits a stored document in place; the library's writes that
    add or remove a field (a waiter joining or leaving the queue) store a new
    object instead, so that a thread reading the document meanwhile (outside
    the lease's guard, as application code does) never sees it change size."""
    job = HoldJob(payload="x").save()
    collection = HoldJob._get_collection()
    stop = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not stop.is_set():
                assert collection.find_one({"_id": job.pk}) is not None
        except BaseException as exc:  # reported below
            errors.append(exc)

    def queue(index: int) -> None:
        mine = HoldJob.objects.get(pk=job.pk)
        try:
            for _ in range(15):
                assert mine.lock(5, wait=10)
                mine.release()
        except BaseException as exc:  # reported below
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        readers = [threading.Thread(target=read, daemon=True) for _ in range(2)]
        queuers = [threading.Thread(target=queue, args=(i,), daemon=True) for i in range(4)]
        for thread in readers + queuers:
            thread.start()
        for thread in queuers:
            thread.join(60)
        stop.set()
        for thread in readers:
            thread.join(10)
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[0]
    assert not any(thread.is_alive() for thread in readers + queuers)
