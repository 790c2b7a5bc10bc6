"""The ``mongoengine-lockable`` command line (also ``python -m mongoengine_lockable``).

Commands:

``demo``
    Drain a queue of jobs with worker processes that crash now and then, and
    prove that every job was completed exactly once and that poison jobs were
    set aside (``--cron``: a scheduled ``@exclusive`` job on several workers
    runs once per tick). Starts a throw-away ``mongod`` unless ``--uri`` names
    a server. (:mod:`mongoengine_lockable._demo_view`)
``list``
    The held and expired leases of a document collection, or the named locks.
``release --force``
    End one lease, whoever holds it (an operator's last resort).
    (Both: :mod:`mongoengine_lockable._admin`.)

Output is drawn with rich when it is installed (``pip install
'mongoengine-lockable[cli]'``) and standard output is a terminal, as plain
text otherwise; ``--json`` prints machine-readable JSON. Errors are one line
on standard error; the exit status is 2 for bad arguments or an unreachable
server, 1 for other failures (a demo that found a violation, an unknown id).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from typing import Callable, NoReturn

from pymongo.errors import ConnectionFailure, InvalidName, OperationFailure, PyMongoError

from ._console import PROG, URI_ENV, CliError, Terminated, one_line, unreachable
from ._demo import BATCH, MAX_ATTEMPTS
from ._named import DEFAULT_COLLECTION

__all__ = ["build_parser", "main"]

_AUTH_ERRORS = frozenset({13, 18})  # Unauthorized, AuthenticationFailed


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
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = commands.add_parser(
        "demo",
        help="drain a job queue with crashing workers and prove exactly-once handling",
        description=(
            "Create JOBS pending jobs (POISON of them failing every time) and let "
            "WORKERS processes drain them in batches with "
            "Job.objects(status='pending').claim_many(BATCH, LEASE, "
            "max_attempts=MAX_ATTEMPTS), job.update_if_held(...) and job.release(). Now "
            "and then a worker kills itself (SIGKILL) holding its batch; the leases "
            "expire and other workers take the jobs over. A poison job is released "
            "undone and set aside once it was granted MAX_ATTEMPTS times. The summary "
            "proves from a record of every handling that each good job was completed "
            "exactly once and every poison job set aside. With --cron, WORKERS "
            "processes instead fire one @exclusive job every second, slightly out of "
            "step, and each tick must run exactly once. Exit status 1 on any violation."
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
    demo.add_argument("--batch", type=_int_in(1, 1000), default=BATCH, metavar="N",
                      help=f"jobs a worker claims at once with claim_many (default {BATCH})")
    demo.add_argument("--poison", type=_int_in(0, 1_000_000), default=3, metavar="N",
                      help="jobs whose work always fails, set aside after --max-attempts "
                      "(default 3)")
    demo.add_argument("--max-attempts", type=_int_in(2, 100), default=MAX_ATTEMPTS,
                      metavar="N", help="grants after which claims skip a job "
                      f"(default {MAX_ATTEMPTS})")
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

    lister = commands.add_parser(
        "list",
        help="show held and expired leases",
        description=(
            "Show the held and expired leases of a collection of LockableMixin "
            "documents (--collection), or of the named locks, semaphores and "
            "read/write locks. Remaining time is measured on the server's clock."
        ),
    )
    _add_server(lister, required=True)
    _add_target(lister)
    lister.add_argument("--all", action="store_true",
                        help="also list released leases (and semaphores nobody holds)")
    lister.add_argument("--limit", type=_int_in(0, 10**9), default=100, metavar="N",
                        help="list at most this many, latest-ending first (default 100; 0: all)")
    lister.add_argument("--json", action="store_true", help="print a JSON array")

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
    release.add_argument("--owner", metavar="OWNER",
                         help="a semaphore's or read/write lock's holder to evict (needed "
                         "when it has several)")
    release.add_argument("--json", action="store_true", help="print what was done as JSON")
    return parser


# -- entry point ----------------------------------------------------------------------


def _error(message: str) -> None:
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr, flush=True)


def _handler(command: str) -> Callable[[argparse.Namespace], int]:
    """The function of a command (imported only when it runs)."""
    if command == "demo":
        from ._demo_view import cmd_demo

        return cmd_demo
    from ._admin import cmd_list, cmd_release

    return cmd_list if command == "list" else cmd_release


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
        status: int = _handler(args.command)(args)
        return status
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except CliError as exc:
        _error(str(exc))
        return exc.status
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Terminated:
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
        _error(str(unreachable(getattr(args, "uri", None), exc)))
        return 2
    except OperationFailure as exc:
        _error(f"MongoDB refused: {exc.details.get('errmsg') if exc.details else exc}")
        return 2 if exc.code in _AUTH_ERRORS else 1
    except PyMongoError as exc:
        _error(f"MongoDB: {exc}")
        return 1
