"""Lease cycle cost: ``doc.lock()`` + ``doc.release()`` against raw pymongo.

Both sides make the same two conditional ``find_one_and_update`` calls on the
same server with the same write concern (``majority`` by default; ``--w 1``
shows the library's own CPU cost, which a majority commit otherwise hides): the
raw side is the floor any lease built on MongoDB pays. Short rounds of the two
alternate in one run, and the median of the rounds' ratios is printed last.

    python benchmarks/lock_cycle.py [--uri URI] [--rounds 60] [--cycles 50] [--w 1]

Without ``--uri`` (or ``MONGODB_URI``) a temporary single-node replica set is
started from the embedded mongod.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import ExitStack
from typing import Callable

import mongoengine
from pymongo import ReturnDocument, WriteConcern

from mongoengine_lockable import LockableMixin


class BenchJob(LockableMixin, mongoengine.Document):
    payload = mongoengine.StringField()


def raw_cycle(collection, doc_id, w="majority") -> Callable[[], None]:  # type: ignore[no-untyped-def]
    """The raw pymongo pair: grant if free by $$NOW, then release if mine."""
    coll = collection.with_options(write_concern=WriteConcern(w))

    def cycle() -> None:
        owner = os.urandom(6).hex()
        got = coll.find_one_and_update(
            {"_id": doc_id, "$expr": {"$lte": ["$locked_until", "$$NOW"]}},
            [{"$set": {"locked_until": {"$add": ["$$NOW", 30000]},
                       "locked_by": {"$literal": owner},
                       "lock_fence": {"$add": [{"$ifNull": ["$lock_fence", 0]}, 1]}}}],
            return_document=ReturnDocument.AFTER,
        )
        assert got is not None
        done = coll.find_one_and_update(
            {"_id": doc_id, "locked_by": owner, "lock_fence": got["lock_fence"],
             "$expr": {"$gt": ["$locked_until", "$$NOW"]}},
            {"$set": {"locked_until": None}},
            return_document=ReturnDocument.AFTER,
        )
        assert done is not None

    return cycle


def ours_cycle(doc: BenchJob) -> Callable[[], None]:
    def cycle() -> None:
        assert doc.lock(30)
        doc.release()

    return cycle


def per_cycle(cycle: Callable[[], None], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        cycle()
    return (time.perf_counter() - start) / n


def cycle_arguments(description: str) -> argparse.ArgumentParser:
    """The options of a cycle benchmark: ``--uri``, ``--rounds``, ``--cycles``, ``--w``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--uri", default=os.environ.get("MONGODB_URI"))
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--w", default="majority", help="write concern: majority or a number")
    return parser


def write_concern_option(args: argparse.Namespace) -> int | str:
    return int(args.w) if args.w.isdigit() else args.w


def connect(stack: ExitStack, uri: str | None) -> None:
    """Connect MongoEngine to ``uri``, or to a single-node replica set started
    from the embedded mongod for the run (``stack`` stops it)."""
    if not uri:
        from mongoengine_lockable.testing import MongodReplicaSet

        uri = stack.enter_context(MongodReplicaSet(1)).uri
    mongoengine.connect(db="lockable_bench", host=uri)
    stack.callback(mongoengine.disconnect)


def interleaved(
    first: Callable[[], None], second: Callable[[], None], rounds: int, cycles: int
) -> tuple[float, float, float]:
    """Warm both up, then alternate rounds of ``cycles`` of each (which goes
    first alternates too): the median seconds per cycle of each, and the
    median over the rounds of first/second. A round's two halves run a few
    hundred milliseconds apart, so the ratio within a round is not moved by
    the slow drifts of the machine (a majority write's journal flush takes
    2 ms at one moment and 4 ms a minute later)."""
    for warm in (first, second):
        per_cycle(warm, max(cycles, 50))
    first_t, second_t = [], []
    for i in range(rounds):
        if i % 2:
            second_t.append(per_cycle(second, cycles))
            first_t.append(per_cycle(first, cycles))
        else:
            first_t.append(per_cycle(first, cycles))
            second_t.append(per_cycle(second, cycles))
    ratio = statistics.median(f / s for f, s in zip(first_t, second_t))
    return statistics.median(first_t), statistics.median(second_t), ratio


def main() -> None:
    args = cycle_arguments(__doc__.splitlines()[0]).parse_args()
    w = write_concern_option(args)
    BenchJob.lock_write_concern = WriteConcern(w)
    with ExitStack() as stack:
        connect(stack, args.uri)
        BenchJob.drop_collection()
        ours_doc = BenchJob(payload="ours").save()
        raw_doc = BenchJob(payload="raw").save()
        ours = ours_cycle(ours_doc)
        raw = raw_cycle(BenchJob._get_collection(), raw_doc.pk, w)
        o, r, ratio = interleaved(ours, raw, args.rounds, args.cycles)
        BenchJob.drop_collection()
    print(f"lock()+release():       {o * 1e6:8.1f} us/cycle  ({1 / o:7.0f} cycles/s)")
    print(f"raw pymongo pair:       {r * 1e6:8.1f} us/cycle  ({1 / r:7.0f} cycles/s)")
    print(f"write concern w={w}")
    print(f"ratio ours/raw (median over {args.rounds} rounds of {args.cycles} cycles each): "
          f"{ratio:.3f}")


if __name__ == "__main__":
    main()
