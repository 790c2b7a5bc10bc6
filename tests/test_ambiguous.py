"""Outcomes a failover makes ambiguous are resolved by reading back, not guessed.

A proxy stands in for the lease collection: it either applies the command and
then loses the reply (the write happened), or fails before sending it (it did
not). Either way the caller must end up with the truth.
"""

from __future__ import annotations

from typing import Any

import pytest
from mongoengine import Document, IntField
from pymongo.errors import AutoReconnect, OperationFailure

from mongoengine_lockable import LockableMixin, LockNotOwnedError, NamedLock
from mongoengine_lockable._lease import LeaseOps, is_ambiguous, lease_ops_for
from mongoengine_lockable._named import _ops_on


class Ticket(LockableMixin, Document):
    n = IntField()
    meta = {"collection": "ambiguous_tickets"}


class LosesReplies:
    """Wraps a collection; the next ``failures`` find-and-modify calls raise
    AutoReconnect, after applying the command when ``applied``."""

    def __init__(self, inner: Any, *, applied: bool, failures: int = 1) -> None:
        self.inner = inner
        self.applied = applied
        self.failures = failures
        self.sent = 0

    def find_one_and_update(self, *args: Any, **kwargs: Any) -> Any:
        self.sent += 1
        if self.failures:
            self.failures -= 1
            if self.applied:
                self.inner.find_one_and_update(*args, **kwargs)
            raise AutoReconnect("connection closed (simulated failover)")
        return self.inner.find_one_and_update(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def flaky(ops: LeaseOps, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> LosesReplies:
    proxy = LosesReplies(ops.collection, **kw)
    monkeypatch.setattr(ops, "collection", proxy)
    return proxy


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
    flaky(lease_ops_for(Ticket, Ticket._get_collection()), monkeypatch, applied=True)
    assert ticket.lock(5) is True
    assert ticket.lock_fence == 1
    stored = Ticket._get_collection().find_one({"_id": ticket.pk})
    assert stored["locked_by"] == ticket.locked_by
    ticket.release()  # the instance knows its lease: release works
    assert Ticket.objects.get(pk=ticket.pk).locked_until is None


def test_grant_not_applied_counts_as_not_granted(
    ticket: Ticket, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky(lease_ops_for(Ticket, Ticket._get_collection()), monkeypatch, applied=False)
    assert ticket.lock(5) is False  # wait=0: the one attempt did not happen
    assert ticket.is_locked() is False
    assert ticket.lock(5) is True  # and nothing stale is left behind
    assert ticket.lock_fence == 1


def test_release_applied_but_reply_lost_is_a_release(
    ticket: Ticket, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ticket.lock(5)
    flaky(lease_ops_for(Ticket, Ticket._get_collection()), monkeypatch, applied=True)
    ticket.release()
    assert ticket.is_locked() is False


def test_release_not_applied_is_sent_again(ticket: Ticket, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ticket.lock(5)
    proxy = flaky(lease_ops_for(Ticket, Ticket._get_collection()), monkeypatch, applied=False)
    ticket.release()
    assert proxy.sent == 2
    assert ticket.is_locked() is False


def test_release_after_takeover_still_raises(
    ticket: Ticket, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ticket.lock(5)
    other = Ticket.objects.get(pk=ticket.pk)
    assert other.lock(5, force=True)
    flaky(lease_ops_for(Ticket, Ticket._get_collection()), monkeypatch, applied=False)
    with pytest.raises(LockNotOwnedError):
        ticket.release()
    assert other.is_locked()


def test_claim_applied_but_reply_lost_returns_the_claimed_document(
    ticket: Ticket, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky(lease_ops_for(Ticket, Ticket._get_collection()), monkeypatch, applied=True)
    got = Ticket.objects(n=1).claim(5)
    assert got is not None and got.pk == ticket.pk
    assert got.is_locked()
    got.release()


def test_named_lock_grant_and_release_resolved(
    lockable_real_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = NamedLock("ambiguous", 5)
    ops = _ops_on("default", lock.collection, None)
    monkeypatch.setattr("mongoengine_lockable._named._ops_on", lambda *a: ops)
    proxy = flaky(ops, monkeypatch, applied=True)
    assert lock.acquire() is True
    assert NamedLock.owner_of("ambiguous") == lock.owner
    proxy.failures, proxy.applied = 1, True
    lock.release()
    assert NamedLock.is_free("ambiguous")
    # Not applied: the grant did not happen and is reported as such.
    proxy.failures, proxy.applied = 1, False
    assert lock.acquire() is False
    assert NamedLock.is_free("ambiguous")


def test_unrelated_errors_propagate(ticket: Ticket, monkeypatch: pytest.MonkeyPatch) -> None:
    ops = lease_ops_for(Ticket, Ticket._get_collection())

    class Broken:
        def find_one_and_update(self, *a: Any, **k: Any) -> Any:
            raise OperationFailure("not ambiguous", code=2)

    monkeypatch.setattr(ops, "collection", Broken())
    with pytest.raises(OperationFailure):
        ticket.lock(5)
