"""Signals sent on lease changes, in this library's own blinker namespace.

The sender is the document class (document leases) or the
:class:`~mongoengine_lockable.NamedLock` instance. Keyword arguments always
include ``owner`` and ``fence``, plus ``document`` (the instance) or ``name``.

- ``lock_acquired``: a lease was granted.
- ``lock_released``: the caller ended its lease.
- ``lock_renewed``: the caller extended its lease.
- ``lock_lost``: a keepalive renewal found the lease gone.
"""

from __future__ import annotations

from blinker import Namespace

__all__ = ["lock_acquired", "lock_lost", "lock_released", "lock_renewed"]

_signals = Namespace()

lock_acquired = _signals.signal("lock_acquired")
lock_released = _signals.signal("lock_released")
lock_renewed = _signals.signal("lock_renewed")
lock_lost = _signals.signal("lock_lost")
