"""Waiting for a lease (``mongoengine_lockable._waiting``).

- Unit tests of ``backoff``, ``retry_until`` and the wakers, with an injected
  clock, randomness and a fake waker: nothing sleeps for real.
- On the real server, separate processes: a waiter blocked in
  ``doc.lock(5, wait=10)`` / ``NamedLock.acquire(wait=10)`` gets the lease
  promptly once the holder (another process) releases it, long before the
  holder's 5 s lease would have run out; and after a holder is killed with
  ``SIGKILL`` the waiter gets it when the lease merely expires, with no write
  to wake it.
- ``wait=None``, and waiting from threads (polling on mongomock).

This file is also the worker script of its process tests: run as
``python tests/test_waiting.py COMMAND JSON`` it connects MongoEngine itself,
then talks to the parent in lines on its standard streams (``WORD {json}``;
the protocol and the parent's side: ``tests/_children.py``).
Time bounds are generous: they separate "woken by the release" (milliseconds)
from "slept until the lease ran out" (seconds), nothing finer.
"""

from __future__ import annotations

import itertools
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import mongoengine
import pytest
from bson import ObjectId
from pymongo.errors import PyMongoError

from mongoengine_lockable import LockableMixin, NamedLock
from mongoengine_lockable._waiting import (
    BASE_DELAY,
    MAX_DELAY,
    MAX_WAIT_SLICE,
    ChangeStreamWaker,
    PollingWaker,
    backoff,
    open_waker,
    retry_until,
)

from _children import Child, Children, hear, ready_then_wait_for_go, run_worker, say


class WaitJob(LockableMixin, mongoengine.Document):
    """The document the processes of this file wait for."""

    value = mongoengine.IntField(default=0)

    meta = {"collection": "test_wait_jobs"}


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


# -- retry_until, with a fake clock and waker ------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeWaker:
    """Pauses by moving the fake clock on; records the timeouts it was given."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.pauses: list[float] = []
        self.closed = False

    def pause(self, timeout: float) -> bool:
        assert not self.closed
        self.pauses.append(timeout)
        self.clock.now += timeout
        return False

    def close(self) -> None:
        self.closed = True


class Scripted:
    """An attempt that fails ``failures`` times (reporting ``left`` as the
    holder's time left) and then succeeds; records the clock at each call."""

    def __init__(
        self, clock: FakeClock, failures: float, left: float | None = None
    ) -> None:
        self.clock = clock
        self.failures = failures
        self.left = left
        self.calls: list[float] = []
        self.reads: list[bool] = []

    def __call__(self, read: bool) -> tuple[str | None, float | None]:
        self.calls.append(self.clock.now - 1000.0)
        self.reads.append(read)
        if len(self.calls) > self.failures:
            return "won", None
        return None, self.left


class Opener:
    """The ``waker`` argument: opens one :class:`FakeWaker` and remembers it."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.opened: list[FakeWaker] = []

    def __call__(self) -> FakeWaker:
        waker = FakeWaker(self.clock)
        self.opened.append(waker)
        return waker


def run(failures: float, wait: float | None, left: float | None = None) -> tuple[
    str | None, Scripted, Opener, FakeClock
]:
    clock = FakeClock()
    attempt = Scripted(clock, failures, left)
    opener = Opener(clock)
    result = retry_until(attempt, wait, opener, clock=clock)
    return result, attempt, opener, clock


def test_wait_zero_tries_once() -> None:
    result, attempt, opener, _ = run(failures=1, wait=0)
    assert result is None
    assert attempt.calls == [0.0]
    assert opener.opened == []  # no change stream for a single try


def test_success_at_once_opens_no_waker() -> None:
    result, attempt, opener, _ = run(failures=0, wait=10)
    assert result == "won"
    assert len(attempt.calls) == 1
    assert opener.opened == []


def test_deadline_is_respected() -> None:
    result, attempt, opener, clock = run(failures=float("inf"), wait=12)
    assert result is None
    (waker,) = opener.opened
    # Pauses of at most MAX_WAIT_SLICE, the last one cut at the deadline.
    assert MAX_WAIT_SLICE < 12
    assert all(0 < p <= MAX_WAIT_SLICE for p in waker.pauses)
    assert sum(waker.pauses) == pytest.approx(12)
    assert clock.now - 1000.0 == pytest.approx(12)
    # Retried right after the waker opened, then after every pause; the last
    # attempt is made at the deadline.
    assert attempt.calls[:2] == [0.0, 0.0]
    assert attempt.calls[-1] == pytest.approx(12)
    assert len(attempt.calls) == len(waker.pauses) + 2
    assert waker.closed


def test_a_short_wait_is_never_overslept() -> None:
    result, _, opener, clock = run(failures=float("inf"), wait=0.3)
    assert result is None
    assert opener.opened[0].pauses == [pytest.approx(0.3)]
    assert clock.now - 1000.0 == pytest.approx(0.3)


def test_success_during_the_wait() -> None:
    result, attempt, opener, clock = run(failures=3, wait=60)
    assert result == "won"
    assert len(attempt.calls) == 4
    assert opener.opened[0].closed
    assert clock.now - 1000.0 < 60


def test_wait_none_waits_without_limit_until_success() -> None:
    result, attempt, opener, clock = run(failures=2000, wait=None)
    assert result == "won"
    assert len(attempt.calls) == 2001
    # Far beyond any default: 1999 pauses of MAX_WAIT_SLICE of fake time.
    assert clock.now - 1000.0 == pytest.approx(1999 * MAX_WAIT_SLICE)
    assert set(opener.opened[0].pauses) == {MAX_WAIT_SLICE}
    assert opener.opened[0].closed


@pytest.mark.parametrize(
    ("left", "wait", "expected"),
    [
        (0.25, 10, 0.25),  # wake when the holder's lease runs out
        (0.0, 10, 0.001),  # running out now: a minimal nap, no busy loop
        (-2.0, 10, 0.001),  # already over (clock skew between reads)
        (3.0, 1, 1),  # the deadline comes first
        (3.0, None, 3.0),
        (None, None, MAX_WAIT_SLICE),  # unknown: at most one slice
    ],
)
def test_holders_time_left_shortens_the_pause(
    left: float | None, wait: float | None, expected: float
) -> None:
    clock = FakeClock()
    attempt = Scripted(clock, failures=2, left=left)
    opener = Opener(clock)
    assert retry_until(attempt, wait, opener, clock=clock) == "won"
    assert opener.opened[0].pauses == [pytest.approx(expected)]


class ReleasesSeen(FakeWaker):
    """A waker whose first ``releases`` pauses end on a release event."""

    def __init__(self, clock: FakeClock, releases: int) -> None:
        super().__init__(clock)
        self.releases = releases

    def pause(self, timeout: float) -> bool:
        super().pause(timeout)
        self.releases -= 1
        return self.releases >= 0


def test_only_the_first_try_skips_its_read() -> None:
    clock = FakeClock()
    attempt = Scripted(clock, failures=4, left=2.0)
    waker = ReleasesSeen(clock, releases=2)
    assert retry_until(attempt, 60, lambda: waker, clock=clock) == "won"
    # First try: no read (the retry after the waker opens reads). After a
    # release another waiter won, a read: its lease may be shorter than ours.
    assert attempt.reads == [False, True, True, True, True]


def test_wait_zero_reads_on_its_only_try() -> None:
    clock = FakeClock()
    attempt = Scripted(clock, failures=1)
    assert retry_until(attempt, 0, Opener(clock), clock=clock) is None
    assert attempt.reads == [True]


def test_waker_is_closed_when_an_attempt_raises() -> None:
    clock = FakeClock()
    calls = itertools.count()

    def attempt(read: bool) -> tuple[None, None]:
        if next(calls) == 2:
            raise RuntimeError("document deleted")
        return None, None

    opener = Opener(clock)
    with pytest.raises(RuntimeError):
        retry_until(attempt, 30, opener, clock=clock)
    assert opener.opened[0].closed


# -- the wakers ----------------------------------------------------------------------------


def test_polling_waker_sleeps_the_backoff_but_never_past_the_timeout() -> None:
    slept: list[float] = []
    waker = PollingWaker(sleep=slept.append, delay=lambda n: 0.1 * (n + 1))
    for timeout in (1, 1, 1, 0.05, 1):
        waker.pause(timeout)
    assert slept == [pytest.approx(x) for x in (0.1, 0.2, 0.3, 0.05, 0.5)]


class FakeStream:
    def __init__(self, changes: list[Any]) -> None:
        self.changes = changes
        self.reads = 0
        self.closed = False

    def try_next(self) -> Any:
        self.reads += 1
        change = self.changes.pop(0) if self.changes else None
        if isinstance(change, Exception):
            raise change
        return change

    def close(self) -> None:
        self.closed = True


class FakeCollection:
    full_name = "db.fake"

    def __init__(self, stream: FakeStream | None = None, error: Exception | None = None) -> None:
        self.stream, self.error = stream, error
        self.watched: list[Any] = []

    def watch(self, pipeline: Any, **kwargs: Any) -> FakeStream:
        self.watched.append(pipeline)
        if self.error is not None:
            raise self.error
        assert self.stream is not None
        return self.stream


def test_open_waker_watches_the_given_events() -> None:
    coll = FakeCollection(FakeStream([]))
    events = {"documentKey._id": "the-key"}
    waker = open_waker(coll, events, True)
    assert isinstance(waker, ChangeStreamWaker)
    assert coll.watched == [[{"$match": events}]]
    waker.close()
    assert coll.stream is not None and coll.stream.closed


def test_open_waker_polls_without_change_streams() -> None:
    assert isinstance(open_waker(FakeCollection(FakeStream([])), {}, False), PollingWaker)
    # A standalone server refuses to watch.
    refusing = FakeCollection(error=PyMongoError("not a replica set"))
    assert isinstance(open_waker(refusing, {}, True), PollingWaker)


def test_change_stream_waker_returns_on_a_change() -> None:
    clock = FakeClock()
    stream = FakeStream([None, None, {"operationType": "update"}])
    waker = ChangeStreamWaker(FakeCollection(stream), {}, clock=clock)
    assert waker.pause(5.0) is True  # the fake clock stands still: only the change ends it
    assert stream.reads == 3


def test_a_delete_wakes_the_waiter_but_is_not_a_release() -> None:
    stream = FakeStream([{"operationType": "delete"}])
    waker = ChangeStreamWaker(FakeCollection(stream), {}, clock=FakeClock())
    assert waker.pause(5.0) is False  # the waiter must read the record again


def test_change_stream_waker_falls_back_to_polling_when_the_stream_breaks() -> None:
    clock = FakeClock()
    stream = FakeStream([PyMongoError("cursor killed")])
    waker = ChangeStreamWaker(FakeCollection(stream), {}, clock=clock)
    assert waker.pause(5.0) is False
    assert stream.closed
    reads = stream.reads
    assert waker.pause(0.001) is False  # polls now (a real nap of at most 1 ms)
    assert stream.reads == reads


# -- processes: the worker side ---------------------------------------------------------


def _lockable(args: dict[str, Any]) -> tuple[Callable[..., bool], Callable[[], None]]:
    """``(take(wait) -> bool, release())`` for the document or the named lock."""
    if args["kind"] == "document":
        doc = WaitJob.objects.get(pk=ObjectId(args["pk"]))
        return (lambda wait: doc.lock(args["duration"], wait=wait)), doc.release
    lock = NamedLock(args["name"], duration=args["duration"])
    return (lambda wait: lock.acquire(wait=wait)), lock.release


def child_hold(args: dict[str, Any]) -> None:
    """Take the lease, say ``HOLDING``; on ``RELEASE`` release it, saying
    when the release was issued; then block until killed or EOF."""
    take, release = _lockable(args)
    before = time.time()
    taken = take(0)
    say("HOLDING", taken=taken, before=before)
    if hear() == "RELEASE":
        issued = time.time()
        release()
        say("RELEASED", issued=issued)
    hear()


def child_wait(args: dict[str, Any]) -> None:
    """On ``GO``, say ``WAITING`` and wait for the lease; report when it came."""
    take, _ = _lockable(args)
    ready_then_wait_for_go()
    started = time.time()
    say("WAITING", started=started)
    taken = take(args["wait"])
    say("RESULT", taken=taken, started=started, ended=time.time())


# -- processes: the parent side ------------------------------------------------------------


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Children]:
    """This file's worker commands as child processes (see ``_children``)."""
    with Children(tmp_path, __file__) as children:
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
    holder = spawn("hold", duration=5, **target)
    waiter = spawn("wait", duration=5, wait=10, **target)
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
    holder = spawn("hold", duration=1, **target)
    waiter = spawn("wait", duration=5, wait=10, **target)
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


if __name__ == "__main__":
    run_worker(
        sys.argv[1:], {"hold": child_hold, "wait": child_wait}, watchdog=120, connected=True
    )
