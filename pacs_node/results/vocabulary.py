"""Coded concepts used by the result objects.

Standard codes come from pydicom's copy of the DICOM/SNOMED CT tables rather than being typed in, so
a meaning always matches what validators expect (the one exception, the procedure code, says why).
Concepts the standard has no code for (most CheXpert labels, some Chest ImaGenome regions) get codes
in two private coding schemes, declared in the object's Coding Scheme Identification Sequence as
PS3.3 C.12.1.1.2 asks for "99"-prefixed schemes. Private code values are the 1-based position in
the shared vocabularies (``CXP01`` = first CheXpert label, ``CIG01`` = first region), which
``pipelines.constants`` keeps stable.
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import FindingSite
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipelines.constants import CHEXPERT_LABELS, REGIONS

FINDINGS_SCHEME = "99CHEXPERT"
REGIONS_SCHEME = "99CXRIMAGENOME"



def coding_schemes() -> list[CodingSchemeIdentificationItem]:
    """Fresh Coding Scheme Identification items for one object (items are datasets: never share one
    between two objects' sequences)."""
    return [
        CodingSchemeIdentificationItem(
            designator=FINDINGS_SCHEME,
            name="CheXpert observation labels (Irvin et al. 2019)",
            responsible_organization="pacs-node project",
        ),
        CodingSchemeIdentificationItem(
            designator=REGIONS_SCHEME,
            name="Chest ImaGenome anatomical regions (Wu et al. 2021)",
            responsible_organization="pacs-node project",
        ),
    ]

#: The procedure every result reports on (SNOMED CT 399208008 |Plain chest X-ray (procedure)|; not in
#: pydicom's tables, which only carry codes some DICOM context group uses).
CHEST_RADIOGRAPH = Code("399208008", "SCT", "Plain chest X-ray")

PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
PROBABILITY = codes.DCM.Probability
UNITLESS = Code("1", "UCUM", "no units")
ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure
RIGHT, LEFT = codes.SCT.Right, codes.SCT.Left

# CheXpert labels that DICOM's SNOMED CT table has a code for; the rest are private codes.
_STANDARD_FINDINGS: dict[str, Code] = {
    "Edema": codes.SCT.PulmonaryEdema,
    "Pleural Effusion": codes.SCT.PleuralEffusion,
    "Pneumothorax": codes.SCT.Pneumothorax,
}

# Chest ImaGenome region -> (SNOMED CT anatomy, laterality); None where no SNOMED code in the table
# names the same structure (the private region code still identifies it exactly).
_REGION_ANATOMY: dict[str, tuple[Code, Code | None] | None] = {
    "lung": (codes.SCT.Lung, None),
    "upper lung zone": (codes.SCT.UpperZoneOfLung, None),
    "mid lung zone": (codes.SCT.MiddleZoneOfLung, None),
    "lower lung zone": (codes.SCT.LowerZoneOfLung, None),
    "hilar structures": (codes.SCT.HilumOfLung, None),
    "apical zone": (codes.SCT.ApexOfLung, None),
    "costophrenic angle": None,
    "hemidiaphragm": (codes.SCT.Diaphragm, None),
    "clavicle": (codes.SCT.Clavicle, None),
    "trachea": (codes.SCT.Trachea, None),
    "spine": (codes.SCT.Spine, None),
    "aortic arch": (codes.SCT.AorticArch, None),
    "mediastinum": (codes.SCT.Mediastinum, None),
    "upper mediastinum": None,
    "svc": (codes.SCT.SuperiorVenaCava, None),
    "cardiac silhouette": (codes.SCT.Heart, None),
    "cavoatrial junction": None,
    "right atrium": (codes.SCT.RightAtrium, None),
    "carina": (codes.SCT.Carina, None),
    "abdomen": (codes.SCT.Abdomen, None),
}


def finding_code(label: str) -> Code:
    """The coded concept of one CheXpert label."""
    if label not in CHEXPERT_LABELS:
        raise ValueError(f"unknown CheXpert label {label!r}")
    return _STANDARD_FINDINGS.get(label) or Code(f"CXP{CHEXPERT_LABELS.index(label) + 1:02d}",
                                                   FINDINGS_SCHEME, label)


def region_code(name: str) -> Code:
    """The private coded concept of one Chest ImaGenome region (exactly the model's vocabulary)."""
    if name not in REGIONS:
        raise ValueError(f"unknown Chest ImaGenome region {name!r}")
    return Code(f"CIG{REGIONS.index(name) + 1:02d}", REGIONS_SCHEME, name)


def region_finding_sites(name: str) -> list[FindingSite]:
    """SNOMED CT finding site (with laterality) of a region, or ``[]`` when it has no standard code."""
    if name not in REGIONS:
        raise ValueError(f"unknown Chest ImaGenome region {name!r}")
    laterality: Code | None = None
    base = name
    if name.startswith("right ") and name != "right atrium":
        laterality, base = RIGHT, name.removeprefix("right ")
    elif name.startswith("left "):
        laterality, base = LEFT, name.removeprefix("left ")
    anatomy = _REGION_ANATOMY.get(base)
    if anatomy is None:
        return []
    return [FindingSite(anatomic_location=anatomy[0], laterality=laterality)]
