"""The recipes of ``docs/recipes.rst``, run as written (``tests/_recipes.py``
extracts their code blocks); the Celery recipe runs in ``tests/test_celery.py``.

- The worker loop and the dead letters, on both backends: three worker
  threads drain a queue with two poison jobs; every good job is done once,
  each poison job is tried ``MAX_ATTEMPTS`` times and then found by
  ``dead_letters()`` and set aside.
- Shutting down cleanly, on the real server: a worker process holding a batch
  of ten gets ``SIGTERM`` while handling the first, finishes it, and hands the
  rest back with ``release_all``; they are claimable at once.
- APScheduler on three "hosts" (processes), firing the same schedule a little
  out of step: each firing runs on one host, the others skip it thanks to
  ``min_hold``. The recipe's cron schedule is replaced by a 2 s interval.

The processes are ``recipe_batch_worker`` and ``recipe_scheduler_host``
workers (``tests/workers.py``).
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from _children import Children
from _recipes import load, source
from workers import QUEUE_RECIPES, SCHEDULER_INTERVAL, SCHEDULER_RUNS, SCHEDULER_TICKS

#: The recipes that define the queue, the worker loop and the dead letters.
RECIPES = load(*QUEUE_RECIPES)
Job = RECIPES["Job"]
MAX_ATTEMPTS = RECIPES["MAX_ATTEMPTS"]

START_TIMEOUT = 60.0


def test_every_recipe_block_compiles() -> None:
    from _recipes import blocks

    names = blocks()
    assert {"recipe-model", "recipe-worker-loop", "recipe-shutdown", "recipe-dead-letters",
            "recipe-celery", "recipe-apscheduler"} <= set(names)
    for name in names:
        compile(source(name), name, "exec")


# -- the worker loop and the dead letters, on both backends --------------------------------


def test_worker_loop_does_each_job_once_and_sets_poison_jobs_aside(
    lockable_db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    jobs = [Job(payload={"n": n, "poison": n in (3, 11)}).save() for n in range(20)]
    handled: list[int] = []
    guard = threading.Lock()

    def handle(job: Any) -> str:
        with guard:
            handled.append(job.payload["n"])
        if job.payload["poison"]:
            raise ValueError(f"cannot handle job {job.payload['n']}")
        return f"ok {job.payload['n']}"

    stopping = RECIPES["stopping"]
    stopping.clear()
    done: list[int] = []
    threads = [threading.Thread(target=lambda i=i: done.append(
        RECIPES["work"](handle, owner=f"worker-{i}", lease=5, idle=0.2)))
        for i in range(3)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while (Job.objects(status="done").count() < 18
               or len(RECIPES["dead_letters"]()) < 2):
            assert time.monotonic() < deadline, f"handled so far: {sorted(handled)}"
            time.sleep(0.05)
    finally:
        stopping.set()
        for thread in threads:
            thread.join(30)
    assert not any(thread.is_alive() for thread in threads)

    counts = Counter(handled)
    assert {n: c for n, c in counts.items() if n not in (3, 11)} == {
        n: 1 for n in range(20) if n not in (3, 11)}
    assert counts[3] == counts[11] == MAX_ATTEMPTS
    assert sum(done) == 18
    for job in Job.objects(status="done"):
        assert job.result == f"ok {job.payload['n']}"
        assert job.lock_fence == 1 and job.locked_until is None
    letters = sorted(RECIPES["dead_letters"](), key=lambda letter: str(letter[0]))
    poison = sorted((jobs[3].pk, jobs[11].pk), key=str)
    assert [letter[0] for letter in letters] == poison
    assert [letter[1] for letter in letters] == [MAX_ATTEMPTS, MAX_ATTEMPTS]
    assert all(letter[2].startswith("ValueError('cannot handle job") for letter in letters)
    assert RECIPES["set_dead_letters_aside"]() == 2
    assert Job.objects(status="dead").count() == 2
    assert Job.objects(status="pending").count() == 0
    assert "failed (attempt 5 of 5)" in caplog.text


def test_dead_letters_leave_a_job_in_its_last_attempt_alone(lockable_db: Any) -> None:
    job = Job().save()
    for _ in range(MAX_ATTEMPTS - 1):
        assert job.lock(30)
        job.release()
    assert job.lock(30)  # the last attempt, running now
    assert [letter[0] for letter in RECIPES["dead_letters"]()] == [job.pk]
    assert RECIPES["set_dead_letters_aside"]() == 0
    job.release()
    assert RECIPES["set_dead_letters_aside"]() == 1


# -- shutting down cleanly: a worker process and SIGTERM ---------------------------------


def test_shutdown_hands_back_the_unfinished_batch(lockable_real_db: Any,
                                                 tmp_path: Path) -> None:
    for n in range(10):
        Job(payload={"n": n}).save()
    with Children(tmp_path) as children:
        worker = children("recipe_batch_worker", uri=lockable_real_db.uri,
                          db=lockable_real_db.db_name, work=0.5)
        worker.expect("READY", timeout=START_TIMEOUT)
        owner = f"{socket.gethostname()}:{worker.proc.pid}"  # as the recipe names it
        worker.go()
        worker.expect("HANDLING", timeout=START_TIMEOUT)
        assert Job.objects.held_by(owner).count() == 10  # the whole batch
        worker.proc.send_signal(signal.SIGTERM)
        stopped = worker.expect("STOPPED", timeout=START_TIMEOUT)
        assert worker.join(30) == 0
    done = stopped["done"]
    assert 1 <= done < 10
    assert Job.objects.held_by(owner).count() == 0
    assert Job.objects(status="done").count() == done
    # The rest were handed back: claimable now, not when their 60 s leases end.
    again = Job.objects(status="pending").claim_many(10, 30)
    assert len(again) == 10 - done
    assert {job.lock_fence for job in again} == {2}


# -- APScheduler on three hosts ------------------------------------------------------------

#: Host i fires i * SPREAD seconds late on the schedule of
#: ``recipe_scheduler_host`` (``SCHEDULER_*`` in ``tests/workers.py``).
SPREAD = 0.2


def test_the_scheduler_recipe_is_the_one_tested() -> None:
    # The test below runs this recipe with a faster schedule.
    code = source("recipe-apscheduler")
    assert '@exclusive("nightly-report", 3600, min_hold=120, keepalive=True)' in code
    assert 'scheduler.add_job(nightly_report, "cron", hour=2, misfire_grace_time=60)' in code


@pytest.mark.slow
def test_apscheduler_on_three_hosts_runs_each_firing_once(lockable_real_db: Any,
                                                          tmp_path: Path) -> None:
    with Children(tmp_path) as children:
        hosts = [children("recipe_scheduler_host", uri=lockable_real_db.uri,
                          db=lockable_real_db.db_name, lag=i * SPREAD)
                 for i in range(3)]
        for host in hosts:
            host.expect("READY", timeout=START_TIMEOUT)
        start = time.time() + 1.0  # in the future for every host
        for host in hosts:
            host.send(json.dumps(start))
        results = [host.expect("RESULT", timeout=SCHEDULER_TICKS * SCHEDULER_INTERVAL + 30)
                   for host in hosts]
    runs = list(lockable_real_db.database[SCHEDULER_RUNS].find())
    # The first firing of the tick ran; the interval trigger fires at
    # start + k * SCHEDULER_INTERVAL (+ the host's lag).
    ticks = Counter(round((run["at"] - start) / SCHEDULER_INTERVAL) for run in runs)
    report = f"runs per tick {dict(ticks)}, skipped per host {results}"
    assert [tick for tick, n in ticks.items() if n > 1] == [], report
    assert len(ticks) >= SCHEDULER_TICKS - 1, report
    assert sum(r["skipped"] for r in results) >= len(ticks), report

