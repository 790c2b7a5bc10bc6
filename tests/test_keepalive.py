"""Keepalive: a background thread renews a short lease for as long as it is held.

On the real server, with 1 s leases (renewed every third of a second):

- a lease outlives a 4 s job, for a document and a named lock, while another
  process keeps trying to take it and never succeeds;
- when the lease is taken away (``force=True`` for a document; an overwritten
  record for a named lock), ``lock_lost`` fires within about one renewal
  interval, and the holder's release (or the ``with`` block's exit) raises
  ``LockNotOwnedError``;
- no renewal outlives its lease: after ``release()``, or after the holder was
  forgotten and garbage-collected; the process's keeper renews every lease
  with the same few threads (none is started per lease).

The other process is a ``keepalive_probe`` worker (``tests/workers.py``).
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import mongoengine
import pytest
from bson import ObjectId

from mongoengine_lockable import LockNotOwnedError, NamedLock, signals
from mongoengine_lockable._keepalive import RENEWAL_THREADS, keeper
from mongoengine_lockable._named import DEFAULT_COLLECTION

from _children import Child, Children
from models import FROZEN_ALIAS, FrozenJob, KeepJob

#: The lease every test here keeps alive, in seconds.
LEASE = 1.0
#: A loss must be noticed within about one renewal interval (LEASE / 3).
NOTICED_WITHIN = 1.5

KINDS = ["document", "named"]


def keeper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lockable-keep")]


def scheduled() -> int:
    return keeper().scheduled()


class Holder:
    """A document lease or a named lock, held with keepalive, and a way to take
    it away from behind the holder's back."""

    def __init__(self, kind: str, db: Any) -> None:
        self.kind = kind
        self.db = db
        if kind == "document":
            self.doc = KeepJob(payload="p").save()
            self.holder: Any = KeepJob.objects.get(pk=self.doc.pk)
        else:
            self.name = f"keep-{ObjectId()}"
            self.holder = NamedLock(self.name, duration=LEASE, keepalive=True)

    def take(self) -> None:
        if self.kind == "document":
            assert self.holder.lock(LEASE, keepalive=True)
            self.owner = self.holder.locked_by
        else:
            assert self.holder.acquire()
            self.owner = self.holder.owner
        self.fence = self.holder.lock_fence if self.kind == "document" else self.holder.fence

    def locked(self) -> Any:
        """The ``with`` form, with keepalive."""
        if self.kind == "document":
            return self.holder.locked(LEASE, keepalive=True)
        return self.holder

    def steal(self) -> None:
        """Another caller takes the lease: ``force=True`` for a document; for a
        named lock, the record's owner is overwritten through the raw collection."""
        if self.kind == "document":
            assert KeepJob.objects.get(pk=self.doc.pk).lock(30, force=True)
        else:
            coll = self.db.database[DEFAULT_COLLECTION]
            done = coll.update_one(
                {"_id": self.name}, {"$set": {"owner": "intruder", "token": "intruder"}}
            )
            assert done.matched_count == 1

    def holds(self) -> bool:
        """Read the database: does the holder still hold an unexpired lease?"""
        if self.kind == "document":
            raw = KeepJob._get_collection().find_one({"_id": self.doc.pk})
            return bool(self.holder.is_locked()) and raw["locked_by"] == self.owner
        return NamedLock.owner_of(self.name) == self.owner

    def probe_args(self) -> dict[str, Any]:
        args = {"kind": self.kind, "uri": self.db.uri, "db": self.db.db_name}
        if self.kind == "document":
            return {**args, "pk": str(self.doc.pk)}
        return {**args, "name": self.name}


@pytest.fixture
def lost() -> Iterator[list[tuple[float, Any, dict[str, Any]]]]:
    """``lock_lost`` as received: ``(monotonic time, sender, kwargs)``."""
    received: list[tuple[float, Any, dict[str, Any]]] = []

    def receive(sender: Any, **kwargs: Any) -> None:
        received.append((time.monotonic(), sender, kwargs))

    with signals.lock_lost.connected_to(receive):
        yield received


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Children]:
    """Worker processes (see ``_children``)."""
    with Children(tmp_path) as children:
        yield children


# -- survival ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_keepalive_outlives_a_job_four_times_the_lease(
    lockable_real_db: Any, spawn: Callable[..., Child], kind: str, lost: list[Any]
) -> None:
    held = Holder(kind, lockable_real_db)
    prober = spawn("keepalive_probe", **held.probe_args())
    prober.expect("READY")
    renewals: list[float] = []

    def renewed(sender: Any, **kwargs: Any) -> None:
        renewals.append(time.monotonic())

    with signals.lock_renewed.connected_to(renewed):
        held.take()
        started = time.monotonic()
        prober.send("GO")
        while time.monotonic() - started < 4 * LEASE:  # the job
            time.sleep(0.05)
        prober.send("STOP")
        probed = prober.expect("RESULT", timeout=30)
        assert held.holds()
        held.holder.release()  # still ours: no LockNotOwnedError
    assert not lost
    # The other process kept trying across several lease lengths, in vain.
    assert probed["taken"] == 0, probed
    assert probed["tries"] >= 10, probed
    assert probed["span"] >= 2 * LEASE, probed
    # Four lease lengths need at least three renewals.
    assert len(renewals) >= 3, renewals


# -- loss -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_loss_fires_lock_lost_and_release_raises(
    lockable_real_db: Any, kind: str, lost: list[Any]
) -> None:
    held = Holder(kind, lockable_real_db)
    before = scheduled()
    held.take()
    time.sleep(0.1)
    held.steal()
    stolen = time.monotonic()
    wait_for(lambda: lost)
    (at, sender, kwargs) = lost[0]
    print(f"{kind}: lock_lost {(at - stolen) * 1000:.0f} ms after the lease was taken")
    assert at - stolen < NOTICED_WITHIN
    assert kwargs["owner"] == held.owner
    assert kwargs["fence"] == held.fence
    if kind == "document":
        assert sender is KeepJob
        assert kwargs["document"] is held.holder
    else:
        assert sender is held.holder
        assert kwargs["name"] == held.name
    # Renewals stopped once the lease was gone.
    wait_for(lambda: scheduled() == before)
    with pytest.raises(LockNotOwnedError):
        held.holder.release()
    assert len(lost) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_with_block_exit_raises_after_a_loss(
    lockable_real_db: Any, kind: str, lost: list[Any]
) -> None:
    held = Holder(kind, lockable_real_db)
    with pytest.raises(LockNotOwnedError):
        with held.locked():
            held.owner = NamedLock.owner_of(held.name) if kind == "named" else held.holder.locked_by
            held.steal()
            wait_for(lambda: lost)
    assert lost[0][2]["owner"] == held.owner


def test_with_block_exit_chains_the_loss_to_the_blocks_error(
    lockable_real_db: Any, lost: list[Any]
) -> None:
    held = Holder("document", lockable_real_db)
    with pytest.raises(LockNotOwnedError) as caught:
        with held.locked():
            held.steal()
            wait_for(lambda: lost)
            raise ValueError("the job failed too")
    assert isinstance(caught.value.__context__, ValueError)


# -- renewals and threads -------------------------------------------------------------------


def expiry(held: Holder) -> Any:
    """The lease's expiry as stored (``None`` once released)."""
    if held.kind == "document":
        return KeepJob._get_collection().find_one({"_id": held.doc.pk})["locked_until"]
    record = held.db.database[DEFAULT_COLLECTION].find_one({"_id": held.name})
    return None if record is None else record.get("expires")


@pytest.mark.parametrize("kind", KINDS)
def test_release_ends_the_renewals(lockable_real_db: Any, kind: str) -> None:
    before = scheduled()
    held = Holder(kind, lockable_real_db)
    for _ in range(3):
        held.take()
        assert scheduled() == before + 1
        held.holder.release()  # waits for a renewal in flight
        assert scheduled() == before
    # Nothing renews the released lease: its record stays released through
    # several renewal intervals.
    after = expiry(held)
    time.sleep(LEASE)
    assert expiry(held) == after


def test_no_renewal_without_keepalive(lockable_real_db: Any) -> None:
    before = scheduled()
    doc = KeepJob(payload="p").save()
    assert doc.lock(LEASE)
    lock = NamedLock(f"plain-{ObjectId()}", duration=LEASE)
    assert lock.acquire()
    assert scheduled() == before
    doc.release()
    lock.release()


def test_many_leases_share_the_keepers_threads(lockable_real_db: Any) -> None:
    holders = [Holder(kind, lockable_real_db) for kind in KINDS * 5]
    for held in holders:
        held.take()
    threads = keeper_threads()
    # One scheduler and at most the renewal pool, however many leases.
    assert 1 <= len(threads) <= 1 + RENEWAL_THREADS
    assert all(t.daemon for t in threads)
    time.sleep(LEASE * 1.5)  # renewed a few times, by the same threads
    assert all(held.holds() for held in holders)
    assert len(keeper_threads()) <= 1 + RENEWAL_THREADS
    for held in holders:
        held.holder.release()


@pytest.mark.parametrize("kind", KINDS)
def test_a_forgotten_holder_is_no_longer_renewed(lockable_real_db: Any, kind: str) -> None:
    before = scheduled()
    held = Holder(kind, lockable_real_db)
    held.take()
    assert scheduled() == before + 1
    ref = weakref.ref(held.holder)
    del held.holder
    # A renewal in flight holds the holder for a moment: collect until it is gone.
    wait_for(lambda: gc.collect() is not None and ref() is None, timeout=5)
    assert scheduled() == before
    # Its lease runs out on the server: nothing renews it any more.
    last = expiry(held)
    time.sleep(LEASE * 1.2)
    assert expiry(held) == last


# -- the local deadline on a frozen server ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
def test_lock_lost_fires_at_the_local_deadline_while_the_server_is_frozen(kind: str) -> None:
    """A 1 s lease with keepalive; the server is frozen (SIGSTOP) for 4 s. The
    renewals cannot get through, so the lease must count as lost when its
    local deadline passes (about 1 s after it was granted), not once the
    server answers again."""
    from mongoengine_lockable.testing.plugin import start_replica_set_or_skip

    replica_set = start_replica_set_or_skip(1)
    alias = FROZEN_ALIAS
    received: list[float] = []

    def receive(sender: Any, **kwargs: Any) -> None:
        received.append(time.monotonic())

    try:
        mongoengine.connect(db="frozen", host=replica_set.uri, alias=alias,
                            uuidRepresentation="standard", connectTimeoutMS=500)
        with signals.lock_lost.connected_to(receive):
            if kind == "document":
                holder: Any = FrozenJob().save()
                before = time.monotonic()
                assert holder.lock(LEASE, keepalive=True)
            else:
                holder = NamedLock("frozen", LEASE, keepalive=True, alias=alias)
                before = time.monotonic()
                assert holder.acquire()
            replica_set.pause(0)
            frozen = time.monotonic()
            try:
                wait_for(lambda: received, timeout=3.5)
                still_frozen = time.monotonic()
            finally:
                replica_set.resume(0)
        lost = received[0]
        print(f"{kind}: lock_lost {lost - before:.3f} s after the grant was asked for "
              f"(frozen at {frozen - before:.3f} s)")
        assert lost >= before + LEASE * 0.95  # not before the lease could have ended
        assert frozen < lost <= still_frozen  # heard while the server was still frozen
        assert lost - before < LEASE + 1.5
        with pytest.raises(LockNotOwnedError):
            holder.release()
    finally:
        mongoengine.disconnect(alias)
        replica_set.stop()
