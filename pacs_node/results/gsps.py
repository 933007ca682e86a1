"""Grayscale Softcopy Presentation State with the reported regions drawn as labelled boxes, for
viewers that display presentation states but not SR graphics."""

from __future__ import annotations

from highdicom import PresentationLUTShapeValues, PresentationLUTTransformation
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    TextObject,
)
from pydicom import Dataset

from pacs_node.results.common import (
    character_set_kwargs,
    clipped_box,
    contributing_equipment,
    copy_patient_study,
    equipment_kwargs,
    identity_kwargs,
    rectangle_polyline,
)
from pacs_node.results.options import ResultOptions
from pipelines.interface import ImageResult

KIND = "gsps"
LAYER = "AI_REGIONS"


def build_gsps(source: Dataset, result: ImageResult,
               options: ResultOptions) -> GrayscaleSoftcopyPresentationState | None:
    """The GSPS for one image, or None when no region was reported or the image is in colour (a
    grayscale presentation state can only reference single-sample images)."""
    regions = result.selected_regions
    if not regions or int(source.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    rows, columns = int(source.Rows), int(source.Columns)
    graphics, texts = [], []
    for region in regions:
        box = clipped_box(region, rows, columns)
        graphics.append(GraphicObject(graphic_type=GraphicTypeValues.POLYLINE,
                                      graphic_data=rectangle_polyline(box),
                                      units=AnnotationUnitsValues.PIXEL))
        # Anchor the label at the box's top-left corner, without a drawn anchor line.
        texts.append(TextObject(text_value=region.name, units=AnnotationUnitsValues.PIXEL,
                                anchor_point=(box[0], box[1]), anchor_point_visible=False))
    layer = GraphicLayer(layer_name=LAYER, order=1, description="Regions reported by the AI")
    label = "AI_REGIONS" if result.clinical_use else "AI_NOT_CLINICAL"
    # The presentation state pipeline ignores Photometric Interpretation: a MONOCHROME1 radiograph
    # (white = low value) must be inverted here or it would be shown as a negative.
    lut_shape = (PresentationLUTShapeValues.INVERSE
                 if source.get("PhotometricInterpretation") == "MONOCHROME1"
                 else PresentationLUTShapeValues.IDENTITY)
    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=[source],
        series_number=options.gsps_series_number,
        **identity_kwargs(source, result, KIND),
        content_label=label,
        content_description=f"{result.model_name} {result.model_version} regions"[:64],
        graphic_annotations=[GraphicAnnotation(referenced_images=[source], graphic_layer=layer,
                                               graphic_objects=graphics, text_objects=texts)],
        graphic_layers=[layer],
        presentation_lut_transformation=PresentationLUTTransformation(presentation_lut_shape=lut_shape),
        contributing_equipment=contributing_equipment(options, result),
        **equipment_kwargs(options),
        **character_set_kwargs(source, result),
    )
    gsps.SeriesDescription = "AI regions" if result.clinical_use else "AI regions - NOT FOR CLINICAL USE"
    # General Series Laterality (2C): dciodvfy requires it on PR; copy the image's, else empty. Its
    # enumerated values are R and L only: Image Laterality's B (both) and U (unpaired) have no place here.
    laterality = str(source.get("Laterality") or source.get("ImageLaterality") or "").strip().upper()
    gsps.Laterality = laterality if laterality in ("R", "L") else None
    copy_patient_study(source, gsps)
    return gsps
