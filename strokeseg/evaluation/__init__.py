"""Scoring behind ``evaluate.py``: fold checkpoints to whole-volume predictions, per-case
metrics and run summaries (``engine``; the metric entries and lesion matching live in
:mod:`strokeseg.core.metrics`), statistics over cases, folds and runs (``statistics``) and the CSV files,
Markdown tables and figures (``report``).
"""
