"""asyncio locks: ``AsyncNamedLock`` cycle cost against ``NamedLock``'s, and
100 coroutines contending for one lock.

1. Cycle cost. Both sides make the same two conditional ``findAndModify``
   calls (acquire, release) on the same server with the same write concern
   (``majority`` by default; ``--w 1`` shows the CPU cost of each face, which
   a majority commit otherwise hides): the blocking side with pymongo's
   ``MongoClient``, the asyncio side awaiting ``AsyncMongoClient`` in one event
   loop. A raw pair of pipeline ``find_one_and_update`` calls on each client
   shows what the driver itself costs. Rounds of the four alternate in one
   run, and the ratios of the medians are printed.
2. Contention. ``--contenders`` coroutines (default 100) of one event loop
   loop on ``acquire(wait=None)``, hold the lock ``--hold`` seconds, release,
   for ``--seconds``; then the waiting ones are cancelled (which leaves their
   places in the queue). Printed: acquisitions per second, Jain's fairness
   index over the per-coroutine counts (1.0: all equal; 1/n: one took all;
   shown with the best a run of that many acquisitions can score), the
   fewest and most acquisitions of a coroutine, and the p50 and p99 of the
   wait for the lock.

    python benchmarks/aio.py [--uri URI] [--rounds 15] [--cycles 200] [--w 1]
                             [--contenders 100] [--seconds 30] [--hold 0]

Without ``--uri`` (or ``MONGODB_URI``) a temporary single-node replica set is
started from the embedded mongod.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable
from contextlib import ExitStack
from typing import Any, Callable

import mongoengine
from lock_cycle import connect, cycle_arguments, per_cycle, write_concern_option
from pymongo import ReturnDocument, WriteConcern

from mongoengine_lockable import NamedLock
from mongoengine_lockable._aio import default_database
from mongoengine_lockable._named import DEFAULT_COLLECTION
from mongoengine_lockable.aio import AsyncNamedLock


def sync_cycle(lock: NamedLock) -> Callable[[], None]:
    def cycle() -> None:
        assert lock.acquire()
        lock.release()

    return cycle


async def async_per_cycle(lock: AsyncNamedLock, n: int) -> float:
    """Seconds per acquire + release of ``lock``, over ``n`` cycles."""
    start = time.perf_counter()
    for _ in range(n):
        assert await lock.acquire()
        await lock.release()
    return (time.perf_counter() - start) / n


#: The raw pair: two pipeline findAndModify on $$NOW, as a grant and a
#: release are (the driver's own cost, blocking and asyncio).
RAW_GRANT = [{"$set": {"n": {"$add": [{"$ifNull": ["$n", 0]}, 1]}, "at": "$$NOW"}}]
RAW_RELEASE = [{"$set": {"done": "$$NOW"}}]


def raw_sync_cycle(coll: Any) -> Callable[[], None]:
    def cycle() -> None:
        assert coll.find_one_and_update({"_id": "raw-sync"}, RAW_GRANT, upsert=True,
                                        return_document=ReturnDocument.AFTER)
        assert coll.find_one_and_update({"_id": "raw-sync"}, RAW_RELEASE,
                                        return_document=ReturnDocument.AFTER)

    return cycle


async def raw_async_per_cycle(coll: Any, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        assert await coll.find_one_and_update({"_id": "raw-async"}, RAW_GRANT, upsert=True,
                                              return_document=ReturnDocument.AFTER)
        assert await coll.find_one_and_update({"_id": "raw-async"}, RAW_RELEASE,
                                              return_document=ReturnDocument.AFTER)
    return (time.perf_counter() - start) / n


def cycles(
    loop: asyncio.AbstractEventLoop,
    sides: list[tuple[Callable[[], None], Callable[[int], Awaitable[float]]]],
    rounds: int, n: int,
) -> list[tuple[float, float]]:
    """Warm every side up, then alternate rounds of ``n`` cycles of each
    (blocking, then asyncio): the median seconds per cycle of each."""
    for sync, run_async in sides:
        per_cycle(sync, n // 4 or 1)
        loop.run_until_complete(run_async(n // 4 or 1))
    times: list[tuple[list[float], list[float]]] = [([], []) for _ in sides]
    for _ in range(rounds):
        for (sync, run_async), (sync_t, async_t) in zip(sides, times):
            sync_t.append(per_cycle(sync, n))
            async_t.append(loop.run_until_complete(run_async(n)))
    return [(statistics.median(a), statistics.median(b)) for a, b in times]


def jain(counts: list[int]) -> float:
    """Jain's fairness index: (sum x)^2 / (n * sum x^2)."""
    total = sum(counts)
    squares = sum(c * c for c in counts)
    return total * total / (len(counts) * squares) if squares else 1.0


def fairest(total: int, n: int) -> float:
    """The highest Jain's index ``total`` acquisitions among ``n`` can have
    (as even as whole numbers allow): a run shorter than one round of the
    queue cannot score 1.0."""
    each, extra = divmod(total, n)
    return jain([each + 1] * extra + [each] * (n - extra))


async def contend(
    contenders: int, seconds: float, hold: float, concern: WriteConcern
) -> dict[str, Any]:
    """``contenders`` coroutines taking one lock in turn for ``seconds``."""
    counts = [0] * contenders
    waits: list[float] = []
    deadline = time.monotonic() + seconds

    async def contender(i: int) -> None:
        lock = AsyncNamedLock("bench-contended", 30, wait=None, write_concern=concern)
        while time.monotonic() < deadline:
            asked = time.monotonic()
            assert await lock.acquire()
            got = time.monotonic()
            if got >= deadline:
                await lock.release()
                return
            waits.append(got - asked)
            counts[i] += 1
            if hold:
                await asyncio.sleep(hold)
            await lock.release()

    started = time.monotonic()
    tasks = [asyncio.ensure_future(contender(i)) for i in range(contenders)]
    await asyncio.sleep(max(deadline - time.monotonic(), 0))
    for task in tasks:
        task.cancel()  # the waiting ones leave the queue
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = min(time.monotonic(), deadline) - started
    waits.sort()
    return {
        "total": sum(counts),
        "rate": sum(counts) / elapsed,
        "jain": jain(counts),
        "fairest": fairest(sum(counts), contenders),
        "fewest": min(counts),
        "most": max(counts),
        "wait_p50": waits[len(waits) // 2] if waits else float("nan"),
        "wait_p99": waits[int(len(waits) * 0.99)] if waits else float("nan"),
    }


def main() -> None:
    parser = cycle_arguments(__doc__.splitlines()[0])
    parser.add_argument("--contenders", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--hold", type=float, default=0.0,
                        help="seconds each acquisition holds the lock")
    args = parser.parse_args()
    w = write_concern_option(args)
    concern = WriteConcern(w)
    loop = asyncio.new_event_loop()
    with ExitStack() as stack:
        connect(stack, args.uri)
        records = mongoengine.get_db()[DEFAULT_COLLECTION]
        records.drop()
        stack.callback(records.drop)
        sync = sync_cycle(NamedLock("bench-sync", 30, write_concern=concern))
        async_lock = AsyncNamedLock("bench-async", 30, write_concern=concern)
        raw = mongoengine.get_db()["bench_raw"].with_options(write_concern=concern)
        stack.callback(raw.drop)
        try:
            # The client the asyncio locks use.
            araw = loop.run_until_complete(default_database("default")).get_collection(
                raw.name, write_concern=concern)
            (s, a), (rs, ra) = cycles(
                loop,
                [(sync, lambda n: async_per_cycle(async_lock, n)),
                 (raw_sync_cycle(raw), lambda n: raw_async_per_cycle(araw, n))],
                args.rounds, args.cycles)
            found = loop.run_until_complete(
                contend(args.contenders, args.seconds, args.hold, concern))
        finally:
            # As asyncio.run ends a loop: the default client closes with it.
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    print(f"NamedLock acquire+release:          {s * 1e6:8.1f} us/cycle  ({1 / s:7.0f} cycles/s)")
    print(f"AsyncNamedLock acquire+release:     {a * 1e6:8.1f} us/cycle  ({1 / a:7.0f} cycles/s)")
    print(f"raw pymongo pair, MongoClient:      {rs * 1e6:8.1f} us/cycle  ({1 / rs:7.0f} cycles/s)")
    print(f"raw pymongo pair, AsyncMongoClient: {ra * 1e6:8.1f} us/cycle  ({1 / ra:7.0f} cycles/s)")
    print(f"write concern w={w}")
    print(f"ratio async/sync (median of {args.rounds} rounds x {args.cycles} cycles): "
          f"{a / s:.3f} (the driver's own, raw pair: {ra / rs:.3f})")
    print(f"{args.contenders} coroutines on one lock for {args.seconds:g} s "
          f"(hold {args.hold * 1000:g} ms): {found['total']} acquisitions, "
          f"{found['rate']:.1f}/s; Jain's fairness index {found['jain']:.3f} "
          f"(at most {found['fairest']:.3f} for that many; per coroutine "
          f"{found['fewest']}-{found['most']}); "
          f"wait p50 {found['wait_p50'] * 1000:.0f} ms, p99 {found['wait_p99'] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
