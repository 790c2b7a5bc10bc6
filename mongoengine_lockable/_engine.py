"""The policy around a lease, written once for every kind of lock and for both
the blocking and the asyncio faces.

A :class:`Lease` is one caller's handle on one lease record: it acquires (once,
or waiting its turn in the record's queue), releases, renews, keeps the lease
alive, knows whether the caller still holds it and for how long it may count
on it, sends the signals and builds the errors. It does no I/O itself: its
methods are generators that yield requests (:class:`Modify`, :class:`Read`,
:class:`Watch`, ...) and receive their answers. An executor runs them: with
pymongo or mongomock (:func:`mongoengine_lockable._io.run`), or with pymongo's
asyncio client (:mod:`mongoengine_lockable.aio`). The filters and updates come
from the lease's kind (:mod:`mongoengine_lockable._rules`).

Every uncertain outcome (a lost reply, an unconfirmed write concern) is
resolved by reading back this attempt's own identity: the grant's ticket, or
the stamp of the release.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Callable, NamedTuple, Optional, TypeVar, Union

from pymongo.errors import (
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)

from . import signals
from ._errors import LockError, LockNotOwnedError, LockUnavailableError, held_by
from ._expr import naive_utc
from ._rules import (
    PICKUP_MS,
    REFRESH_SECONDS,
    Ask,
    Filter,
    Holding,
    Kind,
    Update,
    View,
    combine,
    new_ticket,
    wait_prefix,
)
from ._waiting import MAX_WAIT_SLICE, backoff

__all__ = [
    "ClaimSpec",
    "Lease",
    "Modify",
    "ModifyMany",
    "Pause",
    "Read",
    "ReadMany",
    "Result",
    "Sleep",
    "Steps",
    "Watch",
    "force_release",
    "is_ambiguous",
    "look",
    "record",
    "records",
]

log = logging.getLogger("mongoengine_lockable.lease")

T = TypeVar("T")

#: Renew when this fraction of the lease has passed, so that two renewals can
#: fail (a failover, a slow network) before the lease runs out.
RENEW_FRACTION = 1 / 3
#: After a failed renewal, try again this much sooner (fraction of the lease).
RETRY_FRACTION = 1 / 10
#: Longest a keepalive sleeps in one go (``Event.wait`` overflows on huge values).
MAX_KEEPALIVE_SLEEP = 3600.0
#: A lease handed over for the short pickup term is confirmed this long after
#: it was seen (a quarter of the term): a holder that releases sooner never
#: sends the confirmation, and a failed one still has time to be retried.
CONFIRM_AFTER = PICKUP_MS / 4000
#: After a release found waiters its quiet form did not expect, the handle's
#: releases hand over at once for this long (the quiet form's miss costs a
#: round trip, and a lease that was contended is likely to be again).
CONTENDED_SECONDS = 10.0
_MILLISECOND = timedelta(milliseconds=1)


def is_ambiguous(exc: BaseException) -> bool:
    """Could the write behind ``exc`` have been applied, or later be?

    A network error (the reply was lost), a write concern not confirmed, or an
    error labelled retryable after pymongo's own retry failed.
    """
    if isinstance(exc, (ConnectionFailure, WriteConcernError)):
        return True
    return isinstance(exc, OperationFailure) and exc.has_error_label("RetryableWriteError")


# -- requests -------------------------------------------------------------------------


class Result(NamedTuple):
    """A record as stored after a write (or read), and the server's time then."""

    doc: Optional[dict[str, Any]]
    now: Optional[datetime]


class Modify(NamedTuple):
    """One ``findAndModify``. Answer: :class:`Result` (``doc`` is ``None`` when
    nothing matched).

    :ivar timeout: seconds the operation may take in all (``None``: the
        client's own timeouts).
    :ivar clock: the answer carries the server's time (``now``); without it
        (``now`` is ``None``) the reply is the plain record.
    """

    filter: Filter
    update: Update
    upsert: bool = False
    sort: Optional[list[Any]] = None
    hint: Any = None
    collation: Any = None
    timeout: Optional[float] = None
    clock: bool = True


@dataclass(frozen=True)
class ModifyMany:
    """One ``update`` of every match. Answer: the number of records changed."""

    filter: Filter
    update: Update


@dataclass(frozen=True)
class Read:
    """Read one record from the primary (``majority``: as a majority has
    committed it). Answer: :class:`Result`."""

    filter: Filter
    majority: bool = False
    sort: Optional[list[Any]] = None


@dataclass(frozen=True)
class ReadMany:
    """Read records from the primary (``majority``: as a majority has
    committed them). Answer: a list of documents, or with ``with_now`` a list
    of :class:`Result` (the whole record and the server's time)."""

    filter: Filter
    sort: Optional[list[Any]] = None
    skip: int = 0
    limit: int = 0
    projection: Optional[Mapping[str, Any]] = None
    hint: Any = None
    collation: Any = None
    with_now: bool = False
    majority: bool = False


@dataclass(frozen=True)
class Watch:
    """Be woken by the change events ``match`` selects, from the last write
    of this run on. Answer: a waker, or ``None`` where the server has no
    change streams (the caller polls).

    The waiters of a process share a stream of the events ``shared`` selects
    (for every waiter of one kind on a collection); ``wants`` picks this
    waiter's among them, as ``match`` would (``None``: all of them).
    """

    match: Filter
    shared: Filter
    wants: Optional[Callable[[Mapping[str, Any]], bool]] = None


@dataclass(frozen=True)
class Pause:
    """Block on ``waker`` for at most ``seconds``. Answer: the change event that
    ended the pause, or ``None``."""

    waker: Any
    seconds: float


@dataclass(frozen=True)
class Sleep:
    """Sleep ``seconds`` (polling). Answer: ``None``."""

    seconds: float


Request = Union[Modify, ModifyMany, Read, ReadMany, Watch, Pause, Sleep]
Steps = Generator[Request, Any, T]


# -- waiting ------------------------------------------------------------------------------


class Waiting:
    """What a waiter blocks on between attempts: the change events ``watch``
    asks for, from its first pause on, else polling with :func:`backoff`;
    and its deadline."""

    def __init__(self, wait: float | None, clock: Callable[[], float], watch: Watch) -> None:
        self.clock = clock
        self.started = clock()
        self.deadline = None if wait is None else self.started + wait
        self._watch = watch
        #: What the executor answered ``watch`` with (``None``: polling).
        self.waker: Any = None
        self._opened = False
        self._polls = 0

    def waited(self) -> float:
        return self.clock() - self.started

    def left(self) -> float | None:
        """Seconds to the deadline (``None``: no limit)."""
        return None if self.deadline is None else self.deadline - self.clock()

    def over(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    def pause(self, bound: float) -> Steps[dict[str, Any] | None]:
        """Block until an event, ``bound`` seconds, or the deadline."""
        left = self.left()
        seconds = max(bound, 0.0) if left is None else max(min(bound, left), 0.0)
        if not self._opened:
            self._opened = True
            self.waker = yield self._watch
        if self.waker is None:
            seconds = min(seconds, backoff(self._polls))
            self._polls += 1
            yield Sleep(seconds)
            return None
        event: dict[str, Any] | None = yield Pause(self.waker, seconds)
        return event


# -- the handle -------------------------------------------------------------------------


class _Hooks(NamedTuple):
    """What a lease asks of its face (see :class:`Lease`)."""

    subject: Callable[[], tuple[Any, Mapping[str, Any]]]
    on_stored: Optional[Callable[[Result, bool], None]]
    missing: Optional[Callable[[], Exception]]


@dataclass
class Held:
    """The lease a handle holds: its grant and the local deadline."""

    owner: str
    ticket: str
    fence: int
    #: The duration it was acquired with (the default of a renewal).
    ms: int
    #: Monotonic time the current term counts from (no later than the grant or
    #: the renewal), and the term's length in milliseconds.
    anchor: float
    term: int
    until: datetime | None
    #: Known not to be held any more (a failed renewal, or the local deadline).
    lost: bool = False
    #: ``lock_lost`` was sent for it.
    announced: bool = False
    #: A hand-off for a short term: to be renewed to ``ms`` at once.
    confirm: bool = False
    #: Granted to a caller that did not wait, with nobody queued: its release
    #: tries the kind's quiet form first (see ``Kind.quiet_release``).
    quiet: bool = False


class Lease:
    """One caller's handle on one lease record.

    :param kind: the lease's rules (:class:`~mongoengine_lockable._rules.Kind`).
    :param match: the filter naming the record (``_id``, and the shard key).
    :param what: how the record is named in messages (``"Job 'a1'"``,
        ``"lock 'nightly'"``).
    :param target: the id or name carried by errors.
    :param subject: returns the sender of the signals and the keyword arguments
        of every signal (``document=`` or ``name=``); called when a signal is
        sent, so that the lease need not keep its face alive.
    :param on_stored: called with the record as stored after a grant or an
        update made under the lease (``whole=True``), or after a release or
        renewal (``whole=False``), before the signal is sent.
    :param missing: builds the error raised when the record does not exist
        (for kinds that do not create it).
    :param clock: the monotonic clock.
    """

    def __init__(
        self,
        kind: Kind,
        match: Filter,
        *,
        what: str,
        target: Any,
        subject: Callable[[], tuple[Any, Mapping[str, Any]]],
        on_stored: Callable[[Result, bool], None] | None = None,
        missing: Callable[[], Exception] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kind, self.match, self.clock = kind, match, clock
        #: How the record is named in messages, and the id or name errors carry.
        self.what, self.target = what, target
        self._hooks = _Hooks(subject, on_stored, missing)
        self.held: Held | None = None
        #: Its part of the tickets of its waits (see :attr:`prefix`).
        self._own = new_ticket()[:8]
        #: When a quiet release of this handle last found waiters (monotonic).
        self.contended_at: float | None = None
        #: Whether this handle ever held a lease (for messages).
        self.had_lease = False
        #: The fence of this handle's latest grant (``None`` before the first).
        self.fence: int | None = None
        #: The record as the last refused acquisition saw it.
        self.refused: View | None = None

    @property
    def prefix(self) -> str:
        """Starts the tickets of this handle's waits: the process's (which
        its change stream selects), then the handle's own. A wait is woken by
        the grants of the lease to a ticket with this prefix."""
        return wait_prefix() + self._own

    # -- helpers ----------------------------------------------------------------

    def _check(self, view: View) -> View:
        if view.foreign is not None:
            raise LockError(
                f"{self.what} is a {view.foreign} record, not a {self.kind.name}: "
                "a name is used by one kind of lock per collection",
                target=self.target,
            )
        missing = self._hooks.missing
        if not view.exists and not self.kind.upsert and missing is not None:
            raise missing()
        return view

    def _modify(self, command_filter: Filter, update: Update, **options: Any) -> Modify:
        flt = combine(self.match, command_filter) if command_filter else dict(self.match)
        return Modify(flt, update, **options)

    def _send(self, name: str, **extra: Any) -> None:
        signal = getattr(signals, name)
        if not signal.receivers:
            return  # nobody listens: not even the subject is needed
        sender, subject = self._hooks.subject()
        signal.send(sender, **subject, **extra)

    def _stored(self, result: Result, whole: bool) -> None:
        if self._hooks.on_stored is not None:
            self._hooks.on_stored(result, whole)

    def not_owned(self, action: str, owner: str | None) -> LockNotOwnedError:
        return LockNotOwnedError(
            f"cannot {action} {self.what}: owner {owner!r} does not hold an unexpired lease on it",
            target=self.target,
            owner=owner,
        )

    def unavailable(self) -> LockUnavailableError:
        """The error of a refused acquisition, naming the holder it saw."""
        view = self.refused
        holder = None if view is None else view.holder
        if view is not None and view.finished:
            # Not someone's work in progress: a finished run's minimum hold.
            text = (f"is kept for {view.time_left:.1f} s more by the minimum hold of a "
                    f"finished run of {holder!r}")
            holder = None
        elif view is not None and view.held and holder is None:
            text = "is held"
        elif view is not None and not view.held and view.queued:
            text = f"has {view.queued} waiter{'s' if view.queued > 1 else ''} queued before you"
        else:
            text = held_by(holder)
        return LockUnavailableError(f"{self.what} {text}", target=self.target, owner=holder)

    def _holding(self, owner: str | None, action: str) -> tuple[Holding, Held | None]:
        """Who "the caller" is: ``owner`` if given, else this handle's lease."""
        held = self.held
        if owner is None:
            if held is None:
                if self.had_lease:
                    why = "its lease was already released (or lost)"
                else:
                    why = "it has not acquired a lease"
                raise LockNotOwnedError(
                    f"cannot {action} {self.what} from this instance: {why} "
                    "(pass owner= to act on a lease acquired elsewhere)",
                    target=self.target,
                )
            return Holding(held.owner, held.ticket), held
        if held is not None and held.owner == owner:
            return Holding(owner, held.ticket), held
        return Holding(owner), None

    # -- acquiring ------------------------------------------------------------------

    def acquire(
        self,
        owner: str,
        ms: int,
        *,
        wait: float | None,
        force: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> Steps[Result | None]:
        """Take the lease: once (``wait == 0``, or ``force``), or waiting in the
        record's queue for up to ``wait`` seconds (``None``: no limit).

        :return: the record as stored at the grant, or ``None`` if refused
            (:attr:`refused` then shows what was seen).
        """
        if wait == 0 or force:
            ask = Ask(owner, new_ticket(), ms, dict(extra or {}))
            started = sent = self.clock()
            command = self.kind.acquire(ask, "force" if force else "try")
            try:
                # Without the server's time: a grant shows it (see
                # Kind.grant_time), and only a refusal needs it.
                result: Result = yield self._modify(command.filter, command.update,
                                                    upsert=command.upsert, clock=False)
            except DuplicateKeyError:
                # Two first acquisitions raced to create the record; the other won.
                result = Result({}, None)
            except PyMongoError as exc:
                if not is_ambiguous(exc):
                    raise
                result = yield from self._read_back(exc, self.kind.granted(ask.ticket))
                if result.doc is None:
                    # Not granted; what else the record shows is unknown.
                    result = Result({}, None)
            except GeneratorExit:
                raise
            except BaseException:
                # Interrupted or cancelled before the answer came: give back
                # the lease, should the write have granted it.
                yield from self._abandon(ask)
                raise
            if result.now is None:
                now = self.kind.grant_time(result.doc, ask)
                result = Result(result.doc, now) if now is not None else (
                    yield from self._look_refused(result))
            view = self._check(self.kind.view(result.doc, result.now, ask.ticket))
            if view.mine:
                return self.adopt(result, ask, (sent, result.now), self.clock() - started,
                                  view=view, direct=True)
            return self._refuse(view, self.clock() - started)
        # A waiter's ticket: the handle's prefix, which its stream selects.
        ask = Ask(owner, self.prefix + new_ticket()[:8], ms, dict(extra or {}))
        return (yield from self._wait_in_queue(ask, wait))

    def _look_refused(self, refused: Result) -> Steps[Result]:
        """The record with the server's time, after a direct acquisition that
        ``refused`` answered without it (not granted): what the refusal
        reports (holder, time left, waiters). Should the read fail, the
        refusing record without a time."""
        try:
            result: Result = yield Read(self.match)
        except PyMongoError as exc:
            log.debug("could not read %s after a refusal: %s", self.what, exc)
            return refused
        return result

    def _read_back(self, exc: PyMongoError, identity: Filter) -> Steps[Result]:
        log.warning("outcome of a lease change unknown (%s); reading it back", exc)
        try:
            result: Result = yield Read(combine(self.match, identity), majority=True)
        except PyMongoError as again:
            raise exc from again
        return result

    def _wait_in_queue(self, ask: Ask, wait: float | None) -> Steps[Result | None]:
        """Queue for the lease until it is ours or ``wait`` has passed.

        Each attempt takes or refreshes the caller's place and settles the
        lease (one write). Between attempts the caller blocks on a change
        stream that the server filters down to the write granting it the
        lease; it looks again at its refresh interval, and, first in the queue,
        when the holder's lease runs out.
        """
        key = {"documentKey." + k: v for k, v in self.match.items()}
        prefix = self.prefix
        watch = Watch(combine(key, self.kind.granted_event(prefix)),
                      self.kind.granted_event(wait_prefix()),
                      partial(self.kind.waits_for, self.match, prefix))
        waiting = Waiting(wait, self.clock, watch)
        command = self.kind.acquire(ask, "queue")
        # (sent, server time) of the last answered attempt: a grant learnt
        # later happened after it.
        last: tuple[float, datetime] | None = None
        try:
            while True:
                sent = self.clock()
                view: View | None = None
                try:
                    result: Result = yield self._modify(command.filter, command.update,
                                                        upsert=command.upsert)
                except DuplicateKeyError:
                    pass  # a concurrent creation of the record: try again
                except PyMongoError as exc:
                    if not is_ambiguous(exc):
                        raise
                    # The next attempt is the same write again, and tells.
                    log.warning("waiting for %s: %s; trying again", self.what, exc)
                else:
                    view = self._check(self.kind.view(result.doc, result.now, ask.ticket))
                    if view.mine:
                        return self.adopt(result, ask, (sent, result.now), waiting.waited())
                    if result.now is not None:
                        last = (sent, result.now)
                if waiting.over():
                    return (yield from self._give_up(ask, waiting, last))
                bound = REFRESH_SECONDS
                if view is not None and view.head:
                    # First in line: look again the moment the lease runs out.
                    bound = min(bound, view.time_left + 0.001)
                look_at = self.clock() + bound
                event = yield from waiting.pause(bound)
                while event is not None and self.kind.earlier_grant(event, ask.ticket):
                    # The grant of an earlier wait of this handle (the
                    # process's stream read it recently): not news; wait on
                    # until look_at.
                    event = yield from waiting.pause(look_at - self.clock())
                doc = None if event is None else event.get("fullDocument")
                if doc is not None and self.kind.event_grants(event, ask.ticket):  # type: ignore[arg-type]
                    seen = self.kind.view(doc, event.get("wallTime"), ask.ticket)  # type: ignore[union-attr]
                    if seen.mine and seen.now is not None:
                        result = Result(doc, seen.now)
                        # Seen in the event: the hand-off's server time is no
                        # earlier than that of the last answered attempt.
                        seen_at = last or (self.clock(), seen.now)
                        return self.adopt(result, ask, seen_at, waiting.waited())
        except GeneratorExit:
            raise
        except BaseException:
            # Interrupted or cancelled while queued: leave nothing queued or held.
            yield from self._abandon(ask)
            raise

    def _give_up(
        self, ask: Ask, waiting: Waiting, last: tuple[float, datetime] | None
    ) -> Steps[Result | None]:
        """The wait is over: leave the queue, unless the lease came meanwhile."""
        sent = self.clock()
        command = self.kind.leave(ask.ticket)
        try:
            result: Result = yield self._modify(command.filter, command.update)
        except PyMongoError as exc:
            # The entry is skipped once its refresh runs out anyway.
            log.warning("could not leave the queue of %s: %s", self.what, exc)
            return self._refuse(self.refused or View(exists=True), waiting.waited())
        view = self._check(self.kind.view(result.doc, result.now, ask.ticket))
        if view.mine:
            return self.adopt(result, ask, (sent, result.now), waiting.waited())
        return self._refuse(view, waiting.waited())

    def _abandon(self, ask: Ask) -> Steps[None]:
        command = self.kind.leave(ask.ticket)
        try:
            result: Result = yield self._modify(command.filter, command.update)
            view = self.kind.view(result.doc, result.now, ask.ticket)
            if view.mine:
                # Granted at the last moment: give it back.
                release = self.kind.release(Holding(ask.owner, ask.ticket), new_ticket())
                yield self._modify(release.filter, release.update)
        except Exception as exc:
            log.warning("could not leave the queue of %s: %s", self.what, exc)

    def adopt(
        self, result: Result, ask: Ask, seen: tuple[float, datetime | None], waited: float,
        *, view: View | None = None, direct: bool = False,
    ) -> Result:
        """Record a grant (from :meth:`acquire`, or a claim that picked this
        record) and announce it.

        :param seen: when the grant was seen: the local (monotonic) time a
            request was sent, and the server's time while it ran, no later
            than the grant was observed. The lease counts as held until that
            local time plus what the server said was left (``until - now``):
            never longer than the server granted.
        """
        assert result.doc is not None
        if view is None:
            view = self.kind.view(result.doc, result.now, ask.ticket)
        sent, server_now = seen
        left = granted = ask.ms
        until = view.until
        if until is not None and result.now is not None:
            # What was left when the record was read (for a hand-off seen in
            # its change event: when it was made).
            granted = int((until - naive_utc(result.now)) / _MILLISECOND)
        if until is not None and server_now is not None:
            left = min(ask.ms, granted if server_now is result.now
                       else int((until - naive_utc(server_now)) / _MILLISECOND))
        self.held = Held(
            owner=ask.owner,
            ticket=ask.ticket,
            fence=int(view.fence or 0),
            ms=ask.ms,
            anchor=sent,
            term=max(left, 0),
            until=view.until,
            # Handed over by another's write: granted for a short while only,
            # until this holder confirms it (see PICKUP_MS).
            confirm=ask.ms > PICKUP_MS >= granted,
            # A caller that waited expects others, as does one whose release
            # recently found waiters: its release hands over at once.
            quiet=direct and view.queued == 0 and (
                self.contended_at is None
                or self.clock() - self.contended_at > CONTENDED_SECONDS),
        )
        self.had_lease = True
        self.fence = self.held.fence
        self.refused = None
        self._stored(result, True)
        self._send("lock_acquired", owner=ask.owner, fence=self.held.fence, waited=waited)
        return result

    def _refuse(self, view: View, waited: float) -> Result | None:
        """Record and announce a refusal; returns ``None`` (no grant)."""
        self.refused = view
        self._send("lock_unavailable", waited=waited, holder=view.holder)
        return None

    # -- releasing, renewing ---------------------------------------------------------------

    def release(self, owner: str | None = None) -> Steps[Result]:
        """End the caller's lease now (passing it to the first live waiter).

        :raises LockNotOwnedError: the caller does not hold an unexpired lease;
            a lease of the caller's that expired and that nobody took since is
            cleared first, where the kind keeps such leases recorded.
        """
        holding, own = self._holding(owner, "release")
        stamp = new_ticket()
        quiet = self.kind.quiet_release(holding, stamp) if own is not None and own.quiet else None
        try:
            result: Result | None = None
            if quiet is not None:
                result = yield self._modify(quiet.filter, quiet.update, clock=False)
            if result is None or result.doc is None:
                # Someone queued meanwhile (or the lease is not held): the
                # release that hands over decides.
                if quiet is not None:
                    self.contended_at = self.clock()
                command = self.kind.release(holding, stamp)
                result = yield self._modify(command.filter, command.update, clock=False)
        except PyMongoError as exc:
            if not is_ambiguous(exc):
                raise
            # The full release decides whatever the record shows now.
            result = yield from self._resolve_release(
                exc, self.kind.release(holding, stamp), stamp)
        if own is not None:
            self.held = None
        if result.doc is None:
            clear = self.kind.clear_expired(holding, new_ticket())
            if clear is not None:
                yield self._modify(clear.filter, clear.update)
            raise self.not_owned("release", holding.owner)
        held_for = None if own is None else self.clock() - own.anchor
        # Released by owner name: the kind tells what the record shows of it.
        fence = own.fence if own is not None else self.kind.released_fence(result.doc)
        self._stored(result, False)
        self._send("lock_released", owner=holding.owner, fence=fence, held_for=held_for)
        return result

    def _resolve_release(
        self, exc: PyMongoError, command: Any, stamp: str
    ) -> Steps[Result]:
        result: Result = yield from self._read_back(exc, self.kind.stamped(stamp))
        if result.doc is not None:
            return result
        # Not released as a majority sees it: send it again; the server decides.
        result = yield self._modify(command.filter, command.update)
        if result.doc is None:
            # The first release may be applied but not yet majority-committed.
            local: Result = yield Read(combine(self.match, self.kind.stamped(stamp)))
            if local.doc is not None:
                return local
        return result

    def renew(
        self, ms: int | None = None, owner: str | None = None, *, timeout: float | None = None
    ) -> Steps[Result]:
        """Extend the caller's unexpired lease to now + ``ms`` (default: the
        duration it was acquired with).

        :raises TypeError: no ``ms`` for a lease this handle did not acquire.
        :raises LockNotOwnedError: the lease is not held (an expired one is not
            revived); the handle's lease then counts as lost.
        """
        holding, own = self._holding(owner, "renew")
        if ms is None:
            if own is None:
                raise TypeError(
                    "renew() needs a duration for a lease this instance did not acquire")
            ms = own.ms
        command = self.kind.renew(holding, ms)
        sent = self.clock()
        request = self._modify(command.filter, command.update, timeout=timeout)
        try:
            result: Result = yield request
        except PyMongoError as exc:
            if not is_ambiguous(exc) or timeout is not None:
                raise
            # Renewing twice is harmless: send it again; the server decides.
            log.warning("outcome of a renewal unknown (%s); sending it again", exc)
            result = yield request
        if result.doc is None:
            if own is not None:
                own.lost = True
            raise self.not_owned("renew", holding.owner)
        if own is not None:
            view = self.kind.view(result.doc, result.now, own.ticket)
            own.anchor, own.term, own.until, own.confirm = sent, ms, view.until, False
        fence = own.fence if own is not None else self.kind.holder_fence(result.doc, holding)
        self._stored(result, False)
        self._send("lock_renewed", owner=holding.owner, fence=fence)
        return result

    def update(self, update: dict[str, Any]) -> Steps[Result]:
        """Apply an operator ``update`` to the record only while this handle's
        lease, with its grant, is unexpired; the write is stamped, so that an
        ambiguous outcome is resolved by reading the stamp back.

        :raises LockNotOwnedError: the lease is not held: nothing was written.
        """
        holding, own = self._holding(None, "update")
        stamp = new_ticket()
        stamped = {op: dict(changes) for op, changes in update.items()}
        stamped.setdefault("$set", {})[self.kind.layout.stamp] = stamp
        request = self._modify(self.kind.holds(holding), stamped, clock=False)
        try:
            result: Result = yield request
        except PyMongoError as exc:
            if not is_ambiguous(exc):
                raise
            result = yield from self._read_back(exc, self.kind.stamped(stamp))
            if result.doc is None:
                # Applied on the primary, not yet majority-committed?
                result = yield Read(combine(self.match, self.kind.stamped(stamp)))
            if result.doc is None:
                # Not applied: the server decides whether the lease still holds.
                result = yield request
        if result.doc is None:
            if own is not None:
                own.lost = True
            raise self.not_owned("update", holding.owner)
        self._stored(result, True)
        return result

    # -- looking -------------------------------------------------------------------------

    def owned(self, owner: str | None = None) -> Steps[bool]:
        """Read the primary: does the caller hold an unexpired lease now?"""
        if owner is None and self.held is None:
            return False
        holding, _ = self._holding(owner, "check")
        result: Result = yield Read(combine(self.match, self.kind.holds(holding)))
        return result.doc is not None

    def look(self) -> Steps[View]:
        """Read the primary: the record as it stands now."""
        return (yield from look(self.kind, self.match))

    def remaining(self) -> float:
        """Seconds the caller may still count on its lease, with no I/O: 0 when
        not held, released, or known to be lost."""
        held = self.held
        if held is None or held.lost:
            return 0.0
        return max(held.term / 1000 - (self.clock() - held.anchor), 0.0)

    # -- keepalive -------------------------------------------------------------------------

    def keepalive_delay(self) -> float | None:
        """Seconds until the keepalive should renew; ``None`` once there is
        nothing to keep."""
        held = self.held
        if held is None or held.lost:
            return None
        if held.confirm:
            return min(max(held.anchor + CONFIRM_AFTER - self.clock(), 0.0), MAX_KEEPALIVE_SLEEP)
        due = held.anchor + held.term / 1000 * RENEW_FRACTION - self.clock()
        return min(max(due, 0.0), MAX_KEEPALIVE_SLEEP)

    def keep(self) -> Steps[float | None]:
        """One keepalive renewal, bounded by the time the lease has left.

        :return: seconds until the next one, or ``None`` to stop (released, or
            lost: then ``lock_lost`` has fired).
        """
        held = self.held
        if held is None or held.lost:
            return None
        left = self.remaining()
        if left > 0:
            try:
                yield from self.renew(timeout=left)
                return self.keepalive_delay()
            except LockNotOwnedError:
                return self._lost(held, "it was taken over or has expired")
            except PyMongoError as exc:
                left = self.remaining()
                if left > 0:
                    retry = min(held.term / 1000 * RETRY_FRACTION, left)
                    log.warning("renewing %s failed (%s); retrying in %.3f s",
                                self.what, exc, retry)
                    return retry
        return self._lost(held, "its renewals failed until it ran out")

    def _lost(self, held: Held, why: str) -> float | None:
        """Mark the lease lost (once) and announce it; returns ``None`` (stop)."""
        held.lost = True
        if self.held is held and not held.announced:
            held.announced = True
            log.warning("lease on %s lost (owner %s): %s", self.what, held.owner, why)
            self._send("lock_lost", owner=held.owner, fence=held.fence)
        return None


def records(flt: Filter, sort: list[Any] | None = None, limit: int = 0) -> Steps[list[Result]]:
    """Read records from the primary, each with the server's time."""
    found: list[Result] = yield ReadMany(flt, sort, limit=limit, with_now=True)
    return found


def record(match: Filter) -> Steps[Result]:
    """Read one record from the primary, with the server's time."""
    found: Result = yield Read(match)
    return found


def force_release(kind: Kind, match: Filter, ticket: str | None) -> Steps[Result]:
    """End the lease of the record ``match`` names whoever holds it (the grant
    ``ticket``, when given), passing it to its first live waiter.

    :return: the record after the release; ``doc`` is ``None`` when it was not
        held (by that grant) any more.
    """
    stamp = new_ticket()
    command = kind.force_release(stamp, ticket)
    try:
        result: Result = yield Modify(combine(match, command.filter), command.update)
    except PyMongoError as exc:
        if not is_ambiguous(exc):
            raise
        result = yield Read(combine(match, kind.stamped(stamp)), majority=True)
    return result


def look(kind: Kind, match: Filter) -> Steps[View]:
    """Read the primary: the record ``match`` names, as it stands now."""
    result: Result = yield Read(match)
    return kind.view(result.doc, result.now)


# -- claims: one of many documents -----------------------------------------------------

#: Documents of a windowed queryset (``skip``/``limit``) read per batch.
WINDOW_BATCH = 100
#: Rounds of candidates ``claim_many`` tries before it returns what it has.
CLAIM_MANY_ROUNDS = 3
_ID_ONLY = {"_id": True}


@dataclass(frozen=True)
class ClaimSpec:
    """What a queryset selects, for a claim: its filter (``$where`` and
    ``$text`` included), order, window (``skip`` and ``limit``; ``limit=None``:
    none), index hint and collation."""

    filter: Filter
    sort: Optional[list[Any]] = None
    skip: int = 0
    limit: Optional[int] = None
    hint: Any = None
    collation: Any = None

    @property
    def windowed(self) -> bool:
        return bool(self.skip) or self.limit is not None


Claimed = tuple[Result, float]




def _window_batch(spec: ClaimSpec, offset: int) -> Steps[list[Any]]:
    """The ids of the documents at ``offset`` onwards of the queryset's window,
    at most :data:`WINDOW_BATCH` of them, in its order."""
    size = WINDOW_BATCH
    if spec.limit is not None:
        size = min(size, spec.skip + spec.limit - offset)
    if size <= 0:
        return []
    docs: list[dict[str, Any]] = yield ReadMany(
        spec.filter, spec.sort, skip=offset, limit=size, projection=_ID_ONLY,
        hint=spec.hint, collation=spec.collation,
    )
    return [d["_id"] for d in docs]




def claim_once(
    kind: Kind, spec: ClaimSpec, ask: Ask, extra: Filter, clock: Callable[[], float]
) -> Steps[Claimed | None]:
    """Grant ``ask`` the first claimable document the queryset would yield.

    One ``findAndModify`` (filter: the queryset's AND claimable AND ``extra``,
    sorted as the queryset; update: the grant). A windowed queryset reads the
    ids of its window in batches first and claims among them, so that a
    document outside the window is never taken.

    :return: the record as granted and the time the grant was sent.
    """
    command = kind.acquire(ask, "try")
    conditions = combine(kind.claimable(), extra)

    def grant(flt: Filter) -> Steps[Claimed | None]:
        sent = clock()
        try:
            result: Result = yield Modify(flt, command.update, sort=spec.sort, hint=spec.hint,
                                          collation=spec.collation)
        except PyMongoError as exc:
            if not is_ambiguous(exc):
                raise
            log.warning("outcome of a claim unknown (%s); reading it back", exc)
            try:
                # By the grant's own ticket alone: the queryset's filter (say
                # ``unlocked()``) may no longer match the granted document.
                result = yield Read(kind.granted(ask.ticket), majority=True)
            except PyMongoError as again:
                raise exc from again
        return None if result.doc is None else (result, sent)

    if not spec.windowed:
        return (yield from grant(combine(spec.filter, conditions)))
    offset = spec.skip
    while True:
        ids = yield from _window_batch(spec, offset)
        if not ids:
            return None
        got = yield from grant(combine({"_id": {"$in": ids}}, spec.filter, conditions))
        if got is not None:
            return got
        if len(ids) < WINDOW_BATCH:
            return None
        offset += len(ids)


def claim(
    kind: Kind,
    spec: ClaimSpec,
    ask: Ask,
    extra: Filter,
    wait: float | None,
    clock: Callable[[], float],
) -> Steps[tuple[Result, float, float] | None]:
    """:func:`claim_once`, waiting up to ``wait`` seconds (``None``: no limit)
    for a claimable document: woken by a change stream of the writes that can
    make one claimable (:meth:`Kind.claim_events`), and by the earliest expiry
    of a held match; polling where there are no change streams.

    :return: the record as granted, the time the grant was sent and the
        seconds waited; ``None`` if none became claimable in time.
    """
    events = kind.claim_events()
    waiting = Waiting(wait, clock, Watch(events, events))
    while True:
        got = yield from claim_once(kind, spec, ask, extra, clock)
        if got is not None:
            return (*got, waiting.waited())
        if wait == 0 or waiting.over():
            return None
        first: Result = yield Read(combine(spec.filter, extra, kind.held()),
                                   sort=[(kind.layout.until, 1)])
        bound = MAX_WAIT_SLICE
        if first.doc is not None:
            bound = min(bound, kind.view(first.doc, first.now).time_left + 0.001)
        yield from waiting.pause(bound)


def claim_many(
    kind: Kind, spec: ClaimSpec, ask: Ask, extra: Filter, n: int, clock: Callable[[], float]
) -> Steps[list[Claimed]]:
    """Grant ``ask`` up to ``n`` claimable documents of the queryset.

    Per round, three round trips whatever ``n``: read the ids of up to ``n``
    claimable candidates; grant them all with one ``update`` whose filter and
    pipeline check each document again, atomically per document (each gets its
    own fence); read back the documents that carry this grant's ticket (which
    is also how an ambiguous outcome is resolved). Candidates taken by others
    meanwhile are replaced in up to :data:`CLAIM_MANY_ROUNDS` rounds.
    """
    command = kind.acquire(ask, "try")
    conditions = combine(kind.claimable(), extra)
    got: list[Claimed] = []
    seen: list[Any] = []
    offset = spec.skip
    for _ in range(CLAIM_MANY_ROUNDS):
        need = n - len(got)
        if need <= 0:
            break
        if spec.windowed:
            window = yield from _window_batch(spec, offset)
            if not window:
                break
            offset += len(window)
            scope = combine({"_id": {"$in": window}}, spec.filter)
        else:
            scope = combine({"_id": {"$nin": seen}}, spec.filter) if seen else spec.filter
        candidates: list[dict[str, Any]] = yield ReadMany(
            combine(scope, conditions), spec.sort, limit=need, projection=_ID_ONLY,
            hint=spec.hint, collation=spec.collation,
        )
        ids = [c["_id"] for c in candidates]
        if not ids:
            if spec.windowed:
                continue
            break
        seen.extend(ids)
        sent = clock()
        ambiguous = False
        try:
            yield ModifyMany(combine({"_id": {"$in": ids}}, spec.filter, conditions),
                             command.update)
        except PyMongoError as exc:
            if not is_ambiguous(exc):
                raise
            log.warning("outcome of a batch claim unknown (%s); reading it back", exc)
            ambiguous = True
        granted: list[Result] = yield ReadMany(
            combine({"_id": {"$in": ids}}, kind.granted(ask.ticket)), spec.sort,
            with_now=True, majority=ambiguous,
        )
        got.extend((result, sent) for result in granted)
        if not spec.windowed and len(ids) < need:
            break
    return got


def release_all(kind: Kind, spec: ClaimSpec, owner: str) -> Steps[int]:
    """End every unexpired lease of ``owner`` among the records the queryset
    selects (each passes to its first live waiter): one ``update``, or one per
    batch of a windowed queryset's ids.

    :return: how many were released.
    """
    stamp = new_ticket()
    command = kind.release(Holding(owner), stamp)

    def release(flt: Filter) -> Steps[int]:
        try:
            count: int = yield ModifyMany(combine(flt, command.filter), command.update)
        except PyMongoError as exc:
            if not is_ambiguous(exc):
                raise
            log.warning("outcome of release_all unknown (%s); reading it back", exc)
            released: list[Result] = yield ReadMany(combine(flt, kind.stamped(stamp)),
                                                    with_now=True, majority=True)
            count = len(released)
        return count

    if not spec.windowed:
        return (yield from release(spec.filter))
    total, offset = 0, spec.skip
    while True:
        ids = yield from _window_batch(spec, offset)
        if not ids:
            return total
        total += yield from release(combine({"_id": {"$in": ids}}, spec.filter))
        if len(ids) < WINDOW_BATCH:
            return total
        offset += len(ids)
