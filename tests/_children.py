"""Worker processes of the tests, both sides: the parent's and the worker's.

Tests that need real concurrency (or a process to kill) run their workers as
fresh interpreters of one script, ``tests/workers.py``::

    python tests/workers.py COMMAND '{"uri": ..., "db": ..., ...}'

which holds every command (its table says which are connected first and
which have a watchdog). A worker inherits nothing from the parent: it
connects MongoEngine itself. ``tests/`` is not a package; the script finds
this module, ``models.py`` and ``_recipes.py`` because Python puts the
script's directory first on ``sys.path`` (and pytest puts ``tests/`` there).
The test modules are not scripts: they start workers and import from
``workers.py`` only the values they share with them (collections, schedules);
the document classes both sides use are in ``models.py``.

The protocol, in lines on the worker's standard streams:

- the worker prints ``WORD {json}`` lines, or ``WORD`` alone (:func:`say`);
  the parent reads them with :meth:`Child.expect` (``WORD`` alone: ``{}``);
- the parent writes lines to the worker's stdin (:meth:`Child.send`), which
  the worker reads with :func:`hear`; an end of file there means the parent is
  gone, and the worker exits at once (status 3): no orphan keeps running;
- the start handshake: once connected, the worker prints ``READY`` and waits
  for ``GO`` (:func:`ready_then_wait_for_go`), so that the parent can start
  the work of every worker at the same moment (:meth:`Child.go`);
- errors go to stderr, which the parent keeps in ``tmp_path/NAME.stderr`` and
  quotes (its tail, with the exit status) when it fails the test.

The parent's side: a :class:`Children` group starts each worker as a
:class:`Child`; the group's end (a ``with`` block, or :meth:`Children.close` in
a ``finally``) kills every child still running (``SIGKILL``) and reaps it,
however the test ended. Every wait has a timeout, and one that runs out fails
the test with what the worker said on stderr.

The worker's side (:func:`run_worker`, :func:`say`, :func:`hear`, ...) needs
only the standard library and MongoEngine; pytest is loaded by the parent's
side alone, when it fails a test. The parent checks the holds its workers
recorded with :func:`max_overlap` and :func:`assert_fences_follow_grants`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, NoReturn

import mongoengine

#: Seconds a worker gets by default to print its next line: enough to start
#: and connect on a loaded machine.
START_TIMEOUT = 60.0

#: The workers' ``serverSelectionTimeoutMS`` when :func:`run_worker` connects.
SERVER_SELECTION_MS = 20_000

#: The script every worker runs.
WORKERS = Path(__file__).resolve().with_name("workers.py")

Command = Callable[[dict[str, Any]], None]


class Worker(NamedTuple):
    """How :func:`run_worker` runs a command."""

    #: The command itself, called with the JSON arguments.
    run: Command
    #: End the process after that many seconds, whatever it does.
    watchdog: float | None = None
    #: Connect MongoEngine (:func:`connect`) before the command; otherwise
    #: the command connects itself, as it needs to.
    connected: bool = False


# -- the worker's side -----------------------------------------------------------------------


def say(word: str, **data: Any) -> None:
    """Print one line for the parent: ``WORD {json}`` (datetimes in ISO
    format), or ``WORD`` alone without data."""
    if data:
        print(word, json.dumps(data, default=_iso_format), flush=True)
    else:
        print(word, flush=True)


def _iso_format(value: Any) -> str:
    if not hasattr(value, "isoformat"):
        raise TypeError(f"not JSON serializable: {value!r}")
    text: str = value.isoformat()
    return text


def hear() -> str:
    """The parent's next line, stripped. At the end of stdin the parent is
    gone: exit at once (status 3), leaving no orphan behind."""
    line = sys.stdin.readline()
    if not line:
        os._exit(3)
    return line.strip()


def ready_then_wait_for_go() -> None:
    """Tell the parent we are connected; start when it says ``GO`` (anything
    else, or the end of stdin, ends the process with status 3)."""
    say("READY")
    if hear() != "GO":
        os._exit(3)


def start_watchdog(seconds: float) -> None:
    """However the parent fares, end this process (status 9) after ``seconds``."""
    watchdog = threading.Timer(seconds, os._exit, args=(9,))
    watchdog.daemon = True
    watchdog.start()


def connect(args: dict[str, Any], **options: Any) -> None:
    """Connect MongoEngine's default alias to the test's database (the
    ``uri`` and ``db`` arguments), with the client ``options``."""
    mongoengine.connect(
        db=args["db"], host=args["uri"], uuidRepresentation="standard", **options
    )


def run_worker(argv: list[str], commands: dict[str, Worker]) -> None:
    """The worker's entry point: run ``COMMAND JSON`` (``argv``, without the
    script) as ``commands[COMMAND]`` says, on ``json.loads(JSON)``: start its
    watchdog, connect if it is to be connected, then call it."""
    if len(argv) != 2 or argv[0] not in commands:
        sys.exit(f"usage: {Path(sys.argv[0]).name} {{{','.join(commands)}}} JSON_ARGS")
    args = json.loads(argv[1])
    worker = commands[argv[0]]
    if worker.watchdog is not None:
        start_watchdog(worker.watchdog)
    if worker.connected:
        connect(args, serverSelectionTimeoutMS=SERVER_SELECTION_MS)
    worker.run(args)


# -- the parent's side -----------------------------------------------------------------------


def fail(message: str) -> NoReturn:
    """Fail the running test with ``message`` alone (no traceback into here)."""
    import pytest  # only the parent fails tests: workers need not load pytest

    pytest.fail(message, pytrace=False)


class Child:
    """One worker process, seen from the test: started, talked to, reaped.

    :param command: the worker's command in ``tests/workers.py`` (run by this
        interpreter from the repository's root); ``args`` its arguments (JSON).
    :param name: names the child in messages and its stderr file; by default
        ``COMMAND-N``, with N counted across the session.
    :param prefix: a command to run the interpreter under (``faketime ...``).
    :param env: variables added to the parent's environment.
    """

    _ids = itertools.count()

    def __init__(
        self,
        command: str,
        args: dict[str, Any],
        tmp_path: Path,
        *,
        name: str | None = None,
        prefix: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name if name is not None else f"{command}-{next(self._ids)}"
        self.args = args
        self.stderr_path = tmp_path / f"{self.name}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self._pending = b""
        try:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, str(WORKERS), command, json.dumps(args)],
                cwd=WORKERS.parents[1],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                bufsize=0,
                env=None if env is None else {**os.environ, **env},
            )
        except BaseException:
            self._stderr.close()
            raise

    def describe(self) -> str:
        """Exit status and stderr tail, for failure messages."""
        self._stderr.flush()
        tail = self.stderr_path.read_bytes().decode(errors="replace")[-3000:]
        return f"worker {self.name} (pid {self.proc.pid}, exit {self.proc.poll()}); stderr:\n{tail}"

    def poll_line(self, timeout: float = 0.0) -> str | None:
        """The next line the worker prints, or ``None`` if there is none
        within ``timeout`` seconds (0: only what was already printed).

        A worker that closes its stdout (exits) fails the test.
        """
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = max(deadline - time.monotonic(), 0.0)
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=10)  # for its exit status
                fail(f"stdout closed early by {self.describe()}")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode()

    def read_line(self, timeout: float = START_TIMEOUT, what: str = "line") -> str:
        """The next line the worker prints; none within ``timeout`` seconds
        fails the test (``what`` says what was awaited)."""
        line = self.poll_line(timeout)
        if line is None:
            fail(f"no {what} in {timeout:g} s from {self.describe()}")
        return line

    def expect(self, word: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Read the next line, which must be ``word`` or ``word {json}``;
        return its JSON data (``{}`` for ``word`` alone)."""
        line = self.read_line(timeout, word)
        got, _, data = line.partition(" ")
        if got != word:
            fail(f"{word} expected, got {line!r} from {self.describe()}")
        result: dict[str, Any] = json.loads(data) if data else {}
        return result

    def send(self, line: str) -> None:
        """Write ``line`` to the worker's stdin; a worker already gone fails the test."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            fail(f"died before {line!r}: {self.describe()}")

    def go(self) -> None:
        """The second half of the start handshake (after ``expect("READY")``)."""
        self.send("GO")

    def join(self, timeout: float, progress: Callable[[], str] | None = None) -> int:
        """Wait for the exit and return its status; after ``timeout`` seconds
        kill the worker and fail the test.

        :param progress: tells how far the work got, for the timeout message.
        """
        try:
            return self.proc.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            self.kill()
            where = f" ({progress()})" if progress is not None else ""
            fail(f"timed out after {timeout:.1f} s{where}: {self.describe()}")

    def kill(self) -> None:
        """``SIGKILL`` (by pid, through Popen) unless it has exited; reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def close(self) -> None:
        """Kill, reap, and close the pipes and the stderr file."""
        try:
            self.kill()
        finally:
            for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
                if stream is not None:
                    stream.close()


class Children:
    """The workers one test starts; :meth:`close` (or the end of the ``with``
    block) kills and reaps every one of them.

    Calling the group, ``children(COMMAND, **args)``, starts a child with the
    default name; :meth:`start` takes the arguments as a dict, so that a name,
    a prefix or an environment can be given too.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        #: Every child started, in order.
        self.started: list[Child] = []

    def start(
        self,
        command: str,
        args: dict[str, Any],
        *,
        name: str | None = None,
        prefix: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Child:
        child = Child(command, args, self.tmp_path, name=name, prefix=prefix, env=env)
        self.started.append(child)
        return child

    def __call__(self, command: str, /, **args: Any) -> Child:
        return self.start(command, args)

    def close(self) -> None:
        """Close every child (each one, even if closing another fails)."""
        with contextlib.ExitStack() as stack:
            for child in reversed(self.started):  # the callbacks run last first
                stack.callback(child.close)

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- the parent's side: checking recorded holds -------------------------------------------


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals ``(start, end)`` open at one instant. Touching
    intervals (one ends where the next starts) do not overlap."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = current = 0
    for _, step in events:  # at equal times an end (-1) sorts before a start
        current += step
        most = max(most, current)
    return most


def assert_fences_follow_grants(
    holds: list[dict[str, Any]], *, tried: str = "t_try", returned: str = "t_acq"
) -> None:
    """Fences (``hold["fence"]``) are unique, and a hold whose acquisition
    returned (``hold[returned]``) before another acquisition was attempted
    (``hold[tried]``) has the smaller fence: it was granted first."""
    fences = [h["fence"] for h in holds]
    assert all(isinstance(f, int) for f in fences), fences[:5]
    assert len(set(fences)) == len(fences), "fences are not unique"
    by_return = sorted(holds, key=lambda h: h[returned])
    highest: dict[str, Any] | None = None  # the largest fence returned so far
    i = 0
    for hold in sorted(holds, key=lambda h: h[tried]):
        while i < len(by_return) and by_return[i][returned] < hold[tried]:
            if highest is None or by_return[i]["fence"] > highest["fence"]:
                highest = by_return[i]
            i += 1
        assert highest is None or highest["fence"] < hold["fence"], (
            f"fences not increasing with grants: {highest} returned before {hold} was tried")
