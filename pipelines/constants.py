"""Vocabularies shared by every model, bundle and result: the 29 Chest ImaGenome anatomical regions
(in the order RGRG uses, so class index ``i + 1`` of the detector is ``REGIONS[i]``) and the 14 CheXpert
findings."""

REGIONS: tuple[str, ...] = (
    "right lung",
    "right upper lung zone",
    "right mid lung zone",
    "right lower lung zone",
    "right hilar structures",
    "right apical zone",
    "right costophrenic angle",
    "right hemidiaphragm",
    "left lung",
    "left upper lung zone",
    "left mid lung zone",
    "left lower lung zone",
    "left hilar structures",
    "left apical zone",
    "left costophrenic angle",
    "left hemidiaphragm",
    "trachea",
    "spine",
    "right clavicle",
    "left clavicle",
    "aortic arch",
    "mediastinum",
    "upper mediastinum",
    "svc",
    "cardiac silhouette",
    "cavoatrial junction",
    "right atrium",
    "carina",
    "abdomen",
)
NUM_REGIONS = len(REGIONS)  # 29; the detector has NUM_REGIONS + 1 classes (0 = background)

CHEXPERT_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
NUM_LABELS = len(CHEXPERT_LABELS)

#: The projections a chest model of this project reads (Chest ImaGenome and CheXpert's frontal images),
#: preferred first: a bundle's manifest may say otherwise in ``views``.
FRONTAL_VIEWS = ("PA", "AP")
