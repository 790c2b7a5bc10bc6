"""Memory over many lease cycles: does the resident set grow?

Runs ``doc.lock()`` + ``doc.release()`` on one document, then
``NamedLock(...).acquire()`` + ``release()`` (a new ``NamedLock`` per cycle, as
``@exclusive`` makes one per call), ``--cycles`` times each, against a real
server. Lease writes use ``w=1`` (as a latency-bound benchmark should; the
default ``majority`` costs a commit-point wait per write on top). After
``--warmup`` cycles (connection pool, caches, the TTL index), the resident set
size is measured, then again after the cycles, each time after
``gc.collect()``; the growth is printed, with the number of objects the
garbage collector tracks and samples taken along the way.

    python benchmarks/memory.py [--uri URI] [--db NAME] [--cycles 100000]
                                [--warmup 2000] [--kind doc|named|both] [--json]

Without ``--uri`` (or ``MONGODB_URI``) a temporary single-node replica set is
started from the embedded mongod. ``tests/test_memory.py`` runs this script
with fewer cycles and ``--json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from contextlib import ExitStack
from typing import Any, Callable

import mongoengine
from pymongo.write_concern import WriteConcern

from mongoengine_lockable import LockableMixin, NamedLock

W1 = WriteConcern(w=1)
NAMED_COLLECTION = "bench_memory_named_locks"


class MemoryJob(LockableMixin, mongoengine.Document):
    payload = mongoengine.StringField()

    lock_write_concern = W1

    meta = {"collection": "bench_memory_jobs"}


def rss_bytes() -> int:
    """The resident set size of this process (psutil, else /proc/self/statm)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.Process().memory_info().rss)


def settled_rss() -> tuple[int, int]:
    """(RSS, objects tracked by the GC) after a full collection."""
    gc.collect()
    return rss_bytes(), len(gc.get_objects())


def doc_cycle() -> Callable[[], None]:
    MemoryJob.drop_collection()
    doc = MemoryJob(payload="memory").save()

    def cycle() -> None:
        if not doc.lock(30):
            raise AssertionError("lock() failed on a free document")
        doc.release()

    return cycle


def named_cycle() -> Callable[[], None]:
    mongoengine.get_db()[NAMED_COLLECTION].drop()

    def cycle() -> None:
        lock = NamedLock("memory-bench", 30, write_concern=W1, collection=NAMED_COLLECTION)
        if not lock.acquire():
            raise AssertionError("acquire() failed on a free name")
        lock.release()

    return cycle


def measure(cycle: Callable[[], None], cycles: int, warmup: int, samples: int = 10
            ) -> dict[str, Any]:
    for _ in range(warmup):
        cycle()
    rss_start, objects_start = settled_rss()
    trace = []
    every = max(1, cycles // samples)
    started = time.perf_counter()
    for i in range(1, cycles + 1):
        cycle()
        if i % every == 0 and i < cycles:
            trace.append([i, rss_bytes()])
    seconds = time.perf_counter() - started
    rss_end, objects_end = settled_rss()
    trace.append([cycles, rss_end])
    return {
        "cycles": cycles,
        "warmup": warmup,
        "seconds": round(seconds, 3),
        "cycles_per_second": round(cycles / seconds, 1),
        "rss_start": rss_start,
        "rss_end": rss_end,
        "rss_growth": rss_end - rss_start,
        "gc_objects_start": objects_start,
        "gc_objects_end": objects_end,
        "rss_trace": trace,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default=os.environ.get("MONGODB_URI"))
    parser.add_argument("--db", default=None, help="database to use (default: a scratch one)")
    parser.add_argument("--cycles", type=int, default=100_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--kind", choices=["doc", "named", "both"], default="both")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    kinds = {"doc": doc_cycle, "named": named_cycle}
    chosen = list(kinds) if args.kind == "both" else [args.kind]
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        uri = args.uri
        if not uri:
            from mongoengine_lockable.testing import MongodReplicaSet

            uri = stack.enter_context(MongodReplicaSet(1)).uri
        db_name = args.db or f"lockable_memory_bench_{os.getpid()}"
        mongoengine.connect(db=db_name, host=uri, uuidRepresentation="standard")
        stack.callback(mongoengine.disconnect)
        if args.db is None:
            stack.callback(lambda: mongoengine.get_connection().drop_database(db_name))
        results["rss_at_launch"] = rss_bytes()
        results["rss_source"] = "psutil" if _has_psutil() else "/proc/self/statm"
        for kind in chosen:
            results[kind] = measure(kinds[kind](), args.cycles, args.warmup)
    if args.json:
        print(json.dumps(results))
        return 0
    mib = 1024 * 1024
    print(f"RSS at launch: {results['rss_at_launch'] / mib:.1f} MiB ({results['rss_source']})")
    for kind in chosen:
        r = results[kind]
        print(
            f"{kind:5}: {r['cycles']} cycles in {r['seconds']:.1f} s "
            f"({r['cycles_per_second']:.0f}/s); RSS after {r['warmup']} warm-up cycles "
            f"{r['rss_start'] / mib:.2f} MiB, at the end {r['rss_end'] / mib:.2f} MiB, "
            f"growth {r['rss_growth'] / 1024:+.0f} KiB; "
            f"GC objects {r['gc_objects_start']} -> {r['gc_objects_end']}"
        )
        trace = ", ".join(f"{n}: {rss / mib:.2f}" for n, rss in r["rss_trace"])
        print(f"       RSS (MiB) along the way: {trace}")
    return 0


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
