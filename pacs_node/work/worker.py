"""The analysis worker: claims ``analyse`` jobs, runs the pipeline, stores and routes the results.

An ``analyse`` job is one study's set of instances, due once the study has settled
(:mod:`pacs_node.work.ingest`). The worker reads the headers of every image in the set, classifies their
views (:mod:`pacs_node.work.views`), hands the pipeline only the best image of a view its bundle reads,
and makes one set of result objects for the study: they reference every image, the one read and those set
aside with the reasons. A study analysed before gets new versions that name the ones they replace. A job
whose set is no longer the study's (an instance arrived after it was queued) is completed without work:
the job of the newer set does it.

It runs as its own process (``pacs-node worker``, or one of the children ``serve`` supervises), so a
model that runs out of memory or a native decoder that crashes takes down only this process; its jobs'
leases run out and another worker picks them up.

Batching is dynamic: the worker claims up to ``pipeline.batch_size`` jobs and, if fewer were due, waits
at most ``pipeline.max_batch_latency_s`` (default 0) for more before running what it has. A GPU wants full
batches, a radiographer wants the report now: with no wait, images that arrive while a batch runs form
the next one, so batches fill exactly when the load needs them to. An idle worker sleeps on the
``analyse`` doorbell (:mod:`pacs_node.work.wakeups`), which the listener rings after each commit.

Each batch has two stages (:class:`~pacs_node.work.job_loop.JobLoop`): loading and the pipeline, then
building, storing and recording the results. The second runs on a thread of its own while the next batch
goes through the first, so the model is never idle while results are written; batches are recorded in
the order they were claimed. A batch is recorded as a group: its files made durable together, then its
rows, export jobs, analyses and job completions in one transaction (job by job if that fails).

Everything a job produces is idempotent (result UIDs are derived from the source SOP Instance UID and
the bundle, rows are inserted with ON CONFLICT DO NOTHING, export jobs are deduplicated), so a job whose
worker died half-way and that runs again produces the same objects once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.uid import UID
from pydicom.errors import InvalidDicomError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from pacs_node.dicom.datasets import DatasetRefused, check_frame_size, check_inflated_size
from pacs_node.ops import metrics
from pacs_node.ops.logs import scrub
from pacs_node.work.ingest import inflate_limits
from pacs_node.config import Device, Settings
from pacs_node.results.builder_pool import Built, ResultBuilders, auto_processes
from pacs_node.results.common import evidence_header
from pacs_node.results.study import StudyReport
from pacs_node.work.instance_record import declared_pixels
from pacs_node.work.job_loop import JobLoop, SecondStage, complete_jobs, observe_done
from pacs_node.work.leases import LeaseKeeper
from pacs_node.results.options import ResultOptions
from pacs_node.work.routing import RouteKey, destinations
from pacs_node.work.views import Candidate, Choice, View, acquisition_time, choose, classify_view
from pacs_node.ops.context import ServerContext
from pacs_node.ops.liveness import Beacon, ProcessState
from pacs_node.ops.supervisor import exit_with_parent
from pipelines.constants import FRONTAL_VIEWS
from pipelines.interface import FakePipeline, ImageResult, NotInterpreted, Pipeline, PipelineError
from storage.queue import ClaimedJob
from storage.repository import add_instances, get_instance
from storage.schema import Disposition, JobKind, Origin, utcnow
from storage.studies import StudyImage, analysed_state, instance_set_hash, record_analyses, study_images

log = logging.getLogger(__name__)


#: Most pixels (rows x columns x frames) the worker lets the pipeline decode. The largest detector
#: panels are about 4300 x 4300 (18.5 MP); a compressed stream claiming far more is a decompression bomb.
MAX_SOURCE_PIXELS = 80_000_000


def check_dimensions(ds: Dataset) -> None:
    """Refuse, before any pixel is decoded, an image whose declared size would not fit in memory."""
    try:
        pixels = declared_pixels(ds)
    except ValueError as exc:
        raise PipelineError(str(exc)) from None
    if pixels > MAX_SOURCE_PIXELS:
        raise PipelineError(f"image of {pixels:,} pixels ({ds.get('Rows')} x {ds.get('Columns')}) exceeds the "
                            f"limit of {MAX_SOURCE_PIXELS:,}; not decoded")

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_encapsulated and "PixelData" in ds:
        try:
            check_frame_size(ds, ds.PixelData[:_FRAME_PROBE])
        except DatasetRefused as exc:
            raise PipelineError(str(exc)) from None


#: Bytes of encapsulated Pixel Data searched for the first frame's own size.
_FRAME_PROBE = 128 * 1024


def _transient(exc: BaseException) -> bool:
    """Whether building or storing results may succeed when tried again: a full disk, a database or
    a builder process that went away; not an error of the result builders' own (the same image builds
    the same way every time)."""
    return isinstance(exc, (OSError, SQLAlchemyError, BrokenProcessPool, MemoryError))


class PipelineUnavailable(RuntimeError):
    """The configured pipeline cannot be loaded (no bundle where ``pipeline.bundle`` points)."""


def resolve_device(device: Device) -> str:
    """``pipeline.device`` as the engine resolves it (``auto``: CUDA where it is available)."""
    # Imported here, not at the top: torch loads only in a process that asks about a device.
    from pipelines.engine import resolve_device as engine_device

    return engine_device(device.value).type


def load_pipeline(settings: Settings) -> Pipeline:
    """The pipeline ``pipeline.bundle`` names: the fake test double, or a bundle loaded by the engine."""
    bundle = settings.bundle_path
    if bundle is None:
        log.warning("pipeline.bundle = \"fake\": results come from the test double, not a model")
        return FakePipeline(settings.pipeline.fake_delay_s)
    if not bundle.is_dir():
        raise PipelineUnavailable(f"pipeline.bundle: {bundle} is not a model bundle directory")
    from pipelines.engine import load_pipeline as load_engine

    return load_engine(
        bundle,
        device=settings.pipeline.device.value,
        batch_size=settings.pipeline.batch_size,
        deterministic=settings.pipeline.deterministic,
    )


@dataclass
class _Work:
    """One claimed study job, loaded: every image's header and view, the choice, the image to read."""

    job: ClaimedJob
    study_uid: str
    set_hash: str
    headers: dict[str, Dataset]  # SOP Instance UID -> pixel-free header, every image of the set
    views: dict[str, View]
    choice: Choice
    dataset: Dataset | None  # the chosen image, with its pixels
    calling_ae: str | None
    version: int
    predecessors: dict[str, Dataset]

    @property
    def route_source(self) -> Dataset:
        return self.dataset if self.dataset is not None else next(iter(self.headers.values()))


#: A loaded job and what the pipeline made of its image.
_Analysed = tuple[_Work, "ImageResult | NotInterpreted | PipelineError"]


@dataclass
class _Result:
    """An analysed job whose result objects are built: what the second stage stores."""

    work: _Work
    report: StudyReport
    objects: list[Built]


class Worker:
    def __init__(self, settings: Settings, runtime: ServerContext, pipeline: Pipeline, worker_id: str | None = None) -> None:
        self.settings = settings
        self.rt = runtime
        self.pipeline = pipeline
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        processes = settings.worker.result_processes
        if processes is None:
            # The test double runs no model: no device is busy with one, and none needs finding (which
            # would load the whole model stack just to ask torch).
            device = "cpu" if settings.bundle_path is None else resolve_device(settings.pipeline.device)
            processes = auto_processes(device)
        self._builders = ResultBuilders(processes, ResultOptions.from_config(settings.results))
        self._heartbeat: LeaseKeeper | None = None
        self._export_bell = runtime.doorbell(JobKind.EXPORT)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set (the batches in progress are finished first). Batch N+1 is loaded
        and run through the pipeline while batch N's results are built and stored (:class:`JobLoop`'s
        second stage): the model waits for no disk and no result builder."""
        loop = JobLoop(self.rt, self.worker_id, JobKind.ANALYSE, claim=lambda: self.claim_batch(stop),
                       idle_wait=self._idle_wait, claim_limit=self.settings.pipeline.batch_size)
        with self._builders:
            loop.run(stop, self._first_stage)

    def _first_stage(self, jobs: list[ClaimedJob], leases: LeaseKeeper) -> SecondStage | None:
        self._heartbeat = leases
        analysed = self.analyse(jobs)
        return (lambda: self.record(analysed)) if analysed else None

    def _idle_wait(self) -> float:
        """Seconds to sleep on the doorbell: until the next study settles, at most the poll interval (the
        bell rings when an image arrives, not when a study it belongs to becomes due)."""
        wait = self.settings.worker.poll_interval_s
        try:
            due = self.rt.queue.next_due([JobKind.ANALYSE])
        except Exception:  # noqa: BLE001 - the database is away: poll as usual, the claim will say why
            return wait
        if due is not None:
            wait = min(wait, max((due - utcnow()).total_seconds(), 0.01))
        return wait

    def claim_batch(self, stop: threading.Event) -> list[ClaimedJob]:
        """Up to ``batch_size`` jobs; once the first is in hand, wait at most the latency cap for more."""
        size = self.settings.pipeline.batch_size
        jobs = self.rt.queue.claim(self.worker_id, [JobKind.ANALYSE], limit=size)
        if not jobs or len(jobs) >= size:
            return jobs
        deadline = time.monotonic() + self.settings.pipeline.max_batch_latency_s
        poll = min(0.05, self.settings.pipeline.max_batch_latency_s / 4 or 0.05)
        while len(jobs) < size and not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            stop.wait(min(poll, remaining))
            jobs += self.rt.queue.claim(self.worker_id, [JobKind.ANALYSE], limit=size - len(jobs))
        return jobs

    # -- one batch --------------------------------------------------------------------------------

    def process(self, jobs: list[ClaimedJob]) -> None:
        """Both stages of one batch, one after the other."""
        analysed = self.analyse(jobs)
        if analysed:
            self.record(analysed)

    def analyse(self, jobs: list[ClaimedJob]) -> list[_Analysed]:
        """The first stage: load each job's study and run the pipeline on the batch. Jobs that need no
        work are completed and those that cannot be loaded or read fail here, each on its own; the rest
        are returned, in claim order, with their outcomes."""
        work: list[_Work] = []
        superseded: list[ClaimedJob] = []
        with self.rt.read_session() as session:
            for job in jobs:
                try:
                    loaded = self._load(session, job)
                except PipelineError as exc:
                    self._fail(job, str(exc), retryable=False)
                    continue
                except Exception as exc:
                    log.exception("job %d: cannot load its instance", job.id)
                    session.rollback()  # a failed statement must not poison the batch mates' reads (PostgreSQL)
                    self._fail(job, f"{type(exc).__name__}: {exc}", retryable=True)
                    continue
                if loaded is None:
                    superseded.append(job)
                else:
                    work.append(loaded)
        for job in superseded:
            self._finished(job.id)
        for job, ok in zip(superseded, complete_jobs(self.rt, [(job, {"superseded": True}) for job in superseded],
                                                      self.worker_id)):
            if ok:
                log.info("job %d: a later instance changed its study's set; the newer job analyses it", job.id)
        return self._analyse_each(work) if work else []

    def _analyse_each(self, work: list[_Work]) -> list[_Analysed]:
        try:
            return list(zip(work, self._analyse(work), strict=True))
        except Exception as exc:
            if len(work) > 1:
                # A batch-level failure (out of memory, one image that breaks the model) says nothing
                # about the others: run each alone, so only the image at fault spends its attempts.
                log.warning("pipeline failed on a batch of %d (%s: %s); retrying the images one by one",
                            len(work), type(exc).__name__, scrub(str(exc)))
                return [analysed for w in work for analysed in self._analyse_each([w])]
            log.exception("job %d: the pipeline failed", work[0].job.id)
            self._fail(work[0].job, f"pipeline: {type(exc).__name__}: {exc}", retryable=True)
            return []

    def _analyse(self, work: list[_Work]) -> list[ImageResult | NotInterpreted | PipelineError]:
        """The pipeline on the chosen image of each study that has one; a study without an image of a view
        the bundle reads is not interpreted, and the pipeline never sees its images."""
        readable = [w for w in work if w.dataset is not None]
        outcomes = iter(self.pipeline.analyse([w.dataset for w in readable]) if readable else [])
        out: list[ImageResult | NotInterpreted | PipelineError] = []
        for w in work:
            if w.dataset is None:
                out.append(NotInterpreted(w.choice.reason, self.pipeline.model_name, self.pipeline.model_version,
                                          bool(getattr(self.pipeline, "clinical_use", False))))
                continue
            outcome = next(outcomes, None)
            if outcome is None:
                raise RuntimeError(f"pipeline returned fewer results than the {len(readable)} images it was given")
            out.append(outcome)
        if next(outcomes, None) is not None:
            raise RuntimeError(f"pipeline returned more results than the {len(readable)} images it was given")
        return out

    def _report(self, w: _Work, outcome: ImageResult | NotInterpreted) -> StudyReport:
        analysed = None
        if w.dataset is not None:
            analysed = evidence_header(w.dataset, outcome if isinstance(outcome, ImageResult) else None)
        set_aside = tuple((evidence_header(w.headers[uid]), reason) for uid, reason in w.choice.set_aside.items())
        return StudyReport(analysed, w.choice.reason, set_aside, outcome, f"{w.study_uid}:{w.set_hash}",
                           w.version, w.predecessors)

    def record(self, analysed: list[_Analysed]) -> None:
        """The second stage: build the batch's result objects, store them and complete the jobs. The
        files of the whole batch are written and fsynced together, then its rows, export jobs, analyses and
        job completions are committed in one transaction; a step that fails is retried job by job, so
        only the job at fault fails."""
        reports: list[tuple[_Work, StudyReport]] = []
        for w, outcome in analysed:
            if isinstance(outcome, PipelineError):
                log.warning("job %d: the pipeline cannot analyse this image: %s", w.job.id, outcome)
                self._fail(w.job, str(outcome), retryable=False)
                continue
            try:
                reports.append((w, self._report(w, outcome)))
            except ValueError as exc:
                self._fail(w.job, str(exc), retryable=False)
        built = self._builders.build([report for _, report in reports])
        results: list[_Result] = []
        for (w, report), objects in zip(reports, built, strict=True):
            if isinstance(objects, Exception):
                self._failed_to_store(w, objects)
            else:
                results.append(_Result(w, report, objects))
        written = self._each_alone_on_failure(results, self._write_files)
        self._each_alone_on_failure(written, self._commit)

    def _each_alone_on_failure(self, results: list[_Result], step: Callable[[list[_Result]], None]) -> list[_Result]:
        """``step(results)``; if it raises, ``step`` on each result alone, failing the jobs whose own step
        raises. Returns the results it succeeded for."""
        try:
            step(results)
            return results
        except Exception as exc:
            if len(results) == 1:
                self._failed_to_store(results[0].work, exc)
                return []
        return [result for result in results if self._each_alone_on_failure([result], step)]

    def _failed_to_store(self, w: _Work, exc: Exception) -> None:
        log.error("job %d: building or storing its results failed", w.job.id, exc_info=exc)
        self._fail(w.job, f"{type(exc).__name__}: {exc}", retryable=_transient(exc))

    def _write_files(self, results: list[_Result]) -> None:
        """Every result object of ``results`` in the store, durably (one group of fsyncs)."""
        files = []
        for result in results:
            for obj in result.objects:
                relpath = self.rt.store.relpath_for(
                    obj.fields.study_instance_uid, obj.fields.series_instance_uid, obj.fields.sop_instance_uid)
                files.append((relpath, obj.data))
        self.rt.store.write_many(files)

    def _commit(self, results: list[_Result]) -> None:
        """Record the stored results of ``results`` and complete their jobs, in one transaction; then
        release the jobs and ring the exporters."""
        with self.rt.write_session() as session, session.begin():
            recorded = self._record_results(session, results)
            completed = self.rt.queue.complete_in(
                session, [(result.work.job.id, {"results": produced})
                          for result, (produced, _) in zip(results, recorded, strict=True)], self.worker_id)
        for result, (produced, _), record in zip(results, recorded, completed, strict=True):
            self._finished(result.work.job.id)
            observe_done(record)
            if record is not None:
                log.info("job %d done: %d result object(s)", result.work.job.id, len(produced))
        if any(peers for _, peers in recorded):
            self._export_bell.ring()

    def _record_results(self, session: Session, results: list[_Result]) -> list[tuple[list[str], list[str]]]:
        """Inside ``session``: the result rows of ``results`` and their export jobs (each kind in one
        statement for the batch), their studies' analyses, and the exports of replaced versions still
        waiting cancelled; per result, (its objects' SOP Instance UIDs, the peers they are routed to)."""
        instances, exports, recorded = [], [], []
        for result in results:
            w, report, objects = result.work, result.report, result.objects
            source_uid = str(report.first_image.SOPInstanceUID)
            route = RouteKey(
                calling_ae=w.calling_ae,
                modality=str(w.route_source.get("Modality", "") or "") or None,
                station_name=str(w.route_source.get("StationName", "") or "") or None,
            )
            peers = destinations(self.settings, route)
            for obj in objects:
                relpath = self.rt.store.relpath_for(
                    obj.fields.study_instance_uid, obj.fields.series_instance_uid, obj.fields.sop_instance_uid)
                instances.append((obj.fields, dict(path=relpath, size_bytes=len(obj.data), origin=Origin.RESULT,
                                                   disposition=Disposition.RESULT,
                                                   source_sop_instance_uid=source_uid)))
                exports += [dict(kind=JobKind.EXPORT, sop_instance_uid=obj.fields.sop_instance_uid, destination=peer,
                                 dedupe_key=f"export:{obj.fields.sop_instance_uid}:{peer}",
                                 max_attempts=self.settings.export_retry(peer).attempts) for peer in peers]
            recorded.append(([obj.fields.sop_instance_uid for obj in objects], peers))
        add_instances(session, instances)
        self.rt.queue.enqueue_many(session, exports)
        for result in results:
            for previous in result.report.predecessors.values():
                # a version not yet delivered is not sent after the one that replaces it
                self.rt.queue.cancel_waiting(session, f"export:{previous.SOPInstanceUID}:", keep="")
        record_analyses(session, [(result.work.study_uid, result.work.set_hash,
                                   _analysis_record(result.work, result.report, result.objects))
                                  for result in results])
        return recorded

    def _load(self, session: Session, job: ClaimedJob) -> _Work | None:
        """The study job's images, views and choice (read in the batch's ``session``); None when the job's
        set is no longer the study's."""
        study_uid = job.payload.get("study_instance_uid")
        if study_uid is None:  # queued before studies were collected: the study of its one instance
            row = get_instance(session, job.sop_instance_uid)
            if row is None:
                raise PipelineError("the instance is no longer stored")
            study_uid = row.study_instance_uid
        images = {image.sop_instance_uid: image for image in study_images(session, study_uid)}
        set_hash = instance_set_hash(images)
        if job.payload.get("set_hash") not in (None, set_hash):
            return None
        study = analysed_state(session, study_uid)
        version, predecessors = 1, {}
        if study is not None and study.analysed_set_hash not in (None, set_hash):
            version = study.version + 1
            for kind, uid in study.analysis.get("results", {}).items():
                previous = get_instance(session, uid)
                if previous is not None:
                    predecessors[kind] = _reference(previous)
        elif study is not None and study.analysed_set_hash == set_hash:
            version = study.version
            for kind, uid in study.analysis.get("supersedes", {}).items():
                previous = get_instance(session, uid)
                if previous is not None:
                    predecessors[kind] = _reference(previous)
        if not images:
            raise PipelineError("the study's instances are no longer stored")
        headers: dict[str, Dataset] = {}
        # A study of one image (most of them) is read once, pixels and all: its header is the dataset.
        whole = len(images) == 1
        for uid, image in images.items():
            if not image.path:
                continue  # not part of what can be read
            headers[uid] = self._read(image, stop_before_pixels=not whole)
        views = {uid: classify_view(ds) for uid, ds in headers.items()}
        candidates = [Candidate(uid, views[uid], acquisition_time(ds)) for uid, ds in headers.items()]
        choice = choose(candidates, getattr(self.pipeline, "views", FRONTAL_VIEWS))
        dataset = None
        if choice.analysed is not None:
            chosen = images[choice.analysed]
            dataset = headers[choice.analysed] if whole else self._read(chosen, stop_before_pixels=False)
            check_dimensions(dataset)
        sender = images[choice.analysed] if choice.analysed is not None else next(iter(images.values()))
        calling_ae = sender.calling_ae
        return _Work(job, study_uid, set_hash, headers, views, choice, dataset, calling_ae, version, predecessors)

    def _read(self, image: StudyImage, *, stop_before_pixels: bool) -> Dataset:
        """The stored image, its file opened and parsed once: only a file its row says is Deflated (or
        in a syntax the row does not name as known) has its File Meta Information read first, because
        pydicom inflates a Deflated dataset whole, in memory, and it must be known to be bounded before.
        The row's syntax is the file's own: the listener recorded it from the header of the file it filed."""
        relpath = image.path
        path: Path = self.rt.store.path(relpath)
        try:
            if _may_be_deflated(image.transfer_syntax_uid):
                check_inflated_size(path, inflate_limits(self.settings))
            return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
        except FileNotFoundError as exc:
            raise PipelineError(f"the instance's file {relpath} is missing from the store") from exc
        except (InvalidDicomError, DatasetRefused) as exc:  # the same bytes will fail the same way
            raise PipelineError(f"the stored file {relpath} is not readable DICOM: {exc}") from exc

    def _finished(self, job_id: int) -> None:
        if self._heartbeat is not None:
            self._heartbeat.release(job_id)

    def _fail(self, job: ClaimedJob, error: str, *, retryable: bool) -> None:
        error = scrub(error)  # an exception's message may quote a value of the dataset
        self._finished(job.id)
        metrics.JOBS_FAILED.labels(job.kind).inc()
        state = self.rt.queue.fail(job.id, self.worker_id, error, retryable=retryable,
                                   policy=self.settings.worker.retry.policy())
        log.warning("job %d failed (attempt %d/%d, now %s): %s", job.id, job.attempts, job.max_attempts,
                    state.value, error)


def _may_be_deflated(transfer_syntax_uid: str) -> bool:
    """Whether a file stored in this transfer syntax may hold a Deflated dataset: a Deflated syntax, or
    one that is not a known transfer syntax at all."""
    syntax = UID(transfer_syntax_uid)
    return not syntax.is_transfer_syntax or syntax.is_deflated


def _reference(row: object) -> Dataset:
    """The four attributes a Predecessor Documents Sequence names an earlier result object by."""
    ds = Dataset()
    ds.StudyInstanceUID = row.study_instance_uid  # type: ignore[attr-defined]
    ds.SeriesInstanceUID = row.series_instance_uid  # type: ignore[attr-defined]
    ds.SOPClassUID = row.sop_class_uid  # type: ignore[attr-defined]
    ds.SOPInstanceUID = row.sop_instance_uid  # type: ignore[attr-defined]
    return ds


def _analysis_record(w: _Work, report: StudyReport, objects: list[Built]) -> dict:
    """What the study's row keeps of this analysis (``pacs-node results`` prints it; no patient data)."""
    outcome = report.outcome
    images = []
    for uid, header in w.headers.items():
        view = w.views[uid]
        role = "analysed" if uid == w.choice.analysed else "set aside"
        images.append({"sop_instance_uid": uid, "series_instance_uid": str(header.get("SeriesInstanceUID", "")),
                       "view": view.name, "view_evidence": view.evidence, "role": role,
                       "reason": w.choice.reason if role == "analysed" else w.choice.set_aside.get(uid, "")})
    return {
        "set_hash": w.set_hash,
        "model": f"{outcome.model_name} {outcome.model_version}",
        "images": images,
        "analysed": w.choice.analysed,
        "interpreted": report.interpreted,
        "not_interpreted_reason": None if report.interpreted else getattr(outcome, "reason", None),
        "gate_score": outcome.gate_score,
        "gate_threshold": outcome.gate_threshold,
        "results": {obj.kind: obj.fields.sop_instance_uid for obj in objects},
        "supersedes": {kind: str(ds.SOPInstanceUID) for kind, ds in report.predecessors.items()},
    }


#: A supervised worker whose pipeline did not load tries again this often (the bundle may be being copied).
PIPELINE_RETRY_S = 30.0


def _load_reporting(settings: Settings, beacon: Beacon, stop: threading.Event, *,
                    keep_trying: bool) -> Pipeline | None:
    """Load the pipeline, telling the liveness row (and ``/healthz``) why it did not. A worker under
    ``serve`` keeps trying every :data:`PIPELINE_RETRY_S` (alive, visibly failed, claiming nothing) instead
    of exiting into a restart loop; one run by hand raises at once. None when stopped while waiting."""
    while True:
        try:
            return load_pipeline(settings)
        except Exception as exc:
            metrics.PIPELINE_LOAD_FAILURES.labels(type(exc).__name__).inc()
            beacon.set(ProcessState.FAILED, f"pipeline did not load: {exc}")
            if not keep_trying:
                raise
            log.error("pipeline did not load (%s); trying again in %.0fs", exc, PIPELINE_RETRY_S)
        if stop.wait(PIPELINE_RETRY_S):
            return None


def run_worker(settings: Settings, *, parent_pid: int | None = None) -> int:
    """Body of ``pacs-node worker``: returns the exit code."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if parent_pid is not None:
        _watch_parent = threading.Thread(target=exit_with_parent, args=(parent_pid, stop), daemon=True)
        _watch_parent.start()
    runtime = ServerContext.open(settings, migrate=False)
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    try:
        with Beacon(runtime, worker_id, "worker") as beacon:
            pipeline = _load_reporting(settings, beacon, stop, keep_trying=parent_pid is not None)
            if pipeline is None:
                return 0
            worker = Worker(settings, runtime, pipeline, worker_id=worker_id)
            beacon.set(ProcessState.READY, f"pipeline {pipeline.model_name} {pipeline.model_version}")
            log.info("worker %s ready (pipeline %s %s)", worker_id, pipeline.model_name, pipeline.model_version)
            worker.run(stop)
    finally:
        runtime.close()
    return 0
