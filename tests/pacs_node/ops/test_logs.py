"""No patient data in any log line or job error, whatever library emits it: files with the names, IDs and
free text real modalities send (no ``^``, non-ASCII, very long, NUL, values pydicom cannot parse) go
through a ``pacs-node serve`` (fake pipeline, results built by highdicom) at INFO and at DEBUG, are
queried by name, and every line is searched for every marker the files carry."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.pacs_node.helpers import make_cr, storescu
from tests.support import dcmtk

#: Markers: each is in exactly one attribute of one file, so a hit says which value leaked.
MARKERS = {
    "PatientName": ["QWERTYSMITH JOHN", "Müller^Jürgen^ZÜRICHMARKER", "LONGNAME" + "X" * 150,
                    "NULNAME\x00HIDDENMARKER"],
    "PatientID": ["IDMARKER-Ä-1", "LONGID" + "9" * 80, "NULID\x00IDHIDDEN"],
    "StudyDescription": ["Chest for Mr ZEBRAFISHMARKER"],
    "PatientComments": ["lives at 12 KUMQUATSTREET"],
    "AccessionNumber": ["ACCMARKER77"],
    "PatientBirthDate": ["NOTADATEMARKER"],  # pydicom cannot parse it, and says so quoting the value
    "ReferringPhysicianName": ["DOCTORWOMBAT"],
}


def _tokens() -> list[str]:
    """The searchable pieces of every marker (a NUL-split value leaks as either half)."""
    pieces = []
    for values in MARKERS.values():
        for value in values:
            pieces += [p for p in re.split(r"[\x00^ ]+", value) if len(p) >= 6 and p.upper() == p or len(p) >= 8]
    return sorted(set(pieces))


def _files(directory: Path) -> list[Path]:
    files = []
    longest = max(len(v) for v in MARKERS.values())
    for i in range(longest):
        path = directory / f"phi{i}.dcm"
        ds = make_cr(path, seed=900 + i)
        ds.SpecificCharacterSet = "ISO_IR 192"
        for keyword, values in MARKERS.items():
            if i < len(values):
                setattr(ds, keyword, values[i])
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_no_marker_of_any_file_reaches_a_log_line_or_job_error(make_node, tmp_path: Path, level: str) -> None:  # noqa: ANN001
    dcmtk("findscu")
    node = make_node(f"""
[logging]
level = "{level}"
[[allowed_callers]]
ae_title = "MODALITY"
""")
    files = _files(tmp_path)
    sent = storescu(node.port, files)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    found = subprocess.run([dcmtk("findscu"), "-S", "-aet", "MODALITY", "-aec", "PACSNODE",
                            "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName=QWERTYSMITH*",
                            "-k", "PatientID=IDMARKER*", "127.0.0.1", str(node.port)],
                           capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    jobs = node.wait_jobs(lambda jobs: len(jobs) >= len(files)
                          and all(j["state"] in ("done", "dead") for j in jobs if j["kind"] == "analyse"))
    node.stop()
    lines = node.log().splitlines()
    assert any("job" in line and "done" in line for line in lines)  # the log is the node's, and it worked
    if level == "DEBUG":
        assert any("may include patient data" in line for line in lines)
    errors = [str(j["last_error"] or "") for j in jobs]
    leaks = [(token, line) for token in _tokens() for line in lines + errors if token.lower() in line.lower()]
    assert leaks == [], "\n".join(f"{token}: {line}" for token, line in leaks[:20])
    # the libraries did speak (their warnings were captured and scrubbed, not silenced)
    assert any("py.warnings" in line and "unlikely to represent" in line for line in lines)
