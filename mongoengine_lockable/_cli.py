"""The ``mongoengine-lockable`` command line (also ``python -m mongoengine_lockable``).

Commands:

``demo``
    Drain a queue of jobs with worker processes that crash now and then, and
    prove that every job was completed exactly once (``--cron``: a scheduled
    ``@exclusive`` job on several workers runs once per tick). Starts a
    throw-away ``mongod`` unless ``--uri`` names a server.
``list``
    The held and expired leases of a document collection, or the named locks.
``release --force``
    Clear one lease, whoever holds it (an operator's last resort).

Output is drawn with rich when it is installed (``pip install
'mongoengine-lockable[cli]'``) and standard output is a terminal, as plain
text otherwise; ``--json`` prints machine-readable JSON. Errors are one line
on standard error; the exit status is 2 for bad arguments or an unreachable
server, 1 for other failures (a demo that found a violation, an unknown id).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from bson import ObjectId
from pymongo import MongoClient, ReturnDocument
from pymongo.errors import (
    ConfigurationError,
    ConnectionFailure,
    InvalidName,
    OperationFailure,
    PyMongoError,
)
from pymongo.write_concern import WriteConcern

from ._named import DEFAULT_COLLECTION

if TYPE_CHECKING:
    from rich.console import Console

    from ._demo import CronReport, JobsProgress, JobsReport

__all__ = ["main"]

PROG = "mongoengine-lockable"
URI_ENV = "MONGODB_URI"

log = logging.getLogger("mongoengine_lockable.cli")

#: Server selection timeout unless the URI sets one: an unreachable server is
#: reported in seconds, not after pymongo's default 30 s.
SELECTION_TIMEOUT_MS = 3000

#: The default owner token of a lease: ``host:pid:random``.
_OWNER_TOKEN = re.compile(r"^(?P<host>.+):(?P<pid>\d+):(?P<token>[0-9a-f]+)$")
_AUTH_ERRORS = frozenset({13, 18})  # Unauthorized, AuthenticationFailed


class CliError(Exception):
    """An expected failure: printed as one line, exits with ``status``."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class _Terminated(BaseException):
    """Raised in the main thread on ``SIGTERM``, so that the demo's clean-up
    (its workers, its ``mongod``) runs as it does for Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated(signum)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn ``SIGTERM`` into :class:`_Terminated` inside the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and a :class:`CliError`)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')", 2)


# -- argument types ---------------------------------------------------------------


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, not {value}")
        return value

    return parse


def _float_in(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
        if math.isnan(value) or value > high or value < low or (low_open and value == low):
            bound = "above" if low_open else "from"
            raise argparse.ArgumentTypeError(f"must be {bound} {low:g} to {high:g}, not {text}")
        return value

    return parse


# -- parser -----------------------------------------------------------------------


_DESCRIPTION = "Leases and named locks for MongoEngine documents, from the command line."

_EPILOG = f"""\
examples:
  {PROG} demo           # a throw-away mongod, 1000 jobs, 4 workers
  {PROG} demo --cron    # one @exclusive run per tick, on 4 workers
  {PROG} list --uri mongodb://localhost/shop --collection jobs
  {PROG} list --uri mongodb://localhost/shop --json
  {PROG} release --force --yes nightly-report --uri mongodb://localhost/shop

list and release need a server: --uri or ${URI_ENV}. Exit status: 0 success,
1 failure (a demo that found a violation, an unknown id), 2 bad arguments or
an unreachable server.
"""


def _add_server(parser: argparse.ArgumentParser, *, required: bool) -> None:
    otherwise = (
        "one of the two is required" if required
        else "else a throw-away mongod, started for the demo and stopped afterwards"
    )
    parser.add_argument(
        "--uri",
        default=os.environ.get(URI_ENV) or None,
        metavar="URI",
        help=f"MongoDB connection string (default: ${URI_ENV}; {otherwise})",
    )


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db", metavar="NAME", help="database (default: the one named in the URI)"
    )
    parser.add_argument(
        "--collection",
        metavar="NAME",
        help="collection of LockableMixin documents (its MongoDB name); "
        "without it, the named locks are meant",
    )
    parser.add_argument(
        "--lock-collection",
        metavar="NAME",
        default=DEFAULT_COLLECTION,
        help=f"collection of the named locks (default {DEFAULT_COLLECTION})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mongoengine-lockable``."""
    parser = _Parser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = commands.add_parser(
        "demo",
        help="drain a job queue with crashing workers and prove exactly-once handling",
        description=(
            "Create JOBS pending jobs and let WORKERS processes drain them with "
            "Job.objects(status='pending').claim(LEASE), job.update_if_held(...) and "
            "job.release(). Now and then a worker kills itself (SIGKILL) holding a job; "
            "the job's lease expires and another worker takes it over. The summary "
            "proves from a record of every handling that each job was completed "
            "exactly once. With --cron, WORKERS processes instead fire one "
            "@exclusive job every second, slightly out of step, and each tick must run "
            "exactly once. Exit status 1 on any violation."
        ),
    )
    _add_server(demo, required=False)
    demo.add_argument("--jobs", type=_int_in(1, 1_000_000), default=1000, metavar="N",
                      help="number of jobs (default 1000)")
    demo.add_argument("--workers", type=_int_in(1, 64), default=4, metavar="N",
                      help="worker processes (default 4)")
    demo.add_argument("--lease", type=_float_in(0, 3600, low_open=True), default=2.0,
                      metavar="SECONDS",
                      help="lease of a claimed job; a crashed worker's job is taken over "
                      "once it expires (default 2)")
    demo.add_argument("--work-ms", type=_float_in(0, 60_000), default=10.0, metavar="MS",
                      help="time spent on each job (default 10)")
    demo.add_argument("--crash-rate", type=_float_in(0, 0.5), default=0.02, metavar="P",
                      help="chance that a worker kills itself (SIGKILL) in the middle of "
                      "a job, 0 to 0.5 (default 0.02)")
    demo.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=None, metavar="N",
                      help="random seed of the crashes (default: a fresh one, printed)")
    demo.add_argument("--cron", action="store_true",
                      help="run the scheduled-job demo (@exclusive) instead")
    demo.add_argument("--seconds", type=_int_in(1, 3600), default=8, metavar="N",
                      help="--cron: number of one-second ticks (default 8)")
    demo.add_argument("--timeout", type=_float_in(0, 86_400, low_open=True), default=300.0,
                      metavar="SECONDS",
                      help="give up (and fail) after this long (default 300)")
    demo.add_argument("--keep", action="store_true",
                      help="with --uri: keep the demo database instead of dropping it")
    demo.add_argument("--json", action="store_true",
                      help="print the summary as JSON (no progress display)")
    demo.set_defaults(handler=_cmd_demo)

    lister = commands.add_parser(
        "list",
        help="show held and expired leases",
        description=(
            "Show the held and expired leases of a collection of LockableMixin "
            "documents (--collection), or of the named locks. Remaining time is "
            "measured on the server's clock."
        ),
    )
    _add_server(lister, required=True)
    _add_target(lister)
    lister.add_argument("--all", action="store_true",
                        help="documents: also list released leases")
    lister.add_argument("--limit", type=_int_in(0, 10**9), default=100, metavar="N",
                        help="list at most this many, latest-ending first (default 100; 0: all)")
    lister.add_argument("--json", action="store_true", help="print a JSON array")
    lister.set_defaults(handler=_cmd_list)

    release = commands.add_parser(
        "release",
        help="clear a lease by force",
        description=(
            "Clear the lease on one document (--collection, by _id) or one named lock "
            "(by name), whoever holds it. The fence is kept: the holder's guarded "
            "writes (update_if_held, renew, release) fail from now on, and the next "
            "acquisition gets a higher fence. Needs --force and --yes; logs a warning "
            "naming the holder."
        ),
    )
    _add_server(release, required=True)
    release.add_argument(
        "target",
        metavar="ID|NAME",
        help="document _id (an ObjectId when it looks like one, else an integer when "
        "numeric, else a string) or lock name",
    )
    release.add_argument("--force", action="store_true",
                         help="required: this breaks another process's lease")
    release.add_argument("--yes", action="store_true",
                         help="really do it; without it, release only shows whose lease it "
                         "would clear and exits with status 2")
    _add_target(release)
    release.add_argument("--json", action="store_true", help="print what was done as JSON")
    release.set_defaults(handler=_cmd_release)
    return parser


# -- output -----------------------------------------------------------------------


class _Out:
    """Where results go: rich on a terminal when available, plain text otherwise."""

    def __init__(self, *, json_mode: bool = False) -> None:
        self.json = json_mode
        self.console: Console | None = None
        if (
            not json_mode
            and sys.stdout.isatty()
            and os.environ.get("TERM") != "dumb"
            and importlib.util.find_spec("rich") is not None
        ):
            from rich.console import Console

            self.console = Console(highlight=False)

    @property
    def rich(self) -> bool:
        return self.console is not None

    def line(self, text: str = "", markup: str | None = None) -> None:
        """Print ``text``; on rich, ``markup`` (rich markup) replaces it. With
        ``--json`` standard output is the JSON alone: the text goes to stderr."""
        if self.json:
            print(text, file=sys.stderr, flush=True)
        elif self.console is not None:
            self.console.print(markup if markup is not None else text, markup=markup is not None)
        else:
            print(text, flush=True)

    def table(
        self,
        title: str,
        headers: Sequence[str],
        rows: Sequence[Sequence[str]],
        *,
        right: Sequence[int] = (),
        styles: Sequence[str | None] | None = None,
    ) -> None:
        """A table: rich's, or columns padded with spaces."""
        if self.console is not None:
            from rich.table import Table

            table = Table(title=title, title_justify="left", show_header=any(headers))
            for i, header in enumerate(headers):
                table.add_column(header, justify="right" if i in right else "left")
            for index, row in enumerate(rows):
                table.add_row(*row, style=styles[index] if styles else None)
            self.console.print(table)
            return
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

        def fmt(cells: Sequence[str]) -> str:
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        print(title)
        if any(headers):
            print("  " + fmt(headers))
        for row in rows:
            print("  " + fmt(row))
        sys.stdout.flush()

    def dump(self, value: Any) -> None:
        """Print ``value`` as JSON."""
        print(json.dumps(value, indent=2, sort_keys=True, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    return str(value)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat(timespec="milliseconds") + ("Z" if value.tzinfo is None else "")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# -- server -----------------------------------------------------------------------


def _hosts(uri: str) -> str:
    """The hosts of a URI, without credentials or options (for messages)."""
    rest = uri.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0]
    return rest.rsplit("@", 1)[-1] or uri


def _client(uri: str | None) -> MongoClient[dict[str, Any]]:
    """A client for ``uri``, with a short server selection timeout.

    :raises CliError: no URI, or a URI pymongo rejects (status 2).
    """
    if not uri:
        raise CliError(f"no server: pass --uri mongodb://HOST/ or set ${URI_ENV}", 2)
    options: dict[str, Any] = {"appname": PROG}
    if "serverselectiontimeoutms" not in uri.lower():
        options["serverSelectionTimeoutMS"] = SELECTION_TIMEOUT_MS
    try:
        return MongoClient(uri, **options)
    except (ConfigurationError, ValueError, TypeError) as exc:
        raise CliError(f"bad --uri: {_one_line(str(exc))}", 2) from None


def _without_database(uri: str) -> str:
    """``uri`` without the database in its path, which would otherwise override
    the demo's fresh database in MongoEngine's ``connect``. A database that
    also served as the authentication database stays that, as ``authSource``.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    address, slash, path = rest.partition("/")
    if not slash:
        return uri
    database, question, query = path.partition("?")
    if not database:
        return uri
    options = [part for part in query.split("&") if part] if question else []
    if "@" in address and not any(o.lower().startswith("authsource=") for o in options):
        options.append(f"authSource={database}")
    return f"{scheme}://{address}/" + ("?" + "&".join(options) if options else "")


def _unreachable(uri: str | None, exc: PyMongoError) -> CliError:
    reason = str(exc).split(", Timeout:", 1)[0]
    reason = re.sub(r"\s*\(configured timeouts:[^)]*\)", "", reason)
    where = _hosts(uri) if uri else "the server"
    return CliError(f"cannot reach MongoDB at {where}: {_one_line(reason)}", 2)


def _database_name(client: MongoClient[dict[str, Any]], name: str | None) -> str:
    if name:
        return name
    try:
        default = client.get_default_database()
    except ConfigurationError:
        raise CliError("no database: pass --db NAME or name one in the URI "
                       "(mongodb://HOST/NAME)", 2) from None
    return str(default.name)


def _ping(uri: str) -> None:
    """Fail fast (status 2) when the server cannot be reached."""
    client = _client(uri)
    try:
        client.admin.command("ping")
    except ConnectionFailure as exc:
        raise _unreachable(uri, exc) from None
    finally:
        client.close()


@contextlib.contextmanager
def _demo_server(uri: str | None, out: _Out) -> Iterator[tuple[str, bool]]:
    """Yield ``(uri, embedded)``: the given server, or a throw-away ``mongod``
    (a single-node replica set) that is stopped afterwards."""
    if uri:
        uri = _without_database(uri)
        _ping(uri)
        out.line(f"MongoDB: {_hosts(uri)}",
                 f"[bold]MongoDB[/]: {_escape(_hosts(uri))}" if out.rich else None)
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
        raise CliError(f"{_one_line(str(exc))}; or pass --uri to use a running server", 2) \
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
    client = _client(uri)
    try:
        return str(client.server_info().get("version", "?"))
    finally:
        client.close()


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# -- demo -------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    if not args.cron and args.work_ms / 1000 > args.lease / 2:
        raise CliError(
            f"--work-ms {args.work_ms:g} is too long for --lease {args.lease:g}: a job's "
            "work must take at most half its lease", 2
        )
    out = _Out(json_mode=args.json)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    begun = time.monotonic()
    report: JobsReport | CronReport
    with _sigterm_unwinds(), _demo_server(args.uri, out) as (uri, embedded):
        db_name = f"lockable_demo_{secrets.token_hex(4)}"
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
    client = _client(uri)
    try:
        client.drop_database(db_name)
    except PyMongoError as exc:
        log.warning("could not drop the demo database %s: %s", db_name, _one_line(str(exc)))
    finally:
        client.close()


def _demo_jobs(
    args: argparse.Namespace, out: _Out, uri: str, db_name: str, seed: int
) -> JobsReport:
    from ._demo import run_jobs

    if not out.json:
        _jobs_header(args, out, seed)
    update, finish = _jobs_progress(out, args.jobs, args.workers)
    try:
        report = run_jobs(
            uri, db_name, jobs=args.jobs, workers=args.workers, lease=args.lease,
            work_ms=args.work_ms, crash_rate=args.crash_rate, seed=seed,
            timeout=args.timeout, on_progress=None if out.json else update,
        )
    finally:
        finish()
    if not out.json:
        _jobs_summary(report, out)
    return report


def _jobs_header(args: argparse.Namespace, out: _Out, seed: int) -> None:
    crash = f"{args.crash_rate * 100:g}%"
    lines = [
        f"demo: {args.jobs} jobs, {args.workers} worker processes, lease {args.lease:g} s, "
        f"work {args.work_ms:g} ms per job, crash rate {crash} (seed {seed})",
        'each worker loops:  job = DemoJob.objects(status="pending").order_by("n")'
        f".claim({args.lease:g})",
        f"                    work {args.work_ms:g} ms (with {crash} chance: SIGKILL itself "
        "mid-job, holding the lease)",
        '                    job.update_if_held(set__status="done", '
        "push__handled_by=worker); job.release()",
    ]
    for i, text in enumerate(lines):
        out.line(text, (f"[bold]{_escape(text)}[/]" if i == 0 else f"[dim]{_escape(text)}[/]")
                 if out.rich else None)


def _jobs_progress(
    out: _Out, total: int, workers: int
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
            TextColumn("workers alive [cyan]{task.fields[alive]}[/]/" + str(workers)),
            TextColumn("crashes [red]{task.fields[crashes]}[/]"),
            TimeElapsedColumn(),
            console=out.console,
        )
        task = progress.add_task("jobs", total=total, alive=0, crashes=0)
        progress.start()

        def update_rich(snap: JobsProgress) -> None:
            progress.update(task, completed=snap.done, alive=snap.alive, crashes=snap.crashes)

        return update_rich, progress.stop
    last = [-math.inf]

    def update_plain(snap: JobsProgress) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or snap.done == snap.total:
            if snap.done == snap.total and last[0] == math.inf:
                return
            last[0] = math.inf if snap.done == snap.total else now
            print(f"  {snap.done}/{snap.total} jobs done, {snap.alive}/{workers} workers "
                  f"alive, {snap.crashes} crashes, {snap.elapsed:.1f} s", flush=True)

    return update_plain, (lambda: None)


def _jobs_summary(report: JobsReport, out: _Out) -> None:
    repeats = (
        "all after a worker crash" if not report.repeats_other
        else f"{report.repeats_other} WITHOUT a crash"
    )
    rows: list[tuple[str, str, str]] = [
        ("jobs", str(report.jobs), ""),
        ("completed exactly once", str(report.completed_once), "the job's update_if_held "
         "succeeded once"),
        ("completed more than once", str(report.completed_more), "must be 0"),
        ("never completed", str(report.never_completed), "must be 0"),
        ("started more than once", str(report.started_more),
         repeats if report.started_more else ""),
        ("worker crashes (SIGKILL)", str(report.crashes), "each mid-job, holding a lease"),
        ("lease take-overs", str(report.takeovers), "claims of a job with fence > 1"),
        ("worker restarts", str(report.restarts), "the pool stays at "
         f"{report.workers} processes"),
        ("claims", str(report.claims), "one record per handling attempt"),
        ("throughput", f"{report.throughput:.1f}", "jobs/s"),
        ("elapsed", f"{report.elapsed:.1f}", "s"),
    ]
    bad = {"completed more than once": report.completed_more,
           "never completed": report.never_completed,
           "started more than once": report.repeats_other}
    styles = ["bold red" if bad.get(label) else None for label, _, _ in rows]
    out.line()
    out.table("summary", ["", "", ""], [list(r) for r in rows], right=(1,), styles=styles)
    if report.examples:
        out.line()
        out.line("lease take-overs, for example:")
        for ex in report.examples:
            out.line(f"  job {ex.n}: {ex.crashed_worker} (pid {ex.crashed_pid}) was killed "
                     f"holding it (fence {ex.crashed_fence}); {ex.worker} claimed it "
                     f"{ex.after:.1f} s later with fence {ex.fence}")
    out.line()
    if report.ok:
        text = f"OK: {report.completed_once} of {report.jobs} jobs handled exactly once"
        if report.crashes == 1:
            text += "; the job held by the crashed worker was taken over once its lease expired"
        elif report.crashes:
            text += (f"; the {report.crashes} jobs held by crashed workers were taken over "
                     "once their leases expired")
        out.line(text, f"[bold green]{_escape(text)}[/]" if out.rich else None)
    else:
        _violations(report.violations, out,
                    f"FAILED: {report.completed_once} of {report.jobs} jobs handled exactly once")


def _violations(violations: list[str], out: _Out, headline: str) -> None:
    out.line(headline, f"[bold red]{_escape(headline)}[/]" if out.rich else None)
    shown = 20
    for violation in violations[:shown]:
        out.line(f"  violation: {violation}")
    if len(violations) > shown:
        out.line(f"  ... and {len(violations) - shown} more violations")


def _demo_cron(
    args: argparse.Namespace, out: _Out, uri: str, db_name: str, seed: int
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
            out.line(text, (f"[bold]{_escape(text)}[/]" if i == 0 else f"[dim]{_escape(text)}[/]")
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
        out.line(text, f"[bold green]{_escape(text)}[/]" if out.rich else None)
    else:
        _violations(report.violations, out, f"FAILED: {report.ran_once} of {report.seconds} "
                    "ticks ran exactly once")
    return report


# -- list ---------------------------------------------------------------------------


def _remaining_ms() -> dict[str, Any]:
    # Server clock: the difference of two dates is in milliseconds; null when
    # there is no date (a released document lease).
    return {"$subtract": ["$locked_until", "$$NOW"]}


#: Projection of a document lease, computed by the server.
_DOCUMENT_PROJECTION: dict[str, Any] = {
    "until": "$locked_until",
    "owner": "$locked_by",
    "fence": "$lock_fence",
    "remaining_ms": _remaining_ms(),
}
#: Projection of a named-lock record, computed by the server.
_NAMED_PROJECTION: dict[str, Any] = {
    "until": "$locked_until",
    "owner": "$owner",
    "host": "$host",
    "pid": "$pid",
    "fence": "$fence",
    "acquired_at": "$acquired_at",
    "remaining_ms": _remaining_ms(),
    # A release drops the record's per-grant token; an expiry keeps it.
    "released": {"$eq": [{"$type": "$token"}, "missing"]},
}


def _lease_row(raw: dict[str, Any], kind: str) -> dict[str, Any]:
    """One lease as listed (stable keys), from a projected document."""
    remaining_ms = raw.get("remaining_ms")
    until = raw.get("until")
    if until is None:
        state = "released"
    elif remaining_ms is not None and remaining_ms > 0:
        state = "held"
    elif raw.get("released"):
        state = "released"
    else:
        state = "expired"
    owner = raw.get("owner")
    host, pid = raw.get("host"), raw.get("pid")
    if kind == "document" and isinstance(owner, str):
        parsed = _OWNER_TOKEN.match(owner)
        if parsed:
            host, pid = parsed["host"], int(parsed["pid"])
    ident = raw.get("_id")
    return {
        "kind": kind,
        "id": str(ident) if isinstance(ident, ObjectId) else ident,
        "state": state,
        "remaining": None if remaining_ms is None else round(remaining_ms / 1000, 3),
        "owner": owner,
        "host": host,
        "pid": pid,
        "fence": raw.get("fence"),
        "locked_until": _iso(until),
        "acquired_at": _iso(raw.get("acquired_at")),
    }


def _remaining_text(row: dict[str, Any]) -> str:
    if row["state"] == "held":
        return f"{row['remaining']:.1f} s"
    if row["state"] == "expired" and row["remaining"] is not None:
        return f"ended {-row['remaining']:.1f} s ago"
    return "-"


def _exists(db: Any, collection: str) -> bool:
    return bool(db.list_collection_names(filter={"name": collection}))


def _cmd_list(args: argparse.Namespace) -> int:
    out = _Out(json_mode=args.json)
    client = _client(args.uri)
    try:
        db = client[_database_name(client, args.db)]
        kind = "document" if args.collection else "named"
        name = args.collection or args.lock_collection
        if kind == "document" and not _exists(db, name):
            raise CliError(f"no collection {name!r} in database {db.name!r}", 1)
        if kind == "document":
            match: dict[str, Any] = {"locked_until": {"$ne": None}}
            if args.all:
                match = {"$or": [match, {"lock_fence": {"$gt": 0}}]}
            projection = _DOCUMENT_PROJECTION
        else:
            match, projection = {}, _NAMED_PROJECTION
        pipeline: list[dict[str, Any]] = [
            {"$match": match},
            {"$sort": {"locked_until": -1, "_id": 1}},
        ]
        if args.limit:
            pipeline.append({"$limit": args.limit + 1})
        pipeline.append({"$project": projection})
        rows = [_lease_row(raw, kind) for raw in db[name].aggregate(pipeline)]
    finally:
        client.close()
    more = bool(args.limit) and len(rows) > args.limit
    rows = rows[: args.limit] if args.limit else rows
    if args.json:
        out.dump(rows)
        return 0
    what = f"{db.name}.{name}" + ("" if kind == "document" else " (named locks)")
    if not rows:
        out.line(f"no leases in {what}")
        return 0
    headers = ["id" if kind == "document" else "name", "state", "remaining", "owner",
               "host", "pid", "fence"]
    table = [
        [
            str(r["id"]), r["state"], _remaining_text(r), str(r["owner"] or "-"),
            str(r["host"] or "-"), "-" if r["pid"] is None else str(r["pid"]),
            "-" if r["fence"] is None else str(r["fence"]),
        ]
        for r in rows
    ]
    colour = {"held": "green", "expired": "yellow", "released": "dim"}
    counts = ", ".join(
        f"{n} {state}" for state in colour
        if (n := sum(r["state"] == state for r in rows)) or state == "held"
    )
    out.table(f"leases in {what}: {counts}", headers, table,
              right=(2, 5, 6), styles=[colour[r["state"]] for r in rows])
    if more:
        out.line(f"(more not shown: --limit {args.limit}; use --limit 0 for all)")
    return 0


# -- release ------------------------------------------------------------------------


def _parse_id(text: str) -> Any:
    """A document id from the command line: ObjectId, int, or the string."""
    if ObjectId.is_valid(text) and len(text) == 24:
        return ObjectId(text)
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return text


def _cmd_release(args: argparse.Namespace) -> int:
    if not args.force:
        raise CliError("release clears a lease whoever holds it: confirm with --force "
                       "(and --yes)", 2)
    out = _Out(json_mode=args.json)
    client = _client(args.uri)
    try:
        db = client[_database_name(client, args.db)]
        if args.collection:
            kind, coll_name = "document", args.collection
            if not _exists(db, coll_name):
                raise CliError(f"no collection {coll_name!r} in database {db.name!r}", 1)
            candidates = list(dict.fromkeys([_parse_id(args.target), args.target]))
            projection = _DOCUMENT_PROJECTION
            update: Any = {"$set": {"locked_until": None}}
            what = f"document {args.target} in {db.name}.{coll_name}"
        else:
            kind, coll_name = "named", args.lock_collection
            candidates = [args.target]
            projection = _NAMED_PROJECTION
            # Ends now by the server's clock; an already ended lease keeps its
            # earlier end (the TTL index's grace period is not restarted).
            update = [{"$set": {"locked_until": {"$min": ["$locked_until", "$$NOW"]}}},
                      {"$unset": "token"}]
            what = f"named lock {args.target!r} in {db.name}.{coll_name}"
        coll = db[coll_name].with_options(write_concern=WriteConcern("majority"))
        before: dict[str, Any] | None = None
        for ident in candidates:
            if args.yes:
                before = coll.find_one_and_update(
                    {"_id": ident}, update, projection=projection,
                    return_document=ReturnDocument.BEFORE,
                )
            else:
                found = list(coll.aggregate([{"$match": {"_id": ident}},
                                             {"$project": projection}]))
                before = found[0] if found else None
            if before is not None:
                break
    finally:
        client.close()
    if before is None:
        raise CliError(f"no {what}", 1)
    row = _lease_row(before, kind)
    holder = _holder_text(row)
    if not args.yes:
        raise CliError(f"refusing to release the {what} without --yes; it is {holder}; "
                       "add --yes to clear it", 2)
    log.warning("forced release of the %s: %s", what, holder)
    if args.json:
        result = {"action": "released", "db": db.name, "collection": coll_name,
                  "previous": row, **{k: row[k] for k in ("kind", "id", "fence")}}
        out.dump(result)
    else:
        text = f"released the {what}: {holder}; fence {row['fence']} kept"
        out.line(text, f"[bold]released[/] the {_escape(what)}: {_escape(holder)}; "
                 f"fence {row['fence']} kept" if out.rich else None)
    return 0


def _holder_text(row: dict[str, Any]) -> str:
    where = ", ".join(
        part for part in (
            f"host {row['host']}" if row["host"] else "",
            f"pid {row['pid']}" if row["pid"] is not None else "",
        ) if part
    )
    owner = f"{row['owner']}" + (f" ({where})" if where else "")
    if row["state"] == "held":
        return f"held by {owner}, {row['remaining']:.1f} s left"
    if row["state"] == "expired":
        return f"not held: the lease of {owner} ended {-row['remaining']:.1f} s ago"
    if row["owner"]:
        return f"not held: released by its last owner {owner}"
    return "not held: never locked"


# -- entry point ----------------------------------------------------------------------


def _error(message: str) -> None:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    :param argv: the arguments (default ``sys.argv[1:]``).
    :return: the exit status: 0 success, 1 failure, 2 bad arguments or an
        unreachable server, 130 interrupted.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args: argparse.Namespace | None = None
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise CliError(f"choose a command: demo, list or release (see '{PROG} --help')", 2)
        status: int = args.handler(args)
        return status
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except CliError as exc:
        _error(str(exc))
        return exc.status
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except _Terminated:
        _error("terminated")
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        # The reader went away (``| head``): say nothing more, as cat would.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except InvalidName as exc:
        _error(f"bad name: {exc}")
        return 2
    except ConnectionFailure as exc:
        _error(str(_unreachable(getattr(args, "uri", None), exc)))
        return 2
    except OperationFailure as exc:
        _error(f"MongoDB refused: {exc.details.get('errmsg') if exc.details else exc}")
        return 2 if exc.code in _AUTH_ERRORS else 1
    except PyMongoError as exc:
        _error(f"MongoDB: {exc}")
        return 1
