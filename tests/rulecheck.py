"""Checking lease rules without a server, and against one.

- :func:`matches` and :func:`apply` evaluate a rule's filter and pipeline the
  way mongomock runs them (``mongoengine_lockable._expr``), at a given
  ``$$NOW``;
- :func:`same_on_server` sends each scenario's command to the real server and
  checks that the evaluator, run at the ``$$NOW`` the server reports for the
  write, leaves exactly the same record.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from mongomock.filtering import filter_applies
from pymongo import ReturnDocument

from mongoengine_lockable._expr import apply_pipeline, evaluate, split_expr, truthy
from mongoengine_lockable._rules import DOC_KEY, NOW_KEY, RESULT_PROJECTION, Command, combine

Scenario = tuple[str, "dict[str, Any] | None", Command]


def matches(flt: dict[str, Any], doc: dict[str, Any], now: datetime) -> bool:
    """Does ``doc`` match ``flt`` (plain part by mongomock, ``$expr`` here)?"""
    plain, exprs = split_expr(flt)
    return filter_applies(plain, doc) and all(  # type: ignore[no-untyped-call]
        truthy(evaluate(e, doc, now)) for e in exprs)


def apply(doc: dict[str, Any] | None, command: Command, now: datetime,
          name: Any = "x") -> dict[str, Any] | None:
    """The record after ``command``, as a find-and-modify leaves it; ``None``
    when its filter does not match (nothing written)."""
    if doc is None:
        if not command.upsert:
            return None
        doc = {"_id": name}
    elif not matches(command.filter, doc, now):
        return None
    return apply_pipeline(doc, command.update, now)


def server_clock(coll: Any) -> datetime:
    """The server's clock now (naive UTC)."""
    clock: datetime = coll.database.command("hello")["localTime"].replace(tzinfo=None)
    return clock


def same_on_server(coll: Any, scenarios: list[Scenario], key: Any = "x") -> None:
    """Each scenario's command gives the same record on the server as on the
    evaluator (or matches nothing on both)."""
    clock = server_clock(coll)
    for label, doc, command in scenarios:
        coll.delete_many({})
        if doc is not None:
            coll.insert_one(doc)
        raw = coll.find_one_and_update(
            combine({"_id": key}, command.filter), command.update,
            projection=RESULT_PROJECTION, upsert=command.upsert,
            return_document=ReturnDocument.AFTER,
        )
        stored = coll.find_one({"_id": key})
        if raw is None:
            assert doc is not None and stored == doc, label
            assert apply(dict(doc), command, clock, key) is None, label
            continue
        assert raw[DOC_KEY] == stored, label
        expected = apply(None if doc is None else dict(doc), command, raw[NOW_KEY], key)
        assert stored == expected, f"{label}:\nserver {stored}\nlocal  {expected}"
