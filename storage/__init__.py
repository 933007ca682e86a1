"""Durable state of the node: the database schema, the job queue, the instance store and migrations.

``db`` (engines, sessions, Alembic ``upgrade``), ``schema`` (tables), ``store`` (files on disk, written
atomically and durably), ``queue`` (leased jobs with backoff and dead letters), ``repository`` (instance row
helpers), ``doctor`` (database/store consistency check and repair), ``migrations`` (Alembic revisions).

Imports neither ``pipelines`` nor ``pacs_node``."""
