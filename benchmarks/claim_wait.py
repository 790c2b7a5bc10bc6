"""Claims for workers: how soon a waiting ``claim()`` gets new work, and how
fast batches drain a queue.

1. Insert -> claim latency. A waiter process blocks in
   ``Item.objects(status="pending").claim(30, wait=10)`` on an empty queue; an
   inserter process inserts one pending document 50 ms plus a random 0-500 ms
   later (so that it falls at a random phase of the baseline's period). The
   latency runs from just before the inserter's ``insert_one`` to just after
   the waiter's claim returns (``time.time_ns()`` in each process; both run on
   this host). Three modes alternate trial by trial in one run:

   - ``claim(wait=10)``, the insert with write concern ``w=1`` (pymongo's
     default);
   - the same, the insert with write concern ``majority``;
   - polling: ``while (job := qs.claim(30)) is None: time.sleep(0.5)``, the loop
     users write without ``wait``.

2. Drain throughput. Four processes drain a queue of ``--drain-docs`` pending
   documents; each marks what it claims done with ``update_if_held`` (the
   update moves the document out of the queue, so no release is needed).
   Rounds alternate between ``claim_many(10)`` and one ``claim()`` per
   document; documents per second from the common start to the last worker's
   end. Each worker counts the commands it sends and the time they take, by
   command name, which shows where the round trips go.

p50 and p99 (latency) and the median over rounds (throughput) are printed,
with the ratios last.

    python benchmarks/claim_wait.py [--uri URI] [--trials 40] [--drain-docs 1000]
                                    [--rounds 6] [--only latency|drain]

Without ``--uri`` (or ``MONGODB_URI``) a temporary single-node replica set is
started from the embedded mongod.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import random
import statistics
import time
from collections import Counter
from contextlib import ExitStack
from typing import Any

import mongoengine
from pymongo import WriteConcern, monitoring

from mongoengine_lockable import LockableMixin

DB_NAME = "lockable_bench_claim_wait"
LEASE = 30
WAIT = 10
POLL_INTERVAL = 0.5
BATCH = 10
WORKERS = 4
MODES = ("claim(wait=10), insert w=1", "claim(wait=10), insert majority",
         "polling, fixed 500 ms sleep")
DRAINS = ("claim_many(10) + update_if_held", "claim() + update_if_held")


class Item(LockableMixin, mongoengine.Document):
    status = mongoengine.StringField(default="pending")
    n = mongoengine.IntField()

    meta = {"collection": "bench_claim_items", "indexes": [("status", "locked_until")]}


def _connect(uri: str, **options: Any) -> None:
    mongoengine.connect(db=DB_NAME, host=uri, uuidRepresentation="standard", **options)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# -- 1. insert -> claim ------------------------------------------------------------------


def waiter_main(conn: Any, uri: str) -> None:
    """On ``wait``: say so, claim by ``mode``, report when the claim returned,
    then mark the item done (out of the queue)."""
    _connect(uri)
    pending = Item.objects(status="pending")
    Item.objects.first()  # connect before the first trial
    conn.send("ready")
    while True:
        message = conn.recv()
        if message[0] != "wait":
            return
        conn.send("waiting")
        if message[1] == MODES[2]:
            while (job := pending.claim(LEASE)) is None:
                time.sleep(POLL_INTERVAL)
        else:
            job = pending.claim(LEASE, wait=WAIT)
            if job is None:
                raise SystemExit("waiter: nothing claimed within the wait")
        got = time.time_ns()
        job.update_if_held(set__status="done")
        conn.send(got)


def inserter_main(conn: Any, uri: str) -> None:
    """On ``insert``: sleep the given seconds, then insert one pending item
    with the given write concern; report when the insert was issued."""
    _connect(uri)
    collection = Item._get_collection()
    by_w = {"1": collection.with_options(write_concern=WriteConcern(w=1)),
            "majority": collection.with_options(write_concern=WriteConcern(w="majority"))}
    conn.send("ready")
    n = 0
    while True:
        message = conn.recv()
        if message[0] != "insert":
            return
        time.sleep(message[1])
        n += 1
        issued = time.time_ns()
        by_w[message[2]].insert_one({"status": "pending", "n": n})
        conn.send(issued)


def run_latency(uri: str, trials: int, seed: int) -> dict[str, list[float]]:
    _connect(uri)
    Item.drop_collection()
    Item.ensure_indexes()
    ctx = multiprocessing.get_context("spawn")
    waiter_conn, waiter_end = ctx.Pipe()
    inserter_conn, inserter_end = ctx.Pipe()
    procs = [ctx.Process(target=waiter_main, args=(waiter_end, uri), daemon=True),
             ctx.Process(target=inserter_main, args=(inserter_end, uri), daemon=True)]
    rng = random.Random(seed)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        for proc in procs:
            proc.start()
        for conn in (waiter_conn, inserter_conn):
            assert conn.recv() == "ready"
        # One warm-up trial per mode, then the modes alternate.
        plan = list(MODES) + list(MODES) * trials
        for i, mode in enumerate(plan):
            waiter_conn.send(("wait", mode))
            assert waiter_conn.recv() == "waiting"
            w = "majority" if mode == MODES[1] else "1"
            inserter_conn.send(("insert", 0.05 + rng.uniform(0, POLL_INTERVAL), w))
            issued = inserter_conn.recv()
            got = waiter_conn.recv()
            if i >= len(MODES):
                times[mode].append((got - issued) / 1e6)
        for conn in (waiter_conn, inserter_conn):
            conn.send(("stop",))
        for proc in procs:
            proc.join(timeout=10)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        Item.drop_collection()
        mongoengine.disconnect()
    return times


# -- 2. drain throughput -------------------------------------------------------------------


class Commands(monitoring.CommandListener):
    """Counts the commands a worker sends, and their time, by name."""

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.micros: Counter[str] = Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self.count[event.command_name] += 1
        self.micros[event.command_name] += event.duration_micros

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.count[event.command_name] += 1
        self.micros[event.command_name] += event.duration_micros


def drainer_main(conn: Any, uri: str) -> None:
    """On ``drain``: wait for the common start, drain by ``mode`` until the
    queue is empty; report the count, the end time and the commands sent."""
    commands = Commands()
    _connect(uri, event_listeners=[commands])
    pending = Item.objects(status="pending")
    Item.objects.first()
    conn.send("ready")
    while True:
        message = conn.recv()
        if message[0] != "drain":
            return
        _, mode, start = message
        commands.count.clear()
        commands.micros.clear()
        time.sleep(max(start - time.time(), 0))
        done = calls = 0
        while True:
            calls += 1
            if mode == DRAINS[0]:
                batch = pending.claim_many(BATCH, LEASE)
            else:
                job = pending.claim(LEASE)
                batch = [] if job is None else [job]
            if not batch:
                break
            for job in batch:
                job.update_if_held(set__status="done")
                done += 1
        conn.send((done, time.time(), dict(commands.count), dict(commands.micros), calls))


def run_drain(uri: str, docs: int, rounds: int) -> dict[str, Any]:
    _connect(uri)
    Item.drop_collection()
    Item.ensure_indexes()
    collection = Item._get_collection()
    ctx = multiprocessing.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(WORKERS)]
    procs = [ctx.Process(target=drainer_main, args=(end, uri), daemon=True)
             for _, end in pipes]
    rates: dict[str, list[float]] = {mode: [] for mode in DRAINS}
    count: dict[str, Counter[str]] = {mode: Counter() for mode in DRAINS}
    micros: dict[str, Counter[str]] = {mode: Counter() for mode in DRAINS}
    calls: Counter[str] = Counter()
    try:
        for proc in procs:
            proc.start()
        for conn, _ in pipes:
            assert conn.recv() == "ready"
        for _ in range(rounds):
            for mode in DRAINS:
                collection.delete_many({})
                collection.insert_many([{"status": "pending", "n": n} for n in range(docs)])
                start = time.time() + 0.2
                for conn, _ in pipes:
                    conn.send(("drain", mode, start))
                replies = [conn.recv() for conn, _ in pipes]
                done = sum(r[0] for r in replies)
                if done != docs:
                    raise SystemExit(f"{mode}: {done} of {docs} documents drained")
                rates[mode].append(docs / (max(r[1] for r in replies) - start))
                for reply in replies:
                    count[mode].update(reply[2])
                    micros[mode].update(reply[3])
                    calls[mode] += reply[4]
        for conn, _ in pipes:
            conn.send(("stop",))
        for proc in procs:
            proc.join(timeout=10)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        Item.drop_collection()
        mongoengine.disconnect()
    return {"rates": rates, "count": count, "micros": micros, "calls": calls,
            "total": docs * rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default=os.environ.get("MONGODB_URI"))
    parser.add_argument("--trials", type=int, default=40, help="per mode (at least 30)")
    parser.add_argument("--drain-docs", type=int, default=1000, help="per drain round")
    parser.add_argument("--rounds", type=int, default=6, help="drain rounds per mode")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", choices=("latency", "drain"), help="run one part")
    args = parser.parse_args()
    if args.trials < 30:
        parser.error("--trials must be at least 30")
    with ExitStack() as stack:
        uri = args.uri
        if not uri:
            from mongoengine_lockable.testing import MongodReplicaSet

            uri = stack.enter_context(MongodReplicaSet(1)).uri
        times = None if args.only == "drain" else run_latency(uri, args.trials, args.seed)
        drain = None if args.only == "latency" else run_drain(uri, args.drain_docs, args.rounds)
    if times is not None:
        report_latency(times, args.trials)
    if drain is not None:
        report_drain(drain, args.drain_docs, args.rounds)


def report_latency(times: dict[str, list[float]], trials: int) -> None:
    print(f"insert -> waiting claim() returns, {trials} trials each:")
    for mode in MODES:
        values = times[mode]
        print(f"  {mode:34s} p50 {percentile(values, 50):7.1f} ms   "
              f"p99 {percentile(values, 99):7.1f} ms   max {max(values):7.1f} ms")
    polling = times[MODES[2]]
    for mode in MODES[:2]:
        print(f"ratio {mode} / polling: p50 "
              f"{percentile(times[mode], 50) / percentile(polling, 50):.3f}, p99 "
              f"{percentile(times[mode], 99) / percentile(polling, 99):.3f}")



def report_drain(drain: dict[str, Any], docs: int, rounds: int) -> None:
    print(f"drain, {WORKERS} processes, {docs} documents per round, "
          f"{rounds} rounds per mode (alternating):")
    for mode in DRAINS:
        rates = drain["rates"][mode]
        per_doc = {name: n / drain["total"] for name, n in drain["count"][mode].items()}
        spent = {name: us / 1000 / drain["total"] for name, us in drain["micros"][mode].items()}
        print(f"  {mode:34s} {statistics.median(rates):7.0f} docs/s "
              f"(rounds: {', '.join(f'{r:.0f}' for r in rates)}); "
              f"{drain['total'] / drain['calls'][mode]:.1f} documents per call")
        for name in sorted(per_doc, key=lambda k: -spent[k]):
            print(f"      {name:16s} {per_doc[name]:5.2f} commands/doc  "
                  f"{spent[name]:6.3f} ms/doc")
    many, single = (statistics.median(drain["rates"][mode]) for mode in DRAINS)
    print(f"ratio claim_many(10) / claim(): {many / single:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
