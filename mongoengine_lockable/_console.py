"""What the command's parts share: output (rich on a terminal, plain text,
JSON), errors, and the connection to the server named on the command line."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pymongo import MongoClient
from pymongo.errors import ConfigurationError, ConnectionFailure, PyMongoError

from ._uri import UriDatabase, split_uri_database

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["PROG", "URI_ENV", "CliError", "Out", "Terminated", "sigterm_unwinds"]

PROG = "mongoengine-lockable"
URI_ENV = "MONGODB_URI"

#: Server selection timeout unless the URI sets one: an unreachable server is
#: reported in seconds, not after pymongo's default 30 s.
SELECTION_TIMEOUT_MS = 3000


class CliError(Exception):
    """An expected failure: printed as one line, exits with ``status``."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class Out:
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

    def styled(self, text: str, style: str) -> None:
        """Print ``text`` in a rich ``style`` (plain elsewhere)."""
        self.line(text, f"[{style}]{escape(text)}[/]" if self.rich else None)

    def table(
        self,
        title: str,
        headers: Sequence[str],
        rows: Sequence[Sequence[str]],
        *,
        right: Sequence[int] = (),
        styles: Sequence[str | None] | None = None,
        keep: Sequence[int] = (),
    ) -> None:
        """A table: rich's, or columns padded with spaces. Columns in ``keep``
        are never shortened or wrapped (ids a user pastes into a command)."""
        if self.console is not None:
            from rich.table import Table

            table = Table(title=title, title_justify="left", show_header=any(headers))
            for i, header in enumerate(headers):
                widest = max([len(header)] + [len(r[i]) for r in rows])
                table.add_column(
                    header,
                    justify="right" if i in right else "left",
                    no_wrap=i in keep,
                    min_width=widest if i in keep else None,
                    overflow="fold",
                )
            for index, row in enumerate(rows):
                table.add_row(*row, style=styles[index] if styles else None)
            self.console.print(table)
            return
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
        if sys.stdout.isatty():  # a pipe gets every cell whole
            widths = fit(widths, shutil.get_terminal_size().columns - 2, keep)

        def fmt(cells: Sequence[str]) -> str:
            return "  ".join(
                cut(c, w).rjust(w) if i in right else cut(c, w).ljust(w)
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
        print(json.dumps(value, indent=2, sort_keys=True, default=json_default))


#: A shortened column keeps at least this many characters.
NARROWEST = 6


def fit(widths: Sequence[int], room: int, keep: Sequence[int] = ()) -> list[int]:
    """Column widths whose row (two spaces between columns) fits in ``room``:
    the widest column not in ``keep`` gives up a character at a time, none below
    :data:`NARROWEST`. Wider than ``room`` only when that is not enough."""
    fitted = list(widths)
    excess = sum(fitted) + 2 * (len(fitted) - 1) - room
    while excess > 0:
        shrinkable = [i for i, w in enumerate(fitted) if i not in keep and w > NARROWEST]
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: fitted[i])
        fitted[widest] -= 1
        excess -= 1
    return fitted


def cut(text: str, width: int) -> str:
    """``text`` in ``width`` characters, an ellipsis marking a cut."""
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    return str(value)


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat(timespec="milliseconds") + ("Z" if value.tzinfo is None else "")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


# -- the server -------------------------------------------------------------------------


def hosts(uri: str) -> str:
    """The hosts of a URI, without credentials or options (for messages)."""
    rest = uri.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0]
    return rest.rsplit("@", 1)[-1] or uri


def client(uri: str | None) -> MongoClient[dict[str, Any]]:
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
        raise CliError(f"bad --uri: {one_line(str(exc))}", 2) from None


def split(uri: str) -> UriDatabase:
    """The server and database of a URI from the command line, by the rule
    the pytest plugin uses too (:func:`~mongoengine_lockable._uri.split_uri_database`).

    :raises CliError: a URI that is not a MongoDB URI or names a bad database.
    """
    try:
        return split_uri_database(uri)
    except ValueError as exc:
        raise CliError(f"bad --uri: {exc}", 2) from None


def unreachable(uri: str | None, exc: PyMongoError) -> CliError:
    reason = str(exc).split(", Timeout:", 1)[0]
    reason = re.sub(r"\s*\(configured timeouts:[^)]*\)", "", reason)
    where = hosts(uri) if uri else "the server"
    return CliError(f"cannot reach MongoDB at {where}: {one_line(reason)}", 2)


def database_name(uri: str, name: str | None) -> str:
    """The database a command works on: ``--db``, else the one the URI names."""
    if name:
        return name
    database = split(uri).database
    if database is None:
        raise CliError("no database: pass --db NAME or name one in the URI "
                       "(mongodb://HOST/NAME)", 2)
    return database


def ping(uri: str) -> None:
    """Fail fast (status 2) when the server cannot be reached."""
    mongo = client(uri)
    try:
        mongo.admin.command("ping")
    except ConnectionFailure as exc:
        raise unreachable(uri, exc) from None
    finally:
        mongo.close()


# -- signals -------------------------------------------------------------------------


class Terminated(BaseException):
    """Raised in the main thread on ``SIGTERM``, so that clean-up (workers, a
    throw-away ``mongod``) runs as it does for Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Turn ``SIGTERM`` into :class:`Terminated` inside the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
