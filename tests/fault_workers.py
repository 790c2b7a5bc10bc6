"""Worker processes for the fault tests: ``test_failover.py`` and
``test_clock_skew.py`` (``test_crash_drain.py`` drives the demo's own workers).

Each worker is a fresh interpreter started as::

    python tests/fault_workers.py COMMAND '{"uri": ..., "db": ..., ...}'

(under ``faketime`` for the clock-skew workers). It connects MongoEngine itself,
nothing is inherited from the parent. The line protocol on its standard streams
(that of ``tests/_children.py``, whose ``Child`` is the parent's side):

- with ``"handshake": true`` it prints ``READY`` once connected and waits for a
  line on stdin (``GO``), so that the parent can start every worker at the same
  moment; an empty stdin (the parent died) makes it exit instead;
- the ``skew`` worker prints ``REPORT {json}`` lines and waits for a line on
  stdin after each, so that the parent can act while its leases are fresh;
- errors go to stderr, and the exit status is non-zero.

A worker that loops (``failover``) stops by itself: when the
``stop`` file exists, when its parent is gone, or after ``max_seconds``; no
worker outlives the test that started it.

The models live here (not in ``tests/models.py``) so that the workers need
nothing but this file, ``_children.py`` and the installed package.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
import traceback
from typing import Any, Callable

import mongoengine
from mongoengine import Document
from mongoengine.fields import StringField
from pymongo import monitoring
from pymongo.errors import PyMongoError

from mongoengine_lockable import (
    LockableMixin,
    LockError,
    NamedLock,
    NamedSemaphore,
)

if __package__:
    from . import _children
else:  # run as a script, or imported with tests/ on sys.path
    import _children


class FailoverDoc(LockableMixin, Document):
    """The document whose lease the fail-over workers pass around."""

    name = StringField()

    meta = {"collection": "failover_docs"}


class SkewDoc(LockableMixin, Document):
    """Documents leased by processes whose clocks are wrong."""

    group = StringField(required=True)

    meta = {"collection": "skew_docs", "indexes": [("group", "locked_until")]}


#: The errors the fail-over workers expect, count and survive.
EXPECTED_ERRORS = (LockError, PyMongoError)


# -- shared plumbing -------------------------------------------------------------


def handshake(args: dict[str, Any]) -> None:
    """Tell the parent we are connected; start when it says so."""
    if args.get("handshake"):
        _children.ready_then_wait_for_go()


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


# -- failover: hold and release a lease over and over ----------------------------


def cmd_failover(args: dict[str, Any]) -> None:
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
    _children.connect(args, event_listeners=[FailedCommands(log)])
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


# -- drain: claim, work, mark done, release; killed at random by the parent -------


# -- skew: a process whose wall clock is hours off -------------------------------


def server_now(collection: Any, pk: Any) -> Any:
    """The server's ``$$NOW``, read through ``collection``'s document ``pk``."""
    rows = list(collection.aggregate([{"$match": {"_id": pk}}, {"$project": {"now": "$$NOW"}}]))
    return rows[0]["now"]


def report(**fields: Any) -> None:
    """Send one ``REPORT {json}`` line to the parent (datetimes in ISO format)
    and wait for its go-ahead."""
    _children.say("REPORT", **fields)
    _children.hear()


def cmd_skew(args: dict[str, Any]) -> None:
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
    from datetime import datetime, timezone

    _children.connect(args)
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


COMMANDS: dict[str, Callable[[dict[str, Any]], None]] = {
    "failover": cmd_failover,
    "skew": cmd_skew,
}


if __name__ == "__main__":
    _children.run_worker(sys.argv[1:], COMMANDS)
