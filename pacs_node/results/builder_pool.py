"""Building a batch's result objects, in the worker process or in a pool of processes beside it.

highdicom builds an image's result objects (the AI findings SR, the narrative SR, the KOS, the GSPS) in
~170 ms of pure Python on this project's 2-core test machine (it deep-copies and searches each SR's
content tree), and encoding them takes ~40 ms more. Every build therefore goes through the templates
(:mod:`pacs_node.results.templates`): after two studies of a shape, the next ones are filled in from a
template in a few milliseconds. On a GPU host the building also runs in ``worker.result_processes``
processes (each with its own templates) while the worker process keeps the GPU fed. They are *spawned*,
never forked: a forked copy of a process that holds a CUDA context cannot use it, and a fresh interpreter
holds nothing that can go stale.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass


from pacs_node.ops.logs import setup_logging
from pacs_node.results import build_study_objects
from pacs_node.results.options import ResultOptions
from pacs_node.results.study import StudyReport
from pacs_node.results.templates import TEMPLATES
from storage.repository import InstanceRecord

log = logging.getLogger(__name__)

#: Most builder processes ``auto`` starts on a GPU host.
MAX_AUTO_PROCESSES = 16


#: The kind of result object (as the UIDs and the study's record name it) by SOP Class UID.
KIND_BY_CLASS = {
    "1.2.840.10008.5.1.4.1.1.88.34": "ai-sr",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.22": "narrative-sr",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.59": "kos",  # Key Object Selection Document
    "1.2.840.10008.5.1.4.1.1.11.1": "gsps",  # Grayscale Softcopy Presentation State
}


@dataclass(frozen=True)
class Built:
    """One result object as it will be stored and sent: what its row records and its DICOM file bytes."""

    fields: InstanceRecord
    data: bytes

    @property
    def kind(self) -> str:
        return KIND_BY_CLASS.get(str(self.fields.sop_class_uid), "other")


def build_encoded(study: StudyReport, options: ResultOptions) -> list[Built]:
    """The result objects of one analysis of a study, encoded (runs in a builder process): from this
    process's templates where the study's shape has one, else by ``build_study_objects``."""
    return [Built(obj.fields, obj.data)
            for obj in TEMPLATES.encoded_study_objects(study, options, build=build_study_objects)]


def build_batch(studies: list[StudyReport], options: ResultOptions) -> list[list[Built] | Exception]:
    """:func:`build_encoded` of each study, or the exception that stopped it, in order (one task of a
    builder process: a task's round trip costs more than building from a template)."""
    return [_built_or_error(study, options) for study in studies]


def _built_or_error(study: StudyReport, options: ResultOptions) -> list[Built] | Exception:
    try:
        return build_encoded(study, options)
    except Exception as exc:  # noqa: BLE001 - the caller fails this image's job with it
        return exc


def auto_processes(device: str) -> int:
    """``worker.result_processes`` left unset: none where the models run on the CPU (its cores are busy
    with them), else all cores but two (the worker's and the listener's), at most :data:`MAX_AUTO_PROCESSES`."""
    if device == "cpu":
        return 0
    return max(1, min(MAX_AUTO_PROCESSES, (os.cpu_count() or 1) - 2))


def _start_builder(level: str) -> None:
    """A spawned builder logs (and scrubs warnings) as its worker does."""
    setup_logging(level, process="builder")


class ResultBuilders:
    """``build([study_report, ...])`` -> per report, its :class:`Built` objects or the exception that
    stopped them, in order. ``processes`` 0 builds in this process. The reports hold pixel-free headers
    only, so little is pickled to a builder process."""

    def __init__(self, processes: int, options: ResultOptions) -> None:
        self.processes = processes
        self.options = options
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> ResultBuilders:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def build(self, items: list[StudyReport]) -> list[list[Built] | Exception]:
        if self.processes == 0 or len(items) == 0:
            return build_batch(items, self.options)
        pool = self._get_pool()
        size = -(-len(items) // self.processes)  # one batch per process
        batches = [items[start:start + size] for start in range(0, len(items), size)]
        futures = [pool.submit(build_batch, batch, self.options) for batch in batches]
        return [built for future, batch in zip(futures, batches, strict=True)
                for built in self._collect(future, len(batch))]

    def _collect(self, future: Future[list[list[Built] | Exception]], count: int) -> list[list[Built] | Exception]:
        try:
            return future.result()
        except BrokenProcessPool as exc:  # a builder died (killed, out of memory): start a new pool
            log.error("a result builder process died: %s; starting new ones", exc)
            self.close()
            return [exc] * count
        except Exception as exc:  # noqa: BLE001 - raised by the builder: the caller fails these images' jobs
            return [exc] * count

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_builder, initargs=(level,))
            log.info("building results in %d processes", self.processes)
        return self._pool
