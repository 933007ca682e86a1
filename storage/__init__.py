"""Durable state of the node: the database schema, the job queue, the instance store and migrations.

Imports neither ``pipelines`` nor ``pacs_node``."""
