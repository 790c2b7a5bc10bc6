"""asyncio: ``AsyncNamedLock``, ``AsyncNamedSemaphore`` and ``@exclusive`` on
coroutine functions (``mongoengine_lockable.aio``).

The behaviour tests run on both backends (mongomock runs in the loop) unless
they are about the server (change streams, a fail point, the default
client); each runs its own ``asyncio.run``. On a pymongo without the stable
asyncio API (older than 4.13.2, as in the lowest-versions run) the module
must refuse to import, saying which pymongo it needs: that is checked there,
and the rest is skipped with the reason.

The test between processes runs ``aio_holds`` workers (``tests/workers.py``):
each takes a lock many times, with a blocking ``NamedLock`` or an
``AsyncNamedLock``, and reports its holds.
"""

from __future__ import annotations

import asyncio
import configparser
import gc
import inspect
import math
import sys
import time
import warnings
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Any, Callable, TypeVar

import mongoengine
import pymongo
import pytest

from mongoengine_lockable import (
    LockNotOwnedError,
    LockUnavailableError,
    NamedLock,
    NamedSemaphore,
    exclusive,
    signals,
)
from mongoengine_lockable._named import DEFAULT_COLLECTION

from _children import Children, assert_fences_follow_grants, max_overlap

NEEDED = (4, 13, 2)
HAS_ASYNC_PYMONGO = tuple(int(p) for p in pymongo.version_tuple[:3]) >= NEEDED

if HAS_ASYNC_PYMONGO:
    from mongoengine_lockable import _aio
    from mongoengine_lockable.aio import AsyncNamedLock, AsyncNamedSemaphore

needs_aio = pytest.mark.skipif(
    not HAS_ASYNC_PYMONGO,
    reason=f"mongoengine_lockable.aio needs pymongo>=4.13.2; {pymongo.version} is installed",
)

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    """Run ``coro`` in a new event loop, failing after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    """Await ``check()`` every 10 ms until it is true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


def record(db: Any, name: str) -> dict[str, Any]:
    """The named record ``name`` as stored (``{}`` if there is none)."""
    return db.database[DEFAULT_COLLECTION].find_one({"_id": name}) or {}


# -- the pymongo it needs ------------------------------------------------------------------


def test_the_pymongo_it_needs_is_declared_and_checked() -> None:
    """``asyncio`` extra in setup.cfg; importing ``aio`` on an older pymongo
    raises an ImportError naming the version, as does decorating a
    coroutine function."""
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parents[1] / "setup.cfg")
    assert cfg["options.extras_require"]["asyncio"].split() == ["pymongo>=4.13.2"]
    if HAS_ASYNC_PYMONGO:
        from mongoengine_lockable import aio

        assert aio.__all__ == ["AsyncNamedLock", "AsyncNamedSemaphore"]
        assert _aio.PYMONGO_NEEDED == NEEDED
        return
    sys.modules.pop("mongoengine_lockable.aio", None)
    with pytest.raises(ImportError, match=r"pymongo>=4\.13\.2"):
        import mongoengine_lockable.aio  # noqa: F401

    async def job() -> None:  # pragma: no cover - never run
        pass

    with pytest.raises(ImportError, match=r"pymongo>=4\.13\.2"):
        exclusive("job", 60)(job)


# -- exclusion ---------------------------------------------------------------------------------


@needs_aio
def test_coroutines_exclude_each_other(lockable_db: Any) -> None:
    holds: list[dict[str, Any]] = []

    async def worker() -> None:
        lock = AsyncNamedLock("between-coroutines", 30, wait=None)
        for _ in range(4):
            t_try = time.monotonic()
            assert await lock.acquire()
            t_acq = time.monotonic()
            await asyncio.sleep(0.005)
            holds.append({"t_try": t_try, "t_acq": t_acq, "t_rel": time.monotonic(),
                          "fence": lock.fence})
            await lock.release()

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(6)))

    run(main())
    assert len(holds) == 24
    assert max_overlap([(h["t_acq"], h["t_rel"]) for h in holds]) == 1
    assert_fences_follow_grants(holds)
    assert NamedLock.is_free("between-coroutines")


@needs_aio
def test_an_asyncio_process_and_a_blocking_one_share_the_lock(
    lockable_real_db: Any, tmp_path: Path
) -> None:
    """Two processes with asyncio locks and two with blocking ones take the
    same name in turn: never two at once, and one sequence of fences that
    grows with the grants, whichever face took them."""
    args = {"uri": lockable_real_db.uri, "db": lockable_real_db.db_name,
            "name": "sync-and-async", "count": 12, "hold": 0.01}
    with Children(tmp_path) as children:
        workers = [children("aio_holds", mode=mode, **args)
                   for mode in ("async", "sync", "async", "sync")]
        for worker in workers:
            worker.expect("READY")
        for worker in workers:
            worker.go()
        holds = [h for worker in workers for h in worker.expect("HOLDS", timeout=120)["holds"]]
        for worker in workers:
            assert worker.join(30) == 0
    assert len(holds) == 48
    assert {h["mode"] for h in holds} == {"sync", "async"}
    assert max_overlap([(h["t_acq"], h["t_rel"]) for h in holds]) == 1
    assert_fences_follow_grants(holds)
    assert NamedLock.is_free("sync-and-async")


# -- waiting never blocks the loop -----------------------------------------------------------


@needs_aio
def test_a_ticker_keeps_its_beat_while_a_coroutine_waits(lockable_db: Any) -> None:
    """A coroutine waits 1 s for a held lock while another ticks every 10 ms:
    no beat comes more than 100 ms late (a blocking wait would stop them
    all for the whole second)."""

    async def main() -> tuple[float, float, int]:
        holder = AsyncNamedLock("tick", 30)
        waiter = AsyncNamedLock("tick", 30, wait=10)
        assert await holder.acquire()
        beats: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            while not stop.is_set():
                beats.append(time.monotonic())
                await asyncio.sleep(0.01)

        async def release_later() -> None:
            await asyncio.sleep(1.0)
            await holder.release()

        ticking = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.05)
        releasing = asyncio.ensure_future(release_later())
        started = time.monotonic()
        assert await waiter.acquire()
        waited = time.monotonic() - started
        stop.set()
        await ticking
        await releasing
        await waiter.release()
        gaps = [b - a for a, b in zip(beats, beats[1:])]
        return waited, max(gaps), len(beats)

    waited, largest_gap, beats = run(main())
    assert 0.9 <= waited < 5, waited
    assert largest_gap < 0.1, f"the ticker stalled for {largest_gap * 1000:.0f} ms"
    assert beats > 30


# -- keepalive ---------------------------------------------------------------------------------


@needs_aio
def test_the_keepalive_task_keeps_a_1s_lease_through_3s_of_work(lockable_db: Any) -> None:
    renewed: list[Any] = []

    def on_renewed(sender: Any, **kwargs: Any) -> None:
        renewed.append(sender)

    signals.lock_renewed.connect(on_renewed, weak=False)

    async def main() -> None:
        lock = AsyncNamedLock("kept", 1, keepalive=True)
        assert await lock.acquire()
        await asyncio.sleep(3)
        assert await lock.owned()
        assert 0 < lock.remaining() <= 1
        assert not await AsyncNamedLock("kept", 1).acquire()
        assert NamedLock.owner_of("kept") == lock.owner
        keeper = lock._handle._keeper  # type: ignore[union-attr]
        assert keeper is not None and not keeper.done()
        await lock.release()
        assert keeper.done() and lock._handle._keeper is None  # type: ignore[union-attr]
        assert lock.remaining() == 0.0
        assert renewed and all(sender is lock for sender in renewed)
        count = len(renewed)
        await asyncio.sleep(0.5)
        assert len(renewed) == count  # no renewal after the release

    try:
        run(main())
    finally:
        signals.lock_renewed.disconnect(on_renewed)
    assert len(renewed) >= 5  # one per third of the lease: about 9 in 3 s


@needs_aio
def test_a_forgotten_lock_is_not_kept_alive(lockable_db: Any) -> None:
    """The keepalive task holds only a weak reference: once the lock object
    is gone, it stops, and the lease runs out."""

    async def main() -> None:
        lock = AsyncNamedLock("forgotten", 0.6, keepalive=True)
        assert await lock.acquire()
        keeper = lock._handle._keeper  # type: ignore[union-attr]
        assert keeper is not None
        del lock
        gc.collect()
        await asyncio.wait_for(asyncio.shield(keeper), 2)  # at its next renewal

        async def expired() -> bool:
            return await AsyncNamedLock.is_free("forgotten")

        await until(expired, "the forgotten lease expires", timeout=3)

    run(main())


# -- the semaphore -------------------------------------------------------------------------------


@needs_aio
def test_the_async_semaphores_limit_holds_with_many_coroutines(lockable_db: Any) -> None:
    holds: list[dict[str, Any]] = []

    async def worker() -> None:
        share = AsyncNamedSemaphore("exports", 3, 30, wait=None)
        for _ in range(2):
            t_try = time.monotonic()
            assert await share.acquire()
            t_acq = time.monotonic()
            await asyncio.sleep(0.02)
            holds.append({"t_try": t_try, "t_acq": t_acq, "t_rel": time.monotonic(),
                          "fence": share.fence, "owner": share.owner})
            assert share.owner in await AsyncNamedSemaphore.holders("exports")
            await share.release()

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(20)))
        assert await AsyncNamedSemaphore.holders("exports") == []

    run(main(), timeout=120)
    assert len(holds) == 40
    assert max_overlap([(h["t_acq"], h["t_rel"]) for h in holds]) == 3
    assert_fences_follow_grants(holds)
    assert NamedSemaphore.holders("exports") == []


@needs_aio
def test_an_async_semaphore_counts_blocking_holders_too(lockable_db: Any) -> None:
    blocking = NamedSemaphore("mixed", 2, 30)
    assert blocking.acquire()

    async def main() -> None:
        first = AsyncNamedSemaphore("mixed", 2, 30)
        assert await first.acquire()
        assert await AsyncNamedSemaphore.holders("mixed") == [blocking.owner, first.owner]
        assert not await AsyncNamedSemaphore("mixed", 2, 30).acquire()
        assert first.fence is not None and first.fence > blocking.fence  # type: ignore[operator]
        await first.release()

    run(main())
    blocking.release()


# -- @exclusive on coroutine functions ----------------------------------------------------------


@needs_aio
def test_exclusive_holds_the_lock_for_the_whole_await(lockable_db: Any) -> None:
    refused: list[dict[str, Any]] = []

    def on_unavailable(sender: Any, **kwargs: Any) -> None:
        refused.append(kwargs)

    signals.lock_unavailable.connect(on_unavailable, weak=False)

    @exclusive("job:{n}", 30)
    async def job(n: int, gate: asyncio.Event) -> int:
        """Double ``n`` once the gate opens."""
        await gate.wait()
        return n * 2

    assert inspect.iscoroutinefunction(job)
    assert job.__name__ == "job" and job.__doc__ == "Double ``n`` once the gate opens."

    async def main() -> None:
        gate = asyncio.Event()
        first = asyncio.ensure_future(job(21, gate))

        async def taken() -> bool:
            return await AsyncNamedLock.owner_of("job:21") is not None

        await until(taken, "the first call holds job:21")
        owner = await AsyncNamedLock.owner_of("job:21")
        assert NamedLock.owner_of("job:21") == owner  # the same lock for the blocking face
        assert await job(21, gate) is None  # skipped while the first call awaits
        assert [r["name"] for r in refused] == ["job:21"]
        assert refused[0]["holder"] == owner
        assert not first.done()
        gate.set()
        assert await first == 42
        assert await AsyncNamedLock.is_free("job:21")
        assert await job(21, gate) == 42  # free again for the next call
        assert len(refused) == 1

    try:
        run(main())
    finally:
        signals.lock_unavailable.disconnect(on_unavailable)


@needs_aio
def test_exclusive_releases_when_the_coroutine_is_cancelled(lockable_db: Any) -> None:
    @exclusive("cancelled-job", 30)
    async def job() -> None:
        await asyncio.sleep(30)

    async def main() -> None:
        task = asyncio.ensure_future(job())

        async def taken() -> bool:
            return not await AsyncNamedLock.is_free("cancelled-job")

        await until(taken, "the call holds the lock")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await AsyncNamedLock.is_free("cancelled-job")

    run(main())


# -- cancellation ----------------------------------------------------------------------------------


def _queued(db: Any, name: str, owner: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return any(w.get("o") == owner for w in record(db, name).get("waiters") or [])

    return check


@needs_aio
def test_a_cancelled_waiting_acquire_leaves_nothing_queued_or_held(lockable_db: Any) -> None:
    holder = NamedLock("cancel", 30)
    assert holder.acquire()

    async def main() -> None:
        waiter = AsyncNamedLock("cancel", 30, wait=None)
        task = asyncio.ensure_future(waiter.acquire())
        await until(_queued(lockable_db, "cancel", waiter.owner), "the waiter is queued")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # A timeout cancels the same way.
        other = AsyncNamedLock("cancel", 30, wait=None)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(other.acquire(), 0.5)
        assert not await waiter.owned() and waiter.remaining() == 0.0
        assert not await other.owned()

    run(main())
    stored = record(lockable_db, "cancel")
    assert not stored.get("waiters"), stored
    assert stored["owner"] == holder.owner and holder.owned()
    holder.release()
    assert NamedLock.is_free("cancel")
    assert not record(lockable_db, "cancel").get("waiters")


@needs_aio
def test_a_waiter_cancelled_as_the_lease_reaches_it_gives_it_back(lockable_db: Any) -> None:
    """The holder's release hands the lease to the queued coroutine in the
    same write; the coroutine is cancelled before it hears of it: its
    clean-up finds the lease granted and gives it back."""
    holder = NamedLock("handed", 30)
    assert holder.acquire()
    fence = holder.fence
    acquired: list[Any] = []

    def on_acquired(sender: Any, **kwargs: Any) -> None:
        acquired.append(sender)

    signals.lock_acquired.connect(on_acquired, weak=False)

    async def main() -> None:
        waiter = AsyncNamedLock("handed", 30, wait=None)
        task = asyncio.ensure_future(waiter.acquire())
        await until(_queued(lockable_db, "handed", waiter.owner), "the waiter is queued")
        # Released without yielding to the loop: the waiter cannot run before
        # it is cancelled.
        holder.release()
        assert record(lockable_db, "handed").get("owner") == waiter.owner
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert waiter.fence is None and not acquired
        assert await AsyncNamedLock.is_free("handed")

    try:
        run(main())
    finally:
        signals.lock_acquired.disconnect(on_acquired)
    stored = record(lockable_db, "handed")
    assert not stored.get("waiters"), stored
    assert stored["fence"] > fence  # it was granted, then given back
    again = NamedLock("handed", 30)
    assert again.acquire()  # free, with nobody queued
    again.release()


class SlowCleanUp:
    """An executor whose writes after a cancellation start 0.2 s late (and
    say so with ``clean_up``), so that a test can cancel again meanwhile."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.source = inner.source
        self.cancelled = False
        self.clean_up = asyncio.Event()

    def session(self) -> Any:
        return self.inner.session()

    def close_later(self, wakers: list[Any], session: Any) -> None:
        self.inner.close_later(wakers, session)

    async def do(self, request: Any, session: Any, wakers: list[Any]) -> Any:
        from mongoengine_lockable._engine import Modify

        if self.cancelled and isinstance(request, Modify):
            self.clean_up.set()
            await asyncio.sleep(0.2)
        try:
            return await self.inner.do(request, session, wakers)
        except asyncio.CancelledError:
            self.cancelled = True
            raise


@needs_aio
def test_a_second_cancellation_does_not_cut_the_clean_up_short(lockable_db: Any) -> None:
    """Cancelled again while it cleans up (a timeout, then the shutdown of its
    task group, say): the clean-up still runs to its end."""
    holder = NamedLock("twice", 30)
    assert holder.acquire()

    async def main() -> None:
        waiter = AsyncNamedLock("twice", 30)
        coll = (await _aio.default_database("default"))[DEFAULT_COLLECTION]
        io = SlowCleanUp(_aio.executor_for(coll))
        steps = _lease_of(waiter).acquire(waiter.owner, 30_000, wait=None)
        task = asyncio.ensure_future(_aio.arun(steps, io, track=True))
        await until(_queued(lockable_db, "twice", waiter.owner), "the waiter is queued")
        holder.release()  # handed to the waiter, which has not heard of it yet
        task.cancel()
        await asyncio.wait_for(io.clean_up.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        async def cleaned() -> bool:
            stored = record(lockable_db, "twice")
            return "token" not in stored and not stored.get("waiters")

        await until(cleaned, "the lease handed to the cancelled waiter is given back")

    run(main())
    assert NamedLock.is_free("twice")


class InterruptedAfterTheWrite:
    """An executor that sends the first write of a run, then raises
    ``interrupt`` instead of answering, as a cancellation (or Ctrl-C) landing
    while the answer is on its way does; later requests are answered."""

    def __init__(self, inner: Any, interrupt: BaseException) -> None:
        self.inner = inner
        self.source = inner.source
        self.interrupt: BaseException | None = interrupt

    def session(self) -> Any:
        return self.inner.session()

    def close_later(self, wakers: list[Any], session: Any) -> None:
        self.inner.close_later(wakers, session)

    def _after(self, request: Any, answer: Any) -> Any:
        from mongoengine_lockable._engine import Modify

        interrupt, self.interrupt = self.interrupt, None
        if isinstance(request, Modify) and interrupt is not None:
            assert answer.doc is not None  # the write was applied
            raise interrupt
        return answer

    async def do(self, request: Any, session: Any, wakers: list[Any]) -> Any:
        return self._after(request, await self.inner.do(request, session, wakers))


def _lease_of(lock: Any) -> Any:
    return lock._lease


@needs_aio
@pytest.mark.parametrize("wait", [0, None], ids=["wait=0", "wait=None"])
def test_an_acquire_cancelled_after_its_grant_gives_the_lease_back(
    lockable_db: Any, wait: float | None
) -> None:
    """The grant is written, then the acquisition is cancelled before it
    hears so: its clean-up gives the lease back, and the cancellation goes on."""

    async def main() -> None:
        lock = AsyncNamedLock("cut-short", 30)
        coll = (await _aio.default_database("default"))[DEFAULT_COLLECTION]
        io = InterruptedAfterTheWrite(_aio.executor_for(coll), asyncio.CancelledError())
        steps = _lease_of(lock).acquire(lock.owner, 30_000, wait=wait)
        with pytest.raises(asyncio.CancelledError):
            await _aio.arun(steps, io, track=wait != 0)
        assert await AsyncNamedLock.is_free("cut-short")
        assert lock.fence is None and lock.remaining() == 0.0

    run(main())
    stored = record(lockable_db, "cut-short")
    assert stored and not stored.get("waiters") and "token" not in stored, stored


def test_a_blocking_acquire_interrupted_after_its_grant_gives_the_lease_back(
    lockable_db: Any,
) -> None:
    """The same clean-up for a blocking caller interrupted (Ctrl-C) while the
    grant's answer is on its way."""
    from mongoengine_lockable._io import executor_for
    from mongoengine_lockable._io import run as run_steps
    from mongoengine_lockable._named import records

    class Interrupted(InterruptedAfterTheWrite):
        def do(self, request: Any, session: Any, wakers: list[Any]) -> Any:  # type: ignore[override]
            return self._after(request, self.inner.do(request, session, wakers))

    lock = NamedLock("interrupted", 30)
    io = Interrupted(executor_for(records("default", DEFAULT_COLLECTION)), KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run_steps(_lease_of(lock).acquire(lock.owner, 30_000, wait=0), io)  # type: ignore[arg-type]
    assert NamedLock.is_free("interrupted")
    assert "token" not in record(lockable_db, "interrupted")


# -- the default client ----------------------------------------------------------------------------


@needs_aio
def test_the_default_client_serves_each_asyncio_run(lockable_real_db: Any) -> None:
    """One lock object, two ``asyncio.run``: each loop gets its own client of
    the alias's settings, and each is closed with its loop."""
    lock = AsyncNamedLock("two-runs", 5)

    async def cycle() -> Any:
        assert await lock.acquire()
        await lock.release()
        database = await _aio.default_database("default")
        assert database.name == lockable_real_db.db_name
        assert lock._handle.io.source.database is database  # type: ignore[union-attr]
        return database.client

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        first = run(cycle())
        second = run(cycle())
        gc.collect()
    assert first is not second
    assert first._closed and second._closed
    unclosed = [str(w.message) for w in caught if "Unclosed" in str(w.message)
                and "Async" in str(w.message)]
    assert not unclosed, unclosed
    assert NamedLock.is_free("two-runs")


def _stream_hubs() -> list[Any]:
    from mongoengine_lockable import _io

    return [hub for hub in list(_io._HUBS._hubs.values())
            if isinstance(hub, _aio.TaskHub) and hub.alive()]


@needs_aio
def test_the_coroutines_of_a_loop_wait_on_one_change_stream(lockable_real_db: Any) -> None:
    """Twenty coroutines queued for one lock, and others for another lock,
    are woken through one change stream of the loop (one ``aggregate`` with
    ``$changeStream``), each by its own grant, in the order they queued."""
    opened: list[Any] = []

    class Listener(pymongo.monitoring.CommandListener):
        def started(self, event: Any) -> None:
            if event.command_name == "aggregate" and "$changeStream" in repr(
                    event.command.get("pipeline")):
                opened.append(event.command)

        def succeeded(self, event: Any) -> None:
            pass

        def failed(self, event: Any) -> None:
            pass

    async def main() -> list[int]:
        client: Any = pymongo.AsyncMongoClient(lockable_real_db.uri,
                                               event_listeners=[Listener()])
        try:
            database = client[lockable_real_db.db_name]
            holder = AsyncNamedLock("shared-stream", 30, database=database)
            other = AsyncNamedLock("shared-stream-2", 30, database=database)
            assert await holder.acquire() and await other.acquire()
            order: list[int] = []

            async def waiter(i: int, name: str) -> None:
                lock = AsyncNamedLock(name, 30, wait=30, database=database)
                assert await lock.acquire()
                order.append(i)
                await lock.release()

            tasks = []
            for i in range(20):
                tasks.append(asyncio.ensure_future(waiter(i, "shared-stream")))
                tasks.append(asyncio.ensure_future(waiter(100 + i, "shared-stream-2")))
                await asyncio.sleep(0.01)  # queued in this order
            await until(lambda: _queue_length_at_least(database, "shared-stream", 20),
                        "20 queued")
            assert len(_stream_hubs()) == 1
            await holder.release()
            await other.release()
            await asyncio.gather(*tasks)
            return order
        finally:
            await client.close()

    order = run(main())
    assert [i for i in order if i < 100] == list(range(20))
    assert [i for i in order if i >= 100] == list(range(100, 120))
    assert len(opened) == 1, opened


async def _queue_length_at_least(database: Any, name: str, n: int) -> bool:
    doc = await database[DEFAULT_COLLECTION].find_one({"_id": name})
    return doc is not None and len(doc.get("waiters") or []) >= n


@needs_aio
def test_a_loop_ended_by_hand_stops_the_reading_of_its_stream(lockable_real_db: Any) -> None:
    """``shutdown_asyncgens()`` then ``close()``, without cancelling the
    loop's tasks: the task reading the loop's change stream ends all the
    same (no task is destroyed pending)."""
    loop = asyncio.new_event_loop()
    lock, waiter = AsyncNamedLock("by-hand", 30), AsyncNamedLock("by-hand", 30, wait=10)

    async def handed_over() -> None:
        assert await lock.acquire()
        later = asyncio.get_running_loop().call_later(0.2, asyncio.ensure_future,
                                                      lock.release())
        assert await waiter.acquire()
        await waiter.release()
        later.cancel()

    try:
        loop.run_until_complete(handed_over())
        (hub,) = [h for h in list(_stream_hubs()) if h.loop is loop]
        assert hub.task is not None and not hub.task.done()
        loop.run_until_complete(loop.shutdown_asyncgens())
        assert hub.task.done() and not hub.alive()
    finally:
        loop.close()
    assert NamedLock.is_free("by-hand")


@needs_aio
def test_an_explicit_database_is_used_as_given(lockable_real_db: Any) -> None:
    async def main() -> None:
        client: Any = pymongo.AsyncMongoClient(lockable_real_db.uri)
        try:
            database = client[lockable_real_db.db_name]
            lock = AsyncNamedLock("given", 5, database=database, collection="given_locks")
            assert await lock.acquire()
            assert await AsyncNamedLock.owner_of("given", collection="given_locks",
                                                 database=database) == lock.owner
            assert NamedLock.owner_of("given", collection="given_locks") == lock.owner
            await lock.release()
        finally:
            await client.close()

    run(main())


@needs_aio
def test_a_retried_write_answered_from_its_image_is_read_again(lockable_real_db: Any) -> None:
    """The asyncio executor sends the blocking one's calls: a retried
    ``findAndModify`` answered without its projection is read again."""
    admin = mongoengine.get_connection().admin

    def fail_next_write() -> None:
        admin.command({
            "configureFailPoint": "failCommand", "mode": {"times": 1},
            "data": {"failCommands": ["findAndModify"],
                     "writeConcernError": {"code": 6, "errmsg": "host unreachable",
                                           "errorLabels": ["RetryableWriteError"]}},
        })

    async def main() -> None:
        lock = AsyncNamedLock("image", 5)
        fail_next_write()
        assert await lock.acquire() and await lock.owned()
        fail_next_write()
        await lock.renew()
        fail_next_write()
        await lock.release()
        assert await AsyncNamedLock.is_free("image")

    try:
        run(main())
    finally:
        admin.command({"configureFailPoint": "failCommand", "mode": "off"})


# -- the faces' contract -----------------------------------------------------------------------


@needs_aio
def test_async_with_acquires_or_raises_and_release_checks_ownership(lockable_db: Any) -> None:
    async def main() -> None:
        lock = AsyncNamedLock("with", 30)
        async with lock as entered:
            assert entered is lock
            assert await lock.locked() and await lock.owned()
            with pytest.raises(LockUnavailableError):
                async with AsyncNamedLock("with", 30):
                    pass  # pragma: no cover
        assert not await lock.locked()
        with pytest.raises(LockNotOwnedError):
            await lock.release()
        assert "not held" in repr(lock) and lock.name == "with" and lock.fence

    run(main())


@needs_aio
@pytest.mark.parametrize(
    ("make", "exc", "message"),
    [
        (lambda: AsyncNamedLock(""), ValueError, r"\bname\b"),
        (lambda: AsyncNamedLock("n", "60"), TypeError, r"\bduration\b"),
        (lambda: AsyncNamedLock("n", 5, min_hold=6), ValueError, r"\bmin_hold\b"),
        (lambda: AsyncNamedLock("n", wait=-1), ValueError, r"\bwait\b"),
        (lambda: AsyncNamedLock("n", owner=""), ValueError, r"\bowner\b"),
        (lambda: AsyncNamedLock("n", keepalive=1), TypeError, r"\bkeepalive\b"),
        (lambda: AsyncNamedLock("n", collection="a$b"), ValueError, r"\bcollection\b"),
        (lambda: AsyncNamedLock("n", database="db"), TypeError, r"\bdatabase\b"),
        (lambda: AsyncNamedLock("n", database=mongoengine.get_db()), TypeError,
         r"\bdatabase\b"),
        (lambda: AsyncNamedSemaphore("s", 0), ValueError, r"\blimit\b"),
        (lambda: AsyncNamedSemaphore("s", True), TypeError, r"\blimit\b"),
        (lambda: run(AsyncNamedLock("n").acquire(wait="1")), TypeError, r"\bwait\b"),
        (lambda: run(AsyncNamedLock("n").renew(math.nan)), ValueError, r"\bduration\b"),
        (lambda: run(AsyncNamedLock.owner_of(None)), TypeError, r"\bname\b"),  # type: ignore[arg-type]
        (lambda: run(AsyncNamedLock.owner_of("n", alias=1)), TypeError, r"\balias\b"),  # type: ignore[arg-type]
        (lambda: run(AsyncNamedLock.is_free("n", database=1)), TypeError, r"\bdatabase\b"),
        (lambda: run(AsyncNamedSemaphore.holders("s", collection="")), ValueError,
         r"\bcollection\b"),
        (lambda: exclusive("r:{nope}", 60)(_coroutine_function), ValueError, r"\{nope\}"),
    ],
)
def test_bad_arguments_are_rejected_before_any_io(
    lockable_db: Any, make: Callable[[], Any], exc: type[Exception], message: str
) -> None:
    before = sorted(lockable_db.database.list_collection_names())
    loops = len(_aio._clients)
    with pytest.raises(exc, match=message):
        make()
    assert sorted(lockable_db.database.list_collection_names()) == before
    gc.collect()
    assert len(_aio._clients) <= loops  # no client was made for it


async def _coroutine_function(day: str) -> None:  # pragma: no cover - never awaited
    pass



@needs_aio
def test_release_stops_a_keepalive_whose_cancellation_was_lost(
        lockable_real_db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancellation that arrives as a driver call completes can be dropped
    on the way (``asyncio.wait_for`` before Python 3.12 returns the result
    instead); ``release()`` still stops the keepalive task instead of
    waiting on it while it renews forever."""
    renewing = asyncio.Event()
    original = _aio._ainvoke

    async def slowly(call: Any) -> Any:
        await asyncio.sleep(0.1)  # the release cancels the renewing task meanwhile
        return await original(call)

    async def loses_cancellations(call: Any) -> Any:
        inner = asyncio.ensure_future(slowly(call))
        renewing.set()
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            return await inner  # the result comes back, the cancellation is lost

    async def main() -> None:
        lock = AsyncNamedLock("lost-cancel", 0.6, keepalive=True)
        assert await lock.acquire()
        monkeypatch.setattr(_aio, "_ainvoke", loses_cancellations)
        renewing.clear()
        await asyncio.wait_for(renewing.wait(), 5)  # a renewal is under way
        await asyncio.wait_for(lock.release(), 5)
        assert lock._handle._keeper is None  # type: ignore[union-attr]
        await asyncio.sleep(1.0)  # longer than the lease: nobody renewed it
        assert NamedLock.owner_of("lost-cancel") is None

    run(main(), timeout=30)
