"""The scale-out acceptance test, CI-sized: ``pacs-node serve`` and two ``pacs-node worker`` processes on
one PostgreSQL schema and one store, three concurrent DCMTK senders, a chaos loop that ``kill -9``s
workers every few seconds and the listener once, and a DCMTK ``storescp`` counting what arrives.

The full 3 x 200 run is ``python -m bench.chaos`` (see its docstring); this runs
``PACS_NODE_CHAOS_IMAGES`` (default 6) images per sender so that it fits CI on two cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.chaos import ChaosOptions, run
from tests.storage.conftest import pg_server  # noqa: F401 (fixture: skips when PostgreSQL is unreachable)
from tests.support import dcmtk

IMAGES = int(os.environ.get("PACS_NODE_CHAOS_IMAGES", "6"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill9_chaos_on_postgresql_loses_nothing_and_duplicates_nothing(pg_server: str, tmp_path: Path) -> None:  # noqa: F811
    dcmtk("storescu")
    dcmtk("storescp")
    options = ChaosOptions(senders=3, images=IMAGES, workers=2, batch=3, pg_server=pg_server, timeout_s=780)
    report = run(options, tmp_path)
    print(report)
    assert report.ok, report.failures
    assert report.acknowledged == 3 * IMAGES
    assert report.listener_kills == 1 and report.worker_kills >= 1
    assert report.analyse_jobs == {"done": 3 * IMAGES}
    assert report.delivered_uids == report.results > 0
    assert report.doctor_ok
