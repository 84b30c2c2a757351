"""minflow beside procrastinate, pgqueuer, SqliteHuey and the raw ceilings (make bench-peers).

Every system runs the same S1-S3 code in harness.py on the same server and disk, one after the
other, at its own defaults and at its best over the sweep; the session ends with both tables per
backend and minflow's ratio to each system. BENCH_SYSTEMS (comma-separated, e.g.
``minflow,pgqueuer``) runs only some of them.
"""

from __future__ import annotations

import os

import pytest
from harness import load, run_scenarios

SYSTEMS = ["minflow", "pgqueuer", "procrastinate", "huey", "raw_pg", "raw_sqlite"]
CHOSEN = [s.strip() for s in os.environ.get("BENCH_SYSTEMS", ",".join(SYSTEMS)).split(",")]
if set(CHOSEN) - set(SYSTEMS):
    raise ValueError(
        f"BENCH_SYSTEMS: unknown {sorted(set(CHOSEN) - set(SYSTEMS))}; known {SYSTEMS}"
    )

pytestmark = pytest.mark.peers


@pytest.mark.parametrize("system", [s for s in SYSTEMS if s in CHOSEN])
def test_system(system, backend, workdir, report):
    mod = load(f"sys_{system}")
    if backend not in mod.BACKENDS:
        pytest.skip(f"{mod.NAME} does not run on {backend}")
    run_scenarios(mod, backend, workdir, report)
