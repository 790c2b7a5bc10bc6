"""Fair waiting: callers that wait for a lease are served first come, first
served, by hand-offs in the releasing write.

On the real server, with separate processes (documents and named locks):

- waiters that queued in a known order get the lease in that order, and their
  fences increase in that order;
- a caller that does not wait gets ``False`` while waiters are queued, even
  right at a release (the release hands the lease over in the same write);
- a waiter that times out leaves the queue, and the next release goes straight
  to the next waiter;
- a waiter killed with ``SIGKILL`` while queued is skipped within about two
  seconds, even when a release hands it the lease first.

On mongomock, the same order with threads.

The processes are ``fair_waiter`` workers (``tests/workers.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from bson import ObjectId

from mongoengine_lockable import NamedLock
from mongoengine_lockable._named import DEFAULT_COLLECTION
from mongoengine_lockable._rules import PICKUP_MS, WAITER_TTL_MS

from _children import Child, Children
from models import FairJob

KINDS = ["document", "named"]
#: Every waiter of these tests asks for this lease.
LEASE = 30.0


# -- the parent's side ---------------------------------------------------------------------------


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Children]:
    with Children(tmp_path) as children:
        yield children


class Target:
    """What one test contends for, seen from the test's process."""

    def __init__(self, kind: str, db: Any) -> None:
        self.kind = kind
        self.db = db
        base = {"kind": kind, "uri": db.uri, "db": db.db_name, "lease": LEASE}
        if kind == "document":
            self.doc = FairJob().save()
            self.args = {**base, "pk": str(self.doc.pk)}
            self.holder: Any = FairJob.objects.get(pk=self.doc.pk)
        else:
            self.name = f"fair-{ObjectId()}"
            self.args = {**base, "name": self.name}
            self.holder = NamedLock(self.name, LEASE)

    def take(self) -> bool:
        if self.kind == "document":
            return bool(self.holder.lock(LEASE))
        return bool(self.holder.acquire())

    def try_once(self) -> bool:
        """A caller that does not wait."""
        if self.kind == "document":
            return bool(FairJob.objects.get(pk=self.doc.pk).lock(LEASE))
        return bool(NamedLock(self.name, LEASE).acquire())

    def record(self) -> dict[str, Any]:
        if self.kind == "document":
            found: dict[str, Any] = FairJob._get_collection().find_one({"_id": self.doc.pk})
        else:
            found = self.db.database[DEFAULT_COLLECTION].find_one({"_id": self.name})
        return found or {}

    def queued(self) -> list[str]:
        """The owners of the queue, first to last."""
        field = "lock_waiters" if self.kind == "document" else "waiters"
        return [w["o"] for w in self.record().get(field) or []]

    def holder_name(self) -> str | None:
        return self.record().get("locked_by" if self.kind == "document" else "owner")


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        time.sleep(0.02)


def queue_in_order(target: Target, spawn: Children, count: int, **args: Any) -> list[Child]:
    """Start ``count`` waiters one after the other, each queued before the next."""
    waiters = []
    for i in range(count):
        child = spawn("fair_waiter", **target.args, wait=args.get("wait", 60), **{
            k: v for k, v in args.items() if k != "wait"})
        child.expect("READY")
        child.send("GO")
        child.expect("WAITING")
        wait_until(lambda i=i: len(target.queued()) == i + 1, what=f"waiter {i} queued")
        waiters.append(child)
    return waiters


@pytest.mark.parametrize("kind", KINDS)
def test_waiters_get_the_lease_in_the_order_they_queued(lockable_real_db: Any,
                                                        spawn: Children, kind: str) -> None:
    target = Target(kind, lockable_real_db)
    assert target.take()
    waiters = queue_in_order(target, spawn, 5)
    target.holder.release()
    results = [w.expect("RESULT", timeout=60) for w in waiters]
    assert all(r["taken"] for r in results)
    # Served in queue order: grant times and fences both follow it.
    times = [r["at"] for r in results]
    fences = [r["fence"] for r in results]
    assert times == sorted(times), times
    assert fences == sorted(fences) and len(set(fences)) == 5, fences
    if kind == "document":
        assert fences == list(range(2, 7))  # one per grant, the holder's was 1
    for waiter in waiters:
        waiter.expect("RELEASED")
    assert target.queued() == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_caller_that_does_not_wait_never_jumps_the_queue(lockable_real_db: Any,
                                                           spawn: Children, kind: str) -> None:
    target = Target(kind, lockable_real_db)
    assert target.take()
    (waiter,) = queue_in_order(target, spawn, 1, hold=1.0)
    assert target.try_once() is False  # held, and someone is queued
    ours = target.holder_name()
    target.holder.release()
    # Right at the release: the waiter holds it already.
    assert target.try_once() is False
    assert target.holder_name() not in (None, ours) and target.queued() == []
    result = waiter.expect("RESULT", timeout=30)
    assert result["taken"] is True
    waiter.expect("RELEASED", timeout=30)
    assert target.try_once() is True  # nobody queued, free: granted


@pytest.mark.parametrize("kind", KINDS)
def test_a_waiter_that_times_out_leaves_the_queue(lockable_real_db: Any, spawn: Children,
                                                  kind: str) -> None:
    target = Target(kind, lockable_real_db)
    assert target.take()
    quitter, patient = (spawn("fair_waiter", **target.args, wait=wait) for wait in (1.5, 60))
    for child in (quitter, patient):
        child.expect("READY")
    for count, child in enumerate((quitter, patient), 1):
        child.send("GO")
        child.expect("WAITING")
        wait_until(lambda count=count: len(target.queued()) == count, what="queued")
    assert quitter.expect("RESULT", timeout=30)["taken"] is False
    wait_until(lambda: len(target.queued()) == 1, what="the quitter left the queue")
    released = time.time()
    target.holder.release()
    result = patient.expect("RESULT", timeout=30)
    assert result["taken"] is True
    assert result["at"] - released < 2.0  # handed over by the release itself


def queue_in_order_after(target: Target, spawn: Children, count: int, *, already: int,
                         **args: Any) -> list[Child]:
    """As :func:`queue_in_order`, behind ``already`` waiters."""
    waiters = []
    for i in range(count):
        child = spawn("fair_waiter", **target.args, wait=args.get("wait", 60))
        child.expect("READY")
        child.send("GO")
        child.expect("WAITING")
        wait_until(lambda i=i: len(target.queued()) == already + i + 1,
                   what=f"waiter {already + i} queued")
        waiters.append(child)
    return waiters


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("release", ["at-once", "after-a-while"])
def test_a_killed_waiter_is_skipped(lockable_real_db: Any, spawn: Children, kind: str,
                                    release: str) -> None:
    """The first waiter is SIGKILLed; the second gets the lease within about
    WAITER_TTL + PICKUP of the kill, whether the release comes at once (and
    hands the lease to the dead waiter, for the short pickup term only) or
    after the dead waiter's place ran out."""
    target = Target(kind, lockable_real_db)
    assert target.take()
    (doomed,) = queue_in_order(target, spawn, 1)
    (next_one,) = queue_in_order_after(target, spawn, 1, already=1)
    doomed.kill()
    killed = time.time()
    if release == "after-a-while":
        time.sleep((WAITER_TTL_MS + 300) / 1000)
    target.holder.release()
    result = next_one.expect("RESULT", timeout=30)
    assert result["taken"] is True
    bound = (WAITER_TTL_MS + PICKUP_MS) / 1000
    print(f"{kind}, release {release}: granted {result['at'] - killed:.2f} s after the kill")
    # Generous for a loaded machine; the lease itself is 30 s.
    assert result["at"] - killed < bound + 2.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
def test_threads_are_served_in_order_on_mongomock(lockable_mongomock_db: Any,
                                                  kind: str) -> None:
    target = Target(kind, lockable_mongomock_db)
    assert target.take()
    order: list[int] = []
    errors: list[BaseException] = []

    def wait(i: int) -> None:
        try:
            if kind == "document":
                mine = FairJob.objects.get(pk=target.doc.pk)
                assert mine.lock(LEASE, wait=60)
                order.append(i)
                time.sleep(0.02)
                mine.release()
            else:
                lock = NamedLock(target.name, LEASE)
                assert lock.acquire(wait=60)
                order.append(i)
                time.sleep(0.02)
                lock.release()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = []
    for i in range(5):
        thread = threading.Thread(target=wait, args=(i,))
        thread.start()
        wait_until(lambda i=i: len(target.queued()) == i + 1, what=f"thread {i} queued")
        threads.append(thread)
    target.holder.release()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert order == [0, 1, 2, 3, 4]



@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
def test_one_caller_waits_again_and_again_on_mongomock(lockable_mongomock_db: Any,
                                                       kind: str) -> None:
    """The waits of one instance share its waker (kept between waits), and
    each is woken by its own grant, not by the earlier ones."""
    target = Target(kind, lockable_mongomock_db)
    waiter: Any = (FairJob.objects.get(pk=target.doc.pk) if kind == "document"
                   else NamedLock(target.name, LEASE))
    for _ in range(3):
        assert target.take()
        releasing = threading.Timer(0.1, target.holder.release)
        releasing.start()
        if kind == "document":
            assert waiter.lock(LEASE, wait=10)
        else:
            assert waiter.acquire(wait=10)
        releasing.join()
        waiter.release()
