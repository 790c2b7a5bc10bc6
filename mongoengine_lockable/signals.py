"""Signals sent on lease changes, in this library's own blinker namespace.

The sender is the document class (document leases) or the lock object
(:class:`~mongoengine_lockable.NamedLock`, a semaphore, a reader or writer).
Keyword arguments always include ``owner`` (except ``lock_unavailable``), plus
``document`` (the instance) or ``name``:

- ``lock_acquired``: a lease was granted; ``fence`` and ``waited`` (seconds
  spent waiting for it).
- ``lock_released``: the caller ended its lease; ``fence`` and ``held_for``
  (seconds, or ``None`` for a release by owner name of a lease acquired
  elsewhere).
- ``lock_renewed``: the caller extended its lease; ``fence``.
- ``lock_lost``: a keepalive found the lease gone, or its renewals kept
  failing until the local deadline passed; ``fence``.
- ``lock_unavailable``: an acquisition gave up (``wait`` passed, or a
  ``wait=0`` attempt was refused); ``waited`` and ``holder`` (the owner
  holding the lease, when known, else ``None``). Sent once per refusal, never
  after a success.

Blinker holds receivers weakly: connect a closure or a bound method of a
short-lived object with ``weak=False``::

    signals.lock_lost.connect(on_lost, weak=False)
"""

from __future__ import annotations

from blinker import Namespace

__all__ = ["lock_acquired", "lock_lost", "lock_released", "lock_renewed", "lock_unavailable"]

_signals = Namespace()

lock_acquired = _signals.signal("lock_acquired")
lock_released = _signals.signal("lock_released")
lock_renewed = _signals.signal("lock_renewed")
lock_lost = _signals.signal("lock_lost")
lock_unavailable = _signals.signal("lock_unavailable")
