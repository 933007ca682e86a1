"""Export to a DICOMweb peer: one STOW-RS request per batch, each job settled on its own entry of the
answer. A real archive refusing some instances of a request cannot be arranged on demand, so a small
stdlib HTTP server plays one: it reads the request's parts and stores the first, refuses the second
(0xA700) and says nothing of the third."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest

from pacs_node.config import Settings
from pacs_node.ops.context import ServerContext
from pacs_node.web.dicomweb.multipart import MultipartReader, content_type_parameters
from pacs_node.work.export import Exporter
from pacs_node.work.instance_record import instance_record
from storage.repository import add_instance
from storage.schema import Disposition, JobKind, Origin
from tests.pacs_node.helpers import make_cr

TOKEN = "export-token"


class PartialArchive(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, str]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"


class _Handler(BaseHTTPRequestHandler):
    server: PartialArchive

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        self.server.requests.append({"path": self.path, "authorization": self.headers.get("Authorization", "")})
        body = self.rfile.read(int(self.headers["Content-Length"]))
        files: list[io.BytesIO] = []

        def open_part(_headers: dict[str, str]) -> io.BytesIO:
            files.append(io.BytesIO())
            return files[-1]

        reader = MultipartReader(content_type_parameters(self.headers["Content-Type"])[1]["boundary"], open_part)
        reader.feed(body)
        uids = [str(pydicom.dcmread(io.BytesIO(f.getvalue())).SOPInstanceUID) for f in files]
        answer = {
            "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uids[0]]}}]},
            "00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uids[1]]},
                                                "00081197": {"vr": "US", "Value": [0xA700]}}]},
        }
        data = json.dumps(answer).encode()
        self.send_response(202)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def archive() -> Iterator[PartialArchive]:
    server = PartialArchive()
    yield server
    server.shutdown()


def test_a_partial_failure_settles_each_job_on_its_own_entry(tmp_path: Path, archive: PartialArchive) -> None:
    settings = Settings(node={"data_dir": tmp_path / "var"}, store={"min_free_bytes": 0},
                        peers={"cloud": {"url": archive.url, "auth": {"bearer_token": TOKEN}}}, export={"retries": 3})
    runtime = ServerContext.open(settings)
    try:
        uids = []
        with runtime.write_session() as session, session.begin():
            for i in range(3):
                ds = make_cr(tmp_path / f"{i}.dcm", seed=i)
                record = instance_record(ds)
                relpath = runtime.store.relpath_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
                runtime.store.write_bytes(relpath, (tmp_path / f"{i}.dcm").read_bytes())
                add_instance(session, record, path=relpath, size_bytes=1, origin=Origin.RESULT,
                             disposition=Disposition.RESULT)
                runtime.queue.enqueue(session, kind=JobKind.EXPORT, sop_instance_uid=ds.SOPInstanceUID,
                                      destination="cloud", dedupe_key=f"export:{ds.SOPInstanceUID}:cloud",
                                      max_attempts=3)
                uids.append(str(ds.SOPInstanceUID))
        jobs = runtime.queue.claim("t", [JobKind.EXPORT], limit=10)
        Exporter(settings, runtime, "t").run_jobs(jobs, "t")
        by_uid = {job.sop_instance_uid: job for job in runtime.queue.list()}
        assert by_uid[uids[0]].state == "done"
        assert by_uid[uids[1]].state == "failed" and "0xA700" in by_uid[uids[1]].last_error
        assert by_uid[uids[2]].state == "failed" and "did not say" in by_uid[uids[2]].last_error
        assert archive.requests == [{"path": "/dicom-web/studies", "authorization": f"Bearer {TOKEN}"}]
    finally:
        runtime.close()
