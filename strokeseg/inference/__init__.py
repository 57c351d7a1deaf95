"""Running trained networks on whole volumes: sliding-window inference with blending, mirror
TTA, fold ensembles and mixed precision (``sliding_window``; used by validation,
evaluation and prediction) and prediction on new NIfTI data behind ``predict.py``
(``prediction``: lesion masks on the native grid, volumes, lesion tables).
"""
