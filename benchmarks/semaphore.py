"""Semaphore cycle cost: ``NamedSemaphore`` acquire + release against ``NamedLock``'s.

Both sides are one conditional upsert to acquire and one conditional
``findAndModify`` to release, on the same server with the same write concern
(``majority`` by default; ``--w 1`` shows the CPU cost of the pipelines,
which a majority commit otherwise hides). The semaphore's record carries
``--others`` other live holders (default 1 of a limit of 3), so that its
pipelines have holders to go through. Short rounds of the two alternate in
one run, and the median of the rounds' ratios is printed last.

    python benchmarks/semaphore.py [--uri URI] [--rounds 60] [--cycles 50] [--w 1]
                                   [--limit 3] [--others 1]

Without ``--uri`` (or ``MONGODB_URI``) a temporary single-node replica set is
started from the embedded mongod.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Callable, Union

import mongoengine
from lock_cycle import connect, cycle_arguments, interleaved, write_concern_option
from pymongo import WriteConcern

from mongoengine_lockable import NamedLock, NamedSemaphore
from mongoengine_lockable._named import DEFAULT_COLLECTION


def cycle_of(lock: Union[NamedLock, NamedSemaphore]) -> Callable[[], None]:
    def cycle() -> None:
        assert lock.acquire()
        lock.release()

    return cycle


def main() -> None:
    parser = cycle_arguments(__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--others", type=int, default=1,
                        help="other live holders of the semaphore during the run")
    args = parser.parse_args()
    w = write_concern_option(args)
    concern = WriteConcern(w)
    with ExitStack() as stack:
        connect(stack, args.uri)
        records = mongoengine.get_db()[DEFAULT_COLLECTION]
        records.drop()
        stack.callback(records.drop)
        others = [NamedSemaphore("bench-semaphore", args.limit, 3600, write_concern=concern)
                  for _ in range(args.others)]
        for other in others:
            assert other.acquire()
        semaphore = cycle_of(NamedSemaphore("bench-semaphore", args.limit, 30,
                                            write_concern=concern))
        lock = cycle_of(NamedLock("bench-lock", 30, write_concern=concern))
        s, n, ratio = interleaved(semaphore, lock, args.rounds, args.cycles)
        for other in others:
            other.release()
    print(f"NamedSemaphore acquire+release: {s * 1e6:8.1f} us/cycle  ({1 / s:7.0f} cycles/s)"
          f"  limit {args.limit}, {args.others} other holder(s)")
    print(f"NamedLock acquire+release:      {n * 1e6:8.1f} us/cycle  ({1 / n:7.0f} cycles/s)")
    print(f"write concern w={w}")
    print(f"ratio semaphore/lock (median over {args.rounds} rounds of {args.cycles} cycles "
          f"each): {ratio:.3f}")


if __name__ == "__main__":
    main()
