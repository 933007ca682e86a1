"""The job loop claims only when there may be something to claim: the rings that came before a claim are
answered by it, and a claim that got fewer jobs than it asked for is followed by a wait on the doorbell,
not by another claim. A second stage that fails still stops the loop at once.

Synchronised with events: the loop's idle-wait callback says when it is about to sleep, so the claims
made until then can be counted; the guard's timeout is reached only when the loop misbehaves.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacs_node.config import Settings
from pacs_node.ops.context import ServerContext
from pacs_node.work.job_loop import JobLoop, SecondStage
from pacs_node.work.leases import LeaseKeeper
from storage.queue import ClaimedJob
from storage.schema import JobKind

#: Longest a test waits for the loop to get somewhere (reached only when it does not).
GUARD_S = 30.0


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[ServerContext]:
    settings = Settings(node={"data_dir": tmp_path / "var"}, database={"url": f"sqlite:///{tmp_path / 'node.db'}"},
                        pipeline={"bundle": "fake"}, worker={"poll_interval_s": 60})
    rt = ServerContext.open(settings)
    yield rt
    rt.close()


def _job(job_id: int) -> ClaimedJob:
    return ClaimedJob(job_id, JobKind.ANALYSE.value, f"1.2.{job_id}", None, {}, 1, 3)


class _Loop:
    """A JobLoop in a thread whose claims hand out ``batches`` (then nothing), counted, and whose idle
    waits are announced; ``stop()`` ends it and returns what it raised."""

    def __init__(self, runtime: ServerContext, batches: list[list[ClaimedJob]], claim_limit: int | None,
                 second_stage: SecondStage | None = None, work_gate: threading.Event | None = None,
                 claimed: threading.Event | None = None) -> None:
        self.claims = 0
        self.idle_waits = 0
        self.sleeps_before_claim: list[int] = []  # per claim, the idle waits asked for before it
        self._claimed = claimed  # set at the second claim
        self.working = threading.Event()
        self._work_gate = work_gate
        self.idle = threading.Semaphore(0)
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self._batches = list(batches)
        self._second_stage = second_stage
        self._loop = JobLoop(runtime, "test-owner", JobKind.ANALYSE, claim=self._claim, idle_wait=self._idle_wait,
                             claim_limit=claim_limit)
        self._thread = threading.Thread(target=self._run)

    def _claim(self) -> list[ClaimedJob]:
        self.claims += 1
        self.sleeps_before_claim.append(self.idle_waits)
        if self._claimed is not None and self.claims == 2:
            self._claimed.set()
        return self._batches.pop(0) if self._batches else []

    def _idle_wait(self) -> float:
        self.idle_waits += 1
        self.idle.release()
        return 60.0

    def _work(self, jobs: list[ClaimedJob], leases: LeaseKeeper) -> SecondStage | None:
        self.working.set()
        if self._work_gate is not None:
            assert self._work_gate.wait(GUARD_S), "the test never let the work finish"
        return self._second_stage

    def _run(self) -> None:
        try:
            self._loop.run(self.stopped, self._work)
        except BaseException as exc:  # noqa: BLE001 (the test looks at it)
            self.error = exc

    def start(self) -> _Loop:
        self._thread.start()
        return self

    def until_idle(self) -> int:
        """Wait until the loop is about to sleep; the claims it made until then."""
        assert self.idle.acquire(timeout=GUARD_S), "the loop never went to sleep"
        return self.claims

    def stop(self) -> BaseException | None:
        self.stopped.set()
        self._thread.join(GUARD_S)
        assert not self._thread.is_alive()
        return self.error


def test_rings_that_came_before_a_claim_are_answered_by_it(runtime: ServerContext) -> None:
    bell = runtime.doorbell(JobKind.ANALYSE)
    gate = threading.Event()
    loop = _Loop(runtime, [[_job(1)]], claim_limit=1, work_gate=gate)
    loop.start()
    assert loop.working.wait(GUARD_S)
    for _ in range(5):  # a burst of images stored while the loop works on a batch
        bell.ring()
    gate.set()
    # the full batch, then one claim that answers all five rings (none was for a job queued after it)
    assert loop.until_idle() == 2
    bell.ring()  # a job queued while the loop sleeps wakes it
    assert loop.until_idle() == 3
    assert loop.stop() is None


def test_a_short_claim_is_followed_by_a_wait_not_another_claim(runtime: ServerContext) -> None:
    bell = runtime.doorbell(JobKind.ANALYSE)
    loop = _Loop(runtime, [[_job(1), _job(2), _job(3)], [_job(4)]], claim_limit=3, second_stage=lambda: None)
    loop.start()
    # a full batch: claim again at once; one job of three: nothing more was due, sleep
    assert loop.until_idle() == 2
    bell.ring()
    assert loop.until_idle() == 3
    assert loop.stop() is None


def test_without_a_claim_limit_the_loop_looks_again_before_sleeping(runtime: ServerContext) -> None:
    looked = threading.Event()

    def recorded_after_a_look() -> None:
        assert looked.wait(GUARD_S)

    loop = _Loop(runtime, [[_job(1)]], claim_limit=None, second_stage=recorded_after_a_look, claimed=looked)
    loop.start()
    assert loop.until_idle() == 3  # the batch, a look while it is recorded, a look once it is
    assert loop.stop() is None


def test_a_second_stage_that_raises_wakes_the_sleeping_loop_and_stops_it(runtime: ServerContext) -> None:
    def fails() -> None:
        raise RuntimeError("the disk went away")

    loop = _Loop(runtime, [[_job(1)]], claim_limit=4, second_stage=fails)
    loop.start()
    # the loop sleeps (60 s) after its short claim; the failure wakes it and ends it with the error
    loop._thread.join(GUARD_S)
    assert not loop._thread.is_alive()
    assert isinstance(loop.error, RuntimeError) and str(loop.error) == "the disk went away"
    assert loop.stop() is loop.error


def test_a_short_claim_rung_while_its_batch_ran_claims_again_without_sleeping(runtime: ServerContext) -> None:
    """An image stored while a short batch ran was queued after its claim looked: the loop claims again at
    once, without first working out how long it would sleep (the analysis worker asks the database)."""
    bell = runtime.doorbell(JobKind.ANALYSE)
    gate = threading.Event()
    loop = _Loop(runtime, [[_job(1)], [_job(2)]], claim_limit=3, work_gate=gate)
    loop.start()
    assert loop.working.wait(GUARD_S)
    bell.ring()
    gate.set()
    assert loop.until_idle() == 2  # the short batch, then at once the next one (short, not rung: sleep)
    assert loop.sleeps_before_claim == [0, 0]
    assert loop.stop() is None
