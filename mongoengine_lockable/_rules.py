"""The lease rules: pure functions that build the filters and updates of every
lease change, one small strategy object per kind of lease.

Nothing here talks to a database. A rule is data: a filter, an update pipeline
and whether to upsert (a :class:`Command`), sent as one ``findAndModify`` by an
executor (:mod:`mongoengine_lockable._io` for pymongo and mongomock,
:mod:`mongoengine_lockable.aio` for asyncio). The server decides with its own
clock, ``$$NOW``; mongomock evaluates the same expressions with
:mod:`mongoengine_lockable._expr`.

A lease record holds, besides the caller's own fields:

``until``
    when the current lease ends; free once it is not after ``$$NOW``.
``owner``
    the holder's name.
``fence``
    the fencing token of the current or last grant; it only grows.
``token``
    the ticket of the attempt that holds the lease (unique per grant); removed
    by a release. A waiter learns that it was granted the lease by seeing its
    own ticket here.
``stamp``
    the id of the last write that changed who holds the lease (a grant, a
    release, a hand-off) or that a holder made under its lease: what an
    ambiguous outcome is resolved by.
``waiters``
    the queue of callers waiting for the lease, oldest first:
    ``{t: ticket, o: owner, ms: duration, a: alive until, x: extra fields}``.
    A waiter refreshes ``a`` while it waits; one not heard from for
    :data:`WAITER_TTL_MS` is skipped.

Every write that changes the queue or frees the lease *settles* it: if the
lease is free, it goes to the oldest live waiter in that same write. A caller
that does not wait takes a free lease only when nobody is queued for it.

Shared leases (semaphores, read/write locks) keep several holders, each with
its own lease and fence, in one record: see :class:`SharedKind`.
"""

from __future__ import annotations

import os
import random
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Callable, Literal, NamedTuple, Union

from ._expr import naive_utc

__all__ = [
    "DOC_KEY",
    "NOW_KEY",
    "PICKUP_MS",
    "RESULT_PROJECTION",
    "WAITER_TTL_MS",
    "Ask",
    "Command",
    "DocumentKind",
    "Holding",
    "Kind",
    "Layout",
    "NamedKind",
    "SharedKind",
    "View",
    "combine",
]

Filter = dict[str, Any]
Pipeline = list[dict[str, Any]]
Update = Union[dict[str, Any], Pipeline]

NOW = "$$NOW"
REMOVE = "$$REMOVE"
ROOT = "$$ROOT"
#: Scratch field of an update pipeline; its last stage removes it.
TMP = "_lockable"
#: Keys of the projection every lease write returns: the server's ``$$NOW`` and
#: the whole record as stored after the write.
NOW_KEY = "_lockable_now"
DOC_KEY = "_lockable_doc"
RESULT_PROJECTION: dict[str, Any] = {NOW_KEY: NOW, DOC_KEY: "$$ROOT"}

#: A queued waiter not heard from for this long is skipped (and dropped).
WAITER_TTL_MS = 1200
#: How often a waiter refreshes its place in the queue (well inside the TTL).
REFRESH_SECONDS = 0.4
#: A lease handed to a waiter by someone else's write is granted for at most
#: this long, until the waiter confirms it (a renewal to its full duration, at
#: once): a waiter that died while queued holds a hand-off no longer than
#: this, so it is skipped within WAITER_TTL_MS + PICKUP_MS of its death.
PICKUP_MS = 800
#: Larger than any queue: ``$slice`` needs a count.
_ALL = 2**31 - 1


def _path(doc: Mapping[str, Any], path: str) -> Any:
    """The value at the dotted ``path`` of ``doc`` (``None``: none)."""
    value: Any = doc
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def combine(*parts: Mapping[str, Any]) -> Filter:
    """AND filters together, flat when their keys do not collide."""
    if len(parts) == 2 and parts[0].keys().isdisjoint(parts[1]):
        return {**parts[0], **parts[1]}  # the most frequent case, at once
    merged: Filter = {}
    for part in parts:
        if not merged.keys().isdisjoint(part):
            return {"$and": [dict(p) for p in parts if p]}
        merged.update(part)
    return merged


# -- owners and tickets -------------------------------------------------------------

_HOST = socket.gethostname()
#: Draws the random bits of owner tokens and tickets: seeded by the operating
#: system, again in a forked child (whose tokens must differ from its
#: parent's), it needs no system call per token.
_RANDOM = random.Random()
#: ``host:pid:``, the start of this process's owner tokens.
_WHERE = ""
#: Starts the tickets of this process's waits (see :func:`wait_prefix`).
_PROCESS = ""


def _seed() -> None:
    global _WHERE, _PROCESS
    _RANDOM.seed()
    _WHERE = f"{_HOST}:{os.getpid()}:"
    _PROCESS = f"{_RANDOM.getrandbits(32):08x}"


_seed()
if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_seed)


def new_owner() -> str:
    """A fresh owner token: host, pid and 48 random bits, so that an operator
    can tell where a lease came from."""
    return f"{_WHERE}{_RANDOM.getrandbits(48):012x}"


def parse_owner(owner: object) -> tuple[str, int] | None:
    """The host and pid of a default owner token (:func:`new_owner`), or
    ``None`` for an owner name the caller chose."""
    if not isinstance(owner, str):
        return None
    host, sep, rest = owner.rpartition(":")
    host, sep2, pid = host.rpartition(":")
    if not (sep and sep2 and host and pid.isdigit() and len(rest) == 12
            and all(c in "0123456789abcdef" for c in rest)):
        return None
    return host, int(pid)


def new_ticket() -> str:
    """A fresh ticket: the identity of one attempt or one write (96 random
    bits)."""
    return f"{_RANDOM.getrandbits(96):024x}"


def wait_prefix() -> str:
    """The start of every ticket this process waits with (32 random bits,
    drawn again in a forked child): the change stream that wakes the
    process's waiters selects the grants to them, and no others."""
    return _PROCESS


def host_and_pid() -> dict[str, Any]:
    """Where this process runs, stored with a named lock's grant."""
    return {"host": _HOST, "pid": os.getpid()}


# -- expression helpers -------------------------------------------------------------


def _f(name: str) -> str:
    return "$" + name


def _lit(value: Any) -> dict[str, Any]:
    # $literal: a string starting with "$" is data, not a field path.
    return {"$literal": value}


def _cond(test: Any, then: Any, otherwise: Any) -> dict[str, Any]:
    return {"$cond": [test, then, otherwise]}


def _all(*tests: Any) -> Any:
    """Expression: every test holds (constant ``True`` tests left out)."""
    kept = [t for t in tests if t is not True]
    if not kept:
        return True
    return kept[0] if len(kept) == 1 else {"$and": kept}


def _merged(fields: dict[str, Any]) -> dict[str, Any]:
    """Expression: the record with ``fields`` (expressions) set."""
    return {"$mergeObjects": [ROOT, fields]}


def _held(until: str) -> dict[str, Any]:
    """Expression: an unexpired lease is held now (a null or missing date sorts
    below every date, so it is never held)."""
    return {"$gt": [_f(until), NOW]}


def _free(until: str) -> dict[str, Any]:
    """Expression: the lease is free now. On ``until`` this is the index range
    ``[MinKey, $$NOW]``: the planner uses the ``locked_until`` index for it."""
    return {"$lte": [_f(until), NOW]}


def _live(queue: Any) -> dict[str, Any]:
    """Expression: the waiters of ``queue`` (an expression) still alive now."""
    return {"$filter": {"input": {"$ifNull": [queue, []]}, "as": "w",
                        "cond": {"$gt": ["$$w.a", NOW]}}}


def _without(queue: Any, ticket: str) -> dict[str, Any]:
    return {"$filter": {"input": queue, "as": "w", "cond": {"$ne": ["$$w.t", _lit(ticket)]}}}


def _nobody_waits(waiters: str) -> dict[str, Any]:
    return {"$eq": [{"$size": _live(_f(waiters))}, 0]}


def _with_entry(queue: Any, ticket: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Expression: ``queue`` with this waiter's entry refreshed in its place,
    or appended at the end."""
    return _cond(
        {"$in": [_lit(ticket), {"$map": {"input": queue, "as": "w", "in": "$$w.t"}}]},
        {"$map": {"input": queue, "as": "w",
                  "in": _cond({"$eq": ["$$w.t", _lit(ticket)]}, entry, "$$w")}},
        {"$concatArrays": [queue, [entry]]},
    )


_SECOND = timedelta(seconds=1)


def _seconds_between(later: datetime, earlier: datetime) -> float:
    return (naive_utc(later) - naive_utc(earlier)) / _SECOND


# -- requests and answers ---------------------------------------------------------------


class Command(NamedTuple):
    """One conditional write: ``filter`` (ANDed with the record's match),
    ``update`` (a pipeline, or an operator update) and whether to create the
    record when it is missing."""

    filter: Filter
    update: Update
    upsert: bool = False


class Ask(NamedTuple):
    """One attempt to acquire: who, its ticket (unique to this attempt or this
    wait) and the lease's duration in milliseconds. ``extra`` are literal
    fields stored with the grant (a named lock's ``host`` and ``pid``)."""

    owner: str
    ticket: str
    ms: int
    extra: Mapping[str, Any] = MappingProxyType({})


class Holding(NamedTuple):
    """Whose lease a release or renewal acts on: the acquisition with
    ``ticket``, or (``ticket=None``) any acquisition of ``owner``."""

    owner: str
    ticket: str | None = None


class View(NamedTuple):
    """A lease record as one caller sees it at the server time ``now``.

    :ivar exists: the record exists.
    :ivar mine: the caller's ticket holds an unexpired lease.
    :ivar held: someone holds an unexpired lease.
    :ivar holder: the owner holding it (``None`` when free, or unknown).
    :ivar fence: the fence of the caller's grant, when ``mine``.
    :ivar until: the end of the caller's lease when ``mine``, else of the holder's.
    :ivar head: the caller is first among the live waiters.
    :ivar queued: live waiters, the caller included if queued.
    :ivar time_left: seconds until the current lease ends by the server's
        clock (0 when free).
    :ivar foreign: the record belongs to another kind of lock (its name).
    :ivar finished: held, but by a run that has released it already (a named
        lock's minimum hold keeps it until ``until``).
    :ivar ticket: the ticket of the grant holding the lease now, if held.
    """

    exists: bool
    now: datetime | None = None
    mine: bool = False
    held: bool = False
    holder: str | None = None
    fence: int | None = None
    until: datetime | None = None
    head: bool = False
    queued: int = 0
    time_left: float = 0.0
    foreign: str | None = None
    finished: bool = False
    ticket: str | None = None


Mode = Literal["try", "force", "queue"]


# -- where a lease lives ---------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The field names of a single-holder lease in its record."""

    until: str
    owner: str
    fence: str
    token: str
    stamp: str
    waiters: str

    @property
    def all(self) -> tuple[str, ...]:
        return (self.until, self.owner, self.fence, self.token, self.stamp, self.waiters)


DOCUMENT_LAYOUT = Layout(
    "locked_until", "locked_by", "lock_fence", "lock_token", "lock_stamp", "lock_waiters"
)
NAMED_LAYOUT = Layout("locked_until", "owner", "fence", "token", "stamp", "waiters")


class Kind:
    """A kind of lease: how its record is read and changed.

    Subclasses say what differs between kinds (the fence rule, how a release
    leaves the record, a minimum hold, fields stored with a grant); the queue,
    the settling of a freed lease and the identity checks are written here once.
    """

    #: Name of the kind, as stored in records that can hold several kinds.
    name = "lease"
    layout: Layout
    #: Whether a write may create the record (named records) or needs it.
    upsert = False

    # -- what subclasses decide ---------------------------------------------------

    def _next_fence(self) -> Any:
        """Expression: the fence of the next grant."""
        return {"$add": [{"$ifNull": [_f(self.layout.fence), 0]}, 1]}

    def _grant_extra(self, source: Mapping[str, Any]) -> dict[str, Any]:
        """Fields (expressions) set with every grant besides the lease's own;
        ``source["x"]`` is the grant's extra fields."""
        return {}

    def _released(self) -> dict[str, Any]:
        """Fields (expressions) of a lease ended by its holder, when it does not
        pass to a waiter."""
        return {self.layout.until: None, self.layout.token: REMOVE}

    def _release_due(self) -> Any:
        """Expression: a release may free the lease now (see minimum hold)."""
        return True

    def _kind_ok(self) -> Any:
        """Expression: the record belongs to this kind of lock."""
        return True

    def _finished(self, doc: Mapping[str, Any]) -> bool:
        """A held record whose holder released it already (a minimum hold)."""
        return False

    def _unreleased(self, doc: Mapping[str, Any]) -> bool:
        """The record's last lease was not released (it may have expired):
        a release sets ``until`` to null."""
        return doc.get(self.layout.until) is not None

    # -- conditions -----------------------------------------------------------------

    def free(self) -> Filter:
        """Filter: the lease is free now (never taken, released or expired)."""
        return {"$expr": _free(self.layout.until)}

    def held(self) -> Filter:
        """Filter: an unexpired lease is held now."""
        return {"$expr": _held(self.layout.until)}

    def claimable(self) -> Filter:
        """Filter: a caller that does not wait may take the lease now: it is free
        and nobody is queued for it."""
        return combine(self.free(), {"$expr": _nobody_waits(self.layout.waiters)})

    def held_by(self, owner: str) -> Filter:
        """Filter: ``owner`` holds an unexpired lease."""
        return self.holds(Holding(owner))

    def expired(self) -> Filter:
        """Filter: a lease was set, its time has passed, and it was not released."""
        return combine({self.layout.until: {"$ne": None}}, self.free())

    def exhausted(self, attempts: int) -> Filter:
        """Filter: the lease was granted ``attempts`` times or more."""
        return {self.layout.fence: {"$gte": attempts}}

    def attempts_below(self, attempts: int) -> Filter:
        """Filter: the lease was granted fewer than ``attempts`` times (never
        locked counts as 0)."""
        return {self.layout.fence: {"$not": {"$gte": attempts}}}

    def claim_events(self) -> Filter:
        """Change-stream filter: writes that can make a document claimable: an
        insert, a release (``until`` set to null), an update of other fields
        (which may move it into a queryset's filter)."""
        until, token = self.layout.until, self.layout.token
        return {"$or": [
            {"operationType": "insert"},
            {"operationType": "update",
             "updateDescription.updatedFields." + until: {"$not": {"$type": "date"}}},
            {"operationType": "replace", "fullDocument." + token: {"$exists": False}},
        ]}

    def identity(self, holding: Holding) -> Filter:
        """Filter: the lease was granted to this acquisition (expired or not)."""
        if holding.ticket is not None:
            return {self.layout.token: holding.ticket}
        return {self.layout.owner: holding.owner}

    def holds(self, holding: Holding) -> Filter:
        """Filter: the caller holds an unexpired lease."""
        return combine(self.identity(holding), self.held())

    def granted(self, ticket: str) -> Filter:
        """Filter (read back): the grant with ``ticket`` holds the lease."""
        return combine({self.layout.token: ticket}, self.held())

    def stamped(self, stamp: str) -> Filter:
        """Filter (read back): the write with ``stamp`` was the last one."""
        return {self.layout.stamp: stamp}

    def grant_time(self, doc: Mapping[str, Any] | None, ask: Ask) -> datetime | None:
        """The server's time of the write that returned ``doc``, when ``doc``
        shows the direct grant to ``ask`` (``try`` or ``force``) that this
        write made: the grant set its end to that time + ``ask.ms``. ``None``
        when ``doc`` shows no such grant (refused)."""
        if doc is None or doc.get(self.layout.token) != ask.ticket:
            return None
        until = doc.get(self.layout.until)
        return until - timedelta(milliseconds=ask.ms) if isinstance(until, datetime) else None

    def granted_event(self, prefix: str) -> Filter:
        """Change-stream filter: a write granted the lease to a ticket that
        starts with ``prefix`` (one handle's waits), or the record was deleted
        (after which the waiter must look again)."""
        token = self.layout.token
        ticket = {"$regex": "^" + re.escape(prefix)}
        return {"$or": [
            {"operationType": "update", "updateDescription.updatedFields." + token: ticket},
            # The server may log a small document's pipeline update as a replacement.
            {"operationType": "replace", "fullDocument." + token: ticket},
            {"operationType": "delete"},
        ]}

    def _granted_in(self, event: Mapping[str, Any]) -> Any:
        """The grant that the change event's own write set (``None``: none)."""
        field = self.layout.token
        kind = event.get("operationType")
        if kind == "update":
            return ((event.get("updateDescription") or {}).get("updatedFields") or {}).get(field)
        if kind == "replace":
            return (event.get("fullDocument") or {}).get(field)
        return None

    def event_grants(self, event: Mapping[str, Any], ticket: str) -> bool:
        """Whether the change event ``event`` is the write that granted the
        lease to ``ticket`` (its own change, not the record looked up later)."""
        return bool(self._granted_in(event) == ticket)

    def _grants_prefix(self, granted: str, prefix: str) -> bool:
        """Whether the grant ``granted`` (as :meth:`_granted_in` reads it) is
        to a ticket that starts with ``prefix``."""
        return granted.startswith(prefix)

    def waits_for(self, record: Mapping[str, Any], prefix: str,
                  event: Mapping[str, Any]) -> bool:
        """Whether ``event`` is one that ``granted_event(prefix)`` selects on the
        record ``record`` names (its ``_id``, and its shard key): what the
        stream shared by a process's waiters (selecting the grants to every
        ticket that starts with :func:`wait_prefix`) hands to the waiter with
        ``prefix``."""
        key = event.get("documentKey") or {}
        for k, v in record.items():
            if (key.get(k) if "." not in k else _path(key, k)) != v:
                return False
        if event.get("operationType") == "delete":
            return True
        granted = self._granted_in(event)
        return isinstance(granted, str) and self._grants_prefix(granted, prefix)

    def earlier_grant(self, event: Mapping[str, Any], ticket: str) -> bool:
        """Whether ``event`` (selected by :meth:`granted_event`) granted
        another ticket than ``ticket``: an earlier wait's of the same handle."""
        return self._granted_in(event) is not None and not self.event_grants(event, ticket)

    # -- writes ---------------------------------------------------------------------

    def _grant_fields(self, source: Mapping[str, Any]) -> dict[str, Any]:
        """Fields (expressions) of a grant to ``source``: expressions for its
        owner ``o``, ticket ``t``, duration ``ms`` and extra fields ``x``."""
        lay = self.layout
        return {
            lay.until: {"$add": [NOW, source["ms"]]},
            lay.owner: source["o"],
            lay.fence: self._next_fence(),
            lay.token: source["t"],
            **self._grant_extra(source),
        }

    def _entry(self, ask: Ask) -> dict[str, Any]:
        entry: dict[str, Any] = {"t": _lit(ask.ticket), "o": _lit(ask.owner), "ms": ask.ms,
                                 "a": {"$add": [NOW, WAITER_TTL_MS]}}
        if ask.extra:
            entry["x"] = {k: _lit(v) for k, v in ask.extra.items()}
        return entry

    def acquire(self, ask: Ask, mode: Mode) -> Command:
        """Take the lease for ``ask``, on the record (one ``findAndModify``).

        ``try``: granted if the lease is free and nobody is queued; otherwise
        nothing is written. ``force``: granted even while held (the fence still
        grows); the queue is kept. ``queue`` (a waiting caller): the caller's
        place in the queue is taken or refreshed, then the lease is settled: a
        free lease goes to the first live waiter, the caller if it is first.

        Filter: none (the record's match). Update: the decision is made in
        the pipeline, so that it works with an upsert (MongoDB rejects
        ``$expr`` in an upsert's filter), and a refusal leaves the record as it
        was.
        """
        lay = self.layout
        if mode == "queue":
            mine = {"$and": [{"$eq": [_f(lay.token), _lit(ask.ticket)]}, _held(lay.until)]}
            base = _live(_f(lay.waiters))
            queue = _cond(mine, base, _with_entry(base, ask.ticket, self._entry(ask)))
            return Command({}, self._settle(queue, caller=ask.ticket), self.upsert)
        given = {"o": _lit(ask.owner), "t": _lit(ask.ticket), "ms": ask.ms,
                 "x": _lit(dict(ask.extra))}
        decided = {"$let": {"vars": given, "in": self._template(mode, self._grant_template)}}
        return Command({}, [{"$replaceWith": decided}], self.upsert)

    def _template(self, key: str, build: Callable[[str], Any]) -> Any:
        """The expression (or the parts of a command) ``build(key)``, built once
        per kind: the caller's values reach it as variables of a ``$let``
        around it, or are added to a copy (the server parses it whole either
        way; the client need not build it again)."""
        cache = self.__dict__.setdefault("_templates", {})
        if key not in cache:
            cache[key] = build(key)
        return cache[key]

    def _grant_template(self, mode: str) -> Any:
        """A direct grant (``try`` or ``force``) to ``$$o`` (owner), ``$$t``
        (ticket), ``$$ms`` and ``$$x`` (extra fields); the record unchanged
        when refused."""
        lay = self.layout
        source = {"o": "$$o", "t": "$$t", "ms": "$$ms", "x": "$$x"}
        grant = _merged({**self._grant_fields(source), lay.stamp: "$$t"})
        win: Any = self._kind_ok()
        if mode != "force":
            # Free, and no live waiter: the latest of the lease's end and the
            # waiters' liveness deadlines has passed (one comparison).
            nobody = {"$lte": [{"$max": [_f(lay.until), {"$max": _f(lay.waiters) + ".a"}]}, NOW]}
            win = _all(win, nobody)
        return grant if win is True else _cond(win, grant, ROOT)

    def _settle(
        self,
        queue: Any,
        *,
        caller: str | None = None,
        stamp: str | None = None,
    ) -> Pipeline:
        """The pipeline of a write that changes the queue or ends a lease.

        ``queue`` is the new queue of live waiters (an expression on the record
        before the write). If the lease is free and someone is queued, the
        first waiter gets the lease, with the next fence, and leaves the
        queue. Its term is its own duration if it is the ``caller`` (the
        ticket of the waiter whose write this is), else at most
        :data:`PICKUP_MS` until it confirms the lease. With a ``stamp`` the
        write is a release, marked by it: the lease counts as free once its
        release is due, and a lease that does not pass to a waiter is left
        released. An empty queue is removed.

        One ``$replaceWith`` computes the queue once and writes either the
        grant to its head or what is left otherwise; fields to remove are
        written as ``null`` there and removed by the second stage (a merged
        object cannot drop a field).
        """
        ending = stamp is not None
        given = {"q": queue, "c": None if caller is None else _lit(caller),
                 "s": None if stamp is None else _lit(stamp)}
        key = "end" if ending else "settle"
        decided = {"$let": {"vars": given, "in": self._template(key, self._settle_template)}}
        removed = [k for k, v in self._released().items() if v == REMOVE] if ending else []
        return [{"$replaceWith": decided},
                {"$set": {k: {"$ifNull": [_f(k), REMOVE]}
                          for k in [self.layout.waiters, *removed]}}]

    def _settle_template(self, key: str) -> Any:
        """:meth:`_settle`'s decision on ``$$q`` (the queue), ``$$c`` (the
        caller's ticket, or null) and, for a release (``key == "end"``),
        ``$$s`` (its stamp)."""
        lay = self.layout
        ending = key == "end"
        term = _cond({"$eq": ["$$h.t", "$$c"]}, "$$h.ms", {"$min": ["$$h.ms", PICKUP_MS]})
        head = {"o": "$$h.o", "t": "$$h.t", "ms": term, "x": "$$h.x"}
        size = {"$size": "$$q"}
        granted = {
            **self._grant_fields(head),
            lay.stamp: "$$s" if ending else "$$h.t",
            lay.waiters: _cond({"$gt": [size, 1]}, {"$slice": ["$$q", 1, _ALL]}, None),
        }
        kept = {k: (None if v == REMOVE else v)
                for k, v in (self._released() if ending else {}).items()}
        if ending:
            kept[lay.stamp] = "$$s"
        kept[lay.waiters] = _cond({"$gt": [size, 0]}, "$$q", None)
        free = self._release_due() if ending else _free(lay.until)
        return _cond(
            _all(free, self._kind_ok(), {"$gt": [size, 0]}),
            {"$let": {"vars": {"h": {"$arrayElemAt": ["$$q", 0]}}, "in": _merged(granted)}},
            _merged(kept),
        )

    def release(self, holding: Holding, stamp: str) -> Command:
        """End the caller's unexpired lease now; the first live waiter gets it
        in the same write.

        Filter: the caller holds an unexpired lease. Update: the lease passes
        to the first live waiter (with the waiter's duration, the next fence
        and the waiter's ticket), or is left released; ``stamp`` marks the write.
        """
        return Command(self.holds(holding), self._end(stamp))

    def quiet_release(self, holding: Holding, stamp: str) -> Command | None:
        """:meth:`release` of a record where nobody is queued: the released
        fields alone, a much smaller update for the server to run (``None``
        for kinds without one). A caller that sees it match nothing sends
        :meth:`release`, which decides in every case.

        Filter: as :meth:`release`, and no queue at all (not even expired
        entries, which :meth:`release` clears). Update: the fields of a lease
        left released (:meth:`_released`), and ``stamp``.
        """
        quiet_filter, released = self._template("quiet", self._quiet_template)
        return Command(combine(self.identity(holding), quiet_filter),
                       [{"$set": {**released, self.layout.stamp: _lit(stamp)}}])

    def _quiet_template(self, key: str) -> tuple[Filter, dict[str, Any]]:
        """:meth:`quiet_release`'s parts that are the same for every caller:
        the filter (held, no queue) and the released fields."""
        return combine(self.held(), {self.layout.waiters: {"$exists": False}}), self._released()

    def _end(self, stamp: str) -> Pipeline:
        return self._settle(_live(_f(self.layout.waiters)), stamp=stamp)

    def clear_expired(self, holding: Holding, stamp: str) -> Command | None:
        """Filter: the caller's lease is recorded but expired, and nobody took it
        since. Update: as :meth:`release`. ``None`` for kinds whose expired
        record needs no clearing."""
        return None

    def force_release(self, stamp: str, ticket: str | None = None) -> Command:
        """End a lease whoever holds it (an operator's last resort), passing it
        to the first live waiter.

        Filter: the lease is held, by the grant ``ticket`` when given (the
        lease the operator was shown). Update: as :meth:`release`.
        """
        held = self.held() if ticket is None else self.granted(ticket)
        return Command(held, self._end(stamp))

    def renew(self, holding: Holding, ms: int) -> Command:
        """Extend the caller's unexpired lease to now + ``ms``.

        Filter: the caller holds an unexpired lease (an expired one is not
        revived). Update: ``until = $$NOW + ms``; the fence is kept.
        """
        return Command(self.holds(holding),
                       [{"$set": {self.layout.until: {"$add": [NOW, ms]}}}])

    def leave(self, ticket: str) -> Command:
        """A waiter gives up: it leaves the queue (the lease is settled, so a
        free lease goes to the next waiter). Filter: none. Update: the queue
        without ``ticket``."""
        queue = _without(_live(_f(self.layout.waiters)), ticket)
        return Command({}, self._settle(queue))

    # -- reading ----------------------------------------------------------------------

    def view(self, doc: Mapping[str, Any] | None, now: datetime | None,
             ticket: str | None = None) -> View:
        """How the caller with ``ticket`` sees the record ``doc`` at the server
        time ``now``."""
        if doc is None:
            return View(exists=False, now=now)
        lay = self.layout
        until = doc.get(lay.until)
        until = naive_utc(until) if isinstance(until, datetime) else None
        at = None if now is None else naive_utc(now)
        held = until is not None and at is not None and until > at
        queued, head = 0, False
        queue = doc.get(lay.waiters)
        if queue:
            waiters = [w for w in queue if at is None or naive_utc(w.get("a", at)) > at]
            queued, head = len(waiters), bool(waiters) and waiters[0].get("t") == ticket
        token = doc.get(lay.token) if held else None
        mine = held and ticket is not None and token == ticket
        fence = doc.get(lay.fence) if mine else None
        return View(
            exists=True,
            now=now,
            mine=mine,
            held=held,
            holder=doc.get(lay.owner) if held else None,
            fence=None if fence is None else int(fence),
            until=until,
            head=head,
            queued=queued,
            time_left=(until - at) / _SECOND if held else 0.0,  # type: ignore[operator]
            foreign=self._foreign(doc),
            finished=held and self._finished(doc),
            ticket=token,
        )

    # -- for operators ------------------------------------------------------------------

    def listed(self, everything: bool = False) -> Filter:
        """Filter: the records an operator lists: held or expired leases, and
        with ``everything`` released ones too."""
        lay = self.layout
        leased = {lay.until: {"$ne": None}}
        return {"$or": [leased, {lay.fence: {"$gt": 0}}]} if everything else leased

    def describe(self, doc: Mapping[str, Any], now: datetime | None) -> dict[str, Any]:
        """The record as an operator sees it: a row with stable keys
        (``id``, ``state``, ``remaining``, ``owner``, ``host``, ``pid``,
        ``fence``, ``locked_until``, ``acquired_at``, ``waiters``).

        ``state`` is ``held``, ``kept`` (released, but kept until its minimum
        hold ends), ``expired`` (its time passed without a release),
        ``released``, or ``free`` (never locked); ``remaining`` is the seconds
        left by the server's clock (negative: ended that long ago).
        """
        lay = self.layout
        view = self.view(doc, now)
        until = doc.get(lay.until)
        fence = doc.get(lay.fence)
        if view.finished:
            state = "kept"  # released, but its minimum hold has not ended
        elif view.held:
            state = "held"
        elif self._unreleased(doc):
            state = "expired"
        elif fence:
            state = "released"
        else:
            state = "free"
        remaining = None
        if isinstance(until, datetime) and now is not None:
            remaining = round(_seconds_between(until, now), 3)
        host, pid = self._where(doc)
        return {
            "kind": self.name,
            "id": doc.get("_id"),
            "state": state,
            "remaining": remaining,
            "owner": doc.get(lay.owner),
            "host": host,
            "pid": pid,
            "fence": fence,
            "locked_until": until,
            "acquired_at": doc.get("acquired_at"),
            "waiters": view.queued,
            "finished": view.finished,
        }

    def _where(self, doc: Mapping[str, Any]) -> tuple[Any, Any]:
        """Host and pid of the holder, where the record tells them."""
        return doc.get("host"), doc.get("pid")

    def rows(self, doc: Mapping[str, Any], now: datetime | None) -> list[dict[str, Any]]:
        """The record as an operator lists it: one :meth:`describe` row per
        holder (one row for a single-holder lease)."""
        return [self.describe(doc, now)]

    def holder_tickets(self, doc: Mapping[str, Any], now: datetime | None,
                       owner: str | None = None) -> list[str]:
        """The tickets of the grants holding the lease now (of ``owner`` only,
        when given): what a forced release may end."""
        view = self.view(doc, now)
        if not view.held or view.ticket is None:
            return []
        return [view.ticket] if owner is None or view.holder == owner else []


    def _foreign(self, doc: Mapping[str, Any]) -> str | None:
        return None

    def released_fence(self, doc: Mapping[str, Any]) -> int | None:
        """The fence of a lease released by its owner's name (not through the
        handle that acquired it), as the record ``doc`` shows it after the
        release; ``None`` when unknown (the lease passed to a waiter, whose
        fence the record shows now)."""
        return None if doc.get(self.layout.token) else doc.get(self.layout.fence)

    def holder_fence(self, doc: Mapping[str, Any], holding: Holding) -> int | None:
        """The fence of the lease ``holding`` names, as the record ``doc``
        shows it after a renewal."""
        return doc.get(self.layout.fence)

    def protected(self) -> frozenset[str]:
        """Fields that only lease operations may change."""
        return frozenset(self.layout.all)


def _owner_where(doc: Mapping[str, Any], owner_field: str) -> tuple[Any, Any]:
    parsed = parse_owner(doc.get(owner_field))
    return (None, None) if parsed is None else parsed


class DocumentKind(Kind):
    """The lease of a :class:`~mongoengine_lockable.LockableMixin` document.

    The fence grows by exactly one per grant; a release sets ``locked_until``
    to ``null``; an expired lease of the caller's that nobody took is cleared.
    """

    name = "document"

    def __init__(self, layout: Layout = DOCUMENT_LAYOUT) -> None:
        self.layout = layout

    def _where(self, doc: Mapping[str, Any]) -> tuple[Any, Any]:
        # A document records no host: a default owner token names it.
        return _owner_where(doc, self.layout.owner)

    def clear_expired(self, holding: Holding, stamp: str) -> Command | None:
        lay = self.layout
        return Command(combine(self.identity(holding), {lay.until: {"$ne": None}}, self.free()),
                       self._end(stamp))


class NamedKind(Kind):
    """The record of a :class:`~mongoengine_lockable.NamedLock`: one per name,
    created by the first acquisition (upsert).

    - The fence is ``max(fence + 1, $$NOW in ms)``, so that it keeps growing
      after the TTL index removed an expired record.
    - A grant records ``acquired_at`` (server time), ``host`` and ``pid``.
    - A release leaves an expired date (not ``null``) for the TTL index, or, with
      a minimum hold, the end of that hold: ``until = max(now, min(until,
      acquired_at + min_hold))``; the lease passes to a waiter only once the
      minimum hold is over.

    :param min_hold_ms: the minimum hold of releases sent through this object.
    """

    name = "lock"
    upsert = True
    KIND_FIELD = "kind"

    def __init__(self, min_hold_ms: int = 0, layout: Layout = NAMED_LAYOUT) -> None:
        self.layout = layout
        self.min_hold_ms = min_hold_ms

    def _next_fence(self) -> Any:
        return {"$max": [super()._next_fence(), {"$toLong": NOW}]}

    def _grant_extra(self, source: Mapping[str, Any]) -> dict[str, Any]:
        extra = source["x"]
        fields: dict[str, Any] = {"acquired_at": NOW, self.KIND_FIELD: self.name}
        for key in ("host", "pid"):
            # A direct grant's literals, or a waiter's stored fields.
            fields[key] = extra.get(key) if isinstance(extra, Mapping) else f"{extra}.{key}"
        return fields

    def _hold_end(self) -> Any:
        return {"$add": [{"$ifNull": ["$acquired_at", NOW]}, self.min_hold_ms]}

    def _released(self) -> dict[str, Any]:
        until = self.layout.until
        return {until: {"$max": [NOW, {"$min": [_f(until), self._hold_end()]}]},
                self.layout.token: REMOVE}

    def _release_due(self) -> Any:
        return {"$lte": [self._hold_end(), NOW]}

    def _kind_ok(self) -> Any:
        return {"$eq": [{"$ifNull": ["$" + self.KIND_FIELD, self.name]}, self.name]}

    def _foreign(self, doc: Mapping[str, Any]) -> str | None:
        kind = doc.get(self.KIND_FIELD, self.name)
        return None if kind == self.name else str(kind)

    def _finished(self, doc: Mapping[str, Any]) -> bool:
        # A release removes the grant's token and keeps the minimum hold.
        return self.layout.token not in doc

    def _unreleased(self, doc: Mapping[str, Any]) -> bool:
        # A release leaves an expired date (for the TTL index) and no token.
        return self.layout.token in doc and doc.get(self.layout.until) is not None


# -- shared leases: semaphores and read/write locks ------------------------------------

#: The capacity of a read/write lock: a reader weighs 1, a writer all of it.
RW_CAPACITY = 10**9
#: The capacity a forced grant is checked against: none.
_UNLIMITED = 2**62

SHARED_LAYOUT = Layout("locked_until", "holders", "fence", "granted", "stamp", "waiters")


def _scratch(key: str) -> str:
    """A field of the scratch field, as a key (the reference is ``"$" + key``)."""
    return f"{TMP}.{key}"


def _s(key: str) -> str:
    """A reference to the scratch field's ``key``."""
    return "$" + _scratch(key)


class SharedKind(Kind):
    """The record of a shared lease: a :class:`~mongoengine_lockable.NamedSemaphore`
    or a :class:`~mongoengine_lockable.ReadWriteLock`, one per name (upserted)
    in the named-lock collection::

        {_id: "exports", kind: "semaphore", limit: 3, fence: 1795379760221,
         holders: [{o: owner, t: ticket, f: fence, u: until, at: granted at,
                    w: weight, ms: duration, host: "web-1", pid: 4242}, ...],
         waiters: [{t, o, ms, a, x, w}, ...], granted: " t1 t2 ",
         stamp: "...", locked_until: <date>}

    A capacity is shared by holders of some weight: a semaphore of limit N has
    capacity N and holders of weight 1; a read/write lock has capacity
    :data:`RW_CAPACITY`, readers of weight 1 and writers of weight
    :data:`RW_CAPACITY`. Each holder has its own lease (``u``, on the
    server's clock) and fence; the live holders are those with ``u > $$NOW``.

    - A caller that does not wait is admitted if nobody live is queued and its
      weight fits beside the live holders'.
    - Every write that changes the queue or frees capacity admits the longest
      first-come-first-served prefix of live waiters that fits (each becomes
      a holder with its own duration and the next fence, and leaves the
      queue). A waiting writer therefore keeps later readers out (writer
      preference), and a large waiter is not overtaken by small ones.
    - Fences: each grant gets ``max(fence + 1, $$NOW in ms)``, several
      admitted by one write consecutive values after it; ``fence`` keeps the
      last one. Unique and increasing per name, also after the TTL index
      removed an idle record.
    - ``granted`` names (between spaces) the tickets the write admitted, and
      is removed by a write that admits nobody: a waiter's change stream
      matches its own ticket there (a string, since the change event of an
      array is reported as a diff of its elements, which a ``$match`` cannot
      select).
    - ``locked_until`` is the latest end among the live holders, or the
      write's time when there are none: the TTL index of the collection
      removes idle records after its grace period and never a held one.
    - ``stamp`` is the id of the last release (by the holder, or forced):
      what an ambiguous release is resolved by. A grant is resolved by its
      ticket among the holders.
    - ``limit`` is the capacity; a caller with another capacity is refused
      (as a record of another kind) while the record is in use.

    :param tag: the ``kind`` stored in the record (``"semaphore"``, ``"rwlock"``).
    :param capacity: the capacity (a semaphore's limit).
    :param weight: the weight of the holders this kind's writes admit directly.
    :param name: how the kind is named in messages (default ``tag``).
    """

    upsert = True
    KIND_FIELD = NamedKind.KIND_FIELD
    LIMIT_FIELD = "limit"

    def __init__(self, tag: str, capacity: int, weight: int = 1, *,
                 name: str | None = None) -> None:
        self.layout = SHARED_LAYOUT
        self.tag = tag
        self.capacity = capacity
        self.weight = weight
        self.name = name or tag

    @classmethod
    def semaphore(cls, limit: int) -> SharedKind:
        """The kind of a semaphore of ``limit`` holders."""
        return cls("semaphore", limit, 1, name=f"semaphore of limit {limit}")

    @classmethod
    def reader(cls) -> SharedKind:
        """The kind of a read/write lock's readers."""
        return cls("rwlock", RW_CAPACITY, 1, name="read/write lock")

    @classmethod
    def writer(cls) -> SharedKind:
        """The kind of a read/write lock's writers."""
        return cls("rwlock", RW_CAPACITY, RW_CAPACITY, name="read/write lock")

    # -- expressions ------------------------------------------------------------------

    def _holders(self) -> Any:
        """Expression: the live holders, before the write."""
        return {"$filter": {"input": {"$ifNull": [_f(self.layout.owner), []]}, "as": "h",
                            "cond": {"$gt": ["$$h.u", NOW]}}}

    @staticmethod
    def _is(holding: Holding | None, var: str = "$$h") -> Any:
        """Expression: the holder entry ``var`` is the acquisition ``holding``
        names (every entry when ``holding`` is ``None``)."""
        if holding is None:
            return True
        if holding.ticket is not None:
            return {"$eq": [var + ".t", _lit(holding.ticket)]}
        return {"$eq": [var + ".o", _lit(holding.owner)]}

    def _others(self, holding: Holding | None) -> Any:
        """Expression: the live holders other than ``holding``'s entries."""
        return {"$filter": {"input": self._holders(), "as": "h",
                            "cond": {"$not": [self._is(holding)]}}}

    def _holds(self, holding: Holding | None) -> Any:
        """Expression: a live holder is the acquisition ``holding`` names."""
        mine = {"$filter": {"input": self._holders(), "as": "h", "cond": self._is(holding)}}
        return {"$gt": [{"$size": mine}, 0]}

    def _idle(self) -> Any:
        return {"$and": [{"$eq": [{"$size": self._holders()}, 0]},
                         _nobody_waits(self.layout.waiters)]}

    def _kind_ok(self) -> Any:
        """Expression: the record is this kind's, with this capacity (another
        capacity takes over only an idle record), or new (or an idle record of
        a named lock stored before records named their kind)."""
        stored = _f(self.KIND_FIELD)
        same_capacity = {"$or": [
            {"$eq": [{"$ifNull": [_f(self.LIMIT_FIELD), self.capacity]}, self.capacity]},
            self._idle(),
        ]}
        fresh = {"$and": [{"$eq": [{"$ifNull": [stored, None]}, None]},
                          _free(self.layout.until)]}
        return {"$or": [{"$and": [{"$eq": [stored, self.tag]}, same_capacity]}, fresh]}

    def _entry(self, ask: Ask) -> dict[str, Any]:
        return {**super()._entry(ask), "w": self.weight}

    def _admit(
        self,
        holders: Any,
        queue: Any,
        *,
        rest: Any = None,
        only_if_admitted: bool = False,
        capacity: int | None = None,
        stamp: str | None = None,
        caller: str | None = None,
    ) -> Pipeline:
        """The pipeline of every write: the record gets the live ``holders``
        (an expression on the record before the write) plus the longest prefix
        of ``queue`` whose weights fit beside theirs; the rest of ``queue``,
        then ``rest``, stay queued.

        With ``only_if_admitted`` the write happens only if ``queue`` is not
        empty and all of it is admitted (a direct grant). ``stamp`` marks a release.
        A waiter admitted by another's write (not the ``caller``'s) gets its
        duration only up to :data:`PICKUP_MS`, until it confirms the share. A record of
        another kind (or capacity) is left as it was.
        """
        lay = self.layout
        cap = self.capacity if capacity is None else capacity
        handed = {"$min": ["$$this.ms", PICKUP_MS]}
        term = handed if caller is None else _cond(
            {"$eq": ["$$this.t", _lit(caller)]}, "$$this.ms", handed)
        this_fits = {"$and": ["$$value.open",
                              {"$lte": [{"$add": ["$$value.used", "$$this.w"]}, cap]}]}
        grant = {"o": "$$this.o", "t": "$$this.t", "f": {"$add": ["$$value.f", 1]},
                 "u": {"$add": [NOW, term]}, "at": NOW, "w": "$$this.w",
                 "ms": "$$this.ms", "host": "$$this.x.host", "pid": "$$this.x.pid"}
        admit = {"$reduce": {
            "input": _s("q"),
            "initialValue": {
                "used": {"$sum": _s("h.w")},
                # The first grant's fence is max(fence + 1, now in ms).
                "f": {"$max": [{"$ifNull": [_f(lay.fence), 0]},
                               {"$subtract": [{"$toLong": NOW}, 1]}]},
                "take": [],
                "open": _lit(True),
            },
            "in": {"$let": {"vars": {"fits": this_fits}, "in": _cond(
                "$$fits",
                {"used": {"$add": ["$$value.used", "$$this.w"]},
                 "f": {"$add": ["$$value.f", 1]},
                 "take": {"$concatArrays": ["$$value.take", [grant]]},
                 "open": _lit(True)},
                {"used": "$$value.used", "f": "$$value.f", "take": "$$value.take",
                 "open": _lit(False)},
            )}},
        }}
        taken = {"$size": _s("r.take")}
        go: Any = _s("ok")
        if only_if_admitted:
            go = {"$and": [go, {"$gt": [taken, 0]},
                           {"$eq": [taken, {"$size": _s("q")}]}]}
        left = {"$slice": [_s("q"), taken, _ALL]}
        if rest is not None:
            left = {"$concatArrays": [left, rest]}
        names = {"$reduce": {"input": _s("r.take"), "initialValue": " ",
                             "in": {"$concat": ["$$value", "$$this.t", " "]}}}
        changed: dict[str, Any] = {
            lay.owner: _s("n"),
            lay.waiters: _cond({"$eq": [{"$size": _s("w")}, 0]}, REMOVE, _s("w")),
            lay.fence: _cond({"$gt": [_s("k"), 0]}, _s("r.f"), _f(lay.fence)),
            lay.token: _cond({"$gt": [_s("k"), 0]}, names, REMOVE),
            lay.until: {"$max": [NOW, {"$max": _s("n.u")}]},
            self.KIND_FIELD: _lit(self.tag),
            self.LIMIT_FIELD: self.capacity,
        }
        if stamp is not None:
            changed[lay.stamp] = _lit(stamp)
        return [
            {"$set": {TMP: {"h": holders, "q": queue, "ok": self._kind_ok()}}},
            {"$set": {_scratch("r"): admit}},
            {"$set": {_scratch("n"): {"$concatArrays": [_s("h"), _s("r.take")]},
                      _scratch("w"): left, _scratch("k"): taken, _scratch("go"): go}},
            {"$set": {k: _cond(_s("go"), v, _f(k)) for k, v in changed.items()}},
            {"$unset": TMP},
        ]

    # -- conditions ---------------------------------------------------------------------

    def identity(self, holding: Holding) -> Filter:
        """Filter: the acquisition ``holding`` names is among the holders
        (expired or not)."""
        if holding.ticket is not None:
            return {self.layout.owner + ".t": holding.ticket}
        return {self.layout.owner + ".o": holding.owner}

    def holds(self, holding: Holding) -> Filter:
        """Filter: the acquisition ``holding`` names (its ticket, or any of its
        owner's) is among the live holders."""
        return {"$expr": self._holds(holding)}

    def granted(self, ticket: str) -> Filter:
        """Filter (read back): the grant with ``ticket`` is a live holder."""
        return self.holds(Holding("", ticket))

    def grant_time(self, doc: Mapping[str, Any] | None, ask: Ask) -> datetime | None:
        """As :meth:`Kind.grant_time`: the admission time (``at``) of the
        holder entry of ``ask``'s ticket."""
        if doc is None:
            return None
        for holder in doc.get(self.layout.owner) or []:
            if isinstance(holder, Mapping) and holder.get("t") == ask.ticket:
                at = holder.get("at")
                return at if isinstance(at, datetime) else None
        return None

    def granted_event(self, prefix: str) -> Filter:
        """Change-stream filter: a write admitted a ticket that starts with
        ``prefix`` (its ``granted`` names it), or the record was deleted."""
        among = {"$regex": re.escape(f" {prefix}")}
        granted = self.layout.token
        return {"$or": [
            {"operationType": "update", "updateDescription.updatedFields." + granted: among},
            {"operationType": "replace", "fullDocument." + granted: among},
            {"operationType": "delete"},
        ]}

    def _grants_prefix(self, granted: str, prefix: str) -> bool:
        return f" {prefix}" in granted

    def event_grants(self, event: Mapping[str, Any], ticket: str) -> bool:
        """As :meth:`Kind.event_grants`: ``granted`` lists the admitted tickets."""
        granted = self._granted_in(event)
        return isinstance(granted, str) and f" {ticket} " in granted

    # -- writes -----------------------------------------------------------------------------

    def acquire(self, ask: Ask, mode: Mode) -> Command:
        """Take a share of the capacity for ``ask`` (one ``findAndModify``).

        ``try``: admitted if nobody live is queued and its weight fits beside
        the live holders'; otherwise nothing is written. ``force``: admitted
        whatever the capacity (the queue is kept). ``queue``: the caller's
        place in the queue is taken or refreshed (unless it holds already),
        then the longest prefix of live waiters that fits is admitted.

        Filter: none (the record's match; the record is upserted). Update: the
        decision is made in the pipeline (see :meth:`_admit`); dead holders
        and waiters are dropped by every write.
        """
        waiters = _live(_f(self.layout.waiters))
        entry = self._entry(ask)
        if mode == "queue":
            me = Holding(ask.owner, ask.ticket)
            queue = _cond(self._holds(me), waiters, _with_entry(waiters, ask.ticket, entry))
            return Command({}, self._admit(self._holders(), queue, caller=ask.ticket),
                           self.upsert)
        if mode == "force":
            return Command({}, self._admit(self._holders(), [entry], rest=waiters,
                                           only_if_admitted=True, capacity=_UNLIMITED,
                                           caller=ask.ticket),
                           self.upsert)
        queue = _cond({"$eq": [{"$size": waiters}, 0]}, [entry], [])
        return Command({}, self._admit(self._holders(), queue, only_if_admitted=True,
                                       caller=ask.ticket),
                       self.upsert)

    def quiet_release(self, holding: Holding, stamp: str) -> Command | None:
        """None: a share's release always goes through :meth:`_admit`."""
        return None

    def release(self, holding: Holding, stamp: str) -> Command:
        """End the caller's share now, admitting waiters that now fit.

        Filter: the acquisition ``holding`` names (its ticket, or its owner's
        entries) is a live holder. Update: its entries leave the holders; the
        longest prefix of live waiters that fits is admitted; ``stamp`` marks
        the write.
        """
        return Command(self.holds(holding),
                       self._admit(self._others(holding), _live(_f(self.layout.waiters)),
                                   stamp=stamp))

    def force_release(
        self, stamp: str, ticket: str | None = None, *, owner: str | None = None
    ) -> Command:
        """End a holder's share whoever it is (an operator's last resort): the
        grant ``ticket``, or the entries of ``owner``, or every holder when
        neither is given; waiters that now fit are admitted.

        Filter: such a live holder exists. Update: as :meth:`release`.
        """
        holding = None
        if ticket is not None or owner is not None:
            holding = Holding(owner or "", ticket)
        return Command({"$expr": self._holds(holding)},
                       self._admit(self._others(holding), _live(_f(self.layout.waiters)),
                                   stamp=stamp))

    def renew(self, holding: Holding, ms: int) -> Command:
        """Extend the caller's share to now + ``ms``.

        Filter: the caller is a live holder (an expired share is not revived).
        Update: its entry's ``u`` (and ``locked_until``) follow; the fence is
        kept; waiters that fit are admitted (a dead holder may have left room).
        """
        holders = {"$map": {"input": self._holders(), "as": "h", "in": _cond(
            self._is(holding), {"$mergeObjects": ["$$h", {"u": {"$add": [NOW, ms]}}]}, "$$h")}}
        return Command(self.holds(holding),
                       self._admit(holders, _live(_f(self.layout.waiters))))

    def leave(self, ticket: str) -> Command:
        """A waiter gives up: it leaves the queue, and the waiters behind it
        that now fit are admitted. Filter: none. Update: :meth:`_admit` with
        the queue without ``ticket``."""
        queue = _without(_live(_f(self.layout.waiters)), ticket)
        return Command({}, self._admit(self._holders(), queue))

    # -- reading ------------------------------------------------------------------------------

    def live_holders(self, doc: Mapping[str, Any], now: datetime | None) -> list[dict[str, Any]]:
        """The holder entries of ``doc`` unexpired at the server time ``now``,
        in the order of their grants."""
        if now is None:
            return []
        at = naive_utc(now)
        return [dict(h) for h in doc.get(self.layout.owner) or []
                if isinstance(h.get("u"), datetime) and naive_utc(h["u"]) > at]

    def view(self, doc: Mapping[str, Any] | None, now: datetime | None,
             ticket: str | None = None) -> View:
        """How the caller with ``ticket`` sees the record: ``mine`` when its
        ticket is a live holder (``fence`` and ``until`` are then its entry's);
        ``held`` when anyone is; ``holder`` the first live holder's owner;
        ``time_left`` until the earliest live holder ends (when a head waiter
        looks again)."""
        if doc is None:
            return View(exists=False, now=now)
        live = self.live_holders(doc, now)
        waiters = [w for w in doc.get(self.layout.waiters) or []
                   if now is None or naive_utc(w.get("a", now)) > naive_utc(now)]
        own = next((h for h in live if ticket is not None and h.get("t") == ticket), None)
        first_end = min((naive_utc(h["u"]) for h in live), default=None)
        until = naive_utc(own["u"]) if own is not None else first_end
        return View(
            exists=True,
            now=now,
            mine=own is not None,
            held=bool(live),
            holder=live[0].get("o") if live else None,
            fence=int(own["f"]) if own is not None and own.get("f") is not None else None,
            until=until,
            head=bool(waiters) and waiters[0].get("t") == ticket,
            queued=len(waiters),
            time_left=(max(_seconds_between(first_end, now), 0.0)
                       if first_end is not None and now is not None else 0.0),
            foreign=self._foreign_at(doc, now, bool(live) or bool(waiters)),
        )

    def _foreign_at(self, doc: Mapping[str, Any], now: datetime | None,
                    busy: bool) -> str | None:
        kind = doc.get(self.KIND_FIELD)
        if kind is None:
            until = doc.get(self.layout.until)
            held = (isinstance(until, datetime) and now is not None
                    and naive_utc(until) > naive_utc(now))
            return NamedKind.name if held else None
        if kind != self.tag:
            return str(kind)
        limit = doc.get(self.LIMIT_FIELD)
        if busy and limit is not None and limit != self.capacity:
            return f"{self.tag} of limit {limit}"
        return None

    def rows(self, doc: Mapping[str, Any], now: datetime | None) -> list[dict[str, Any]]:
        """One row per live holder (``mode`` ``reader``/``writer`` for a
        read/write lock), or one ``free`` row when nobody holds a share."""
        live = self.live_holders(doc, now)
        queued = self.view(doc, now).queued
        base = {"kind": str(doc.get(self.KIND_FIELD, self.tag)), "id": doc.get("_id"),
                "waiters": queued, "finished": False, "acquired_at": None,
                "limit": doc.get(self.LIMIT_FIELD)}
        if not live:
            until = doc.get(self.layout.until)
            return [{**base, "state": "free", "remaining": None, "owner": None, "host": None,
                     "pid": None, "fence": doc.get(self.layout.fence),
                     "locked_until": until, "mode": None}]
        rows = []
        for entry in live:
            writer = self.tag == "rwlock" and entry.get("w", 1) >= RW_CAPACITY
            rows.append({
                **base,
                "state": "held",
                "remaining": None if now is None else round(_seconds_between(entry["u"], now), 3),
                "owner": entry.get("o"),
                "host": entry.get("host"),
                "pid": entry.get("pid"),
                "fence": entry.get("f"),
                "locked_until": entry.get("u"),
                "acquired_at": entry.get("at"),
                "mode": ("writer" if writer else "reader") if self.tag == "rwlock" else None,
            })
        return rows

    def holder_tickets(self, doc: Mapping[str, Any], now: datetime | None,
                       owner: str | None = None) -> list[str]:
        return [str(h["t"]) for h in self.live_holders(doc, now)
                if owner is None or h.get("o") == owner]

    def released_fence(self, doc: Mapping[str, Any]) -> int | None:
        return None  # the entry left the holders

    def holder_fence(self, doc: Mapping[str, Any], holding: Holding) -> int | None:
        for entry in doc.get(self.layout.owner) or []:
            if (entry.get("t") == holding.ticket if holding.ticket is not None
                    else entry.get("o") == holding.owner):
                fence = entry.get("f")
                return None if fence is None else int(fence)
        return None

    def protected(self) -> frozenset[str]:
        return frozenset((*self.layout.all, self.KIND_FIELD, self.LIMIT_FIELD))


#: The kinds of record a named-lock collection can hold, by their ``kind``
#: field (a record written before kinds were recorded is a named lock).
NAMED_KINDS: dict[str, Kind] = {
    NamedKind.name: NamedKind(),
    "rwlock": SharedKind.reader(),
}


def named_kind(doc: Mapping[str, Any]) -> Kind:
    """The kind of a record of a named-lock collection (for reading it)."""
    tag = str(doc.get(NamedKind.KIND_FIELD, NamedKind.name))
    if tag == "semaphore":
        limit = doc.get(SharedKind.LIMIT_FIELD)
        return SharedKind.semaphore(limit if isinstance(limit, int) and limit > 0 else 1)
    return NAMED_KINDS.get(tag, NAMED_KINDS[NamedKind.name])
