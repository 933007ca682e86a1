"""QIDO-RS and WADO-RS with the Python DICOMweb client: the C-FIND matching over HTTP, retrieval of
studies, series, instances, metadata and a rendered image."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image

from tests.pacs_node.helpers import make_cr
from tests.pacs_node.web.conftest import Web


@pytest.fixture
def stored(web: Web, tmp_path: Path) -> tuple[DICOMwebClient, list[pydicom.Dataset]]:
    first = make_cr(tmp_path / "a.dcm", seed=1)
    second = make_cr(tmp_path / "b.dcm", seed=1, study_uid=first.StudyInstanceUID)  # same study, other series
    third = make_cr(tmp_path / "c.dcm", seed=2, modality="DX")
    third.StudyDate = "20250601"
    third.save_as(tmp_path / "c.dcm", enforce_file_format=True)
    client = DICOMwebClient(web.dicomweb, headers=web.admin)
    client.store_instances([pydicom.dcmread(tmp_path / n) for n in ("a.dcm", "b.dcm", "c.dcm")])
    return client, [first, second, third]


def _values(found: list[dict], tag: str) -> list:
    return [item[tag]["Value"][0] for item in found]


def test_qido_matches_as_c_find_does(stored: tuple[DICOMwebClient, list[pydicom.Dataset]]) -> None:
    client, (first, _, third) = stored
    studies = client.search_for_studies(search_filters={"AccessionNumber": "A00001"})
    assert _values(studies, "0020000D") == [first.StudyInstanceUID]
    assert studies[0]["00201208"]["Value"] == [2]  # NumberOfStudyRelatedInstances
    assert client.search_for_studies(search_filters={"PatientID": "SYN00002"})[0]["0020000D"]["Value"] == \
        [third.StudyInstanceUID]
    in_2025 = client.search_for_studies(search_filters={"StudyDate": "20250101-20251231"})
    assert _values(in_2025, "0020000D") == [third.StudyInstanceUID]
    dx = client.search_for_studies(search_filters={"ModalitiesInStudy": "DX"})
    assert _values(dx, "0020000D") == [third.StudyInstanceUID]
    assert len(client.search_for_studies(search_filters={"ModalitiesInStudy": "CR,DX"})) == 2
    assert len(client.search_for_studies(search_filters={"PatientName": "synth*"})) == 2  # PN: case-insensitive
    assert len(client.search_for_studies(limit=1)) == 1
    assert len(client.search_for_studies(limit=1, offset=1)) == 1
    assert client.search_for_studies(limit=1, offset=2) == []
    with_description = client.search_for_studies(fields=["StudyDescription"], search_filters={"PatientID": "SYN00001"})
    assert with_description[0]["00081030"]["Value"] == ["Synthetic test image"]


def test_qido_series_and_instances(stored: tuple[DICOMwebClient, list[pydicom.Dataset]]) -> None:
    client, (first, second, _) = stored
    series = client.search_for_series(first.StudyInstanceUID)
    assert sorted(_values(series, "0020000E")) == sorted([first.SeriesInstanceUID, second.SeriesInstanceUID])
    instances = client.search_for_instances(first.StudyInstanceUID, first.SeriesInstanceUID)
    assert _values(instances, "00080018") == [first.SOPInstanceUID]
    assert instances[0]["00081190"]["Value"][0].endswith(f"/instances/{first.SOPInstanceUID}")
    assert len(client.search_for_instances(search_filters={"SOPClassUID": first.SOPClassUID})) == 3


def test_qido_refuses_unknown_attributes(web: Web) -> None:
    answer = requests.get(web.dicomweb + "/studies", params={"NoSuchKeyword": "x"}, headers=web.admin, timeout=10)
    assert answer.status_code == 400


def test_wado_retrieves_what_was_stored(stored: tuple[DICOMwebClient, list[pydicom.Dataset]], tmp_path: Path) -> None:
    client, (first, second, _) = stored
    study = client.retrieve_study(first.StudyInstanceUID)
    assert sorted(ds.SOPInstanceUID for ds in study) == sorted([first.SOPInstanceUID, second.SOPInstanceUID])
    one = client.retrieve_instance(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID)
    assert one.PixelData == pydicom.dcmread(tmp_path / "a.dcm").PixelData
    series = client.retrieve_series(second.StudyInstanceUID, second.SeriesInstanceUID)
    assert [ds.SOPInstanceUID for ds in series] == [second.SOPInstanceUID]
    metadata = client.retrieve_study_metadata(first.StudyInstanceUID)
    assert sorted(m["00080018"]["Value"][0] for m in metadata) == sorted([first.SOPInstanceUID, second.SOPInstanceUID])
    assert all("7FE00010" not in m for m in metadata)


def test_wado_rendered_and_not_found(web: Web, stored: tuple[DICOMwebClient, list[pydicom.Dataset]]) -> None:
    _, (first, _, _) = stored
    url = (f"{web.dicomweb}/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
           f"/instances/{first.SOPInstanceUID}/rendered")
    png = requests.get(url, headers=web.reader, timeout=10)
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)
    jpeg = requests.get(url, headers={**web.reader, "Accept": "image/jpeg"}, timeout=10)
    assert jpeg.content[:2] == b"\xff\xd8"
    assert requests.get(web.dicomweb + "/studies/1.2.3", headers=web.reader, timeout=10).status_code == 404
