"""Executors: run the engine's requests against pymongo or mongomock.

:func:`run` drives a generator of :mod:`mongoengine_lockable._engine` to its
end, answering each request with one database call. :class:`SyncIO` sends
them with pymongo, as the driver calls that :meth:`Executor.calls` makes of
them (the asyncio executor of :mod:`mongoengine_lockable._aio` awaits the
same calls): lease changes with write concern ``majority`` unless told
otherwise, reads that decide lease state from the primary, read-backs with
read concern ``majority``. :class:`MockIO` runs the same requests on mongomock,
which has no server clock and is not atomic across threads: there ``$$NOW`` is
the client's clock, the lease rules are evaluated by
:mod:`mongoengine_lockable._expr`, and every request holds one process-wide lock.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Generator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

import pymongo
from pymongo import ReadPreference, ReturnDocument
from pymongo.client_session import ClientSession
from pymongo.errors import PyMongoError
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from . import _expr
from ._engine import Modify, ModifyMany, Pause, Read, ReadMany, Result, Sleep, Steps, Watch
from ._rules import DOC_KEY, NOW_KEY, RESULT_PROJECTION, Filter

__all__ = [
    "DEFAULT_WRITE_CONCERN",
    "Call",
    "Executor",
    "MockIO",
    "SyncIO",
    "bounded",
    "checked_write_concern",
    "client_now",
    "drive",
    "executor_for",
    "is_mongomock",
    "run",
]

log = logging.getLogger("mongoengine_lockable.io")

T = TypeVar("T")
R = TypeVar("R")

#: Longest a change-stream read blocks before the waiter checks its clocks:
#: the most a waiter's pause can overrun its bound.
STREAM_AWAIT_MS = 100

#: Lease changes are acknowledged by a majority unless the caller says otherwise,
#: so that a failover cannot roll back a grant the caller was told about.
DEFAULT_WRITE_CONCERN = WriteConcern("majority")


def checked_write_concern(write_concern: object, what: str = "write concern") -> WriteConcern:
    """The write concern of lease changes: ``None`` means ``majority``.

    :raises TypeError: not a :class:`~pymongo.write_concern.WriteConcern`.
    :raises ValueError: unacknowledged (``w=0``): the caller could not know
        whether it won a lease.
    """
    if write_concern is None:
        return DEFAULT_WRITE_CONCERN
    if not isinstance(write_concern, WriteConcern):
        kind = type(write_concern).__name__
        raise TypeError(f"{what} must be a pymongo WriteConcern, not {kind}")
    if not write_concern.acknowledged:
        raise ValueError(f"{what} must be acknowledged (w=0 cannot tell who won a lease)")
    return write_concern


def is_mongomock(collection: Any) -> bool:
    """Is this a mongomock collection (no server clock, no atomicity)?"""
    return type(collection).__module__.partition(".")[0] == "mongomock"


def client_now() -> datetime:
    """The client's UTC time as MongoDB stores it: naive, millisecond precision."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _result(raw: Mapping[str, Any] | None) -> Result:
    if raw is None:
        return Result(None, None)
    return Result(raw[DOC_KEY], raw[NOW_KEY])


class ChangeStreamWaker:
    """What a waiter blocks on with pymongo: a change stream, read until an
    event, a timeout, or its failure (after which the waiter polls: a pause
    returns ``None`` at once). Its reads are driver calls (:class:`Call`),
    sent by the blocking executor and awaited by the asyncio one."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.broken = False

    @property
    def usable(self) -> bool:
        """Neither failed nor closed: another wait can read it."""
        return not self.broken and bool(self._stream.alive)

    def pausing(self, timeout: float, sleep: Callable[[float], Any]) -> Generator[Call, Any, Any]:
        """The calls of one pause; ``sleep`` is the executor's."""
        if self.broken:
            yield Call(sleep, min(timeout, 0.05))
            return None
        end = time.monotonic() + timeout
        try:
            while time.monotonic() < end:
                # Each read waits for at most STREAM_AWAIT_MS (it may end the
                # pause that much late), and returns as soon as an event comes.
                event: dict[str, Any] | None = yield Call(self._stream.try_next)
                if event is not None:
                    return event
            return None
        except PyMongoError as exc:
            log.warning("change stream failed (%s); polling for the rest of this wait", exc)
            self.broken = True
            yield from self.closing()
            return None

    def closing(self) -> Generator[Call, Any, None]:
        """The call that closes the stream."""
        try:
            yield Call(self._stream.close)
        except PyMongoError:  # pragma: no cover - closing a dead cursor
            pass

    def close(self) -> None:
        drive(self.closing(), _invoke)


class Call:
    """One call of an executor: ``method(*args, **kwargs)`` (a driver's
    method, or the executor's ``sleep``). ``listed``: the method returns a
    cursor, read to its end."""

    __slots__ = ("args", "kwargs", "listed", "method")

    def __init__(self, method: Callable[..., Any], *args: Any, listed: bool = False,
                 **kwargs: Any) -> None:
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self.listed = listed


class Executor:
    """What every pymongo executor shares, blocking or asyncio: the options of
    its collection, and the driver calls that answer each database request
    (:meth:`calls`).

    :param collection: the collection of the lease records (a pymongo
        ``Collection`` or ``AsyncCollection``).
    :param write_concern: of lease changes (default ``majority``).
    """

    def __init__(self, collection: Any, write_concern: WriteConcern | None = None) -> None:
        self.source = collection
        self.collection: Any = collection.with_options(
            write_concern=checked_write_concern(write_concern),
            read_preference=ReadPreference.PRIMARY,
        )
        self._majority = self.collection.with_options(read_concern=ReadConcern("majority"))

    #: How the executor sleeps (``time.sleep``, ``asyncio.sleep``).
    sleep: Callable[[float], Any] = staticmethod(time.sleep)

    def localize(self, flt: Filter) -> Filter:
        """``flt`` as a queryset of the caller's may run it (unchanged: the
        server evaluates ``$$NOW``)."""
        return flt

    def modify_options(self, request: Modify, session: Any) -> dict[str, Any]:
        """The arguments of the driver's ``find_one_and_update`` for a
        :class:`Modify`."""
        options = {"filter": request.filter, "update": request.update,
                   "projection": RESULT_PROJECTION if request.clock else None,
                   "sort": request.sort, "upsert": request.upsert,
                   "return_document": ReturnDocument.AFTER, "session": session}
        if request.hint is not None:
            options["hint"] = request.hint
        if request.collation is not None:
            options["collation"] = request.collation
        return options

    def calls(self, request: Any, session: Any, wakers: list[Any]) -> Generator[Call, Any, Any]:
        """The calls that answer one of the engine's requests, and the answer:
        one driver call, or two for a retried write that came back without its
        projection; a :class:`Watch` answers a :class:`ChangeStreamWaker`
        (added to ``wakers``), or ``None`` where the server has no change
        streams; a :class:`Pause` reads that stream, a :class:`Sleep` sleeps.

        The blocking and the asyncio executors both make exactly these calls
        (:func:`drive` sends them, the asyncio executor awaits them): one copy
        of every option.
        """
        if isinstance(request, Pause):
            event = yield from request.waker.pausing(request.seconds, self.sleep)
            return event
        if isinstance(request, Sleep):
            yield Call(self.sleep, request.seconds)
            return None
        if isinstance(request, Modify):
            raw = yield Call(self.collection.find_one_and_update,
                             **self.modify_options(request, session))
            if not request.clock:
                return Result(raw, None)
            if raw is not None and NOW_KEY not in raw:
                # When a retryable error (a fail-over, a write concern error)
                # ended the first attempt of a findAndModify that the server had
                # applied, the driver's retry is answered from the stored image
                # of that first write: the record as written, without the
                # projection, so without the server's time. Read it again.
                log.warning("a retried write came back without its projection; "
                            "reading the record")
                key = {"_id": raw["_id"]} if "_id" in raw else request.filter
                raw = yield Call(self.collection.find_one, filter=key,
                                 projection=RESULT_PROJECTION, session=session)
            return _result(raw)
        if isinstance(request, ModifyMany):
            outcome = yield Call(self.collection.update_many, filter=request.filter,
                                 update=request.update, session=session)
            return outcome.modified_count
        if isinstance(request, Read):
            source = self._majority if request.majority else self.collection
            raw = yield Call(source.find_one, filter=request.filter,
                             projection=RESULT_PROJECTION, sort=request.sort, session=session)
            return _result(raw)
        if isinstance(request, ReadMany):
            source = self._majority if request.majority else self.collection
            docs = yield Call(source.find, listed=True, session=session,
                              **_find_options(request))
            return [_result(d) for d in docs] if request.with_now else docs
        if isinstance(request, Watch):
            try:
                stream = yield Call(
                    self.collection.watch,
                    pipeline=[{"$match": request.match}],
                    full_document="updateLookup",
                    max_await_time_ms=STREAM_AWAIT_MS,
                    start_at_operation_time=None if session is None else session.operation_time,
                    # A kept stream outlives the run's session.
                    session=None if request.kept else session,
                )
            except PyMongoError as exc:
                # A standalone server has no change streams.
                log.debug("no change stream on %s (%s): polling", self.collection.full_name, exc)
                return None
            waker = ChangeStreamWaker(stream)
            if not request.kept:
                wakers.append(waker)
            return waker
        raise TypeError(f"unknown request {request!r}")  # pragma: no cover


def bounded(request: Any) -> Any:
    """The context a request is sent in: within its ``timeout``, if it has one."""
    timeout = getattr(request, "timeout", None)
    return nullcontext() if timeout is None else pymongo.timeout(timeout)


def _invoke(call: Call) -> Any:
    result = call.method(*call.args, **call.kwargs)
    return list(result) if call.listed else result


class SyncIO(Executor):
    """Answers the engine's requests with pymongo (blocking).

    :param collection: the collection of the lease records.
    :param write_concern: of lease changes (default ``majority``).
    """

    def session(self) -> ClientSession | None:
        """A session whose operation time a waiter's change stream starts at."""
        client: Any = self.collection.database.client
        session: ClientSession = client.start_session(causal_consistency=False)
        return session

    def do(self, request: Any, session: Any, wakers: list[Any]) -> Any:
        if type(request) is Modify and not request.clock and request.timeout is None:
            # The most frequent request, one call: straight to the driver.
            return Result(self.collection.find_one_and_update(
                **self.modify_options(request, session)), None)
        with bounded(request):
            return drive(self.calls(request, session, wakers), _invoke)


def _find_options(request: ReadMany) -> dict[str, Any]:
    options: dict[str, Any] = {"filter": request.filter, "skip": request.skip,
                               "limit": request.limit}
    if request.with_now:
        options["projection"] = RESULT_PROJECTION
    elif request.projection is not None:
        options["projection"] = dict(request.projection)
    if request.sort:
        options["sort"] = request.sort
    if request.hint is not None:
        options["hint"] = request.hint
    if request.collation is not None:
        options["collation"] = request.collation
    return options


# mongomock's updates are not atomic across threads: every request takes this.
_MOCK_GUARD = threading.RLock()


class MockEvents:
    """Change events of the writes :class:`MockIO` makes, for waiters in this
    process (mongomock lives in one process, so every client of it is here).

    A waiter's pause ends early when a write it would hear through a change
    stream is made; other writes (the caller's own inserts, say) are still
    found by polling, so a pause never lasts longer than the polling cap.
    """

    #: Events kept for waiters that are between two pauses.
    KEEP = 10_000

    def __init__(self) -> None:
        self.changed = threading.Condition(_MOCK_GUARD)
        self.events: deque[tuple[int, str, dict[str, Any]]] = deque(maxlen=self.KEEP)
        self.seq = 0

    def record(self, namespace: str, old: Mapping[str, Any] | None,
               new: Mapping[str, Any], now: datetime) -> None:
        """Record a write (under the guard) and wake the waiters."""
        if old is None:
            event: dict[str, Any] = {"operationType": "insert"}
        else:
            updated = {k: v for k, v in new.items() if k not in old or old[k] != v}
            removed = [k for k in old if k not in new]
            event = {"operationType": "update",
                     "updateDescription": {"updatedFields": updated, "removedFields": removed}}
        event.update(documentKey={"_id": new["_id"]}, fullDocument=copy.deepcopy(dict(new)),
                     wallTime=now)
        self.seq += 1
        self.events.append((self.seq, namespace, event))
        self.changed.notify_all()


_MOCK_EVENTS = MockEvents()


class MockWaker:
    """What a waiter blocks on with mongomock: the events of :class:`MockEvents`
    that its change-stream filter selects, polling at most :data:`MAX_POLL` apart."""

    #: The longest pause: writes made outside this library are seen by polling.
    MAX_POLL = 0.25
    #: It never fails (as a change stream can).
    broken = False
    usable = True

    def __init__(self, namespace: str, match: Mapping[str, Any]) -> None:
        self.namespace = namespace
        self.match = dict(match)
        self.seen = _MOCK_EVENTS.seq

    def poll(self) -> dict[str, Any] | None:
        """The first event it hears among those recorded since it last looked
        (no waiting)."""
        from mongomock.filtering import filter_applies

        with _MOCK_EVENTS.changed:
            for seq, namespace, event in _MOCK_EVENTS.events:
                if seq > self.seen:
                    self.seen = seq
                    if namespace == self.namespace and filter_applies(  # type: ignore[no-untyped-call]
                        self.match, event
                    ):
                        return event
            return None

    def pausing(self, timeout: float, sleep: Callable[[float], Any]) -> Generator[Call, Any, Any]:
        """The (blocking) call of one pause."""
        event = yield Call(self.pause, timeout)
        return event

    def pause(self, timeout: float) -> dict[str, Any] | None:
        end = time.monotonic() + min(timeout, self.MAX_POLL)
        with _MOCK_EVENTS.changed:
            while True:
                event = self.poll()
                if event is not None:
                    return event
                left = end - time.monotonic()
                if left <= 0:
                    return None
                _MOCK_EVENTS.changed.wait(left)

    def close(self) -> None:
        pass


class MockIO(SyncIO):
    """Answers the engine's requests on mongomock, with the client's clock as
    ``$$NOW`` and the rules evaluated by :mod:`mongoengine_lockable._expr`."""

    def session(self) -> None:
        return None

    def localize(self, flt: Filter) -> Filter:
        """``flt`` with ``$$NOW`` comparisons on the client's clock, as plain
        query operators mongomock evaluates (see :func:`_expr.localize`)."""
        localized: Filter = _expr.localize(flt, client_now())
        return localized

    def _matches(
        self, flt: Mapping[str, Any], sort: Any, now: datetime
    ) -> Iterator[dict[str, Any]]:
        plain, exprs = _expr.split_expr(flt)
        for doc in self.collection.find(plain, sort=sort):
            if all(_expr.truthy(_expr.evaluate(e, doc, now)) for e in exprs):
                yield doc

    def _swap(self, key: Any, changed: dict[str, Any], removed: dict[str, Any]) -> None:
        """Store the document with fields added or removed as a new object.

        mongomock edits a stored document in place, and another thread reading
        that document meanwhile (a ``find_one`` outside the lease's guard)
        fails with "dictionary changed size during iteration" when a field
        comes or goes; a new object leaves such readers the old one whole.
        """
        from mongomock import helpers

        store: Any = self.collection._store
        stored_key = helpers.hashdict(key) if isinstance(key, dict) else key
        current: dict[str, Any] = store[stored_key]
        swapped = {k: v for k, v in current.items() if k not in removed}
        swapped.update(copy.deepcopy(changed))
        store[stored_key] = swapped

    def _write(
        self, doc: dict[str, Any], update: Any, now: datetime, upsert: bool
    ) -> dict[str, Any]:
        if isinstance(update, list):
            new = _expr.apply_pipeline(doc, update, now)
            # Write only the fields the pipeline changed, as the server does: a
            # caller's own write to other fields (outside this guard) is kept.
            changes: dict[str, Any] = {}
            changed = {k: v for k, v in new.items() if k not in doc or doc[k] != v}
            if changed:
                changes["$set"] = changed
            removed = {k: "" for k in doc if k not in new}
            if removed:
                changes["$unset"] = removed
            if (changed.keys() - doc.keys() or removed) and "_id" in doc and len(doc) > 1:
                self._swap(new["_id"], changed, removed)
            elif changes or upsert:
                self.collection.update_one({"_id": new["_id"]}, changes or {"$set": {}},
                                           upsert=upsert)
            found: dict[str, Any] | None = self.collection.find_one({"_id": new["_id"]})
            stored = new if found is None else found
            if changes:
                created = upsert and "_id" in doc and len(doc) == 1
                _MOCK_EVENTS.record(self.collection.full_name, None if created else doc,
                                    stored, now)
            return stored
        after: dict[str, Any] | None = self.collection.find_one_and_update(
            {"_id": doc["_id"]}, update, return_document=ReturnDocument.AFTER
        )
        assert after is not None  # under the guard: nobody deleted it meanwhile
        _MOCK_EVENTS.record(self.collection.full_name, doc, after, now)
        return after

    def do(self, request: Any, session: Any, wakers: list[Any]) -> Any:
        if isinstance(request, Watch):
            with _MOCK_GUARD:
                return MockWaker(self.collection.full_name, request.match)
        if isinstance(request, (Pause, Sleep)):
            return super().do(request, session, wakers)
        with _MOCK_GUARD:
            now = client_now()
            if isinstance(request, Modify):
                doc = next(self._matches(request.filter, request.sort, now), None)
                if doc is None:
                    if not request.upsert:
                        return Result(None, None)
                    doc = {k: v for k, v in request.filter.items() if not k.startswith("$")}
                new = self._write(doc, request.update, now, request.upsert)
                return Result(copy.deepcopy(new), now)
            if isinstance(request, ModifyMany):
                targets = list(self._matches(request.filter, None, now))
                for doc in targets:
                    self._write(doc, request.update, now, False)
                return len(targets)
            if isinstance(request, Read):
                doc = next(self._matches(request.filter, request.sort, now), None)
                return Result(doc, None if doc is None else now)
            if isinstance(request, ReadMany):
                docs = list(self._matches(request.filter, request.sort, now))
                docs = docs[request.skip:]
                if request.limit:
                    docs = docs[: request.limit]
                if request.with_now:
                    return [Result(d, now) for d in docs]
                if request.projection is not None:
                    docs = [_expr.project(d, request.projection, now) for d in docs]
                return docs
        raise TypeError(f"unknown request {request!r}")  # pragma: no cover


def executor_for(collection: Any, write_concern: WriteConcern | None = None) -> SyncIO:
    """The executor of ``collection``: :class:`MockIO` on mongomock."""
    if is_mongomock(collection):
        return MockIO(collection, write_concern)
    return SyncIO(collection, write_concern)


def drive(steps: Generator[R, Any, T], answer: Callable[..., Any], *args: Any) -> T:
    """Drive ``steps`` to its end, answering each request it yields with
    ``answer(request, *args)``; an error is thrown into the generator, which
    may handle it."""
    try:
        request = next(steps)
        while True:
            try:
                result = answer(request, *args)
            except BaseException as exc:
                request = steps.throw(exc)
            else:
                request = steps.send(result)
    except StopIteration as stop:
        value: T = stop.value
        return value


def run(steps: Steps[T], io: SyncIO, *, track: bool = False) -> T:
    """Drive ``steps`` to its end with ``io``, answering each request; an error
    is thrown into the generator, which may handle it.

    :param track: run in a session, so that a change stream a waiter opens
        starts right after the run's last write (no grant is missed).
    """
    session = io.session() if track else None
    wakers: list[Any] = []
    try:
        return drive(steps, io.do, session, wakers)
    finally:
        if wakers:
            # Closing a change stream is a round trip (killCursors): not on the
            # way back to a caller that was just granted its lease.
            _closing().submit(_close, wakers, session)
        elif session is not None:
            session.end_session()


_closer: tuple[int, ThreadPoolExecutor] | None = None
_closer_lock = threading.Lock()


def _closing() -> ThreadPoolExecutor:
    """The one background thread that closes finished waiters' streams (one
    per process: a forked child starts its own)."""
    global _closer
    with _closer_lock:
        if _closer is None or _closer[0] != os.getpid():
            _closer = (os.getpid(), ThreadPoolExecutor(max_workers=1,
                                                        thread_name_prefix="lockable-closer"))
        return _closer[1]


#: How long a handle keeps its change stream open after a wait, for its next.
KEEP_STREAM_SECONDS = 2.0


class KeptStream:
    """One handle's change stream, kept open between its waits: a caller
    that waits again soon (a worker taking a contended lock in a loop) finds
    it open, and the server does not set up a stream per wait. Unused for
    :data:`KEEP_STREAM_SECONDS`, it is closed; a forked child drops its
    parent's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waker: Any = None
        self._due = 0.0
        self._pid = os.getpid()

    def take(self) -> Any:
        """The kept stream (``None``: none), which the caller now holds."""
        with self._lock:
            waker, self._waker = self._waker, None
        if waker is None or self._pid != os.getpid():
            return None  # (a parent's stream is left to the parent)
        if not waker.usable:
            _discard(waker)
            return None
        return waker

    def put(self, waker: Any) -> None:
        """Keep ``waker`` (one that failed or closed is closed instead)."""
        if waker is None:
            return
        if self._pid != os.getpid():
            return
        if not waker.usable:
            _discard(waker)
            return
        with self._lock:
            old, self._waker = self._waker, waker
            self._due = time.monotonic() + KEEP_STREAM_SECONDS
        if old is not None and old is not waker:
            _discard(old)
        _expiring().add(self)

    def expire(self, now: float) -> bool:
        """Close the stream if unused since its time ran out; whether one is
        still kept."""
        with self._lock:
            if self._waker is None:
                return False
            if now < self._due:
                return True
            waker, self._waker = self._waker, None
        _discard(waker)
        return False


class _Expiry:
    """The thread that closes kept streams when their time runs out (one per
    process, running while some are kept)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: weakref.WeakSet[KeptStream] = weakref.WeakSet()
        self._running = False

    def add(self, kept: KeptStream) -> None:
        with self._lock:
            self._kept.add(kept)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="lockable-streams", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(KEEP_STREAM_SECONDS / 4)
            now = time.monotonic()
            with self._lock:
                kept = list(self._kept)
            left = [k for k in kept if k.expire(now)]
            with self._lock:
                for k in kept:
                    if k not in left:
                        self._kept.discard(k)
                if not self._kept:
                    self._running = False
                    return


_expiry: tuple[int, _Expiry] | None = None


def _expiring() -> _Expiry:
    global _expiry
    with _closer_lock:
        if _expiry is None or _expiry[0] != os.getpid():
            _expiry = (os.getpid(), _Expiry())
        return _expiry[1]


def _discard(waker: Any) -> None:
    """Close ``waker`` in the background (a round trip: killCursors)."""
    _closing().submit(_close, [waker], None)


def _close(wakers: list[Any], session: Any) -> None:
    for waker in wakers:
        try:
            waker.close()
        except Exception as exc:  # pragma: no cover - the server went away
            log.debug("closing a change stream failed: %s", exc)
    if session is not None:
        session.end_session()


Blocking = Callable[[Steps[T]], T]
