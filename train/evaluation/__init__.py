"""Scoring and reporting: the reconstruction metrics, floors and feature networks, the
attribute classifier (stage ``attribute_classifier``), the per-dataset scores (stage
``evaluate``), figures, and REPORT.md (stage ``report``)."""
