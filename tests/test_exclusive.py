"""``@exclusive``: run a job only while holding its named lock.

The decorator's contract on both backends, then THE TICK TEST on the real
server: four processes fire the same job on the same 0.5 s schedule for 6 s,
each a little out of step (a fixed offset of 0-150 ms plus a few ms of
jitter), as hosts running the same cron table do. The job is
``@exclusive("report", 0.45, min_hold=0.3)``: the first firing of a tick
takes the lock, and ``min_hold`` keeps it taken for 0.3 s after that grant, so
the firings of the other hosts (up to ~160 ms later) skip the tick; it ends
before the next tick. Every tick must run exactly once across the processes.

A real scheduler drops a firing that comes too late (APScheduler's
``misfire_grace_time``); so do the processes here, 0.1 s after a firing's
scheduled time: a process that the loaded machine wakes half a second late must
not run a tick the lease no longer covers. The common start time is chosen
once every process is connected, and lies in the future.

The processes are ``exclusive_ticker`` workers (``tests/workers.py``, where
their schedule is defined).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest

from mongoengine_lockable import NamedLock, exclusive
from mongoengine_lockable._named import DEFAULT_COLLECTION

from _children import Child, Children
from workers import TICKER_INTERVAL, TICKER_RUNS, TICKER_TICKS

LOGGER = "mongoengine_lockable.named"


# -- the decorator ------------------------------------------------------------------------


def test_wrapper_keeps_name_and_docstring(lockable_db: Any) -> None:
    def nightly_report(day: str) -> str:
        """Build the report of ``day``."""
        return day

    wrapped = exclusive("nightly", 5)(nightly_report)
    assert wrapped.__name__ == "nightly_report"
    assert wrapped.__qualname__ == nightly_report.__qualname__
    assert wrapped.__doc__ == "Build the report of ``day``."
    assert wrapped.__wrapped__ is nightly_report  # type: ignore[attr-defined]
    # Decorating does no I/O.
    assert DEFAULT_COLLECTION not in lockable_db.database.list_collection_names()


def test_runs_the_function_while_holding_the_lock(lockable_db: Any) -> None:
    holders: list[Any] = []

    @exclusive("runs", 5)
    def job(a: int, *, b: int) -> int:
        holders.append(NamedLock.owner_of("runs"))
        return a + b

    assert job(40, b=2) == 42
    assert holders[0] is not None  # held during the call
    assert NamedLock.is_free("runs")  # released after it
    assert job(1, b=1) == 2  # and free for the next call
    assert len(holders) == 2


def test_returns_none_and_logs_when_held_elsewhere(
    lockable_db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    @exclusive("busy", 5)
    def busy_job() -> str:
        calls.append(1)
        return "ran"

    other_host = NamedLock("busy", duration=5)
    assert other_host.acquire()
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert busy_job() is None
    assert calls == []
    skips = [r for r in caplog.records if r.name == LOGGER and "busy" in r.getMessage()]
    assert len(skips) == 1, caplog.records
    assert "busy_job" in skips[0].getMessage()
    # The holder was not disturbed.
    assert NamedLock.owner_of("busy") == other_host.owner
    other_host.release()
    assert busy_job() == "ran"


def test_releases_when_the_function_raises(lockable_db: Any) -> None:
    @exclusive("failing", 5)
    def failing() -> None:
        raise RuntimeError("job failed")

    with pytest.raises(RuntimeError, match="job failed"):
        failing()
    assert NamedLock.is_free("failing")


def test_min_hold_makes_a_second_run_skip(lockable_db: Any) -> None:
    runs: list[int] = []

    @exclusive("held-on", 5, min_hold=0.3)
    def job() -> int:
        runs.append(1)
        return len(runs)

    started = time.monotonic()
    assert job() == 1
    assert not NamedLock.is_free("held-on")  # kept for min_hold after the grant
    assert job() is None  # a host firing a little later skips this run
    while not NamedLock.is_free("held-on"):
        assert time.monotonic() - started < 10
        time.sleep(0.02)
    assert job() == 2


BAD_DECORATIONS = [
    ((5, 5), {}, TypeError),
    (("", 5), {}, ValueError),
    (("x" * 1001, 5), {}, ValueError),
    (("job", "5"), {}, TypeError),
    (("job", 0), {}, ValueError),
    (("job", timedelta(seconds=-1)), {}, ValueError),
    (("job", 5), {"wait": -1}, ValueError),
    (("job", 5), {"wait": "1"}, TypeError),
    (("job", 5), {"min_hold": 6}, ValueError),
    (("job", 5), {"min_hold": None}, TypeError),
    (("job", 5), {"keepalive": "yes"}, TypeError),
    (("job", 5), {"alias": 1}, TypeError),
    (("job", 5), {"collection": ""}, ValueError),
]


@pytest.mark.parametrize(("args", "kwargs", "error"), BAD_DECORATIONS)
def test_arguments_are_checked_when_decorating(
    lockable_mongomock_db: Any, args: tuple[Any, ...], kwargs: dict[str, Any], error: type
) -> None:
    with pytest.raises(error):
        exclusive(*args, **kwargs)  # before any function is decorated
    assert DEFAULT_COLLECTION not in lockable_mongomock_db.database.list_collection_names()


# -- the tick test -------------------------------------------------------------------------

PROCESSES = 4
OFFSETS = [0.0, 0.05, 0.10, 0.15]  # each process's fixed lag behind the schedule


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Children]:
    """Worker processes (see ``_children``)."""
    with Children(tmp_path) as children:
        yield children


@pytest.mark.timeout(120)
def test_every_tick_runs_exactly_once_across_processes(
    lockable_real_db: Any, spawn: Callable[..., Child]
) -> None:
    db = lockable_real_db
    tickers = [
        spawn("exclusive_ticker", uri=db.uri, db=db.db_name, offset=offset, seed=i)
        for i, offset in enumerate(OFFSETS)
    ]
    for ticker in tickers:
        ticker.expect("READY")
    start = time.time() + 1.0  # in the future for everyone
    for ticker in tickers:
        ticker.send(json.dumps(start))
    results = {t.name: t.expect("RESULT", timeout=TICKER_TICKS * TICKER_INTERVAL + 30)
               for t in tickers}

    runs = list(db.database[TICKER_RUNS].find({}, {"_id": False}))
    per_tick = Counter(run["tick"] for run in runs)
    report = "\n".join(
        f"{name}: ran {r['ran']}, skipped {r['skipped']}, misfired {r['misfired']}, "
        f"max lateness {r['max_late'] * 1000:.0f} ms"
        for name, r in results.items()
    )
    print(report)
    assert sorted(per_tick) == list(range(TICKER_TICKS)), f"ticks run: {dict(per_tick)}\n{report}"
    twice = {tick: n for tick, n in per_tick.items() if n != 1}
    assert not twice, f"ticks run more than once: {twice}\n{runs}\n{report}"
    # The lock did the work: other processes' firings found it held.
    assert sum(len(r["skipped"]) for r in results.values()) >= TICKER_TICKS, report

