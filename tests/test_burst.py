"""A burst of scans into a watched inbox, with the Prefect server restarted and a ``brats serve``
killed while it segments: every scan is segmented exactly once and nothing partial is left. The
server runs on a throwaway PostgreSQL cluster, as a team runs it.

Real processes throughout (``benchmarks/burst.py``): a ``prefect server start``, two ``brats
serve``, ``brats watch --served``, and the sweep for what the restart and the kill took with them.
"""

from __future__ import annotations

import pytest

from benchmarks.burst import burst
from tests.conftest import REAL

pytestmark = pytest.mark.slow


def test_a_burst_through_a_server_restart_and_a_killed_worker_loses_nothing(tmp_path):
    report = burst(8, tmp_path, REAL / "Brats18_2013_2_1", quiet=5.0, timeout=900, database="postgres")
    assert report["restarted_server"] and report["killed_while_segmenting"]
    assert report["missing"] == [] and report["bad_segmentations"] == []
    assert report["written_twice"] == [] and report["not_seen_written"] == []
    assert report["partial_files"] == []
