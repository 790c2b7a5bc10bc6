"""The asyncio executor: the engine's requests answered with pymongo's
``AsyncMongoClient`` (or mongomock, in the loop), the same generators of
:mod:`mongoengine_lockable._engine` driven by :func:`arun`, and the asyncio
twin of :class:`~mongoengine_lockable._keepalive.BlockingLease`.

Nothing of a lease's rules or policy is here: :class:`AsyncIO` awaits the
driver calls that :meth:`~mongoengine_lockable._io.Executor.calls` builds for
the blocking executor too, and :func:`arun` answers the engine's requests as
:func:`~mongoengine_lockable._io.run` does. Cancelling an acquisition while it
waits is an exception thrown into the engine's generator, which then leaves
the record's queue (and gives back a lease granted at the last moment):
:func:`arun` finishes that clean-up in a task of its own, so that a second
cancellation cannot cut it short, and re-raises.

The default database of a MongoEngine alias is an ``AsyncMongoClient`` made
from the alias's connection settings, one per alias and event loop (a client
is bound to the loop it first ran on), closed when its loop shuts down its
asynchronous generators (as ``asyncio.run`` does).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Generator, Mapping
from typing import Any, Callable, Protocol, TypeVar

import pymongo

#: The first pymongo whose asyncio API is stable (4.13) and whose
#: ``AsyncMongoClient`` neither breaks under ``pymongo.timeout`` (4.13.1) nor
#: blocks the event loop while it opens connections (4.13.2).
PYMONGO_NEEDED = (4, 13, 2)


def _check_pymongo() -> None:
    found = tuple(int(part) for part in pymongo.version_tuple[:3])
    if found < PYMONGO_NEEDED:
        needed = ".".join(map(str, PYMONGO_NEEDED))
        raise ImportError(
            f"mongoengine_lockable.aio needs pymongo>={needed} (its stable asyncio API); "
            f"pymongo {pymongo.version} is installed: "
            f"pip install 'mongoengine-lockable[asyncio]' or 'pymongo>={needed}'"
        )


_check_pymongo()

from mongoengine import connection as _mongoengine  # noqa: E402
from pymongo import AsyncMongoClient  # noqa: E402
from pymongo.asynchronous.database import AsyncDatabase  # noqa: E402
from pymongo.driver_info import DriverInfo  # noqa: E402
from pymongo.errors import OperationFailure  # noqa: E402
from pymongo.write_concern import WriteConcern  # noqa: E402

from ._engine import Lease, Pause, Result, Sleep, Steps  # noqa: E402
from ._io import (  # noqa: E402
    Call,
    Executor,
    Hub,
    MockIO,
    MockWaker,
    Waker,
    bounded,
    is_mongomock,
)
from ._keepalive import LeaseHandle  # noqa: E402
from ._named import (  # noqa: E402
    TTL_FIELD,
    TTL_OPTIONS,
    _ttl_ready,
    records,
    ttl_key,
    ttl_refused,
)
from ._rules import View  # noqa: E402
from ._version import __version__  # noqa: E402

__all__ = [
    "PYMONGO_NEEDED",
    "AsyncIO",
    "AsyncLease",
    "AsyncMockIO",
    "arun",
    "async_records",
    "binding",
    "default_database",
    "executor_for",
    "is_async_database",
]

T = TypeVar("T")

#: The most a cancelled run spends on its clean-up (leaving a queue, giving
#: back a lease granted at the last moment). Not more is needed: a waiter
#: not heard from is skipped within WAITER_TTL_MS, and a lease handed to it
#: lasts PICKUP_MS until confirmed (see :mod:`mongoengine_lockable._rules`).
CLEAN_UP_SECONDS = 2.0

log = logging.getLogger("mongoengine_lockable.aio")

#: Tasks that must run to their end unreferenced by anyone else (clean-ups
#: after a cancellation, closing change streams).
_background: set[asyncio.Task[Any]] = set()


def _in_background(work: Awaitable[Any]) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(work)
    _background.add(task)
    task.add_done_callback(_done)
    return task


def _done(task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.debug("background task failed: %r", task.exception())


# -- driving the engine ----------------------------------------------------------------


class AsyncExecutor(Protocol):
    """What :func:`arun` needs of an executor; ``source`` is its collection."""

    source: Any

    def session(self) -> Any: ...

    def do(self, request: Any, session: Any, wakers: list[Any]) -> Awaitable[Any]: ...

    def close_later(self, wakers: list[Any], session: Any) -> None: ...


class _Cancelled(Exception):
    """A cancellation :func:`adrive` did not throw into its generator."""

    def __init__(self, cancellation: asyncio.CancelledError) -> None:
        super().__init__()
        self.cancellation = cancellation


async def adrive(
    steps: Generator[Any, Any, T],
    answer: Callable[[Any], Awaitable[Any]],
    thrown: BaseException | None = None,
    *,
    hand_over: bool = False,
) -> T:
    """Drive ``steps`` to its end, awaiting the answer of each request it
    yields; an error is thrown into the generator, which may handle it.

    :param thrown: throw this into the generator first (it has yielded
        already).
    :param hand_over: on a cancellation, leave the generator as it is and
        raise :class:`_Cancelled`, for the caller to drive it on.
    """
    # Each turn resumes the generator with the last answer (send), or with
    # the error that came instead (throw); send(None) starts it.
    resume: Callable[[Any], Any] = steps.send if thrown is None else steps.throw
    value: Any = thrown
    try:
        while True:
            request = resume(value)
            try:
                resume, value = steps.send, await answer(request)
            except asyncio.CancelledError as exc:
                if hand_over:
                    raise _Cancelled(exc) from None
                resume, value = steps.throw, exc
            except BaseException as exc:
                resume, value = steps.throw, exc
    except StopIteration as stop:
        returned: T = stop.value
        return returned


async def arun(steps: Steps[T], io: AsyncExecutor, *, track: bool = False) -> T:
    """Drive ``steps`` to its end with ``io``, awaiting each answer; an error
    is thrown into the generator, which may handle it.

    A cancellation is thrown in too: the generator's clean-up requests are
    then answered by a task of their own, which a second cancellation does
    not interrupt, and the cancellation goes on once they are done.

    :param track: run in a session, so that a change stream a waiter opens
        starts right after the run's last write (no grant is missed).
    """
    session = io.session() if track else None
    wakers: list[Any] = []

    def answer(request: Any) -> Awaitable[Any]:
        return io.do(request, session, wakers)

    try:
        result = await adrive(steps, answer, hand_over=True)
    except _Cancelled as cut:
        clean_up = _finish(steps, answer, cut.cancellation, io, wakers, session)
        await asyncio.shield(_in_background(clean_up))
        raise cut.cancellation from None  # the clean-up swallowed it: it goes on all the same
    except BaseException:
        io.close_later(wakers, session)
        raise
    io.close_later(wakers, session)
    return result


async def _finish(
    steps: Steps[T],
    answer: Callable[[Any], Awaitable[Any]],
    thrown: BaseException,
    io: AsyncExecutor,
    wakers: list[Any],
    session: Any,
) -> T:
    """The rest of a cancelled run: its clean-up requests, within
    :data:`CLEAN_UP_SECONDS`."""
    try:
        with pymongo.timeout(CLEAN_UP_SECONDS):
            return await adrive(steps, answer, thrown)
    finally:
        io.close_later(wakers, session)


# -- executors ------------------------------------------------------------------------------


async def _ainvoke(call: Call) -> Any:
    result = call.method(*call.args, **call.kwargs)
    if call.listed:
        return await result.to_list(None)
    return await result


class TaskWaker(Waker):
    """A :class:`~mongoengine_lockable._io.Waker` that a coroutine awaits."""

    def __init__(self, hub: Hub, wants: Any, after: Any) -> None:
        super().__init__(hub, wants, after)
        self._flag = asyncio.Event()

    def _wake(self) -> None:
        self._flag.set()

    async def _pause(self, timeout: float) -> dict[str, Any] | None:
        self._flag.clear()
        if not self._news():
            try:
                await asyncio.wait_for(self._flag.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self._next()


async def _until_shutdown(hub: TaskHub) -> AsyncGenerator[None, None]:
    """Ends the reading of ``hub`` when its event loop shuts down its
    asynchronous generators: ``asyncio.run`` cancels the loop's tasks first,
    a loop ended by hand (``shutdown_asyncgens()``, then ``close()``) may
    not."""
    try:
        yield
    finally:
        task = hub.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            hub.shutting_down = True
            task.cancel()
            await asyncio.wait([task], timeout=CLEAN_UP_SECONDS)


class TaskHub(Hub):
    """A :class:`~mongoengine_lockable._io.Hub` of an event loop: a task of
    that loop reads its stream."""

    waker_class = TaskWaker

    def __init__(self, key: Any, source: Any) -> None:
        super().__init__(key, source)
        self.loop = asyncio.get_running_loop()
        self.task: asyncio.Task[Any] | None = None
        #: The loop is shutting down its asynchronous generators.
        self.shutting_down = False

    def alive(self) -> bool:
        return super().alive() and not self.loop.is_closed() and (
            self.task is None or not self.task.done())

    def _start_reading(self) -> None:
        self.task = _in_background(self._read_events())

    async def _read_events(self) -> None:
        guard = _until_shutdown(self)
        await guard.__anext__()
        try:
            await adrive(self.reading(self.idle), _ainvoke)
        finally:
            self.failed()  # (nobody is left to tell, unless it failed or was cancelled)
            try:
                await self.stream.close()
            except Exception as exc:  # pragma: no cover - the server went away
                log.debug("closing a change stream failed: %s", exc)
            if not self.shutting_down:
                await guard.aclose()

    @staticmethod
    def _close_stream(stream: Any) -> None:  # pragma: no cover - see Hub.opened
        _in_background(stream.close())


class AsyncIO(Executor):
    """Answers the engine's requests with pymongo's asyncio client, awaiting
    the calls that :meth:`~mongoengine_lockable._io.Executor.calls` makes of
    them, as the blocking executor sends them.

    :param collection: the ``AsyncCollection`` of the lease records.
    :param write_concern: of lease changes (default ``majority``).
    """

    sleep = staticmethod(asyncio.sleep)

    hub_class = TaskHub

    def hub_scope(self) -> Any:
        """A client is bound to its event loop, and so is a stream: one hub
        per loop."""
        return id(asyncio.get_running_loop())

    def session(self) -> Any:
        """A session whose operation time a waiter's change stream starts at."""
        return self.collection.database.client.start_session(causal_consistency=False)

    async def do(self, request: Any, session: Any, wakers: list[Any]) -> Any:
        with bounded(request):
            return await adrive(self.calls(request, session, wakers), _ainvoke)

    def close_later(self, wakers: list[Any], session: Any) -> None:
        """Unregister the run's wakers, and end its session off the way back
        to the caller."""
        for waker in wakers:
            waker.close()
        if session is not None:
            _in_background(session.end_session())


class AsyncMockIO:
    """Answers the engine's requests on mongomock from the event loop: each
    request is :class:`~mongoengine_lockable._io.MockIO`'s, in memory (under
    its process-wide guard, held for one request); a waiter's pause polls the
    recorded events every :attr:`POLL` seconds instead of blocking.

    :param collection: the mongomock collection of the lease records.
    :param write_concern: of lease changes (checked; mongomock ignores it).
    """

    #: How often a paused waiter looks at the recorded events.
    POLL = 0.01

    def __init__(self, collection: Any, write_concern: WriteConcern | None = None) -> None:
        self.mock = MockIO(collection, write_concern)
        self.source = collection

    def session(self) -> None:
        return None

    async def do(self, request: Any, session: Any, wakers: list[Any]) -> Any:
        if isinstance(request, Pause):
            return await self._pause(request.waker, request.seconds)
        if isinstance(request, Sleep):
            await asyncio.sleep(request.seconds)
            return None
        return self.mock.do(request, session, wakers)

    async def _pause(self, waker: MockWaker, seconds: float) -> dict[str, Any] | None:
        end = time.monotonic() + min(seconds, MockWaker.MAX_POLL)
        while True:
            event = waker.poll()
            left = end - time.monotonic()
            if event is not None or left <= 0:
                return event
            await asyncio.sleep(min(left, self.POLL))

    def close_later(self, wakers: list[Any], session: Any) -> None:
        pass


def executor_for(collection: Any, write_concern: WriteConcern | None = None) -> AsyncExecutor:
    """The asyncio executor of ``collection``: :class:`AsyncMockIO` on mongomock."""
    if is_mongomock(collection):
        return AsyncMockIO(collection, write_concern)
    return AsyncIO(collection, write_concern)


# -- the default database of an alias, per event loop -----------------------------------------


class _Client:
    """The asyncio client of one alias in one event loop, made from the
    alias's ``settings``; ``closer`` closes it with its loop."""

    def __init__(self, settings: Mapping[str, Any], client: Any, closer: Any) -> None:
        self.settings = settings
        self.database = client[settings["name"]]
        self.closer = closer


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Client]] = (
    weakref.WeakKeyDictionary())

# MongoEngine's names of two client options; pymongo reads the other option
# names in any case, so they are passed as they are.
_RENAMED = {"authentication_source": "authSource", "authentication_mechanism": "authMechanism"}
_NOT_OPTIONS = ("name", "mongo_client_class")


def _settings(alias: str) -> Mapping[str, Any]:
    """The connection settings MongoEngine keeps for ``alias``.

    :raises mongoengine.connection.ConnectionFailure: ``alias`` is not connected.
    """
    registered: dict[str, Any] | None = getattr(_mongoengine, "_connection_settings", None)
    settings: Mapping[str, Any] | None = None if registered is None else registered.get(alias)
    if settings is None:
        _mongoengine.get_db(alias)  # MongoEngine's own error for an unknown alias
        raise RuntimeError(  # pragma: no cover - a MongoEngine that keeps them elsewhere
            f"cannot read MongoEngine's connection settings of alias {alias!r}: "
            "pass database=")
    return settings


def client_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The ``AsyncMongoClient`` arguments of MongoEngine's connection settings."""
    options = {_RENAMED.get(key, key): value for key, value in settings.items()
               if key not in _NOT_OPTIONS and value is not None}
    options.setdefault("driver", DriverInfo("mongoengine-lockable", __version__))
    return options


async def _closing(client: Any) -> AsyncIterator[None]:
    """Closes ``client`` when its event loop shuts down its asynchronous
    generators (``asyncio.run`` does, after cancelling the loop's tasks)."""
    try:
        yield
    finally:
        await client.close()


async def default_database(alias: str) -> Any:
    """The database of MongoEngine's ``alias`` for the running event loop:
    an ``AsyncDatabase`` of a client made from the alias's connection settings
    (one per alias and loop, made without I/O), or the alias's own mongomock
    database.

    :raises mongoengine.connection.ConnectionFailure: ``alias`` is not connected.
    """
    settings = _settings(alias)
    client_class = settings.get("mongo_client_class")
    if client_class is not None and client_class.__module__.partition(".")[0] == "mongomock":
        return _mongoengine.get_db(alias)
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    known = per_loop.get(alias)
    if known is None or known.settings is not settings:
        # A new connection under the alias (a reconnect): a new client. The
        # old one may still serve locks made before; its loop closes it.
        client: Any = AsyncMongoClient(**client_options(settings))
        closer = _closing(client)
        await closer.__anext__()
        known = per_loop[alias] = _Client(settings, client, closer)
    return known.database


def binding(database: Any, alias: str) -> tuple[Any, Any]:
    """What the executor of an asyncio face depends on: the running event
    loop, and ``database`` or else the connection settings of ``alias`` (a
    reconnect replaces them)."""
    return asyncio.get_running_loop(), database if database is not None else _settings(alias)


async def async_records(database: Any, alias: str, collection: str) -> Any:
    """The collection of named records ``collection`` in ``database``
    (``None``: the default database of ``alias``), with its TTL index ensured
    once per process, as :func:`~mongoengine_lockable._named.records` does."""
    if database is None:
        database = await default_database(alias)
        if is_mongomock(database):
            return records(alias, collection)
    coll = database[collection]
    key = ttl_key(coll)
    if key not in _ttl_ready:
        try:
            await coll.create_index(TTL_FIELD, **TTL_OPTIONS)
        except OperationFailure as exc:
            ttl_refused(coll, exc)
        _ttl_ready.add(key)
    return coll


def is_async_database(database: object) -> bool:
    """Is ``database`` a pymongo ``AsyncDatabase``?"""
    return isinstance(database, AsyncDatabase)


# -- a lease with its keepalive task ----------------------------------------------------------


class AsyncLease(LeaseHandle):
    """A :class:`~mongoengine_lockable._engine.Lease` with an asyncio
    executor and its keepalive task: what every asyncio face acquires,
    releases and renews through.

    The keepalive task holds only a weak reference to its lease, so a
    forgotten holder can still be garbage-collected (its lease then
    expires); :meth:`release` cancels and awaits it.
    """

    io: AsyncExecutor

    def __init__(self, lease: Lease, io: AsyncExecutor) -> None:
        super().__init__(lease, io)
        self._keeper: asyncio.Task[None] | None = None

    async def _stop_keepalive(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is None or keeper.done() or keeper is asyncio.current_task():
            return
        keeper.cancel()
        # Not ``await keeper``: that would take the keeper's cancellation for
        # a cancellation of the caller.
        await asyncio.wait([keeper])

    async def acquire(self, owner: str, ms: int, *, wait: float | None, keepalive: bool = False,
                      extra: Mapping[str, Any] | None = None) -> Result | None:
        """Acquire (see :meth:`Lease.acquire`); with ``keepalive``, renew from
        a task until :meth:`release`."""
        await self._stop_keepalive()
        steps = self.lease.acquire(owner, ms, wait=wait, extra=extra)
        return self.acquired(await arun(steps, self.io, track=wait != 0), keepalive)

    def keep_alive(self, *, forever: bool = True) -> None:
        """Start renewing the held lease from a task of the running loop (with
        ``forever=False``: only to confirm a lease handed over for a short
        term)."""
        name = f"lockable-keepalive {self.lease.what}"
        self._keeper = asyncio.get_running_loop().create_task(
            _keep(weakref.ref(self), forever), name=name)

    async def release(self, owner: str | None = None) -> Result:
        if self.releases_own(owner):
            await self._stop_keepalive()
        return await arun(self.lease.release(owner), self.io)

    async def renew(self, ms: int | None = None, owner: str | None = None) -> Result:
        return await arun(self.lease.renew(ms, owner), self.io)

    async def owned(self, owner: str | None = None) -> bool:
        return await arun(self.lease.owned(owner), self.io)

    async def look(self) -> View:
        return await arun(self.lease.look(), self.io)


async def _keep(ref: weakref.ref[AsyncLease], forever: bool) -> None:
    """The keepalive task: one :meth:`Lease.keep` step at each delay it gives.

    It stops when its handle no longer names it as its keeper, not only when
    cancelled: a cancellation that arrives as a driver call completes can be
    lost on the way (``asyncio.wait_for`` before Python 3.12 returns the
    result and drops it), and the task would then renew a released lease.
    """
    me = asyncio.current_task()
    delay = LeaseHandle.first_delay(ref)
    while delay is not None:
        await asyncio.sleep(delay)
        handle = ref()
        if handle is None or handle._keeper is not me:
            return  # forgotten (its lease expires), or stopped
        try:
            kept = await arun(handle.lease.keep(), handle.io)
            if handle._keeper is not me:
                return  # stopped while renewing
            delay = handle.kept(kept, forever)
        except Exception:  # pragma: no cover - keep() handles database errors
            log.exception("keepalive of %s failed", handle.lease.what)
            return
        finally:
            del handle
