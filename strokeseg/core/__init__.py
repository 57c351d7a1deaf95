"""Support code every stage shares: file I/O (``io``: atomic writes, pickle-free .npz and
JSON, validated NIfTI), the per-case loop (``runner``: progress, one log line per case,
failure summary, exit status), the one skeleton of every per-case stage (``stage``: a
``Stage`` declaration run by ``run_stage``: settings check, cases, summary, splits), intensity and geometry operations on 3-D volumes
(``geometry``) and the checkpoint data contract, what a model was trained on (``contract``).
"""
