"""The rules of single-holder leases (``DocumentKind``, ``NamedKind``).

- Unit tests without a server: each command is evaluated by
  ``mongoengine_lockable._expr`` (what mongomock runs) at a fixed ``$$NOW``,
  from a given record: grants, refusals that write nothing, the queue and its
  settling, hand-offs (a pickup term for a waiter granted by another's write),
  releases, minimum holds, fences, and how a caller sees a record (``view``).
- A differential check: every scenario's command on the real server and on
  the evaluator, from the same record, gives the same record.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta
from typing import Any

import pytest
import rulecheck

from mongoengine_lockable._expr import apply_pipeline
from mongoengine_lockable._rules import (
    PICKUP_MS,
    WAITER_TTL_MS,
    Ask,
    Command,
    DocumentKind,
    Holding,
    NamedKind,
    SharedKind,
    new_owner,
    new_ticket,
    parse_owner,
)

NOW = datetime(2031, 5, 6, 7, 8, 9, 123000)
NOW_MS = int((NOW - datetime(1970, 1, 1)) / timedelta(milliseconds=1))
LATER = NOW + timedelta(seconds=30)
EARLIER = NOW - timedelta(seconds=1)
DOC = DocumentKind()
NAMED = NamedKind()


def apply(doc: dict[str, Any] | None, command: Command, now: datetime = NOW) -> Any:
    return rulecheck.apply(doc, command, now)


def ask(owner: str = "me", ticket: str = "tme", ms: int = 5000, **extra: Any) -> Ask:
    return Ask(owner, ticket, ms, extra)


def waiter(ticket: str, ms: int = 2000, alive: datetime | None = None,
           **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"t": ticket, "o": "o-" + ticket, "ms": ms,
                             "a": alive or NOW + timedelta(seconds=1)}
    if extra:
        entry["x"] = extra
    return entry


def held(waiters: list[dict[str, Any]] = (), **fields: Any) -> dict[str, Any]:
    """A document held by "holder" (ticket "th", fence 3) until LATER."""
    doc = {"_id": "x", "payload": "p", "locked_until": LATER, "locked_by": "holder",
           "lock_fence": 3, "lock_token": "th", "lock_stamp": "th", **fields}
    if waiters:
        doc["lock_waiters"] = list(waiters)
    return doc


# -- grants -------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [
    {},                                           # stored before the mixin was added
    {"locked_until": None, "lock_fence": None},   # never locked, null fields
    {"locked_until": None, "lock_fence": 7},      # released
    {"locked_until": EARLIER, "lock_fence": 7},   # expired
])
def test_a_free_document_is_granted_with_the_next_fence(state: dict[str, Any]) -> None:
    doc = {"_id": "x", "payload": "p", **state}
    after = apply(doc, DOC.acquire(ask(), "try"))
    assert after["locked_until"] == NOW + timedelta(milliseconds=5000)
    assert (after["locked_by"], after["lock_token"], after["lock_stamp"]) == ("me", "tme", "tme")
    assert after["lock_fence"] == (state.get("lock_fence") or 0) + 1
    assert after["payload"] == "p" and "_lockable" not in after
    assert DOC.view(after, NOW, "tme").mine


def test_a_held_document_is_refused_and_nothing_is_written() -> None:
    doc = held()
    assert apply_pipeline(doc, DOC.acquire(ask(), "try").update, NOW) == doc


def test_a_caller_that_does_not_wait_never_takes_a_lease_others_wait_for() -> None:
    released = {"_id": "x", "locked_until": None, "lock_fence": 3,
                "lock_waiters": [waiter("w1")]}
    assert apply_pipeline(released, DOC.acquire(ask(), "try").update, NOW) == released
    # A waiter not heard from for WAITER_TTL_MS no longer counts.
    stale = {**released, "lock_waiters": [waiter("w1", alive=EARLIER)]}
    assert apply(stale, DOC.acquire(ask(), "try"))["lock_token"] == "tme"
    # The same rule, as the filter of a claim.
    assert not rulecheck.matches(DOC.claimable(), released, NOW)
    assert rulecheck.matches(DOC.claimable(), stale, NOW)


def test_force_takes_a_held_lease_and_keeps_the_queue() -> None:
    doc = held([waiter("w1")])
    after = apply(doc, DOC.acquire(ask(), "force"))
    assert (after["locked_by"], after["lock_fence"]) == ("me", 4)
    assert after["lock_waiters"] == doc["lock_waiters"]


def test_owner_strings_are_literals() -> None:
    after = apply({"_id": "x"}, DOC.acquire(ask(owner="$payload", ticket="$x"), "try"))
    assert (after["locked_by"], after["lock_token"]) == ("$payload", "$x")


# -- the queue ---------------------------------------------------------------------------


def test_a_waiter_queues_then_refreshes_its_place() -> None:
    doc = held([waiter("w1")])
    after = apply(doc, DOC.acquire(ask(), "queue"))
    assert [w["t"] for w in after["lock_waiters"]] == ["w1", "tme"]
    mine = after["lock_waiters"][1]
    assert (mine["o"], mine["ms"]) == ("me", 5000)
    assert mine["a"] == NOW + timedelta(milliseconds=WAITER_TTL_MS)
    later = NOW + timedelta(milliseconds=300)
    again = apply(after, DOC.acquire(ask(), "queue"), later)
    assert [w["t"] for w in again["lock_waiters"]] == ["w1", "tme"]  # in place
    assert again["lock_waiters"][1]["a"] == later + timedelta(milliseconds=WAITER_TTL_MS)
    assert again["locked_by"] == "holder"


def test_the_first_waiter_takes_a_free_lease_with_its_own_duration() -> None:
    doc = held([waiter("tme", ms=5000), waiter("w2")], locked_until=EARLIER)
    after = apply(doc, DOC.acquire(ask(), "queue"))
    assert after["lock_token"] == "tme"
    assert after["locked_until"] == NOW + timedelta(milliseconds=5000)
    assert [w["t"] for w in after["lock_waiters"]] == ["w2"]


def test_another_waiters_write_hands_the_head_a_pickup_term() -> None:
    doc = held([waiter("w1", ms=60_000)], locked_until=EARLIER)
    after = apply(doc, DOC.acquire(ask(), "queue"))  # "me" queues behind w1...
    assert after["lock_token"] == "w1"  # ...and settles the lease on w1
    assert after["locked_until"] == NOW + timedelta(milliseconds=PICKUP_MS)
    assert [w["t"] for w in after["lock_waiters"]] == ["tme"]


def test_a_holder_retrying_its_join_is_not_queued_again() -> None:
    doc = held([waiter("w1")], lock_token="tme", locked_by="me")
    after = apply(doc, DOC.acquire(ask(), "queue"))
    assert [w["t"] for w in after["lock_waiters"]] == ["w1"]
    assert after["lock_token"] == "tme"


def test_leaving_drops_the_place_and_settles_a_free_lease() -> None:
    doc = held([waiter("tme"), waiter("w2")])
    after = apply(doc, DOC.leave("tme"))
    assert [w["t"] for w in after["lock_waiters"]] == ["w2"] and after["locked_by"] == "holder"
    free = held([waiter("tme"), waiter("w2")], locked_until=EARLIER)
    after = apply(free, DOC.leave("tme"))
    assert after["lock_token"] == "w2" and "lock_waiters" not in after


def test_dead_waiters_are_dropped_and_skipped() -> None:
    doc = held([waiter("dead", alive=EARLIER), waiter("w2")])
    after = apply(doc, DOC.release(Holding("holder", "th"), "r1"))
    assert after["lock_token"] == "w2" and "lock_waiters" not in after


# -- releases ----------------------------------------------------------------------------------


def test_a_release_without_waiters_leaves_the_document_released() -> None:
    after = apply(held(), DOC.release(Holding("holder", "th"), "r1"))
    assert after["locked_until"] is None and "lock_token" not in after
    assert (after["locked_by"], after["lock_fence"], after["lock_stamp"]) == ("holder", 3, "r1")
    assert "lock_waiters" not in after


def test_a_release_hands_the_lease_to_the_first_waiter_in_the_same_write() -> None:
    doc = held([waiter("w1", ms=60_000), waiter("w2")])
    after = apply(doc, DOC.release(Holding("holder", "th"), "r1"))
    assert (after["locked_by"], after["lock_token"], after["lock_fence"]) == ("o-w1", "w1", 4)
    assert after["locked_until"] == NOW + timedelta(milliseconds=PICKUP_MS)  # until confirmed
    assert after["lock_stamp"] == "r1"  # the release's own id, for a read-back
    assert [w["t"] for w in after["lock_waiters"]] == ["w2"]
    short = apply(held([waiter("w1", ms=300)]), DOC.release(Holding("holder", "th"), "r1"))
    assert short["locked_until"] == NOW + timedelta(milliseconds=300)


def test_a_waiters_stream_hears_the_grants_of_its_handles_waits() -> None:
    match = DOC.granted_event("ab12")  # the handle's prefix

    def update(token: str) -> dict[str, Any]:
        return {"operationType": "update",
                "updateDescription": {"updatedFields": {"lock_token": token}}}

    assert rulecheck.matches(match, update("ab12f0"), NOW)
    assert not rulecheck.matches(match, update("cab12f0"), NOW)
    assert rulecheck.matches(match, {"operationType": "delete"}, NOW)
    assert DOC.event_grants(update("ab12f0"), "ab12f0")
    assert not DOC.event_grants(update("ab12f0"), "ab12f1")
    assert DOC.earlier_grant(update("ab12f0"), "ab12f1")
    assert not DOC.earlier_grant({"operationType": "delete"}, "ab12f1")
    replaced = {"operationType": "replace", "fullDocument": {"lock_token": "ab12f0"}}
    assert rulecheck.matches(match, replaced, NOW) and DOC.event_grants(replaced, "ab12f0")


def _stream_events(kind: Any) -> list[dict[str, Any]]:
    """Change events of every sort a lease's stream may see, on the records
    ``x`` and ``y``: grants to tickets with and without the prefix ``ab12``,
    writes that grant nothing, a replacement, deletes and an insert."""
    field = kind.layout.token

    def granting(ticket: Any, ident: str = "x") -> list[dict[str, Any]]:
        listed = f" {ticket} " if isinstance(kind, SharedKind) and ticket else ticket
        return [{"operationType": "update", "documentKey": {"_id": ident},
                 "updateDescription": {"updatedFields": {field: listed}}},
                {"operationType": "replace", "documentKey": {"_id": ident},
                 "fullDocument": {"_id": ident, field: listed}}]

    return [
        *granting("ab12f0"), *granting("ab12f0", "y"), *granting("cab12f0"),
        *granting("zz00ab12"), *granting("ab99f0"), *granting(None),
        {"operationType": "update", "documentKey": {"_id": "x"},
         "updateDescription": {"updatedFields": {kind.layout.waiters: []}}},
        {"operationType": "update", "documentKey": {"_id": "x"},
         "updateDescription": {"updatedFields": {}, "removedFields": [field]}},
        {"operationType": "delete", "documentKey": {"_id": "x"}},
        {"operationType": "delete", "documentKey": {"_id": "y"}},
        {"operationType": "insert", "documentKey": {"_id": "x"},
         "fullDocument": {"_id": "x", field: "ab12f0"}},
    ]


@pytest.mark.parametrize("kind", [DOC, NAMED, SharedKind.semaphore(3), SharedKind.writer()],
                         ids=["document", "named", "semaphore", "rwlock"])
def test_a_shared_stream_hands_each_waiter_what_its_own_stream_would_select(kind: Any) -> None:
    """The process's stream selects the grants to the process's tickets
    (``granted_event("ab")``: all its waits start so); ``waits_for`` picks
    from it exactly what a stream of the waiter's own (its record's key and
    ``granted_event(prefix)``) would select."""
    own = {"documentKey._id": "x", **kind.granted_event("ab12")}
    shared = kind.granted_event("ab")
    events = _stream_events(kind)
    picked = [e for e in events if rulecheck.matches(shared, e, NOW)
              and kind.waits_for({"_id": "x"}, "ab12", e)]
    assert picked == [e for e in events if rulecheck.matches(own, e, NOW)]
    assert len(picked) == 3  # the two writes granting ab12f0 on x, and its delete
    # Another handle's grants are in the shared stream, not this waiter's.
    assert any(rulecheck.matches(shared, e, NOW) and e not in picked for e in events)


def test_a_shared_stream_names_a_sharded_record_by_its_whole_key() -> None:
    event = {"operationType": "update", "documentKey": {"_id": 1, "tenant": {"id": "t1"}},
             "updateDescription": {"updatedFields": {"lock_token": "ab12f0"}}}
    assert DOC.waits_for({"_id": 1, "tenant.id": "t1"}, "ab12", event)
    assert not DOC.waits_for({"_id": 1, "tenant.id": "t2"}, "ab12", event)
    assert not DOC.waits_for({"_id": 2}, "ab12", event)


def test_a_grant_tells_the_server_time_of_its_write() -> None:
    mine = ask(ms=5000)
    assert DOC.grant_time(apply({"_id": "x"}, DOC.acquire(mine, "try")), mine) == NOW
    assert NAMED.grant_time(apply(None, NAMED.acquire(mine, "force")), mine) == NOW
    assert DOC.grant_time(held(), mine) is None  # refused: another grant shows
    assert DOC.grant_time(None, mine) is None


@pytest.mark.parametrize("kind, record", [
    (DOC, held), (NAMED, lambda **f: named_record(**f)),
    (NamedKind(min_hold_ms=5000), lambda **f: named_record(**f)),
], ids=["document", "named", "named-min-hold"])
def test_a_quiet_release_writes_what_the_release_writes_when_nobody_is_queued(
    kind: Any, record: Any
) -> None:
    quiet = kind.quiet_release(Holding("holder", "th"), "r1")
    assert quiet is not None and "$replaceWith" not in repr(quiet.update)
    assert apply(record(), quiet) == apply(record(), kind.release(Holding("holder", "th"), "r1"))
    # Anyone queued, live or not: it matches nothing (the release decides).
    for entry in (waiter("w1"), waiter("w1", alive=EARLIER)):
        assert apply(record(**{kind.layout.waiters: [entry]}), quiet) is None
    # Not the caller's lease, or expired: nothing.
    assert apply(record(), kind.quiet_release(Holding("holder", "other"), "r1")) is None
    assert apply(record(locked_until=EARLIER), quiet) is None


@pytest.mark.parametrize("holding", [Holding("holder", "other"), Holding("someone")])
def test_a_release_of_another_acquisition_matches_nothing(holding: Holding) -> None:
    assert apply(held(), DOC.release(holding, "r1")) is None
    assert apply(held(locked_until=EARLIER), DOC.release(Holding("holder", "th"), "r")) is None


def test_an_expired_lease_of_the_caller_is_cleared() -> None:
    clear = DOC.clear_expired(Holding("holder", "th"), "r1")
    assert clear is not None
    assert apply(held(), clear) is None  # still held: not this command's
    after = apply(held(locked_until=EARLIER), clear)
    assert after["locked_until"] is None and after["lock_stamp"] == "r1"
    assert NAMED.clear_expired(Holding("holder", "th"), "r1") is None


def test_renew_extends_the_callers_unexpired_lease_only() -> None:
    after = apply(held(), DOC.renew(Holding("holder", "th"), 90_000))
    assert after["locked_until"] == NOW + timedelta(seconds=90) and after["lock_fence"] == 3
    assert apply(held(locked_until=EARLIER), DOC.renew(Holding("holder", "th"), 9)) is None
    assert apply(held(), DOC.renew(Holding("holder", "other"), 9)) is None


def test_force_release_ends_exactly_the_lease_shown() -> None:
    after = apply(held([waiter("w1")]), DOC.force_release("r1", "th"))
    assert after["lock_token"] == "w1"
    assert apply(held(), DOC.force_release("r1", "another-grant")) is None


# -- named records ---------------------------------------------------------------------------


def named_record(**fields: Any) -> dict[str, Any]:
    return {"_id": "x", "kind": "lock", "locked_until": LATER, "owner": "holder",
            "fence": NOW_MS - 5000, "token": "th", "stamp": "th", "host": "h", "pid": 1,
            "acquired_at": NOW - timedelta(seconds=2), **fields}


def test_a_named_record_is_created_by_its_first_grant() -> None:
    after = apply(None, NAMED.acquire(ask(host="web-1", pid=42), "try"))
    assert after["_id"] == "x" and after["kind"] == "lock"
    assert (after["owner"], after["host"], after["pid"]) == ("me", "web-1", 42)
    assert after["acquired_at"] == NOW and after["fence"] == NOW_MS  # from the clock


def test_named_fences_never_go_backwards() -> None:
    ahead = named_record(locked_until=EARLIER, fence=NOW_MS + 10_000)
    assert apply(ahead, NAMED.acquire(ask(), "try"))["fence"] == NOW_MS + 10_001
    behind = named_record(locked_until=EARLIER, fence=5)
    assert apply(behind, NAMED.acquire(ask(), "try"))["fence"] == NOW_MS


def test_a_named_release_leaves_an_expired_date_for_the_ttl_index() -> None:
    after = apply(named_record(), NAMED.release(Holding("holder", "th"), "r1"))
    assert after["locked_until"] == NOW and "token" not in after


def test_a_minimum_hold_keeps_the_lock_and_the_waiter_gets_it_when_it_ends() -> None:
    hold = NamedKind(min_hold_ms=5000)  # granted 2 s ago: 3 s of hold left
    doc = named_record(waiters=[waiter("w1", host="h2", pid=2)])
    after = apply(doc, hold.release(Holding("holder", "th"), "r1"))
    assert after["locked_until"] == NOW + timedelta(seconds=3)
    assert after["owner"] == "holder" and [w["t"] for w in after["waiters"]] == ["w1"]
    view = hold.view(after, NOW, "w1")
    assert view.held and view.finished and view.holder == "holder" and view.head
    # At the end of the hold, the waiter's own attempt takes it.
    at_end = NOW + timedelta(seconds=3)
    granted = apply(after, hold.acquire(Ask("o-w1", "w1", 2000, {"host": "h2", "pid": 2}),
                                        "queue"), at_end)
    assert (granted["token"], granted["host"], granted["pid"]) == ("w1", "h2", 2)


def test_named_records_of_another_kind_are_left_alone() -> None:
    semaphore = {"_id": "x", "kind": "semaphore", "locked_until": EARLIER}
    assert apply_pipeline(semaphore, NAMED.acquire(ask(), "try").update, NOW) == semaphore
    assert NAMED.view(semaphore, NOW).foreign == "semaphore"


# -- how a caller sees a record --------------------------------------------------------------


def test_view() -> None:
    doc = held([waiter("tme"), waiter("w2")])
    view = DOC.view(doc, NOW, "tme")
    assert (view.held, view.mine, view.holder, view.head, view.queued) == (
        True, False, "holder", True, 2)
    assert view.time_left == 30.0 and view.ticket == "th" and not view.finished
    assert DOC.view(doc, NOW, "th").mine and DOC.view(doc, NOW, "th").fence == 3
    assert not DOC.view(doc, LATER, "th").mine  # expired
    assert not DOC.view(None, NOW).exists
    free = DOC.view({"_id": "x"}, NOW)
    assert free.exists and not free.held and free.time_left == 0.0


def test_describe_for_operators() -> None:
    owner = new_owner()
    row = DOC.describe(held(locked_by=owner), NOW)
    assert (row["state"], row["remaining"], row["fence"]) == ("held", 30.0, 3)
    assert (row["host"], row["pid"]) == parse_owner(owner)
    assert DOC.describe(held(locked_until=EARLIER), NOW)["state"] == "expired"
    released = apply(held(), DOC.release(Holding("holder", "th"), "r1"))
    assert DOC.describe(released, NOW)["state"] == "released"
    assert DOC.describe({"_id": "x"}, NOW)["state"] == "free"
    assert parse_owner("my-worker") is None and parse_owner(None) is None


_FORKED_TOKENS = """
import os
from mongoengine_lockable._rules import new_owner, new_ticket, parse_owner
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, f"{os.getpid()} {new_owner()} {new_ticket()}".encode())
    os._exit(0)
os.waitpid(pid, 0)
child_pid, child_owner, child_ticket = os.read(read, 4096).decode().split()
owner, ticket = new_owner(), new_ticket()
assert parse_owner(child_owner)[1] == int(child_pid) != os.getpid() == parse_owner(owner)[1]
assert child_owner.rsplit(":", 1)[1] != owner.rsplit(":", 1)[1], (child_owner, owner)
assert child_ticket != ticket and len(child_ticket) == len(ticket) == 24, (child_ticket, ticket)
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_draws_other_tokens_than_its_parent() -> None:
    # In a fresh interpreter (forking pytest's threads is not safe): the
    # child's first owner token and ticket are not its parent's next ones.
    done = subprocess.run([sys.executable, "-c", _FORKED_TOKENS], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_owner_tokens_and_tickets_are_fresh() -> None:
    owners = {new_owner() for _ in range(1000)}
    tickets = {new_ticket() for _ in range(1000)}
    assert len(owners) == len(tickets) == 1000
    assert all(parse_owner(owner) is not None for owner in owners)
    assert all(len(t) == 24 and int(t, 16) >= 0 for t in tickets)


def test_records_written_by_version_0_1_are_read_as_held_expired_or_released() -> None:
    """0.1 stored no grant token in a document: its lease is held or expired
    by its date, never "kept" (a named lock's minimum hold, which 0.1 named
    records, with their token, still show as before)."""
    old = {"_id": "x", "locked_until": LATER, "locked_by": "w-1", "lock_fence": 4}
    view = DOC.view(old, NOW)
    assert view.held and view.holder == "w-1" and not view.finished
    assert DOC.describe(old, NOW)["state"] == "held"
    assert DOC.describe({**old, "locked_until": EARLIER}, NOW)["state"] == "expired"
    assert DOC.describe({**old, "locked_until": None}, NOW)["state"] == "released"
    named = {"_id": "n", "locked_until": LATER, "owner": "w-1", "fence": 9, "token": "t0"}
    assert NAMED.describe(named, NOW)["state"] == "held"
    kept = {k: v for k, v in named.items() if k != "token"}
    assert NAMED.describe(kept, NOW)["state"] == "kept"
    assert NAMED.describe({**named, "locked_until": EARLIER}, NOW)["state"] == "expired"
    assert NAMED.describe({**kept, "locked_until": EARLIER}, NOW)["state"] == "released"


# -- differential: the real server and the evaluator ------------------------------------------


def _scenarios(now: datetime) -> list[rulecheck.Scenario]:
    live, dead = now + timedelta(minutes=1), now - timedelta(minutes=1)

    def w(ticket: str, a: datetime = live, ms: int = 60_000) -> dict[str, Any]:
        return {"t": ticket, "o": "o-" + ticket, "ms": ms, "a": a,
                "x": {"host": "h", "pid": 2}}

    def doc(until: Any, waiters: list[Any] = ()) -> dict[str, Any]:
        record = {"_id": "x", "payload": "p", "locked_until": until, "locked_by": "holder",
                  "lock_fence": 3, "lock_token": "th", "lock_stamp": "th"}
        if waiters:
            record["lock_waiters"] = list(waiters)
        return record

    def named(until: Any, waiters: list[Any] = (), acquired: datetime = dead) -> dict[str, Any]:
        record = {"_id": "x", "kind": "lock", "locked_until": until, "owner": "holder",
                  "fence": 5, "token": "th", "stamp": "th", "host": "h", "pid": 1,
                  "acquired_at": acquired}
        if waiters:
            record["waiters"] = list(waiters)
        return record

    me = Ask("me", "tme", 5000, {"host": "h", "pid": 3})
    hold = NamedKind(min_hold_ms=600_000)
    return [
        ("try: legacy document", {"_id": "x", "payload": "p"}, DOC.acquire(me, "try")),
        ("try: null fields", {"_id": "x", "locked_until": None, "lock_fence": None},
         DOC.acquire(me, "try")),
        ("try: held", doc(live), DOC.acquire(me, "try")),
        ("try: free, a live waiter", doc(None, [w("w1")]), DOC.acquire(me, "try")),
        ("try: free, a dead waiter", doc(dead, [w("w1", dead)]), DOC.acquire(me, "try")),
        ("force: held", doc(live, [w("w1")]), DOC.acquire(me, "force")),
        ("queue: held", doc(live, [w("w1")]), DOC.acquire(me, "queue")),
        ("queue: free, me first", doc(dead, [w("tme"), w("w2")]), DOC.acquire(me, "queue")),
        ("queue: free, another first", doc(dead, [w("w1")]), DOC.acquire(me, "queue")),
        ("release", doc(live), DOC.release(Holding("holder", "th"), "r1")),
        ("release: hand-off", doc(live, [w("w1"), w("w2")]),
         DOC.release(Holding("holder", "th"), "r2")),
        ("release: by owner", doc(live), DOC.release(Holding("holder"), "r3")),
        ("quiet release", doc(live), DOC.quiet_release(Holding("holder", "th"), "q1")),
        ("quiet release: a dead waiter", doc(live, [w("w1", dead)]),
         DOC.quiet_release(Holding("holder", "th"), "q2")),
        ("release: not mine", doc(live), DOC.release(Holding("holder", "nope"), "r4")),
        ("clear expired", doc(dead), DOC.clear_expired(Holding("holder", "th"), "r5")),
        ("renew", doc(live), DOC.renew(Holding("holder", "th"), 90_000)),
        ("leave", doc(dead, [w("tme"), w("w2")]), DOC.leave("tme")),
        ("force release", doc(live, [w("w1")]), DOC.force_release("r6", "th")),
        ("named: first grant", None, NAMED.acquire(me, "try")),
        ("named: expired", named(dead), NAMED.acquire(me, "try")),
        ("named: held", named(live), NAMED.acquire(me, "try")),
        ("named: release", named(live), NAMED.release(Holding("holder", "th"), "r7")),
        ("named: release, hand-off", named(live, [w("w1")]),
         NAMED.release(Holding("holder", "th"), "r8")),
        ("named: minimum hold", named(live, [w("w1")], acquired=now),
         hold.release(Holding("holder", "th"), "r9")),
        ("named: queue", named(live), NAMED.acquire(me, "queue")),
        ("named: quiet release", named(live), NAMED.quiet_release(Holding("holder", "th"), "q3")),
        ("named: quiet release, minimum hold", named(live, acquired=now),
         hold.quiet_release(Holding("holder", "th"), "q4")),
    ]


def test_rules_give_the_same_records_on_the_server_and_the_evaluator(lockable_real_db: Any) -> None:
    coll = lockable_real_db.database["rules_diff"]
    rulecheck.same_on_server(coll, _scenarios(rulecheck.server_clock(coll)))
