"""Leases through a fail-over: the primary of a 3-member replica set is frozen
(``SIGSTOP``) for longer than an election while worker processes keep taking,
holding and releasing a document lease and a named lock.

Three workers pass one document's lease around, two a named lock
(command ``failover`` of ``tests/workers.py``). Each records every hold to
a file of its own (the database is what is failing over): when the acquisition
returned, when the release was sent, and whether ``release()`` succeeded (a
"completed" hold). What must hold throughout:

- no two completed holds of the same lock overlap in time;
- their fences grow with the time of acquisition;
- a new primary is elected while the old one is frozen, and every worker
  completes holds again after it is let go (when it steps down and rolls back
  whatever it had not replicated).

A variant runs the same fail-over with five workers sharing a semaphore of
limit 2: never more than 2 completed holds at once, fences unique and growing
with the grants.

Timings and counts are printed (run with ``-s``); the only time limits are
generous ones that turn a hang into a failure.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from pymongo import MongoClient
from pymongo.write_concern import WriteConcern

from mongoengine_lockable.testing import MongodReplicaSet
from mongoengine_lockable.testing.plugin import start_replica_set_or_skip

from _children import Child, Children, assert_fences_follow_grants, max_overlap

#: The workers' client: a call stuck on the frozen primary times out after
#: 4 s; then the driver waits for a new primary (up to 30 s), watching the set
#: every 0.5 s. connectTimeoutMS bounds the handshake of a new connection: the
#: driver's retry opens one to the primary it still believes in, and a frozen
#: mongod's kernel accepts the TCP connection, so without it the retry waits
#: the default 20 s (measured: every call in flight at the pause then hung
#: until the resume).
CLIENT_OPTIONS = (
    "socketTimeoutMS=4000&connectTimeoutMS=2000&serverSelectionTimeoutMS=30000"
    "&heartbeatFrequencyMS=500"
)

DOC_WORKERS = 3
NAMED_WORKERS = 2
LEASE = 1.5
WAIT = 5
HOLD = (0.02, 0.05)
LOCK_NAME = "failover-named"
SEMAPHORE_WORKERS = 5
SEMAPHORE_LIMIT = 2
SEMAPHORE_NAME = "failover-semaphore"

#: The timeline, in seconds: normal running, the primary frozen, then running
#: on until every worker has made progress (at least AFTER_MIN, at most
#: PROGRESS_LIMIT after the resume).
BEFORE = 4.0
PAUSED = 8.0
AFTER_MIN = 6.0
PROGRESS_LIMIT = 30.0
START_TIMEOUT = 60.0
JOIN_TIMEOUT = 45.0


@pytest.fixture(scope="module")
def replica_set() -> Iterator[MongodReplicaSet]:
    """A 3-member replica set for this module, stopped (by pid) at its end;
    ``stop()`` sends ``SIGCONT`` first, so a member left paused stops too."""
    rs = start_replica_set_or_skip(3)
    try:
        yield rs
    finally:
        rs.stop()


def read_events(path: Path) -> list[dict[str, Any]]:
    """The worker's records so far (a line being written is skipped)."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return events


def completed_after(events: list[dict[str, Any]], since: float) -> int:
    return sum(
        1 for e in events if e["event"] == "hold" and e["ok"] and e["t_acquired"] >= since
    )


def assert_exclusive(holds: list[dict[str, Any]], what: str) -> None:
    """No two intervals [t_acquired, t_release_start] overlap, and fences grow
    strictly in order of acquisition."""
    holds = sorted(holds, key=lambda h: h["t_acquired"])
    overlaps = []
    latest: dict[str, Any] | None = None  # the hold that ends last so far
    for hold in holds:
        if latest is not None and hold["t_acquired"] < latest["t_release_start"]:
            overlaps.append((latest, hold))
        if latest is None or hold["t_release_start"] > latest["t_release_start"]:
            latest = hold
    assert not overlaps, f"{what}: {len(overlaps)} overlapping completed holds: {overlaps[:5]}"
    fences = [h["fence"] for h in holds]
    backwards = [(a, b) for a, b in zip(holds, holds[1:]) if b["fence"] <= a["fence"]]
    assert not backwards, f"{what}: fences not strictly increasing: {backwards[:5]}"
    assert len(set(fences)) == len(fences)


def _hold(start: float, end: float, fence: int) -> dict[str, Any]:
    return {"t_acquired": start, "t_release_start": end, "fence": fence}


def test_exclusivity_check_catches_overlaps_and_fences() -> None:
    """The checker itself: it passes back-to-back holds and catches an overlap
    (also one hidden inside a long hold) and a fence that does not grow."""
    assert_exclusive([_hold(0, 1, 1), _hold(1, 2, 2), _hold(2.5, 3, 7)], "ok")
    with pytest.raises(AssertionError, match="overlapping"):
        assert_exclusive([_hold(0, 2, 1), _hold(1, 3, 2)], "x")
    with pytest.raises(AssertionError, match="overlapping"):
        assert_exclusive([_hold(0, 5, 1), _hold(1, 2, 2), _hold(6, 7, 3)], "x")
    with pytest.raises(AssertionError, match="fences"):
        assert_exclusive([_hold(0, 1, 2), _hold(2, 3, 2)], "x")
    with pytest.raises(AssertionError, match="fences"):
        assert_exclusive([_hold(0, 1, 3), _hold(2, 3, 2)], "x")


@dataclass
class Run:
    """What one run through a frozen primary recorded: every worker's events,
    and the timeline (wall-clock times of the start, pause, election, resume
    and stop; the old and new primary)."""

    events: dict[str, list[dict[str, Any]]]
    timeline: dict[str, Any]

    @property
    def completed(self) -> list[dict[str, Any]]:
        return [e for evs in self.events.values() for e in evs
                if e["event"] == "hold" and e["ok"]]


def run_through_freeze(
    rs: MongodReplicaSet, tmp_path: Path, db_name: str,
    specs: list[tuple[str, dict[str, Any]]],
) -> Run:
    """Start the ``failover`` workers ``specs`` (name, arguments), let them
    run, freeze the primary for :data:`PAUSED` seconds, let it go, run on
    until every worker has completed a hold since (or
    :data:`PROGRESS_LIMIT`), then stop them and collect what they recorded."""
    uri = f"{rs.uri}&{CLIENT_OPTIONS}"
    stop_file = tmp_path / "stop"
    common = {
        "uri": uri,
        "db": db_name,
        "lease": LEASE,
        "wait": WAIT,
        "hold": list(HOLD),
        "stop": str(stop_file),
        "handshake": True,
        "max_seconds": 180,
    }
    children = Children(tmp_path)
    workers: list[Child] = []
    paths: dict[str, Path] = {}
    paused: int | None = None
    try:
        for name, extra in specs:
            paths[name] = tmp_path / f"{name}.jsonl"
            args = {**common, **extra, "out": str(paths[name])}
            workers.append(children.start("failover", args, name=name))
        for worker in workers:
            worker.expect("READY", START_TIMEOUT)
        t_start = time.time()
        for worker in workers:
            worker.send("GO")

        time.sleep(BEFORE)
        old_primary = rs.primary_index()
        assert old_primary is not None, "no primary before the pause"
        t_pause = time.time()
        rs.pause(old_primary)
        paused = old_primary
        new_primary = None
        t_elected = None
        while time.time() < t_pause + PAUSED:
            if new_primary is None:
                found = rs.primary_index(timeout=0.5)
                if found is not None and found != old_primary:
                    new_primary, t_elected = found, time.time()
            time.sleep(0.1)
        t_resume = time.time()
        rs.resume(old_primary)
        paused = None

        # Run on until every worker has completed a hold since the resume.
        while True:
            now = time.time()
            lagging = [n for n, p in paths.items() if not completed_after(read_events(p), t_resume)]
            if now >= t_resume + AFTER_MIN and not lagging:
                break
            if now >= t_resume + PROGRESS_LIMIT:
                break
            for worker in workers:
                if worker.proc.poll() is not None:
                    pytest.fail(f"worker died: {worker.describe()}", pytrace=False)
            time.sleep(0.2)
        t_stop = time.time()
        stop_file.touch()
        for worker in workers:
            code = worker.join(JOIN_TIMEOUT)
            assert code == 0, worker.describe()
        final_primary = rs.primary_index()
    finally:
        if paused is not None:
            rs.resume(paused)
        children.close()

    timeline = {"start": t_start, "pause": t_pause, "elected": t_elected, "resume": t_resume,
                "stop": t_stop, "old_primary": old_primary, "new_primary": new_primary,
                "final_primary": final_primary}
    (tmp_path / "timeline.json").write_text(json.dumps(timeline))
    return Run({name: read_events(path) for name, path in paths.items()}, timeline)


def report(run: Run) -> None:
    """Print timings and counts (run with ``-s``)."""
    events, tl = run.events, run.timeline
    holds = [e for evs in events.values() for e in evs if e["event"] == "hold"]
    completed = run.completed
    errors = Counter(
        f"{e['op']}:{e['type']}" for evs in events.values() for e in evs if e["event"] == "error"
    )
    unavailable = sum(1 for evs in events.values() for e in evs if e["event"] == "unavailable")
    failed_commands = Counter(
        f"{e['cmd']}:{e['kind']}" for evs in events.values() for e in evs
        if e["event"] == "cmd_failed"
    )
    read_backs = sum(
        1 for evs in events.values() for e in evs
        if e["event"] == "log" and "reading it back" in e["msg"]
    )
    slowest_acquire = max(h["t_acquired"] - h["t_try"] for h in holds)
    slowest_release = max(h["t_released"] - h["t_release_start"] for h in holds)

    def phase(t: float) -> str:
        return "before" if t < tl["pause"] else "during" if t < tl["resume"] else "after"

    by_phase = Counter(f"{h['kind']}/{phase(h['t_acquired'])}" for h in completed)
    elected = tl["elected"] - tl["pause"] if tl["elected"] else float("nan")
    print(
        f"\nfail-over: primary {tl['old_primary']} frozen {tl['resume'] - tl['pause']:.1f} s "
        f"(after {tl['pause'] - tl['start']:.1f} s); new primary {tl['new_primary']} elected "
        f"after {elected:.1f} s; primary at the end {tl['final_primary']}; ran "
        f"{tl['stop'] - tl['resume']:.1f} s after the resume"
    )
    print(f"completed holds by lock/phase: {dict(sorted(by_phase.items()))}")
    print(
        f"holds: {len(holds)}, completed {len(completed)}, release failed "
        f"{len(holds) - len(completed)}; waits that gave up: {unavailable}"
    )
    print(f"errors by op:type: {dict(sorted(errors.items()))}; read-backs after an "
          f"unknown outcome: {read_backs}")
    print(f"commands failed at the driver (retried by it or not): "
          f"{dict(sorted(failed_commands.items()))}")
    print(f"slowest acquire (call to return): {slowest_acquire:.1f} s; slowest release: "
          f"{slowest_release:.1f} s")
    for name, evs in events.items():
        first = [e["t_acquired"] - tl["resume"] for e in evs
                 if e["event"] == "hold" and e["ok"] and e["t_acquired"] >= tl["resume"]][:1]
        after = f"+{first[0]:.2f} s" if first else "none"
        print(f"  {name}: {completed_after(evs, 0)} completed, first after resume: {after}")


def assert_survived(run: Run) -> None:
    """No unexpected error; a new primary was elected during the freeze;
    every worker completed a hold after the resume."""
    events, tl = run.events, run.timeline
    unexpected = [e for evs in events.values() for e in evs if e.get("unexpected")]
    assert not unexpected, f"unexpected errors in workers: {unexpected[:3]}"
    assert tl["new_primary"] is not None, f"no new primary elected in the {PAUSED} s pause"
    assert tl["new_primary"] != tl["old_primary"]
    for name, evs in events.items():
        late = [
            e for e in evs
            if e["event"] == "hold" and e["ok"] and tl["resume"] <= e["t_acquired"] <= tl["resume"]
            + PROGRESS_LIMIT
        ]
        assert late, f"{name} completed no hold within {PROGRESS_LIMIT} s after the resume"


@pytest.mark.slow
def test_leases_survive_primary_freeze(replica_set: MongodReplicaSet, tmp_path: Path) -> None:
    rs = replica_set
    db_name = f"lockable_failover_{ObjectId()}"
    admin: MongoClient[dict[str, Any]] = MongoClient(rs.uri, serverSelectionTimeoutMS=30_000)
    try:
        doc_id = ObjectId()
        admin[db_name].get_collection(
            "failover_docs", write_concern=WriteConcern("majority")
        ).insert_one({"_id": doc_id, "name": "failover", "lock_fence": 0})
    finally:
        admin.close()
    specs = [(f"doc-{i}", {"kind": "doc", "doc_id": str(doc_id)}) for i in range(DOC_WORKERS)]
    specs += [(f"named-{i}", {"kind": "named", "name": LOCK_NAME}) for i in range(NAMED_WORKERS)]
    run = run_through_freeze(rs, tmp_path, db_name, specs)
    report(run)
    assert_survived(run)
    for kind in ("doc", "named"):
        kind_holds = [h for h in run.completed if h["kind"] == kind]
        assert kind_holds, f"no completed {kind} hold at all"
        assert_exclusive(kind_holds, kind)


def assert_within_limit(holds: list[dict[str, Any]], limit: int, what: str) -> None:
    """At no instant are more than ``limit`` of the intervals [t_acquired,
    t_release_start] open; fences are unique, and a hold acquired before
    another was attempted has the smaller fence."""
    most = max_overlap([(h["t_acquired"], h["t_release_start"]) for h in holds])
    assert most <= limit, f"{what}: {most} completed holds at once (limit {limit})"
    assert_fences_follow_grants(holds, returned="t_acquired")


def test_limit_check_catches_too_many_holders_and_fences() -> None:
    """The checker itself, on made-up holds."""

    def hold(t_try: float, start: float, end: float, fence: int) -> dict[str, Any]:
        return {"t_try": t_try, "t_acquired": start, "t_release_start": end, "fence": fence}

    ok = [hold(0, 0, 2, 1), hold(0, 1, 3, 2), hold(2.5, 2.5, 4, 3)]
    assert_within_limit(ok, 2, "ok")
    with pytest.raises(AssertionError, match="3 completed holds at once"):
        assert_within_limit([*ok, hold(0, 1.5, 1.8, 4)], 2, "x")
    with pytest.raises(AssertionError, match="not unique"):
        assert_within_limit([hold(0, 0, 1, 1), hold(2, 2, 3, 1)], 2, "x")
    with pytest.raises(AssertionError, match="not increasing"):
        assert_within_limit([hold(0, 0, 1, 5), hold(2, 2, 3, 4)], 2, "x")


@pytest.mark.slow
def test_semaphore_limit_holds_through_primary_freeze(
    replica_set: MongodReplicaSet, tmp_path: Path
) -> None:
    """The same fail-over with workers sharing a semaphore: never more than
    its limit among the completed holds."""
    db_name = f"lockable_failover_sem_{ObjectId()}"
    args = {"kind": "semaphore", "name": SEMAPHORE_NAME, "limit": SEMAPHORE_LIMIT}
    specs = [(f"semaphore-{i}", args) for i in range(SEMAPHORE_WORKERS)]
    run = run_through_freeze(replica_set, tmp_path, db_name, specs)
    report(run)
    assert_survived(run)
    holds = run.completed
    assert holds, "no completed semaphore hold at all"
    assert_within_limit(holds, SEMAPHORE_LIMIT, "semaphore")
