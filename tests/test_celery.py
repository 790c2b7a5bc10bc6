"""Celery workers on a MongoDB broker, running the recipes of ``docs/recipes.rst``.

Each test starts real ``celery -A celery_app worker`` processes (prefork pool,
two processes each; ``tests/celery_app.py``, started as ``celery_worker``
workers of ``tests/workers.py``) whose broker, result backend and
documents are the test's database on the real server (kombu's MongoDB
transport), sends tasks from this process by name, as any Celery client does,
and stops the workers with ``SIGTERM`` (a warm shutdown) by pid. A worker's log
(its stderr) is kept under ``tmp_path`` and quoted when the test fails.

- A task locked per argument (``@exclusive("sync-account:{account_id}")``):
  two accounts sync at the same moment; two deliveries for one account run
  once, the other is skipped.
- Four drain tasks on two workers share a queue that is filled while they wait
  in ``claim(wait=...)``; jobs outlast their 1 s lease (keepalive); each job is
  handled exactly once.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import celery
import pytest

from mongoengine_lockable import NamedLock

from _children import Child, Children, fail
from celery_app import HANDLED
from models import ACCOUNT_GATES, ACCOUNT_RUNS

pytestmark = pytest.mark.slow

#: Seconds a worker gets to start, and any awaited step to happen, on a
#: loaded machine.
START_TIMEOUT = 90.0
STEP_TIMEOUT = 60.0


def broker_url(uri: str, db_name: str) -> str:
    """``uri`` with the database ``db_name`` in its path."""
    scheme, _, rest = uri.partition("://")
    hosts, _, options = rest.partition("?")
    hosts = hosts.split("/", 1)[0]
    return f"{scheme}://{hosts}/{db_name}" + (f"?{options}" if options else "")


def test_broker_url_names_the_database() -> None:
    assert (broker_url("mongodb://127.0.0.1:4000/?replicaSet=rs0", "t1")
            == "mongodb://127.0.0.1:4000/t1?replicaSet=rs0")
    assert broker_url("mongodb://a:1,b:2", "t1") == "mongodb://a:1,b:2/t1"


def start_workers(children: Children, broker: str, *names: str) -> list[Child]:
    """Start a worker (two pool processes) per name, all at once; return once
    each consumes tasks."""
    workers = [children.start("celery_worker", {"broker": broker, "name": name, "concurrency": 2},
                              name=name)
               for name in names]
    for worker in workers:
        worker.expect("READY", timeout=START_TIMEOUT)
    return workers


def stop_workers(workers: list[Child]) -> None:
    """Warm shutdown by pid (``SIGTERM``, all at once): each worker finishes
    its tasks and exits 0."""
    for worker in workers:
        worker.proc.send_signal(signal.SIGTERM)
    for worker in workers:
        status = worker.join(STEP_TIMEOUT)
        if status != 0:
            fail(f"the worker did not stop cleanly: {worker.describe()}")


def logs(workers: list[Child]) -> str:
    return "\n\n".join(w.describe() for w in workers)


def wait_until(check: Callable[[], Any], what: str, workers: list[Child]) -> Any:
    """Poll ``check`` until it returns a true value; fail with the workers'
    logs after :data:`STEP_TIMEOUT` seconds."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            fail(f"timed out waiting for {what}:\n{logs(workers)}")
        time.sleep(0.05)


def result_of(result: Any, workers: list[Child]) -> Any:
    try:
        return result.get(timeout=STEP_TIMEOUT)
    except celery.exceptions.TimeoutError:
        fail(f"no result of task {result.id} in {STEP_TIMEOUT} s:\n{logs(workers)}")


@contextmanager
def celery_client(broker: str) -> Iterator[Any]:
    """A Celery client of the broker: sends tasks by name, reads results."""
    client = celery.Celery("client", broker=broker, backend=broker)
    try:
        yield client
    finally:
        client.close()


def test_a_task_locked_per_argument_runs_once_per_key(lockable_real_db: Any,
                                                      tmp_path: Path) -> None:
    db = lockable_real_db.database
    broker = broker_url(lockable_real_db.uri, lockable_real_db.db_name)
    db["celery_accounts"].insert_many([{"_id": n} for n in (1, 2, 3)])

    def starts(account: int) -> list[dict[str, Any]]:
        return list(db[ACCOUNT_RUNS].find({"account": account, "event": "start"}))

    with Children(tmp_path) as children, celery_client(broker) as client:
        workers = start_workers(children, broker, "locks")

        # Two keys: both run at once, each holding its own lock.
        one = client.send_task("tasks.sync_account", args=[1])
        two = client.send_task("tasks.sync_account", args=[2])
        wait_until(lambda: starts(1) and starts(2), "accounts 1 and 2 to sync at once", workers)
        assert starts(1)[0]["pid"] != starts(2)[0]["pid"]
        assert NamedLock.owner_of("sync-account:1") is not None
        assert NamedLock.owner_of("sync-account:2") is not None
        db[ACCOUNT_GATES].insert_many([{"_id": 1}, {"_id": 2}])
        assert result_of(one, workers) == 1
        assert result_of(two, workers) == 2

        # One key, delivered twice: one run holds the lock, the other is skipped.
        first = client.send_task("tasks.sync_account", args=[3])
        second = client.send_task("tasks.sync_account", args=[3])
        done = wait_until(lambda: [r for r in (first, second) if r.ready()],
                          "one of two deliveries of account 3 to finish", workers)
        assert len(done) == 1, "both deliveries finished while the gate was closed"
        skipped = done[0]
        running = second if skipped is first else first
        assert result_of(skipped, workers) is None  # @exclusive skipped it
        assert len(starts(3)) == 1
        assert NamedLock.owner_of("sync-account:3") is not None
        db[ACCOUNT_GATES].insert_one({"_id": 3})
        assert result_of(running, workers) == 3
        assert len(starts(3)) == 1
        assert NamedLock.is_free("sync-account:3")

        stop_workers(workers)
    assert db[ACCOUNT_RUNS].count_documents({"event": "end"}) == 3


JOBS = 60
WAVES = 3
#: Jobs whose work (1.5 s) outlasts their lease (1 s): the keepalive keeps them.
SLOW = {7, 29, 45}


def test_celery_workers_drain_a_queue_each_job_once(lockable_real_db: Any,
                                                     tmp_path: Path) -> None:
    db = lockable_real_db.database
    broker = broker_url(lockable_real_db.uri, lockable_real_db.db_name)
    with Children(tmp_path) as children, celery_client(broker) as client:
        workers = start_workers(children, broker, "drain-a", "drain-b")
        drains = [client.send_task("tasks.drain_jobs", kwargs={"idle": 3, "lease": 1})
                  for _ in range(4)]
        wait_until(lambda: all(r.state == "STARTED" for r in drains),
                   "four drain tasks to start", workers)

        # The queue fills while the drains wait in claim(wait=...).
        for wave in range(WAVES):
            size = JOBS // WAVES
            db["job"].insert_many([
                {"status": "pending",
                 "payload": {"n": n, "work": 1.5 if n in SLOW else 0.01}}
                for n in range(wave * size, (wave + 1) * size)
            ])
            time.sleep(0.2)

        counts = [result_of(r, workers) for r in drains]
        stop_workers(workers)

    handled = list(db[HANDLED].find())
    times = Counter(h["job"] for h in handled)
    assert [job for job, n in times.items() if n > 1] == []
    jobs = list(db["job"].find())
    assert len(jobs) == JOBS
    assert set(times) == {job["_id"] for job in jobs}
    assert sum(counts) == JOBS
    assert {job["status"] for job in jobs} == {"done"}
    assert {job["lock_fence"] for job in jobs} == {1}  # each granted once
    assert {job["locked_until"] for job in jobs} == {None}  # and released
    # The work was shared by more than one pool process.
    assert len({h["pid"] for h in handled}) > 1, counts
