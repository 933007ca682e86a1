"""One analysis of one study, as the result builders see it: the image read and why, the images set aside
and why, what the models said (or why they did not read it), and the versions it replaces."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pydicom import Dataset

from pipelines.interface import ImageResult, NotInterpreted


@dataclass(frozen=True)
class StudyReport:
    """``analysed`` and the ``set_aside`` datasets are pixel-free evidence headers
    (:func:`pacs_node.results.common.evidence_header`). ``analysed`` is None when no image of the study is a
    view the model reads; ``outcome`` is then a :class:`NotInterpreted` saying so.

    ``subject`` is what the result objects' SOP Instance UIDs are derived from (with the bundle and the
    kind): the study and its set of instances, so that re-running an analysis reproduces its objects and a
    new set of instances makes new ones. ``version`` is the analysis' number within the study (the
    objects' Instance Number), ``predecessors`` the objects of the previous analysis by kind, which the new
    SRs name in their Predecessor Documents Sequence."""

    analysed: Dataset | None
    analysed_reason: str
    set_aside: tuple[tuple[Dataset, str], ...]
    outcome: ImageResult | NotInterpreted
    subject: str
    version: int = 1
    predecessors: Mapping[str, Dataset] = field(default_factory=dict)

    @property
    def interpreted(self) -> bool:
        return isinstance(self.outcome, ImageResult) and self.analysed is not None

    @property
    def result(self) -> ImageResult:
        if not isinstance(self.outcome, ImageResult):
            raise ValueError("the study was not interpreted")
        return self.outcome

    @property
    def evidence(self) -> list[Dataset]:
        """Every image of the study the report is about: the one read first, then those set aside."""
        first = [self.analysed] if self.analysed is not None else []
        return first + [header for header, _ in self.set_aside]

    @property
    def first_image(self) -> Dataset:
        """The image the report is filed under (study, patient, routing): the one read, else the first."""
        return self.evidence[0]
