"""Leases under real concurrency: separate processes against a real ``mongod``,
and threads on mongomock.

The workers are separate interpreters running the ``proc_*`` commands of
``tests/workers.py`` (the protocol: ``tests/_children.py``). Every worker
started by a test is killed and reaped when the test ends, however it ends; a
worker that fails makes the test fail with its exit status and the tail of its
stderr.

Nothing here asserts an upper bound on a duration: timings are printed (run
with ``-s``) for the record, and the only time limits are generous timeouts
that turn a hang into a failure.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
from bson import ObjectId

from _children import Child, Children
from models import ProcCounter, ProcTask
from workers import COUNTER_LEASE, HANDLED_COLLECTION, pause

#: Seconds a worker gets to start and connect, and all workers of a test to
#: finish their work: hang guards, far above the durations measured (printed
#: with ``-s``), since a machine shared with other loads can be several times
#: slower.
START_TIMEOUT = 60.0
JOIN_TIMEOUT = 240.0

PROCESSES = 8
ITERATIONS = 200
TOTAL = PROCESSES * ITERATIONS

#: Upper bound of the random pause between read and write of the unguarded
#: read-modify-write: wide enough that concurrent increments certainly overlap.
RACE_PAUSE = 0.002

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="POSIX only: select() on pipes and SIGKILL"
)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """Start ``proc_*`` workers, ``spawn(name, command, **args)``; the
    result of each is the JSON file it writes (``out``: ``tmp_path/NAME.json``),
    read by :func:`result_of`. Every one is killed and reaped when the test ends."""
    with Children(tmp_path) as children:

        def start(name: str, command: str, **args: Any) -> Child:
            out = str(tmp_path / f"{name}.json")
            return children.start(command, {**args, "out": out}, name=name)

        yield start


def result_of(
    worker: Child, deadline: float | None = None, progress: Callable[[], str] | None = None
) -> dict[str, Any]:
    """Wait for the worker's successful exit (until the monotonic ``deadline``,
    default :data:`JOIN_TIMEOUT` from now) and return its JSON result.

    :param progress: tells how far the work got, for the timeout message.
    """
    if deadline is None:
        deadline = time.monotonic() + JOIN_TIMEOUT
    if worker.join(deadline - time.monotonic(), progress) != 0:
        pytest.fail(f"failed: {worker.describe()}", pytrace=False)
    out: dict[str, Any] = json.loads(Path(worker.args["out"]).read_text())
    return out


def start_together(workers: list[Child]) -> float:
    """Wait until every worker is connected, then let them all go at once.

    :return: the monotonic time of the start.
    """
    for worker in workers:
        worker.expect("READY")
    started = time.monotonic()
    for worker in workers:
        worker.go()
    return started


def join_all(
    workers: list[Child], progress: Callable[[], str] | None = None
) -> list[dict[str, Any]]:
    """Every worker's result; all of them share one :data:`JOIN_TIMEOUT`."""
    deadline = time.monotonic() + JOIN_TIMEOUT
    return [result_of(worker, deadline, progress) for worker in workers]


def assert_fences_consecutive(fences: list[int], total: int) -> None:
    assert len(fences) == total
    duplicates = [fence for fence, seen in Counter(fences).items() if seen > 1]
    assert not duplicates, f"fences granted twice: {duplicates[:20]}"
    assert max(fences) - min(fences) + 1 == total, (min(fences), max(fences))
    # A fresh document starts at fence 0; the first grant is 1.
    assert sorted(fences) == list(range(1, total + 1))


def run_counter_workers(
    spawn: Callable[..., Child], db: Any, *, locked: bool, pause: float
) -> tuple[ProcCounter, list[list[int]], float]:
    counter = ProcCounter(value=0).save()
    workers = [
        spawn(
            f"counter-{i}",
            "proc_counter",
            uri=db.uri,
            db=db.db_name,
            counter_id=str(counter.pk),
            iterations=ITERATIONS,
            locked=locked,
            pause=pause,
        )
        for i in range(PROCESSES)
    ]
    started = start_together(workers)
    results = join_all(workers, lambda: f"counter at {counter.reload().value} of {TOTAL}")
    elapsed = time.monotonic() - started
    counter.reload()
    return counter, [result["fences"] for result in results], elapsed


# -- 1. one document, many processes -------------------------------------------


@pytest.mark.slow  # 40 to 170 s measured on 2 (shared) cores
@pytest.mark.timeout(600)  # above JOIN_TIMEOUT
def test_processes_serialise_read_modify_write(lockable_real_db: Any, spawn: Any) -> None:
    """8 processes x 200 leases on one document: the unguarded
    read-modify-write inside each lease never loses an increment, and every
    lease has its own fence, consecutive from 1."""
    counter, fences, elapsed = run_counter_workers(
        spawn, lockable_real_db, locked=True, pause=RACE_PAUSE
    )
    print(
        f"\n{PROCESSES} processes x {ITERATIONS} leases: {elapsed:.2f} s "
        f"({TOTAL / elapsed:.0f} lock/increment/release cycles per s)"
    )
    assert counter.value == TOTAL
    assert_fences_consecutive([fence for per_worker in fences for fence in per_worker], TOTAL)
    for per_worker in fences:
        # Each worker's own leases come one after another.
        assert per_worker == sorted(per_worker)
    assert counter.locked_until is None  # the last lease was released
    assert counter.lock_fence == TOTAL


def test_processes_without_lease_lose_updates(lockable_real_db: Any, spawn: Any) -> None:
    """The control: the same workers doing the same read-modify-write without
    the lease lose increments, so the test above can fail."""
    counter, fences, elapsed = run_counter_workers(
        spawn, lockable_real_db, locked=False, pause=RACE_PAUSE
    )
    print(f"\nwithout the lease: {counter.value} of {TOTAL} increments kept ({elapsed:.2f} s)")
    assert fences == [[]] * PROCESSES
    assert counter.value < TOTAL


# -- 2. one document, many threads on mongomock --------------------------------


@pytest.mark.parametrize("locked", [True, False], ids=["leased", "unguarded"])
def test_threads_on_mongomock(lockable_mongomock_db: Any, locked: bool) -> None:
    """8 threads x 200 increments in one process on mongomock: exact under the
    lease (the library serialises its lease operations on mongomock), lossy
    without it (the control)."""
    counter = ProcCounter(value=0).save()
    collection = ProcCounter._get_collection()
    query = {"_id": counter.pk}
    barrier = threading.Barrier(PROCESSES)
    fences: list[list[int]] = [[] for _ in range(PROCESSES)]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            mine = ProcCounter.objects.get(pk=counter.pk)
            barrier.wait(timeout=START_TIMEOUT)
            for _ in range(ITERATIONS):
                if locked:
                    assert mine.lock(COUNTER_LEASE, wait=None)
                    fences[index].append(mine.lock_fence)
                value = collection.find_one(query)["value"]
                pause(RACE_PAUSE)
                collection.update_one(query, {"$set": {"value": value + 1}})
                if locked:
                    mine.release()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            barrier.abort()

    threads = [
        threading.Thread(target=work, args=(i,), name=f"counter-{i}", daemon=True)
        for i in range(PROCESSES)
    ]
    # Switch threads often, so that an unserialised lease operation would be
    # interrupted midway.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        deadline = started + JOIN_TIMEOUT
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
    finally:
        sys.setswitchinterval(interval)
    elapsed = time.monotonic() - started
    stuck = [thread.name for thread in threads if thread.is_alive()]
    assert not stuck, f"threads still running after {JOIN_TIMEOUT} s: {stuck}"
    if errors:
        raise errors[0]
    value = collection.find_one(query)["value"]
    mode = "leased" if locked else "unguarded"
    print(
        f"\n{PROCESSES} threads x {ITERATIONS} on mongomock, {mode}: "
        f"{value} of {TOTAL} increments kept ({elapsed:.2f} s)"
    )
    if locked:
        assert value == TOTAL
        assert_fences_consecutive([fence for per_thread in fences for fence in per_thread], TOTAL)
    else:
        assert value < TOTAL


# -- 3. draining a queue with claim() ------------------------------------------

DRAIN_WORKERS = 4
DRAIN_TASKS = 5000


@pytest.mark.slow  # 20 to 100 s measured on 2 (shared) cores
@pytest.mark.timeout(600)  # above JOIN_TIMEOUT
def test_processes_drain_queue_exactly_once(lockable_real_db: Any, spawn: Any) -> None:
    """4 processes claim, handle and release 5,000 tasks until claim() returns
    None: every task is handled exactly once."""
    db = lockable_real_db.database
    ProcTask.ensure_indexes()
    db[ProcTask._meta["collection"]].insert_many([{"n": n} for n in range(DRAIN_TASKS)])
    workers = [
        spawn(
            f"drain-{i}",
            "proc_drain",
            uri=lockable_real_db.uri,
            db=lockable_real_db.db_name,
            worker=f"w{i}",
            duration=60,
        )
        for i in range(DRAIN_WORKERS)
    ]
    started = start_together(workers)
    tasks = db[ProcTask._meta["collection"]]
    results = join_all(
        workers, lambda: f"{tasks.count_documents({'handled_by': None})} tasks left unhandled"
    )
    elapsed = time.monotonic() - started

    per_worker = [result["handled"] for result in results]
    print(
        f"\n{DRAIN_WORKERS} processes drained {DRAIN_TASKS} tasks in {elapsed:.2f} s "
        f"({DRAIN_TASKS / elapsed:.0f} tasks/s); per worker: {per_worker}"
    )
    handled = list(db[HANDLED_COLLECTION].find({}, {"_id": False}))
    assert len(handled) == DRAIN_TASKS
    twice = [n for n, seen in Counter(h["n"] for h in handled).items() if seen > 1]
    assert not twice, f"tasks handled more than once: {twice[:20]}"
    assert {h["n"] for h in handled} == set(range(DRAIN_TASKS))
    assert sum(per_worker) == DRAIN_TASKS
    # Each task was claimed once (fence 1), marked by the worker that recorded
    # it, and released.
    assert {h["fence"] for h in handled} == {1}
    by_task = {h["task"]: h["worker"] for h in handled}
    stored = list(db[ProcTask._meta["collection"]].find())
    assert len(stored) == DRAIN_TASKS
    for task in stored:
        assert task["handled_by"] == by_task[task["_id"]], task
        assert task["lock_fence"] == 1, task
        assert task["locked_until"] is None, task
    assert ProcTask.objects(handled_by=None).claim(60) is None


# -- 4. a holder killed with SIGKILL -------------------------------------------


def stored_lease(counter_id: ObjectId) -> dict[str, Any]:
    raw: dict[str, Any] | None = ProcCounter._get_collection().find_one({"_id": counter_id})
    assert raw is not None
    return raw


def test_lease_of_killed_holder_expires(lockable_real_db: Any, spawn: Any) -> None:
    """A holder killed with SIGKILL never releases: another process gets the
    lease only once it has run out (by the server's dates), with a greater
    fence."""
    counter = ProcCounter(value=0).save()
    common = {
        "uri": lockable_real_db.uri,
        "db": lockable_real_db.db_name,
        "counter_id": str(counter.pk),
    }
    # The contender is connected and waiting before the lease is taken, so that
    # it tries while the lease is still held.
    contender = spawn("contender", "proc_contend", duration=1.0, wait=10, **common)
    contender.expect("READY")
    holder = spawn("holder", "proc_hold", duration=1.0, **common)
    line = holder.read_line()
    assert line.startswith("HOLDING "), f"unexpected {line!r} from {holder.describe()}"
    held = json.loads(line[len("HOLDING ") :])
    assert held["pid"] == holder.proc.pid
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait(timeout=30)
    assert holder.proc.returncode == -signal.SIGKILL, holder.describe()

    old = stored_lease(counter.pk)
    # Killing the holder released nothing: its lease is as it granted it.
    assert old["locked_by"] == held["owner"]
    assert old["lock_fence"] == held["fence"] == 1
    assert old["locked_until"] is not None

    contender.go()
    result = result_of(contender)
    new = stored_lease(counter.pk)
    granted_after = new["locked_until"] - timedelta(seconds=1) - old["locked_until"]
    print(
        f"\nholder killed; contender saw the lease held: {result['held_at_go']}, "
        f"waited {result['waited']:.3f} s; new lease granted "
        f"{granted_after.total_seconds():.3f} s after the old one ended (server dates)"
    )
    assert result["acquired"] is True
    assert new["locked_by"] == result["owner"] != held["owner"]
    assert new["lock_fence"] == result["fence"] == held["fence"] + 1
    # The new lease lasts 1 s from its grant: its grant came at or after the
    # end of the killed holder's lease (50 ms slack for date rounding).
    assert new["locked_until"] - timedelta(seconds=1) >= old["locked_until"] - timedelta(
        milliseconds=50
    )
