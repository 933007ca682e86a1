"""STOW-RS (PS3.18 10.5): ``POST /dicom-web/studies[/{study}]`` with a multipart/related body of
``application/dicom`` parts, filed by the same :class:`~pacs_node.work.ingest.Ingestor` as C-STORE.

Each part is streamed into a temp file inside the instance store (as pynetdicom does for C-STORE) and
handed to the ingestor as soon as its closing boundary arrives, while the rest of the body is still
being received; the response is sent only when every instance is fsynced, renamed and committed, and
says per instance what happened: ReferencedSOPSequence for the stored ones, FailedSOPSequence with the
DIMSE failure reason (0xA700 out of resources, 0xC210 cannot understand, 0xA900 not of this study)
for the others. 200 when all were stored, 202 when some were, 409 when none was.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from pacs_node.ops import metrics
from pacs_node.web.dicomweb.multipart import MultipartError, MultipartReader, Part, content_type_parameters
from pacs_node.work.ingest import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, Caller, Ingestor

log = logging.getLogger(__name__)

#: PS3.18 Table 10.5.3-2 / PS3.4 B.2.3: the instance is not of the study named in the request URL.
NOT_OF_THIS_STUDY = 0xA900
DICOM_JSON = "application/dicom+json"
#: Instances filed at once for one request: fsync and commit overlap with the receiving of later parts.
_FILING_CONCURRENCY = 4


class _SpoolFile:
    """A part's temp file; a write error (disk full) is remembered, not raised, so the request goes on
    and only this instance fails with 0xA700 — as ``dicom.spooling`` does for C-STORE."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: memoryview) -> None:
        if self.error is None:
            try:
                self.file.write(data)
            except OSError as exc:
                self.error = exc


@dataclass(frozen=True)
class Outcome:
    status: int
    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None


class StowService:
    """Receives STOW-RS requests into the store; one per application."""

    def __init__(self, ingestor: Ingestor, max_request_bytes: int, read_timeout_s: float) -> None:
        self.ingestor = ingestor
        self.store = ingestor.rt.store
        self.max_request_bytes = max_request_bytes
        self.read_timeout_s = read_timeout_s

    async def handle(self, request: Request, caller: Caller, study: str | None) -> Response:
        media, params = content_type_parameters(request.headers.get("content-type", ""))
        if media != "multipart/related" or params.get("type", "application/dicom").lower() != "application/dicom":
            return _error(415, 'STOW-RS takes multipart/related; type="application/dicom"')
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            return _error(413, f"the request is larger than http.max_request_bytes ({self.max_request_bytes})")

        def open_part(headers: dict[str, str]) -> _SpoolFile | None:
            if content_type_parameters(headers.get("content-type", "application/dicom"))[0] != "application/dicom":
                return None
            return _SpoolFile(self.store.open_temp())

        try:
            reader = MultipartReader(params.get("boundary", ""), open_part)  # type: ignore[arg-type]
        except MultipartError as exc:
            return _error(400, str(exc))
        gate = asyncio.Semaphore(_FILING_CONCURRENCY)
        filing: list[asyncio.Task[Outcome]] = []
        received = 0
        chunks = request.stream().__aiter__()
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(chunks.__anext__(), self.read_timeout_s)
                except StopAsyncIteration:
                    break
                received += len(chunk)
                if received > self.max_request_bytes:
                    raise _Abort(413, f"the request is larger than http.max_request_bytes ({self.max_request_bytes})")
                for part in reader.feed(chunk):
                    filing.append(asyncio.create_task(self._file(part, caller, study, gate)))
            reader.close()
        except (TimeoutError, asyncio.TimeoutError):
            await self._abandon(reader, filing)
            return _error(408, f"no request data for http.read_timeout_s ({self.read_timeout_s} s)")
        except MultipartError as exc:
            await self._abandon(reader, filing)
            return _error(400, str(exc))
        except _Abort as exc:
            await self._abandon(reader, filing)
            return _error(exc.status, exc.message)
        except ClientDisconnect:
            await self._abandon(reader, filing)
            log.warning("STOW-RS client %s went away before the end of its request", caller.ae_title)
            return _error(400, "the client disconnected")
        outcomes = list(await asyncio.gather(*filing))
        if not outcomes:
            return _error(400, "the request holds no application/dicom part")
        return self._response(request, outcomes, study)

    async def _abandon(self, reader: MultipartReader, filing: list[asyncio.Task[Outcome]]) -> None:
        """The request failed as a whole: its half-received part goes; the parts already complete are
        still filed (their outcome is lost with the response, and a retried request finds them known)."""
        part = reader.open
        if part is not None and part.file is not None:
            self.store.discard(part.file.file)  # type: ignore[attr-defined]
        await asyncio.gather(*filing, return_exceptions=True)

    async def _file(self, part: Part, caller: Caller, study: str | None, gate: asyncio.Semaphore) -> Outcome:
        async with gate:
            return await run_in_threadpool(self._file_sync, part, caller, study)

    def _file_sync(self, part: Part, caller: Caller, study: str | None) -> Outcome:
        spool: _SpoolFile | None = part.file  # type: ignore[assignment]
        if spool is None:
            return Outcome(CANNOT_UNDERSTAND, None, None, None)
        path = Path(spool.file.name)
        try:
            try:
                spool.file.flush()
            except OSError as exc:
                spool.error = spool.error or exc
            spool.file.close()
            if spool.error is not None:
                log.error("could not receive instance from %s (0x%04X): %s", caller.ae_title, OUT_OF_RESOURCES,
                          spool.error)
                metrics.INSTANCES_RECEIVED.labels("failed").inc()
                return Outcome(OUT_OF_RESOURCES, None, None, None)
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
                sop_class, sop_uid, study_uid = (str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                                 str(ds.StudyInstanceUID))
            except Exception as exc:  # pydicom raises many types on corrupt input
                log.warning("unreadable STOW-RS part from %s refused (0x%04X): %s", caller.ae_title,
                            CANNOT_UNDERSTAND, type(exc).__name__)
                metrics.INSTANCES_RECEIVED.labels("failed").inc()
                return Outcome(CANNOT_UNDERSTAND, None, None, None)
            if study is not None and study_uid != study:
                log.warning("STOW-RS part from %s refused (0x%04X): not of the study in the URL", caller.ae_title,
                            NOT_OF_THIS_STUDY)
                metrics.INSTANCES_RECEIVED.labels("failed").inc()
                return Outcome(NOT_OF_THIS_STUDY, sop_class, sop_uid, study_uid)
            return Outcome(self.ingestor.ingest(path, sop_uid, caller), sop_class, sop_uid, study_uid)
        finally:
            # Filed instances were renamed away; a duplicate, a refusal or a discard leaves the temp file.
            path.unlink(missing_ok=True)

    def _response(self, request: Request, outcomes: list[Outcome], study: str | None) -> Response:
        base = str(request.base_url).rstrip("/") + "/dicom-web"
        answer = Dataset()
        stored = [o for o in outcomes if o.status == SUCCESS]
        failed = [o for o in outcomes if o.status != SUCCESS]
        studies = {o.study_instance_uid for o in stored}
        if study is not None or len(studies) == 1:
            answer.RetrieveURL = f"{base}/studies/{study or next(iter(studies))}"
        referenced = []
        for o in stored:
            item = Dataset()
            item.ReferencedSOPClassUID = o.sop_class_uid
            item.ReferencedSOPInstanceUID = o.sop_instance_uid
            item.RetrieveURL = f"{base}/studies/{o.study_instance_uid}/instances/{o.sop_instance_uid}"
            referenced.append(item)
        failures = []
        for o in failed:
            item = Dataset()
            item.ReferencedSOPClassUID = o.sop_class_uid or ""
            item.ReferencedSOPInstanceUID = o.sop_instance_uid or ""
            item.FailureReason = o.status
            failures.append(item)
        if referenced:
            answer.ReferencedSOPSequence = referenced
        if failures:
            answer.FailedSOPSequence = failures
        code = 200 if not failed else 202 if stored else 409
        return JSONResponse(answer.to_json_dict(), status_code=code, media_type=DICOM_JSON)


class _Abort(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)
