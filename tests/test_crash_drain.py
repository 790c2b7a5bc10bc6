"""Draining a queue while workers are killed: 4 processes claim 5,000 documents
one at a time (``claim(lease)``), and the test ``SIGKILL``s a random one every
0.3-0.8 s and starts a replacement.

Each handling is recorded in the ``handlings`` collection
(``tests/fault_workers.py``, command ``drain``): ``start`` once claimed, then
``done`` after the fenced ``update_if_held(set__done=True)``, or ``lost`` if
the lease had run out by then. What must hold at the end:

- every document is done;
- no document has two ``done`` records (claims never hand out a held lease,
  and a done document is never claimed again);
- a document was started more than once only because an earlier holder was
  killed before finishing it (or lost its lease): every start but the last is
  by a killed worker (or one that recorded ``lost``) and has no ``done``, and
  by the server's clock each later claim was granted only after the earlier
  lease had ended;
- a ``done`` record carries the fence stored with the document.

The drain time and the kills are printed (run with ``-s``).
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

if __package__:
    from . import _children, fault_workers
else:  # tests/ is not a package: pytest put it on sys.path
    import _children
    import fault_workers

pytestmark = pytest.mark.slow

DrainDoc = fault_workers.DrainDoc

DOCUMENTS = 5_000
WORKERS = 4
LEASE = 1.0
#: Upper bound of each handling's random "work", in seconds.
WORK = 0.002
MAX_KILLS = 10
KILL_EVERY = (0.3, 0.8)
START_TIMEOUT = 60.0
#: A hang, not a slow machine (the drain takes about a minute on 2 cores).
DRAIN_LIMIT = 240.0


def test_drain_survives_killed_workers(lockable_real_db: Any, tmp_path: Path) -> None:
    db = lockable_real_db
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    DrainDoc._get_collection().insert_many(
        [{"n": n, "done": False, "lock_fence": 0} for n in range(DOCUMENTS)]
    )
    DrainDoc.ensure_indexes()
    common = {
        "uri": db.uri,
        "db": db.db_name,
        "lease": LEASE,
        "work": WORK,
        "max_seconds": DRAIN_LIMIT + 30,
    }
    children = _children.Children(tmp_path, fault_workers.__file__)
    generation = Counter[int]()

    def start(slot: int) -> _children.Child:
        name = f"w{slot}.{generation[slot]}"
        generation[slot] += 1
        return children.start("drain", {**common, "worker": name, "handshake": True}, name=name)

    killed: list[tuple[str, float]] = []
    try:
        slots = {slot: start(slot) for slot in range(WORKERS)}
        for worker in slots.values():
            worker.expect("READY", START_TIMEOUT)
        started = time.monotonic()
        for worker in slots.values():
            worker.send("GO")
        # Only workers that are connected and working are killed: a kill
        # during a replacement's start-up would test nothing.
        working = set(slots)
        next_kill = started + rng.uniform(*KILL_EVERY)
        while True:
            now = time.monotonic()
            for slot, worker in slots.items():
                code = worker.proc.poll()
                if code not in (None, 0):
                    pytest.fail(f"worker failed: {worker.describe()}", pytrace=False)
                if slot not in working and code is None and worker.poll_line() == "READY":
                    worker.send("GO")
                    working.add(slot)
            if all(worker.proc.poll() == 0 for worker in slots.values()):
                break
            if now - started > DRAIN_LIMIT:
                pytest.fail(f"not drained in {DRAIN_LIMIT} s", pytrace=False)
            if len(killed) < MAX_KILLS and now >= next_kill:
                running = sorted(s for s in working if slots[s].proc.poll() is None)
                if running:
                    slot = rng.choice(running)
                    victim = slots[slot]
                    victim.kill()  # SIGKILL by pid, reaped
                    killed.append((victim.name, now - started))
                    working.discard(slot)
                    slots[slot] = start(slot)
                    next_kill = now + rng.uniform(*KILL_EVERY)
            time.sleep(0.01)
        drain_time = time.monotonic() - started
    finally:
        children.close()

    handlings = list(db.database[fault_workers.HANDLINGS_COLLECTION].find({}, {"_id": False}))
    killed_names = {name for name, _ in killed}
    by_doc: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for record in handlings:
        by_doc[record["doc"]].append(record)
    phases = Counter(record["phase"] for record in handlings)
    repeated = {doc: recs for doc, recs in by_doc.items()
                if sum(r["phase"] == "start" for r in recs) > 1}
    print(
        f"\ndrain: {DOCUMENTS} documents, {WORKERS} workers, {len(killed)} kills "
        f"(at {', '.join(f'{t:.1f}' for _, t in killed)} s), "
        f"{len(children.started)} processes in all; drained in {drain_time:.1f} s (seed {seed})"
    )
    print(f"records by phase: {dict(phases)}; documents started more than once: {len(repeated)}")

    undone = DrainDoc.objects(done=False).count()
    assert undone == 0, f"{undone} documents not done"
    stored_fence = {d["_id"]: d["lock_fence"]
                    for d in DrainDoc._get_collection().find({}, {"lock_fence": True})}
    assert len(stored_fence) == DOCUMENTS
    lease = timedelta(seconds=LEASE)
    problems: list[str] = []
    for doc, recs in by_doc.items():
        starts = sorted((r for r in recs if r["phase"] == "start"), key=lambda r: r["fence"])
        dones = [r for r in recs if r["phase"] == "done"]
        lost = {(r["worker"], r["fence"]) for r in recs if r["phase"] == "lost"}
        if len(dones) > 1:
            problems.append(f"{doc}: {len(dones)} done records {dones}")
        for done in dones:
            if done["fence"] != stored_fence[doc]:
                problems.append(f"{doc}: done with fence {done['fence']}, stored "
                                f"{stored_fence[doc]}")
        if len({r["fence"] for r in starts}) != len(starts):
            problems.append(f"{doc}: two starts with one fence {starts}")
        done_keys = {(r["worker"], r["fence"]) for r in dones}
        for earlier, later in zip(starts, starts[1:]):
            # By the server's clock, a claim is granted only once the previous
            # lease has ended (nobody releases an unfinished document).
            if later["until"] - lease < earlier["until"]:
                problems.append(f"{doc}: granted at {later['until'] - lease} while the lease "
                                f"until {earlier['until']} was held {recs}")
        for earlier in starts[:-1]:
            key = (earlier["worker"], earlier["fence"])
            if key in done_keys:
                problems.append(f"{doc}: started again after a done {recs}")
            elif earlier["worker"] not in killed_names and key not in lost:
                problems.append(f"{doc}: repeated though {earlier['worker']} was neither killed "
                                f"nor lost its lease {recs}")
        if not dones and starts and starts[-1]["worker"] not in killed_names:
            problems.append(f"{doc}: done without a done record by a live worker {recs}")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:10])
    # The start record is written before the fenced update, so every done
    # document has one.
    assert set(by_doc) == set(stored_fence)
