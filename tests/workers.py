"""The worker processes of the tests: every command a test starts as a process.

A test that needs real concurrency, a process to kill or a process with a
wrong clock starts its workers as fresh interpreters running this script::

    python tests/workers.py COMMAND '{"uri": ..., "db": ..., ...}'

(through :class:`_children.Children`, which runs it from the repository's
root, under ``faketime`` for the clock-skew workers). A worker inherits
nothing from the parent: it connects MongoEngine itself, either before its
command runs (``connected`` in :data:`COMMANDS`) or in the command, with the
client options it needs. It needs nothing but this file, ``_children.py``
(the line protocol on its standard streams), ``models.py`` (the document
classes it shares with its test), ``_recipes.py`` and the installed package.

The commands, grouped by the test module that starts them; each one's row in
:data:`COMMANDS` says whether it is connected first and after how many
seconds a watchdog ends it, whatever it is doing:

- ``test_processes.py``: ``proc_counter``, ``proc_drain``, ``proc_hold``,
  ``proc_contend``; they write their result as JSON to the file named by the
  ``out`` argument;
- ``test_failover.py`` and ``test_clock_skew.py``: ``failover`` (a loop that
  stops by itself: when the ``stop`` file exists, when its parent is gone, or
  after ``max_seconds``) and ``clock_skew`` (run under ``faketime``);
- ``test_keepalive.py``: ``keepalive_probe``;
- ``test_fairness.py``: ``fair_waiter``;
- ``test_waiting.py``: ``lease_holder``, ``lease_waiter``;
- ``test_shared_locks.py``: ``semaphore_cycle``, ``semaphore_holder``,
  ``semaphore_waiter``, ``rw_cycle``;
- ``test_aio.py``: ``aio_holds``;
- ``test_worker_claims.py``: ``claim_drain_many``, ``claim_wait``,
  ``claim_keepalive``;
- ``test_recipes.py``: ``recipe_batch_worker``, ``recipe_scheduler_host``;
- ``test_exclusive.py``: ``exclusive_ticker``;
- ``test_celery.py``: ``celery_worker``, which replaces itself with a Celery
  worker of ``tests/celery_app.py``.

The values a worker and its test must agree on (collections, schedules) are
defined here, and the tests import them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import select
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import mongoengine
from bson import ObjectId
from pymongo import monitoring
from pymongo.errors import PyMongoError

from mongoengine_lockable import (
    LockError,
    NamedLock,
    NamedSemaphore,
    ReadWriteLock,
    exclusive,
    signals,
)

from _children import Worker, connect, hear, ready_then_wait_for_go, run_worker, say
from _recipes import load
from models import ClaimTask, FailoverDoc, FairJob, KeepJob, ProcCounter, ProcTask, SkewDoc, WaitJob

# -- test_processes.py: counters, a queue and a killed holder --------------------------------

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


def proc_counter(args: dict[str, Any]) -> None:
    """``iterations`` non-atomic increments of one counter (read with
    ``find_one``, pause, write value + 1 with ``update_one``), each inside a
    lease when ``locked``, else bare. Result: the fence of every acquisition."""
    counter = ProcCounter.objects.get(pk=args["counter_id"])
    collection = ProcCounter._get_collection()
    query = {"_id": counter.pk}
    ready_then_wait_for_go()
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


def proc_drain(args: dict[str, Any]) -> None:
    """Claim unhandled tasks one at a time until none is left; mark each one
    handled (fenced) and record the handling in :data:`HANDLED_COLLECTION`."""
    worker = args["worker"]
    handled = mongoengine.get_db()[HANDLED_COLLECTION]
    ready_then_wait_for_go()
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


def proc_hold(args: dict[str, Any]) -> None:
    """Lock a counter for ``duration`` seconds, report it (``HOLDING {json}``),
    then block on stdin until the parent kills us (or EOF: the parent died)."""
    counter = ProcCounter.objects.get(pk=args["counter_id"])
    if not counter.lock(args["duration"]):
        raise AssertionError("the holder could not lock a free counter")
    report = {"fence": counter.lock_fence, "owner": counter.locked_by, "pid": os.getpid()}
    say("HOLDING", **report)
    sys.stdin.read()
    sys.exit(4)  # not reached when killed, as the test means to


def proc_contend(args: dict[str, Any]) -> None:
    """On GO: look whether the counter is held, then ``lock(duration,
    wait=wait)`` it and keep the lease (no release: the parent reads it)."""
    counter = ProcCounter.objects.get(pk=args["counter_id"])
    ready_then_wait_for_go()
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


# -- test_failover.py: hold and release a lease over and over --------------------------------

#: The errors the fail-over workers expect, count and survive.
EXPECTED_ERRORS = (LockError, PyMongoError)


def handshake(args: dict[str, Any]) -> None:
    """With ``"handshake": true``: tell the parent we are connected; start
    when it says so."""
    if args.get("handshake"):
        ready_then_wait_for_go()


class Stopper:
    """When a looping worker should stop: the parent's ``stop`` file exists,
    the parent is gone, or ``max_seconds`` have passed."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.stop_file = args.get("stop")
        self.parent = os.getppid()
        self.deadline = time.monotonic() + float(args.get("max_seconds", 120))

    def __call__(self) -> bool:
        if self.stop_file and os.path.exists(self.stop_file):
            return True
        return os.getppid() != self.parent or time.monotonic() > self.deadline


class JsonLines:
    """Appends one JSON object per line to a file, flushed at once, so that
    the parent can read it while the worker runs (and after a SIGKILL)."""

    def __init__(self, path: str) -> None:
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, **record: Any) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class LogToLines(logging.Handler):
    """Writes the library's warnings (e.g. "outcome of a lease change unknown;
    reading it back") as ``{"event": "log"}`` records."""

    def __init__(self, lines: JsonLines) -> None:
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.write(
            event="log", t=record.created, logger=record.name, msg=record.getMessage()[:300]
        )


class FailedCommands(monitoring.CommandListener):
    """Writes every command that failed at the driver level (a timeout, a
    "not primary" reply), including those the driver then retried itself."""

    def __init__(self, lines: JsonLines) -> None:
        self.lines = lines

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        failure = event.failure or {}
        kind = failure.get("errtype") or failure.get("codeName") or "?"
        self.lines.write(event="cmd_failed", t=time.time(), cmd=event.command_name, kind=kind)


def describe(exc: BaseException) -> dict[str, Any]:
    """An error as recorded: type, message and, if unexpected, the traceback."""
    out: dict[str, Any] = {"type": type(exc).__name__, "msg": str(exc)[:300]}
    if not isinstance(exc, EXPECTED_ERRORS):
        out["unexpected"] = True
        out["tb"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:]
    return out


def failover(args: dict[str, Any]) -> None:
    """Loop: take the lease (``lock(lease, wait=wait)`` on the document,
    ``NamedLock.acquire(wait=wait)``, or for ``kind="semaphore"`` a share of a
    ``NamedSemaphore`` of ``limit``), hold it ``hold`` seconds, release it.

    Every hold is written to ``out`` as ``{"event": "hold", kind, fence,
    t_acquired, t_release_start, ok}`` where ``ok`` says whether ``release()``
    returned without error; ``t_acquired`` is taken after the acquisition
    returned and ``t_release_start`` before the release is sent (wall clock,
    shared by all processes of the machine). Errors and unsuccessful waits are
    written as events too; nothing goes to the database, which is failing over.
    """
    log = JsonLines(args["out"])
    connect(args, event_listeners=[FailedCommands(log)])
    kind = args["kind"]
    lease, wait = args["lease"], args["wait"]
    hold_min, hold_max = args["hold"]
    logging.getLogger("mongoengine_lockable").addHandler(LogToLines(log))
    stop = Stopper(args)
    named: NamedLock | NamedSemaphore | None = None
    if kind == "named":
        named = NamedLock(args["name"], lease)
    elif kind == "semaphore":
        named = NamedSemaphore(args["name"], args["limit"], lease)
    doc = FailoverDoc.objects.get(pk=args["doc_id"]) if kind == "doc" else None
    handshake(args)
    while not stop():
        t_try = time.time()
        try:
            if named is not None:
                got = named.acquire(wait=wait)
                fence = named.fence
            else:
                assert doc is not None
                got = doc.lock(lease, wait=wait)
                fence = doc.lock_fence
        except Exception as exc:
            log.write(event="error", op="acquire", t=time.time(), t_try=t_try, **describe(exc))
            time.sleep(0.05)
            continue
        if not got:
            log.write(event="unavailable", t=time.time(), t_try=t_try)
            continue
        t_acquired = time.time()
        time.sleep(random.uniform(hold_min, hold_max))
        t_release_start = time.time()
        ok = True
        try:
            if named is not None:
                named.release()
            else:
                assert doc is not None
                doc.release()
        except Exception as exc:
            ok = False
            log.write(event="error", op="release", t=time.time(), fence=fence, **describe(exc))
        log.write(
            event="hold",
            kind=kind,
            fence=fence,
            t_try=t_try,
            t_acquired=t_acquired,
            t_release_start=t_release_start,
            t_released=time.time(),
            ok=ok,
        )
    log.write(event="stopped", t=time.time())
    log.close()


# -- test_clock_skew.py: a process whose wall clock is hours off -----------------------------


def server_now(collection: Any, pk: Any) -> Any:
    """The server's ``$$NOW``, read through ``collection``'s document ``pk``."""
    rows = list(collection.aggregate([{"$match": {"_id": pk}}, {"$project": {"now": "$$NOW"}}]))
    return rows[0]["now"]


def report(**fields: Any) -> None:
    """Send one ``REPORT {json}`` line to the parent (datetimes in ISO format)
    and wait for its go-ahead."""
    say("REPORT", **fields)
    hear()


def clock_skew(args: dict[str, Any]) -> None:
    """Under ``faketime``: report the skewed clock, try to take leases that a
    normal-clock process holds, then take leases of our own and report them.

    First report: ``time`` (``time.time()``), ``utcnow`` (the datetime the
    library's client clock would use) and the outcomes of ``lock()``,
    ``claim()`` and ``NamedLock.acquire()`` on the held leases.
    Second report: our own leases of ``lease`` seconds: the stored document
    (``locked_until``, fence) and the named-lock record (``locked_until``,
    ``acquired_at``), each with the server's ``$$NOW`` read right before and
    right after the grant. Then it exits, leaving both leases to run out.
    """
    connect(args)
    held = SkewDoc.objects.get(pk=args["held_doc"])
    # Only held documents are in group "held-claim" (another than the one
    # for lock(), so that each attempt meets a lease of the normal process).
    claimed = SkewDoc.objects(group="held-claim").claim(args["lease"])
    report(
        time=time.time(),
        utcnow=datetime.now(timezone.utc).replace(tzinfo=None),
        lock=held.lock(args["lease"]),
        claim=None if claimed is None else str(claimed.pk),
        acquire=NamedLock(args["held_name"], args["lease"]).acquire(),
    )
    own = SkewDoc.objects.get(pk=args["own_doc"])
    collection = SkewDoc._get_collection()
    # The server's clock read just before and just after each grant brackets
    # the grant's own server time.
    doc_before = server_now(collection, own.pk)
    doc_ok = own.lock(args["lease"])
    doc_after = server_now(collection, own.pk)
    named = NamedLock(args["own_name"], args["lease"])
    named_before = server_now(collection, own.pk)
    named_ok = named.acquire()
    named_after = server_now(collection, own.pk)
    record = mongoengine.get_db()["lockable_named_locks"].find_one({"_id": args["own_name"]})
    report(
        doc_ok=doc_ok,
        doc_locked_until=own.locked_until,
        doc_fence=own.lock_fence,
        doc_before=doc_before,
        doc_after=doc_after,
        named_ok=named_ok,
        named_fence=named.fence,
        named_locked_until=record["locked_until"] if record else None,
        named_acquired_at=record["acquired_at"] if record else None,
        named_before=named_before,
        named_after=named_after,
    )


# -- test_keepalive.py: a process trying to take a lease kept alive --------------------------


def keepalive_probe(args: dict[str, Any]) -> None:
    """On ``GO``, try to take the lease (no wait) every 0.1 s until ``STOP``;
    report the tries, the successes and the span of time they covered."""
    if args["kind"] == "document":
        doc = KeepJob.objects.get(pk=ObjectId(args["pk"]))
        take, release = (lambda: doc.lock(5)), doc.release
    else:
        lock = NamedLock(args["name"], duration=5)
        take, release = (lambda: lock.acquire()), lock.release
    ready_then_wait_for_go()
    tries = taken = 0
    first = time.monotonic()
    while True:
        tries += 1
        if take():
            taken += 1
            release()
        if select.select([sys.stdin], [], [], 0.1)[0]:
            break
    say("RESULT", tries=tries, taken=taken, span=time.monotonic() - first)


# -- test_fairness.py: waiters served in the order they queued -------------------------------


def _fair_lease(args: dict[str, Any]) -> tuple[Callable[[float], bool], Callable[[], None],
                                               Callable[[], int]]:
    """``(take(wait), release(), fence())`` of the test's document or named lock."""
    if args["kind"] == "document":
        doc = FairJob.objects.get(pk=ObjectId(args["pk"]))
        return ((lambda wait: doc.lock(args["lease"], wait=wait)), doc.release,
                lambda: doc.lock_fence)
    lock = NamedLock(args["name"], args["lease"])
    return (lambda wait: lock.acquire(wait=wait)), lock.release, lambda: lock.fence or 0


def fair_waiter(args: dict[str, Any]) -> None:
    """On ``GO``: wait for the lease; report; hold it ``hold`` seconds; release."""
    take, release, fence = _fair_lease(args)
    ready_then_wait_for_go()
    say("WAITING")
    taken = take(args["wait"])
    say("RESULT", taken=taken, fence=fence() if taken else None, at=time.time())
    if taken:
        time.sleep(args.get("hold", 0.05))
        release()
        say("RELEASED")
    hear()  # until the parent closes stdin


# -- test_waiting.py: a holder and a waiter of one lease -------------------------------------


def _waited_lease(args: dict[str, Any]) -> tuple[Callable[..., bool], Callable[[], None]]:
    """``(take(wait) -> bool, release())`` for the document or the named lock."""
    if args["kind"] == "document":
        doc = WaitJob.objects.get(pk=ObjectId(args["pk"]))
        return (lambda wait: doc.lock(args["duration"], wait=wait)), doc.release
    lock = NamedLock(args["name"], duration=args["duration"])
    return (lambda wait: lock.acquire(wait=wait)), lock.release


def lease_holder(args: dict[str, Any]) -> None:
    """Take the lease, say ``HOLDING``; on ``RELEASE`` release it, saying
    when the release was issued; then block until killed or EOF."""
    take, release = _waited_lease(args)
    before = time.time()
    taken = take(0)
    say("HOLDING", taken=taken, before=before)
    if hear() == "RELEASE":
        issued = time.time()
        release()
        say("RELEASED", issued=issued)
    hear()


def lease_waiter(args: dict[str, Any]) -> None:
    """On ``GO``, say ``WAITING`` and wait for the lease; report when it came."""
    take, _ = _waited_lease(args)
    ready_then_wait_for_go()
    started = time.time()
    say("WAITING", started=started)
    taken = take(args["wait"])
    say("RESULT", taken=taken, started=started, ended=time.time())


# -- test_shared_locks.py: semaphores and read-write locks -----------------------------------


def semaphore_cycle(args: dict[str, Any]) -> None:
    """Take the semaphore ``rounds`` times (waiting), hold it ``hold``
    seconds each time; report every hold with monotonic times."""
    sem = NamedSemaphore(args["name"], args["limit"], args["duration"])
    ready_then_wait_for_go()
    holds = []
    for _ in range(args["rounds"]):
        t_try = time.monotonic()
        got = sem.acquire(wait=args["wait"])
        t_acq = time.monotonic()
        if not got:
            holds.append({"got": False, "t_try": t_try})
            continue
        time.sleep(random.uniform(*args["hold"]))
        t_rel = time.monotonic()
        sem.release()
        holds.append({"got": True, "t_try": t_try, "t_acq": t_acq, "t_rel": t_rel,
                      "fence": sem.fence})
    say("DONE", holds=holds)


def semaphore_holder(args: dict[str, Any]) -> None:
    """Take a share and say ``HOLDING`` (with the monotonic time before the
    attempt); then block until killed or EOF."""
    sem = NamedSemaphore(args["name"], args["limit"], args["duration"])
    before = time.monotonic()
    say("HOLDING", taken=sem.acquire(), before=before, owner=sem.owner)
    hear()


def semaphore_waiter(args: dict[str, Any]) -> None:
    """On ``GO``, wait for a share; report when it came."""
    sem = NamedSemaphore(args["name"], args["limit"], args["duration"])
    ready_then_wait_for_go()
    started = time.monotonic()
    taken = sem.acquire(wait=args["wait"])
    say("RESULT", taken=taken, started=started, ended=time.monotonic(), owner=sem.owner,
        holders=NamedSemaphore.holders(args["name"]))


def rw_cycle(args: dict[str, Any]) -> None:
    """Readers: hold a read share over and over until the ``stop`` file
    exists. Writers: ``rounds`` times, wait for the write share, hold it,
    pause. Every hold is reported at the end."""
    rw = ReadWriteLock(args["name"], args["duration"])
    ready_then_wait_for_go()
    time.sleep(args.get("delay", 0))
    holds = []
    rounds = 0
    while True:
        if args["mode"] == "read" and os.path.exists(args["stop"]):
            break
        if args["mode"] == "write" and rounds == args["rounds"]:
            break
        rounds += 1
        holder = rw.reader() if args["mode"] == "read" else rw.writer()
        t_try = time.monotonic()
        got = holder.acquire(wait=args["wait"])
        t_acq = time.monotonic()
        if got:
            time.sleep(random.uniform(*args["hold"]))
            t_rel = time.monotonic()
            holder.release()
            holds.append({"got": True, "t_try": t_try, "t_acq": t_acq, "t_rel": t_rel,
                          "fence": holder.fence})
        else:
            holds.append({"got": False, "t_try": t_try, "t_acq": t_acq})
        time.sleep(args.get("pause", 0))
    say("DONE", holds=holds)


# -- test_aio.py: asyncio and blocking locks on one name -------------------------------------


def aio_holds(args: dict[str, Any]) -> None:
    """Take ``name`` ``count`` times, waiting, with a blocking ``NamedLock``
    (``mode`` "sync") or an ``AsyncNamedLock`` ("async"), holding each for
    ``hold`` seconds; print ``HOLDS {holds}`` (wall-clock times)."""
    name, count, hold = args["name"], args["count"], args["hold"]
    if args["mode"] == "sync":
        warm = NamedLock(f"warm-{os.getpid()}", 5)
        assert warm.acquire()
        warm.release()
        ready_then_wait_for_go()
        lock = NamedLock(name, 30, wait=None)
        holds = []
        for _ in range(count):
            t_try = time.time()
            assert lock.acquire()
            t_acq = time.time()
            time.sleep(hold)
            holds.append({"t_try": t_try, "t_acq": t_acq, "t_rel": time.time(),
                          "fence": lock.fence, "mode": "sync"})
            lock.release()
        say("HOLDS", holds=holds)
        return

    # Imported here: the asyncio API needs a pymongo that the other commands do not.
    from mongoengine_lockable.aio import AsyncNamedLock

    async def main() -> list[dict[str, Any]]:
        warm = AsyncNamedLock(f"warm-{os.getpid()}", 5)
        assert await warm.acquire()
        await warm.release()
        await asyncio.get_running_loop().run_in_executor(None, ready_then_wait_for_go)
        lock = AsyncNamedLock(name, 30, wait=None)
        holds = []
        for _ in range(count):
            t_try = time.time()
            assert await lock.acquire()
            t_acq = time.time()
            await asyncio.sleep(hold)
            holds.append({"t_try": t_try, "t_acq": t_acq, "t_rel": time.time(),
                          "fence": lock.fence, "mode": "async"})
            await lock.release()
        return holds

    say("HOLDS", holds=asyncio.run(main()))


# -- test_worker_claims.py: claim_many, waiting claims, keepalive ----------------------------

#: Where each handling of a :class:`ClaimTask` is recorded, one document per
#: handling (a separate collection, so that a second handling cannot
#: overwrite the first).
CLAIMS_HANDLED = "claim_handled"

#: Hang guard of the whole drain of ``claim_drain_many`` workers, on a loaded
#: machine; their watchdog gives them a minute more.
CLAIMS_DRAIN_TIMEOUT = 240.0


def claim_drain_many(args: dict[str, Any]) -> None:
    """Take batches of ``size`` pending tasks until none is left; record,
    mark done (fenced) and release each one."""
    worker = args["worker"]
    handled = mongoengine.get_db()[CLAIMS_HANDLED]
    ready_then_wait_for_go()
    count = rounds = 0
    while True:
        batch = ClaimTask.objects(status="pending").claim_many(args["size"], 30, owner=worker)
        if not batch:
            break
        rounds += 1
        for task in batch:
            handled.insert_one({"task": task.pk, "worker": worker, "fence": task.lock_fence})
            task.update_if_held(set__status="done", set__handled_by=worker)
            task.release()
            count += 1
    say("DONE", handled=count, rounds=rounds)


def claim_wait(args: dict[str, Any]) -> None:
    """Claim a pending task, waiting up to ``wait`` seconds for one."""
    waited: list[float] = []

    def on_acquired(sender: Any, **kwargs: Any) -> None:
        waited.append(kwargs["waited"])

    signals.lock_acquired.connect(on_acquired, sender=ClaimTask, weak=False)
    ClaimTask.objects.first()  # connect and warm up before saying WAITING
    say("WAITING")
    task = ClaimTask.objects(status="pending").claim(5, wait=args["wait"])
    returned = time.time()
    if task is None:
        say("NONE", returned=returned)
        return
    say("CLAIMED", n=task.n, owner=task.locked_by, fence=task.lock_fence, returned=returned,
        waited=waited[0])
    task.release()


def claim_keepalive(args: dict[str, Any]) -> None:
    """Claim the task with a 1 s lease kept alive, work 3 s, then write the
    result under the lease and release it."""
    task = ClaimTask.objects(status="pending").claim(1, keepalive=True)
    if task is None:
        raise AssertionError("nothing to claim")
    say("CLAIMED", fence=task.lock_fence, owner=task.locked_by)
    time.sleep(args["work"])
    task.update_if_held(set__status="done")  # raises if the lease was lost
    remaining = task.lease_remaining()
    task.release()
    say("DONE", remaining=remaining)


# -- test_recipes.py: the recipes of docs/recipes.rst in processes ---------------------------

#: The recipes that define the queue, the worker loop and the dead letters.
QUEUE_RECIPES = ("recipe-model", "recipe-worker-loop", "recipe-dead-letters")

#: The scheduler test's schedule: every SCHEDULER_INTERVAL seconds,
#: SCHEDULER_TICKS times; each host fires its ``lag`` late.
#: SCHEDULER_MIN_HOLD covers the hosts' spread plus APScheduler's misfire
#: grace time (1 s, its smallest), and SCHEDULER_DURATION ends before the
#: next run. Every run is recorded in SCHEDULER_RUNS.
SCHEDULER_INTERVAL = 2.0
SCHEDULER_TICKS = 4
SCHEDULER_MIN_HOLD = 1.5
SCHEDULER_DURATION = 1.8
SCHEDULER_RUNS = "scheduled_runs"


def recipe_batch_worker(args: dict[str, Any]) -> None:
    """Run the shutdown recipe's ``main`` on batches of ten."""
    recipes = load(*QUEUE_RECIPES, "recipe-shutdown")

    def handle(job: Any) -> str:
        say("HANDLING", n=job.payload["n"])
        time.sleep(args["work"])
        return "ok"

    ready_then_wait_for_go()
    done = recipes["main"](handle)
    say("STOPPED", done=done)


def recipe_scheduler_host(args: dict[str, Any]) -> None:
    """One host: an APScheduler firing the exclusive job on the shared
    schedule, this host's lag late."""
    from apscheduler.schedulers.background import BackgroundScheduler

    runs = mongoengine.get_db()[SCHEDULER_RUNS]
    skipped: list[float] = []
    signals.lock_unavailable.connect(lambda sender, **kw: skipped.append(time.time()),
                                     weak=False)

    @exclusive("scheduled-report", SCHEDULER_DURATION, min_hold=SCHEDULER_MIN_HOLD)
    def scheduled_report() -> None:
        runs.insert_one({"pid": os.getpid(), "at": time.time()})

    say("READY")
    start = float(hear()) + args["lag"]
    scheduler = BackgroundScheduler()
    scheduler.add_job(scheduled_report, "interval", seconds=SCHEDULER_INTERVAL,
                      start_date=datetime.fromtimestamp(start, timezone.utc),
                      misfire_grace_time=1)
    scheduler.start()
    time.sleep(max(start + (SCHEDULER_TICKS - 0.5) * SCHEDULER_INTERVAL - time.time(), 0))
    scheduler.shutdown(wait=True)
    say("RESULT", skipped=len(skipped))


# -- test_exclusive.py: the tick test ---------------------------------------------------------

#: The tickers' schedule: tick k fires at start + k * TICKER_INTERVAL + the
#: process's offset + up to TICKER_JITTER, TICKER_TICKS times (6 s); a firing
#: more than TICKER_MISFIRE_GRACE late is dropped. The job is
#: ``@exclusive("report", TICKER_DURATION, min_hold=TICKER_MIN_HOLD)``, and
#: records its runs in TICKER_RUNS.
TICKER_INTERVAL = 0.5
TICKER_TICKS = 12
TICKER_JITTER = 0.01
TICKER_MISFIRE_GRACE = 0.1
TICKER_DURATION, TICKER_MIN_HOLD = 0.45, 0.3
TICKER_RUNS = "tick_runs"


def exclusive_ticker(args: dict[str, Any]) -> None:
    """Fire the job on the shared schedule: tick k at start + k * INTERVAL +
    this process's offset + jitter."""
    runs = mongoengine.get_db()[TICKER_RUNS]

    @exclusive("report", TICKER_DURATION, min_hold=TICKER_MIN_HOLD)
    def report(tick: int, scheduled: float) -> bool:
        runs.insert_one(
            {"tick": tick, "pid": os.getpid(), "scheduled": scheduled, "ran_at": time.time()}
        )
        return True

    # Warm up: connection pool, TTL index, imports; all before the start.
    warm = NamedLock(f"warm-up-{os.getpid()}", duration=1)
    assert warm.acquire()
    warm.release()
    rng = random.Random(args["seed"])
    say("READY")
    start = float(hear())
    ran, skipped, misfired, max_late = [], [], [], 0.0
    for k in range(TICKER_TICKS):
        scheduled = start + k * TICKER_INTERVAL + args["offset"] + rng.uniform(0, TICKER_JITTER)
        time.sleep(max(0.0, scheduled - time.time()))
        late = time.time() - scheduled
        max_late = max(max_late, late)
        tick = round((scheduled - start) / TICKER_INTERVAL)
        if late > TICKER_MISFIRE_GRACE:
            misfired.append(tick)
            continue
        (ran if report(tick, scheduled) else skipped).append(tick)
    say("RESULT", ran=ran, skipped=skipped, misfired=misfired, max_late=max_late)


# -- test_celery.py: a Celery worker of tests/celery_app.py ----------------------------------

#: The variable naming the broker of a Celery worker (``tests/celery_app.py``
#: builds its app from it).
CELERY_BROKER_ENV = "LOCKABLE_CELERY_BROKER"


def celery_worker(args: dict[str, Any]) -> None:
    """Become ``celery -A celery_app worker`` (same pid, same pipes)."""
    tests = str(Path(__file__).resolve().parent)
    env = {
        **os.environ,
        CELERY_BROKER_ENV: args["broker"],
        "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p),
    }
    argv = [
        sys.executable, "-m", "celery", "--quiet", "-A", "celery_app", "worker",
        "--pool=prefork", f"--concurrency={args['concurrency']}",
        f"--hostname={args['name']}@%h", "--loglevel=INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]
    os.execve(sys.executable, argv, env)


# -- the table ---------------------------------------------------------------------------------

#: Every command: its function, its watchdog (seconds, or ``None``) and
#: whether MongoEngine is connected before it runs. The fail-over and clock
#: workers connect themselves (with a command listener, or under faketime),
#: and the Celery worker leaves that to Celery.
COMMANDS: dict[str, Worker] = {
    "proc_counter": Worker(proc_counter, connected=True),
    "proc_drain": Worker(proc_drain, connected=True),
    "proc_hold": Worker(proc_hold, connected=True),
    "proc_contend": Worker(proc_contend, connected=True),
    "failover": Worker(failover),
    "clock_skew": Worker(clock_skew),
    "keepalive_probe": Worker(keepalive_probe, watchdog=120, connected=True),
    "fair_waiter": Worker(fair_waiter, watchdog=120, connected=True),
    "lease_holder": Worker(lease_holder, watchdog=120, connected=True),
    "lease_waiter": Worker(lease_waiter, watchdog=120, connected=True),
    "semaphore_cycle": Worker(semaphore_cycle, watchdog=280, connected=True),
    "semaphore_holder": Worker(semaphore_holder, watchdog=280, connected=True),
    "semaphore_waiter": Worker(semaphore_waiter, watchdog=280, connected=True),
    "rw_cycle": Worker(rw_cycle, watchdog=280, connected=True),
    "aio_holds": Worker(aio_holds, watchdog=180, connected=True),
    "claim_drain_many": Worker(claim_drain_many, watchdog=CLAIMS_DRAIN_TIMEOUT + 60,
                               connected=True),
    "claim_wait": Worker(claim_wait, watchdog=CLAIMS_DRAIN_TIMEOUT + 60, connected=True),
    "claim_keepalive": Worker(claim_keepalive, watchdog=CLAIMS_DRAIN_TIMEOUT + 60,
                              connected=True),
    "recipe_batch_worker": Worker(recipe_batch_worker, watchdog=120, connected=True),
    "recipe_scheduler_host": Worker(recipe_scheduler_host, watchdog=120, connected=True),
    "exclusive_ticker": Worker(exclusive_ticker, watchdog=120, connected=True),
    "celery_worker": Worker(celery_worker),
}


if __name__ == "__main__":
    run_worker(sys.argv[1:], COMMANDS)
