"""The lease state machine against a small reference model (hypothesis).

Three clients (instances of one saved document: one with a fresh owner token
per acquisition, two sharing the explicit owner "alice") lock, force, claim,
renew, release and update under their lease while time passes. The model
knows who holds the lease, when it ends, the fence and a counter that only
guarded updates raise; after every step the database must agree with it and
every result (``True``/``False``, ``None``, the exceptions raised) must be the
one the model predicts.

Two runs:

- mongomock with an injected clock (``client_now`` patched): time is an integer
  number of milliseconds the machine advances, so the model is exact, including
  the boundary (held while ``now < locked_until``, free from ``locked_until``
  on), which one rule lands on deliberately;
- the real server with real time: short leases and real sleeps. There the end
  of a lease is known only within an interval (the server decides somewhere
  between the client's timestamps before and after each call), widened by
  ``REAL_MARGIN_MS``; while "now" is inside it, either outcome is accepted and
  the interval is narrowed by what the database answered.

Separate tests pin the arithmetic of durations: a lease lasts exactly its
duration in whole milliseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import mongoengine_lockable._io as lease_module
from mongoengine_lockable import LockNotOwnedError, NamedLock
from mongoengine_lockable._named import DEFAULT_COLLECTION

from models import Counter

#: The clients: (name, explicit owner or None). Two instances share "alice",
#: so that ``owner=`` acts on a lease another instance acquired, and a fence
#: tells two acquisitions by one owner apart.
CLIENTS = (("c0", None), ("c1", "alice"), ("c2", "alice"))
CLIENT = st.integers(min_value=0, max_value=len(CLIENTS) - 1)

#: The fake clock's time 0.
EPOCH = datetime(2030, 1, 1)

#: Real server: how far from the edges of a lease's known end interval an
#: outcome is still taken as certain (clock reads, scheduling, rounding).
REAL_MARGIN_MS = 60.0


# -- clocks ----------------------------------------------------------------------


class FakeClock:
    """Milliseconds since ``EPOCH``, advanced only by the machine; patched in as
    the library's ``client_now`` (the clock mongomock leases are decided by)."""

    margin = 0.0

    def __init__(self) -> None:
        self.ms = 0

    def client_now(self) -> datetime:
        return EPOCH + timedelta(milliseconds=self.ms)

    def t(self) -> float:
        return float(self.ms)

    def pass_time(self, ms: int) -> None:
        self.ms += ms


class RealClock:
    """The monotonic clock in milliseconds; time passes by sleeping."""

    margin = REAL_MARGIN_MS

    def t(self) -> float:
        return time.monotonic() * 1000

    def pass_time(self, ms: int) -> None:
        time.sleep(ms / 1000)


# -- the model ---------------------------------------------------------------------


@dataclass
class Held:
    """A client instance's last acquisition, as the model knows it."""

    token: str
    fence: int
    ms: int


@dataclass
class Client:
    name: str
    owner: Optional[str]
    doc: Any
    held: Optional[Held] = None


@dataclass
class Lease:
    """The stored lease. ``lo``/``hi`` bound the end of the lease on the clock
    of the machine (equal on the fake clock); both ``None`` when
    ``locked_until`` is null."""

    owner: Optional[str] = None
    fence: int = 0
    counter: int = 0
    lo: Optional[float] = None
    hi: Optional[float] = None
    tokens: set[str] = field(default_factory=set)


def duration_arg(ms: int, kind: str) -> Any:
    """The duration ``ms`` milliseconds as a float, an int or a timedelta."""
    if kind == "int" and ms % 1000 == 0:
        return ms // 1000
    if kind == "timedelta":
        return timedelta(milliseconds=ms)
    return ms / 1000


def durations(ms_values: st.SearchStrategy[int]) -> st.SearchStrategy[tuple[int, Any]]:
    """(milliseconds, the argument to pass) pairs."""
    kinds = st.sampled_from(["float", "int", "timedelta"])
    return st.tuples(ms_values, kinds).map(lambda p: (p[0], duration_arg(*p)))


class LeaseMachine(RuleBasedStateMachine):
    """The rules and the model; subclasses choose the clock and the durations."""

    clock: Any = None

    def __init__(self) -> None:
        super().__init__()
        Counter.objects.delete()
        self.pk = Counter(name="the one").save().pk
        self.clients = [
            Client(name, owner, Counter.objects.get(pk=self.pk)) for name, owner in CLIENTS
        ]
        self.checker = Counter.objects.get(pk=self.pk)
        self.lease = Lease()
        self.uncertain_outcomes = 0

    # -- what the model predicts ---------------------------------------------------

    def held_now(self, tb: float, ta: float) -> Optional[bool]:
        """Is the lease held at the moment the database decided (between ``tb``
        and ``ta``)? ``None``: too close to the end of the lease to tell."""
        lease, m = self.lease, self.clock.margin
        if lease.lo is None:
            return False
        assert lease.hi is not None
        if ta + m < lease.lo:
            return True
        if tb - m >= lease.hi:
            return False
        return None

    def observe(self, predicted: Optional[bool], held: bool, tb: float, ta: float, what: str
                ) -> None:
        """Check an outcome that shows whether the lease was held; when the
        model could not tell, learn from it."""
        if predicted is not None:
            assert held == predicted, (
                f"{what}: the database acted as if the lease were "
                f"{'held' if held else 'free'}, the model expected otherwise "
                f"(end in [{self.lease.lo}, {self.lease.hi}], call in [{tb}, {ta}])"
            )
            return
        self.uncertain_outcomes += 1
        lease = self.lease
        assert lease.lo is not None and lease.hi is not None
        if held:  # the end is after the decision, which was after tb
            lease.lo = max(lease.lo, tb)
        else:  # the end is before the decision, which was before ta
            lease.hi = min(lease.hi, ta)

    def granted(self, client: Client, doc: Any, ms: int, tb: float, ta: float) -> None:
        """A lock or claim succeeded: the model's lease is now the client's."""
        lease = self.lease
        token = doc.locked_by
        if client.owner is not None:
            assert token == client.owner
        else:
            assert isinstance(token, str) and token, token
            assert token not in lease.tokens, "a default owner token was reused"
            assert token not in {owner for _, owner in CLIENTS}
        lease.tokens.add(token)
        lease.owner = token
        lease.fence += 1
        lease.lo, lease.hi = tb + ms, ta + ms
        client.held = Held(token, lease.fence, ms)
        # The instance shows the document as stored at the grant.
        assert doc.lock_fence == lease.fence
        assert doc.counter == lease.counter
        assert doc.pk == self.pk

    def caller(self, client: Client, pass_owner: bool) -> tuple[Optional[str], Optional[int], bool]:
        """Who release/renew act for: (token, fence or None for any, whether it
        is the instance's own acquisition); token ``None``: nobody."""
        owner = client.owner if pass_owner else None
        held = client.held
        if owner is None:
            if held is None:
                return None, None, False
            return held.token, held.fence, True
        if held is not None and held.token == owner:
            return owner, held.fence, True
        return owner, None, False

    def is_mine(self, token: str, fence: Optional[int]) -> bool:
        lease = self.lease
        return lease.owner == token and (fence is None or lease.fence == fence)

    def call(self, fn: Any) -> tuple[Any, Optional[BaseException], float, float]:
        tb = self.clock.t()
        try:
            result, error = fn(), None
        except LockNotOwnedError as exc:
            result, error = None, exc
        ta = self.clock.t()
        return result, error, tb, ta

    # -- the operations --------------------------------------------------------------

    def do_lock(self, i: int, duration: tuple[int, Any], force: bool) -> None:
        client = self.clients[i]
        ms, arg = duration
        ok, error, tb, ta = self.call(
            lambda: client.doc.lock(arg, owner=client.owner, force=force)
        )
        assert error is None
        assert ok is True or ok is False
        if force:
            assert ok is True, "lock(force=True) must always succeed"
        else:
            self.observe(self.held_now(tb, ta), not ok, tb, ta, "lock")
        if ok:
            self.granted(client, client.doc, ms, tb, ta)

    def do_claim(self, i: int, duration: tuple[int, Any], filtered: bool) -> None:
        client = self.clients[i]
        ms, arg = duration
        qs = Counter.objects(pk=self.pk) if filtered else Counter.objects
        doc, error, tb, ta = self.call(lambda: qs.claim(arg, owner=client.owner))
        assert error is None
        self.observe(self.held_now(tb, ta), doc is None, tb, ta, "claim")
        if doc is not None:
            client.doc = doc
            self.granted(client, doc, ms, tb, ta)

    def do_renew(self, i: int, duration: Optional[tuple[int, Any]], pass_owner: bool) -> None:
        client = self.clients[i]
        owner = client.owner if pass_owner else None
        arg = None if duration is None else duration[1]
        token, fence, own = self.caller(client, pass_owner)
        if token is None:
            with pytest.raises(LockNotOwnedError):
                client.doc.renew(arg)
            return
        if duration is None and not own:
            with pytest.raises(TypeError, match="duration"):
                client.doc.renew(owner=owner)
            return
        assert client.held is not None or duration is not None
        ms = duration[0] if duration is not None else client.held.ms  # type: ignore[union-attr]
        _, error, tb, ta = self.call(lambda: client.doc.renew(arg, owner=owner))
        if not self.is_mine(token, fence):
            assert error is not None, "renew() of a lease the caller does not hold succeeded"
            return
        self.observe(self.held_now(tb, ta), error is None, tb, ta, "renew")
        if error is None:
            self.lease.lo, self.lease.hi = tb + ms, ta + ms
            assert client.doc.lock_fence == self.lease.fence

    def do_release(self, i: int, pass_owner: bool) -> None:
        client = self.clients[i]
        owner = client.owner if pass_owner else None
        token, fence, own = self.caller(client, pass_owner)
        if token is None:
            with pytest.raises(LockNotOwnedError):
                client.doc.release()
            return
        _, error, tb, ta = self.call(lambda: client.doc.release(owner=owner))
        if own:
            client.held = None  # the instance forgets its acquisition either way
        if not self.is_mine(token, fence):
            assert error is not None, "release() of a lease the caller does not hold succeeded"
            return
        self.observe(self.held_now(tb, ta), error is None, tb, ta, "release")
        # Released, or (expired) cleared before raising: locked_until is null.
        self.lease.lo = self.lease.hi = None
        if error is None:
            assert client.doc.locked_until is None

    def do_update(self, i: int) -> None:
        client = self.clients[i]
        held = client.held
        if held is None:
            with pytest.raises(LockNotOwnedError):
                client.doc.update_if_held(inc__counter=1)
            return
        _, error, tb, ta = self.call(lambda: client.doc.update_if_held(inc__counter=1))
        if not self.is_mine(held.token, held.fence):
            assert error is not None, "update_if_held() succeeded without the lease"
            return
        self.observe(self.held_now(tb, ta), error is None, tb, ta, "update_if_held")
        if error is None:
            self.lease.counter += 1
            assert client.doc.counter == self.lease.counter

    # -- rules shared by both clocks ---------------------------------------------------

    @rule(i=CLIENT, pass_owner=st.booleans())
    def release(self, i: int, pass_owner: bool) -> None:
        self.do_release(i, pass_owner)

    @rule(i=CLIENT)
    def update_if_held(self, i: int) -> None:
        self.do_update(i)

    @rule(i=CLIENT)
    def reload_client(self, i: int) -> None:
        """A new instance (as in another process): it has acquired nothing."""
        client = self.clients[i]
        client.doc = Counter.objects.get(pk=self.pk)
        client.held = None

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def stored_document_matches_the_model(self) -> None:
        stored = Counter._get_collection().find_one({"_id": self.pk})
        lease = self.lease
        assert stored is not None
        assert stored.get("lock_fence", 0) == lease.fence
        assert stored.get("counter", 0) == lease.counter
        assert stored.get("locked_by") == lease.owner
        until = stored.get("locked_until")
        assert (until is None) == (lease.lo is None), (until, lease)
        if isinstance(self.clock, FakeClock) and until is not None:
            assert until == EPOCH + timedelta(milliseconds=lease.lo)  # type: ignore[arg-type]

    @invariant()
    def is_locked_matches_the_model(self) -> None:
        got, _, tb, ta = self.call(self.checker.is_locked)
        self.observe(self.held_now(tb, ta), got, tb, ta, "is_locked")

    @rule()
    def querysets_match_the_model(self) -> None:
        """``.locked()`` / ``.unlocked()`` select the document as the model says."""
        n_locked, _, tb, ta = self.call(lambda: Counter.objects.locked().count())
        self.observe(self.held_now(tb, ta), n_locked == 1, tb, ta, "locked()")
        n_free, _, tb, ta = self.call(lambda: Counter.objects.unlocked().count())
        self.observe(self.held_now(tb, ta), n_free == 0, tb, ta, "unlocked()")
        if isinstance(self.clock, FakeClock):
            assert n_locked + n_free == 1


# -- mongomock, fake clock -----------------------------------------------------------

#: Leases of 125 ms to 10 s in steps of 125 ms: exact in binary floating point.
MOCK_DURATIONS = durations(st.integers(min_value=1, max_value=80).map(lambda k: k * 125))


class MockLeaseMachine(LeaseMachine):
    clock = FakeClock()

    def __init__(self) -> None:
        super().__init__()
        self.clock.ms = 0

    @rule(i=CLIENT, duration=MOCK_DURATIONS, force=st.booleans())
    def lock(self, i: int, duration: tuple[int, Any], force: bool) -> None:
        self.do_lock(i, duration, force)

    @rule(i=CLIENT, duration=MOCK_DURATIONS, filtered=st.booleans())
    def claim(self, i: int, duration: tuple[int, Any], filtered: bool) -> None:
        self.do_claim(i, duration, filtered)

    @rule(i=CLIENT, duration=st.none() | MOCK_DURATIONS, pass_owner=st.booleans())
    def renew(self, i: int, duration: Optional[tuple[int, Any]], pass_owner: bool) -> None:
        self.do_renew(i, duration, pass_owner)

    @rule(ms=st.integers(min_value=0, max_value=12_000))
    def time_passes(self, ms: int) -> None:
        self.clock.pass_time(ms)

    @precondition(lambda self: self.lease.lo is not None)
    @rule(offset=st.integers(min_value=-2, max_value=2))
    def time_passes_to_the_end(self, offset: int) -> None:
        """To the millisecond the lease ends at (or just before or after)."""
        target = int(self.lease.lo) + offset  # type: ignore[arg-type]
        self.clock.pass_time(max(0, target - self.clock.ms))


def test_lease_state_machine_on_mongomock(lockable_mongomock_db, monkeypatch):
    clock = MockLeaseMachine.clock
    monkeypatch.setattr(lease_module, "client_now", clock.client_now)
    run_state_machine_as_test(
        MockLeaseMachine,
        settings=settings(
            max_examples=200,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )


# -- the real server, real time --------------------------------------------------------

REAL_DURATIONS = durations(st.sampled_from([200, 250, 300, 350, 400]))


class RealLeaseMachine(LeaseMachine):
    clock = RealClock()
    uncertain_total = 0

    @rule(i=CLIENT, duration=REAL_DURATIONS, force=st.booleans())
    def lock(self, i: int, duration: tuple[int, Any], force: bool) -> None:
        self.do_lock(i, duration, force)

    @rule(i=CLIENT, duration=REAL_DURATIONS, filtered=st.booleans())
    def claim(self, i: int, duration: tuple[int, Any], filtered: bool) -> None:
        self.do_claim(i, duration, filtered)

    @rule(i=CLIENT, duration=st.none() | REAL_DURATIONS, pass_owner=st.booleans())
    def renew(self, i: int, duration: Optional[tuple[int, Any]], pass_owner: bool) -> None:
        self.do_renew(i, duration, pass_owner)

    @rule(ms=st.integers(min_value=50, max_value=500))
    def time_passes(self, ms: int) -> None:
        self.clock.pass_time(ms)

    def teardown(self) -> None:
        type(self).uncertain_total += self.uncertain_outcomes


def test_lease_state_machine_on_the_real_server(lockable_real_db):
    RealLeaseMachine.uncertain_total = 0
    run_state_machine_as_test(
        RealLeaseMachine,
        settings=settings(
            max_examples=10,
            stateful_step_count=8,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )
    # How often "now" was too close to the end of a lease to predict (shown
    # with -s): those steps checked only that the database stayed consistent.
    print(f"real-server machine: {RealLeaseMachine.uncertain_total} uncertain outcomes")


# -- the length of a lease ------------------------------------------------------------

#: Durations of a whole number of milliseconds (2.007 s, 8.191 s: their float
#: value times 1000 is a hair above the integer) and a control.
EXACT_DURATIONS = [
    pytest.param(timedelta(milliseconds=2007), 2007, id="timedelta-2007ms"),
    pytest.param(2.007, 2007, id="float-2.007"),
    pytest.param(8.191, 8191, id="float-8.191"),
    pytest.param(2.5, 2500, id="float-2.5"),
]


@pytest.fixture
def fake_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(lease_module, "client_now", clock.client_now)
    return clock


@pytest.mark.parametrize(("duration", "ms"), EXACT_DURATIONS)
def test_a_lease_lasts_exactly_its_duration(lockable_mongomock_db, fake_clock, duration, ms):
    """Held 1 ms before the end of the duration, free at its end."""
    doc = Counter(name="exact").save()
    assert doc.lock(duration) is True
    assert doc.locked_until == EPOCH + timedelta(milliseconds=ms)
    fake_clock.pass_time(ms - 1)
    assert doc.is_locked() is True
    fake_clock.pass_time(1)
    assert doc.is_locked() is False


@pytest.mark.parametrize(("duration", "ms"), EXACT_DURATIONS)
def test_a_named_lease_lasts_exactly_its_duration(lockable_db, fake_clock, duration, ms):
    """A named lock's record shows the grant's time (``acquired_at``) and its
    end, both from the deciding clock: they are ``duration`` apart."""
    lock = NamedLock("exact", duration)
    assert lock.acquire() is True
    record = lockable_db.database[DEFAULT_COLLECTION].find_one({"_id": "exact"})
    assert record["locked_until"] - record["acquired_at"] == timedelta(milliseconds=ms)
    lock.release()
