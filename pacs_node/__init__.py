"""The DICOM service that composes ``storage`` and ``pipelines``: listener, worker, routing, results, CLI."""

__version__ = "0.1.0"
