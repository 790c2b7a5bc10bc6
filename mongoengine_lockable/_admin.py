"""The operator commands ``list`` and ``release --force``.

Both are thin clients of the lease engine: records are read with the server's
clock and described by their kind's own rules
(:meth:`~mongoengine_lockable._rules.Kind.describe`), and a forced release is
the engine's (:func:`~mongoengine_lockable._engine.force_release`), which ends
exactly the lease the operator was shown and passes it to the first waiter.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
from typing import Any, Callable

from bson import ObjectId
from pymongo.write_concern import WriteConcern

from . import _console as console
from ._console import CliError, Out, escape, iso
from ._engine import force_release, record, records
from ._io import executor_for, run
from ._rules import DocumentKind, Kind, named_kind

__all__ = ["cmd_list", "cmd_release"]

log = logging.getLogger("mongoengine_lockable.cli")

DOCUMENT = DocumentKind()
_COLOURS = {"held": "green", "kept": "cyan", "expired": "yellow", "released": "dim", "free": "dim"}


def _rows(kind: Kind, doc: dict[str, Any], now: Any) -> list[dict[str, Any]]:
    """A record as listed (one row per holder): its kind's description, ready
    for JSON."""
    rows = []
    for row in kind.rows(doc, now):
        ident = row["id"]
        row["id"] = str(ident) if isinstance(ident, ObjectId) else ident
        row["locked_until"] = iso(row["locked_until"])
        row["acquired_at"] = iso(row["acquired_at"])
        row.pop("finished", None)
        rows.append(row)
    return rows


def _remaining_text(row: dict[str, Any]) -> str:
    left = row["remaining"]
    if row["state"] == "held":
        return f"{left:.1f} s"
    if row["state"] == "kept":
        return f"{left:.1f} s (min_hold)"
    if row["state"] == "expired" and left is not None:
        return f"ended {-left:.1f} s ago"
    return "-"


def _owner_text(row: dict[str, Any]) -> str:
    """The owner column: a shared lock's holders say which kind they hold."""
    owner = str(row["owner"] or "-")
    if row.get("mode"):
        return f"{owner} ({row['mode']})"
    if row["kind"] == "semaphore" and row["owner"]:
        return f"{owner} (1 of {row.get('limit')})"
    return owner


def _holder_text(row: dict[str, Any]) -> str:
    where = ", ".join(
        part for part in (
            f"host {row['host']}" if row["host"] else "",
            f"pid {row['pid']}" if row["pid"] is not None else "",
        ) if part
    )
    owner = f"{row['owner']}" + (f" ({where})" if where else "")
    queued = f"; {row['waiters']} waiting" if row.get("waiters") else ""
    if row["state"] == "held":
        return f"held by {owner}, {row['remaining']:.1f} s left{queued}"
    if row["state"] == "kept":
        return (f"kept {row['remaining']:.1f} s more by the minimum hold of a finished run "
                f"of {owner}{queued}")
    if row["state"] == "expired":
        return f"not held: the lease of {owner} ended {-row['remaining']:.1f} s ago"
    if row["owner"]:
        return f"not held: released by its last owner {owner}"
    return "not held: never locked"


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _no_collection(db: Any, name: str) -> CliError:
    """The error for a collection that does not exist, with what may be meant."""
    names = sorted(db.list_collection_names())
    guesses = [n for n in names if n.lower() == name.lower() or n == _snake(name)]
    for probe in dict.fromkeys([name, _snake(name), name.lower()]):
        guesses += [g for g in difflib.get_close_matches(probe, names, n=3) if g not in guesses]
    hint = ""
    if name[:1].isupper():
        hint = (f"; MongoEngine stores a Document class {name} in the collection "
                f"{_snake(name)!r} unless its meta['collection'] says otherwise")
    if guesses:
        hint += f"; did you mean {' or '.join(repr(g) for g in guesses)}?"
    elif names:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        hint += f"; collections there: {shown}"
    return CliError(f"no collection {name!r} in database {db.name!r}{hint}", 1)


def _target(args: argparse.Namespace, db: Any) -> tuple[Any, str, Callable[[Any], Kind]]:
    """The collection a command works on, how it is named, and the kind of
    its records."""
    if args.collection:
        if not db.list_collection_names(filter={"name": args.collection}):
            raise _no_collection(db, args.collection)
        return db[args.collection], args.collection, lambda doc: DOCUMENT
    return db[args.lock_collection], args.lock_collection, named_kind


#: The states ``list`` shows without ``--all``: leases held (or kept by a
#: minimum hold) and leases that expired unreleased.
_LISTED = frozenset({"held", "kept", "expired"})


def cmd_list(args: argparse.Namespace) -> int:
    """``list``: the held and expired leases (``--all``: released ones too)."""
    out = Out(json_mode=args.json)
    mongo = console.client(args.uri)
    try:
        db = mongo[console.database_name(args.uri, args.db)]
        coll, name, kind_of = _target(args, db)
        documents = bool(args.collection)
        flt = DOCUMENT.listed(args.all) if documents else {}
        # The named records of every kind share one collection, each kind with
        # its own fields: what is listed is sorted out by the rows' states.
        picked = args.all or documents
        limit = args.limit + 1 if args.limit and picked else 0
        found = run(records(flt, [(DOCUMENT.layout.until, -1), ("_id", 1)], limit),
                    executor_for(coll))
        rows = [row for r in found if r.doc is not None
                for row in _rows(kind_of(r.doc), r.doc, r.now)
                if picked or row["state"] in _LISTED]
        unleased = documents and not rows and coll.count_documents(
            {"$or": [{f: {"$exists": True}} for f in DOCUMENT.layout.all]}, limit=1) == 0
    finally:
        mongo.close()
    more = bool(args.limit) and len(rows) > args.limit
    rows = rows[: args.limit] if args.limit else rows
    if args.json:
        out.dump(rows)
        return 0
    what = f"{db.name}.{name}" + ("" if documents else " (named locks)")
    if not rows:
        if unleased:
            out.line(f"no leases in {what}: none of its documents has a lease field; is it "
                     "the collection of a LockableMixin document?")
        elif not args.all:
            out.line(f"no held or expired leases in {what} (--all also lists released ones)")
        else:
            out.line(f"no leases in {what}")
        return 0
    headers = ["id" if documents else "name", "state", "remaining", "owner", "host", "pid",
               "fence", "waiting"]
    table = [
        [
            str(r["id"]), r["state"], _remaining_text(r), _owner_text(r),
            str(r["host"] or "-"), "-" if r["pid"] is None else str(r["pid"]),
            "-" if r["fence"] is None else str(r["fence"]), str(r["waiters"] or "-"),
        ]
        for r in rows
    ]
    counts = ", ".join(
        f"{n} {state}" for state in _COLOURS
        if (n := sum(r["state"] == state for r in rows)) or state == "held"
    )
    out.table(f"leases in {what}: {counts}", headers, table, right=(2, 5, 6, 7),
              styles=[_COLOURS[r["state"]] for r in rows], keep=(0,))
    if more:
        out.line(f"(more not shown: --limit {args.limit}; use --limit 0 for all)")
    return 0


def _parse_id(text: str) -> Any:
    """A document id from the command line: ObjectId, int, or the string."""
    if ObjectId.is_valid(text) and len(text) == 24:
        return ObjectId(text)
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return text


def cmd_release(args: argparse.Namespace) -> int:
    """``release --force``: end one lease whoever holds it."""
    if not args.force:
        raise CliError("release clears a lease whoever holds it: confirm with --force "
                       "(and --yes)", 2)
    out = Out(json_mode=args.json)
    mongo = console.client(args.uri)
    try:
        db = mongo[console.database_name(args.uri, args.db)]
        coll, name, kind_of = _target(args, db)
        if args.collection:
            candidates = list(dict.fromkeys([_parse_id(args.target), args.target]))
            what = f"document {args.target} in {db.name}.{name}"
        else:
            candidates = [args.target]
            what = f"named lock {args.target!r} in {db.name}.{name}"
        io = executor_for(coll, WriteConcern("majority"))
        seen = None
        for ident in candidates:
            seen = run(record({"_id": ident}), io)
            if seen.doc is not None:
                break
        if seen is None or seen.doc is None:
            raise CliError(f"no {what}", 1)
        kind = kind_of(seen.doc)
        rows = _rows(kind, seen.doc, seen.now)
        owner = getattr(args, "owner", None)
        if owner is not None:
            rows = [r for r in rows if r["owner"] == owner] or [
                {**rows[0], "state": "free", "owner": None, "host": None, "pid": None}]
        tickets = kind.holder_tickets(seen.doc, seen.now, owner)
        if len(tickets) > 1:
            owners = ", ".join(sorted({str(r["owner"]) for r in rows}))
            raise CliError(f"the {what} has {len(tickets)} holders ({owners}): pick one with "
                           "--owner OWNER", 2)
        before = rows[0]
        holder = _holder_text(before)
        held = bool(tickets)
        after = None
        if held and args.yes:
            match = {"_id": seen.doc["_id"]}
            result = run(force_release(kind, match, tickets[0]), io)
            if result.doc is None:
                raise CliError(f"the lease on the {what} changed while it was being released "
                               "(another holder, a renewal or a release): run the command again",
                               1)
            after = _rows(kind, result.doc, result.now)[0]
    finally:
        mongo.close()
    if not held:
        if args.json:
            out.dump({"action": "none", "db": db.name, "collection": name, "previous": before,
                      **{k: before[k] for k in ("kind", "id", "fence")}})
        else:
            out.line(f"nothing to release: the {what} is {holder}")
        return 0
    if not args.yes:
        raise CliError(f"refusing to release the {what} without --yes; it is {holder}; "
                       "add --yes to clear it", 2)
    assert after is not None
    log.warning("forced release of the %s: %s", what, holder)
    passed = after["state"] == "held" and after["owner"] != before["owner"] and \
        before.get("mode") is None and before["kind"] != "semaphore"
    if args.json:
        out.dump({"action": "released", "db": db.name, "collection": name, "previous": before,
                  "now": after, **{k: before[k] for k in ("kind", "id", "fence")}})
        return 0
    text = f"released the {what}: {holder}; fence {before['fence']} kept"
    if passed:
        text += f"; passed to the next waiter {after['owner']} (fence {after['fence']})"
    out.line(text, f"[bold]released[/] {escape(text[len('released '):])}" if out.rich else None)
    return 0
