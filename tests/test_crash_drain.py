"""Draining a queue while workers are killed, with the demo's own workers and
checker (``mongoengine_lockable._demo``): 4 processes claim 5,000 jobs in
batches (``claim_many``), each worker ``SIGKILL``s itself now and then while it
handles a job (right after the claim, mid-work, or after completing it but
before the release), and is replaced. Five jobs are poison: their work fails
every time.

The checker (``_check_jobs``) proves from a record of every handling that:

- every good job was completed exactly once, by its latest lease (the fence
  of the completion is the one stored with the job);
- a job was started more than once only because an earlier holder was killed,
  lost its lease, or (poison) failed, never after a completion;
- by the server's clock, a job was granted again only after the lease of a
  killed (or late) holder had ended;
- every poison job was granted exactly ``max_attempts`` times, then set aside.

``test_cli.py::test_demo_check_finds_violations`` shows that the checker
catches each of these violations in fabricated records.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from mongoengine_lockable._demo import run_jobs

pytestmark = pytest.mark.slow

JOBS = 5_000
WORKERS = 4
POISON = 5
LEASE = 1.0
WORK_MS = 2.0
#: Per job: about 15 kills over the drain (fewer than 3 has probability < 1e-4).
CRASH_RATE = 0.003
#: A hang, not a slow machine (the drain takes about half a minute on 2 cores).
DRAIN_LIMIT = 240.0


def test_drain_survives_killed_workers(lockable_real_db: Any) -> None:
    db = lockable_real_db
    seed = random.randrange(2**32)
    report = run_jobs(
        db.uri, db.db_name, jobs=JOBS, workers=WORKERS, lease=LEASE, work_ms=WORK_MS,
        crash_rate=CRASH_RATE, seed=seed, timeout=DRAIN_LIMIT, poison=POISON,
    )
    counts = report.counts
    print(
        f"\ndrain: {JOBS} jobs ({POISON} poison), {WORKERS} workers, {counts['crashes']} kills, "
        f"{counts['restarts']} restarts; {counts['claims']} handlings, {counts['takeovers']} "
        f"claimed again; drained in {report.elapsed:.1f} s (seed {seed})"
    )
    assert report.ok, f"seed {seed}: " + "\n".join(report.violations[:20])
    assert report.counts["completed_once"] == JOBS - POISON
    assert len(report.set_aside) == POISON
    assert report.counts['crashes'] >= 3, f"seed {seed}: too few kills to test anything"
    assert report.counts["repeats_after_crash"] >= 1
    assert report.counts["worker_errors"] == 0
