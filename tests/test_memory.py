"""Many lease cycles do not grow the resident set (real server, child process).

A child process (``benchmarks/memory.py``, so that this test measures exactly
what the benchmark does) runs 2,000 warm-up cycles, measures its RSS, runs
``CYCLES`` more and measures again, for ``doc.lock()`` + ``doc.release()`` and
for ``NamedLock(...).acquire()`` + ``release()``. Lease writes use ``w=1``:
with ``majority`` the cycles would be bound by commit waits, not by the code
under test. 100,000 cycles of each take several minutes here, so the test runs
20,000 and the benchmark the full 100,000. A leak of 256 bytes per cycle would
show as 5 MB.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "memory.py"

CYCLES = 20_000
WARMUP = 2_000
MAX_GROWTH = 5 * 1024 * 1024
#: Objects tracked by the garbage collector may vary a little (pools, caches);
#: a leak of one object per cycle would add CYCLES.
MAX_OBJECT_GROWTH = 2_000


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_lease_cycles_do_not_grow_memory(lockable_real_db):
    if not BENCHMARK.is_file():
        pytest.skip(f"{BENCHMARK} is not there (not a source checkout)")
    command = [
        sys.executable, str(BENCHMARK),
        "--uri", lockable_real_db.uri, "--db", lockable_real_db.db_name,
        "--cycles", str(CYCLES), "--warmup", str(WARMUP), "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    report = []
    for kind in ("doc", "named"):
        r = results[kind]
        report.append(
            f"{kind}: {r['cycles_per_second']:.0f} cycles/s, RSS {r['rss_start']} -> "
            f"{r['rss_end']} ({r['rss_growth'] / 1024:+.0f} KiB), "
            f"GC objects {r['gc_objects_start']} -> {r['gc_objects_end']}"
        )
    print("\n".join(report))
    for kind in ("doc", "named"):
        r = results[kind]
        assert r["cycles"] == CYCLES
        assert r["rss_growth"] < MAX_GROWTH, report
        assert r["gc_objects_end"] - r["gc_objects_start"] < MAX_OBJECT_GROWTH, report
