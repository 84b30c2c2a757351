"""minflow beside procrastinate, pgqueuer, SqliteHuey and the raw ceilings (make bench-peers).

Every system runs the same S1-S3 code in harness.py on the same server and disk, one after the
other; the session ends with one table of scenario x system and minflow's ratio to each.
"""

from __future__ import annotations

import pytest
from harness import load, run_scenarios

SYSTEMS = [
    "sys_minflow",
    "sys_pgqueuer",
    "sys_procrastinate",
    "sys_huey",
    "sys_raw_pg",
    "sys_raw_sqlite",
]

pytestmark = pytest.mark.peers


@pytest.mark.parametrize("module", SYSTEMS)
def test_system(module, backend, workdir, report):
    mod = load(module)
    if backend not in mod.BACKENDS:
        pytest.skip(f"{mod.NAME} does not run on {backend}")
    run_scenarios(mod, backend, workdir, report)
