"""The ``demo`` command's workers and the checks of what they did.

Two demonstrations, each run by real worker processes (``spawn``: fresh
interpreters that connect on their own, as separate hosts would):

**Job queue** (:func:`run_jobs`). ``jobs`` documents of :class:`DemoJob` start
``pending``; a few are *poison*: their work fails every time. Each worker loops::

    batch = DemoJob.objects(status="pending").order_by("n").claim_many(
        batch_size, lease, max_attempts=max_attempts)
    for job in batch:
        ...                               # the work: a short sleep
        job.update_if_held(set__status="done", push__handled_by=worker)
        job.release()                     # a poison job is released undone

and records every handling attempt (job, worker, pid, fence, the lease's end
by the server's clock, how it ended) in its own collection, so that the parent
can prove afterwards that each job was completed exactly once. With
``crash_rate`` a worker kills itself with ``SIGKILL`` while it handles a job:
right after the claim, mid-work, or after completing the job but before
releasing it. The parent starts a new worker in its place, and the crashed
batch's leases expire and are taken over (claimed again with the next fence).
A poison job is claimed ``max_attempts`` times and then set aside: it stays
``pending`` and ``DemoJob.objects.exhausted(max_attempts)`` lists it.

**Cron** (:func:`run_cron`). Every worker calls the same
``@exclusive("demo-report", ...)`` function once a second, each a little out
of step with the others; the function records which worker ran which tick.
Each tick must run exactly once.

Both return a report whose ``violations`` list is empty when the guarantee
held.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import random
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from multiprocessing.process import BaseProcess
from typing import Any, Callable

import mongoengine
from mongoengine import Document
from mongoengine.fields import BooleanField, IntField, ListField, StringField

from ._errors import LockNotOwnedError
from ._exclusive import exclusive
from ._mixin import LockableMixin

__all__ = [
    "CRON_LOCK",
    "DEMO_ALIAS",
    "CronReport",
    "CronTick",
    "DemoJob",
    "JobsProgress",
    "JobsReport",
    "Takeover",
    "run_cron",
    "run_jobs",
]

#: The MongoEngine alias of the demo's connection, in the parent and the
#: workers: the demo never touches a caller's ``default`` connection.
DEMO_ALIAS = "mongoengine-lockable-demo"

JOBS_COLLECTION = "demo_jobs"
#: One document per handling attempt (a separate collection, so that a second
#: handling could never overwrite the record of the first).
HANDLINGS_COLLECTION = "demo_handlings"
CRON_RUNS_COLLECTION = "demo_cron_runs"
CRON_ATTEMPTS_COLLECTION = "demo_cron_attempts"

#: The named lock of the cron demo.
CRON_LOCK = "demo-report"
#: Lease of one cron run: far longer than the run, which takes milliseconds.
CRON_LEASE = 10.0
#: Each worker fires up to this long after the tick.
CRON_MAX_OFFSET = 0.1
#: Released cron leases are kept this long after the grant, so that workers
#: firing up to ``CRON_MAX_OFFSET`` later skip the tick, and the lock is free
#: again well before the next tick: 0.4 s of scheduling delay is tolerated
#: either way.
CRON_MIN_HOLD = 0.5

#: How long an idle worker waits before asking for jobs again (every pending
#: job is held, e.g. by a crashed worker whose lease has not expired yet).
IDLE_SLEEP = 0.05
#: Jobs a worker claims at once, and grants after which a job is set aside.
BATCH = 5
MAX_ATTEMPTS = 4
#: Where a worker may crash while it handles a job.
CRASH_PHASES = ("claimed", "working", "completed")
#: Seconds a worker process gets to start, connect and say it is ready.
START_TIMEOUT = 60.0
#: Exit status of a worker that found its parent gone.
ORPHANED = 3

_SIGKILL: int = getattr(signal, "SIGKILL", 9)


class DemoJob(LockableMixin, Document):
    """A unit of work of the job-queue demo."""

    n = IntField(required=True)
    status = StringField(default="pending", choices=("pending", "done"))
    #: A job whose work fails every time (set aside after ``MAX_ATTEMPTS``).
    poison = BooleanField(default=False)
    #: Every worker that completed the job; exactly one when all went well.
    handled_by = ListField(StringField())

    # The index of the claim below: equality on ``status``, then the sort on
    # ``n``, then the lease's range on ``locked_until``.
    meta = {
        "collection": JOBS_COLLECTION,
        "db_alias": DEMO_ALIAS,
        "indexes": [("status", "n", "locked_until")],
    }


def connect(uri: str, db: str) -> Any:
    """Connect :data:`DEMO_ALIAS` to ``db`` on ``uri`` and return the database."""
    mongoengine.connect(db=db, host=uri, alias=DEMO_ALIAS, uuidRepresentation="standard")
    return mongoengine.get_db(DEMO_ALIAS)


def disconnect() -> None:
    """Close the demo's connection."""
    mongoengine.disconnect(DEMO_ALIAS)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _kill(procs: Sequence[BaseProcess | None]) -> None:
    """Kill and reap the worker processes still running (by pid)."""
    for proc in procs:
        if proc is not None and proc.pid is not None and proc.exitcode is None:
            proc.kill()
    for proc in procs:
        if proc is not None and proc.pid is not None:
            proc.join(5)


def _context() -> Any:
    """The multiprocessing context of the workers: fresh processes that
    inherit no connection. ``forkserver`` (where there is one) forks them from
    a server process that has imported this module once, so that restarting a
    crashed worker takes milliseconds; ``spawn`` elsewhere."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def _worker_error(worker: str, exc: BaseException) -> int:
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"mongoengine-lockable: demo worker {worker}: {type(exc).__name__}: {message}",
          file=sys.stderr, flush=True)
    return 1


# -- job queue: worker ----------------------------------------------------------


@dataclass(frozen=True)
class JobWorkerConfig:
    """What one job worker process is told (pickled to the spawned child)."""

    uri: str
    db: str
    worker: str
    slot: int
    lease: float
    work_s: float
    crash_rate: float
    seed: str
    batch: int = BATCH
    max_attempts: int = MAX_ATTEMPTS


def job_worker(cfg: JobWorkerConfig) -> None:
    """Process entry point: claim and handle pending jobs until none is left.

    Exit status 0 when no job is pending, 1 on an error, :data:`ORPHANED`
    when the parent died; a chosen crash ends it by ``SIGKILL``.
    """
    try:
        code = _job_loop(cfg)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        code = _worker_error(cfg.worker, exc)
    sys.exit(code)


def _job_loop(cfg: JobWorkerConfig) -> int:
    parent = os.getppid()
    rng = random.Random(cfg.seed)
    db = connect(cfg.uri, cfg.db)
    handlings = db[HANDLINGS_COLLECTION]
    pid = os.getpid()
    pending = DemoJob.objects(status="pending")
    while True:
        if os.getppid() != parent:
            return ORPHANED
        # Oldest first: a crashed worker's jobs are taken over as soon as their
        # leases expire, not after all the others.
        batch = pending.order_by("n").claim_many(cfg.batch, cfg.lease,
                                                 max_attempts=cfg.max_attempts)
        if not batch:
            if pending.count() == pending.exhausted(cfg.max_attempts).count():
                return 0  # what is left pending has been set aside
            # Every claimable job is held: wait for a lease to end.
            time.sleep(IDLE_SLEEP)
            continue
        # One record per claimed job, made before any is handled: a crash
        # leaves a record of every lease it abandons.
        records = handlings.insert_many([
            {
                "job": job.pk,
                "n": job.n,
                "worker": cfg.worker,
                "slot": cfg.slot,
                "pid": pid,
                "owner": job.locked_by,
                "fence": job.lock_fence,
                "until": job.locked_until,
                "lease_ms": round(cfg.lease * 1000),
                "started_at": _utcnow(),
                "completed": False,
            }
            for job in batch
        ]).inserted_ids
        for job, record in zip(batch, records):
            _handle(job, record, cfg, rng, handlings, pid)


def _handle(job: DemoJob, record: Any, cfg: JobWorkerConfig, rng: random.Random,
            handlings: Any, pid: int) -> None:
    """Handle one claimed job, recording how it ended; maybe crash doing it."""
    crash_in = rng.choice(CRASH_PHASES) if rng.random() < cfg.crash_rate else None

    def crash(phase: str) -> None:
        if crash_in == phase:
            # Die holding the lease, as a process killed by the OOM killer or a
            # power cut would.
            os.kill(pid, _SIGKILL)

    crash("claimed")
    time.sleep(cfg.work_s / 2)
    crash("working")
    time.sleep(cfg.work_s / 2)
    if job.poison:
        handlings.update_one({"_id": record}, {"$set": {"outcome": "failed"}})
        _release(job)
        return
    try:
        job.update_if_held(set__status="done", push__handled_by=cfg.worker)
    except LockNotOwnedError:
        # The lease ran out before the work was done: another worker may
        # have the job now. Nothing was written to the job.
        handlings.update_one({"_id": record}, {"$set": {"outcome": "lease lost"}})
        return
    handlings.update_one(
        {"_id": record},
        {"$set": {"completed": True, "outcome": "completed", "finished_at": _utcnow()}},
    )
    crash("completed")
    _release(job)


def _release(job: DemoJob) -> None:
    try:
        job.release()
    except LockNotOwnedError:
        pass  # expired meanwhile: nothing is left to release


# -- job queue: parent ----------------------------------------------------------


@dataclass(frozen=True)
class JobsProgress:
    """A snapshot for the progress display."""

    done: int
    total: int
    alive: int
    crashes: int
    elapsed: float
    #: Poison jobs set aside so far.
    set_aside: int = 0


@dataclass(frozen=True)
class Takeover:
    """A crashed worker's job, claimed again by another once its lease expired."""

    n: int
    crashed_worker: str
    crashed_pid: int
    crashed_fence: int
    worker: str
    fence: int
    #: Seconds between the crashed attempt's start and the take-over's start.
    after: float


@dataclass
class JobsReport:
    """What the job-queue demo did, and whether each job was completed once."""

    jobs: int
    workers: int
    lease: float
    work_ms: float
    crash_rate: float
    seed: int
    poison: int = 0
    batch: int = BATCH
    max_attempts: int = MAX_ATTEMPTS
    #: What happened, by name: ``completed_once`` (good jobs whose
    #: update_if_held succeeded once, as it must), ``completed_more`` and
    #: ``never_completed`` (violations), ``started_more`` (jobs handled more
    #: than once: ``repeats_after_crash`` fine, ``repeats_other`` a violation),
    #: ``crashes`` (workers killed), ``takeovers`` (claims of a job with fence
    #: > 1), ``restarts`` (workers started in place of dead ones),
    #: ``worker_errors`` (workers that failed otherwise), ``claims`` (handling
    #: records, one per claimed job).
    counts: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0
    #: Poison jobs set aside after ``max_attempts`` grants (their numbers).
    set_aside: list[int] = field(default_factory=list)
    examples: list[Takeover] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Jobs completed per second of the run."""
        return self.counts["completed_once"] / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def ok(self) -> bool:
        """Every good job completed exactly once, repeats only after crashes
        (or failures), every poison job set aside."""
        return not self.violations


def run_jobs(
    uri: str,
    db_name: str,
    *,
    jobs: int,
    workers: int,
    lease: float,
    work_ms: float,
    crash_rate: float,
    seed: int,
    timeout: float,
    poison: int = 0,
    batch: int = BATCH,
    max_attempts: int = MAX_ATTEMPTS,
    on_progress: Callable[[JobsProgress], None] | None = None,
    max_examples: int = 3,
) -> JobsReport:
    """Create ``jobs`` pending jobs in ``db_name`` (``poison`` of them failing
    every time) and let ``workers`` processes handle them in batches of
    ``batch``, restarting crashed ones; then check the handling records.

    :param timeout: seconds after which the run is abandoned (a violation).
    :param on_progress: called about ten times a second while workers run.
    :return: the report; its ``violations`` are empty when every good job was
        completed exactly once, jobs were started again only after a crash or
        a failure, and every poison job was set aside after ``max_attempts``.
    """
    report = JobsReport(jobs=jobs, workers=workers, lease=lease, work_ms=work_ms,
                        crash_rate=crash_rate, seed=seed, poison=poison, batch=batch,
                        max_attempts=max_attempts)
    poisoned = set(random.Random(seed).sample(range(1, jobs + 1), min(poison, jobs)))
    db = connect(uri, db_name)
    try:
        DemoJob.ensure_indexes()
        DemoJob.objects.insert([DemoJob(n=n, poison=n in poisoned) for n in range(1, jobs + 1)],
                               load_bulk=False)
        crashed = _run_job_pool(uri, db_name, report, timeout, on_progress, db)
        _check_jobs(report, db, crashed, max_examples)
    finally:
        disconnect()
    return report


def _run_job_pool(
    uri: str,
    db_name: str,
    report: JobsReport,
    timeout: float,
    on_progress: Callable[[JobsProgress], None] | None,
    db: Any,
) -> set[str]:
    """Keep ``report.workers`` workers running until the queue is empty.

    :return: the names of the workers that died by ``SIGKILL``.
    """
    ctx = _context()
    slots: list[BaseProcess | None] = [None] * report.workers
    names: list[str] = [""] * report.workers
    incarnations = [0] * report.workers
    crashed: set[str] = set()

    def start(slot: int) -> None:
        incarnations[slot] += 1
        name = f"w{slot + 1}" if incarnations[slot] == 1 else f"w{slot + 1}.{incarnations[slot]}"
        cfg = JobWorkerConfig(
            uri=uri, db=db_name, worker=name, slot=slot + 1, lease=report.lease,
            work_s=report.work_ms / 1000, crash_rate=report.crash_rate,
            seed=f"{report.seed}:{slot}:{incarnations[slot]}", batch=report.batch,
            max_attempts=report.max_attempts,
        )
        proc = ctx.Process(target=job_worker, args=(cfg,), name=f"demo-{name}", daemon=True)
        proc.start()
        slots[slot], names[slot] = proc, name

    started = time.monotonic()
    deadline = started + timeout
    try:
        for slot in range(report.workers):
            start(slot)
        while True:
            for slot, proc in enumerate(slots):
                if proc is None or proc.is_alive():
                    continue
                proc.join()
                if proc.exitcode == -_SIGKILL:
                    crashed.add(names[slot])
                    report.counts["crashes"] += 1
                elif proc.exitcode == 0:
                    slots[slot] = None
                    continue
                else:
                    report.counts["worker_errors"] += 1
                    if report.counts["worker_errors"] > 3 * report.workers:
                        report.violations.append(
                            f"demo workers keep failing (last: {names[slot]} exited with "
                            f"status {proc.exitcode}); gave up"
                        )
                        return crashed
                # The queue is not empty (the dead worker's job is pending):
                # keep the pool at full strength.
                report.counts["restarts"] += 1
                start(slot)
            alive = sum(proc is not None for proc in slots)
            if on_progress is not None:
                done = DemoJob.objects(status="done").count()
                aside = DemoJob.objects(status="pending").exhausted(report.max_attempts).count()
                on_progress(JobsProgress(done, report.jobs, alive, report.counts["crashes"],
                                         time.monotonic() - started, aside))
            if alive == 0:
                break
            if time.monotonic() > deadline:
                report.violations.append(
                    f"the workers did not finish within {timeout:g} s; stopped them"
                )
                break
            time.sleep(0.1)
    finally:
        report.elapsed = time.monotonic() - started
        _kill(slots)
    return crashed


def _check_jobs(report: JobsReport, db: Any, crashed: set[str], max_examples: int) -> None:
    """Fill in the counts from the jobs and the handling records, and list
    every violation of the guarantees:

    - a good job was completed exactly once, by its latest lease (the fence of
      the completion is the job's last fence);
    - every attempt but a job's last ended in its worker's crash, a lost lease
      or (poison) a failure; never in a completion;
    - an attempt that did not release its lease (a crash, a lost lease) was
      followed by a grant no earlier than that lease's end, by the server's clock;
    - a poison job was never completed and was granted exactly ``max_attempts``
      times, then set aside.
    """
    attempts: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for record in db[HANDLINGS_COLLECTION].find({}, sort=[("started_at", 1), ("fence", 1)]):
        attempts[record["job"]].append(record)
        report.counts["claims"] += 1
    takeovers: list[Takeover] = []
    for job in db[JOBS_COLLECTION].find({}, sort=[("n", 1)]):
        n = job["n"]
        tries = sorted(attempts.get(job["_id"], []), key=lambda r: r["fence"])
        completions = [r for r in tries if r.get("completed")]
        handled_by = job.get("handled_by") or []
        report.counts["takeovers"] += sum(r["fence"] > 1 for r in tries)
        if job.get("poison"):
            _check_poison(report, job, tries, completions)
        elif job.get("status") != "done" or not completions:
            report.counts["never_completed"] += 1
            report.violations.append(f"job {n} was never completed")
        elif len(completions) > 1 or len(handled_by) > 1:
            report.counts["completed_more"] += 1
            who = ", ".join(handled_by) or ", ".join(r["worker"] for r in completions)
            report.violations.append(f"job {n} was completed more than once (by {who})")
        else:
            report.counts["completed_once"] += 1
            last = max(r["fence"] for r in tries)
            if completions[0]["fence"] != last or job.get("lock_fence") != last:
                report.violations.append(
                    f"job {n} was completed with fence {completions[0]['fence']}, "
                    f"not by the latest lease (fence {last})"
                )
        if len(tries) > 1:
            takeovers.extend(_check_repeats(report, n, tries, crashed))
    report.examples = takeovers[:max_examples]
    if len(attempts) > report.jobs:
        report.violations.append("handling records name jobs that do not exist")


def _check_poison(report: JobsReport, job: dict[str, Any], tries: list[dict[str, Any]],
                  completions: list[dict[str, Any]]) -> None:
    n = job["n"]
    if completions or job.get("status") == "done":
        report.violations.append(f"poison job {n} was completed")
    elif job.get("lock_fence") != report.max_attempts:
        report.violations.append(
            f"poison job {n} was granted {job.get('lock_fence')} times, not "
            f"max_attempts={report.max_attempts}"
        )
    else:
        report.set_aside.append(n)


def _check_repeats(report: JobsReport, n: int, tries: list[dict[str, Any]],
                   crashed: set[str]) -> list[Takeover]:
    """Check a job handled more than once; return its take-overs of crashed
    holders."""
    report.counts["started_more"] += 1
    released = ("failed",)  # attempts that ended by releasing the lease
    unexplained = [
        r for r in tries[:-1]
        if r.get("completed") or not (r["worker"] in crashed or r.get("outcome") in
                                      ("lease lost", *released))
    ]
    if unexplained:
        report.counts["repeats_other"] += 1
        why = ", ".join(
            f"{r['worker']} (fence {r['fence']}) "
            + ("completed it" if r.get("completed") else r.get("outcome", "stopped"))
            for r in unexplained
        )
        report.violations.append(f"job {n} was started again without a crash: {why}")
    elif any(r["worker"] in crashed for r in tries[:-1]):
        report.counts["repeats_after_crash"] += 1
    takeovers = []
    for before, after in zip(tries, tries[1:]):
        if before.get("outcome") in released:
            continue
        # The lease was not released: it had to end before the next grant.
        granted = after["until"] - timedelta(milliseconds=after["lease_ms"])
        if granted < before["until"]:
            report.violations.append(
                f"job {n} was granted again (fence {after['fence']}) at {granted:%H:%M:%S.%f}, "
                f"before the lease of fence {before['fence']} ended at "
                f"{before['until']:%H:%M:%S.%f} (server clock)"
            )
        if before["worker"] in crashed and not before.get("completed"):
            takeovers.append(
                Takeover(
                    n=n,
                    crashed_worker=before["worker"],
                    crashed_pid=before["pid"],
                    crashed_fence=before["fence"],
                    worker=after["worker"],
                    fence=after["fence"],
                    after=(after["started_at"] - before["started_at"]).total_seconds(),
                )
            )
    return takeovers


# -- cron -----------------------------------------------------------------------


@dataclass(frozen=True)
class CronWorkerConfig:
    """What one cron worker process is told."""

    uri: str
    db: str
    worker: str
    seconds: int
    seed: str


def cron_worker(cfg: CronWorkerConfig, ready: Any, starts: Any) -> None:
    """Process entry point: fire the ``@exclusive`` report once per tick.

    Says it is ready on ``ready``, gets the first tick (epoch seconds) from
    ``starts``, then at each tick ``t`` waits until ``t`` plus a random offset
    below :data:`CRON_MAX_OFFSET` and calls the report, recording whether it
    ran or was skipped.
    """
    try:
        code = _cron_loop(cfg, ready, starts)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        code = _worker_error(cfg.worker, exc)
    sys.exit(code)


def _cron_loop(cfg: CronWorkerConfig, ready: Any, starts: Any) -> int:
    rng = random.Random(cfg.seed)
    db = connect(cfg.uri, cfg.db)
    runs, attempts = db[CRON_RUNS_COLLECTION], db[CRON_ATTEMPTS_COLLECTION]
    pid = os.getpid()

    @exclusive(CRON_LOCK, CRON_LEASE, min_hold=CRON_MIN_HOLD, alias=DEMO_ALIAS)
    def report(tick: int) -> bool:
        """The scheduled job: write which worker ran this tick."""
        runs.insert_one({"tick": tick, "worker": cfg.worker, "pid": pid, "at": _utcnow()})
        return True

    db.command("ping")
    ready.put(cfg.worker)
    try:
        first: int = starts.get(timeout=START_TIMEOUT)
    except queue.Empty:
        return ORPHANED
    for tick in range(first, first + cfg.seconds):
        fire_at = tick + rng.uniform(0, CRON_MAX_OFFSET)
        time.sleep(max(0.0, fire_at - time.time()))
        fired = time.time() - tick
        ran = report(tick) is not None
        attempts.insert_one({"tick": tick, "worker": cfg.worker, "ran": ran, "offset": fired})
    return 0


@dataclass(frozen=True)
class CronTick:
    """One tick of the cron demo: who ran it, who skipped it."""

    tick: int
    ran_by: list[str]
    #: (worker, seconds after the tick it fired) of every worker that fired.
    fired: list[tuple[str, float, bool]]


@dataclass
class CronReport:
    """What the cron demo did, and whether each tick ran exactly once."""

    workers: int
    seconds: int
    seed: int
    ticks: list[CronTick] = field(default_factory=list)
    elapsed: float = 0.0
    violations: list[str] = field(default_factory=list)

    @property
    def ran_once(self) -> int:
        """Ticks that ran exactly once."""
        return sum(len(t.ran_by) == 1 for t in self.ticks)

    @property
    def ok(self) -> bool:
        """Every tick ran exactly once."""
        return not self.violations


def run_cron(
    uri: str, db_name: str, *, workers: int, seconds: int, seed: int, timeout: float
) -> CronReport:
    """Run ``workers`` processes firing the ``@exclusive`` report every second
    for ``seconds`` ticks; then check that each tick ran exactly once.

    :return: the report; its ``violations`` are empty when every tick ran once.
    """
    report = CronReport(workers=workers, seconds=seconds, seed=seed)
    db = connect(uri, db_name)
    ctx = _context()
    ready, starts = ctx.Queue(), ctx.Queue()
    procs: list[BaseProcess] = []
    started = time.monotonic()
    try:
        for i in range(1, workers + 1):
            cfg = CronWorkerConfig(uri=uri, db=db_name, worker=f"w{i}", seconds=seconds,
                                   seed=f"{seed}:{i}")
            spawned = ctx.Process(target=cron_worker, args=(cfg, ready, starts),
                                  name=f"demo-cron-w{i}", daemon=True)
            spawned.start()
            procs.append(spawned)
        for _ in procs:
            try:
                ready.get(timeout=START_TIMEOUT)
            except queue.Empty:
                report.violations.append(f"the workers did not start within {START_TIMEOUT:g} s")
                return report
        first = math.ceil(time.time() + 0.5)
        for _ in procs:
            starts.put(first)
        deadline = time.monotonic() + seconds + timeout
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                report.violations.append(f"worker {proc.name} did not finish in time; stopped it")
            elif proc.exitcode != 0:
                report.violations.append(f"worker {proc.name} exited with status {proc.exitcode}")
        report.elapsed = time.monotonic() - started
        _check_cron(report, db, first)
    finally:
        _kill(procs)
        ready.close()
        starts.close()
        disconnect()
    return report


def _check_cron(report: CronReport, db: Any, first: int) -> None:
    ran: dict[int, list[str]] = defaultdict(list)
    for run in db[CRON_RUNS_COLLECTION].find({}, sort=[("at", 1)]):
        ran[run["tick"]].append(run["worker"])
    fired: dict[int, list[tuple[str, float, bool]]] = defaultdict(list)
    for attempt in db[CRON_ATTEMPTS_COLLECTION].find({}):
        fired[attempt["tick"]].append((attempt["worker"], attempt["offset"], attempt["ran"]))
    ticks = range(first, first + report.seconds)
    for tick in ticks:
        entry = CronTick(tick, ran[tick], sorted(fired[tick], key=lambda f: f[1]))
        report.ticks.append(entry)
        label = time.strftime("%H:%M:%S", time.localtime(tick))
        if not entry.ran_by:
            report.violations.append(f"tick {label} did not run")
        elif len(entry.ran_by) > 1:
            report.violations.append(
                f"tick {label} ran {len(entry.ran_by)} times (by {', '.join(entry.ran_by)})"
            )
    stray = sorted(set(ran) - set(ticks))
    if stray:
        report.violations.append(f"runs recorded for unexpected ticks {stray}")
