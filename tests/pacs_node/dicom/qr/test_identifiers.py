"""C-FIND response identifiers: the pre-encoded ones (IdentifierEncoder: its elements, and the bytes it
carries for encode_pre_encoded) are byte for byte what response_identifier (the reference, QIDO-RS's
builder) encodes to, at every level, in both little endian
syntaxes, for the keys a viewer asks for, keys the node does not keep, sequences and non-ASCII names;
where the encoder does not apply, the SCP still answers (with the reference builder)."""

from __future__ import annotations

import pytest
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind

from pacs_node.dicom.qr.find import (
    IdentifierEncoder,
    encode_pre_encoded,
    entity_rows,
    matching_keys,
    response_identifier,
)
from pacs_node.dicom.qr.matching import Level
from tests.pacs_node.dicom.qr.conftest import Archive, Scp
from tests.pacs_node.dicom.qr.test_find import find, q

REQUESTS = {
    Level.PATIENT: q("PATIENT", PatientID="", PatientName="", PatientBirthDate="", PatientSex="",
                     NumberOfPatientRelatedStudies=None, NumberOfPatientRelatedSeries=None,
                     NumberOfPatientRelatedInstances=None, OtherPatientIDsSequence=[]),
    Level.STUDY: q("STUDY", StudyInstanceUID="", StudyDate="", StudyTime="", AccessionNumber="",
                   PatientName="", PatientID="", StudyDescription="", ReferringPhysicianName="",
                   ModalitiesInStudy="", SOPClassesInStudy="", NumberOfStudyRelatedSeries=None,
                   NumberOfStudyRelatedInstances=None, RetrieveAETitle="", PatientAge="",
                   InstitutionName="", ProcedureCodeSequence=[], SpecificCharacterSet="ISO_IR 100"),
    Level.SERIES: q("SERIES", SeriesInstanceUID="", Modality="", SeriesNumber=None, SeriesDescription="",
                    BodyPartExamined="", NumberOfSeriesRelatedInstances=None, StudyDate="",
                    NumberOfStudyRelatedInstances=None),
    Level.IMAGE: q("IMAGE", SOPInstanceUID="", SOPClassUID="", InstanceNumber=None, Rows=None, Columns=None,
                   StudyInstanceUID="", SeriesInstanceUID="", PatientName="", ReferencedImageSequence=[]),
}


@pytest.mark.parametrize("level", list(Level))
@pytest.mark.parametrize("implicit_vr", [True, False], ids=["implicit", "explicit"])
def test_pre_encoded_identifiers_are_the_reference_bytes(archive: Archive, level: Level,
                                                         implicit_vr: bool) -> None:
    request = REQUESTS[level]
    encoder = IdentifierEncoder.for_request(request, level, "QRSCP", implicit_vr=implicit_vr, little_endian=True)
    assert encoder is not None
    with archive.sessions() as session:
        rows = list(entity_rows(session, level, matching_keys(session, q(level.value), level, limit=100)))
    assert rows
    for row in rows:
        expected = encode(response_identifier(request, level, row, "QRSCP"), implicit_vr, True)
        identifier = encoder.identifier(row)
        assert encode(identifier, implicit_vr, True) == expected  # pydicom writing its elements
        assert identifier.encoded == expected  # the bytes it carries
        assert encode_pre_encoded(identifier, implicit_vr, True) is identifier.encoded
        # asked for another syntax, it is encoded by pydicom in that one
        assert encode_pre_encoded(identifier, not implicit_vr, True) == encode(identifier, not implicit_vr, True)


def test_non_ascii_values_and_empty_counts_encode_alike() -> None:
    request = q("IMAGE", PatientName="", SOPInstanceUID="", InstanceNumber=None, Rows=None,
                NumberOfSeriesRelatedInstances=None)
    row = {"PatientName": "Müller^Jörg=山田^太郎", "SOPInstanceUID": "1.2.3.45", "InstanceNumber": None,
           "Rows": 2500, "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4", "instances": 1}
    for implicit_vr in (True, False):
        encoder = IdentifierEncoder.for_request(request, Level.IMAGE, None, implicit_vr=implicit_vr,
                                                little_endian=True)
        assert encoder is not None
        identifier = encoder.identifier(row)
        expected = encode(response_identifier(request, Level.IMAGE, row, None), implicit_vr, True)
        assert encode(identifier, implicit_vr, True) == identifier.encoded == expected


def test_the_encoder_declines_big_endian_and_keys_of_context_dependent_vr() -> None:
    request = q("IMAGE", SOPInstanceUID="")
    assert IdentifierEncoder.for_request(request, Level.IMAGE, None, implicit_vr=False, little_endian=False) is None
    request.SmallestImagePixelValue = None  # US or SS, decided by Pixel Representation
    assert IdentifierEncoder.for_request(request, Level.IMAGE, None, implicit_vr=True, little_endian=True) is None


def test_a_key_the_encoder_declines_is_still_answered(archive: Archive, qr_scp: Scp) -> None:
    answers, status = find(qr_scp, q("PATIENT", PatientID="P-001", PatientName="", SmallestImagePixelValue=None),
                           PatientRootQueryRetrieveInformationModelFind)
    assert status == 0x0000
    assert [(str(a.PatientID), str(a.PatientName), "SmallestImagePixelValue" in a) for a in answers] == [
        ("P-001", "Doe^Jane", True)]
