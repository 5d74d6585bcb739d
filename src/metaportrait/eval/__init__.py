"""Evaluation: metrics as plain functions (`metrics`), feature extractors (`features`), protocols (`protocols`)."""
