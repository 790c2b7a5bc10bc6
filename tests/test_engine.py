"""The lease policy (``mongoengine_lockable._engine``) without a server.

The policy is generators that yield requests; here a script answers them (or
raises into them) and a fake monotonic clock moves only when a request says
so: nothing sleeps, and every decision is checked against the requests the
policy made. The rules come from ``DocumentKind``; the records answered are
built by hand.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any, Callable

import pytest
from pymongo.errors import AutoReconnect, OperationFailure

from mongoengine_lockable import LockNotOwnedError, signals
from mongoengine_lockable._engine import (
    Lease,
    Modify,
    Pause,
    Read,
    Result,
    Sleep,
    Watch,
)
from mongoengine_lockable._rules import PICKUP_MS, REFRESH_SECONDS, DocumentKind, wait_prefix

SERVER = datetime(2031, 1, 1, 12, 0, 0)
KIND = DocumentKind()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Script:
    """Answers a lease's requests: ``answer(request)`` returns the answer or
    raises; every request is kept, with the clock when it was made."""

    def __init__(self, clock: Clock, answer: Callable[[Any], Any]) -> None:
        self.clock = clock
        self.answer = answer
        self.requests: list[tuple[float, Any]] = []

    def run(self, steps: Iterator[Any]) -> Any:
        try:
            request = next(steps)  # type: ignore[call-overload]
            while True:
                self.requests.append((self.clock.now, request))
                try:
                    value = self.answer(request)
                except BaseException as exc:
                    request = steps.throw(exc)  # type: ignore[attr-defined]
                else:
                    request = steps.send(value)  # type: ignore[attr-defined]
        except StopIteration as stop:
            return stop.value

    def kinds(self) -> list[str]:
        return [type(r).__name__ for _, r in self.requests]


def lease(clock: Clock) -> Lease:
    return Lease(KIND, {"_id": 1}, what="Job 1", target=1, clock=clock,
                 subject=lambda: ("sender", {"document": "doc"}))


def record(*, token: str | None = None, until: datetime | None = None, owner: str = "holder",
           fence: int = 1, waiters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"_id": 1, "locked_until": until, "locked_by": owner,
                           "lock_fence": fence}
    if token is not None:
        doc["lock_token"] = token
    if waiters:
        doc["lock_waiters"] = waiters
    return doc


def granted(request: Any, ms: int = 5000, at: datetime = SERVER) -> Result:
    """The record as a grant to ``request``'s own ticket leaves it."""
    ticket = _ticket(request)
    return Result(record(token=ticket, until=at + timedelta(milliseconds=ms), owner="me",
                         fence=2), at)


def _ticket(request: Any) -> str:
    """The ticket of an acquisition's write: the one ticket-shaped literal of
    its pipeline (a grant's token and stamp, a waiter's own entry)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            literal = node.get("$literal")
            if isinstance(literal, str) and re.fullmatch(r"[0-9a-f]{24}", literal):
                found.add(literal)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(request.update)
    (ticket,) = found
    return ticket


_queue_ticket = _ticket


@pytest.fixture
def received() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []

    def on(name: str) -> Callable[..., None]:
        def receive(sender: Any, **kwargs: Any) -> None:
            events.append((name, kwargs))
        return receive

    receivers = {n: on(n) for n in ("lock_acquired", "lock_released", "lock_lost",
                                    "lock_unavailable", "lock_renewed")}
    for name, receiver in receivers.items():
        getattr(signals, name).connect(receiver)
    yield events
    for name, receiver in receivers.items():
        getattr(signals, name).disconnect(receiver)


# -- acquiring once -------------------------------------------------------------------------


def test_one_attempt_one_request_and_its_signal(received: list[Any]) -> None:
    clock = Clock()
    script = Script(clock, lambda r: granted(r))
    handle = lease(clock)
    assert script.run(handle.acquire("me", 5000, wait=0)) is not None
    assert script.kinds() == ["Modify"]
    assert handle.held is not None and handle.held.fence == 2 and handle.fence == 2
    assert handle.remaining() == 5.0  # counted from the request's send time
    clock.now += 1.5
    assert handle.remaining() == 3.5
    assert received == [("lock_acquired", {"document": "doc", "owner": "me", "fence": 2,
                                           "waited": 0.0})]


def test_a_refusal_names_the_holder_once(received: list[Any]) -> None:
    clock = Clock()
    held = Result(record(token="other", until=SERVER + timedelta(seconds=9)), SERVER)
    script = Script(clock, lambda r: held)
    handle = lease(clock)
    assert script.run(handle.acquire("me", 5000, wait=0)) is None
    assert handle.held is None and handle.remaining() == 0.0
    assert received == [("lock_unavailable", {"document": "doc", "waited": 0.0,
                                              "holder": "holder"})]
    error = handle.unavailable()
    assert error.owner == "holder" and "holder" in str(error)


def test_an_ambiguous_grant_is_read_back_by_its_own_ticket() -> None:
    clock = Clock()
    sent: list[Any] = []

    def answer(request: Any) -> Any:
        if isinstance(request, Modify):
            sent.append(request)
            raise AutoReconnect("reply lost")
        assert isinstance(request, Read) and request.majority
        ticket = _ticket(sent[0])
        assert request.filter["lock_token"] == ticket  # this attempt, not the owner
        return granted(sent[0])

    script = Script(clock, answer)
    assert script.run(lease(clock).acquire("me", 5000, wait=0)) is not None
    assert script.kinds() == ["Modify", "Read"]


def test_an_ambiguous_grant_not_found_is_a_refusal() -> None:
    clock = Clock()

    def answer(request: Any) -> Any:
        if isinstance(request, Modify):
            raise AutoReconnect("reply lost")
        return Result(None, None)

    assert Script(clock, answer).run(lease(clock).acquire("me", 5000, wait=0)) is None


def test_other_errors_propagate() -> None:
    clock = Clock()

    def answer(request: Any) -> Any:
        raise OperationFailure("bad", code=2)

    with pytest.raises(OperationFailure):
        Script(clock, answer).run(lease(clock).acquire("me", 5000, wait=0))


# -- waiting in the queue ---------------------------------------------------------------------


def queued(request: Any, until: datetime, head: bool = True) -> Result:
    ticket = _queue_ticket(request)
    mine = {"t": ticket, "o": "me", "ms": 5000, "a": SERVER + timedelta(seconds=1)}
    waiters = [mine] if head else [{"t": "x", "o": "x", "ms": 1, "a": until}, mine]
    return Result(record(token="other", until=until, waiters=waiters), SERVER)


def test_a_waiter_looks_again_when_the_holders_lease_ends_and_takes_it() -> None:
    clock = Clock()
    state = {"joins": 0}

    def answer(request: Any) -> Any:
        if isinstance(request, Modify):
            state["joins"] += 1
            if state["joins"] == 1:
                return queued(request, SERVER + timedelta(milliseconds=250))
            return granted(request, at=SERVER + timedelta(milliseconds=250))
        if isinstance(request, Watch):
            return "waker"
        assert isinstance(request, Pause)
        clock.now += request.seconds
        return None

    script = Script(clock, answer)
    handle = lease(clock)
    assert script.run(handle.acquire("me", 5000, wait=10)) is not None
    assert script.kinds() == ["Modify", "Watch", "Pause", "Modify"]
    pause = script.requests[2][1]
    assert pause.seconds == pytest.approx(0.251)  # first in line: the holder's end


def test_a_waiter_behind_others_refreshes_its_place() -> None:
    clock = Clock()
    joins: list[float] = []

    def answer(request: Any) -> Any:
        if isinstance(request, Modify):
            joins.append(clock.now)
            if len(joins) < 4:
                return queued(request, SERVER + timedelta(seconds=60), head=False)
            return granted(request)
        if isinstance(request, Watch):
            return None  # no change streams: polling
        assert isinstance(request, Sleep)
        clock.now += request.seconds
        return None

    assert Script(clock, answer).run(lease(clock).acquire("me", 5000, wait=60)) is not None
    gaps = [b - a for a, b in zip(joins, joins[1:])]
    assert all(0 < g <= REFRESH_SECONDS for g in gaps), gaps


def grant_event(ticket: str, at: datetime) -> dict[str, Any]:
    """The change event of a write (at ``at``) that handed the lease to ``ticket``."""
    return {"operationType": "update", "wallTime": at,
            "updateDescription": {"updatedFields": {"lock_token": ticket}},
            "fullDocument": record(token=ticket, owner="me", fence=7,
                                   until=at + timedelta(milliseconds=PICKUP_MS))}


def test_each_wait_of_a_handle_skips_the_grants_of_its_earlier_waits() -> None:
    """A wait asks for the grants to its handle's tickets (their prefix) on
    its record, out of the process's stream of all grants; the event of an
    earlier wait's grant (which that stream read lately) neither ends a wait
    nor costs a write."""
    clock = Clock()
    handed = SERVER + timedelta(milliseconds=400)
    events: list[dict[str, Any]] = []
    watches: list[Watch] = []

    def answer(request: Any) -> Any:
        if isinstance(request, Modify):
            answer.ticket = _queue_ticket(request)  # type: ignore[attr-defined]
            return queued(request, SERVER + timedelta(seconds=60), head=False)
        if isinstance(request, Watch):
            watches.append(request)
            return "waker"
        assert isinstance(request, Pause) and request.waker == "waker"
        clock.now += 0.01
        return events.pop(0) if events else grant_event(answer.ticket, handed)  # type: ignore[attr-defined]

    script = Script(clock, answer)
    handle = lease(clock)
    assert script.run(handle.acquire("me", 5000, wait=60)) is not None
    first = answer.ticket  # type: ignore[attr-defined]
    assert first.startswith(handle.prefix)
    assert script.kinds() == ["Modify", "Watch", "Pause"]
    watch = watches[0]
    assert watch.shared == KIND.granted_event(wait_prefix())  # the process's waits
    mine = {**grant_event(first, handed), "documentKey": dict(handle.match)}
    assert watch.wants is not None and watch.wants(mine)
    assert not watch.wants({**mine, "documentKey": {"_id": "another"}})
    other = {**grant_event("x" + first, handed), "documentKey": dict(handle.match)}
    assert not watch.wants(other)  # another handle's ticket
    handle.held = None
    script.requests.clear()
    # The next wait: first the event of the earlier grant.
    events.append(grant_event(first, handed))
    assert script.run(handle.acquire("me", 5000, wait=60)) is not None
    assert answer.ticket != first and answer.ticket.startswith(handle.prefix)  # type: ignore[attr-defined]
    assert script.kinds() == ["Modify", "Watch", "Pause", "Pause"]  # no second write
    assert handle.held is not None and handle.held.ticket == answer.ticket  # type: ignore[attr-defined]


def test_a_grant_heard_in_a_change_event_ends_the_wait_and_needs_confirming() -> None:
    clock = Clock()
    handed = SERVER + timedelta(milliseconds=400)

    def answer(request: Any) -> Any:
        if isinstance(request, Modify):
            answer.ticket = _queue_ticket(request)  # type: ignore[attr-defined]
            return queued(request, SERVER + timedelta(seconds=60), head=False)
        if isinstance(request, Watch):
            return "waker"
        clock.now += 0.4
        return grant_event(answer.ticket, handed)  # type: ignore[attr-defined]

    script = Script(clock, answer)
    handle = lease(clock)
    assert script.run(handle.acquire("me", 5000, wait=60)) is not None
    assert script.kinds() == ["Modify", "Watch", "Pause"]  # no further request
    held = handle.held
    assert held is not None and held.fence == 7
    assert held.confirm  # a pickup term: to be renewed to 5 s at once
    assert 0 <= (handle.keepalive_delay() or 0) <= 0.2
    # Counted from the last attempt's send: never longer than granted.
    assert handle.remaining() <= PICKUP_MS / 1000 + 0.4


def test_at_the_deadline_the_waiter_leaves_the_queue() -> None:
    clock = Clock()
    seen: list[Any] = []

    def answer(request: Any) -> Any:
        seen.append(request)
        if isinstance(request, Modify):
            if len(seen) == 1:
                return queued(request, SERVER + timedelta(seconds=60), head=False)
            # The join again, or (at the deadline) the leave: still held by another.
            return Result(record(token="other", until=SERVER + timedelta(seconds=60)), SERVER)
        if isinstance(request, Watch):
            return "waker"
        clock.now += request.seconds
        return None

    handle = lease(clock)
    assert Script(clock, answer).run(handle.acquire("me", 5000, wait=1.0)) is None
    assert clock.now == pytest.approx(101.0)
    leave = seen[-1]
    assert isinstance(leave, Modify) and "$filter" in repr(leave.update)


def test_interrupted_while_queued_it_leaves_and_gives_back_a_late_grant() -> None:
    clock = Clock()
    seen: list[Any] = []

    def answer(request: Any) -> Any:
        seen.append(request)
        if isinstance(request, Modify):
            if len(seen) == 1:
                answer.ticket = _queue_ticket(request)  # type: ignore[attr-defined]
                return queued(request, SERVER + timedelta(seconds=60))
            ticket = answer.ticket  # type: ignore[attr-defined]
            return Result(record(token=ticket, owner="me", until=SERVER + timedelta(seconds=5)),
                          SERVER)
        if isinstance(request, Watch):
            return "waker"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Script(clock, answer).run(lease(clock).acquire("me", 5000, wait=60))
    leave, give_back = seen[-2], seen[-1]
    assert isinstance(leave, Modify) and isinstance(give_back, Modify)
    assert give_back.filter["lock_token"] == answer.ticket  # type: ignore[attr-defined]


# -- releasing, renewing, keeping alive ----------------------------------------------------------


def holding(clock: Clock) -> Lease:
    handle = lease(clock)
    Script(clock, lambda r: granted(r)).run(handle.acquire("me", 5000, wait=0))
    return handle


def test_an_ambiguous_release_is_read_back_by_its_stamp() -> None:
    clock = Clock()
    handle = holding(clock)
    stamps: list[str] = []

    def answer(request: Any) -> Any:
        if isinstance(request, Modify):
            stamps.append(_ticket(request))
            raise AutoReconnect("reply lost")
        assert isinstance(request, Read) and request.majority
        assert request.filter["lock_stamp"] == stamps[0]
        return Result(record(until=None, owner="me"), SERVER)

    script = Script(clock, answer)
    script.run(handle.release())
    assert script.kinds() == ["Modify", "Read"] and handle.held is None


def test_a_second_release_says_why() -> None:
    clock = Clock()
    handle = holding(clock)
    Script(clock, lambda r: Result(record(until=None, owner="me"), None)).run(handle.release())
    with pytest.raises(LockNotOwnedError, match="already released"):
        Script(clock, lambda r: None).run(handle.release())


def test_keepalive_retries_then_the_lease_is_lost_at_its_local_deadline(
    received: list[Any],
) -> None:
    clock = Clock()
    handle = holding(clock)
    delay = handle.keepalive_delay()
    assert delay == pytest.approx(5.0 / 3)
    clock.now += delay
    timeouts: list[float] = []

    def unreachable(request: Any) -> Any:
        timeouts.append(request.timeout)  # each renewal bounded by the time left
        clock.now += request.timeout
        raise AutoReconnect("server frozen")

    script = Script(clock, unreachable)
    while (step := script.run(handle.keep())) is not None:
        clock.now += step
    assert handle.remaining() == 0.0 and handle.held is not None and handle.held.lost
    assert clock.now == pytest.approx(105.0, abs=0.01)  # the grant's send + 5 s
    assert all(t > 0 for t in timeouts)
    lost = [kw for name, kw in received if name == "lock_lost"]
    assert len(lost) == 1 and lost[0]["fence"] == 2


def test_keepalive_fires_lock_lost_when_a_renewal_finds_the_lease_gone(
    received: list[Any],
) -> None:
    clock = Clock()
    handle = holding(clock)
    clock.now += handle.keepalive_delay() or 0
    assert Script(clock, lambda r: Result(None, None)).run(handle.keep()) is None
    assert [name for name, _ in received].count("lock_lost") == 1
