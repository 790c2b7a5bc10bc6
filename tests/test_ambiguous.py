"""Outcomes a failover makes ambiguous are resolved by reading back this
attempt's own identity, not guessed.

A proxy stands in for the executor's collection: it either applies the command
and then loses the reply (the write happened), or fails before sending it (it
did not). Either way the caller must end up with the truth, even when another
instance uses the same owner name. On the server, a write applied and then
failed with a retryable write concern error is retried by the driver and
answered from its stored image, without the projection: the executor reads the
record again.
"""

from __future__ import annotations

import time
from typing import Any

import mongoengine
import pytest
from pymongo import ReturnDocument
from pymongo.errors import AutoReconnect, OperationFailure

from mongoengine_lockable import LockNotOwnedError, NamedLock, NamedSemaphore
from mongoengine_lockable._document import executor_of
from mongoengine_lockable._engine import is_ambiguous
from mongoengine_lockable._rules import RESULT_PROJECTION

from models import Ticket


class LosesReplies:
    """Wraps a collection; the next ``failures`` find-and-modify (or update)
    calls raise AutoReconnect, after applying the command when ``applied``."""

    def __init__(self, inner: Any, *, applied: bool, failures: int = 1) -> None:
        self.inner = inner
        self.applied = applied
        self.failures = failures
        self.sent = 0

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.sent += 1
        if self.failures:
            self.failures -= 1
            if self.applied:
                getattr(self.inner, name)(*args, **kwargs)
            raise AutoReconnect("connection closed (simulated failover)")
        return getattr(self.inner, name)(*args, **kwargs)

    def find_one_and_update(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("find_one_and_update", *args, **kwargs)

    def update_many(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("update_many", *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def flaky(io: Any, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> LosesReplies:
    proxy = LosesReplies(io.collection, **kw)
    monkeypatch.setattr(io, "collection", proxy)
    return proxy


def stored(ticket: Ticket) -> dict[str, Any]:
    found: dict[str, Any] = Ticket._get_collection().find_one({"_id": ticket.pk})
    return found


@pytest.fixture
def ticket(lockable_real_db: Any) -> Ticket:
    return Ticket(n=1).save()


def test_classification() -> None:
    assert is_ambiguous(AutoReconnect("x"))
    assert not is_ambiguous(OperationFailure("bad query", code=2))
    labelled = OperationFailure(
        "stepped down", code=189, details={"errorLabels": ["RetryableWriteError"]}
    )
    assert is_ambiguous(labelled)


def test_grant_applied_but_reply_lost_counts_as_granted(
    ticket: Ticket, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky(executor_of(Ticket), monkeypatch, applied=True)
    assert ticket.lock(5) is True
    assert ticket.lock_fence == 1
    assert stored(ticket)["locked_by"] == ticket.locked_by
    ticket.release()  # the instance knows its lease: release works
    assert Ticket.objects.get(pk=ticket.pk).locked_until is None


def test_grant_not_applied_counts_as_not_granted(
    ticket: Ticket, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky(executor_of(Ticket), monkeypatch, applied=False)
    assert ticket.lock(5) is False  # wait=0: the one attempt did not happen
    assert ticket.is_locked() is False
    assert ticket.lock(5) is True  # and nothing stale is left behind
    assert ticket.lock_fence == 1


def test_ambiguous_grant_is_not_mistaken_for_the_same_owners_other_lease(
    ticket: Ticket, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = Ticket.objects.get(pk=ticket.pk)
    assert holder.lock(5, owner="shared-name") is True
    flaky(executor_of(Ticket), monkeypatch, applied=True)
    # Refused by the server (held), reply lost: the read-back must look for
    # this attempt, not for any lease of "shared-name".
    assert ticket.lock(5, owner="shared-name") is False
    assert ticket.lease_remaining() == 0.0
    assert stored(ticket)["lock_fence"] == 1
    holder.release()


def test_release_applied_but_reply_lost_is_a_release(
    ticket: Ticket, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ticket.lock(5)
    flaky(executor_of(Ticket), monkeypatch, applied=True)
    ticket.release()
    assert ticket.is_locked() is False


def test_release_not_applied_is_sent_again(ticket: Ticket, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ticket.lock(5)
    proxy = flaky(executor_of(Ticket), monkeypatch, applied=False)
    ticket.release()
    assert proxy.sent == 2
    assert ticket.is_locked() is False


def test_ambiguous_release_by_owner_name_of_an_ended_lease_still_raises(
    ticket: Ticket, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ticket.lock(5, owner="x")
    ticket.release()  # X's lease has ended
    other = Ticket.objects.get(pk=ticket.pk)
    for applied in (True, False):
        flaky(executor_of(Ticket), monkeypatch, applied=applied)
        with pytest.raises(LockNotOwnedError):
            other.release(owner="x")
    assert stored(ticket)["locked_until"] is None


def test_release_after_takeover_still_raises(
    ticket: Ticket, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ticket.lock(5)
    other = Ticket.objects.get(pk=ticket.pk)
    assert other.lock(5, force=True)
    flaky(executor_of(Ticket), monkeypatch, applied=False)
    with pytest.raises(LockNotOwnedError):
        ticket.release()
    assert other.is_locked()


def test_update_if_held_applied_but_reply_lost_is_applied_once(
    ticket: Ticket, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ticket.lock(5)
    flaky(executor_of(Ticket), monkeypatch, applied=True)
    ticket.update_if_held(inc__n=1)
    assert stored(ticket)["n"] == 2
    assert ticket.n == 2


def test_update_if_held_not_applied_is_sent_again(
    ticket: Ticket, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ticket.lock(5)
    proxy = flaky(executor_of(Ticket), monkeypatch, applied=False)
    ticket.update_if_held(inc__n=1)
    assert proxy.sent == 2
    assert stored(ticket)["n"] == 2


@pytest.mark.parametrize("narrowed", [False, True], ids=["plain", "unlocked"])
def test_claim_applied_but_reply_lost_returns_the_claimed_document(
    ticket: Ticket, monkeypatch: pytest.MonkeyPatch, narrowed: bool
) -> None:
    flaky(executor_of(Ticket), monkeypatch, applied=True)
    # .unlocked() no longer matches the document once granted: the read-back
    # must find it by the grant's ticket, not by the queryset's filter.
    queryset = Ticket.objects(n=1).unlocked() if narrowed else Ticket.objects(n=1)
    got = queryset.claim(5)
    assert got is not None and got.pk == ticket.pk
    assert got.owns_lock()
    got.release()


def test_claim_many_applied_but_reply_lost_returns_the_claimed_documents(
    lockable_real_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(3):
        Ticket(n=n).save()
    flaky(executor_of(Ticket), monkeypatch, applied=True)
    got = Ticket.objects.order_by("n").claim_many(3, 5)
    assert [t.n for t in got] == [0, 1, 2]
    assert all(t.owns_lock() for t in got)


def test_named_lock_grant_and_release_resolved(
    lockable_real_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = NamedLock("ambiguous", 5)
    proxy = flaky(lock._blocking().io, monkeypatch, applied=True)
    assert lock.acquire() is True
    assert NamedLock.owner_of("ambiguous") == lock.owner
    proxy.failures, proxy.applied = 1, True
    lock.release()
    assert NamedLock.is_free("ambiguous")
    # Not applied: the grant did not happen and is reported as such.
    proxy.failures, proxy.applied = 1, False
    assert lock.acquire() is False
    assert NamedLock.is_free("ambiguous")


def test_waiting_acquire_rides_out_a_lost_reply(
    lockable_real_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = NamedLock("ambiguous-wait", 0.3)
    assert holder.acquire()
    waiter = NamedLock("ambiguous-wait", 5)
    flaky(waiter._blocking().io, monkeypatch, applied=True, failures=2)
    started = time.monotonic()
    assert waiter.acquire(wait=10) is True
    assert time.monotonic() - started < 8
    assert NamedLock.owner_of("ambiguous-wait") == waiter.owner
    waiter.release()


def test_unrelated_errors_propagate(ticket: Ticket, monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def find_one_and_update(self, *a: Any, **k: Any) -> Any:
            raise OperationFailure("not ambiguous", code=2)

    monkeypatch.setattr(executor_of(Ticket), "collection", Broken())
    with pytest.raises(OperationFailure):
        ticket.lock(5)


# -- a retried write answered from its stored image -----------------------------------


@pytest.fixture
def fail_next_write_concern(lockable_real_db: Any) -> Any:
    """Arm the server so that the next ``findAndModify`` is applied and then
    fails with a retryable write concern error: the driver retries it, and the
    server answers the retry from the first attempt's stored image."""
    admin = mongoengine.get_connection().admin

    def arm(times: int = 1) -> None:
        admin.command({
            "configureFailPoint": "failCommand", "mode": {"times": times},
            "data": {"failCommands": ["findAndModify"],
                     "writeConcernError": {"code": 6, "errmsg": "host unreachable",
                                           "errorLabels": ["RetryableWriteError"]}},
        })

    try:
        yield arm
    finally:
        admin.command({"configureFailPoint": "failCommand", "mode": "off"})


def test_a_retried_write_answered_from_its_image_has_no_projection(
    lockable_real_db: Any, fail_next_write_concern: Any
) -> None:
    """The fact the executor works around: the retry's answer is the record
    as written, without the computed projection (so without the server's time)."""
    coll = lockable_real_db.database["image_answers"]
    coll.insert_one({"_id": 1, "n": 0})
    fail_next_write_concern()
    raw = coll.find_one_and_update({"_id": 1}, [{"$set": {"n": {"$add": ["$n", 1]}}}],
                                   projection=RESULT_PROJECTION,
                                   return_document=ReturnDocument.AFTER)
    assert raw == {"_id": 1, "n": 1}  # applied once, answered without the projection


def test_grants_and_releases_answered_from_their_image_are_read_again(
    ticket: Ticket, fail_next_write_concern: Any
) -> None:
    fail_next_write_concern()
    assert ticket.lock(5) is True and ticket.lock_fence == 1
    fail_next_write_concern()
    ticket.release()
    assert Ticket.objects.get(pk=ticket.pk).locked_until is None
    lock = NamedLock("image-lock", 5)
    fail_next_write_concern()
    assert lock.acquire() is True and lock.owned()
    fail_next_write_concern()
    lock.release()
    assert NamedLock.is_free("image-lock")
    sem = NamedSemaphore("image-semaphore", 2, 5)
    fail_next_write_concern()
    assert sem.acquire() is True and sem.owned() and sem.fence is not None
    fail_next_write_concern()
    sem.renew()
    fail_next_write_concern()
    sem.release()
    assert NamedSemaphore.holders("image-semaphore") == []
