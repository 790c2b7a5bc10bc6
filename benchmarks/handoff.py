"""Hand-off latency: from a holder's ``release()`` to a waiting process's grant.

A holder process locks a document, holds it while a waiter process is blocked
trying to lock it too, and releases it. The hand-off is measured from just
before the holder calls ``release()`` to just after the waiter's call returns
``True`` (``time.time_ns()`` in each process; both run on this host).

Two waiters alternate trial by trial in one run:

- ours: ``doc.lock(5, wait=10)``, woken by a change stream on the document;
- polling: ``while not doc.lock(5): time.sleep(0.5)``, the loop users write
  without ``wait``.

The holder holds for 50 ms plus a random 0-500 ms after the waiter has started
waiting, so that the release falls at a random phase of the baseline's 500 ms
period (a fixed hold would give it the same latency every time). p50 and p99
of both are printed, and the ratio ours/polling last. ``--named`` measures the
same with a ``NamedLock`` (``acquire(wait=10)``) instead of a document.

    python benchmarks/handoff.py [--uri URI] [--trials 40] [--named]

Without ``--uri`` (or ``MONGODB_URI``) a temporary single-node replica set is
started from the embedded mongod.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import random
import time
from contextlib import ExitStack
from typing import Any, Callable

import mongoengine

from mongoengine_lockable import LockableMixin, NamedLock

DB_NAME = "lockable_bench_handoff"
LEASE = 5
WAIT = 10
POLL_INTERVAL = 0.5
LOCK_NAME = "bench-handoff"


class HandoffJob(LockableMixin, mongoengine.Document):
    payload = mongoengine.StringField()


def _connect(uri: str) -> None:
    mongoengine.connect(db=DB_NAME, host=uri)


def _lease(named: bool, doc_id: Any) -> tuple[Callable[..., bool], Callable[[], None]]:
    """``(take(wait=0) -> bool, release())`` on the benchmark's document or lock."""
    if named:
        lock = NamedLock(LOCK_NAME, duration=LEASE)
        return (lambda wait=0: lock.acquire(wait=wait)), lock.release
    doc = HandoffJob.objects.get(pk=doc_id)
    return (lambda wait=0: doc.lock(LEASE, wait=wait)), doc.release


def holder_main(conn: Any, uri: str, named: bool, doc_id: Any) -> None:
    """Lock on ``lock``; on ``release`` hold the given seconds more, then
    release, reporting when the release was issued."""
    _connect(uri)
    take, release = _lease(named, doc_id)
    conn.send("ready")
    while True:
        message = conn.recv()
        if message[0] == "lock":
            if not take():
                raise SystemExit("holder: the lease was not free")
            conn.send("held")
        elif message[0] == "release":
            time.sleep(message[1])
            issued = time.time_ns()
            release()
            conn.send(issued)
        else:
            return


def waiter_main(conn: Any, uri: str, named: bool, doc_id: Any) -> None:
    """On ``wait``, say so, then take the lease by ``mode``; report when it
    came, and release it."""
    _connect(uri)
    take, release = _lease(named, doc_id)
    conn.send("ready")
    while True:
        message = conn.recv()
        if message[0] != "wait":
            return
        conn.send("waiting")
        if message[1] == "ours":
            if not take(wait=WAIT):
                raise SystemExit("waiter: no lease within the wait")
        else:
            while not take():
                time.sleep(POLL_INTERVAL)
        got = time.time_ns()
        release()
        conn.send(got)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def run(uri: str, trials: int, named: bool, seed: int) -> dict[str, list[float]]:
    _connect(uri)
    HandoffJob.drop_collection()
    if named:
        mongoengine.get_db()["lockable_named_locks"].delete_many({"_id": LOCK_NAME})
    doc_id = HandoffJob(payload="handoff").save().pk
    ctx = multiprocessing.get_context("spawn")
    holder_conn, holder_end = ctx.Pipe()
    waiter_conn, waiter_end = ctx.Pipe()
    procs = [
        ctx.Process(target=holder_main, args=(holder_end, uri, named, doc_id), daemon=True),
        ctx.Process(target=waiter_main, args=(waiter_end, uri, named, doc_id), daemon=True),
    ]
    rng = random.Random(seed)
    times: dict[str, list[float]] = {"ours": [], "polling": []}
    try:
        for proc in procs:
            proc.start()
        for conn in (holder_conn, waiter_conn):
            assert conn.recv() == "ready"
        # Two warm-up trials, then the two modes alternate.
        modes = ["ours", "polling"] + ["ours", "polling"] * trials
        for i, mode in enumerate(modes):
            holder_conn.send(("lock",))
            assert holder_conn.recv() == "held"
            waiter_conn.send(("wait", mode))
            assert waiter_conn.recv() == "waiting"
            holder_conn.send(("release", 0.05 + rng.uniform(0, POLL_INTERVAL)))
            issued = holder_conn.recv()
            got = waiter_conn.recv()
            if i >= 2:
                times[mode].append((got - issued) / 1e6)
        for conn in (holder_conn, waiter_conn):
            conn.send(("stop",))
        for proc in procs:
            proc.join(timeout=10)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        HandoffJob.drop_collection()
        mongoengine.disconnect()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default=os.environ.get("MONGODB_URI"))
    parser.add_argument("--trials", type=int, default=40, help="per mode (at least 30)")
    parser.add_argument("--named", action="store_true", help="NamedLock instead of a document")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.trials < 30:
        parser.error("--trials must be at least 30")
    with ExitStack() as stack:
        uri = args.uri
        if not uri:
            from mongoengine_lockable.testing import MongodReplicaSet

            uri = stack.enter_context(MongodReplicaSet(1)).uri
        times = run(uri, args.trials, args.named, args.seed)
    what = "NamedLock.acquire(wait=10)" if args.named else "doc.lock(5, wait=10)"
    ours, polling = times["ours"], times["polling"]
    print(f"hand-off, release() issued -> waiter's grant, {args.trials} trials each:")
    for label, values in ((what, ours), ("polling, fixed 500 ms sleep", polling)):
        print(
            f"  {label:30s} p50 {percentile(values, 50):7.1f} ms   "
            f"p99 {percentile(values, 99):7.1f} ms   max {max(values):7.1f} ms"
        )
    print(
        f"ratio ours/polling: p50 {percentile(ours, 50) / percentile(polling, 50):.3f}, "
        f"p99 {percentile(ours, 99) / percentile(polling, 99):.3f}"
    )


if __name__ == "__main__":
    main()
