"""A small evaluator of the aggregation expressions the lease rules are built from.

The rules in :mod:`mongoengine_lockable._rules` are MongoDB filters and pipeline
updates that a real server evaluates against its own clock (``$$NOW``). mongomock
implements only part of the aggregation language, and compares a missing field
differently from the server, so on mongomock the same filters and pipelines are
evaluated here instead, with ``$$NOW`` set to the client's clock. The rules are
therefore written once; this module is the reference of what they mean, checked
against a real server by the test suite.

Only the operators the rules use are supported; anything else raises
:class:`NotImplementedError` (a rule using it would fail its unit tests).
Comparison follows MongoDB's order of BSON types, with a missing value below
``null``. Datetimes are compared as naive UTC, whether the client returns them
timezone-aware or not.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

__all__ = [
    "MISSING",
    "apply_pipeline",
    "compare",
    "evaluate",
    "naive_utc",
    "project",
    "split_expr",
    "truthy",
]


class _Missing:
    """A field that does not exist (distinct from ``null``)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()
_EPOCH = datetime(1970, 1, 1)


def naive_utc(value: datetime) -> datetime:
    """``value`` as a naive UTC datetime (how MongoDB stores dates)."""
    if value.tzinfo is not None:
        return value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


# -- comparison -----------------------------------------------------------------


def _rank(value: Any) -> int:
    """MongoDB's order of BSON types (missing below null)."""
    if value is MISSING:
        return 0
    if value is None:
        return 1
    if isinstance(value, bool):
        return 9
    if isinstance(value, (int, float)):
        return 2
    if isinstance(value, str):
        return 3
    if isinstance(value, Mapping):
        return 4
    if isinstance(value, (list, tuple)):
        return 5
    if isinstance(value, (bytes, bytearray)):
        return 6
    if type(value).__name__ == "ObjectId":
        return 7
    if isinstance(value, datetime):
        return 10
    if type(value).__name__ == "Timestamp":
        return 11
    raise NotImplementedError(f"cannot compare a {type(value).__name__}")


def compare(a: Any, b: Any) -> int:
    """-1, 0 or 1 as MongoDB's aggregation comparison orders ``a`` and ``b``."""
    ra, rb = _rank(a), _rank(b)
    if ra != rb:
        return -1 if ra < rb else 1
    if ra in (0, 1):
        return 0
    if ra == 10:
        a, b = naive_utc(a), naive_utc(b)
    if ra in (4, 5):
        a_items = list(a.items()) if ra == 4 else list(a)
        b_items = list(b.items()) if ra == 4 else list(b)
        for x, y in zip(a_items, b_items):
            c = compare(x, y)
            if c:
                return c
        return (len(a_items) > len(b_items)) - (len(a_items) < len(b_items))
    return int(a > b) - int(a < b)


def truthy(value: Any) -> bool:
    """Aggregation truth: false, null, missing and 0 are false."""
    if value is MISSING or value is None or value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    return True


# -- evaluation -----------------------------------------------------------------


class _Context:
    def __init__(self, root: Mapping[str, Any], now: datetime) -> None:
        self.root = root
        self.now = now


def _path(value: Any, parts: list[str]) -> Any:
    for i, part in enumerate(parts):
        if isinstance(value, Mapping):
            value = value.get(part, MISSING)
        elif isinstance(value, list):
            # A path through an array of documents yields the array of values.
            values = [_path(item, parts[i:]) for item in value if isinstance(item, Mapping)]
            return [v for v in values if v is not MISSING]
        else:
            return MISSING
    if isinstance(value, datetime):
        return naive_utc(value)
    return value


def evaluate(
    expr: Any,
    doc: Mapping[str, Any],
    now: datetime,
    variables: Mapping[str, Any] | None = None,
) -> Any:
    """Evaluate the aggregation expression ``expr`` against ``doc``.

    :param now: the value of ``$$NOW`` (naive UTC).
    :param variables: user variables (``$$name``) in scope.
    :return: the value; :data:`MISSING` for a missing field (or ``$$REMOVE``).
    """
    return _eval(expr, _Context(doc, now), dict(variables or {}))


def _eval(expr: Any, ctx: _Context, env: dict[str, Any]) -> Any:
    if isinstance(expr, str):
        if expr.startswith("$$"):
            name, _, rest = expr[2:].partition(".")
            if name == "NOW":
                base: Any = ctx.now
            elif name in ("ROOT", "CURRENT"):
                base = ctx.root
            elif name == "REMOVE":
                return MISSING
            elif name in env:
                base = env[name]
            else:
                raise NotImplementedError(f"unknown variable $${name}")
            return _path(base, rest.split(".")) if rest else base
        if expr.startswith("$"):
            return _path(ctx.root, expr[1:].split("."))
        return expr
    if isinstance(expr, list):
        return [_eval(item, ctx, env) for item in expr]
    if isinstance(expr, Mapping):
        if len(expr) == 1:
            (key, arg), = expr.items()
            if key.startswith("$"):
                handler = _OPERATORS.get(key)
                if handler is None:
                    raise NotImplementedError(f"operator {key} is not supported")
                return handler(arg, ctx, env)
        return {k: v for k, v in ((k, _eval(v, ctx, env)) for k, v in expr.items())
                if v is not MISSING}
    if isinstance(expr, datetime):
        return naive_utc(expr)
    return expr


def _args(arg: Any, ctx: _Context, env: dict[str, Any]) -> list[Any]:
    values = arg if isinstance(arg, list) else [arg]
    return [_eval(v, ctx, env) for v in values]


def _number(value: Any, op: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op} needs numbers, not {type(value).__name__}")
    return value


def _add(arg: Any, ctx: _Context, env: dict[str, Any]) -> Any:
    values = _args(arg, ctx, env)
    if any(v is None or v is MISSING for v in values):
        return None
    dates = [v for v in values if isinstance(v, datetime)]
    total = sum(_number(v, "$add") for v in values if not isinstance(v, datetime))
    if len(dates) > 1:
        raise TypeError("$add takes at most one date")
    if dates:
        return dates[0] + timedelta(milliseconds=total)
    return total


def _subtract(arg: Any, ctx: _Context, env: dict[str, Any]) -> Any:
    a, b = _args(arg, ctx, env)
    if a is None or a is MISSING or b is None or b is MISSING:
        return None
    if isinstance(a, datetime) and isinstance(b, datetime):
        return int((a - b) / timedelta(milliseconds=1))
    if isinstance(a, datetime):
        return a - timedelta(milliseconds=_number(b, "$subtract"))
    return _number(a, "$subtract") - _number(b, "$subtract")


def _comparison(test: Callable[[int], bool]) -> Callable[[Any, _Context, dict[str, Any]], bool]:
    def handler(arg: Any, ctx: _Context, env: dict[str, Any]) -> bool:
        a, b = _args(arg, ctx, env)
        return test(compare(a, b))

    return handler


def _cond(arg: Any, ctx: _Context, env: dict[str, Any]) -> Any:
    if isinstance(arg, Mapping):
        test, then, otherwise = arg["if"], arg["then"], arg["else"]
    else:
        test, then, otherwise = arg
    return _eval(then if truthy(_eval(test, ctx, env)) else otherwise, ctx, env)


def _if_null(arg: Any, ctx: _Context, env: dict[str, Any]) -> Any:
    *candidates, fallback = arg
    for candidate in candidates:
        value = _eval(candidate, ctx, env)
        if value is not None and value is not MISSING:
            return value
    return _eval(fallback, ctx, env)


def _and(arg: Any, ctx: _Context, env: dict[str, Any]) -> bool:
    return all(truthy(_eval(v, ctx, env)) for v in arg)


def _or(arg: Any, ctx: _Context, env: dict[str, Any]) -> bool:
    return any(truthy(_eval(v, ctx, env)) for v in arg)


def _not(arg: Any, ctx: _Context, env: dict[str, Any]) -> bool:
    (value,) = _args(arg, ctx, env)
    return not truthy(value)


def _extreme(pick: int) -> Callable[[Any, _Context, dict[str, Any]], Any]:
    def handler(arg: Any, ctx: _Context, env: dict[str, Any]) -> Any:
        values = _args(arg, ctx, env)
        if len(values) == 1 and isinstance(values[0], list):
            values = values[0]
        present = [v for v in values if v is not None and v is not MISSING]
        if not present:
            return None
        best = present[0]
        for value in present[1:]:
            if compare(value, best) == pick:
                best = value
        return best

    return handler


def _array(value: Any, op: str) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{op} needs an array, not {type(value).__name__}")
    return value


def _scopes(arg: Any, ctx: _Context, env: dict[str, Any], op: str) -> list[Any] | None:
    """For ``$filter``/``$map``: each item of ``input`` with the variables in
    scope for it (``as``, default ``this``); ``None`` for a null input."""
    source = _eval(arg["input"], ctx, env)
    if source is None or source is MISSING:
        return None
    name = arg.get("as", "this")
    return [(item, {**env, name: item}) for item in _array(source, op)]


def _filter(arg: Any, ctx: _Context, env: dict[str, Any]) -> Any:
    scopes = _scopes(arg, ctx, env, "$filter")
    if scopes is None:
        return None
    kept = [item for item, inner in scopes if truthy(_eval(arg["cond"], ctx, inner))]
    if "limit" in arg:
        kept = kept[: int(_eval(arg["limit"], ctx, env))]
    return kept


def _map(arg: Any, ctx: _Context, env: dict[str, Any]) -> Any:
    scopes = _scopes(arg, ctx, env, "$map")
    return None if scopes is None else [_eval(arg["in"], ctx, inner) for _, inner in scopes]


def _reduce(arg: Any, ctx: _Context, env: dict[str, Any]) -> Any:
    source = _eval(arg["input"], ctx, env)
    if source is None or source is MISSING:
        return None
    value = _eval(arg["initialValue"], ctx, env)
    for item in _array(source, "$reduce"):
        value = _eval(arg["in"], ctx, {**env, "this": item, "value": value})
    return value


def _size(arg: Any, ctx: _Context, env: dict[str, Any]) -> int:
    (value,) = _args(arg, ctx, env)
    return len(_array(value, "$size"))


def _array_elem_at(arg: Any, ctx: _Context, env: dict[str, Any]) -> Any:
    array, index = _args(arg, ctx, env)
    if array is None or array is MISSING:
        return None
    array = _array(array, "$arrayElemAt")
    index = int(_number(index, "$arrayElemAt"))
    if -len(array) <= index < len(array):
        return array[index]
    return MISSING


def _slice(arg: Any, ctx: _Context, env: dict[str, Any]) -> Any:
    values = _args(arg, ctx, env)
    array = values[0]
    if array is None or array is MISSING:
        return None
    array = _array(array, "$slice")
    if len(values) == 2:
        n = int(values[1])
        return array[:n] if n >= 0 else array[n:]
    start, n = int(values[1]), int(values[2])
    if start < 0:
        start = max(len(array) + start, 0)
    return array[start : start + n]


def _concat_arrays(arg: Any, ctx: _Context, env: dict[str, Any]) -> Any:
    result: list[Any] = []
    for value in _args(arg, ctx, env):
        if value is None or value is MISSING:
            return None
        result.extend(_array(value, "$concatArrays"))
    return result


def _concat(arg: Any, ctx: _Context, env: dict[str, Any]) -> Any:
    values = _args(arg, ctx, env)
    if any(v is None or v is MISSING for v in values):
        return None
    for value in values:
        if not isinstance(value, str):
            raise TypeError(f"$concat needs strings, not {type(value).__name__}")
    return "".join(values)


def _in(arg: Any, ctx: _Context, env: dict[str, Any]) -> bool:
    value, array = _args(arg, ctx, env)
    return any(compare(value, item) == 0 for item in _array(array, "$in"))


def _sum(arg: Any, ctx: _Context, env: dict[str, Any]) -> Any:
    values = _args(arg, ctx, env)
    if len(values) == 1 and isinstance(values[0], list):
        values = values[0]
    return sum(v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool))


def _merge_objects(arg: Any, ctx: _Context, env: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for value in _args(arg, ctx, env):
        if value is None or value is MISSING:
            continue
        merged.update(value)
    return merged


def _to_long(arg: Any, ctx: _Context, env: dict[str, Any]) -> Any:
    (value,) = _args(arg, ctx, env)
    if value is None or value is MISSING:
        return None
    if isinstance(value, datetime):
        return int((naive_utc(value) - _EPOCH) / timedelta(milliseconds=1))
    number = _number(value, "$toLong")
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError("$toLong of a non-finite number")
    return int(number)


def _let(arg: Any, ctx: _Context, env: dict[str, Any]) -> Any:
    bound = {name: _eval(value, ctx, env) for name, value in arg["vars"].items()}
    return _eval(arg["in"], ctx, {**env, **bound})


def _is_array(arg: Any, ctx: _Context, env: dict[str, Any]) -> bool:
    (value,) = _args(arg, ctx, env)
    return isinstance(value, list)


_OPERATORS: dict[str, Callable[[Any, _Context, dict[str, Any]], Any]] = {
    "$literal": lambda arg, ctx, env: copy.deepcopy(arg),
    "$add": _add,
    "$subtract": _subtract,
    "$eq": _comparison(lambda c: c == 0),
    "$ne": _comparison(lambda c: c != 0),
    "$gt": _comparison(lambda c: c > 0),
    "$gte": _comparison(lambda c: c >= 0),
    "$lt": _comparison(lambda c: c < 0),
    "$lte": _comparison(lambda c: c <= 0),
    "$cond": _cond,
    "$ifNull": _if_null,
    "$and": _and,
    "$or": _or,
    "$not": _not,
    "$max": _extreme(1),
    "$min": _extreme(-1),
    "$filter": _filter,
    "$map": _map,
    "$reduce": _reduce,
    "$size": _size,
    "$arrayElemAt": _array_elem_at,
    "$slice": _slice,
    "$concatArrays": _concat_arrays,
    "$concat": _concat,
    "$in": _in,
    "$sum": _sum,
    "$mergeObjects": _merge_objects,
    "$toLong": _to_long,
    "$let": _let,
    "$isArray": _is_array,
}


# -- pipelines, projections, filters ---------------------------------------------


def _assign(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    target = doc
    for part in parents:
        child = target.get(part)
        if not isinstance(child, dict):
            if value is MISSING:
                return
            child = target[part] = {}
        target = child
    if value is MISSING:
        target.pop(last, None)
    else:
        target[last] = value


def apply_pipeline(
    doc: Mapping[str, Any], stages: Iterable[Mapping[str, Any]], now: datetime
) -> dict[str, Any]:
    """The document after an update pipeline of ``$set``/``$addFields``,
    ``$unset`` and ``$replaceWith`` stages. Each stage sees the document as the
    previous one left it; setting a field to a missing value removes it, as on
    the server."""
    current: dict[str, Any] = copy.deepcopy(dict(doc))
    for stage in stages:
        ((name, spec),) = stage.items()
        if name in ("$set", "$addFields"):
            values = {path: evaluate(expr, current, now) for path, expr in spec.items()}
            for path, value in values.items():
                _assign(current, path, copy.deepcopy(value))
        elif name == "$unset":
            for path in [spec] if isinstance(spec, str) else spec:
                _assign(current, path, MISSING)
        elif name == "$replaceWith":
            replaced = evaluate(spec, current, now)
            if not isinstance(replaced, dict):
                raise TypeError(f"$replaceWith needs a document, not {type(replaced).__name__}")
            current = copy.deepcopy(replaced)
        else:
            raise NotImplementedError(f"pipeline stage {name} is not supported")
    return current


def project(doc: Mapping[str, Any], projection: Mapping[str, Any] | None, now: datetime) -> Any:
    """``doc`` as a find projection returns it: inclusion of fields
    (``1``/``True``) and computed fields (expressions, ``$$ROOT``, ``$$NOW``);
    ``_id`` is always kept."""
    if not projection:
        return copy.deepcopy(dict(doc))
    result: dict[str, Any] = {}
    if "_id" in doc and projection.get("_id", True):
        result["_id"] = doc["_id"]
    for key, spec in projection.items():
        if key == "_id":
            continue
        if spec is True or spec == 1:
            value = _path(doc, key.split("."))
        elif spec is False or spec == 0:
            raise NotImplementedError("exclusion projections are not supported")
        else:
            value = evaluate(spec, doc, now)
        if value is not MISSING:
            _assign(result, key, copy.deepcopy(value))
    return result


def split_expr(flt: Mapping[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """Split a filter into its plain query part and its ``$expr`` conditions
    (top-level, or inside a top-level ``$and``), so that a store which cannot
    evaluate ``$expr`` evaluates the plain part and this module the rest."""
    plain: dict[str, Any] = {}
    exprs: list[Any] = []
    ands: list[Any] = []
    for key, value in flt.items():
        if key == "$expr":
            exprs.append(value)
        elif key == "$and":
            for part in value:
                sub_plain, sub_exprs = split_expr(part)
                exprs.extend(sub_exprs)
                if sub_plain:
                    ands.append(sub_plain)
        else:
            plain[key] = value
    if ands:
        plain = {"$and": [plain, *ands]} if plain else (ands[0] if len(ands) == 1 else
                                                          {"$and": ands})
    return plain, exprs


def localize(flt: Any, now: datetime) -> Any:
    """``flt`` with its ``$expr`` comparisons of a field with ``$$NOW`` turned
    into plain query operators on the date ``now``, for a store (mongomock)
    that evaluates the filters of a queryset itself but not ``$$NOW``.

    ``{$lte: ["$f", "$$NOW"]}`` becomes "``f`` is null, missing or not after
    ``now``"; ``{$gt: ["$f", "$$NOW"]}`` becomes "``f`` is after ``now``".

    :raises NotImplementedError: another ``$expr``.
    """
    if isinstance(flt, list):
        return [localize(item, now) for item in flt]
    if not isinstance(flt, Mapping):
        return flt
    parts: list[Any] = []
    plain: dict[str, Any] = {}
    for key, value in flt.items():
        if key != "$expr":
            plain[key] = localize(value, now)
            continue
        ((op, args),) = value.items()
        if (op not in ("$lte", "$gt") or len(args) != 2 or args[1] != "$$NOW"
                or not isinstance(args[0], str) or not args[0].startswith("$")):
            raise NotImplementedError(f"cannot evaluate {value!r} without a server clock")
        path = args[0][1:]
        if op == "$gt":
            parts.append({path: {"$gt": now}})
        else:
            parts.append({"$or": [{path: None}, {path: {"$lte": now}}]})
    if not parts:
        return plain
    return {"$and": [plain, *parts]} if plain else (parts[0] if len(parts) == 1 else
                                                      {"$and": parts})
