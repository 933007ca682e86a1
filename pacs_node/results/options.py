"""What the site configures about the result objects: who made them and which of them to make."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pacs_node import __version__
from pacs_node.config import ResultsConfig
from pipelines.constants import CHEXPERT_LABELS


@dataclass(frozen=True)
class ResultOptions:
    """Identity of this node as the device observer and contributing equipment, plus which optional
    objects to build.

    ``kos_threshold`` is the probability at or above which a CheXpert finding counts as *present*
    (in the AI SR's qualitative evaluation and for flagging the image in a Key Object Selection);
    ``per_finding_thresholds`` overrides it per label. With ``make_kos`` false no KOS is built, but
    the threshold still decides present/absent in the SR.
    """

    device_name: str = "PACS-NODE"
    manufacturer: str = "pacs-node project"
    model_name: str = "pacs-node CRRG-CLIP"
    software_versions: str = "0.1.0"
    device_serial_number: str = "0"
    institution_name: str | None = None
    device_uid: str | None = None  # DICOM Device Observer UID; derived from the name when None
    kos_threshold: float = 0.5
    per_finding_thresholds: Mapping[str, float] = field(default_factory=dict)
    make_kos: bool = True
    make_gsps: bool = True
    make_narrative: bool = True
    ai_sr_series_number: int = 9901
    narrative_series_number: int = 9902
    kos_series_number: int = 9903
    gsps_series_number: int = 9904

    def __post_init__(self) -> None:
        unknown = set(self.per_finding_thresholds) - set(CHEXPERT_LABELS)
        if unknown:
            raise ValueError(
                f"results.per_finding_thresholds: unknown finding(s) {sorted(unknown)}; "
                f"expected CheXpert labels {list(CHEXPERT_LABELS)}"
            )
        for key, value in [("results.kos_threshold", self.kos_threshold),
                           *((f"results.per_finding_thresholds.{k}", v)
                             for k, v in self.per_finding_thresholds.items())]:
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{key}: {value!r} is not a probability in [0, 1]")
        for key in ("ai_sr_series_number", "narrative_series_number", "kos_series_number",
                    "gsps_series_number"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"results.{key}: must be a positive integer")

    @classmethod
    def from_config(cls, results: ResultsConfig) -> ResultOptions:
        """The options a site's ``[results]`` section gives; the product's identity (manufacturer, model
        name, software version) and the series numbers are this node's, not the site's."""
        return cls(
            device_name=results.device_name,
            software_versions=__version__,
            device_serial_number=results.device_serial_number,
            institution_name=results.institution_name,
            kos_threshold=results.kos_threshold,
            per_finding_thresholds=dict(results.per_finding_thresholds),
            make_kos=results.kos,
            make_gsps=results.gsps,
            make_narrative=results.narrative,
        )

    def threshold(self, label: str) -> float:
        """The probability at or above which ``label`` is reported present."""
        return float(self.per_finding_thresholds.get(label, self.kos_threshold))
