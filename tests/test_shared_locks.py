"""Shared locks: ``NamedSemaphore`` and ``ReadWriteLock``.

- Behaviour, on mongomock and the real server (``lockable_db``): admission up
  to the limit, release, renewal, expiry, fences, the kinds of a name refusing
  each other, waiting (hand-off in the release's write, first come first
  served, writer preference), signals, keepalive, threads, and bad arguments
  rejected before any I/O.
- One round trip each for acquire and release, counted on the wire.
- Processes on the real server: 8 processes x 50 acquisitions of a semaphore
  of limit 3, never more than 3 holders at once, every slot used; a killed
  holder's share comes back when its lease runs out; readers overlap, a
  writer overlaps nobody, and a writer gets in while readers keep arriving.

Overlaps are checked on intervals each process records with the machine's
monotonic clock (shared by its processes): from the return of ``acquire()``
to the call of ``release()``. Each lies inside the server's hold (granted
before the return, ended after the call, and leases far longer than a hold
never run out meanwhile), so an overlap of recorded intervals is an overlap
of holds: the check cannot fail while the semaphore keeps its limit.

The processes are ``semaphore_*`` and ``rw_cycle`` workers (``tests/workers.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
from bson import ObjectId

from mongoengine_lockable import (
    LockError,
    LockNotOwnedError,
    LockUnavailableError,
    NamedLock,
    NamedSemaphore,
    ReadWriteLock,
    signals,
)
from mongoengine_lockable._named import DEFAULT_COLLECTION

from _children import Children, assert_fences_follow_grants, max_overlap

# -- helpers ----------------------------------------------------------------------------


def test_max_overlap_counts_what_is_open_at_once() -> None:
    assert max_overlap([]) == 0
    assert max_overlap([(0, 1), (1, 2), (2, 3)]) == 1
    assert max_overlap([(0, 10), (1, 2), (1.5, 3), (2.5, 4)]) == 3
    assert max_overlap([(0, 5), (1, 2), (3, 4)]) == 2


def test_fence_check_catches_duplicates_and_late_fences() -> None:
    def hold(t_try: float, t_acq: float, fence: int) -> dict[str, Any]:
        return {"t_try": t_try, "t_acq": t_acq, "fence": fence}

    # Concurrent attempts may be granted in either order.
    assert_fences_follow_grants([hold(0, 2, 5), hold(1, 3, 4), hold(4, 5, 6)])
    with pytest.raises(AssertionError, match="not unique"):
        assert_fences_follow_grants([hold(0, 1, 5), hold(2, 3, 5)])
    with pytest.raises(AssertionError, match="not increasing"):
        assert_fences_follow_grants([hold(0, 1, 5), hold(2, 3, 4)])
    with pytest.raises(AssertionError, match="not increasing"):
        assert_fences_follow_grants([hold(0, 1, 9), hold(0.5, 5, 3), hold(2, 3, 7)])


def queued(name: str, count: int, timeout: float = 10.0) -> None:
    """Wait until ``count`` callers are queued for ``name``."""
    import mongoengine

    coll = mongoengine.get_db()[DEFAULT_COLLECTION]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = coll.find_one({"_id": name}) or {}
        if len(doc.get("waiters") or []) >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"{count} waiters expected on {name!r}: {doc}")


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``target`` in a thread; its result (or exception) lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(target())
        except BaseException as exc:  # reported by the test
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# -- semaphores: behaviour -----------------------------------------------------------------


def test_semaphore_admits_up_to_its_limit(lockable_db: Any) -> None:
    a, b, c = (NamedSemaphore("exports", 2, 30) for _ in range(3))
    assert not a.locked()
    assert a.acquire() and b.acquire()
    assert c.acquire() is False
    assert NamedSemaphore.holders("exports") == [a.owner, b.owner]
    assert a.locked() and c.locked()
    assert a.owned() and b.owned() and not c.owned()
    assert 0 < a.remaining() <= 30
    assert c.remaining() == 0.0
    assert a.fence is not None and b.fence is not None and a.fence < b.fence
    a.release()
    assert not a.owned() and a.remaining() == 0.0
    assert c.acquire()
    assert c.fence is not None and c.fence > b.fence
    assert NamedSemaphore.holders("exports") == [b.owner, c.owner]
    b.release()
    c.release()
    assert NamedSemaphore.holders("exports") == []
    assert not a.locked()
    assert repr(c).startswith("<NamedSemaphore 'exports' limit=2 owner=")


def test_semaphore_is_not_reentrant_and_release_needs_a_share(lockable_db: Any) -> None:
    sem = NamedSemaphore("one-each", 3, 30)
    with pytest.raises(LockNotOwnedError):
        sem.release()
    assert sem.acquire()
    first = sem.fence
    sem.release()
    with pytest.raises(LockNotOwnedError):
        sem.release()
    assert sem.acquire() and sem.fence is not None and first is not None and sem.fence > first
    sem.release()


def test_semaphore_with_block_and_unavailable(lockable_db: Any) -> None:
    holder = NamedSemaphore("with", 1, 30)
    with holder as entered:
        assert entered is holder and holder.owned()
        other = NamedSemaphore("with", 1, 30)
        with pytest.raises(LockUnavailableError) as info:
            with other:
                pass  # pragma: no cover
        assert info.value.owner == holder.owner
        assert "semaphore 'with'" in str(info.value)
    assert not holder.owned()
    assert NamedSemaphore.holders("with") == []


def test_renewal_extends_a_share_and_an_expired_one_is_not_revived(lockable_db: Any) -> None:
    sem = NamedSemaphore("renew", 2, 0.4)
    assert sem.acquire()
    fence = sem.fence
    sem.renew(5)
    assert sem.remaining() > 1.0 and sem.fence == fence
    time.sleep(0.5)
    assert sem.owned()
    short = NamedSemaphore("renew", 2, 0.2)
    assert short.acquire()
    time.sleep(0.35)
    assert not short.owned()
    with pytest.raises(LockNotOwnedError):
        short.renew()
    assert short.remaining() == 0.0
    assert NamedSemaphore.holders("renew") == [sem.owner]
    sem.release()


def test_an_expired_share_frees_its_slot(lockable_db: Any) -> None:
    first = NamedSemaphore("expiry", 1, 0.3)
    before = time.monotonic()  # the grant, and so its end, come later
    assert first.acquire()
    second = NamedSemaphore("expiry", 1, 5)
    assert second.acquire(wait=5)
    assert time.monotonic() - before >= 0.25
    assert NamedSemaphore.holders("expiry") == [second.owner]
    assert second.fence is not None and first.fence is not None and second.fence > first.fence
    with pytest.raises(LockNotOwnedError):
        first.release()
    second.release()


def test_an_idle_record_is_left_to_the_ttl_index(lockable_db: Any) -> None:
    """Released by everyone, the record's ``locked_until`` is the time of the
    last write: the collection's TTL index removes it after its grace period
    (while held, it is the latest holder's end, never in the past)."""
    coll = lockable_db.database[DEFAULT_COLLECTION]
    a, b = NamedSemaphore("ttl", 2, 30), NamedSemaphore("ttl", 2, 60)
    assert a.acquire() and b.acquire()
    held = coll.find_one({"_id": "ttl"})
    assert held["locked_until"] == max(h["u"] for h in held["holders"])
    a.release()
    b.release()
    idle = coll.find_one({"_id": "ttl"})
    assert idle["holders"] == []
    # The time of the release, not a holder's end: well before the 30 s lease's.
    assert idle["locked_until"] < min(h["u"] for h in held["holders"]) - timedelta(seconds=20)
    ttl = [i for i in coll.index_information().values() if "expireAfterSeconds" in i]
    assert [i["key"] for i in ttl] == [[("locked_until", 1)]]


def test_names_belong_to_one_kind_of_lock(lockable_db: Any) -> None:
    lock = NamedLock("kind-lock", 30)
    assert lock.acquire()
    with pytest.raises(LockError, match="is a lock record, not a semaphore"):
        NamedSemaphore("kind-lock", 2).acquire()
    with pytest.raises(LockError, match="is a lock record"):
        NamedSemaphore.holders("kind-lock")
    with pytest.raises(LockError, match="is a lock record"):
        ReadWriteLock("kind-lock").reader().acquire()
    sem = NamedSemaphore("kind-sem", 2, 30)
    assert sem.acquire()
    with pytest.raises(LockError, match="is a semaphore record, not a lock"):
        NamedLock("kind-sem").acquire()
    with pytest.raises(LockError, match="semaphore of limit 2 record, not a semaphore of limit 3"):
        NamedSemaphore("kind-sem", 3).acquire()
    with pytest.raises(LockError, match="is a semaphore record, not a read/write lock"):
        ReadWriteLock("kind-sem").writer().acquire(wait=1)
    # The refused callers wrote nothing: the holder is alone, the fence unchanged.
    assert NamedSemaphore.holders("kind-sem") == [sem.owner]
    assert NamedLock.owner_of("kind-lock") == lock.owner
    # Once nobody uses it, another limit takes the name over.
    sem.release()
    bigger = NamedSemaphore("kind-sem", 3)
    assert bigger.acquire()
    assert bigger.fence is not None and sem.fence is not None and bigger.fence > sem.fence
    bigger.release()


def test_a_release_hands_the_share_to_the_waiter_in_the_same_write(lockable_db: Any) -> None:
    holder = NamedSemaphore("handoff", 1, 30)
    waiter = NamedSemaphore("handoff", 1, 30)
    assert holder.acquire()
    thread, out = in_thread(lambda: waiter.acquire(wait=20))
    queued("handoff", 1)
    holder.release()
    # When release() returns, the waiter holds the share already.
    assert NamedSemaphore.holders("handoff") == [waiter.owner]
    thread.join(30)
    assert out == [True]
    assert waiter.owned()
    waiter.release()


def test_waiters_are_served_in_their_order(lockable_db: Any) -> None:
    holder = NamedSemaphore("fair", 1, 30)
    assert holder.acquire()
    order: list[int] = []
    waiters = [NamedSemaphore("fair", 1, 30) for _ in range(4)]
    threads = []

    def take(i: int) -> bool:
        got = waiters[i].acquire(wait=30)
        order.append(i)
        time.sleep(0.02)
        waiters[i].release()
        return got

    for i in range(len(waiters)):
        threads.append(in_thread(lambda i=i: take(i)))  # type: ignore[misc]
        queued("fair", i + 1)
    # A caller that does not wait is refused while others are queued.
    assert NamedSemaphore("fair", 1, 30).acquire() is False
    holder.release()
    for thread, out in threads:
        thread.join(30)
        assert out == [True]
    assert order == [0, 1, 2, 3]
    fences = [w.fence for w in waiters]
    assert fences == sorted(fences) and len(set(fences)) == 4


def test_a_waiter_that_gives_up_leaves_the_queue(lockable_db: Any) -> None:
    holder = NamedSemaphore("give-up", 1, 30)
    assert holder.acquire()
    assert NamedSemaphore("give-up", 1, 30).acquire(wait=0.3) is False
    holder.release()
    # Nobody is left queued: a caller that does not wait gets it.
    late = NamedSemaphore("give-up", 1, 30)
    assert late.acquire()
    late.release()


def test_semaphore_signals(lockable_db: Any) -> None:
    seen: list[tuple[str, Any, dict[str, Any]]] = []

    def record(name: str) -> Callable[..., None]:
        def handler(sender: Any, **kwargs: Any) -> None:
            seen.append((name, sender, kwargs))
        return handler

    handlers = {name: record(name) for name in
                ("lock_acquired", "lock_released", "lock_renewed", "lock_unavailable")}
    for name, handler in handlers.items():
        getattr(signals, name).connect(handler, weak=False)
    try:
        sem = NamedSemaphore("signals", 1, 30)
        assert sem.acquire()
        sem.renew()
        assert NamedSemaphore("signals", 1, 30).acquire() is False
        sem.release()
    finally:
        for name, handler in handlers.items():
            getattr(signals, name).disconnect(handler)
    names = [s[0] for s in seen]
    assert names == ["lock_acquired", "lock_renewed", "lock_unavailable", "lock_released"]
    acquired, renewed, unavailable, released = (s[2] for s in seen)
    assert seen[0][1] is sem and acquired["name"] == "signals"
    assert acquired["owner"] == sem.owner and acquired["fence"] == sem.fence
    assert renewed["fence"] == sem.fence
    assert unavailable["holder"] == sem.owner and unavailable["name"] == "signals"
    assert released["held_for"] >= 0 and released["fence"] == sem.fence


def test_keepalive_keeps_a_share(lockable_db: Any) -> None:
    sem = NamedSemaphore("keepalive", 2, 0.3, keepalive=True)
    assert sem.acquire()
    time.sleep(1.0)
    assert sem.owned()
    assert NamedSemaphore.holders("keepalive") == [sem.owner]
    sem.release()


@pytest.mark.timeout(120)
def test_threads_never_exceed_the_limit(lockable_db: Any) -> None:
    """Threads take a semaphore of limit 2 over and over (polling on
    mongomock, change streams on the server): never more than 2 inside."""
    threads_count, rounds, limit = 5, 8, 2
    inside = most = 0
    guard = threading.Lock()
    fences: list[int] = []
    barrier = threading.Barrier(threads_count)

    def work() -> None:
        nonlocal inside, most
        sem = NamedSemaphore("threads", limit, 30)
        barrier.wait(timeout=30)
        for _ in range(rounds):
            assert sem.acquire(wait=60) is True
            with guard:
                inside += 1
                most = max(most, inside)
                fences.append(sem.fence)  # type: ignore[arg-type]
            time.sleep(0.01)
            with guard:
                inside -= 1
            sem.release()

    started = [in_thread(work) for _ in range(threads_count)]
    for thread, out in started:
        thread.join(timeout=100)
        assert out == [None], out
    assert most == limit
    assert len(set(fences)) == threads_count * rounds


# -- read/write locks: behaviour ----------------------------------------------------------------


def test_readers_share_and_a_writer_is_alone(lockable_db: Any) -> None:
    rw = ReadWriteLock("catalog", 30)
    r1, r2, w = rw.reader(), rw.reader(), rw.writer()
    assert r1 is not rw.reader()
    assert r1.acquire() and r2.acquire()
    assert w.acquire() is False
    assert w.locked()
    r1.release()
    assert w.acquire() is False
    r2.release()
    assert w.acquire()
    assert rw.reader().acquire() is False
    assert rw.writer().acquire() is False
    w.release()
    assert r1.acquire()
    r1.release()
    assert repr(w).startswith("<ReadWriteHolder 'catalog' write owner=")


def test_a_waiting_writer_keeps_new_readers_out(lockable_db: Any) -> None:
    rw = ReadWriteLock("preference", 30)
    r1, r2 = rw.reader(), rw.reader()
    assert r1.acquire() and r2.acquire()
    writer = rw.writer()
    thread, out = in_thread(lambda: writer.acquire(wait=20))
    queued("preference", 1)
    late = rw.reader()
    assert late.acquire() is False
    assert late.acquire(wait=0.3) is False  # queued behind the writer, gave up
    late_waiter = rw.reader()
    reader_thread, reader_out = in_thread(lambda: late_waiter.acquire(wait=20))
    queued("preference", 2)
    r1.release()
    assert not writer.owned()
    r2.release()  # the last reader: the writer gets in, the late reader does not
    thread.join(30)
    assert out == [True] and writer.owned()
    assert not late_waiter.owned()
    writer.release()  # now the queued reader gets in
    reader_thread.join(30)
    assert reader_out == [True] and late_waiter.owned()
    assert writer.fence is not None and late_waiter.fence is not None
    assert late_waiter.fence > writer.fence
    late_waiter.release()


# -- arguments ------------------------------------------------------------------------------------

BAD_SEMAPHORES: list[tuple[dict[str, Any], type[Exception]]] = [
    ({"limit": True}, TypeError),
    ({"limit": 1.0}, TypeError),
    ({"limit": "3"}, TypeError),
    ({"limit": None}, TypeError),
    ({"limit": 0}, ValueError),
    ({"limit": -2}, ValueError),
    ({"limit": 2**63}, ValueError),
    ({"name": ""}, ValueError),
    ({"name": 7}, TypeError),
    ({"duration": 0}, ValueError),
    ({"duration": True}, TypeError),
    ({"duration": float("nan")}, ValueError),
    ({"owner": ""}, ValueError),
    ({"wait": -1}, ValueError),
    ({"keepalive": 1}, TypeError),
    ({"alias": ""}, ValueError),
    ({"collection": "a$b"}, ValueError),
    ({"write_concern": "majority"}, TypeError),
]


def _semaphore(**changes: Any) -> NamedSemaphore:
    args: dict[str, Any] = {"name": "args", "limit": 2, "duration": 5, **changes}
    return NamedSemaphore(args.pop("name"), args.pop("limit"), **args)


def test_bad_arguments_are_rejected_before_any_io(lockable_db: Any) -> None:
    db = lockable_db.database
    for changes, error in BAD_SEMAPHORES:
        with pytest.raises(error):
            _semaphore(**changes)
    for bad in ({"duration": 0}, {"wait": True}, {"keepalive": None}, {"collection": ""},
                {"name": None}):
        with pytest.raises((TypeError, ValueError)):
            ReadWriteLock(**{"name": "args", **bad})
    rw = ReadWriteLock("args")
    with pytest.raises(ValueError):
        rw.reader(owner="")
    with pytest.raises(TypeError):
        rw.writer(owner=3)  # type: ignore[arg-type]
    sem = _semaphore()
    with pytest.raises(ValueError):
        sem.acquire(wait=-1)
    with pytest.raises(TypeError):
        sem.acquire(wait="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sem.renew(0)
    with pytest.raises(TypeError):
        NamedSemaphore.holders(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        NamedSemaphore.holders("x", collection="system.x")
    # Nothing was written: no collection, no index.
    assert db.list_collection_names() == []


def test_acquire_and_release_are_one_find_and_modify_each(lockable_real_db: Any) -> None:
    from models import recorded_alias

    with recorded_alias(lockable_real_db.uri, lockable_real_db.db_name, "shared-rec") as rec:
        warm = NamedSemaphore("trips", 2, 30, alias="shared-rec")
        assert warm.acquire()  # creates the collection and its TTL index
        sem = NamedSemaphore("trips", 2, 30, alias="shared-rec")
        rec.clear()
        assert sem.acquire()
        assert rec.names == ["findAndModify"], rec.commands
        assert rec.commands[0]["writeConcern"] == {"w": "majority"}
        rec.clear()
        sem.release()
        assert rec.names == ["findAndModify"], rec.commands
        warm.release()
        rec.clear()
        writer = ReadWriteLock("trips-rw", alias="shared-rec").writer()
        assert writer.acquire()
        writer.release()
        assert rec.names == ["findAndModify", "findAndModify"], rec.commands


# -- processes ---------------------------------------------------------------------------------


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Children]:
    with Children(tmp_path) as children:
        yield children


def _base(db: Any) -> dict[str, Any]:
    return {"uri": db.uri, "db": db.db_name, "name": f"shared-{ObjectId()}"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_processes_never_exceed_the_limit_and_use_every_slot(
    lockable_real_db: Any, spawn: Children
) -> None:
    procs, rounds, limit = 8, 50, 3
    # Leases far longer than any hold: a recorded hold never outlives its lease.
    args = {**_base(lockable_real_db), "limit": limit, "duration": 60, "wait": 120,
            "rounds": rounds, "hold": [0.005, 0.03]}
    children = [spawn("semaphore_cycle", **args) for _ in range(procs)]
    for child in children:
        child.expect("READY")
    started = time.monotonic()
    for child in children:
        child.go()
    results = [child.expect("DONE", timeout=240)["holds"] for child in children]
    elapsed = time.monotonic() - started
    holds = [h for r in results for h in r]
    assert all(h["got"] for h in holds), [h for h in holds if not h["got"]][:3]
    assert len(holds) == procs * rounds
    most = max_overlap([(h["t_acq"], h["t_rel"]) for h in holds])
    print(f"{len(holds)} holds in {elapsed:.1f} s; most at once: {most}")
    assert most <= limit
    assert most == limit, "the slots were never all used at once"
    assert_fences_follow_grants(holds)
    for r in results:  # each process's fences grow
        fences = [h["fence"] for h in r]
        assert fences == sorted(fences)


@pytest.mark.timeout(120)
def test_a_killed_holders_share_comes_back_after_its_lease(
    lockable_real_db: Any, spawn: Children
) -> None:
    base = {**_base(lockable_real_db), "limit": 2}
    keeper = spawn("semaphore_holder", duration=30, **base)
    doomed = spawn("semaphore_holder", duration=1, **base)
    waiter = spawn("semaphore_waiter", duration=30, wait=15, **base)
    kept = keeper.expect("HOLDING")
    held = doomed.expect("HOLDING")
    assert kept["taken"] is True and held["taken"] is True
    waiter.expect("READY")
    waiter.go()
    doomed.kill()  # SIGKILL: no release, nothing written
    result = waiter.expect("RESULT", timeout=60)
    assert result["taken"] is True
    # Not before the killed holder's 1 s lease ran out, and not long after.
    assert result["ended"] > held["before"] + 1.0
    print(f"share back {result['ended'] - held['before'] - 1.0:.3f} s after the lease ran out")
    assert result["ended"] < held["before"] + 1.0 + 3.0
    assert result["holders"] == [kept["owner"], result["owner"]]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_reader_and_writer_processes(lockable_real_db: Any, spawn: Children,
                                     tmp_path: Path) -> None:
    stop = tmp_path / "stop"
    base = {**_base(lockable_real_db), "duration": 60, "stop": str(stop)}
    readers = [spawn("rw_cycle", mode="read", wait=60, hold=[0.05, 0.15], **base) for _ in range(3)]
    writer = spawn("rw_cycle", mode="write", wait=30, hold=[0.05, 0.1], rounds=4, pause=0.3,
                   delay=0.7, **base)
    everyone = [*readers, writer]
    for child in everyone:
        child.expect("READY")
    for child in everyone:
        child.go()
    writes = writer.expect("DONE", timeout=200)["holds"]
    stop.touch()
    reads = [h for r in readers for h in r.expect("DONE", timeout=60)["holds"]]
    # The writer got in every time although readers kept arriving.
    assert len(writes) == 4 and all(w["got"] for w in writes), writes
    assert all(r["got"] for r in reads)
    waited = [w["t_acq"] - w["t_try"] for w in writes]
    print(f"{len(reads)} reads; the writer waited {', '.join(f'{s:.2f}' for s in waited)} s")
    # Readers kept arriving: some read was attempted while the writer waited.
    assert any(w["t_try"] < r["t_try"] < w["t_acq"] for w in writes for r in reads)
    reader_spans = [(r["t_acq"], r["t_rel"]) for r in reads]
    assert max_overlap(reader_spans) >= 2, "readers never overlapped"
    for w in writes:
        overlapping = [r for r in reads if r["t_acq"] < w["t_rel"] and w["t_acq"] < r["t_rel"]]
        assert not overlapping, (w, overlapping[:3])
    assert_fences_follow_grants([*reads, *writes])

