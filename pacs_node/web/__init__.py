"""The node's HTTP face: DICOMweb (STOW-RS, QIDO-RS, WADO-RS), the admin API, the console, and the
``/healthz`` and ``/metrics`` endpoints, as one ASGI application served by uvicorn."""
