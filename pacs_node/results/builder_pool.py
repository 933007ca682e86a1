"""Building a batch's result objects, in the worker process or in a pool of processes beside it.

highdicom builds an image's result objects (the AI findings SR, the narrative SR, the KOS, the GSPS) in
~170 ms of pure Python on this project's 2-core test machine (it deep-copies and searches each SR's
content tree), and encoding them takes ~40 ms more: one process builds the results of ~5 images a second,
whatever the GPU does. On a GPU host the building therefore runs in ``worker.result_processes`` processes
while the worker process keeps the GPU fed. They are *spawned*, never forked: a forked copy of a process
that holds a CUDA context cannot use it, and a fresh interpreter holds nothing that can go stale.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from pydicom import Dataset

from pacs_node.ops.logs import setup_logging
from pacs_node.results import build_result_objects
from pacs_node.results.common import without_pixel_data
from pacs_node.results.options import ResultOptions
from pacs_node.work.instance_record import instance_record
from pipelines.interface import ImageResult
from storage.repository import InstanceRecord

log = logging.getLogger(__name__)

#: Most builder processes ``auto`` starts on a GPU host.
MAX_AUTO_PROCESSES = 16


@dataclass(frozen=True)
class Built:
    """One result object as it will be stored and sent: what its row records and its DICOM file bytes."""

    fields: InstanceRecord
    data: bytes


def encode(ds: Dataset) -> bytes:
    """``ds`` in the DICOM file format, as it will be stored and sent."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def build_encoded(source: Dataset, result: ImageResult, options: ResultOptions) -> list[Built]:
    """The result objects of one image, encoded (runs in a builder process)."""
    return [Built(instance_record(obj), encode(obj)) for obj in build_result_objects(source, result, options)]


def auto_processes(device: str) -> int:
    """``worker.result_processes`` left unset: none where the models run on the CPU (its cores are busy
    with them), else all cores but two (the worker's and the listener's), at most :data:`MAX_AUTO_PROCESSES`."""
    if device == "cpu":
        return 0
    return max(1, min(MAX_AUTO_PROCESSES, (os.cpu_count() or 1) - 2))


def pixel_free(ds: Dataset) -> Dataset:
    """``ds`` without its pixel data (what building needs, and a fraction of what would be pickled)."""
    header = without_pixel_data(ds)
    header.file_meta = ds.file_meta
    return header


def _start_builder(level: str) -> None:
    """A spawned builder logs (and scrubs warnings) as its worker does."""
    setup_logging(level, process="builder")


class ResultBuilders:
    """``build([(source, result), ...])`` -> per image, its :class:`Built` objects or the exception that
    stopped them, in order. ``processes`` 0 builds in this process."""

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

    def build(self, items: list[tuple[Dataset, ImageResult]]) -> list[list[Built] | Exception]:
        if self.processes == 0 or len(items) == 0:
            return [self._here(source, result) for source, result in items]
        pool = self._get_pool()
        futures = [pool.submit(build_encoded, pixel_free(source), result, self.options) for source, result in items]
        return [self._collect(future) for future in futures]

    def _here(self, source: Dataset, result: ImageResult) -> list[Built] | Exception:
        try:
            return build_encoded(source, result, self.options)
        except Exception as exc:  # noqa: BLE001 - the caller fails this image's job with it
            return exc

    def _collect(self, future: Future[list[Built]]) -> list[Built] | Exception:
        try:
            return future.result()
        except BrokenProcessPool as exc:  # a builder died (killed, out of memory): start a new pool
            log.error("a result builder process died: %s; starting new ones", exc)
            self.close()
            return exc
        except Exception as exc:  # noqa: BLE001 - raised by the builder: the caller fails this image's job
            return exc

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_builder, initargs=(level,))
            log.info("building results in %d processes", self.processes)
        return self._pool
