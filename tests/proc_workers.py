"""Worker processes for ``tests/test_processes.py``.

Each worker is a fresh interpreter started as::

    python tests/proc_workers.py COMMAND '{"uri": ..., "db": ..., ...}'

It connects MongoEngine itself (nothing is inherited from the parent), then
follows the line protocol of ``tests/_children.py`` on its standard streams:

- it prints ``READY`` once connected and waits for a line on stdin (``GO``), so
  that the parent can start all workers' work at the same moment; an empty
  stdin (the parent died) makes it exit instead;
- it writes its result as JSON to the file named by the ``out`` argument;
- errors go to stderr, and the exit status is non-zero.

The ``hold`` command prints ``HOLDING {json}`` once it holds its lease and then
blocks on stdin until EOF: the parent kills it with ``SIGKILL`` (and if the
parent dies first, the EOF ends it: no orphan keeps running).

The models live here (not in ``tests/models.py``) so that the workers need
nothing but this file, ``_children.py`` and the installed package.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Any, Callable

import mongoengine
from mongoengine import Document
from mongoengine.fields import IntField, StringField

from mongoengine_lockable import LockableMixin

if __package__:
    from . import _children
else:  # run as a script, or imported with tests/ on sys.path
    import _children


class ProcCounter(LockableMixin, Document):
    """One counter that many processes increment under its lease."""

    value = IntField(default=0)

    meta = {"collection": "proc_counters"}


class ProcTask(LockableMixin, Document):
    """A unit of work that exactly one worker must handle."""

    n = IntField(required=True)
    handled_by = StringField(default=None)

    # What a user draining a queue this way would declare: equality on
    # ``handled_by``, then the lease's range on ``locked_until``.
    meta = {"collection": "proc_tasks", "indexes": [("handled_by", "locked_until")]}


#: Where every handling of a :class:`ProcTask` is recorded, one document each
#: (a separate collection, so a double handling cannot overwrite the first).
HANDLED_COLLECTION = "proc_handled"

#: Lease length of a counter increment, in seconds (it takes milliseconds).
COUNTER_LEASE = 5


def write_result(args: dict[str, Any], result: dict[str, Any]) -> None:
    result["pid"] = os.getpid()
    tmp = args["out"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    os.replace(tmp, args["out"])


def pause(seconds: float) -> None:
    """The gap between read and write of the read-modify-write.

    ``0`` still yields the CPU (``time.sleep(0)``); a positive value is the
    upper bound of a random sleep, which makes a race without the lease certain.
    """
    time.sleep(random.uniform(0, seconds) if seconds > 0 else 0)


def cmd_counter(args: dict[str, Any]) -> None:
    """``iterations`` non-atomic increments of one counter (read with
    ``find_one``, pause, write value + 1 with ``update_one``), each inside a
    lease when ``locked``, else bare. Result: the fence of every acquisition."""
    counter = ProcCounter.objects.get(pk=args["counter_id"])
    collection = ProcCounter._get_collection()
    query = {"_id": counter.pk}
    _children.ready_then_wait_for_go()
    fences = []
    for _ in range(args["iterations"]):
        if args["locked"]:
            # wait=None: a worker may lose many races in a row; the parent's
            # join timeout is what bounds a hang.
            if not counter.lock(COUNTER_LEASE, wait=None):
                raise AssertionError("lock(wait=None) returned False")
            fences.append(counter.lock_fence)
        value = collection.find_one(query)["value"]
        pause(args["pause"])
        collection.update_one(query, {"$set": {"value": value + 1}})
        if args["locked"]:
            counter.release()
    write_result(args, {"fences": fences})


def cmd_drain(args: dict[str, Any]) -> None:
    """Claim unhandled tasks one at a time until none is left; mark each one
    handled (fenced) and record the handling in :data:`HANDLED_COLLECTION`."""
    worker = args["worker"]
    handled = mongoengine.get_db()[HANDLED_COLLECTION]
    _children.ready_then_wait_for_go()
    count = 0
    while True:
        task = ProcTask.objects(handled_by=None).claim(args["duration"])
        if task is None:
            break
        handled.insert_one(
            {"task": task.pk, "n": task.n, "worker": worker, "fence": task.lock_fence}
        )
        task.update_if_held(set__handled_by=worker)
        task.release()
        count += 1
    write_result(args, {"handled": count})


def cmd_hold(args: dict[str, Any]) -> None:
    """Lock a counter for ``duration`` seconds, report it, then block on stdin
    until the parent kills us (or EOF: the parent died)."""
    counter = ProcCounter.objects.get(pk=args["counter_id"])
    if not counter.lock(args["duration"]):
        raise AssertionError("the holder could not lock a free counter")
    report = {"fence": counter.lock_fence, "owner": counter.locked_by, "pid": os.getpid()}
    _children.say("HOLDING", **report)
    sys.stdin.read()
    sys.exit(4)  # not reached when killed, as the test means to


def cmd_contend(args: dict[str, Any]) -> None:
    """On GO: look whether the counter is held, then ``lock(duration,
    wait=wait)`` it and keep the lease (no release: the parent reads it)."""
    counter = ProcCounter.objects.get(pk=args["counter_id"])
    _children.ready_then_wait_for_go()
    held_at_go = counter.is_locked()
    started = time.monotonic()
    acquired = counter.lock(args["duration"], wait=args["wait"])
    waited = time.monotonic() - started
    write_result(
        args,
        {
            "acquired": acquired,
            "held_at_go": held_at_go,
            "waited": waited,
            "fence": counter.lock_fence if acquired else None,
            "owner": counter.locked_by if acquired else None,
        },
    )


COMMANDS: dict[str, Callable[[dict[str, Any]], None]] = {
    "counter": cmd_counter,
    "drain": cmd_drain,
    "hold": cmd_hold,
    "contend": cmd_contend,
}


if __name__ == "__main__":
    _children.run_worker(sys.argv[1:], COMMANDS, connected=True)
