"""The change streams a process's waiters share (``_io.Hub``), without a
server: which waiter gets which event, from when on, and what happens when
a stream fails or is no longer used.

A waiter registers after its last write (``after``: that write's cluster
time) and must get every event it wants that comes after it: those the hub
read already at once, later ones as they come. Where the hub cannot vouch
for that, the waiter's first pause ends at once, so that it looks again.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import pytest
from bson import Timestamp

from mongoengine_lockable import _io
from mongoengine_lockable._engine import Watch
from mongoengine_lockable._io import Call, Hub, Hubs, ThreadWaker, drive


class QuietHub(Hub):
    """A hub that no closer watches."""

    started = 0

    def _start_reading(self) -> None:
        self.started += 1


class FakeStream:
    """A change stream the test feeds (:meth:`put`); a read waits 10 ms for
    an event. ``fail``: the next read raises that."""

    def __init__(self) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.readers: set[str] = set()
        self.fail: Exception | None = None
        self.closed = False

    def put(self, event: dict[str, Any]) -> None:
        self.events.put(event)

    def try_next(self) -> dict[str, Any] | None:
        self.readers.add(threading.current_thread().name)
        if self.fail is not None:
            raise self.fail
        try:
            return self.events.get(timeout=0.01)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.closed = True


def at(seconds: int, inc: int = 1) -> Timestamp:
    return Timestamp(seconds, inc)


def event(ident: Any, when: Timestamp, ticket: str = "t") -> dict[str, Any]:
    return {"operationType": "update", "documentKey": {"_id": ident}, "clusterTime": when,
            "updateDescription": {"updatedFields": {"lock_token": ticket}}}


def wants(ident: Any) -> Any:
    return lambda e: e["documentKey"]["_id"] == ident


def pause(waker: ThreadWaker, timeout: float = 0.0) -> Any:
    """One pause of ``waker``, as an executor drives it (its calls made)."""
    calls: list[Call] = []

    def invoke(call: Call) -> Any:
        calls.append(call)
        return call.method(*call.args, **call.kwargs)

    found = drive(waker.pausing(timeout, lambda seconds: None), invoke)
    pause.calls = calls  # type: ignore[attr-defined]
    return found


def opened_hub(start: Timestamp) -> tuple[QuietHub, ThreadWaker]:
    hub = QuietHub("key", {})
    first = ThreadWaker(hub, wants(1), start)
    assert hub.add(first) == "open"  # the first waiter opens the stream
    hub.opened(FakeStream(), start)
    assert hub.started == 1
    return hub, first


def test_each_waiter_gets_the_events_it_wants_and_no_other() -> None:
    hub, one = opened_hub(at(10))
    two = ThreadWaker(hub, wants(2), at(10))
    assert hub.add(two) is None
    hub.route(event(1, at(11)))
    hub.route(event(2, at(12)))
    hub.route(event(1, at(13)))
    assert [e["clusterTime"] for e in (pause(one), pause(one))] == [at(11), at(13)]
    assert pause(one) is None
    assert pause(two)["clusterTime"] == at(12) and pause(two) is None


def test_a_later_waiter_gets_the_events_read_after_its_write_at_once() -> None:
    hub, _ = opened_hub(at(10))
    hub.route(event(1, at(11)))
    hub.route(event(1, at(12)))
    hub.route(event(2, at(13)))
    late = ThreadWaker(hub, wants(1), at(11))  # its write was at 11
    assert hub.add(late) is None
    assert pause(late)["clusterTime"] == at(12)  # not 11 (its own write's time), not x=2
    assert pause(late) is None


def test_a_waiter_whose_write_the_stream_may_have_missed_looks_again_at_once() -> None:
    hub, _ = opened_hub(at(10))
    early = ThreadWaker(hub, wants(1), at(9))  # wrote before the stream starts
    unknown = ThreadWaker(hub, wants(1), None)
    for waker in (early, unknown):
        assert hub.add(waker) is None
        assert pause(waker, timeout=5.0) is None and pause.calls == []  # type: ignore[attr-defined]
        hub.route(event(1, at(20)))
        assert pause(waker)["clusterTime"] == at(20)  # from then on, as any waiter


def test_a_waiter_registered_while_the_stream_opens_is_covered_by_its_start() -> None:
    hub = QuietHub("key", {})
    first = ThreadWaker(hub, wants(1), at(10))
    assert hub.add(first) == "open"
    second = ThreadWaker(hub, wants(1), at(12))
    before = ThreadWaker(hub, wants(1), at(8))
    assert hub.add(second) is None and hub.add(before) is None  # while opening
    hub.opened(FakeStream(), at(10))
    assert not first.retry and not second.retry and before.retry


def test_events_kept_no_longer_leave_later_waiters_uncovered(monkeypatch: Any) -> None:
    monkeypatch.setattr(_io, "RECENT_EVENTS", 2)
    hub, _ = opened_hub(at(10))
    for second in (11, 12, 13):
        hub.route(event(1, at(second)))
    assert hub.complete_from == at(11)  # 11 was dropped
    covered = ThreadWaker(hub, wants(1), at(11))
    missed = ThreadWaker(hub, wants(1), at(10, 5))
    hub.add(covered), hub.add(missed)
    assert [pause(covered)["clusterTime"], pause(covered)["clusterTime"]] == [at(12), at(13)]
    assert not covered.retry
    assert missed.retry


def test_a_pausing_thread_reads_the_stream_for_every_waiter() -> None:
    """The first thread to pause reads the stream: its own event comes to it
    first hand; another waiter's is handed to that waiter, whose thread
    takes over the reading once the reader's pause ends."""
    hub, one = opened_hub(at(10))
    two = ThreadWaker(hub, wants(2), at(10))
    assert hub.add(two) is None
    stream = hub.stream
    found: dict[str, Any] = {}

    def pausing(name: str, waker: ThreadWaker, timeout: float) -> threading.Thread:
        thread = threading.Thread(target=lambda: found.__setitem__(name, pause(waker, timeout)),
                                  name=name)
        thread.start()
        return thread

    reader = pausing("one", one, 30.0)
    deadline = time.monotonic() + 20
    while "one" not in stream.readers and time.monotonic() < deadline:
        time.sleep(0.01)
    other = pausing("two", two, 30.0)  # the stream is read already: it waits
    stream.put(event(2, at(11)))  # read by one, handed to two
    other.join(timeout=20)
    assert found["two"]["clusterTime"] == at(11) and stream.readers == {"one"}
    other = pausing("two", two, 30.0)
    stream.put(event(1, at(12)))  # one's own: its pause ends, two reads on
    reader.join(timeout=20)
    assert found["one"]["clusterTime"] == at(12)
    stream.put(event(2, at(13)))
    other.join(timeout=20)
    assert found["two"]["clusterTime"] == at(13) and stream.readers == {"one", "two"}


def test_a_stream_failing_under_its_reader_makes_every_waiter_poll() -> None:
    hub, one = opened_hub(at(10))
    two = ThreadWaker(hub, wants(2), at(10))
    hub.add(two)
    hub.stream.fail = RuntimeError("connection reset")
    assert pause(one, timeout=30.0) is None  # it read, the read failed
    assert one.broken and two.broken and not hub.alive()
    assert pause(two, timeout=5.0) is None
    (call,) = pause.calls  # type: ignore[attr-defined]
    assert call.args == (_io.BROKEN_POLL,)  # it polls


def test_a_failed_stream_makes_its_waiters_poll_and_the_next_wait_opens_another() -> None:
    hubs = Hubs()
    request = Watch({}, {"operationType": "delete"}, wants(1))

    class Client:
        pass

    class Collection:
        full_name = "db.locks"
        database = type("Database", (), {"client": Client()})()

    collection = Collection()
    waker, opening = hubs.register(QuietHub, None, collection, request, at(10))
    assert opening and len(hubs) == 1
    again, opening = hubs.register(QuietHub, None, collection, request, at(11))
    assert not opening and again.hub is waker.hub  # one stream for both
    waker.hub.opened(FakeStream(), at(10))
    failing = waker.hub
    failing.failed()
    assert waker.broken and again.broken and len(hubs) == 0
    assert pause(again, timeout=5.0) is None
    (call,) = pause.calls  # type: ignore[attr-defined]
    assert call.args == (_io.BROKEN_POLL,)  # it polls
    fresh, opening = hubs.register(QuietHub, None, collection, request, at(12))
    assert opening and fresh.hub is not failing


def test_a_stream_nobody_waits_on_is_closed_and_replaced(monkeypatch: Any) -> None:
    hubs = Hubs()
    request = Watch({}, {"operationType": "delete"}, wants(1))
    collection: Any = type("Collection", (), {
        "full_name": "db.locks",
        "database": type("Database", (), {"client": object()})()})()
    waker, _ = hubs.register(QuietHub, None, collection, request, at(10))
    hub = waker.hub
    hub.opened(FakeStream(), at(10))
    assert not hub.idle()  # a waiter is registered
    waker.close()
    monkeypatch.setattr(_io, "KEEP_STREAM_SECONDS", 0.0)
    assert hub.idle() and not hub.alive() and len(hubs) == 0
    assert hub.add(ThreadWaker(hub, None, at(11))) == "closed"
    fresh, opening = hubs.register(QuietHub, None, collection, request, at(11))
    assert opening and fresh.hub is not hub


def test_a_hub_is_per_process_collection_and_filter() -> None:
    hubs = Hubs()
    client = object()

    def collection(name: str) -> Any:
        return type("Collection", (), {
            "full_name": name, "database": type("Database", (), {"client": client})()})()

    locks, jobs = collection("db.locks"), collection("db.jobs")
    grants = Watch({}, {"operationType": "update"})
    deletes = Watch({}, {"operationType": "delete"})
    a, _ = hubs.register(QuietHub, None, locks, grants, at(1))
    b, _ = hubs.register(QuietHub, None, locks, grants, at(1))
    c, _ = hubs.register(QuietHub, None, jobs, grants, at(1))
    d, _ = hubs.register(QuietHub, None, locks, deletes, at(1))
    e, _ = hubs.register(QuietHub, "another loop", locks, grants, at(1))
    assert a.hub is b.hub
    assert len({id(w.hub) for w in (a, c, d, e)}) == 4
    assert len(hubs) == 4


@pytest.mark.parametrize("timeout", [0.0, 0.05])
def test_a_pause_with_nothing_to_hand_over_ends_after_its_timeout(timeout: float) -> None:
    _, one = opened_hub(at(10))
    assert pause(one, timeout=timeout) is None


def test_a_waiter_paused_before_the_stream_opened_looks_again_if_not_covered() -> None:
    hub = QuietHub("key", {})
    first = ThreadWaker(hub, wants(1), at(10))
    assert hub.add(first) == "open"
    before = ThreadWaker(hub, wants(1), at(8))
    assert hub.add(before) is None
    found: list[Any] = ["not yet"]
    pausing = threading.Thread(target=lambda: found.__setitem__(0, pause(before, 30.0)))
    pausing.start()  # blocked until an event, or told to look again
    hub.opened(FakeStream(), at(10))
    pausing.join(timeout=20)
    assert not pausing.is_alive() and found == [None]


def test_an_event_from_before_a_waiters_write_is_not_news_to_it() -> None:
    hub, one = opened_hub(at(10))
    late = ThreadWaker(hub, wants(1), at(15))
    assert hub.add(late) is None
    hub.route(event(1, at(12)))  # read late, but made before late's write
    hub.route(event(1, at(16)))
    assert pause(late)["clusterTime"] == at(16) and pause(late) is None
    assert [pause(one)["clusterTime"], pause(one)["clusterTime"]] == [at(12), at(16)]
