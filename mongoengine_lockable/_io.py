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
from collections import deque
from collections.abc import Generator, Iterator, Mapping
from contextlib import nullcontext
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

import pymongo
from pymongo import ReadPreference, ReturnDocument
from pymongo.client_session import ClientSession
from pymongo.errors import InvalidOperation, PyMongoError
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

#: Longest a read of a shared change stream blocks: a waiting thread that
#: reads it for the process ends its pause at most this late. (An event
#: loop's reader is a task of its own, and reads longer: ``TaskHub``.)
STREAM_AWAIT_MS = 100
#: How long a shared change stream stays open with no waiter, for the next.
KEEP_STREAM_SECONDS = 2.0
#: How long a shared stream keeps the events it read, for waiters that
#: register after them (a waiter registers right after its write), and at
#: most how many.
RECENT_SECONDS = 5.0
RECENT_EVENTS = 10_000
#: How often a waiter whose stream failed looks again.
BROKEN_POLL = 0.05

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


# -- change streams shared by the waiters of a process -----------------------------------


class Waker:
    """One wait's registration with a :class:`Hub`: the change events it
    wants, handed to it by the hub, and how its pauses block on them.

    :ivar after: the operation time of the run's last write (the events
        after it are the waiter's news).
    :ivar retry: the hub cannot vouch for the events between that write and
        the registration: the first pause ends at once, so that the waiter
        looks again (after registering, so nothing is missed from then on).
    :ivar broken: the stream failed or could not be opened: pauses poll.
    """

    def __init__(self, hub: Hub, wants: Callable[[Mapping[str, Any]], bool] | None,
                 after: Any) -> None:
        self.hub = hub
        self._wants = wants
        self.after = after
        self.events: deque[dict[str, Any]] = deque()
        self.retry = False
        self.broken = False

    def wants(self, event: Mapping[str, Any], at: Any) -> bool:
        """Whether the event made at the cluster time ``at`` is news to this
        waiter: after its write, and one it waits for."""
        if at is not None and self.after is not None and not at > self.after:
            return False
        return self._wants is None or self._wants(event)

    def fail(self) -> None:
        """(Under the hub's lock.)"""
        self.broken = True
        self._wake()

    def look_again(self) -> None:
        """(Under the hub's lock.) End the next pause (or this one) at once."""
        self.retry = True
        self._wake()

    def _news(self) -> bool:
        """Whether a pause has something to return (under the hub's lock, or
        in the loop)."""
        return bool(self.events or self.retry or self.broken or self.hub.state == "closed")

    def _next(self) -> dict[str, Any] | None:
        """What a pause returns (under the hub's lock, or in the loop)."""
        if self.retry:
            self.retry = False
            return None
        return self.events.popleft() if self.events else None

    def _wake(self) -> None:
        raise NotImplementedError

    def _pause(self, timeout: float) -> Any:
        raise NotImplementedError

    def pausing(self, timeout: float, sleep: Callable[[float], Any]) -> Generator[Call, Any, Any]:
        """The call of one pause (``sleep`` is the executor's): the next event
        handed to this waker, or ``None`` after ``timeout`` seconds."""
        if self.retry:
            self.retry = False
            return None
        if self.broken:
            yield Call(sleep, min(timeout, BROKEN_POLL))
            return None
        event = yield Call(self._pause, timeout)
        return event

    def close(self) -> None:
        """The wait is over: the hub forgets it."""
        self.hub.remove(self)


class ThreadWaker(Waker):
    """A :class:`Waker` that blocks a thread. While nobody reads the hub's
    stream, a pausing thread reads it for every waiter of the process (and
    gets its own events first hand); the others wait to be handed theirs, or
    to take over the reading when the reader's pause ends."""

    def __init__(self, hub: Hub, wants: Any, after: Any) -> None:
        super().__init__(hub, wants, after)
        self._cond = threading.Condition(hub.lock)
        #: Blocked in a pause (and so able to take over the reading).
        self.pausing_now = False

    def _wake(self) -> None:
        self._cond.notify()

    def _pause(self, timeout: float) -> dict[str, Any] | None:
        hub = self.hub
        self._end = end = time.monotonic() + timeout
        with self._cond:
            while not self._news():
                left = end - time.monotonic()
                if left <= 0:
                    return None
                if hub.reader is None and hub.state == "open":
                    hub.reader = self
                    break
                self.pausing_now = True
                self._cond.wait(left)
                self.pausing_now = False
            else:
                return self._next()
        try:
            drive(hub.reading(self._done), _invoke)
        finally:
            with hub.lock:
                hub.reader = None
                hub.pass_reading()
                found = self._next()
        return found

    def _done(self) -> bool:
        """The reader's pause is over: news for it, or its time is up."""
        with self.hub.lock:
            return self._news() or time.monotonic() >= self._end


class Hub:
    """One change stream of a collection, shared by the waiters of a process
    (of an event loop, with asyncio) that wait for the events its filter
    selects; each waiter gets those it wants (:class:`Waker`).

    The first waiter opens the stream from its own last write on; later
    waiters register after their last write and get the events after it:
    those the hub has read already (it keeps them for
    :data:`RECENT_SECONDS`) at once, later ones as they come. Blocking
    waiters read the stream themselves, one at a time (a lone waiter of a
    process hears of its grant first hand, with no thread in between); an
    event loop's waiters have a task read it (:class:`~mongoengine_lockable._aio.TaskHub`).
    Unused for :data:`KEEP_STREAM_SECONDS`, the stream is closed. A waiter
    never depends on its events (it looks again at its refresh interval
    anyway): a failed stream costs time, not correctness.
    """

    waker_class: type[Waker] = ThreadWaker

    def __init__(self, key: Any, source: Filter) -> None:
        self.key = key
        #: The filter of the stream.
        self.source = source
        self.lock = threading.Lock()
        self.wakers: list[Waker] = []
        #: (cluster time, arrival, event) of the events read lately.
        self.recent: deque[tuple[Any, float, dict[str, Any]]] = deque()
        #: Every event after this cluster time is in ``recent`` or still to
        #: be read (``None``: not known yet).
        self.complete_from: Any = None
        self.state = "new"  # then "opening", "open", and "closed" for good
        self.stream: Any = None
        self.client: Any = None
        self.idle_since = time.monotonic()
        #: The waiter reading the stream now (blocking hubs).
        self.reader: Any = None
        #: The registry that hands it out (:class:`Hubs`).
        self.registry: Hubs | None = None

    def alive(self) -> bool:
        """Whether waiters may still register (a closed hub is replaced)."""
        return self.state != "closed"

    def add(self, waker: Waker) -> str | None:
        """Register ``waker``: ``"open"`` when its caller is to open the stream
        (:meth:`opened` or :meth:`failed` next), ``"closed"`` when this hub
        closed meanwhile, else ``None``."""
        with self.lock:
            if self.state == "closed":
                return "closed"
            self.wakers.append(waker)
            if self.state == "new":
                self.state = "opening"
                return "open"
            if self.state == "open":
                self._cover(waker)
            return None  # (while opening: covered once opened)

    def _cover(self, waker: Waker) -> None:
        """Hand ``waker`` the events after its write that were read already;
        where some may be missing, its first pause ends at once."""
        after = waker.after
        if after is None or self.complete_from is None or after < self.complete_from:
            waker.look_again()
            return
        news = []
        for at, _, event in reversed(self.recent):  # (newest first: a few at most)
            if at is not None and not at > after:
                break
            if waker.wants(event, at):
                news.append(event)
        if news:
            waker.events.extend(reversed(news))
            waker._wake()

    def opened(self, stream: Any, start: Any, client: Any = None) -> None:
        """The stream (of ``client``) is open, from the cluster time ``start`` on."""
        self.client = client
        with self.lock:
            if self.state == "closed":  # pragma: no cover - failed meanwhile
                close = True
            else:
                close = False
                self.stream, self.state, self.complete_from = stream, "open", start
                for waker in self.wakers:
                    self._cover(waker)
        if close:
            self._close_stream(stream)
        else:
            self._start_reading()

    def failed(self) -> None:
        """The stream could not be opened, or failed: its waiters poll for
        the rest of their waits; the next wait opens a new one."""
        with self.lock:
            self.state = "closed"
            for waker in self.wakers:
                waker.fail()
            self.wakers = []
        if self.registry is not None:
            self.registry.forget(self)

    def remove(self, waker: Waker) -> None:
        with self.lock:
            if waker in self.wakers:
                self.wakers.remove(waker)
                if not self.wakers:
                    self.idle_since = time.monotonic()

    def route(self, event: dict[str, Any]) -> None:
        """Hand a change event that the stream read to the waiters that want it."""
        at = event.get("clusterTime")
        now = time.monotonic()
        with self.lock:
            recent = self.recent
            recent.append((at, now, event))
            while recent and (len(recent) > RECENT_EVENTS or now - recent[0][1] > RECENT_SECONDS):
                dropped = recent.popleft()[0]
                if dropped is not None and (self.complete_from is None
                                            or dropped > self.complete_from):
                    self.complete_from = dropped
            reader = self.reader
            for waker in self.wakers:
                if waker.wants(event, at):
                    waker.events.append(event)
                    if waker is not reader:  # (the reader looks after each read)
                        waker._wake()

    def idle(self) -> bool:
        """Whether the hub is unused for long enough (then it is closed, and
        the caller closes its stream) or failed."""
        with self.lock:
            if self.state == "closed":
                return True
            if self.wakers or time.monotonic() - self.idle_since < KEEP_STREAM_SECONDS:
                return False
            self.state = "closed"
        if self.registry is not None:
            self.registry.forget(self)
        return True

    def reading(self, done: Callable[[], bool]) -> Generator[Call, Any, bool]:
        """The calls that read the stream, handing each event to the waiters
        that want it, until ``done()`` (sent by a waiting thread, awaited by
        the task of an event loop); ``False`` if the stream failed (the hub
        is then closed)."""
        stream = self.stream
        try:
            while not done():
                event = yield Call(stream.try_next)
                if event is not None:
                    self.route(event)
        except Exception as exc:
            _stream_failed(exc, self.client)
            self.failed()  # (its stream is closed by whoever closes unused ones)
            return False
        return True

    def pass_reading(self) -> None:
        """(Under the lock.) The reader's pause ended: wake another pausing
        waiter to read on."""
        for waker in self.wakers:
            if getattr(waker, "pausing_now", False):
                waker._wake()
                return

    def _start_reading(self) -> None:
        """The stream is open: waiters read it as they pause (see
        :class:`ThreadWaker`), and the registry's closer ends it once unused."""
        if self.registry is not None:
            self.registry.keep(self)

    def expire(self) -> bool:
        """Close the stream if unused for :data:`KEEP_STREAM_SECONDS` (or
        failed); whether it is still open."""
        if not self.idle():
            return True
        self._close_stream(self.stream)
        return False

    @staticmethod
    def _close_stream(stream: Any) -> None:
        try:
            stream.close()
        except Exception as exc:  # pragma: no cover - the server went away
            log.debug("closing a change stream failed: %s", exc)


def _stream_failed(exc: Exception, client: Any) -> None:
    if isinstance(exc, InvalidOperation) or getattr(client, "_closed", False):
        # The client was closed (its application is done with it).
        log.debug("change stream ended: %s", exc)
    else:
        log.warning("change stream failed (%s); its waiters poll until they wait again", exc)


class Hubs:
    """The open hubs of the process, by client, collection, filter of their
    stream and, with asyncio, event loop."""

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        """A forked child has none of its parent's streams, nor a lock that a
        parent's thread may have held as it forked."""
        self._lock = threading.Lock()
        self._hubs: dict[Any, Hub] = {}
        #: The open blocking hubs, which :meth:`_close_unused` watches.
        self._kept: set[Hub] = set()
        self._closing = False

    def keep(self, hub: Hub) -> None:
        """Close ``hub``'s stream once unused (a thread runs while some are
        open, one per process)."""
        with self._lock:
            self._kept.add(hub)
            if not self._closing:
                self._closing = True
                threading.Thread(target=self._close_unused, name="lockable-streams",
                                 daemon=True).start()

    def _close_unused(self) -> None:
        while True:
            time.sleep(KEEP_STREAM_SECONDS / 4)
            with self._lock:
                kept = list(self._kept)
            closed = {hub for hub in kept if not hub.expire()}
            with self._lock:
                self._kept -= closed
                if not self._kept:
                    self._closing = False
                    return

    def register(self, hub_class: type[Hub], scope: Any, collection: Any, request: Watch,
                 after: Any) -> tuple[Waker, bool]:
        """A waker for ``request`` registered with its hub, and whether the
        caller is to open that hub's stream."""
        key = (os.getpid(), scope, id(collection.database.client), collection.full_name,
               repr(request.shared))
        while True:
            with self._lock:
                hub = self._hubs.get(key)
                if hub is None or not hub.alive():
                    hub = self._hubs[key] = hub_class(key, request.shared)
                    hub.registry = self
            waker = hub.waker_class(hub, request.wants, after)
            outcome = hub.add(waker)
            if outcome != "closed":
                return waker, outcome == "open"

    def forget(self, hub: Hub) -> None:
        with self._lock:
            if self._hubs.get(hub.key) is hub:
                del self._hubs[hub.key]

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for key in self._hubs if key[0] == os.getpid())


_HUBS = Hubs()


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
    #: The hubs of its waiters' change streams (a thread reads each).
    hub_class: type[Hub] = Hub

    def hub_scope(self) -> Any:
        """What besides the process a hub is shared within (asyncio: the
        event loop)."""
        return None

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
        projection; a :class:`Watch` answers a :class:`Waker` registered with
        the process's stream of those events (opened by the first waiter;
        added to ``wakers``, which the run closes when it ends), or ``None``
        where the server has no change streams; a :class:`Pause` blocks on
        the waker, a :class:`Sleep` sleeps.

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
            after = None if session is None else session.operation_time
            waker, opening = _HUBS.register(self.hub_class, self.hub_scope(), self.collection,
                                            request, after)
            if opening:
                try:
                    stream = yield Call(
                        self.collection.watch,
                        pipeline=[{"$match": request.shared}],
                        full_document="updateLookup",
                        max_await_time_ms=STREAM_AWAIT_MS,
                        start_at_operation_time=after,
                    )
                except PyMongoError as exc:
                    # A standalone server has no change streams.
                    log.debug("no change stream on %s (%s): polling",
                              self.collection.full_name, exc)
                    waker.hub.failed()
                    return None
                except BaseException:
                    waker.hub.failed()
                    raise
                waker.hub.opened(stream, after, self.collection.database.client)
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
        for waker in wakers:
            waker.close()
        if session is not None:
            session.end_session()


Blocking = Callable[[Steps[T]], T]
