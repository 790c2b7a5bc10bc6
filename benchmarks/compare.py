"""Leases and locks compared: latency, contention, ``claim()`` scaling, drain.

One run, on one ``mongod`` (every MongoDB write with write concern
``majority``), each section interleaving its contenders round by round:

1. Uncontended acquire + release latency (p50/p99) of the raw pymongo pair of
   ``benchmarks/lock_cycle.py`` (the floor), ``doc.lock()`` + ``doc.release()``,
   ``NamedLock``, the PyPI peers that work on pymongo 4, and redis-py's ``Lock``
   and python-redis-lock on a ``redis-server`` started here.
2. Contention: 2, 4 and 8 processes taking ONE lock for a fixed time
   (acquisitions/s in total, and the least and most served process).
3. ``claim()`` latency on collections of 1,000 / 100,000 / 1,000,000 documents
   (``status="pending"`` ordered by ``seq``), with the explained plans that
   pick the index.
4. Four processes draining 10,000 documents (``--drain-docs``) with
   ``claim()``, and the same drain in raw pymongo.

Writes ``docs/benchmark.rst`` (the tables) and ``docs/benchmark.png`` (the
chart), prints the tables and, last, the ratio of our lease cycle to the raw
pymongo pair.

    python benchmarks/compare.py [--quick] [--uri URI] [--out-dir DIR]

``--quick`` runs smaller sizes (no 1,000,000-document collection) and fewer
rounds. Without ``--uri`` (or ``MONGODB_URI``) a temporary single-node replica
set is started from the embedded mongod. matplotlib is required (the chart);
a peer that is not installed, and redis without a ``redis-server`` binary, is
reported and skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import logging
import math
import multiprocessing
import os
import platform
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import mongoengine
from pymongo import ReturnDocument, WriteConcern, monitoring

from mongoengine_lockable import LockableMixin, NamedLock


def _sibling(name: str) -> Any:
    """Load ``benchmarks/<name>.py`` (benchmarks/ is not a package)."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# The raw pair and the lease document are lock_cycle.py's own, so that both
# benchmarks measure the same thing.
lock_cycle = _sibling("lock_cycle")
BenchJob = lock_cycle.BenchJob

DB_NAME = "lockable_compare"
MAJORITY = WriteConcern("majority")
#: Leases taken here are long enough never to expire during a measurement.
LEASE_S = 30
#: Longest a contending process waits for the lock per attempt.
WAIT_S = 10
#: Poll interval given to the peers that poll (their defaults: mongoelector
#: 250 ms, redis-py 100 ms), so that it does not cap their throughput.
POLL_S = 0.005
#: The compound index claim() needs: equality, sort, range (see the explain table).
CLAIM_INDEX = ("status", "seq", "locked_until")
INSERT_BATCH = 10_000


SECTIONS = ("latency", "contention", "claim", "drain")


@dataclass(frozen=True)
class Plan:
    """How much to measure."""

    rounds: int  # latency: rounds; each runs every contender `cycles` times
    cycles: int
    procs: tuple[int, ...]
    contention_s: float
    sizes: tuple[int, ...]
    claim_rounds: int  # claim: rounds; each takes `claims_per_round` per size
    claims_per_round: int
    drain_docs: int
    drain_procs: int
    drain_rounds: int  # the drain documents are split over these rounds
    drain_limit_s: float  # a drain round stops after this long


FULL = Plan(rounds=20, cycles=100, procs=(2, 4, 8), contention_s=3.0,
            sizes=(1_000, 100_000, 1_000_000), claim_rounds=10, claims_per_round=20,
            drain_docs=10_000, drain_procs=4, drain_rounds=2, drain_limit_s=90)
QUICK = Plan(rounds=4, cycles=50, procs=(2, 4, 8), contention_s=1.0,
             sizes=(1_000, 100_000), claim_rounds=5, claims_per_round=20,
             drain_docs=2_000, drain_procs=4, drain_rounds=1, drain_limit_s=30)


def pct(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def check(ok: object, what: str) -> None:
    if not ok:
        raise RuntimeError(f"benchmark invariant broken: {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- redis ----------------------------------------------------------------------


class RedisServer:
    """A ``redis-server`` on a free 127.0.0.1 port, no persistence, stopped by pid."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self._dir = tempfile.mkdtemp(prefix="compare-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True).stdout
        return next((w[2:] for w in out.split() if w.startswith("v=")), out.strip())

    def start(self) -> RedisServer:
        import redis

        self._proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self._dir, "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM to this pid only
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self._dir, ignore_errors=True)


# -- contenders -----------------------------------------------------------------


@dataclass
class Env:
    """What a contender needs to build its lock, in the parent or a child."""

    uri: str
    redis_port: int | None = None

    def mongo_db(self) -> Any:
        return mongoengine.get_db().client.get_database(DB_NAME, write_concern=MAJORITY)

    def redis(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.redis_port)


# A lock: (acquire(wait seconds) -> bool, release() -> None).
Lock = tuple[Callable[[float], bool], Callable[[], None]]


def lease_lock(env: Env, key: str) -> Lock:
    doc = BenchJob.objects.get(payload=key)
    return (lambda wait: doc.lock(LEASE_S, wait=wait)), doc.release


def named_lock(env: Env, key: str) -> Lock:
    lock = NamedLock(key, duration=LEASE_S)
    return (lambda wait: lock.acquire(wait=wait)), lock.release


def mongoelector_lock(env: Env, key: str) -> Lock:
    from mongoelector import MongoLocker
    from mongoelector.locker import AcquireTimeout, LockExists

    lock = MongoLocker(key, env.mongo_db(), dbcollection="compare_mongoelector", ttl=LEASE_S)

    def acquire(wait: float) -> bool:
        try:
            if wait == 0:
                return bool(lock.acquire(blocking=False))
            return bool(lock.acquire(blocking=True, timeout=wait, step=POLL_S))
        except (AcquireTimeout, LockExists):
            return False

    return acquire, lock.release


def mongolock_lock(env: Env, key: str) -> Lock:
    import mongolock

    lock = mongolock.MongoLock(client=mongoengine.get_db().client, db=DB_NAME,
                               collection="compare_mongolock")
    owner = f"{socket.gethostname()}:{os.getpid()}"
    return (lambda wait: lock.lock(key, owner, timeout=wait or None, expire=LEASE_S),
            lambda: lock.release(key, owner))


def redis_py_lock(env: Env, key: str) -> Lock:
    lock = env.redis().lock(key, timeout=LEASE_S, sleep=POLL_S)

    def acquire(wait: float) -> bool:
        return bool(lock.acquire(blocking=wait > 0, blocking_timeout=wait or None))

    return acquire, lock.release


def python_redis_lock(env: Env, key: str) -> Lock:
    import redis_lock

    # It logs a warning for every refused non-blocking attempt.
    logging.getLogger("redis_lock.acquire").setLevel(logging.ERROR)
    lock = redis_lock.Lock(env.redis(), key, expire=LEASE_S)

    def acquire(wait: float) -> bool:
        if wait == 0:
            return bool(lock.acquire(blocking=False))
        return bool(lock.acquire(blocking=True, timeout=int(wait)))

    return acquire, lock.release


@dataclass
class Contender:
    name: str
    backend: str  # "MongoDB" or "Redis"
    build: Callable[[Env, str], Lock]
    dist: str | None = None  # the PyPI distribution of a peer
    module: str | None = None  # what it imports
    status: str = "ours"
    version: str = ""


OURS = [
    Contender("doc.lock()+release()", "MongoDB", lease_lock),
    Contender("NamedLock", "MongoDB", named_lock),
]
PEERS = [
    Contender("mongoelector MongoLocker", "MongoDB", mongoelector_lock,
              "mongoelector", "mongoelector"),
    Contender("mongolock MongoLock", "MongoDB", mongolock_lock, "mongolock", "mongolock"),
    Contender("redis-py Lock", "Redis", redis_py_lock, "redis", "redis"),
    Contender("python-redis-lock Lock", "Redis", python_redis_lock,
              "python-redis-lock", "redis_lock"),
]
#: Peers looked at that cannot be measured at all, with the reason.
NOT_MEASURABLE = [
    ("mongoenginelock 0.1.0", "its sdist does not build: setup.py reads README.md, which "
     "the sdist does not ship (no wheel is published)"),
    ("dlmenginecli 0.0.4", "a client of the DlmEngine HTTP service, not a MongoDB library"),
    ("sherlock, tooz, pottery, portalocker", "no MongoDB backend (Redis, etcd, "
     "ZooKeeper, files, ...); redis-py's Lock stands for the Redis ones"),
]


def make_key(kind: str, tag: str) -> str:
    return f"compare-{kind}-{tag}".replace(" ", "_").replace("()", "").replace("+", "_")


def prepare_key(contender: Contender, key: str) -> None:
    """Create what a lock needs before it is used (the lease's document)."""
    if contender.build is lease_lock:
        BenchJob(payload=key).save()


def probe_peers(env: Env, redis_ok: str | None) -> list[Contender]:
    """Set each peer's status; return the ones that work."""
    import pymongo

    working = []
    for peer in PEERS:
        assert peer.dist is not None and peer.module is not None
        try:
            peer.version = importlib.metadata.version(peer.dist)
            importlib.import_module(peer.module)
        except (ImportError, importlib.metadata.PackageNotFoundError):
            peer.status = f"peer {peer.dist} not installed: skipped"
            continue
        if peer.backend == "Redis" and redis_ok is not None:
            peer.status = redis_ok
            continue
        key = make_key(peer.name, "probe")
        try:
            acquire, release = peer.build(env, key)
            check(acquire(0), "a free lock is granted")
            check(not peer.build(env, key)[0](0), "a held lock is refused")
            release()
        except Exception as exc:  # any failure means: does not work here
            reason = f"{type(exc).__name__}: {exc}".split(". ")[0]
            peer.status = f"does not work with pymongo {pymongo.version}: {reason}"
            continue
        peer.status = "works"
        working.append(peer)
    return working


# -- 1. uncontended latency -----------------------------------------------------------


@dataclass
class Latency:
    name: str
    backend: str
    samples: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return pct(self.samples, 50)

    @property
    def p99(self) -> float:
        return pct(self.samples, 99)


def measure_latency(env: Env, contenders: list[Contender], plan: Plan) -> list[Latency]:
    raw_doc = BenchJob(payload=make_key("raw", "latency")).save()
    raw = lock_cycle.raw_cycle(BenchJob._get_collection(), raw_doc.pk)
    cycles: list[tuple[Latency, Callable[[], None]]] = [
        (Latency("raw pymongo pair", "MongoDB"), raw)
    ]
    for contender in contenders:
        key = make_key(contender.name, "latency")
        prepare_key(contender, key)
        acquire, release = contender.build(env, key)

        def cycle(acquire: Callable[[float], bool] = acquire,
                  release: Callable[[], None] = release) -> None:
            if not acquire(0):
                raise RuntimeError("an uncontended lock was refused")
            release()

        cycles.append((Latency(contender.name, contender.backend), cycle))
    for _, cycle in cycles:
        for _ in range(max(plan.cycles // 4, 5)):
            cycle()
    clock = time.perf_counter
    for r in range(plan.rounds):
        shift = r % len(cycles)
        for latency, cycle in cycles[shift:] + cycles[:shift]:
            samples = latency.samples
            for _ in range(plan.cycles):
                start = clock()
                cycle()
                samples.append(clock() - start)
    return [latency for latency, _ in cycles]


# -- worker processes -----------------------------------------------------------------


def _connect(env: Env) -> None:
    mongoengine.connect(db=DB_NAME, host=env.uri)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _worker_main(index: int, env: Env, inbox: Any, results: Any) -> None:
    """A worker process: for each job, prepare (connect, build the lock), say
    "ready", wait for "go", run the timed part, report. ``None`` ends it."""
    try:
        _connect(env)
        mongoengine.get_db().command("ping")
    except Exception as exc:
        results.put(("error", index, _error(exc)))
        return
    results.put(("up", index, None))
    while (job := inbox.get()) is not None:
        try:
            run = _JOBS[job[0]](env, *job[1:])
        except Exception as exc:
            results.put(("error", index, _error(exc)))
            continue
        results.put(("ready", index, None))
        if inbox.get() != "go":
            continue
        try:
            results.put(("done", index, run()))
        except Exception as exc:
            results.put(("error", index, _error(exc)))


class Workers:
    """Worker processes started once (spawn) and given jobs; a job runs on
    several of them, started together once all are prepared."""

    def __init__(self, count: int, env: Env, limit: float = 120) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._results = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(count)]
        self._procs = [ctx.Process(target=_worker_main, args=(i, env, inbox, self._results),
                                   daemon=True) for i, inbox in enumerate(self._inboxes)]
        for proc in self._procs:
            proc.start()
        self._collect(count, "up", limit)

    def _collect(self, count: int, phase: str, limit: float) -> tuple[dict[int, Any], list[str]]:
        got: dict[int, Any] = {}
        errors = []
        deadline = time.monotonic() + limit
        for _ in range(count):
            try:
                kind, index, payload = self._results.get(
                    timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                raise RuntimeError(f"a worker is silent after {limit:.0f} s ({phase})") from None
            if kind == "error":
                errors.append(payload)
            else:
                got[index] = payload
        if errors and phase == "up":
            raise RuntimeError(f"a worker failed to start: {errors[0]}")
        return got, errors

    def run(self, jobs: list[tuple[Any, ...]], limit: float) -> list[Any]:
        """Run ``jobs[i]`` on worker ``i``, all started together; their results."""
        inboxes = self._inboxes[: len(jobs)]
        for inbox, job in zip(inboxes, jobs):
            inbox.put(job)
        ready, errors = self._collect(len(jobs), "prepare", 60)
        signal = "abort" if errors else "go"
        for index in ready:
            inboxes[index].put(signal)
        if errors:
            raise RuntimeError(f"job {jobs[0][0]} failed to prepare: {errors[0]}")
        done, errors = self._collect(len(jobs), "run", limit)
        if errors:
            raise RuntimeError(f"job {jobs[0][0]} failed: {errors[0]}")
        return [done[i] for i in range(len(jobs))]

    def close(self) -> None:
        for inbox in self._inboxes:
            inbox.put(None)
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()  # this worker's pid only
                proc.join(5)


# -- 2. contention ----------------------------------------------------------------


def _contend_job(env: Env, index: int, key: str,
                 duration: float) -> Callable[[], tuple[int, list[float]]]:
    acquire, release = (OURS + PEERS)[index].build(env, key)

    def run() -> tuple[int, list[float]]:
        """Acquisitions granted within ``duration``, and each one's wait."""
        waits: list[float] = []
        end = time.monotonic() + duration
        while time.monotonic() < end:
            asked = time.monotonic()
            if acquire(WAIT_S):
                granted = time.monotonic()
                release()
                if granted <= end:
                    waits.append(granted - asked)
        return len(waits), waits

    return run


def jain(counts: Sequence[float]) -> float:
    """Jain's fairness index of per-process counts: 1 when all are served
    alike, 1/n when one process gets everything."""
    total = sum(counts)
    squares = sum(c * c for c in counts)
    return total * total / (len(counts) * squares) if squares else 0.0


@dataclass
class Contended:
    """One contender with N processes: acquisitions/s in total, Jain's index
    over the per-process counts, and every acquisition's wait (seconds)."""

    rate: float
    fairness: float
    waits: list[float]
    counts: list[int]

    @property
    def p99_wait(self) -> float:
        return pct(self.waits, 99) if self.waits else math.inf


@dataclass
class Contention:
    name: str
    backend: str
    per_procs: dict[int, Contended] = field(default_factory=dict)


def measure_contention(workers: Workers, contenders: list[Contender],
                       plan: Plan) -> list[Contention]:
    everyone = OURS + PEERS
    rows = {c.name: Contention(c.name, c.backend) for c in contenders}
    for r, procs in enumerate(plan.procs):
        shift = r % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            key = make_key(contender.name, f"contend{procs}")
            prepare_key(contender, key)
            job = ("contend", everyone.index(contender), key, plan.contention_s)
            results = workers.run([job] * procs, limit=plan.contention_s + WAIT_S + 30)
            counts = [count for count, _ in results]
            rows[contender.name].per_procs[procs] = Contended(
                rate=sum(counts) / plan.contention_s, fairness=jain(counts),
                waits=[w for _, waits in results for w in waits], counts=counts)
    return list(rows.values())


def contention_ratios(res: Results) -> list[tuple[int, float]]:
    """Our named lock's acquisitions/s over mongoelector's (5 ms polling), per
    number of processes."""
    ours = next((c for c in res.contention if c.name == "NamedLock"), None)
    peer = next((c for c in res.contention if c.name.startswith("mongoelector")), None)
    if ours is None or peer is None:
        return []
    return [(n, ours.per_procs[n].rate / peer.per_procs[n].rate)
            for n in sorted(ours.per_procs) if peer.per_procs[n].rate]


# -- 3. claim() vs collection size -----------------------------------------------------


_task_classes: dict[str, type] = {}


def task_class(collection: str) -> Any:
    """A lockable document class on ``collection``, with the claim index."""
    cls = _task_classes.get(collection)
    if cls is None:
        cls = type(f"Task_{collection}", (LockableMixin, mongoengine.Document), {
            "__module__": __name__,
            "status": mongoengine.StringField(),
            "seq": mongoengine.IntField(),
            "meta": {"collection": collection, "indexes": [CLAIM_INDEX]},
        })
        _task_classes[collection] = cls
    return cls


def fill(cls: Any, size: int, *, done_every: int = 0) -> float:
    """Recreate ``cls``'s collection with ``size`` minimal documents (without
    lease fields: they count as unlocked); 1 in ``done_every`` is "done".
    Returns the insert time in seconds (indexes exist during the insert)."""
    cls.drop_collection()
    cls.ensure_indexes()
    coll = cls._get_collection().with_options(write_concern=MAJORITY)
    start = time.perf_counter()
    for first in range(0, size, INSERT_BATCH):
        coll.insert_many(
            [{"status": "done" if done_every and i % done_every == 0 else "pending", "seq": i}
             for i in range(first, min(first + INSERT_BATCH, size))],
            ordered=False,
        )
    return time.perf_counter() - start


class FindAndModifyCapture(monitoring.CommandListener):
    """Keeps the last findAndModify command sent: the one explained below."""

    def __init__(self) -> None:
        self.last: dict[str, Any] | None = None

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "findAndModify":
            self.last = dict(event.command)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@dataclass
class ExplainRow:
    index: str
    plan: str
    keys: int
    docs: int
    ms: int


def explain_claim(cls: Any, command: dict[str, Any]) -> list[ExplainRow]:
    """Explain the claim's own findAndModify with each candidate index hinted,
    and without a hint (the planner's choice). Extra candidates are dropped after."""
    coll = cls._get_collection()
    db = coll.database
    command = {k: v for k, v in command.items()
               if k not in ("lsid", "$db", "$clusterTime", "txnNumber", "writeConcern",
                            "$readPreference")}
    esr = "_".join(f"{f}_1" for f in CLAIM_INDEX)
    extra = {"status_1_locked_until_1_seq_1": [("status", 1), ("locked_until", 1), ("seq", 1)],
             "status_1_seq_1": [("status", 1), ("seq", 1)]}
    for name, keys in extra.items():
        coll.create_index(keys, name=name)

    def stages(plan: dict[str, Any]) -> list[str]:
        name = plan["stage"] + (f"({plan['indexName']})" if "indexName" in plan else "")
        return [name, *stages(plan["inputStage"])] if "inputStage" in plan else [name]

    def run(hint: str | None) -> ExplainRow:
        cmd = dict(command, hint=hint) if hint else command
        out = db.command("explain", cmd, verbosity="executionStats")
        st = out["executionStats"]
        plan = stages(out["queryPlanner"]["winningPlan"])
        index = next((p[p.index("(") + 1:-1] for p in plan if "(" in p), "-")
        shown = " > ".join(p.split("(")[0] for p in plan)
        return ExplainRow(index if hint else f"no hint: {index}", shown,
                          st["totalKeysExamined"], st["totalDocsExamined"],
                          st["executionTimeMillis"])

    try:
        return [*(run(h) for h in (esr, *extra, "locked_until_1")), run(None)]
    finally:
        for name in extra:
            coll.drop_index(name)


@dataclass
class ClaimRow:
    size: int
    insert_s: float
    samples: list[float] = field(default_factory=list)


def measure_claims(plan: Plan, capture: FindAndModifyCapture
                   ) -> tuple[list[ClaimRow], list[ExplainRow]]:
    rows, classes = [], []
    for size in plan.sizes:
        cls = task_class(f"compare_claim_{size}")
        print(f"  inserting {size:,} documents ...", flush=True)
        rows.append(ClaimRow(size, fill(cls, size, done_every=10)))
        classes.append(cls)
    for cls in classes:  # warm-up: plan cache and the first pages of each index
        cls.objects(status="pending").order_by("seq").claim(LEASE_S).release()
    explained: list[ExplainRow] = []
    clock = time.perf_counter
    for r in range(plan.claim_rounds):
        shift = r % len(rows)
        for row, cls in (list(zip(rows, classes))[shift:] + list(zip(rows, classes))[:shift]):
            qs = cls.objects(status="pending").order_by("seq")
            held = []
            # Claims are held for the round, as by a pool of workers: each
            # claim skips the documents the earlier ones of the round hold.
            for _ in range(plan.claims_per_round):
                start = clock()
                doc = qs.claim(LEASE_S)
                row.samples.append(clock() - start)
                check(doc is not None, "a free document is claimed")
                held.append(doc)
            check(len({d.pk for d in held}) == len(held), "claims never share a document")
            if r == 0 and row is rows[-1]:
                assert capture.last is not None
                explained = explain_claim(cls, capture.last)
            for doc in held:
                doc.release()
    for cls in classes:
        cls.drop_collection()
    return rows, explained


# -- 4. drain ------------------------------------------------------------------------


DRAIN_OURS = "claim() + update_if_held()"
DRAIN_RAW = "raw find_one_and_update x2 (same lease)"
DRAIN_POP = "raw find_one_and_update pop (no lease)"
#: The drains and their round trips per document.
DRAINS = {DRAIN_OURS: 2, DRAIN_RAW: 2, DRAIN_POP: 1}


def _drain_job(env: Env, kind: str, collection: str,
               limit: float) -> Callable[[], tuple[list[int], float, float]]:
    cls = task_class(collection)
    coll = cls._get_collection().with_options(write_concern=MAJORITY)
    qs = cls.objects(status="pending").order_by("seq")

    def ours() -> int | None:
        doc = qs.claim(LEASE_S)
        if doc is None:
            return None
        doc.update_if_held(set__status="done")
        seq: int = doc.seq
        return seq

    def raw_lease() -> int | None:
        # The same two commands as ours: LeaseOps.grant's filter and update,
        # then the completion guarded by owner, fence and an unexpired lease.
        owner = os.urandom(6).hex()
        got = coll.find_one_and_update(
            {"status": "pending", "$expr": {"$lte": ["$locked_until", "$$NOW"]}},
            [{"$set": {"locked_until": {"$add": ["$$NOW", LEASE_S * 1000]},
                       "locked_by": {"$literal": owner},
                       "lock_fence": {"$add": [{"$ifNull": ["$lock_fence", 0]}, 1]}}}],
            sort=[("seq", 1)], return_document=ReturnDocument.AFTER,
        )
        if got is None:
            return None
        done = coll.find_one_and_update(
            {"_id": got["_id"], "locked_by": owner, "lock_fence": got["lock_fence"],
             "$expr": {"$gt": ["$locked_until", "$$NOW"]}},
            {"$set": {"status": "done"}}, return_document=ReturnDocument.AFTER,
        )
        check(done is not None, "the raw guarded update applies")
        seq: int = got["seq"]
        return seq

    def raw_pop() -> int | None:
        got = coll.find_one_and_update({"status": "pending"}, {"$set": {"status": "done"}},
                                       sort=[("seq", 1)], projection={"seq": True})
        return None if got is None else int(got["seq"])

    take = {DRAIN_OURS: ours, DRAIN_RAW: raw_lease, DRAIN_POP: raw_pop}[kind]

    def run() -> tuple[list[int], float, float]:
        seqs: list[int] = []
        start = time.monotonic()
        end = start + limit
        while time.monotonic() < end and (seq := take()) is not None:
            seqs.append(seq)
        return seqs, start, time.monotonic()

    return run


_JOBS: dict[str, Callable[..., Callable[[], Any]]] = {"contend": _contend_job, "drain": _drain_job}


@dataclass
class DrainRow:
    kind: str
    docs: int = 0
    seconds: float = 0.0
    rounds: list[float] = field(default_factory=list)  # docs/s of each round
    complete: bool = True  # every round drained its collection before the time limit

    @property
    def rate(self) -> float:
        return self.docs / self.seconds


def measure_drain(workers: Workers, plan: Plan) -> list[DrainRow]:
    rows = {kind: DrainRow(kind) for kind in DRAINS}
    cls = task_class("compare_drain")
    kinds = list(DRAINS)
    per_round = plan.drain_docs // plan.drain_rounds
    for r in range(plan.drain_rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            fill(cls, per_round)
            job = ("drain", kind, "compare_drain", plan.drain_limit_s)
            out = workers.run([job] * plan.drain_procs, limit=plan.drain_limit_s + 60)
            seqs = [s for got, _, _ in out for s in got]
            check(len(seqs) == len(set(seqs)), f"{kind}: no document drained twice")
            check(cls.objects(status="done").count() == len(seqs),
                  f"{kind}: every drained document is done, no other")
            seconds = max(o[2] for o in out) - min(o[1] for o in out)
            row = rows[kind]
            row.docs += len(seqs)
            row.seconds += seconds
            row.rounds.append(len(seqs) / seconds)
            row.complete &= len(seqs) == per_round
    cls.drop_collection()
    return list(rows.values())


# -- output --------------------------------------------------------------------------


def rst_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A reST simple table."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    rule = "  ".join("=" * w for w in widths)

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([rule, line(cells[0]), rule, *map(line, cells[1:]), rule])


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


@dataclass
class Results:
    when: datetime
    mode: str
    machine: str
    load: list[tuple[float, float, float]]
    latency: list[Latency]
    contention: list[Contention]
    claims: list[ClaimRow]
    explained: list[ExplainRow]
    drains: list[DrainRow]
    peers: list[Contender]
    phases: dict[str, float]
    plan: Plan

    def ratio(self) -> float:
        raw = next(r for r in self.latency if r.name == "raw pymongo pair")
        ours = next(r for r in self.latency if r.name == OURS[0].name)
        return ours.p50 / raw.p50


def render_contention(res: Results) -> str:
    plan = res.plan
    sub = "Contention: one lock, many processes"
    procs = plan.procs
    out = [sub, "^" * len(sub), "",
            f"N processes loop acquire (waiting up to {WAIT_S} s) + release on ONE lock for "
            f"{plan.contention_s:g} s, contenders interleaved; per cell: acquisitions per "
            "second in total, Jain's fairness index over the per-process counts (1: all "
            "served alike; 1/N: one process takes everything), and the p99 of the time "
            "from an acquire call to its grant. Our locks queue their waiters in the "
            "record, a release hands the lease to the next one in the same write and "
            f"only that waiter is woken (change stream); mongoelector and redis-py poll "
            f"every {POLL_S * 1e3:g} ms; python-redis-lock blocks on BLPOP.", ""]
    out.append(rst_table(
        ["contender", "backend", *[f"{n} processes: acq/s, Jain, p99 wait" for n in procs]],
        [[c.name, c.backend, *[f"{c.per_procs[n].rate:,.0f}, {c.per_procs[n].fairness:.3f}, "
                               f"{ms(c.per_procs[n].p99_wait)} ms" for n in procs]]
         for c in res.contention]))
    ratios = contention_ratios(res)
    if ratios:
        out += ["", "NamedLock / mongoelector (5 ms polling), acquisitions/s: "
                + ", ".join(f"{n} processes {r:.2f}x" for n, r in ratios) + "."]
    out.append("")
    return "\n".join(out)


def render(res: Results) -> str:
    plan = res.plan
    raw = next(r for r in res.latency if r.name == "raw pymongo pair")
    head = "Benchmark: leases and locks compared"
    out = [
        head, "~" * len(head), "",
        f"Measured {res.when:%Y-%m-%d %H:%M} UTC by ``benchmarks/compare.py`` "
        f"({res.mode} run, {sum(res.phases.values()):.0f} s).", "",
        f"Machine: {res.machine}.", "",
        "Load average (1 min) at the start of each section: "
        + ", ".join(f"{name} {load[0]:.1f}" for name, load in zip(res.phases, res.load))
        + ". Other work sharing the 2 cores shows in the tails (p99).", "",
    ]

    sub = "Uncontended acquire + release"
    out += [sub, "^" * len(sub), "",
            f"One lock per contender, nobody else using it; {plan.rounds} rounds x "
            f"{plan.cycles} cycles per contender, interleaved (the order rotates each "
            "round); each cycle timed on its own. The raw pymongo pair is the two "
            "conditional ``find_one_and_update`` of ``benchmarks/lock_cycle.py``: the floor "
            "for a lease in MongoDB.", ""]
    out.append(rst_table(
        ["contender", "backend", "p50 (ms)", "p99 (ms)", "mean (ms)", "cycles/s", "p50 / raw"],
        [[r.name, r.backend, ms(r.p50), ms(r.p99), ms(statistics.fmean(r.samples)),
          f"{1 / statistics.fmean(r.samples):,.0f}", f"{r.p50 / raw.p50:.2f}"]
         for r in res.latency]))
    out.append("")

    out += render_contention(res).split("\n")

    sub = "claim() and collection size"
    base = res.claims[0]
    out += [sub, "^" * len(sub), "",
            "``Task.objects(status=\"pending\").order_by(\"seq\").claim(30)`` on collections "
            "of minimal documents (``{status, seq}``, 9 in 10 pending, no lease fields: "
            f"never locked), inserted {INSERT_BATCH:,} per ``insert_many`` (write concern "
            f"majority) with the indexes in place. {plan.claim_rounds} rounds x "
            f"{plan.claims_per_round} claims per size, sizes interleaved; the claims of a "
            "round are held until it ends (as by a pool of workers), so each skips the "
            "documents held before it.", "",
            f"Index: ``{CLAIM_INDEX}`` (equality, sort, range), declared in the "
            "document's ``meta['indexes']``, next to the mixin's own ``locked_until`` index.", ""]
    out.append(rst_table(
        ["documents", "insert (s)", "insert (docs/s)", "claim p50 (ms)", "claim p99 (ms)",
         "p50 / smallest"],
        [[f"{r.size:,}", f"{r.insert_s:.1f}", f"{r.size / r.insert_s:,.0f}",
          ms(pct(r.samples, 50)), ms(pct(r.samples, 99)),
          f"{pct(r.samples, 50) / pct(base.samples, 50):.2f}"] for r in res.claims]))
    big = res.claims[-1]
    ratio = pct(big.samples, 50) / pct(base.samples, 50)
    out += ["", f"Target: claim p50 at {big.size:,} documents within 2x of that at "
            f"{base.size:,}: {ratio:.2f}x, {'met' if ratio <= 2 else 'NOT met'}.", ""]
    out += [f"The claim's own ``findAndModify``, explained (``executionStats``) on the "
            f"{big.size:,}-document collection while {plan.claims_per_round} documents are "
            "held, with each candidate index hinted, then as the planner chooses with all "
            "of them present. Only the equality-sort-range index gives an ``IXSCAN`` "
            "without a blocking ``SORT`` whose scan skips held documents in the index "
            "(keys examined = held + 1, one document fetched).", ""]
    out.append(rst_table(
        ["index", "plan", "keys examined", "docs examined", "time (ms)"],
        [[r.index, r.plan, f"{r.keys:,}", f"{r.docs:,}", r.ms] for r in res.explained]))
    out.append("")

    sub = "Draining a queue"
    out += [sub, "^" * len(sub), "",
            f"{plan.drain_procs} processes drain {plan.drain_docs:,} pending documents "
            "per contender (ordered by ``seq``, same index), in "
            f"{plan.drain_rounds} round(s) of {plan.drain_docs // plan.drain_rounds:,} "
            "(the order of the contenders reversed in every other round); checked: no "
            "document drained twice, every drained one marked done. Each worker loops "
            "take + mark done until nothing is left. Ours: ``claim()`` then "
            "``update_if_held(set__status=\"done\")``; raw x2: the same two commands in "
            "pymongo; raw pop: one ``find_one_and_update`` from pending to done, no lease "
            "(a crashed worker's document is lost), the floor for a drain.", ""]
    incomplete = [d.kind for d in res.drains if not d.complete]
    if incomplete:
        out += [f"Stopped by the {plan.drain_limit_s:g} s limit before the end: "
                + ", ".join(incomplete) + ".", ""]
    out.append(rst_table(
        ["drain", "round trips per doc", "docs", "seconds", "docs/s", "per round (docs/s)"],
        [[d.kind, DRAINS[d.kind], f"{d.docs:,}", f"{d.seconds:.1f}", f"{d.rate:,.0f}",
          ", ".join(f"{x:,.0f}" for x in d.rounds)] for d in res.drains]))
    out.append("")

    sub = "Peers"
    out += [sub, "^" * len(sub), ""]
    out.append(rst_table(
        ["package", "version", "backend", "status"],
        [[p.dist, p.version or "-", p.backend, p.status] for p in res.peers]))
    out += ["", "Looked at and not measurable:", ""]
    out += [f"- {name}: {why}." for name, why in NOT_MEASURABLE]
    out.append("")

    sub = "Run time"
    out += [sub, "^" * len(sub), ""]
    out.append(rst_table(["section", "seconds"],
                         [[k, f"{v:.0f}"] for k, v in res.phases.items()]))
    out += ["", f"Our lease cycle / raw pymongo pair (p50): {res.ratio():.3f}.", ""]
    return "\n".join(out)


def chart(res: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {}
    palette = plt.get_cmap("tab10").colors
    for i, name in enumerate([r.name for r in res.latency]):
        colors[name] = palette[i % len(palette)]

    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    loads = [load[0] for load in res.load]
    fig.suptitle(f"mongoengine-lockable vs peers ({res.when:%Y-%m-%d}, {res.mode} run; "
                 f"load average {min(loads):.1f}-{max(loads):.1f})\n"
                 + textwrap.fill(res.machine, 150), fontsize=9)

    ax = axes[0][0]
    names = [r.name for r in res.latency]
    ys = range(len(names))
    # Inverted y axis: p50 (y - 0.2) is drawn above p99.
    ax.barh([y - 0.2 for y in ys], [r.p50 * 1e3 for r in res.latency], height=0.4,
            color=[colors[n] for n in names], label="p50")
    ax.barh([y + 0.2 for y in ys], [r.p99 * 1e3 for r in res.latency], height=0.4,
            color=[colors[n] for n in names], alpha=0.45, label="p99 (light)")
    for y, r in zip(ys, res.latency):
        ax.text(r.p50 * 1e3, y - 0.2, f" {r.p50 * 1e3:.2f}", va="center", fontsize=8)
        ax.text(r.p99 * 1e3, y + 0.2, f" {r.p99 * 1e3:.2f}", va="center", fontsize=8)
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per acquire + release (uncontended)")
    ax.set_title("Latency: p50 (dark) and p99 (light)", fontsize=10)
    ax.set_xlim(0, max(r.p99 for r in res.latency) * 1e3 * 1.2)

    ax = axes[0][1]
    for c in res.contention:
        procs = sorted(c.per_procs)
        ax.plot(procs, [c.per_procs[n].rate for n in procs], marker="o", label=c.name,
                color=colors.get(c.name))
    ax.set_xticks(list(res.plan.procs))
    ax.set_yscale("log")
    ax.set_xlabel("processes contending for one lock")
    ax.set_ylabel("acquisitions/s (total, log scale)")
    ax.set_title(f"Contention throughput ({res.plan.contention_s:g} s per point)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[1][0]
    sizes = [r.size for r in res.claims]
    p50 = [pct(r.samples, 50) * 1e3 for r in res.claims]
    ax.plot(sizes, p50, marker="o", label="claim() p50")
    ax.plot(sizes, [pct(r.samples, 99) * 1e3 for r in res.claims], marker="s",
            linestyle="--", label="claim() p99")
    ax.axhline(p50[0] * 2, color="grey", linestyle=":", label=f"2x p50 at {sizes[0]:,}")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
    ax.set_ylim(0, None)
    ax.set_xlabel("documents in the collection")
    ax.set_ylabel("ms per claim")
    ax.set_title(f"claim() latency vs collection size, index {CLAIM_INDEX}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)

    ax = axes[1][1]
    kinds = [d.kind for d in res.drains]
    bars = ax.bar(range(len(kinds)), [d.rate for d in res.drains],
                  color=[palette[1], palette[0], palette[7]])
    for bar, d in zip(bars, res.drains):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{d.rate:,.0f}",
                ha="center", va="bottom", fontsize=9)
    labels = [k.replace(" (", "\n(").replace("update ", "update\n") for k in kinds]
    ax.set_xticks(range(len(kinds)), labels, fontsize=8)
    ax.set_ylabel("documents/s")
    ax.set_title(f"Drain: {res.plan.drain_procs} processes, {res.plan.drain_docs:,} documents "
                 "per contender", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------


def describe_machine(uri_given: bool, redis: RedisServer | None) -> str:
    db = mongoengine.get_db()
    version = db.command("buildInfo")["version"]
    hello = db.command("hello")
    if "setName" in hello:
        n = len(hello.get("hosts", []))
        topology = f"{'single-node' if n == 1 else f'{n}-member'} replica set"
    else:
        topology = "standalone"
    where = "at --uri" if uri_given else "embedded, 127.0.0.1, WiredTiger cache 1 GB"
    parts = [
        f"{os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}",
        f"MongoDB {version} {topology} ({where}), write concern majority",
        f"pymongo {importlib.metadata.version('pymongo')}, "
        f"mongoengine {importlib.metadata.version('mongoengine')}",
    ]
    if redis is not None:
        parts.append(f"redis-server {redis.version} on 127.0.0.1, no persistence")
    return "; ".join(parts)


@contextmanager
def section(name: str, phases: dict[str, float], load: list[Any]) -> Iterator[None]:
    print(f"[{name}] ...", flush=True)
    load.append(os.getloadavg())
    start = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - start
    print(f"[{name}] {phases[name]:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default=os.environ.get("MONGODB_URI"))
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
    parser.add_argument("--drain-docs", type=int, metavar="N",
                        help="documents each drain contender drains (default 10,000; "
                        "quick: 2,000)")
    parser.add_argument("--out-dir", type=Path,
                        default=Path(__file__).resolve().parent.parent / "docs")
    parser.add_argument("--only", choices=SECTIONS, action="append", metavar="SECTION",
                        help=f"run only this section ({', '.join(SECTIONS)}; repeatable); "
                        "prints its table and writes no files")
    args = parser.parse_args()
    try:
        import matplotlib  # noqa: F401  # fail now, not after the run
    except ImportError:
        sys.exit("matplotlib is required for the chart: pip install matplotlib")
    plan = QUICK if args.quick else FULL
    if args.drain_docs:
        plan = dataclasses.replace(plan, drain_docs=args.drain_docs)
    phases: dict[str, float] = {}
    load: list[Any] = []
    when = datetime.now(timezone.utc)
    capture = FindAndModifyCapture()
    with ExitStack() as stack:
        with section("start servers and workers", phases, load):
            uri = args.uri
            if not uri:
                from mongoengine_lockable.testing import MongodReplicaSet

                uri = stack.enter_context(MongodReplicaSet(1, cache_size_gb=1.0)).uri
            mongoengine.connect(db=DB_NAME, host=uri, event_listeners=[capture])
            stack.callback(mongoengine.disconnect)
            mongoengine.get_db().client.drop_database(DB_NAME)
            stack.callback(lambda: mongoengine.get_db().client.drop_database(DB_NAME))
            redis_server, redis_missing = None, None
            binary = shutil.which("redis-server")
            if binary is None:
                redis_missing = "redis-server not found: skipped"
            elif importlib.util.find_spec("redis") is None:
                redis_missing = "peer redis not installed: skipped"
            else:
                redis_server = RedisServer(binary).start()
                stack.callback(redis_server.stop)
            env = Env(uri, redis_server.port if redis_server else None)
            machine = describe_machine(bool(args.uri), redis_server)
            peers = probe_peers(env, redis_missing)
            for peer in PEERS:
                print(f"  {peer.dist}: {peer.status}", flush=True)
            workers = Workers(max(*plan.procs, plan.drain_procs), env)
            stack.callback(workers.close)
        contenders = OURS + peers
        wanted = set(args.only or SECTIONS)
        latency, contention, claims, explained, drains = [], [], [], [], []
        if "latency" in wanted:
            with section("latency", phases, load):
                latency = measure_latency(env, contenders, plan)
        if "contention" in wanted:
            with section("contention", phases, load):
                contention = measure_contention(workers, contenders, plan)
        if "claim" in wanted:
            with section("claim", phases, load):
                claims, explained = measure_claims(plan, capture)
        if "drain" in wanted:
            with section("drain", phases, load):
                drains = measure_drain(workers, plan)
    res = Results(when, "quick" if args.quick else "full", machine, load, latency, contention,
                  claims, explained, drains, PEERS, phases, plan)
    if args.only:
        print(render_contention(res) if contention else "", flush=True)
        for row in latency:
            print(f"{row.name}: p50 {ms(row.p50)} ms, p99 {ms(row.p99)} ms")
        return
    text = render(res)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "benchmark.rst").write_text(text + "\n")
    chart(res, args.out_dir / "benchmark.png")
    print()
    print(text)
    print(f"wrote {args.out_dir / 'benchmark.rst'} and {args.out_dir / 'benchmark.png'}")
    print(f"ratio our lease cycle / raw pymongo pair (p50 of "
          f"{plan.rounds * plan.cycles} cycles each): {res.ratio():.3f}")


if __name__ == "__main__":
    main()
