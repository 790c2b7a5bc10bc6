"""Claims for workers: ``claim(wait=, keepalive=, max_attempts=)``,
``claim_many``, ``held_by``, ``expired``, ``exhausted``, ``release_all``.

First with processes on the real server: four processes drain 2,000 documents
with ``claim_many(10)``, each handled exactly once; a waiting ``claim()``
returns the document another process inserts while it waits; a keepalive
keeps a claimed 1 s lease through 3 s of work while another process tries to
claim it. Then the readings of API.md on both backends (mongomock and the real
server), and bad arguments rejected before any database call, with nothing
written.

The processes are ``claim_*`` workers (``tests/workers.py``).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import mongoengine
import mongomock
import pytest
from pymongo import monitoring

from mongoengine_lockable import LockNotOwnedError

from _children import Child, Children
from models import CLAIM_ARGS_ALIAS, ArgTask, ClaimTask
from workers import CLAIMS_DRAIN_TIMEOUT, CLAIMS_HANDLED

#: Hang guard: a worker's start, on a loaded machine (the whole drain's is
#: CLAIMS_DRAIN_TIMEOUT).
START_TIMEOUT = 60.0


def raw_tasks() -> Any:
    return ClaimTask._get_collection()


def stored(doc: Any) -> dict[str, Any]:
    found: dict[str, Any] = raw_tasks().find_one({"_id": doc.pk})
    return found


# -- processes on the real server ------------------------------------------------------


@pytest.fixture
def spawn(lockable_real_db: Any, tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """Start ``claim_*`` workers, connected to the test's database."""
    db = lockable_real_db
    with Children(tmp_path) as children:
        yield lambda command, **args: children(command, uri=db.uri, db=db.db_name, **args)


@pytest.mark.slow
def test_four_processes_drain_2000_documents_with_claim_many_each_once(
    lockable_real_db: Any, spawn: Callable[..., Child]
) -> None:
    total = 2000
    ClaimTask.objects.insert([ClaimTask(n=n) for n in range(total)], load_bulk=False)
    workers = [spawn("claim_drain_many", worker=f"w{i}", size=10) for i in range(4)]
    for worker in workers:
        worker.expect("READY", timeout=START_TIMEOUT)
    started = time.monotonic()
    for worker in workers:
        worker.go()
    results = {}
    for worker in workers:
        left = CLAIMS_DRAIN_TIMEOUT - (time.monotonic() - started)
        results[worker.args["worker"]] = worker.expect("DONE", timeout=max(left, 1.0))
    elapsed = time.monotonic() - started
    print(f"drained {total} in {elapsed:.1f} s: {results}")

    handled = list(lockable_real_db.database[CLAIMS_HANDLED].find())
    per_task = Counter(h["task"] for h in handled)
    assert [task for task, times in per_task.items() if times > 1] == []
    assert len(per_task) == total
    assert sum(r["handled"] for r in results.values()) == total
    docs = list(raw_tasks().find())
    assert {d["status"] for d in docs} == {"done"}
    assert {d["lock_fence"] for d in docs} == {1}  # each granted once
    assert {d["locked_until"] for d in docs} == {None}
    # Marked by the worker that recorded the handling.
    by = {h["task"]: h["worker"] for h in handled}
    assert all(d["handled_by"] == by[d["_id"]] for d in docs)
    # Batches: far fewer claim rounds than documents.
    assert sum(r["rounds"] for r in results.values()) < total / 5


def test_a_waiting_claim_returns_the_document_another_process_inserts(
    lockable_real_db: Any, spawn: Callable[..., Child]
) -> None:
    waiter = spawn("claim_wait", wait=60)
    waiter.expect("WAITING", timeout=START_TIMEOUT)
    time.sleep(0.5)  # let it settle into its wait
    # A document outside the queryset's filter does not end the wait...
    ClaimTask(n=1, status="done").save()
    time.sleep(0.2)
    assert waiter.poll_line() is None
    # ...a matching one does.
    inserted = time.time()
    ClaimTask(n=2).save()
    got = waiter.expect("CLAIMED", timeout=60)
    assert got["n"] == 2
    assert got["fence"] == 1
    # The claim began before the insert and returned after it: it waited.
    assert got["returned"] - got["waited"] < inserted < got["returned"]
    # Woken by the insert, not by a poll or the 5 s bound of a pause.
    assert got["returned"] - inserted < 3.0, got


@pytest.mark.slow
def test_keepalive_keeps_a_claimed_1s_lease_through_3s_of_work(
    lockable_real_db: Any, spawn: Callable[..., Child]
) -> None:
    task = ClaimTask(n=1).save()
    worker = spawn("claim_keepalive", work=3.0)
    holder = worker.expect("CLAIMED", timeout=START_TIMEOUT)
    assert holder["fence"] == 1
    untils = set()
    # This process keeps trying to claim it while the worker works.
    while (line := worker.poll_line(0.1)) is None:
        got = ClaimTask.objects(status="pending").claim(1)
        assert got is None, "the lease expired while its holder was working"
        doc = stored(task)
        if doc["status"] == "pending":
            assert doc["locked_by"] == holder["owner"]
            untils.add(doc["locked_until"])
    assert line.startswith("DONE"), line
    # Its local deadline was extended by each renewal too.
    assert json.loads(line.partition(" ")[2])["remaining"] > 0, line
    assert worker.join(30) == 0
    doc = stored(task)
    assert doc["status"] == "done"
    assert doc["lock_fence"] == 1  # never granted to anyone else
    assert doc["locked_until"] is None
    # The lease was renewed: its end moved on, past the first second.
    assert len(untils) >= 2, untils
    assert (max(untils) - min(untils)).total_seconds() >= 1.0, untils



# -- the readings, on both backends ------------------------------------------------------


def make(count: int, **fields: Any) -> list[ClaimTask]:
    return [ClaimTask(n=n, **fields).save() for n in range(count)]


def insert_before_the_mixin(n: int) -> Any:
    """A document as stored before ``LockableMixin`` was added: no lease field."""
    return raw_tasks().insert_one({"n": n, "status": "pending"}).inserted_id


def grant_and_release(doc: ClaimTask, times: int) -> None:
    for _ in range(times):
        assert doc.lock(30)
        doc.release()


def pks(queryset: Any) -> set[Any]:
    return {doc.pk for doc in queryset}


def test_max_attempts_counts_the_grants_so_far(lockable_db: Any) -> None:
    (doc,) = make(1)
    pending = ClaimTask.objects(status="pending")
    for attempt in (1, 2):
        got = pending.claim(30, max_attempts=2)
        assert got is not None and got.pk == doc.pk
        assert got.lock_fence == attempt
        got.release()
    # Granted twice: not claimed with max_attempts=2, by either kind of claim.
    assert pending.claim(30, max_attempts=2) is None
    assert pending.claim_many(5, 30, max_attempts=2) == []
    assert stored(doc)["locked_until"] is None  # nothing was granted
    # A higher limit, or none, still claims it.
    got = pending.claim(30, max_attempts=3)
    assert got is not None and got.lock_fence == 3
    got.release()
    assert pending.claim(30) is not None


def test_claim_many_skips_documents_that_used_up_their_attempts(lockable_db: Any) -> None:
    docs = make(4)
    grant_and_release(docs[1], 1)
    grant_and_release(docs[3], 2)
    got = ClaimTask.objects(status="pending").order_by("n").claim_many(10, 30, max_attempts=1)
    assert [d.n for d in got] == [0, 2]
    assert [d.lock_fence for d in got] == [1, 1]
    got = ClaimTask.objects(status="pending").order_by("n").claim_many(10, 30, max_attempts=2)
    assert [d.n for d in got] == [1]  # 0 and 2 are held now; 3 used its two


def test_a_document_stored_before_the_mixin_has_had_no_grant(lockable_db: Any) -> None:
    pk = insert_before_the_mixin(7)
    assert pks(ClaimTask.objects.exhausted(1)) == set()
    assert pks(ClaimTask.objects.expired()) == set()
    assert pks(ClaimTask.objects.unlocked()) == {pk}
    got = ClaimTask.objects(status="pending").claim(30, max_attempts=1)
    assert got is not None and got.pk == pk and got.lock_fence == 1
    got.release()
    # Granted once now.
    assert pks(ClaimTask.objects.exhausted(1)) == {pk}
    assert ClaimTask.objects(status="pending").claim(30, max_attempts=1) is None


def test_claim_many_takes_documents_stored_before_the_mixin(lockable_db: Any) -> None:
    before = {insert_before_the_mixin(n) for n in range(3)}
    got = ClaimTask.objects(status="pending").claim_many(10, 30, max_attempts=1, owner="w")
    assert {d.pk for d in got} == before
    assert {d.lock_fence for d in got} == {1}
    assert pks(ClaimTask.objects.held_by("w")) == before


def test_held_by_lists_the_unexpired_leases_of_one_owner(lockable_db: Any) -> None:
    mine, theirs, released, expiring, _never = make(5)
    assert mine.lock(30, owner="me")
    assert theirs.lock(30, owner="them")
    assert released.lock(30, owner="me")
    released.release()
    assert expiring.lock(0.2, owner="me")
    assert pks(ClaimTask.objects.held_by("me")) == {mine.pk, expiring.pk}
    time.sleep(0.4)
    assert pks(ClaimTask.objects.held_by("me")) == {mine.pk}
    assert pks(ClaimTask.objects.held_by("them")) == {theirs.pk}
    assert pks(ClaimTask.objects.held_by("nobody")) == set()
    # It narrows the queryset it is chained to, and chains on.
    assert pks(ClaimTask.objects(n=theirs.n).held_by("me")) == set()
    assert ClaimTask.objects.held_by("me").filter(n=mine.n).count() == 1


def test_expired_means_set_passed_and_not_released(lockable_db: Any) -> None:
    held, released, ran_out, retaken, never = make(5)
    before = insert_before_the_mixin(99)
    assert held.lock(30)
    assert released.lock(30)
    released.release()
    assert ran_out.lock(0.2, owner="gone")
    assert retaken.lock(0.2)
    time.sleep(0.4)
    assert ClaimTask.objects.get(pk=retaken.pk).lock(30)  # taken again after it ran out
    assert pks(ClaimTask.objects.expired()) == {ran_out.pk}
    # The owner's late release clears it (and raises: the lease was not held).
    with pytest.raises(LockNotOwnedError):
        ran_out.release()
    assert pks(ClaimTask.objects.expired()) == set()
    assert before not in pks(ClaimTask.objects.expired())
    assert never.pk not in pks(ClaimTask.objects.expired())


def test_exhausted_finds_documents_granted_max_attempts_times_or_more(lockable_db: Any) -> None:
    zero, one, two, three = make(4)
    grant_and_release(one, 1)
    grant_and_release(two, 2)
    grant_and_release(three, 3)
    assert pks(ClaimTask.objects.exhausted(1)) == {one.pk, two.pk, three.pk}
    assert pks(ClaimTask.objects.exhausted(2)) == {two.pk, three.pk}
    assert pks(ClaimTask.objects.exhausted(4)) == set()
    # Held or not: the count of grants is what counts.
    assert zero.lock(30)
    assert pks(ClaimTask.objects.exhausted(1)) == {zero.pk, one.pk, two.pk, three.pk}
    assert pks(ClaimTask.objects(n__gte=2).exhausted(2)) == {two.pk, three.pk}


def test_release_all_releases_the_unexpired_leases_of_one_owner(lockable_db: Any) -> None:
    docs = make(6)
    batch = ClaimTask.objects(n__lt=3).order_by("n").claim_many(10, 30, owner="w1")
    assert [d.n for d in batch] == [0, 1, 2]
    assert docs[3].lock(30, owner="w2")
    assert docs[4].lock(30, owner="w1")
    assert docs[5].lock(0.2, owner="w1")
    time.sleep(0.4)
    # Only among the queryset's matches.
    assert ClaimTask.objects(n__lt=3).release_all("w1") == 3
    assert pks(ClaimTask.objects.held_by("w1")) == {docs[4].pk}
    # The expired lease is not counted; another owner's lease is kept.
    assert ClaimTask.objects.release_all("w1") == 1
    assert pks(ClaimTask.objects.held_by("w2")) == {docs[3].pk}
    assert ClaimTask.objects.release_all("w1") == 0
    assert ClaimTask.objects.release_all("nobody") == 0
    # Released documents are claimable at once, their fences kept.
    for doc in batch:
        assert stored(doc)["locked_until"] is None
        assert stored(doc)["lock_fence"] == 1
    again = ClaimTask.objects(n__lt=3).claim_many(10, 30, owner="w3")
    assert len(again) == 3 and {d.lock_fence for d in again} == {2}
    # The instances of the first batch no longer hold their leases.
    with pytest.raises(LockNotOwnedError):
        batch[0].update_if_held(set__status="done")


# -- bad arguments: rejected before any database call, nothing written ------------------


class Commands(monitoring.CommandListener):
    """The commands a client sends, minus its own housekeeping."""

    HOUSEKEEPING = frozenset({"hello", "ismaster", "isMaster", "endSessions", "ping"})

    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name not in self.HOUSEKEEPING:
            self.names.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


#: mongomock collection methods that no argument check may reach.
MOCK_METHODS = (
    "find", "find_one", "find_one_and_update", "find_one_and_replace", "find_one_and_delete",
    "update_one", "update_many", "replace_one", "insert_one", "insert_many", "delete_one",
    "delete_many", "aggregate", "count_documents", "create_index", "create_indexes",
    "bulk_write", "distinct", "drop",
)


@pytest.fixture(params=[pytest.param("mongomock"),
                        pytest.param("mongod", marks=pytest.mark.mongod)])
def silent_db(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
              ) -> Iterator[Callable[[], Any]]:
    """:class:`ArgTask` connected to a new database; yields ``nothing_sent``,
    a context manager failing the test if its block calls the database (on the
    real server: a command listener; on mongomock: collection methods that
    refuse to run)."""
    db_name = f"lockable_claim_args_{os.urandom(6).hex()}"
    commands = Commands()
    if request.param == "mongomock":
        mongoengine.connect(db=db_name, alias=CLAIM_ARGS_ALIAS, host="mongodb://localhost",
                            mongo_client_class=mongomock.MongoClient, uuidRepresentation="standard")
    else:
        uri = request.getfixturevalue("lockable_mongod_uri")
        mongoengine.connect(db=db_name, alias=CLAIM_ARGS_ALIAS, host=uri,
                            event_listeners=[commands], uuidRepresentation="standard")

    @contextmanager
    def nothing_sent() -> Iterator[None]:
        commands.names.clear()
        refused: list[str] = []

        def refuse(name: str) -> Callable[..., Any]:
            def method(*args: Any, **kwargs: Any) -> Any:
                refused.append(name)
                raise AssertionError(f"database call during argument checks: {name}")
            return method

        with monkeypatch.context() as patch:
            if request.param == "mongomock":
                for name in MOCK_METHODS:
                    patch.setattr(mongomock.collection.Collection, name, refuse(name))
            yield
        assert refused == []
        assert commands.names == []

    try:
        ArgTask.ensure_indexes()
        yield nothing_sent
    finally:
        mongoengine.get_connection(CLAIM_ARGS_ALIAS).drop_database(db_name)
        mongoengine.disconnect(CLAIM_ARGS_ALIAS)


def _pending() -> Any:
    return ArgTask.objects(status="pending")


BAD_COUNTS = [
    ("True", True, TypeError), ("False", False, TypeError), ("float", 2.0, TypeError),
    ("str", "2", TypeError), ("zero", 0, ValueError), ("minus-one", -1, ValueError),
]
BAD_OWNERS = [
    ("empty", "", ValueError), ("None", None, TypeError), ("int", 5, TypeError),
    ("bytes", b"w1", TypeError), ("too-long", "w" * 1001, ValueError),
    ("lone-surrogate", "w\ud800", ValueError),
]
CALLS: dict[str, Callable[[Any], Any]] = {
    "claim_many-n": lambda v: _pending().claim_many(v, 30),
    "claim_many-max_attempts": lambda v: _pending().claim_many(2, 30, max_attempts=v),
    "claim-max_attempts": lambda v: _pending().claim(30, max_attempts=v),
    "exhausted-max_attempts": lambda v: _pending().exhausted(v),
    "held_by-owner": lambda v: _pending().held_by(v),
    "release_all-owner": lambda v: _pending().release_all(v),
    "claim_many-owner": lambda v: _pending().claim_many(2, 30, owner=v),
}


def _cases() -> Iterator[Any]:
    for call, func in CALLS.items():
        table = BAD_OWNERS if call.endswith("owner") else BAD_COUNTS
        if call.startswith("claim_many-owner"):
            table = [case for case in BAD_OWNERS if case[1] is not None]  # None: a new owner
        for label, value, exc in table:
            yield pytest.param(func, value, exc, id=f"{call}={label}")
    # None is no count (for claim's max_attempts, it means "no limit").
    yield pytest.param(CALLS["claim_many-n"], None, TypeError, id="claim_many-n=None")
    yield pytest.param(CALLS["exhausted-max_attempts"], None, TypeError,
                       id="exhausted-max_attempts=None")
    for label, value, exc in [("str", "yes", TypeError), ("int", 1, TypeError),
                              ("None", None, TypeError)]:
        yield pytest.param(lambda v: _pending().claim(30, keepalive=v), value, exc,
                           id=f"claim-keepalive={label}")
    yield pytest.param(lambda v: _pending().claim(30, wait=v), -1, ValueError,
                       id="claim-wait=minus-one")
    yield pytest.param(lambda v: _pending().claim_many(2, v), 0, ValueError,
                       id="claim_many-duration=zero")


@pytest.mark.parametrize(("call", "value", "exc"), list(_cases()))
def test_bad_arguments_are_rejected_before_any_database_call(
    silent_db: Callable[[], Any], call: Callable[[Any], Any], value: Any, exc: type
) -> None:
    held = ArgTask(n=1).save()
    assert held.lock(30, owner="w1")
    free = ArgTask(n=2).save()
    database = mongoengine.get_db(CLAIM_ARGS_ALIAS)
    before = list(database["claim_arg_tasks"].find())
    names = database.list_collection_names()
    with silent_db():
        with pytest.raises(exc) as info:
            call(value)
    assert type(info.value) is exc
    assert list(database["claim_arg_tasks"].find()) == before
    assert database.list_collection_names() == names
    assert free.pk is not None


def test_the_silence_check_can_fail(silent_db: Callable[[], Any]) -> None:
    ArgTask(n=1).save()
    with pytest.raises(AssertionError):
        with silent_db():
            _pending().claim_many(2, 30)



# -- windows and limits -------------------------------------------------------------------


def test_release_all_on_a_sliced_queryset_releases_only_its_window(lockable_db: Any) -> None:
    make(5)
    assert len(ClaimTask.objects.order_by("n").claim_many(5, 30, owner="w")) == 5
    assert ClaimTask.objects.order_by("n")[:2].release_all("w") == 2
    assert sorted(d.n for d in ClaimTask.objects.held_by("w")) == [2, 3, 4]
    assert ClaimTask.objects.order_by("n")[3:].release_all("w") == 2
    assert sorted(d.n for d in ClaimTask.objects.held_by("w")) == [2]


@pytest.mark.parametrize("call", [
    pytest.param(lambda: ClaimTask.objects.claim_many(2**63, 30), id="claim_many-n"),
    pytest.param(lambda: ClaimTask.objects.claim(30, max_attempts=2**63), id="claim-max_attempts"),
    pytest.param(lambda: ClaimTask.objects.exhausted(2**63).count(), id="exhausted"),
])
def test_a_count_too_large_to_store_is_a_value_error(lockable_db: Any,
                                                     call: Callable[[], Any]) -> None:
    (doc,) = make(1)
    before = stored(doc)
    with pytest.raises(ValueError, match="too large to store"):
        call()
    assert stored(doc) == before

