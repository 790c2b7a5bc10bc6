"""Waiting for a lease.

- Unit tests of ``backoff`` with injected randomness (the policy's waiting is
  unit-tested in ``test_engine.py`` with a scripted executor).
- On the real server, separate processes: a waiter blocked in
  ``doc.lock(5, wait=10)`` / ``NamedLock.acquire(wait=10)`` gets the lease
  promptly once the holder (another process) releases it, long before the
  holder's 5 s lease would have run out; and after a holder is killed with
  ``SIGKILL`` the waiter gets it when the lease merely expires, with no write
  to wake it.
- ``wait=None``, and waiting from threads (polling on mongomock).

The processes are ``lease_holder`` and ``lease_waiter`` workers
(``tests/workers.py``). Time bounds are generous: they separate "woken by the
release" (milliseconds) from "slept until the lease ran out" (seconds),
nothing finer.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
from bson import ObjectId

from mongoengine_lockable import NamedLock
from mongoengine_lockable._io import client_now
from mongoengine_lockable._waiting import BASE_DELAY, MAX_DELAY, backoff

from _children import Child, Children
from models import WaitJob

# -- backoff ------------------------------------------------------------------------


def test_backoff_starts_at_the_base_and_doubles() -> None:
    for attempt in range(6):
        ceiling = BASE_DELAY * 2**attempt
        assert ceiling < MAX_DELAY
        assert backoff(attempt, rand=lambda: 1.0) == pytest.approx(ceiling)
        assert backoff(attempt, rand=lambda: 0.0) == pytest.approx(ceiling / 2)


def test_backoff_is_capped() -> None:
    for attempt in (6, 7, 20, 32, 33, 1000, 10**9):
        assert backoff(attempt, rand=lambda: 1.0) == pytest.approx(MAX_DELAY)
        assert backoff(attempt, rand=lambda: 0.0) == pytest.approx(MAX_DELAY / 2)
    assert backoff(2, base=1.0, cap=3.0, rand=lambda: 1.0) == 3.0
    assert backoff(1, base=1.0, cap=3.0, rand=lambda: 0.5) == pytest.approx(1.5)


def test_backoff_never_decreases_with_the_attempt() -> None:
    delays = [backoff(a, rand=lambda: 1.0) for a in range(50)]
    assert delays == sorted(delays)


def test_backoff_jitter_stays_in_the_upper_half() -> None:
    rng = random.Random(20240601)
    for attempt in (0, 3, 10):
        ceiling = min(MAX_DELAY, BASE_DELAY * 2**attempt)
        draws = [backoff(attempt, rand=rng.random) for _ in range(500)]
        assert all(ceiling / 2 <= d <= ceiling for d in draws)
        # Jittered: spread over the range, so waiters do not retry in step.
        assert max(draws) - min(draws) > ceiling / 3


# -- processes -----------------------------------------------------------------------------------


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Children]:
    """Worker processes (see ``_children``)."""
    with Children(tmp_path) as children:
        yield children


def _target(kind: str, db: Any) -> dict[str, Any]:
    """What the children of one test contend for."""
    base = {"kind": kind, "uri": db.uri, "db": db.db_name}
    if kind == "document":
        return {**base, "pk": str(WaitJob().save().pk)}
    return {**base, "name": f"wait-{ObjectId()}"}


KINDS = ["document", "named"]


@pytest.mark.parametrize("kind", KINDS)
def test_waiter_process_gets_the_lease_promptly_after_a_release(
    lockable_real_db: Any, spawn: Callable[..., Child], kind: str
) -> None:
    target = _target(kind, lockable_real_db)
    holder = spawn("lease_holder", duration=5, **target)
    waiter = spawn("lease_waiter", duration=5, wait=10, **target)
    assert holder.expect("HOLDING")["taken"] is True
    waiter.expect("READY")
    waiter.send("GO")
    waiter.expect("WAITING")
    time.sleep(0.3)  # the waiter is blocked in its wait by now
    holder.send("RELEASE")
    issued = holder.expect("RELEASED")["issued"]
    result = waiter.expect("RESULT", timeout=30)
    assert result["taken"] is True
    handoff = result["ended"] - issued
    print(f"{kind}: hand-off {handoff * 1000:.1f} ms after the release was issued")
    assert handoff > 0
    # Woken by the release, not by the holder's 5 s lease running out.
    assert handoff < 2.0, handoff
    assert result["ended"] - result["started"] < 5.0


@pytest.mark.parametrize("kind", KINDS)
def test_waiter_process_gets_the_lease_when_a_killed_holders_lease_expires(
    lockable_real_db: Any, spawn: Callable[..., Child], kind: str
) -> None:
    target = _target(kind, lockable_real_db)
    holder = spawn("lease_holder", duration=1, **target)
    waiter = spawn("lease_waiter", duration=5, wait=10, **target)
    held = holder.expect("HOLDING")
    assert held["taken"] is True
    waiter.expect("READY")
    waiter.send("GO")
    waiter.expect("WAITING")
    holder.kill()  # SIGKILL: nothing is written, no change to hear
    result = waiter.expect("RESULT", timeout=30)
    assert result["taken"] is True
    # Not before the holder's 1 s lease ran out (it began after "before")...
    assert result["ended"] > held["before"] + 1.0
    # ...and not much after: the waiter knew the time left and woke for it.
    print(f"{kind}: granted {result['ended'] - held['before'] - 1.0:.3f} s after the expiry")
    assert result["ended"] < held["before"] + 1.0 + 3.0


# -- waiting in one process ------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_wait_none_waits_for_the_release(lockable_db: Any, kind: str) -> None:
    if kind == "document":
        doc = WaitJob().save()
        holder = WaitJob.objects.get(pk=doc.pk)
        assert holder.lock(5)
        release, take = holder.release, lambda: doc.lock(5, wait=None)
    else:
        lock = NamedLock("wait-none", duration=5)
        assert lock.acquire()
        waiter = NamedLock("wait-none", duration=5)
        release, take = lock.release, lambda: waiter.acquire(wait=None)
    timer = threading.Timer(0.3, release)
    started = time.monotonic()
    timer.start()
    try:
        assert take() is True
    finally:
        timer.join()
    assert time.monotonic() - started >= 0.25


def test_wait_gives_up_at_its_deadline(lockable_db: Any) -> None:
    doc = WaitJob().save()
    assert WaitJob.objects.get(pk=doc.pk).lock(5)
    started = time.monotonic()
    assert doc.lock(5, wait=0.3) is False
    assert time.monotonic() - started >= 0.3
    lock = NamedLock("deadline", duration=5)
    assert lock.acquire()
    started = time.monotonic()
    assert NamedLock("deadline").acquire(wait=0.3) is False
    assert time.monotonic() - started >= 0.3


@pytest.mark.timeout(120)
def test_waiting_threads_each_get_the_lease_in_turn(lockable_db: Any) -> None:
    """Threads wait for one document (polling on mongomock, change streams on
    the server) and do a read-modify-write under the lease: none is lost."""
    threads_count, rounds = 6, 5
    doc = WaitJob(value=0).save()
    coll = WaitJob._get_collection()
    fences: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads_count)

    def work() -> None:
        try:
            mine = WaitJob.objects.get(pk=doc.pk)
            barrier.wait(timeout=30)
            for _ in range(rounds):
                assert mine.lock(5, wait=30) is True
                fences.append(mine.lock_fence)
                value = coll.find_one({"_id": doc.pk})["value"]
                time.sleep(0.005)
                coll.update_one({"_id": doc.pk}, {"$set": {"value": value + 1}})
                mine.release()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=100)
    assert not errors, errors
    assert coll.find_one({"_id": doc.pk})["value"] == threads_count * rounds
    assert sorted(fences) == list(range(1, threads_count * rounds + 1))


# -- a waiter never sleeps to a stale expiry ------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("change", ["renewed-shorter", "forced-then-crashed"])
def test_waiter_follows_a_lease_that_now_ends_sooner(lockable_db: Any, kind: str,
                                                     change: str) -> None:
    """The holder's 30 s lease becomes a 0.5 s one while a waiter waits (a
    renewal to a shorter term, or a forced takeover by a caller that then
    vanishes): the waiter gets the lease soon after the new end, not at the
    old one."""
    if kind == "document":
        doc = WaitJob().save()
        holder = WaitJob.objects.get(pk=doc.pk)
        assert holder.lock(30)
        waiter_take = lambda: doc.lock(5, wait=20)  # noqa: E731
        if change == "renewed-shorter":
            shorten = lambda: holder.renew(0.5)  # noqa: E731
        else:
            shorten = lambda: WaitJob.objects.get(pk=doc.pk).lock(0.5, force=True)  # noqa: E731
    else:
        name = f"stale-{ObjectId()}"
        holder = NamedLock(name, 30)
        assert holder.acquire()
        waiter = NamedLock(name, 5)
        waiter_take = lambda: waiter.acquire(wait=20)  # noqa: E731
        if change == "renewed-shorter":
            shorten = lambda: holder.renew(0.5)  # noqa: E731
        else:
            def shorten() -> None:
                # Another process takes the record over for 0.5 s and dies:
                # what a forced takeover leaves behind (the server runs on this
                # machine's clock, so the client's time will do here).
                coll = NamedLock(name)._blocking().io.collection
                coll.update_one({"_id": name}, {"$set": {
                    "locked_until": client_now() + timedelta(seconds=0.5),
                    "owner": "vanished", "token": "vanished"}})
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(ok=waiter_take(),
                                                           at=time.monotonic()))
    thread.start()
    time.sleep(0.6)  # the waiter is queued, its lease's end in view
    shortened = time.monotonic()
    shorten()
    thread.join(30)
    assert result["ok"] is True
    # The new end is 0.5 s after the change; the old one 30 s after the start.
    assert result["at"] - shortened < 4.0, result["at"] - shortened
