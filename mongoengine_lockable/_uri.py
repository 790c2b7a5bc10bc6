"""The one rule for a database named in a MongoDB URI.

``mongodb://HOST/NAME`` names a server and a database. The command line reads
and changes leases in that database, while the demo and the pytest plugin make
databases of their own on the same server. All of them split a URI with
:func:`split_uri_database`, so that one URI serves everywhere:

- the database is the path of the URI (percent-decoded), or ``None``;
- the server URI is the same URI without that path. MongoDB also uses the path
  database as the authentication database when the URI has credentials and no
  ``authSource``; it then moves into ``authSource=``, so that logging in works
  as before.

The URI is parsed as text: pymongo's parser would resolve a ``mongodb+srv``
name over DNS, and a rule about names should not need the network.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import unquote

__all__ = ["UriDatabase", "split_uri_database"]

_SCHEMES = ("mongodb://", "mongodb+srv://")
#: Characters MongoDB refuses in database names (on every platform).
_FORBIDDEN = frozenset('/\\. "$\x00')
#: MongoDB's limit on a database name, in bytes.
MAX_DATABASE_BYTES = 63


class UriDatabase(NamedTuple):
    """What :func:`split_uri_database` returns."""

    #: The URI without the database path (credentials and options kept).
    server: str
    #: The database named in the URI's path, or ``None``.
    database: str | None


def split_uri_database(uri: str) -> UriDatabase:
    """Split ``uri`` into the server URI and the database it names.

    ::

        >>> split_uri_database("mongodb://h1,h2/shop?replicaSet=rs0")
        UriDatabase(server='mongodb://h1,h2/?replicaSet=rs0', database='shop')
        >>> split_uri_database("mongodb://u:p@h/shop")
        UriDatabase(server='mongodb://u:p@h/?authSource=shop', database='shop')
        >>> split_uri_database("mongodb://h")
        UriDatabase(server='mongodb://h', database=None)

    :param uri: a ``mongodb://`` or ``mongodb+srv://`` connection string.
    :return: ``(server, database)``; ``database`` is ``None`` when the URI
        names none. When it names one and has credentials but no
        ``authSource``, ``server`` carries ``authSource=<database>``.
    :raises TypeError: when ``uri`` is not a ``str``.
    :raises ValueError: when ``uri`` is not a MongoDB URI, names no host, or
        names a database MongoDB would refuse (one of ``/\\. "$``, a NUL, or
        more than 63 bytes).
    """
    if not isinstance(uri, str):
        raise TypeError(f"a MongoDB URI must be a str, not {type(uri).__name__}")
    scheme = next((s for s in _SCHEMES if uri.lower().startswith(s)), None)
    if scheme is None:
        shown = uri if len(uri) <= 40 else uri[:40] + "..."
        raise ValueError(f"not a MongoDB URI (mongodb:// or mongodb+srv://): {shown!r}")
    rest = uri[len(scheme) :]
    address, slash, path = rest.partition("/")
    if not slash:
        # "mongodb://h?x=1" is not valid, but the options are not our business.
        address, _, _ = rest.partition("?")
    if not address.rpartition("@")[2]:
        raise ValueError("the MongoDB URI names no host")
    if not slash:
        return UriDatabase(uri, None)
    raw, question, query = path.partition("?")
    if not raw:
        return UriDatabase(uri, None)
    database = unquote(raw)
    bad = sorted(set(database) & _FORBIDDEN)
    if bad:
        raise ValueError(
            f"the database {database!r} in the MongoDB URI contains {''.join(bad)!r}, "
            "which MongoDB does not allow in a database name"
        )
    if len(database.encode("utf-8")) > MAX_DATABASE_BYTES:
        raise ValueError(
            f"the database {database!r} in the MongoDB URI is longer than "
            f"{MAX_DATABASE_BYTES} bytes"
        )
    options = [part for part in query.split("&") if part] if question else []
    has_credentials = "@" in address
    if has_credentials and not any(o.lower().startswith("authsource=") for o in options):
        options.append(f"authSource={raw}")
    server = f"{uri[: len(scheme)]}{address}/" + ("?" + "&".join(options) if options else "")
    return UriDatabase(server, database)
