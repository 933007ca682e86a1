"""Converters from other projects' checkpoints into model bundles."""
