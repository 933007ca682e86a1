"""Durable ingest of one C-STORE request: the promise behind every 0x0000 this node sends.

pynetdicom has already written the dataset, chunk by chunk, to a temp file *inside the instance store*
(see :mod:`pacs_node.dicom.spooling`), so filing it is a rename, not a copy. The order is what
makes a success status safe to send:

1. parse only the header (``stop_before_pixels``) and decide with the acceptance policy;
2. give it its name in the store and fsync the file and its directories (``InstanceStore.begin_commit``:
   a new path is hard-linked first, so one journal commit covers both, and the fsyncs run at once, in
   threads of their own; no row references the path yet);
3. in ONE transaction insert the ``Instance`` row and, for a chest radiograph, (re-)open its study and
   enqueue the study's ``analyse`` job, due once the study has been quiet for the settle time
   (``storage.receiving``); its statements run while the fsyncs of 2 do, its commit waits for them to
   end (``Filing.wait``), and concurrent associations share that commit (``storage.db.GroupCommit``);
4. only then return 0x0000.

A crash before 4 means the sender saw no success and sends again; a crash after 3 leaves a complete,
recorded instance. A second copy of a known SOP Instance UID is acknowledged and dropped.

A study is analysed once per set of instances: the job's ``dedupe_key`` names the study and the set
(``analyse:study:<Study Instance UID>:<set hash>``), and the job of the set before this instance, if it
has not started, is cancelled: the settle timer starts again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import get_expected_length
from pydicom.valuerep import VR
from sqlalchemy.exc import DataError, SQLAlchemyError

from pacs_node.ops import metrics
from pacs_node.config import NonChestAction, Settings
from pacs_node.dicom import datasets
from pacs_node.dicom.datasets import DatasetRefused, InflateLimits
from pacs_node.dicom.plain_header import PlainHeader, read_plain_header
from pacs_node.ops.logs import scrub
from pacs_node.work.instance_record import MissingAttribute, instance_record
from pacs_node.work.acceptance import decide
from pacs_node.ops.context import ServerContext
from storage.db import GroupCommit, driver_transaction
from pacs_node.work.routing import RouteKey, settle_seconds
from storage.receiving import ReceivedInstances, Recorded, StudyAnalysis
from storage.repository import InstanceRecord
from storage.schema import Disposition, JobKind, Origin, utcnow
from storage.store import Filing, StoreFullError

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210
#: The database refuses the row for this dataset's values: permanent, so never 0xA7xx (which tells the
#: sender to try again, for ever).
CANNOT_RECORD = 0xC220


#: ``dedupe_key`` prefix of a study's analysis jobs: ``analyse:study:<Study Instance UID>:<set hash>``.
STUDY_JOB_PREFIX = "analyse:study:"


class UnreadableDataset(Exception):
    """The received bytes are not a dataset we can file; the reason is safe to log (no patient data)."""


@dataclass(frozen=True)
class Caller:
    ae_title: str
    host: str | None


def read_header(path: Path, expected_sop_instance_uid: str | None,
                limits: InflateLimits) -> tuple[Dataset | PlainHeader, InstanceRecord]:
    """The dataset's header, fully decoded, without reading pixel data (a Deflated dataset inflated
    within ``limits``, see :mod:`pacs_node.dicom.datasets`), and what its row records of it.

    pydicom decodes element values lazily, so every top-level element is decoded here (or known to
    decode, :func:`pacs_node.dicom.datasets.decode_every_element`): a value that cannot be decoded must
    fail now, on the receive path, not later in the worker.

    A plain header is read without pydicom first (:mod:`pacs_node.dicom.plain_header`), and accepted
    that way only when everything below would accept it too; whatever it is unsure of, and every
    refusal, is pydicom's to read and to word."""
    plain = _read_plain(path, expected_sop_instance_uid)
    if plain is not None:
        return plain
    try:
        header = datasets.read_header(path, limits)
        ds = header.dataset
        datasets.decode_every_element(ds)
        record = instance_record(ds)
        _check_consistency(path, header)
    except UnreadableDataset:
        raise
    except DatasetRefused as exc:
        raise UnreadableDataset(str(exc)) from exc
    except (InvalidDicomError, MissingAttribute) as exc:
        raise UnreadableDataset(str(exc)) from exc
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise UnreadableDataset(f"{type(exc).__name__}: {scrub(str(exc))}") from exc
    if expected_sop_instance_uid and record.sop_instance_uid != expected_sop_instance_uid:
        raise UnreadableDataset("SOP Instance UID in the dataset differs from the C-STORE request's")
    return ds, record


def _read_plain(path: Path, expected_sop_instance_uid: str | None) -> tuple[PlainHeader, InstanceRecord] | None:
    """:func:`read_header` by :func:`pacs_node.dicom.plain_header.read_plain_header`: ``None`` unless the
    header is read that way and passes every check :func:`read_header` makes (the same checks, on the
    values pydicom would give)."""
    try:
        header = read_plain_header(path)
    except OSError:
        return None
    if header is None:
        return None
    try:
        record = instance_record(header)
    except MissingAttribute:
        return None
    if expected_sop_instance_uid and record.sop_instance_uid != expected_sop_instance_uid:
        return None
    values = header.values
    if "Rows" not in values or "Columns" not in values:
        return header, record
    rows, columns = values["Rows"], values["Columns"]
    if header.encapsulated:
        if header.pixel_offset is None:
            return header, record
        if rows is None or columns is None:
            return None
        try:
            datasets.check_frame_dimensions((rows, columns),
                                            datasets.pixel_value_prefix(path, header.pixel_offset))
        except (DatasetRefused, OSError):
            return None
        return header, record
    if "BitsAllocated" not in values:
        return header, record
    needed = _expected_length(values)
    if needed is None or (needed and header.dataset_bytes < needed):
        return None
    return header, record


def _expected_length(values: dict[str, Any]) -> int | None:
    """``pydicom.pixels.utils.get_expected_length(ds, "bytes")`` of the plain header's values; ``None``
    where pydicom would raise (a missing or empty attribute it needs)."""
    rows, columns = values["Rows"], values["Columns"]
    samples, bits = values.get("SamplesPerPixel"), values["BitsAllocated"]
    photometric = values.get("PhotometricInterpretation")
    if None in (rows, columns, samples, bits, photometric):
        return None
    length = rows * columns * samples * (values.get("NumberOfFrames") or 1)
    length = length // 8 + (length % 8 > 0) if bits == 1 else length * (bits // 8)
    return length // 3 * 2 if photometric == "YBR_FULL_422" else length


def _looks_explicit(header: datasets.Header) -> bool | None:
    """Whether the first element after the file meta carries a VR (``None``: cannot tell) — the test
    pydicom makes before it silently switches to the other encoding."""
    if header.dataset.file_meta.get("FileMetaInformationGroupLength") is None or len(header.dataset_head) < 6:
        return None
    return header.dataset_head[4:6].decode("latin-1") in VR.__members__


def _check_consistency(path: Path, header: datasets.Header) -> None:
    """Refuse what pydicom reads only by guessing, native pixel data that cannot be complete, and a
    compressed frame whose own size is not the header's.

    pydicom silently falls back to implicit VR when a dataset said to be explicit is not: the file would
    be stored with a transfer syntax that lies, which stricter readers (a PACS, DCMTK) then refuse. And
    ``stop_before_pixels`` never sees the pixel data, so a dataset too small for its Rows x Columns
    (inflated, for a Deflated one; subsampled, for YBR_FULL_422) is caught here by its size instead of
    by the worker."""
    ds = header.dataset
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_transfer_syntax:
        return
    if not syntax.is_deflated and _looks_explicit(header) is syntax.is_implicit_VR:
        raise UnreadableDataset(f"dataset encoding does not match its transfer syntax ({syntax.name})")
    if "Rows" not in ds or "Columns" not in ds:
        return
    if syntax.is_encapsulated:
        if header.pixel_offset is not None:
            datasets.check_frame_size(ds, datasets.pixel_value_prefix(path, header.pixel_offset))
        return
    try:
        needed = get_expected_length(ds, "bytes") if "BitsAllocated" in ds else 0
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise UnreadableDataset(f"image dimensions are not usable: {exc}") from exc
    if needed and header.dataset_bytes < needed:
        raise UnreadableDataset(f"the dataset ({header.dataset_bytes} bytes) is too small for its "
                                f"{ds.Rows} x {ds.Columns} pixel data ({needed} bytes)")


def inflate_limits(settings: Settings) -> InflateLimits:
    """``[limits]`` of the config as the dataset reader takes them."""
    return InflateLimits(max_bytes=settings.limits.max_inflated_bytes, max_ratio=settings.limits.max_inflate_ratio)


class Ingestor:
    """The body of the listener's ``EVT_C_STORE`` handler, independent of pynetdicom's event object."""

    def __init__(self, settings: Settings, runtime: ServerContext) -> None:
        self.settings = settings
        self.rt = runtime
        self._analyse_bell = runtime.doorbell(JobKind.ANALYSE)
        self._received = ReceivedInstances(runtime.engine, runtime.queue, utcnow)
        self._commits = GroupCommit(partial(driver_transaction, runtime.engine))

    def _known(self, sop_instance_uid: str) -> bool:
        return self._received.known(sop_instance_uid)

    def ingest(self, temp_path: Path, sop_instance_uid: str, caller: Caller) -> int:
        """File the dataset at ``temp_path``; return the C-STORE status to send.

        An instance stored (or acknowledged as a duplicate) is logged at DEBUG: formatting and writing a
        line for each of them was a tenth of the CPU of a small one; the listener logs what each
        association delivered when it ends. Refusals and failures are logged each at once."""
        try:
            if self._known(sop_instance_uid):
                log.debug("duplicate instance from %s acknowledged, not stored again", caller.ae_title)
                metrics.INSTANCES_RECEIVED.labels("duplicate").inc()
                return SUCCESS
        except SQLAlchemyError:
            log.exception("database unavailable while receiving from %s", caller.ae_title)
            metrics.INSTANCES_RECEIVED.labels("failed").inc()
            return OUT_OF_RESOURCES

        size = temp_path.stat().st_size
        # The dataset already occupies its space (received into the store's temp directory) and filing
        # it is a rename, so what is free now is what will be free after: do not count it twice.
        if not self.rt.store.has_room(0):
            log.error("refusing instance from %s (0x%04X): the store has less than "
                      "store.min_free_bytes = %d bytes free", caller.ae_title, OUT_OF_RESOURCES,
                      self.settings.store.min_free_bytes)
            metrics.INSTANCES_RECEIVED.labels("failed").inc()
            return OUT_OF_RESOURCES

        try:
            ds, record = read_header(temp_path, sop_instance_uid, inflate_limits(self.settings))
        except UnreadableDataset as exc:
            log.warning("unreadable dataset from %s refused (0x%04X): %s", caller.ae_title,
                        CANNOT_UNDERSTAND, exc)
            metrics.INSTANCES_RECEIVED.labels("failed").inc()
            return CANNOT_UNDERSTAND

        decision = decide(ds)
        discard = not decision.analyse and self.settings.policy.non_chest is NonChestAction.DISCARD
        relpath = ""
        filing: Filing | None = None
        if not discard:
            relpath = self.rt.store.relpath_for(
                record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid
            )
            try:
                # pynetdicom still holds its own (flushed) handle; this one is for fsync and rename.
                filing = self.rt.store.begin_commit(open(temp_path, "r+b", buffering=0), relpath)  # noqa: SIM115
            except OSError as exc:
                return self._not_stored(caller, exc)

        reason = decision.reason
        if discard:
            reason = f"{reason}; file discarded (policy.non_chest = discard)"

        fields = {
            "path": relpath, "size_bytes": 0 if discard else size, "origin": Origin.RECEIVED,
            "disposition": Disposition.QUEUED if decision.analyse else Disposition.NOT_PROCESSED,
            "reason": reason, "calling_ae": caller.ae_title[:16], "calling_host": (caller.host or "")[:64] or None,
        }
        try:
            analysis = self._analysis(ds, record, caller) if decision.analyse else None

            def insert(connection: Any) -> Recorded:
                return self._received.record(connection, record, fields, analysis)

            # The statements run while the file's fsyncs do; the commit waits for them (filing.wait).
            recorded = self._commits.run(insert, None if filing is None else filing.wait)
        except OSError as exc:  # the file's fsyncs failed: filing.wait removed it, the row was not committed
            return self._not_stored(caller, exc)
        except SQLAlchemyError as exc:
            status = CANNOT_RECORD if isinstance(exc, DataError) else OUT_OF_RESOURCES
            log.exception("could not record instance from %s (0x%04X)", caller.ae_title, status)
            self._abandon(filing, relpath, record.sop_instance_uid)
            metrics.INSTANCES_RECEIVED.labels("failed").inc()
            return status
        except BaseException:  # anything else fails the C-STORE (pynetdicom answers it): leave nothing behind
            self._abandon(filing, relpath, record.sop_instance_uid)
            raise
        if not recorded.inserted:
            # Another association filed the same instance between our check and our insert: it is
            # stored (same path) and recorded once, which is all the sender needs to know.
            log.debug("duplicate instance from %s (concurrent) acknowledged", caller.ae_title)
            metrics.INSTANCES_RECEIVED.labels("duplicate").inc()
            return SUCCESS

        outcome = "stored" if decision.analyse else ("discarded" if discard else "not_processed")
        metrics.INSTANCES_RECEIVED.labels(outcome).inc()
        if decision.analyse:
            self._analyse_bell.ring()
            log.debug("stored %s instance from %s; its study is analysed once it settles (job %s)", record.modality,
                     caller.ae_title, recorded.job_id)
        else:
            log.debug("stored instance from %s, not processed: %s", caller.ae_title, reason)
        return SUCCESS

    def _not_stored(self, caller: Caller, exc: OSError) -> int:
        """The answer when the file could not be stored (nothing is left of it in the store)."""
        reason = "the store is full" if isinstance(exc, StoreFullError) else f"{type(exc).__name__}: {exc}"
        log.error("could not store instance from %s (0x%04X): %s", caller.ae_title, OUT_OF_RESOURCES, reason)
        metrics.INSTANCES_RECEIVED.labels("failed").inc()
        return OUT_OF_RESOURCES

    def _analysis(self, ds: Dataset | PlainHeader, record: InstanceRecord, caller: Caller) -> StudyAnalysis:
        """The analysis the instance asks for: its study's, due once the study has been quiet for the
        settle time of its route."""
        route = RouteKey(calling_ae=caller.ae_title, modality=record.modality,
                         station_name=str(datasets.header_value(ds, "StationName") or "") or None)
        due = utcnow() + timedelta(seconds=settle_seconds(self.settings, route))
        return StudyAnalysis(STUDY_JOB_PREFIX, due, self.settings.worker.max_attempts)

    def _abandon(self, filing: Filing | None, relpath: str, sop_instance_uid: str) -> None:
        """A filing whose row will not be committed: its fsyncs waited for (a file that failed them is gone
        already), then the file removed unless another association recorded the instance meanwhile."""
        try:
            if filing is not None:
                filing.wait()
        except OSError:
            return
        self._remove_unrecorded(relpath, sop_instance_uid)

    def _remove_unrecorded(self, relpath: str, sop_instance_uid: str) -> None:
        """Undo the rename when the row could not be written, so the store holds only recorded files
        (unless a concurrent association recorded it meanwhile)."""
        if not relpath:
            return
        try:
            if not self._known(sop_instance_uid):
                self.rt.store.delete(relpath)
        except (OSError, SQLAlchemyError):
            log.warning("could not remove unrecorded file %s; housekeeping will not see it", relpath)
