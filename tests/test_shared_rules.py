"""The rules of shared leases (``SharedKind``): semaphores and read/write locks.

- Unit tests without a server: the commands are evaluated by
  ``mongoengine_lockable._expr`` (what mongomock runs) at a fixed ``$$NOW``.
- Differential checks: the same commands on the real server and on the
  evaluator, from the same records, compared field by field (the evaluator
  runs at the ``$$NOW`` the server reports for the write).
- The change-stream filter of a waiter: on the real server, the write that
  admits a waiter is the one its stream selects (``granted`` is a string the
  server reports whole in ``updatedFields``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
import rulecheck
from mongomock.filtering import filter_applies

from mongoengine_lockable._expr import apply_pipeline, evaluate
from mongoengine_lockable._rules import (
    PICKUP_MS,
    RW_CAPACITY,
    WAITER_TTL_MS,
    Ask,
    Command,
    Holding,
    NamedKind,
    SharedKind,
    combine,
)

NOW = datetime(2031, 5, 6, 7, 8, 9, 123000)
NOW_MS = int((NOW - datetime(1970, 1, 1)) / timedelta(milliseconds=1))
SEM = SharedKind.semaphore(3)
READ = SharedKind.reader()
WRITE = SharedKind.writer()


def apply(doc: dict[str, Any] | None, command: Command, now: datetime = NOW,
          name: str = "x") -> dict[str, Any] | None:
    return rulecheck.apply(doc, command, now, name)


def holder(owner: str, ticket: str, fence: int, until: datetime, weight: int = 1,
           ms: int = 1000) -> dict[str, Any]:
    return {"o": owner, "t": ticket, "f": fence, "u": until, "at": until - timedelta(seconds=1),
            "w": weight, "ms": ms}


def waiter(owner: str, ticket: str, weight: int = 1, alive: datetime | None = None,
           ms: int = 2000) -> dict[str, Any]:
    return {"t": ticket, "o": owner, "ms": ms, "a": alive or NOW + timedelta(seconds=1),
            "w": weight}


LATER = NOW + timedelta(seconds=30)
EARLIER = NOW - timedelta(seconds=1)


def record(kind: SharedKind, holders: list[dict[str, Any]], waiters: list[dict[str, Any]] = (),
           fence: int = 10**15) -> dict[str, Any]:
    doc: dict[str, Any] = {"_id": "x", "kind": kind.tag, "limit": kind.capacity,
                           "fence": fence, "holders": list(holders),
                           "locked_until": max([h["u"] for h in holders], default=NOW)}
    if waiters:
        doc["waiters"] = list(waiters)
    return doc


def tickets(doc: dict[str, Any]) -> list[str]:
    return [h["t"] for h in doc["holders"]]


# -- $concat (added to the evaluator for the ``granted`` string) --------------------


def test_concat_joins_strings_and_is_null_on_a_missing_or_null_part() -> None:
    assert evaluate({"$concat": [" ", "$a", " "]}, {"a": "t1"}, NOW) == " t1 "
    assert evaluate({"$concat": []}, {}, NOW) == ""
    assert evaluate({"$concat": ["x", "$missing"]}, {}, NOW) is None
    assert evaluate({"$concat": ["x", None]}, {}, NOW) is None
    with pytest.raises(TypeError):
        evaluate({"$concat": ["x", 1]}, {}, NOW)


# -- semaphores --------------------------------------------------------------------------


def test_first_grant_creates_the_record_with_a_fence_from_the_clock() -> None:
    doc = apply(None, SEM.acquire(Ask("a", "t1", 5000, {"host": "h", "pid": 7}), "try"))
    assert doc is not None
    assert doc["kind"] == "semaphore" and doc["limit"] == 3
    assert doc["holders"] == [{"o": "a", "t": "t1", "f": NOW_MS, "u": NOW + timedelta(seconds=5),
                               "at": NOW, "w": 1, "ms": 5000, "host": "h", "pid": 7}]
    assert doc["fence"] == NOW_MS
    assert doc["granted"] == " t1 "
    assert doc["locked_until"] == NOW + timedelta(seconds=5)
    assert "waiters" not in doc and "_lockable" not in doc
    view = SEM.view(doc, NOW, "t1")
    assert view.mine and view.held and view.fence == NOW_MS and view.holder == "a"
    assert view.until == NOW + timedelta(seconds=5) and view.time_left == 5.0
    # The grant tells the server's time of its write; another ticket's does not.
    assert SEM.grant_time(doc, Ask("a", "t1", 5000)) == NOW
    assert SEM.grant_time(doc, Ask("a", "t2", 5000)) is None
    assert SEM.quiet_release(Holding("a", "t1"), "r1") is None  # always the full release


def test_try_admits_up_to_the_limit_and_a_refusal_writes_nothing() -> None:
    doc: dict[str, Any] | None = None
    for i in range(3):
        doc = apply(doc, SEM.acquire(Ask(f"o{i}", f"t{i}", 1000), "try"))
    assert doc is not None and tickets(doc) == ["t0", "t1", "t2"]
    # Unique, increasing fences: the clock's, then one more each.
    assert [h["f"] for h in doc["holders"]] == [NOW_MS, NOW_MS + 1, NOW_MS + 2]
    assert doc["granted"] == " t2 "
    assert apply_pipeline(doc, SEM.acquire(Ask("o3", "t3", 1000), "try").update, NOW) == doc
    # A view sees its own grant, others see it held.
    assert SEM.view(doc, NOW, "t1").fence == NOW_MS + 1
    assert not SEM.view(doc, NOW, "t3").mine and SEM.view(doc, NOW, "t3").held


def test_expired_holders_free_their_share_and_are_dropped() -> None:
    doc = record(SEM, [holder("a", "ta", 5, EARLIER), holder("b", "tb", 6, LATER),
                       holder("c", "tc", 7, EARLIER)], fence=7)
    after = apply(doc, SEM.acquire(Ask("d", "td", 1000), "try"))
    assert after is not None and tickets(after) == ["tb", "td"]
    assert after["holders"][1]["f"] == NOW_MS  # max(7 + 1, now in ms)
    assert after["locked_until"] == LATER  # the latest live end


def test_a_record_with_nobody_left_keeps_the_writes_time_for_the_ttl_index() -> None:
    doc = record(SEM, [holder("a", "ta", 5, LATER)])
    after = apply(doc, SEM.release(Holding("a", "ta"), "s1"))
    assert after is not None
    assert after["holders"] == [] and after["locked_until"] == NOW
    assert after["stamp"] == "s1" and "granted" not in after
    assert not SEM.view(after, NOW).held


def test_fence_stays_above_a_stored_fence_from_the_future() -> None:
    doc = record(SEM, [], fence=10**15)
    after = apply(doc, SEM.acquire(Ask("a", "ta", 1000), "try"))
    assert after is not None and after["holders"][0]["f"] == 10**15 + 1


def test_try_is_refused_while_someone_live_is_queued() -> None:
    doc = record(SEM, [holder("a", "ta", 5, LATER)], [waiter("w", "tw")])
    assert apply(doc, SEM.acquire(Ask("b", "tb", 1000), "try")) == doc
    # A dead waiter does not count.
    dead = record(SEM, [holder("a", "ta", 5, LATER)], [waiter("w", "tw", alive=EARLIER)])
    after = apply(dead, SEM.acquire(Ask("b", "tb", 1000), "try"))
    assert after is not None and tickets(after) == ["ta", "tb"] and "waiters" not in after


def test_a_release_admits_the_longest_prefix_of_waiters_that_fits() -> None:
    full = [holder(f"h{i}", f"th{i}", i, LATER) for i in range(3)]
    doc = record(SEM, full, [waiter("w1", "tw1"), waiter("w2", "tw2"),
                             waiter("dead", "tdead", alive=EARLIER), waiter("w3", "tw3")])
    after = apply(doc, SEM.release(Holding("h0", "th0"), "s1"))
    assert after is not None
    assert tickets(after) == ["th1", "th2", "tw1"]
    assert [w["t"] for w in after["waiters"]] == ["tw2", "tw3"]  # the dead one is gone
    assert after["granted"] == " tw1 "
    # The admitted waiter got its own duration, up to the pickup term until it
    # confirms its share (another caller's write admitted it).
    assert after["holders"][2]["u"] == NOW + timedelta(milliseconds=min(2000, PICKUP_MS))
    assert SEM.view(after, NOW, "tw1").mine
    view = SEM.view(after, NOW, "tw2")
    assert view.head and view.queued == 2 and not view.mine


def test_a_write_that_frees_several_shares_admits_several_with_consecutive_fences() -> None:
    holders = [holder("h0", "th0", 1, EARLIER), holder("h1", "th1", 2, EARLIER),
               holder("h2", "th2", 3, LATER)]
    doc = record(SEM, holders, [waiter("w1", "tw1"), waiter("w2", "tw2"), waiter("w3", "tw3")],
                 fence=10**15)
    after = apply(doc, SEM.release(Holding("h2", "th2"), "s1"))
    assert after is not None
    assert tickets(after) == ["tw1", "tw2", "tw3"]
    assert [h["f"] for h in after["holders"]] == [10**15 + 1, 10**15 + 2, 10**15 + 3]
    assert after["fence"] == 10**15 + 3
    assert after["granted"] == " tw1 tw2 tw3 "
    assert "waiters" not in after


def test_queueing_refreshes_the_place_and_admits_when_it_fits() -> None:
    doc = record(SEM, [holder(f"h{i}", f"th{i}", i, LATER) for i in range(3)],
                 [waiter("w1", "tw1", alive=NOW + timedelta(milliseconds=10))])
    after = apply(doc, SEM.acquire(Ask("w2", "tw2", 1000), "queue"))
    assert after is not None and [w["t"] for w in after["waiters"]] == ["tw1", "tw2"]
    again = apply(after, SEM.acquire(Ask("w1", "tw1", 1000), "queue"))
    assert again is not None and [w["t"] for w in again["waiters"]] == ["tw1", "tw2"]
    assert again["waiters"][0]["a"] == NOW + timedelta(milliseconds=WAITER_TTL_MS)  # refreshed
    # Once the holders' leases ran out, the head's next attempt is admitted
    # (the other waiter, not heard from since, is dropped).
    admitted = apply(again, SEM.acquire(Ask("w1", "tw1", 1000), "queue"),
                     now=LATER + timedelta(seconds=1))
    assert admitted is not None
    assert tickets(admitted) == ["tw1"] and "waiters" not in admitted


def test_a_queued_holder_is_not_queued_again() -> None:
    doc = record(SEM, [holder("a", "ta", 5, LATER)])
    after = apply(doc, SEM.acquire(Ask("a", "ta", 1000), "queue"))
    assert after is not None and tickets(after) == ["ta"] and "waiters" not in after


def test_leaving_the_queue_lets_the_next_ones_in() -> None:
    # Read/write: a writer waits for a reader; readers queued behind it.
    doc = record(READ, [holder("r0", "tr0", 1, LATER)],
                 [waiter("w", "tw", RW_CAPACITY), waiter("r1", "tr1"), waiter("r2", "tr2")])
    after = apply(doc, WRITE.leave("tw"))
    assert after is not None
    assert tickets(after) == ["tr0", "tr1", "tr2"] and "waiters" not in after
    assert after["granted"] == " tr1 tr2 "


def test_renew_extends_only_the_callers_share() -> None:
    doc = record(SEM, [holder("a", "ta", 5, NOW + timedelta(seconds=1)),
                       holder("b", "tb", 6, NOW + timedelta(seconds=2))])
    after = apply(doc, SEM.renew(Holding("a", "ta"), 10_000))
    assert after is not None
    assert [h["u"] for h in after["holders"]] == [NOW + timedelta(seconds=10),
                                                  NOW + timedelta(seconds=2)]
    assert [h["f"] for h in after["holders"]] == [5, 6]
    assert after["locked_until"] == NOW + timedelta(seconds=10)
    # An expired share is not revived; another's ticket is not the caller's.
    assert apply(after, SEM.renew(Holding("a", "ta"), 1000),
                 now=NOW + timedelta(seconds=11)) is None
    assert apply(after, SEM.renew(Holding("a", "tb"), 1000)) is not None  # by ticket
    assert apply(after, SEM.renew(Holding("zz", "tzz"), 1000)) is None


def test_release_needs_a_live_share_of_the_caller() -> None:
    doc = record(SEM, [holder("a", "ta", 5, EARLIER), holder("b", "tb", 6, LATER)])
    assert apply(doc, SEM.release(Holding("a", "ta"), "s")) is None  # expired
    assert apply(doc, SEM.release(Holding("c", "tc"), "s")) is None
    by_owner = apply(doc, SEM.release(Holding("b"), "s"))
    assert by_owner is not None and tickets(by_owner) == []


def test_force_release_by_ticket_owner_or_all() -> None:
    doc = record(SEM, [holder("a", "ta", 5, LATER), holder("b", "tb", 6, LATER)],
                 [waiter("w", "tw")])
    by_ticket = apply(doc, SEM.force_release("s", "tb"))
    assert by_ticket is not None and tickets(by_ticket) == ["ta", "tw"]
    by_owner = apply(doc, SEM.force_release("s", owner="a"))
    assert by_owner is not None and tickets(by_owner) == ["tb", "tw"]
    everyone = apply(doc, SEM.force_release("s"))
    assert everyone is not None and tickets(everyone) == ["tw"]
    assert apply(doc, SEM.force_release("s", "nobody")) is None


def test_a_forced_grant_ignores_the_limit_and_keeps_the_queue() -> None:
    doc = record(SEM, [holder(f"h{i}", f"th{i}", i, LATER) for i in range(3)],
                 [waiter("w", "tw")])
    after = apply(doc, SEM.acquire(Ask("f", "tf", 1000), "force"))
    assert after is not None and tickets(after)[-1] == "tf"
    assert [w["t"] for w in after["waiters"]] == ["tw"]


# -- read/write locks ----------------------------------------------------------------------


def test_readers_share_and_a_writer_is_alone() -> None:
    doc = apply(None, READ.acquire(Ask("r1", "tr1", 1000), "try"))
    doc = apply(doc, READ.acquire(Ask("r2", "tr2", 1000), "try"))
    assert doc is not None and tickets(doc) == ["tr1", "tr2"] and doc["kind"] == "rwlock"
    refused = apply_pipeline(doc, WRITE.acquire(Ask("w", "tw", 1000), "try").update, NOW)
    assert refused == doc
    alone = apply(None, WRITE.acquire(Ask("w", "tw", 1000), "try"))
    assert alone is not None and tickets(alone) == ["tw"]
    assert apply_pipeline(alone, READ.acquire(Ask("r", "tr", 1000), "try").update, NOW) == alone
    assert apply_pipeline(alone, WRITE.acquire(Ask("w2", "tw2", 1000), "try").update,
                          NOW) == alone


def test_a_waiting_writer_keeps_later_readers_out() -> None:
    doc = record(READ, [holder("r1", "tr1", 1, LATER)])
    doc = apply(doc, WRITE.acquire(Ask("w", "tw", 1000), "queue"))
    assert doc is not None and tickets(doc) == ["tr1"]
    # A reader that does not wait is refused; one that waits queues behind.
    assert apply_pipeline(doc, READ.acquire(Ask("r2", "tr2", 1000), "try").update, NOW) == doc
    doc = apply(doc, READ.acquire(Ask("r2", "tr2", 1000), "queue"))
    doc = apply(doc, READ.acquire(Ask("r3", "tr3", 1000), "queue"))
    doc = apply(doc, WRITE.acquire(Ask("w2", "tw2", 1000), "queue"))
    doc = apply(doc, READ.acquire(Ask("r4", "tr4", 1000), "queue"))
    assert doc is not None
    assert [w["t"] for w in doc["waiters"]] == ["tw", "tr2", "tr3", "tw2", "tr4"]
    # The last reader leaves: the writer alone gets in.
    doc = apply(doc, READ.release(Holding("r1", "tr1"), "s1"))
    assert doc is not None and tickets(doc) == ["tw"] and doc["granted"] == " tw "
    # The writer leaves: the readers up to the next writer get in together.
    doc = apply(doc, WRITE.release(Holding("w", "tw"), "s2"))
    assert doc is not None and tickets(doc) == ["tr2", "tr3"]
    assert doc["granted"] == " tr2 tr3 "
    assert [w["t"] for w in doc["waiters"]] == ["tw2", "tr4"]


# -- kinds and capacities ---------------------------------------------------------------------


def test_another_kinds_record_is_left_as_it_was() -> None:
    lock = apply(None, NamedKind().acquire(Ask("l", "tl", 60_000), "try"))
    assert lock is not None
    for command in (SEM.acquire(Ask("a", "ta", 1000), "try"),
                    SEM.acquire(Ask("a", "ta", 1000), "queue"),
                    WRITE.acquire(Ask("a", "ta", 1000), "queue")):
        assert apply_pipeline(lock, command.update, NOW) == lock
    assert SEM.view(lock, NOW).foreign == "lock"
    sem = apply(None, SEM.acquire(Ask("a", "ta", 1000), "try"))
    assert sem is not None
    assert apply_pipeline(sem, NamedKind().acquire(Ask("l", "tl", 1000), "try").update,
                          NOW) == sem
    assert NamedKind().view(sem, NOW).foreign == "semaphore"
    assert apply_pipeline(sem, READ.acquire(Ask("r", "tr", 1000), "try").update, NOW) == sem
    assert READ.view(sem, NOW).foreign == "semaphore"


def test_a_named_lock_record_written_before_kinds_were_stored() -> None:
    legacy = {"_id": "x", "owner": "l", "token": "tl", "fence": 4, "locked_until": LATER}
    assert apply_pipeline(legacy, SEM.acquire(Ask("a", "ta", 1000), "try").update,
                          NOW) == legacy
    assert SEM.view(legacy, NOW).foreign == "lock"
    expired = {**legacy, "locked_until": EARLIER}
    taken = apply(expired, SEM.acquire(Ask("a", "ta", 1000), "try"))
    assert taken is not None and tickets(taken) == ["ta"] and taken["kind"] == "semaphore"
    assert SEM.view(expired, NOW).foreign is None


def test_another_limit_is_refused_while_in_use_and_takes_over_an_idle_record() -> None:
    other = SharedKind.semaphore(5)
    busy = record(SEM, [holder("a", "ta", 5, LATER)])
    assert apply_pipeline(busy, other.acquire(Ask("b", "tb", 1000), "try").update, NOW) == busy
    assert other.view(busy, NOW).foreign == "semaphore of limit 3"
    assert SEM.view(busy, NOW).foreign is None
    idle = record(SEM, [holder("a", "ta", 5, EARLIER)])
    assert other.view(idle, NOW).foreign is None
    after = apply(idle, other.acquire(Ask("b", "tb", 1000), "try"))
    assert after is not None and after["limit"] == 5 and tickets(after) == ["tb"]


# -- change streams ---------------------------------------------------------------------------


def test_granted_event_matches_the_grants_of_one_handles_waits_only() -> None:
    match = SEM.granted_event("ab12")  # the handle's prefix

    def update(granted: str) -> dict[str, Any]:
        return {"operationType": "update",
                "updateDescription": {"updatedFields": {"granted": granted}}}

    assert filter_applies(match, update(" ab12f0 "))  # type: ignore[no-untyped-call]
    assert filter_applies(match, update(" x ab12f1 y "))  # type: ignore[no-untyped-call]
    assert not filter_applies(match, update(" cab12f0 "))  # type: ignore[no-untyped-call]
    assert not filter_applies(match, update(" x y "))  # type: ignore[no-untyped-call]
    # Which wait it grants: the event's own change tells.
    assert SEM.event_grants(update(" x ab12f1 y "), "ab12f1")
    assert not SEM.event_grants(update(" x ab12f1 y "), "ab12f0")
    assert SEM.earlier_grant(update(" x ab12f1 y "), "ab12f0")
    assert not SEM.earlier_grant({"operationType": "delete"}, "ab12f0")
    assert not filter_applies(  # type: ignore[no-untyped-call]
        match, {"operationType": "update",
                "updateDescription": {"updatedFields": {"holders": []}}})
    assert filter_applies(  # type: ignore[no-untyped-call]
        match, {"operationType": "replace", "fullDocument": {"granted": " ab12f0 "}})
    assert filter_applies(match, {"operationType": "delete"})  # type: ignore[no-untyped-call]


# -- differential: the real server and the evaluator ------------------------------------------


def _scenarios(now: datetime) -> list[tuple[str, dict[str, Any] | None, Command]]:
    """(label, record or None, command), relative to the real clock ``now``:
    leases a minute away from it either way, so that the server's ``$$NOW``
    a moment later sees the same ones alive."""
    live, dead = now + timedelta(minutes=1), now - timedelta(minutes=1)
    alive, gone = now + timedelta(minutes=1), now - timedelta(minutes=1)

    def h(owner: str, until: datetime, weight: int = 1, fence: int = 10**15) -> dict[str, Any]:
        return {"o": owner, "t": "t" + owner, "f": fence, "u": until, "at": dead, "w": weight,
                "ms": 60_000, "host": "h", "pid": 1}

    def w(owner: str, weight: int = 1, a: datetime = alive) -> dict[str, Any]:
        return {"t": "t" + owner, "o": owner, "ms": 5000, "a": a, "w": weight,
                "x": {"host": "h", "pid": 2}}

    def rec(kind: SharedKind, holders: list[Any], waiters: list[Any] = ()) -> dict[str, Any]:
        doc = {"_id": "x", "kind": kind.tag, "limit": kind.capacity, "fence": 10**15 + 5,
               "holders": holders, "locked_until": live, "stamp": "old"}
        if waiters:
            doc["waiters"] = list(waiters)
        return doc

    ask = Ask("me", "tme", 5000, {"host": "h", "pid": 3})
    full = rec(SEM, [h("a", live), h("b", live), h("c", live)], [w("d"), w("e", a=gone), w("f")])
    rw = rec(READ, [h("r1", live), h("r2", live)], [w("wr", RW_CAPACITY), w("r3"), w("r4")])
    return [
        ("try on nothing", None, SEM.acquire(ask, "try")),
        ("try beside a dead holder", rec(SEM, [h("a", live), h("b", dead)]),
         SEM.acquire(ask, "try")),
        ("try when full", full, SEM.acquire(ask, "try")),
        ("queue when full", full, SEM.acquire(ask, "queue")),
        ("release admits the head", full, SEM.release(Holding("b", "tb"), "s1")),
        ("release by owner", full, SEM.release(Holding("a"), "s2")),
        ("renew", full, SEM.renew(Holding("c", "tc"), 90_000)),
        ("leave", full, SEM.leave("td")),
        ("force by owner", full, SEM.force_release("s3", owner="b")),
        ("force all", full, SEM.force_release("s4")),
        ("reader refused behind a writer", rw, READ.acquire(ask, "try")),
        ("reader queues behind a writer", rw, READ.acquire(ask, "queue")),
        ("last readers leave: writer in", rec(READ, [h("r1", live)], rw["waiters"]),
         READ.release(Holding("r1", "tr1"), "s5")),
        ("writer leaves: readers in",
         rec(WRITE, [h("wr", live, RW_CAPACITY)], [w("r3"), w("r4"), w("w2", RW_CAPACITY)]),
         WRITE.release(Holding("wr", "twr"), "s6")),
        ("everyone expired", rec(SEM, [h("a", dead)], [w("d", a=gone)]),
         SEM.acquire(ask, "queue")),
        ("other limit while busy", full, SharedKind.semaphore(4).acquire(ask, "queue")),
        ("named lock on a semaphore", full, NamedKind().acquire(ask, "try")),
    ]


def test_rules_give_the_same_records_on_the_server_and_the_evaluator(lockable_real_db: Any) -> None:
    coll = lockable_real_db.database["shared_rules_diff"]
    rulecheck.same_on_server(coll, _scenarios(rulecheck.server_clock(coll)))


def test_a_waiters_stream_hears_only_the_write_that_admits_it(lockable_real_db: Any) -> None:
    """On the server: ``granted`` is reported whole in ``updatedFields`` (or
    the write is logged as a replacement), so the ``$regex`` of the waiter's
    stream selects the write that admits it, and no other."""
    from mongoengine_lockable._engine import Modify
    from mongoengine_lockable._io import executor_for

    kind = SharedKind.semaphore(1)
    coll = lockable_real_db.database["shared_rules_events"]
    io = executor_for(coll)  # majority writes: the stream has them when they return

    def send(command: Command) -> dict[str, Any] | None:
        result = io.do(Modify(combine({"_id": "x"}, command.filter), command.update,
                              upsert=command.upsert), None, [])
        return result.doc

    match = combine({"documentKey._id": "x"}, kind.granted_event("tw2"))
    stream = coll.watch([{"$match": match}], max_await_time_ms=100)
    try:
        def heard() -> list[dict[str, Any]]:
            seen = []
            while (event := stream.try_next()) is not None:
                seen.append(event)
            return seen

        assert send(kind.acquire(Ask("a", "ta", 60_000), "try"))
        send(kind.acquire(Ask("w1", "tw1", 60_000), "queue"))
        send(kind.acquire(Ask("w2", "tw2", 60_000), "queue"))
        send(kind.acquire(Ask("w1", "tw1", 60_000), "queue"))  # refreshes
        send(kind.renew(Holding("a", "ta"), 60_000))
        assert heard() == []
        doc = send(kind.release(Holding("a", "ta"), "s1"))  # admits w1, not w2
        assert doc is not None and doc["granted"] == " tw1 "
        assert heard() == []
        send(kind.release(Holding("w1", "tw1"), "s2"))  # admits w2
        events = heard()
        assert [e["operationType"] for e in events] in (["update"], ["replace"])
        event = events[0]
        if event["operationType"] == "update":
            assert event["updateDescription"]["updatedFields"]["granted"] == " tw2 "
        else:
            assert event["fullDocument"]["granted"] == " tw2 "
        send(kind.release(Holding("w2", "tw2"), "s3"))  # admits nobody
        assert heard() == []
        coll.delete_one({"_id": "x"})
        assert [e["operationType"] for e in heard()] == ["delete"]
    finally:
        stream.close()
