"""DICOMweb (PS3.18) on the node's HTTP port: STOW-RS, QIDO-RS and WADO-RS under ``/dicom-web``."""
