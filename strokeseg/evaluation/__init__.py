"""Scoring behind ``evaluate.py``: fold checkpoints to whole-volume predictions, per-case
metrics and run summaries (``engine``), the metric definitions and lesion matching
(``metrics``), statistics over cases, folds and runs (``statistics``) and the CSV files,
Markdown tables and figures (``report``).
"""
